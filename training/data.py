"""Dataset layer of the Trainyard engine.

This module turns the ``data`` object of a job spec into numpy arrays, split into a
training and a validation part.  It has two halves:

* **Metadata** (:data:`BUILTIN_DATASETS`, :func:`check_options`, :func:`describe`): what each
  built-in dataset is and which options it accepts.  The API server uses these to validate a
  job spec without loading any data; importing this module is cheap (numpy and the standard
  library only; scikit-learn is imported lazily inside the functions that need it, torch never).
* **Loading** (:func:`read_array_file`, :func:`info_from_arrays`, :func:`load`): reading files,
  generating synthetic data, splitting and standardizing.

The ``data`` object is duck-typed: the functions read the attributes ``dataset``, ``path``,
``target``, ``layout``, ``n_samples``, ``noise``, ``n_features``, ``n_classes``, ``data_seed``,
``validation_split`` and ``standardize`` (a missing attribute counts as its default).
``DataError.field`` and the fields of :func:`check_options` name those attributes (without the
``data.`` prefix).

Conventions of :func:`load`:

* ``x`` is float32 and C-contiguous, shaped ``(n, *input_shape)``.
* Classification ``y`` is int64 of shape ``(n,)`` with labels ``0..n_classes-1``; regression
  ``y`` is float32 of shape ``(n, n_targets)``.  Targets are never standardized.
* The validation split is a seeded random permutation: ``perm =
  np.random.default_rng(seed).permutation(n)``, ``n_val = int(round(n * validation_split))``;
  the validation rows are ``perm[:n_val]`` and the training rows ``perm[n_val:]``, each in
  permutation order.  (Keras takes the tail of the data instead; we shuffle because the bundled
  datasets are sorted by class.)  The job seed, not ``data_seed``, drives the split.
* ``standardize`` subtracts the per-feature mean and divides by the per-feature standard
  deviation (ddof=0) of the *training* rows only, and applies the same transform to the
  validation rows.  Constant features get scale 1 (as scikit-learn's ``StandardScaler``).  For
  the digits image layout the statistics are per pixel.
* Synthetic generators are seeded with ``data_seed`` when given, else with the job seed.
"""

from __future__ import annotations

import csv
import math
import numbers
import os
import threading
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

__all__ = [
    "BUILTIN_DATASETS",
    "BuiltinDataset",
    "DataError",
    "DatasetInfo",
    "FILE_EXTENSIONS",
    "LAYOUTS",
    "OPTION_FIELDS",
    "Split",
    "check_options",
    "clear_cache",
    "describe",
    "info_from_arrays",
    "load",
    "read_array_file",
    "resolve_options",
    "standardize",
]

Task = Literal["classification", "regression"]

#: Attributes of ``data`` that are per-dataset options (besides ``layout``).
OPTION_FIELDS: tuple[str, ...] = ("n_samples", "noise", "n_features", "n_classes", "data_seed")
#: Allowed values of ``data.layout``; ``"image"`` is accepted by ``digits`` only.
LAYOUTS: tuple[str, ...] = ("flat", "image")
#: File types ``data.path`` may point to.
FILE_EXTENSIONS: tuple[str, ...] = (".npz", ".csv")

# Size limits for synthetic datasets, so a job spec can't make a worker allocate unbounded memory.
MAX_SAMPLES = 1_000_000
MAX_FEATURES = 10_000
MAX_ELEMENTS = 50_000_000  # n_samples * n_features
MAX_CLASSES = 1_000
# Float-valued targets are read as class labels only if they are exactly 0..K-1 with K <= this.
MAX_FLOAT_LABEL_CLASSES = 1_000


class DataError(ValueError):
    """A problem with a job's ``data`` settings or data file, phrased so a person can act on it.

    ``field`` is the attribute of the spec's ``data`` object at fault (``"path"``, ``"noise"``,
    ...), or ``None`` when no single attribute is to blame.
    """

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


