"""Trials of the same shape trained together as one fused model (issue 13).

``fit_fused(specs)`` trains N job specs whose models have the same shapes (same layers and sizes,
batch size, dataset and optimizer) as one model: every weight is stacked along a leading trial
axis, each dense layer is one batched matmul (``baddbmm``), and one backward pass gives every
trial its own gradient (the trials' losses are summed; their parameters are disjoint, so each
trial's gradient is exactly its own). For dense/dropout/relu-tanh-sigmoid packs with
cross-entropy on logits that pass is written out (``_Pack.backward``: torch's own backward
kernels in autograd's order, bit for bit autograd's gradients, without a graph per step); other
packs use autograd. Everything a trial owns stays its own:

- its set-up is the engine's own: each member is a ``training.engine._Run`` built from its spec
  exactly as ``fit`` builds it (data split, seeding, initial weights, batch-order generator,
  objective, learning-rate function, callbacks), so initial weights and data order equal the solo
  run's;
- its hyperparameters are per-trial tensors broadcast over the trial axis (learning rate per step
  from the member's own schedule and plateau state, optimizer hyperparameters, L1/L2 kernel, bias
  and activity penalties, dropout rate, label smoothing);
- its epoch end is the engine's own (``_Run._end_epoch``: validation, plateau, early stopping,
  checkpoints, history, reporter, stop requests), run on the member's model after the fused
  weights are copied back into it, and its result is ``_Run.result``;
- its life: a member that stops (early stopping, non-finite loss, ``max_steps``, its own epoch
  count, cancel through its ``should_stop``, a reporter's ``stop_request``) leaves the pack, whose
  tensors are compacted; the others go on. So does a member whose reporter or ``should_stop``
  raises one of the caller's ``isolate`` exceptions (the worker's ``LeaseLost``: another attempt
  owns that job): its result says ``stop_reason == "lost"`` and ``info["pack"]["lost"]`` what
  was raised.

What is fused exactly (same numbers as the solo run up to float32 rounding of the batched
kernels): dense/dropout/activation models in fp32 (:func:`why_not_fused`), with every optimizer
the spec offers. The optimizer math has one home, ``training.optim``: Keras formulas run the same
update functions (``keras_step`` and ``sgd_update``, ``adam_update``, ...) on the stacked weights
with per-trial hyperparameters; torch formulas run each member's own ``torch.optim`` optimizer on
its row of the stacked weights. Gradient clipping is ``training.optim.clip_gradients`` with
per-trial norms. Anything else (other layers, precision, ``torch.compile``, learning rate
``find``) falls back to solo ``fit`` runs, one after another, with the reason in
``info["pack"]["fallback"]``, so a fused trial never computes something different from its solo run.
Dropout is fused with each trial's own rate, but its masks are drawn for the pack (not from each
trial's own RNG stream): with dropout on, a fused trial is statistically, not bitwise, the solo run.
Snapshots are the engine's own, per member (``_Run._end_epoch``, after the member's weights and
optimizer state are written back into its own model and optimizer): a member resumes from its
snapshot alone (``fit(resume_from=...)``) or in a pack (``fit_fused(..., resume_from=[...])``,
each member restored by ``_Run.restore`` as its solo resume is, at its own epoch), and goes on as
its solo run would. A member whose snapshot cannot be restored (another spec's, an incompatible
state) trains none and ends alone: its result's stop reason is ``RESUME_FAILED`` and its ``error``
what its solo ``fit(resume_from=...)`` raises; the others train.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.engine import (
    VAL_CHUNK,
    _actionable_errors,
    _deterministic,
    _Run,
    finish_logs,
    fit,
    read_sums,
    resolve_device,
)
from training.optim import _KerasForeach, clip_gradients, keras_step, operand
from training.reporting import FitResult, Reporter
from training.spec import FIND, JobSpec, validate_spec
from training.threads import step_threads

#: layer types a fused model can hold (the rest fall back to solo runs)
FUSED_LAYERS = frozenset({"dense", "dropout", "activation"})

#: the stop reason of a member whose reporter or ``should_stop`` raised one of ``fit_fused``'s
#: ``isolate`` exceptions: it left the pack, and its result is not the caller's to record
LOST = "lost"

#: the stop reason of a member whose snapshot (``fit_fused``'s ``resume_from``) could not be
#: restored: it trained none, and its result's ``error`` is what its solo resume raises
RESUME_FAILED = "resume_failed"


#: activation modules whose backward :meth:`_Pack.backward` runs from their output: the kernel
#: autograd runs for them (``threshold_backward`` for relu, ``tanh_backward``, ``sigmoid_backward``)
_OUTPUT_GRADS: dict[type[nn.Module], Callable[[Tensor, Tensor], Tensor]] = {
    nn.ReLU: lambda g, y: torch.ops.aten.threshold_backward(g, y, 0),
    nn.Tanh: torch.ops.aten.tanh_backward,
    nn.Sigmoid: torch.ops.aten.sigmoid_backward,
}


def pack_key(job: JobSpec) -> str:
    """What must be equal for trials to share one fused model: layer types and sizes, data,
    loss family, metrics, optimizer family, device and numerics. Everything else is per trial."""
    layers = []
    for layer in job.model.layers:
        d = layer.model_dump(mode="json")
        keep = {k: d[k] for k in ("type", "units", "use_bias", "activation") if k in d}
        layers.append(keep)
    opt = job.optimizer
    key = {
        "layers": layers,
        "data": job.data.model_dump(mode="json"),
        "loss": (job.loss.name, job.loss.from_logits),
        "metrics": [m.model_dump(mode="json") for m in job.metrics],
        "optimizer": (opt.name, opt.formulas, getattr(opt, "nesterov", None), getattr(opt, "amsgrad", None), getattr(opt, "centered", None)),
        "clipping": _clip_kind(job),
        "device": job.device,
        "precision": job.precision,
        "deterministic": job.deterministic,
    }
    import json

    return json.dumps(key, sort_keys=True)


def member_cost(job: JobSpec, input_shape: Sequence[int]) -> int:
    """What one trial adds to a pack, in floats: its parameters plus one batch of its layers'
    outputs (the activations kept for the backward pass). A pack's members sum to at most
    ``TRAINYARD_PACK_MAX_PARAMS``."""
    from training.shapes import count_parameters, infer_shapes

    shapes = infer_shapes(job.model, tuple(input_shape))
    return count_parameters(job.model, tuple(input_shape)) + job.data.batch_size * sum(math.prod(s) for s in shapes)


def _clip_kind(job: JobSpec) -> str | None:
    """Which of Keras' three clippings the trial asks for (its value may differ per trial)."""
    return next((k for k in _CLIPS if getattr(job.optimizer, k) is not None), None)


