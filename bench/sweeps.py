"""Benchmark: ASHA against plain random search at the same trial budget, on digits. Issue 5.

Usage (repo root, in the venv; needs nothing running)::

    python bench/sweeps.py                       # 27 trials x 27 epochs each way, ~2-3 min on 2 cores
    python bench/sweeps.py --trials 16 --epochs 27 --target 0.97 --repeats 2 --json bench/out/sweeps.json

Both sweeps go through the service's own sweep code, in this process, against a fresh SQLite
database (schema by the Alembic migrations): the sweep is validated and stored as
``POST /v1/sweeps`` does (``api.routers.sweeps.check_sweep``, ``store.sweeps.advance_sweep``), each
trial job is run by the worker's ``worker.runner.run_job`` (whose reporter asks the sweep's Optuna
pruner at the rung epochs: ``worker.sweeps.TrialReporter``) and each finished trial advances the
sweep (``worker.sweeps.after_job``). Trials run one at a time (``max_concurrent`` 1), so both sweeps
evaluate exactly the same configurations: the random sampler's draws depend only on the seed and
the trial number. The only difference is ``early_termination: {"type": "asha", "min_epochs": 1,
"reduction_factor": 3}``.

Reported per method: wall time and epochs trained until the sweep's best trial first reaches the
target validation accuracy (a trial's epoch counts when it ends: elapsed time before the trial plus
the engine's per-epoch seconds up to that epoch), and until the sweep completes; the best accuracy
found; and how many trials ASHA pruned. Ratios are ASHA / random (goal: <= 0.5).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BASE: dict[str, Any] = {
    "name": "bench-sweep",
    "seed": 0,
    "device": "cpu",
    "data": {"dataset": "digits", "validation_split": 0.2, "batch_size": 64, "standardize": True},
    "model": {"layers": [{"type": "dense", "units": 64, "activation": "relu"}, {"type": "dropout", "rate": 0.1},
                         {"type": "dense", "units": 10}]},
    "loss": "sparse_categorical_crossentropy",
    "metrics": ["accuracy"],
    "optimizer": {"name": "adam", "learning_rate": 0.001},
    "epochs": 27,
}

SPACE: dict[str, Any] = {
    "optimizer.learning_rate": {"distribution": "log_uniform", "min": 1e-5, "max": 0.3},
    "model.layers[0].units": {"values": [8, 16, 32, 64, 128]},
    "data.batch_size": {"values": [32, 64, 128]},
}


def _setup(tmp: Path) -> Any:
    os.environ.update({
        "TRAINYARD_DATA_DIR": str(tmp),
        "TRAINYARD_DATABASE_URL": f"sqlite:///{tmp / 'bench.db'}",
        "TRAINYARD_BROKER_URL": f"sqla+sqlite:///{tmp / 'broker.db'}",
    })
    from store.db import reset_caches
    from store.migrate import upgrade
    from store.settings import get_settings

    reset_caches()
    upgrade(os.environ["TRAINYARD_DATABASE_URL"])
    return get_settings()


def run_sweep(settings: Any, *, asha: bool, trials: int, epochs: int, seed: int, targets: list[float]) -> dict[str, Any]:
    from sqlalchemy import select

    from api.routers.sweeps import check_sweep
    from store import sweeps as store_sweeps
    from store.db import session_scope
    from store.models import DEFAULT_PROJECT, Job, JobMetric
    from worker.runner import run_job
    from worker.sweeps import after_job

    body: dict[str, Any] = {
        "name": "asha" if asha else "random", "base": {**BASE, "epochs": epochs}, "method": "random", "seed": seed,
        "parameters": SPACE, "objective": {"metric": "val_accuracy", "mode": "max"},
        "max_trials": trials, "max_concurrent": 1,
    }
    if asha:
        body["early_termination"] = {"type": "asha", "min_epochs": 1, "reduction_factor": 3}
    started = time.perf_counter()
    with session_scope() as s:
        config = check_sweep(body, s, DEFAULT_PROJECT, settings)
        sweep = store_sweeps.create_sweep(
            s, project_id=DEFAULT_PROJECT, name=config["name"], method="random", config=config,
            objective_metric="val_accuracy", objective_mode="max", max_trials=trials, max_concurrent=1,
        )
        store_sweeps.advance_sweep(s, sweep.id, settings)
        sweep_id = sweep.id
    trial_start: dict[str, float] = {}
    while True:
        with session_scope(write=False) as s:
            queued = list(s.scalars(
                select(Job.id).where(Job.sweep_id == sweep_id, Job.status == "queued").order_by(Job.trial_number)
            ))
        if not queued:
            break
        for job_id in queued:
            trial_start[job_id] = time.perf_counter() - started
            run_job(job_id, settings)
            after_job(job_id, settings, lambda jobs: None)  # trials run here, so nothing is sent
    total_s = time.perf_counter() - started

    with session_scope(write=False) as s:
        sweep = store_sweeps.get_sweep(s, sweep_id)
        assert sweep is not None
        views = store_sweeps.trial_views(s, sweep)
        rows = s.execute(
            select(JobMetric.job_id, JobMetric.epoch, JobMetric.values).join(Job, Job.id == JobMetric.job_id)
            .where(Job.sweep_id == sweep_id).order_by(Job.trial_number, JobMetric.epoch)
        ).all()
        status = sweep.status
    per_job: dict[str, list[dict[str, Any]]] = {}
    for job_id, _epoch, values in rows:
        per_job.setdefault(job_id, []).append(values)
    epochs_so_far = 0
    to_target: dict[str, tuple[float, int] | None] = {str(t): None for t in targets}
    for v in views:  # in trial order = run order
        elapsed = trial_start[v.job.id]
        for m in per_job.get(v.job.id, []):
            epochs_so_far += 1
            elapsed += float(m["seconds"])
            acc = m.get("val_accuracy")
            for t in targets:
                if to_target[str(t)] is None and isinstance(acc, float) and acc >= t:
                    to_target[str(t)] = (elapsed, epochs_so_far)
    board = store_sweeps.leaderboard(views, "max")
    return {
        "method": "asha" if asha else "random", "status": status, "trials": len(views),
        "pruned": sum(1 for v in views if v.job.stop_reason == "pruned"),
        "epochs_total": sum(v.job.epoch for v in views), "seconds_total": total_s,
        "seconds_to_target": {t: (x[0] if x else None) for t, x in to_target.items()},
        "epochs_to_target": {t: (x[1] if x else None) for t, x in to_target.items()},
        "best_val_accuracy": board[0].value if board else None,
        "best_params": dict(board[0].job.trial_params or {}) if board else None,
    }


def _fmt(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))


def _table(title: str, rnd: dict[str, Any], ash: dict[str, Any], targets: list[float]) -> None:
    keys = [str(t) for t in targets]
    print(f"\n{title}: ASHA vs random search over the same configurations")
    head = ["method", *(f"to {t}: s / epochs" for t in keys), "to completion: s / epochs", "best val_accuracy", "pruned"]
    print("| " + " | ".join(head) + " |")
    print("|" + " --- |" * len(head))
    for r in (rnd, ash):
        cells = [f"{_fmt(r['seconds_to_target'][t])} / {_fmt(r['epochs_to_target'][t])}" for t in keys]
        print(f"| {r['method']} | " + " | ".join(cells)
              + f" | {_fmt(r['seconds_total'])} / {_fmt(r['epochs_total'])} | {_fmt(r['best_val_accuracy'], 4)} | {_fmt(r['pruned'], 0)} |")
    cells = [f"**{_ratio(ash['seconds_to_target'][t], rnd['seconds_to_target'][t])}** / "
             f"**{_ratio(ash['epochs_to_target'][t], rnd['epochs_to_target'][t])}**" for t in keys]
    print("| ASHA / random | " + " | ".join(cells)
          + f" | **{_ratio(ash['seconds_total'], rnd['seconds_total'])}** / **{_ratio(ash['epochs_total'], rnd['epochs_total'])}** | | |")


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a is not None and b else "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=27)
    ap.add_argument("--epochs", type=int, default=27)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--targets", default="0.975,0.98,0.985", help="validation accuracies to reach (comma-separated)")
    ap.add_argument("--repeats", type=int, default=1, help="sampler seeds seed, seed+1, ...")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    import logging

    import torch

    torch.set_num_threads(args.threads)
    logging.disable(logging.INFO)
    results: list[dict[str, Any]] = []
    targets = [float(t) for t in args.targets.split(",")]
    with tempfile.TemporaryDirectory(prefix="trainyard-bench-sweeps-") as tmp:
        settings = _setup(Path(tmp))
        from training import fit

        fit({**BASE, "epochs": 2})  # warm-up (torch's first-use costs, the dataset cache), untimed
        for r in range(args.repeats):
            seed = args.seed + r
            # alternate the order so neither method always runs on a warmer machine
            order = (False, True) if r % 2 == 0 else (True, False)
            pair = {}
            for asha in order:
                res = run_sweep(settings, asha=asha, trials=args.trials, epochs=args.epochs, seed=seed, targets=targets)
                res["seed"] = seed
                pair[res["method"]] = res
                results.append(res)
                print(json.dumps(res), flush=True)
            _table(f"seed {seed}", pair["random"], pair["asha"], targets)
    if args.repeats > 1:
        def med(method: str, key: str, target: str | None = None) -> float | None:
            vals = [r[key] if target is None else r[key][target] for r in results if r["method"] == method]
            if any(v is None for v in vals):
                return None  # not reached in some run: no median
            return statistics.median(vals)

        keys = [str(t) for t in targets]
        median_rows = {
            m: {"seconds_total": med(m, "seconds_total"), "epochs_total": med(m, "epochs_total"),
                "seconds_to_target": {t: med(m, "seconds_to_target", t) for t in keys},
                "epochs_to_target": {t: med(m, "epochs_to_target", t) for t in keys},
                "best_val_accuracy": med(m, "best_val_accuracy"), "pruned": med(m, "pruned"), "method": m}
            for m in ("random", "asha")
        }
        _table(f"medians over {args.repeats} seeds", median_rows["random"], median_rows["asha"], targets)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=2))


if __name__ == "__main__":
    main()