@dataclass(frozen=True)
class DatasetInfo:
    """Shape and task of a dataset, as the engine needs it to build a model.

    ``n_samples`` is the number of rows before the train/validation split.
    """

    name: str
    task: Task
    input_shape: tuple[int, ...]  # per-sample shape, e.g. (64,) or (1, 8, 8)
    n_classes: int | None  # classification only
    n_targets: int | None  # regression only (1 for a 1-d y)
    n_samples: int

    @property
    def n_inputs(self) -> int:
        """Number of input values per sample (the product of ``input_shape``)."""
        return math.prod(self.input_shape)

    @property
    def n_outputs(self) -> int:
        """Width of the model's output layer: ``n_classes`` or ``n_targets``."""
        return int(self.n_classes if self.task == "classification" else self.n_targets)  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (``input_shape`` as a list)."""
        return {
            "name": self.name,
            "task": self.task,
            "input_shape": list(self.input_shape),
            "n_classes": self.n_classes,
            "n_targets": self.n_targets,
            "n_samples": self.n_samples,
        }


@dataclass(frozen=True)
class BuiltinDataset:
    """Catalog record of a built-in dataset.

    ``options`` maps each option the dataset accepts to its default (``data_seed``'s default
    ``None`` means "the job seed"; ``layout``'s default is ``"flat"``).  The ``n_*`` fields are
    the dataset's fixed sizes; ``None`` where an option sets the size instead.
    """

    name: str
    task: Task
    description: str
    options: dict[str, object] = field(default_factory=dict)
    synthetic: bool = False
    n_samples: int | None = None
    n_features: int | None = None
    n_classes: int | None = None
    n_targets: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict for the API's dataset catalog."""
        return {
            "name": self.name,
            "task": self.task,
            "description": self.description,
            "options": dict(self.options),
            "synthetic": self.synthetic,
            "n_samples": self.n_samples,
            "n_features": self.n_features,
            "n_classes": self.n_classes,
            "n_targets": self.n_targets,
        }


def _bundled(
    name: str, task: Task, description: str, n: int, f: int, k: int | None, **extra: object
) -> BuiltinDataset:
    return BuiltinDataset(
        name=name,
        task=task,
        description=description,
        options=dict(extra),
        synthetic=False,
        n_samples=n,
        n_features=f,
        n_classes=k if task == "classification" else None,
        n_targets=None if task == "classification" else 1,
    )


BUILTIN_DATASETS: dict[str, BuiltinDataset] = {
    d.name: d
    for d in [
        _bundled(
            "digits",
            "classification",
            "8x8 grey-scale handwritten digits 0-9 (scikit-learn bundled). layout='flat' gives 64 "
            "features, layout='image' gives shape (1, 8, 8).",
            1797,
            64,
            10,
            layout="flat",
        ),
        _bundled(
            "iris",
            "classification",
            "Iris flowers: 4 measurements, 3 species (scikit-learn bundled).",
            150,
            4,
            3,
        ),
        _bundled(
            "wine",
            "classification",
            "Wine recognition: 13 chemical features, 3 cultivars (scikit-learn bundled).",
            178,
            13,
            3,
        ),
        _bundled(
            "breast_cancer",
            "classification",
            "Wisconsin breast cancer: 30 features, malignant/benign (scikit-learn bundled).",
            569,
            30,
            2,
        ),
        _bundled(
            "diabetes",
            "regression",
            "Diabetes progression: 10 (pre-scaled) features, 1 target (scikit-learn bundled).",
            442,
            10,
            None,
        ),
        BuiltinDataset(
            "moons",
            "classification",
            "Two interleaving half circles (sklearn make_moons); noise is the Gaussian noise std.",
            {"n_samples": 1000, "noise": 0.1, "data_seed": None},
            synthetic=True,
            n_features=2,
            n_classes=2,
        ),
        BuiltinDataset(
            "circles",
            "classification",
            "A small circle inside a large one (sklearn make_circles, factor 0.5); noise is the "
            "Gaussian noise std.",
            {"n_samples": 1000, "noise": 0.05, "data_seed": None},
            synthetic=True,
            n_features=2,
            n_classes=2,
        ),
        BuiltinDataset(
            "blobs",
            "classification",
            "Isotropic Gaussian blobs (sklearn make_blobs); n_classes is the number of centers, "
            "noise the cluster std.",
            {"n_samples": 1000, "n_features": 2, "n_classes": 3, "noise": 1.0, "data_seed": None},
            synthetic=True,
        ),
        BuiltinDataset(
            "spirals",
            "classification",
            "Interleaved spirals in the plane, one arm per class; noise is the Gaussian noise std "
            "(the spirals have radius 1).",
            {"n_samples": 1000, "n_classes": 2, "noise": 0.1, "data_seed": None},
            synthetic=True,
            n_features=2,
        ),
        BuiltinDataset(
            "classification",
            "classification",
            "Random n-class problem (sklearn make_classification). n_informative = min(n_features, "
            "max(2, ceil(log2(n_classes)) + 1)), n_redundant = min(2, n_features - n_informative), "
            "2 clusters per class when 2*n_classes <= 2**n_informative else 1; so n_classes <= "
            "2**n_features. noise is flip_y, the fraction of randomly relabelled samples.",
            {"n_samples": 1000, "n_features": 20, "n_classes": 2, "noise": 0.01, "data_seed": None},
            synthetic=True,
        ),
        BuiltinDataset(
            "regression",
            "regression",
            "Random linear regression (sklearn make_regression, n_informative = min(10, "
            "n_features)); noise is the std of the Gaussian noise on the target.",
            {"n_samples": 1000, "n_features": 10, "noise": 0.1, "data_seed": None},
            synthetic=True,
            n_targets=1,
        ),
    ]
}


# --------------------------------------------------------------------------- option checking


def _get(data: Any, name: str, default: Any = None) -> Any:
    return getattr(data, name, default)


def _layout(data: Any) -> Any:
    layout = _get(data, "layout", "flat")
    return "flat" if layout is None else layout


def _fmt_list(items: list[str] | tuple[str, ...]) -> str:
    return ", ".join(items) if items else "none"


def _is_int(v: object) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v: object) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(float(v))  # type: ignore[arg-type]


def _accepted(ds: BuiltinDataset) -> list[str]:
    return list(ds.options)


def _classification_informative(n_features: int, n_classes: int) -> tuple[int, int, int]:
    """(n_informative, n_redundant, n_clusters_per_class) for the 'classification' dataset."""
    n_informative = min(n_features, max(2, math.ceil(math.log2(n_classes)) + 1))
    n_clusters = 2 if 2 * n_classes <= 2**n_informative else 1
    n_redundant = min(2, n_features - n_informative)
    return n_informative, n_redundant, n_clusters