_CLIPS = ("clipnorm", "global_clipnorm", "clipvalue")


def why_not_fused(jobs: Sequence[JobSpec]) -> str | None:
    """None when these specs can train as one fused model, else the reason they cannot."""
    if len(jobs) < 2:
        return "a pack needs at least two trials"
    first = pack_key(jobs[0])
    for i, job in enumerate(jobs):
        if job.kind != "train":
            return f"trial {i} is of kind {job.kind!r}"
        if job.compile:
            return f"trial {i} asks for torch.compile"
        if job.precision != "fp32":
            return f"trial {i} uses precision {job.precision!r} (fused: fp32 only)"
        if job.optimizer.learning_rate == FIND:
            return f"trial {i} uses learning_rate 'find'"
        bad = [layer.type for layer in job.model.layers if layer.type not in FUSED_LAYERS]
        if bad:
            return f"trial {i} has layers {sorted(set(bad))} (fused: {sorted(FUSED_LAYERS)})"
        if pack_key(job) != first:
            return f"trial {i} differs from trial 0 in shape, data, loss family, metrics, optimizer family (name, formulas, nesterov, amsgrad, centered), clipping kind or device"
    return None


# --------------------------------------------------------------------------- optimizers


def _col(values: Sequence[float], like: Tensor) -> Tensor:
    return torch.tensor(list(values), dtype=like.dtype, device=like.device)


def _bcast(v: Tensor, p: Tensor) -> Tensor:
    return v.view(-1, *([1] * (p.dim() - 1)))


def _member_state(opt: torch.optim.Optimizer, key: str) -> Tensor | None:
    """A member optimizer's state ``key`` over all its parameters as one flat row (in the pack's
    parameter order), or None when it has none yet (a fresh run; a resumed one has)."""
    params = opt.param_groups[0]["params"]
    parts = [opt.state.get(p, {}).get(key) for p in params]
    if any(not isinstance(x, Tensor) for x in parts):
        return None
    return torch.cat([x.flatten() for x in parts])


class _StackedKeras:
    """The Keras optimizers of ``training.optim`` for a whole pack: the same update functions
    (``training.optim.keras_step`` and the class's ``update``), given the stacked ``[N, P]`` weights
    and each trial's hyperparameters as numpy arrays (broadcast along the trial axis by
    ``training.optim.operand``). Flags (nesterov, amsgrad, centered) are equal in a pack (see
    :func:`_shape_key`)."""

    def __init__(self, params: list[Tensor], optimizers: list[torch.optim.Optimizer]) -> None:
        self.params = params
        self.update = type(optimizers[0]).update  # type: ignore[attr-defined]
        self.optimizers = optimizers
        groups = [o.param_groups[0] for o in optimizers]
        self.h: dict[str, Any] = {}
        for key, value in groups[0].items():
            if key in ("params", "iterations"):
                continue
            self.h[key] = value if isinstance(value, bool) else np.array([float(g[key] or 0.0) for g in groups])
        self.t = np.array([g["iterations"] for g in groups])
        self.state: dict[str, list[Tensor]] = {}

    def slots(self, key: str, fill: Any) -> list[Tensor]:
        """The stacked state ``key``, made on first use: each row is its member's own state when it
        has one (a member resumed from a snapshot), else ``fill`` (a fresh member, as its solo
        run's optimizer fills it); a pack may mix both."""
        if key not in self.state:
            p = self.params[0]
            stacked = torch.full_like(p, fill) if isinstance(fill, float) else torch.zeros_like(p).add_(operand(fill, [p])[0])
            with torch.no_grad():
                for k, o in enumerate(self.optimizers):
                    row = _member_state(o, key)
                    if row is not None:
                        stacked[k].copy_(row)
            self.state[key] = [stacked]
        return self.state[key]

    def step(self, grads: list[Tensor], lrs: list[float]) -> None:
        self.h["lr"] = np.array(lrs)
        t = self.t + 1
        with torch.no_grad():
            keras_step(self.update, self.slots, self.h, self.params, grads, t)
        self.t = t

    def write_back(self, slot: int, opt: torch.optim.Optimizer) -> None:
        """Give the member's own optimizer its state (slots, update count, Nadam's ``u_product``,
        the rate) so that a snapshot of the member saves what a solo run's would."""
        group = opt.param_groups[0]
        group["iterations"] = int(self.t[slot])
        for key in ("lr", "u_product"):
            if isinstance(self.h.get(key), np.ndarray):
                group[key] = float(self.h[key][slot])
        params = group["params"]
        for key, (stacked,) in self.state.items():
            row, off = stacked[slot], 0
            for p in params:
                n = p.numel()
                opt.state[p][key] = row[off : off + n].view_as(p).clone()
                off += n

    def keep(self, idx: Tensor, keep_list: list[int], params: list[Tensor]) -> None:
        """Drop the trials not in ``idx`` (pack compaction)."""
        self.params = params
        self.optimizers = [self.optimizers[i] for i in keep_list]
        self.h = {k: v[keep_list] if isinstance(v, np.ndarray) else v for k, v in self.h.items()}
        self.t = self.t[keep_list]
        self.state = {k: [s.index_select(0, idx) for s in v] for k, v in self.state.items()}


class _MemberOptimizers:
    """``"formulas": "torch"`` (torch.optim's own classes): each member's own optimizer, built by
    the engine from its spec over its own model's parameters, steps them with the member's row of
    the pack's gradient; the updated weights are copied back into the pack's row. The optimizer is
    the solo run's, state and all (a snapshot of the member saves it as the solo run does)."""

    def __init__(self, params: list[Tensor], optimizers: list[torch.optim.Optimizer]) -> None:
        self.flat = params[0]
        self.optimizers = optimizers

    def step(self, grads: list[Tensor], lrs: list[float]) -> None:
        (grad,) = grads
        with torch.no_grad():
            for k, opt in enumerate(self.optimizers):
                group = opt.param_groups[0]
                group["lr"] = lrs[k]
                off = 0
                for p in group["params"]:
                    n = p.numel()
                    p.grad = grad[k, off : off + n].view_as(p)
                    off += n
                opt.step()
                torch.cat([p.detach().flatten() for p in group["params"]], out=self.flat[k])
                for p in group["params"]:
                    p.grad = None

    def keep(self, idx: Tensor, keep_list: list[int], params: list[Tensor]) -> None:
        self.flat = params[0]
        self.optimizers = [self.optimizers[i] for i in keep_list]

    def write_back(self, slot: int, opt: torch.optim.Optimizer) -> None:
        """Nothing to do: the member's optimizer holds its own state."""


