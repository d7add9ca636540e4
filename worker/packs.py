"""Packed jobs: a worker that claims a packable job also claims queued jobs of the same shape and
trains them as one fused model (``training/fused.py``), each recorded on its own job exactly as
a solo run (README, "Packed jobs").

``run_pack_if_any`` is called by ``worker/runner.py`` right after a claim. It packs a job of kind
``train``, not a warm start (``init_from``), whose spec allows it (``"pack": false`` keeps a job
alone; a sweep's ``base`` passes it to every trial) on a server that allows it
(``TRAINYARD_PACK``), whether it starts fresh or resumes from a snapshot (a sweep's promoted
trial, a requeued member of a pack whose worker died, a continued job). Members are the next
queued jobs of the same queue and project, in claim order, fresh or resuming alike, with the same
pack key (``training.fused.pack_key``: layers and sizes,
batch size, data, loss family, metrics, optimizer family, device; epochs, hyperparameters and
seeds may differ), while the pack stays within ``TRAINYARD_PACK_MAX_MEMBERS`` and
``TRAINYARD_PACK_MAX_PARAMS`` (``training.fused.member_cost``). They are claimed through
``store.packing`` (compare-and-set, ``FOR UPDATE SKIP LOCKED`` on PostgreSQL).

Each member resumes from what its solo claim would resume from (``worker.runner.resume_snapshot``:
the job's latest snapshot on an attempt after the first), restored in the pack by
``fit_fused(resume_from=...)`` exactly as a solo ``fit(resume_from=...)`` restores it; its record
is opened with its own attempt number, and its start info says ``resumed_from_epoch``. A member
whose snapshot cannot be read (``_resume_bytes``) or restored (``fit_fused``'s ``on_resume_error``)
ends alone at once, recorded failed with the error its solo run records
(``worker.runner.failure_reason``); the others train.

Each member has its own record (``worker.record.RunRecord``, as a solo run: heartbeat, lease
fence, cancel, sweep pruner, and its result recorded by ``RunRecord.finish``: metrics, best and
last checkpoints, stop reason, status) and, for a sweep trial, its own sweep step
(``orchestration.sweeps.after_jobs``: once per sweep after the pack; the Celery task does
the claimed job's). ``info.pack`` of
each job says which pack it runs in from the moment the pack is formed
(``store.packing.mark_pack``; kept by the record's ``on_start``, and in the recorded result): the
id of the job whose claim formed it, the members' ids, the size, the member's index, and once
training starts whether it is ``fused``.

A member whose lease is lost (another attempt took the job over, or its own watchdog ended the
attempt as stalled) leaves the pack alone: ``fit_fused`` isolates the ``LeaseLost`` its record
or cancel poll raises, the others train on, and nothing more is written to that job (the attempt
that owns it records it). A cancelled member ends alone too (status and stop reason
``cancelled``), as in a solo run.
"""

from __future__ import annotations

import logging
import traceback
from typing import Any

from config.logs import job_context
from config.settings import Settings
from store import leases, packing
from store.db import session_scope
from store.models import TERMINAL_STATUSES
from worker.record import FlushGroup, RunRecord, pack_heartbeat

log = logging.getLogger("trainyard.worker")

#: queued jobs read per claim when looking for members
SCAN_LIMIT = 500


def _packable(spec: dict[str, Any]) -> bool:
    """Allowed by its spec, of kind train, and not a warm start (``init_from``: it runs alone)."""
    return spec.get("pack", True) is not False and spec.get("kind", "train") == "train" and not spec.get("init_from")


def _plan(job_id: str, run_spec: dict[str, Any], spec_dict: dict[str, Any], settings: Settings) -> tuple[Any, int] | None:
    """(pack key, the claimed job's cost), or None when the job cannot lead a pack."""
    from training import data as data_mod
    from training.fused import member_cost, pack_key, why_not_fused
    from training.spec import validate_spec

    try:
        lead = validate_spec(run_spec)
        if why_not_fused([lead, lead]) is not None:
            return None
        info = data_mod.describe(lead.data, lead.seed)
        cost = member_cost(lead, info.input_shape)
    except Exception:  # noqa: BLE001 - an unpackable job simply runs alone (its own run reports errors)
        log.debug("job %s: not packable", job_id, exc_info=True)
        return None
    if cost > settings.pack_max_params or settings.pack_max_members < 2:
        return None
    return pack_key(lead), cost


#: a pack member: (id, lease token, spec, run spec, sweep id, epochs, attempt, snapshot row or None)
Member = tuple[str, int, dict[str, Any], dict[str, Any], str | None, int, int, Any]


