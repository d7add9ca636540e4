"""The Celery app of the worker (``celery -A worker.main worker``)."""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from celery import Celery
from celery.exceptions import Reject
from celery.signals import (
    celeryd_init,
    setup_logging,
    worker_init,
    worker_process_init,
    worker_ready,
    worker_shutting_down,
)

from config.settings import Settings, get_settings
from orchestration.messages import sender
from store.broker import (
    EXPORT_TASK,
    RUN_JOB_TASK,
    celery_config,
    prepare_embedded_broker,
)

log = logging.getLogger("trainyard.worker")

#: the reason of the Reject that hands a job's message back to the broker
HAND_BACK = "the job could not run here now; handing the message back"


class QuietHandBack(logging.Filter):
    """Drop Celery's record of our own hand-back (a Reject logged at WARNING with its traceback):
    it is the normal end of a job that a shutting-down worker requeued, and worker.runner has
    already said so in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (isinstance(exc, Reject) and str(exc.reason) == HAND_BACK)


def _on_shutdown(**_: Any) -> None:
    from worker.record import SHUTDOWN

    SHUTDOWN.set()


def lower_priority(nice: int) -> int:
    """Raise this process's nice value to ``nice`` (never lower it; 0 leaves it alone) and return
    the value now in force. Training is throughput work: on a machine it shares with the API and
    the database (``trainyard serve``, a CPU worker beside the API), they should get the CPU first
    when both want it, or every poll waits behind a training step (BENCHMARKS.md, "Service").
    Threads started afterwards (torch's pool, the heartbeat) inherit it."""
    current = os.getpriority(os.PRIO_PROCESS, 0)
    if nice > current:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, nice)
        except OSError:  # a sandbox may forbid it; training still runs
            return current
    return os.getpriority(os.PRIO_PROCESS, 0)


def _forks(worker: Any) -> bool:
    """Whether the worker's pool forks children (prefork: Celery's default)."""
    pool = getattr(worker, "pool_cls", None)
    name = pool if isinstance(pool, str) else getattr(pool, "__module__", "") if pool is not None else ""
    return not any(kind in name for kind in ("solo", "threads", "gevent", "eventlet"))


def _on_worker_init(**signal: Any) -> None:
    lower_priority(get_settings().worker_nice)
    # Create the shutdown event (worker.record) before the prefork pool forks, so children share it.
    import worker.record  # noqa: F401

    # Import torch (and what a first job imports on first use: training.engine.warm_up) once at
    # start-up, so the first job does not pay for it (submit -> running). A
    # prefork parent imports it now, before it forks (never fork while a thread imports); a solo
    # worker imports it in a thread once it is ready, so it starts consuming (and resumes the jobs
    # of this host's dead workers) ~10 s sooner on a busy machine: a claim needs no torch.
    if _forks(signal.get("sender")):
        from training.engine import warm_up

        warm_up()
        _freeze()

    alive = os.environ.get("TRAINYARD_WORKER_HEARTBEAT_FILE")
    if alive:
        _start_liveness_file(Path(alive))


def _freeze() -> None:
    """After the start-up imports: keep them out of full garbage collections, as the API does
    (``config.process.freeze_startup_objects``; ``TRAINYARD_GC_FREEZE=0`` turns it off)."""
    if get_settings().gc_freeze:
        import gc

        from config.process import freeze_startup_objects

        freeze_startup_objects()
        log.info("start-up objects kept out of garbage collection: %d", gc.get_freeze_count())


def _warm_up() -> None:
    def imports() -> None:
        from training.engine import warm_up

        warm_up()
        _freeze()

    threading.Thread(target=imports, name="trainyard-warm-up", daemon=True).start()


def _on_worker_process_init(**_: Any) -> None:
    # A prefork child is forked from the main process, whose maintenance thread (reconciler,
    # outbox relay) holds pooled database connections: the child must never use the parent's
    # sockets (both would talk on one connection). Forget them here; the child opens its own.
    from store.db import get_engine

    get_engine().dispose(close=False)


def _start_liveness_file(path: Path, every_s: float = 10.0) -> None:
    """Touch ``path`` every ``every_s`` seconds from a daemon thread: a container healthcheck can
    tell a live worker (even one busy training, which cannot answer ``celery inspect ping``
    on the solo pool) from a hung or dead one by the file's age."""

    def beat() -> None:
        while True:
            path.touch()
            time.sleep(every_s)

    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    threading.Thread(target=beat, name="trainyard-liveness", daemon=True).start()


