"""Use what was trained: :func:`load_model` turns a checkpoint back into a model.

A checkpoint written by this engine carries a model card (:mod:`training.card`): the model part
of the spec, the input shape, the training split's standardization and the output head, so the
weights can be used without the job. Checkpoints written before cards existed load too, given
the job's spec (the card is then rebuilt from it, re-reading the dataset for the statistics).
"""

from __future__ import annotations

import copy
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import nn

from training import data as data_mod
from training.card import CardError, card_of, checkpoint_meta, coerce_inputs, labels_of, make_card
from training.model import BuiltModel, build_model
from training.objectives import build_objective, prepare_targets, strip_output_activation
from training.spec import Loss, Metric, ModelSpec, validate_spec
from training.state import sha256, weights_from_bytes

__all__ = ["InferenceModule", "LoadedModel", "load_model"]


class InferenceModule(nn.Module):
    """Raw inputs in, predictions out: the training split's standardization, the trained
    network, then its head (softmax/sigmoid for a classifier trained on logits). This is what
    the exports (TorchScript, ONNX, Keras) contain."""

    def __init__(self, net: nn.Module, mean: torch.Tensor | None, std: torch.Tensor | None, head: str) -> None:
        super().__init__()
        self.net = net
        self.standardize = mean is not None
        self.register_buffer("mean", mean if mean is not None else torch.zeros(0))
        self.register_buffer("std", std if std is not None else torch.ones(0))
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.standardize:
            shape = x.shape
            x = ((x.reshape(shape[0], -1) - self.mean) / self.std).reshape(shape)
        out = self.net(x)
        if self.head == "softmax":
            out = torch.softmax(out, dim=-1)
        elif self.head == "sigmoid":
            out = torch.sigmoid(out)
        return out


@dataclass
class LoadedModel:
    """A trained model: ``module`` (an ``nn.Module`` in eval mode, taking standardized inputs and
    returning what the network computed during training: logits for a classifier trained on
    logits), its ``card`` (:mod:`training.card`) and the checkpoint's ``epoch``/``step``/
    ``monitor``/``value`` in ``meta``."""

    module: nn.Sequential
    card: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)
    built: BuiltModel | None = None
    _inference: InferenceModule | None = field(default=None, repr=False)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.card["input_shape"])

    def preprocess(self, x: Any) -> torch.Tensor:
        """Raw inputs (an array or nested lists, ``(n, *input_shape)`` or flat rows) as the float32
        tensor the network takes: checked, and standardized with the training split's statistics
        exactly as training standardized them."""
        a = coerce_inputs(self.card, x)
        std = self.card.get("standardize")
        if std:
            a = data_mod.standardize(a, std["mean"], std["std"])
        return torch.from_numpy(a)

    @torch.no_grad()
    def predict(self, x: Any) -> np.ndarray:
        """Predictions for raw inputs: class probabilities for a classifier (its head applied),
        values for a regression model."""
        return self.inference_module()(torch.from_numpy(coerce_inputs(self.card, x))).numpy()

    def predict_classes(self, x: Any) -> np.ndarray:
        """Class labels for raw inputs (classifiers only)."""
        labels = labels_of(self.card, self.predict(x))
        if labels is None:
            raise ValueError("this model is a regression model: it has no class labels (use predict)")
        return labels

    def inference_module(self) -> InferenceModule:
        """A module from raw inputs to predictions (see :class:`InferenceModule`), in eval mode,
        sharing ``module``'s weights (without its activity-regularizer hooks, which only training
        and :meth:`evaluate` need)."""
        if self._inference is None:
            net = copy.copy(self.module)  # shallow: same layers (same weights), own hook table
            net._forward_hooks = OrderedDict()
            net._modules = OrderedDict((name, _unhooked(m)) for name, m in self.module.named_children())
            std = self.card.get("standardize")
            mean_t = torch.tensor(np.asarray(std["mean"], np.float64).astype(np.float32)) if std else None
            std_t = torch.tensor(np.asarray(std["std"], np.float64).astype(np.float32)) if std else None
            self._inference = InferenceModule(net, mean_t, std_t, self.card["head"]).eval()
        return self._inference

    def evaluate(self, x: Any, y: Any) -> dict[str, float]:
        """Loss (with the model's regularization penalties, as training reported it) and metrics
        on raw inputs ``x`` and labels/targets ``y``: for a job's validation split these are its
        ``val_loss`` and ``val_*`` metrics of the checkpoint's epoch, exactly."""
        from training.engine import evaluate_model

        assert self.built is not None
        spec = _objective_spec(self.card)
        n_classes = self.card.get("n_classes")
        objective = build_objective(spec, n_classes)  # type: ignore[arg-type]
        xt = self.preprocess(x)
        yt = torch.as_tensor(np.asarray(y))
        tt = prepare_targets(spec, yt, n_classes)  # type: ignore[arg-type]
        return evaluate_model(self.module, self.built, objective, xt, yt, tt)


