"""Issue 18: property-based tests (hypothesis) throwing generated schedules, job specs and uploads
at a real ``trainyard api`` on PostgreSQL: never a 5xx, and every answer within a bounded time."""

from __future__ import annotations

import copy
import io
import json
import time
from typing import Any

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .helpers import note_spec

#: every answer within this (a preview of 200,000 steps takes well under a second)
BOUND_S = 15.0
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

numbers = st.one_of(
    st.integers(min_value=-(10**30), max_value=10**30),
    st.integers(min_value=-3, max_value=1000),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([0, 1, -1, 0.5, 1e-300, 1e300, 1e308, -1e308, 2.0, 1.0000001, 0.9999999, 2**63, 2**64 - 1]),
)
texts = st.text(alphabet=st.characters(exclude_categories=()), max_size=20)  # lone surrogates included
scalars = st.one_of(st.none(), st.booleans(), numbers, texts)
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(texts, inner, max_size=4)), max_leaves=12)

SCHEDULE_FIELDS = (
    "initial_learning_rate", "decay_steps", "decay_rate", "staircase", "step_size", "gamma", "unit", "milestones",
    "end_learning_rate", "power", "cycle", "alpha", "warmup_target", "first_decay_steps", "t_mul", "m_mul",
    "max_lr", "total_steps", "pct_start", "anneal_strategy", "div_factor", "final_div_factor", "three_phase",
    "warmup_steps", "warmup_start_lr", "factor", "patience", "min_lr",
)
schedules = st.builds(
    lambda kind, fields: {"schedule": kind, **fields},
    st.sampled_from(["constant", "exponential", "step", "multistep", "polynomial", "cosine", "cosine_restarts",
                     "one_cycle", "reduce_on_plateau", "nope"]),
    st.dictionaries(st.sampled_from(SCHEDULE_FIELDS), st.one_of(
        numbers, st.booleans(), st.sampled_from(["epoch", "step", "cos", "linear"]),
        st.lists(st.integers(min_value=-5, max_value=10**6), max_size=50)), max_size=8),
)


def _post_json(c: httpx.Client, path: str, body: Any) -> httpx.Response:
    content = json.dumps(body, ensure_ascii=True).encode()  # a lone surrogate travels as \\udXXX
    t0 = time.monotonic()
    r = c.post(path, content=content, headers={"content-type": "application/json"})
    assert time.monotonic() - t0 < BOUND_S, (path, body)
    assert r.status_code < 500, (r.status_code, r.text[:500], body)
    return r


@pytest.fixture(scope="module")
def http(api_url: str) -> Any:
    with httpx.Client(base_url=api_url, timeout=60) as c:
        yield c


@FUZZ
@given(lr=st.one_of(schedules, numbers), steps=st.one_of(st.integers(1, 3000), numbers),
       per_epoch=st.one_of(st.none(), st.integers(1, 50), numbers))
def test_previews_of_generated_schedules_are_never_a_5xx(http: httpx.Client, lr: Any, steps: Any, per_epoch: Any) -> None:
    r = _post_json(http, "/v1/schedules/preview", {"learning_rate": lr, "steps": steps, "steps_per_epoch": per_epoch})
    if r.status_code == 200:
        assert len(r.json()["lr"]) == steps


SPEC_PATHS = (
    ("name",), ("seed",), ("epochs",), ("max_steps",), ("device",), ("data", "batch_size"), ("data", "dataset"),
    ("data", "validation_split"), ("optimizer",), ("optimizer", "learning_rate"), ("optimizer", "name"),
    ("optimizer", "momentum"), ("model", "layers", 0, "units"), ("model", "layers", 0, "kernel_initializer"),
    ("model", "layers", 0, "activation"), ("model", "layers", 1, "rate"), ("loss",), ("metrics",), ("callbacks",),
    ("callbacks", "early_stopping", "patience"), ("lr_find",),
)
initializers = st.fixed_dictionaries({"name": st.sampled_from(["uniform", "constant", "normal", "truncated_normal",
                                                                 "orthogonal", "he_normal"])},
                                     optional={k: numbers for k in ("minval", "maxval", "value", "mean", "stddev",
                                                                    "gain")})


@FUZZ
@given(changes=st.lists(st.tuples(st.sampled_from(SPEC_PATHS), st.one_of(json_values, schedules, initializers)),
                        min_size=1, max_size=4),
       extra=st.dictionaries(texts, json_values, max_size=2))
def test_generated_job_specs_are_never_a_5xx(http: httpx.Client, changes: list[tuple[tuple[Any, ...], Any]],
                                             extra: dict[str, Any]) -> None:
    spec: Any = copy.deepcopy(note_spec(2))
    for path, value in changes:
        node = spec
        for part in path[:-1]:
            node = node.get(part) if isinstance(node, dict) else (node[part] if isinstance(node, list) and
                                                                  len(node) > part else None)  # type: ignore[operator]
            if node is None:
                break
        if isinstance(node, dict) or (isinstance(node, list) and isinstance(path[-1], int) and len(node) > path[-1]):
            node[path[-1]] = value
    spec.update(extra)
    r = _post_json(http, "/v1/jobs", spec)
    if r.status_code in (200, 201):
        http.post(f"/v1/jobs/{r.json()['id']}/cancel")


def _npz(**arrays: Any) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


uploads = st.one_of(
    st.tuples(st.sampled_from(["d.csv", ".csv", "x.CSV", "d.npz", "d.txt", "a" * 300 + ".csv"]),
              st.binary(max_size=2000)),
    st.tuples(st.just("t.csv"), st.builds(
        lambda header, rows: (",".join(header) + "\n" + "\n".join(",".join(r) for r in rows)).encode(
            "utf-8", "backslashreplace"),
        st.lists(texts, min_size=1, max_size=4),
        st.lists(st.lists(st.one_of(texts, st.from_regex(r"-?[0-9]{1,5}(\.[0-9]+)?", fullmatch=True)),
                          min_size=1, max_size=4), max_size=30))),
    st.tuples(st.just("a.npz"), st.builds(
        lambda n, f, dtype, ydtype: _npz(x=np.zeros((n, f), dtype=dtype), y=(np.arange(n) % 3).astype(ydtype)),
        st.integers(1, 50), st.integers(0, 4), st.sampled_from(["float32", "float64", "int8", "bool", "complex64"]),
        st.sampled_from(["int64", "uint64", "float32", "bool", "int8"]))),
)


@FUZZ
@given(upload=uploads, target=st.one_of(st.none(), texts, st.integers(-2, 5).map(str), st.just("\u00b2")))
def test_generated_uploads_are_never_a_5xx(http: httpx.Client, upload: tuple[str, bytes], target: str | None) -> None:
    filename, content = upload
    data = {} if target is None else {"target": target.encode("utf-8", "backslashreplace").decode()}
    t0 = time.monotonic()
    r = http.post("/v1/datasets", files={"file": (filename, content)}, data=data)
    assert time.monotonic() - t0 < BOUND_S
    assert r.status_code < 500, (r.status_code, r.text[:500], filename, content[:200], target)