def _check_builtin(data: Any, ds: BuiltinDataset) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    accepted = _accepted(ds)
    allowed = (
        f"dataset '{ds.name}' accepts the options: {_fmt_list(accepted)}"
        if accepted
        else f"dataset '{ds.name}' accepts no options"
    )

    layout = _layout(data)
    if layout not in LAYOUTS:
        problems.append(("layout", f"layout must be one of {_fmt_list(LAYOUTS)}, got {layout!r}"))
    elif layout != "flat" and "layout" not in ds.options:
        problems.append(
            ("layout", f"layout={layout!r} is only available for 'digits'; {allowed} (leave layout 'flat')")
        )
    for name in OPTION_FIELDS:
        if _get(data, name) is not None and name not in ds.options:
            problems.append((name, f"option '{name}' does not apply to dataset '{ds.name}'; {allowed}"))
    if _get(data, "target") is not None:
        problems.append(
            (
                "target",
                "target applies only to CSV files given by path; built-in datasets have a fixed target",
            )
        )

    # Value checks of the accepted options.
    opts = {k: (_get(data, k) if _get(data, k) is not None else v) for k, v in ds.options.items()}
    bad: set[str] = set()
    for name in ("n_samples", "n_features", "n_classes", "data_seed"):
        if name in ds.options and opts[name] is not None and not _is_int(opts[name]):
            problems.append((name, f"{name} must be an integer, got {opts[name]!r}"))
            bad.add(name)
    if "noise" in ds.options and not _is_real(opts["noise"]):
        problems.append(("noise", f"noise must be a finite number, got {opts['noise']!r}"))
        bad.add("noise")
    if bad:
        return problems

    n_classes = opts.get("n_classes", ds.n_classes)
    n_features = opts.get("n_features", ds.n_features)
    if "n_classes" in ds.options and not 2 <= n_classes <= MAX_CLASSES:
        problems.append(("n_classes", f"n_classes must be between 2 and {MAX_CLASSES}, got {n_classes}"))
    if "n_features" in ds.options and not 1 <= n_features <= MAX_FEATURES:
        problems.append(("n_features", f"n_features must be between 1 and {MAX_FEATURES}, got {n_features}"))
    if "n_samples" in ds.options:
        n = opts["n_samples"]
        low = max(2, n_classes or 0) if ds.task == "classification" else 2
        if not low <= n <= MAX_SAMPLES:
            what = f" (at least one per class, n_classes={n_classes})" if low > 2 else ""
            problems.append(
                ("n_samples", f"n_samples must be between {low}{what} and {MAX_SAMPLES}, got {n}")
            )
        elif n_features and n * n_features > MAX_ELEMENTS:
            problems.append(
                (
                    "n_samples",
                    f"n_samples * n_features = {n * n_features} exceeds the limit of {MAX_ELEMENTS} values",
                )
            )
    if "noise" in ds.options:
        noise = float(opts["noise"])  # type: ignore[arg-type]
        if ds.name == "classification":
            if not 0.0 <= noise <= 1.0:
                problems.append(
                    ("noise", f"noise (the fraction of flipped labels) must be in [0, 1], got {noise}")
                )
        elif noise < 0:
            problems.append(("noise", f"noise must be >= 0, got {noise}"))
    if ds.name == "classification" and not problems and n_classes > 2**n_features:
        problems.append(
            (
                "n_classes",
                f"dataset 'classification' supports at most 2**n_features = {2**n_features} classes "
                f"with n_features={n_features}; raise n_features or lower n_classes",
            )
        )
    if "data_seed" in ds.options and opts["data_seed"] is not None and opts["data_seed"] < 0:
        problems.append(("data_seed", f"data_seed must be >= 0, got {opts['data_seed']}"))
    return problems


def validation_count(n: int, validation_split: float | None) -> int:
    """How many of ``n`` samples the split holds out for validation."""
    return int(round(n * float(validation_split or 0.0)))


def steps_per_epoch(n: int, validation_split: float | None, batch_size: int) -> int:
    """Optimizer steps in one epoch over ``n`` samples (the batch is capped at the training set)."""
    n_train = n - validation_count(n, validation_split)
    return math.ceil(n_train / max(1, min(batch_size, n_train)))


def _check_split(data: Any, n: int | None) -> list[tuple[str, str]]:
    split = _get(data, "validation_split", 0.0)
    if split is None:
        split = 0.0
    if not _is_real(split) or not 0.0 <= float(split) < 1.0:
        return [("validation_split", f"validation_split must be a number in [0, 1), got {split!r}")]
    if n is not None:
        n_val = validation_count(n, float(split))
        if n - n_val < 2:
            return [
                (
                    "validation_split",
                    f"validation_split={split} leaves {n - n_val} of {n} samples for training; at least 2 are "
                    f"needed (use a smaller validation_split or more samples)",
                )
            ]
    return []


