"""SQLAlchemy 2.0 models. The database is the truth; the broker only carries job ids.

Metric values are stored in JSON with non-finite floats encoded as the strings ``"NaN"``,
``"Infinity"`` and ``"-Infinity"`` (see :mod:`store.floats`), which every database's JSON accepts
and which ``float()`` reads back.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    false,
    func,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# "paused": a sweep trial stopped at an ASHA rung with its training state snapshotted, until the
# sweep promotes it (back to queued; it resumes from the snapshot) or ends it (pruned)
JOB_STATUSES = ("queued", "running", "paused", "succeeded", "failed", "cancelled")
TERMINAL_STATUSES = ("succeeded", "failed", "cancelled")

# BIGINT on PostgreSQL, INTEGER on SQLite (so it is the rowid and autoincrements).
BigIntPK = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


def _now_default() -> Any:
    return func.now()


DEFAULT_PROJECT = "default"  # the project of embedded mode and of rows made before 0003


class Project(Base):
    """Who owns jobs, datasets and sweeps. API keys belong to one project and see only it."""

    __tablename__ = "projects"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    # per-project limits (NULL: the service-wide default from Settings)
    max_concurrent_jobs: Mapped[int | None] = mapped_column(Integer)
    requests_per_minute: Mapped[int | None] = mapped_column(Integer)
    # fair share (store.scheduling): competing projects get worker time in proportion to it
    weight: Mapped[float] = mapped_column(Float, default=1.0, server_default="1")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ApiKey(Base):
    """A bearer token, stored as its sha256 only; ``prefix`` (the first characters of the
    token) is what ``keys list`` shows."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    name: Mapped[str | None] = mapped_column(String(200))
    prefix: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Sweep(Base):
    """A hyperparameter search whose trials are ordinary jobs (``jobs.sweep_id``)."""

    __tablename__ = "sweeps"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16), index=True)  # running | succeeded | failed | cancelled
    method: Mapped[str] = mapped_column(String(16))
    config: Mapped[dict[str, Any]] = mapped_column(JSON)  # the validated request (base spec, space, ...)
    objective_metric: Mapped[str] = mapped_column(String(100))
    objective_mode: Mapped[str] = mapped_column(String(8))
    max_trials: Mapped[int] = mapped_column(Integer)
    max_concurrent: Mapped[int] = mapped_column(Integer)
    # scheduling priority of its trials (each trial copies it; higher starts first)
    priority: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    trials_created: Mapped[int] = mapped_column(Integer, default=0)
    best_job_id: Mapped[str | None] = mapped_column(String(32))
    best_value: Mapped[str | None] = mapped_column(String(40))  # encoded float (store.floats)
    stop_reason: Mapped[str | None] = mapped_column(String(32))
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # dashboards' annotations (0004): string -> string labels and free text, set at create or by PATCH
    labels: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict, server_default="{}")
    notes: Mapped[str | None] = mapped_column(Text)


