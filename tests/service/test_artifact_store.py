"""The artifact store (store/artifact_store.py): checkpoints, resume snapshots and exports are
files, in a local directory or an S3 bucket (a moto server started here), never database values.

Against the real stack: PostgreSQL, Redis, the session's API and worker processes, and in-process
runs of the worker's own code (worker.runner.run_job) for resumes."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, select, text

from client import Client, TrainyardError
from config.settings import settings_from_env
from store import repo
from store.artifact_store import (
    PUT_TOGETHER,
    ArtifactCorrupt,
    ArtifactMissing,
    ArtifactStore,
    checkpoint_key,
    get_store,
)
from store.db import reset_caches, session_scope
from store.models import Checkpoint, Job, Snapshot
from training import BaseReporter, fit, validate_spec
from worker.runner import run_job

from .helpers import free_port, note_spec, wait_http

# --------------------------------------------------------------------------- the store itself


def test_a_local_write_is_atomic_and_a_missing_or_changed_file_is_refused(tmp_path: Path) -> None:
    store = ArtifactStore(str(tmp_path / "store"))
    data = os.urandom(3 * 2**20 + 17)  # more than one read chunk
    stored = store.put("jobs/j1/checkpoints/a.safetensors", data)
    assert (stored.size, stored.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    folder = tmp_path / "store" / "jobs" / "j1" / "checkpoints"
    assert [p.name for p in folder.iterdir()] == ["a.safetensors"]  # no temporary file left behind
    assert store.read(stored.uri, stored.sha256, stored.size) == data
    assert store.verify(stored.uri, stored.sha256, stored.size) == data[: 2**20]

    # a write that fails half-way leaves the previous file whole and no temporary file
    with pytest.raises(TypeError):
        store.put(stored.uri, 12345)  # type: ignore[arg-type]
    assert [p.name for p in folder.iterdir()] == ["a.safetensors"]
    assert store.read(stored.uri, stored.sha256) == data

    path = folder / "a.safetensors"
    changed = bytearray(data)
    changed[-1] ^= 1
    path.write_bytes(bytes(changed))
    for check in (store.read, store.verify):  # verify's cache of checked files notices the change
        with pytest.raises(ArtifactCorrupt, match="hash to sha256"):
            check(stored.uri, stored.sha256, stored.size)
    path.write_bytes(data[:-1])
    with pytest.raises(ArtifactCorrupt, match=f"{len(data) - 1} bytes stored, {len(data)} recorded"):
        store.read(stored.uri, stored.sha256, stored.size)
    path.unlink()
    for check in (store.read, store.verify):
        with pytest.raises(ArtifactMissing, match="missing from the artifact store"):
            check(stored.uri, stored.sha256, stored.size)
    with pytest.raises(ValueError, match="not an artifact key"):
        store.put("../outside", b"x")
    store.put("jobs/j1/snapshots/s.bin", b"snap")
    store.delete_prefix("jobs/j1")
    assert not (tmp_path / "store" / "jobs" / "j1").exists()
    assert store.presign("jobs/j1/snapshots/s.bin", 60) is None  # a directory cannot presign


def test_files_written_together_are_each_whole_and_a_failed_batch_leaves_no_temporary_file(tmp_path: Path) -> None:
    store = ArtifactStore(str(tmp_path / "store"))
    blobs = {f"jobs/j{k % 3}/checkpoints/{k}.safetensors": os.urandom(20_000 + k) for k in range(PUT_TOGETHER + 27)}
    stored = store.put_many([(key, data, None) for key, data in blobs.items()])
    assert [s.uri for s in stored] == list(blobs)
    for s, data in zip(stored, blobs.values(), strict=True):
        assert (s.size, s.sha256) == (len(data), hashlib.sha256(data).hexdigest())
        assert store.read(s.uri, s.sha256, s.size) == data
    files = sorted(str(p.relative_to(tmp_path / "store")) for p in (tmp_path / "store").rglob("*") if p.is_file())
    assert files == sorted(blobs)  # no temporary file left behind

    # a batch whose third item cannot be written: the earlier ones' temporary files are removed and
    # the files already in place are the previous ones, whole
    first, second = list(blobs)[:2]
    with pytest.raises(TypeError):
        store.put_many([(first, b"new bytes", None), (second, b"new too", None), ("jobs/j9/x.bin", 12345, "0" * 64)])  # type: ignore[list-item]
    files = sorted(str(p.relative_to(tmp_path / "store")) for p in (tmp_path / "store").rglob("*") if p.is_file())
    assert files == sorted(blobs)
    assert store.read(first, stored[0].sha256) == blobs[first]
    assert store.read(second, stored[1].sha256) == blobs[second]


# --------------------------------------------------------------------------- S3 (moto)


@pytest.fixture(scope="module")
def s3_url() -> Iterator[dict[str, str]]:
    """A local S3-compatible server (moto's, in a thread) with one bucket; the settings that
    point a process at it."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{endpoint}/moto-api/")
        import boto3

        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="test",
                     aws_secret_access_key="test").create_bucket(Bucket="trainyard")
        yield {"TRAINYARD_ARTIFACTS_URL": "s3://trainyard/artifacts", "TRAINYARD_ARTIFACTS_ENDPOINT_URL": endpoint,
               "TRAINYARD_ARTIFACTS_REGION": "us-east-1", "TRAINYARD_ARTIFACTS_KEY": "test",
               "TRAINYARD_ARTIFACTS_SECRET": "test"}
    finally:
        server.stop()