def _unhooked(module: nn.Module) -> nn.Module:
    if not module._forward_hooks:
        return module
    twin = copy.copy(module)  # shares parameters and buffers
    twin._forward_hooks = OrderedDict()
    return twin


def _objective_spec(card: dict[str, Any]) -> SimpleNamespace:
    """The parts of a JobSpec that the model builder and the objective read, from a card."""
    return SimpleNamespace(
        model=ModelSpec.model_validate(card["model"]),
        loss=Loss.model_validate(card["loss"]),
        metrics=[Metric.model_validate(m) for m in card.get("metrics", [])],
    )


def card_from_spec(spec: Any) -> dict[str, Any]:
    """The card a checkpoint of this job would carry (for checkpoints written before cards):
    re-reads the job's dataset for the training split's statistics."""
    job = validate_spec(spec)
    split = data_mod.load(job.data, job.seed)
    objective = build_objective(job, split.info.n_classes)
    return make_card(
        job, split.info,
        mean=None if split.mean is None else split.mean.tolist(),
        std=None if split.std is None else split.std.tolist(),
        outputs_are_logits=objective.outputs_are_logits,
        output_activation_in_weights=not strip_output_activation(job),
        torch_version=torch.__version__,
    )


def _read(checkpoint: Any) -> bytes:
    if isinstance(checkpoint, bytes | bytearray | memoryview):
        return bytes(checkpoint)
    if isinstance(checkpoint, tuple) and len(checkpoint) == 2 and isinstance(checkpoint[0], bytes):
        data, digest = checkpoint  # what client.Client.best_checkpoint returns
        if sha256(data) != digest:
            raise CardError(f"checkpoint bytes hash to {sha256(data)}, not the expected {digest}")
        return data
    if isinstance(checkpoint, str | os.PathLike):
        with open(checkpoint, "rb") as f:
            return f.read()
    raise TypeError(f"load_model takes checkpoint bytes, a path, or (bytes, sha256); got {type(checkpoint).__name__}")


def load_model(checkpoint: Any, spec: Any = None) -> LoadedModel:
    """Rebuild a trained model from a checkpoint: ``bytes``, a path to a ``.safetensors`` file,
    or the ``(bytes, sha256)`` pair ``client.Client.best_checkpoint`` returns (its digest is
    checked). The result's ``module`` is in eval mode; ``preprocess``/``predict`` apply the stored
    standardization and output head. A checkpoint written before model cards needs the job's
    ``spec`` (a dict or JobSpec). Raises :class:`training.card.CardError` when the checkpoint
    cannot be used."""
    data = _read(checkpoint)
    meta = checkpoint_meta(data)
    card = card_of(data)
    if card is None:
        if spec is None:
            raise CardError(
                "this checkpoint has no model card (it was written before Trainyard stored one): "
                "pass the job's spec, load_model(checkpoint, spec=job['spec'])"
            )
        card = card_from_spec(spec)
    weights = weights_from_bytes(data)
    parts = _objective_spec(card)
    strip = not card["output_activation_in_weights"]
    with torch.random.fork_rng(devices=[]):  # building initializes weights: leave the caller's RNG alone
        built = build_model(parts, tuple(card["input_shape"]), strip)  # type: ignore[arg-type]
    try:
        built.module.load_state_dict(weights)
    except RuntimeError as exc:
        raise CardError(f"the checkpoint's weights do not fit the model its card describes: {exc}") from None
    built.module.eval()
    return LoadedModel(
        module=built.module, card=card,
        meta={k: meta.get(k) for k in ("epoch", "step", "monitor", "value")}, built=built,
    )