class Job(Base):
    __tablename__ = "jobs"
    # an Idempotency-Key is unique within its project (two projects may use the same key)
    __table_args__ = (
        UniqueConstraint("project_id", "idempotency_key", name="uq_jobs_project_id_idempotency_key"),
        # the claim's pick (store.scheduling): the best queued job of a queue, and queue positions
        Index("ix_jobs_queue_status_priority", "queue", "status", "priority", "created_at"),
        # the fair-share pick: a project's best queued job in a queue; a queue's recent usage
        Index("ix_jobs_queue_status_project_priority", "queue", "status", "project_id", "priority", "created_at"),
        Index("ix_jobs_queue_finished_at", "queue", "finished_at"),
        # the list's sort orders (GET /v1/jobs?order_by=updated|best), keyset-paged
        Index("ix_jobs_project_id_updated_at_id", "project_id", "updated_at", "id"),
        Index("ix_jobs_project_id_best_number_id", "project_id", "best_number", "id"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    project_id: Mapped[str] = mapped_column(
        ForeignKey("projects.id"), index=True, default=DEFAULT_PROJECT, server_default=DEFAULT_PROJECT
    )
    sweep_id: Mapped[str | None] = mapped_column(ForeignKey("sweeps.id", ondelete="CASCADE"), index=True)
    trial_number: Mapped[int | None] = mapped_column(Integer)  # 0-based trial number within its sweep
    trial_params: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # {"optimizer.learning_rate": 0.01, ...}
    name: Mapped[str] = mapped_column(String(200), index=True)
    status: Mapped[str] = mapped_column(String(16), index=True)
    queue: Mapped[str] = mapped_column(String(100))
    # higher starts first among the queued jobs of its queue (store.scheduling); default 0
    priority: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    # sha256 of the canonical JSON of the request body sent with the key (NULL before 0002)
    idempotency_hash: Mapped[str | None] = mapped_column(String(64))
    stop_reason: Mapped[str | None] = mapped_column(String(32))
    error: Mapped[str | None] = mapped_column(Text)
    epoch: Mapped[int] = mapped_column(Integer, default=0)
    epochs: Mapped[int] = mapped_column(Integer)
    steps: Mapped[int | None] = mapped_column(Integer)
    best_monitor: Mapped[str | None] = mapped_column(String(100))
    best_value: Mapped[str | None] = mapped_column(String(40))  # encoded float (store.floats)
    best_epoch: Mapped[int | None] = mapped_column(Integer)
    # best_value as a number for sorting (NULL when there is none or it is not finite)
    best_number: Mapped[float | None] = mapped_column(Float)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3, server_default="3")
    # fencing token: bumped by every claim; a worker's writes only apply while it still holds it
    lease_token: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # the highest epoch ever written, and a count bumped whenever an epoch row is overwritten,
    # deleted or written below it (0006): a reader that kept a job's epochs checks them by these
    # (store.bulkread); written by store.repo.record_progress and, on PostgreSQL, a row trigger.
    metrics_top: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    metrics_rewrites: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    # preemption (store.scheduling.request_preemptions): stop at the next step and requeue
    preempt_requested: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    worker: Mapped[str | None] = mapped_column(String(200))
    info: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    run_seconds: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    labels: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict, server_default="{}")
    notes: Mapped[str | None] = mapped_column(Text)


class JobMetric(Base):
    """One row per job and (1-based) epoch: the epoch's metrics as a JSON object."""

    __tablename__ = "job_metrics"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    epoch: Mapped[int] = mapped_column(Integer, primary_key=True)
    values: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class JobCurve(Base):
    """A finished job's whole curve, compacted when it reached a terminal status (0005): its epochs'
    stored JSON texts joined into one JSON array, so ``POST /v1/metrics/bulk`` reads one row per
    job instead of one per epoch (:mod:`store.curves`). Writing an epoch of the job drops it."""

    __tablename__ = "job_curves"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    n: Mapped[int] = mapped_column(Integer)  # epochs in the curve
    body: Mapped[str] = mapped_column(Text)  # "[{...},{...}]", each epoch's text as stored


