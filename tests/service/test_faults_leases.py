"""Leases, the reconciler, the outbox, refusing corrupt or pickled state, numeric faults and
concurrent migrations: the parts of issue 4 that need no process to be killed (fast)."""

from __future__ import annotations

import math
import os
import pickle
import subprocess
import sys
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic.script import ScriptDirectory
from sqlalchemy import func, inspect, select, text, update

from config.settings import get_settings, settings_from_env
from orchestration import recovery
from store import leases, outbox, repo
from store.db import make_engine, session_scope
from store.migrate import alembic_config
from store.models import Checkpoint, Job, JobMetric, Outbox
from training import BaseReporter, fit, validate_spec
from worker.record import RunRecord
from worker.runner import run_job

from .helpers import ROOT, wait_status
from .test_faults_kit import tiny_spec


def _job(spec: dict[str, Any], queue: str, **values: Any) -> str:
    with session_scope() as s:
        job_id = repo.create_job(s, spec=validate_spec(spec).model_dump(mode="json"), queue=queue).id
        if values:
            s.execute(update(Job).where(Job.id == job_id).values(**values))
    return job_id


def _claim(job_id: str, worker: str = "w:1", stale: float = 300.0) -> Job:
    with session_scope() as s:
        job = repo.claim_job(s, job_id, worker, stale)
        assert job is not None
        return job


def _age_heartbeat(job_id: str, seconds: float = 3600) -> None:
    with session_scope() as s:
        s.execute(update(Job).where(Job.id == job_id).values(heartbeat_at=repo.utcnow() - timedelta(seconds=seconds)))


def _metric_epochs(job_id: str) -> list[int]:
    with session_scope(write=False) as s:
        return list(s.scalars(select(JobMetric.epoch).where(JobMetric.job_id == job_id).order_by(JobMetric.epoch)))


def test_a_second_claim_fences_the_first_attempt(inproc_env):
    settings = settings_from_env(inproc_env)
    job_id = _job(tiny_spec(epochs=5), settings.queue_name("cpu"))
    first = _claim(job_id)
    assert (first.attempts, first.lease_token) == (1, 1)
    old = RunRecord(job_id, settings, lease_token=first.lease_token)
    old.on_epoch({"epoch": 1, "loss": 1.0})
    old.flush(force=True)
    assert _metric_epochs(job_id) == [1]

    with session_scope() as s:  # a duplicate delivery while the lease is fresh: not claimable
        assert repo.claim_job(s, job_id, "w:2", 300.0) is None
    _age_heartbeat(job_id)  # the first worker stalls past its lease; another takes over
    second = _claim(job_id, "w:2")
    assert (second.attempts, second.lease_token) == (2, 2)

    old.on_epoch({"epoch": 2, "loss": 0.5})
    with pytest.raises(leases.LeaseLost):
        old.flush(force=True)
    with pytest.raises(leases.LeaseLost):  # the read-only poll notices too
        RunRecord(job_id, settings, lease_token=1).flush()
    with session_scope() as s, pytest.raises(leases.LeaseLost):
        leases.fence(s, job_id, first.lease_token)
    assert _metric_epochs(job_id) == [1]  # nothing of the old attempt landed

    new = RunRecord(job_id, settings, lease_token=second.lease_token)
    new.on_epoch({"epoch": 2, "loss": 0.4})
    new.flush(force=True)
    with session_scope() as s:
        assert repo.finish_job(s, job_id, status="succeeded", stop_reason="completed")
    with session_scope() as s, pytest.raises(leases.LeaseLost):  # a finished job has no lease at all
        leases.fence(s, job_id, second.lease_token)
    assert _metric_epochs(job_id) == [1, 2]


