"""Generate the InferenceDeployment CRD from the pydantic models.

Pydantic emits JSON Schema (draft 2020-12, with $defs and $ref); Kubernetes wants a structural
OpenAPI v3 schema: every node typed, no $ref, no anyOf for optionals, boolean exclusive bounds.
"""

from __future__ import annotations

from typing import Any

import yaml

from . import api

# Pydantic keywords with no meaning (or a different one) in a Kubernetes structural schema.
_DROPPED_KEYS = {"title", "additionalProperties", "discriminator", "$defs"}


def _structural(node: dict, defs: dict) -> dict:
    if "$ref" in node:
        target = defs[node["$ref"].split("/")[-1]]
        merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        return _structural(merged, defs)
    any_of = node.get("anyOf")
    if any_of is not None:
        # Optional[X] arrives as anyOf [X, null]: Kubernetes spells that X with nullable.
        non_null = [s for s in any_of if s.get("type") != "null"]
        if len(non_null) != 1:
            raise ValueError(f"union types cannot be expressed in a structural schema: {node}")
        rest = {k: v for k, v in node.items() if k != "anyOf"}
        out = _structural({**non_null[0], **rest}, defs)
        out["nullable"] = True
        if out.get("default", 0) is None:
            del out["default"]
        return out

    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROPPED_KEYS:
            continue
        if key == "properties":
            out["properties"] = {name: _structural(sub, defs) for name, sub in value.items()}
            for name, sub in out["properties"].items():
                # An optional, non-nullable block left out defaults to its fields' own defaults. Not to {}:
                # the API server checks a default against the block's CEL rules as it is written, before
                # nested defaults apply (rollout's rule reads maxSurge).
                if sub.get("type") == "object" and "properties" in sub and not sub.get("nullable") \
                        and name not in node.get("required", []):
                    sub["default"] = {k: p["default"] for k, p in sub["properties"].items() if "default" in p}
        elif key == "items":
            out["items"] = _structural(value, defs)
        elif key == "const":
            out["enum"] = [value]
        elif key in ("exclusiveMinimum", "exclusiveMaximum"):
            out["minimum" if key == "exclusiveMinimum" else "maximum"] = value
            out[key] = True
        else:
            out[key] = value
    if "additionalProperties" in node and isinstance(node["additionalProperties"], dict):
        out["additionalProperties"] = _structural(node["additionalProperties"], defs)
    if "enum" in out and "type" not in out:
        out["type"] = "string"
    return out


def structural_schema(model: type) -> dict:
    schema = model.model_json_schema(by_alias=True, mode="validation")
    return _structural(schema, schema.get("$defs", {}))


def _status_schema() -> dict:
    schema = structural_schema(api.InferenceDeploymentStatus)
    conditions = schema["properties"]["conditions"]
    conditions["x-kubernetes-list-type"] = "map"
    conditions["x-kubernetes-list-map-keys"] = ["type"]
    return schema


def _printer_columns() -> list[dict]:
    return [
        {"name": "Ready", "type": "integer", "jsonPath": ".status.readyReplicas", "description": "Ready replicas"},
        {"name": "Desired", "type": "integer", "jsonPath": ".spec.replicas", "description": "Desired replicas"},
        {"name": "Up-to-date", "type": "integer", "jsonPath": ".status.updatedReplicas",
         "description": "Replicas of the update revision"},
        {"name": "TP", "type": "integer", "jsonPath": ".spec.parallelism.tensor", "description": "Tensor parallel"},
        {"name": "PP", "type": "integer", "jsonPath": ".spec.parallelism.pipeline", "description": "Pipeline parallel"},
        {"name": "Revision", "type": "string", "jsonPath": ".status.updateRevision", "description": "Update revision"},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]


def build_crd() -> dict:
    spec_schema = structural_schema(api.InferenceDeploymentSpec)
    root = {
        "type": "object",
        "description": "A model served by replicas of KubeRay RayClusters running the rayprism engine.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": "APIVersion of this object."},
            "kind": {"type": "string", "description": "Kind of this object."},
            "metadata": {"type": "object"},
            "spec": {**spec_schema, "description": "What to serve and how."},
            "status": {**_status_schema(), "description": "What the operator observed."},
        },
        **api.rules_schema("metadata"),
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{api.PLURAL}.{api.GROUP}"},
        "spec": {
            "group": api.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": api.KIND,
                "listKind": f"{api.KIND}List",
                "plural": api.PLURAL,
                "singular": api.SINGULAR,
                "shortNames": api.SHORT_NAMES,
                "categories": ["all", "rayprism"],
            },
            "versions": [
                {
                    "name": api.VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": root},
                    "subresources": {
                        "status": {},
                        "scale": {
                            "specReplicasPath": ".spec.replicas",
                            "statusReplicasPath": ".status.replicas",
                            "labelSelectorPath": ".status.selector",
                        },
                    },
                    "additionalPrinterColumns": _printer_columns(),
                }
            ],
        },
    }


class _NoAliasDumper(yaml.SafeDumper):
    """Shared sub-schemas must be written out in full: kubectl and Helm dislike YAML anchors."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def crd_yaml() -> str:
    header = "# Generated by `rayprism crd` from operator/rayprism_operator/api.py. Do not edit.\n"
    return header + yaml.dump(build_crd(), Dumper=_NoAliasDumper, sort_keys=False, width=120)