def _fused_optimizer_for(opt: torch.optim.Optimizer) -> type[_StackedKeras] | type[_MemberOptimizers]:
    """Keras formulas: the stacked form of the same update functions; torch formulas: each
    member's own torch.optim optimizer on its row."""
    return _StackedKeras if isinstance(opt, _KerasForeach) else _MemberOptimizers


# --------------------------------------------------------------------------- the pack


class _Pack:
    """The fused state of the live members: stacked parameters, data, optimizer, penalties."""

    def __init__(self, members: list[_Run], opt_cls: type[_StackedKeras] | type[_MemberOptimizers],
                 isolate: tuple[type[BaseException], ...] = (),
                 on_epoch_logs: Callable[[list[tuple[int, dict[str, float]]]], None] | None = None) -> None:
        self.members = members
        self.on_epoch_logs = on_epoch_logs
        self.live = list(range(len(members)))
        self.isolate = isolate
        self.lost: dict[int, str] = {}  # member index -> what its reporter or should_stop raised
        lead = members[0]
        self.device = lead.device
        self.names = [n for n, p in lead.model.named_parameters() if p.requires_grad]
        # each member's own parameters, in self.names order (:meth:`sync` copies its row into them)
        self.own = [[m.model.get_parameter(n) for n in self.names] for m in members]
        stacked = [torch.stack([own[j].detach() for own in self.own]) for j in range(len(self.names))]
        self.shapes = [t.shape[1:] for t in stacked]
        # every weight of a trial in one row: the optimizer updates one (trials, parameters) tensor
        self.flat = torch.cat([t.flatten(1) for t in stacked], 1).contiguous()
        self.params = self.leaves()
        self.x = torch.stack([m.x_train for m in members])
        self.y = torch.stack([m.y_train for m in members])
        self.same_target = lead.t_train is lead.y_train
        self.t = self.y if self.same_target else torch.stack([m.t_train for m in members])
        # the validation splits (each trial's own: the split follows its seed), validated as one
        self.xv = torch.stack([m.x_val for m in members])
        self.yv = torch.stack([m.y_val for m in members])
        self.tv = self.yv if self.same_target else torch.stack([m.t_val for m in members])
        self.opt = opt_cls([self.flat], [m.optimizer for m in members])
        self.clip_kind = _clip_kind(lead.spec)
        self.modules = list(lead.model.named_children())
        # kernel/bias penalties per parameter: (l1, l2) columns over trials
        self.reg: list[tuple[int, Tensor | None, Tensor | None]] = []
        self.activity: dict[str, tuple[Tensor, Tensor]] = {}
        self.dropout: dict[str, tuple[Tensor, Tensor]] = {}
        self._build_hyper()
        # objectives: trials with the same loss settings share one vmapped loss; cross-entropy on
        # logits is one function whatever the settings (smoothing is in its targets)
        groups: dict[str, list[int]] = {}
        for k, m in enumerate(members):
            same = "cross_entropy" if m.objective.loss is F.cross_entropy else m.spec.loss.model_dump_json()
            groups.setdefault(same, []).append(k)
        self.loss_groups = list(groups.values())
        self.metric_names = list(lead.objective.metrics)
        self.by_hand = self._by_hand()

    def _by_hand(self) -> bool:
        """Whether a training step's gradients can be computed by :meth:`backward` (torch's own
        backward kernels, called as autograd calls them, without building a graph): dense,
        dropout and relu/tanh/sigmoid/linear activation layers, no activity regularizer, and
        cross-entropy on logits (``F.cross_entropy``: sparse labels, or one-hot targets smoothed or
        not) for every trial. Anything else: autograd."""
        layers_ok = all(type(mod) in (nn.Linear, nn.Dropout, nn.Identity) or type(mod) in _OUTPUT_GRADS
                        for _, mod in self.modules)
        has_dense = any(isinstance(mod, nn.Linear) for _, mod in self.modules)
        return (layers_ok and has_dense and not self.activity and len(self.loss_groups) == 1
                and self.members[self.live[0]].objective.loss is F.cross_entropy)

    def _build_hyper(self) -> None:
        members = [self.members[i] for i in self.live]
        like = self.params[0]
        self.reg = []
        for j, name in enumerate(self.names):
            layer_i, kind = name.split(".")
            attr = "kernel_regularizer" if kind == "weight" else "bias_regularizer"
            regs = [getattr(m.spec.model.layers[int(layer_i)], attr, None) for m in members]
            l1 = [r.l1 if r else 0.0 for r in regs]
            l2 = [r.l2 if r else 0.0 for r in regs]
            self.reg.append((j, _col(l1, like) if any(l1) else None, _col(l2, like) if any(l2) else None))
        self.activity = {}
        self.dropout = {}
        for mod_name, mod in self.modules:
            layer_i = int(mod_name.split("_")[0])
            if mod._forward_hooks or any(m.model.get_submodule(mod_name)._forward_hooks for m in members):
                regs = [self._activity_reg(m, layer_i, mod_name) for m in members]
                self.activity[mod_name] = (_col([r[0] for r in regs], like), _col([r[1] for r in regs], like))
            if isinstance(mod, nn.Dropout):
                rates = [m.spec.model.layers[layer_i].rate for m in members]
                if any(rates):
                    # (rate, 1 / (1 - rate)) per trial: torch's inverted dropout scales the kept
                    # units by the reciprocal (its mask is bernoulli(1 - p) / (1 - p))
                    self.dropout[mod_name] = (_col(rates, like), _col([1 / (1 - r) for r in rates], like))

    @staticmethod
    def _activity_reg(m: _Run, layer_i: int, mod_name: str) -> tuple[float, float]:
        if not m.model.get_submodule(mod_name)._forward_hooks:
            return (0.0, 0.0)
        r = m.spec.model.layers[layer_i].activity_regularizer
        return (r.l1, r.l2) if r else (0.0, 0.0)

    def drop(self, gone: list[int]) -> None:
        """Remove pack slots ``gone`` (positions in ``self.live``)."""
        keep_list = [i for i in range(len(self.live)) if i not in gone]
        if not keep_list:
            self.live = []
            return
        idx = torch.tensor(keep_list, device=self.device, dtype=torch.long)
        self.flat = self.flat.detach().index_select(0, idx).contiguous()
        self.params = self.leaves()
        self.x, self.y = self.x.index_select(0, idx), self.y.index_select(0, idx)
        self.t = self.y if self.same_target else self.t.index_select(0, idx)
        self.xv, self.yv = self.xv.index_select(0, idx), self.yv.index_select(0, idx)
        self.tv = self.yv if self.same_target else self.tv.index_select(0, idx)
        self.opt.keep(idx, keep_list, [self.flat])
        self.live = [self.live[i] for i in keep_list]
        remap = {old: new for new, old in enumerate(keep_list)}
        self.loss_groups = [[remap[k] for k in g if k in remap] for g in self.loss_groups]
        self.loss_groups = [g for g in self.loss_groups if g]
        self._build_hyper()
        self.by_hand = self._by_hand()

    def leaves(self) -> list[Tensor]:
        """The parameters the forward pass differentiates: each a leaf sharing the flat tensor's
        memory (the optimizer's in-place update of the flat tensor is theirs), so the backward pass
        gives one gradient per parameter, not one flat-sized gradient per slice."""
        return [v.detach().requires_grad_() for v in self.views(self.flat)]

    def views(self, flat: Tensor) -> list[Tensor]:
        """Each parameter, stacked over trials, as a view of the flat tensor."""
        out, start = [], 0
        for shape in self.shapes:
            n = math.prod(shape)
            out.append(flat[:, start : start + n].view(flat.shape[0], *shape))
            start += n
        return out

    def call(self, i: int, fn: Callable[..., Any], *args: Any) -> bool:
        """Run member ``i``'s ``fn`` (one that reaches its reporter or ``should_stop``); False if it
        raised one of ``isolate``: the member is lost (stop reason ``LOST``) and must leave."""
        try:
            fn(*args)
            return True
        except self.isolate as exc:
            self._lose(i, exc)
            return False

    def poll(self, i: int) -> bool | None:
        """Member ``i``'s cancel poll: True (cancelled), False, or None (lost, see :meth:`call`)."""
        try:
            return bool(self.members[i]._poll_cancel())
        except self.isolate as exc:
            self._lose(i, exc)
            return None

    def _lose(self, i: int, exc: BaseException) -> None:
        self.members[i].stop_reason = LOST
        self.lost[i] = f"{type(exc).__name__}: {exc}"

    def sync(self, slot: int) -> None:
        """Copy slot's fused weights into its member's own model."""
        m = self.members[self.live[slot]]
        with torch.no_grad():
            torch._foreach_copy_(self.own[self.live[slot]], [p[slot] for p in self.params])
        self.opt.write_back(slot, m.optimizer)

    @torch.no_grad()
    def validate(self) -> list[dict[str, float]]:
        """Every live trial's validation logs (``val_loss``, ``val_<metric>``), from one pass of
        the fused model in eval mode over the stacked validation splits: the numbers of
        ``training.engine.evaluate_model`` on each trial's own model (same chunks of ``VAL_CHUNK``
        rows, penalties per chunk, sums in float32), so ``_Run._end_epoch`` takes them as its own."""
        lead = self.members[self.live[0]]
        n = lead.n_val
        if n == 0:
            return [{} for _ in self.live]
        obj = lead.objective
        loss_sum = torch.zeros(len(self.live), device=self.device)
        sums = {k: torch.zeros(len(self.live), device=self.device) for k in obj.metrics}
        metric_fns = _per_trial_metrics(obj)
        for start in range(0, n, VAL_CHUNK):
            xb = self.xv[:, start : start + VAL_CHUNK]
            yb, tb = self.yv[:, start : start + VAL_CHUNK], self.tv[:, start : start + VAL_CHUNK]
            out, penalty = self.forward(self.params, xb, training=False)
            loss = self.losses(out, tb)
            if penalty is not None:
                loss = loss + penalty
            loss_sum += loss.float() * xb.shape[1]
            out = out.float()
            for k, fn in metric_fns:
                sums[k] += fn(out, yb, tb)
        return [{f"val_{k}": v for k, v in finish_logs(obj, row, n).items()} for row in read_sums(loss_sum, sums)]

    def forward(self, params: list[Tensor], xb: Tensor, training: bool = True,
                tape: list[tuple[Any, ...]] | None = None) -> tuple[Tensor, Tensor | None]:
        """Outputs ``(L, B, ...)`` and the per-trial penalty ``(L,)`` of this pass (``training``:
        dropout on). ``tape``: a list that gets what :meth:`backward` needs of each layer (the
        pass then runs without autograd: see :meth:`train_pass`)."""
        by_name = dict(zip(self.names, params, strict=True))
        h = xb
        penalty: Tensor | None = None
        for mod_name, mod in self.modules:
            if isinstance(mod, nn.Linear):
                if tape is not None:
                    tape.append(("dense", mod_name, h))
                w = by_name[f"{mod_name}.weight"].transpose(1, 2)
                b = by_name.get(f"{mod_name}.bias")
                h = torch.bmm(h, w) if b is None else torch.baddbmm(b.unsqueeze(1), h, w)
            elif isinstance(mod, nn.Dropout):
                rates = self.dropout.get(mod_name)
                if rates is not None and training:
                    with torch.no_grad():  # the mask, scaled: one multiply forward and backward
                        scale = torch.rand_like(h).ge_(_bcast(rates[0], h)).mul_(_bcast(rates[1], h))
                    h = h * scale
                    if tape is not None:
                        tape.append(("scale", scale, None))
            else:
                h = mod.forward(h)  # not mod(h): the lead member's activity hooks must not fire
                grad_of = _OUTPUT_GRADS.get(type(mod))
                if tape is not None and grad_of is not None:
                    tape.append(("activation", grad_of, h))
            act = self.activity.get(mod_name)
            if act is not None:
                out = h.float()
                l1, l2 = act
                term = (l1 * out.abs().flatten(1).sum(1) + l2 * out.square().flatten(1).sum(1)) / h.shape[1]
                penalty = term if penalty is None else penalty + term
        for j, l1, l2 in self.reg:
            p = params[j].flatten(1)
            if l1 is not None:
                term = l1 * p.abs().sum(1)
                penalty = term if penalty is None else penalty + term
            if l2 is not None:
                term = l2 * p.square().sum(1)
                penalty = term if penalty is None else penalty + term
        return h, penalty

    def losses(self, out: Tensor, tb: Tensor) -> Tensor:
        parts = []
        order = []
        for g in self.loss_groups:
            member = self.members[self.live[g[0]]]
            if len(g) == len(self.live):
                o, t = out, tb
            else:
                idx = torch.tensor(g, device=self.device)
                o, t = out.index_select(0, idx), tb.index_select(0, idx)
            parts.append(_stacked_loss(member.objective.loss, o, t))
            order.extend(g)
        if len(parts) == 1:
            return parts[0]
        cat = torch.cat(parts)
        inv = torch.empty(len(order), dtype=torch.long, device=self.device)
        inv[torch.tensor(order, device=self.device)] = torch.arange(len(order), device=self.device)
        return cat.index_select(0, inv)

    def train_pass(self, params: list[Tensor], xb: Tensor, tb: Tensor) -> tuple[Tensor, Tensor, Callable[[], list[Tensor]]]:
        """A training step's forward pass: the outputs, each trial's loss (penalties included)
        and a function that gives the gradients of the summed losses, one per parameter (in
        ``self.names`` order): :meth:`backward` when :meth:`_by_hand` allows, else autograd's.

        By hand is the same arithmetic as autograd's (the same backward kernels on the same
        tensors), without the graph: for a small pack most of a step is per-op overhead, and the
        graph's share of it goes (digits MLP, a pack of one: 15.7-16.2 -> 12.3-14.8 ms per epoch,
        BENCHMARKS.md "Gradients by hand")."""
        if not self.by_hand:
            out, penalty = self.forward(params, xb)
            losses = self.losses(out, tb)
            if penalty is not None:
                losses = losses + penalty
            return out, losses, lambda: list(torch.autograd.grad(losses.sum(), params))
        tape: list[tuple[Any, ...]] = []
        with torch.no_grad():
            out, penalty = self.forward(params, xb, tape=tape)
            log_probs = _ce_log_probs(out)
            losses = _ce_losses(log_probs, tb, out.shape)
            if penalty is not None:
                losses = losses + penalty
        return out, losses, lambda: self.backward(params, tape, log_probs, tb, out.shape)

    @torch.no_grad()
    def backward(self, params: list[Tensor], tape: list[tuple[Any, ...]], log_probs: Tensor, tb: Tensor,
                 shape: torch.Size) -> list[Tensor]:
        """The gradients of the summed per-trial losses of :meth:`train_pass`'s pass (``tape``:
        its layers' inputs, dropout scales and activation outputs; ``log_probs``: the
        cross-entropy's, as :func:`_ce_log_probs` lays them out), as autograd computes them:
        mean, nll_loss (or the soft targets' product) and log_softmax backward, then each layer
        in reverse (``baddbmm``'s backward, the dropout scale, the activation's own backward
        kernel), then the kernel/bias penalties' ``l1 * sgn(w) + l2 * 2w`` added to theirs."""
        n_trials, batch = shape[0], shape[1]
        g_mean = torch.ones(n_trials * batch, dtype=log_probs.dtype, device=log_probs.device).div_(batch)
        logp = log_probs.t()
        t = tb.flatten(0, 1)
        if t.dim() == 1:
            g_logp = torch.ops.aten.nll_loss_backward(g_mean, logp, t, None, 0, -100, g_mean.new_ones(()))
        else:  # -(t * logp).sum(-1)
            g_logp = g_mean.neg().unsqueeze(1).expand_as(t) * t
        g = torch.ops.aten._log_softmax_backward_data(g_logp.t(), log_probs, 0, log_probs.dtype).t().reshape(shape)
        by_name = dict(zip(self.names, params, strict=True))
        grads: dict[str, Tensor] = {}
        first_dense = next(k for k, rec in enumerate(tape) if rec[0] == "dense")
        for k in range(len(tape) - 1, -1, -1):
            kind, a, b = tape[k]
            if kind == "dense":
                weight, bias = f"{a}.weight", f"{a}.bias"
                if bias in by_name:
                    grads[bias] = g.sum(1)
                grads[weight] = b.transpose(1, 2).bmm(g).transpose(1, 2)
                if k > first_dense:  # the first dense layer's input needs no gradient
                    g = g.bmm(by_name[weight])
            elif kind == "scale":
                g = g * a
            else:
                g = a(g, b)
        for j, l1, l2 in self.reg:
            p = params[j]
            terms = []
            if l1 is not None:
                terms.append(_bcast(l1, p) * p.sgn())
            if l2 is not None:
                terms.append(_bcast(l2, p) * (2.0 * p))
            if terms:
                name = self.names[j]
                grads[name] = grads[name] + (terms[0] if len(terms) == 1 else terms[0] + terms[1])
        return [grads[n] for n in self.names]


