"""Job spec v1: the engine's input contract.

Pydantic v2 models; importing this module never imports torch, so the API validates specs
without loading the engine. Field names are Keras' (with a few PyTorch aliases such as ``lr``,
``betas``, ``eps``). Unknown fields are errors. ``validate_spec`` runs the structural checks and
the semantic ones (shapes through the layers, the last layer against the task, monitor names)
and raises :class:`SpecError` whose ``errors`` each carry a JSON ``path`` and a message that says
what is allowed.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from training.schedules import FLOAT32_MAX, MAX_LEARNING_RATE

SPEC_VERSION = 1

#: Bounds on a schedule's lists and step counts, so a schedule stays cheap to evaluate and to store.
MAX_MILESTONES = 1000
MAX_SCHEDULE_STEPS = 10**12
ScheduleSteps = Annotated[int, Field(ge=0, le=MAX_SCHEDULE_STEPS)]
#: a learning rate as a number, or a schedule's rate parameter (every value a schedule gives is
#: bounded the same way: training.schedules)
Rate = Annotated[float, Field(gt=0, le=MAX_LEARNING_RATE)]
RateOrZero = Annotated[float, Field(ge=0, le=MAX_LEARNING_RATE)]

ACTIVATIONS = (
    "linear", "relu", "leaky_relu", "elu", "selu", "gelu", "silu", "swish",
    "sigmoid", "tanh", "softmax", "softplus", "softsign", "relu6", "hard_sigmoid", "mish",
)
INITIALIZER_NAMES = (
    "glorot_uniform", "glorot_normal", "he_uniform", "he_normal", "lecun_uniform", "lecun_normal",
    "xavier_normal", "xavier_uniform", "kaiming_normal", "kaiming_uniform", "orthogonal",
    "zeros", "ones", "constant", "normal", "uniform", "truncated_normal",
)
LOSSES = (
    "sparse_categorical_crossentropy", "categorical_crossentropy", "binary_crossentropy",
    "mse", "mae", "huber",
)
METRICS = ("accuracy", "top_k_accuracy", "mae", "mse", "rmse")
CLASSIFICATION_LOSSES = ("sparse_categorical_crossentropy", "categorical_crossentropy", "binary_crossentropy")

Activation = Literal[ACTIVATIONS]  # type: ignore[valid-type]
InitializerName = Literal[INITIALIZER_NAMES]  # type: ignore[valid-type]
PositiveInt = Annotated[int, Field(ge=1)]


class StrictModel(BaseModel):
    """Base: unknown fields are errors that list the allowed ones; NaN/Infinity are refused."""

    # strict: JSON types only (no "5" for 5, no true for 1); ints are still accepted for floats.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, populate_by_name=True, validate_default=False, strict=True)
    extra_aliases: ClassVar[tuple[str, ...]] = ()

    @model_validator(mode="before")
    @classmethod
    def _unknown_fields(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        allowed = set(cls.model_fields)
        for f in cls.model_fields.values():
            if f.alias:
                allowed.add(f.alias)
            if f.validation_alias and isinstance(f.validation_alias, str):
                allowed.add(f.validation_alias)
        allowed |= set(cls.extra_aliases)
        for key in data:
            if key not in allowed:
                names = sorted(cls.model_fields)
                close = difflib.get_close_matches(str(key), names, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise PydanticCustomError(
                    "extra_forbidden",
                    "unknown field {field}{hint}; allowed fields here: {allowed}",
                    {"field": str(key), "hint": hint, "allowed": ", ".join(names)},
                )
        return data

    @field_validator("*", mode="after")
    @classmethod
    def _float32(cls, value: Any) -> Any:
        if isinstance(value, float) and abs(value) > FLOAT32_MAX:
            raise PydanticCustomError(
                "float32_range", "{value} is out of range: numbers in a spec must be at most {limit} in absolute "
                "value (float32, what the engine computes in)", {"value": repr(value), "limit": f"{FLOAT32_MAX:.8g}"},
            )
        return value


# --------------------------------------------------------------------------- small parts


class Initializer(StrictModel):
    """An initializer by name, with optional parameters (a bare string is shorthand)."""

    name: InitializerName
    gain: float | None = Field(None, gt=0, description="xavier_*, kaiming_*, orthogonal")
    value: float | None = Field(None, description="constant")
    mean: float | None = Field(None, description="normal, truncated_normal")
    stddev: float | None = Field(None, gt=0, description="normal, truncated_normal")
    minval: float | None = Field(None, description="uniform")
    maxval: float | None = Field(None, description="uniform")

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, data: Any) -> Any:
        return {"name": data} if isinstance(data, str) else data

    @model_validator(mode="after")
    def _ranges(self) -> Initializer:
        """What torch's in-place initializers refuse (caught here, not in the worker)."""
        if self.name == "uniform":
            lo = -0.05 if self.minval is None else self.minval  # Keras RandomUniform defaults
            hi = 0.05 if self.maxval is None else self.maxval
            if lo > hi:
                raise ValueError(f"minval ({lo}) must be at most maxval ({hi})")
            if hi - lo > FLOAT32_MAX:
                raise ValueError(f"maxval - minval must be at most {FLOAT32_MAX:.8g} (float32)")
        if self.name == "truncated_normal":
            mean = self.mean or 0.0
            sd = 0.05 if self.stddev is None else self.stddev
            if abs(mean) + 2 * sd > FLOAT32_MAX:
                raise ValueError(f"mean ± 2 * stddev (the truncation bounds) must be within ±{FLOAT32_MAX:.8g} (float32)")
        return self


class Regularizer(StrictModel):
    """``l1 * sum(|x|) + l2 * sum(x**2)``; the strings "l1", "l2", "l1_l2" mean 0.01 as in Keras."""

    l1: float = Field(0.0, ge=0)
    l2: float = Field(0.0, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, data: Any) -> Any:
        shorthands = {"l1": {"l1": 0.01}, "l2": {"l2": 0.01}, "l1_l2": {"l1": 0.01, "l2": 0.01}}
        if isinstance(data, str):
            if data not in shorthands:
                raise PydanticCustomError(
                    "regularizer", "unknown regularizer {name!r}; allowed: 'l1', 'l2', 'l1_l2' or {{\"l1\": a, \"l2\": b}}",
                    {"name": data},
                )
            return shorthands[data]
        return data