def test_an_s3_store_puts_reads_presigns_and_deletes(s3_url: dict[str, str]) -> None:
    settings = settings_from_env(s3_url)
    store = get_store(settings)
    assert not store.local and store.local_path("jobs/x/a") is None
    small = os.urandom(1000)
    stored = store.put("jobs/s3a/checkpoints/small.safetensors", small)
    assert store.read(stored.uri, stored.sha256, stored.size) == small
    # a multipart upload (parts of 5 MiB, S3's smallest), completed at the end
    big_store = ArtifactStore(settings.artifacts_url, {**_s3_options(settings)}, part_size=5 * 2**20)
    big = os.urandom(12 * 2**20 + 3)
    put = big_store.put("jobs/s3a/snapshots/big.bin", big)
    assert store.read(put.uri, put.sha256, put.size) == big
    assert store.verify(put.uri, put.sha256, put.size) == big[: 2**20]
    url = store.presign(put.uri, 60)
    assert url is not None and "Signature" in url
    ranged = httpx.get(url, headers={"Range": "bytes=10-19"})
    assert ranged.status_code == 206 and ranged.content == big[10:20]
    store.put(stored.uri, small[:-1])  # changed in the bucket behind the database's back
    with pytest.raises(ArtifactCorrupt):
        store.read(stored.uri, stored.sha256, stored.size)
    store.delete_prefix("jobs/s3a")
    with pytest.raises(ArtifactMissing):
        store.read(put.uri, put.sha256, put.size)


def _s3_options(settings: Any) -> dict[str, Any]:
    from store.artifact_store import storage_options

    return storage_options(settings)


# --------------------------------------------------------------------------- a job's artifacts, end to end


@pytest.fixture(params=["local", "s3"])
def store_env(request: pytest.FixtureRequest, inproc_env: dict[str, str], tmp_path: Path) -> Iterator[dict[str, str]]:
    """This process's settings pointed at a fresh local directory or at the moto bucket."""
    extra = ({"TRAINYARD_ARTIFACTS_URL": str(tmp_path / "artifacts")} if request.param == "local"
             else request.getfixturevalue("s3_url"))
    saved = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)
    reset_caches()
    try:
        yield {**inproc_env, **extra}
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        reset_caches()


class _Capture(BaseReporter):
    """What a worker that got through two epochs before it vanished had written."""

    def __init__(self) -> None:
        self.snap: Any = None
        self.epochs: list[dict[str, Any]] = []

    def on_epoch(self, metrics: dict[str, Any]) -> None:
        self.epochs.append(dict(metrics))

    def on_snapshot(self, snapshot: Any) -> None:
        if snapshot.epoch == 2:
            self.snap = snapshot


class _AppOrNetwork(httpx.BaseTransport):
    """Requests to http://testserver go to the app in this process, others (a presigned S3 URL)
    over the network."""

    def __init__(self, app: httpx.BaseTransport) -> None:
        self.app, self.net = app, httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        return (self.app if request.url.host == "testserver" else self.net).handle_request(request)


