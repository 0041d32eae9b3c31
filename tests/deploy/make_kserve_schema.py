"""Write ``tests/deploy/schemas/kserve.schema.json``: a JSON Schema for the KServe resources we ship.

The schema is generated from the KServe Python SDK, whose ``kserve/models`` classes are generated from KServe's
OpenAPI document (the same Go types its CRDs come from). Each class lists its fields (``openapi_types``), their
JSON names (``attribute_map``) and which are required (the setters refuse ``None``). KServe objects get
``additionalProperties: false`` so a misspelt or unknown field fails; Kubernetes core types (Container, Volume,
...) are ``$ref``s into the strict definitions of ``kubernetes-validate``, merged in by the test at run time.

Usage (needs the SDK wheel only, none of its dependencies)::

    pip download --no-deps kserve==0.21.0 -d /tmp/kserve
    python tests/deploy/make_kserve_schema.py /tmp/kserve/kserve-0.21.0-py3-none-any.whl
"""

from __future__ import annotations

import ast
import json
import re
import sys
import zipfile
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "schemas" / "kserve.schema.json"
K8S = "#/$defs/io.k8s."
# Top-level kinds we validate: kind -> (apiVersion, SDK class).
ROOTS = {
    "ClusterServingRuntime": ("serving.kserve.io/v1alpha1", "V1alpha1ClusterServingRuntime"),
    "ServingRuntime": ("serving.kserve.io/v1alpha1", "V1alpha1ServingRuntime"),
    "InferenceService": ("serving.kserve.io/v1beta1", "V1beta1InferenceService"),
}
SCALARS: dict[str, dict[str, Any]] = {
    "str": {"type": "string"},
    "int": {"type": "integer"},
    "float": {"type": "number"},
    "bool": {"type": "boolean"},
    "datetime": {"type": "string"},
    "object": {},
    "ResourceQuantity": {"$ref": K8S + "apimachinery.pkg.api.resource.Quantity"},
    "K8sIoApiAppsV1DeploymentStrategy": {"$ref": K8S + "api.apps.v1.DeploymentStrategy"},
    "K8sIoApiAutoscalingV2HorizontalPodAutoscalerBehavior": {
        "$ref": K8S + "api.autoscaling.v2.HorizontalPodAutoscalerBehavior"
    },
}
META_TYPES = {"V1ObjectMeta", "V1ListMeta", "V1Time", "V1LabelSelector", "V1OwnerReference"}
REQUIRED = re.compile(r"Invalid value for `(\w+)`, must not be `None`")


def read_models(wheel: Path) -> dict[str, dict[str, Any]]:
    """Class name -> {"types": {attr: type}, "names": {attr: json name}, "required": [attr]}."""
    models: dict[str, dict[str, Any]] = {}
    with zipfile.ZipFile(wheel) as archive:
        for name in archive.namelist():
            if name.startswith("kserve/models/") and name.endswith(".py"):
                models.update(_parse_module(archive.read(name).decode()))
    return models


def _parse_module(source: str) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        fields: dict[str, Any] = {}
        for item in node.body:
            if isinstance(item, ast.Assign) and isinstance(item.targets[0], ast.Name):
                fields[item.targets[0].id] = item.value
        if "openapi_types" in fields and "attribute_map" in fields:
            found[node.name] = {
                "types": ast.literal_eval(fields["openapi_types"]),
                "names": ast.literal_eval(fields["attribute_map"]),
                "required": REQUIRED.findall(ast.get_source_segment(source, node) or ""),
            }
    return found


