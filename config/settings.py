"""Service settings: one pydantic-settings class, read from ``TRAINYARD_*`` environment variables
(and a ``.env`` file in the working directory) once per process through :func:`get_settings`.

Each knob has exactly one default, here. A bad value raises :class:`SettingsError`, whose message
names the variable, the value given and what is allowed; ``trainyard api``/``worker``/``serve``
print it and stop before starting anything.
"""

from __future__ import annotations

import contextvars
import functools
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict

ENV_PREFIX = "TRAINYARD_"
DEFAULT_DATA_DIR = "./trainyard-data"
#: The broker queues: ``gpu`` and ``cpu`` carry jobs that asked for a device; ``any`` carries
#: ``"device": "auto"`` jobs and every worker listens on it, whatever its other queues, so an
#: auto job runs on the first free worker (a CUDA one if that worker has a GPU, else the CPU).
BASE_QUEUES = ("gpu", "cpu", "any")


def _env(name: str) -> Any:
    """The variable of a knob whose name differs from its field (kept for compatibility)."""
    return Field(validation_alias=ENV_PREFIX + name)


class Settings(BaseSettings):
    """Everything the API and the worker need to find the database, the broker and the files.

    ``queue_prefix`` namespaces the Celery queues (``<prefix>gpu``, ``<prefix>cpu``) and, on
    Redis, every key the broker writes, so several deployments (or test runs) can share one
    Redis without seeing each other's jobs. Every field is read from ``TRAINYARD_<FIELD>``
    unless its ``validation_alias`` names another variable.
    """

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_file=".env", env_file_encoding="utf-8", extra="ignore", frozen=True,
        env_ignore_empty=True, populate_by_name=True, validate_default=True,
    )

    # Where things are. Empty URLs mean SQLite and the embedded broker under data_dir.
    data_dir: Path = Path(DEFAULT_DATA_DIR)
    database_url: str = ""
    broker_url: str = ""
    queue_prefix: str = ""
    auto_queue: Literal["any", "gpu", "cpu"] = "any"  # where device "auto" jobs go: any (every worker takes it)
    max_upload_bytes: int = Field(100 * 2**20, ge=1)
    # Redis redelivery of unacknowledged messages: longer than the longest job.
    visibility_timeout_s: int = Field(7 * 24 * 3600, ge=1, validation_alias="TRAINYARD_VISIBILITY_TIMEOUT")
    # Worker: metric batches, heartbeats and cancel polls at most this often.
    flush_interval_s: float = Field(0.5, gt=0, validation_alias="TRAINYARD_FLUSH_INTERVAL")
    # Worker: how often a resume snapshot is written (0: every epoch).
    snapshot_interval_s: float = Field(60.0, ge=0, validation_alias="TRAINYARD_SNAPSHOT_INTERVAL")
    # The lease: a running job whose heartbeat is older may be taken over (RELIABILITY.md).
    heartbeat_stale_s: float = Field(60.0, gt=0, validation_alias="TRAINYARD_HEARTBEAT_STALE")
    # A running job whose training made no step for this long ends its attempt (stop reason
    # "stalled") and is requeued like a lost worker's; a spec's stall_timeout_s overrides it; 0: never.
    stall_timeout_s: float = Field(900.0, ge=0)
    # Fair share (store.scheduling, README "Scheduler"): a project's worker time of the last this
    # many seconds counts against it when projects compete for a queue's free worker.
    fair_share_window_s: float = Field(3600.0, gt=0)
    # Preemption (off by default; set it on the API and the workers): a queued job that waited
    # this many seconds suspends a running lower-priority job of its project and queue, which is
    # requeued and resumes from its snapshot (README "Scheduler").
    preemption: bool = False
    preemption_grace_s: float = Field(10.0, ge=0)
    # Security (see README "Security"): "required" makes every /v1 request carry an API key;
    # "off" puts every caller in the default project (embedded mode on 127.0.0.1).
    auth: Literal["required", "off"] = "required"
    # Limits; a project's own max_concurrent_jobs / requests_per_minute override the last two.
    max_body_bytes: int = Field(16 * 2**20, ge=1)  # JSON bodies (uploads have max_upload_bytes)
    max_json_depth: int = Field(64, ge=1)
    max_header_bytes: int = Field(32 * 2**10, ge=1)  # request line + headers (431 past it; api/server.py)
    # a request's line + headers must arrive within this (408; 0: no limit)
    header_timeout_s: float = Field(10.0, ge=0, validation_alias="TRAINYARD_HEADER_TIMEOUT")
    max_epochs: int = Field(100_000, ge=1)
    max_layers: int = Field(200, ge=1)
    max_parameters: int = Field(100_000_000, ge=1)
    max_batch_size: int = Field(65_536, ge=1)
    max_dataset_bytes: int = Field(2**30, ge=1)  # an uploaded dataset's arrays, uncompressed
    max_project_dataset_bytes: int = Field(10 * 2**30, ge=0)  # uploaded bytes of a project's datasets (0: none)
    max_concurrent_jobs: int = Field(1000, ge=0)  # queued + running, per project
    # Packing (README "Packed jobs"): a worker that claims a job also claims queued jobs of the
    # same shape and trains them fused (training/fused.py), up to these budgets: members, and
    # floats (each member's parameters plus one batch of activations, training.fused.member_cost).
    # TRAINYARD_PACK=0 turns packing off for the server; a job spec's "pack": false for one job.
    # 64 members: a 200-job batch of the digits MLP ran 2.5-2.9 s packed in packs of 64 against
    # 2.8-3.2 s in packs of 32 (BENCHMARKS.md, Packed jobs, fifth session); the floats are the
    # budget that bounds a pack of larger models.
    pack: bool = True
    pack_max_members: int = Field(64, ge=1)
    pack_max_params: int = Field(20_000_000, ge=1)
    requests_per_minute: int = Field(6000, ge=0)  # per project, per API process (0: unlimited)
    max_event_streams: int = Field(32, ge=0)  # open /events streams per project, per API process (0: none)
    # API and worker processes: after start-up, move every object into the garbage collector's
    # permanent generation (gc.freeze, config.process), so a full collection no longer walks the
    # objects of the imported libraries: in the API ~110k (~70 ms, a stall of every request in
    # flight), in a worker ~440k (~100 ms in the middle of a pack) (TRAINYARD_GC_FREEZE=0 turns it
    # off; the tests' in-process apps do).
    gc_freeze: bool = True
    # Worker: the nice value it trains at (worker.app.lower_priority; 0 = the caller's own).
    worker_nice: int = Field(10, ge=0, le=19)
    # Worker: torch's intra-op CPU threads for every job it trains (0 = torch's default, one per
    # core). On a machine whose cores are busy with other work, 1 avoids the stalls of a parallel
    # op waiting for a descheduled thread, which hit a fused pack's larger ops hardest
    # (BENCHMARKS.md, "Packed jobs").
    torch_threads: int = Field(0, ge=0)
    # Worker: a job (or a fused pack's epoch) whose training step has fewer multiply-adds than
    # this (rows per step x the forward pass's multiply-adds per row x trials) trains on one
    # intra-op thread (training.threads): small steps are per-op overhead, and a parallel op waits
    # for its second thread whenever the cores are busy (BENCHMARKS.md, "2026-12-06
    # (seventh session)"). 0: every job on torch_threads.
    torch_one_thread_below: int = Field(2_000_000, ge=0)
    # Logging (config.logs): "text" for a terminal, "json" for one JSON object per line; the API's
    # one line per request (trainyard.access) only when access_log is on.
    log_format: Literal["text", "json"] = "text"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    access_log: bool = False
    # Browsers (dashboards, issue 11): origins allowed by CORS, comma-separated ("" = none); the
    # secret that signs session cookies ("" = one made once and kept in data_dir/session-secret);
    # how long a sign-in lasts.
    cors_origins: str = ""
    session_secret: str = ""
    session_max_age_s: int = Field(7 * 24 * 3600, ge=60, validation_alias="TRAINYARD_SESSION_MAX_AGE")
    # Worker: keep the training state after a job's last epoch (one snapshot row per job), so
    # POST /v1/jobs/{id}/continue can add epochs to it.
    keep_final_snapshot: bool = True
    # Webhooks (store.webhooks, api.webhook_delivery): the API's delivery loop polls every
    # webhook_poll_s; a failed delivery is retried after retry_base * 2**(tries-1) s (at most
    # webhook_retry_max_s apart) until webhook_max_age_s after the event (then it is "failed"); a
    # claimed delivery whose sender died is sent again after webhook_lease_s.
    webhook_poll_s: float = Field(1.0, gt=0)
    webhook_timeout_s: float = Field(10.0, gt=0)
    webhook_retry_base_s: float = Field(10.0, gt=0)
    webhook_retry_max_s: float = Field(3600.0, gt=0)
    webhook_max_age_s: float = Field(3 * 24 * 3600.0, gt=0)
    webhook_lease_s: float = Field(60.0, gt=0)
    webhook_concurrency: int = Field(8, ge=1, le=256)
    # The artifact store (store/artifact_store.py): where checkpoints, resume snapshots and
    # exports are written; the database keeps their size, sha256 and key. A directory path,
    # file://..., or s3://bucket/prefix (s3fs; endpoint and credentials below, or the standard
    # AWS_* variables / config files when empty). Empty: data_dir/artifacts.
    artifacts_url: str = ""
    artifacts_endpoint_url: str = ""  # an S3-compatible server (MinIO, Ceph, ...); "" = AWS
    artifacts_region: str = ""
    artifacts_key: str = ""  # access key id ("" = the standard AWS credential chain)
    artifacts_secret: str = ""
    # Downloads from a store that can presign URLs (S3) redirect there (307) for this long; 0:
    # the API streams the file itself.
    artifacts_presign_s: int = Field(3600, ge=0)

    @field_validator("data_dir", mode="after")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.resolve()

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _embedded_defaults(self) -> Settings:
        # the database and the broker default to SQLite files under data_dir (frozen: set once here)
        if not self.database_url:
            object.__setattr__(self, "database_url", default_database_url(self.data_dir))
        if not self.broker_url:
            object.__setattr__(self, "broker_url", default_broker_url(self.data_dir))
        if not self.artifacts_url:
            object.__setattr__(self, "artifacts_url", str(self.data_dir / "artifacts"))
        return self

    @property
    def datasets_dir(self) -> Path:
        return self.data_dir / "datasets"

    def queue_name(self, base: str) -> str:
        """The broker queue that carries ``base`` ("gpu", "cpu" or "any") jobs."""
        return f"{self.queue_prefix}{base}"

    def queue_names(self) -> list[str]:
        """Every broker queue (:data:`BASE_QUEUES`, prefixed)."""
        return [self.queue_name(q) for q in BASE_QUEUES]

    def queue_for_device(self, device: str) -> str:
        """Jobs asking for ``cpu`` go to the cpu queue, ``cuda*`` to the gpu queue, ``auto`` to
        ``auto_queue`` (``any``, which every worker takes, unless configured)."""
        if device == "cpu":
            return self.queue_name("cpu")
        if device.startswith("cuda"):
            return self.queue_name("gpu")
        return self.queue_name(self.auto_queue)

    def replace(self, **changes: Any) -> Settings:
        """A copy with ``changes`` (field names), validated like the environment's values."""
        return type(self).model_validate({**self.model_dump(), **changes})

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        given = _GIVEN_ENV.get()
        if given is not None:  # settings_from_env(env): exactly these variables
            return init_settings, _MappingSource(settings_cls, given)
        return init_settings, env_settings, dotenv_settings


