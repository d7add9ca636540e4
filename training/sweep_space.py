"""Search spaces and the two decisions of a sweep: which parameters the next trials get, and
whether a running trial stops early. Both are made by Optuna (its samplers and pruners) over an
in-memory study rebuilt, at each decision, from the sweep's trials as stored in the database.

Pure: no database, no torch, nothing kept between calls (``optuna`` is imported on first use). The
caller loads the trials (``TrialRecord``) and the sweep's validated config, then calls
:func:`suggest` or :func:`should_prune`. The config is a dict with ``method`` (grid | random |
tpe), ``parameters`` ({path: {"values": [...]} | {"distribution", "min", "max"}}),
``objective`` ({metric, mode}), ``early_termination`` (None or {type, min_epochs,
reduction_factor, max_epochs, n_startup_trials, bootstrap_count}), ``seed`` and
``n_startup_trials``.
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    pass

TrialState = Literal["running", "complete", "pruned", "fail"]

#: Defaults of the optional config fields.
DEFAULT_TPE_STARTUP = 10
DEFAULT_MEDIAN_STARTUP = 5
DEFAULT_REDUCTION_FACTOR = 3


# --------------------------------------------------------------------------- paths into a spec

_TOKEN = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)|\[(\d+)\]|(\.)")


class PathError(ValueError):
    """A parameter path that is malformed or does not lead to a field of the base spec."""


def parse_path(path: str) -> list[str | int]:
    """``"model.layers[0].units"`` -> ``["model", "layers", 0, "units"]``."""
    parts: list[str | int] = []
    pos, expect_name = 0, True
    while pos < len(path):
        m = _TOKEN.match(path, pos)
        if m is None:
            raise PathError(f"cannot read {path!r} at character {pos}: a path is like optimizer.learning_rate or model.layers[0].units")
        name, index, dot = m.groups()
        if name is not None:
            if not expect_name:
                raise PathError(f"cannot read {path!r} at character {pos}: expected '.' or '[' before {name!r}")
            parts.append(name)
            expect_name = False
        elif index is not None:
            if not parts:
                raise PathError(f"{path!r} must start with a field name")
            parts.append(int(index))
            expect_name = False
        else:
            if expect_name:
                raise PathError(f"cannot read {path!r} at character {pos}: a field name is missing")
            expect_name = True
        pos = m.end()
    if not parts or expect_name:
        raise PathError(f"{path!r} is not a complete path (like optimizer.learning_rate)")
    return parts


def _walk(spec: Any, parts: Sequence[str | int], path: str) -> Any:
    node = spec
    for i, part in enumerate(parts):
        here = "".join(f"[{p}]" if isinstance(p, int) else ("." if j else "") + p for j, p in enumerate(parts[:i])) or "the spec"
        if isinstance(part, int):
            if not isinstance(node, list):
                raise PathError(f"{path}: {here} is not a list, so [{part}] does not apply")
            if part >= len(node):
                raise PathError(f"{path}: {here} has {len(node)} item(s), so [{part}] does not exist")
            node = node[part]
        else:
            if not isinstance(node, Mapping):
                raise PathError(f"{path}: {here} is not an object, so .{part} does not apply")
            if part not in node:
                known = ", ".join(sorted(str(k) for k in node))
                raise PathError(f"{path}: {here} has no field {part!r}; its fields: {known}")
            node = node[part]
    return node


def resolve(spec: Mapping[str, Any], path: str) -> Any:
    """The value at ``path`` in ``spec`` (an effective spec, so defaulted fields exist); raises
    :class:`PathError` saying which part does not resolve."""
    return _walk(spec, parse_path(path), path)


def with_params(spec: Mapping[str, Any], params: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of ``spec`` with each ``path: value`` of ``params`` set (the paths resolve)."""
    out = copy.deepcopy(dict(spec))
    for path, value in params.items():
        parts = parse_path(path)
        parent = _walk(out, parts[:-1], path)
        last = parts[-1]
        if isinstance(last, int):
            if not isinstance(parent, list) or last >= len(parent):
                raise PathError(f"{path}: index [{last}] does not exist")
        elif not isinstance(parent, dict):
            raise PathError(f"{path}: the parent is not an object")
        parent[last] = copy.deepcopy(value)  # type: ignore[index]
    return out