def create_celery(settings: Settings | None = None) -> Celery:
    """A Celery app configured from settings, with ``trainyard.run_job`` and ``trainyard.export``
    registered."""
    settings = settings or get_settings()
    app = Celery("trainyard")
    app.conf.update(celery_config(settings))
    trace_log = logging.getLogger("celery.app.trace")
    if not any(isinstance(f, QuietHandBack) for f in trace_log.filters):
        trace_log.addFilter(QuietHandBack())
    if settings.broker_url.startswith("sqla+"):
        from worker.embedded_broker import use_quiet_polling

        prepare_embedded_broker(settings.broker_url)  # the file exists before the channel watches it
        use_quiet_polling()

    @app.task(name=RUN_JOB_TASK, ignore_result=True, acks_late=True)
    def run_job(job_id: str) -> str:
        from config.logs import job_context
        from orchestration.sweeps import after_job
        from worker.runner import run_next_job

        ran = job_id
        with job_context(job_id):
            try:
                # the best queued job of this message's queue (priority, then age), maybe not job_id
                ran, outcome = run_next_job(job_id, settings, _send_jobs)
            finally:
                # a trial of a sweep that ended (however) advances its sweep; a no-op for other jobs
                after_job(ran, settings, _send_jobs)
        if outcome == "requeued":
            # shutting down (the job resumes on the next worker), or no database to claim it
            raise Reject(HAND_BACK, requeue=True)
        return outcome

    _ = run_job

    @app.task(name=EXPORT_TASK, ignore_result=True, acks_late=True)
    def export(artifact_id: int) -> str:
        from worker.exports import run_export

        return run_export(int(artifact_id), settings)

    _ = export

    _send_jobs = sender(app)

    forks = {"pool": True}

    def _on_init(**signal: Any) -> None:
        forks["pool"] = _forks(signal.get("sender"))
        # Before consuming: take over the jobs of this host's workers whose process is gone, so
        # their messages wait in the queue when this worker becomes ready (recovery in seconds).
        from worker.recovery import requeue_lost_jobs

        try:
            requeue_lost_jobs(app, settings)
        except Exception as exc:  # noqa: BLE001 - the reconciler's loop tries again
            log.warning("could not look for lost jobs at start-up: %s: %s", type(exc).__name__, exc)

    def _on_ready(**_: Any) -> None:
        from orchestration.services.sweep_keeper import SweepKeeper
        from worker.recovery import start_reaper

        log_devices()

        start_reaper(app, settings)
        SweepKeeper(settings, _send_jobs).start()  # advances sweeps whose last trial ended without a worker
        if not forks["pool"]:
            _warm_up()

    def _on_setup_logging(loglevel: Any = None, **_: Any) -> None:
        # connected, so Celery leaves logging to us: the one configuration of config.logs
        from config.logs import configure_logging

        configure_logging(settings, "worker", loglevel)

    def _on_celeryd_init(instance: Any = None, **_: Any) -> None:
        if settings.log_format == "json" and instance is not None:
            instance.quiet = True  # no start-up banner: every line of the output is a JSON object

    setup_logging.connect(_on_setup_logging, weak=False)
    celeryd_init.connect(_on_celeryd_init, weak=False)
    worker_ready.connect(_on_ready, weak=False)
    worker_shutting_down.connect(_on_shutdown, weak=False)
    worker_init.connect(_on_init, weak=False)  # first: the take-over needs no torch
    worker_init.connect(_on_worker_init, weak=False)
    worker_process_init.connect(_on_worker_process_init, weak=False)
    return app


def log_devices() -> None:
    """Say which devices this worker process trains on: the CUDA_VISIBLE_DEVICES it was given
    (``trainyard worker --gpus`` pins one per process) and what PyTorch sees through it."""
    import torch

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    count = torch.cuda.device_count()  # asks NVML; does not initialize CUDA before a prefork pool forks
    logging.getLogger("trainyard.worker").info(
        "trainyard worker pid %d: CUDA_VISIBLE_DEVICES=%s; torch sees %d CUDA device(s)",
        os.getpid(), "(unset)" if visible is None else visible, count,
    )


def default_queues(settings: Settings) -> list[str]:
    return settings.queue_names()