class _Weighted(StrictModel):
    activation: Activation = "linear"
    use_bias: bool = True
    kernel_initializer: Initializer | None = Field(None, description="default: model.kernel_initializer")
    bias_initializer: Initializer | None = Field(None, description="default: model.bias_initializer")
    kernel_regularizer: Regularizer | None = None
    bias_regularizer: Regularizer | None = None
    activity_regularizer: Regularizer | None = None


class Dense(_Weighted):
    type: Literal["dense"] = "dense"
    units: int = Field(ge=1, le=65536)


IntPair = int | Annotated[list[int], Field(min_length=2, max_length=2)]


class Conv2D(_Weighted):
    """2-D convolution on channels-first input (C, H, W), as in PyTorch."""

    type: Literal["conv2d"] = "conv2d"
    filters: int = Field(ge=1, le=8192)
    kernel_size: IntPair
    strides: IntPair = 1
    padding: Literal["valid", "same"] = "valid"
    dilation_rate: IntPair = 1


class _Pool(StrictModel):
    pool_size: IntPair = 2
    strides: IntPair | None = Field(None, description="default: pool_size")
    padding: Literal["valid", "same"] = "valid"


class MaxPool2D(_Pool):
    type: Literal["max_pool2d"] = "max_pool2d"


class AvgPool2D(_Pool):
    type: Literal["avg_pool2d"] = "avg_pool2d"


class Flatten(StrictModel):
    type: Literal["flatten"] = "flatten"


class Reshape(StrictModel):
    type: Literal["reshape"] = "reshape"
    target_shape: list[int] = Field(min_length=1, max_length=4, description="per sample; one entry may be -1")


class Dropout(StrictModel):
    """Inverted dropout: active in training only, survivors scaled by 1/(1-rate)."""

    type: Literal["dropout"] = "dropout"
    rate: float = Field(ge=0, lt=1)


class BatchNorm(StrictModel):
    """Keras BatchNormalization: moving = moving * momentum + batch * (1 - momentum)."""

    type: Literal["batch_norm"] = "batch_norm"
    momentum: float = Field(0.99, ge=0, lt=1)
    epsilon: float = Field(1e-3, gt=0)
    center: bool = True
    scale: bool = True


class LayerNorm(StrictModel):
    type: Literal["layer_norm"] = "layer_norm"
    epsilon: float = Field(1e-3, gt=0)
    center: bool = True
    scale: bool = True


class ActivationLayer(StrictModel):
    type: Literal["activation"] = "activation"
    activation: Activation


Layer = Annotated[
    Dense | Conv2D | MaxPool2D | AvgPool2D | Flatten | Reshape | Dropout | BatchNorm | LayerNorm | ActivationLayer,
    Field(discriminator="type"),
]
LAYER_TYPES = ("dense", "conv2d", "max_pool2d", "avg_pool2d", "flatten", "reshape", "dropout", "batch_norm", "layer_norm", "activation")

#: Keras' layer class names, accepted as ``type`` and stored as the type they stand for. Lookups
#: ignore case and underscores, so Keras' config names (``max_pooling2d``,
#: ``batch_normalization``) match too, as do the canonical names themselves.
LAYER_ALIASES: dict[str, str] = {
    "Dense": "dense",
    "Conv2D": "conv2d", "Convolution2D": "conv2d",
    "MaxPooling2D": "max_pool2d", "MaxPool2D": "max_pool2d",
    "AveragePooling2D": "avg_pool2d", "AvgPool2D": "avg_pool2d",
    "Flatten": "flatten",
    "Reshape": "reshape",
    "Dropout": "dropout",
    "BatchNormalization": "batch_norm",
    "LayerNormalization": "layer_norm",
    "Activation": "activation",
}


def _alias_key(name: str) -> str:
    return name.replace("_", "").lower()


_LAYER_LOOKUP = {_alias_key(k): v for k, v in LAYER_ALIASES.items()} | {_alias_key(t): t for t in LAYER_TYPES}


def canonical_layer_type(name: str) -> str:
    """The layer type ``name`` stands for (a Keras class name, any case); ``name`` itself if none."""
    return _LAYER_LOOKUP.get(_alias_key(name), name)


class ModelSpec(StrictModel):
    kernel_initializer: Initializer = Field(default_factory=lambda: Initializer(name="glorot_uniform"))
    bias_initializer: Initializer = Field(default_factory=lambda: Initializer(name="zeros"))
    layers: list[Layer] = Field(min_length=1, max_length=200, description="`type` also takes Keras class names: "
                                + ", ".join(f"{k}->{v}" for k, v in LAYER_ALIASES.items()))

    @model_validator(mode="before")
    @classmethod
    def _keras_names(cls, data: Any) -> Any:
        """Layer types given as Keras class names become the type they stand for."""
        if isinstance(data, Mapping) and isinstance(data.get("layers"), list):
            layers = [
                {**layer, "type": canonical_layer_type(layer["type"])}
                if isinstance(layer, Mapping) and isinstance(layer.get("type"), str) else layer
                for layer in data["layers"]
            ]
            return {**data, "layers": layers}
        return data


# --------------------------------------------------------------------------- data


class DataSpec(StrictModel):
    dataset: str = Field(min_length=1, max_length=200, description="built-in name, or a stored dataset's id or name")
    path: str | None = Field(None, description="server-side .npz (x, y) or .csv file; set by the service")
    target: str | int | None = Field(None, description="csv target column (name or index); default last")
    layout: Literal["flat", "image"] = Field("flat", description="digits only: image = 1x8x8")
    n_samples: int | None = Field(None, ge=10, le=1_000_000)
    noise: float | None = Field(None, ge=0, le=100)
    n_features: int | None = Field(None, ge=1, le=100_000)
    n_classes: int | None = Field(None, ge=2, le=10_000)
    data_seed: int | None = Field(None, description="synthetic data seed; default: the job's seed")
    validation_split: float = Field(0.2, ge=0, lt=1)
    batch_size: int = Field(32, ge=1, le=1_000_000)
    shuffle: bool = True
    standardize: bool = False


# --------------------------------------------------------------------------- loss, metrics


