"""The model card: what a checkpoint carries so its weights can be used without the job.

A checkpoint's safetensors metadata holds one JSON value under the key ``trainyard`` (see
:mod:`training.state`); its ``card`` member is the dict :func:`make_card` builds:

``model``
    the model part of the normalized job spec (the layers, as the engine built them);
``input_shape``, ``layout``
    the per-sample input shape (e.g. ``[64]`` or ``[1, 8, 8]``) and ``data.layout``;
``task``, ``n_classes``, ``n_targets``
    classification or regression, and the output width;
``loss``, ``metrics``
    the objective the job was trained and validated with;
``output_activation``, ``output_activation_in_weights``
    the last layer's activation as written, and whether the stored module applies it (a softmax
    or sigmoid output trained with a cross-entropy is stored as logits);
``head``
    what turns the module's output into predictions: ``softmax``, ``sigmoid`` or ``identity``;
``standardize``
    ``{"mean": [...], "std": [...]}``: the training split's per-feature statistics (flattened
    input order), or ``null`` when the job did not standardize; ``preprocess(x) = (x - mean) /
    std`` in float32, exactly as :func:`training.data.load` applied them;
``trainyard_version``, ``torch_version``.

This module is pure Python (no torch, no numpy) so the API can read a card.
"""

from __future__ import annotations

import json
from functools import cache
from typing import Any

CARD_VERSION = 1
HEADS = ("softmax", "sigmoid", "identity")


class CardError(ValueError):
    """A checkpoint whose card is missing or cannot be used."""


@cache
def trainyard_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("trainyard")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "0+unknown"


def head_of(spec: Any, outputs_are_logits: bool) -> str:
    """The function applied to the module's outputs to get predictions (class probabilities for
    a classifier trained with a cross-entropy on logits, the outputs themselves otherwise)."""
    name = spec.loss.name
    if not outputs_are_logits:
        return "identity"
    if name in ("sparse_categorical_crossentropy", "categorical_crossentropy"):
        return "softmax"
    if name == "binary_crossentropy":
        return "sigmoid"
    return "identity"


def make_card(
    spec: Any,
    info: Any,
    *,
    mean: list[float] | None,
    std: list[float] | None,
    outputs_are_logits: bool,
    output_activation_in_weights: bool,
    torch_version: str,
) -> dict[str, Any]:
    """The card of a job's checkpoints (``spec`` a validated JobSpec, ``info`` the dataset's
    :class:`training.data.DatasetInfo`, ``mean``/``std`` the training split's statistics)."""
    last = spec.model.layers[-1]
    return {
        "card_version": CARD_VERSION,
        "model": spec.model.model_dump(mode="json"),
        "input_shape": list(info.input_shape),
        "layout": getattr(spec.data, "layout", None) or "flat",
        "task": info.task,
        "n_classes": info.n_classes,
        "n_targets": info.n_targets,
        "loss": spec.loss.model_dump(mode="json"),
        "metrics": [m.model_dump(mode="json") if hasattr(m, "model_dump") else m for m in spec.metrics],
        "output_activation": getattr(last, "activation", "linear"),
        "output_activation_in_weights": output_activation_in_weights,
        "head": head_of(spec, outputs_are_logits),
        "standardize": None if mean is None else {"mean": list(mean), "std": list(std or [])},
        "trainyard_version": trainyard_version(),
        "torch_version": torch_version,
    }