def test_the_reconciler_requeues_a_lost_job_and_fails_it_after_max_attempts(inproc_env):
    settings = settings_from_env(inproc_env).replace(queue_prefix=f"recon-{uuid.uuid4().hex[:6]}-")
    queue = settings.queue_name("cpu")
    sent: list[tuple[str, str]] = []
    job_id = _job(tiny_spec(), queue, max_attempts=2)
    fresh = _job(tiny_spec(), queue)
    _claim(fresh)  # a running job with a fresh heartbeat is left alone

    _claim(job_id)
    _age_heartbeat(job_id, 10)
    assert recovery.reconcile(5.0, sent.extend, [queue]) == ([job_id], [])
    assert sent == [(job_id, queue)]
    with session_scope(write=False) as s:
        assert s.get(Job, job_id).status == "queued"
        # its message was sent at once, so its outbox rows are gone
        assert s.scalar(select(func.count()).select_from(Outbox).where(Outbox.job_id == job_id)) == 0
    assert recovery.reconcile(5.0, sent.extend, [queue]) == ([], [])  # once only

    _claim(job_id)  # attempt 2 = max_attempts, lost too
    _age_heartbeat(job_id, 10)
    with session_scope() as s:  # a redelivered message cannot take it over
        assert repo.claim_job(s, job_id, "w:3", 5.0) is None
    assert recovery.reconcile(5.0, sent.extend, [queue]) == ([], [job_id])
    with session_scope(write=False) as s:
        job = s.get(Job, job_id)
        assert (job.status, job.stop_reason, job.attempts) == ("failed", "worker_lost", 2)
        assert "max_attempts is 2" in job.error
        assert s.get(Job, fresh).status == "running"


def test_the_outbox_relay_sends_old_rows_once_and_keeps_them_while_the_broker_is_down(inproc_env):
    queue = f"relay-{uuid.uuid4().hex[:6]}-cpu"
    job_id = _job(tiny_spec(), queue)

    def down(jobs: Any) -> None:
        raise ConnectionError("broker down")

    assert outbox.relay(down, queues=[queue], resend_after_s=0) == 0
    with session_scope(write=False) as s:
        row = s.scalars(select(Outbox).where(Outbox.job_id == job_id)).one()
        assert row.attempts == 1 and "broker down" in row.last_error
    sent: list[tuple[str, str]] = []
    assert outbox.relay(sent.extend, queues=[queue], resend_after_s=60) == 0  # too young: its sender may still send it
    assert outbox.relay(sent.extend, queues=[queue], resend_after_s=0) == 1
    assert sent == [(job_id, queue)]
    assert outbox.relay(sent.extend, queues=[queue], resend_after_s=0) == 0