class Loss(StrictModel):
    """``from_logits``: None (auto) treats the last layer's output as logits unless its activation
    is softmax/sigmoid, in which case the engine uses the pre-activation values (the same maths,
    numerically stable). ``false`` with a linear last layer treats outputs as probabilities, as
    Keras does."""

    name: Literal[LOSSES]  # type: ignore[valid-type]
    from_logits: bool | None = None
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    delta: float = Field(1.0, gt=0, description="huber")

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, data: Any) -> Any:
        return {"name": data} if isinstance(data, str) else data


class Metric(StrictModel):
    name: Literal[METRICS]  # type: ignore[valid-type]
    k: int = Field(5, ge=1, description="top_k_accuracy")

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, data: Any) -> Any:
        return {"name": data} if isinstance(data, str) else data

    @property
    def key(self) -> str:
        """Name in the history (``top_k_accuracy`` stays unsuffixed, like Keras)."""
        return self.name


# --------------------------------------------------------------------------- schedules


class _Warmup(StrictModel):
    warmup_steps: int = Field(0, ge=0, le=MAX_SCHEDULE_STEPS)
    warmup_start_lr: RateOrZero = 0.0


class Constant(_Warmup):
    schedule: Literal["constant"]
    initial_learning_rate: Rate


class Exponential(_Warmup):
    schedule: Literal["exponential"]
    initial_learning_rate: Rate
    decay_steps: int = Field(ge=1, le=MAX_SCHEDULE_STEPS)
    decay_rate: float = Field(gt=0)
    staircase: bool = False


class StepDecay(_Warmup):
    schedule: Literal["step"]
    initial_learning_rate: Rate
    step_size: int = Field(ge=1, le=MAX_SCHEDULE_STEPS)
    gamma: float = Field(0.1, gt=0)
    unit: Literal["epoch", "step"] = "epoch"


class MultiStep(_Warmup):
    schedule: Literal["multistep"]
    initial_learning_rate: Rate
    milestones: list[ScheduleSteps] = Field(min_length=1, max_length=MAX_MILESTONES)
    gamma: float = Field(0.1, gt=0)
    unit: Literal["epoch", "step"] = "epoch"

    @field_validator("milestones")
    @classmethod
    def _increasing(cls, v: list[int]) -> list[int]:
        if any(b <= a for a, b in zip(v, v[1:], strict=False)) or v[0] < 0:
            raise ValueError("milestones must be non-negative and strictly increasing")
        return v


class Polynomial(_Warmup):
    schedule: Literal["polynomial"]
    initial_learning_rate: Rate
    decay_steps: int = Field(ge=1, le=MAX_SCHEDULE_STEPS)
    end_learning_rate: RateOrZero = 1e-4
    power: float = Field(1.0, gt=0)
    cycle: bool = False


class Cosine(_Warmup):
    schedule: Literal["cosine"]
    initial_learning_rate: float = Field(ge=0, le=MAX_LEARNING_RATE, description="> 0 unless warmup_target is given (then the warm-up start)")
    decay_steps: int = Field(ge=1, le=MAX_SCHEDULE_STEPS)
    alpha: float = Field(0.0, ge=0, le=1)
    warmup_target: float | None = Field(
        None, gt=0, le=MAX_LEARNING_RATE, description="Keras CosineDecay: warm up from initial_learning_rate to this, then decay from it"
    )

    @model_validator(mode="after")
    def _one_warmup(self) -> Cosine:
        if self.warmup_target is not None and self.warmup_start_lr:
            raise ValueError("give either warmup_target (Keras) or warmup_start_lr, not both")
        if self.warmup_target is None and self.initial_learning_rate <= 0:
            raise ValueError("initial_learning_rate must be > 0 (it may be 0 only as the start of a warmup_target warm-up)")
        return self


class CosineRestarts(_Warmup):
    schedule: Literal["cosine_restarts"]
    initial_learning_rate: Rate
    first_decay_steps: int = Field(ge=1, le=MAX_SCHEDULE_STEPS)
    t_mul: float = Field(2.0, gt=0)
    m_mul: float = Field(1.0, gt=0)
    alpha: float = Field(0.0, ge=0, le=1)


class OneCycle(_Warmup):
    schedule: Literal["one_cycle"]
    max_lr: Rate
    total_steps: int | None = Field(None, ge=2, le=MAX_SCHEDULE_STEPS, description="default: epochs * steps per epoch")
    pct_start: float = Field(0.3, gt=0, lt=1)
    anneal_strategy: Literal["cos", "linear"] = "cos"
    div_factor: float = Field(25.0, gt=0)
    final_div_factor: float = Field(1e4, gt=0)
    three_phase: bool = False


class ReduceOnPlateau(_Warmup):
    schedule: Literal["reduce_on_plateau"]
    initial_learning_rate: Rate
    monitor: str = "val_loss"
    factor: float = Field(0.1, gt=0, lt=1)
    patience: int = Field(10, ge=0)
    mode: Literal["auto", "min", "max"] = "auto"
    min_delta: float = Field(1e-4, ge=0)
    cooldown: int = Field(0, ge=0)
    min_lr: float = Field(0.0, ge=0, le=MAX_LEARNING_RATE)


Schedule = Annotated[
    Constant | Exponential | StepDecay | MultiStep | Polynomial | Cosine | CosineRestarts | OneCycle | ReduceOnPlateau,
    Field(discriminator="schedule"),
]


_LR_TAGS = ("lr-number", "lr-schedule", "lr-find")

#: ``"learning_rate": "find"`` in an optimizer: run the LR range test first (options in the spec's
#: ``lr_find``, defaulted), then train with its suggestion.
FIND = "find"


def _lr_kind(v: Any) -> str:
    return _LR_TAGS[1] if isinstance(v, Mapping | BaseModel) else _LR_TAGS[0]


def _optimizer_lr_kind(v: Any) -> str:
    return _LR_TAGS[2] if isinstance(v, str) else _lr_kind(v)


LearningRate = Annotated[
    Annotated[float, Tag(_LR_TAGS[0]), Field(gt=0, le=MAX_LEARNING_RATE, allow_inf_nan=False, strict=True)] | Annotated[Schedule, Tag(_LR_TAGS[1])],
    Discriminator(_lr_kind),
]
_LR_ADAPTER: TypeAdapter[Any] = TypeAdapter(LearningRate)

