"""/v1/catalog: optimizers, schedules, initializers, layers, activations, losses, metrics and
datasets, each with parameters and defaults."""

from __future__ import annotations

from fastapi import APIRouter

from api.catalog import static_catalog
from api.deps import ProjectDep, ReadSessionDep
from api.schemas.misc import Catalog
from store import repo

router = APIRouter(prefix="/catalog", tags=["catalog"])


@router.get("", response_model=Catalog)
def catalog(session: ReadSessionDep, project: ProjectDep) -> Catalog:
    """What a dashboard needs to build a job form (stored datasets included)."""
    static = dict(static_catalog())
    stored = [
        {"name": d.id, "title": d.name, "task": d.task, "input_shape": list(d.input_shape), "n_samples": d.n_samples,
         "n_classes": d.n_classes, "n_targets": d.n_targets, "builtin": False}
        for d in repo.list_datasets(session, project_id=project)
    ]
    static["datasets"] = static.pop("builtin_datasets") + stored
    return Catalog(**static)
