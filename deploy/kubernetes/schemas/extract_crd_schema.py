"""Write the checked-in JSON schema of KEDA's ScaledObject from KEDA's CRD.

    git -C keda show v2.20.2:config/crd/bases/keda.sh_scaledobjects.yaml > so.yaml
    python deploy/kubernetes/schemas/extract_crd_schema.py so.yaml v2.20.2 <commit>

The CRD's openAPIV3Schema (version v1alpha1), made strict the way the API server treats a
structural schema (unknown fields are pruned there; here they fail, so a misspelt field is caught):
``additionalProperties: false`` on every object that declares properties and neither declares
additionalProperties nor preserves unknown fields; apiVersion and kind pinned; metadata reduced to
name, namespace, labels and annotations.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

OUT = Path(__file__).with_name("keda.sh_scaledobjects.v1alpha1.json")


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


def main(crd_file: str, tag: str, commit: str) -> None:
    crd = yaml.safe_load(Path(crd_file).read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
    schema = version["schema"]["openAPIV3Schema"]
    make_strict(schema)
    props = schema["properties"]
    props["apiVersion"] = {"const": "keda.sh/v1alpha1"}
    props["kind"] = {"const": "ScaledObject"}
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
        "title": "KEDA ScaledObject (keda.sh/v1alpha1)",
        "description": (
            f"The openAPIV3Schema of KEDA's ScaledObject CRD, KEDA {tag} (github.com/kedacore/keda "
            f"at {commit}, config/crd/bases/keda.sh_scaledobjects.yaml), made strict: "
            "additionalProperties false on every object with declared properties, apiVersion and "
            "kind pinned, metadata limited to name, namespace, labels and annotations. Written by "
            "deploy/kubernetes/schemas/extract_crd_schema.py."
        ),
        **schema,
    }
    OUT.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:4])
