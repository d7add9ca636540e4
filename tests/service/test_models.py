"""Using what was trained, through the real API and worker processes: the last and any stored
checkpoint, exports produced by the worker (checked with torch, onnxruntime and Keras 3) and
predictions served by the API with onnxruntime."""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import subprocess
import sys
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from client.api import Client, TrainyardError
from training import data as data_mod
from training import load_model
from training.card import card_of
from training.spec import validate_spec

from .helpers import ROOT, note_spec, wait_status

os.environ.setdefault("KERAS_BACKEND", "torch")

CONV_BN: dict[str, Any] = {
    "name": "digits-conv-bn", "seed": 3, "device": "cpu",
    "data": {"dataset": "digits", "layout": "image", "validation_split": 0.2, "batch_size": 64, "standardize": True},
    "model": {"layers": [
        {"type": "conv2d", "filters": 8, "kernel_size": 3, "padding": "same", "activation": "relu"},
        {"type": "batch_norm", "momentum": 0.9},
        {"type": "max_pool2d", "pool_size": 2},
        {"type": "flatten"},
        {"type": "dense", "units": 10, "activation": "softmax"},
    ]},
    "loss": "sparse_categorical_crossentropy", "metrics": ["accuracy"],
    "optimizer": {"name": "adam", "learning_rate": 0.01}, "epochs": 3,
}


def raw_val(spec: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    job = validate_spec(spec)
    split = data_mod.load(job.data.model_copy(update={"standardize": False}), job.seed)
    return split.x_val, split.y_val


@pytest.fixture(scope="module")
def jobs(api_url: str, worker_proc: Any) -> dict[str, tuple[str, dict[str, Any]]]:
    """Finished jobs: the source note's model (a few epochs), a conv + batch-norm image model and a
    small regression model."""
    note = note_spec(5, device="cpu")
    regression = {
        "name": "regression-mlp", "seed": 5, "device": "cpu",
        "data": {"dataset": "regression", "n_samples": 300, "validation_split": 0.2, "batch_size": 32, "standardize": True},
        "model": {"layers": [{"type": "dense", "units": 16, "activation": "gelu"}, {"type": "dense", "units": 1}]},
        "loss": "mse", "metrics": ["mae"], "optimizer": {"name": "adam", "learning_rate": 0.01}, "epochs": 3,
    }
    specs = {"note": note, "conv": copy.deepcopy(CONV_BN), "regression": regression}
    out = {}
    with Client(api_url) as c:
        ids = {name: c.submit(spec)["id"] for name, spec in specs.items()}
        for name, job_id in ids.items():
            done = wait_status(c, job_id, ("succeeded", "failed", "cancelled"), timeout=240)
            assert done["status"] == "succeeded", done
            out[name] = (job_id, specs[name])
    return out


def test_last_checkpoint_reproduces_the_final_validation_numbers(client, jobs):
    job_id, spec = jobs["note"]
    x, y = raw_val(spec)
    history = client.metrics(job_id)
    last = load_model(client.checkpoint(job_id, "last"))
    assert last.meta["epoch"] == len(history)
    got = last.evaluate(x, y)
    assert (got["loss"], got["accuracy"]) == (float(history[-1]["val_loss"]), float(history[-1]["val_accuracy"]))
    best_data, best_digest = client.checkpoint(job_id, "best")
    best = load_model(best_data)
    row = history[best.meta["epoch"] - 1]
    assert best.evaluate(x, y)["loss"] == float(row["val_loss"])
    # the best again, by its epoch number; and by a unique prefix of the job's id
    assert client.checkpoint(job_id, best.meta["epoch"]) == (best_data, best_digest)
    assert client.checkpoint(job_id[:28], "best") == (best_data, best_digest)
    assert client.predict(job_id[:28], x[:4])["labels"] == client.predict(job_id, x[:4])["labels"]


def test_checkpoint_by_epoch_says_when_bytes_were_not_kept(client, jobs):
    job_id, _ = jobs["note"]
    rows = client.checkpoints(job_id)
    stored = {c["epoch"] for c in rows if c["stored"]}
    dropped = [c["epoch"] for c in rows if c["epoch"] not in stored]
    r = httpx.get(f"{client.url}/v1/jobs/{job_id}/checkpoints/99999")
    assert r.status_code == 404 and "epoch 99999" in r.json()["detail"]
    assert dropped, rows  # five epochs, several saves: only the best's and the newest's bytes are kept
    r = httpx.get(f"{client.url}/v1/jobs/{job_id}/checkpoints/{dropped[0]}")
    assert r.status_code == 410 and "best" in r.json()["detail"]
    r = httpx.get(f"{client.url}/v1/jobs/no-such-job/checkpoints/last")
    assert r.status_code == 404


def test_checkpoints_carry_their_model_card(client, jobs):
    job_id, spec = jobs["conv"]
    card = card_of(client.checkpoint(job_id, "best")[0])
    assert card["input_shape"] == [1, 8, 8] and card["layout"] == "image"
    assert card["model"] == validate_spec(spec).model.model_dump(mode="json")
    assert len(card["standardize"]["mean"]) == 64 and card["torch_version"] == torch.__version__


@pytest.mark.parametrize("name", ["note", "conv"])
def test_exports_match_the_torch_model(client, jobs, name, tmp_path):
    import keras
    import onnxruntime as ort

    job_id, spec = jobs[name]
    x, _ = raw_val(spec)
    expected = load_model(client.checkpoint(job_id, "best")).predict(x)

    onnx_bytes, digest = client.export(job_id, "onnx")
    again = httpx.get(f"{client.url}/v1/jobs/{job_id}/export", params={"format": "onnx"})
    assert again.status_code == 200 and again.headers["X-Artifact-SHA256"] == digest  # produced once, kept
    out = ort.InferenceSession(onnx_bytes).run(None, {"input": x})[0]
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5)

    ts_bytes, _ = client.export(job_id, "torchscript")
    with torch.no_grad():
        out = torch.jit.load(io.BytesIO(ts_bytes))(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5)

    # the CLI, as the README shows it
    target = tmp_path / "model.keras"
    cli = subprocess.run([sys.executable, "-m", "client.cli", "export", job_id, "--format", "keras", "-o", str(target),
                          "--url", client.url], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0, cli.stdout + cli.stderr
    assert hashlib.sha256(target.read_bytes()).hexdigest() in cli.stdout
    out = np.asarray(keras.saving.load_model(target).predict(x, verbose=0))
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5)


