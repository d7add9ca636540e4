"""A sweep's objective series (what its leaderboard, best trial and pruning decisions rank by):
read as the metric's JSON text cut out of each epoch row by the database, exactly the values the
trials recorded, on PostgreSQL and SQLite."""

from __future__ import annotations

import math
import uuid

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from store import repo
from store import sweeps as store_sweeps
from store.db import make_engine
from store.floats import decode_float
from store.migrate import upgrade
from store.models import DEFAULT_PROJECT, JobMetric
from training import validate_spec

from .helpers import note_spec

#: floats whose shortest text needs 17 digits, extremes, a negative zero, non-finite values, an int
AWKWARD = [0.1 + 0.2, 1 / 3, 0.7799900000000001, 1e-300, 5e-324, 1.7976931348623157e308, 123456789.12345679,
           -0.0, math.nan, math.inf, -math.inf, 7]
ODD = 'val "odd.name$[0]'  # a metric name no JSON path takes as it is


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
def test_a_sweeps_objective_series_is_exactly_what_its_trials_recorded(backend, pg, tmp_path):
    url = pg.create(f"objseries_{uuid.uuid4().hex[:6]}") if backend == "postgresql" else f"sqlite:///{tmp_path / 'o.db'}"
    upgrade(url)
    engine = make_engine(url)
    spec = validate_spec(note_spec(3)).model_dump(mode="json")
    with Session(engine) as s:
        sweep = store_sweeps.create_sweep(
            s, project_id=DEFAULT_PROJECT, name="series", method="random", config={}, objective_metric="val_accuracy",
            objective_mode="max", max_trials=3, max_concurrent=3)
        a, b, c = repo.create_jobs(s, [(spec, "cpu", None)] * 3, project_id=DEFAULT_PROJECT, sweep_id=sweep.id,
                                   trials=[(k, {}) for k in range(3)])
        s.commit()
        repo.record_progress(s, a.id, [{"epoch": e, "val_accuracy": v, ODD: v, "loss": 1.0} for e, v in enumerate(AWKWARD, 1)])
        repo.record_progress(s, b.id, [{"epoch": 1, "loss": 2.0}, {"epoch": 2, "loss": 1.5, "val_accuracy": 0.5}])
        s.commit()
        rows = s.execute(select(JobMetric.job_id, JobMetric.epoch, JobMetric.values)).all()
        for metric in ("val_accuracy", ODD, "loss", "missing"):
            expected: dict[str, dict[int, str]] = {}
            for job_id, epoch, values in rows:  # each row's whole object, decoded in Python
                v = decode_float(values.get(metric))
                if v is not None:
                    expected.setdefault(job_id, {})[epoch] = repr(v)
            got = store_sweeps.objective_series(s, sweep.id, metric)
            assert {j: {e: repr(v) for e, v in by.items()} for j, by in got.items()} == expected, metric
            assert all(type(v) is float for by in got.values() for v in by.values())
        series = store_sweeps.objective_series(s, sweep.id, "val_accuracy")
        assert [repr(series[a.id][e]) for e in range(1, len(AWKWARD) + 1)] == [repr(float(v)) for v in AWKWARD]
        assert series[b.id] == {2: 0.5} and c.id not in series