def _run_resumed(settings: Any, spec: dict[str, Any]) -> str:
    """A job whose first worker trained two epochs, wrote their metrics and a snapshot (to the
    artifact store) and vanished; requeued, it is run by worker.runner.run_job here."""
    with session_scope() as s:
        job_id = repo.create_job(s, spec=validate_spec(spec).model_dump(mode="json"), queue=settings.queue_name("cpu")).id
    with session_scope() as s:
        assert repo.claim_job(s, job_id, "lost-worker:1", settings.heartbeat_stale_s) is not None
    cap = _Capture()
    fit(spec, reporter=cap, should_stop=lambda: cap.snap is not None)
    with session_scope() as s:
        repo.record_progress(s, job_id, cap.epochs[:2])
        repo.save_snapshot(s, job_id, epoch=2, step=cap.snap.step, data=cap.snap.data, sha256=cap.snap.sha256)
        assert repo.requeue_job(s, job_id, "worker lost")
    return job_id


def test_a_job_resumes_from_its_stored_snapshot_and_its_checkpoint_downloads_verified(store_env: dict[str, str]) -> None:
    from fastapi.testclient import TestClient

    from api.app import create_app

    settings = settings_from_env(store_env)
    store = get_store(settings)
    spec = note_spec(4, device="cpu", name="artifacts-resume")
    job_id = _run_resumed(settings, spec)
    with session_scope(write=False) as s:
        snap = s.get(Snapshot, job_id)
        assert snap is not None and snap.uri.startswith(f"jobs/{job_id}/snapshots/")
        snap_uri = snap.uri
    assert store.exists(snap_uri)

    assert run_job(job_id, settings) == "succeeded"
    with session_scope(write=False) as s:
        job = s.get(Job, job_id)
        assert job is not None and (job.status, job.epoch, job.attempts) == ("succeeded", 4, 2)
        assert [m["epoch"] for m in repo.metrics(s, job_id)] == [1, 2, 3, 4]  # resumed at epoch 3
        # a job that ran all its epochs keeps the state of its last one (POST .../continue), in place
        # of the snapshot it resumed from, whose file is gone
        final = s.get(Snapshot, job_id)
        assert final is not None and final.epoch == 4 and final.uri != snap_uri
        final_uri = final.uri
        best = repo.best_checkpoint(s, job_id)
        assert best is not None and best.uri == checkpoint_key(job_id, best.sha256)
        best_uri, best_sha, best_size = best.uri, best.sha256, best.size
    assert not store.exists(snap_uri) and store.exists(final_uri)
    full = store.read(best_uri, best_sha, best_size)

    with TestClient(create_app()) as http:
        # the CLI's client (it verifies the sha256), to the app here and to the bucket it redirects to
        c = Client("http://testserver", transport=_AppOrNetwork(http._transport))
        data, digest = c.checkpoint(job_id, "best")
        assert (data, digest) == (full, best_sha)
        r = http.get(f"/v1/jobs/{job_id}/checkpoints/best", headers={"Range": "bytes=8-99"}, follow_redirects=False)
        if store.local:  # streamed by the API, a byte range at a time if asked
            assert r.status_code == 206 and r.content == full[8:100], r.status_code
            assert r.headers["content-range"] == f"bytes 8-99/{best_size}"
            assert r.headers["x-checkpoint-sha256"] == best_sha
            assert http.get(f"/v1/jobs/{job_id}/checkpoints/best", headers={"Range": "bytes=-16"}).content == full[-16:]
        else:  # S3: a redirect to a presigned URL, which answers byte ranges itself
            assert r.status_code == 307 and r.headers["x-checkpoint-sha256"] == best_sha
            ranged = httpx.get(r.headers["location"], headers={"Range": "bytes=8-99"})
            assert ranged.status_code == 206 and ranged.content == full[8:100]

        # the file changed behind the database's back: refused with the reason, never served
        store.put(best_uri, full[:-1] + bytes([full[-1] ^ 1]))
        if store.local:  # the API checks before it serves
            r = http.get(f"/v1/jobs/{job_id}/checkpoints/best")
            assert r.status_code == 500 and "corrupt" in r.json()["detail"] and "sha256" in r.json()["detail"]
        else:  # the bucket serves it: the client's own check refuses it
            with pytest.raises(TrainyardError, match="digest mismatch"):
                c.checkpoint(job_id, "best")
        store.delete([best_uri])
        r = http.get(f"/v1/jobs/{job_id}/checkpoints/best", follow_redirects=False)
        if store.local:
            assert r.status_code == 500 and "missing from the artifact store" in r.json()["detail"]
        else:
            assert r.status_code == 307 and httpx.get(r.headers["location"]).status_code == 404

        # deleting the job removes its rows and every file of it
        assert http.delete(f"/v1/jobs/{job_id}").status_code == 204
        assert http.get(f"/v1/jobs/{job_id}").status_code == 404
        assert http.delete(f"/v1/jobs/{job_id}").status_code == 404
    with session_scope(write=False) as s:
        assert s.scalars(select(Checkpoint.id).where(Checkpoint.job_id == job_id)).all() == []
    assert not store.fs.exists(store.path(f"jobs/{job_id}"))


