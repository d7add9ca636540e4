"""Weight initializers with Keras (and PyTorch) semantics.

Weights use torch's layout: dense ``(out, in)``, conv ``(out, in, kh, kw)``. Fans follow Keras:
``fan_in = in * receptive_field``, ``fan_out = out * receptive_field``. Keras' "normal" variance
scaling initializers draw from a normal truncated at two standard deviations, with the standard
deviation divided by 0.87962566103423978 so the truncated draw keeps the intended variance.
Note that ``torch.nn.init.trunc_normal_`` cuts at absolute bounds ``a``/``b``, so the bounds are
passed as ``±2 * sd``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

TRUNC_CORRECTION = 0.87962566103423978  # sd of a standard normal truncated to [-2, 2]


def fans(shape: tuple[int, ...]) -> tuple[int, int]:
    """(fan_in, fan_out) of a torch-layout weight of ``shape``, Keras' convention."""
    if len(shape) < 1:
        return 1, 1
    if len(shape) == 1:
        return shape[0], shape[0]
    receptive = math.prod(shape[2:]) if len(shape) > 2 else 1
    return shape[1] * receptive, shape[0] * receptive


def _trunc_normal(t: torch.Tensor, mean: float, sd: float, g: torch.Generator | None) -> torch.Tensor:
    return torch.nn.init.trunc_normal_(t, mean=mean, std=sd, a=mean - 2 * sd, b=mean + 2 * sd, generator=g)


def _variance_scaling(scale: float, mode: str, distribution: str) -> Callable[..., torch.Tensor]:
    def init(t: torch.Tensor, p: Mapping[str, Any], g: torch.Generator | None) -> torch.Tensor:
        fan_in, fan_out = fans(tuple(t.shape))
        n = {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2.0}[mode]
        var = scale / max(1.0, n)
        if distribution == "truncated_normal":
            return _trunc_normal(t, 0.0, math.sqrt(var) / TRUNC_CORRECTION, g)
        if distribution == "normal":
            return torch.nn.init.normal_(t, 0.0, math.sqrt(var), generator=g)
        limit = math.sqrt(3.0 * var)
        return torch.nn.init.uniform_(t, -limit, limit, generator=g)

    return init


def _torch_normal(gain_fn: Callable[[int, int], float]) -> Callable[..., torch.Tensor]:
    def init(t: torch.Tensor, p: Mapping[str, Any], g: torch.Generator | None) -> torch.Tensor:
        fan_in, fan_out = fans(tuple(t.shape))
        return torch.nn.init.normal_(t, 0.0, p.get("gain", 1.0) * gain_fn(fan_in, fan_out), generator=g)

    return init


def _torch_uniform(gain_fn: Callable[[int, int], float]) -> Callable[..., torch.Tensor]:
    def init(t: torch.Tensor, p: Mapping[str, Any], g: torch.Generator | None) -> torch.Tensor:
        fan_in, fan_out = fans(tuple(t.shape))
        limit = math.sqrt(3.0) * p.get("gain", 1.0) * gain_fn(fan_in, fan_out)
        return torch.nn.init.uniform_(t, -limit, limit, generator=g)

    return init


def _orthogonal(t: torch.Tensor, p: Mapping[str, Any], g: torch.Generator | None) -> torch.Tensor:
    return torch.nn.init.orthogonal_(t, gain=p.get("gain", 1.0), generator=g)


@dataclass(frozen=True)
class InitializerInfo:
    """Registry record: name, distribution and scale, parameters with defaults."""

    name: str
    summary: str
    fn: Callable[[torch.Tensor, Mapping[str, Any], torch.Generator | None], torch.Tensor]
    params: dict[str, float] = field(default_factory=dict)


