"""A CustomResourceDefinition's schema for one version as a strict JSON schema (how the vendored
inferencepool_v1.json and httproute_v1.json were made; see README.md):

    python tests/schemas/crd_to_jsonschema.py CRD.yaml VERSION > OUT.json

Descriptions are dropped (size); every object that lists its properties gets
`additionalProperties: false`, so a misspelt field is an error (the API server would drop it
silently); apiVersion and kind are pinned to the CRD's group/version and kind.
"""

from __future__ import annotations

import json
import sys

import yaml


def strict(node):
    if isinstance(node, dict):
        out = {k: strict(v) for k, v in node.items() if k != "description"}
        if out.get("type") == "object" and "properties" in out and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(node, list):
        return [strict(v) for v in node]
    return node


def main(path: str, version: str) -> None:
    with open(path) as f:
        crd = yaml.safe_load(f)
    [v] = [v for v in crd["spec"]["versions"] if v["name"] == version]
    schema = strict(v["schema"]["openAPIV3Schema"])
    schema["properties"]["apiVersion"] = {"enum": [f"{crd['spec']['group']}/{version}"]}
    schema["properties"]["kind"] = {"enum": [crd["spec"]["names"]["kind"]]}
    schema["properties"]["metadata"] = {"type": "object"}
    schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind", "metadata", "spec"})
    schema["$schema"] = "http://json-schema.org/draft-07/schema#"
    json.dump(schema, sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main(*sys.argv[1:])
