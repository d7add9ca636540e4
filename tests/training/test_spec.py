"""Job spec v1: validation, effective defaults, error paths, JSON Schema, no torch import.

Expected paths are the JSON paths of the offending values in the submitted document
(``model.layers[2]``, ``optimizer.learning_rate.t_mul``...); expected defaults are Keras' and
PyTorch's documented ones (Adam epsilon 1e-7 in Keras, 1e-8 in torch).
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

from training import SpecError, json_schema, validate_spec

REPO = Path(__file__).resolve().parents[2]

# The source note's spec, as committed for the README tour.
EXAMPLE = json.loads((REPO / "examples" / "source-note.json").read_text())


def example(**changes):
    s = copy.deepcopy(EXAMPLE)
    s.update(changes)
    return s


def errors_of(spec) -> list[dict]:
    with pytest.raises(SpecError) as e:
        validate_spec(spec)
    errs = e.value.errors
    assert errs, "SpecError without errors"
    for err in errs:
        assert {"loc", "path", "msg", "type"} <= set(err)
    return errs


def paths(errs) -> list[str]:
    return [e["path"] for e in errs]


def one_error_at(spec, path: str) -> dict:
    errs = errors_of(spec)
    matching = [e for e in errs if e["path"] == path]
    assert matching, f"expected an error at {path!r}, got {paths(errs)}"
    return matching[0]


# --------------------------------------------------------------------------- valid specs, defaults


def test_example_validates_with_effective_defaults():
    spec = validate_spec(EXAMPLE)
    d = spec.model_dump()
    opt = d["optimizer"]
    assert opt["name"] == "adam"
    assert opt["beta_1"] == 0.89
    assert opt["beta_2"] == 0.999  # Keras default
    assert opt["epsilon"] == 1e-7  # Keras default with Keras names
    assert opt["amsgrad"] is False
    lr = opt["learning_rate"]
    assert (lr["t_mul"], lr["m_mul"], lr["alpha"], lr["warmup_start_lr"]) == (
        2.0,
        1.0,
        0.0,
        0.0,
    )  # Keras defaults
    es = d["callbacks"]["early_stopping"]
    assert es["patience"] == 10 and es["restore_best_weights"] is True and es["mode"] == "auto"
    assert es["baseline"] is None and es["start_from_epoch"] == 0
    assert d["model"]["bias_initializer"]["name"] == "zeros"
    assert d["callbacks"]["terminate_on_nan"] is True
    # a JSON round trip validates to the same thing
    assert validate_spec(json.loads(spec.model_dump_json())).model_dump() == d


def test_example_file_is_the_same_spec():
    """The README's tour submits examples/source-note.json: it is the spec these tests pin down."""
    p = Path(__file__).resolve().parents[2] / "examples" / "source-note.json"
    assert json.loads(p.read_text()) == EXAMPLE


@pytest.mark.parametrize(
    "optimizer,expected",
    [
        ({"name": "adam", "betas": [0.8, 0.99]}, {"beta_1": 0.8, "beta_2": 0.99, "epsilon": 1e-8}),
        ({"name": "adam", "eps": 1e-6}, {"epsilon": 1e-6}),
        ({"name": "adam", "lr": 0.01}, {"learning_rate": 0.01, "epsilon": 1e-7}),
        (
            {"name": "adamw", "lr": 0.01, "betas": [0.9, 0.95]},
            {"learning_rate": 0.01, "beta_2": 0.95, "epsilon": 1e-8},
        ),
        ({"name": "adam", "learning_rate": 0.002, "beta_2": 0.99}, {"learning_rate": 0.002, "epsilon": 1e-7}),
        (
            {"name": "sgd", "lr": 0.1, "momentum": 0.9},
            {"learning_rate": 0.1, "momentum": 0.9, "nesterov": False},
        ),
        ({"name": "rmsprop", "alpha": 0.95}, {"rho": 0.95, "epsilon": 1e-8}),
        ({"name": "rmsprop"}, {"rho": 0.9, "epsilon": 1e-7}),
    ],
)
def test_optimizer_name_families_and_aliases(optimizer, expected):
    d = validate_spec(example(optimizer=optimizer)).model_dump()["optimizer"]
    for k, v in expected.items():
        assert d[k] == v, (k, d[k], v)


def test_lr_and_learning_rate_together_is_an_error():
    errs = errors_of(example(optimizer={"name": "adam", "lr": 0.1, "learning_rate": 0.2}))
    assert any(e["path"].startswith("optimizer") for e in errs)


# --------------------------------------------------------------------------- error paths and messages