def test_a_resume_from_a_missing_or_corrupt_snapshot_file_fails_the_job_with_the_reason(store_env: dict[str, str]) -> None:
    settings = settings_from_env(store_env)
    store = get_store(settings)
    spec = note_spec(3, device="cpu", name="artifacts-bad-snapshot")
    corrupt_id = _run_resumed(settings, spec)
    missing_id = _run_resumed(settings, spec)
    with session_scope(write=False) as s:
        corrupt, missing = s.get(Snapshot, corrupt_id), s.get(Snapshot, missing_id)
        assert corrupt is not None and missing is not None
        data = store.read(corrupt.uri, corrupt.sha256)
        store.put(corrupt.uri, data[:-1] + bytes([data[-1] ^ 1]))
        store.delete([missing.uri])
    assert run_job(corrupt_id, settings) == "failed"
    # the worker packs the other resumed job of the same shape with the one it claimed
    # (worker/packs.py): that member fails there with its own reason (the pack does not stop for
    # it), and its own message then finds it handled
    assert run_job(missing_id, settings) == ("skipped" if settings.pack else "failed")
    with session_scope(write=False) as s:
        c, m = s.get(Job, corrupt_id), s.get(Job, missing_id)
        assert c is not None and m is not None
        assert "cannot resume" in (c.error or "") and "corrupt" in (c.error or "") and "sha256" in (c.error or ""), c.error
        assert "cannot resume" in (m.error or "") and "missing from the artifact store" in (m.error or ""), m.error
        assert s.get(Snapshot, corrupt_id) is None and s.get(Snapshot, missing_id) is None


@pytest.mark.parametrize("keep", ["best_and_last", "all"])
def test_a_job_keeps_the_files_of_its_best_and_newest_checkpoint_or_all_of_them(inproc_env: dict[str, str],
                                                                               keep: str) -> None:
    settings = settings_from_env(inproc_env)
    store = get_store(settings)
    spec = validate_spec(note_spec(3, device="cpu", keep_checkpoints=keep)).model_dump(mode="json")
    with session_scope() as s:
        job_id = repo.create_job(s, spec=spec, queue=settings.queue_name("cpu")).id
    blobs = [f"weights of epoch {i}".encode() for i in (1, 2, 3)]
    for epoch, data in enumerate(blobs, start=1):  # epoch 1 is the best; 2 and 3 come after it
        with session_scope() as s:
            repo.add_checkpoint(s, job_id, epoch=epoch, step=epoch, monitor="val_loss", value=1.0 / epoch, data=data,
                                sha256=hashlib.sha256(data).hexdigest(), is_best=epoch == 1)
    with session_scope(write=False) as s:
        rows = repo.list_checkpoints(s, job_id)
    kept = {ck.epoch for ck, stored in rows if stored}
    assert kept == ({1, 2, 3} if keep == "all" else {1, 3}), kept
    for ck, stored in rows:  # a file for each row that says it is stored, none for the others
        assert store.exists(checkpoint_key(job_id, ck.sha256)) == stored, (ck.epoch, stored)
    with session_scope() as s:  # a queued job is not deleted
        assert repo.delete_jobs(s, [job_id]) == []
    assert store.exists(checkpoint_key(job_id, hashlib.sha256(blobs[0]).hexdigest()))
    with session_scope() as s:  # cancelled, it is deleted with its files
        assert repo.request_cancel(s, job_id) == "cancelled"
    with session_scope() as s:
        assert repo.delete_jobs(s, [job_id]) == [job_id]
    assert not store.fs.exists(store.path(f"jobs/{job_id}"))


