"""Specs and small utilities shared by the service tests."""

from __future__ import annotations

import copy
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]

# The source note's spec (Adam beta_1 0.89, cosine restarts with warm-up, he_normal, L2 kernel and
# L1 activity regularizers, dropout 0.5, early stopping with restore_best_weights, save_best_only).
SOURCE_NOTE_SPEC: dict[str, Any] = {
    "name": "digits-he-adam-cosine-restarts",
    "seed": 42,
    "device": "auto",
    "data": {"dataset": "digits", "validation_split": 0.2, "batch_size": 64, "shuffle": True, "standardize": True},
    "model": {
        "kernel_initializer": "glorot_uniform",
        "layers": [
            {"type": "dense", "units": 64, "activation": "relu", "kernel_initializer": "he_normal",
             "kernel_regularizer": {"l2": 0.01}, "activity_regularizer": {"l1": 0.01}},
            {"type": "dropout", "rate": 0.5},
            {"type": "dense", "units": 10},
        ],
    },
    "loss": "sparse_categorical_crossentropy",
    "metrics": ["accuracy"],
    "optimizer": {"name": "adam", "beta_1": 0.89,
                  "learning_rate": {"schedule": "cosine_restarts", "initial_learning_rate": 0.01,
                                    "first_decay_steps": 1000, "warmup_steps": 50}},
    "epochs": 100,
    "callbacks": {
        "early_stopping": {"monitor": "val_loss", "min_delta": 0, "patience": 10, "restore_best_weights": True},
        "model_checkpoint": {"monitor": "val_loss", "save_best_only": True, "save_weights_only": True,
                             "mode": "auto", "save_freq": "epoch"},
    },
}


def note_spec(epochs: int = 6, **over: Any) -> dict[str, Any]:
    spec = copy.deepcopy(SOURCE_NOTE_SPEC)
    spec["epochs"] = epochs
    spec.update(over)
    return spec


def long_spec(epochs: int = 100_000, **over: Any) -> dict[str, Any]:
    """A job that runs until cancelled (many small epochs, no callbacks)."""
    spec = note_spec(epochs, name="long-running", callbacks={})
    spec.update(over)
    return spec


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, proc: subprocess.Popen[Any] | None = None, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


def wait_for_log(path: Path, needle: str, proc: subprocess.Popen[Any], timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and needle in path.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}:\n{path.read_text(errors='replace')[-3000:]}")
        time.sleep(0.2)
    raise TimeoutError(f"{needle!r} not in {path} after {timeout} s:\n{path.read_text(errors='replace')[-3000:]}")


def wait_status(client: Any, job_id: str, statuses: tuple[str, ...], timeout: float = 120.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job = client.job(job_id)
        if job["status"] in statuses:
            return job
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} is {job['status']} after {timeout} s: {job}")
        time.sleep(0.1)


def stop(proc: subprocess.Popen[Any], timeout: float = 30.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
