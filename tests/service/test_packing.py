"""Packed jobs end to end (issue 13): a real worker that claims one job of a batch of same-shape
jobs trains the batch as one fused pack, and records each member on its own job exactly as a solo
run: status, per-epoch metrics (1e-5 relative to ``training.fit`` of the same spec), best
checkpoint, stop reason, and ``info.pack`` saying which pack it ran in. Run against the embedded
set-up (``trainyard serve``: SQLite + the SQLAlchemy broker) and PostgreSQL + Redis (``trainyard
api`` + ``trainyard worker``); the embedded run also packs a sweep's trials, and keeps them alone
with ``"pack": false`` in the sweep's base."""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, update

import training
from client import Client
from store import repo
from store.db import session_scope
from store.models import Job, JobEvent, JobMetric

from .conftest import RUN_ID, cli
from .helpers import ROOT, free_port, stop, wait_for_log, wait_http, wait_status

MEMBERS = 8
EPOCHS = 5
BASE: dict[str, Any] = {
    "device": "cpu",
    "deterministic": True,
    "data": {"dataset": "digits", "validation_split": 0.2, "batch_size": 128, "standardize": True},
    "model": {"layers": [{"type": "dense", "units": 16, "activation": "relu"}, {"type": "dropout", "rate": 0.0},
                         {"type": "dense", "units": 10}]},
    "loss": "sparse_categorical_crossentropy",
    "metrics": ["accuracy"],
    "epochs": EPOCHS,
}


def batch_specs() -> list[dict[str, Any]]:
    """Eight same-shape jobs: own seeds, rates, betas, L2 and epochs (epochs are not part of the key)."""
    specs = []
    for k in range(MEMBERS):
        spec = copy.deepcopy(BASE)
        spec["name"] = f"pack-{k}"
        spec["seed"] = 100 + k
        spec["epochs"] = EPOCHS - (k % 2)
        spec["optimizer"] = {"name": "adam", "learning_rate": 0.002 * (k + 1), "beta_1": 0.85 + 0.01 * k}
        if k % 3 == 0:
            spec["model"]["layers"][0]["kernel_regularizer"] = {"l2": 0.001 * (k + 1)}
        specs.append(spec)
    return specs


def close(a: float, b: float) -> bool:
    return a == b or abs(a - b) <= 1e-5 * max(abs(a), abs(b))


def check_batch_is_packed(c: Client) -> None:
    specs = batch_specs()
    alone = dict(copy.deepcopy(specs[0]), name="alone", pack=False)
    ids = [j["id"] for j in c.submit_batch([*specs, alone])["results"]]
    done = [wait_status(c, i, ("succeeded", "failed", "cancelled"), timeout=300) for i in ids]
    assert [d["status"] for d in done] == ["succeeded"] * (MEMBERS + 1), done
    packs = [d["info"]["pack"] for d in done[:MEMBERS]]
    assert all(p["fused"] is True for p in packs), packs
    assert {p["id"] for p in packs} == {packs[0]["id"]} and sorted(packs[0]["jobs"]) == sorted(ids[:MEMBERS])
    assert sorted(p["index"] for p in packs) == list(range(MEMBERS)) and {p["size"] for p in packs} == {MEMBERS}
    assert "pack" not in (done[MEMBERS]["info"] or {})  # "pack": false ran alone
    for job_id, spec, d in zip(ids, [*specs, alone], done, strict=True):
        solo = training.fit(spec)
        rows = c.metrics(job_id)
        assert len(rows) == len(solo.history) == spec["epochs"]
        for row, ref in zip(rows, solo.history, strict=True):
            for key in ("loss", "val_loss", "accuracy", "val_accuracy", "lr"):
                assert close(row[key], ref[key]), (job_id, row["epoch"], key, row[key], ref[key])
        assert d["stop_reason"] == solo.stop_reason
        assert d["best"]["epoch"] == solo.best_epoch and close(d["best"]["value"], solo.best_value)
        assert d["progress"]["epoch"] == spec["epochs"] and not math.isnan(rows[-1]["loss"])
        assert any(ck["is_best"] for ck in c.checkpoints(job_id))