class JobEvent(Base):
    """What ``GET /v1/jobs/{id}/events`` streams: state changes and epochs, with increasing ids
    (the SSE event ids, so a client resumes with Last-Event-ID). A sweep's own events (created,
    trial added, finished; 0005) share the table and its ids, with ``job_id`` null and
    ``sweep_id`` set, so ``GET /v1/events`` resumes across both with one Last-Event-ID."""

    __tablename__ = "job_events"
    __table_args__ = (Index("ix_job_events_job_id_id", "job_id", "id"),)

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    sweep_id: Mapped[str | None] = mapped_column(ForeignKey("sweeps.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(16))  # "state" | "epoch"; a sweep's: "created" | "trial" | "state"
    data: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Checkpoint(Base):
    """Model weights: a safetensors file in the artifact store (``uri``, a key relative to
    ``TRAINYARD_ARTIFACTS_URL``; store/artifact_store.py) with its size and sha256. ``is_best``
    marks the job's best. Files are kept for the best and the newest checkpoint of a job; older
    ones keep their metadata (``uri`` is NULL)."""

    __tablename__ = "checkpoints"
    __table_args__ = (Index("ix_checkpoints_job_id_epoch", "job_id", "epoch"),)

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    epoch: Mapped[int] = mapped_column(Integer)
    step: Mapped[int] = mapped_column(Integer)
    monitor: Mapped[str | None] = mapped_column(String(100))
    value: Mapped[str | None] = mapped_column(String(40))  # encoded float (store.floats)
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    is_best: Mapped[bool] = mapped_column(Boolean, default=False)
    uri: Mapped[str | None] = mapped_column(String(400))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Artifact(Base):
    """A job's model exported to another format (``torchscript``, ``onnx``, ``keras``) from one
    of its checkpoints (``checkpoint_sha256``). Produced by a worker (``trainyard.export``):
    ``pending`` until then, ``ready`` with its file in the artifact store (``uri``) and its
    ``sha256``, or ``failed`` with ``error``."""

    __tablename__ = "artifacts"
    __table_args__ = (UniqueConstraint("job_id", "format", "checkpoint_sha256", name="uq_artifacts_job_format_checkpoint"),)

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    format: Mapped[str] = mapped_column(String(16))
    checkpoint_sha256: Mapped[str] = mapped_column(String(64))
    checkpoint_epoch: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16))  # pending | ready | failed
    error: Mapped[str | None] = mapped_column(Text)
    size: Mapped[int | None] = mapped_column(BigInteger)
    sha256: Mapped[str | None] = mapped_column(String(64))
    uri: Mapped[str | None] = mapped_column(String(400))
    card: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # the model card (training.card) of the checkpoint
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Snapshot(Base):
    """The latest full training state of a job (for resuming after a lost worker, or a paused
    sweep trial): a file in the artifact store (``uri``). Deleted when the job ends."""

    __tablename__ = "snapshots"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    epoch: Mapped[int] = mapped_column(Integer)
    step: Mapped[int] = mapped_column(Integer)
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    uri: Mapped[str] = mapped_column(String(400))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Outbox(Base):
    """Jobs committed but not yet handed to the broker (written in the job's transaction, deleted
    once sent): a broker outage delays jobs, it does not lose or fail them."""

    __tablename__ = "outbox"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    queue: Mapped[str] = mapped_column(String(100))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Dataset(Base):
    """An uploaded array dataset, stored as ``.npz`` (x, y) under the data directory."""

    __tablename__ = "datasets"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    project_id: Mapped[str] = mapped_column(
        ForeignKey("projects.id"), index=True, default=DEFAULT_PROJECT, server_default=DEFAULT_PROJECT
    )
    name: Mapped[str] = mapped_column(String(200))
    filename: Mapped[str] = mapped_column(String(300))  # as uploaded
    format: Mapped[str] = mapped_column(String(8))  # "npz" | "csv"
    file: Mapped[str] = mapped_column(String(300))  # stored file, relative to the datasets dir
    task: Mapped[str] = mapped_column(String(16))
    input_shape: Mapped[list[Any]] = mapped_column(JSON)
    n_classes: Mapped[int | None] = mapped_column(Integer)
    n_targets: Mapped[int | None] = mapped_column(Integer)
    n_samples: Mapped[int] = mapped_column(Integer)
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)


class IdempotencyRecord(Base):
    """What a POST with an Idempotency-Key made, for the routes whose result is not one job
    (a batch, a sweep): replayed when the same key comes again with the same body (a single job's
    key lives on its row, ``jobs.idempotency_key``). Written in the transaction that made it."""

    __tablename__ = "idempotency_records"

    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), primary_key=True)
    scope: Mapped[str] = mapped_column(String(32), primary_key=True)  # "jobs.batch" | "sweeps"
    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    request_hash: Mapped[str] = mapped_column(String(64))
    result: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Webhook(Base):
    """A project's subscription: the events it wants POSTed to ``url``, signed with ``secret``."""

    __tablename__ = "webhooks"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    url: Mapped[str] = mapped_column(Text)
    events: Mapped[list[Any]] = mapped_column(JSON)  # "job.succeeded", ..., "val_accuracy >= 0.98"
    secret: Mapped[str] = mapped_column(String(200))
    description: Mapped[str | None] = mapped_column(String(500))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class WebhookDelivery(Base):
    """One event owed to one webhook: written in the transaction of the state change that caused
    it (the outbox pattern), sent by the API's delivery loop (store.webhooks) until the receiver
    answers 2xx or ``webhook_max_age_s`` passes. ``event_id`` is the same on every retry."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        UniqueConstraint("webhook_id", "dedup_key", name="uq_webhook_deliveries_webhook_id_dedup_key"),
        Index("ix_webhook_deliveries_status_next_attempt_at", "status", "next_attempt_at"),
        Index("ix_webhook_deliveries_webhook_id_id", "webhook_id", "id"),
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    webhook_id: Mapped[str] = mapped_column(ForeignKey("webhooks.id", ondelete="CASCADE"))
    event_id: Mapped[str] = mapped_column(String(32), unique=True)
    event: Mapped[str] = mapped_column(String(100))  # job.succeeded | ... | metric.threshold
    job_id: Mapped[str | None] = mapped_column(String(32))
    sweep_id: Mapped[str | None] = mapped_column(String(32))
    # set for events that happen once per job and webhook (a metric threshold crossed)
    dedup_key: Mapped[str | None] = mapped_column(String(300))
    data: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16))  # pending | delivered | failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
