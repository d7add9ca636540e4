"""``POST /v1/metrics/bulk``'s reader (:mod:`store.bulkread`) on PostgreSQL and on SQLite, for jobs
in every state: a finished job's whole curve comes from its compacted row (:mod:`store.curves`),
the rest from the epoch rows; both must say exactly what each job's epochs say (every key, a
``since_epoch``, ``keys``, ``max_points``), with and without the process's cache of compacted
curves. An epoch written after the compaction is seen (the compacted curve is dropped, and the
cached copy no longer used), and the migration compacts jobs that finished before it."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from alembic.script import ScriptDirectory
from sqlalchemy import delete, insert, select, text, update
from sqlalchemy.orm import Session

from api.schemas.jobs import MetricsRead
from store import auth as store_auth
from store import bulkread, fastread, repo
from store.db import make_engine
from store.ids import new_id
from store.migrate import alembic_config, upgrade
from store.models import DEFAULT_PROJECT, Job, JobCurve, JobMetric
from training import validate_spec

from .helpers import note_spec


def _epochs(n: int, shift: float = 0.0) -> list[dict[str, Any]]:
    out = []
    for e in range(1, n + 1):
        row: dict[str, Any] = {"epoch": e, "loss": 1 / e + shift, "lr": 1e-3 / e, "seconds": 0.25}
        if e % 3:  # some epochs lack val_loss (a key an epoch does not have is left out)
            row["val_loss"] = 1.5 / e + shift
        if e == 2:
            row["loss"] = math.nan
            row["val_loss"] = -math.inf
        out.append(row)
    return out


def _finish(s: Session, job_id: str) -> None:
    repo.claim_job(s, job_id, "host:1", 300)
    repo.finish_job(s, job_id, status="succeeded", stop_reason="completed")


def _expected(s: Session, job_id: str, since: int, keys: list[str] | None, max_points: int | None) -> dict[str, Any]:
    epochs = MetricsRead(job_id=job_id, epochs=repo.metrics(s, job_id, since), total=0).model_dump(mode="json")["epochs"]
    total = len(epochs)
    if keys:
        epochs = [{k: e[k] for k in ["epoch", *keys] if k in e} for e in epochs]
    if max_points is not None:
        epochs = fastread.downsample(epochs, max_points)
    return {"epochs": epochs, "total": total}


def _check(url: str) -> None:
    engine = make_engine(url)
    try:
        spec = validate_spec(note_spec(3)).model_dump(mode="json")
        with Session(engine) as s:
            done, running, queued, redone, other = (repo.create_job(s, spec=spec, queue="cpu") for _ in range(5))
            s.flush()
            other.project_id = store_auth.ensure_project(s, "bulkread-other").id
            for job, n in ((done, 7), (running, 5), (redone, 4), (other, 3)):
                repo.claim_job(s, job.id, "host:1", 300)
                repo.record_progress(s, job.id, _epochs(n))
            for job in (done, redone, other):
                repo.finish_job(s, job.id, status="succeeded", stop_reason="completed")
            s.commit()
            # finished: compacted, in epoch order; the running one is not
            curves = dict(s.execute(select(JobCurve.job_id, JobCurve.n)).all())
            assert curves == {done.id: 7, redone.id: 4, other.id: 3}
            body = s.scalar(select(JobCurve.body).where(JobCurve.job_id == done.id))
            assert [e["epoch"] for e in json.loads(body)] == list(range(1, 8))
            # an epoch written after the job finished (a late writer): its compacted curve goes
            repo.record_progress(s, redone.id, [{"epoch": 3, "loss": 42.0}])
            s.commit()
            assert s.get(JobCurve, redone.id) is None
            # ... and its row of that epoch is replaced (one row per job and epoch), the others kept
            rows = dict(s.execute(select(JobMetric.epoch, JobMetric.values).where(JobMetric.job_id == redone.id)).all())
            assert sorted(rows) == [1, 2, 3, 4] and rows[3] == {"epoch": 3, "loss": 42.0}
            assert rows[1] == _epochs(4)[0]
            ids = [done.id, running.id, queued.id, redone.id]

            for since in (0, 2):
                for keys in (None, ["val_loss"], ["val_loss", "lr", "epoch", "val_loss"], ["nope"]):
                    for max_points in (None, 1, 3, 50):
                        wanted = {i: since for i in reversed(ids)} | {other.id: 0, "f" * 32: 0}
                        raw = bulkread.bulk_metrics_json(engine, DEFAULT_PROJECT, wanted, keys, max_points)
                        got = json.loads(raw)
                        case = (since, keys, max_points)
                        # nothing kept (a process's first request): the same bytes
                        assert bulkread.bulk_metrics_json(engine, DEFAULT_PROJECT, wanted, keys, max_points,
                                                          cache=None) == raw, case
                        assert sorted(got["missing"]) == sorted([other.id, "f" * 32]), case
                        assert list(got["jobs"]) == [i for i in wanted if i in ids], case  # in the order asked
                        for i in ids:
                            assert got["jobs"][i] == _expected(s, i, since, keys, max_points), (case, i)
            # per-job since_epoch: the compacted job's whole curve beside another's tail
            got = json.loads(bulkread.bulk_metrics_json(engine, DEFAULT_PROJECT, {done.id: 0, running.id: 4}))
            assert got["jobs"][done.id] == _expected(s, done.id, 0, None, None)
            assert got["jobs"][running.id] == _expected(s, running.id, 4, None, None)
            assert got["jobs"][done.id]["epochs"][1]["loss"] == "NaN"
            # the process's cache of compacted curves answered the whole curves above; without it, the same
            assert bulkread.CURVES.snapshot([done.id, running.id, redone.id]).keys() == {done.id}
            assert (bulkread.bulk_metrics_json(engine, DEFAULT_PROJECT, {done.id: 0, running.id: 0}, cache=None)
                    == bulkread.bulk_metrics_json(engine, DEFAULT_PROJECT, {done.id: 0, running.id: 0}))
            # a late epoch drops the compacted row: the cached copy is no longer used
            repo.record_progress(s, done.id, [{"epoch": 8, "loss": 0.125}])
            s.commit()
            got = json.loads(bulkread.bulk_metrics_json(engine, DEFAULT_PROJECT, {done.id: 0}))
            assert got["jobs"][done.id] == _expected(s, done.id, 0, None, None) and got["jobs"][done.id]["total"] == 8
    finally:
        engine.dispose()


def test_bulk_reader_on_postgresql(pg):
    url = pg.create("bulkread")
    upgrade(url)
    _check(url)


def test_bulk_reader_split_in_parts_on_postgresql(pg, monkeypatch):
    """A request with many jobs to read whole (a process's first for a choice of keys, or with
    nothing kept) is split in ``PARTS`` queries run at once on as many connections: the same
    answers, each job asked once."""
    monkeypatch.setattr(bulkread, "PARALLEL_FROM", 1)
    asked: list[list[str]] = []
    real = bulkread._fetch_without_jit

    def counted(engine: Any, sql: str, params: dict[str, Any]) -> Any:
        asked.append(params["ids"].split(","))
        return real(engine, sql, params)

    monkeypatch.setattr(bulkread, "_fetch_without_jit", counted)
    bulkread.CURVES.clear()
    url = pg.create("bulkread_parts")
    upgrade(url)
    _check(url)
    split = [a for a in asked if len(a) == 3]  # the 6 ids of _check's requests, dealt out in 2 parts
    assert len(split) >= 2 and len(split) % 2 == 0
    assert len(set(split[0]) | set(split[1])) == 6


def test_bulk_reader_on_sqlite(tmp_path):
    url = f"sqlite:///{tmp_path / 'bulk.db'}"
    upgrade(url)
    _check(url)


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
def test_the_migration_compacts_jobs_that_finished_before_it(backend, pg, tmp_path):
    url = pg.create("bulkread_migration") if backend == "postgresql" else f"sqlite:///{tmp_path / 'm.db'}"
    before = ScriptDirectory.from_config(alembic_config(url)).get_revision("0005_i11b").down_revision
    upgrade(url, before)
    engine = make_engine(url)
    try:
        with Session(engine) as s:  # jobs and epochs as the revision before holds them (jobs unchanged)
            spec = validate_spec(note_spec(3)).model_dump(mode="json")
            now = repo.utcnow()
            rows = {status: new_id() for status in ("succeeded", "running")}
            # (the jobs table as it was then: not the model's, which has later columns)
            for status, job_id in rows.items():
                s.execute(text("INSERT INTO jobs (id, project_id, name, status, queue, spec, epoch, epochs, attempts, "
                               "cancel_requested, created_at, updated_at) VALUES (:i, :p, 'm', :s, 'cpu', :spec, 3, 3, "
                               "0, false, :t, :t)"),
                          {"i": job_id, "p": DEFAULT_PROJECT, "s": status, "spec": json.dumps(spec), "t": now})
            s.execute(insert(JobMetric), [{"job_id": j, "epoch": e, "values": {"epoch": e, "loss": 1 / e}, "created_at": now}
                                          for j in rows.values() for e in (2, 1, 3)])  # inserted out of order
            s.commit()
        upgrade(url)
        with Session(engine) as s:
            curves = {c.job_id: c for c in s.scalars(select(JobCurve))}
            assert set(curves) == {rows["succeeded"]}
            assert curves[rows["succeeded"]].n == 3
            # and every job's highest epoch (0006), which store.repo.record_progress then keeps
            assert set(s.scalars(select(Job.metrics_top).where(Job.id.in_(rows.values())))) == {3}
            assert json.loads(curves[rows["succeeded"]].body) == [{"epoch": e, "loss": 1 / e} for e in (1, 2, 3)]
    finally:
        engine.dispose()


def test_kept_epochs_are_extended_and_checked_on_postgresql(pg, monkeypatch):
    """On PostgreSQL the process keeps each job's epochs it read (per choice of keys) and reads
    only the ones after them, checking the kept ones by the job row's ``metrics_rewrites``
    (0006): an unchanged job reads no epoch, an appended one only the new epochs, and a
    rewritten (a resumed run's upsert), updated, deleted or filled-in epoch is seen (the job is
    read again whole, in the same query); so are the last epoch a job's terminal move commits
    with its result, and an epoch written after it."""
    url = pg.create("bulkread_kept")
    upgrade(url)
    engine = make_engine(url)
    cache = bulkread.CurveCache()
    queries: list[int] = []
    real = bulkread._fetch_without_jit

    def counted(*args: Any) -> Any:
        queries[-1] += 1
        return real(*args)

    monkeypatch.setattr(bulkread, "_fetch_without_jit", counted)
    variants = [(0, None, None), (2, None, 3), (0, ["val_loss"], None), (1, ["lr", "epoch"], 2)]
    projections = {bulkread._projection(k) for _, k, _ in variants}
    try:
        spec = validate_spec(note_spec(3)).model_dump(mode="json")
        with Session(engine) as s:
            job = repo.create_job(s, spec=spec, queue="cpu")
            s.flush()
            repo.claim_job(s, job.id, "host:1", 300)
            repo.record_progress(s, job.id, _epochs(5))
            s.commit()

            def lists() -> dict[tuple[str, ...], bulkread.Epochs]:
                return {p: cache.lists([job.id], p)[job.id] for p in projections}

            def check() -> list[int]:
                """Every variant's answer is exactly what the job's rows say (a missed rewrite fails here)."""
                queries.clear()
                for since, keys, max_points in variants:
                    queries.append(0)
                    got = json.loads(bulkread.bulk_metrics_json(engine, DEFAULT_PROJECT, {job.id: since}, keys,
                                                                max_points, cache=cache))
                    assert got["jobs"][job.id] == _expected(s, job.id, since, keys, max_points), (since, keys)
                return queries

            def revision() -> int:
                return s.scalar(select(Job.metrics_rewrites).where(Job.id == job.id).execution_options(
                    populate_existing=True))

            assert check() == [1, 1, 1, 1]  # read whole, then kept
            kept = cache.lists([job.id], ())
            assert kept[job.id].epochs == [1, 2, 3, 4, 5] and not kept[job.id].sealed
            before = lists()
            assert check() == [1, 1, 1, 1]
            assert all(lists()[p] is before[p] for p in projections)  # nothing new: the kept lists answer
            rev = revision()
            # appended by a plain INSERT (the trigger does not fire on one), its JSON text not ASCII: the
            # kept lists' offsets are in bytes, not characters (the ORM's writes escape to ASCII)
            s.execute(text('INSERT INTO job_metrics (job_id, epoch, "values", created_at) '
                           "VALUES (:j, 6, CAST(:v AS json), now())"),
                      {"j": job.id, "v": '{"epoch": 6, "loss": 0.1, "val_loss": 0.2, "größe": 0.3}'})
            s.commit()
            assert revision() == rev  # an append is not a rewrite
            assert check() == [1, 1, 1, 1]  # the kept ones hold: only epoch 6 read
            assert cache.lists([job.id], ())[job.id].epochs == [1, 2, 3, 4, 5, 6]
            assert all(lists()[p].inner.startswith(before[p].inner + b",") for p in projections)  # extended
            repo.record_progress(s, job.id, [{"epoch": 7, "loss": 0.07, "lr": 0.7}])  # the worker's append
            s.commit()
            assert revision() == rev
            assert check() == [1, 1, 1, 1]
            assert cache.lists([job.id], ())[job.id].epochs == [1, 2, 3, 4, 5, 6, 7]
            # each way an epoch a reader kept can change, then the answers must follow
            changes = [
                # a resumed run redoes epoch 3 (the upsert overwrites its row)
                lambda: repo.record_progress(s, job.id, [{"epoch": 3, "loss": 9.0, "val_loss": 8.0, "lr": 7.0}]),
                # any writer's UPDATE, not only the upsert's
                lambda: s.execute(update(JobMetric).where(JobMetric.job_id == job.id, JobMetric.epoch == 5)
                                  .values(values={"epoch": 5, "loss": 5.5})),
                lambda: s.execute(delete(JobMetric).where(JobMetric.job_id == job.id, JobMetric.epoch == 4)),
                # epoch 4 written again below the highest (a row inserted, none overwritten)
                lambda: repo.record_progress(s, job.id, [{"epoch": 4, "loss": 4.4, "lr": 0.4}]),
                # a rewrite and an append in one batch
                lambda: repo.record_progress(s, job.id, [{"epoch": 7, "loss": 7.7}, {"epoch": 8, "loss": 0.08}]),
            ]
            for change in changes:
                rev = revision()
                change()
                s.commit()
                assert revision() > rev
                assert check() == [1, 1, 1, 1]  # read again whole, in the same query
                assert {p: e.rev for p, e in lists().items()} == dict.fromkeys(projections, revision())
            # its last epoch commits with the terminal move (which compacts the curve): lists kept
            # while it ran are checked as usual, then sealed
            repo.record_progress(s, job.id, [{"epoch": 9, "loss": 0.05}])
            repo.finish_job(s, job.id, status="succeeded", stop_reason="completed")
            s.commit()
            assert s.get(JobCurve, job.id) is not None
            check()
            assert all(e.sealed for e in lists().values())
            assert check() == [1, 1, 1, 1]
            # an epoch written after the job finished drops the compacted curve: sealed lists are checked again
            repo.record_progress(s, job.id, [{"epoch": 10, "loss": 0.025}])
            s.commit()
            check()
            assert not cache.lists([job.id], ())[job.id].sealed
            # an operator's UPDATE of a finished job's epoch: its compacted curve and sealed lists go too
            done = repo.create_job(s, spec=spec, queue="cpu")
            s.flush()
            repo.claim_job(s, done.id, "host:1", 300)
            repo.record_progress(s, done.id, _epochs(4))
            _finish(s, done.id)
            s.commit()
            job = done
            check()
            assert check() == [1, 1, 1, 1] and all(e.sealed for e in lists().values())
            s.execute(update(JobMetric).where(JobMetric.job_id == done.id, JobMetric.epoch == 1)
                      .values(values={"epoch": 1, "loss": 1.1, "val_loss": 1.2, "lr": 1.3}))
            s.commit()
            assert s.get(JobCurve, done.id, populate_existing=True) is None
            check()
            # deleting the job cascades to its epochs, whose trigger then finds no job row to bump
            s.execute(delete(Job).where(Job.id == done.id))
            s.commit()
            got = json.loads(bulkread.bulk_metrics_json(engine, DEFAULT_PROJECT, {done.id: 0}, cache=cache))
            assert got == {"jobs": {}, "missing": [done.id]}
    finally:
        engine.dispose()


def test_keys_picked_from_jsonb_read_as_the_stored_text_on_postgresql(pg):
    """On PostgreSQL ``keys`` are picked from each epoch's jsonb copy (0007), whose text of a value
    can differ from the stored one. A row gets a copy only when every value of it reads the same
    from it; every value must read back as the same Python value, of the same type and sign,
    with and without kept epochs, whichever way it is answered. A row jsonb refuses (a \\u0000,
    a lone surrogate) is still written, without a copy."""
    url = pg.create("bulkread_jsonb")
    upgrade(url)
    engine = make_engine(url)
    rows = [
        # no copy: an exponent jsonb writes as a long integer (1e+300: 301 digits; 1.5e+20), a
        # negative zero (jsonb drops its sign), a \\u escape (Python's default for non-ASCII),
        # an exponent without its sign (written by hand below)
        {"epoch": 1, "loss": 1e300, "val_loss": 0.5, "lr": 1e-05},
        {"epoch": 2, "loss": 0.25, "val_loss": 1.5e20, "lr": 0.1},
        {"epoch": 3, "loss": 0.25, "val_loss": -0.0, "lr": 0.1},
        {"epoch": 4, "loss": [0.5, -0.0], "val_loss": 0.5, "lr": 0.1},
        {"epoch": 5, "loss": "ünï", "val_loss": 0.5, "lr": 0.1},
        # a copy: negative exponents (1e-05 is written 0.00001), -0.05 and -0.001 (not zeros),
        # long integers, nested values, strings with escapes and non-ASCII (as UTF-8), null, true,
        # a missing key, a zero
        {"epoch": 6, "loss": 1e-05, "val_loss": -3.4e-38, "lr": 1.5e-300, "n": 12345678901234567890},
        {"epoch": 7, "loss": -0.05, "val_loss": -0.001, "lr": 0.0, "n": 10**15, "s": "a\\b \"q\" ünï é"},
        {"epoch": 8, "loss": [1.5, 2.5e-7, {"b": 1, "a": -2}], "val_loss": {"z": 0.5, "a": None}, "lr": True,
         "n": None, "s": "x.y"},
        {"epoch": 9, "loss": 0.30000000000000004, "lr": -7, "n": 0},
    ]
    texts = [json.dumps(r, ensure_ascii=r["epoch"] == 5) for r in rows] + ['{"epoch": 10, "loss": 2e5}']
    try:
        spec = validate_spec(note_spec(3)).model_dump(mode="json")
        with Session(engine) as s:
            job, other = repo.create_job(s, spec=spec, queue="cpu"), repo.create_job(s, spec=spec, queue="cpu")
            s.flush()
            insert_epoch = text('INSERT INTO job_metrics (job_id, epoch, "values", created_at) '
                                "VALUES (:j, :e, CAST(:v AS json), now())")
            for e, t in enumerate(texts, 1):
                s.execute(insert_epoch, {"j": job.id, "e": e, "v": t})
            # (json's own -> refuses these two when it reads them: so did the reader before 0007)
            s.execute(insert_epoch, {"j": other.id, "e": 1, "v": '{"epoch": 1, "note": "nul \\u0000"}'})
            s.execute(insert_epoch, {"j": other.id, "e": 2, "v": '{"epoch": 2, "note": "\\ud800"}'})
            s.commit()
            copies = dict(s.execute(text("SELECT epoch, values_b IS NOT NULL FROM job_metrics WHERE job_id = :j"),
                                    {"j": job.id}).all())
            assert copies == {e: 6 <= e <= 9 for e in range(1, 11)}
            assert s.scalar(text("SELECT count(values_b) FROM job_metrics WHERE job_id = :j"), {"j": other.id}) == 0
            stored = [json.loads(t) for t in texts]
            cache = bulkread.CurveCache()
            for keys in (["loss"], ["val_loss", "lr"], ["n", "s", "nope"], ["loss", "val_loss", "lr", "n", "s"]):
                for c in (None, cache, cache):
                    got = json.loads(bulkread.bulk_metrics_json(engine, DEFAULT_PROJECT, {job.id: 0}, keys, cache=c))
                    want = [{k: r[k] for k in ["epoch", *keys] if k in r} for r in stored]
                    # the same values, types and signs (nested objects' keys may come in jsonb's order)
                    assert json.dumps(got["jobs"][job.id]["epochs"], sort_keys=True) == json.dumps(want, sort_keys=True)
    finally:
        engine.dispose()


def _progress_state(s: Session, job_ids: list[str]) -> list[Any]:
    """What record_progress leaves of each job: its epoch rows, epoch events, and the job row's
    progress columns (heartbeat aside)."""
    from store.models import JobEvent

    out = []
    for j in job_ids:
        rows = [(m.epoch, m.values) for m in s.scalars(select(JobMetric).where(JobMetric.job_id == j).order_by(JobMetric.epoch))]
        events = [e.data for e in s.scalars(select(JobEvent).where(JobEvent.job_id == j, JobEvent.kind == "epoch").order_by(JobEvent.id))]
        job = s.get(Job, j)
        assert job is not None
        s.refresh(job)
        out.append((rows, events, job.epoch, job.metrics_top, job.metrics_rewrites, job.info))
    return out


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
def test_progress_of_many_jobs_at_once_leaves_what_one_at_a_time_leaves(backend, pg, tmp_path):
    """A pack's flush writes its members' epochs with ``record_progress_many`` (a few statements for
    all of them) and fences them with ``fence_many``: the same rows, events, revision counters,
    info and cancel flags as one ``record_progress`` per job; a member whose lease is gone is
    not fenced (nothing bumped), the others are."""
    from store import leases

    url = pg.create("bulkread_many") if backend == "postgresql" else f"sqlite:///{tmp_path / 'many.db'}"
    upgrade(url)
    engine = make_engine(url)
    spec = validate_spec(note_spec(3)).model_dump(mode="json")
    # per job, the batches written: appends, an overwrite below the top (a resume), info, nothing
    plan = [
        [(_epochs(3), None), ([{"epoch": 4, "loss": 0.4}], {"pack": {"fused": True}})],
        [(_epochs(2), {"k": 1}), ([{"epoch": 2, "loss": 9.0}, {"epoch": 3, "loss": 0.3}], None)],
        [([], {"only": "info"}), (_epochs(1), None)],
        [([], None), ([], None)],
    ]
    with Session(engine) as s:
        one = [repo.create_job(s, spec=spec, queue="cpu") for _ in plan]
        many = [repo.create_job(s, spec=spec, queue="cpu") for _ in plan]
        s.flush()
        tokens = {}
        for job in one + many:
            claimed = repo.claim_job(s, job.id, "host:1", 300)
            assert claimed is not None
            tokens[job.id] = claimed.lease_token
        s.get(Job, one[1].id).cancel_requested = True
        s.get(Job, many[1].id).cancel_requested = True
        s.commit()
        for step in range(2):
            flags_one = {job.id: repo.record_progress(s, job.id, batches[step][0], info=batches[step][1])
                         for job, batches in zip(one, plan, strict=True)}
            flags_many = repo.record_progress_many(
                s, [(job.id, batches[step][0], batches[step][1]) for job, batches in zip(many, plan, strict=True)])
            s.commit()
            assert list(flags_one.values()) == list(flags_many.values()) == [False, True, False, False]
        assert _progress_state(s, [j.id for j in one]) == _progress_state(s, [j.id for j in many])
        state = _progress_state(s, [j.id for j in many])
        assert [e for e, _ in state[0][0]] == [1, 2, 3, 4] and state[0][2:4] == (4, 4)
        assert state[0][5] == {"pack": {"fused": True}} and state[2][5] == {"only": "info"}
        assert [v["loss"] for _, v in state[1][0]] == [1.0, 9.0, 0.3] and len(state[1][1]) == 4
        assert state[3][0] == [] and state[3][2] == 0
        # the overwrite counted (on PostgreSQL the 0006 trigger counts it too)
        assert [r[4] > 0 for r in _progress_state(s, [j.id for j in many])] == [False, True, False, False]

        # fences: all held, then one lease taken over by another attempt
        held = leases.fence_many(s, {j.id: tokens[j.id] for j in many})
        assert held == {many[0].id: False, many[1].id: True, many[2].id: False, many[3].id: False}
        s.execute(update(Job).where(Job.id == many[2].id).values(lease_token=Job.lease_token + 1))
        before = s.scalar(select(Job.heartbeat_at).where(Job.id == many[2].id))
        held = leases.fence_many(s, {j.id: tokens[j.id] for j in many})
        assert sorted(held) == sorted([many[0].id, many[1].id, many[3].id])
        assert s.scalar(select(Job.heartbeat_at).where(Job.id == many[2].id)) == before
        with pytest.raises(leases.LeaseLost):
            leases.fence(s, many[2].id, tokens[many[2].id])
        assert leases.fence(s, many[1].id, tokens[many[1].id]) is True
    engine.dispose()
