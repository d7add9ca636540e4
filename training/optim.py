"""Optimizers by Keras name, and gradient clipping.

Every optimizer spec carries ``formulas`` (see ``training/spec.py``):

- ``"keras"`` (the default): Keras 3's update, formula for formula (``docs/semantics.md``,
  Optimizers): Adam/AdamW add epsilon to the *uncorrected* ``sqrt(v)``, Adamax adds it outside the
  max, RMSprop and Adagrad inside the square root, Nadam uses ``u_t = beta_1*(1 - 0.5*0.96**t)``,
  SGD's and RMSprop's momentum buffers carry the learning rate, and ``weight_decay`` is decoupled in
  every optimizer (``w *= 1 - weight_decay * lr`` before the update).
  Each is written here op for op as Keras' torch backend computes it, with torch's multi-tensor
  (``_foreach``) ops and Keras' float32 step scalars (see :class:`_KerasForeach`).
- ``"torch"``: ``torch.optim``'s own optimizer, given the spec's values (``weight_decay`` is then
  torch's: coupled L2, decoupled for AdamW).

Clipping (``clipnorm`` per tensor, ``global_clipnorm``, ``clipvalue``; one at most) is Keras'; it
runs before the optimizer step, and so before the weight decay, as in Keras.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.optim import Optimizer


def operand(value: Any, like: list[Tensor]) -> Any:
    """A hyperparameter or step scalar as the ``_foreach`` ops take it. One run: a Python float
    (the op rounds it to the variables' dtype, as Keras' ops do). A pack of stacked trials
    (``training/fused.py``): a numpy array of per-trial values, given as one tensor per parameter
    shaped ``[N, 1, ...]`` so it broadcasts along the leading trial axis. Those tensors are
    made once per distinct value (a pack's betas, epsilon, ``1 - beta``... are the same every
    step; only the step-dependent scalars change): the ops only read them."""
    if isinstance(value, np.ndarray):
        key = (value.tobytes(), value.dtype.str, value.shape, *((p.dtype, p.device, p.dim()) for p in like))
        made = _OPERANDS.get(key)
        if made is None:
            if len(_OPERANDS) >= _OPERANDS_KEPT:
                _OPERANDS.clear()
            made = _OPERANDS[key] = [torch.as_tensor(value, dtype=p.dtype, device=p.device).view(-1, *([1] * (p.dim() - 1)))
                                     for p in like]
        return made
    return float(value)


#: per-trial operands made by :func:`operand`, by value (a bounded cache: cleared when full)
_OPERANDS: dict[tuple[Any, ...], list[Tensor]] = {}
_OPERANDS_KEPT = 256


def _any(a: Any) -> bool:
    """Whether a hyperparameter (a float, or per-trial values) is non-zero for some trial; not
    ``np.any``, which takes 2.7 us on a float, every step."""
    return bool(a.any() if isinstance(a, np.ndarray) else a)


def _axpy_(xs: list[Tensor], ys: list[Tensor], a: Any) -> None:
    """``xs += a * ys`` (``a``: a float, or per-trial values, see :func:`_k`)."""
    if isinstance(a, np.ndarray):
        torch._foreach_add_(xs, torch._foreach_mul(ys, operand(a, ys)))
    else:
        torch._foreach_add_(xs, ys, alpha=float(a))


#: a slot getter: ``slots(name, fill)`` gives the optimizer state tensors ``name`` (one per
#: parameter), created filled with ``fill`` (a float, or per-trial values) on first use
Slots = Callable[[str, Any], list[Tensor]]


def keras_step(update: Callable[..., None], slots: Slots, h: dict[str, Any], params: list[Tensor], grads: list[Tensor], t: Any) -> None:
    """One Keras 3 update of ``params``: decoupled weight decay (``w *= 1 - weight_decay * lr``),
    then ``update`` (one of the ``*_update`` functions below). The one home of the formulas: a
    solo run calls it with its param group (floats); a fused pack (``training/fused.py``) with
    numpy arrays of per-trial hyperparameters over stacked ``[N, ...]`` tensors. ``t``: the update's
    1-based count (an int, or per trial). Step scalars are computed in the variables' dtype
    (float32) as Keras computes them (see :class:`_KerasForeach`)."""
    ft = np.float64 if params[0].dtype == torch.float64 else np.float32  # Keras: the variables' dtype
    lr = ft(h["lr"])
    wd = h["weight_decay"]
    if _any(wd):
        torch._foreach_mul_(params, operand(1 - ft(wd) * lr, params))
    update(slots, h, params, grads, lr, t, ft)


def sgd_update(slots: Slots, h: dict[str, Any], params: list[Tensor], grads: list[Tensor], lr: Any, t: Any, ft: type[np.floating]) -> None:
    """``v = momentum * v - lr * g; w += v`` (nesterov: ``w += momentum * v - lr * g``)."""
    m, neg_lr = h["momentum"], -lr
    if not _any(m):
        _axpy_(params, grads, neg_lr)
        return
    velocity = slots("velocity", 0.0)
    torch._foreach_mul_(velocity, operand(m, velocity))
    _axpy_(velocity, grads, neg_lr)
    if h["nesterov"]:
        _axpy_(params, grads, neg_lr)
        _axpy_(params, velocity, m)
    else:
        torch._foreach_add_(params, velocity)


def adam_update(slots: Slots, h: dict[str, Any], params: list[Tensor], grads: list[Tensor], lr: Any, t: Any, ft: type[np.floating]) -> None:
    """Adam and AdamW: ``m = b1*m + (1-b1)*g; v = b2*v + (1-b2)*g²`` (amsgrad: ``v = max(v_hat, v)``);
    ``w -= lr*sqrt(1-b2**t)/(1-b1**t) * m / (sqrt(v) + eps)``: epsilon on the uncorrected sqrt(v)."""
    b1, b2 = h["beta_1"], h["beta_2"]
    alpha = lr * np.sqrt(1 - ft(b2) ** ft(t)) / (1 - ft(b1) ** ft(t))
    m, v = slots("m", 0.0), slots("v", 0.0)
    torch._foreach_mul_(m, operand(b1, m))
    _axpy_(m, grads, 1 - b1)
    torch._foreach_mul_(v, operand(b2, v))
    _axpy_(v, torch._foreach_mul(grads, grads), 1 - b2)
    if h["amsgrad"]:
        v_hat = slots("v_hat", 0.0)
        torch._foreach_maximum_(v_hat, v)
        v = v_hat
    update = torch._foreach_mul(m, operand(alpha, m))
    denominators = torch._foreach_sqrt(v)
    torch._foreach_add_(denominators, operand(h["epsilon"], denominators))
    torch._foreach_div_(update, denominators)
    torch._foreach_sub_(params, update)


def nadam_update(slots: Slots, h: dict[str, Any], params: list[Tensor], grads: list[Tensor], lr: Any, t: Any, ft: type[np.floating]) -> None:
    """``u_t = b1*(1 - 0.5*0.96**t)``, ``P_t = u_1*...*u_t`` (kept in ``h["u_product"]``); ``m``, ``v``
    as Adam; ``w -= lr * (u_{t+1}*m/(1-P_{t+1}) + (1-u_t)*g/(1-P_t)) / (sqrt(v/(1-b2**t)) + eps)``."""
    b1, b2 = h["beta_1"], h["beta_2"]
    decay, beta_1 = ft(0.96), ft(b1)
    u_t = beta_1 * (ft(1.0) - ft(0.5) * decay ** ft(t))
    u_t_1 = beta_1 * (ft(1.0) - ft(0.5) * decay ** ft(t + 1))
    u_product_t = ft(h["u_product"]) * u_t
    u_product_t_1 = u_product_t * u_t_1
    beta_2_power = ft(b2) ** ft(t)
    h["u_product"] = u_product_t.astype(np.float64) if isinstance(u_product_t, np.ndarray) else float(u_product_t)
    m, v = slots("m", 0.0), slots("v", 0.0)
    torch._foreach_mul_(m, operand(b1, m))
    _axpy_(m, grads, 1 - b1)
    torch._foreach_mul_(v, operand(b2, v))
    _axpy_(v, torch._foreach_mul(grads, grads), 1 - b2)
    m_hat = torch._foreach_mul(m, operand(u_t_1, m))
    torch._foreach_div_(m_hat, operand(1 - u_product_t_1, m))
    g_part = torch._foreach_mul(grads, operand(1 - u_t, grads))
    torch._foreach_div_(g_part, operand(1 - u_product_t, grads))
    torch._foreach_add_(m_hat, g_part)
    denominators = torch._foreach_div(v, operand(1 - beta_2_power, v))
    torch._foreach_sqrt_(denominators)
    torch._foreach_add_(denominators, operand(h["epsilon"], denominators))
    torch._foreach_mul_(m_hat, operand(lr, m_hat))
    torch._foreach_div_(m_hat, denominators)
    torch._foreach_sub_(params, m_hat)


def adamax_update(slots: Slots, h: dict[str, Any], params: list[Tensor], grads: list[Tensor], lr: Any, t: Any, ft: type[np.floating]) -> None:
    """``m = b1*m + (1-b1)*g; u = max(b2*u, |g|); w -= lr*m / ((u + eps) * (1 - b1**t))``."""
    b1, b2 = h["beta_1"], h["beta_2"]
    m, u = slots("m", 0.0), slots("u", 0.0)
    torch._foreach_mul_(m, operand(b1, m))
    _axpy_(m, grads, 1 - b1)
    torch._foreach_mul_(u, operand(b2, u))
    torch._foreach_maximum_(u, torch._foreach_abs(grads))
    denominators = torch._foreach_add(u, operand(h["epsilon"], u))
    torch._foreach_mul_(denominators, operand(1 - ft(b1) ** ft(t), u))
    update = torch._foreach_mul(m, operand(lr, m))
    torch._foreach_div_(update, denominators)
    torch._foreach_sub_(params, update)


def rmsprop_update(slots: Slots, h: dict[str, Any], params: list[Tensor], grads: list[Tensor], lr: Any, t: Any, ft: type[np.floating]) -> None:
    """``v = rho*v + (1-rho)*g²``; ``inc = lr*g / sqrt(v + eps)`` (centered: ``sqrt(v + eps - a²)``,
    ``a = rho*a + (1-rho)*g``); ``w -= inc``, or with momentum ``b = momentum*b + inc; w -= b``."""
    rho = h["rho"]
    velocities = slots("velocity", 0.0)
    torch._foreach_mul_(velocities, operand(rho, velocities))
    _axpy_(velocities, torch._foreach_mul(grads, grads), 1 - rho)
    denominators = torch._foreach_add(velocities, operand(h["epsilon"], velocities))
    if h["centered"]:
        average_grads = slots("average_gradient", 0.0)
        torch._foreach_mul_(average_grads, operand(rho, average_grads))
        _axpy_(average_grads, grads, 1 - rho)
        torch._foreach_sub_(denominators, torch._foreach_mul(average_grads, average_grads))
    torch._foreach_sqrt_(denominators)
    increments = torch._foreach_mul(grads, operand(lr, grads))
    torch._foreach_div_(increments, denominators)
    if _any(np.asarray(h["momentum"]) > 0):
        buffers = slots("momentum", 0.0)
        torch._foreach_mul_(buffers, operand(h["momentum"], buffers))
        torch._foreach_add_(buffers, increments)
        torch._foreach_sub_(params, buffers)
    else:
        torch._foreach_sub_(params, increments)


def adagrad_update(slots: Slots, h: dict[str, Any], params: list[Tensor], grads: list[Tensor], lr: Any, t: Any, ft: type[np.floating]) -> None:
    """``acc += g²; w -= lr*g / sqrt(acc + eps)``, ``acc`` starting at ``initial_accumulator_value``."""
    acc = slots("accumulator", h["initial_accumulator_value"])
    torch._foreach_add_(acc, torch._foreach_mul(grads, grads))
    denominators = torch._foreach_add(acc, operand(h["epsilon"], acc))
    torch._foreach_sqrt_(denominators)
    update = torch._foreach_mul(grads, operand(lr, grads))
    torch._foreach_div_(update, denominators)
    torch._foreach_sub_(params, update)


class _KerasForeach(Optimizer):
    """A Keras 3 update, written op for op as Keras' torch backend computes it
    (``keras/src/backend/torch/optimizers``): the same ``_foreach`` ops in the same order, and the
    step-dependent scalars (learning rate, ``beta**t``, bias corrections) in the variables' dtype
    (float32) as Keras computes them: ``np.float32`` arithmetic is IEEE-rounded like torch's, and
    numpy's float32 power is the same libm ``powf`` as torch's scalar ``pow``. ``1 - beta_2**t``
    loses digits in float32 at small t (1e-5 relative at t=1), so float64 scalars would already
    differ from Keras in the sixth digit; computed as Keras does, the weights agree bit for bit on
    CPU (tests/training/test_optim_keras.py).

    ``step``: take the parameters that have a gradient, count the update (``iterations``, Keras'
    counter, kept in the param group so it is saved with the optimizer state), and apply
    :func:`keras_step` with the class's ``update`` function (the formulas live in those functions,
    shared with fused packs)."""

    update: Callable[..., None]

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any]) -> None:
        super().__init__(params, defaults | {"iterations": 0})

    def _slots(self, params: list[Tensor], key: str, fill: float = 0.0) -> list[Tensor]:
        out = []
        for p in params:
            state = self.state[p]
            if key not in state:
                state[key] = torch.full_like(p, fill, memory_format=torch.preserve_format)
            out.append(state[key])
        return out

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            slots = lambda key, fill, params=params: self._slots(params, key, fill)  # noqa: E731
            keras_step(type(self).update, slots, group, params, [p.grad for p in params], group["iterations"] + 1)
            group["iterations"] += 1
        return loss


class KerasSGD(_KerasForeach):
    __doc__ = sgd_update.__doc__
    update = staticmethod(sgd_update)

    def __init__(self, params: Iterable[Any], lr: float, momentum: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0) -> None:
        super().__init__(params, {"lr": lr, "momentum": momentum, "nesterov": nesterov, "weight_decay": weight_decay})


class KerasAdam(_KerasForeach):
    __doc__ = adam_update.__doc__
    update = staticmethod(adam_update)

    def __init__(self, params: Iterable[Any], lr: float, beta_1: float, beta_2: float, epsilon: float, weight_decay: float, amsgrad: bool) -> None:
        super().__init__(params, {"lr": lr, "beta_1": beta_1, "beta_2": beta_2, "epsilon": epsilon, "weight_decay": weight_decay, "amsgrad": amsgrad})


class KerasNadam(_KerasForeach):
    __doc__ = nadam_update.__doc__
    update = staticmethod(nadam_update)

    def __init__(self, params: Iterable[Any], lr: float, beta_1: float, beta_2: float, epsilon: float, weight_decay: float) -> None:
        super().__init__(params, {"lr": lr, "beta_1": beta_1, "beta_2": beta_2, "epsilon": epsilon, "weight_decay": weight_decay, "u_product": 1.0})


class KerasAdamax(_KerasForeach):
    __doc__ = adamax_update.__doc__
    update = staticmethod(adamax_update)

    def __init__(self, params: Iterable[Any], lr: float, beta_1: float, beta_2: float, epsilon: float, weight_decay: float) -> None:
        super().__init__(params, {"lr": lr, "beta_1": beta_1, "beta_2": beta_2, "epsilon": epsilon, "weight_decay": weight_decay})


class KerasRMSprop(_KerasForeach):
    __doc__ = rmsprop_update.__doc__
    update = staticmethod(rmsprop_update)

    def __init__(self, params: Iterable[Any], lr: float, rho: float, epsilon: float, momentum: float, centered: bool, weight_decay: float) -> None:
        super().__init__(params, {"lr": lr, "rho": rho, "epsilon": epsilon, "momentum": momentum, "centered": centered, "weight_decay": weight_decay})


class KerasAdagrad(_KerasForeach):
    __doc__ = adagrad_update.__doc__
    update = staticmethod(adagrad_update)

    def __init__(self, params: Iterable[Any], lr: float, initial_accumulator_value: float, epsilon: float, weight_decay: float) -> None:
        super().__init__(params, {"lr": lr, "initial_accumulator_value": initial_accumulator_value, "epsilon": epsilon, "weight_decay": weight_decay})


@dataclass(frozen=True)
class OptimizerInfo:
    """Registry record: how to build the named optimizer from its spec model, per ``formulas``."""

    name: str
    summary: str
    build: dict[str, Callable[[list[torch.nn.Parameter], Any, float], Optimizer]]


def _wd(o: Any) -> float:
    return float(o.weight_decay or 0.0)


def _betas(o: Any) -> tuple[float, float]:
    return (o.beta_1, o.beta_2)


OPTIMIZERS: dict[str, OptimizerInfo] = {
    i.name: i
    for i in (
        OptimizerInfo("sgd", "SGD (momentum, nesterov)", {
            "keras": lambda p, o, lr: KerasSGD(p, lr, o.momentum, o.nesterov, _wd(o)),
            "torch": lambda p, o, lr: torch.optim.SGD(p, lr, momentum=o.momentum, nesterov=o.nesterov, weight_decay=_wd(o)),
        }),
        OptimizerInfo("adam", "Adam (amsgrad)", {
            "keras": lambda p, o, lr: KerasAdam(p, lr, o.beta_1, o.beta_2, o.epsilon, _wd(o), o.amsgrad),
            "torch": lambda p, o, lr: torch.optim.Adam(p, lr, betas=_betas(o), eps=o.epsilon, weight_decay=_wd(o), amsgrad=o.amsgrad),
        }),
        OptimizerInfo("adamw", "AdamW (decoupled weight decay)", {
            "keras": lambda p, o, lr: KerasAdam(p, lr, o.beta_1, o.beta_2, o.epsilon, _wd(o), o.amsgrad),
            "torch": lambda p, o, lr: torch.optim.AdamW(p, lr, betas=_betas(o), eps=o.epsilon, weight_decay=_wd(o), amsgrad=o.amsgrad),
        }),
        OptimizerInfo("nadam", "Nadam", {
            "keras": lambda p, o, lr: KerasNadam(p, lr, o.beta_1, o.beta_2, o.epsilon, _wd(o)),
            "torch": lambda p, o, lr: torch.optim.NAdam(p, lr, betas=_betas(o), eps=o.epsilon, weight_decay=_wd(o)),
        }),
        OptimizerInfo("radam", "RAdam (torch)", {
            "torch": lambda p, o, lr: torch.optim.RAdam(p, lr, betas=_betas(o), eps=o.epsilon, weight_decay=_wd(o)),
        }),
        OptimizerInfo("adamax", "Adamax", {
            "keras": lambda p, o, lr: KerasAdamax(p, lr, o.beta_1, o.beta_2, o.epsilon, _wd(o)),
            "torch": lambda p, o, lr: torch.optim.Adamax(p, lr, betas=_betas(o), eps=o.epsilon, weight_decay=_wd(o)),
        }),
        OptimizerInfo("rmsprop", "RMSprop (rho, momentum, centered)", {
            "keras": lambda p, o, lr: KerasRMSprop(p, lr, o.rho, o.epsilon, o.momentum, o.centered, _wd(o)),
            "torch": lambda p, o, lr: torch.optim.RMSprop(
                p, lr, alpha=o.rho, eps=o.epsilon, momentum=o.momentum, centered=o.centered, weight_decay=_wd(o)
            ),
        }),
        OptimizerInfo("adagrad", "Adagrad", {
            "keras": lambda p, o, lr: KerasAdagrad(p, lr, o.initial_accumulator_value, o.epsilon, _wd(o)),
            "torch": lambda p, o, lr: torch.optim.Adagrad(
                p, lr, initial_accumulator_value=o.initial_accumulator_value, eps=o.epsilon, weight_decay=_wd(o)
            ),
        }),
    )
}


def build_optimizer(params: list[torch.nn.Parameter], opt_spec: Any, lr: float) -> Optimizer:
    info = OPTIMIZERS.get(opt_spec.name)
    if info is None:
        raise ValueError(f"unknown optimizer {opt_spec.name!r}; known: {', '.join(OPTIMIZERS)}")
    build = info.build.get(opt_spec.formulas)
    if build is None:
        raise ValueError(f"optimizer {opt_spec.name!r} has no {opt_spec.formulas!r} formulas; known: {', '.join(info.build)}")
    return build(params, opt_spec, lr)


def clip_gradients(grads: list[Tensor], clipnorm: Any, global_clipnorm: Any, clipvalue: Any, stacked: bool = False) -> None:
    """Keras 3's gradient clipping, in place (one of the three; the others None). One run: floats,
    ``grads`` the model's gradients. A fused pack (``stacked``): ``grads`` shaped ``[N, ...]`` (the
    trials' gradients of each parameter), the values numpy arrays of per-trial values, and norms
    taken per trial."""
    if clipvalue is None and stacked:
        norms = [torch.linalg.vector_norm(g.flatten(1), dim=1).view(-1, *([1] * (g.dim() - 1))) for g in grads]
    elif clipvalue is None:
        norms = list(torch._foreach_norm(grads))
    if clipnorm is not None:
        # each tensor: g * clipnorm / max(||g||, clipnorm)
        c = operand(clipnorm, grads)
        torch._foreach_mul_(grads, c)
        torch._foreach_div_(grads, [torch.clamp(n, min=c if isinstance(c, float) else c[i]) for i, n in enumerate(norms)])
    elif global_clipnorm is not None:
        # all tensors: g * clipnorm * min(1/||G||, 1/clipnorm)
        if stacked:
            total = torch.linalg.vector_norm(torch.stack([n.flatten() for n in norms]), dim=0)
            gc = torch.as_tensor(global_clipnorm, dtype=total.dtype, device=total.device)
            factor = gc * torch.minimum(1.0 / total, 1.0 / gc)
            torch._foreach_mul_(grads, [factor.view(-1, *([1] * (g.dim() - 1))) for g in grads])
        else:
            total = torch.linalg.vector_norm(torch.stack(norms))
            torch._foreach_mul_(grads, global_clipnorm * torch.clamp(1.0 / total, max=1.0 / global_clipnorm))
    else:
        torch._foreach_clamp_min_(grads, operand(-np.asarray(clipvalue) if stacked else -clipvalue, grads))
        torch._foreach_clamp_max_(grads, operand(clipvalue, grads))


def make_clipper(params: list[torch.nn.Parameter], opt_spec: Any) -> Callable[[], None] | None:
    """Gradient clipping as Keras 3 applies it (:func:`clip_gradients`), or None when the spec asks for none."""
    clipnorm, clipvalue, global_clipnorm = opt_spec.clipnorm, opt_spec.clipvalue, opt_spec.global_clipnorm
    if clipnorm is None and clipvalue is None and global_clipnorm is None:
        return None

    @torch.no_grad()
    def clip() -> None:
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            clip_gradients(grads, clipnorm, global_clipnorm, clipvalue)

    return clip