#: An optimizer's learning rate: a number, a schedule object, or "find" (the LR finder's suggestion).
OptimizerLearningRate = Annotated[
    Annotated[float, Tag(_LR_TAGS[0]), Field(gt=0, le=MAX_LEARNING_RATE, allow_inf_nan=False, strict=True)]
    | Annotated[Schedule, Tag(_LR_TAGS[1])]
    | Annotated[Literal["find"], Tag(_LR_TAGS[2])],
    Discriminator(_optimizer_lr_kind),
]


def parse_learning_rate(value: Any) -> Any:
    """Validate a learning rate as written in a spec (number or schedule object)."""
    try:
        return _LR_ADAPTER.validate_python(value)
    except ValidationError as exc:
        raise SpecError(_format_errors(exc, value, prefix=("learning_rate",))) from None


# --------------------------------------------------------------------------- optimizers

_TORCH_NAMES = ("betas", "eps", "alpha")

#: The ``formulas`` switch of every optimizer: whose update rule a Keras-named optimizer computes.
FORMULAS = ("keras", "torch")
_FORMULAS_DESCRIPTION = (
    'whose update rule: "keras" (default) computes Keras 3\'s formulas (epsilon placement, decoupled '
    'weight_decay, Nadam\'s momentum schedule...); "torch" runs torch.optim\'s own optimizer with '
    "torch's defaults for the fields not given. Defaults to \"torch\" when torch's argument names "
    "(betas, eps, alpha) are used. The effective value is stored with the job."
)
_WD_KERAS = "weight_decay (Keras 3, decoupled, before the update): w *= 1 - weight_decay * lr."