def test_unknown_field_names_path_and_suggests():
    s = example()
    s["data"]["batchsize"] = 32
    err = one_error_at(s, "data.batchsize")
    assert "did you mean 'batch_size'" in err["msg"]
    assert "validation_split" in err["msg"]  # lists the allowed fields

    s = example()
    s["model"]["layers"][0]["unitz"] = 3
    assert "did you mean 'units'" in one_error_at(s, "model.layers[0].unitz")["msg"]

    s = example(epoch=3)
    assert "did you mean 'epochs'" in one_error_at(s, "epoch")["msg"]


def _error_at_or_under(errs, container: str, field: str) -> dict:
    ok = [e for e in errs if e["path"] in (container, f"{container}.{field}")]
    assert ok, f"expected an error at {container} or {container}.{field}, got {paths(errs)}"
    return ok[0]


def test_unknown_layer_type_lists_allowed():
    s = example()
    s["model"]["layers"][0]["type"] = "dense2"
    err = _error_at_or_under(errors_of(s), "model.layers[0]", "type")
    for t in (
        "dense",
        "conv2d",
        "max_pool2d",
        "avg_pool2d",
        "flatten",
        "reshape",
        "dropout",
        "batch_norm",
        "layer_norm",
        "activation",
    ):
        assert f"'{t}'" in err["msg"]
    assert "dense2" in err["msg"]


def test_unknown_schedule_lists_allowed():
    s = example()
    s["optimizer"]["learning_rate"]["schedule"] = "cosinus"
    err = one_error_at(s, "optimizer.learning_rate.schedule")
    for name in (
        "constant",
        "exponential",
        "step",
        "multistep",
        "polynomial",
        "cosine",
        "cosine_restarts",
        "one_cycle",
        "reduce_on_plateau",
    ):
        assert f"'{name}'" in err["msg"]


def test_unknown_optimizer_lists_allowed():
    s = example()
    s["optimizer"]["name"] = "adamx"
    err = _error_at_or_under(errors_of(s), "optimizer", "name")
    for name in ("sgd", "adam", "adamw", "nadam", "radam", "adamax", "rmsprop", "adagrad"):
        assert f"'{name}'" in err["msg"]


def test_unknown_activation_lists_allowed():
    s = example()
    s["model"]["layers"][0]["activation"] = "relux"
    err = one_error_at(s, "model.layers[0].activation")
    assert "'leaky_relu'" in err["msg"] and "'gelu'" in err["msg"]


def test_last_layer_units_must_fit_the_classes():
    s = example()
    s["model"]["layers"][2]["units"] = 7
    err = one_error_at(s, "model.layers[2]")
    assert "7" in err["msg"] and "10" in err["msg"]


def test_conv_kernel_too_large_for_digits_image():
    s = example()
    s["data"]["layout"] = "image"
    s["model"]["layers"] = [
        {"type": "conv2d", "filters": 4, "kernel_size": 3},  # 8x8 -> 6x6
        {"type": "conv2d", "filters": 4, "kernel_size": 7},  # 7 > 6
        {"type": "flatten"},
        {"type": "dense", "units": 10},
    ]
    err = one_error_at(s, "model.layers[1].kernel_size")
    assert "6x6" in err["msg"]
    s["model"]["layers"][1]["kernel_size"] = 6  # fits exactly: valid
    validate_spec(s)


def test_conv_on_flat_input():
    s = example()
    s["model"]["layers"] = [
        {"type": "conv2d", "filters": 4, "kernel_size": 3},
        {"type": "flatten"},
        {"type": "dense", "units": 10},
    ]
    err = one_error_at(s, "model.layers[0]")
    assert "image" in err["msg"] or "reshape" in err["msg"]


def test_val_monitor_without_validation_split():
    s = example()
    s["data"]["validation_split"] = 0
    errs = errors_of(s)
    for path in ("callbacks.early_stopping.monitor", "callbacks.model_checkpoint.monitor"):
        err = one_error_at(s, path)
        assert "validation_split" in err["msg"]
        assert "loss" in err["msg"]  # lists what is available
    assert len(errs) == 2


def test_reduce_lr_on_plateau_with_a_schedule():
    s = example()
    s["callbacks"]["reduce_lr_on_plateau"] = {"monitor": "val_loss"}
    err = one_error_at(s, "callbacks.reduce_lr_on_plateau")
    assert "reduce_on_plateau" in err["msg"]
    s["optimizer"]["learning_rate"] = 0.001  # constant: allowed
    validate_spec(s)


NAN, INF = float("nan"), float("inf")


