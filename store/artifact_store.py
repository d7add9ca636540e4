"""The artifact store: checkpoints, resume snapshots and exports are files, not database values.

The database keeps each one's size, sha256 and ``uri``: a key relative to the store's root
(``TRAINYARD_ARTIFACTS_URL``), so a store can move (a bucket copied, a volume remounted) by
changing the setting alone. The store is reached through fsspec: a local or shared directory (the
embedded default, ``data_dir/artifacts``) or an S3-compatible bucket (s3fs).

- **Writes are atomic.** Locally the bytes go to a temporary name in the same directory, are
  fsynced and renamed into place; on S3 an object appears only when its single PUT or its
  multipart upload completes. A reader never sees half a file.
- **Reads are verified.** :meth:`ArtifactStore.read` checks the size and sha256 the database
  holds; a missing file is :class:`ArtifactMissing`, a changed one :class:`ArtifactCorrupt`,
  never bytes that are not the recorded ones.
- **Keys are content-addressed per job** (``jobs/<job id>/checkpoints/<sha256>.safetensors``):
  writing the same bytes twice (a transaction retried) lands on the same key, and everything of a
  job lies under ``jobs/<job id>/``, which deleting the job removes whole (with any file a rolled
  back transaction left behind).
- **Deletes wait for the commit** (:func:`discard_after_commit`): a file is removed only once the
  transaction that stopped referencing it has committed, so a rollback never leaves a row
  pointing at a deleted file.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import uuid
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import delete, event, select
from sqlalchemy.orm import Session

from config.settings import Settings, get_settings

log = logging.getLogger("trainyard.artifacts")

#: bytes read at a time when a file is hashed or streamed
CHUNK = 1 << 20
#: files :meth:`ArtifactStore.put_many` keeps open (and fsyncs together) at a time
PUT_TOGETHER = 64


class ArtifactError(RuntimeError):
    """A stored artifact that cannot be used; the message says which and why."""


class ArtifactMissing(ArtifactError):
    """The database records the artifact, the store has no file at its key."""


class ArtifactCorrupt(ArtifactError):
    """The stored file's size or sha256 is not the recorded one."""


@dataclass(frozen=True)
class Stored:
    uri: str
    size: int
    sha256: str


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def job_prefix(job_id: str) -> str:
    return f"jobs/{job_id}"


def checkpoint_key(job_id: str, sha256: str) -> str:
    return f"{job_prefix(job_id)}/checkpoints/{sha256}.safetensors"


def snapshot_key(job_id: str, sha256: str) -> str:
    return f"{job_prefix(job_id)}/snapshots/{sha256}.bin"


def export_key(job_id: str, fmt: str, sha256: str) -> str:
    return f"{job_prefix(job_id)}/exports/{fmt}-{sha256}"


