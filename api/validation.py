"""Validating job specs at the API: the engine's validator plus the service's own rules."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from api.limits import spec_limit_errors
from config.settings import Settings
from store import sweeps as store_sweeps
from training import SpecError, validate_spec
from training import data as data_mod
from training.data import DatasetInfo


def dataset_resolver(session: Session, project_id: str | None = None) -> Callable[[str], DatasetInfo | None]:
    """Map a stored dataset's id, or its unique name in ``project_id``, to its DatasetInfo
    (:func:`store.sweeps.dataset_resolver`)."""
    return store_sweeps.dataset_resolver(session, project_id)


@dataclass(frozen=True)
class ValidSpec:
    spec: dict[str, Any]  # effective spec (defaults filled in), JSON-ready
    queue: str


def _err(loc: list[Any], msg: str, type_: str = "value_error") -> dict[str, Any]:
    from training.spec import json_path

    return {"loc": loc, "path": json_path(loc), "msg": msg, "type": type_}


def nul_errors(value: Any, loc: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
    """An error for every string (key or value) holding a NUL character: no database text column
    can store one (PostgreSQL refuses it), so it is a 422 here rather than a 500 at the INSERT."""
    out: list[dict[str, Any]] = []
    if isinstance(value, str):
        if "\x00" in value:
            out.append(_err(list(loc), "text may not contain NUL characters (\\u0000)", "string_nul"))
    elif isinstance(value, dict):
        for k, v in value.items():
            if isinstance(k, str) and "\x00" in k:
                out.append(_err([*loc, k], "a field name may not contain NUL characters (\\u0000)", "string_nul"))
            out += nul_errors(v, (*loc, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += nul_errors(v, (*loc, i))
    return out


def check_job_spec(raw: Any, resolver: Callable[[str], DatasetInfo | None], settings: Settings) -> ValidSpec:
    """Validate a submitted spec; raise SpecError listing every problem with its JSON path."""
    if not isinstance(raw, dict):
        raise SpecError([_err([], f"a job spec must be a JSON object, got {type(raw).__name__}", "dict_type")])
    errors: list[dict[str, Any]] = nul_errors(raw)
    if errors:
        raise SpecError(errors)
    data = raw.get("data")
    if isinstance(data, dict) and data.get("path") is not None:
        errors.append(_err(
            ["data", "path"],
            "data.path is set by the server; upload a file with POST /v1/datasets and name its id in data.dataset",
            "forbidden",
        ))
        raw = {**raw, "data": {k: v for k, v in data.items() if k != "path"}}
    try:
        spec = validate_spec(raw, datasets=resolver)
    except SpecError as exc:
        raise SpecError(errors + exc.errors) from None
    # the service's limits (epochs, layers, batch size, dataset size, parameter count: api/limits.py)
    info = resolver(spec.data.dataset) if spec.data.dataset not in data_mod.BUILTIN_DATASETS else None
    if info is None and spec.data.dataset in data_mod.BUILTIN_DATASETS:
        try:
            info = data_mod.describe(spec.data, spec.seed)
        except data_mod.DataError:
            info = None
    errors += spec_limit_errors(spec, info, settings)
    init_problem = getattr(resolver, "init_problem", None)
    if spec.init_from is not None and init_problem is not None:
        why = init_problem(spec.init_from)
        if why:
            errors.append(_err(["init_from"], why))
    if spec.data.dataset not in data_mod.BUILTIN_DATASETS:
        # A stored dataset is a file dataset: check the options that do not apply to files.
        probe = spec.data.model_copy(update={"path": "stored.npz"})
        for field, msg in data_mod.check_options(probe):
            if field != "path":
                errors.append(_err(["data", field], msg.replace("(path)", f"(stored dataset {spec.data.dataset})")))
    if errors:
        raise SpecError(errors)
    dumped = spec.model_dump(mode="json")
    if info is not None and spec.data.dataset not in data_mod.BUILTIN_DATASETS and info.name != spec.data.dataset:
        # a stored dataset named by its name: the job keeps its id, so a later upload under the
        # same name never changes what it trains on
        dumped["data"]["dataset"] = info.name
    return ValidSpec(spec=dumped, queue=settings.queue_for_device(spec.device))
