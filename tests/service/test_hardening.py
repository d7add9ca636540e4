"""Issue 18: the findings of the adversarial pass, each through a real ``trainyard api`` process on
PostgreSQL (the session's ``api_url``): schedule previews are cheap and bounded, and what used to be
a 500, or a 201 then a failure in the worker, is a 4xx naming the field."""

from __future__ import annotations

import concurrent.futures as cf
import copy
import time
from typing import Any

import httpx
import pytest

from training import preview_schedule
from training.schedules import MAX_LEARNING_RATE
from training.spec import MAX_MILESTONES

from .helpers import note_spec

PREVIEW = "/v1/schedules/preview"


@pytest.fixture()
def http(api_url: str) -> Any:
    with httpx.Client(base_url=api_url, timeout=60) as c:
        yield c


def paths(r: httpx.Response) -> list[str]:
    return [d["path"] for d in r.json()["detail"]]


# --------------------------------------------------------------------------- high 2: previews


def test_a_multistep_preview_with_the_most_milestones_is_cheap_and_exact(http: httpx.Client) -> None:
    lr = {"schedule": "multistep", "initial_learning_rate": 1.0, "gamma": 0.5, "unit": "step",
          "milestones": list(range(0, 2 * MAX_MILESTONES, 2))}
    r = http.post(PREVIEW, json={"learning_rate": lr, "steps": 200_000})
    assert r.status_code == 200, r.text
    got = r.json()["lr"]
    assert len(got) == 200_000
    assert got[0] == 0.5 and got[1] == 0.5 and got[2] == 0.25 and got[-1] == 0.5**MAX_MILESTONES
    assert got[:3000] == preview_schedule(lr, 3000)


def test_too_many_milestones_is_a_422_at_the_list(http: httpx.Client) -> None:
    lr = {"schedule": "multistep", "initial_learning_rate": 1.0, "milestones": list(range(MAX_MILESTONES + 1))}
    r = http.post(PREVIEW, json={"learning_rate": lr, "steps": 10, "steps_per_epoch": 1})
    assert r.status_code == 422
    assert paths(r) == ["learning_rate.milestones"]
    assert str(MAX_MILESTONES) in r.json()["detail"][0]["msg"]


def test_heavy_previews_in_flight_leave_the_api_responsive(http: httpx.Client, api_url: str) -> None:
    lr = {"schedule": "multistep", "initial_learning_rate": 1.0, "unit": "step",
          "milestones": list(range(MAX_MILESTONES))}
    body = {"learning_rate": lr, "steps": 200_000}

    def preview() -> int:
        with httpx.Client(base_url=api_url, timeout=60) as c:
            return c.post(PREVIEW, json=body).status_code

    with cf.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(preview) for _ in range(8)]
        time.sleep(0.3)
        t0 = time.monotonic()
        health = [http.get("/healthz").status_code for _ in range(5)] + [http.get("/v1/jobs").status_code]
        elapsed = time.monotonic() - t0
        codes = [f.result() for f in futures]
    assert health == [200] * 6
    assert set(codes) <= {200, 503} and 200 in codes
    assert elapsed < 5.0, elapsed  # before: /healthz timed out at 15 s with 40 such previews


@pytest.mark.parametrize(("lr", "field"), [
    ({"schedule": "cosine_restarts", "initial_learning_rate": 0.1, "first_decay_steps": 10, "t_mul": 0.5}, "t_mul"),
    ({"schedule": "cosine_restarts", "initial_learning_rate": 0.1, "first_decay_steps": 10, "t_mul": 1e-300}, "t_mul"),
    ({"schedule": "cosine_restarts", "initial_learning_rate": 0.1, "first_decay_steps": 1, "m_mul": 1e30}, "m_mul"),
    ({"schedule": "exponential", "initial_learning_rate": 0.1, "decay_steps": 1, "decay_rate": 1e30}, "decay_rate"),
    ({"schedule": "step", "unit": "step", "initial_learning_rate": 0.1, "step_size": 1, "gamma": 1e30}, "gamma"),
    ({"schedule": "exponential", "initial_learning_rate": 0.1, "decay_steps": 1, "decay_rate": 1e300}, "decay_rate"),
    ({"schedule": "step", "unit": "step", "initial_learning_rate": 0.1, "step_size": 1, "gamma": 1e300}, "gamma"),
    ({"schedule": "cosine_restarts", "initial_learning_rate": 0.1, "first_decay_steps": 1, "m_mul": 1e300}, "m_mul"),
    ({"schedule": "cosine_restarts", "initial_learning_rate": 0.1, "first_decay_steps": 1, "t_mul": 1e300}, "t_mul"),
])
def test_schedules_that_overflow_are_a_422_at_the_field(http: httpx.Client, lr: dict[str, Any], field: str) -> None:
    r = http.post(PREVIEW, json={"learning_rate": lr, "steps": 100})
    assert r.status_code == 422, r.text
    assert paths(r) == [f"learning_rate.{field}"], r.json()


