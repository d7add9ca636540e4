"""Spec admission, the one place where a job spec is admitted, for jobs, batches and sweep
trials alike: the engine's validator (``training.validate_spec``), the service's own rules (no
NUL characters, no ``data.path``), its limits (epochs, layers, batch size, dataset size, parameter
count) and the resolution of stored datasets (a project's own only). A sweep trial must also
report the sweep's objective metric."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from config.settings import Settings
from store import repo
from training import SpecError, validate_spec
from training import data as data_mod
from training.data import DatasetInfo


class SpecResolver:
    """What a spec names in a project: stored datasets (called with a dataset's id, or its name when
    one dataset of the project has it, it returns its DatasetInfo, whose ``name`` is the dataset's
    id; None if the project has no such dataset; a SpecError listing the ids when several of its
    datasets have that name) and, for ``init_from``, jobs with a best checkpoint
    (:meth:`init_problem`). The one resolver of job specs: jobs, batches and sweep trials."""

    def __init__(self, session: Session, project_id: str | None = None) -> None:
        self.session, self.project_id = session, project_id

    def __call__(self, ref: str) -> DatasetInfo | None:
        session, project_id = self.session, self.project_id
        ds = repo.get_dataset(session, ref, project_id) if len(ref) == 32 else None
        if ds is None:
            named = repo.datasets_named(session, ref, project_id)
            if len(named) > 1:
                raise SpecError([{
                    "loc": ["data", "dataset"], "path": "data.dataset", "type": "value_error",
                    "msg": f"{len(named)} stored datasets are named {ref!r} ({', '.join(d.id for d in named)}); "
                    "give the id of the one you mean",
                }])
            ds = named[0] if named else None
        if ds is None:
            return None
        return DatasetInfo(
            name=ds.id, task=ds.task, input_shape=tuple(ds.input_shape), n_classes=ds.n_classes,  # type: ignore[arg-type]
            n_targets=ds.n_targets, n_samples=ds.n_samples,
        )

    def init_problem(self, job_id: str) -> str | None:
        """Why a spec cannot start from job ``job_id``'s best checkpoint (``init_from``; None if it
        can)."""
        if not repo.job_exists(self.session, job_id, self.project_id):
            return f"no job {job_id!r} (init_from names a job of this project)"
        if repo.best_checkpoint(self.session, job_id, self.project_id) is None:
            return f"job {job_id} has no best checkpoint (yet) to start from"
        return None


def dataset_resolver(session: Session, project_id: str | None = None) -> SpecResolver:
    """The :class:`SpecResolver` of ``project_id``'s specs."""
    return SpecResolver(session, project_id)


@dataclass(frozen=True)
class ValidSpec:
    spec: dict[str, Any]  # effective spec (defaults filled in), JSON-ready
    queue: str
    parameters: int | None = None  # trainable parameters (None: the input shape is not known)
    steps_per_epoch: int | None = None  # optimizer steps per epoch (None: the sample count is not known)


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
    if spec.init_from is not None and isinstance(resolver, SpecResolver):
        why = resolver.init_problem(spec.init_from)
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
    return ValidSpec(spec=dumped, queue=settings.queue_for_device(spec.device), **_implied(spec, info))


def _implied(spec: Any, info: DatasetInfo | None) -> dict[str, int | None]:
    """What a valid spec implies: its parameter count and steps per epoch (when the dataset's
    shape and size are known; the dry run, POST /v1/jobs/validate, answers them)."""
    from training.shapes import ShapeError, count_parameters

    if info is None:
        return {}
    try:
        parameters: int | None = count_parameters(spec.model, tuple(info.input_shape))
    except ShapeError:
        parameters = None
    return {"parameters": parameters,
            "steps_per_epoch": data_mod.steps_per_epoch(info.n_samples, spec.data.validation_split, spec.data.batch_size)}


def spec_limit_errors(spec: Any, info: Any, settings: Settings) -> list[dict[str, Any]]:
    """What a valid spec asks for beyond the service's limits, as spec errors with JSON paths.
    The parameter count comes from the layer shapes alone (nothing is allocated)."""
    from training.shapes import ShapeError, count_parameters
    from training.spec import json_path

    errors: list[dict[str, Any]] = []

    def add(loc: list[Any], msg: str) -> None:
        errors.append({"loc": loc, "path": json_path(loc), "msg": msg, "type": "limit_exceeded"})

    if spec.epochs > settings.max_epochs:
        add(["epochs"], f"epochs is {spec.epochs}; this server allows at most {settings.max_epochs}")
    if len(spec.model.layers) > settings.max_layers:
        add(["model", "layers"], f"the model has {len(spec.model.layers)} layers; this server allows at most "
                                 f"{settings.max_layers}")
    if spec.data.batch_size > settings.max_batch_size:
        add(["data", "batch_size"], f"batch_size is {spec.data.batch_size}; this server allows at most "
                                    f"{settings.max_batch_size}")
    if info is not None:
        per_sample = math.prod(int(d) for d in info.input_shape)
        nbytes = 4 * per_sample * int(info.n_samples)
        if nbytes > settings.max_dataset_bytes:
            add(["data"], f"the dataset is {info.n_samples} samples of shape {list(info.input_shape)} "
                          f"({nbytes} bytes as float32); this server allows at most {settings.max_dataset_bytes}")
        try:
            n_params = count_parameters(spec.model, tuple(info.input_shape))
        except ShapeError:
            n_params = 0  # shape errors were reported by the spec's own validation
        if n_params > settings.max_parameters:
            add(["model"], f"the model has {n_params} parameters; this server allows at most {settings.max_parameters}")
    return errors


def objective_problem(spec: Any, metric: str) -> str | None:
    """Why ``metric`` cannot be a sweep objective for the validated ``spec`` (None if it can)."""
    names = ["loss", *spec.metric_names()]
    has_val = spec.data.validation_split > 0
    known = names + ([f"val_{n}" for n in names] if has_val else [])
    if metric in known:
        return None
    hint = ""
    if metric.startswith("val_") and not has_val:
        hint = " (data.validation_split is 0, so no val_* metric exists)"
    elif metric.removeprefix("val_") not in names:
        hint = " (add it to the spec's metrics)"
    return f"the trials do not report {metric!r}{hint}; available: {', '.join(known)}"


@dataclass(frozen=True)
class TrialSpec:
    spec: dict[str, Any] | None  # effective spec, JSON-ready; None when invalid
    queue: str | None
    errors: list[dict[str, Any]] | None = None


def admit_trial_spec(
    base: dict[str, Any], params: dict[str, Any], *, metric: str, resolver: Callable[[str], DatasetInfo | None],
    settings: Settings,
) -> TrialSpec:
    """A sweep trial's spec: ``base`` with ``params`` set, admitted like any job (limits
    included, :func:`check_job_spec`), and it must report the objective ``metric``. Invalid:
    ``errors`` with JSON paths into the trial spec."""
    from training.spec import JobSpec
    from training.sweep_space import with_params

    try:
        valid = check_job_spec(with_params(base, params), resolver, settings)
    except SpecError as exc:
        return TrialSpec(None, None, exc.errors)
    except ValueError as exc:  # PathError
        return TrialSpec(None, None, [{"loc": [], "path": "", "msg": str(exc), "type": "value_error"}])
    problem = objective_problem(JobSpec.model_validate(valid.spec), metric)
    if problem:
        return TrialSpec(None, None, [_err(["objective", "metric"], problem)])
    return TrialSpec(valid.spec, valid.queue)