def check_options(data: Any) -> list[tuple[str, str]]:
    """Problems with ``data``'s dataset name and options, as ``(field, message)`` pairs.

    Returns ``[]`` when everything is fine.  Does no I/O: for a file dataset it checks the
    extension and that no built-in-only option is set, but not that the file exists or parses
    (:func:`describe` does that).  For a built-in dataset it also checks that the validation
    split leaves at least 2 training samples.
    """
    path = _get(data, "path")
    dataset = _get(data, "dataset")
    if path is None:
        if dataset not in BUILTIN_DATASETS:
            return [
                (
                    "dataset",
                    f"unknown dataset {dataset!r}; built-in datasets are: {_fmt_list(sorted(BUILTIN_DATASETS))} "
                    f"(or set path to a .npz/.csv file)",
                )
            ]
        ds = BUILTIN_DATASETS[dataset]
        problems = _check_builtin(data, ds)
        if not problems:
            problems = _check_split(data, _builtin_n_samples(data, ds))
        else:
            problems += _check_split(data, None)
        return problems

    problems = []
    if not isinstance(path, str | os.PathLike) or not str(path):
        return [("path", f"path must be a non-empty file path, got {path!r}")]
    ext = os.path.splitext(str(path))[1].lower()
    if ext not in FILE_EXTENSIONS:
        problems.append(
            (
                "path",
                f"unsupported file type {ext or '(none)'!r} for {path!r}; allowed: {_fmt_list(FILE_EXTENSIONS)}",
            )
        )
    for name in OPTION_FIELDS:
        if _get(data, name) is not None:
            problems.append(
                (
                    name,
                    f"option '{name}' applies only to built-in synthetic datasets, not to a file dataset (path); "
                    f"a file dataset accepts: target (CSV only)",
                )
            )
    layout = _layout(data)
    if layout != "flat":
        problems.append(
            (
                "layout",
                f"layout={layout!r} is only available for the built-in 'digits'; a file dataset "
                f"keeps the shape stored in the file (leave layout 'flat')",
            )
        )
    target = _get(data, "target")
    if target is not None:
        if ext == ".npz":
            problems.append(
                ("target", "target applies only to CSV files; an .npz file must hold arrays 'x' and 'y'")
            )
        elif isinstance(target, bool) or not isinstance(target, str | numbers.Integral):
            problems.append(
                ("target", f"target must be a column name or a 0-based column index, got {target!r}")
            )
    problems += _check_split(data, None)
    return problems


def _raise_problems(problems: list[tuple[str, str]]) -> None:
    if problems:
        raise DataError("; ".join(msg for _, msg in problems), field=problems[0][0])


def resolve_options(data: Any, seed: int) -> dict[str, object]:
    """Effective options of a built-in dataset: its defaults overridden by ``data``'s values.

    ``data_seed`` resolves to the job ``seed`` when unset.  Raises :class:`DataError` if the
    options are invalid or ``data`` names a file dataset.
    """
    if _get(data, "path") is not None:
        raise DataError("a file dataset (path) has no built-in options", field="path")
    _raise_problems(check_options(data))
    ds = BUILTIN_DATASETS[_get(data, "dataset")]
    opts: dict[str, object] = {}
    for k, default in ds.options.items():
        v = _layout(data) if k == "layout" else _get(data, k)
        opts[k] = default if v is None else v
    if "data_seed" in opts and opts["data_seed"] is None:
        opts["data_seed"] = _check_seed(seed)
    return opts


def _builtin_n_samples(data: Any, ds: BuiltinDataset) -> int:
    if ds.n_samples is not None:
        return ds.n_samples
    v = _get(data, "n_samples")
    return int(ds.options["n_samples"] if v is None else v)  # type: ignore[call-overload]


def _check_seed(seed: object) -> int:
    if not _is_int(seed) or seed < 0:  # type: ignore[operator]
        raise DataError(f"the job seed must be a non-negative integer, got {seed!r}", field=None)
    return int(seed)  # type: ignore[call-overload]


def _builtin_info(ds: BuiltinDataset, opts: dict[str, object]) -> DatasetInfo:
    n = ds.n_samples if ds.n_samples is not None else int(opts["n_samples"])  # type: ignore[call-overload]
    f = ds.n_features if ds.n_features is not None else int(opts["n_features"])  # type: ignore[call-overload]
    shape: tuple[int, ...] = (1, 8, 8) if opts.get("layout") == "image" else (f,)
    if ds.task == "classification":
        k = ds.n_classes if ds.n_classes is not None else int(opts["n_classes"])  # type: ignore[call-overload]
        return DatasetInfo(ds.name, "classification", shape, k, None, n)
    return DatasetInfo(ds.name, "regression", shape, None, ds.n_targets or 1, n)


def describe(data: Any, seed: int) -> DatasetInfo:
    """The :class:`DatasetInfo` a :func:`load` of ``data`` with ``seed`` would produce.

    For a built-in dataset this is computed from the metadata and options alone (no data is
    loaded or generated).  For a file dataset (``data.path``) the file is read and validated.
    Raises :class:`DataError` on any problem, including a split that leaves < 2 training rows.
    """
    _check_seed(seed)
    _raise_problems(check_options(data))
    if _get(data, "path") is None:
        ds = BUILTIN_DATASETS[_get(data, "dataset")]
        return _builtin_info(ds, resolve_options(data, seed))
    x, y = read_array_file(_get(data, "path"), _get(data, "target"))
    info = info_from_arrays(str(_get(data, "dataset") or os.path.basename(_get(data, "path"))), x, y)
    _raise_problems(_check_split(data, info.n_samples))
    return info


