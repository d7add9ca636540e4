"""Benchmark: ASHA against plain random search at the same trial budget, on digits. Issue 5.

Usage (repo root, in the venv; needs nothing running)::

    python bench/sweeps.py --repeats 7 --json bench/out/sweeps.json   # 7 seeds x 2 sweeps, ~4 min on 2 cores
    python bench/sweeps.py --workers 1 --repeats 3                    # one trial at a time

Both sweeps go through the service's own sweep code against a fresh SQLite database (schema by
the Alembic migrations), with real worker processes: the sweep is validated and stored as
``POST /v1/sweeps`` does (``api.routers.sweeps.check_sweep``, ``orchestration.sweeps.advance_sweep``) and
its trials' job ids are put on a queue (the broker); ``--workers`` worker processes (forked, as
Celery's prefork pool forks its children; 1 torch thread each) take them one at a time and do what
the Celery task does: ``worker.runner.run_job`` (whose record asks the sweep's Optuna pruner at
the rung epochs: ``worker.record.RunRecord`` with a ``worker.sweeps.TrialPruner``), then ``orchestration.sweeps.after_job``, which advances
the sweep and sends the new trials to the queue. Both sweeps have ``max_concurrent`` = workers.

Both sweeps evaluate the same configurations in the same order: random search draws trial k's
parameters from a sampler seeded by (seed, k) only (``training.sweep_space.suggest``). The only
difference is ``early_termination: {"type": "asha", "min_epochs": 1, "reduction_factor": 3}``
(``--min-epochs``, ``--reduction-factor``).

Reported per method: wall time and epochs trained (by all workers) until a trial first ends an
epoch with the target validation accuracy (the wall clock when the engine hands that epoch to the
reporter, from the sweep's submission: every trial's set-up and database writes before it
included), and until the sweep completes; the best accuracy found; how many trials ASHA pruned;
and the per-trial overhead (a trial's wall time in its worker, ``run_job`` + ``after_job``,
minus its epochs' own seconds). Ratios are ASHA / random (goal: <= 0.5). Every seed is printed,
then the medians over seeds of each ratio.

Wall times are only as good as the machine is quiet: before each sweep the harness waits (up to
2 min) until other processes use less than ``--quiet-cores`` cores, and it reports the cores other
processes used on average during each sweep ("other load"); epochs are not affected by load (with
one worker not at all, with several only through which trial reaches a rung first).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import queue as queue_mod
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.specs import digits_mlp  # noqa: E402 - after the path insert (run as a script)

BASE: dict[str, Any] = digits_mlp("bench-sweep")

SPACE: dict[str, Any] = {
    "optimizer.learning_rate": {"distribution": "log_uniform", "min": 1e-5, "max": 0.3},
    "model.layers[0].units": {"values": [8, 16, 32, 64, 128]},
    "data.batch_size": {"values": [32, 64, 128]},
}

#: How long the harness waits for any worker to finish a trial before giving up.
TRIAL_TIMEOUT_S = 600.0


def _setup(tmp: Path) -> Any:
    os.environ.update({
        "TRAINYARD_DATA_DIR": str(tmp),
        "TRAINYARD_DATABASE_URL": f"sqlite:///{tmp / 'bench.db'}",
        "TRAINYARD_BROKER_URL": f"sqla+sqlite:///{tmp / 'broker.db'}",
    })
    from config.settings import get_settings
    from store.db import reset_caches
    from store.migrate import upgrade

    reset_caches()
    upgrade(os.environ["TRAINYARD_DATABASE_URL"])
    return get_settings()


def _warm_up(threads: int) -> None:
    """What a long-running worker has already paid for: torch's first-use costs, the built-in
    dataset cache, Optuna's import and first study. Untimed."""
    import torch

    from training import fit
    from training.sweep_space import TrialRecord, should_prune, suggest

    torch.set_num_threads(threads)
    fit({**BASE, "epochs": 2})
    config = {"method": "random", "seed": 0, "parameters": SPACE, "objective": {"metric": "val_accuracy", "mode": "max"},
              "early_termination": {"type": "asha", "min_epochs": 1, "reduction_factor": 3}}
    params = suggest(config, [], 2, study_name="warm-up")
    should_prune(config, [TrialRecord(0, params[0], "complete", {1: 0.9}, 0.9),
                          TrialRecord(1, params[1], "running", {1: 0.5})], 1, 1, study_name="warm-up")


# --------------------------------------------------------------------------- worker processes


