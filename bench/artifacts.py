"""Benchmark: epoch time and database growth with checkpoints and snapshots in the artifact store
(issue 14) against the same writes as database blobs (how it was before), in one run.

Usage (repo root, in the venv; PostgreSQL must be up, as for the service tests)::

    python bench/artifacts.py                       # ~1-2 min
    python bench/artifacts.py --rounds 5 --epochs 10 --units 1024

A fresh PostgreSQL database ``trainyard_artifacts_<run>`` (schema by the migrations; dropped at
the end) and a temporary local artifact store. Each round runs, in an order that alternates from
round to round, three arms of one job (digits, an MLP of two hidden layers of ``--units``, Adam,
``--epochs`` epochs) through ``training.fit`` with the worker's own reporter
(``worker.record.RunRecord``, a claimed job, its lease fenced, a snapshot written at every
epoch end and a checkpoint at every improvement):

* ``store``: the service as it is: files written to the store before the fenced transaction that
  records their metadata;
* ``database``: the same reporter, but every checkpoint and snapshot's bytes are also INSERTed as
  a ``bytea`` in that transaction (a scratch table), and no file is written: what the worker did
  before the artifact store;
* ``none``: no snapshot written at all (context: the cost of snapshotting itself).

Printed: the median over rounds of the mean epoch time per arm, the ratio ``store / database``
(issue 14: must not exceed 1.02), the database bytes written per job by each arm (the rows of
the job, its checkpoints, snapshot, metrics and events, plus the scratch blobs for ``database``:
every snapshot and checkpoint written, before PostgreSQL's vacuum reclaims replaced ones) and the
bytes of the job's files left in the store (the newest snapshot, the best and last checkpoints:
what the database held for the job before the store).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PG_URL = os.environ.get("TRAINYARD_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def spec(units: int, epochs: int) -> dict[str, Any]:
    return {
        "name": "bench-artifacts", "seed": 1, "device": "cpu",
        "data": {"dataset": "digits", "validation_split": 0.2, "batch_size": 64, "standardize": True},
        "model": {"layers": [{"type": "dense", "units": units, "activation": "relu"},
                             {"type": "dense", "units": units, "activation": "relu"},
                             {"type": "dense", "units": 10}]},
        "loss": "sparse_categorical_crossentropy", "metrics": ["accuracy"],
        "optimizer": {"name": "adam", "learning_rate": 0.001}, "epochs": epochs,
        "callbacks": {"model_checkpoint": {"monitor": "val_loss", "save_best_only": True}},
    }


def run_arm(arm: str, job_spec: dict[str, Any]) -> tuple[float, int, int]:
    """One job through fit + RunRecord; (mean epoch seconds, database bytes written for the job,
    bytes of its files left in the store)."""
    from sqlalchemy import text

    from config.settings import get_settings
    from store import repo
    from store.artifact_store import Stored, checkpoint_key, snapshot_key
    from store.db import session_scope
    from training import fit, validate_spec
    from worker.record import RunRecord

    settings = get_settings()
    with session_scope() as s:
        job_id = repo.create_job(s, spec=validate_spec(job_spec).model_dump(mode="json"), queue="bench").id
    with session_scope() as s:
        job = repo.claim_job(s, job_id, "bench:1", settings.heartbeat_stale_s)
        assert job is not None
        token = job.lease_token

    class InDatabase(RunRecord):
        """The worker's reporter as before the artifact store: the bytes go into the database, in
        the fenced transaction; the metadata rows are the store arm's (no file is written)."""

        def _stage(self, checkpoints: Any, snapshot: Any) -> None:
            for c in checkpoints:
                self._staged[checkpoint_key(job_id, c.sha256)] = Stored(f"db/{c.sha256}", len(c.data), c.sha256)
            if snapshot is not None:
                self._staged[snapshot_key(job_id, snapshot.sha256)] = Stored(f"db/{snapshot.sha256}",
                                                                             len(snapshot.data), snapshot.sha256)

        def _write_items(self, s: Any, batch: Any, info: Any, checkpoints: Any, snapshot: Any) -> bool:
            for item in [*checkpoints, *([snapshot] if snapshot is not None else [])]:
                s.execute(text("INSERT INTO bench_blobs (job_id, data) VALUES (:j, :d)"), {"j": job_id, "d": item.data})
            return super()._write_items(s, batch, info, checkpoints, snapshot)

    class NoSnapshots(RunRecord):
        def wants_snapshot(self) -> bool:
            return False

    cls = {"store": RunRecord, "database": InDatabase, "none": NoSnapshots}[arm]
    reporter = cls(job_id, settings, lease_token=token)
    started = time.perf_counter()
    result = fit(job_spec, reporter=reporter, should_stop=reporter.should_stop)
    reporter.flush(block=True, force=True)
    seconds = (time.perf_counter() - started) / max(1, result.epochs_run)
    with session_scope() as s:
        size = 0
        for table in ("checkpoints", "snapshots", "job_metrics", "job_events", "bench_blobs"):
            size += int(s.scalar(text(f"SELECT coalesce(sum(pg_column_size(t.*)), 0) FROM {table} t WHERE job_id = :j"),
                                 {"j": job_id}) or 0)
        size += int(s.scalar(text("SELECT pg_column_size(t.*) FROM jobs t WHERE id = :j"), {"j": job_id}) or 0)
    folder = Path(settings.artifacts_url) / "jobs" / job_id
    files = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.exists() else 0
    return seconds, size, files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--units", type=int, default=768)
    parser.add_argument("--cap", action="store_true",
                        help="instead: one job of 2 hidden layers of 9,800 units (96.8 M parameters, near the "
                             "service's 100 M cap: a 1.2 GB Adam snapshot) for two epochs of 2 steps, store arm only")
    args = parser.parse_args()

    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = f"trainyard_artifacts_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(PG_URL).set(database=name).render_as_string(hide_password=False)
    tmp = tempfile.TemporaryDirectory()
    os.environ.update({"TRAINYARD_DATABASE_URL": url, "TRAINYARD_DATA_DIR": tmp.name,
                       "TRAINYARD_SNAPSHOT_INTERVAL": "0", "TRAINYARD_FLUSH_INTERVAL": "0.5"})
    try:
        import torch

        from store.db import get_engine, reset_caches
        from store.migrate import upgrade

        torch.set_num_threads(1)
        reset_caches()
        upgrade(url)
        with get_engine().begin() as c:
            c.execute(text("CREATE TABLE bench_blobs (id serial PRIMARY KEY, job_id varchar(32), data bytea)"))
        if args.cap:
            args.units, args.epochs = 9800, 2  # a snapshot at the end of epoch 1 (none after the last)
        job_spec = spec(args.units, args.epochs)
        params = 64 * args.units + args.units + args.units * args.units + args.units + args.units * 10 + 10
        if args.cap:
            job_spec["data"]["batch_size"] = 1024  # 2 steps per epoch
            started = time.perf_counter()
            t, size, files = run_arm("store", job_spec)
            print(f"model: {params:,} parameters; two epochs in {time.perf_counter() - started:.0f} s; "
                  f"database bytes written for the job: {size:,}; its files in the store: {files:,} bytes")
            for p in sorted((Path(tmp.name) / "artifacts").rglob("*")):
                if p.is_file():
                    print(f"  {p.relative_to(Path(tmp.name) / 'artifacts')}: {p.stat().st_size:,} bytes")
            return
        print(f"model: {params:,} parameters; {args.epochs} epochs; snapshot every epoch; "
              f"load average {os.getloadavg()[0]:.1f} at start")
        run_arm("none", job_spec)  # warm-up (imports, dataset, allocator)
        arms = ["store", "database", "none"]
        times: dict[str, list[float]] = {a: [] for a in arms}
        sizes: dict[str, tuple[int, int]] = {}
        for r in range(args.rounds):
            order = arms if r % 2 == 0 else arms[::-1]
            for arm in order:
                t, size, files = run_arm(arm, job_spec)
                times[arm].append(t)
                sizes[arm] = (size, files)
            print(f"round {r + 1}: " + ", ".join(f"{a} {times[a][-1] * 1000:.0f} ms/epoch" for a in arms))
        med = {a: statistics.median(times[a]) for a in arms}
        print(f"\nload average {os.getloadavg()[0]:.1f} at the end")
        print("| arm | median epoch time | database bytes written per job | files left in the store per job |")
        print("| --- | --- | --- | --- |")
        for a in arms:
            print(f"| {a} | {med[a] * 1000:.0f} ms | {sizes[a][0]:,} | {sizes[a][1]:,} |")
        print(f"\nstore / database epoch time: {med['store'] / med['database']:.3f} (issue 14: <= 1.02)")
        print(f"store / none epoch time: {med['store'] / med['none']:.3f}")
    finally:
        from store.db import reset_caches

        reset_caches()
        tmp.cleanup()
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


if __name__ == "__main__":
    main()
