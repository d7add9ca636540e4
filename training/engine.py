"""The training loop: ``fit`` and ``lr_find``.

Design for speed: the dataset lives on the device as tensors (no DataLoader, no collate); each
step gathers a batch by index, runs forward/backward/step, and adds the batch's loss and metric
sums to device accumulators (no host sync per step; on CPU the non-finite check reads the loss,
which costs well under a microsecond). Everything else — validation, callbacks, reporting,
snapshots — happens once per epoch.

Reproducibility protocol (a hand-written loop that follows it gets the same numbers):
1. the data split comes from ``training.data.load(spec.data, seed)``;
2. ``random.seed(seed); numpy.random.seed(seed); torch.manual_seed(seed)``;
3. layers are built in spec order, each weighted layer drawing its kernel then its bias from
   the global torch RNG;
4. each epoch's order is ``torch.randperm(n_train, generator=g)`` with
   ``g = torch.Generator().manual_seed(seed)``; dropout draws from the global RNG.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import random
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from training import data as data_mod
from training.callbacks import EarlyStopping, ModelCheckpoint, ReduceLROnPlateau
from training.card import make_card
from training.epoch_end import EpochEnd, epoch_end_callbacks
from training.model import BuiltModel, build_model
from training.objectives import Objective, build_objective, prepare_targets, strip_output_activation
from training.optim import build_optimizer, make_clipper
from training.reporting import BaseReporter, Checkpoint, FitResult, Reporter
from training.schedules import make_lr_fn
from training.shapes import multiply_adds
from training.spec import FIND, JobSpec, ReduceOnPlateau, validate_spec
from training.state import StateError, pack_snapshot, sha256, unpack_snapshot, weights_to_bytes
from training.threads import step_threads

POLL_SECONDS = 0.2
VAL_CHUNK = 4096
#: the stop request of a sweep trial paused at an ASHA rung (the run ends with a snapshot)


class TrainingError(RuntimeError):
    """A failure a person can act on; ``kind`` is machine-readable (``device``, ``oom``,
    ``data``, ``resume``, ``runtime``)."""

    def __init__(self, message: str, kind: str = "runtime") -> None:
        super().__init__(message)
        self.kind = kind


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise TrainingError(f"device {name!r} was requested but CUDA is not available on this worker; use 'cpu' or 'auto'", "device")
        dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise TrainingError(f"device {name!r} does not exist: this worker has {torch.cuda.device_count()} GPU(s)", "device")
        return dev
    return torch.device("cpu")


@contextlib.contextmanager
def _deterministic(enabled: bool, device: torch.device) -> Iterator[None]:
    if not enabled:
        yield
        return
    previous = torch.are_deterministic_algorithms_enabled()
    prev_bench = torch.backends.cudnn.benchmark
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)
        torch.backends.cudnn.benchmark = prev_bench


@contextlib.contextmanager
def _actionable_errors(spec: JobSpec, device: torch.device) -> Iterator[None]:
    """Turn torch failures into messages that say what to change."""
    try:
        yield
    except torch.OutOfMemoryError:
        raise TrainingError(
            f"out of memory on {device} (batch_size {spec.data.batch_size}); reduce data.batch_size or the model's size",
            "oom",
        ) from None
    except data_mod.DataError as exc:
        raise TrainingError(f"data: {exc}", "data") from None
    except StateError as exc:
        raise TrainingError(f"cannot resume: {exc}", "resume") from None
    except RuntimeError as exc:
        if isinstance(exc, TrainingError):
            raise
        text = str(exc)
        if "out of memory" in text.lower():
            raise TrainingError(f"out of memory on {device}: reduce data.batch_size (now {spec.data.batch_size}) or the model's size", "oom") from None
        if "shape" in text or "size" in text:
            raise TrainingError(f"the model cannot process this data: {text.splitlines()[0]}", "runtime") from None
        raise


class _CudaFiniteCheck:
    """Non-finite loss detection on CUDA without stalling the pipeline: each step's loss value is
    copied (4 bytes, no kernel) to pinned host memory behind an event, and tested on the host
    (``math.isfinite``) as soon as the GPU has finished that step (normally by the next step), at
    the latest two steps later, when its slot is reused. A step costs one device-to-host copy, one
    event record and one event query, and no kernel (an ``isfinite`` kernel per step before; the
    engine against a plain loop on an H100 before and after: BENCHMARKS.md, Engine, GPU)."""

    SLOTS = 2

    def __init__(self) -> None:
        # Pinned host scalars (one per slot, not views of one buffer), allocated once per run, on
        # the first step, in the loss's dtype (a same-dtype copy is a plain asynchronous memcpy):
        # pinned allocation is slow.
        self.values: list[torch.Tensor] = []
        self.events = [torch.cuda.Event() for _ in range(self.SLOTS)]
        self.pending: list[int] = []
        self.count = 0

    def _ok(self, slot: int) -> bool:
        return math.isfinite(self.values[slot].item())

    def push(self, loss: torch.Tensor) -> bool:
        """Queue this step's check; False when an earlier step's loss was not finite."""
        slot = self.count % self.SLOTS
        self.count += 1
        pending = self.pending
        while pending:
            oldest = pending[0]
            if oldest == slot:
                self.events[slot].synchronize()
            elif not self.events[oldest].query():
                break
            pending.pop(0)
            if not self._ok(oldest):
                return False
        values, value = self.values, loss.detach()
        if not values:
            values[:] = [torch.zeros((), dtype=value.dtype).pin_memory() for _ in range(self.SLOTS)]
        elif value.dtype != values[0].dtype:  # not seen: a run's loss keeps its dtype
            value = value.to(values[0].dtype)
        values[slot].copy_(value, non_blocking=True)
        self.events[slot].record()
        pending.append(slot)
        return True

    def drain(self) -> bool:
        """Wait for every queued check; False if one of them saw a non-finite loss."""
        ok = True
        for slot in self.pending:
            self.events[slot].synchronize()
            ok &= self._ok(slot)
        self.pending.clear()
        return ok


class _Run:
    """One training run's state; see ``fit``."""

    def __init__(self, spec: JobSpec, reporter: Reporter | None, should_stop: Callable[[], bool] | None,
                 splits: dict[tuple[str, int], data_mod.Split] | None = None) -> None:
        """``splits``: data splits already loaded, by (data options, seed), which this run may
        share (a fused pack's members, ``training.fused``: a sweep's trials often have the same
        data and seed); the run adds its own. The run never writes into its split's arrays."""
        self.spec = spec
        self.reporter: Reporter = reporter or BaseReporter()
        self.has_reporter = reporter is not None
        self.should_stop = should_stop
        self.device = resolve_device(spec.device)
        if spec.precision == "fp16" and self.device.type != "cuda":
            raise TrainingError("precision 'fp16' needs a CUDA device; use 'bf16' or 'fp32' on CPU", "device")

        if splits is None:
            split = data_mod.load(spec.data, spec.seed)
        else:
            key = (spec.data.model_dump_json(), spec.seed)
            split = splits.get(key) or splits.setdefault(key, data_mod.load(spec.data, spec.seed))
        self.info = split.info
        seed = spec.seed
        random.seed(seed)
        np.random.seed(seed % 2**32)
        seed_torch(seed)

        self.strip = strip_output_activation(spec)
        self.built: BuiltModel = build_model(spec, tuple(split.info.input_shape), self.strip)
        self.model = self.built.module.to(self.device)
        self.forward = torch.compile(self.model) if spec.compile else self.model
        self.generator = torch.Generator().manual_seed(seed)

        dev = self.device
        n_classes = split.info.n_classes if split.info.task == "classification" else None
        self.x_train = torch.from_numpy(split.x_train).to(dev)
        self.y_train = torch.from_numpy(split.y_train).to(dev)
        self.x_val = torch.from_numpy(split.x_val).to(dev)
        self.y_val = torch.from_numpy(split.y_val).to(dev)
        self.t_train = prepare_targets(spec, self.y_train, n_classes)
        self.t_val = prepare_targets(spec, self.y_val, n_classes)
        self.n_train, self.n_val = len(self.x_train), len(self.x_val)
        self.batch_size = min(spec.data.batch_size, self.n_train)
        self.steps_per_epoch = math.ceil(self.n_train / self.batch_size)
        # a step's arithmetic (multiply-adds of its rows' forward pass): its intra-op threads follow it
        self.step_work = self.batch_size * multiply_adds(spec.model, tuple(split.info.input_shape))

        self.objective: Objective = build_objective(spec, n_classes)
        self._card_json: str | None = None  # the card as JSON, made at the first checkpoint
        self._best_weights: tuple[str, dict[str, torch.Tensor]] | None = None  # (sha256, tensors) of the best checkpoint
        self.card = make_card(
            spec, split.info,
            mean=None if split.mean is None else split.mean.tolist(),
            std=None if split.std is None else split.std.tolist(),
            outputs_are_logits=self.objective.outputs_are_logits,
            output_activation_in_weights=not self.built.stripped_output_activation,
            torch_version=torch.__version__,
        )
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.params = params
        lr_spec = spec.optimizer.learning_rate
        self.lr_fn = make_lr_fn(lr_spec, steps_per_epoch=self.steps_per_epoch, total_steps=spec.epochs * self.steps_per_epoch)
        self.optimizer = build_optimizer(params, spec.optimizer, self.lr_fn(0))
        self.clip = make_clipper(params, spec.optimizer)
        self.scaler = torch.amp.GradScaler("cuda") if spec.precision == "fp16" else None
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(spec.precision)

        cb = spec.callbacks
        self.early = EarlyStopping(**cb.early_stopping.model_dump(exclude={"verbose"})) if cb.early_stopping else None
        plateau_spec: Any = cb.reduce_lr_on_plateau or (lr_spec if isinstance(lr_spec, ReduceOnPlateau) else None)
        self.plateau = (
            ReduceLROnPlateau(
                plateau_spec.monitor, plateau_spec.factor, plateau_spec.patience, plateau_spec.mode,
                plateau_spec.min_delta, plateau_spec.cooldown, plateau_spec.min_lr,
            )
            if plateau_spec is not None else None
        )
        self.plateau_lr: float | None = None  # the rate set by the plateau callback, once it acted
        has_val = self.n_val > 0
        if cb.model_checkpoint:
            mc = cb.model_checkpoint
            self.checkpoint = ModelCheckpoint(mc.monitor, mc.mode, mc.save_best_only, mc.initial_value_threshold)
            self.save_freq = mc.save_freq
        else:
            # Lightning-style default: keep the best weights by the primary monitor.
            monitor = cb.early_stopping.monitor if cb.early_stopping else ("val_loss" if has_val else "loss")
            self.checkpoint = ModelCheckpoint(monitor, "auto", save_best_only=True)
            self.save_freq = "epoch"
        self.es_best: dict[str, torch.Tensor] | None = None
        self.best_checkpoint: Checkpoint | None = None
        self._pending_checkpoint: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None
        self.history: list[dict[str, float]] = []
        self.epoch = 0  # completed epochs
        self.step = 0  # optimizer updates applied
        self.stop_reason: str | None = None
        self.lr = self.lr_fn(0)
        self.check_nan = cb.terminate_on_nan
        self.cuda_nan = _CudaFiniteCheck() if self.check_nan and self.device.type == "cuda" else None
        self.has_penalty = bool(self.built.weight_penalties) or any(m._forward_hooks for m in self.model.modules())
        self._next_poll = 0.0
        self.extra_info: dict[str, Any] = {}  # reported in on_start and the result's info (e.g. lr_find)
        #: the work at each epoch's end, in order (training.epoch_end)
        self.epoch_end: list[EpochEnd] = epoch_end_callbacks(self)

    # ------------------------------------------------------------------ helpers

    def _current_lr(self, step: int) -> float:
        return self.plateau_lr if self.plateau_lr is not None else self.lr_fn(step)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _poll_cancel(self) -> bool:
        if self.should_stop is None:
            return False
        now = time.monotonic()
        if now < self._next_poll:
            return False
        self._next_poll = now + POLL_SECONDS
        return bool(self.should_stop())

    def _weights(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    # ------------------------------------------------------------------ evaluation

    def evaluate(self) -> dict[str, float]:
        """Validation loss (with penalties, as Keras) and metrics, in eval mode."""
        if self.n_val == 0:
            return {}
        logs = evaluate_model(
            self.model, self.built, self.objective, self.x_val, self.y_val, self.t_val,
            forward=self.forward, autocast=self._autocast,
        )
        return {f"val_{k}": v for k, v in logs.items()}

    # ------------------------------------------------------------------ training

    def start(self, extra: dict[str, Any] | None = None) -> None:
        """Tell the reporter what is about to train (``fit`` and a fused pack both call this; a
        pack adds ``extra``: which pack the run trains in)."""
        self.reporter.on_start(
            {
                "device": str(self.device),
                "parameters": self.built.parameter_count,
                "train_samples": self.n_train,
                "val_samples": self.n_val,
                "steps_per_epoch": self.steps_per_epoch,
                "resumed_from_epoch": self.epoch,
                **self.extra_info,
                **(extra or {}),
            }
        )

    def run(self) -> None:
        spec = self.spec
        self.start()
        while self.epoch < spec.epochs and self.stop_reason is None:
            self.train_epoch()

    def train_epoch(self) -> None:
        """One pass over the training split. The step loop does only what a hand-written loop
        needs; everything optional is decided once, before it."""
        spec, obj, model = self.spec, self.objective, self.model
        started = time.perf_counter()
        model.train()
        n, bs, dev = self.n_train, self.batch_size, self.device
        perm = torch.randperm(n, generator=self.generator).to(dev) if spec.data.shuffle else None
        loss_sum = torch.zeros((), device=dev)
        sums = {k: torch.zeros((), device=dev, dtype=torch.long if k in obj.count_metrics else torch.float32) for k in obj.metrics}
        metric_fns = [(sums[k], fn) for k, fn in obj.metrics.items()]
        x, y, t = self.x_train, self.y_train, self.t_train
        same_target = t is y
        forward, loss_fn = self.forward, obj.loss
        optimizer, clip, scaler, penalty_of = self.optimizer, self.clip, self.scaler, self.built.penalty
        has_penalty = self.has_penalty
        autocast = self._autocast if self.autocast_dtype is not None else None
        lr_constant = isinstance(spec.optimizer.learning_rate, float | int) and self.plateau is None
        max_steps = spec.max_steps
        check_nan = self.check_nan and dev.type != "cuda"
        cuda_nan = self.cuda_nan
        poll = self._poll_cancel if self.should_stop is not None else None
        step_freq = self.save_freq if isinstance(self.save_freq, int) else None
        seen = 0
        lr = self.lr
        for b in range(self.steps_per_epoch):
            lo, hi = b * bs, (b + 1) * bs
            if perm is None:
                xb, yb = x[lo:hi], y[lo:hi]
                tb = yb if same_target else t[lo:hi]
            else:
                idx = perm[lo:hi]
                xb, yb = x[idx], y[idx]
                tb = yb if same_target else t[idx]
            if not lr_constant:
                new_lr = self._current_lr(self.step)
                if new_lr != lr:
                    lr = new_lr
                    for group in optimizer.param_groups:
                        group["lr"] = lr
            if autocast is None:
                out = forward(xb)
                loss = loss_fn(out, tb)
            else:
                with autocast():
                    out = forward(xb)
                    loss = loss_fn(out, tb)
            if has_penalty:
                penalty = penalty_of()
                if penalty is not None:
                    loss = loss + penalty
            if check_nan and not math.isfinite(loss.item()):
                self.stop_reason = "non_finite_loss"
                loss_sum += loss.detach().float() * len(xb)  # the reported loss becomes non-finite too
                break
            if cuda_nan is not None and not cuda_nan.push(loss):
                self.stop_reason = "non_finite_loss"
                break
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                if clip is not None:
                    scaler.unscale_(optimizer)
                    clip()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                if clip is not None:
                    clip()
                optimizer.step()
            self.step += 1
            m = len(xb)
            seen += m
            loss_sum.add_(loss.detach(), alpha=m)
            if metric_fns:
                o = out.detach()
                for acc, fn in metric_fns:
                    acc.add_(fn(o, yb, tb))
            if step_freq is not None and self.step % step_freq == 0:
                self._step_checkpoint(loss_sum, sums, seen)
            if max_steps is not None and self.step >= max_steps:
                self.stop_reason = "max_steps"
                break
            if poll is not None and poll():
                self.stop_reason = "cancelled"
                if b < self.steps_per_epoch - 1:
                    return  # a part epoch is not recorded
                break  # the epoch's last step ran: it is a whole epoch, recorded as such
        if cuda_nan is not None and self.stop_reason is None and not cuda_nan.drain():
            self.stop_reason = "non_finite_loss"
        self.lr = lr
        self._end_epoch(loss_sum, sums, max(seen, 1), started)

    def _train_logs(self, loss_sum: torch.Tensor, sums: dict[str, torch.Tensor], seen: int) -> dict[str, float]:
        return finish_logs(self.objective, read_sums(loss_sum, sums), seen)

    def _step_checkpoint(self, loss_sum: torch.Tensor, sums: dict[str, torch.Tensor], seen: int) -> None:
        logs = self._train_logs(loss_sum, sums, seen)
        if self.checkpoint.should_save(logs, self.epoch):
            self._save_checkpoint(logs.get(self.checkpoint.monitor))

    def _save_checkpoint(self, value: float | None) -> None:
        meta = {"epoch": self.epoch + 1, "step": self.step, "monitor": self.checkpoint.monitor, "value": value}
        # With save_best_only false every save is reported, but only an improving one (or the
        # first) becomes the run's best checkpoint.
        is_best = self.checkpoint.last_improved or (self.best_checkpoint is None and self._pending_checkpoint is None)
        if not self.has_reporter:
            # Nobody consumes intermediate checkpoints: keep a host copy (no accelerator memory),
            # serialize once at the end.
            if is_best:
                self._pending_checkpoint = ({k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}, meta)
            return
        ckpt = self._make_checkpoint(self.model.state_dict(), meta, is_best)
        if is_best:
            self.best_checkpoint = ckpt
        self.reporter.on_checkpoint(ckpt)

    def _make_checkpoint(self, weights: dict[str, torch.Tensor], meta: dict[str, Any], is_best: bool = True) -> Checkpoint:
        if self._card_json is None:  # encoded once: the card is the same for every checkpoint of the run
            self._card_json = json.dumps(self.card, sort_keys=True)
        data = weights_to_bytes(weights, meta, {"card": self._card_json})
        return Checkpoint(meta["epoch"], meta["step"], meta["monitor"], meta["value"], data, sha256(data), is_best)

    def final_checkpoint(self) -> Checkpoint | None:
        if self._pending_checkpoint is not None:
            weights, meta = self._pending_checkpoint
            self.best_checkpoint = self._make_checkpoint(weights, meta)
            self._pending_checkpoint = None
        return self.best_checkpoint

    def _end_epoch(self, loss_sum: torch.Tensor, sums: dict[str, torch.Tensor], seen: int, started: float,
                   val: dict[str, float] | None = None) -> None:
        """``val``: the epoch's validation logs when the caller computed them (a fused pack
        validates all its trials in one pass, ``training.fused``); else :meth:`evaluate`."""
        self._epoch_end_with(self._epoch_logs(read_sums(loss_sum, sums), seen, started, val))

    def _epoch_logs(self, train: list[float], seen: int, started: float,
                    val: dict[str, float] | None = None) -> dict[str, float]:
        """The logs of the epoch that has just ended (what its callbacks get); ``train``: the
        epoch's loss sum and metric sums over ``seen`` samples (:func:`read_sums`)."""
        logs: dict[str, float] = {"epoch": self.epoch + 1}
        logs.update(finish_logs(self.objective, train, seen))
        logs.update(self.evaluate() if val is None else val)
        logs["lr"] = self.lr
        logs["seconds"] = time.perf_counter() - started
        return logs

    def _epoch_end_with(self, logs: dict[str, float]) -> None:
        """The epoch end's callbacks, in order, on the epoch's ``logs`` (:meth:`_epoch_logs`)."""
        for callback in self.epoch_end:
            callback.on_epoch_end(self, self.epoch, logs)

    snapshot_every = 1

    @functools.cached_property
    def spec_digests(self) -> tuple[str, str]:
        """The spec's digests (whole; all but ``epochs``), which a snapshot carries and a resume
        checks: computed once per run (the spec does not change during it)."""
        return _spec_digest(self.spec), _spec_digest(self.spec, any_epochs=True)

    def snapshot_due(self) -> bool:
        return self.snapshot_every > 0 and self.epoch % self.snapshot_every == 0

    # ------------------------------------------------------------------ resume

    def snapshot(self) -> bytes:
        """The full training state after the last completed epoch."""
        rng = {"torch_cpu": torch.get_rng_state(), "shuffle": self.generator.get_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                rng[f"cuda_{i}"] = s
        extra: dict[str, dict[str, torch.Tensor]] = {}
        if self.es_best is not None:
            extra["es_best"] = self.es_best
        best_meta = None
        if self.final_checkpoint() is not None:
            c = self.best_checkpoint
            best_meta = {"epoch": c.epoch, "step": c.step, "monitor": c.monitor, "value": c.value}
            if self._best_weights is None or self._best_weights[0] != c.sha256:  # decoded once per best checkpoint
                from training.state import weights_from_bytes

                self._best_weights = (c.sha256, weights_from_bytes(c.data))
            extra["ckpt_best"] = self._best_weights[1]
        np_state = np.random.get_state()
        meta = {
            "spec_digest": self.spec_digests[0],
            "spec_digest_any_epochs": self.spec_digests[1],
            "epoch": self.epoch,
            "step": self.step,
            "lr": self.lr,
            "plateau_lr": self.plateau_lr,
            "history": self.history,
            "early": self.early.state_dict() if self.early else None,
            "checkpoint": self.checkpoint.state_dict(),
            "plateau": self.plateau.state_dict() if self.plateau else None,
            "best_checkpoint": best_meta,
            "python_random": _py_state_to_json(random.getstate()),
            "numpy_random": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
            "extra_info": self.extra_info,
        }
        return pack_snapshot(
            model_state=self.model.state_dict(),
            optimizer_state=self.optimizer.state_dict(),
            rng_tensors=rng,
            extra_tensors=extra,
            meta=meta,
        )

    def load_weights(self, data: bytes) -> None:
        """Start from a checkpoint's weights (a warm start): every parameter and buffer of the
        model, with the same names and shapes."""
        from training.state import weights_from_bytes

        try:
            weights = weights_from_bytes(data)
            self.model.load_state_dict({k: v.to(self.device) for k, v in weights.items()}, strict=True)
        except (StateError, RuntimeError) as exc:
            raise TrainingError(
                f"init_from: the checkpoint's weights do not fit this model (same layers needed): {exc}", "resume"
            ) from None

    def restore(self, data: bytes) -> None:
        state = unpack_snapshot(data)
        meta = state["meta"]
        # the same spec, or the same spec with more epochs (a job continued after it ended)
        same = meta["spec_digest"] == self.spec_digests[0]
        more_epochs = (meta.get("spec_digest_any_epochs") == self.spec_digests[1]
                       and self.spec.epochs >= meta["epoch"])
        if not (same or more_epochs):
            raise StateError("the snapshot was taken from a different job spec")
        self.model.load_state_dict({k: v.to(self.device) for k, v in state["model"].items()})
        opt_state = state["optimizer"]
        self.optimizer.load_state_dict(opt_state)
        self.epoch, self.step, self.lr = meta["epoch"], meta["step"], meta["lr"]
        self.plateau_lr = meta["plateau_lr"]
        self.history = meta["history"]
        if self.early is not None and meta["early"] is not None:
            self.early.load_state_dict(meta["early"])
        self.checkpoint.load_state_dict(meta["checkpoint"])
        if self.plateau is not None and meta["plateau"] is not None:
            self.plateau.load_state_dict(meta["plateau"])
        if "es_best" in state:
            self.es_best = {k: v.to(self.device) for k, v in state["es_best"].items()}
        if meta["best_checkpoint"] is not None:
            b = meta["best_checkpoint"]
            self.best_checkpoint = self._make_checkpoint(state["ckpt_best"], b)
        rng = state["rng"]
        torch.set_rng_state(rng["torch_cpu"])
        self.generator.set_state(rng["shuffle"])
        cuda_states = [rng[k] for k in sorted(rng) if k.startswith("cuda_")]
        if cuda_states and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda_states)
        random.setstate(_py_state_from_json(meta["python_random"]))
        ns = meta["numpy_random"]
        np.random.set_state((ns[0], np.array(ns[1], dtype=np.uint32), ns[2], ns[3], ns[4]))

    # ------------------------------------------------------------------ result

    def result(self, seconds: float) -> FitResult:
        # the last epoch's weights, before early stopping restores the best ones (a cancelled run's
        # are those of its last step: no monitored value describes them)
        mid_epoch = self.stop_reason == "cancelled"
        last = self._make_checkpoint(
            self.model.state_dict(),
            {"epoch": self.epoch, "step": self.step, "monitor": self.checkpoint.monitor,
             "value": None if mid_epoch or not self.history else self.history[-1].get(self.checkpoint.monitor)},
            is_best=False,
        ) if self.epoch > 0 else None
        if self.early is not None and self.early.restore_best_weights and self.es_best is not None:
            self.model.load_state_dict(self.es_best)
        reason = self.stop_reason or "completed"
        # The recorded best is early stopping's (whose weights are restored) when it is configured,
        # else the checkpoint monitor's.
        tracker: EarlyStopping | ModelCheckpoint = self.early if self.early is not None else self.checkpoint
        best_epoch = tracker.best_epoch
        ckpt = self.final_checkpoint()
        # The model is not used after this, so CPU tensors can be handed out without a copy.
        weights = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        return FitResult(
            history=self.history,
            stop_reason=reason,
            best_epoch=None if best_epoch is None else best_epoch + 1,
            best_value=tracker.best,
            monitor=tracker.monitor,
            stopped_epoch=(self.early.stopped_epoch + 1) if self.early and self.early.stopped_epoch is not None else (
                self.epoch if reason != "completed" else None
            ),
            epochs_run=self.epoch,
            steps=self.step,
            weights=weights,
            best_checkpoint=ckpt.data if ckpt else None,
            best_checkpoint_sha256=ckpt.sha256 if ckpt else None,
            last_checkpoint=last,
            seconds=seconds,
            info={
                "device": str(self.device),
                "parameters": self.built.parameter_count,
                "steps_per_epoch": self.steps_per_epoch,
                "outputs_are_logits": self.objective.outputs_are_logits,
                "output_activation": self.built.output_activation,
                "output_activation_in_weights": not self.built.stripped_output_activation,
                "spec": self.spec.model_dump(mode="json"),
                **self.extra_info,
            },
        )


@torch.no_grad()
def evaluate_model(
    model: torch.nn.Module,
    built: BuiltModel,
    objective: Objective,
    x: torch.Tensor,
    y: torch.Tensor,
    t: torch.Tensor,
    *,
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
) -> dict[str, float]:
    """Mean loss (with the model's penalties, as Keras) and metrics of ``model`` on prepared
    inputs ``x``, labels ``y`` and loss targets ``t``, in eval mode, in chunks of VAL_CHUNK rows:
    the validation numbers of a run (``loss``, ``accuracy``... without the ``val_`` prefix)."""
    model.eval()
    forward = forward or model
    n = len(x)
    loss_sum = torch.zeros((), device=x.device)
    sums = {k: torch.zeros((), device=x.device) for k in objective.metrics}
    for start in range(0, n, VAL_CHUNK):
        xb = x[start : start + VAL_CHUNK]
        yb, tb = y[start : start + VAL_CHUNK], t[start : start + VAL_CHUNK]
        with autocast():
            out = forward(xb)
            loss = objective.loss(out, tb)
        penalty = built.penalty()
        if penalty is not None:
            loss = loss + penalty
        loss_sum += loss.float() * len(xb)
        out = out.float()
        for k, fn in objective.metrics.items():
            sums[k] += fn(out, yb, tb)
    return finish_logs(objective, read_sums(loss_sum, sums), n)


def read_sums(loss_sum: torch.Tensor, sums: dict[str, torch.Tensor]) -> list[float]:
    """An epoch's loss sum and metric sums (``sums``: in the objective's metric order) as floats,
    read from the device in one transfer, each widened to float64 first (:func:`finish_logs` takes
    them). Given ``(L,)`` tensors (a fused pack's, one value per trial): one such list per trial."""
    return torch.stack([v.double() for v in (loss_sum, *sums.values())], -1).cpu().tolist()


def finish_logs(objective: Objective, values: list[float], n: int) -> dict[str, float]:
    """Logs from ``values``: the loss sum then the objective's metric sums over ``n`` samples
    (an epoch's training logs, ``evaluate_model``'s validation logs, and a fused pack's per
    trial)."""
    logs = {"loss": values[0] / n}
    for k, v in zip(objective.metrics, values[1:], strict=True):
        logs[k] = objective.finalize.get(k, float)(v / n)
    return logs


def warm_up() -> None:
    """Import what a first job would otherwise import on first use: ``torch._dynamo`` (torch.optim
    imports it at an optimizer's first step, ~1.4 s) and scikit-learn's dataset loaders (the
    built-in datasets, ~1.5 s; ``training.data``). A worker calls this when it starts, so its first
    job (solo or a pack) does not pay for them. Imports only: no RNG, thread or device state."""
    import sklearn.datasets  # noqa: F401
    import torch._dynamo  # noqa: F401


def seed_torch(seed: int) -> None:
    """``torch.manual_seed(seed)``: the CPU generator (and every accelerator's) seeded with
    ``seed``. On a machine without an accelerator only the CPU generator is seeded, directly:
    ``torch.manual_seed`` also queues a lazy CUDA seeding there, recording the caller's stack for
    it (``traceback.format_stack``: ~1 ms from a worker's deep stack, per job and per pack member)."""
    if torch.cuda.is_available() or torch.backends.mps.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available()):
        torch.manual_seed(seed)
    else:
        torch.default_generator.manual_seed(int(seed))