# --------------------------------------------------------------------------- files


def _check_numeric(a: np.ndarray, what: str, path: str) -> None:
    if a.dtype == np.bool_ or (
        np.issubdtype(a.dtype, np.number) and not np.issubdtype(a.dtype, np.complexfloating)
    ):
        return
    raise DataError(
        f"{what} in {path!r} has dtype {a.dtype}; only numeric (integer, float or bool) arrays are allowed",
        field="path",
    )


def _check_finite(a: np.ndarray, what: str, where: str) -> None:
    if np.issubdtype(a.dtype, np.floating):
        bad = ~np.isfinite(a)
        if bad.any():
            row = int(np.argwhere(bad)[0][0])
            raise DataError(
                f"{what}{where} contains NaN or infinite values ({int(bad.sum())} in all, first in row {row}); "
                f"all values must be finite numbers (drop or impute missing values first)",
                field="path",
            )


def _read_npz(path: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        archive = np.load(path, allow_pickle=False)
    except ValueError as e:  # not a zip archive, or pickled/object data, which we never load
        raise DataError(
            f"{path!r} is not an .npz archive of numeric arrays (not a zip file, or it holds pickled/object "
            f"data, which is never loaded); save it with np.savez(path, x=..., y=...) using numeric arrays",
            field="path",
        ) from e
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"{path!r} could not be read as an .npz archive: {e}", field="path") from e
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(
            f"{path!r} is a single .npy array, not an .npz archive with arrays 'x' and 'y'", field="path"
        )
    with archive:
        keys = sorted(archive.files)
        missing = [k for k in ("x", "y") if k not in keys]
        if missing:
            raise DataError(
                f"{path!r} has no array {' or '.join(repr(m) for m in missing)}; an .npz dataset must hold arrays "
                f"named 'x' (inputs) and 'y' (targets); found: {_fmt_list(keys)}",
                field="path",
            )
        try:
            x, y = archive["x"], archive["y"]
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
            raise DataError(
                f"{path!r}: arrays 'x'/'y' could not be loaded ({e}); only numeric arrays are allowed",
                field="path",
            ) from e
    _check_numeric(x, "array 'x'", path)
    _check_numeric(y, "array 'y'", path)
    return x, y


#: CSV rows are converted to numbers in blocks of about this many cells (bounded Python objects)
_CSV_BLOCK_CELLS = 1 << 16


