"""Validates KEDA resources (ScaledObject, TriggerAuthentication) in
Kubernetes manifests against KEDA's CRD schemas, strictly (unknown fields
are errors, as `kubectl apply --validate=strict` makes them).

The schemas come from the PyPI package cloudcoil.models.keda: pydantic
models generated from KEDA's CRDs (its version is KEDA's, plus one digit).
Their JSON Schema is taken with aliases (the CRD's camelCase names) and
every object that lists its properties gets `additionalProperties: false`;
maps (trigger metadata, labels) keep their value schema.

usage: python keda.py MANIFEST.yaml...   exit 1 on any error
"""

import importlib.metadata
import sys

import jsonschema
import yaml
from cloudcoil.models.keda import v1alpha1

KINDS = {
    ("keda.sh/v1alpha1", "ScaledObject"): v1alpha1.ScaledObject,
    ("keda.sh/v1alpha1", "TriggerAuthentication"): v1alpha1.TriggerAuthentication,
}


def strict(schema):
    """`additionalProperties: false` wherever properties are listed."""
    if isinstance(schema, dict):
        if "properties" in schema and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
        for v in schema.values():
            strict(v)
    elif isinstance(schema, list):
        for v in schema:
            strict(v)
    return schema


def main(files):
    version = importlib.metadata.version("cloudcoil.models.keda")
    validators = {
        k: jsonschema.Draft202012Validator(strict(m.model_json_schema(by_alias=True)))
        for k, m in KINDS.items()
    }
    errors = checked = 0
    for f in files:
        with open(f) as fh:
            docs = [d for d in yaml.safe_load_all(fh) if d]
        for d in docs:
            key = (d.get("apiVersion"), d.get("kind"))
            if key[0] is None or not key[0].startswith("keda.sh/"):
                continue
            name = f"{f}: {key[1]}/{d.get('metadata', {}).get('name')}"
            v = validators.get(key)
            if v is None:
                print(f"ERROR {name}: no schema for {key[0]} {key[1]}")
                errors += 1
                continue
            found = sorted(v.iter_errors(d), key=lambda e: list(e.absolute_path))
            for e in found:
                path = ".".join(str(p) for p in e.absolute_path) or "(root)"
                print(f"ERROR {name}: {path}: {e.message}")
            errors += len(found)
            checked += 1
            if not found:
                print(f"ok {name} (KEDA {version.rsplit('.', 1)[0]} CRD schema, strict)")
    if checked == 0:
        print("ERROR no KEDA resource found")
        return 1
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
