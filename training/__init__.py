"""Trainyard's training engine: the job-spec schema and a PyTorch trainer.

``import training`` does not import torch: ``JobSpec``, ``validate_spec`` and
``preview_schedule`` are pure Python (the API uses them); ``fit``, ``lr_find`` and ``load_model`` load torch on
first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from training.reporting import BaseReporter, Checkpoint, FitResult, Reporter, Snapshot
from training.schedules import preview_schedule
from training.spec import JobSpec, SpecError, json_schema, validate_spec

if TYPE_CHECKING:
    from training.engine import TrainingError, fit, lr_find
    from training.inference import load_model

__all__ = [
    "BaseReporter", "Checkpoint", "FitResult", "JobSpec", "Reporter", "Snapshot", "SpecError",
    "TrainingError", "fit", "json_schema", "load_model", "lr_find", "preview_schedule", "validate_spec",
]


def __getattr__(name: str) -> Any:
    if name in ("fit", "lr_find", "TrainingError"):
        from training import engine

        return getattr(engine, name)
    if name == "load_model":
        from training.inference import load_model

        return load_model
    raise AttributeError(f"module 'training' has no attribute {name!r}")
