"""Exports checked against the runtimes that load them: TorchScript (torch.jit.load), ONNX
(onnxruntime) and Keras 3 (torch backend), on the source note's model and a conv + batch-norm
image model: outputs equal the torch model's to 1e-5 on the validation split."""

from __future__ import annotations

import copy
import io
import json
import os

import numpy as np
import pytest
import torch
from test_inference import CONV_BN, note, raw_split  # a sibling test module

from training import fit, load_model
from training.export import export

os.environ.setdefault("KERAS_BACKEND", "torch")

REGRESSION = {
    "name": "regression-mlp", "seed": 5, "device": "cpu",
    "data": {"dataset": "regression", "n_samples": 300, "validation_split": 0.2, "batch_size": 32, "standardize": True},
    "model": {"layers": [{"type": "dense", "units": 16, "activation": "gelu"}, {"type": "batch_norm"},
                         {"type": "dense", "units": 1}]},
    "loss": "mse", "metrics": ["mae"], "optimizer": {"name": "adam", "learning_rate": 0.01}, "epochs": 3,
}


# flat inputs reshaped to channel-first images inside the model, 'same' pooling, a conv softmax
RESHAPE = {
    "name": "digits-reshape-conv", "seed": 9, "device": "cpu",
    "data": {"dataset": "digits", "validation_split": 0.2, "batch_size": 64, "standardize": True},
    "model": {"layers": [
        {"type": "reshape", "target_shape": [1, 8, 8]},
        {"type": "conv2d", "filters": 4, "kernel_size": 3, "strides": 2, "padding": "same", "activation": "softmax"},
        {"type": "avg_pool2d", "pool_size": 3, "strides": 1, "padding": "same"},
        {"type": "batch_norm", "center": False},
        {"type": "flatten"},
        {"type": "activation", "activation": "swish"},
        {"type": "dense", "units": 10, "use_bias": False},
    ]},
    "loss": "sparse_categorical_crossentropy", "metrics": ["accuracy"],
    "optimizer": {"name": "adam", "learning_rate": 0.01}, "epochs": 2,
}


@pytest.fixture(scope="module", params=["note", "conv_bn", "regression", "reshape"])
def trained(request):
    spec = {"note": lambda: note(4), "conv_bn": lambda: copy.deepcopy(CONV_BN),
            "regression": lambda: copy.deepcopy(REGRESSION), "reshape": lambda: copy.deepcopy(RESHAPE)}[request.param]()
    result = fit(spec)
    model = load_model(result.best_checkpoint)
    x = raw_split(spec).x_val
    return model, x, model.predict(x)


def test_torchscript_matches_torch(trained):
    model, x, expected = trained
    loaded = torch.jit.load(io.BytesIO(export(model, "torchscript")))
    with torch.no_grad():
        out = loaded(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5)


def test_onnx_matches_torch_in_onnxruntime(trained):
    import onnx
    import onnxruntime as ort

    model, x, expected = trained
    data = export(model, "onnx")
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input"]
    for batch in (x, x[:1], x[:32]):  # the batch dimension is dynamic
        out = session.run(None, {"input": batch})[0]
        np.testing.assert_allclose(out, expected[: len(batch)], rtol=1e-6, atol=1e-5)
    props = {p.key: p.value for p in onnx.load_from_string(data).metadata_props}
    assert json.loads(props["trainyard"]) == model.card


def test_keras_matches_torch(trained, tmp_path):
    import keras  # the optional extra `keras`; the dev extra installs it
    assert keras.backend.backend() == "torch"
    model, x, expected = trained
    path = tmp_path / "model.keras"
    path.write_bytes(export(model, "keras"))
    kmodel = keras.saving.load_model(path)
    out = np.asarray(kmodel.predict(x, verbose=0))
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5)
    # the model holds torch's weights in Keras layouts, not a wrapper around torch
    kinds = {type(layer).__name__ for layer in kmodel.layers}
    assert "Dense" in kinds
    if model.card["layout"] == "image":
        assert {"Conv2D", "BatchNormalization", "MaxPooling2D", "Permute"} <= kinds
