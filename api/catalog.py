"""The catalog a dashboard builds its forms from, derived from the engine's spec models and
registries (pure Python: no torch)."""

from __future__ import annotations

from functools import lru_cache
from typing import Any, get_args

from pydantic import BaseModel

from training import json_schema
from training import spec as spec_mod
from training.data import BUILTIN_DATASETS
from training.schedules import SCHEDULES


def _members(annotated_union: Any) -> list[type[BaseModel]]:
    union = get_args(annotated_union)[0]
    return [m for m in get_args(union) if isinstance(m, type) and issubclass(m, BaseModel)]


def _params(model: type[BaseModel], skip: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Each field: name, JSON-schema type, default (if any), required, description."""
    schema = model.model_json_schema(mode="validation")
    props = schema.get("properties", {})
    required = set(schema.get("required", []))
    out = []
    for name, prop in props.items():
        if name in skip:
            continue
        item: dict[str, Any] = {"name": name, "required": name in required}
        item["schema"] = {k: v for k, v in prop.items() if k not in ("title", "description", "default")}
        if "default" in prop:
            item["default"] = prop["default"]
        if prop.get("description"):
            item["description"] = prop["description"]
        out.append(item)
    return out


def _tag(model: type[BaseModel], field: str) -> str:
    ann = model.model_fields[field].annotation
    return str(get_args(ann)[0])


def _doc(model: type[BaseModel]) -> str | None:
    doc = (model.__doc__ or "").strip()
    return doc.split("\n\n")[0] if doc and not doc.startswith("Usage docs") else None


@lru_cache(maxsize=1)
def static_catalog() -> dict[str, Any]:
    """Everything except stored datasets (they change)."""
    # "formulas": the update each choice of the optimizer's `formulas` field computes (Keras 3's
    # by default, torch.optim's with "torch"); the job's stored spec records which one ran.
    optimizers = [
        {"name": _tag(m, "name"), "description": _doc(m), "formulas": dict(m.FORMULA_TEXT), "parameters": _params(m, ("name",))}
        for m in _members(spec_mod.Optimizer)
    ]
    schedules = []
    for m in _members(spec_mod.Schedule):
        name = _tag(m, "schedule")
        info = SCHEDULES.get(name)
        schedules.append({
            "name": name, "summary": info.summary if info else None, "source": info.source if info else None,
            "parameters": _params(m, ("schedule",)),
        })
    layers = [
        {"type": _tag(m, "type"), "description": _doc(m), "parameters": _params(m, ("type",))}
        for m in _members(spec_mod.Layer)
    ]
    init_params = _params(spec_mod.Initializer, ("name",))
    return {
        "optimizers": optimizers,
        "schedules": schedules,
        "initializers": [{"name": n, "parameters": init_params} for n in spec_mod.INITIALIZER_NAMES],
        "layers": layers,
        "activations": list(spec_mod.ACTIVATIONS),
        "losses": [{"name": n, "parameters": _params(spec_mod.Loss, ("name",))} for n in spec_mod.LOSSES],
        "metrics": [{"name": n, "parameters": _params(spec_mod.Metric, ("name",))} for n in spec_mod.METRICS],
        "regularizers": {
            "shorthands": {"l1": {"l1": 0.01}, "l2": {"l2": 0.01}, "l1_l2": {"l1": 0.01, "l2": 0.01}},
            "parameters": _params(spec_mod.Regularizer),
        },
        "callbacks": [
            {"name": "early_stopping", "parameters": _params(spec_mod.EarlyStoppingSpec)},
            {"name": "model_checkpoint", "parameters": _params(spec_mod.ModelCheckpointSpec)},
            {"name": "reduce_lr_on_plateau", "parameters": _params(spec_mod.ReduceLROnPlateauSpec)},
        ],
        "builtin_datasets": [d.to_dict() | {"builtin": True} for d in BUILTIN_DATASETS.values()],
        "spec_schema": json_schema(),
    }