def _worker_main(index: int, tasks: Any, done: Any, threads: int) -> None:
    """A worker process: takes job ids from ``tasks`` (None: exit) and does what the Celery task
    does with each (run_job, then after_job, which sends the sweep's new trials to ``tasks``).
    Reports (job id, start, end, epoch events, new jobs, outcome) on ``done``."""
    import logging

    logging.disable(logging.INFO)
    from store.db import get_engine

    get_engine().dispose(close=False)  # never use the parent's connections (worker_process_init does this)
    _warm_up(threads)

    import orchestration.sweeps as orchestration_sweeps
    from config.settings import get_settings
    from worker.record import RunRecord
    from worker.runner import run_job

    settings = get_settings()
    events: list[tuple[str, int, float, float | None, float]] = []
    on_epoch = RunRecord.on_epoch

    def on_epoch_timed(record: RunRecord, metrics: dict[str, float]) -> None:
        # the epoch's end, as the engine hands it to the record (before that epoch's writes)
        acc = metrics.get("val_accuracy")
        events.append((record.job_id, int(metrics["epoch"]), time.perf_counter(),
                       float(acc) if isinstance(acc, float) else None, float(metrics["seconds"])))
        on_epoch(record, metrics)

    RunRecord.on_epoch = on_epoch_timed  # type: ignore[method-assign]  # this worker process only
    sent: list[str] = []

    def send(jobs: Any) -> None:  # the broker: new trials go to the queue any worker takes from
        for jid, _queue in jobs:
            sent.append(jid)
            tasks.put(jid)

    done.put(("ready", index))
    while True:
        job_id = tasks.get()
        if job_id is None:
            return
        events.clear()
        sent.clear()

        started = time.perf_counter()
        outcome = "error"
        try:
            outcome = run_job(job_id, settings)
        finally:
            orchestration_sweeps.after_job(job_id, settings, send)
            done.put(("trial", job_id, started, time.perf_counter(), list(events), list(sent), outcome))  # copies: put() pickles later


class Workers:
    def __init__(self, n: int, threads: int) -> None:
        ctx = multiprocessing.get_context("fork")
        self.tasks = ctx.Queue()
        self.done = ctx.Queue()
        self.procs = [ctx.Process(target=_worker_main, args=(i, self.tasks, self.done, threads), daemon=True)
                      for i in range(n)]
        for p in self.procs:
            p.start()
        for _ in self.procs:
            msg = self.done.get(timeout=TRIAL_TIMEOUT_S)
            assert msg[0] == "ready", msg

    def close(self) -> None:
        for _ in self.procs:
            self.tasks.put(None)
        for p in self.procs:
            p.join(timeout=30)


# --------------------------------------------------------------------------- other work on the machine

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _cpu_ticks(pids: list[int]) -> tuple[int, int]:
    """(busy ticks of the whole machine, ticks used by ``pids``) so far (Linux; zeros elsewhere)."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        busy = sum(v) - v[3] - v[4]  # all but idle and iowait
        mine = 0
        for pid in pids:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            mine += int(fields[11]) + int(fields[12])  # utime, stime
        return busy, mine
    except (OSError, ValueError, IndexError):
        return 0, 0


def others_cores(before: tuple[int, int], after: tuple[int, int], seconds: float) -> float:
    """Cores used on average by processes other than this benchmark's between two samples."""
    return max(0.0, ((after[0] - before[0]) - (after[1] - before[1])) / _TICKS / max(seconds, 1e-9))


def wait_quiet(pids: list[int], max_cores: float, max_wait_s: float) -> float:
    """Wait (up to ``max_wait_s``) until other processes use less than ``max_cores`` cores over a
    second; returns what they used in the last second."""
    deadline = time.monotonic() + max_wait_s
    while True:
        before, t0 = _cpu_ticks(pids), time.perf_counter()
        time.sleep(1.0)
        used = others_cores(before, _cpu_ticks(pids), time.perf_counter() - t0)
        if used < max_cores or time.monotonic() > deadline:
            return used


# --------------------------------------------------------------------------- one sweep