class ArtifactStore:
    """Files under one root URL. Keys are ``/``-separated relative paths (see the key helpers)."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None, *, part_size: int = 50 * 2**20) -> None:
        import fsspec
        from fsspec.implementations.local import LocalFileSystem

        self.url = url
        self.part_size = part_size  # S3: a file of twice this or more goes up as a multipart upload
        self.fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
        self.local = isinstance(self.fs, LocalFileSystem)
        self.root = root.rstrip("/") if not self.local else str(Path(root).resolve())
        # hashes of local files already checked, by (key, size, mtime): a file is immutable once
        # renamed into place, so a download re-hashes it only when it changed
        self._verified: dict[tuple[str, int, int], str] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"ArtifactStore({self.url!r})"

    def path(self, key: str) -> str:
        if not key or key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"not an artifact key: {key!r}")
        return f"{self.root}/{key}"

    def local_path(self, key: str) -> Path | None:
        """The file of ``key`` on this machine (a local or mounted store), else None."""
        return Path(self.path(key)) if self.local else None

    # -- writing
    def put(self, key: str, data: bytes | memoryview, sha256: str | None = None) -> Stored:
        """Write ``data`` at ``key`` atomically; returns its uri, size and sha256."""
        return self.put_many([(key, data, sha256)])[0]

    def put_many(self, items: Sequence[tuple[str, bytes | memoryview, str | None]]) -> list[Stored]:
        """:meth:`put` each ``(key, data, sha256)``; their uris, sizes and sha256s, in order.
        Locally every file is written to its temporary name first, then all are fsynced at once
        (a few threads: the disk takes concurrent syncs together; 27 checkpoint files of a pack's
        flush 16-34 -> 8-9 ms on this project's VM, serial fsyncs), then each is renamed into
        place: still atomic per file, and each is on disk before it is in place."""
        if len(items) > PUT_TOGETHER:  # a bounded number of files open at once
            return [*self.put_many(items[:PUT_TOGETHER]), *self.put_many(items[PUT_TOGETHER:])]
        out = [Stored(key, len(data), sha256 or sha256_hex(data)) for key, data, sha256 in items]
        if not self.local:
            for key, data, _ in items:
                # s3fs: one PUT below its block size, else a multipart upload completed at the end
                self.fs.pipe_file(self.path(key), bytes(data), chunksize=self.part_size)
            return out
        written: list[tuple[Any, str, str]] = []  # (open file, temporary name, target)
        try:
            for key, data, _ in items:
                target = self.path(key)
                os.makedirs(os.path.dirname(target), exist_ok=True)
                tmp = f"{target}.tmp-{uuid.uuid4().hex}"
                f = open(tmp, "wb")  # closed below, after the fsync
                written.append((f, tmp, target))
                f.write(data)
                f.flush()
            if len(written) == 1:
                os.fsync(written[0][0].fileno())
            else:
                list(_fsync_pool().map(lambda w: os.fsync(w[0].fileno()), written))
            for f, tmp, target in written:
                f.close()
                os.replace(tmp, target)
        except BaseException:
            for f, tmp, _ in written:
                with _quiet():
                    f.close()
                with _quiet():
                    os.unlink(tmp)
            raise
        return out

    # -- reading
    def _missing(self, key: str, what: str) -> ArtifactMissing:
        return ArtifactMissing(f"{what} is missing from the artifact store (key {key})")

    def read(self, key: str, sha256: str, size: int | None = None, what: str = "the artifact") -> bytes:
        """The bytes at ``key`` if they are the recorded ones (``size``, ``sha256``)."""
        try:
            data: bytes = self.fs.cat_file(self.path(key))
        except FileNotFoundError:
            raise self._missing(key, what) from None
        problem = _problem(len(data), sha256_hex(data), size, sha256)
        if problem:
            raise ArtifactCorrupt(f"{what} is corrupt: {problem} (artifact store key {key})")
        return data

    def verify(self, key: str, sha256: str, size: int | None = None, what: str = "the artifact") -> bytes:
        """Hash the file at ``key`` in chunks (never holding it whole) and raise unless it is the
        recorded one; returns its first :data:`CHUNK` bytes (for a format check). A local file
        checked before and unchanged since is not hashed again."""
        try:
            if self.local:
                st = os.stat(self.path(key))
                stamp = (key, st.st_size, st.st_mtime_ns)
            else:
                stamp = (key, int(self.fs.info(self.path(key)).get("size") or 0), 0)
        except FileNotFoundError:
            raise self._missing(key, what) from None
        digest = hashlib.sha256()
        head = b""
        n = 0
        try:
            with self.fs.open(self.path(key), "rb") as f:
                if self.local and self._verified.get(stamp) == sha256:
                    return bytes(f.read(CHUNK))
                while chunk := f.read(CHUNK):
                    head = head or chunk
                    digest.update(chunk)
                    n += len(chunk)
        except FileNotFoundError:
            raise self._missing(key, what) from None
        problem = _problem(n, digest.hexdigest(), size, sha256)
        if problem:
            raise ArtifactCorrupt(f"{what} is corrupt: {problem} (artifact store key {key})")
        if self.local:
            with self._lock:
                if len(self._verified) > 4096:
                    self._verified.clear()
                self._verified[stamp] = sha256
        return head

    def chunks(self, key: str) -> Iterator[bytes]:
        with self.fs.open(self.path(key), "rb") as f:
            while chunk := f.read(CHUNK):
                yield chunk

    def presign(self, key: str, expires_s: int) -> str | None:
        """A URL that serves the file without the API for ``expires_s`` seconds, if the store
        can make one (S3); None otherwise (a local directory)."""
        if self.local or expires_s <= 0:
            return None
        try:
            return str(self.fs.sign(self.path(key), expiration=expires_s))
        except NotImplementedError:
            return None

    def exists(self, key: str) -> bool:
        return bool(self.fs.exists(self.path(key)))

    # -- deleting
    def delete(self, keys: Iterable[str]) -> None:
        """Remove these files; a missing one is not an error."""
        for key in keys:
            with _quiet():
                self.fs.rm_file(self.path(key))

    def delete_prefix(self, prefix: str) -> None:
        """Remove everything under ``prefix`` (a job's folder)."""
        with _quiet():
            self.fs.rm(self.path(prefix), recursive=True)


class _quiet:
    """Ignore a file that is already gone (and log other errors: a delete that fails leaves a
    file behind, never a broken row)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, exc: Any, tb: Any) -> bool:
        if exc is None or isinstance(exc, FileNotFoundError):
            return True
        if isinstance(exc, Exception):
            log.warning("artifact store: could not delete: %s: %s", type(exc).__name__, exc)
            return True
        return False


def _problem(size: int, digest: str, want_size: int | None, want_sha256: str) -> str | None:
    if want_size is not None and size != want_size:
        return f"{size} bytes stored, {want_size} recorded"
    if digest != want_sha256:
        return f"its bytes hash to sha256 {digest[:12]}…, not the recorded {want_sha256[:12]}…"
    return None


def storage_options(settings: Settings) -> dict[str, Any]:
    """fsspec options for the store's URL: for S3 the endpoint, region and keys that are set
    (unset ones fall back to the standard AWS environment and config files)."""
    if not settings.artifacts_url.startswith(("s3://", "s3a://")):
        return {}
    client: dict[str, Any] = {}
    if settings.artifacts_endpoint_url:
        client["endpoint_url"] = settings.artifacts_endpoint_url
    if settings.artifacts_region:
        client["region_name"] = settings.artifacts_region
    opts: dict[str, Any] = {"use_listings_cache": False, "skip_instance_cache": True}
    if client:
        opts["client_kwargs"] = client
    if settings.artifacts_key:
        opts["key"] = settings.artifacts_key
    if settings.artifacts_secret:
        opts["secret"] = settings.artifacts_secret
    return opts


_STORES: dict[tuple[int, str, str], ArtifactStore] = {}
_STORES_LOCK = threading.Lock()
_FSYNC: dict[int, ThreadPoolExecutor] = {}  # by process id (a forked child makes its own)


def _fsync_pool() -> ThreadPoolExecutor:
    """The threads :meth:`ArtifactStore.put_many` fsyncs its files on (fsync releases the GIL)."""
    with _STORES_LOCK:
        pool = _FSYNC.get(os.getpid())
        if pool is None:
            pool = _FSYNC[os.getpid()] = ThreadPoolExecutor(8, thread_name_prefix="trainyard-fsync")
        return pool


def get_store(settings: Settings | None = None) -> ArtifactStore:
    """The store of ``settings`` (the process's by default), made once per process (a forked
    worker child makes its own: an S3 client does not survive a fork)."""
    settings = settings or get_settings()
    opts = storage_options(settings)
    ident = (os.getpid(), settings.artifacts_url, repr(sorted(opts.items())))
    with _STORES_LOCK:
        store = _STORES.get(ident)
        if store is None:
            store = _STORES[ident] = ArtifactStore(settings.artifacts_url, opts)
        return store


# --------------------------------------------------------------------------- after the commit

_DISCARD = "trainyard_discard"


def discard_after_commit(session: Session, keys: Iterable[str | None], prefixes: Iterable[str] = ()) -> None:
    """Delete these files (and everything under ``prefixes``) once ``session``'s transaction
    commits; nothing if it rolls back."""
    keys = [k for k in keys if k]
    prefixes = list(prefixes)
    if not keys and not prefixes:
        return
    pending = session.info.get(_DISCARD)
    if pending is None:
        pending = session.info[_DISCARD] = ([], [])
        event.listen(session, "after_commit", _after_commit)
        event.listen(session, "after_soft_rollback", _after_rollback)
    pending[0].extend(keys)
    pending[1].extend(prefixes)


def _after_commit(session: Session) -> None:
    keys, prefixes = session.info.get(_DISCARD, ([], []))
    if not keys and not prefixes:
        return
    session.info[_DISCARD] = ([], [])
    store = get_store()
    store.delete(keys)
    for prefix in prefixes:
        store.delete_prefix(prefix)


def _after_rollback(session: Session, previous_transaction: Any) -> None:
    if previous_transaction.parent is None:  # the outermost transaction: nothing of it committed
        session.info[_DISCARD] = ([], [])


def drop_snapshot(session: Session, job_id: str) -> None:
    """Delete a job's resume snapshot (row now, file after the commit): the job ended."""
    drop_snapshots(session, [job_id])


def drop_snapshots(session: Session, job_ids: Sequence[str]) -> None:
    """:func:`drop_snapshot` of several jobs (a pack's members that ended together): one read,
    one delete."""
    from store.models import Snapshot

    if not job_ids:
        return
    found = dict(session.execute(select(Snapshot.job_id, Snapshot.uri).where(Snapshot.job_id.in_(list(job_ids)))).all())
    if not found:
        return
    session.execute(delete(Snapshot).where(Snapshot.job_id.in_(list(found))))
    discard_after_commit(session, list(found.values()))