class _Optimizer(StrictModel):
    extra_aliases: ClassVar[tuple[str, ...]] = ("lr", "betas", "eps")
    #: the update each choice of ``formulas`` computes (t counts updates from 1); shown in the catalog
    FORMULA_TEXT: ClassVar[dict[str, str]] = {}
    #: torch.optim's defaults, used for the fields a ``formulas: "torch"`` spec leaves out
    TORCH_DEFAULTS: ClassVar[dict[str, Any]] = {}
    formulas: Literal[FORMULAS] = Field("keras", description=_FORMULAS_DESCRIPTION)  # type: ignore[valid-type]
    learning_rate: OptimizerLearningRate = Field(
        0.001, description='a number, a schedule object, or "find": run the LR range test (options in lr_find) and train with its suggestion'
    )
    weight_decay: float | None = Field(
        None, ge=0, description='decoupled as in Keras 3 (w *= 1 - weight_decay * lr before each update); coupled L2 (torch) with formulas "torch", except adamw'
    )
    clipnorm: float | None = Field(None, gt=0, description="clip each gradient tensor to this norm (Keras); one of clipnorm, clipvalue, global_clipnorm")
    clipvalue: float | None = Field(None, gt=0, description="clip each gradient element to [-v, v]")
    global_clipnorm: float | None = Field(None, gt=0, description="clip all gradients together to this global norm")

    @model_validator(mode="before")
    @classmethod
    def _aliases(cls, data: Any) -> Any:
        """Accept PyTorch's names; with them (or ``formulas: "torch"``) torch's formulas and
        defaults apply to whatever the spec leaves out."""
        if not isinstance(data, Mapping):
            return data
        data = dict(data)
        if "lr" in data:
            if "learning_rate" in data:
                raise PydanticCustomError("alias_conflict", "give learning_rate or its alias lr, not both", {})
            data["learning_rate"] = data.pop("lr")
        if any(k in data for k in _TORCH_NAMES):
            data.setdefault("formulas", "torch")
        if "betas" in data:
            betas = data.pop("betas")
            if not (isinstance(betas, list | tuple) and len(betas) == 2):
                raise PydanticCustomError("betas", "betas must be a list of two numbers [beta_1, beta_2]", {})
            data.setdefault("beta_1", betas[0])
            data.setdefault("beta_2", betas[1])
        if "eps" in data:
            data.setdefault("epsilon", data.pop("eps"))
        if "alpha" in data and "rho" in cls.model_fields:
            data.setdefault("rho", data.pop("alpha"))
        if data.get("formulas") == "torch":
            for key, value in cls.TORCH_DEFAULTS.items():
                data.setdefault(key, value)
        return data

    @model_validator(mode="after")
    def _one_clip(self) -> _Optimizer:
        given = [k for k in ("clipnorm", "clipvalue", "global_clipnorm") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of clipnorm, clipvalue, global_clipnorm, not {' and '.join(given)} (as in Keras 3)")
        return self


class SGD(_Optimizer):
    """Keras SGD: velocity = momentum * velocity - lr * g; w += velocity (nesterov: w += momentum *
    velocity - lr * g). Same as torch SGD for a constant learning rate."""

    FORMULA_TEXT: ClassVar[dict[str, str]] = {
        "keras": "v = momentum*v - lr*g; w += v (nesterov: w += momentum*v - lr*g). " + _WD_KERAS,
        "torch": "torch.optim.SGD: b = momentum*b + g; w -= lr*b (nesterov: w -= lr*(g + momentum*b)); weight_decay adds wd*w to g.",
    }
    TORCH_DEFAULTS: ClassVar[dict[str, Any]] = {"learning_rate": 0.001}
    name: Literal["sgd"]
    learning_rate: OptimizerLearningRate = Field(
        0.01, description='a number, a schedule object, or "find": run the LR range test (options in lr_find) and train with its suggestion'
    )
    momentum: float = Field(0.0, ge=0, lt=1)
    nesterov: bool = False


class _AdamLike(_Optimizer):
    beta_1: float = Field(0.9, ge=0, lt=1)
    beta_2: float = Field(0.999, ge=0, lt=1)
    epsilon: float = Field(1e-7, gt=0, description='Keras default 1e-7; 1e-8 with formulas "torch" (or torch names)')


_ADAM_KERAS = (
    "m = b1*m + (1-b1)*g; v = b2*v + (1-b2)*g^2 (amsgrad: v = max(v_hat, v)); "
    "w -= lr*sqrt(1-b2^t)/(1-b1^t) * m / (sqrt(v) + epsilon): epsilon on the uncorrected sqrt(v). "
)


class Adam(_AdamLike):
    """Keras 3 Adam: epsilon added to the uncorrected sqrt(v); weight_decay decoupled."""

    FORMULA_TEXT: ClassVar[dict[str, str]] = {
        "keras": _ADAM_KERAS + _WD_KERAS,
        "torch": "torch.optim.Adam: w -= lr/(1-b1^t) * m / (sqrt(v/(1-b2^t)) + eps); weight_decay adds wd*w to g (coupled L2).",
    }
    TORCH_DEFAULTS: ClassVar[dict[str, Any]] = {"epsilon": 1e-8}
    name: Literal["adam"]
    amsgrad: bool = False


class AdamW(_AdamLike):
    """Keras 3 AdamW: Adam with weight_decay 0.004 (decoupled)."""

    FORMULA_TEXT: ClassVar[dict[str, str]] = {
        "keras": _ADAM_KERAS + _WD_KERAS,
        "torch": "torch.optim.AdamW: w *= 1 - lr*wd; w -= lr/(1-b1^t) * m / (sqrt(v/(1-b2^t)) + eps).",
    }
    TORCH_DEFAULTS: ClassVar[dict[str, Any]] = {"epsilon": 1e-8, "weight_decay": 0.01}
    name: Literal["adamw"]
    amsgrad: bool = False
    weight_decay: float | None = Field(0.004, ge=0, description="decoupled: w *= 1 - weight_decay * lr before each update (Keras default 0.004; torch 0.01)")


class Nadam(_AdamLike):
    """Keras 3 Nadam: momentum schedule u_t = beta_1 * (1 - 0.5 * 0.96**t)."""

    FORMULA_TEXT: ClassVar[dict[str, str]] = {
        "keras": (
            "u_t = b1*(1 - 0.5*0.96^t); P_t = u_1*...*u_t; m = b1*m + (1-b1)*g; v = b2*v + (1-b2)*g^2; "
            "w -= lr * (u_{t+1}*m/(1-P_{t+1}) + (1-u_t)*g/(1-P_t)) / (sqrt(v/(1-b2^t)) + epsilon). " + _WD_KERAS
        ),
        "torch": "torch.optim.NAdam (momentum_decay 0.004): as keras with u_t = b1*(1 - 0.5*0.96^(0.004*t)); weight_decay adds wd*w to g.",
    }
    TORCH_DEFAULTS: ClassVar[dict[str, Any]] = {"learning_rate": 0.002, "epsilon": 1e-8}
    name: Literal["nadam"]


class RAdam(_AdamLike):
    """Rectified Adam (torch.optim.RAdam; Keras has none, so formulas is always "torch")."""

    FORMULA_TEXT: ClassVar[dict[str, str]] = {"torch": "torch.optim.RAdam; weight_decay adds wd*w to g (coupled L2)."}
    name: Literal["radam"]
    formulas: Literal["torch"] = Field("torch", description="torch only: Keras has no RAdam")
    weight_decay: float | None = Field(None, ge=0, description="coupled L2, as torch's RAdam")
    epsilon: float = Field(1e-8, gt=0, description="torch default")


class Adamax(_AdamLike):
    """Keras 3 Adamax: epsilon added to u outside the max."""

    FORMULA_TEXT: ClassVar[dict[str, str]] = {
        "keras": "m = b1*m + (1-b1)*g; u = max(b2*u, |g|); w -= lr*m / ((1-b1^t)*(u + epsilon)). " + _WD_KERAS,
        "torch": "torch.optim.Adamax: u = max(b2*u, |g| + eps); w -= lr/(1-b1^t) * m/u; weight_decay adds wd*w to g.",
    }
    TORCH_DEFAULTS: ClassVar[dict[str, Any]] = {"learning_rate": 0.002, "epsilon": 1e-8}
    name: Literal["adamax"]


class RMSprop(_Optimizer):
    """Keras 3 RMSprop: epsilon inside the square root; the momentum buffer carries lr."""

    FORMULA_TEXT: ClassVar[dict[str, str]] = {
        "keras": (
            "v = rho*v + (1-rho)*g^2; d = v + epsilon (centered: a = rho*a + (1-rho)*g, d = v - a^2 + epsilon); "
            "inc = lr*g/sqrt(d); w -= inc (momentum: b = momentum*b + inc; w -= b). " + _WD_KERAS
        ),
        "torch": (
            "torch.optim.RMSprop: d = sqrt(v) + eps (centered: sqrt(v - a^2) + eps); w -= lr*g/d "
            "(momentum: b = momentum*b + g/d; w -= lr*b); weight_decay adds wd*w to g."
        ),
    }
    TORCH_DEFAULTS: ClassVar[dict[str, Any]] = {"learning_rate": 0.01, "rho": 0.99, "epsilon": 1e-8}
    extra_aliases: ClassVar[tuple[str, ...]] = ("lr", "eps", "alpha")
    name: Literal["rmsprop"]
    rho: float = Field(0.9, ge=0, lt=1, description="Keras rho (torch: alpha, default 0.99)")
    momentum: float = Field(0.0, ge=0, lt=1)
    epsilon: float = Field(1e-7, gt=0)
    centered: bool = False


class Adagrad(_Optimizer):
    """Keras 3 Adagrad: epsilon inside the square root, accumulator starts at 0.1."""

    FORMULA_TEXT: ClassVar[dict[str, str]] = {
        "keras": "acc += g^2; w -= lr*g / sqrt(acc + epsilon). " + _WD_KERAS,
        "torch": "torch.optim.Adagrad: acc += g^2; w -= lr*g / (sqrt(acc) + eps); weight_decay adds wd*w to g.",
    }
    TORCH_DEFAULTS: ClassVar[dict[str, Any]] = {"learning_rate": 0.01, "epsilon": 1e-10, "initial_accumulator_value": 0.0}
    name: Literal["adagrad"]
    initial_accumulator_value: float = Field(0.1, ge=0)
    epsilon: float = Field(1e-7, gt=0)


Optimizer = Annotated[
    SGD | Adam | AdamW | Nadam | RAdam | Adamax | RMSprop | Adagrad,
    Field(discriminator="name"),
]
OPTIMIZER_NAMES = ("sgd", "adam", "adamw", "nadam", "radam", "adamax", "rmsprop", "adagrad")


# --------------------------------------------------------------------------- callbacks


class EarlyStoppingSpec(StrictModel):
    monitor: str = "val_loss"
    min_delta: float = Field(0.0, ge=0)
    patience: int = Field(0, ge=0)
    mode: Literal["auto", "min", "max"] = "auto"
    baseline: float | None = None
    restore_best_weights: bool = False
    start_from_epoch: int = Field(0, ge=0)
    stop_on_non_finite: bool = True
    divergence_threshold: float | None = None
    verbose: int = Field(0, ge=0, le=2, description="accepted for Keras compatibility; ignored")


class ModelCheckpointSpec(StrictModel):
    monitor: str = "val_loss"
    mode: Literal["auto", "min", "max"] = "auto"
    save_best_only: bool = False
    save_weights_only: bool = Field(
        True, description="weights are always what is stored (safetensors); the full training state is kept separately"
    )
    save_freq: Literal["epoch"] | Annotated[int, Field(ge=1)] = "epoch"
    initial_value_threshold: float | None = None
    filepath: str | None = Field(None, description="accepted for Keras compatibility; the service stores checkpoints itself")
    verbose: int = Field(0, ge=0, le=2, description="accepted for Keras compatibility; ignored")


class ReduceLROnPlateauSpec(StrictModel):
    monitor: str = "val_loss"
    factor: float = Field(0.1, gt=0, lt=1)
    patience: int = Field(10, ge=0)
    mode: Literal["auto", "min", "max"] = "auto"
    min_delta: float = Field(1e-4, ge=0)
    cooldown: int = Field(0, ge=0)
    min_lr: float = Field(0.0, ge=0, le=MAX_LEARNING_RATE)
    verbose: int = Field(0, ge=0, le=2, description="accepted for Keras compatibility; ignored")


class CallbacksSpec(StrictModel):
    early_stopping: EarlyStoppingSpec | None = None
    model_checkpoint: ModelCheckpointSpec | None = None
    reduce_lr_on_plateau: ReduceLROnPlateauSpec | None = None
    terminate_on_nan: bool = True


class LRFindSpec(StrictModel):
    """LR range test (Smith 2015): exponential ramp from min_lr to max_lr over steps."""

    min_lr: float = Field(1e-7, gt=0, le=MAX_LEARNING_RATE)
    max_lr: float = Field(10.0, gt=0, le=MAX_LEARNING_RATE)
    steps: int = Field(100, ge=5, le=100_000)
    stop_factor: float = Field(4.0, gt=1, description="stop when the smoothed loss exceeds this times its best")
    smoothing: float = Field(0.98, ge=0, lt=1)

    @model_validator(mode="after")
    def _order(self) -> LRFindSpec:
        if self.max_lr <= self.min_lr:
            raise ValueError("max_lr must be greater than min_lr")
        return self


# --------------------------------------------------------------------------- the job


class JobSpec(StrictModel):
    """A training job: data, model, loss, optimizer, epochs and callbacks."""

    version: Literal[1] = SPEC_VERSION
    kind: Literal["train", "lr_find"] = "train"
    name: str = Field("job", min_length=1, max_length=200)
    seed: int = Field(0, ge=0, le=2**32 - 1)
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda|cuda:\d{1,2})$", description="auto, cpu, cuda or cuda:N")
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="bf16/fp16 autocast (fp16 needs CUDA)")
    deterministic: bool = False
    compile: bool = Field(False, description="torch.compile the model (CUDA; slow to start)")
    data: DataSpec
    model: ModelSpec
    loss: Loss
    metrics: list[Metric] = Field(default_factory=list, max_length=10)
    optimizer: Optimizer = Field(default_factory=lambda: Adam(name="adam"))
    epochs: int = Field(1, ge=1, le=100_000)
    max_steps: int | None = Field(None, ge=1)
    stall_timeout_s: float | None = Field(
        None, gt=0, le=7 * 24 * 3600,
        description="seconds without a training step after which the service ends the attempt as 'stalled' and "
                    "requeues the job (default: the server's TRAINYARD_STALL_TIMEOUT_S)")
    keep_checkpoints: Literal["best_and_last", "all"] = Field(
        "best_and_last",
        description="which checkpoint files the service keeps: the best and the newest (default; the others keep "
                    "their metadata), or all")
    callbacks: CallbacksSpec = Field(default_factory=CallbacksSpec)
    lr_find: LRFindSpec | None = Field(None, description="options of kind 'lr_find' and of \"learning_rate\": \"find\"")
    init_from: str | None = Field(
        None, pattern=r"^[0-9a-f]{32}$",
        description="a job id: training starts from that job's best checkpoint (a warm start; its model must have "
        "the same layers), resolved by the service; fit() takes the weights as init_weights",
    )
    pack: bool = Field(
        True, description="may the service train this job fused with queued jobs of the same shape (README, "
                          "\"Packed jobs\"); false: always alone. Changes nothing the job computes")

    def metric_names(self) -> list[str]:
        """Names the history carries besides loss/val_loss/lr/seconds/epoch."""
        return [m.key for m in self.metrics]