def test_export_of_the_last_checkpoint_and_bad_formats(client, jobs):
    job_id, spec = jobs["note"]
    import onnxruntime as ort

    x, _ = raw_val(spec)
    expected = load_model(client.checkpoint(job_id, "last")).predict(x)
    data, _ = client.export(job_id, "onnx", checkpoint="last")
    np.testing.assert_allclose(ort.InferenceSession(data).run(None, {"input": x})[0], expected, rtol=0, atol=1e-5)
    r = httpx.get(f"{client.url}/v1/jobs/{job_id}/export", params={"format": "pickle"})
    assert r.status_code == 422 and r.json()["errors"][0]["path"] == "query.format"
    assert "'onnx'" in r.json()["errors"][0]["msg"]  # says what is allowed
    r = httpx.get(f"{client.url}/v1/jobs/{job_id}/export", params={"format": "onnx", "checkpoint": "worst"})
    assert r.status_code == 422


@pytest.mark.parametrize("name", ["note", "conv"])
def test_predictions_equal_the_torch_model(client, jobs, name):
    job_id, spec = jobs[name]
    x, _ = raw_val(spec)
    batch = x[:32]
    model = load_model(client.checkpoint(job_id, "best"))
    got = client.predict(job_id, batch)
    assert got["task"] == "classification" and got["outputs"] == "probabilities"
    np.testing.assert_allclose(np.array(got["probabilities"]), model.predict(batch), rtol=0, atol=1e-5)
    assert got["labels"] == model.predict_classes(batch).tolist()
    assert got["checkpoint_sha256"] == client.checkpoint(job_id, "best")[1]
    # flat rows work for the image model too
    flat = client.predict(job_id, batch.reshape(len(batch), -1))
    assert flat["labels"] == got["labels"]


def test_regression_predictions_are_values(client, jobs):
    job_id, spec = jobs["regression"]
    x, _ = raw_val(spec)
    got = client.predict(job_id, x[:16])
    assert got["task"] == "regression" and got["outputs"] == "values" and "labels" not in got
    expected = load_model(client.checkpoint(job_id, "best")).predict(x[:16])
    np.testing.assert_allclose(np.array(got["values"]), expected, rtol=1e-6, atol=1e-5)