class SettingsError(ValueError):
    """A ``TRAINYARD_*`` value that is not allowed; the message names each variable at fault."""


class _MappingSource(EnvSettingsSource):
    """Environment variables from a mapping instead of ``os.environ``."""

    def __init__(self, settings_cls: type[BaseSettings], env: Mapping[str, str]) -> None:
        self._given = env
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return {k.lower(): v for k, v in self._given.items() if v != ""}


_GIVEN_ENV: contextvars.ContextVar[Mapping[str, str] | None] = contextvars.ContextVar("trainyard_env", default=None)


def variable_name(field: str) -> str:
    """The environment variable that sets ``field``."""
    alias = Settings.model_fields[field].validation_alias
    return alias if isinstance(alias, str) else ENV_PREFIX + field.upper()


def _explain(exc: ValidationError) -> SettingsError:
    by_alias = {variable_name(f): f for f in Settings.model_fields}
    lines = []
    for err in exc.errors():
        key = str(err["loc"][0]) if err["loc"] else ""
        var = key if key in by_alias else variable_name(key) if key in Settings.model_fields else key
        lines.append(f"{var}={err.get('input')!r} is not allowed: {err['msg']}")
    return SettingsError("bad setting: " + "; ".join(lines))


@contextmanager
def _given(env: Mapping[str, str] | None) -> Iterator[None]:
    token = _GIVEN_ENV.set(env)
    try:
        yield
    finally:
        _GIVEN_ENV.reset(token)


