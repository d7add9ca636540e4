"""Issue 18: the findings of the adversarial pass, each through a real ``trainyard api`` process on
PostgreSQL (the session's ``api_url``): schedule previews are cheap and bounded, and what used to be
a 500, or a 201 then a failure in the worker, is a 4xx naming the field."""

from __future__ import annotations

import concurrent.futures as cf
import copy
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from training import preview_schedule
from training.schedules import MAX_LEARNING_RATE
from training.spec import MAX_MILESTONES

from .conftest import cli
from .helpers import ROOT, free_port, note_spec, stop, wait_http

PREVIEW = "/v1/schedules/preview"


@pytest.fixture()
def http(api_url: str) -> Any:
    with httpx.Client(base_url=api_url, timeout=60) as c:
        yield c


def paths(r: httpx.Response) -> list[str]:
    return [d["path"] for d in r.json()["errors"]]


# --------------------------------------------------------------------------- high 2: previews


def _children(pid: int) -> set[int]:
    """The processes ``pid`` started that are still its children (Linux /proc)."""
    out: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        out |= {int(c) for c in (task / "children").read_text().split()}
    return out


def _gone(pid: int) -> bool:
    """Whether process ``pid`` has exited (reaped, or a zombie nobody reaps in a container)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
def test_the_preview_worker_ends_with_its_api_process(service_env: dict[str, str], migrated: None,
                                                     tmp_path: Path, how: signal.Signals) -> None:
    port = free_port()
    with (tmp_path / "api.log").open("wb") as f:
        api = subprocess.Popen(cli("api", "--port", str(port)), env=service_env, cwd=ROOT, stdout=f,
                               stderr=subprocess.STDOUT)
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", api)
        r = httpx.post(f"http://127.0.0.1:{port}{PREVIEW}", json={"learning_rate": 0.01, "steps": 10}, timeout=60)
        assert r.status_code == 200, r.text
        # the preview worker that preview started (and multiprocessing's resource tracker)
        started = _children(api.pid)
        assert started, "the preview ran in no worker process"
        os.kill(api.pid, how)
        api.wait(30)
        deadline = time.monotonic() + 10
        while not all(_gone(p) for p in started) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = [p for p in started if not _gone(p)]
        assert not left, f"processes {left} outlived their API process (signal {how.name})"
    finally:
        stop(api)


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
    assert str(MAX_MILESTONES) in r.json()["errors"][0]["msg"]


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
    assert "1e+10" in r.json()["errors"][0]["msg"] or "10000000000" in r.json()["errors"][0]["msg"]


# --------------------------------------------------------------------------- medium 7: 500s that are 4xx


@pytest.mark.parametrize("round_", range(3))
def test_one_idempotency_key_with_two_bodies_at_once_is_never_a_500(http: httpx.Client, api_url: str, round_: int) -> None:
    key = f"race-{round_}-{time.time_ns()}"
    bodies = [note_spec(1, name="race-a"), note_spec(1, name="race-b")]

    def submit(i: int) -> tuple[int, str | None]:
        with httpx.Client(base_url=api_url, timeout=60) as c:
            r = c.post("/v1/jobs", json=bodies[i % 2], headers={"Idempotency-Key": key})
            return r.status_code, (r.json().get("id") if r.status_code in (200, 201) else None)

    with cf.ThreadPoolExecutor(40) as pool:
        results = list(pool.map(submit, range(40)))
    codes = [c for c, _ in results]
    assert set(codes) <= {200, 201, 409}, codes
    assert codes.count(201) == 1
    ids = {i for _, i in results if i}
    assert len(ids) == 1
    http.post(f"/v1/jobs/{ids.pop()}/cancel")


_LONE = '"\\udc00"'  # JSON text of a string holding a lone low surrogate


@pytest.mark.parametrize(("route", "raw", "path"), [
    ("/v1/jobs", '{@: 1}'.replace("@", _LONE), "\\udc00"),
    ("/v1/jobs", '{"name": "x", "data": {"dataset": "digits", @: [1]}}'.replace("@", _LONE), "data.\\udc00"),
    ("/v1/jobs", '{"name": @}'.replace("@", _LONE), "name"),
    ("/v1/jobs", '{"name": "\\ud800x"}', "name"),  # a high surrogate without its low half
    ("/v1/jobs/batch", '{"specs": [{"name": "ok"}, {@: 1}]}'.replace("@", _LONE), "specs[1].\\udc00"),
    ("/v1/sweeps", '{"name": "s", "base": {}, "method": "grid", "parameters": {@: {"values": [1]}}, '
                   '"objective": {"metric": "val_loss"}}'.replace("@", _LONE), "parameters.\\udc00"),
    ("/v1/schedules/preview", '{"learning_rate": {@: 1}, "steps": 3}'.replace("@", _LONE), "learning_rate.\\udc00"),
])
def test_a_lone_surrogate_anywhere_is_a_422_and_the_connection_stays_usable(
    http: httpx.Client, route: str, raw: str, path: str
) -> None:
    r = http.post(route, content=raw.encode(), headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    detail = r.json()["errors"]
    assert [d["path"] for d in detail] == [path] and detail[0]["type"] == "string_unicode"
    assert r.headers.get("connection", "").lower() != "close"
    assert http.get("/healthz").status_code == 200  # the same kept-alive connection


def test_a_surrogate_pair_is_ordinary_text(http: httpx.Client) -> None:
    r = http.post("/v1/jobs", content=b'{"\\ud83d\\ude00": 1}', headers={"content-type": "application/json"})
    assert r.status_code == 422  # an unknown field (the emoji), not a Unicode error
    assert "\U0001f600" in paths(r) and "string_unicode" not in {d["type"] for d in r.json()["errors"]}
    r = http.post("/v1/jobs", content=b'{"\\\\udc00": 1}', headers={"content-type": "application/json"})
    assert "\\udc00" in paths(r)  # an escaped backslash, then text: an unknown field named so
    assert "string_unicode" not in {d["type"] for d in r.json()["errors"]}


def test_the_error_handlers_render_any_string() -> None:
    import asyncio

    from api.errors import SpecProblem, error, spec_problem_handler

    problem = SpecProblem([error(["a\udc00"], "bad \udc00")])
    response = asyncio.run(spec_problem_handler(None, problem))  # type: ignore[arg-type]
    assert response.status_code == 422 and b"\\udc00" in response.body


# --------------------------------------------------------------------------- uploads


def _npz_bytes(**arrays: Any) -> bytes:
    import io

    import numpy as np

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _huge_header_npz() -> bytes:
    """An archive whose y.npy header declares shape (10**9, 4) of float64 over a few bytes."""
    import io
    import zipfile

    import numpy as np
    from numpy.lib import format as npy

    member = io.BytesIO()
    npy.write_array_header_1_0(member, {"descr": "<f8", "fortran_order": False, "shape": (10**9, 4)})
    member.write(b"\0" * 16)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        zf.writestr("x.npy", _npy(np.zeros((10**9 // 10**9, 2))))
        zf.writestr("y.npy", member.getvalue())
    return out.getvalue()


def _npy(a: Any) -> bytes:
    import io

    import numpy as np

    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def _upload(http: httpx.Client, filename: str, content: bytes, **form: str) -> httpx.Response:
    return http.post("/v1/datasets", files={"file": (filename, content)}, data=form)


def test_an_npz_header_declaring_a_huge_shape_is_refused_before_allocating(http: httpx.Client) -> None:
    r = _upload(http, "huge.npz", _huge_header_npz())
    assert r.status_code == 422, r.text
    assert paths(r) == ["file"] and "[1000000000, 4]" in r.json()["errors"][0]["msg"]


def test_a_long_upload_filename_is_a_422_and_a_200_character_one_is_stored(http: httpx.Client) -> None:
    import numpy as np

    data = _npz_bytes(x=np.zeros((20, 2), np.float32), y=np.arange(20) % 2)
    r = _upload(http, "a" * 252 + ".npz", data)  # 256 characters
    assert r.status_code == 422 and paths(r) == ["file"], r.text
    r = _upload(http, "b" * 250 + ".npz", data)  # 254: stored, its name cut to 200 characters
    assert r.status_code == 201, r.text
    assert r.json()["name"] == ("b" * 250 + ".npz")[:200] and r.json()["filename"] == "b" * 250 + ".npz"


def test_csv_target_superscript_digit_is_a_422_naming_target(http: httpx.Client) -> None:
    r = _upload(http, "t.csv", b"a,b\n1,0\n2,1\n3,0\n4,1\n", target="\u00b2")
    assert r.status_code == 422, r.text
    assert paths(r) == ["target"]
    r = _upload(http, "t.csv", b"a,b\n1,0\n2,1\n3,0\n4,1\n", target="9" * 5000)  # > 4300 digits
    assert r.status_code == 422 and paths(r) == ["target"], r.text


def test_target_with_an_npz_is_an_error_and_dot_csv_is_a_csv(http: httpx.Client) -> None:
    import numpy as np

    data = _npz_bytes(x=np.zeros((20, 2), np.float32), y=np.arange(20) % 2)
    r = _upload(http, "d.npz", data, target="0")
    assert r.status_code == 422 and paths(r) == ["target"], r.text
    r = _upload(http, ".csv", b"a,b\n1,0\n2,1\n3,0\n4,1\n")
    assert r.status_code == 201, r.text
    assert r.json()["format"] == "csv"


def test_uint64_labels_are_reported_as_they_are(http: httpx.Client) -> None:
    import numpy as np

    y = np.array([0, 2**64 - 1] * 10, dtype=np.uint64)
    r = _upload(http, "u.npz", _npz_bytes(x=np.zeros((20, 2), np.float32), y=y))
    assert r.status_code == 422, r.text
    msg = r.json()["errors"][0]["msg"]
    assert "label(s): 0, 18446744073709551615." in msg


# --------------------------------------------------------------------------- low: the admin CLI


def test_keys_revoke_without_a_database_url_says_so_and_creates_nothing(tmp_path: Any) -> None:
    import os
    import subprocess

    from .conftest import cli
    from .helpers import ROOT

    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINYARD_")}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run(cli("keys", "revoke", "abc"), env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out
    assert "TRAINYARD_DATABASE_URL is not set" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "trainyard-data").exists()


def test_set_limits_changes_only_the_limits_given(service_env: dict[str, str], migrated: None) -> None:
    import subprocess

    from .conftest import cli
    from .helpers import ROOT

    project = f"limits-{time.time_ns()}"

    def run(*args: str) -> str:
        out = subprocess.run(cli("projects", "set-limits", project, *args), env=service_env, cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout

    assert "max_concurrent_jobs=5" in run("--max-concurrent-jobs", "5")
    shown = run("--requests-per-minute", "7")
    assert "max_concurrent_jobs=5" in shown and "requests_per_minute=7" in shown
    assert "max_concurrent_jobs=default, requests_per_minute=default" in run()


# --------------------------------------------------------------------------- low: database down


@pytest.fixture(scope="module")
def api_without_database(service_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Any:
    """``trainyard api`` (keys required) whose PostgreSQL does not answer (nothing listens on the port)."""
    import subprocess

    from .conftest import cli
    from .helpers import ROOT, free_port, stop, wait_http

    port = free_port()
    env = {**service_env, "TRAINYARD_AUTH": "required",
           "TRAINYARD_DATABASE_URL": f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/secretdbname"}
    log = tmp_path_factory.mktemp("logs") / "api-nodb.log"
    with log.open("wb") as f:
        proc = subprocess.Popen(cli("api", "--port", str(port)), env=env, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/healthz", proc)
        yield url
    finally:
        stop(proc)


def test_database_down_is_a_503_json_and_readyz_reveals_nothing(api_without_database: str) -> None:
    key = {"Authorization": "Bearer ty_" + "a" * 43}
    with httpx.Client(base_url=api_without_database, timeout=30) as c:
        for method, path in (("GET", "/v1/jobs"), ("POST", "/v1/jobs"), ("GET", "/v1/datasets")):
            r = c.request(method, path, headers=key, json=note_spec(1) if method == "POST" else None)
            assert r.status_code == 503, (path, r.status_code, r.text)
            assert r.headers["content-type"].startswith("application/problem+json") and "Retry-After" in r.headers
            assert "unavailable" in r.json()["detail"]
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["database"].startswith("error: OperationalError")
        assert "secretdbname" not in r.text and "127.0.0.1" not in r.text


# --------------------------------------------------------------------------- low: serve restarts its worker


def test_a_worker_killed_inside_serve_is_restarted(tmp_path: Any) -> None:
    import os
    import signal
    import subprocess
    import sys

    from client import Client

    from .helpers import ROOT, free_port, wait_status

    def worker_pids(parent: int) -> list[int]:
        pids = subprocess.run(["pgrep", "-P", str(parent)], capture_output=True, text=True).stdout.split()
        return [int(p) for p in pids if "celery" in open(f"/proc/{p}/cmdline", "rb").read().decode(errors="replace")]

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINYARD_")}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.Popen([sys.executable, "-m", "client.cli", "serve", "--port", str(port), "--data-dir",
                             str(tmp_path / "data")], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert "is running" in proc.stdout.readline()  # type: ignore[union-attr]
        (first,) = worker_pids(proc.pid)
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and worker_pids(proc.pid) in ([], [first]):
            time.sleep(0.2)
        assert proc.poll() is None, "serve stopped when its worker died"
        (second,) = worker_pids(proc.pid)
        assert second != first
        with Client(f"http://127.0.0.1:{port}") as c:
            job = c.submit(note_spec(2))
            assert wait_status(c, job["id"], ("succeeded", "failed"), timeout=180)["status"] == "succeeded"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        assert "worker exited with status -9; starting a new one" in proc.stderr.read()  # type: ignore[union-attr]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_an_integer_literal_over_4300_digits_is_a_422(http: httpx.Client) -> None:
    r = http.post("/v1/jobs", content=b'{"epochs": ' + b"9" * 5000 + b"}", headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert r.json()["errors"][0]["type"] == "int_too_long" and "5000 digits" in r.json()["errors"][0]["msg"]
    # the same digits in a string, or as a float, are ordinary (spec) errors
    r = http.post("/v1/jobs", content=b'{"name": "' + b"9" * 5000 + b'"}', headers={"content-type": "application/json"})
    assert r.status_code == 422 and "int_too_long" not in {d["type"] for d in r.json()["errors"]}


# --------------------------------------------------------------------------- medium 6: checkpoints stream


def test_a_checkpoint_larger_than_a_chunk_streams_intact(http: httpx.Client, inproc_env: dict[str, str]) -> None:
    import hashlib
    import json as _json

    import numpy as np
    from safetensors.numpy import save

    from store import repo
    from store.db import session_scope

    weights = save({"w": np.random.default_rng(0).standard_normal(900_000).astype(np.float32)})  # 3.6 MB: 4 chunks
    r = http.post("/v1/jobs", json=note_spec(1, name="stream-ck"))
    assert r.status_code == 201
    job_id = r.json()["id"]
    http.post(f"/v1/jobs/{job_id}/cancel")
    # wait until no worker writes to it any more: a checkpoint a worker added after this row would
    # drop this row's bytes (only the best and the newest keep theirs) in the middle of the download
    deadline = time.monotonic() + 120
    while http.get(f"/v1/jobs/{job_id}").json()["status"] not in ("cancelled", "succeeded", "failed"):
        assert time.monotonic() < deadline, "the job did not end within 120 s"
        time.sleep(0.1)
    # epoch 99: a worker may still have trained this one-epoch job before the cancel, with a best
    # checkpoint of its own; this row is the only one at epoch 99
    with session_scope() as s:  # the session's database (inproc_env), which the API process serves
        repo.add_checkpoint(s, job_id, epoch=99, step=1, monitor="val_loss", value=1.0, data=weights,
                            sha256=repo.sha256_hex(weights), is_best=False)
    got = http.get(f"/v1/jobs/{job_id}/checkpoints/99")
    assert got.status_code == 200, got.text[:300]
    assert got.headers["content-length"] == str(len(weights)), got.headers
    assert len(got.content) == len(weights), (len(got.content), got.content[:100])
    assert got.content == weights  # (a failing == of 3.6 MB would take pytest minutes to render)
    assert got.headers["x-checkpoint-sha256"] == hashlib.sha256(weights).hexdigest()
    assert _json.loads(weights[8:8 + int.from_bytes(weights[:8], "little")])["w"]["shape"] == [900_000]