def _set(path_parts, value):
    def mod(s):
        target = s
        for p in path_parts[:-1]:
            target = target[p]
        target[path_parts[-1]] = value

    return mod


NON_FINITE_CASES = [
    (("data", "validation_split"), NAN, "data.validation_split"),
    (("seed",), NAN, "seed"),
    (("epochs",), INF, "epochs"),
    (("model", "layers", 0, "units"), NAN, "model.layers[0].units"),
    (("model", "layers", 1, "rate"), -INF, "model.layers[1].rate"),
    (("model", "layers", 0, "kernel_regularizer", "l2"), INF, "model.layers[0].kernel_regularizer.l2"),
    (
        ("model", "layers", 0, "kernel_initializer"),
        {"name": "constant", "value": NAN},
        "model.layers[0].kernel_initializer.value",
    ),
    (("optimizer", "beta_1"), NAN, "optimizer.beta_1"),
    (("callbacks", "early_stopping", "baseline"), INF, "callbacks.early_stopping.baseline"),
    (("callbacks", "early_stopping", "min_delta"), NAN, "callbacks.early_stopping.min_delta"),
    (
        ("callbacks", "model_checkpoint", "initial_value_threshold"),
        NAN,
        "callbacks.model_checkpoint.initial_value_threshold",
    ),
    (("optimizer", "learning_rate", "t_mul"), NAN, "optimizer.learning_rate.t_mul"),
    (
        ("optimizer", "learning_rate", "initial_learning_rate"),
        INF,
        "optimizer.learning_rate.initial_learning_rate",
    ),
    (("optimizer", "learning_rate"), INF, "optimizer.learning_rate"),
]


@pytest.mark.parametrize("where,value,path", NON_FINITE_CASES, ids=[c[2] for c in NON_FINITE_CASES])
def test_nan_and_infinity_refused_everywhere(where, value, path):
    s = example()
    _set(where, value)(s)
    one_error_at(s, path)


def test_nan_from_json_text_refused():
    text = json.dumps(EXAMPLE).replace('"validation_split": 0.2', '"validation_split": NaN')
    assert "NaN" in text
    one_error_at(json.loads(text), "data.validation_split")


def test_schedule_parameter_errors_name_the_parameter():
    s = example()
    s["optimizer"]["learning_rate"] = {"schedule": "cosine", "initial_learning_rate": 0.01, "decay_steps": 0}
    err = one_error_at(s, "optimizer.learning_rate.decay_steps")
    assert "1" in err["msg"]


def test_negative_number_learning_rate_names_the_field():
    s = example()
    s["optimizer"]["learning_rate"] = -1
    one_error_at(s, "optimizer.learning_rate")


def test_regression_loss_on_classification_dataset():
    err = one_error_at(example(loss="mse"), "loss")
    assert "classification" in err["msg"] and "sparse_categorical_crossentropy" in err["msg"]


def test_binary_ce_on_ten_classes():
    err = one_error_at(example(loss="binary_crossentropy"), "loss")
    assert "2" in err["msg"] and "10" in err["msg"]


def test_classification_loss_on_regression_dataset():
    s = example(loss="sparse_categorical_crossentropy")
    s["data"] = {"dataset": "diabetes", "validation_split": 0.2}
    s["metrics"] = []
    s["model"]["layers"][2]["units"] = 1
    err = one_error_at(s, "loss")
    assert "mse" in err["msg"]


def test_several_errors_reported_at_once():
    s = example()
    s["data"]["batchsize"] = 32
    s["model"]["layers"][0]["units"] = 0
    s["optimizer"]["beta_1"] = 1.5
    got = set(paths(errors_of(s)))
    assert {"data.batchsize", "model.layers[0].units", "optimizer.beta_1"} <= got

    s = example()  # semantic errors together as well
    s["data"]["validation_split"] = 0
    s["model"]["layers"][2]["units"] = 7
    s["metrics"] = ["accuracy", "mae"]
    got = set(paths(errors_of(s)))
    assert {
        "model.layers[2]",
        "callbacks.early_stopping.monitor",
        "callbacks.model_checkpoint.monitor",
        "metrics[1]",
    } <= got


def test_spec_error_message_names_paths():
    s = example()
    s["model"]["layers"][2]["units"] = 7
    with pytest.raises(SpecError) as e:
        validate_spec(s)
    assert "model.layers[2]" in str(e.value)


# --------------------------------------------------------------------------- no torch