def test_checkpoints_added_as_one_batch_leave_what_one_at_a_time_leaves(inproc_env: dict[str, str]) -> None:
    """``repo.add_checkpoints`` (a flush's checkpoints in one round of queries) against
    ``repo.add_checkpoint`` once per checkpoint: the same rows, the same best, the same files kept
    (the best and the newest) and dropped, on a job that already has a best from an earlier flush."""
    settings = settings_from_env(inproc_env)
    store = get_store(settings)
    spec = validate_spec(note_spec(5, device="cpu")).model_dump(mode="json")
    bests = [True, False, True, False, False]  # epochs 1..5: 1 is best, 3 becomes best, 4 and 5 follow

    def items(tag: str) -> list[dict[str, Any]]:
        out = []
        for epoch, best in enumerate(bests, start=1):
            data = f"{tag} weights of epoch {epoch}".encode()
            out.append(dict(epoch=epoch, step=epoch, monitor="val_loss", value=1.0 / epoch, data=data,
                            sha256=hashlib.sha256(data).hexdigest(), is_best=best))
        return out

    state = []
    for tag in ("one-by-one", "batch"):
        with session_scope() as s:
            job_id = repo.create_job(s, spec=spec, queue=settings.queue_name("cpu")).id
        first, rest = items(tag)[:1], items(tag)[1:]
        with session_scope() as s:  # an earlier flush: epoch 1, the best so far
            repo.add_checkpoint(s, job_id, **first[0])
        with session_scope() as s:
            if tag == "batch":
                repo.add_checkpoints(s, job_id, rest)
            else:
                for it in rest:
                    repo.add_checkpoint(s, job_id, **it)
        with session_scope(write=False) as s:
            rows = repo.list_checkpoints(s, job_id)
        state.append([(ck.epoch, ck.is_best, stored, store.exists(checkpoint_key(job_id, ck.sha256))) for ck, stored in rows])
        _forget(job_id)
    assert state[0] == state[1], state
    assert sorted((e, b, st) for e, b, st, _ in state[1]) == [(1, False, False), (2, False, False), (3, True, True),
                                                              (4, False, False), (5, False, True)]


