"""A pack's members are written together (issue 13): claimed in one compare-and-set, their
checkpoints, best and last checkpoints and final rows in a few statements for all of them. Each
multi-job write must leave exactly what its one-job case, called once per job, leaves."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from config.settings import get_settings
from store import packing, repo, webhooks
from store.artifact_store import checkpoint_key, get_store
from store.db import make_engine
from store.migrate import upgrade
from store.models import DEFAULT_PROJECT, Checkpoint, Job, JobCurve, JobEvent, Snapshot, WebhookDelivery
from training import validate_spec

from .helpers import note_spec


@pytest.fixture()
def artifacts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The process's artifact store in a fresh folder (repo writes checkpoint files there)."""
    monkeypatch.setenv("TRAINYARD_ARTIFACTS_URL", str(tmp_path / "artifacts"))
    get_settings.cache_clear()
    yield tmp_path / "artifacts"
    get_settings.cache_clear()


def _ck(tag: str, epoch: int, best: bool) -> dict[str, Any]:
    data = f"{tag}: weights of epoch {epoch}".encode()
    return dict(epoch=epoch, step=10 * epoch, monitor="val_loss", value=1.0 / epoch, data=data,
                sha256=hashlib.sha256(data).hexdigest(), is_best=best)


#: per job (in pack order): its checkpoints (two flushes), the best to mark at the end (an epoch,
#: or a digest no row has), its last weights (an epoch already newest, or new bytes), and its end
PLAN: list[dict[str, Any]] = [
    # a plain run: best at epoch 2, last weights new, succeeded
    dict(flushes=[[(1, True), (2, True)], [(3, False)]], best=2, last="new",
         end=dict(status="succeeded", stop_reason="completed", best=("val_loss", 0.5, 2), steps=30, epochs_run=3,
                  run_seconds=1.5, info={"pack": {"fused": True}, "stopped_epoch": None, "attempt": 1})),
    # the best's file was dropped by a later best, then that best is marked again with its bytes
    dict(flushes=[[(1, True)], [(2, True), (3, False)]], best=1, last=3,
         end=dict(status="cancelled", stop_reason="cancelled", steps=20, epochs_run=2, run_seconds=0.25)),
    # keeps every file; no best row (a digest no row has); ran before (run_seconds added)
    dict(flushes=[[(1, False), (2, False)]], best=None, last="new", keep_all=True, ran=2.0,
         end=dict(status="failed", stop_reason="non_finite_loss", error="training stopped: the loss became NaN",
                  steps=20, epochs_run=2, run_seconds=0.5)),
    # no checkpoints at all, no last weights
    dict(flushes=[], best=None, last=None, end=dict(status="succeeded", stop_reason="early_stopping", epochs_run=1)),
]