def _spec_digest(spec: JobSpec, *, any_epochs: bool = False) -> str:
    """sha256 of the spec; ``any_epochs``: of everything but its ``epochs``."""
    import hashlib

    # "pack" changes nothing the job computes (snapshots of a job stay valid whether it may be packed)
    dumped = spec.model_dump(mode="json", exclude={"pack"})
    if any_epochs:
        dumped.pop("epochs", None)
    return hashlib.sha256(json.dumps(dumped, sort_keys=True).encode()).hexdigest()


def _py_state_to_json(state: tuple[Any, ...]) -> list[Any]:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _py_state_from_json(state: list[Any]) -> tuple[Any, ...]:
    return (state[0], tuple(state[1]), state[2])


def fit(
    spec: JobSpec | dict[str, Any],
    reporter: Reporter | None = None,
    should_stop: Callable[[], bool] | None = None,
    resume_from: bytes | None = None,
    *,
    snapshot_every: int = 1,
    datasets: Callable[[str], Any] | None = None,
    init_weights: bytes | None = None,
    one_thread_below: int = 0,
) -> FitResult:
    """Train the model a spec describes and return its history, stop reason and weights.

    ``reporter`` gets ``on_start``, each epoch's metrics, each saved checkpoint and a training
    state snapshot every ``snapshot_every`` epochs; ``should_stop`` is polled every
    ``POLL_SECONDS`` (cancellation ends the run with stop reason ``cancelled``);
    ``resume_from`` is a snapshot's bytes: the run continues exactly where it was taken.
    ``init_weights`` (a checkpoint's safetensors bytes; what a spec's ``init_from`` names) are
    loaded into the model before training starts (a warm start; ignored when resuming).
    With ``"learning_rate": "find"`` the LR range test (:func:`lr_find`) runs first and training
    uses its suggestion; its output is ``info["lr_find"]`` (in ``on_start`` and the result). A
    reporter that sets ``stop_request`` in ``on_epoch`` ends the run after that epoch with that
    stop reason (a sweep's pruner: ``"pruned"``; ``"paused"`` also hands the reporter a snapshot
    of that epoch, to resume from). ``one_thread_below``: a run whose steps have fewer
    multiply-adds than this trains on one intra-op thread (``training.threads``; 0: torch's
    threads as they are).
    Raises ``SpecError`` for an invalid spec and ``TrainingError`` for failures a person can fix.
    """
    job = validate_spec(spec, datasets)
    if job.kind != "train":
        raise TrainingError(f"fit() runs jobs of kind 'train'; this one is {job.kind!r} (use lr_find)", "runtime")
    started = time.perf_counter()
    found: dict[str, Any] | None = None
    if job.optimizer.learning_rate == FIND:
        # a resumed run keeps the rate it found (the snapshot has it), so it resumes the same spec
        found = _found_in_snapshot(resume_from) if resume_from is not None else None
        if found is None:
            found = lr_find(job, should_stop=should_stop, datasets=datasets, one_thread_below=one_thread_below)
        cancelled = found.get("suggested_learning_rate") is None and should_stop is not None and bool(should_stop())
        job = _with_found_lr(job, found, cancelled)
    device = resolve_device(job.device)
    with _deterministic(job.deterministic, device), _actionable_errors(job, device):
        run = _Run(job, reporter, should_stop)
        if found is not None:
            run.extra_info["lr_find"] = found
        run.snapshot_every = snapshot_every
        if resume_from is not None:
            run.restore(resume_from)
        elif init_weights is not None:
            run.load_weights(init_weights)
        elif job.init_from is not None:
            raise TrainingError(
                f"init_from names job {job.init_from}: pass its checkpoint's bytes as init_weights", "resume"
            )
        with step_threads(one_thread_below, device) as use_threads:
            use_threads(run.step_work)
            run.run()
        return run.result(time.perf_counter() - started)


