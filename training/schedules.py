"""Learning-rate schedules as pure functions of the optimizer step.

Pure Python (no torch), so the API can preview a schedule without loading the engine.
``step`` is the 0-based count of optimizer updates already applied: update ``k`` uses
``lr_at(k)``. Formulas follow Keras 3 (``exponential``, ``polynomial``, ``cosine``,
``cosine_restarts``) and PyTorch (``step``, ``multistep``, ``one_cycle``); see
``shared/docs/semantics.md``.

Warm-up (any schedule): linear from ``warmup_start_lr`` to the schedule's value at its own
step 0 over ``warmup_steps`` updates; afterwards the wrapped schedule runs from its step 0.
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

LRFunction = Callable[[int], float]


#: The largest number a spec may hold: float32's maximum (the engine's tensors are float32, and
#: torch refuses a larger scalar: "value cannot be converted to type float without overflow").
FLOAT32_MAX = 3.4028234663852886e38
#: The largest learning rate, as a number or as any value of a schedule. Far above any rate that
#: trains (a rate this large makes a float32 loss non-finite at once, which the engine reports as
#: ``non_finite_loss``), and far enough below FLOAT32_MAX that torch's optimizers can scale it
#: (Adam's ``lr / (1 - beta_1 ** t)``; at FLOAT32_MAX that raised in the worker).
MAX_LEARNING_RATE = 1e10

#: The most restarts cosine_restarts may search through when it locates a step (a t_mul below 1
#: makes restarts ever shorter; float64 rounding would otherwise loop without end).
_MAX_RESTART_FIX = 64


class ScheduleError(ValueError):
    """A schedule that cannot be evaluated as written (e.g. needs steps_per_epoch, or its value
    overflows at some step). ``field`` names the schedule's parameter at fault, when one is."""

    def __init__(self, msg: str, field: str | None = None) -> None:
        super().__init__(msg)
        self.field = field


def _get(spec: Any, name: str, default: Any = None) -> Any:
    if isinstance(spec, Mapping):
        return spec.get(name, default)
    return getattr(spec, name, default)


def _exponential(s: Any) -> LRFunction:
    lr0, steps, rate, stair = (
        _get(s, "initial_learning_rate"),
        _get(s, "decay_steps"),
        _get(s, "decay_rate"),
        bool(_get(s, "staircase", False)),
    )

    def f(step: int) -> float:
        p = step / steps
        if stair:
            p = math.floor(p)
        return lr0 * rate**p

    return f


def _epoch_or_step(s: Any, steps_per_epoch: int | None) -> Callable[[int], int]:
    unit = _get(s, "unit", "epoch")
    if unit == "step":
        return lambda step: step
    if not steps_per_epoch:
        raise ScheduleError(
            f"schedule {_get(s, 'schedule')!r} counts in epochs: steps_per_epoch is needed to evaluate it "
            "(give it to the preview, or use unit='step')"
        )
    return lambda step: step // steps_per_epoch