def test_predictions_from_uploaded_npz_and_csv(client, jobs):
    job_id, spec = jobs["note"]
    x, _ = raw_val(spec)
    batch = x[:10]
    expected = client.predict(job_id, batch)["labels"]
    buf = io.BytesIO()
    np.savez(buf, x=batch)
    r = httpx.post(f"{client.url}/v1/jobs/{job_id}/predict/file", files={"file": ("inputs.npz", buf.getvalue())})
    assert r.status_code == 200, r.text
    assert r.json()["labels"] == expected
    text = ",".join(f"p{i}" for i in range(64)) + "\n" + "\n".join(",".join(repr(float(v)) for v in row) for row in batch)
    r = httpx.post(f"{client.url}/v1/jobs/{job_id}/predict/file", files={"file": ("inputs.csv", text.encode())})
    assert r.status_code == 200, r.text
    assert r.json()["labels"] == expected
    r = httpx.post(f"{client.url}/v1/jobs/{job_id}/predict/file", files={"file": ("inputs.csv", b"1,2\n3,x\n")})
    assert r.status_code == 422 and r.json()["errors"][0]["path"] == "file.row[1].column[1]"


def test_bad_prediction_inputs_are_422s_that_say_where(client, jobs):
    job_id, _ = jobs["note"]
    url = f"{client.url}/v1/jobs/{job_id}/predict"
    row = [0.0] * 64

    def problem(inputs: Any, raw: str | None = None) -> dict[str, Any]:
        r = httpx.post(url, json={"inputs": inputs}) if raw is None else httpx.post(
            url, content=raw, headers={"Content-Type": "application/json"})
        assert r.status_code == 422, r.text
        return r.json()["errors"][0]

    wrong = problem([row[:63]])
    assert wrong["path"] == "inputs" and "shape [1, 63]" in wrong["msg"] and "[64]" in wrong["msg"]
    typed = problem([row, row[:3] + ["7"] + row[4:]])
    assert typed["path"] == "inputs[1][3]" and "got str" in typed["msg"]
    nan = problem(None, '{"inputs": [' + json.dumps(row) + ", [" + ", ".join(["0"] * 5 + ["NaN"] + ["0"] * 58) + "]]}")
    assert nan["path"] == "inputs[1][5]" and "finite" in nan["msg"]
    assert problem([])["path"] == "inputs"
    try:
        client.predict("no-such-job", [row])
    except TrainyardError as exc:
        assert exc.status_code == 404
    else:  # pragma: no cover
        raise AssertionError("a prediction for an unknown job answered")


def test_a_checkpoint_written_before_model_cards_exports_from_the_jobs_spec(client, inproc_env):
    """Checkpoints stored before cards existed (plain weights): the worker rebuilds the card from
    the job's spec (re-reading its dataset for the standardization)."""
    import onnxruntime as ort
    from safetensors.torch import save

    from store import repo
    from store.db import session_scope
    from training.state import weights_from_bytes

    spec = note_spec(2, device="cpu", name="legacy-checkpoint")
    job_id = client.submit(spec)["id"]
    assert wait_status(client, job_id, ("succeeded", "failed", "cancelled"), timeout=240)["status"] == "succeeded"
    weights = weights_from_bytes(client.checkpoint(job_id, "best")[0])
    legacy = save(weights, metadata={"trainyard": json.dumps({"format": "trainyard-weights/1", "epoch": 2})})
    assert card_of(legacy) is None
    with session_scope() as s:
        repo.add_checkpoint(s, job_id, epoch=2, step=46, monitor="val_loss", value=1.0, data=legacy,
                            sha256=repo.sha256_hex(legacy), is_best=True)
    assert client.checkpoint(job_id, "best")[0] == legacy
    x, _ = raw_val(spec)
    expected = load_model(legacy, spec=spec).predict(x)
    # not exported yet, and no waiting: 202 while the worker produces it
    r = httpx.get(f"{client.url}/v1/jobs/{job_id}/export", params={"format": "onnx", "wait": 0})
    assert r.status_code == 202 and r.headers["Retry-After"] == "1", r.text
    assert r.json() == {"status": "pending", "format": "onnx", "checkpoint_epoch": 2,
                        "checkpoint_sha256": repo.sha256_hex(legacy)}
    data, _ = client.export(job_id, "onnx")
    np.testing.assert_allclose(ort.InferenceSession(data).run(None, {"input": x})[0], expected, rtol=0, atol=1e-5)
    got = client.predict(job_id, x[:8])
    np.testing.assert_allclose(np.array(got["probabilities"]), expected[:8], rtol=0, atol=1e-5)