# --------------------------------------------------------------------------- trials and objective


@dataclass(frozen=True)
class TrialRecord:
    """One trial as stored: its number, parameters (real values), state, and the objective metric
    per 1-based epoch; ``value`` is the trial's objective (see :func:`objective_value`)."""

    number: int
    params: dict[str, Any]
    state: TrialState
    values: dict[int, float] = field(default_factory=dict)
    value: float | None = None


def objective_value(values: Mapping[int, float], mode: str) -> float | None:
    """A trial's objective: the best finite value of the objective metric over its epochs (the
    epoch whose weights the job keeps as its best checkpoint when monitoring that metric)."""
    finite = [v for v in values.values() if v is not None and math.isfinite(v)]
    if not finite:
        return None
    return max(finite) if mode == "max" else min(finite)


def default_mode(metric: str) -> str:
    """Keras' ``mode="auto"``: maximize accuracy-like metrics, minimize the rest."""
    return "max" if "acc" in metric or metric.endswith("auc") else "min"


# --------------------------------------------------------------------------- optuna


def _optuna() -> Any:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def _canon(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _by_index(values: Sequence[Any]) -> bool:
    """Whether a ``values`` list is given to Optuna as indexes (its choices must be distinct
    primitives; lists, objects, and values equal under == such as 1 and true are not)."""
    prim = all(v is None or isinstance(v, str | int | float | bool) for v in values)
    if not prim:
        return True
    return any(a == b for i, a in enumerate(values) for b in values[i + 1 :])


def distributions(config: Mapping[str, Any]) -> dict[str, Any]:
    """Optuna distributions of the search space, keyed by parameter path."""
    dist = _optuna().distributions
    out: dict[str, Any] = {}
    for name, p in config["parameters"].items():
        if "values" in p:
            vals = p["values"]
            out[name] = dist.CategoricalDistribution(list(range(len(vals))) if _by_index(vals) else list(vals))
        elif p["distribution"] == "int_uniform":
            out[name] = dist.IntDistribution(int(p["min"]), int(p["max"]))
        else:
            out[name] = dist.FloatDistribution(float(p["min"]), float(p["max"]), log=p["distribution"] == "log_uniform")
    return out


def _to_optuna(config: Mapping[str, Any], params: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, p in config["parameters"].items():
        if name not in params:
            continue
        value = params[name]
        if "values" in p:
            if _by_index(p["values"]):
                canon = _canon(value)
                idx = next((i for i, v in enumerate(p["values"]) if _canon(v) == canon), None)
                if idx is None:
                    continue
                value = idx
        out[name] = value
    return out


def _from_optuna(config: Mapping[str, Any], params: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, p in config["parameters"].items():
        value = params[name]
        if "values" in p and _by_index(p["values"]):
            value = copy.deepcopy(p["values"][int(value)])
        elif p.get("distribution") == "int_uniform":
            value = int(value)
        elif p.get("distribution") in ("uniform", "log_uniform"):
            value = float(value)
        out[name] = value
    return out


def grid_size(config: Mapping[str, Any]) -> int:
    return math.prod(len(p["values"]) for p in config["parameters"].values())


def sampler_seed(seed: int, n_existing: int) -> int:
    """The seed of the sampler that proposes trials from number ``n_existing`` on. The study is
    rebuilt for each decision, so a fixed seed would replay the same draws; deriving it from the
    sweep's seed and the number of trials so far keeps a sweep reproducible and its draws fresh."""
    return (seed * 1_000_003 + n_existing * 7_919) % 2**32


def make_sampler(config: Mapping[str, Any], n_existing: int) -> Any:
    """Optuna's GridSampler (the grid is shuffled by the sweep's seed; trial n takes grid point n),
    RandomSampler, or TPESampler (constant liar, so concurrent trials spread out)."""
    samplers = _optuna().samplers
    method, seed = config["method"], int(config["seed"])
    if method == "grid":
        space = {name: list(d.choices) for name, d in distributions(config).items()}
        return samplers.GridSampler(space, seed=seed)
    if method == "random":
        return samplers.RandomSampler(seed=sampler_seed(seed, n_existing))
    return samplers.TPESampler(
        seed=sampler_seed(seed, n_existing),
        n_startup_trials=int(config.get("n_startup_trials") or DEFAULT_TPE_STARTUP),
        constant_liar=True,
    )


def pauses(config: Mapping[str, Any]) -> bool:
    """Whether the sweep runs ASHA with promotions: weak trials are paused, not stopped."""
    et = config.get("early_termination") or {}
    return bool(et.get("pause")) and et.get("type") == "asha"


def make_pruner(config: Mapping[str, Any], *, endgame: bool = False) -> Any:
    """SuccessiveHalvingPruner (asha), HyperbandPruner or MedianPruner, in epochs; NopPruner
    without early termination.

    ASHA with promotions (``pause``) asks the same pruner with ``bootstrap_count`` at least
    reduction_factor - 1: a trial is then "promotable" only once reduction_factor trials have
    reached its rung and it is in their best 1/reduction_factor, which is ASHA's rule as published
    (Optuna's own fallback, which promotes a lone trial that is the best so far, exists because
    Optuna cannot suspend a trial; a sweep here can, from its snapshot). Its "prune" then means
    "pause". ``endgame``: nothing else can run, so Optuna's own rule decides which paused trials
    go on (the best one at a rung always does)."""
    pruners = _optuna().pruners
    et = config.get("early_termination")
    if not et:
        return pruners.NopPruner()
    kind = et["type"]
    min_epochs = int(et.get("min_epochs") or 1)
    rf = int(et.get("reduction_factor") or DEFAULT_REDUCTION_FACTOR)
    if kind == "asha":
        bootstrap = int(et.get("bootstrap_count") or 0)
        if pauses(config) and not endgame:
            bootstrap = max(bootstrap, rf - 1)
        return pruners.SuccessiveHalvingPruner(
            min_resource=min_epochs, reduction_factor=rf, min_early_stopping_rate=0, bootstrap_count=bootstrap,
        )
    if kind == "hyperband":
        return pruners.HyperbandPruner(
            min_resource=min_epochs, max_resource=int(et["max_epochs"]), reduction_factor=rf,
            bootstrap_count=int(et.get("bootstrap_count") or 0),
        )
    return pruners.MedianPruner(
        n_startup_trials=int(et.get("n_startup_trials", DEFAULT_MEDIAN_STARTUP)), n_warmup_steps=min_epochs,
        interval_steps=1,
    )


def is_decision_epoch(config: Mapping[str, Any], epoch: int, epochs: int) -> bool:
    """Whether the pruner can stop a trial after ``epoch`` (1-based) of ``epochs``: ASHA and
    Hyperband only at their rungs (min_epochs × reduction_factor^k), the median rule at every
    epoch from min_epochs. Other epochs are never asked about (no database work)."""
    et = config.get("early_termination")
    if not et or epoch >= epochs:
        return False
    min_epochs = int(et.get("min_epochs") or 1)
    if epoch < min_epochs:
        return False
    if et["type"] == "median":
        return True
    rf = int(et.get("reduction_factor") or DEFAULT_REDUCTION_FACTOR)
    step = min_epochs
    while step < epoch:
        step *= rf
    return step == epoch


def _rung_attrs(values: Mapping[int, float], min_epochs: int, rf: int, offset: int, before: int | None,
                worst: float) -> dict[str, float]:
    """The ``completed_rung_k`` system attributes Optuna's successive halving writes when it is asked
    at every epoch: the value at epoch min_epochs × rf^(offset + k) for each rung reached (before
    epoch ``before`` for the trial being decided, whose current rung the pruner records itself).
    A NaN rung value is written as ``worst``: it ranks last (Optuna sorts the competing values, and
    NaN has no place in a sorted list: the ranking would depend on where it landed)."""
    attrs: dict[str, float] = {}
    k = 0
    while True:
        step = min_epochs * rf ** (offset + k)
        if step not in values or (before is not None and step >= before):
            return attrs
        attrs[f"completed_rung_{k}"] = worst if math.isnan(values[step]) else values[step]
        k += 1


_STATES = {"running": "RUNNING", "complete": "COMPLETE", "pruned": "PRUNED", "fail": "FAIL"}


def build_study(
    config: Mapping[str, Any], trials: Sequence[TrialRecord], *, study_name: str, sampler: Any = None,
    deciding: int | None = None, deciding_step: int | None = None, endgame: bool = False,
) -> Any:
    """An in-memory Optuna study holding ``trials`` in number order (so Optuna's trial numbers are
    the sweep's): parameters, intermediate values per epoch, final values and the pruner's rung
    attributes. ``deciding`` names the running trial about to be asked about at ``deciding_step``."""
    optuna = _optuna()
    TS = optuna.trial.TrialState
    mode = config["objective"]["mode"]
    pruner = make_pruner(config, endgame=endgame)
    study = optuna.create_study(
        study_name=study_name, direction="maximize" if mode == "max" else "minimize",
        sampler=sampler or make_sampler(config, len(trials)), pruner=pruner,
    )
    dists = distributions(config)
    et = config.get("early_termination") or {}
    halving = et.get("type") in ("asha", "hyperband")
    worst = -math.inf if mode == "max" else math.inf
    min_epochs = int(et.get("min_epochs") or 1)
    rf = int(et.get("reduction_factor") or DEFAULT_REDUCTION_FACTOR)
    hyperband = et.get("type") == "hyperband"
    if hyperband:
        # Optuna's HyperbandPruner sizes its brackets from max_resource on first use; it assigns a
        # trial to a bracket by a hash of (study name, trial number). Both are ours, so the
        # bracket of a stored trial is known without replaying the sweep.
        pruner._try_initialization(study)
    for t in sorted(trials, key=lambda r: r.number):
        params = _to_optuna(config, t.params)
        attrs: dict[str, Any] = {}
        if halving:
            offset = pruner._get_bracket_id(study, _NumberOnly(t.number)) if hyperband else 0
            attrs = _rung_attrs(t.values, min_epochs, rf, offset, deciding_step if t.number == deciding else None,
                                worst)
        state = t.state if not (t.state == "complete" and t.value is None) else "fail"
        frozen = optuna.trial.create_trial(
            state=getattr(TS, _STATES[state]),
            value=t.value if state == "complete" else None,
            params=params,
            distributions={k: dists[k] for k in params},
            intermediate_values={
                int(e): v for e, v in t.values.items()
                if t.number != deciding or deciding_step is None or e <= deciding_step
            },
            system_attrs=attrs,
        )
        study.add_trial(frozen)
    return study


@dataclass(frozen=True)
class _NumberOnly:
    number: int


def suggest(config: Mapping[str, Any], trials: Sequence[TrialRecord], n: int, *, study_name: str) -> list[dict[str, Any]]:
    """Parameters for the next ``n`` trials (numbers ``len(trials)`` on), from the sweep's sampler
    told every stored trial; each proposal is in the study (running) before the next is asked.

    Random search draws trial number k from a sampler seeded by (seed, k) alone, so a sweep's
    configurations do not depend on how its trials were batched: with ``max_concurrent`` > 1,
    whether two trials were asked for in one call or one by one depends on when trials end, yet
    trial k gets the same parameters either way (and the same as in a sweep that runs them one at a
    time, with or without early termination)."""
    study = build_study(config, trials, study_name=study_name)
    dists = distributions(config)
    out = []
    for i in range(n):
        if config["method"] == "random" and i:
            study.sampler = make_sampler(config, len(trials) + i)
        out.append(_from_optuna(config, study.ask(dists).params))
    return out


def should_prune(
    config: Mapping[str, Any], trials: Sequence[TrialRecord], number: int, epoch: int, *, study_name: str,
    endgame: bool = False,
) -> bool:
    """Whether Optuna's pruner stops running trial ``number`` after ``epoch``, given every trial
    of the sweep (``trials`` includes this one, with its values up to ``epoch``). With ``pause``,
    "stop" means "pause", and for a paused trial (state running, at its rung) "not stop" means
    "promote" (see :func:`make_pruner`)."""
    return number in prune_many(config, trials, {number: epoch}, study_name=study_name, endgame=endgame)


def prune_many(
    config: Mapping[str, Any], trials: Sequence[TrialRecord], asked: Mapping[int, int], *, study_name: str,
    endgame: bool = False,
) -> set[int]:
    """Which of the running trials ``asked`` (trial number -> the epoch it has just ended, or
    paused after) Optuna's pruner stops there: :func:`should_prune` of each, every one asked
    with the others' values as ``trials`` hold them. So the trials of a pack that reach a rung at
    the same epoch end are ranked together, each against all of them, as synchronous successive
    halving ranks a rung (``worker.record.FlushGroup.decide``). An asked trial's values after its
    epoch are not the pruner's business. ASHA builds the study once and asks Optuna's pruner about
    each asked trial in it (the pruner sees the study with that trial's current rung value not yet
    recorded: it records it itself, :class:`_Asking`); Hyperband and the median rule read the
    study through their own storage queries, so each is asked in a study of its own."""
    et = config.get("early_termination")
    if not et or not asked:
        return set()
    optuna = _optuna()
    trials = [replace(t, values={e: v for e, v in t.values.items() if e <= asked[t.number]})
              if t.number in asked else t for t in trials]
    sampler = optuna.samplers.RandomSampler(seed=0)
    running = optuna.trial.TrialState.RUNNING
    if et["type"] != "asha":
        out = set()
        for number, epoch in asked.items():
            study = build_study(config, trials, study_name=study_name, sampler=sampler, deciding=number,
                                deciding_step=epoch, endgame=endgame)
            frozen = next((t for t in study.get_trials(deepcopy=False) if t.number == number), None)
            if frozen is not None and frozen.state == running and epoch in frozen.intermediate_values \
                    and study.pruner.prune(study, frozen):
                out.add(number)
        return out
    study = build_study(config, trials, study_name=study_name, sampler=sampler, endgame=endgame)
    min_epochs, rf = int(et.get("min_epochs") or 1), int(et.get("reduction_factor") or DEFAULT_REDUCTION_FACTOR)
    worst = -math.inf if config["objective"]["mode"] == "max" else math.inf
    stored = study.get_trials(deepcopy=False)
    out = set()
    for i, frozen in enumerate(stored):
        epoch = asked.get(frozen.number)
        if epoch is None or frozen.state != running or epoch not in frozen.intermediate_values:
            continue  # not running, or no value at that epoch: nothing to decide on
        question = copy.copy(frozen)
        question.system_attrs = _rung_attrs(frozen.intermediate_values, min_epochs, rf, 0, epoch, worst)
        if study.pruner.prune(_Asking(study, [*stored[:i], question, *stored[i + 1:]]), question):
            out.add(frozen.number)
    return out


def promotions(
    config: Mapping[str, Any], trials: Sequence[TrialRecord], paused: Mapping[int, int], *, study_name: str,
    endgame: bool = False,
) -> set[int]:
    """Which paused trials (``paused``: trial number -> the epoch it paused after) Optuna's
    successive halving now promotes: those :func:`prune_many` does not stop when asked as if each
    reported its rung value again now (see :func:`make_pruner`); a paused trial without a value at
    its rung has nothing to be decided on and goes on."""
    if not paused or not pauses(config):
        return set()
    running = {t.number for t in trials if t.state == "running"}
    stopped = prune_many(config, trials, paused, study_name=study_name, endgame=endgame)
    return {n for n in paused if n in running and n not in stopped}


class _Asking:
    """The study as :meth:`SuccessiveHalvingPruner.prune` reads it while one trial is asked
    about (:func:`prune_many`): its trials (the asked one without its current rung value) and direction; what the
    pruner records (the asked trial's rung value) is dropped, so the next question sees the study
    as stored."""

    def __init__(self, study: Any, trials: list[Any]) -> None:
        self.direction = study.direction
        self._trials = trials
        self._storage = self

    def get_trials(self, deepcopy: bool = True, states: Any = None) -> list[Any]:
        return self._trials

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        pass