INITIALIZERS: dict[str, InitializerInfo] = {
    i.name: i
    for i in (
        InitializerInfo("glorot_uniform", "uniform, limit sqrt(6/(n+m)) (Keras default)", _variance_scaling(1.0, "fan_avg", "uniform")),
        InitializerInfo("glorot_normal", "truncated normal, sd sqrt(2/(n+m))/0.8796", _variance_scaling(1.0, "fan_avg", "truncated_normal")),
        InitializerInfo("he_uniform", "uniform, limit sqrt(6/n)", _variance_scaling(2.0, "fan_in", "uniform")),
        InitializerInfo("he_normal", "truncated normal, sd sqrt(2/n)/0.8796", _variance_scaling(2.0, "fan_in", "truncated_normal")),
        InitializerInfo("lecun_uniform", "uniform, limit sqrt(3/n)", _variance_scaling(1.0, "fan_in", "uniform")),
        InitializerInfo("lecun_normal", "truncated normal, sd sqrt(1/n)/0.8796", _variance_scaling(1.0, "fan_in", "truncated_normal")),
        InitializerInfo(
            "xavier_normal", "normal, sd gain*sqrt(2/(n+m)) (torch)",
            _torch_normal(lambda n, m: math.sqrt(2.0 / (n + m))), {"gain": 1.0},
        ),
        InitializerInfo(
            "xavier_uniform", "uniform, limit gain*sqrt(6/(n+m)) (torch)",
            _torch_uniform(lambda n, m: math.sqrt(2.0 / (n + m))), {"gain": 1.0},
        ),
        InitializerInfo(
            "kaiming_normal", "normal, sd sqrt(2/n) (torch, fan_in, relu)",
            _torch_normal(lambda n, m: math.sqrt(2.0 / n)), {"gain": 1.0},
        ),
        InitializerInfo(
            "kaiming_uniform", "uniform, limit sqrt(6/n) (torch, fan_in, relu)",
            _torch_uniform(lambda n, m: math.sqrt(2.0 / n)), {"gain": 1.0},
        ),
        InitializerInfo("orthogonal", "orthogonal matrix times gain", _orthogonal, {"gain": 1.0}),
        InitializerInfo("zeros", "0", lambda t, p, g: torch.nn.init.zeros_(t)),
        InitializerInfo("ones", "1", lambda t, p, g: torch.nn.init.ones_(t)),
        InitializerInfo("constant", "value", lambda t, p, g: torch.nn.init.constant_(t, p.get("value", 0.0)), {"value": 0.0}),
        InitializerInfo(
            "normal", "normal(mean, stddev) (Keras RandomNormal)",
            lambda t, p, g: torch.nn.init.normal_(t, p.get("mean", 0.0), p.get("stddev", 0.05), generator=g),
            {"mean": 0.0, "stddev": 0.05},
        ),
        InitializerInfo(
            "uniform", "uniform(minval, maxval) (Keras RandomUniform)",
            lambda t, p, g: torch.nn.init.uniform_(t, p.get("minval", -0.05), p.get("maxval", 0.05), generator=g),
            {"minval": -0.05, "maxval": 0.05},
        ),
        InitializerInfo(
            "truncated_normal", "normal(mean, stddev) cut at 2 sd (Keras TruncatedNormal)",
            lambda t, p, g: _trunc_normal(t, p.get("mean", 0.0), p.get("stddev", 0.05), g),
            {"mean": 0.0, "stddev": 0.05},
        ),
    )
}


def _params(spec: str | Mapping[str, Any] | Any) -> tuple[str, dict[str, Any]]:
    if isinstance(spec, str):
        return spec, {}
    if not isinstance(spec, Mapping):
        spec = spec.model_dump(exclude_none=True)
    params = {k: v for k, v in spec.items() if k != "name" and v is not None}
    return spec["name"], params


@torch.no_grad()
def init_(tensor: torch.Tensor, spec: str | Mapping[str, Any] | Any, generator: torch.Generator | None = None) -> torch.Tensor:
    """Fill ``tensor`` in place by the named initializer (a name, a dict with ``name`` and
    parameters, or a spec model) and return it."""
    name, params = _params(spec)
    info = INITIALIZERS.get(name)
    if info is None:
        raise ValueError(f"unknown initializer {name!r}; known: {', '.join(INITIALIZERS)}")
    return info.fn(tensor, params, generator)


def initialize(spec: str | Mapping[str, Any] | Any, shape: tuple[int, ...], generator: torch.Generator | None = None) -> torch.Tensor:
    """A new float32 tensor of ``shape`` (torch layout) filled by the named initializer."""
    return init_(torch.empty(shape, dtype=torch.float32), spec, generator)