def _rows(t: Tensor, idx: Tensor) -> Tensor:
    """Rows ``idx`` (numbers into ``t``'s first two axes flattened) of ``t`` ``(L, n, ...)``, as
    ``(L, len(idx) // L, ...)``."""
    return t.flatten(0, 1).index_select(0, idx).view(t.shape[0], -1, *t.shape[2:])


def _flat_rows(perms: Tensor, n: int) -> Tensor:
    """Each trial's order ``perms`` ``(L, n)`` as row numbers into its stacked data flattened over
    the first two axes (row ``k`` of trial ``l`` is ``l * n + k``), for :func:`_rows`."""
    return perms + torch.arange(0, perms.shape[0] * n, n, device=perms.device).unsqueeze(1)


def _per_trial_metrics(obj: Any) -> list[tuple[str, Callable[[Tensor, Tensor, Tensor], Tensor]]]:
    """Each metric as ``(out, labels, target) -> (L,)`` sums over stacked ``(L, B, ...)`` tensors:
    the objective's per-sample values summed over the batch axis (``vmap`` of the per-batch sum,
    a few times slower, for a metric without them)."""
    out = []
    for k, fn in obj.metrics.items():
        each = obj.per_sample.get(k)
        out.append((k, torch.func.vmap(fn) if each is None else _summed_per_trial(each)))
    return out


