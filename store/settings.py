"""Service settings, read from the environment once per process through :func:`get_settings`."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

DEFAULT_DATA_DIR = "./trainyard-data"


@dataclass(frozen=True)
class Settings:
    """Everything the API and the worker need to find the database, the broker and the files.

    ``queue_prefix`` namespaces the Celery queues (``<prefix>gpu``, ``<prefix>cpu``) and, on
    Redis, every key the broker writes, so several deployments (or test runs) can share one
    Redis without seeing each other's jobs.
    """

    database_url: str
    broker_url: str
    data_dir: Path
    queue_prefix: str = ""
    auto_queue: str = "gpu"  # where device "auto" jobs go
    max_upload_bytes: int = 100 * 2**20
    visibility_timeout_s: int = 7 * 24 * 3600  # longer than the longest job (Redis redelivery)
    flush_interval_s: float = 0.5  # worker: metric batches, heartbeats and cancel polls
    snapshot_interval_s: float = 60.0  # worker: how often a resume snapshot is written
    heartbeat_stale_s: float = 300.0  # a running job whose heartbeat is older may be taken over
    # Security (see README "Security"): "required" makes every /v1 request carry an API key;
    # "off" puts every caller in the default project (embedded mode on 127.0.0.1).
    auth: str = "required"
    # Limits; a project's own max_concurrent_jobs / requests_per_minute override the last two.
    max_body_bytes: int = 16 * 2**20  # JSON bodies (uploads have max_upload_bytes)
    max_json_depth: int = 64
    max_header_bytes: int = 32 * 2**10  # request line + headers (431 past it; api/server.py)
    header_timeout_s: float = 10.0  # a request's line + headers must arrive within this (408; 0: none)
    max_epochs: int = 100_000
    max_layers: int = 200
    max_parameters: int = 100_000_000
    max_batch_size: int = 65_536
    max_dataset_bytes: int = 2**30  # an uploaded dataset's arrays, uncompressed
    max_project_dataset_bytes: int = 10 * 2**30  # uploaded bytes of a project's stored datasets (0: none)
    max_concurrent_jobs: int = 1000  # queued + running, per project
    requests_per_minute: int = 6000  # per project, per API process (0: unlimited)
    max_event_streams: int = 32  # open /events streams per project, per API process (0: unlimited)
    # API process: after start-up, move every object into the garbage collector's permanent
    # generation (gc.freeze), so a full collection no longer walks the ~110k objects of the
    # imported libraries: that walk took ~70 ms, a stall of every request in flight. On for the
    # served API (TRAINYARD_GC_FREEZE=0 turns it off); off for apps built in-process (tests).
    gc_freeze: bool = False
    # Worker: the nice value it trains at (worker.app.lower_priority; 0 = the caller's own).
    worker_nice: int = 10

    @property
    def datasets_dir(self) -> Path:
        return self.data_dir / "datasets"

    def queue_name(self, base: str) -> str:
        """The broker queue that carries ``base`` ("gpu" or "cpu") jobs."""
        return f"{self.queue_prefix}{base}"

    def queue_for_device(self, device: str) -> str:
        """Jobs asking for ``cpu`` go to the cpu queue, ``cuda*`` to the gpu queue, ``auto`` to
        ``auto_queue`` (gpu unless configured)."""
        if device == "cpu":
            return self.queue_name("cpu")
        if device.startswith("cuda"):
            return self.queue_name("gpu")
        return self.queue_name(self.auto_queue)


def default_database_url(data_dir: Path) -> str:
    return f"sqlite:///{(data_dir / 'trainyard.db').resolve()}"


def default_broker_url(data_dir: Path) -> str:
    return f"sqla+sqlite:///{(data_dir / 'broker.sqlite').resolve()}"


def settings_from_env(env: os._Environ[str] | dict[str, str] | None = None) -> Settings:
    """Build settings from ``TRAINYARD_*`` variables (defaults: SQLite and the embedded
    SQLAlchemy broker under ``./trainyard-data``)."""
    e = os.environ if env is None else env
    data_dir = Path(e.get("TRAINYARD_DATA_DIR") or DEFAULT_DATA_DIR).resolve()
    auto_queue = e.get("TRAINYARD_AUTO_QUEUE", "gpu")
    if auto_queue not in ("gpu", "cpu"):
        raise ValueError(f"TRAINYARD_AUTO_QUEUE must be 'gpu' or 'cpu', got {auto_queue!r}")
    return Settings(
        database_url=e.get("TRAINYARD_DATABASE_URL") or default_database_url(data_dir),
        broker_url=e.get("TRAINYARD_BROKER_URL") or default_broker_url(data_dir),
        data_dir=data_dir,
        queue_prefix=e.get("TRAINYARD_QUEUE_PREFIX", ""),
        auto_queue=auto_queue,
        max_upload_bytes=int(e.get("TRAINYARD_MAX_UPLOAD_BYTES", 100 * 2**20)),
        visibility_timeout_s=int(e.get("TRAINYARD_VISIBILITY_TIMEOUT", 7 * 24 * 3600)),
        flush_interval_s=float(e.get("TRAINYARD_FLUSH_INTERVAL", 0.5)),
        snapshot_interval_s=float(e.get("TRAINYARD_SNAPSHOT_INTERVAL", 60.0)),
        heartbeat_stale_s=float(e.get("TRAINYARD_HEARTBEAT_STALE", 300.0)),
        auth=_auth_mode(e.get("TRAINYARD_AUTH") or "required"),
        max_body_bytes=int(e.get("TRAINYARD_MAX_BODY_BYTES", 16 * 2**20)),
        max_json_depth=int(e.get("TRAINYARD_MAX_JSON_DEPTH", 64)),
        max_header_bytes=int(e.get("TRAINYARD_MAX_HEADER_BYTES", 32 * 2**10)),
        header_timeout_s=float(e.get("TRAINYARD_HEADER_TIMEOUT", 10.0)),
        max_epochs=int(e.get("TRAINYARD_MAX_EPOCHS", 100_000)),
        max_layers=int(e.get("TRAINYARD_MAX_LAYERS", 200)),
        max_parameters=int(e.get("TRAINYARD_MAX_PARAMETERS", 100_000_000)),
        max_batch_size=int(e.get("TRAINYARD_MAX_BATCH_SIZE", 65_536)),
        max_dataset_bytes=int(e.get("TRAINYARD_MAX_DATASET_BYTES", 2**30)),
        max_project_dataset_bytes=int(e.get("TRAINYARD_MAX_PROJECT_DATASET_BYTES", 10 * 2**30)),
        max_concurrent_jobs=int(e.get("TRAINYARD_MAX_CONCURRENT_JOBS", 1000)),
        requests_per_minute=int(e.get("TRAINYARD_REQUESTS_PER_MINUTE", 6000)),
        max_event_streams=int(e.get("TRAINYARD_MAX_EVENT_STREAMS", 32)),
        worker_nice=int(e.get("TRAINYARD_WORKER_NICE") or 10),
        gc_freeze=(e.get("TRAINYARD_GC_FREEZE") or "1").strip().lower() not in ("0", "false", "no", "off"),
    )


def _auth_mode(value: str) -> str:
    if value not in ("required", "off"):
        raise ValueError(f"TRAINYARD_AUTH must be 'required' or 'off', got {value!r}")
    return value


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings (read from the environment on first call, then cached)."""
    return settings_from_env()