def run_sweep(settings: Any, workers: Workers, *, asha: bool, trials: int, epochs: int, seed: int, concurrent: int,
              min_epochs: int, reduction_factor: int, targets: list[float], pause: bool = False) -> dict[str, Any]:
    import orchestration.sweeps as orchestration_sweeps
    from api.routers.sweeps import check_sweep
    from store import sweeps as store_sweeps
    from store.db import session_scope
    from store.models import DEFAULT_PROJECT

    body: dict[str, Any] = {
        "name": "asha" if asha else "random", "base": {**BASE, "epochs": epochs}, "method": "random", "seed": seed,
        "parameters": SPACE, "objective": {"metric": "val_accuracy", "mode": "max"},
        "max_trials": trials, "max_concurrent": concurrent,
    }
    if asha:
        body["early_termination"] = {"type": "asha", "min_epochs": min_epochs, "reduction_factor": reduction_factor,
                                     "pause": pause}
    pids = [os.getpid(), *(p.pid for p in workers.procs if p.pid)]
    ticks = _cpu_ticks(pids)
    started = time.perf_counter()
    with session_scope() as s:
        config = check_sweep(body, s, DEFAULT_PROJECT, settings)
        sweep = store_sweeps.create_sweep(
            s, project_id=DEFAULT_PROJECT, name=config["name"], method="random", config=config,
            objective_metric="val_accuracy", objective_mode="max", max_trials=trials, max_concurrent=concurrent,
        )
        sweep_id = sweep.id
        first = orchestration_sweeps.advance_sweep(s, sweep_id, settings)
    outstanding = set()
    for job_id, _queue in first:
        outstanding.add(job_id)
        workers.tasks.put(job_id)
    events: list[tuple[str, int, float, float | None, float]] = []
    busy_s = 0.0
    ran = 0
    while True:
        if not outstanding:
            with session_scope(write=False) as s:
                sweep = store_sweeps.get_sweep(s, sweep_id)
                assert sweep is not None
                if sweep.status != "running":
                    break
                states = [(j.trial_number, j.status, j.stop_reason) for j in store_sweeps.trials(s, sweep_id)]
            raise RuntimeError(f"sweep {sweep_id} is still running but no trial is queued: {sweep.trials_created} "
                               f"trials created, {sweep.error}, {states}")
        try:
            msg = workers.done.get(timeout=TRIAL_TIMEOUT_S)
        except queue_mod.Empty:
            raise RuntimeError(f"no trial of sweep {sweep_id} ended in {TRIAL_TIMEOUT_S:.0f} s") from None
        _, job_id, t0, t1, evs, sent, outcome = msg
        if outcome not in ("succeeded", "failed", "cancelled", "paused"):
            raise RuntimeError(f"trial {job_id}: {outcome}")
        outstanding.discard(job_id)
        outstanding.update(sent)
        events.extend(evs)
        busy_s += t1 - t0
        ran += 1
    total_s = time.perf_counter() - started
    others = others_cores(ticks, _cpu_ticks(pids), total_s)

    with session_scope(write=False) as s:
        sweep = store_sweeps.get_sweep(s, sweep_id)
        assert sweep is not None
        views = orchestration_sweeps.trial_views(s, sweep)
        status = sweep.status
    events.sort(key=lambda e: e[2])
    to_target: dict[str, tuple[float, int] | None] = {str(t): None for t in targets}
    for n, (_job, _epoch, at, acc, _secs) in enumerate(events, start=1):
        for t in targets:
            if to_target[str(t)] is None and acc is not None and acc >= t:
                to_target[str(t)] = (at - started, n)
    epoch_s = sum(e[4] for e in events)
    board = orchestration_sweeps.leaderboard(views, "max")
    return {
        "method": "asha" if asha else "random", "status": status, "trials": len(views), "workers": concurrent,
        "pruned": sum(1 for v in views if v.job.stop_reason == "pruned"),
        "epochs_total": sum(v.job.epoch for v in views), "seconds_total": total_s,
        "seconds_to_target": {t: (x[0] if x else None) for t, x in to_target.items()},
        "epochs_to_target": {t: (x[1] if x else None) for t, x in to_target.items()},
        "best_val_accuracy": board[0].value if board else None,
        "best_params": dict(board[0].job.trial_params or {}) if board else None,
        "epoch_seconds": epoch_s, "overhead_per_trial_s": (busy_s - epoch_s) / max(ran, 1),
        "trial_epochs": [v.job.epoch for v in views], "others_cores": others,
    }


# --------------------------------------------------------------------------- report