def _summed_per_trial(each: Callable[[Tensor, Tensor, Tensor], Tensor]) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    return lambda o, y, t: each(o, y, t).flatten(1).sum(1)


def _stacked_loss(loss: Callable[[Tensor, Tensor], Tensor], out: Tensor, target: Tensor) -> Tensor:
    """Each trial's mean loss ``(L,)`` of stacked outputs ``(L, B, ...)``: the trial's own loss
    function over its rows (``vmap``); plain cross-entropy (the mean of the per-sample losses, no
    weights) as one call over all trials' samples, then the mean per trial."""
    if loss is F.cross_entropy:
        return _ce_losses(_ce_log_probs(out), target, out.shape)
    return torch.func.vmap(loss)(out, target)


def _ce_log_probs(out: Tensor) -> Tensor:
    """Log-softmax of stacked logits ``(L, B, C)``, as ``(C, L*B)``: torch's CPU log_softmax over
    a short last axis (10 classes) is slow; over the first axis of the transposed logits it is the
    same function, ~3x faster with its backward."""
    return F.log_softmax(out.flatten(0, 1).t().contiguous(), 0)


def _ce_losses(log_probs: Tensor, target: Tensor, shape: torch.Size) -> Tensor:
    """Each trial's mean cross-entropy ``(L,)`` from :func:`_ce_log_probs`' ``log_probs``."""
    logp = log_probs.t()
    t = target.flatten(0, 1)
    per_sample = F.nll_loss(logp, t, reduction="none") if t.dim() == 1 else -(t * logp).sum(-1)
    return per_sample.view(shape[0], shape[1]).mean(1)