# --------------------------------------------------------------------------- medium 8: refused at submit


def _with_layer0(**over: Any) -> dict[str, Any]:
    spec = note_spec(2, callbacks={})
    spec["model"]["layers"][0].update(over)
    return spec


@pytest.mark.parametrize(("spec", "path"), [
    (_with_layer0(kernel_initializer={"name": "uniform", "minval": 1.0, "maxval": 0.0}),
     "model.layers[0].kernel_initializer"),
    (_with_layer0(kernel_initializer={"name": "constant", "value": 1e308}), "model.layers[0].kernel_initializer.value"),
    (note_spec(2, optimizer={"name": "sgd", "learning_rate": 1e308}), "optimizer.learning_rate"),
    (note_spec(2, optimizer={"name": "sgd", "learning_rate": {
        "schedule": "exponential", "initial_learning_rate": 0.1, "decay_steps": 1, "decay_rate": 1e30}}),
     "optimizer.learning_rate.decay_rate"),
    (note_spec(2, optimizer={"name": "sgd", "learning_rate": {
        "schedule": "cosine_restarts", "initial_learning_rate": 0.1, "first_decay_steps": 5, "t_mul": 0.5}}),
     "optimizer.learning_rate.t_mul"),
    (note_spec(2, optimizer={"name": "sgd", "learning_rate": {
        "schedule": "step", "initial_learning_rate": 0.1, "step_size": 1, "gamma": 1e30}}),
     "optimizer.learning_rate.gamma"),
])
def test_values_the_worker_cannot_run_are_a_422_at_submit(http: httpx.Client, spec: dict[str, Any], path: str) -> None:
    r = http.post("/v1/jobs", json=spec)
    assert r.status_code == 422, r.text
    assert path in paths(r), r.json()


def test_the_same_schedule_within_the_job_s_steps_is_accepted(http: httpx.Client) -> None:
    # cosine_restarts with t_mul 0.5 is defined for first_decay_steps / (1 - t_mul) steps: a job
    # that ends before that is fine (2 epochs of digits, 23 steps each, < 2 * 1000)
    spec = note_spec(2, optimizer={"name": "sgd", "learning_rate": {
        "schedule": "cosine_restarts", "initial_learning_rate": 0.1, "first_decay_steps": 1000, "t_mul": 0.5}})
    r = http.post("/v1/jobs", json=spec)
    assert r.status_code == 201, r.text
    http.post(f"/v1/jobs/{r.json()['id']}/cancel")


def test_the_largest_learning_rate_is_accepted_and_one_beyond_is_not(http: httpx.Client) -> None:
    ok = copy.deepcopy(note_spec(1, optimizer={"name": "adam", "learning_rate": MAX_LEARNING_RATE}))
    r = http.post("/v1/jobs", json=ok)
    assert r.status_code == 201, r.text
    http.post(f"/v1/jobs/{r.json()['id']}/cancel")
    r = http.post("/v1/jobs", json=note_spec(1, optimizer={"name": "adam", "learning_rate": MAX_LEARNING_RATE * 1.5}))
    assert r.status_code == 422 and paths(r) == ["optimizer.learning_rate"]
    assert "1e+10" in r.json()["detail"][0]["msg"] or "10000000000" in r.json()["detail"][0]["msg"]
