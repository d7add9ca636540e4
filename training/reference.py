"""Generate the job-spec reference (Markdown) from the pydantic models.

``python -m training.reference > docs/spec-reference.md``; a test keeps the committed file in
sync with the schema.
"""

from __future__ import annotations

import sys
import typing
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from training import spec as S


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin is typing.Literal:
        return " \\| ".join(f"`{a!r}`".replace("'", '"') for a in args)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " or ".join(_type_name(a) for a in args if a is not type(None)) + (
            " or null" if type(None) in args else ""
        )
    if origin in (list, tuple):
        inner = ", ".join(_type_name(a) for a in args if a is not Ellipsis)
        return f"list of {inner}" if origin is list else f"[{inner}]"
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return f"[{tp.__name__}](#{tp.__name__.lower()})"
    return getattr(tp, "__name__", str(tp))


def _default(f: FieldInfo) -> str:
    if f.default is PydanticUndefined:
        if f.default_factory is not None:
            value = f.default_factory()  # type: ignore[call-arg]
            if isinstance(value, BaseModel):
                return f"`{value.model_dump(exclude_defaults=True) or {}}`"
            return f"`{value!r}`"
        return "**required**"
    return f"`{f.default!r}`".replace("None", "null").replace("True", "true").replace("False", "false")


def _constraints(f: FieldInfo) -> str:
    parts = []
    for m in f.metadata:
        for attr, sym in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"), ("min_length", "min length"), ("max_length", "max length"), ("pattern", "pattern")):
            v = getattr(m, attr, None)
            if v is not None:
                parts.append(f"{sym} {v}")
    return ", ".join(parts).replace("|", "\\|")


def _model_section(model: type[BaseModel]) -> str:
    doc = (model.__doc__ or "").strip().replace("\n", " ")
    doc = " ".join(doc.split())
    lines = [f"### {model.__name__}", ""]
    if doc and not doc.startswith("Base:"):
        lines += [doc, ""]
    lines += ["| field | type | default | constraints | notes |", "| --- | --- | --- | --- | --- |"]
    for name, f in model.model_fields.items():
        lines.append(
            f"| `{name}` | {_type_name(f.annotation)} | {_default(f)} | {_constraints(f)} | {(f.description or '').replace('|', '/')} |"
        )
    return "\n".join(lines) + "\n"


SECTIONS: list[tuple[str, list[type[BaseModel]]]] = [
    ("Job", [S.JobSpec, S.DataSpec, S.ModelSpec, S.Loss, S.Metric, S.CallbacksSpec]),
    ("Layers (`model.layers[]`, chosen by `type`)", [S.Dense, S.Conv2D, S.MaxPool2D, S.AvgPool2D, S.Flatten, S.Reshape, S.Dropout, S.BatchNorm, S.LayerNorm, S.ActivationLayer]),
    ("Initializers and regularizers", [S.Initializer, S.Regularizer]),
    ("Optimizers (`optimizer`, chosen by `name`)", [S.SGD, S.Adam, S.AdamW, S.Nadam, S.RAdam, S.Adamax, S.RMSprop, S.Adagrad]),
    ("Learning-rate schedules (`optimizer.learning_rate` as an object, chosen by `schedule`)", [S.Constant, S.Exponential, S.StepDecay, S.MultiStep, S.Polynomial, S.Cosine, S.CosineRestarts, S.OneCycle, S.ReduceOnPlateau]),
    ("Callbacks", [S.EarlyStoppingSpec, S.ModelCheckpointSpec, S.ReduceLROnPlateauSpec, S.LRFindSpec]),
]


def render() -> str:
    out = [
        "# Job spec reference (v1)",
        "",
        "Generated from `training/spec.py` by `python -m training.reference`; do not edit by hand.",
        "Unknown fields are errors. A bare string stands for `{\"name\": ...}` in initializers, losses and",
        "metrics, and `\"l1\"`/`\"l2\"`/`\"l1_l2\"` for regularizers of 0.01. PyTorch aliases: `lr`",
        "(learning_rate), `betas` and `eps` (Adam family; with them epsilon defaults to 1e-8), `alpha`",
        "(RMSprop rho). Keras layer class names are accepted as a layer's `type` and stored as the",
        "type they stand for: " + ", ".join(f"`{k}`→`{v}`" for k, v in S.LAYER_ALIASES.items()) + ".",
        "Exact semantics: [semantics.md](semantics.md).",
        "",
        f"Activations: {', '.join(S.ACTIVATIONS)}.  ",
        f"Initializers: {', '.join(S.INITIALIZER_NAMES)}.  ",
        f"Losses: {', '.join(S.LOSSES)}.  Metrics: {', '.join(S.METRICS)}.",
        "",
    ]
    for title, models in SECTIONS:
        out += [f"## {title}", ""]
        out += [_model_section(m) for m in models]
    return "\n".join(out)


if __name__ == "__main__":
    sys.stdout.write(render())