def _epoch(pack: _Pack, finished: list[int]) -> None:
    """One epoch for every live member (see ``_Run.train_epoch`` for the solo form)."""
    members = pack.members
    started = time.perf_counter()
    lead = members[pack.live[0]]
    n, bs, dev = lead.n_train, lead.batch_size, pack.device
    shuffle = lead.spec.data.shuffle
    for i in pack.live:
        members[i].model.train()
    perms = torch.stack([torch.randperm(n, generator=members[i].generator) for i in pack.live]).to(dev) if shuffle else None
    # each trial's order as row numbers into the pack's stacked data (index_select is the fast gather)
    rows = _flat_rows(perms, n) if perms is not None else None
    L = len(pack.live)
    loss_sum = torch.zeros(L, device=dev)
    obj = lead.objective
    sums = {k: torch.zeros(L, device=dev, dtype=torch.long if k in obj.count_metrics else torch.float32) for k in obj.metrics}
    metric_fns = _per_trial_metrics(obj)
    lr_constant = [isinstance(members[i].spec.optimizer.learning_rate, float | int) and members[i].plateau is None for i in pack.live]
    lrs = [members[i].lr for i in pack.live]
    seen = 0

    def leave(slots: list[int], end_epoch: bool) -> None:
        nonlocal loss_sum, sums, perms, rows, lr_constant, lrs
        for s in slots:
            m = members[pack.live[s]]
            pack.sync(s)
            if end_epoch:
                m.lr = lrs[s]
                pack.call(pack.live[s], m._end_epoch, loss_sum[s], {k: v[s] for k, v in sums.items()}, max(seen, 1), started)
            finished.append(pack.live[s])
        keep = torch.tensor([s for s in range(len(pack.live)) if s not in slots], device=dev, dtype=torch.long)
        loss_sum = loss_sum.index_select(0, keep)
        sums = {k: v.index_select(0, keep) for k, v in sums.items()}
        if perms is not None:
            perms = perms.index_select(0, keep)
            rows = _flat_rows(perms, n)
        lr_constant = [c for s, c in enumerate(lr_constant) if s not in slots]
        lrs = [x for s, x in enumerate(lrs) if s not in slots]
        pack.drop(slots)

    for b in range(lead.steps_per_epoch):
        if not pack.live:
            return
        lo, hi = b * bs, (b + 1) * bs
        if perms is None:
            xb, yb, tb = pack.x[:, lo:hi], pack.y[:, lo:hi], pack.t[:, lo:hi]
        else:
            assert rows is not None
            idx = rows[:, lo:hi].flatten()
            xb, yb = _rows(pack.x, idx), _rows(pack.y, idx)
            tb = yb if pack.same_target else _rows(pack.t, idx)
        for s, i in enumerate(pack.live):
            if not lr_constant[s]:
                lrs[s] = members[i]._current_lr(members[i].step)
        params = pack.params
        out, losses, gradients = pack.train_pass(params, xb, tb)
        m_count = xb.shape[1]
        # non-finite loss: the member ends this epoch before this update, as solo (CPU check)
        check = [members[i].check_nan for i in pack.live]
        if any(check):
            finite = torch.isfinite(losses.detach()).tolist()
            bad = [s for s, ok in enumerate(finite) if not ok and check[s]]
            if bad:
                with torch.no_grad():
                    for s in bad:
                        loss_sum[s] += losses[s].detach().float() * m_count
                        members[pack.live[s]].stop_reason = "non_finite_loss"
                keep_slots = [s for s in range(len(pack.live)) if s not in bad]
                leave(bad, end_epoch=True)
                if not pack.live:
                    return
                sel = torch.tensor(keep_slots, device=dev, dtype=torch.long)
                losses = losses.index_select(0, sel)
                out = out.index_select(0, sel)
                yb, tb = yb.index_select(0, sel), tb.index_select(0, sel)
                params = pack.params
                # recompute on the compacted pack (the dropped slots must not be updated)
                out, losses, gradients = pack.train_pass(params, xb.index_select(0, sel), tb)
        grads = gradients()
        grad = torch.cat([g.flatten(1) for g in grads], 1)
        if pack.clip_kind is not None:
            values = np.array([getattr(members[i].spec.optimizer, pack.clip_kind) for i in pack.live], dtype=np.float64)
            clip_gradients(pack.views(grad), *(values if k == pack.clip_kind else None for k in _CLIPS), stacked=True)
        pack.opt.step([grad], lrs)
        for i in pack.live:
            members[i].step += 1
        seen += m_count
        loss_sum.add_(losses.detach(), alpha=m_count)
        if metric_fns:
            o = out.detach()
            for k, fn in metric_fns:
                sums[k].add_(fn(o, yb, tb))
        lost = []  # slots whose reporter or should_stop raised one of pack.isolate
        for s, i in enumerate(pack.live):
            m = members[i]
            if isinstance(m.save_freq, int) and m.step % m.save_freq == 0:
                pack.sync(s)
                if not pack.call(i, m._step_checkpoint, loss_sum[s], {k: v[s] for k, v in sums.items()}, seen):
                    lost.append(s)
        ending = [s for s, i in enumerate(pack.live)
                  if s not in lost and members[i].spec.max_steps is not None and members[i].step >= members[i].spec.max_steps]
        for s in ending:
            members[pack.live[s]].stop_reason = "max_steps"
        cancelled = []
        for s, i in enumerate(pack.live):
            if s in ending or s in lost:
                continue
            polled = pack.poll(i)
            if polled is None:
                lost.append(s)
            elif polled:
                members[i].stop_reason = "cancelled"
                cancelled.append(s)
        if cancelled and b == lead.steps_per_epoch - 1:
            # the epoch's last step ran: a whole epoch, ended with the others' (as solo records it)
            cancelled = []
        if cancelled or lost:
            # a cancelled solo run returns without ending its epoch; a lost member just leaves
            gone_now = sorted(cancelled + lost)
            leave(gone_now, end_epoch=False)
            ending = [s - sum(1 for c in gone_now if c < s) for s in ending]
        if ending:
            leave(ending, end_epoch=True)
    if not pack.live:  # the last members left at the epoch's last step (lost, cancelled, max_steps)
        return
    gone = []
    val = pack.validate()
    logs = []
    train = read_sums(loss_sum, sums)  # every member's sums in one read
    for s, i in enumerate(pack.live):
        members[i].lr = lrs[s]
        logs.append(members[i]._epoch_logs(train[s], max(seen, 1), started, val[s]))
    if pack.on_epoch_logs is not None:
        pack.on_epoch_logs(list(zip(pack.live, logs, strict=True)))
    for s, i in enumerate(pack.live):
        m = members[i]
        pack.sync(s)
        pack.call(i, m._epoch_end_with, logs[s])
        if m.stop_reason is not None or m.epoch >= m.spec.epochs:  # a lost member's is LOST
            gone.append(s)
            finished.append(i)
    if gone:
        pack.drop(gone)