def _found_in_snapshot(data: bytes) -> dict[str, Any] | None:
    try:
        found = unpack_snapshot(data)["meta"].get("extra_info", {}).get("lr_find")
    except (StateError, ValueError, KeyError):
        return None  # restoring reports what is wrong with it
    return found if isinstance(found, dict) and found.get("suggested_learning_rate") else None


def _with_found_lr(job: JobSpec, found: dict[str, Any], cancelled: bool = False) -> JobSpec:
    """The spec with ``"learning_rate": "find"`` replaced by the finder's suggestion (by its
    ``min_lr`` if the finder was cancelled: the run then stops at its first poll)."""
    lr = found.get("suggested_learning_rate")
    if lr is None and cancelled:
        lr = found.get("min_lr")
    if lr is None:
        raise TrainingError(
            f"learning_rate 'find': the LR range test gave no suggestion ({found.get('rule')}); widen "
            "lr_find.min_lr/max_lr or raise lr_find.steps, or give a number", "runtime",
        )
    return job.model_copy(update={"optimizer": job.optimizer.model_copy(update={"learning_rate": float(lr)})})


def suggest_lr(lrs: list[float], losses: list[float]) -> tuple[float | None, str]:
    """Steepest descent of the smoothed loss against log10(lr), looked for before the loss
    minimum and after the first 10% of points; falls back to (lr at the minimum) / 10."""
    n = len(losses)
    if n < 5:
        return None, "too few points for a suggestion"
    arr = np.array(losses, dtype=float)
    finite = np.isfinite(arr)
    if not finite.any():
        return None, "the loss was never finite"
    i_min = int(np.nanargmin(np.where(finite, arr, np.nan)))
    skip = max(1, n // 10)
    if i_min - skip >= 3:
        grads = np.gradient(arr[: i_min + 1], np.log10(np.array(lrs[: i_min + 1])))
        i = skip + int(np.argmin(grads[skip:]))
        return float(lrs[i]), "steepest descent of the smoothed loss before its minimum"
    return float(lrs[i_min]) / 10.0, "loss minimum / 10 (curve too short for a slope)"


def lr_find(
    spec: JobSpec | dict[str, Any],
    min_lr: float | None = None,
    max_lr: float | None = None,
    steps: int | None = None,
    *,
    should_stop: Callable[[], bool] | None = None,
    datasets: Callable[[str], Any] | None = None,
    one_thread_below: int = 0,
) -> dict[str, Any]:
    """LR range test (Smith 2015): raise the rate exponentially from ``min_lr`` to ``max_lr``
    over ``steps`` updates on the training data, record the loss (exponentially smoothed, with
    bias correction), stop when it exceeds ``stop_factor`` (4) times its best or is not finite.
    Returns ``lrs``, ``losses`` (smoothed), ``raw_losses``, ``suggested_learning_rate``, ``rule``,
    ``stopped_early``. ``one_thread_below``: as :func:`fit`'s."""
    job = validate_spec(spec, datasets)
    opts = job.lr_find or __import__("training.spec", fromlist=["LRFindSpec"]).LRFindSpec()
    lo = min_lr if min_lr is not None else opts.min_lr
    hi = max_lr if max_lr is not None else opts.max_lr
    n_steps = steps if steps is not None else opts.steps
    if not hi > lo > 0 or n_steps < 2:
        raise TrainingError("lr_find needs 0 < min_lr < max_lr and steps >= 2", "runtime")
    update: dict[str, Any] = {"kind": "train"}
    if job.optimizer.learning_rate == FIND:  # the range test sets the rate itself at every step
        update["optimizer"] = job.optimizer.model_copy(update={"learning_rate": lo})
    train_job = job.model_copy(update=update)
    device = resolve_device(job.device)
    with (_deterministic(job.deterministic, device), _actionable_errors(job, device),
          step_threads(one_thread_below, device) as use_threads):
        run = _Run(train_job, None, should_stop)
        use_threads(run.step_work)
        model, obj = run.model, run.objective
        model.train()
        lrs, raw, smooth = [], [], []
        avg, best = 0.0, math.inf
        beta = opts.smoothing
        stopped_early = False
        bs = run.batch_size
        perm = torch.randperm(run.n_train, generator=run.generator).to(run.device)
        b = 0
        for i in range(n_steps):
            if (b + 1) * bs > run.n_train and b > 0:
                perm, b = torch.randperm(run.n_train, generator=run.generator).to(run.device), 0
            idx = perm[b * bs : (b + 1) * bs]
            b += 1
            lr = lo * (hi / lo) ** (i / (n_steps - 1))
            for g in run.optimizer.param_groups:
                g["lr"] = lr
            with run._autocast():
                out = run.forward(run.x_train[idx])
                loss = obj.loss(out, run.t_train[idx])
            penalty = run.built.penalty()
            if penalty is not None:
                loss = loss + penalty
            value = float(loss.item())
            lrs.append(lr)
            raw.append(value)
            if not math.isfinite(value):
                smooth.append(math.inf)
                stopped_early = True
                break
            avg = beta * avg + (1 - beta) * value
            debiased = avg / (1 - beta ** (i + 1))
            smooth.append(debiased)
            best = min(best, debiased)
            if i > 0 and debiased > opts.stop_factor * best:
                stopped_early = True
                break
            run.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if run.clip is not None:
                run.clip()
            run.optimizer.step()
            if run._poll_cancel():
                stopped_early = True
                break
        suggestion, rule = suggest_lr(lrs, smooth)
        return {
            "lrs": lrs,
            "losses": [v if math.isfinite(v) else None for v in smooth],
            "raw_losses": [v if math.isfinite(v) else None for v in raw],
            "suggested_learning_rate": suggestion,
            "rule": rule,
            "stopped_early": stopped_early,
            "min_lr": lo,
            "max_lr": hi,
        }
