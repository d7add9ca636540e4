"""Where a job's data lies on this worker: a stored dataset id becomes a file path. One home for
the runner, packs and exports."""

from __future__ import annotations

from typing import Any

from config.settings import Settings
from store import repo
from store.db import session_scope


def resolve_dataset(spec: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """The spec with ``data.path`` set: None for a built-in dataset, the stored file for a stored
    dataset id; a SpecError (path ``data.dataset``) when the stored dataset no longer exists."""
    from training.data import BUILTIN_DATASETS

    data = dict(spec.get("data") or {})
    name = data.get("dataset")
    if name in BUILTIN_DATASETS:
        data["path"] = None
        return {**spec, "data": data}
    with session_scope(write=False) as s:
        ds = repo.get_dataset(s, str(name))
        stored = ds.file if ds is not None else None
    if stored is None:
        from training import SpecError

        raise SpecError([{"loc": ["data", "dataset"], "path": "data.dataset", "msg": f"stored dataset {name!r} no longer exists", "type": "value_error"}])
    data["path"] = str(settings.datasets_dir / stored)
    return {**spec, "data": data}