def _state(s: Session, job_ids: list[str], files: Any) -> list[Any]:
    """What the writes leave of each job (its own id replaced, so two jobs compare equal)."""
    out = []
    for k, j in enumerate(job_ids):
        job = s.get(Job, j)
        assert job is not None
        s.refresh(job)

        def norm(x: Any, j: str = j, k: int = k) -> Any:
            if isinstance(x, dict):
                return {key: norm(v) for key, v in x.items()}
            if isinstance(x, list):
                return [norm(v) for v in x]
            return f"job{k}" if x == j else x

        row = (job.status, job.stop_reason, job.error, job.best_monitor, job.best_value, job.best_number, job.best_epoch,
               job.steps, job.epoch, job.run_seconds, norm(job.info), job.attempts, job.lease_token, job.worker,
               job.started_at is not None, job.finished_at is not None, job.heartbeat_at is not None)
        events = [(e.kind, norm(e.data)) for e in s.scalars(select(JobEvent).where(JobEvent.job_id == j).order_by(JobEvent.id))]
        cks = [(c.epoch, c.step, c.monitor, c.value, c.size, c.sha256, c.is_best, c.uri is not None,
                files.exists(checkpoint_key(j, c.sha256)))
               for c in s.scalars(select(Checkpoint).where(Checkpoint.job_id == j).order_by(Checkpoint.id))]
        curve = s.scalar(select(JobCurve.body).where(JobCurve.job_id == j))
        snapshot = s.scalar(select(Snapshot.epoch).where(Snapshot.job_id == j))
        hooks = sorted((d.event, d.status, str(norm({**d.data, "name": None})))
                       for d in s.scalars(select(WebhookDelivery).where(WebhookDelivery.job_id == j)))
        out.append((row, events, cks, curve, snapshot, hooks))
    return out


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
def test_pack_members_written_at_once_leave_what_one_at_a_time_leaves(backend, pg, tmp_path, artifacts):
    """``claim_queued``, ``add_checkpoints_many``, ``mark_best_checkpoints``, ``add_last_checkpoints``
    and ``finish_jobs`` for N jobs at once (a pack's claim, flush and finish) against ``claim_job``,
    ``add_checkpoints``, ``mark_best_checkpoint``, ``add_last_checkpoint`` and ``finish_job`` once
    per job: the same job rows, events, checkpoint rows, best, files kept and dropped, compacted
    curves, snapshots and webhook deliveries; a job another attempt ended is left alone by both."""
    url = pg.create("pack_writes") if backend == "postgresql" else f"sqlite:///{tmp_path / 'pack.db'}"
    upgrade(url)
    engine = make_engine(url)
    files = get_store()
    base = validate_spec(note_spec(3)).model_dump(mode="json")
    with Session(engine) as s:
        webhooks.create(s, project_id=DEFAULT_PROJECT, url="http://127.0.0.1:9/hook", secret="x",
                        events=["job.started", "job.succeeded", "job.failed", "job.cancelled"])
        groups: dict[str, list[str]] = {}
        for mode in ("one", "many"):
            ids = []
            for p in PLAN:
                spec = {**base, "keep_checkpoints": "all"} if p.get("keep_all") else base
                ids.append(repo.create_job(s, spec=spec, queue="cpu").id)
            ids.append(repo.create_job(s, spec=base, queue="cpu").id)  # cancelled before the claim
            groups[mode] = ids
        s.commit()
        for ids in groups.values():
            assert repo.request_cancel(s, ids[-1]) == "cancelled"
        s.commit()

        # the claim: one at a time (as the packs' members were), and all at once
        claimed_one = [repo.claim_job(s, j, "host:1", 300, take_over=False) for j in groups["one"]]
        claimed_many = packing.claim_members(s, groups["many"], "host:1", 300)
        s.commit()
        assert claimed_one[-1] is None and [j.id for j in claimed_many] == groups["many"][:-1]
        assert [(j.attempts, j.lease_token, j.status) for j in claimed_many] == [(1, 1, "running")] * len(PLAN)
        packing.mark_pack(s, groups["many"][:-1])
        s.commit()
        for k, j in enumerate(groups["many"][:-1]):
            info = s.scalar(select(Job.info).where(Job.id == j))
            assert info["pack"] == {"id": groups["many"][0], "jobs": groups["many"][:-1], "size": len(PLAN), "index": k}
        s.execute(update(Job).where(Job.id.in_(groups["many"][:-1])).values(info=None))  # not in the "one" jobs
        s.execute(delete(JobEvent).where(JobEvent.job_id.in_(groups["many"]), JobEvent.kind == "pack"))
        s.commit()

        for ids in groups.values():
            for p, j in zip(PLAN, ids, strict=False):
                repo.record_progress(s, j, [{"epoch": e, "loss": 1.0 / e} for e in range(1, p["end"]["epochs_run"] + 1)])
                repo.save_snapshot(s, j, epoch=1, step=10, data=b"state", sha256=hashlib.sha256(b"state").hexdigest())
                if p.get("ran"):
                    s.execute(update(Job).where(Job.id == j).values(run_seconds=p["ran"]))
        s.commit()

        # the flushes' checkpoints
        for flush in range(2):
            batches = {j: [_ck("w", e, b) for e, b in p["flushes"][flush]] for p, j in zip(PLAN, groups["one"], strict=False)
                       if flush < len(p["flushes"])}
            for j, items in batches.items():
                repo.add_checkpoints(s, j, items)
            repo.add_checkpoints_many(s, {m: [_ck("w", e, b) for e, b in p["flushes"][flush]]
                                          for p, m in zip(PLAN, groups["many"], strict=False) if flush < len(p["flushes"])})
            s.commit()

        # the end: best marked, last weights kept, the final row
        def best(p: dict[str, Any]) -> tuple[str, bytes | None]:
            if p["best"] is None:
                return "0" * 64, None
            ck = _ck("w", p["best"], True)
            return ck["sha256"], ck["data"]

        def last(p: dict[str, Any]) -> dict[str, Any] | None:
            if p["last"] is None:
                return None
            ck = _ck("last" if p["last"] == "new" else "w", p["end"]["epochs_run"] if p["last"] == "new" else p["last"], False)
            return {k: v for k, v in ck.items() if k != "is_best"}

        marked_one = {j: repo.mark_best_checkpoint(s, j, *best(p)) for p, j in zip(PLAN, groups["one"], strict=False)}
        marked_many = repo.mark_best_checkpoints(s, [(j, *best(p)) for p, j in zip(PLAN, groups["many"], strict=False)])
        assert list(marked_one.values()) == list(marked_many.values()) == [True, True, False, False]
        added_one = [repo.add_last_checkpoint(s, j, **last(p)) for p, j in zip(PLAN, groups["one"], strict=False)
                     if last(p) is not None]
        added_many = repo.add_last_checkpoints(s, {j: last(p) for p, j in zip(PLAN, groups["many"], strict=False)
                                                   if last(p) is not None})
        assert added_one == list(added_many.values()) == [True, False, True]
        ended_one = [repo.finish_job(s, j, **p["end"]) for p, j in zip(PLAN, groups["one"], strict=False)]
        ended_one.append(repo.finish_job(s, groups["one"][-1], status="succeeded"))  # not running: left alone
        ended_many = repo.finish_jobs(s, {j: p["end"] for p, j in zip(PLAN, groups["many"], strict=False)}
                                      | {groups["many"][-1]: {"status": "succeeded"}})
        s.commit()
        assert ended_one == [True] * len(PLAN) + [False]
        assert sorted(ended_many) == sorted(groups["many"][:-1])

        one, many = _state(s, groups["one"], files), _state(s, groups["many"], files)
        assert one == many
        # and what they leave is what the rules say
        rows = [r[0] for r in many]
        assert [r[0] for r in rows] == ["succeeded", "cancelled", "failed", "succeeded", "cancelled"]
        assert rows[2][9] == 2.5 and rows[0][9] == 1.5  # run_seconds added to what earlier runs recorded
        assert [r[4] for r in many] == [1, None, None, None, None]  # only a completed run keeps its final snapshot
        assert all(r[3] is not None for r in many[:4])  # curves compacted
        cks = [r[2] for r in many]
        # job 0: best epoch 2 (file kept), the last weights newest (file kept), the rest dropped
        assert [(c[0], c[6], c[7]) for c in cks[0]] == [(1, False, False), (2, True, True), (3, False, False), (3, False, True)]
        # job 1: epoch 1 best again, its dropped file brought back from its bytes; epoch 3 newest
        assert [(c[0], c[6], c[7], c[8]) for c in cks[1]] == [(1, True, True, True), (2, False, False, False),
                                                              (3, False, True, True)]
        assert all(c[7] for c in cks[2])  # keeps every file
        assert [sorted(e for e, *_ in r[5]) for r in many[:4]] == [["job.started", "job.succeeded"],
                                                                  ["job.cancelled", "job.started"],
                                                                  ["job.failed", "job.started"],
                                                                  ["job.started", "job.succeeded"]]
    engine.dispose()


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
def test_pausing_members_at_once_leaves_what_pausing_one_at_a_time_leaves(backend, pg, tmp_path, artifacts):
    """``pause_jobs`` (a pack's trials stopped at a rung, recorded together) against ``pause_job``
    once per job: the same rows (paused, steps, epoch, best, run_seconds added) and state events;
    a job asked to cancel, and one no longer running, are paused by neither."""
    url = pg.create("pack_pauses") if backend == "postgresql" else f"sqlite:///{tmp_path / 'pause.db'}"
    upgrade(url)
    engine = make_engine(url)
    files = get_store()
    base = validate_spec(note_spec(3)).model_dump(mode="json")
    plans = [dict(steps=10, epochs_run=1, best=("val_accuracy", 0.5, 1), run_seconds=0.25),
             dict(steps=30, epochs_run=3, best=None, run_seconds=None),
             dict(steps=10, epochs_run=1, best=("val_accuracy", float("nan"), 1), run_seconds=1.0),
             dict(steps=10, epochs_run=1, best=None, run_seconds=0.5)]  # asked to cancel: not paused
    with Session(engine) as s:
        groups = {mode: [repo.create_job(s, spec=base, queue="cpu").id for _ in range(len(plans) + 1)]
                  for mode in ("one", "many")}
        s.commit()
        for ids in groups.values():
            packing.claim_members(s, ids, "host:1", 300)
            s.execute(update(Job).where(Job.id == ids[1]).values(run_seconds=2.0))  # ran before: added to
            s.commit()
            assert repo.request_cancel(s, ids[3]) == "running"  # asked; the worker ends it
            assert repo.finish_job(s, ids[4], status="failed", stop_reason="error", error="gone")  # not running
            s.commit()
        paused_one = [j for p, j in zip([*plans, plans[0]], groups["one"], strict=True) if repo.pause_job(s, j, **p)]
        paused_many = repo.pause_jobs(s, dict(zip(groups["many"], [*plans, plans[0]], strict=True)))
        s.commit()
        assert paused_one == groups["one"][:3] and paused_many == groups["many"][:3]
        one, many = _state(s, groups["one"], files), _state(s, groups["many"], files)
        assert one == many
        assert [r[0][0] for r in many] == ["paused"] * 3 + ["running", "failed"]
        assert [r[0][9] for r in many[:3]] == [0.25, 2.0, 1.0]  # run_seconds added to what earlier runs recorded
        assert many[0][1][-1] == ("state", {"status": "paused", "epoch": 1})
    engine.dispose()