def fit_fused(
    specs: Sequence[JobSpec | dict[str, Any]],
    reporters: Sequence[Reporter | None] | None = None,
    should_stops: Sequence[Callable[[], bool] | None] | None = None,
    *,
    datasets: Callable[[str], Any] | None = None,
    fallback: bool = True,
    isolate: tuple[type[BaseException], ...] = (),
    resume_from: Sequence[bytes | None] | None = None,
    on_epoch_logs: Callable[[list[tuple[int, dict[str, float]]]], None] | None = None,
    on_resume_error: Callable[[int, BaseException], None] | None = None,
    on_leave: Callable[[list[tuple[int, FitResult]]], None] | None = None,
    one_thread_below: int = 0,
) -> list[FitResult]:
    """Train ``specs`` as one fused model when :func:`why_not_fused` allows it and the engine's
    optimizer for them has a fused form; otherwise (``fallback``) train them one after another
    with ``training.fit``. Returns one ``FitResult`` per spec, in order; each result's
    ``info["pack"]`` says whether it was fused (``size``, ``index``) or why not (``fallback``).

    ``isolate``: exception types that, raised by one member's reporter or ``should_stop``, end
    that member alone (the others go on): its result has ``stop_reason`` ``LOST`` and
    ``info["pack"]["lost"]`` says what was raised; its history is what it reported before. Any
    other exception ends the whole call. Each fused member's reporter gets ``{"pack": {"fused":
    True, "size": n, "index": k}}`` in its ``on_start`` info.

    ``resume_from``: per member, a snapshot's bytes (``None``: a fresh start), as ``fit``'s
    ``resume_from``: the member is restored exactly as its solo resume restores it
    (``_Run.restore``: weights, optimizer state and update count, epoch and step, history,
    schedule, plateau, early-stopping and checkpoint state, its batch-order generator) before the
    pack is formed, and goes on from its own epoch; members may resume from different epochs, and
    fresh and resumed members may share a pack. A member whose snapshot already holds all its
    epochs trains none (as solo). A member whose snapshot cannot be restored (``_Run.restore``
    raises: another spec's snapshot, an incompatible or corrupt state) ends alone before the pack
    trains, and the others train without it: its result has ``stop_reason`` ``RESUME_FAILED``, no
    history, and ``error``: the exception its solo ``fit(resume_from=...)`` raises (the same type
    and message: ``_actionable_errors`` of its own spec). ``on_resume_error(index, exception)`` is
    called as soon as that happens (the worker records that job failed at once, not after the
    pack). (When the specs cannot be fused at all, the fallback's ``fit`` calls restore each
    member as solo, and any exception there ends the call, as before.)

    ``on_epoch_logs``: called at each epoch end of the fused pack with ``(member index, the
    epoch's logs)`` of every member that ends it, before any of their epoch ends runs (callbacks,
    reporter): what the members' reporters will each get, seen together (the worker decides the
    sweep trials at one rung together with it, ``worker.record.FlushGroup.decide``). Members
    that leave in the middle of an epoch (non-finite loss, ``max_steps``) end theirs alone.
    ``on_leave``: called with ``(member index, its result)`` of the members that have left the
    fused pack, after each fused epoch (and once at the start for those that train no epoch), so
    the caller can record a member as soon as it stops (a pause at a rung, a prune, an early stop,
    its last epoch, a cancel) rather than when the last member ends; each fused member is reported
    exactly once, with the result returned for it (its ``seconds`` its own: from the call's start
    to its leaving). Members that are not fused (a failed restore, a fallback) are not reported.

    ``one_thread_below``: as ``fit``'s, for each epoch's step of the live members (a pack that
    shrinks below it goes on on one intra-op thread); the fallback passes it to ``fit``.

    Member indices (here, in ``on_resume_error`` and in each result's ``info["pack"]["index"]``)
    are positions in ``specs``, whichever members are left in the pack."""
    jobs = [validate_spec(s, datasets) for s in specs]
    reps = list(reporters) if reporters is not None else [None] * len(jobs)
    stops = list(should_stops) if should_stops is not None else [None] * len(jobs)
    resumes = list(resume_from) if resume_from is not None else [None] * len(jobs)
    if len(reps) != len(jobs) or len(stops) != len(jobs) or len(resumes) != len(jobs):
        raise ValueError("reporters, should_stops and resume_from must have one entry per spec")
    reason = why_not_fused(jobs)
    started = time.perf_counter()
    results: list[FitResult] | None = None
    failed: dict[int, BaseException] = {}  # members whose snapshot could not be restored
    if reason is None:
        device = resolve_device(jobs[0].device)
        with _deterministic(jobs[0].deterministic, device), _actionable_errors(jobs[0], device):
            splits: dict[tuple[str, int], Any] = {}  # members of the same data and seed share one split
            members = [_Run(job, rep, stop, splits) for job, rep, stop in zip(jobs, reps, stops, strict=True)]
            for k, (m, data) in enumerate(zip(members, resumes, strict=True)):
                if data is None:
                    continue
                try:
                    with _actionable_errors(m.spec, device):  # what its solo fit(resume_from=...) raises
                        m.restore(data)
                except Exception as exc:  # noqa: BLE001 - that member's own snapshot: it alone ends
                    failed[k] = exc
                    if on_resume_error is not None:
                        on_resume_error(k, exc)
            live = [k for k in range(len(members)) if k not in failed]
            classes = {_fused_optimizer_for(members[k].optimizer) for k in live}
            sizes = {(members[k].n_train, members[k].batch_size) for k in live}
            if not live:  # none left to train
                results = [_resume_failed(failed[k], k, len(members)) for k in range(len(members))]
            elif len(classes) != 1:
                reason = f"optimizer {jobs[0].optimizer.name!r}: the trials' optimizers are of different kinds"
            elif len(sizes) != 1:
                reason = "the trials' training splits differ in size"
            else:
                trained = _train_pack([members[k] for k in live], classes.pop(), started, isolate,
                                      _renumbered(on_epoch_logs, live), numbers=live, size=len(members),
                                      on_leave=_renumbered(on_leave, live), one_thread_below=one_thread_below)
                results = [_resume_failed(failed[k], k, len(members)) if k in failed else trained[live.index(k)]
                           for k in range(len(members))]
    if results is not None:
        return results
    if not fallback:
        raise ValueError(f"these trials cannot be fused: {reason}")
    out = []
    for k, (job, rep, stop, data) in enumerate(zip(jobs, reps, stops, resumes, strict=True)):
        if k in failed:  # restored above, it could not be: its solo fit would raise the same
            out.append(_resume_failed(failed[k], k, len(jobs)))
            continue
        try:
            r = fit(job, rep, stop, data, datasets=datasets, one_thread_below=one_thread_below)
        except isolate as exc:
            r = FitResult(history=[], stop_reason=LOST, best_epoch=None, best_value=None, monitor=None,
                          stopped_epoch=None, epochs_run=0, steps=0, weights={}, best_checkpoint=None,
                          info={"lost": f"{type(exc).__name__}: {exc}"})
        r.info["pack"] = {"fused": False, "fallback": reason, **({"lost": r.info.pop("lost")} if "lost" in r.info else {})}
        out.append(r)
    return out