# --------------------------------------------------------------------------- errors


class SpecError(ValueError):
    """Invalid spec. ``errors`` is a list of ``{"loc", "path", "msg", "type"}`` dicts."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        self.errors = errors
        super().__init__("; ".join(f"{e['path'] or '<root>'}: {e['msg']}" for e in errors))


def json_path(loc: tuple[Any, ...] | list[Any]) -> str:
    """``("model", "layers", 0, "units")`` -> ``model.layers[0].units``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


_DISCRIMINATORS = ("type", "name", "schedule")


def _clean_loc(loc: tuple[Any, ...], data: Any) -> tuple[Any, ...]:
    """Drop the union tags pydantic inserts into ``loc`` by following the input data: an element
    that is neither a key nor an index of the current input (and is not the last) is a tag."""
    cleaned: list[Any] = []
    current = data
    for i, part in enumerate(loc):
        last = i == len(loc) - 1
        if part in _LR_TAGS:
            continue
        if isinstance(current, Mapping) and last and any(current.get(k) == part for k in _DISCRIMINATORS):
            continue  # an error about the whole object ends on its tag
        if isinstance(current, Mapping) and part in current:
            cleaned.append(part)
            current = current[part]
        elif isinstance(current, list) and isinstance(part, int) and 0 <= part < len(current):
            cleaned.append(part)
            current = current[part]
        elif last:
            cleaned.append(part)
        # else: a tag such as "dense", "cosine", "number", "schedule" - skip it
    return tuple(cleaned)