class _Planted:
    """Unpickling this creates the marker file: proof that pickle.loads ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (open, (str(self.marker), "w"))


def _resume_with(job_id: str, data: bytes, sha256: str, settings: Any) -> Job:
    with session_scope() as s:
        repo.save_snapshot(s, job_id, epoch=1, step=12, data=data, sha256=sha256)
        assert repo.requeue_job(s, job_id, "test")
    assert run_job(job_id, settings) == "failed"
    with session_scope(write=False) as s:
        return s.get(Job, job_id)


def test_a_planted_pickle_or_corrupt_snapshot_is_refused_on_resume_and_never_unpickled(inproc_env, tmp_path):
    settings = settings_from_env(inproc_env)
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Planted(marker))

    job_id = _job(tiny_spec(epochs=3), settings.queue_name("cpu"))
    _claim(job_id)
    job = _resume_with(job_id, payload, repo.sha256_hex(payload), settings)  # a matching digest
    assert job.status == "failed" and "cannot resume" in job.error and "snapshot" in job.error, job.error
    assert not marker.exists()

    # real snapshot bytes with one bit flipped: the digest no longer matches
    class Grab(BaseReporter):
        snap: Any = None

        def on_snapshot(self, snapshot: Any) -> None:
            self.snap = self.snap or snapshot

    grab = Grab()
    fit(tiny_spec(epochs=2), reporter=grab)
    corrupt = bytearray(grab.snap.data)
    corrupt[-1] ^= 1
    job_id = _job(tiny_spec(epochs=3), settings.queue_name("cpu"))
    _claim(job_id)
    job = _resume_with(job_id, bytes(corrupt), grab.snap.sha256, settings)
    assert job.status == "failed" and "corrupt" in job.error and "sha256" in job.error, job.error
    assert pickle.loads(payload) is not None and marker.exists()  # (the payload was live all along)


def test_a_corrupt_or_pickled_best_checkpoint_is_never_served(app_client, inproc_env, tmp_path):
    settings = settings_from_env(inproc_env)
    good = b"x" * 8
    ids = []
    for data, digest in (
        (pickle.dumps(_Planted(tmp_path / "pwned")), None),  # a pickle with its own (matching) digest
        (good, "0" * 64),  # bytes whose digest no longer matches
    ):
        job_id = _job(tiny_spec(), settings.queue_name("cpu"))
        _claim(job_id)
        with session_scope() as s:
            repo.add_checkpoint(s, job_id, epoch=1, step=1, monitor="val_loss", value=1.0, data=data,
                                sha256=digest or repo.sha256_hex(data), is_best=True)
            repo.finish_job(s, job_id, status="succeeded", stop_reason="completed")
        ids.append(job_id)
    pickled, mismatched = (app_client.get(f"/v1/jobs/{j}/checkpoints/best") for j in ids)
    assert pickled.status_code == 500 and "not a safetensors file" in pickled.json()["detail"]
    assert mismatched.status_code == 500 and "corrupt" in mismatched.json()["detail"] and "sha256" in mismatched.json()["detail"]
    assert b"pwned" not in pickled.content and not (tmp_path / "pwned").exists()
    with session_scope(write=False) as s:  # the checkpoint rows are untouched
        assert s.scalar(select(func.count()).select_from(Checkpoint).where(Checkpoint.job_id.in_(ids))) == 2


@pytest.mark.parametrize("optimizer", [{"name": "sgd", "learning_rate": 1e10},
                                       {"name": "sgd", "learning_rate": 1e10, "momentum": 0.9}])
def test_an_exploding_learning_rate_ends_the_job_within_one_step_and_its_metrics_read_back(client, optimizer):
    spec = tiny_spec(f"numeric-{uuid.uuid4().hex[:6]}", epochs=50, optimizer=optimizer)
    job = wait_status(client, client.submit(spec)["id"], ("succeeded", "failed", "cancelled"), timeout=120)
    assert job["status"] == "failed" and job["stop_reason"] in ("non_finite_loss", "diverged"), job
    epochs = client.metrics(job["id"])
    steps_per_epoch = math.ceil(1797 * 0.8 / 128)
    assert job["progress"]["epoch"] == len(epochs) == 1, epochs  # stopped in the first epoch ...
    assert job["steps"] <= 2 < steps_per_epoch  # ... within one step of the first non-finite loss
    assert epochs[0]["loss"] in ("NaN", "Infinity", "-Infinity"), epochs  # non-finite values read back as strings
    assert "non-finite" in job["error"] or "NaN" in job["error"]


def _migrate(env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "client.cli", "migrate"], env=env, cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
def test_two_migrations_at_once_are_safe(pg, tmp_path, backend):
    url = pg.create(f"mig2_{uuid.uuid4().hex[:6]}") if backend == "postgresql" else f"sqlite:///{tmp_path / 'two.db'}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRAINYARD_DATABASE_URL": url, "TRAINYARD_DATA_DIR": str(tmp_path)}
    procs = [_migrate(env) for _ in range(2)]
    outs = [p.communicate(timeout=180) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
        assert "database at head" in out
    engine = make_engine(url)
    try:
        assert "outbox" in inspect(engine).get_table_names()
        with engine.connect() as c:
            head = ScriptDirectory.from_config(alembic_config(url)).get_current_head()
            assert c.execute(text("SELECT version_num FROM alembic_version")).scalars().all() == [head]
    finally:
        engine.dispose()


def test_settings_of_the_fault_tests_reach_the_worker():
    s = settings_from_env({"TRAINYARD_HEARTBEAT_STALE": "3", "TRAINYARD_SNAPSHOT_INTERVAL": "0",
                           "TRAINYARD_VISIBILITY_TIMEOUT": "2"})
    assert (s.heartbeat_stale_s, s.snapshot_interval_s, s.visibility_timeout_s) == (3.0, 0.0, 2)
    assert recovery.reconcile_interval(s.heartbeat_stale_s) <= 1.0
    assert recovery.reconcile_interval(get_settings().heartbeat_stale_s) <= 30.0  # lease + 30 s at most by default


def test_queued_jobs_whose_messages_redis_lost_are_sent_again(inproc_env, redis_client):
    """A Redis restart without persistence loses the messages of queued jobs: the API's
    reconciler sees an empty queue with old queued jobs (no outbox row) and sends them again."""
    from api.dispatch import Dispatcher

    settings = settings_from_env(inproc_env).replace(queue_prefix=f"lost-{uuid.uuid4().hex[:6]}-")
    queue = settings.queue_name("cpu")
    old = _job(tiny_spec(), queue, updated_at=repo.utcnow() - timedelta(minutes=5))
    young = _job(tiny_spec(), queue)
    with session_scope() as s:
        outbox.forget_jobs(s, [old, young])  # their messages were sent (and then lost with Redis)
    dispatcher = Dispatcher(settings)
    try:
        assert dispatcher.resend_lost_messages() == [old]
        assert dispatcher.queue_depths()[queue] == 1
        assert dispatcher.resend_lost_messages() == []  # the queue holds a message now
    finally:
        for key in redis_client.scan_iter(match=f"{settings.queue_prefix}*"):
            redis_client.delete(key)


def test_a_packs_results_commit_in_one_transaction_and_a_taken_member_writes_nothing(inproc_env):
    """``FlushGroup.finish``: the members' results (their last buffered epochs and the final rows)
    commit in one transaction, each part behind its own fence; a member another attempt took over
    writes nothing and is answered ``lease_lost``, and its new owner's lease is untouched."""
    import threading

    from sqlalchemy import event

    from store.db import get_engine
    from training import FitResult
    from worker.record import FlushGroup

    settings = settings_from_env(inproc_env)
    ids = [_job(tiny_spec(epochs=1), settings.queue_name("cpu")) for _ in range(3)]
    records = [RunRecord(i, settings, lease_token=_claim(i).lease_token) for i in ids]
    group = FlushGroup(records)
    for r in records:
        r.on_epoch({"epoch": 1, "loss": 0.5})  # buffered (flush_interval_s has not passed)
    _age_heartbeat(ids[2])
    taken = _claim(ids[2], "w:2")  # another attempt owns the third member now

    def result(reason: str) -> FitResult:
        return FitResult(history=[{"epoch": 1, "loss": 0.5}], stop_reason=reason, best_epoch=None, best_value=None,
                         monitor=None, stopped_epoch=None, epochs_run=1, steps=3, weights={}, best_checkpoint=None)

    commits: list[int] = []
    me = threading.current_thread()
    listener = lambda conn: commits.append(1) if threading.current_thread() is me else None  # noqa: E731  # not other tests' threads
    event.listen(get_engine(), "commit", listener)
    try:
        out = group.finish([(records[0], result("completed")), (records[1], result("early_stopping")),
                            (records[2], result("completed"))])
    finally:
        event.remove(get_engine(), "commit", listener)
    assert out == {ids[0]: "succeeded", ids[1]: "succeeded", ids[2]: "lease_lost"}
    assert len(commits) == 1
    with session_scope(write=False) as s:
        jobs = [s.get(Job, i) for i in ids]
        assert [(j.status, j.stop_reason, j.steps) for j in jobs[:2]] == [("succeeded", "completed", 3),
                                                                           ("succeeded", "early_stopping", 3)]
        assert (jobs[2].status, jobs[2].lease_token, jobs[2].worker) == ("running", taken.lease_token, "w:2")
    assert [_metric_epochs(i) for i in ids] == [[1], [1], []]  # the taken member's epoch was not written
    assert records[0].buffer == [] and records[2].buffer == [{"epoch": 1, "loss": 0.5}]
    with session_scope() as s:  # the new attempt ends it (no later test's worker may take it over)
        assert repo.finish_job(s, ids[2], status="cancelled", stop_reason="cancelled")