def _read_csv(path: str, target: str | int | None, max_bytes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Parse a CSV file as a stream: rows become float64 blocks of about ``_CSV_BLOCK_CELLS``
    cells as they are read, so memory is the table itself plus one block (it was ~37x the file as
    Python lists); past ``max_bytes`` (the samples as float32) it stops with a DataError."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = (r for r in csv.reader(f) if r)
            header_row = next(rows, None)
            if header_row is None:
                raise DataError(
                    f"{path!r} is empty; a CSV dataset needs a header row and at least one data row", field="path"
                )
            header = [h.strip() for h in header_row]
            ncol = len(header)
            if ncol < 2:
                raise DataError(
                    f"{path!r} has {ncol} column; a CSV dataset needs at least one feature column and a target column",
                    field="path",
                )
            t = _csv_target(path, header, target)
            blocks: list[np.ndarray] = []
            block: list[list[str]] = []
            n_rows = 0
            for r in rows:
                if len(r) != ncol:
                    raise DataError(
                        f"{path!r} line {n_rows + 2} has {len(r)} cells but the header has {ncol} columns", field="path"
                    )
                block.append(r)
                n_rows += 1
                if max_bytes is not None and 4 * n_rows * ncol > max_bytes:
                    raise DataError(
                        f"{path!r} holds more than {n_rows - 1} rows of {ncol} columns "
                        f"({4 * n_rows * ncol} bytes as float32); this server allows at most {max_bytes}",
                        field="path",
                    )
                if len(block) * ncol >= _CSV_BLOCK_CELLS:
                    blocks.append(_csv_block(path, header, block, n_rows - len(block)))
                    block = []
            if block:
                blocks.append(_csv_block(path, header, block, n_rows - len(block)))
    except UnicodeDecodeError as e:
        raise DataError(f"{path!r} is not a UTF-8 text CSV file ({e})", field="path") from e
    except csv.Error as e:
        raise DataError(f"{path!r} is not a valid CSV file: {e}", field="path") from e
    if not blocks:
        raise DataError(f"{path!r} has a header but no data rows", field="path")
    table = blocks[0] if len(blocks) == 1 else np.concatenate(blocks)
    del blocks
    y = table[:, t].copy()
    x = np.delete(table, t, axis=1)
    return x, y


def _csv_block(path: str, header: list[str], block: list[list[str]], first: int) -> np.ndarray:
    """Rows ``first ..`` of the data as float64, or a DataError naming the first non-number."""
    try:
        return np.array(block, dtype=np.float64)
    except ValueError:
        for i, r in enumerate(block):
            for j, cell in enumerate(r):
                try:
                    float(cell)
                except ValueError:
                    raise DataError(
                        f"{path!r} line {first + i + 2}, column {header[j]!r}: {cell!r} is not a number; CSV datasets "
                        f"must be all-numeric (encode categories as numbers, fill empty cells)",
                        field="path",
                    ) from None
        raise  # pragma: no cover - numpy and float() disagree


def _csv_target(path: str, header: list[str], target: str | int | None) -> int:
    """The target column's index: by name, by 0-based index, or the last column."""
    ncol = len(header)
    if target is None:
        return ncol - 1
    if isinstance(target, str):
        matches = [i for i, h in enumerate(header) if h == target.strip()]
        if not matches:
            raise DataError(
                f"target column {target!r} is not in {path!r}; columns are: {_fmt_list(header)} "
                f"(or give a 0-based column index)",
                field="target",
            )
        if len(matches) > 1:
            raise DataError(
                f"column name {target!r} appears {len(matches)} times in {path!r}; give a 0-based index",
                field="target",
            )
        return matches[0]
    if _is_int(target):
        t = int(target)
        if not 0 <= t < ncol:
            raise DataError(
                f"target index {t} is out of range; {path!r} has columns 0..{ncol - 1}: {_fmt_list(header)}",
                field="target",
            )
        return t
    raise DataError(f"target must be a column name or a 0-based column index, got {target!r}", field="target")


def read_array_file(
    path: str, target: str | int | None = None, *, max_bytes: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Read and validate a dataset file; return ``(x, y)``.

    ``.npz``: arrays ``x`` and ``y`` (read with ``allow_pickle=False``); ``target`` must be None.
    ``.csv``: a header row, then numeric rows; ``target`` is the target column's name or
    0-based index (default: the last column); the other columns are the features. It is parsed
    as a stream and refused once its cells exceed ``max_bytes`` as float32.

    ``x`` comes back float32 and C-contiguous with shape ``(n, ...)`` (a 1-d ``x`` becomes
    ``(n, 1)``); ``y`` keeps its stored dtype (CSV: float64), shape ``(n,)`` or ``(n, k)``.
    Raises :class:`DataError` for a missing file, an unsupported extension, missing arrays,
    non-numeric data, mismatched lengths, empty data or NaN/inf values.
    """
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if ext not in FILE_EXTENSIONS:
        raise DataError(
            f"unsupported file type {ext or '(none)'!r} for {path!r}; allowed: {_fmt_list(FILE_EXTENSIONS)}",
            field="path",
        )
    if not os.path.isfile(path):
        raise DataError(f"data file {path!r} does not exist (or is not a regular file)", field="path")
    if ext == ".npz":
        if target is not None:
            raise DataError(
                "target applies only to CSV files; an .npz file must hold arrays 'x' and 'y'", field="target"
            )
        x, y = _read_npz(path)
    else:
        x, y = _read_csv(path, target, max_bytes)

    if x.ndim == 0 or y.ndim == 0:
        raise DataError(
            f"{path!r}: 'x' and 'y' must be arrays with one row per sample, not scalars", field="path"
        )
    if x.ndim == 1:
        x = x.reshape(-1, 1)
    if y.ndim > 2:
        raise DataError(f"{path!r}: 'y' has shape {y.shape}; it must be (n,) or (n, n_targets)", field="path")
    if len(x) != len(y):
        raise DataError(
            f"{path!r}: 'x' has {len(x)} rows but 'y' has {len(y)}; they must match", field="path"
        )
    if len(x) == 0:
        raise DataError(f"{path!r} holds no samples", field="path")
    if math.prod(x.shape[1:]) == 0:
        raise DataError(f"{path!r}: 'x' has shape {x.shape}; samples need at least one feature", field="path")
    _check_finite(x, "'x'", f" in {path!r}")
    _check_finite(y, "'y'", f" in {path!r}")
    x32 = np.ascontiguousarray(x, dtype=np.float32)
    _check_finite(x32, "'x' (as float32)", f" in {path!r}")
    return x32, y


# --------------------------------------------------------------------------- task inference


def info_from_arrays(name: str, x: np.ndarray, y: np.ndarray) -> DatasetInfo:
    """Infer a :class:`DatasetInfo` from arrays (row counts must match).

    Task rule:

    * ``y`` of integer or bool dtype, shape ``(n,)`` or ``(n, 1)``: classification with
      ``n_classes = max + 1``; the labels must be exactly ``0..K-1`` (every class present,
      ``K >= 2``), else :class:`DataError`.
    * ``y`` of float dtype, shape ``(n,)``, whose values are exactly the integers ``0..K-1``
      (``2 <= K <= 1000``, every class present): classification too (CSV targets are floats).
    * Any other float ``y``: regression, ``n_targets = 1`` for ``(n,)`` else ``y.shape[1]``
      (so an integer-valued target such as a price in whole dollars stays regression unless
      it is stored with an integer dtype).
    """
    x = np.asarray(x)
    y = np.asarray(y)
    if x.ndim == 0 or y.ndim == 0 or y.ndim > 2:
        raise DataError(
            f"expected x of shape (n, ...) and y of shape (n,) or (n, k); got {x.shape} and {y.shape}",
            field="path",
        )
    if len(x) != len(y):
        raise DataError(f"x has {len(x)} rows but y has {len(y)}; they must match", field="path")
    if len(x) == 0:
        raise DataError("the dataset holds no samples", field="path")
    _check_finite(x, "x", "")
    _check_finite(y, "y", "")
    input_shape = tuple(int(s) for s in x.shape[1:]) or (1,)
    n = int(len(x))

    integer_dtype = y.dtype == np.bool_ or np.issubdtype(y.dtype, np.integer)
    if integer_dtype and y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if integer_dtype and y.ndim == 1:
        labels = np.unique(y)  # in y's own dtype: a cast to int64 would wrap uint64 labels
        k = int(labels[-1]) + 1
        if labels[0] != 0 or len(labels) != k or k < 2:
            shown = ", ".join(str(v) for v in labels[:10]) + (", ..." if len(labels) > 10 else "")
            raise DataError(
                f"classification labels must be the integers 0..K-1 with every class present and K >= 2; "
                f"found {len(labels)} distinct label(s): {shown}. Remap them (e.g. np.unique(y, return_inverse=True)) "
                f"or store y as float for a regression target",
                field="path",
            )
        return DatasetInfo(name, "classification", input_shape, k, None, n)
    if y.ndim == 1 and np.issubdtype(y.dtype, np.floating) and np.all(y == np.floor(y)):
        labels = np.unique(y)
        k = len(labels)
        if 2 <= k <= MAX_FLOAT_LABEL_CLASSES and labels[0] == 0 and labels[-1] == k - 1:
            return DatasetInfo(name, "classification", input_shape, k, None, n)
    return DatasetInfo(name, "regression", input_shape, None, 1 if y.ndim == 1 else int(y.shape[1]), n)


# --------------------------------------------------------------------------- generation & cache


def _random_state(seed: int) -> Any:
    """A scikit-learn random_state: the int itself when it fits, else a RandomState seeded from it."""
    if seed < 2**32:
        return seed
    return np.random.RandomState(np.random.MT19937(seed))


def _make_spirals(n_samples: int, n_classes: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Interleaved spirals: arm k is r -> r * (cos, sin)(2*pi*k/K + 3*pi*r), r in [0, 1)."""
    rng = np.random.default_rng(seed)
    counts = [n_samples // n_classes + (1 if k < n_samples % n_classes else 0) for k in range(n_classes)]
    xs, ys = [], []
    for k, m in enumerate(counts):
        r = rng.uniform(0.0, 1.0, m)
        theta = 2 * np.pi * k / n_classes + 3 * np.pi * r
        pts = np.stack([r * np.cos(theta), r * np.sin(theta)], axis=1)
        xs.append(pts + rng.normal(0.0, noise, pts.shape) if noise > 0 else pts)
        ys.append(np.full(m, k, dtype=np.int64))
    x, y = np.concatenate(xs), np.concatenate(ys)
    perm = rng.permutation(n_samples)
    return x[perm], y[perm]


def _generate(name: str, opts: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Raw arrays of a built-in: x float32 2-d, y int64 (classification) or float32 (n, 1)."""
    from sklearn import datasets as skd

    bundled: dict[str, Callable[..., Any]] = {
        "digits": skd.load_digits,
        "iris": skd.load_iris,
        "wine": skd.load_wine,
        "breast_cancer": skd.load_breast_cancer,
        "diabetes": skd.load_diabetes,
    }
    if name in bundled:
        x, y = bundled[name](return_X_y=True)
    else:
        n, seed = opts["n_samples"], opts["data_seed"]
        rs = _random_state(seed)
        if name == "moons":
            x, y = skd.make_moons(n_samples=n, noise=opts["noise"], random_state=rs)
        elif name == "circles":
            x, y = skd.make_circles(n_samples=n, noise=opts["noise"], factor=0.5, random_state=rs)
        elif name == "blobs":
            x, y = skd.make_blobs(
                n_samples=n,
                n_features=opts["n_features"],
                centers=opts["n_classes"],
                cluster_std=opts["noise"],
                random_state=rs,
            )
        elif name == "spirals":
            x, y = _make_spirals(n, opts["n_classes"], float(opts["noise"]), seed)
        elif name == "classification":
            informative, redundant, clusters = _classification_informative(
                opts["n_features"], opts["n_classes"]
            )
            x, y = skd.make_classification(
                n_samples=n,
                n_features=opts["n_features"],
                n_informative=informative,
                n_redundant=redundant,
                n_repeated=0,
                n_classes=opts["n_classes"],
                n_clusters_per_class=clusters,
                flip_y=opts["noise"],
                random_state=rs,
            )
        elif name == "regression":
            x, y = skd.make_regression(
                n_samples=n,
                n_features=opts["n_features"],
                n_informative=min(10, opts["n_features"]),
                noise=opts["noise"],
                random_state=rs,
            )
        else:  # pragma: no cover - guarded by check_options
            raise DataError(f"unknown dataset {name!r}", field="dataset")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if BUILTIN_DATASETS[name].task == "classification":
        y = np.ascontiguousarray(y, dtype=np.int64)
    else:
        y = np.ascontiguousarray(np.asarray(y, dtype=np.float32).reshape(len(y), -1))
    return x, y


class _RawCache:
    """Thread-safe LRU of raw built-in arrays, bounded by entry count and total bytes.

    Cached arrays are made read-only so no caller can corrupt them.
    """

    def __init__(self, max_entries: int = 16, max_bytes: int = 256 * 2**20) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._data: OrderedDict[tuple, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(
        self, key: tuple, make: Callable[[], tuple[np.ndarray, np.ndarray]]
    ) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                self.hits += 1
                return self._data[key]
            self.misses += 1
        x, y = make()
        x.flags.writeable = False
        y.flags.writeable = False
        size = x.nbytes + y.nbytes
        if size <= self.max_bytes:
            with self._lock:
                self._data[key] = (x, y)
                self._data.move_to_end(key)
                while len(self._data) > self.max_entries or self._bytes() > self.max_bytes:
                    self._data.popitem(last=False)
        return x, y

    def _bytes(self) -> int:
        return sum(x.nbytes + y.nbytes for x, y in self._data.values())

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self.hits = self.misses = 0


_CACHE = _RawCache()


def clear_cache() -> None:
    """Empty the in-process cache of built-in datasets."""
    _CACHE.clear()


def _builtin_raw(name: str, opts: dict[str, object]) -> tuple[np.ndarray, np.ndarray]:
    gen_opts = {k: v for k, v in opts.items() if k != "layout"}  # layout is a reshape, not new data
    key = (name, tuple(sorted(gen_opts.items())))
    return _CACHE.get(key, lambda: _generate(name, gen_opts))


# --------------------------------------------------------------------------- load


@dataclass(frozen=True)
class Split:
    """Training and validation arrays of a job, plus the dataset's :class:`DatasetInfo`.

    ``x_*`` are float32 ``(n, *info.input_shape)``; ``y_*`` are int64 ``(n,)`` for
    classification or float32 ``(n, n_targets)`` for regression.  ``x_val`` may have 0 rows.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    info: DatasetInfo
    #: the per-feature statistics ``standardize`` applied (float64, flattened input order), or None
    mean: np.ndarray | None = None
    std: np.ndarray | None = None


def load(data: Any, seed: int) -> Split:
    """Load (or generate) the dataset of ``data``, split it, and optionally standardize it.

    See the module docstring for the split and standardization rules.  Built-in raw arrays
    are cached in-process; the returned arrays are fresh, writable copies.  Raises
    :class:`DataError` on any problem with the options or the file.
    """
    seed = _check_seed(seed)
    _raise_problems(check_options(data))
    if _get(data, "path") is None:
        name = _get(data, "dataset")
        opts = resolve_options(data, seed)
        info = _builtin_info(BUILTIN_DATASETS[name], opts)
        x, y = _builtin_raw(name, opts)
    else:
        x, y = read_array_file(_get(data, "path"), _get(data, "target"))
        info = info_from_arrays(str(_get(data, "dataset") or os.path.basename(_get(data, "path"))), x, y)
        if info.task == "classification":
            y = y.reshape(-1).astype(np.int64)
        else:
            y = np.asarray(y, dtype=np.float32).reshape(len(y), info.n_targets)  # type: ignore[arg-type]
    n = len(x)
    if n != info.n_samples:  # pragma: no cover - metadata out of sync with the generator
        raise RuntimeError(f"dataset {info.name!r}: metadata says {info.n_samples} samples, got {n}")

    split = float(_get(data, "validation_split", 0.0) or 0.0)
    _raise_problems(_check_split(data, n))
    perm = np.random.default_rng(seed).permutation(n)
    n_val = validation_count(n, split)
    val_idx, train_idx = perm[:n_val], perm[n_val:]

    flat = x.reshape(n, -1)
    x_train, x_val = flat[train_idx], flat[val_idx]  # fancy indexing: copies
    mean = std = None
    if _get(data, "standardize", False):
        # Statistics in float64, applied in place in float32 (no full-size float64 copies).
        mean = x_train.mean(axis=0, dtype=np.float64)
        std = x_train.std(axis=0, dtype=np.float64)
        constant = x_train.max(axis=0) == x_train.min(axis=0)
        mean[constant] = x_train[0, constant] if len(x_train) else 0.0
        std[constant | (std == 0)] = 1.0
        x_train = np.asarray(x_train, dtype=np.float32)
        x_val = np.asarray(x_val, dtype=np.float32)
        for part in (x_train, x_val):
            part -= mean.astype(np.float32)
            part /= std.astype(np.float32)

    shape = (-1, *info.input_shape)
    return Split(
        x_train=np.ascontiguousarray(x_train.reshape(shape), dtype=np.float32),
        y_train=np.ascontiguousarray(y[train_idx]),
        x_val=np.ascontiguousarray(x_val.reshape(shape), dtype=np.float32),
        y_val=np.ascontiguousarray(y[val_idx]),
        info=info,
        mean=mean,
        std=std,
    )


def standardize(x: np.ndarray, mean: Any, std: Any) -> np.ndarray:
    """Apply :func:`load`'s standardization to new raw inputs ``x`` (``(n, ...)``): float32,
    ``(x - mean) / std`` per flattened feature, with the same float32 operations as ``load`` (so
    the validation split comes out bit-identical). Returns a new float32 array shaped like ``x``."""
    out = np.array(x, dtype=np.float32, copy=True)
    flat = out.reshape(len(out), -1)
    flat -= np.asarray(mean, dtype=np.float64).astype(np.float32)
    flat /= np.asarray(std, dtype=np.float64).astype(np.float32)
    return out
