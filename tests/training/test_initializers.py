"""Exactness tests for training/initializers.py.

Scales come from the table in shared/docs/semantics.md (Keras VarianceScaling family, Keras
RandomNormal/RandomUniform/TruncatedNormal defaults, torch xavier/kaiming), written out here by
hand; torch.nn.init itself serves as the reference for the torch-named initializers.
"""

from __future__ import annotations

import math

import pytest
import torch

from training.initializers import initialize

TRUNC = 0.87962566103423978  # sd of a unit normal truncated to [-2, 2]
DENSE = (1000, 2000)  # torch layout (out, in): fan_in 2000, fan_out 1000
CONV = (256, 128, 3, 3)  # (out, in, kh, kw): fan_in 128*9, fan_out 256*9


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def fan_in(shape):
    return shape[1] * math.prod(shape[2:])


def fan_out(shape):
    return shape[0] * math.prod(shape[2:])


def std(w: torch.Tensor) -> float:
    return w.double().std().item()


def maxabs(w: torch.Tensor) -> float:
    return w.abs().max().item()


# formula sd of the (possibly truncated) distribution, per semantics.md
TRUNCATED = {
    "glorot_normal": lambda s: math.sqrt(2.0 / (fan_in(s) + fan_out(s))),
    "he_normal": lambda s: math.sqrt(2.0 / fan_in(s)),
    "lecun_normal": lambda s: math.sqrt(1.0 / fan_in(s)),
}
UNIFORM_LIMIT = {
    "glorot_uniform": lambda s: math.sqrt(6.0 / (fan_in(s) + fan_out(s))),
    "he_uniform": lambda s: math.sqrt(6.0 / fan_in(s)),
    "lecun_uniform": lambda s: math.sqrt(3.0 / fan_in(s)),
    "xavier_uniform": lambda s: math.sqrt(6.0 / (fan_in(s) + fan_out(s))),
    "kaiming_uniform": lambda s: math.sqrt(6.0 / fan_in(s)),
}
PLAIN_NORMAL = {
    "xavier_normal": lambda s: math.sqrt(2.0 / (fan_in(s) + fan_out(s))),
    "kaiming_normal": lambda s: math.sqrt(2.0 / fan_in(s)),
}


def test_fan_arithmetic_of_this_file():
    # guard for the helpers themselves: conv fans include the receptive field
    assert (fan_in(CONV), fan_out(CONV)) == (1152, 2304)
    assert (fan_in(DENSE), fan_out(DENSE)) == (2000, 1000)


@pytest.mark.parametrize("shape", [DENSE, CONV], ids=["dense", "conv"])
@pytest.mark.parametrize("name", sorted(TRUNCATED))
def test_truncated_normal_family(name, shape):
    w = initialize(name, shape, gen(1))
    assert w.dtype == torch.float32 and tuple(w.shape) == shape
    sd = TRUNCATED[name](shape)
    sd_param = sd / TRUNC
    # the truncated draw keeps the intended variance
    assert std(w) == pytest.approx(sd, rel=0.02)
    assert abs(w.double().mean().item()) < 0.01 * sd
    # cut at 2 * sd_param (not at an absolute +-2) ...
    assert maxabs(w) <= 2 * sd_param * (1 + 1e-6)
    # ... and the cut is reached
    assert maxabs(w) > 1.9 * sd_param


@pytest.mark.parametrize("shape", [DENSE, CONV], ids=["dense", "conv"])
@pytest.mark.parametrize("name", sorted(UNIFORM_LIMIT))
def test_uniform_family(name, shape):
    w = initialize(name, shape, gen(2))
    assert w.dtype == torch.float32 and tuple(w.shape) == shape
    limit = UNIFORM_LIMIT[name](shape)
    assert maxabs(w) <= limit * (1 + 1e-6)
    assert w.max().item() > 0.99 * limit
    assert w.min().item() < -0.99 * limit
    assert std(w) == pytest.approx(limit / math.sqrt(3.0), rel=0.02)


@pytest.mark.parametrize("shape", [DENSE, CONV], ids=["dense", "conv"])
@pytest.mark.parametrize("name", sorted(PLAIN_NORMAL))
def test_torch_normal_family_is_untruncated(name, shape):
    w = initialize(name, shape, gen(3))
    assert w.dtype == torch.float32 and tuple(w.shape) == shape
    sd = PLAIN_NORMAL[name](shape)
    assert std(w) == pytest.approx(sd, rel=0.02)
    assert maxabs(w) > 3.0 * sd  # a truncated draw could never exceed 2 sd


@pytest.mark.parametrize("shape", [DENSE, CONV], ids=["dense", "conv"])
def test_xavier_normal_equals_torch(shape):
    ours = initialize("xavier_normal", shape, gen(7))
    ref = torch.nn.init.xavier_normal_(torch.empty(shape), generator=gen(7))
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=0)


