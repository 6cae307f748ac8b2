"""deploy/kubernetes/, checked offline: every manifest against the Kubernetes schemas
(``kubernetes-validate --strict``), the KEDA ScaledObject against the checked-in schema of its CRD
(``check-jsonschema``), the kustomization rendering (``kubectl kustomize``, where kubectl exists),
and the wiring: env names the code reads, ports the settings default to, and the KEDA trigger
pointing at the stream and group the service uses.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from service.queues.redis.protocol import RedisLayout
from service.settings import ServiceSettings

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "kubernetes"
KEDA_SCHEMA = K8S / "schemas" / "keda.sh_scaledobjects.v1alpha1.json"
SCALED_OBJECT = K8S / "keda-scaledobject.yaml"
CORE_MANIFESTS = sorted(
    p for p in K8S.glob("*.yaml") if p.name not in {"kustomization.yaml", SCALED_OBJECT.name}
)
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    path = BIN / name
    found = str(path) if path.exists() else shutil.which(name)
    assert found, f"{name} is not installed: pip install -e '.[dev]'"
    return found


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def all_documents() -> list[dict[str, Any]]:
    return [doc for path in [*CORE_MANIFESTS, SCALED_OBJECT] for doc in documents(path)]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, check=False, timeout=120)


def test_the_kustomization_lists_every_manifest() -> None:
    listed = set(yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"])
    on_disk = {p.name for p in [*CORE_MANIFESTS, SCALED_OBJECT]} - {"secret.example.yaml"}
    assert listed == on_disk


def test_manifests_validate_against_the_kubernetes_schemas_strictly() -> None:
    result = run(tool("kubernetes-validate"), "--strict", *map(str, CORE_MANIFESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("passed") == sum(len(documents(p)) for p in CORE_MANIFESTS)


def test_strict_validation_rejects_a_misspelt_field(tmp_path: Path) -> None:
    """The check has teeth: an unknown field in a container fails it."""
    (deployment, *_rest) = documents(K8S / "worker.yaml")
    deployment["spec"]["template"]["spec"]["containers"][0]["terminationGracePeriod"] = 90
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(deployment))
    result = run(tool("kubernetes-validate"), "--strict", str(bad))
    assert result.returncode != 0


def test_scaled_object_validates_against_the_keda_crd_schema(tmp_path: Path) -> None:
    check = tool("check-jsonschema")
    result = run(check, "--schemafile", str(KEDA_SCHEMA), str(SCALED_OBJECT))
    assert result.returncode == 0, result.stdout + result.stderr
    (scaled,) = documents(SCALED_OBJECT)
    scaled["spec"]["minReplicas"] = 0  # HPA's spelling, not KEDA's
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(scaled))
    assert run(check, "--schemafile", str(KEDA_SCHEMA), str(bad)).returncode != 0


def test_the_kustomization_renders() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed: the kustomize rendering is not checked here")
    result = run(kubectl, "kustomize", str(K8S))
    assert result.returncode == 0, result.stderr
    rendered = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    assert len(rendered) == len(all_documents()) - 1  # all but secret.example.yaml
    assert all(doc["metadata"].get("namespace") == "instcolor" for doc in rendered)


def env_names() -> set[str]:
    names: set[str] = set()
    for doc in all_documents():
        if doc["kind"] == "ConfigMap":
            names |= set(doc["data"])
        if doc["kind"] == "Secret":
            names |= set(doc.get("stringData", {})) | set(doc.get("data", {}))
        if doc["kind"] == "Deployment":
            spec = doc["spec"]["template"]["spec"]
            for container in [*spec.get("initContainers", []), *spec["containers"]]:
                names |= {env["name"] for env in container.get("env", [])}
    return {name for name in names if name.startswith("COLORIZE_")}


def test_every_env_name_is_a_setting_the_code_reads() -> None:
    fields = {f"COLORIZE_{name}".upper() for name in ServiceSettings.model_fields}
    # Read outside the settings: by the image's entrypoint and healthcheck.
    scripts = (REPO / "deploy" / "entrypoint.sh").read_text() + (
        REPO / "deploy" / "healthcheck.py"
    ).read_text()
    script_names = set(re.findall(r"COLORIZE_[A-Z_]+", scripts))
    names = env_names()
    assert {"COLORIZE_REDIS_URL", "COLORIZE_API_KEYS", "COLORIZE_QUEUE"} <= names
    unknown = names - fields - script_names
    assert not unknown, f"not read by the service: {sorted(unknown)}"


def by_kind(kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for d in all_documents() if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def container(deployment: str) -> dict[str, Any]:
    spec = by_kind("Deployment", deployment)["spec"]["template"]["spec"]
    return dict(spec["containers"][0])


def env_of(deployment: str) -> dict[str, str]:
    config = by_kind("ConfigMap", "instcolor-config")["data"]
    return {**config, **{e["name"]: e["value"] for e in container(deployment).get("env", [])}}


def port(c: dict[str, Any], name: str) -> int:
    return int(next(p["containerPort"] for p in c["ports"] if p["name"] == name))


def test_ports_match_the_settings_defaults() -> None:
    defaults = ServiceSettings.model_fields
    api, worker = container("instcolor-api"), container("instcolor-worker")
    assert (
        port(api, "http")
        == defaults["port"].default
        == int(env_of("instcolor-api")["COLORIZE_PORT"])
    )
    metrics_port = defaults["worker_metrics_port"].default
    assert port(worker, "metrics") == metrics_port
    assert int(env_of("instcolor-worker")["COLORIZE_WORKER_METRICS_PORT"]) == metrics_port
    redis_default = urlparse(defaults["redis_url"].default).port
    assert port(container("instcolor-redis"), "redis") == redis_default == 6379
    assert urlparse(env_of("instcolor-worker")["COLORIZE_REDIS_URL"]).port == redis_default
    for deployment, name in [("instcolor-api", "8000"), ("instcolor-worker", "9100")]:
        annotations = by_kind("Deployment", deployment)["spec"]["template"]["metadata"][
            "annotations"
        ]
        assert annotations["prometheus.io/port"] == name
    assert by_kind("Service", "instcolor-api")["spec"]["ports"][0]["port"] == 8000


def test_keda_triggers_point_at_the_stream_and_group_the_service_uses() -> None:
    config = by_kind("ConfigMap", "instcolor-config")["data"]
    layout = RedisLayout(config["COLORIZE_REDIS_PREFIX"], config["COLORIZE_REDIS_GROUP"])
    defaults = ServiceSettings.model_fields
    assert (layout.prefix, layout.group) == (
        defaults["redis_prefix"].default, defaults["redis_group"].default,
    )  # fmt: skip
    url = urlparse(config["COLORIZE_REDIS_URL"])
    spec = by_kind("ScaledObject", "instcolor-worker")["spec"]
    assert spec["scaleTargetRef"]["name"] == "instcolor-worker"
    kinds = set()
    for trigger in spec["triggers"]:
        meta = trigger["metadata"]
        assert trigger["type"] == "redis-streams"
        assert meta["stream"] == layout.stream == "colorize:jobs"
        assert meta["consumerGroup"] == layout.group
        assert meta["address"] == f"{url.hostname}:{url.port}"
        assert meta["databaseIndex"] == url.path.strip("/")
        kinds |= {"lagCount", "pendingEntriesCount"} & set(meta)
        assert len({"lagCount", "pendingEntriesCount"} & set(meta)) == 1  # one per trigger
    assert kinds == {"lagCount", "pendingEntriesCount"}


def test_worker_grace_period_covers_its_drain() -> None:
    """SIGTERM: the worker finishes the batches it holds; each is useful for at most
    request_timeout_s, and it holds at most max_concurrent_batches of them."""
    defaults = ServiceSettings.model_fields
    timeout = float(by_kind("ConfigMap", "instcolor-config")["data"]["COLORIZE_REQUEST_TIMEOUT_S"])
    spec = by_kind("Deployment", "instcolor-worker")["spec"]["template"]["spec"]
    drain = defaults["max_concurrent_batches"].default * timeout
    assert spec["terminationGracePeriodSeconds"] >= drain + 1
    api = by_kind("Deployment", "instcolor-api")["spec"]["template"]["spec"]
    assert api["terminationGracePeriodSeconds"] > defaults["drain_timeout_s"].default
    assert container("instcolor-worker")["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_every_object_carries_the_standard_labels() -> None:
    for doc in all_documents():
        labels = doc["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "instcolor", doc["metadata"]["name"]
        assert labels["app.kubernetes.io/part-of"] == "instcolor"
        if doc["kind"] == "Deployment":
            template = doc["spec"]["template"]["metadata"]["labels"]
            assert doc["spec"]["selector"]["matchLabels"].items() <= template.items()
            assert "app.kubernetes.io/component" in template