@pytest.mark.parametrize("keep", ["best_and_last", "all"])
def test_a_flush_writes_no_file_for_a_checkpoint_it_supersedes(inproc_env: dict[str, str], keep: str,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A run's record flushes five checkpoints at once: the rows are all there, the best and the
    newest keep their files, and (unless the job keeps every file) the three others' files are
    never written, not written and dropped."""
    from training import Checkpoint as Ckpt
    from worker.record import RunRecord

    settings = settings_from_env(inproc_env)
    store = get_store(settings)
    spec = validate_spec(note_spec(5, device="cpu", keep_checkpoints=keep)).model_dump(mode="json")
    with session_scope() as s:
        job_id = repo.create_job(s, spec=spec, queue=settings.queue_name("cpu")).id
        token = repo.claim_job(s, job_id, "w:1", 300.0).lease_token
    record = RunRecord.open(job_id, settings, lease_token=token, attempt=1, spec=spec, sweep_id=None, epochs=5)
    written: list[str] = []
    put_many = type(store).put_many  # every file write goes through it (put too)
    monkeypatch.setattr(type(store), "put_many",
                        lambda self, items: written.extend(key for key, _, _ in items) or put_many(self, items))
    for epoch, best in enumerate([True, False, True, False, False], start=1):
        data = f"weights of epoch {epoch}".encode()
        record.pending_checkpoints.append(Ckpt(epoch, epoch, "val_loss", 1.0 / epoch, data, hashlib.sha256(data).hexdigest(), best))
    record.flush(force=True)
    with session_scope(write=False) as s:
        rows = sorted(repo.list_checkpoints(s, job_id), key=lambda r: r[0].epoch)
    assert [(ck.epoch, ck.is_best) for ck, _ in rows] == [(1, False), (2, False), (3, True), (4, False), (5, False)]
    kept = {ck.epoch for ck, stored in rows if stored}
    assert kept == ({1, 2, 3, 4, 5} if keep == "all" else {3, 5}), kept
    for ck, stored in rows:
        assert store.exists(checkpoint_key(job_id, ck.sha256)) == stored, (ck.epoch, stored)
        assert ck.size == len(f"weights of epoch {ck.epoch}".encode())
    assert len(written) == (5 if keep == "all" else 2), written
    _forget(job_id)


def _forget(job_id: str) -> None:
    """Cancel and delete a job this test made, so no later test's worker claims it."""
    with session_scope() as s:
        repo.request_cancel(s, job_id)
    with session_scope() as s:
        if s.get(Job, job_id).status == "running":
            assert repo.finish_job(s, job_id, status="cancelled", stop_reason="cancelled")
    with session_scope() as s:
        assert repo.delete_jobs(s, [job_id]) == [job_id]


# --------------------------------------------------------------------------- the live service


def test_a_trained_job_keeps_its_checkpoint_files_outside_the_database(client: Client, api_url: str, pg_url: str,
                                                                      artifacts_dir: Path) -> None:
    """A job trained by the session's worker process: its checkpoint files are in the store
    (best and last only), a few hundred bytes of rows describe them, Range requests and HEAD
    work, a running job cannot be deleted, an ended one is deleted with its files."""
    job = client.submit(note_spec(5, name="artifacts-live"))
    job_id = job["id"]
    assert client.wait(job_id, timeout=300)["status"] == "succeeded"
    listed = client.checkpoints(job_id)
    kept = [c for c in listed if c["stored"]]
    assert 1 <= len(kept) <= 2 and any(c["is_best"] for c in kept), listed
    folder = artifacts_dir / "jobs" / job_id
    files = sorted(p.name for p in (folder / "checkpoints").iterdir())
    assert files == sorted({f"{c['sha256']}.safetensors" for c in kept})
    # its snapshot: only the state of its last epoch, kept because it ran all its epochs (continue)
    snapshots = sorted(p.name for p in (folder / "snapshots").iterdir()) if (folder / "snapshots").exists() else []
    assert client.job(job_id)["stop_reason"] != "completed" or len(snapshots) == 1, snapshots

    data, digest = client.checkpoint(job_id, "best")
    with httpx.Client(base_url=api_url) as http:
        head = http.head(f"/v1/jobs/{job_id}/checkpoints/best")
        assert head.status_code == 200 and head.headers["content-length"] == str(len(data))
        part = http.get(f"/v1/jobs/{job_id}/checkpoints/best", headers={"Range": f"bytes={len(data) - 100}-"})
        assert part.status_code == 206 and part.content == data[-100:]
        assert http.get(f"/v1/jobs/{job_id}/checkpoints/best",
                        headers={"Range": f"bytes={len(data) + 10}-"}).status_code == 416

    engine = create_engine(pg_url)
    try:
        with engine.connect() as conn:
            row_bytes = {t: int(conn.execute(text(f"SELECT coalesce(sum(pg_column_size(t.*)), 0) FROM {t} t "
                                                  "WHERE job_id = :j"), {"j": job_id}).scalar() or 0)
                         for t in ("checkpoints", "snapshots", "artifacts")}
    finally:
        engine.dispose()
    # the rows that describe the artifacts: metadata only, whatever the model's size
    assert sum(row_bytes.values()) <= 2048 < len(data), (row_bytes, len(data))
    print(f"\nartifact rows of a finished job: {row_bytes} bytes; its best checkpoint file: {len(data)} bytes")

    running = client.submit(note_spec(100_000, name="artifacts-live-running", callbacks={}))["id"]
    try:
        with pytest.raises(TrainyardError) as err:
            client.delete(running)
        assert err.value.status_code == 409 and "cancel it first" in str(err.value)
    finally:
        client.cancel(running)
    assert client.wait(running, timeout=120)["status"] == "cancelled"
    client.delete(running)
    assert "probabilities" in client.predict(job_id, [[0.0] * 64])  # the API process now caches its model
    client.delete(job_id)
    for gone in (lambda: client.job(job_id), lambda: client.predict(job_id, [[0.0] * 64], timeout=5)):
        with pytest.raises(TrainyardError) as err:
            gone()
        assert err.value.status_code == 404
    assert not folder.exists()
