"""Write the checked-in JSON schema of a custom resource from its CRD (KEDA's ScaledObject,
KubeRay's RayJob).

    git -C keda show v2.20.2:config/crd/bases/keda.sh_scaledobjects.yaml > so.yaml
    python deploy/kubernetes/schemas/extract_crd_schema.py so.yaml v2.20.2 <commit>
    git -C kuberay show v1.7.0:ray-operator/config/crd/bases/ray.io_rayjobs.yaml > rj.yaml
    python deploy/kubernetes/schemas/extract_crd_schema.py rj.yaml v1.7.0 <commit> \\
        github.com/ray-project/kuberay ray-operator/config/crd/bases/ray.io_rayjobs.yaml

The CRD's openAPIV3Schema (its storage version), made strict the way the API server treats a
structural schema (unknown fields are pruned there; here they fail, so a misspelt field is caught):
``additionalProperties: false`` on every object that declares properties and neither declares
additionalProperties nor preserves unknown fields; apiVersion and kind pinned; metadata reduced to
name, namespace, labels and annotations. Written next to this file as
``<group>_<plural>.<version>.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).parent
KEDA = ("github.com/kedacore/keda", "config/crd/bases/keda.sh_scaledobjects.yaml")


def make_strict(node: Any) -> None:
    if isinstance(node, dict):
        if (
            node.get("type") == "object"
            and "properties" in node
            and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")
        ):
            node["additionalProperties"] = False
        for key, value in node.items():
            if key == "properties":
                for sub in value.values():
                    make_strict(sub)
            else:
                make_strict(value)
    elif isinstance(node, list):
        for item in node:
            make_strict(item)


def main(crd_file: str, tag: str, commit: str, project: str = KEDA[0], path: str = KEDA[1]) -> None:
    crd = yaml.safe_load(Path(crd_file).read_text())
    group, names = crd["spec"]["group"], crd["spec"]["names"]
    (version,) = [v for v in crd["spec"]["versions"] if v.get("storage")]
    schema = version["schema"]["openAPIV3Schema"]
    make_strict(schema)
    props = schema["properties"]
    props["apiVersion"] = {"const": f"{group}/{version['name']}"}
    props["kind"] = {"const": names["kind"]}
    strings = {"type": "object", "additionalProperties": {"type": "string"}}
    props["metadata"] = {
        "type": "object",
        "required": ["name"],
        "properties": {
            "name": {"type": "string"},
            "namespace": {"type": "string"},
            "labels": strings,
            "annotations": strings,
        },
        "additionalProperties": False,
    }
    schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "metadata"})
    schema.pop("description", None)
    out = {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": f"{names['kind']} ({group}/{version['name']})",
        "description": (
            f"The openAPIV3Schema of the {names['kind']} CRD, {tag} ({project} at {commit}, "
            f"{path}), made strict: additionalProperties false on every object with declared "
            "properties, apiVersion and kind pinned, metadata limited to name, namespace, labels "
            "and annotations. Written by deploy/kubernetes/schemas/extract_crd_schema.py."
        ),
        **schema,
    }
    target = HERE / f"{group}_{names['plural']}.{version['name']}.json"
    target.write_text(json.dumps(out, indent=None, separators=(",", ":")) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:6])