class SchemaBuilder:
    """Turns SDK classes into JSON Schema ``$defs``, following references from the roots only."""

    def __init__(self, models: dict[str, dict[str, Any]], k8s_defs: set[str]) -> None:
        self.models = models
        self.k8s_defs = k8s_defs
        self.defs: dict[str, Any] = {}

    def type_schema(self, type_name: str) -> dict[str, Any]:
        """The schema of one ``openapi_types`` value (``list[X]``, ``dict(str, X)``, a class, a scalar)."""
        if type_name.startswith("list[") and type_name.endswith("]"):
            return {"type": "array", "items": self.type_schema(type_name[5:-1])}
        if type_name.startswith("dict(str, ") and type_name.endswith(")"):
            return {"type": "object", "additionalProperties": self.type_schema(type_name[10:-1])}
        if type_name in SCALARS:
            return SCALARS[type_name]
        if type_name in self.models:
            self.define(type_name)
            return {"$ref": f"#/$defs/{type_name}"}
        return self._kubernetes_ref(type_name)

    def _kubernetes_ref(self, type_name: str) -> dict[str, Any]:
        match = re.fullmatch(r"V1([A-Z]\w*)", type_name)
        if match:
            group = "apimachinery.pkg.apis.meta.v1." if type_name in META_TYPES else "api.core.v1."
            if "io.k8s." + group + match.group(1) in self.k8s_defs:
                return {"$ref": K8S + group + match.group(1)}
        # Types the SDK does not describe (Knative, KEDA): accept any value rather than guess.
        return {"description": f"{type_name}: not described by the SDK, not checked"}

    def define(self, class_name: str, drop: tuple[str, ...] = ()) -> None:
        """Add ``class_name`` (and what it references) to ``$defs`` with unknown fields rejected."""
        if class_name in self.defs:
            return
        model = self.models[class_name]
        self.defs[class_name] = {}  # placeholder: breaks reference cycles
        properties = {
            model["names"][attr]: self.type_schema(type_name)
            for attr, type_name in sorted(model["types"].items())
            if model["names"][attr] not in drop
        }
        schema: dict[str, Any] = {"type": "object", "properties": properties, "additionalProperties": False}
        required = sorted(model["names"][attr] for attr in model["required"])
        if required:
            schema["required"] = required
        self.defs[class_name] = schema


def build_schema(models: dict[str, dict[str, Any]], k8s_defs: set[str], sdk_version: str) -> dict[str, Any]:
    """The whole schema: one ``if kind == X then $ref X`` branch per root kind."""
    builder = SchemaBuilder(models, k8s_defs)
    branches = []
    for kind, (api_version, class_name) in ROOTS.items():
        builder.define(class_name, drop=("status",))
        root = builder.defs[class_name]
        root["properties"]["apiVersion"] = {"const": api_version}
        root["properties"]["kind"] = {"const": kind}
        root["required"] = sorted({"apiVersion", "kind", "metadata", "spec", *root.get("required", [])})
        branches.append({"if": {"properties": {"kind": {"const": kind}}}, "then": {"$ref": f"#/$defs/{class_name}"}})
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$comment": f"Generated by tests/deploy/make_kserve_schema.py from the kserve {sdk_version} SDK models.",
        "type": "object",
        "required": ["apiVersion", "kind"],
        "properties": {"kind": {"enum": sorted(ROOTS)}},
        "allOf": branches,
        "$defs": dict(sorted(builder.defs.items())),
    }


def kubernetes_definitions() -> set[str]:
    """Names of the core definitions that kubernetes-validate ships (the test merges them in)."""
    import kubernetes_validate.utils as kv

    version = kv.latest_version()
    path = f"kubernetes-json-schema/v{version}-local-strict/_definitions.json"
    return set(kv.schema_contents(path, version)["$defs"])


def main() -> None:
    """Generate the schema from the wheel named on the command line."""
    wheel = Path(sys.argv[1])
    sdk_version = wheel.name.split("-")[1]
    schema = build_schema(read_models(wheel), kubernetes_definitions(), sdk_version)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(schema, indent=1, sort_keys=False) + "\n")
    print(f"wrote {OUT} ({len(schema['$defs'])} definitions)")


if __name__ == "__main__":
    main()