@pytest.mark.parametrize("shape", [DENSE, CONV], ids=["dense", "conv"])
def test_kaiming_normal_equals_torch_fan_in_relu(shape):
    ours = initialize("kaiming_normal", shape, gen(8))
    ref = torch.nn.init.kaiming_normal_(torch.empty(shape), mode="fan_in", nonlinearity="relu", generator=gen(8))
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=0)


@pytest.mark.parametrize("shape", [DENSE, CONV], ids=["dense", "conv"])
def test_xavier_uniform_equals_torch(shape):
    ours = initialize("xavier_uniform", shape, gen(9))
    ref = torch.nn.init.xavier_uniform_(torch.empty(shape), generator=gen(9))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-8)


def test_xavier_normal_gain():
    w = initialize({"name": "xavier_normal", "gain": 2.0}, DENSE, gen(4))
    assert std(w) == pytest.approx(2.0 * math.sqrt(2.0 / 3000), rel=0.02)


def test_orthogonal_square():
    w = initialize("orthogonal", (256, 256), gen(5)).double()
    torch.testing.assert_close(w @ w.T, torch.eye(256, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(w.T @ w, torch.eye(256, dtype=torch.float64), atol=1e-5, rtol=0)


def test_orthogonal_wide_rows_orthonormal():
    w = initialize("orthogonal", (64, 300), gen(5)).double()
    torch.testing.assert_close(w @ w.T, torch.eye(64, dtype=torch.float64), atol=1e-5, rtol=0)


def test_orthogonal_gain():
    w = initialize({"name": "orthogonal", "gain": 0.5}, (50, 50), gen(5)).double()
    torch.testing.assert_close(w @ w.T, 0.25 * torch.eye(50, dtype=torch.float64), atol=1e-5, rtol=0)


def test_zeros_ones_constant():
    assert torch.equal(initialize("zeros", (3, 4)), torch.zeros(3, 4))
    assert torch.equal(initialize("ones", (3, 4, 2, 2)), torch.ones(3, 4, 2, 2))
    c = initialize({"name": "constant", "value": 0.37}, (5, 6))
    assert c.dtype == torch.float32
    assert torch.equal(c, torch.full((5, 6), 0.37, dtype=torch.float32))


def test_normal_keras_defaults():
    w = initialize("normal", DENSE, gen(6))
    assert std(w) == pytest.approx(0.05, rel=0.02)
    assert abs(w.double().mean().item()) < 0.001
    assert maxabs(w) > 3 * 0.05  # RandomNormal is not truncated


def test_normal_custom():
    w = initialize({"name": "normal", "mean": 1.0, "stddev": 0.2}, DENSE, gen(6))
    assert w.double().mean().item() == pytest.approx(1.0, abs=0.002)
    assert std(w) == pytest.approx(0.2, rel=0.02)


def test_uniform_keras_defaults():
    w = initialize("uniform", DENSE, gen(6))
    assert w.min().item() >= -0.05 and w.max().item() <= 0.05
    assert w.min().item() < -0.0495 and w.max().item() > 0.0495


def test_uniform_custom():
    w = initialize({"name": "uniform", "minval": 0.1, "maxval": 0.3}, DENSE, gen(6))
    assert w.min().item() >= 0.1 and w.max().item() <= 0.3
    assert w.min().item() < 0.102 and w.max().item() > 0.298


def test_truncated_normal_keras_defaults():
    w = initialize("truncated_normal", DENSE, gen(6))
    # Keras TruncatedNormal(stddev=0.05): cut at 2 * stddev, stddev not rescaled
    assert maxabs(w) <= 0.1 * (1 + 1e-6)
    assert maxabs(w) > 0.095
    assert std(w) == pytest.approx(0.05 * TRUNC, rel=0.02)


def test_truncated_normal_custom_mean_cut_around_mean():
    w = initialize({"name": "truncated_normal", "mean": 3.0, "stddev": 0.5}, DENSE, gen(6))
    assert w.min().item() >= 3.0 - 1.0 - 1e-6 and w.max().item() <= 3.0 + 1.0 + 1e-6
    assert w.min().item() < 2.05 and w.max().item() > 3.95
    assert std(w) == pytest.approx(0.5 * TRUNC, rel=0.02)


ALL_RANDOM = sorted([*TRUNCATED, *UNIFORM_LIMIT, *PLAIN_NORMAL, "orthogonal", "normal", "uniform", "truncated_normal"])


@pytest.mark.parametrize("name", ALL_RANDOM)
def test_same_seed_same_tensor(name):
    a = initialize(name, (64, 32, 3, 3) if name != "orthogonal" else (64, 96), gen(123))
    b = initialize(name, (64, 32, 3, 3) if name != "orthogonal" else (64, 96), gen(123))
    c = initialize(name, (64, 32, 3, 3) if name != "orthogonal" else (64, 96), gen(124))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_unknown_name_is_an_error():
    with pytest.raises(ValueError):
        initialize("glorot_sideways", (3, 3))
