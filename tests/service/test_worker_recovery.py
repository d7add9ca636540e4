"""Jobs survive their worker: a worker shutting down requeues its running job, which resumes on
the next worker from its snapshot; a job whose worker vanished is requeued and resumed."""

from __future__ import annotations

import signal
import subprocess
import time
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import update

from api.dispatch import Dispatcher
from config.settings import settings_from_env
from store import repo
from store.db import session_scope
from store.models import Job
from training import BaseReporter, fit, validate_spec
from worker.app import create_celery
from worker.record import SNAPSHOT_BUILD_EVERY_S
from worker.recovery import requeue_lost_jobs
from worker.runner import run_job

from .conftest import RUN_ID, cli
from .helpers import ROOT, long_spec, note_spec, stop, wait_for_log


def _job(session: Any, spec: dict[str, Any], queue: str) -> str:
    valid = validate_spec(spec).model_dump(mode="json")
    return repo.create_job(session, spec=valid, queue=queue).id


def _status(job_id: str) -> tuple[str, int, int]:
    with session_scope(write=False) as s:
        job = repo.get_job(s, job_id)
        assert job is not None
        return job.status, job.epoch, job.attempts


def _epoch_events_after_last_start(job_id: str) -> list[int]:
    with session_scope(write=False) as s:
        events = repo.events_after(s, job_id, 0, limit=100_000)
    starts = [i for i, e in enumerate(events) if e.kind == "state" and e.data.get("status") == "running"]
    return [e.data["epoch"] for e in events[starts[-1]:] if e.kind == "epoch"]


def _wait(pred: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.1)


def test_lost_worker_job_is_requeued_and_resumes_from_its_snapshot(inproc_env):
    settings = settings_from_env(inproc_env)
    spec = note_spec(4, device="cpu")
    with session_scope() as s:
        job_id = _job(s, spec, settings.queue_name("cpu"))
    with session_scope() as s:
        assert repo.claim_job(s, job_id, "lost-worker:1", settings.heartbeat_stale_s) is not None

    # the lost worker got through two epochs and wrote a snapshot, then vanished
    class Capture(BaseReporter):
        snap: Any = None
        epochs: list[dict[str, Any]] = []

        def on_epoch(self, metrics: dict[str, Any]) -> None:
            self.epochs.append(dict(metrics))

        def on_snapshot(self, snapshot: Any) -> None:
            if snapshot.epoch == 2:
                self.snap = snapshot

    cap = Capture()
    fit(spec, reporter=cap, should_stop=lambda: cap.snap is not None)
    assert cap.snap is not None
    with session_scope() as s:
        repo.record_progress(s, job_id, cap.epochs[:2])
        repo.save_snapshot(s, job_id, epoch=2, step=cap.snap.step, data=cap.snap.data, sha256=cap.snap.sha256)
        s.execute(update(Job).where(Job.id == job_id).values(heartbeat_at=repo.utcnow() - timedelta(hours=1)))

    assert job_id in requeue_lost_jobs(create_celery(settings), settings)
    assert _status(job_id)[0] == "queued"
    assert requeue_lost_jobs(create_celery(settings), settings) == []  # once only

    assert run_job(job_id, settings) == "succeeded"
    status, epoch, attempts = _status(job_id)
    assert (status, epoch, attempts) == ("succeeded", 4, 2)
    assert _epoch_events_after_last_start(job_id) == [3, 4]  # resumed, not restarted
    with session_scope(write=False) as s:
        assert [m["epoch"] for m in repo.metrics(s, job_id)] == [1, 2, 3, 4]


@pytest.mark.parametrize("concurrency", [1, 2])  # 2: prefork, the job runs in a pool child
def test_worker_shutdown_requeues_the_running_job_and_the_next_worker_resumes_it(service_env, inproc_env, tmp_path, concurrency):
    env = {**service_env, "TRAINYARD_QUEUE_PREFIX": f"ty-{RUN_ID}-shutdown{concurrency}-"}
    settings = settings_from_env(env)
    with session_scope() as s:
        job_id = _job(s, long_spec(device="cpu"), settings.queue_name("cpu"))
    Dispatcher(settings).send([(job_id, settings.queue_name("cpu"))])

    def start(n: int) -> subprocess.Popen[Any]:
        log = tmp_path / f"worker{n}.log"
        with log.open("wb") as f:
            proc = subprocess.Popen(cli("worker", "--queues", "cpu", "--concurrency", str(concurrency if n == 1 else 1),
                                        "--name", f"shutdown{concurrency}-{n}"), env=env, cwd=ROOT,
                                    stdout=f, stderr=subprocess.STDOUT)
        wait_for_log(log, " ready.", proc)
        return proc

    first = start(1)
    try:
        _wait(lambda: _status(job_id)[0] == "running" and _status(job_id)[1] >= 3)
        # the first snapshot is built SNAPSHOT_BUILD_EVERY_S into the training: the shutdown
        # writes it (without one, the job would rightly start over: less than that much work)
        time.sleep(SNAPSHOT_BUILD_EVERY_S + 0.3)
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=60) == 0
    finally:
        stop(first)
    status, stopped_at, attempts = _status(job_id)
    assert status == "queued" and attempts == 1
    # the clean shutdown says so in one line: no celery.exceptions.Reject record, no traceback
    log1 = (tmp_path / "worker1.log").read_text()
    assert "Traceback" not in log1 and "Reject" not in log1, log1[-3000:]
    assert log1.count(f"job {job_id} stopped for worker shutdown; requeued") == 1, log1[-3000:]
    with session_scope(write=False) as s:
        snap = repo.get_snapshot(s, job_id)
        assert snap is not None and snap.epoch >= 1

    second = start(2)
    try:
        _wait(lambda: _status(job_id)[2] == 2 and _status(job_id)[1] > stopped_at)
        with session_scope() as s:
            repo.request_cancel(s, job_id)
        _wait(lambda: _status(job_id)[0] == "cancelled", timeout=30)
    finally:
        stop(second)
    resumed = _epoch_events_after_last_start(job_id)
    assert resumed and resumed[0] == snap.epoch + 1  # continued after the snapshot, not from epoch 1
