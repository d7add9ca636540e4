"""The benchmarks' shared job spec: the digits MLP that ``bench/fused.py``, ``bench/sweeps.py`` and
``bench/packing.py`` train (64 relu units, dropout 0.1, 10 logits; batch 64, standardized digits
with a 20 % validation split, Adam at 1e-3, 27 epochs, on the CPU), in one place."""

from __future__ import annotations

from typing import Any


def digits_mlp(name: str, *, l2: float | None = None) -> dict[str, Any]:
    """A fresh copy of the digits MLP spec named ``name``; ``l2``: an L2 kernel penalty on the
    hidden layer (a sweep's space can then vary it)."""
    hidden: dict[str, Any] = {"type": "dense", "units": 64, "activation": "relu"}
    if l2 is not None:
        hidden["kernel_regularizer"] = {"l2": l2}
    return {
        "name": name,
        "seed": 0,
        "device": "cpu",
        "data": {"dataset": "digits", "validation_split": 0.2, "batch_size": 64, "standardize": True},
        "model": {"layers": [hidden, {"type": "dropout", "rate": 0.1}, {"type": "dense", "units": 10}]},
        "loss": "sparse_categorical_crossentropy",
        "metrics": ["accuracy"],
        "optimizer": {"name": "adam", "learning_rate": 0.001},
        "epochs": 27,
    }
