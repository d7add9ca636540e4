"""Export a trained model (:class:`training.inference.LoadedModel`) as TorchScript, ONNX or Keras.

Every export is the model from raw inputs to predictions (:class:`InferenceModule`: the stored
standardization, the network, its head), so it takes the same inputs as ``predict``: float32
``(n, *input_shape)``; its output is class probabilities (classifiers trained on logits) or the
network's outputs. The input is named ``input`` and the output ``output``; the batch dimension
is dynamic.

* ``torchscript``: ``torch.jit.trace`` of that module (``torch.jit.load`` runs it without
  Trainyard).
* ``onnx``: the TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``, opset 17):
  the model is small and static, and that path needs no extra package; the model card is in the
  graph's ``metadata_props`` under ``trainyard``.
* ``keras``: a Keras 3 model (``.keras`` zip) built layer by layer from the card and filled with
  the weights, converted to Keras layouts: dense kernels ``(in, out)``, conv kernels OIHW ->
  HWIO, convolutions and pooling channels-last (a ``Permute`` takes the channel-first input), and
  a ``Permute`` back to channel-first before ``Flatten`` so the flattened order is torch's;
  batch-norm ``gamma``/``beta``/moving statistics; the standardization as a ``Normalization``
  layer. Needs the ``keras`` extra (``pip install 'trainyard[keras]'``).
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import warnings
from typing import Any

import numpy as np
import torch

from training.inference import LoadedModel

FORMATS = ("torchscript", "onnx", "keras")
MEDIA_TYPES = {"torchscript": "application/octet-stream", "onnx": "application/octet-stream", "keras": "application/zip"}
EXTENSIONS = {"torchscript": "pt", "onnx": "onnx", "keras": "keras"}
ONNX_OPSET = 17


class ExportError(RuntimeError):
    """A model that cannot be exported in the asked format (the message says why)."""


def export(model: LoadedModel, fmt: str) -> bytes:
    """The model as a file of format ``fmt`` (one of :data:`FORMATS`)."""
    if fmt == "torchscript":
        return to_torchscript(model)
    if fmt == "onnx":
        return to_onnx(model)
    if fmt == "keras":
        return to_keras(model)
    raise ExportError(f"unknown export format {fmt!r}; one of {', '.join(FORMATS)}")


def _example(model: LoadedModel, n: int = 2) -> torch.Tensor:
    return torch.zeros((n, *model.input_shape), dtype=torch.float32)


def to_torchscript(model: LoadedModel) -> bytes:
    module = model.inference_module()
    with torch.no_grad():
        traced = torch.jit.trace(module, _example(model), check_trace=False)
    buf = io.BytesIO()
    torch.jit.save(traced, buf, _extra_files={"trainyard.json": json.dumps(model.card, sort_keys=True)})
    return buf.getvalue()


def to_onnx(model: LoadedModel) -> bytes:
    import onnx

    module = model.inference_module()
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter is meant here (module docstring)
        torch.onnx.export(
            module, (_example(model),), buf, dynamo=False, opset_version=ONNX_OPSET,
            input_names=["input"], output_names=["output"],
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
        )
    proto = onnx.load_from_string(buf.getvalue())
    entry = proto.metadata_props.add()
    entry.key, entry.value = "trainyard", json.dumps(model.card, sort_keys=True)
    return proto.SerializeToString()


# --------------------------------------------------------------------------- keras

_KERAS_ACTIVATIONS = {
    "relu": "relu", "leaky_relu": "leaky_relu", "elu": "elu", "selu": "selu", "gelu": "gelu",
    "silu": "silu", "swish": "silu", "sigmoid": "sigmoid", "tanh": "tanh", "softmax": "softmax",
    "softplus": "softplus", "softsign": "softsign", "relu6": "relu6", "hard_sigmoid": "hard_sigmoid",
    "mish": "mish", "linear": "linear",
}


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def to_keras(model: LoadedModel) -> bytes:
    os.environ.setdefault("KERAS_BACKEND", "torch")  # the backend whose numbers are checked
    try:
        import keras
    except ImportError:
        raise ExportError("Keras export needs Keras 3: pip install 'trainyard[keras]'") from None
    from keras import layers as kl

    card = model.card
    spec_layers = card["model"]["layers"]
    sd = {k: v for k, v in model.module.state_dict().items()}
    inputs = keras.Input(shape=tuple(card["input_shape"]), name="input")
    x = inputs
    std = card.get("standardize")
    if std:
        shape = tuple(card["input_shape"])
        axis = tuple(range(1, len(shape) + 1)) if len(shape) > 1 else -1
        mean = np.asarray(std["mean"], np.float64).astype(np.float32).reshape(shape)
        scale = np.asarray(std["std"], np.float64).astype(np.float32).reshape(shape)
        x = kl.Normalization(axis=axis, mean=mean, variance=np.square(scale), name="standardize")(x)
    channels_last = False  # whether x is a rank-4 tensor held channels-last (torch's is channel-first)
    pending: list[tuple[Any, dict[str, np.ndarray]]] = []

    def to_cf(t: Any) -> Any:
        nonlocal channels_last
        if channels_last:
            channels_last = False
            return kl.Permute((3, 1, 2))(t)
        return t

    def to_cl(t: Any) -> Any:
        nonlocal channels_last
        if not channels_last:
            channels_last = True
            return kl.Permute((2, 3, 1))(t)
        return t

    last = len(spec_layers) - 1
    for i, layer in enumerate(spec_layers):
        t = layer["type"]
        name = f"layer_{i}_{t}"
        act = layer.get("activation", "linear")
        if i == last and not card["output_activation_in_weights"]:
            act = "linear"  # the head below applies it
        if t == "dense":
            x = to_cf(x)
            k = kl.Dense(layer["units"], use_bias=layer["use_bias"], activation=_KERAS_ACTIVATIONS[act], name=name)
            x = k(x)
            w = {"kernel": _np(sd[f"{i}.weight"]).T}
            if layer["use_bias"]:
                w["bias"] = _np(sd[f"{i}.bias"])
            pending.append((k, w))
        elif t == "conv2d":
            x = to_cl(x)
            pad = layer["padding"]
            # torch's softmax is over the last axis of the channel-first tensor: applied after it
            k = kl.Conv2D(layer["filters"], tuple(_pair(layer["kernel_size"])), strides=tuple(_pair(layer["strides"])),
                          padding=pad, dilation_rate=tuple(_pair(layer["dilation_rate"])), use_bias=layer["use_bias"],
                          activation=_KERAS_ACTIVATIONS["linear" if act == "softmax" else act],
                          data_format="channels_last", name=name)
            x = k(x)
            if act == "softmax":
                x = kl.Activation("softmax", name=f"{name}_softmax")(to_cf(x))
            w = {"kernel": np.transpose(_np(sd[f"{i}.weight"]), (2, 3, 1, 0))}  # OIHW -> HWIO
            if layer["use_bias"]:
                w["bias"] = _np(sd[f"{i}.bias"])
            pending.append((k, w))
        elif t in ("max_pool2d", "avg_pool2d"):
            x = to_cl(x)
            cls = kl.MaxPooling2D if t == "max_pool2d" else kl.AveragePooling2D
            strides = layer.get("strides")
            x = cls(pool_size=tuple(_pair(layer["pool_size"])), strides=None if strides is None else tuple(_pair(strides)),
                    padding=layer["padding"], data_format="channels_last", name=name)(x)
        elif t == "flatten":
            x = kl.Flatten(name=name)(to_cf(x))  # torch's (C, H, W) order
        elif t == "reshape":
            x = kl.Reshape(tuple(layer["target_shape"]), name=name)(to_cf(x))
        elif t == "dropout":
            x = kl.Dropout(layer["rate"], name=name)(x)
        elif t == "batch_norm":
            axis = -1 if channels_last or len(x.shape) == 2 else 1
            k = kl.BatchNormalization(axis=axis, momentum=layer["momentum"], epsilon=layer["epsilon"],
                                      center=layer["center"], scale=layer["scale"], name=name)
            x = k(x)
            w = {"moving_mean": _np(sd[f"{i}.running_mean"]), "moving_variance": _np(sd[f"{i}.running_var"])}
            if layer["scale"]:
                w["gamma"] = _np(sd[f"{i}.weight"])
            if layer["center"]:
                w["beta"] = _np(sd[f"{i}.bias"])
            pending.append((k, w))
        elif t == "layer_norm":
            x = to_cf(x)
            k = kl.LayerNormalization(axis=-1, epsilon=layer["epsilon"], center=layer["center"], scale=layer["scale"], name=name)
            x = k(x)
            w = {}
            if layer["scale"]:
                w["gamma"] = _np(sd[f"{i}.weight"])
            if layer["center"]:
                w["beta"] = _np(sd[f"{i}.bias"])
            pending.append((k, w))
        elif t == "activation":
            if act == "softmax":
                x = to_cf(x)  # torch's softmax is over the last axis of the channel-first tensor
            x = kl.Activation(_KERAS_ACTIVATIONS[act], name=name)(x)
        else:  # pragma: no cover - the spec's discriminator makes this unreachable
            raise ExportError(f"layer {i}: type {t!r} has no Keras export")
    x = to_cf(x)
    head = card["head"]
    if head != "identity":
        x = kl.Activation(head, name="head")(x)
    kmodel = keras.Model(inputs, x, name="trainyard")
    for k, w in pending:
        _set_weights(k, w)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.keras")
        kmodel.save(path)
        with open(path, "rb") as f:
            return f.read()


def _pair(v: Any) -> list[int]:
    return [v, v] if isinstance(v, int) else list(v)


def _set_weights(layer: Any, values: dict[str, np.ndarray]) -> None:
    """Assign weights by variable name (Keras orders them per layer type)."""
    for var in layer.weights:
        key = var.path.rsplit("/", 1)[-1]
        if key not in values:
            raise ExportError(f"keras layer {layer.name}: no torch value for its variable {key!r}")
        value = values[key]
        if tuple(var.shape) != value.shape:
            raise ExportError(f"keras layer {layer.name}: {key} has shape {tuple(var.shape)}, torch's is {value.shape}")
        var.assign(value)
