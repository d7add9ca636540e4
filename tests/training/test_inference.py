"""Self-describing checkpoints and ``training.load_model``: the loaded model reproduces the job's
validation numbers exactly, on the source note's model and on a conv + batch-norm image model."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save

from training import BaseReporter, fit, load_model
from training import data as data_mod
from training.card import CardError, InputError, card_of, checkpoint_meta, coerce_inputs
from training.spec import validate_spec
from training.state import weights_from_bytes

ROOT = Path(__file__).resolve().parents[2]
NOTE = json.loads((ROOT / "examples" / "source-note.json").read_text())

CONV_BN = {
    "name": "digits-conv-bn", "seed": 3, "device": "cpu",
    "data": {"dataset": "digits", "layout": "image", "validation_split": 0.2, "batch_size": 64, "standardize": True},
    "model": {"layers": [
        {"type": "conv2d", "filters": 8, "kernel_size": 3, "padding": "same", "activation": "relu"},
        {"type": "batch_norm", "momentum": 0.9},
        {"type": "max_pool2d", "pool_size": 2},
        {"type": "conv2d", "filters": 6, "kernel_size": [2, 3], "activation": "elu"},
        {"type": "batch_norm"},
        {"type": "flatten"},
        {"type": "dense", "units": 24, "activation": "tanh"},
        {"type": "layer_norm"},
        {"type": "dropout", "rate": 0.2},
        {"type": "dense", "units": 10, "activation": "softmax"},
    ]},
    "loss": "sparse_categorical_crossentropy", "metrics": ["accuracy"],
    "optimizer": {"name": "adam", "learning_rate": 0.01}, "epochs": 4,
}


def note(epochs: int = 6) -> dict:
    spec = copy.deepcopy(NOTE)
    spec["epochs"], spec["device"] = epochs, "cpu"
    return spec


class Saves(BaseReporter):
    def __init__(self) -> None:
        self.checkpoints = []

    def on_checkpoint(self, checkpoint) -> None:
        self.checkpoints.append(checkpoint)


def raw_split(spec: dict) -> data_mod.Split:
    job = validate_spec(spec)
    return data_mod.load(job.data.model_copy(update={"standardize": False}), job.seed)


@pytest.fixture(scope="module", params=["note", "conv_bn"])
def trained(request):
    spec = note() if request.param == "note" else copy.deepcopy(CONV_BN)
    reporter = Saves()
    result = fit(spec, reporter)
    return spec, result, reporter


def test_last_checkpoint_reproduces_the_final_validation_numbers_exactly(trained):
    spec, result, _ = trained
    raw = raw_split(spec)
    model = load_model(result.last_checkpoint.data)
    assert not model.module.training
    assert model.meta["epoch"] == result.epochs_run == len(result.history)
    got = model.evaluate(raw.x_val, raw.y_val)
    final = result.history[-1]
    assert got["loss"] == final["val_loss"]
    assert got["accuracy"] == final["val_accuracy"]


def test_every_saved_checkpoint_reproduces_its_epoch(trained):
    spec, result, reporter = trained
    raw = raw_split(spec)
    assert reporter.checkpoints
    for ck in reporter.checkpoints:
        model = load_model(ck.data)
        logs = result.history[ck.epoch - 1]
        got = model.evaluate(raw.x_val, raw.y_val)
        assert (got["loss"], got["accuracy"]) == (logs["val_loss"], logs["val_accuracy"])
        assert model.meta["value"] == logs["val_loss"]


def test_the_card_describes_the_model(trained):
    spec, result, _ = trained
    card = card_of(result.best_checkpoint)
    job = validate_spec(spec)
    std_split = data_mod.load(job.data, job.seed)
    assert card["model"] == job.model.model_dump(mode="json")
    assert card["input_shape"] == list(std_split.info.input_shape)
    assert card["layout"] == job.data.layout
    assert (card["task"], card["n_classes"]) == ("classification", 10)
    assert card["head"] == "softmax"
    assert card["torch_version"] == torch.__version__ and card["trainyard_version"]
    assert np.array_equal(np.array(card["standardize"]["mean"]), std_split.mean)
    assert np.array_equal(np.array(card["standardize"]["std"]), std_split.std)
    meta = checkpoint_meta(result.best_checkpoint)
    assert meta["epoch"] == result.best_epoch and meta["monitor"] == "val_loss"


def test_preprocess_is_bit_identical_to_training_standardization(trained):
    spec, result, _ = trained
    job = validate_spec(spec)
    standardized = data_mod.load(job.data, job.seed)
    model = load_model(result.best_checkpoint)
    x = model.preprocess(raw_split(spec).x_val)
    assert x.dtype == torch.float32
    assert torch.equal(x, torch.from_numpy(standardized.x_val))


def test_predict_gives_probabilities_and_labels(trained):
    spec, result, _ = trained
    raw = raw_split(spec)
    model = load_model(result.best_checkpoint)
    probs = model.predict(raw.x_val)
    assert probs.shape == (len(raw.x_val), 10)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    with torch.no_grad():
        logits = model.module(model.preprocess(raw.x_val))
    assert np.array_equal(model.predict_classes(raw.x_val), logits.argmax(-1).numpy())
    # flat rows are accepted for an image model too; the same numbers come out
    np.testing.assert_array_equal(model.predict(raw.x_val.reshape(len(raw.x_val), -1)), probs)


def test_load_model_from_a_path_and_a_download_pair(tmp_path, trained):
    _, result, _ = trained
    path = tmp_path / "best.safetensors"
    path.write_bytes(result.best_checkpoint)
    a, b = load_model(path), load_model((result.best_checkpoint, result.best_checkpoint_sha256))
    for k, v in a.module.state_dict().items():
        assert torch.equal(v, b.module.state_dict()[k])
    with pytest.raises(CardError, match="hash"):
        load_model((result.best_checkpoint, "0" * 64))


def test_a_checkpoint_without_a_card_loads_with_the_jobs_spec(trained):
    spec, result, _ = trained
    weights = weights_from_bytes(result.last_checkpoint.data)
    legacy = save(weights, metadata={"trainyard": json.dumps({"format": "trainyard-weights/1", "epoch": 3})})
    with pytest.raises(CardError, match="spec"):
        load_model(legacy)
    model = load_model(legacy, spec=spec)
    raw = raw_split(spec)
    got = model.evaluate(raw.x_val, raw.y_val)
    assert got["loss"] == result.history[-1]["val_loss"]
    assert model.card["standardize"] == card_of(result.last_checkpoint.data)["standardize"]


def test_loading_leaves_the_global_rng_alone(trained):
    _, result, _ = trained
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    load_model(result.best_checkpoint)
    assert torch.equal(torch.rand(3), expected)


def test_bad_inputs_say_what_and_where():
    card = {"input_shape": [1, 8, 8]}
    with pytest.raises(InputError, match=r"shape \[2, 63\]") as e:
        coerce_inputs(card, [[0.0] * 63, [0.0] * 63])
    assert e.value.path == ("inputs",)
    row = [0.0] * 64
    with pytest.raises(InputError, match="got str") as e:
        coerce_inputs(card, [row, row[:5] + ["x"] + row[6:]])
    assert e.value.path == ("inputs", 1, 5)
    with pytest.raises(InputError, match="got bool"):
        coerce_inputs(card, [[True] * 64])
    with pytest.raises(InputError, match="different lengths") as e:
        coerce_inputs(card, [row, row[:10]])
    assert e.value.path == ("inputs", 1)
    with pytest.raises(InputError, match="finite") as e:
        coerce_inputs(card, [row, row[:7] + [float("nan")] + row[8:]])
    assert e.value.path == ("inputs", 1, 7)
    assert coerce_inputs(card, [row]).shape == (1, 1, 8, 8)


def test_a_cancelled_runs_last_checkpoint_has_no_monitored_value():
    reporter = Saves()
    epochs: list[int] = []
    reporter.on_epoch = lambda metrics: epochs.append(metrics["epoch"])  # type: ignore[method-assign]
    result = fit(note(100_000), reporter, should_stop=lambda: len(epochs) >= 2)
    assert result.stop_reason == "cancelled"
    meta = checkpoint_meta(result.last_checkpoint.data)
    assert meta["epoch"] == result.epochs_run and meta["step"] == result.steps and meta["value"] is None
    model = load_model(result.last_checkpoint.data)  # the weights of its last step (not restored to the best)
    assert np.isfinite(model.predict(raw_split(note()).x_val[:8])).all()
