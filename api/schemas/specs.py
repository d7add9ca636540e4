"""Request bodies typed with the job spec's JSON Schema in the OpenAPI document.

The routes that take job specs read them as plain JSON (their own validation names every error's
JSON path, and a batch keeps its valid items); the document still types them, so a client
generated from ``/openapi.json`` validates a spec before sending it. :func:`add_components` adds
the schemas to ``#/components/schemas`` and points the request bodies of :data:`BODIES` at them.
"""

from __future__ import annotations

from typing import Any

REF = "#/components/schemas/{model}"


def ref(name: str) -> dict[str, str]:
    return {"$ref": REF.format(model=name)}


#: operationId -> the component its JSON request body is
BODIES = {"create_job": "JobCreate", "create_sweep": "SweepCreate"}


def components() -> dict[str, Any]:
    """``JobSpec`` (with its definitions), ``JobCreate`` (a JobSpec with the job's ``labels`` and
    ``notes`` beside its fields: POST /v1/jobs) and ``SweepCreate`` (whose ``base`` is a JobSpec)."""
    from api.schemas.dashboards import Annotations
    from api.schemas.sweeps import SweepCreate
    from training.spec import json_schema

    spec = json_schema(ref_template=REF)
    out: dict[str, Any] = dict(spec.pop("$defs", {}))
    out["JobSpec"] = spec
    annotations = Annotations.model_json_schema(mode="validation", ref_template=REF)
    out.update(annotations.pop("$defs", {}))
    out["JobCreate"] = {**spec, "title": "JobCreate", "properties": {**spec["properties"], **annotations["properties"]}}
    sweep = SweepCreate.model_json_schema(mode="validation", ref_template=REF)
    out.update(sweep.pop("$defs", {}))
    sweep["properties"]["base"] = {**ref("JobSpec"), "description": sweep["properties"]["base"].get("description", "")}
    out["SweepCreate"] = sweep
    return out


def add_components(openapi: dict[str, Any]) -> None:
    """Add :func:`components` to the document, type the request bodies of :data:`BODIES` with
    them (keeping their examples), and the items of ``BatchCreate.jobs``."""
    schemas = openapi.setdefault("components", {}).setdefault("schemas", {})
    for name, schema in components().items():
        if name in schemas and schemas[name] != schema:
            raise RuntimeError(f"two different OpenAPI schemas are named {name!r}")
        schemas[name] = schema
    for ops in openapi.get("paths", {}).values():
        for op in ops.values():
            name = BODIES.get(op.get("operationId", ""))
            media = op.get("requestBody", {}).get("content", {}).get("application/json")
            if name and media is not None:
                examples = media["schema"].get("examples")
                media["schema"] = ref(name)
                if examples:
                    media["example"] = examples[0]
    batch = schemas.get("BatchCreate", {}).get("properties", {}).get("jobs")
    if batch is not None:
        batch["items"] = ref("JobSpec")
