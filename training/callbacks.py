"""Epoch-end monitors: early stopping, best checkpoint and reduce-on-plateau.

Pure Python state machines (no torch): the engine feeds them the epoch's logs and acts on
their decisions (copy weights, save a checkpoint, change the learning rate). Semantics follow
Keras 3 ``EarlyStopping``, ``ModelCheckpoint`` and ``ReduceLROnPlateau``; see
``shared/docs/semantics.md``. Every monitor has ``state_dict()``/``load_state_dict()`` so its
state survives a resume. Epochs are 0-based here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

Mode = Literal["min", "max", "auto"]


def resolve_mode(monitor: str, mode: str) -> Literal["min", "max"]:
    """``auto`` is ``max`` for names containing ``acc`` or ``auc``, else ``min``."""
    if mode not in ("min", "max", "auto"):
        raise ValueError(f"mode must be 'min', 'max' or 'auto', got {mode!r}")
    if mode == "auto":
        name = monitor.lower()
        return "max" if ("acc" in name or "auc" in name) else "min"
    return mode  # type: ignore[return-value]


class Monitor:
    """Shared base: which value is watched, in which direction, with what margin."""

    def __init__(self, monitor: str, mode: str = "auto", min_delta: float = 0.0) -> None:
        self.monitor = monitor
        self.mode = resolve_mode(monitor, mode)
        self.min_delta = abs(float(min_delta))

    def is_improvement(self, current: float, reference: float | None) -> bool:
        """Strictly better than ``reference`` by more than ``min_delta``; anything beats None."""
        if reference is None:
            return True
        if self.mode == "min":
            return current < reference - self.min_delta
        return current > reference + self.min_delta

    def value(self, logs: dict[str, float]) -> float | None:
        v = logs.get(self.monitor)
        return None if v is None else float(v)


@dataclass
class EarlyStoppingDecision:
    stop: bool = False
    hold_weights: bool = False  # the engine should keep a copy of the current weights as "best"


class EarlyStopping(Monitor):
    """Keras 3 EarlyStopping, plus stop on a non-finite monitored value and a divergence threshold."""

    def __init__(
        self,
        monitor: str = "val_loss",
        min_delta: float = 0.0,
        patience: int = 0,
        mode: str = "auto",
        baseline: float | None = None,
        restore_best_weights: bool = False,
        start_from_epoch: int = 0,
        stop_on_non_finite: bool = True,
        divergence_threshold: float | None = None,
    ) -> None:
        super().__init__(monitor, mode, min_delta)
        if patience < 0:
            raise ValueError("patience must be >= 0")
        self.patience = int(patience)
        self.baseline = baseline
        self.restore_best_weights = restore_best_weights
        self.start_from_epoch = int(start_from_epoch)
        self.stop_on_non_finite = stop_on_non_finite
        self.divergence_threshold = divergence_threshold
        self.wait = 0
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.stopped_epoch: int | None = None
        self.holds_weights = False
        self.reason: str | None = None

    def on_epoch_end(self, epoch: int, logs: dict[str, float]) -> EarlyStoppingDecision:
        """Apply Keras' rule for one epoch end (0-based ``epoch``)."""
        current = self.value(logs)
        decision = EarlyStoppingDecision()
        if current is None or epoch < self.start_from_epoch:
            return decision
        if self.stop_on_non_finite and not math.isfinite(current):
            self.stopped_epoch, self.reason = epoch, "non_finite_loss"
            decision.stop = True
            return decision
        if self.divergence_threshold is not None and self._diverged(current):
            self.stopped_epoch, self.reason = epoch, "diverged"
            decision.stop = True
            return decision
        if self.restore_best_weights and not self.holds_weights:
            decision.hold_weights = True
            self.holds_weights = True
        self.wait += 1
        if self.is_improvement(current, self.best):
            self.best = current
            self.best_epoch = epoch
            if self.restore_best_weights:
                decision.hold_weights = True
            if self.baseline is None or self.is_improvement(current, self.baseline):
                self.wait = 0
            return decision
        if self.wait >= self.patience and epoch > 0:
            self.stopped_epoch, self.reason = epoch, "early_stopping"
            decision.stop = True
        return decision

    def _diverged(self, current: float) -> bool:
        assert self.divergence_threshold is not None
        if self.mode == "min":
            return current > self.divergence_threshold
        return current < self.divergence_threshold

    def state_dict(self) -> dict[str, Any]:
        return {
            "wait": self.wait,
            "best": self.best,
            "best_epoch": self.best_epoch,
            "stopped_epoch": self.stopped_epoch,
            "holds_weights": self.holds_weights,
            "reason": self.reason,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


class ModelCheckpoint(Monitor):
    """Keras 3 ModelCheckpoint's save decision (the engine does the saving)."""

    def __init__(
        self,
        monitor: str = "val_loss",
        mode: str = "auto",
        save_best_only: bool = False,
        initial_value_threshold: float | None = None,
    ) -> None:
        super().__init__(monitor, mode, 0.0)
        self.save_best_only = save_best_only
        self.best: float | None = initial_value_threshold
        self.best_epoch: int | None = None
        self.last_improved = False  # whether the latest should_save call saw a new best

    def should_save(self, logs: dict[str, float], epoch: int) -> bool:
        """True when this epoch's (or step's) weights are to be saved; updates the best value."""
        current = self.value(logs)
        self.last_improved = (
            current is not None and math.isfinite(current) and (self.best is None or self._better(current, self.best))
        )
        if self.last_improved:
            assert current is not None
            self.best, self.best_epoch = current, epoch
        return True if not self.save_best_only else self.last_improved

    def _better(self, current: float, best: float) -> bool:
        return current < best if self.mode == "min" else current > best

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_epoch = state["best"], state["best_epoch"]


class ReduceLROnPlateau(Monitor):
    """Keras 3 ReduceLROnPlateau as a multiplier on the scheduled rate."""

    def __init__(
        self,
        monitor: str = "val_loss",
        factor: float = 0.1,
        patience: int = 10,
        mode: str = "auto",
        min_delta: float = 1e-4,
        cooldown: int = 0,
        min_lr: float = 0.0,
    ) -> None:
        super().__init__(monitor, mode, min_delta)
        if not 0 < factor < 1:
            raise ValueError("factor must be in (0, 1)")
        self.factor, self.patience, self.cooldown, self.min_lr = factor, patience, cooldown, min_lr
        self.best: float = math.inf if self.mode == "min" else -math.inf
        self.wait = 0
        self.cooldown_counter = 0

    def on_epoch_end(self, logs: dict[str, float], lr: float) -> float:
        """Return the learning rate to use from now on, given the current one."""
        current = self.value(logs)
        if current is None:
            return lr
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.wait = 0
        if self.is_improvement(current, self.best):
            self.best = current
            self.wait = 0
        elif self.cooldown_counter <= 0:
            self.wait += 1
            if self.wait >= self.patience:
                if lr > self.min_lr:
                    lr = max(lr * self.factor, self.min_lr)
                    self.cooldown_counter = self.cooldown
                    self.wait = 0
        return lr

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "wait": self.wait, "cooldown_counter": self.cooldown_counter}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.wait, self.cooldown_counter = state["best"], state["wait"], state["cooldown_counter"]