def test_a_packs_one_heartbeat_thread_beats_for_every_member_and_notices_a_lost_lease(inproc_env):
    """A pack's heartbeat (``pack_heartbeat``: one thread for all members) bumps every
    member's heartbeat each interval in one statement; a member whose lease another attempt took
    gets LeaseLost at its next poll and is beaten no more, while the others' heartbeats go on."""
    import time

    from worker.record import pack_heartbeat

    settings = settings_from_env({**inproc_env, "TRAINYARD_HEARTBEAT_STALE": "0.8"})  # beats every 0.2 s
    ids = [_job(tiny_spec(epochs=5), settings.queue_name("cpu")) for _ in range(3)]
    claims = [_claim(j) for j in ids]
    records = [RunRecord(j, settings, lease_token=c.lease_token) for j, c in zip(ids, claims, strict=True)]

    def beats() -> dict[str, Any]:
        with session_scope(write=False) as s:
            return dict(s.execute(select(Job.id, Job.heartbeat_at).where(Job.id.in_(ids))).all())

    with pack_heartbeat(records):
        _age_heartbeat(ids[1])  # another worker takes the second member over
        taken = _claim(ids[1], "w:2")
        start = beats()
        time.sleep(0.7)
        later = beats()
        assert later[ids[0]] > start[ids[0]] and later[ids[2]] > start[ids[2]]  # beaten
        assert later[ids[1]] == start[ids[1]]  # the new owner's row: untouched
        assert records[1].lease_lost.is_set() and not records[0].lease_lost.is_set() and not records[2].lease_lost.is_set()
        with pytest.raises(leases.LeaseLost):
            records[1].should_stop()
    stopped = beats()
    time.sleep(0.5)
    assert beats() == stopped  # the thread stopped with the block
    assert taken.lease_token == 2