def _renumbered(callback: Callable[[list[tuple[int, Any]]], None] | None,
                numbers: list[int]) -> Callable[[list[tuple[int, Any]]], None] | None:
    """``callback`` (``on_epoch_logs``, ``on_leave``) called with the caller's member indices
    (``numbers``: each pack member's)."""
    if callback is None:
        return None
    call = callback
    return lambda items: call([(numbers[i], x) for i, x in items])


def _resume_failed(exc: BaseException, index: int, size: int) -> FitResult:
    """The result of a member whose snapshot could not be restored (see :data:`RESUME_FAILED`)."""
    return FitResult(history=[], stop_reason=RESUME_FAILED, best_epoch=None, best_value=None, monitor=None,
                     stopped_epoch=None, epochs_run=0, steps=0, weights={}, best_checkpoint=None,
                     info={"pack": {"fused": False, "size": size, "index": index,
                                    "resume_failed": f"{type(exc).__name__}: {exc}"}},
                     error=exc)


def _train_pack(members: list[_Run], opt_cls: type[_StackedKeras] | type[_MemberOptimizers], started: float,
                isolate: tuple[type[BaseException], ...] = (),
                on_epoch_logs: Callable[[list[tuple[int, dict[str, float]]]], None] | None = None,
                numbers: Sequence[int] | None = None, size: int | None = None,
                on_leave: Callable[[list[tuple[int, FitResult]]], None] | None = None,
                one_thread_below: int = 0) -> list[FitResult]:
    """Train ``members`` as one pack; ``numbers``: each member's index among the caller's specs
    and ``size`` their count (reported in ``info["pack"]``), when some did not join the pack.
    Each member's result is made when it leaves the pack (its ``seconds`` its own) and handed to
    ``on_leave`` (pack indices) after the epoch it left in."""
    number = list(numbers) if numbers is not None else list(range(len(members)))
    size = size if size is not None else len(members)
    pack = _Pack(members, opt_cls, isolate, on_epoch_logs)
    finished: list[int] = []
    results: dict[int, FitResult] = {}

    def report_left() -> None:
        left = [k for k in finished if k not in results]
        for k in left:
            r = results[k] = members[k].result(time.perf_counter() - started)
            r.info["pack"] = {"fused": True, "size": size, "index": number[k], **({"lost": pack.lost[k]} if k in pack.lost else {})}
        if on_leave is not None and left:
            on_leave([(k, results[k]) for k in left])

    lost = [k for k, m in enumerate(members)
            if not pack.call(k, m.start, {"pack": {"fused": True, "size": size, "index": number[k]}})]
    # (the pack's slots are the members' indices until the first drop) a member resumed from a
    # snapshot that holds all its epochs trains none, as solo (``_Run.run``)
    gone = [k for k, m in enumerate(members) if k in lost or m.epoch >= m.spec.epochs]
    if gone:
        finished.extend(gone)
        pack.drop(gone)
        report_left()
    with step_threads(one_thread_below, pack.device) as use_threads:
        while pack.live:
            use_threads(len(pack.live) * members[pack.live[0]].step_work)
            _epoch(pack, finished)
            report_left()
    return [results[k] for k in range(len(members))]