def _step(s: Any, steps_per_epoch: int | None) -> LRFunction:
    lr0, size, gamma = _get(s, "initial_learning_rate"), _get(s, "step_size"), _get(s, "gamma", 0.1)
    t_of = _epoch_or_step(s, steps_per_epoch)
    return lambda step: lr0 * gamma ** (t_of(step) // size)


def _multistep(s: Any, steps_per_epoch: int | None) -> LRFunction:
    lr0, gamma = _get(s, "initial_learning_rate"), _get(s, "gamma", 0.1)
    milestones = sorted(_get(s, "milestones"))
    t_of = _epoch_or_step(s, steps_per_epoch)

    def f(step: int) -> float:
        return lr0 * gamma ** bisect.bisect_right(milestones, t_of(step))  # milestones <= t

    return f


def _polynomial(s: Any) -> LRFunction:
    lr0, steps = _get(s, "initial_learning_rate"), _get(s, "decay_steps")
    end, power, cycle = _get(s, "end_learning_rate", 1e-4), _get(s, "power", 1.0), _get(s, "cycle", False)

    def f(step: int) -> float:
        decay_steps = steps
        if cycle:
            multiplier = 1.0 if step == 0 else math.ceil(step / steps)
            decay_steps = steps * multiplier
        else:
            step = min(step, steps)
        return (lr0 - end) * (1 - step / decay_steps) ** power + end

    return f


def _cosine(s: Any) -> LRFunction:
    lr0, steps, alpha = _get(s, "initial_learning_rate"), _get(s, "decay_steps"), _get(s, "alpha", 0.0)
    # Keras CosineDecay(warmup_target=...): the decay starts from warmup_target (the warm-up itself
    # is handled by the generic wrapper, see _warmup_bounds).
    target = _get(s, "warmup_target")
    peak = lr0 if target is None else target

    def f(step: int) -> float:
        done = min(step, steps) / steps
        return peak * ((1 - alpha) * 0.5 * (1 + math.cos(math.pi * done)) + alpha)

    return f


def _cosine_restarts(s: Any) -> LRFunction:
    lr0, first = _get(s, "initial_learning_rate"), _get(s, "first_decay_steps")
    t_mul, m_mul, alpha = _get(s, "t_mul", 2.0), _get(s, "m_mul", 1.0), _get(s, "alpha", 0.0)

    def locate(step: int) -> tuple[int, float]:
        """(restart index, fraction of that restart done) of ``step``."""
        frac = step / first
        if t_mul == 1.0:
            i = math.floor(frac)
            return i, frac - i
        i = math.floor(math.log(1 - frac * (1 - t_mul)) / math.log(t_mul))
        # float64 rounding can land just below a whole number at a restart boundary: fix i so
        # that start(i) <= frac < start(i + 1), start(i) = (1 - t_mul**i) / (1 - t_mul).
        for _ in range(_MAX_RESTART_FIX):
            if (1 - t_mul ** (i + 1)) / (1 - t_mul) > frac:
                break
            i += 1
        else:
            raise ValueError("the restarts never reach this step")
        for _ in range(_MAX_RESTART_FIX):
            if not (i > 0 and (1 - t_mul**i) / (1 - t_mul) > frac):
                break
            i -= 1
        return i, (frac - (1 - t_mul**i) / (1 - t_mul)) / t_mul**i

    def f(step: int) -> float:
        try:
            i, frac = locate(step)
        except (OverflowError, ValueError, ZeroDivisionError) as exc:
            # t_mul < 1: the restarts add up to first_decay_steps / (1 - t_mul) steps and Keras
            # gives NaN past them; a tiny or huge t_mul under- or overflows float64
            raise ScheduleError(f"schedule 'cosine_restarts' is undefined at step {step} with t_mul {t_mul} "
                                f"({exc}); with t_mul < 1 the restarts end after first_decay_steps / (1 - t_mul) "
                                "steps", "t_mul") from None
        return lr0 * ((1 - alpha) * 0.5 * m_mul**i * (1 + math.cos(math.pi * frac)) + alpha)

    return f


def _one_cycle(s: Any, total_steps: int | None) -> LRFunction:
    max_lr = _get(s, "max_lr")
    total = _get(s, "total_steps") or total_steps
    if not total:
        raise ScheduleError(
            "schedule 'one_cycle' needs total_steps (or the job's epochs and steps per epoch to derive it)"
        )
    pct, div, final_div = _get(s, "pct_start", 0.3), _get(s, "div_factor", 25.0), _get(s, "final_div_factor", 1e4)
    anneal = _get(s, "anneal_strategy", "cos")
    initial = max_lr / div
    minimum = initial / final_div
    if _get(s, "three_phase", False):
        phases = [
            (float(pct * total) - 1, initial, max_lr),
            (float(2 * pct * total) - 2, max_lr, initial),
            (total - 1, initial, minimum),
        ]
    else:
        phases = [(float(pct * total) - 1, initial, max_lr), (total - 1, max_lr, minimum)]

    def interp(start: float, end: float, p: float) -> float:
        if anneal == "linear":
            return (end - start) * p + start
        return end + (start - end) / 2.0 * (math.cos(math.pi * p) + 1)

    def f(step: int) -> float:
        start_step = 0.0
        for i, (end_step, lo, hi) in enumerate(phases):
            if step <= end_step or i == len(phases) - 1:
                return interp(lo, hi, (step - start_step) / (end_step - start_step))
            start_step = end_step
        raise AssertionError("unreachable")

    return f


def _constant(s: Any) -> LRFunction:
    value = float(_get(s, "initial_learning_rate"))
    return lambda step: value


_Builder = Callable[[Any, "int | None", "int | None"], LRFunction]


@dataclass(frozen=True)
class ScheduleInfo:
    """Registry record: a schedule's name, formula, origin, and how to build ``lr_at``."""

    name: str
    summary: str
    source: str
    build: _Builder


SCHEDULES: dict[str, ScheduleInfo] = {
    i.name: i
    for i in (
        ScheduleInfo("constant", "lr", "-", lambda s, spe, tot: _constant(s)),
        ScheduleInfo(
            "exponential", "lr * decay_rate ** (step / decay_steps), floored if staircase (step decay)",
            "Keras ExponentialDecay", lambda s, spe, tot: _exponential(s),
        ),
        ScheduleInfo(
            "step", "lr * gamma ** floor(t / step_size), t in epochs or steps", "torch StepLR",
            lambda s, spe, tot: _step(s, spe),
        ),
        ScheduleInfo(
            "multistep", "lr * gamma ** (number of milestones <= t)", "torch MultiStepLR",
            lambda s, spe, tot: _multistep(s, spe),
        ),
        ScheduleInfo(
            "polynomial", "(lr - end) * (1 - step / decay_steps) ** power + end", "Keras PolynomialDecay",
            lambda s, spe, tot: _polynomial(s),
        ),
        ScheduleInfo(
            "cosine", "cosine decay to alpha * lr over decay_steps", "Keras CosineDecay",
            lambda s, spe, tot: _cosine(s),
        ),
        ScheduleInfo(
            "cosine_restarts", "cosine decay with warm restarts (t_mul, m_mul, alpha)",
            "Keras CosineDecayRestarts", lambda s, spe, tot: _cosine_restarts(s),
        ),
        ScheduleInfo(
            "one_cycle", "1cycle policy: anneal up to max_lr, then down (learning rate only)",
            "torch OneCycleLR", lambda s, spe, tot: _one_cycle(s, tot),
        ),
        ScheduleInfo(
            "reduce_on_plateau", "constant lr, multiplied by factor when the monitor plateaus",
            "Keras ReduceLROnPlateau", lambda s, spe, tot: _constant(s),
        ),
    )
}


#: the parameter that makes each schedule grow without bound (blamed when its value overflows)
_GROWTH_FIELD = {"exponential": "decay_rate", "step": "gamma", "multistep": "gamma", "cosine_restarts": "m_mul"}


def _guarded(f: LRFunction, kind: str) -> LRFunction:
    """``f`` whose arithmetic failures (overflow, a math domain error, a division by an underflowed
    zero) and values that are not finite or exceed :data:`MAX_LEARNING_RATE` raise :class:`ScheduleError`
    naming the step and the parameter at fault."""
    field = _GROWTH_FIELD.get(kind)

    def lr_at(step: int) -> float:
        try:
            value = f(step)
        except ScheduleError:
            raise
        except (OverflowError, ValueError, ZeroDivisionError) as exc:
            raise ScheduleError(f"schedule {kind!r} cannot be evaluated at step {step} ({exc})", field) from None
        if not (math.isfinite(value) and abs(value) <= MAX_LEARNING_RATE):
            raise ScheduleError(f"schedule {kind!r} gives the learning rate {value!r} at step {step}; it must stay "
                                f"finite and at most {MAX_LEARNING_RATE:g}", field)
        return value

    return lr_at


def _warmup_bounds(s: Any) -> tuple[int, float]:
    steps = int(_get(s, "warmup_steps", 0) or 0)
    start = _get(s, "warmup_start_lr", 0.0) or 0.0
    if _get(s, "schedule") == "cosine" and _get(s, "warmup_target") is not None:
        # Keras CosineDecay: warm-up runs from initial_learning_rate to warmup_target.
        start = _get(s, "initial_learning_rate")
    return steps, float(start)


def make_lr_fn(
    learning_rate: float | Any, *, steps_per_epoch: int | None = None, total_steps: int | None = None
) -> LRFunction:
    """Return ``lr_at(step)`` for a number or a schedule object (dict or spec model).

    ``reduce_on_plateau`` gives its base rate here; the plateau factor is applied by the engine.
    ``steps_per_epoch`` is needed by epoch-counted schedules; ``total_steps`` by ``one_cycle``
    when the schedule does not set it.
    """
    if isinstance(learning_rate, int | float) and not isinstance(learning_rate, bool):
        value = float(learning_rate)
        return lambda step: value
    s = learning_rate
    kind = _get(s, "schedule")
    info = SCHEDULES.get(kind)
    if info is None:
        raise ScheduleError(f"unknown schedule {kind!r}; known: {', '.join(SCHEDULES)}")
    base = _guarded(info.build(s, steps_per_epoch, total_steps), kind)

    warm_steps, warm_start = _warmup_bounds(s)
    if warm_steps <= 0:
        return base
    target = base(0)

    def warmed(step: int) -> float:
        if step < warm_steps:
            return warm_start + (target - warm_start) * step / warm_steps
        return base(step - warm_steps)

    return warmed


def check_schedule(learning_rate: Any, *, steps: int, steps_per_epoch: int | None, total_steps: int | None) -> None:
    """Raise :class:`ScheduleError` if the schedule fails (overflows, leaves its domain, exceeds
    :data:`MAX_LEARNING_RATE`) at any of the steps ``0 .. steps-1`` a job will use. Warm-up is linear
    between bounded values, and after it every schedule's value and arithmetic are monotone in
    the step (exponential, step, multistep: a power of the step; cosine_restarts: the restart
    index and ``m_mul ** index``; polynomial, cosine, one_cycle stay between their end points), so
    evaluating the ends of the warm-up and of the run decides it in constant time."""
    if steps <= 0 or isinstance(learning_rate, int | float):
        return
    f = make_lr_fn(learning_rate, steps_per_epoch=steps_per_epoch, total_steps=total_steps)
    warm, _ = _warmup_bounds(learning_rate)
    for k in sorted({0, warm - 1, warm, steps - 1}):
        if 0 <= k < steps:
            f(k)


def preview_schedule(
    learning_rate: float | Any,
    steps: int,
    *,
    steps_per_epoch: int | None = None,
    total_steps: int | None = None,
    time_limit_s: float | None = None,
) -> list[float]:
    """The learning rate used at steps ``0 .. steps-1`` for a number or a schedule object as
    written in a spec (a dict is validated first). ``reduce_on_plateau`` previews its base rate,
    since the plateau depends on training. Each step costs O(log milestones); past
    ``time_limit_s`` it stops with a :class:`ScheduleError`."""
    if steps < 0:
        raise ScheduleError("steps must be >= 0")
    if isinstance(learning_rate, Mapping):
        from training.spec import parse_learning_rate

        learning_rate = parse_learning_rate(learning_rate)
    f = make_lr_fn(learning_rate, steps_per_epoch=steps_per_epoch, total_steps=total_steps or steps or None)
    if time_limit_s is None:
        return [f(k) for k in range(steps)]
    deadline = time.monotonic() + time_limit_s
    out: list[float] = []
    for start in range(0, steps, 4096):
        out += [f(k) for k in range(start, min(steps, start + 4096))]
        if time.monotonic() > deadline and len(out) < steps:
            raise ScheduleError(f"the preview took longer than {time_limit_s:g} s; ask for fewer steps")
    return out


def preview_json(
    learning_rate: Any, steps: int, steps_per_epoch: int | None, time_limit_s: float | None
) -> tuple[str, Any, Any]:
    """:func:`preview_schedule` for a worker process: plain values that pickle (exceptions with
    extra attributes do not): ``("ok", b'{"lr": [...]}', None)``, ``("schedule_error", msg,
    field)`` or ``("spec_error", errors, None)``. The JSON is built here too (200,000 floats)."""
    import json

    from training.spec import SpecError

    try:
        lr = preview_schedule(learning_rate, steps, steps_per_epoch=steps_per_epoch, time_limit_s=time_limit_s)
    except SpecError as exc:
        return "spec_error", exc.errors, None
    except ScheduleError as exc:
        return "schedule_error", str(exc), exc.field
    if not all(math.isfinite(v) for v in lr):
        return "schedule_error", "this schedule gives non-finite learning rates", None
    return "ok", json.dumps({"lr": lr}).encode(), None