def _claim_members(job_id: str, spec_dict: dict[str, Any], run_spec: dict[str, Any], key: str, cost: int,
                   settings: Settings) -> list[Member]:
    """Claim the pack's other members (see :data:`Member`)."""
    from training.fused import pack_key
    from training.spec import validate_spec
    from worker.runner import resume_snapshot, worker_name

    with session_scope() as s:
        chosen: list[tuple[str, dict[str, Any]]] = []
        total = cost
        for c in packing.queued_candidates(s, job_id, SCAN_LIMIT):
            if len(chosen) + 1 >= settings.pack_max_members or total + cost > settings.pack_max_params:
                break
            if not _packable(c.spec) or c.spec.get("data") != spec_dict.get("data"):
                continue
            member_run = {**c.spec, "data": run_spec["data"]}  # same data: the claimed job's resolved one
            try:
                if pack_key(validate_spec(member_run)) != key:
                    continue
            except Exception:  # noqa: BLE001 - a spec that no longer validates runs alone and reports it
                continue
            chosen.append((c.id, member_run))
            total += cost  # same shapes and batch size: the same cost
        runs = dict(chosen)
        jobs = packing.claim_members(s, [i for i, _ in chosen], worker_name(), settings.heartbeat_stale_s)
        ids = [job_id] + [j.id for j in jobs]
        if jobs:
            packing.mark_pack(s, ids)  # the job view says so from now on
        return [(j.id, j.lease_token, dict(j.spec), runs[j.id], j.sweep_id, j.epochs, j.attempts, resume_snapshot(s, j))
                for j in jobs]


def run_pack_if_any(job_id: str, settings: Settings, send: Any, token: int, attempt: int, spec_dict: dict[str, Any],
                    snapshot: Any, sweep_id: str | None, epochs: int) -> str | None:
    """Train the claimed job in a pack when queued jobs of its shape wait; the claimed job's final
    status, or None when it runs alone (the caller then runs it as usual). ``snapshot``: what the
    claimed job resumes from (``worker.runner.resume_snapshot``), or None."""
    if not settings.pack or not _packable(spec_dict):
        return None
    if attempt > 1:
        with session_scope(write=False) as s:
            if packing.resumes_alone(s, job_id):  # its last attempt a fault ended: alone (store.packing)
                log.info("job %s: its last attempt ended by a fault; it runs alone", job_id)
                return None
    from worker.datasets import resolve_dataset

    try:
        run_spec = resolve_dataset(spec_dict, settings)
    except Exception:  # noqa: BLE001 - the solo path reports it
        return None
    plan = _plan(job_id, run_spec, spec_dict, settings)
    if plan is None:
        return None
    key, cost = plan
    others = leases.retry_transient(lambda: _claim_members(job_id, spec_dict, run_spec, key, cost, settings),
                                    deadline_s=30.0, what=f"claim a pack for {job_id}")
    if not others:
        return None
    members: list[Member] = [(job_id, token, spec_dict, run_spec, sweep_id, epochs, attempt, snapshot), *others]
    ids = [m[0] for m in members]
    log.info("job %s: packed with %d queued job(s) of its shape: %s", job_id, len(others), ", ".join(ids[1:]))
    return _run_pack(members, settings, send)