def settings_from_env(env: Mapping[str, str] | None = None) -> Settings:
    """Settings from ``env`` (only those variables) or, by default, from ``os.environ`` and a
    ``.env`` file; defaults: SQLite and the embedded SQLAlchemy broker under ``./trainyard-data``.
    Raises :class:`SettingsError` naming each bad variable."""
    try:
        with _given(env):
            return Settings()
    except ValidationError as exc:
        raise _explain(exc) from None


def default_database_url(data_dir: Path) -> str:
    return f"sqlite:///{(data_dir / 'trainyard.db').resolve()}"


def default_broker_url(data_dir: Path) -> str:
    return f"sqla+sqlite:///{(data_dir / 'broker.sqlite').resolve()}"


_T = TypeVar("_T")

#: Held while a process-wide cache (the settings, the database engine, its sessionmakers) is
#: filled or cleared: a thread that read the environment before it changed (a test switching its
#: settings while a background service of the process polls) cannot store what it read after the
#: clear (``store.db.reset_caches``), which ``lru_cache`` alone allows.
CACHE_LOCK = threading.RLock()


def locked_cache(maxsize: int) -> Callable[[Callable[..., _T]], Callable[..., _T]]:
    """``functools.lru_cache(maxsize)`` whose filling and ``cache_clear`` hold :data:`CACHE_LOCK`."""

    def wrap(fn: Callable[..., _T]) -> Callable[..., _T]:
        cached = lru_cache(maxsize=maxsize)(fn)

        @functools.wraps(fn)
        def get(*args: Any, **kwargs: Any) -> _T:
            with CACHE_LOCK:
                return cached(*args, **kwargs)

        def cache_clear() -> None:
            with CACHE_LOCK:
                cached.cache_clear()

        get.cache_clear = cache_clear  # type: ignore[attr-defined]
        get.cache_info = cached.cache_info  # type: ignore[attr-defined]
        return get

    return wrap


@locked_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings (read from the environment on first call, then cached)."""
    return settings_from_env()
