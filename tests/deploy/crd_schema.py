"""Schema validation of prometheus-operator resources (ServiceMonitor, PrometheusRule).

The CRDs' OpenAPI schemas reach us as the pydantic models `cloudcoil-models-prometheus-operator`
generates from them (prometheus-operator v0.80.1; on the package index, unlike the CRD YAML or
a kubeconform/kubeval binary). Validation gives the schema's types, required fields and enums;
fields the schema does not know are found by comparing the input with what the model kept,
which is what `kubectl apply --validate=strict` reports for a structural CRD schema.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pydantic


def crd_problems(doc: dict[str, Any]) -> list[str]:
    """What the resource's CRD schema refuses in `doc`, as `path: message` lines (none: valid)."""
    from cloudcoil.models.prometheus_operator import v1

    if doc.get("apiVersion") != "monitoring.coreos.com/v1" or not hasattr(v1, doc.get("kind", "")):
        return [f"not a monitoring.coreos.com/v1 kind: {doc.get('apiVersion')} {doc.get('kind')}"]
    try:
        model = getattr(v1, doc["kind"]).model_validate(doc)
    except pydantic.ValidationError as e:
        return [f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()]
    kept = model.model_dump(by_alias=True, exclude_unset=True, mode="json")
    return [f"{path}: unknown field" for path in _unknown(doc, kept, "")]


def _unknown(given: Any, kept: Any, path: str) -> Iterator[str]:
    if isinstance(given, dict):
        for key, value in given.items():
            if not isinstance(kept, dict) or key not in kept:
                yield f"{path}.{key}".lstrip(".")
            else:
                yield from _unknown(value, kept[key], f"{path}.{key}")
    elif isinstance(given, list) and isinstance(kept, list):
        for i, (a, b) in enumerate(zip(given, kept)):
            yield from _unknown(a, b, f"{path}[{i}]")