def read_header_metadata(data: bytes) -> dict[str, str]:
    """The string metadata of safetensors bytes (``__metadata__``), without loading tensors."""
    if len(data) < 8:
        raise CardError("not a safetensors file: too short")
    n = int.from_bytes(data[:8], "little")
    if n <= 0 or 8 + n > len(data):
        raise CardError("not a safetensors file: the header is corrupt")
    try:
        header = json.loads(data[8 : 8 + n])
    except ValueError as exc:
        raise CardError(f"not a safetensors file: the header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise CardError("not a safetensors file: the header is not an object")
    return header.get("__metadata__", {}) or {}


def checkpoint_meta(data: bytes) -> dict[str, Any]:
    """The ``trainyard`` metadata of a checkpoint ({} for a plain safetensors file)."""
    raw = read_header_metadata(data).get("trainyard")
    if not raw:
        return {}
    try:
        meta = json.loads(raw)
    except ValueError as exc:
        raise CardError(f"the checkpoint's trainyard metadata is not JSON ({exc})") from None
    return meta if isinstance(meta, dict) else {}


def card_of(data: bytes) -> dict[str, Any] | None:
    """The card stored in a checkpoint, or None for one written before cards existed."""
    card = checkpoint_meta(data).get("card")
    return card if isinstance(card, dict) else None


# --------------------------------------------------------------------------- inputs and outputs

MAX_PREDICT_ROWS = 10_000


class InputError(ValueError):
    """Inputs a model cannot take; ``path`` is where (e.g. ``("inputs", 3, 17)``)."""

    def __init__(self, message: str, path: tuple[str | int, ...]) -> None:
        super().__init__(message)
        self.path = path


def _bad_element(value: Any, path: tuple[str | int, ...], depth: int) -> tuple[tuple[str | int, ...], str] | None:
    """The first element of nested lists that is not a number, or a ragged row."""
    if isinstance(value, list | tuple):
        if depth == 0:
            return path, "expected a number, got a list"
        lengths = {len(v) if isinstance(v, list | tuple) else None for v in value}
        if len(lengths) > 1:
            for i, v in enumerate(value):
                if not isinstance(v, list | tuple) or len(v) != len(value[0]) or not isinstance(value[0], list | tuple):
                    return path + (i,), "rows of different lengths (every input must have the same shape)"
        for i, v in enumerate(value):
            found = _bad_element(v, path + (i,), depth - 1)
            if found:
                return found
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        kind = "null" if value is None else type(value).__name__
        return path, f"expected a number, got {kind} {value!r}"[:200]
    if depth > 0:
        return path, "expected a list, got a number"
    return None


def coerce_inputs(card: dict[str, Any], value: Any, where: tuple[str | int, ...] = ("inputs",)) -> Any:
    """Raw inputs (nested lists or an array) as a float32 numpy array shaped ``(n,
    *input_shape)``, checked: numbers only (no bool, string or null), finite, each row of the
    model's input shape (or the same number of values flat). Raises :class:`InputError` naming
    what is wrong and where. Does not standardize (the exported models do it)."""
    import numpy as np

    shape = tuple(int(d) for d in card["input_shape"])
    size = 1
    for d in shape:
        size *= d
    want = f"each input must have shape {list(shape)}" + (f" (or {size} values flat)" if len(shape) > 1 else "")
    if isinstance(value, np.ndarray):
        a = value
        if a.dtype.kind not in "iuf":
            raise InputError(f"inputs must be numbers, got an array of dtype {a.dtype}", where)
    else:
        if not isinstance(value, list) or not value:
            raise InputError("inputs must be a non-empty list of inputs (a batch)", where)
        found = None
        try:
            a = np.asarray(value)
        except ValueError:
            a = None
        if a is None or a.dtype.kind not in "iuf":
            # ragged rows, strings, booleans or nulls: say which element
            for depth in (len(shape), 1):
                found = _bad_element(value, where, depth + 1)
                if found is None:
                    break
            if found is None:  # pragma: no cover - numpy refused something the walk accepts
                found = (where, "inputs must be numbers")
            raise InputError(f"{found[1]}; {want}", found[0])
    if a.ndim == 0 or len(a) == 0:
        raise InputError("inputs must be a non-empty batch", where)
    if len(a) > MAX_PREDICT_ROWS:
        raise InputError(f"at most {MAX_PREDICT_ROWS} inputs per request, got {len(a)}", where)
    flat = a.shape[1:] != shape
    if flat and not (a.ndim == 2 and a.shape[1] == size):
        raise InputError(f"inputs have shape {list(a.shape)}: {want}, so a batch is [n, {', '.join(map(str, shape))}]", where)
    a = np.ascontiguousarray(a, dtype=np.float32)
    finite = np.isfinite(a)
    if not finite.all():
        bad = np.argwhere(~finite)[0]
        raise InputError(f"inputs must be finite numbers, got {a[tuple(bad)]} (NaN or infinity; or too large for float32)",
                         where + tuple(int(i) for i in bad))
    return a.reshape(len(a), *shape) if flat else a


def labels_of(card: dict[str, Any], outputs: Any) -> Any:
    """Class labels of a classifier's predictions (``outputs``, an ``(n, k)`` array of
    probabilities, or scores for a non-probabilistic head): the argmax, or ``p > 0.5`` for a
    single output. None for a regression model."""
    import numpy as np

    if card.get("task") != "classification":
        return None
    out = np.asarray(outputs)
    if out.ndim == 2 and out.shape[1] == 1:
        return (out[:, 0] > 0.5).astype(np.int64)  # sigmoid (or stored) probabilities
    return out.argmax(axis=-1).astype(np.int64)
