"""Trainyard's training engine: the job-spec schema and a PyTorch trainer.

``import training`` does not import torch: ``JobSpec``, ``validate_spec`` and
``preview_schedule`` are pure Python (the API uses them); ``fit`` and ``lr_find`` load torch on
first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from training.reporting import BaseReporter, Checkpoint, FitResult, Reporter, Snapshot
from training.schedules import preview_schedule
from training.spec import JobSpec, SpecError, json_schema, validate_spec

if TYPE_CHECKING:
    from training.engine import TrainingError, fit, lr_find

__all__ = [
    "BaseReporter", "Checkpoint", "FitResult", "JobSpec", "Reporter", "Snapshot", "SpecError",
    "TrainingError", "fit", "json_schema", "lr_find", "preview_schedule", "validate_spec",
]


def __getattr__(name: str) -> Any:
    if name in ("fit", "lr_find", "TrainingError"):
        from training import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'training' has no attribute {name!r}")