def _run_pack(members: list[Member], settings: Settings, send: Any) -> str:
    from training import SpecError, TrainingError
    from training.fused import RESUME_FAILED, fit_fused
    from worker.runner import failure_reason

    ids = [m[0] for m in members]
    # each member's own attempt number, as its solo claim records it
    configs: dict[str, Any] = {}  # the members' sweeps' configs, read once per sweep
    records = [RunRecord.open(job_id, settings, lease_token=token, attempt=attempt, spec=spec, sweep_id=sweep_id,
                              epochs=epochs, send=send, sweep_configs=configs)
               for job_id, token, spec, _, sweep_id, epochs, attempt, _ in members]
    for k, r in enumerate(records):
        r.pack = {"id": ids[0], "jobs": ids, "size": len(ids), "index": k}  # kept in the info on_start writes
    statuses: dict[str, str] = {}  # the members ended so far, by job id
    formed, pack_ids = members, ids  # the pack as formed (info.pack); some may end before it trains
    with pack_heartbeat(records):  # one heartbeat thread for the pack
        try:
            # read in the pack's try: a member whose snapshot cannot be read ends alone (as solo);
            # anything else ends the pack as any of its errors does (below)
            resumes = _resume_bytes(members, records, statuses)
            members = [m for m in members if m[0] not in statuses]
            records = [r for r in records if r.job_id not in statuses]
            resumes = [resumes[k] for k, i in enumerate(ids) if i not in statuses]
            ids = [m[0] for m in members]
            if not members:
                return _after_sweeps(formed, statuses, settings, send)
            group = FlushGroup(records)  # one transaction per flush interval for the whole pack, not one per member
            in_pack = records  # the members fit_fused trains (its indices)

            def left(members_left: list[tuple[int, Any]]) -> None:
                # each member is recorded as soon as it leaves the pack (its pause, prune, early
                # stop or last epoch), not when the last member ends; while others train on, the
                # sweeps of those that left advance at once: a freed slot takes its next trial
                # (another worker may start it) and a paused trial may be promoted
                ended = [in_pack[k] for k, _ in members_left]
                _record_left([(in_pack[k], res) for k, res in members_left], group, pack_ids, statuses)
                if any(r.job_id not in statuses for r in in_pack):
                    # (a pause decided in this pack was decided with all its sweep knows: an advance
                    # now moves only sweeps that may create trials or have other paused ones)
                    _advance_sweeps([m for m in formed if m[0] in {r.job_id for r in ended}], statuses, settings, send,
                                    settled=pack_ids)

            # a member whose lease is lost leaves the pack alone (its result's stop reason: LOST);
            # one whose snapshot cannot be restored ends at once, as its solo resume (the others train)
            results = fit_fused([m[3] for m in members], records, [r.should_stop for r in records],
                                isolate=(leases.LeaseLost,), resume_from=resumes, on_epoch_logs=group.decide,
                                on_resume_error=lambda k, exc: _end_alone(in_pack[k], exc, statuses),
                                on_leave=left, one_thread_below=settings.torch_one_thread_below)
        except leases.LeaseLost:
            # not from one member's record or poll (those are isolated above): the pack stops;
            # the members' heartbeats stop with it and recovery requeues them
            log.warning("pack of %s: the pack lost its lease outside a member's run; stopped, recovery requeues its members", ids[0])
            return "lease_lost"
        except (SpecError, TrainingError) as exc:
            _fail_all([r for r in records if r.job_id not in statuses], failure_reason(exc))
            return "failed"
        except BaseException as exc:
            _fail_all([r for r in records if r.job_id not in statuses], failure_reason(exc))
            log.error("pack of %s crashed:\n%s", ids[0], traceback.format_exc())
            raise
        # those not recorded as they left (a recording that failed there): now; those whose
        # snapshot could not be restored were recorded by _end_alone
        _record_left([(r, res) for r, res in zip(records, results, strict=True)
                      if r.job_id not in statuses and res.stop_reason != RESUME_FAILED], group, pack_ids, statuses)
    return _after_sweeps(formed, statuses, settings, send)


def _record_left(ended: list[tuple[RunRecord, Any]], group: FlushGroup, pack_ids: list[str],
                 statuses: dict[str, str]) -> None:
    """Record the members that have left the pack (``(record, result)``), as each one's solo run
    records its end: those that end plainly or pause in one transaction (``FlushGroup.finish``),
    the others (a requeue on shutdown, a cancel while pausing, a failed group write) each on its
    own (``RunRecord.finish``); a member whose lease is lost (``LOST``) is left to the attempt that
    owns it. ``statuses`` gets each one's status. Never raises: a member whose recording failed
    here is not in ``statuses`` and is recorded again when the pack ends."""
    from training.fused import LOST

    try:
        for r, result in ended:
            if result.stop_reason != LOST:
                result.info["pack"] = {**result.info.get("pack", {}), "id": pack_ids[0], "jobs": pack_ids,
                                       "index": pack_ids.index(r.job_id)}
        together = group.finish([(r, res) for r, res in ended if res.stop_reason != LOST])
        for r, result in ended:
            job_id = r.job_id
            if result.stop_reason == LOST:
                # another attempt owns this job (or its watchdog ended it as stalled): it left the
                # pack at once, the others trained on; that attempt records the job, not this one
                statuses[job_id] = "stalled" if r.stalled else "lease_lost"
                with job_context(job_id):
                    log.warning("job %s: %s in the pack of %s (%s); it left the pack, nothing more recorded, "
                                "the other members went on", job_id, "stalled" if r.stalled else "lost its lease",
                                pack_ids[0], result.info.get("pack", {}).get("lost"))
            else:
                with job_context(job_id):
                    if job_id in together:
                        statuses[job_id] = together[job_id]
                    else:
                        try:
                            statuses[job_id] = r.finish(result)
                        except leases.LeaseLost:
                            statuses[job_id] = "lease_lost"
                        except Exception:  # noqa: BLE001 - recorded failed by finish(); the others' results stay
                            statuses[job_id] = "failed"
                    log.info("job %s: %s (pack of %s)", job_id, statuses[job_id], pack_ids[0])
            r.ended = True  # out of the pack's flushes and heartbeat
    except Exception:  # noqa: BLE001 - the pack trains on; what is not in statuses is recorded at its end
        log.exception("pack of %s: recording members that left it failed; retried when the pack ends", pack_ids[0])