def test_a_member_whose_recording_fails_as_it_leaves_is_recorded_when_the_pack_ends(inproc_env, caplog, monkeypatch):
    """The transaction that records a member leaving its pack fails (the database went away for
    longer than its retries): the pack trains on, and the member is recorded when the pack ends,
    with every epoch it trained, as its solo run; nothing is lost or written twice."""
    import logging

    from worker import packs
    from worker.datasets import resolve_dataset
    from worker.record import FlushGroup

    settings = settings_from_env(inproc_env)
    specs = [tiny_spec("rec-0", epochs=1, seed=1), tiny_spec("rec-1", epochs=3, seed=2), tiny_spec("rec-2", epochs=3, seed=3)]
    ids = [_job(spec, settings.queue_name("cpu")) for spec in specs]
    claims = [_claim(j) for j in ids]
    members = [(j, c.lease_token, dict(c.spec), resolve_dataset(dict(c.spec), settings), None, c.epochs, c.attempts, None)
               for j, c in zip(ids, claims, strict=True)]
    finish, calls = FlushGroup.finish, []

    def fails_once(self: FlushGroup, results: list[Any]) -> dict[str, str]:
        calls.append([r.job_id for r, _ in results])
        if len(calls) == 1:
            raise RuntimeError("the database went away")
        return finish(self, results)

    monkeypatch.setattr(FlushGroup, "finish", fails_once)
    with caplog.at_level(logging.ERROR, logger="trainyard.worker"):
        status = packs._run_pack(members, settings, lambda jobs: None)
    assert calls[0] == [ids[0]] and ids[0] in calls[-1], calls  # left after epoch 1, recorded at the end
    assert "recording members that left it failed; retried when the pack ends" in caplog.text
    assert status == "succeeded"
    with session_scope(write=False) as s:
        jobs = {j: s.get(Job, j) for j in ids}
        rows = {j: [m.epoch for m in s.scalars(select(JobMetric).where(JobMetric.job_id == j).order_by(JobMetric.epoch))]
                for j in ids}
    assert [jobs[j].status for j in ids] == ["succeeded"] * 3
    assert rows == {ids[0]: [1], ids[1]: [1, 2, 3], ids[2]: [1, 2, 3]}, rows
    for j, spec in zip(ids, specs, strict=True):
        assert jobs[j].epoch == spec["epochs"] and jobs[j].info["pack"]["fused"] is True
        with session_scope(write=False) as s:
            loss = [m.values["loss"] for m in s.scalars(select(JobMetric).where(JobMetric.job_id == j).order_by(JobMetric.epoch))]
        solo = fit(spec)
        assert all(math.isclose(a, b["loss"], rel_tol=1e-5) for a, b in zip(loss, solo.history, strict=True)), (loss, solo.history)
