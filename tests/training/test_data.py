"""Tests of training/data.py: the dataset layer (real data, no mocks)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from training.data import (
    BUILTIN_DATASETS,
    DataError,
    DatasetInfo,
    check_options,
    describe,
    info_from_arrays,
    load,
    read_array_file,
    resolve_options,
)

REPO = Path(__file__).resolve().parents[2]


def spec(**overrides: object) -> SimpleNamespace:
    """A duck-typed stand-in for the job spec's ``data`` object, with the spec's defaults."""
    base: dict[str, object] = {
        "dataset": "iris",
        "path": None,
        "target": None,
        "layout": "flat",
        "n_samples": None,
        "noise": None,
        "n_features": None,
        "n_classes": None,
        "data_seed": None,
        "validation_split": 0.2,
        "batch_size": 32,
        "shuffle": True,
        "standardize": False,
    }
    base.update(overrides)
    return SimpleNamespace(**base)


# name, layout, n, input_shape, task, n_classes / n_targets
EXPECTED = [
    ("digits", "flat", 1797, (64,), "classification", 10),
    ("digits", "image", 1797, (1, 8, 8), "classification", 10),
    ("iris", "flat", 150, (4,), "classification", 3),
    ("wine", "flat", 178, (13,), "classification", 3),
    ("breast_cancer", "flat", 569, (30,), "classification", 2),
    ("diabetes", "flat", 442, (10,), "regression", 1),
    ("moons", "flat", 1000, (2,), "classification", 2),
    ("circles", "flat", 1000, (2,), "classification", 2),
    ("blobs", "flat", 1000, (2,), "classification", 3),
    ("spirals", "flat", 1000, (2,), "classification", 2),
    ("classification", "flat", 1000, (20,), "classification", 2),
    ("regression", "flat", 1000, (10,), "regression", 1),
]


def check_split_arrays(s, n: int, input_shape: tuple[int, ...], task: str, k: int) -> None:
    assert len(s.x_train) + len(s.x_val) == n
    assert s.x_train.shape[1:] == input_shape and s.x_val.shape[1:] == input_shape
    for a in (s.x_train, s.x_val):
        assert a.dtype == np.float32 and a.flags.c_contiguous and a.flags.writeable
        assert np.isfinite(a).all()
    if task == "classification":
        for a in (s.y_train, s.y_val):
            assert a.dtype == np.int64 and a.ndim == 1
        y = np.concatenate([s.y_train, s.y_val])
        assert set(np.unique(y).tolist()) == set(range(k))  # every class present, labels 0..K-1
    else:
        for a in (s.y_train, s.y_val):
            assert a.dtype == np.float32 and a.ndim == 2 and a.shape[1] == k
    assert len(s.y_train) == len(s.x_train) and len(s.y_val) == len(s.x_val)


def test_catalog_covers_expected_datasets():
    assert {e[0] for e in EXPECTED} == set(BUILTIN_DATASETS)
    for name, ds in BUILTIN_DATASETS.items():
        assert ds.name == name and ds.description
        assert ds.to_dict()["options"] == ds.options
        if ds.synthetic:
            assert "n_samples" in ds.options and ds.options["data_seed"] is None
        else:
            assert ds.n_samples is not None and "noise" not in ds.options
    assert BUILTIN_DATASETS["digits"].options == {"layout": "flat"}
    assert BUILTIN_DATASETS["iris"].options == {}


@pytest.mark.parametrize(("name", "layout", "n", "shape", "task", "k"), EXPECTED)
def test_builtin_shapes_dtypes_classes(name, layout, n, shape, task, k):
    s = load(spec(dataset=name, layout=layout), seed=0)
    check_split_arrays(s, n, shape, task, k)
    assert len(s.x_val) == round(n * 0.2)
    assert s.info == DatasetInfo(
        name, task, shape, k if task == "classification" else None, k if task == "regression" else None, n
    )


def test_describe_agrees_with_load_for_every_builtin():
    checked = 0
    for name, ds in BUILTIN_DATASETS.items():
        layouts = ["flat", "image"] if "layout" in ds.options else ["flat"]
        for layout in layouts:
            d = spec(dataset=name, layout=layout, validation_split=0.1)
            info = describe(d, seed=3)
            s = load(d, seed=3)
            assert info == s.info, name
            assert s.x_train.shape[1:] == info.input_shape
            assert len(s.x_train) + len(s.x_val) == info.n_samples
            assert info.n_outputs == (info.n_classes or info.n_targets)
            if info.task == "classification":
                assert int(max(s.y_train.max(), s.y_val.max())) == info.n_classes - 1
            else:
                assert s.y_train.shape[1] == info.n_targets
            checked += 1
    assert checked == len(BUILTIN_DATASETS) + 1


def test_digits_image_is_flat_reshaped():
    flat = load(spec(dataset="digits"), seed=1)
    image = load(spec(dataset="digits", layout="image"), seed=1)
    assert image.x_train.shape == (len(flat.x_train), 1, 8, 8)
    np.testing.assert_array_equal(image.x_train.reshape(len(image.x_train), -1), flat.x_train)
    np.testing.assert_array_equal(image.y_val, flat.y_val)


def test_synthetic_options_are_honoured():
    s = load(spec(dataset="blobs", n_samples=123, n_features=5, n_classes=4, noise=0.5), seed=0)
    check_split_arrays(s, 123, (5,), "classification", 4)

    s = load(spec(dataset="spirals", n_samples=301, n_classes=3, noise=0.0, validation_split=0.0), seed=0)
    counts = np.bincount(s.y_train)
    assert counts.tolist() == [101, 100, 100]
    r = np.linalg.norm(s.x_train, axis=1)
    assert r.max() < 1.0  # noiseless spirals lie within the unit disc

    s = load(spec(dataset="classification", n_samples=200, n_features=3, n_classes=5, noise=0.0), seed=0)
    check_split_arrays(s, 200, (3,), "classification", 5)

    s = load(spec(dataset="regression", n_samples=50, n_features=3, noise=0.0), seed=0)
    check_split_arrays(s, 50, (3,), "regression", 1)

    s = load(spec(dataset="moons", n_samples=10, validation_split=0.0), seed=0)
    assert s.x_train.shape == (10, 2)


def test_moons_noise_zero_matches_sklearn():
    from sklearn.datasets import make_moons

    s = load(spec(dataset="moons", n_samples=100, noise=0.0, validation_split=0.0), seed=7)
    x, y = make_moons(n_samples=100, noise=0.0, random_state=7)
    perm = np.random.default_rng(7).permutation(100)
    np.testing.assert_allclose(s.x_train, x[perm].astype(np.float32))
    np.testing.assert_array_equal(s.y_train, y[perm])


def _sorted_rows(a: np.ndarray) -> np.ndarray:
    return a[np.lexsort(a.T[::-1])]


def test_data_seed_fixes_the_data_independently_of_the_job_seed():
    base = {"dataset": "moons", "n_samples": 200, "validation_split": 0.0}
    a = load(spec(**base, data_seed=5), seed=1)
    b = load(spec(**base, data_seed=5), seed=2)
    c = load(spec(**base, data_seed=6), seed=1)
    np.testing.assert_array_equal(_sorted_rows(a.x_train), _sorted_rows(b.x_train))  # same data...
    assert not np.array_equal(a.x_train, b.x_train)  # ...split/shuffled differently
    assert not np.array_equal(_sorted_rows(a.x_train), _sorted_rows(c.x_train))
    # data_seed unset -> the job seed drives the generator
    assert resolve_options(spec(dataset="moons"), seed=9)["data_seed"] == 9
    d = load(spec(**base), seed=5)
    np.testing.assert_array_equal(_sorted_rows(d.x_train), _sorted_rows(a.x_train))


def test_split_determinism():
    d = spec(dataset="wine", validation_split=0.3)
    a, b, c = load(d, seed=11), load(d, seed=11), load(d, seed=12)
    for attr in ("x_train", "y_train", "x_val", "y_val"):
        np.testing.assert_array_equal(getattr(a, attr), getattr(b, attr))
    assert not np.array_equal(a.x_val, c.x_val)


def test_split_is_disjoint_covering_and_follows_the_documented_permutation(tmp_path):
    n = 100
    ids = np.arange(n, dtype=np.float32)
    p = tmp_path / "ids.npz"
    np.savez(p, x=np.stack([ids, ids * 2], axis=1), y=(np.arange(n) % 2).astype(np.int64))
    s = load(spec(dataset="ds_ids", path=str(p), validation_split=0.25), seed=42)
    val_ids, train_ids = s.x_val[:, 0].astype(int), s.x_train[:, 0].astype(int)
    assert len(val_ids) == 25 and len(train_ids) == 75
    assert set(val_ids).isdisjoint(train_ids)
    assert sorted([*val_ids, *train_ids]) == list(range(n))
    perm = np.random.default_rng(42).permutation(n)
    np.testing.assert_array_equal(val_ids, perm[:25])
    np.testing.assert_array_equal(train_ids, perm[25:])
    np.testing.assert_array_equal(s.y_train, train_ids % 2)  # rows stay aligned with labels


def test_zero_validation_split_gives_empty_validation():
    s = load(spec(dataset="digits", layout="image", validation_split=0.0), seed=0)
    assert s.x_val.shape == (0, 1, 8, 8) and s.y_val.shape == (0,)
    assert len(s.x_train) == 1797


def test_standardize_uses_training_statistics_only():
    raw = load(spec(dataset="digits", validation_split=0.2), seed=4)
    std = load(spec(dataset="digits", validation_split=0.2, standardize=True), seed=4)
    t = raw.x_train.astype(np.float64)
    mean, sd = t.mean(axis=0), t.std(axis=0)
    constant = sd == 0
    assert constant.any()  # digits has always-blank pixels: the std-0 -> 1 rule is exercised
    sd_safe = np.where(constant, 1.0, sd)
    np.testing.assert_allclose(std.x_train, (t - mean) / sd_safe, atol=1e-5)
    np.testing.assert_allclose(std.x_val, (raw.x_val - mean) / sd_safe, atol=1e-5)
    assert np.abs(std.x_train.mean(axis=0)).max() < 1e-5
    np.testing.assert_allclose(std.x_train[:, ~constant].std(axis=0), 1.0, atol=1e-4)
    assert (std.x_train[:, constant] == 0).all()
    assert np.abs(std.x_val.mean(axis=0)).max() > 1e-3  # val is not standardized by its own stats
    np.testing.assert_array_equal(std.y_val, raw.y_val)

    image = load(spec(dataset="digits", layout="image", validation_split=0.2, standardize=True), seed=4)
    np.testing.assert_array_equal(image.x_val.reshape(len(image.x_val), -1), std.x_val)


def test_npz_round_trip_classification_and_multitarget_regression(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 2, 3))
    y = rng.integers(0, 4, size=40)
    y[:4] = [0, 1, 2, 3]
    p = tmp_path / "cls.npz"
    np.savez(p, x=x, y=y)
    rx, ry = read_array_file(str(p))
    assert rx.dtype == np.float32 and rx.shape == (40, 2, 3)
    np.testing.assert_array_equal(ry, y)
    s = load(spec(dataset="ds_cls", path=str(p), validation_split=0.0), seed=0)
    assert s.info == DatasetInfo("ds_cls", "classification", (2, 3), 4, None, 40)
    perm = np.random.default_rng(0).permutation(40)
    np.testing.assert_allclose(s.x_train, x[perm].astype(np.float32))
    np.testing.assert_array_equal(s.y_train, y[perm])
    assert describe(spec(dataset="ds_cls", path=str(p)), seed=0) == s.info

    yr = rng.normal(size=(40, 2))
    p2 = tmp_path / "reg.npz"
    np.savez(p2, x=x[:, 0, :], y=yr)
    s = load(spec(dataset="ds_reg", path=str(p2), validation_split=0.5), seed=1)
    assert s.info == DatasetInfo("ds_reg", "regression", (3,), None, 2, 40)
    assert s.y_train.dtype == np.float32 and s.y_train.shape == (20, 2)


def test_csv_round_trip_target_by_name_index_and_default(tmp_path):
    rng = np.random.default_rng(1)
    feats = np.round(rng.normal(size=(30, 3)), 4)
    label = np.arange(30) % 3
    price = np.arange(30) * 10.0 + 100.0  # integer-valued but not 0..K-1 -> regression
    p = tmp_path / "table.csv"
    lines = ["f0,label,f1,f2,price"]
    lines += [f"{a},{c},{b},{d},{e}" for (a, b, d), c, e in zip(feats, label, price, strict=True)]
    p.write_text("\n".join(lines) + "\n")

    x, y = read_array_file(str(p), "label")
    np.testing.assert_allclose(x, np.column_stack([feats, price]).astype(np.float32))
    np.testing.assert_array_equal(y, label)
    x_i, y_i = read_array_file(str(p), 1)
    np.testing.assert_array_equal(x_i, x)
    np.testing.assert_array_equal(y_i, y)
    assert info_from_arrays("t", x, y) == DatasetInfo("t", "classification", (4,), 3, None, 30)

    x_d, y_d = read_array_file(str(p))  # default: last column
    np.testing.assert_array_equal(y_d, price)
    assert x_d.shape == (30, 4)
    s = load(spec(dataset="ds_csv", path=str(p), validation_split=0.2), seed=0)
    assert s.info.task == "regression" and s.info.n_targets == 1
    assert s.y_train.shape == (24, 1) and s.y_train.dtype == np.float32

    s = load(spec(dataset="ds_csv", path=str(p), target="label"), seed=0)
    assert s.info.task == "classification" and s.y_train.dtype == np.int64


def test_info_from_arrays_task_inference():
    x = np.zeros((6, 2), dtype=np.float32)
    assert info_from_arrays("a", x, np.array([0, 1, 2, 0, 1, 2])).n_classes == 3
    assert info_from_arrays("a", x, np.array([0, 1, 0, 1, 1, 0], dtype=bool)).n_classes == 2
    assert info_from_arrays("a", x, np.array([0.0, 1, 0, 1, 1, 0])).task == "classification"
    assert info_from_arrays("a", x, np.array([0.5, 1, 0, 1, 1, 0])).task == "regression"
    assert info_from_arrays("a", x, np.array([1.0, 2, 3, 1, 2, 3])).task == "regression"
    assert info_from_arrays("a", x, np.ones((6, 3))).n_targets == 3
    with pytest.raises(DataError, match=r"0\.\.K-1"):
        info_from_arrays("a", x, np.array([1, 2, 3, 1, 2, 3]))
    with pytest.raises(DataError, match="every class present"):
        info_from_arrays("a", x, np.array([0, 2, 0, 2, 0, 2]))


def _write(tmp_path: Path, name: str, content: str) -> str:
    p = tmp_path / name
    p.write_text(content)
    return str(p)


def _npz(tmp_path: Path, name: str, **arrays: np.ndarray) -> str:
    p = tmp_path / name
    np.savez(p, **arrays)
    return str(p)


def test_file_error_cases(tmp_path):
    x = np.zeros((10, 2))
    y = np.arange(10) % 2
    cases = [
        (str(tmp_path / "missing.npz"), None, "path", "does not exist"),
        (_write(tmp_path, "data.txt", "a,b\n1,2\n"), None, "path", "allowed: .npz, .csv"),
        (_write(tmp_path, "fake.npz", "hello"), None, "path", "not an .npz archive"),
        (_npz(tmp_path, "nox.npz", y=y), None, "path", "no array 'x'"),
        (_npz(tmp_path, "noy.npz", x=x, z=y), None, "path", "found: x, z"),
        (_npz(tmp_path, "len.npz", x=x, y=y[:9]), None, "path", "10 rows but 'y' has 9"),
        (_npz(tmp_path, "obj.npz", x=np.array([None] * 10, dtype=object), y=y), None, "path", "numeric"),
        (_npz(tmp_path, "str.npz", x=np.array(["a"] * 10), y=y), None, "path", "only numeric"),
        (
            _npz(tmp_path, "nanx.npz", x=np.where(np.eye(10, 2) > 0, np.nan, 0.0), y=y),
            None,
            "path",
            "NaN or infinite",
        ),
        (_npz(tmp_path, "infy.npz", x=x, y=np.array([np.inf] + [0.0] * 9)), None, "path", "NaN or infinite"),
        (_npz(tmp_path, "t.npz", x=x, y=y), "y", "target", "only to CSV"),
        (_write(tmp_path, "t.csv", "a,b,c\n1,2,0\n3,4,1\n"), "zzz", "target", "columns are: a, b, c"),
        (_write(tmp_path, "i.csv", "a,b,c\n1,2,0\n3,4,1\n"), 5, "target", "columns 0..2"),
        (
            _write(tmp_path, "nn.csv", "a,b,c\n1,2,0\n3,oops,1\n"),
            None,
            "path",
            "line 3, column 'b': 'oops' is not a number",
        ),
        (_write(tmp_path, "empty.csv", "a,b,c\n1,,0\n"), None, "path", "is not a number"),
        (_write(tmp_path, "ragged.csv", "a,b,c\n1,2\n"), None, "path", "2 cells but the header has 3"),
        (_write(tmp_path, "nan.csv", "a,b,c\n1,nan,0\n3,4,1\n"), None, "path", "NaN or infinite"),
        (_write(tmp_path, "hdr.csv", "a,b,c\n"), None, "path", "no data rows"),
    ]
    for path, target, field, msg in cases:
        with pytest.raises(DataError) as e:
            read_array_file(path, target)
        assert e.value.field == field, (path, e.value)
        assert msg in str(e.value), (path, str(e.value))
        # load goes through the same checks
        with pytest.raises(DataError):
            load(spec(dataset="ds", path=path, target=target), seed=0)


def test_label_and_split_error_cases(tmp_path):
    p = _npz(tmp_path, "labels.npz", x=np.zeros((6, 2)), y=np.array([1, 2, 3, 1, 2, 3]))
    with pytest.raises(DataError, match=r"0\.\.K-1.*found 3 distinct label\(s\): 1, 2, 3"):
        load(spec(dataset="ds", path=p), seed=0)

    p = _npz(tmp_path, "small.npz", x=np.zeros((4, 2)), y=np.array([0, 1, 0, 1]))
    with pytest.raises(DataError, match="leaves 1 of 4 samples for training; at least 2") as e:
        load(spec(dataset="ds", path=p, validation_split=0.7), seed=0)
    assert e.value.field == "validation_split"
    assert len(load(spec(dataset="ds", path=p, validation_split=0.5), seed=0).x_train) == 2

    with pytest.raises(DataError, match="at least 2") as e:
        describe(spec(dataset="moons", n_samples=3, validation_split=0.5), seed=0)
    assert e.value.field == "validation_split"


def test_check_options_reports_irrelevant_and_invalid_options():
    assert check_options(spec(dataset="iris")) == []
    assert check_options(spec(dataset="digits", layout="image")) == []
    assert (
        check_options(spec(dataset="blobs", n_samples=50, n_features=3, n_classes=5, noise=2.0, data_seed=1))
        == []
    )

    problems = check_options(spec(dataset="iris", noise=0.3))
    assert [f for f, _ in problems] == ["noise"]
    assert "'iris' accepts no options" in problems[0][1]

    problems = check_options(spec(dataset="moons", layout="image", n_classes=3))
    assert {f for f, _ in problems} == {"layout", "n_classes"}
    msg = dict(problems)["n_classes"]
    assert "n_samples, noise, data_seed" in msg  # names the allowed options

    assert check_options(spec(dataset="mnist"))[0][0] == "dataset"
    assert "moons" in check_options(spec(dataset="mnist"))[0][1]
    assert check_options(spec(dataset="iris", target="species"))[0][0] == "target"
    assert check_options(spec(dataset="blobs", noise=-1.0))[0][0] == "noise"
    assert check_options(spec(dataset="classification", noise=1.5))[0][0] == "noise"
    assert check_options(spec(dataset="blobs", n_classes=1))[0][0] == "n_classes"
    assert check_options(spec(dataset="blobs", n_samples=2, n_classes=3))[0][0] == "n_samples"
    assert check_options(spec(dataset="regression", n_samples=10**7))[0][0] == "n_samples"
    assert check_options(spec(dataset="moons", n_samples=2.5))[0][0] == "n_samples"
    assert check_options(spec(dataset="iris", validation_split=1.0))[0][0] == "validation_split"
    problems = check_options(spec(dataset="classification", n_features=2, n_classes=8))
    assert problems[0][0] == "n_classes" and "at most 2**n_features = 4" in problems[0][1]
    assert check_options(spec(dataset="classification", n_features=2, n_classes=4)) == []

    # file datasets: no I/O, but extension / option / layout checks
    assert check_options(spec(dataset="ds", path="/nonexistent/file.csv", target="y")) == []
    assert {f for f, _ in check_options(spec(dataset="ds", path="x.npz", noise=0.1, layout="image"))} == {
        "noise",
        "layout",
    }
    assert check_options(spec(dataset="ds", path="x.parquet"))[0][0] == "path"
    assert check_options(spec(dataset="ds", path="x.npz", target=0))[0][0] == "target"

    with pytest.raises(DataError) as e:
        describe(spec(dataset="iris", noise=0.3), seed=0)
    assert e.value.field == "noise" and "accepts no options" in str(e.value)
    with pytest.raises(DataError):
        load(spec(dataset="wine", layout="image"), seed=0)


def test_cached_arrays_cannot_be_corrupted_by_callers():
    d = spec(dataset="circles", n_samples=200)
    a = load(d, seed=0)
    snapshot = a.x_train.copy()
    a.x_train[:] = 123.0
    a.y_train[:] = 1
    b = load(d, seed=0)
    np.testing.assert_array_equal(b.x_train, snapshot)
    assert set(np.unique(b.y_train).tolist()) == {0, 1}


def test_import_is_cheap_and_does_not_import_torch_or_sklearn():
    code = (
        "import sys, training.data as d; "
        "assert d.describe is not None; "
        "bad = sorted(m for m in ('torch', 'sklearn') if m in sys.modules); "
        "print('loaded:', bad)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "loaded: []"


def test_corrupt_npz_with_zip_magic_is_a_data_error(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"PK\x03\x04" + b"garbage" * 100)
    with pytest.raises(DataError) as info:
        read_array_file(str(bad))
    assert "npz" in str(info.value)
