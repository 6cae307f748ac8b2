"""deploy/kubernetes/ray/rayjob.yaml, checked offline: the RayJob against the checked-in schema of
KubeRay's CRD (``check-jsonschema``; ``kubernetes-validate`` knows no CRDs), its pod templates as
Pods against the Kubernetes schemas (``kubernetes-validate --strict``), and its entrypoint as a
command line ``colorize --engine ray`` accepts."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from service.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "kubernetes"
RAYJOB = K8S / "ray" / "rayjob.yaml"
RAYJOB_SCHEMA = K8S / "schemas" / "ray.io_rayjobs.v1.json"
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    path = BIN / name
    found = str(path) if path.exists() else shutil.which(name)
    assert found, f"{name} is not installed: pip install -e '.[dev]'"
    return found


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, check=False, timeout=120)


def rayjob() -> dict[str, Any]:
    (document,) = [d for d in yaml.safe_load_all(RAYJOB.read_text()) if d]
    return dict(document)


def test_the_rayjob_validates_against_kuberays_crd_schema(tmp_path: Path) -> None:
    check = tool("check-jsonschema")
    result = run(check, "--schemafile", str(RAYJOB_SCHEMA), str(RAYJOB))
    assert result.returncode == 0, result.stdout + result.stderr
    job = rayjob()
    worker = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    worker["template"]["spec"]["containers"][0]["volumeMount"] = []  # misspelt, in the pod spec
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(job))
    assert run(check, "--schemafile", str(RAYJOB_SCHEMA), str(bad)).returncode != 0


def test_the_rayjobs_pod_templates_are_valid_pods(tmp_path: Path) -> None:
    cluster = rayjob()["spec"]["rayClusterSpec"]
    templates = [cluster["headGroupSpec"]["template"]]
    templates += [group["template"] for group in cluster["workerGroupSpecs"]]
    pods = [
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"template-{i}"},
         "spec": template["spec"]}
        for i, template in enumerate(templates)
    ]  # fmt: skip
    path = tmp_path / "pods.yaml"
    path.write_text(yaml.safe_dump_all(pods))
    result = run(tool("kubernetes-validate"), "--strict", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_rayjobs_entrypoint_is_a_colorize_ray_command_line() -> None:
    job = rayjob()
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "service"]
    args = build_parser().parse_args(argv[3:])
    assert args.engine == "ray"
    assert args.ray_address == "auto"
    mounts = {
        m["mountPath"]
        for m in job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][
            0
        ]["volumeMounts"]
    }
    assert str(args.weights_dir) in mounts
    assert any(str(args.output_dir).startswith(m + "/") for m in mounts)


def test_the_rayjob_mounts_the_services_weights_volume() -> None:
    (pvc,) = [d for d in yaml.safe_load_all((K8S / "weights-pvc.yaml").read_text()) if d]
    cluster = rayjob()["spec"]["rayClusterSpec"]
    for template in [cluster["headGroupSpec"]["template"]] + [
        group["template"] for group in cluster["workerGroupSpecs"]
    ]:
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"]
                  for v in template["spec"]["volumes"]}  # fmt: skip
        assert claims["weights"] == pvc["metadata"]["name"]
