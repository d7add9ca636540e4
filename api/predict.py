"""Predictions in the API process, without torch: onnxruntime on the job's exported ONNX model.

Why here and not on a worker queue: a batch of 32 inputs through a small network takes tens of
microseconds in onnxruntime, while a round trip through the broker to a worker takes tens of
milliseconds at best, and a worker busy training would hold predictions behind a job for its whole
length. The exported model (produced once by a worker, stored with its sha256) contains the
training split's standardization and the output head, so the API only checks the inputs' shape
and values (training.card.coerce_inputs) and runs the session. Sessions are cached per exported
file (by its sha256), a few at a time, each on one intra-op thread (the API process serves many
requests at once; a thread pool per session would oversubscribe the CPU).
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from store.floats import encode_float
from training.card import labels_of

MAX_SESSIONS = 16


class SessionCache:
    """onnxruntime sessions by the sha256 of their model file (LRU, ``MAX_SESSIONS``)."""

    def __init__(self, size: int = MAX_SESSIONS) -> None:
        self.size = size
        self._sessions: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, digest: str, load: Callable[[], bytes]) -> Any:
        """The session of model ``digest``; ``load()`` gives its bytes on a miss."""
        with self._lock:
            session = self._sessions.get(digest)
            if session is not None:
                self._sessions.move_to_end(digest)
                return session
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(load(), sess_options=options, providers=["CPUExecutionProvider"])
        with self._lock:
            self._sessions[digest] = session
            while len(self._sessions) > self.size:
                self._sessions.popitem(last=False)
        return session

    def holds(self, digest: str) -> bool:
        with self._lock:
            return digest in self._sessions

    def clear(self) -> None:
        with self._lock:
            self._sessions.clear()


SESSIONS = SessionCache()


@dataclass(frozen=True)
class ModelRef:
    """What a prediction needs of a job's model: its ONNX file's sha256 (the SESSIONS key), card,
    and source checkpoint."""

    artifact_sha256: str
    card: dict[str, Any]
    checkpoint_epoch: int
    checkpoint_sha256: str


class RefCache:
    """ModelRefs of finished jobs by (project, job id, checkpoint selector), LRU: a finished job's
    best and last checkpoints never change, so a prediction for it needs no database query."""

    def __init__(self, size: int = 1024) -> None:
        self.size = size
        self._refs: OrderedDict[tuple[str, str, str], ModelRef] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str, str]) -> ModelRef | None:
        with self._lock:
            ref = self._refs.get(key)
            if ref is not None:
                self._refs.move_to_end(key)
            return ref

    def put(self, key: tuple[str, str, str], ref: ModelRef) -> None:
        with self._lock:
            self._refs[key] = ref
            while len(self._refs) > self.size:
                self._refs.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._refs.clear()

    def forget_jobs(self, job_ids: Iterable[str]) -> None:
        """Drop the refs of these (deleted) jobs, whatever their project and selector."""
        gone = set(job_ids)
        with self._lock:
            for key in [k for k in self._refs if k[1] in gone]:
                del self._refs[key]


MODEL_REFS = RefCache()


def _floats(a: np.ndarray) -> list[Any]:
    """A float array as JSON lists (non-finite values encoded as store.floats does)."""
    if np.isfinite(a).all():
        return a.tolist()  # type: ignore[no-any-return]
    return [[encode_float(float(v)) if not math.isfinite(v) else float(v) for v in row] for row in a.reshape(len(a), -1)]


def predict(session: Any, card: dict[str, Any], x: np.ndarray) -> dict[str, Any]:
    """Run checked raw inputs ``x`` (float32, ``(n, *input_shape)``) through the exported model:
    ``probabilities`` and ``labels`` for a classifier, ``values`` for a regression model."""
    out = session.run(None, {"input": x})[0]
    out = np.asarray(out).reshape(len(x), -1)
    if card.get("task") == "classification":
        labels = labels_of(card, out)
        kind = "probabilities" if card.get("head") != "identity" or card.get("output_activation") in ("softmax", "sigmoid") else "scores"
        return {"task": "classification", "outputs": kind, "probabilities": _floats(out), "labels": labels.tolist()}
    return {"task": "regression", "outputs": "values", "values": _floats(out)}