def test_import_and_validate_do_not_import_torch():
    code = (
        "import json, sys\n"
        "import training\n"
        "from training import validate_spec, preview_schedule, json_schema\n"
        f"spec = json.loads({json.dumps(json.dumps(EXAMPLE))})\n"
        "validate_spec(spec)\n"
        "json_schema()\n"
        "preview_schedule(spec['optimizer']['learning_rate'], 10)\n"
        "try:\n"
        "    validate_spec(dict(spec, loss='mse'))\n"
        "except training.SpecError:\n"
        "    pass\n"
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------- JSON Schema


def test_json_schema_is_valid_and_accepts_the_example():
    schema = json_schema()
    json.dumps(schema)  # plain JSON
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    assert not list(validator.iter_errors(EXAMPLE))
    bad = example()
    bad["data"]["batchsize"] = 3
    assert list(validator.iter_errors(bad)), "the schema should forbid unknown fields too"


@pytest.mark.parametrize(
    "path, value",
    [(("epochs",), True), (("seed",), "5"), (("data", "batch_size"), 64.5), (("optimizer", "learning_rate"), True),
     (("data", "shuffle"), "yes")],
)
def test_json_types_are_strict(path, value):
    """No silent coercion: true is not 1, "5" is not 5."""
    spec = copy.deepcopy(EXAMPLE)
    target = spec
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(SpecError) as info:
        validate_spec(spec)
    assert any(e["path"] == ".".join(path) for e in info.value.errors), info.value.errors


def test_integers_are_accepted_for_float_fields():
    spec = copy.deepcopy(EXAMPLE)
    spec["optimizer"]["learning_rate"] = 1
    spec["data"]["validation_split"] = 0
    spec["callbacks"]["early_stopping"]["monitor"] = "loss"
    spec["callbacks"]["model_checkpoint"]["monitor"] = "loss"
    job = validate_spec(spec)
    assert job.optimizer.learning_rate == 1.0 and isinstance(job.optimizer.learning_rate, float)


# --------------------------------------------------------------------------- Keras habits


def _image_spec(layers: list[dict]) -> dict:
    return {"data": {"dataset": "digits"}, "loss": "sparse_categorical_crossentropy", "model": {"layers": layers}}


def test_keras_layer_class_names_are_aliases_of_the_layer_types():
    from training.spec import LAYER_ALIASES, LAYER_TYPES, canonical_layer_type

    assert set(LAYER_ALIASES.values()) == set(LAYER_TYPES)  # every type has its Keras name
    spec = validate_spec(_image_spec([
        {"type": "Reshape", "target_shape": [1, 8, 8]}, {"type": "Conv2D", "filters": 2, "kernel_size": 3},
        {"type": "max_pooling2d"}, {"type": "BatchNormalization"}, {"type": "Activation", "activation": "relu"},
        {"type": "Flatten"}, {"type": "Dropout", "rate": 0.1}, {"type": "LayerNormalization"},
        {"type": "Dense", "units": 10}]))
    assert [layer.type for layer in spec.model.layers] == [
        "reshape", "conv2d", "max_pool2d", "batch_norm", "activation", "flatten", "dropout", "layer_norm", "dense"]
    assert canonical_layer_type("AveragePooling2D") == "avg_pool2d" and canonical_layer_type("Conv3D") == "Conv3D"
    with pytest.raises(SpecError) as exc:
        validate_spec(_image_spec([{"type": "Conv3D"}]))
    assert exc.value.errors[0]["path"] == "model.layers[0].type"


@pytest.mark.parametrize("shape, between, refused", [
    ([8, 8, 1], [], True),
    ([8, 8, 1], [{"type": "dropout", "rate": 0.1}], True),  # elementwise layers in between do not hide it
    ([1, 8, 8], [], False),
    ([4, 16, 1], [], True),
    ([8, 8, 1], [{"type": "flatten"}], False),  # not feeding a convolution
])
def test_a_channels_last_reshape_feeding_a_conv_is_refused_with_the_fix(shape, between, refused):
    layers = [{"type": "reshape", "target_shape": shape}, *between,
              {"type": "conv2d", "filters": 2, "kernel_size": 1}, {"type": "flatten"}, {"type": "dense", "units": 10}]
    if between and between[0]["type"] == "flatten":
        layers = [{"type": "reshape", "target_shape": shape}, {"type": "flatten"}, {"type": "dense", "units": 10}]
    if not refused:
        validate_spec(_image_spec(layers))
        return
    with pytest.raises(SpecError) as exc:
        validate_spec(_image_spec(layers))
    assert [e["path"] for e in exc.value.errors] == ["model.layers[0].target_shape"]
    fixed = [shape[2], shape[0], shape[1]]
    assert "channels-last" in exc.value.errors[0]["msg"] and f"use {fixed}" in exc.value.errors[0]["msg"]
