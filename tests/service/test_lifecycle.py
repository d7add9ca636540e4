"""The job lifecycle (store.lifecycle): one table of allowed transitions, and every status
change of a job goes through its compare-and-set."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from store import lifecycle, repo
from store.db import session_scope
from store.lifecycle import CANCELLED, FAILED, PAUSED, QUEUED, RUNNING, STATUSES, SUCCEEDED, IllegalTransition
from store.models import TERMINAL_STATUSES, Job
from training import validate_spec

from .test_faults_kit import tiny_spec

ROOT = Path(__file__).resolve().parents[2]


def test_the_table_allows_exactly_the_documented_moves():
    allowed = {(a, b) for a in STATUSES for b in STATUSES if lifecycle.allowed(a, b)}
    assert allowed == {
        (QUEUED, RUNNING), (QUEUED, CANCELLED), (QUEUED, FAILED),
        (RUNNING, RUNNING), (RUNNING, QUEUED), (RUNNING, PAUSED), (RUNNING, SUCCEEDED), (RUNNING, FAILED),
        (RUNNING, CANCELLED),
        (PAUSED, QUEUED), (PAUSED, SUCCEEDED), (PAUSED, FAILED), (PAUSED, CANCELLED),
        (SUCCEEDED, QUEUED),  # continued with more epochs (POST /v1/jobs/{id}/continue)
    }
    for terminal in set(TERMINAL_STATUSES) - {SUCCEEDED}:
        assert lifecycle.TRANSITIONS[terminal] == frozenset()


def test_an_illegal_move_is_refused_before_any_sql_and_names_what_is_allowed(inproc_env):
    with session_scope() as s:
        job_id = repo.create_job(s, spec=validate_spec(tiny_spec()).model_dump(mode="json"), queue="lifecycle-cpu").id
    with session_scope() as s, pytest.raises(IllegalTransition) as err:
        lifecycle.move(s, job_id, (SUCCEEDED,), RUNNING)
    assert "cannot move from succeeded to running" in str(err.value) and "queued, running" in str(err.value)
    with session_scope() as s, pytest.raises(IllegalTransition):
        lifecycle.move(s, job_id, (QUEUED,), PAUSED)
    with session_scope() as s:
        assert not lifecycle.move(s, job_id, (RUNNING,), SUCCEEDED)  # allowed, but the row is queued
        assert lifecycle.move(s, job_id, (QUEUED,), RUNNING, values={"worker": "w:1"})
    with session_scope(write=False) as s:
        job = s.get(Job, job_id)
        assert (job.status, job.worker) == (RUNNING, "w:1")
    with session_scope() as s:  # the repository's operations go through it too
        assert repo.finish_job(s, job_id, status=SUCCEEDED, stop_reason="completed")
        assert not repo.finish_job(s, job_id, status=FAILED, stop_reason="error")  # terminal: no second end
        assert repo.request_cancel(s, job_id) == SUCCEEDED


# a status written by hand: an UPDATE or an ORM attribute setting a job's status
_BY_HAND = re.compile(r"\.values\(\s*status\s*=|\bjob\.status\s*=[^=]|\bJob\.status\s*=[^=]")
#: modules whose UPDATEs set the status of other rows than jobs (export artifacts: pending, ready,
#: failed; webhook deliveries: pending, delivered, failed)
OTHER_ROWS = {"artifacts.py", "webhooks.py"}


def test_no_status_change_bypasses_the_lifecycle():
    offenders = []
    for package in ("store", "orchestration", "api", "worker"):
        for path in (ROOT / package).rglob("*.py"):
            if path.name == "lifecycle.py" or (path.parent.name == "store" and path.name in OTHER_ROWS):
                continue
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if _BY_HAND.search(line):
                    offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert offenders == []