_ALLOWED_HINTS = {"union_tag_invalid": "expected_tags", "literal_error": "expected"}


def _format_errors(exc: ValidationError, data: Any, prefix: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
    out = []
    for err in exc.errors(include_url=False):
        ctx = err.get("ctx") or {}
        raw = tuple(err["loc"])
        if err["type"] == "extra_forbidden" and "field" in ctx:
            raw = (*raw, ctx["field"])
        loc = _clean_loc(raw, data)
        if err["type"] in ("union_tag_invalid", "union_tag_not_found") and "discriminator" in ctx:
            loc = (*loc, str(ctx["discriminator"]).strip("'\""))
        msg = err["msg"]
        if err["type"] == "union_tag_invalid":
            msg = f"unknown {ctx.get('discriminator', 'kind')} {ctx.get('tag')!r}; allowed: {ctx.get('expected_tags')}"
        elif err["type"] == "union_tag_not_found":
            msg = f"missing {ctx.get('discriminator', 'discriminator')}; it selects the kind of object"
        elif err["type"].startswith("value_error"):
            msg = msg.removeprefix("Value error, ")
        full = (*prefix, *loc)
        out.append({"loc": list(full), "path": json_path(full), "msg": msg, "type": err["type"]})
    return out


# --------------------------------------------------------------------------- semantic checks


DatasetResolver = Callable[[str], Any]


def _issue(errors: list[dict[str, Any]], loc: tuple[Any, ...], msg: str, kind: str = "value_error") -> None:
    errors.append({"loc": list(loc), "path": json_path(loc), "msg": msg, "type": kind})


def semantic_errors(spec: JobSpec, datasets: DatasetResolver | None = None) -> list[dict[str, Any]]:
    """Checks that need more than one field: the dataset exists and fits the model, shapes flow
    through the layers, the last layer fits the task and loss, monitors name real metrics."""
    from training import data as data_mod
    from training.shapes import ShapeError, infer_shapes

    errors: list[dict[str, Any]] = []
    info = None
    ds = spec.data
    if ds.path is None and ds.dataset not in data_mod.BUILTIN_DATASETS:
        resolved = datasets(ds.dataset) if datasets else None
        if resolved is None:
            _issue(
                errors, ("data", "dataset"),
                f"unknown dataset {ds.dataset!r}; built-ins: {', '.join(data_mod.BUILTIN_DATASETS)}"
                + (", or the id or name of a stored dataset" if datasets else ""),
            )
        else:
            info = resolved
    else:
        for field, msg in data_mod.check_options(ds):
            _issue(errors, ("data", field), msg)
        if not errors:
            try:
                info = data_mod.describe(ds, spec.seed)
            except data_mod.DataError as exc:
                _issue(errors, ("data", exc.field or "dataset"), str(exc))

    if info is not None:
        n_val = int(round(info.n_samples * ds.validation_split))
        if info.n_samples - n_val < 2:
            _issue(errors, ("data", "validation_split"), "fewer than 2 training samples remain after the split")
        layout: list[dict[str, Any]] = []
        _check_channels_last(spec, layout)
        errors += layout
        try:
            # after a channels-last reshape the shapes that follow would only mislead
            shapes = infer_shapes(spec.model, info.input_shape) if not layout else None
        except ShapeError as exc:
            _issue(errors, ("model", "layers", exc.index, *exc.field), str(exc))
        else:
            if shapes is not None:
                _check_head(spec, info, shapes[-1], errors)
        _check_schedule(spec, info, errors)

    _check_monitors(spec, errors)
    return errors


def _check_schedule(spec: JobSpec, info: Any, errors: list[dict[str, Any]]) -> None:
    """The learning-rate schedule must give a finite float32 rate at every step the job runs (the
    engine's own step count: ``ceil(n_train / batch_size)`` steps an epoch)."""
    from training.schedules import ScheduleError, check_schedule

    lr = spec.optimizer.learning_rate
    if spec.kind != "train" or not isinstance(lr, BaseModel):
        return
    n_train = info.n_samples - int(round(info.n_samples * spec.data.validation_split))
    if n_train < 1:
        return  # reported by the split check
    per_epoch = -(-n_train // min(spec.data.batch_size, n_train))
    total = spec.epochs * per_epoch
    steps = total if spec.max_steps is None else min(total, spec.max_steps)
    try:
        check_schedule(lr, steps=steps, steps_per_epoch=per_epoch, total_steps=total)
    except ScheduleError as exc:
        loc = ("optimizer", "learning_rate", *((exc.field,) if exc.field else ()))
        _issue(errors, loc, f"{exc} (this job runs {steps} steps, {per_epoch} per epoch)", "schedule_error")


#: layers that take (C, H, W) input, and layers that pass a shape through unchanged
_SPATIAL = (Conv2D, MaxPool2D, AvgPool2D)
_ELEMENTWISE = (Dropout, ActivationLayer, BatchNorm)


def _check_channels_last(spec: JobSpec, errors: list[dict[str, Any]]) -> None:
    """A reshape to Keras' (height, width, channels) feeding a convolution or pooling layer, which
    read channels first: [8, 8, 1] would train on 8 channels of 8x1 images. Refused, with the fix."""
    layers = spec.model.layers
    for i, layer in enumerate(layers):
        if not isinstance(layer, Reshape) or len(layer.target_shape) != 3:
            continue
        h, w, c = layer.target_shape
        if c not in (1, 3) or h in (1, 3):
            continue
        nxt = next((j for j in range(i + 1, len(layers)) if not isinstance(layers[j], _ELEMENTWISE)), None)
        if nxt is None or not isinstance(layers[nxt], _SPATIAL):
            continue
        _issue(
            errors, ("model", "layers", i, "target_shape"),
            f"target_shape {[h, w, c]} looks channels-last (Keras' height, width, channels), but layer {nxt} "
            f"({layers[nxt].type}) reads channels-first input (channels, height, width), as PyTorch does; "
            f"use {[c, h, w]}",
        )


def _check_head(spec: JobSpec, info: Any, out_shape: tuple[int, ...], errors: list[dict[str, Any]]) -> None:
    last = len(spec.model.layers) - 1
    loss = spec.loss.name
    where = ("model", "layers", last)
    if len(out_shape) != 1:
        _issue(errors, where, f"the model must end in a flat vector per sample, but its output shape is {list(out_shape)}; add a flatten and a dense layer")
        return
    units = out_shape[0]
    if info.task == "classification":
        k = info.n_classes
        if loss in ("mse", "mae", "huber"):
            _issue(errors, ("loss",), f"dataset {info.name!r} is classification ({k} classes); use sparse_categorical_crossentropy, categorical_crossentropy or binary_crossentropy")
        elif loss == "binary_crossentropy":
            if k != 2:
                _issue(errors, ("loss",), f"binary_crossentropy needs 2 classes, dataset {info.name!r} has {k}; use sparse_categorical_crossentropy")
            elif units != 1:
                _issue(errors, where, f"binary_crossentropy needs 1 output unit, the last layer gives {units}")
        elif units != k:
            _issue(errors, where, f"the last layer gives {units} outputs but dataset {info.name!r} has {k} classes; set units to {k}")
        for i, m in enumerate(spec.metrics):
            if m.name in ("mae", "mse", "rmse"):
                _issue(errors, ("metrics", i), f"{m.name} is a regression metric; for classification use accuracy or top_k_accuracy")
    else:
        t = info.n_targets
        if loss in CLASSIFICATION_LOSSES:
            _issue(errors, ("loss",), f"dataset {info.name!r} is regression; use mse, mae or huber")
        elif units != t:
            _issue(errors, where, f"the last layer gives {units} outputs but dataset {info.name!r} has {t} target(s); set units to {t}")
        for i, m in enumerate(spec.metrics):
            if m.name in ("accuracy", "top_k_accuracy"):
                _issue(errors, ("metrics", i), f"{m.name} needs a classification dataset; for regression use mae, mse or rmse")
    last_layer = spec.model.layers[last]
    act = getattr(last_layer, "activation", "linear")
    if spec.loss.from_logits is True and act in ("softmax", "sigmoid"):
        _issue(errors, ("loss", "from_logits"), f"from_logits is true but the last layer applies {act}; drop the activation or set from_logits to null")


def _check_monitors(spec: JobSpec, errors: list[dict[str, Any]]) -> None:
    train_names = ["loss", *spec.metric_names()]
    has_val = spec.data.validation_split > 0
    known = train_names + ([f"val_{n}" for n in train_names] if has_val else [])
    monitors: list[tuple[tuple[Any, ...], str]] = []
    cb = spec.callbacks
    if cb.early_stopping:
        monitors.append((("callbacks", "early_stopping", "monitor"), cb.early_stopping.monitor))
    if cb.model_checkpoint:
        monitors.append((("callbacks", "model_checkpoint", "monitor"), cb.model_checkpoint.monitor))
        if cb.model_checkpoint.save_freq != "epoch" and cb.model_checkpoint.monitor.startswith("val_"):
            _issue(errors, ("callbacks", "model_checkpoint", "save_freq"),
                   "save_freq in steps cannot monitor a val_* metric (validation runs at epoch end); use save_freq 'epoch' or a training metric")
    if cb.reduce_lr_on_plateau:
        monitors.append((("callbacks", "reduce_lr_on_plateau", "monitor"), cb.reduce_lr_on_plateau.monitor))
        if not isinstance(spec.optimizer.learning_rate, float | int) and spec.optimizer.learning_rate != FIND:
            _issue(errors, ("callbacks", "reduce_lr_on_plateau"),
                   "reduce_lr_on_plateau needs a constant learning rate (as in Keras); use the schedule 'reduce_on_plateau' with warm-up instead")
    lr = spec.optimizer.learning_rate
    if isinstance(lr, ReduceOnPlateau):
        monitors.append((("optimizer", "learning_rate", "monitor"), lr.monitor))
        if cb.reduce_lr_on_plateau:
            _issue(errors, ("callbacks", "reduce_lr_on_plateau"), "the learning rate is already a reduce_on_plateau schedule; give one or the other")
    for loc, name in monitors:
        if name not in known:
            hint = "" if has_val or not name.startswith("val_") else " (validation_split is 0, so no val_* metrics exist)"
            _issue(errors, loc, f"unknown monitor {name!r}{hint}; available: {', '.join(known)}")
    if spec.kind == "train" and spec.max_steps is None and spec.epochs < 1:
        _issue(errors, ("epochs",), "epochs must be >= 1")


def validate_spec(data: Any, datasets: DatasetResolver | None = None) -> JobSpec:
    """Validate a spec (dict or JobSpec) structurally and semantically; raise SpecError listing
    every problem with its JSON path. ``datasets`` maps a stored dataset id to its DatasetInfo."""
    if isinstance(data, JobSpec):
        spec = data
    else:
        try:
            spec = JobSpec.model_validate(data)
        except ValidationError as exc:
            raise SpecError(_format_errors(exc, data)) from None
    errors = semantic_errors(spec, datasets)
    if errors:
        raise SpecError(errors)
    return spec


_SHORTHANDS: dict[str, list[str]] = {
    "Initializer": list(INITIALIZER_NAMES),
    "Loss": list(LOSSES),
    "Metric": list(METRICS),
    "Regularizer": ["l1", "l2", "l1_l2"],
}


def json_schema(ref_template: str = "#/$defs/{model}") -> dict[str, Any]:
    """The JSON Schema of a job spec (draft 2020-12), as published by the API; the string
    shorthands (``"he_normal"``, ``"mse"``, ``"l2"``...) are part of it. ``ref_template`` places
    the definitions elsewhere (the OpenAPI document's ``#/components/schemas/{model}``)."""
    schema = JobSpec.model_json_schema(mode="validation", ref_template=ref_template)
    defs = schema.get("$defs", {})
    for name, names in _SHORTHANDS.items():
        if name in defs:
            obj = defs[name]
            defs[name] = {
                "anyOf": [{"type": "string", "enum": names}, obj],
                "title": obj.get("title", name),
                "description": obj.get("description", ""),
            }
    return schema