def check_sweeps(c: Client) -> None:
    """A random sweep's trials, queued together, run as one pack; with ``"pack": false`` in the
    sweep's base, each runs alone. Both sweeps complete."""
    base = dict(copy.deepcopy(BASE), epochs=2)
    for pack in (True, False):
        sweep = c.create_sweep({
            "name": f"pack-{pack}", "base": dict(base, pack=pack), "method": "random", "seed": 3,
            "parameters": {"optimizer.learning_rate": {"distribution": "log_uniform", "min": 1e-3, "max": 3e-2},
                           "model.layers[1].rate": {"values": [0.0, 0.2]}},
            "objective": {"metric": "val_accuracy"}, "max_trials": 4, "max_concurrent": 4,
        })
        done = c.wait_sweep(sweep["id"], timeout=300)
        assert done["status"] == "succeeded" and len(done["trials"]) == 4, done
        packs = [(c.job(t["job_id"])["info"] or {}).get("pack") for t in done["trials"]]
        if pack:
            assert all(p and p["fused"] for p in packs) and len({p["id"] for p in packs}) == 1, packs
        else:
            assert packs == [None] * 4, packs


@pytest.fixture()
def pg_service(service_env: dict[str, str], migrated: None, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[str]:
    """An API and a worker of their own (own queues, packing on, plus the test's ``pack_env``
    settings), on the session's PostgreSQL + Redis."""
    extra = getattr(request, "param", {})
    tag = "-".join(f"{k[-7:]}{v}" for k, v in sorted(extra.items())).lower()
    env = {**service_env, "TRAINYARD_QUEUE_PREFIX": f"ty-{RUN_ID}-pack{tag}-", "TRAINYARD_PACK": "1", **extra}
    port = free_port()
    with (tmp_path / "api.log").open("wb") as f:
        api = subprocess.Popen(cli("api", "--port", str(port)), env=env, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    log = tmp_path / "worker.log"
    with log.open("wb") as f:
        worker = subprocess.Popen(cli("worker", "--queues", "gpu,cpu", "--name", f"ty-{RUN_ID}-pack"), env=env,
                                  cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/healthz", api)
        wait_for_log(log, " ready.", worker)
        yield url
    finally:
        stop(worker)
        stop(api)


def test_a_batch_of_same_shape_jobs_runs_as_one_pack_on_postgres_and_redis(pg_service: str) -> None:
    with Client(pg_service) as c:
        check_batch_is_packed(c)


def wait_view(c: Client, job_id: str, ok: Callable[[dict[str, Any]], bool], timeout: float = 120.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        view = c.job(job_id)
        if ok(view):
            return view
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id}: {view}")
        time.sleep(0.1)


def one_long_member(epochs: int = 40) -> list[dict[str, Any]]:
    """Three same-shape jobs; the second runs until something ends it."""
    specs = batch_specs()[:3]
    return [dict(specs[0], epochs=epochs), dict(specs[1], epochs=100_000), dict(specs[2], epochs=epochs)]


def test_cancelling_one_packed_job_leaves_the_others_to_finish(pg_service: str) -> None:
    specs = one_long_member()
    with Client(pg_service) as c:
        ids = [j["id"] for j in c.submit_batch(specs)["results"]]
        wait_status(c, ids[1], ("running",), timeout=120)
        # while it runs, the job view says which pack it runs in (set when the pack is formed)
        running = wait_view(c, ids[1], lambda v: "pack" in (v["info"] or {}))
        pack = running["info"]["pack"]
        assert running["status"] == "running" and sorted(pack["jobs"]) == sorted(ids), running
        assert pack["id"] == pack["jobs"][0] and pack["jobs"][pack["index"]] == ids[1] and pack["size"] == 3
        c.cancel(ids[1])
        cancelled = wait_status(c, ids[1], ("succeeded", "failed", "cancelled"), timeout=120)
        others = [wait_status(c, i, ("succeeded", "failed", "cancelled"), timeout=300) for i in (ids[0], ids[2])]
    assert cancelled["status"] == "cancelled" and cancelled["stop_reason"] == "cancelled", cancelled
    assert [o["status"] for o in others] == ["succeeded"] * 2 and [o["progress"]["epoch"] for o in others] == [40, 40]
    assert {o["info"]["pack"]["id"] for o in others} == {cancelled["info"]["pack"]["id"]}  # one pack


def test_a_member_that_ends_is_recorded_while_its_pack_trains_on(pg_service: str) -> None:
    """A packed job that runs its last epoch (or stops otherwise) is recorded at once, as its solo
    run would be (status, metrics, best checkpoint, its own run time), while the pack's other
    members train on: it does not show ``running`` until the last member ends."""
    specs = one_long_member(epochs=3)
    with Client(pg_service) as c:
        ids = [j["id"] for j in c.submit_batch(specs)["results"]]
        short = [wait_status(c, i, ("succeeded", "failed", "cancelled"), timeout=300) for i in (ids[0], ids[2])]
        long_now = c.job(ids[1])  # still training in the same pack
        ckpt, _ = c.best_checkpoint(ids[0])
        c.cancel(ids[1])
        long_end = wait_status(c, ids[1], ("succeeded", "failed", "cancelled"), timeout=120)
    assert [v["status"] for v in short] == ["succeeded"] * 2 and [v["progress"]["epoch"] for v in short] == [3, 3], short
    assert long_now["status"] == "running" and long_now["info"]["pack"]["id"] == short[0]["info"]["pack"]["id"], long_now
    assert ckpt  # its best checkpoint is downloadable while the pack trains on
    assert long_end["status"] == "cancelled" and long_end["progress"]["epoch"] > 3, long_end
    # each records its own run time (until it left the pack), not the pack's
    assert all(v["run_seconds"] < long_end["run_seconds"] for v in short), (short, long_end)


def test_a_member_that_loses_its_lease_leaves_the_pack_alone(pg_service: str, inproc_env: dict[str, str],
                                                            tmp_path: Path) -> None:
    """Another attempt takes one running member over (its worker looked lost: heartbeat aged, then
    claimed, as a redelivered task does): that member leaves the pack, the worker writes nothing
    more to it, and the other members train on to their own end."""
    specs = one_long_member()
    with Client(pg_service) as c:
        ids = [j["id"] for j in c.submit_batch(specs)["results"]]
        # training started, and the view says so while it runs: fused, in which pack, which member
        view = wait_view(c, ids[1], lambda v: v["status"] == "running" and (v["progress"] or {}).get("epoch", 0) >= 1
                         and (v["info"] or {}).get("pack", {}).get("fused") is True)
        pack = view["info"]["pack"]  # the pack's order is the claim order (priority, age, id)
        assert sorted(pack["jobs"]) == sorted(ids) and pack["jobs"][pack["index"]] == ids[1], view["info"]
        assert pack["id"] == pack["jobs"][0] and pack["size"] == 3, view["info"]
        with session_scope() as s:  # one transaction: the worker's heartbeat cannot slip in between
            s.execute(update(Job).where(Job.id == ids[1]).values(heartbeat_at=repo.utcnow() - timedelta(hours=1)))
            taken = repo.claim_job(s, ids[1], "test-taker", 60.0)
            assert taken is not None and taken.attempts == 2
            token = taken.lease_token
            # the new attempt stays alive for the test's length (it sends no heartbeats; a stale one
            # would be taken over again by the reconciler after heartbeat_stale_s on a slow machine)
            s.execute(update(Job).where(Job.id == ids[1]).values(heartbeat_at=repo.utcnow() + timedelta(hours=1)))
            rows = s.scalar(select(func.count()).select_from(JobMetric).where(JobMetric.job_id == ids[1]))
        others = [wait_status(c, i, ("succeeded", "failed", "cancelled"), timeout=300) for i in (ids[0], ids[2])]
        wait_for_text(tmp_path / "worker.log", f"job {ids[1]}: lost its lease in the pack of {pack['id']}")
        after, rows0 = c.job(ids[1]), c.metrics(ids[0])
    assert [o["status"] for o in others] == ["succeeded"] * 2, others
    assert [o["progress"]["epoch"] for o in others] == [40, 40] and len(rows0) == 40
    assert {o["info"]["pack"]["id"] for o in others} == {pack["id"]}
    # the taken-over job is the new attempt's: still running under its lease, nothing more written
    assert after["status"] == "running", after
    with session_scope() as s:
        job = s.get(Job, ids[1])
        assert job is not None and (job.lease_token, job.worker) == (token, "test-taker")
        assert s.scalar(select(func.count()).select_from(JobMetric).where(JobMetric.job_id == ids[1])) == rows
        assert [s.get(Job, i).attempts for i in (ids[0], ids[2])] == [1, 1]  # trained on in the pack, not requeued
        assert repo.finish_job(s, ids[1], status="cancelled", stop_reason="cancelled")  # the new attempt ends it


def wait_for_text(path: Path, text: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in path.read_text(errors="replace"):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{text!r} not in {path}")
        time.sleep(0.2)


@pytest.mark.parametrize("pg_service", [{"TRAINYARD_PACK_MAX_MEMBERS": "3"}], indirect=True)
def test_packs_stay_within_the_member_budget(pg_service: str) -> None:
    specs = [dict(s, epochs=1) for s in batch_specs()[:5]]
    with Client(pg_service) as c:
        ids = [j["id"] for j in c.submit_batch(specs)["results"]]
        done = [wait_status(c, i, ("succeeded", "failed", "cancelled"), timeout=300) for i in ids]
    assert [d["status"] for d in done] == ["succeeded"] * 5, done
    packs = [(d["info"] or {}).get("pack") for d in done]
    sizes = {p["id"]: p["size"] for p in packs if p}
    assert sizes and max(sizes.values()) == 3 and all(2 <= n <= 3 for n in sizes.values()), packs


@pytest.mark.parametrize("pg_service", [{"TRAINYARD_PACK_MAX_PARAMS": "1000"}], indirect=True)
def test_a_job_over_the_parameter_budget_runs_alone(pg_service: str) -> None:
    specs = [dict(s, epochs=1) for s in batch_specs()[:3]]  # 474 parameters + one batch of activations each
    with Client(pg_service) as c:
        ids = [j["id"] for j in c.submit_batch(specs)["results"]]
        done = [wait_status(c, i, ("succeeded", "failed", "cancelled"), timeout=300) for i in ids]
    assert [d["status"] for d in done] == ["succeeded"] * 3, done
    assert all("pack" not in (d["info"] or {}) for d in done), done


def test_a_batch_of_same_shape_jobs_runs_as_one_pack_embedded(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINYARD_")}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.Popen([sys.executable, "-m", "client.cli", "serve", "--port", str(port), "--data-dir", str(tmp_path / "data")],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        proc.stdout.readline()  # type: ignore[union-attr]  # the URL line: the API is up
        with Client(f"http://127.0.0.1:{port}") as c:
            check_batch_is_packed(c)
            check_sweeps(c)
    finally:
        stop(proc)


# --------------------------------------------------------------------------- resumed members


class Snaps(training.BaseReporter):
    """A reporter that keeps every snapshot a run hands it, by epoch."""

    def __init__(self) -> None:
        self.snapshots: dict[int, Any] = {}

    def on_snapshot(self, snapshot: Any) -> None:
        self.snapshots[snapshot.epoch] = snapshot


def _epoch_events(job_id: str) -> list[int]:
    """The epochs a job's events say were recorded, in the order they were written."""
    with session_scope(write=False) as s:
        rows = s.scalars(select(JobEvent.data).where(JobEvent.job_id == job_id, JobEvent.kind == "epoch").order_by(JobEvent.id))
        return [int(d["epoch"]) for d in rows]


def _pack_events(job_id: str) -> int:
    with session_scope(write=False) as s:
        return int(s.scalar(select(func.count()).select_from(JobEvent).where(JobEvent.job_id == job_id, JobEvent.kind == "pack")) or 0)


def _asha_sweep(c: Client, trials: int, epochs: int, seed: int) -> tuple[dict[str, Any], dict[str, dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    """An ASHA sweep (min 1 epoch, reduction factor 3) of BASE run to its end: the sweep, each
    trial's job view and its metric rows, by job id; each trial's epochs recorded once, in order,
    and equal to its solo ``training.fit`` run's."""
    sweep = c.create_sweep({
        "name": "pack-asha", "base": dict(copy.deepcopy(BASE), epochs=epochs), "method": "random", "seed": seed,
        "parameters": {"optimizer.learning_rate": {"distribution": "log_uniform", "min": 1e-3, "max": 3e-2}},
        "objective": {"metric": "val_accuracy", "mode": "max"}, "max_trials": trials, "max_concurrent": trials,
        "early_termination": {"type": "asha", "min_epochs": 1, "reduction_factor": 3},
    })
    done = c.wait_sweep(sweep["id"], timeout=300)
    assert done["status"] == "succeeded" and len(done["trials"]) == trials, done
    jobs = {t["job_id"]: c.job(t["job_id"]) for t in done["trials"]}
    rows = {i: c.metrics(i) for i in jobs}
    for job_id, view in jobs.items():
        n = len(rows[job_id])
        assert [r["epoch"] for r in rows[job_id]] == list(range(1, n + 1)), rows[job_id]
        assert _epoch_events(job_id) == list(range(1, n + 1))  # each epoch recorded once, in order
        solo = training.fit(view["spec"])
        for row, ref in zip(rows[job_id], solo.history, strict=False):
            for key in ("loss", "val_loss", "accuracy", "val_accuracy", "lr"):
                assert close(row[key], ref[key]), (job_id, row["epoch"], key, row[key], ref[key])
    return done, jobs, rows


def test_an_asha_sweeps_rungs_are_decided_together_in_its_pack(pg_service: str, inproc_env: dict[str, str]) -> None:
    """ASHA (min 1 epoch, reduction factor 3, 9 trials of 9 epochs): the 9 trials train as one
    pack, and the members that reach a rung at the same epoch end are ranked together: the best
    third go on in the pack at once (never paused, so never resumed: one attempt each), the others
    pause and end pruned. Every trial's epochs are recorded once and equal its solo run's."""
    with Client(pg_service) as c:
        _, jobs, rows = _asha_sweep(c, 9, 9, seed=5)
    reached = {i: len(r) for i, r in rows.items()}
    assert sorted(reached.values()) == [1] * 6 + [3] * 2 + [9], reached
    # the best third of each rung, by the rung's value: epoch 1 among all 9, epoch 3 among those 3
    at = lambda i, e: rows[i][e - 1]["val_accuracy"]  # noqa: E731
    best1 = sorted(jobs, key=lambda i: -at(i, 1))[:3]
    assert sorted(best1) == sorted(i for i, n in reached.items() if n > 1), (reached, {i: at(i, 1) for i in jobs})
    assert max(best1, key=lambda i: at(i, 3)) == next(i for i, n in reached.items() if n == 9)
    packs = [v["info"]["pack"] for v in jobs.values()]
    assert all(p["fused"] is True and p["size"] == 9 for p in packs) and len({p["id"] for p in packs}) == 1, packs
    assert sorted(v["stop_reason"] for v in jobs.values()) == ["completed"] + ["pruned"] * 8, jobs
    with session_scope(write=False) as s:
        assert all(s.get(Job, i).attempts == 1 for i in jobs)


@pytest.mark.parametrize("pg_service", [{"TRAINYARD_PACK_MAX_MEMBERS": "3"}], indirect=True)
def test_an_asha_sweeps_promoted_trials_resume_in_a_pack(pg_service: str, inproc_env: dict[str, str]) -> None:
    """ASHA with packs of at most 3 (``TRAINYARD_PACK_MAX_MEMBERS``), 9 trials (seed 11: the first
    pack holds two of the rung's best three): a trial paused at a rung before enough trials had
    reached it is promoted later (async ASHA), and its next attempt resumes from its snapshot in a
    pack (a ``pack`` event in that attempt; its view says fused); every trial's epochs are
    recorded once, in order, and equal its solo run's, across pauses and resumes."""
    with Client(pg_service) as c:
        _, jobs, rows = _asha_sweep(c, 9, 9, seed=11)
    with session_scope(write=False) as s:
        attempts = {i: s.get(Job, i).attempts for i in jobs}
        events = {i: [(e.kind, e.data) for e in s.scalars(select(JobEvent).where(JobEvent.job_id == i).order_by(JobEvent.id))]
                  for i in jobs}
    promoted = [i for i, n in attempts.items() if n > 1]
    assert promoted, attempts  # some trial was paused and promoted
    # the trials whose later attempt (a resume from the snapshot of its pause) trained in a pack
    resumed_in_a_pack = []
    for i in promoted:
        runs = [k for k, (kind, d) in enumerate(events[i]) if kind == "state" and d.get("status") == "running"]
        if any(kind == "pack" for kind, _ in events[i][runs[-1]:]):
            resumed_in_a_pack.append(i)
    assert resumed_in_a_pack, (attempts, events)
    assert all(jobs[i]["info"]["pack"]["fused"] is True for i in resumed_in_a_pack)


def test_a_sweep_advances_as_soon_as_a_trial_leaves_its_pack(pg_service: str) -> None:
    """A sweep of 4 trials, 2 at a time (a grid of 2 and 40 epochs x 2 seeds; sweep seed 3 puts a
    2-epoch and a 40-epoch trial first): the first two train as one pack, and when the short one
    leaves it the sweep advances at once: its third trial is created (queued for any worker) while
    the long one still trains, not when the pack ends. The sweep completes, every trial succeeded."""
    with Client(pg_service) as c:
        sweep = c.create_sweep({
            "name": "pack-advance", "base": copy.deepcopy(BASE), "method": "grid", "seed": 3,
            "parameters": {"epochs": {"values": [2, 40]}, "seed": {"values": [1, 2]}},
            "objective": {"metric": "val_accuracy"}, "max_trials": 4, "max_concurrent": 2,
        })
        done = c.wait_sweep(sweep["id"], timeout=300)
        assert done["status"] == "succeeded" and len(done["trials"]) == 4, done
        views = sorted((c.job(t["job_id"]) for t in done["trials"]), key=lambda v: v["trial_number"])
    assert [v["status"] for v in views] == ["succeeded"] * 4, views
    first = views[:2]
    assert sorted(v["spec"]["epochs"] for v in first) == [2, 40], [v["spec"] for v in views]  # the premise (seed 3)
    pack = first[0]["info"]["pack"]
    assert pack["fused"] is True and sorted(pack["jobs"]) == sorted(v["id"] for v in first), pack
    short, long = sorted(first, key=lambda v: v["spec"]["epochs"])
    assert short["finished_at"] <= views[2]["created_at"] < long["finished_at"], (short, views[2], long)


@pytest.mark.parametrize("ended_by", ["shutdown", "fault"])
def test_the_members_of_a_stopped_pack_resume_from_their_snapshots_together_unless_a_fault_stopped_it(
        inproc_env: dict[str, str], caplog: pytest.LogCaptureFixture, ended_by: str) -> None:
    """A pack's attempt ends after its members' snapshots of epoch 2 and their epoch 3 were
    written, and its members are requeued: by the worker's shutdown (a decision), or by recovery
    after the worker was lost (a fault: ``orchestration.recovery.end_attempt``). After a shutdown,
    the next claim of one member trains all three as one pack; after a fault each runs alone (a
    pack that brought its worker down is not formed again: store.packing.resumes_alone). Either
    way each member resumes from its own snapshot: attempt 2 (its claim event and record),
    epochs 3 and 4 trained again (the dead attempt's epoch 3 replaced), and every epoch equals the
    solo run's."""
    from config.settings import settings_from_env
    from orchestration.recovery import LOST_STOP_REASON, end_attempt
    from worker.record import RunRecord
    from worker.runner import run_job

    settings = settings_from_env({**inproc_env, "TRAINYARD_PACK": "1"})
    queue = f"ty-{RUN_ID}-resumepack-{os.getpid()}"  # no other test's job can join this pack
    specs = [dict(s, epochs=4) for s in batch_specs()[:3]]

    with session_scope() as s:
        ids = [repo.create_job(s, spec=training.validate_spec(spec).model_dump(mode="json"), queue=queue).id for spec in specs]
    solos = []
    for job_id, spec in zip(ids, specs, strict=True):  # the dead pack's writes, attempt 1
        with session_scope() as s:
            token = repo.claim_job(s, job_id, "dead-host:1", 60.0).lease_token  # type: ignore[union-attr]
        rep = Snaps()
        solos.append(training.fit(spec, rep))
        dead = RunRecord(job_id, settings, lease_token=token, attempt=1)
        for h in solos[-1].history[:2]:
            dead.on_epoch(dict(h))
        dead.write_snapshot(rep.snapshots[2])
        dead.on_epoch({**solos[-1].history[2], "loss": 123.0})  # epoch 3, after the snapshot: redone
        dead.flush(force=True)
    with session_scope() as s:
        s.execute(update(Job).where(Job.id.in_(ids)).values(heartbeat_at=repo.utcnow() - timedelta(hours=1)))
        for i in ids:
            if ended_by == "shutdown":
                assert repo.requeue_job(s, i, "worker shutdown")
            else:
                assert end_attempt(s, i, queue, attempts=1, max_attempts=3, cond=[], stop_reason=LOST_STOP_REASON,
                                   reason="worker lost", why="its heartbeat stopped") == "requeued"
    with caplog.at_level("INFO", logger="trainyard.worker"):
        for job_id in ids if ended_by == "fault" else ids[:1]:
            assert run_job(job_id, settings) == "succeeded"
    for job_id in ids:
        if ended_by == "shutdown":
            assert f"job {job_id}: attempt 2 resumes from its snapshot of epoch 2 in the pack" in caplog.text
        else:
            assert f"job {job_id}: its last attempt ended by a fault; it runs alone" in caplog.text
    assert ("packed with" in caplog.text) == (ended_by == "shutdown")
    with session_scope(write=False) as s:
        jobs = [s.get(Job, i) for i in ids]
        assert [(j.status, j.attempts, j.epoch) for j in jobs] == [("succeeded", 2, 4)] * 3
        if ended_by == "shutdown":
            packs = [j.info["pack"] for j in jobs]
            assert all(p["fused"] is True and p["size"] == 3 and p["id"] == ids[0] for p in packs), packs
        events = {i: [e.data for e in s.scalars(select(JobEvent).where(JobEvent.job_id == i, JobEvent.kind == "state"))]
                  for i in ids}
    assert all({"status": "running", "attempt": 2} in ev for ev in events.values()), events
    for job_id, solo in zip(ids, solos, strict=True):
        assert _epoch_events(job_id) == [1, 2, 3, 3, 4]  # the dead attempt's epoch 3, then the resumed run's 3 and 4
        with session_scope(write=False) as s:
            rows = list(s.scalars(select(JobMetric).where(JobMetric.job_id == job_id).order_by(JobMetric.epoch)))
        assert [r.epoch for r in rows] == [1, 2, 3, 4]
        for r, ref in zip(rows, solo.history, strict=True):
            for key in ("loss", "val_loss", "accuracy", "val_accuracy"):
                assert close(r.values[key], ref[key]), (job_id, r.epoch, key, r.values[key], ref[key])


@pytest.mark.parametrize("bad", ["another_spec", "unreadable"])
def test_a_member_whose_snapshot_cannot_be_restored_or_read_ends_alone_as_solo_and_the_others_train(
        inproc_env: dict[str, str], caplog: pytest.LogCaptureFixture, bad: str) -> None:
    """Three resuming members of a pack (their attempt 1 wrote a snapshot of epoch 2, then the
    worker shut down); member 1's snapshot cannot be used: ``another_spec``, it is a snapshot of
    member 0's spec (``fit_fused`` cannot restore it), or ``unreadable``, its file is a directory
    (reading it raises ``IsADirectoryError``, not an artifact error). Member 1 alone ends, recorded
    as the same job run alone (``TRAINYARD_PACK=0``) records it: status, stop reason and error
    (``internal error: IsADirectoryError: ...`` for the unreadable one); members 0 and 2 train in
    the pack and succeed with their solo runs' epochs; no member is left running."""
    from config.settings import settings_from_env
    from store.artifact_store import get_store
    from store.models import Snapshot as SnapshotRow
    from worker.record import RunRecord
    from worker.runner import run_job

    packed = settings_from_env({**inproc_env, "TRAINYARD_PACK": "1"})
    alone = settings_from_env({**inproc_env, "TRAINYARD_PACK": "0"})
    queue = f"ty-{RUN_ID}-badsnap-{bad}-{os.getpid()}"  # no other test's job can join this pack
    specs = [dict(s, epochs=4) for s in batch_specs()[:3]]

    solos, snaps = [], []
    for spec in specs:
        rep = Snaps()
        solos.append(training.fit(spec, rep))
        snaps.append(rep.snapshots[2])
    # member 1's snapshot: member 0's (another spec) or its own (made unreadable below); the
    # last job: member 1's spec with the same snapshot, run alone in a queue of its own
    written = [snaps[0], snaps[0] if bad == "another_spec" else snaps[1], snaps[2], snaps[0] if bad == "another_spec" else snaps[1]]
    with session_scope() as s:
        ids = [repo.create_job(s, spec=training.validate_spec(spec).model_dump(mode="json"), queue=q).id
               for spec, q in zip([*specs, specs[1]], [queue] * 3 + [f"{queue}-alone"], strict=True)]
    for job_id, snap in zip(ids, written, strict=True):  # attempt 1 wrote its snapshot of epoch 2, then stopped
        with session_scope() as s:
            token = repo.claim_job(s, job_id, "gone-host:1", 60.0).lease_token  # type: ignore[union-attr]
        dead = RunRecord(job_id, packed, lease_token=token, attempt=1)
        dead.write_snapshot(snap)
        dead.flush(force=True)
    with session_scope() as s:
        for i in ids:
            assert repo.requeue_job(s, i, "worker shutdown")
    if bad == "unreadable":
        store = get_store(packed)
        for i in (ids[1], ids[3]):
            with session_scope(write=False) as s:
                row = s.get(SnapshotRow, i)
                assert row is not None
                path = store.local_path(row.uri)
            assert path is not None
            path.unlink()
            path.mkdir()  # a directory where the file was: reading it raises IsADirectoryError
    # the job run alone: what its solo run records (an error other than the engine's is re-raised)
    if bad == "unreadable":
        with pytest.raises(IsADirectoryError):
            run_job(ids[3], alone)
    else:
        assert run_job(ids[3], alone) == "failed"
    with caplog.at_level("INFO", logger="trainyard.worker"):
        assert run_job(ids[0], packed) == "succeeded"
    assert f"packed with 2 queued job(s) of its shape: {ids[1]}, {ids[2]}" in caplog.text
    with session_scope(write=False) as s:
        jobs = [s.get(Job, i) for i in ids]
        assert all(j is not None for j in jobs)
        ended = [(j.status, j.stop_reason, j.attempts) for j in jobs]  # type: ignore[union-attr]
        errors = [(j.error or "").replace(j.id, "<job>") for j in jobs]  # type: ignore[union-attr]
        packs = [j.info.get("pack") for j in jobs[:3]]  # type: ignore[union-attr]
    assert ended[:3] == [("succeeded", "completed", 2), ended[3], ("succeeded", "completed", 2)], ended
    assert ended[3] == ("failed", "error", 2) and errors[1] == errors[3], (errors, ended)
    if bad == "unreadable":
        assert errors[1].startswith("internal error: IsADirectoryError: "), errors[1]
    else:
        assert errors[1] == "cannot resume: the snapshot was taken from a different job spec", errors[1]
    assert packs[0]["fused"] is True and packs[2]["fused"] is True and packs[0]["jobs"] == ids[:3], packs
    for job_id, solo in ((ids[0], solos[0]), (ids[2], solos[2])):
        assert _epoch_events(job_id) == [3, 4]  # resumed from its snapshot of epoch 2
        with session_scope(write=False) as s:
            rows = list(s.scalars(select(JobMetric).where(JobMetric.job_id == job_id).order_by(JobMetric.epoch)))
        assert [r.epoch for r in rows] == [3, 4]
        for r, ref in zip(rows, solo.history[2:], strict=True):
            for key in ("loss", "val_loss", "accuracy", "val_accuracy"):
                assert close(r.values[key], ref[key]), (job_id, r.epoch, key, r.values[key], ref[key])