def _fmt(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _ratios(rnd: dict[str, Any], ash: dict[str, Any], keys: list[str]) -> dict[str, Any]:
    return {
        "seconds_to_target": {t: _ratio(ash["seconds_to_target"][t], rnd["seconds_to_target"][t]) for t in keys},
        "epochs_to_target": {t: _ratio(ash["epochs_to_target"][t], rnd["epochs_to_target"][t]) for t in keys},
        "seconds_total": _ratio(ash["seconds_total"], rnd["seconds_total"]),
        "epochs_total": _ratio(ash["epochs_total"], rnd["epochs_total"]),
    }


def _bold(v: float | None) -> str:
    return "-" if v is None else (f"**{v:.2f}**" if v <= 0.5 else f"{v:.2f}")


def _header(keys: list[str]) -> None:
    head = ["seed", "method", *(f"to {t}: s / epochs" for t in keys), "to completion: s / epochs",
            "best val_accuracy", "pruned", "overhead s/trial", "other load (cores)"]
    print("| " + " | ".join(head) + " |")
    print("|" + " --- |" * len(head))


def _rows(label: str, rnd: dict[str, Any], ash: dict[str, Any], ratios: dict[str, Any], keys: list[str]) -> None:
    for r, name in ((rnd, "random"), (ash, "ASHA")):
        cells = [f"{_fmt(r['seconds_to_target'][t])} / {_fmt(r['epochs_to_target'][t])}" for t in keys]
        print(f"| {label} | {name} | " + " | ".join(cells)
              + f" | {_fmt(r['seconds_total'])} / {_fmt(r['epochs_total'])} | {_fmt(r['best_val_accuracy'], 4)}"
              + f" | {_fmt(r['pruned'], 0)} | {_fmt(r['overhead_per_trial_s'], 3)} | {_fmt(r.get('others_cores'), 1)} |")
    cells = [f"{_bold(ratios['seconds_to_target'][t])} / {_bold(ratios['epochs_to_target'][t])}" for t in keys]
    print(f"| {label} | **ASHA / random** | " + " | ".join(cells)
          + f" | {_bold(ratios['seconds_total'])} / {_bold(ratios['epochs_total'])} | | | | |")


def medians(pairs: list[dict[str, Any]], keys: list[str]) -> dict[str, Any]:
    """Median over seeds of each ratio; a seed where ASHA never reached a target that random search
    reached counts as +inf (worse than any ratio), the reverse as 0, one where neither did is left
    out."""

    def med(vals: list[float | None]) -> float | None:
        got = [v for v in vals if v is not None]
        return statistics.median(got) if got else None

    def per_seed(kind: str, t: str) -> list[float | None]:
        out: list[float | None] = []
        for p in pairs:
            a, r = p["asha"][kind][t], p["random"][kind][t]
            out.append(float("inf") if a is None and r is not None else 0.0 if r is None and a is not None
                       else p["ratios"][kind][t])
        return out

    return {
        "seconds_to_target": {t: med(per_seed("seconds_to_target", t)) for t in keys},
        "epochs_to_target": {t: med(per_seed("epochs_to_target", t)) for t in keys},
        "seconds_total": med([p["ratios"]["seconds_total"] for p in pairs]),
        "epochs_total": med([p["ratios"]["epochs_total"] for p in pairs]),
    }


def totals(pairs: list[dict[str, Any]], keys: list[str]) -> dict[str, Any]:
    """The expected cost view: ASHA's summed time (epochs) to each target over the seeds divided by
    random's, over the seeds where both reached it, with the number of seeds where only random did
    (ASHA stopped every configuration that would have got there: a miss, never hidden)."""

    def ratio(kind: str, t: str) -> float | None:
        both = [p for p in pairs if p["asha"][kind][t] is not None and p["random"][kind][t] is not None]
        return _ratio(sum(p["asha"][kind][t] for p in both), sum(p["random"][kind][t] for p in both)) if both else None

    return {
        "seconds_to_target": {t: ratio("seconds_to_target", t) for t in keys},
        "epochs_to_target": {t: ratio("epochs_to_target", t) for t in keys},
        "asha_missed": {t: sum(1 for p in pairs if p["asha"]["epochs_to_target"][t] is None
                               and p["random"]["epochs_to_target"][t] is not None) for t in keys},
        "seconds_total": _ratio(sum(p["asha"]["seconds_total"] for p in pairs),
                                sum(p["random"]["seconds_total"] for p in pairs)),
        "epochs_total": _ratio(sum(p["asha"]["epochs_total"] for p in pairs),
                               sum(p["random"]["epochs_total"] for p in pairs)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=27)
    ap.add_argument("--epochs", type=int, default=27)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--targets", default="0.975,0.98,0.985", help="validation accuracies to reach (comma-separated)")
    ap.add_argument("--repeats", type=int, default=1, help="sampler seeds seed, seed+1, ...")
    ap.add_argument("--workers", type=int, default=2, help="worker processes = the sweeps' max_concurrent")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    ap.add_argument("--min-epochs", type=int, default=1, help="ASHA's first rung")
    ap.add_argument("--reduction-factor", type=int, default=3)
    ap.add_argument("--pause", action=argparse.BooleanOptionalAction, default=True,
                    help="ASHA with promotions (early_termination.pause: weak trials pause at rungs and the best "
                         "are resumed from their snapshots); --no-pause: Optuna's stop-at-once rule")
    ap.add_argument("--quiet-cores", type=float, default=0.3,
                    help="before each sweep, wait (up to 2 min) until other processes use fewer cores than this; "
                         "0: do not wait. What they used during each sweep is reported either way")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    import logging

    logging.disable(logging.INFO)
    results: list[dict[str, Any]] = []
    pairs: list[dict[str, Any]] = []
    targets = [float(t) for t in args.targets.split(",")]
    keys = [str(t) for t in targets]
    bench_started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="trainyard-bench-sweeps-") as tmp:
        settings = _setup(Path(tmp))
        import training.engine  # noqa: F401 - imported before the fork, as the Celery worker does
        import worker.record  # noqa: F401
        from training.sweep_space import _optuna

        _optuna()  # the API process (check_sweep, the first advance) has it loaded too
        workers = Workers(args.workers, args.threads)
        try:
            # untimed: a small sweep through the whole path (first claim, first checkpoint, first
            # pruning decision... in each worker), as a worker that has run jobs before has done
            run_sweep(settings, workers, asha=True, trials=4 * args.workers, epochs=3, seed=0, concurrent=args.workers,
                      min_epochs=1, reduction_factor=3, targets=targets, pause=args.pause)
            for r in range(args.repeats):
                seed = args.seed + r
                # alternate the order so neither method always runs on a warmer machine
                order = (False, True) if r % 2 == 0 else (True, False)
                pair: dict[str, Any] = {"seed": seed}
                for asha in order:
                    if args.quiet_cores > 0:
                        wait_quiet([os.getpid(), *(p.pid for p in workers.procs if p.pid)], args.quiet_cores, 120.0)
                    res = run_sweep(settings, workers, asha=asha, trials=args.trials, epochs=args.epochs, seed=seed,
                                    concurrent=args.workers, min_epochs=args.min_epochs,
                                    reduction_factor=args.reduction_factor, targets=targets, pause=args.pause)
                    res["seed"] = seed
                    pair[res["method"]] = res
                    results.append(res)
                    print(json.dumps(res), flush=True)
                pair["ratios"] = _ratios(pair["random"], pair["asha"], keys)
                pairs.append(pair)
        finally:
            workers.close()
    print(f"\nASHA vs random search over the same configurations: {args.trials} trials x {args.epochs} epochs, "
          f"{args.workers} worker(s) (max_concurrent {args.workers}), {args.threads} torch thread(s) each; "
          f"ASHA min_epochs {args.min_epochs}, reduction_factor {args.reduction_factor}, "
          f"{'with pause/promotions' if args.pause else 'stop at once (no pause)'}; "
          f"{time.perf_counter() - bench_started:.0f} s in all\n")
    _header(keys)
    for p in pairs:
        _rows(str(p["seed"]), p["random"], p["asha"], p["ratios"], keys)
    summary = medians(pairs, keys)
    cells = [f"{_bold(summary['seconds_to_target'][t])} / {_bold(summary['epochs_to_target'][t])}" for t in keys]
    print(f"| median of {len(pairs)} | **ASHA / random** | " + " | ".join(cells)
          + f" | {_bold(summary['seconds_total'])} / {_bold(summary['epochs_total'])} | | | | |")
    tot = totals(pairs, keys)
    cells = [f"{_bold(tot['seconds_to_target'][t])} / {_bold(tot['epochs_to_target'][t])}"
             + (f" (ASHA missed {tot['asha_missed'][t]})" if tot["asha_missed"][t] else "") for t in keys]
    print("| sum over seeds | **ASHA / random** | " + " | ".join(cells)
          + f" | {_bold(tot['seconds_total'])} / {_bold(tot['epochs_total'])} | | | | |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "args": {k: str(v) for k, v in vars(args).items()}, "results": results,
            "ratios": [{"seed": p["seed"], **p["ratios"]} for p in pairs], "median_ratios": summary, "total_ratios": tot,
        }, indent=2))


if __name__ == "__main__":
    main()