def _after_sweeps(members: list[Member], statuses: dict[str, str], settings: Settings, send: Any) -> str:
    """Advance the sweeps of the members that are trials and that this worker recorded, each sweep
    once: advancing a sweep looks at all its trials, and every member has ended by now (an ASHA
    rung's pack of 27 trials: 1 sweep step, not 27). The claimed job's sweep is left to the
    Celery task, which advances it after this returns (``worker.app``'s ``after_job``). The
    claimed job's status."""
    # (when it has ended or paused: else that call does not advance it, and it is advanced here)
    claimed = members[0]
    own = claimed[4] if statuses.get(claimed[0]) in (*TERMINAL_STATUSES, "paused") else None
    _advance_sweeps([m for m in members[1:] if own is None or m[4] != own], statuses, settings, send)
    return statuses[members[0][0]]


def _advance_sweeps(members: list[Member], statuses: dict[str, str], settings: Settings, send: Any,
                    settled: list[str] | None = None) -> None:
    """Advance the sweeps of ``members`` that are trials this worker recorded (not those another
    attempt owns), each sweep once, after one read of their sweeps (``after_jobs``, with its
    ``settled``). Never raises."""
    from orchestration.sweeps import after_jobs

    after_jobs([m[0] for m in members if m[4] and statuses.get(m[0]) not in ("lease_lost", "stalled")],
               settings, send, settled=settled)


def _resume_bytes(members: list[Member], records: list[RunRecord], statuses: dict[str, str]) -> list[bytes | None]:
    """Each member's snapshot bytes (None: it starts fresh), read and verified as a solo resume
    reads them (``worker.runner._verified_snapshot``). A member whose snapshot cannot be read
    (missing, corrupt, or any other error of the artifact store) ends alone, recorded as its solo
    run records it (:func:`_end_alone`); the others train without it."""
    from worker.runner import _verified_snapshot

    out: list[bytes | None] = []
    for m, r in zip(members, records, strict=True):
        job_id, attempt, snapshot = m[0], m[6], m[7]
        if snapshot is None:
            out.append(None)
            continue
        with job_context(job_id):
            log.info("job %s: attempt %d resumes from its snapshot of epoch %s in the pack", job_id, attempt, snapshot.epoch)
            try:
                out.append(_verified_snapshot(job_id, snapshot))
            except Exception as exc:  # noqa: BLE001 - that member's snapshot: it alone ends
                out.append(None)
                _end_alone(r, exc, statuses)
    return out


def _end_alone(r: RunRecord, exc: BaseException, statuses: dict[str, str]) -> None:
    """End member ``r`` alone before the pack trains (its snapshot could not be read or restored),
    recorded failed with the error its solo run records for ``exc`` (``worker.runner.failure_reason``;
    an error other than the engine's own is logged with its traceback, as a solo run's crash is);
    ``statuses`` gets its status. Its record then leaves the pack's group flushes, and its heartbeat
    thread ends at its next beat (the job is no longer running)."""
    from training import SpecError, TrainingError
    from worker.runner import failure_reason

    with job_context(r.job_id):
        if not isinstance(exc, SpecError | TrainingError):
            log.error("job %s crashed in its pack before training:\n%s", r.job_id,
                      "".join(traceback.format_exception(exc)))
        try:
            r.fail(failure_reason(exc))
            statuses[r.job_id] = "failed"
        except leases.LeaseLost:
            statuses[r.job_id] = "lease_lost"
            log.warning("job %s: not recorded as failed: another attempt owns it", r.job_id)
        r.ended = True  # out of the pack's flushes and heartbeat
        log.info("job %s: %s (%s); the other members of its pack train", r.job_id, statuses[r.job_id],
                 failure_reason(exc))


def _fail_all(records: list[RunRecord], error: str) -> None:
    """Record the pack's failure on each member still this worker's (a member another attempt
    owns is left to it)."""
    for r in records:
        try:
            r.fail(error)
        except leases.LeaseLost:
            log.warning("job %s: not recorded as failed: another attempt owns it", r.job_id)
