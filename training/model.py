"""Build a torch module from ``spec.model``.

The model is a plain ``nn.Sequential`` (no per-step overhead beyond the layers themselves).
Module names follow the spec: layer ``i`` is ``"{i}"`` and its activation, if any,
``"{i}_act"``, so checkpoint tensors are named ``"{i}.weight"``, ``"{i}.bias"``,
``"{i}.running_mean"``... in torch layouts (dense ``(out, in)``, conv ``(out, in, kh, kw)``).
Activity regularizers are forward hooks on the module whose output they penalise.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from training.initializers import init_
from training.shapes import infer_shapes, pair, same_padding
from training.spec import JobSpec, Regularizer

ACTIVATION_MODULES: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": lambda: nn.LeakyReLU(0.2),  # Keras 3 activations.leaky_relu default slope
    "elu": nn.ELU,
    "selu": nn.SELU,
    "gelu": nn.GELU,  # exact (erf) form, Keras' default approximate=False
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "softmax": lambda: nn.Softmax(dim=-1),
    "softplus": nn.Softplus,
    "softsign": nn.Softsign,
    "relu6": nn.ReLU6,
    "hard_sigmoid": nn.Hardsigmoid,  # relu6(x + 3) / 6, as Keras 3
    "mish": nn.Mish,
}


class KerasBatchNorm(nn.Module):
    """Batch normalization over axis 1 (features or channels) with Keras' conventions:
    ``moving = moving * momentum + batch * (1 - momentum)`` and the biased batch variance in the
    moving variance (torch uses the unbiased one)."""

    def __init__(self, channels: int, momentum: float, epsilon: float, center: bool, scale: bool) -> None:
        super().__init__()
        self.momentum, self.epsilon = momentum, epsilon
        self.weight = nn.Parameter(torch.ones(channels)) if scale else None
        self.bias = nn.Parameter(torch.zeros(channels)) if center else None
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
        if self.training:
            dims = [0, *range(2, x.dim())]
            mean = x.mean(dim=dims)
            var = x.var(dim=dims, unbiased=False)
            with torch.no_grad():
                self.running_mean.mul_(self.momentum).add_(mean.detach(), alpha=1 - self.momentum)
                self.running_var.mul_(self.momentum).add_(var.detach(), alpha=1 - self.momentum)
        else:
            mean, var = self.running_mean, self.running_var
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.epsilon)
        if self.weight is not None:
            y = y * self.weight.view(shape)
        if self.bias is not None:
            y = y + self.bias.view(shape)
        return y


class Reshape(nn.Module):
    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.shape = shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], *self.shape)


class AvgPoolSame(nn.Module):
    """TF-style 'same' average pooling: padded cells do not count in the average."""

    def __init__(self, kernel: tuple[int, int], stride: tuple[int, int], pads: tuple[int, int, int, int]) -> None:
        super().__init__()
        self.kernel, self.stride, self.pads = kernel, stride, pads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        summed = F.avg_pool2d(F.pad(x, self.pads), self.kernel, self.stride, divisor_override=1)
        ones = torch.ones((1, 1, *x.shape[2:]), dtype=x.dtype, device=x.device)
        count = F.avg_pool2d(F.pad(ones, self.pads), self.kernel, self.stride, divisor_override=1)
        return summed / count


@dataclass
class BuiltModel:
    module: nn.Sequential
    # (parameter, l1, l2) for kernel/bias regularizers
    weight_penalties: list[tuple[nn.Parameter, float, float]] = field(default_factory=list)
    activity_terms: list[torch.Tensor] = field(default_factory=list)  # filled by hooks each forward
    output_activation: str = "linear"  # activation of the last layer as written in the spec
    stripped_output_activation: bool = False  # the module outputs the pre-activation (logits)
    parameter_count: int = 0

    def penalty(self) -> torch.Tensor | None:
        """Kernel/bias penalties plus this forward pass's activity penalties (None when none)."""
        total: torch.Tensor | None = None
        for p, l1, l2 in self.weight_penalties:
            term = (l1 * p.abs().sum() if l1 else 0) + (l2 * p.square().sum() if l2 else 0)
            total = term if total is None else total + term
        if self.activity_terms:
            for term in self.activity_terms:
                total = term if total is None else total + term
            self.activity_terms.clear()
        return total


def _activity_hook(built: BuiltModel, reg: Regularizer) -> Callable[..., None]:
    l1, l2 = reg.l1, reg.l2

    def hook(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        out = output.float()
        term = (l1 * out.abs().sum() if l1 else 0) + (l2 * out.square().sum() if l2 else 0)
        built.activity_terms.append(term / output.shape[0])

    return hook


def build_model(spec: JobSpec, input_shape: tuple[int, ...], strip_output_activation: bool) -> BuiltModel:
    """Create the layers in spec order, initializing each weighted layer's kernel then bias from
    the global torch RNG (call ``torch.manual_seed`` first for reproducibility)."""
    shapes = infer_shapes(spec.model, input_shape)
    modules: OrderedDict[str, nn.Module] = OrderedDict()
    built = BuiltModel(module=nn.Sequential())
    hooks: list[tuple[str, Regularizer]] = []
    layers = spec.model.layers
    for i, layer in enumerate(layers):
        shape_in = shapes[i]
        t = layer.type
        name = str(i)
        if t == "dense":
            mod: nn.Module = nn.Linear(shape_in[-1], layer.units, bias=layer.use_bias)
        elif t == "conv2d":
            k, s, d = pair(layer.kernel_size), pair(layer.strides), pair(layer.dilation_rate)
            conv = nn.Conv2d(shape_in[0], layer.filters, k, s, dilation=d, bias=layer.use_bias)
            if layer.padding == "same":
                ph = same_padding(shape_in[1], k[0], s[0], d[0])
                pw = same_padding(shape_in[2], k[1], s[1], d[1])
                if ph[0] == ph[1] and pw[0] == pw[1]:
                    conv.padding = (ph[0], pw[0])
                    mod = conv
                else:
                    modules[f"{i}_pad"] = nn.ZeroPad2d((pw[0], pw[1], ph[0], ph[1]))
                    mod = conv
            else:
                mod = conv
        elif t in ("max_pool2d", "avg_pool2d"):
            k = pair(layer.pool_size)
            s = pair(layer.strides if layer.strides is not None else layer.pool_size)
            if layer.padding == "same":
                ph, pw = same_padding(shape_in[1], k[0], s[0]), same_padding(shape_in[2], k[1], s[1])
                pads = (pw[0], pw[1], ph[0], ph[1])
                if t == "max_pool2d":
                    modules[f"{i}_pad"] = nn.ConstantPad2d(pads, float("-inf"))
                    mod = nn.MaxPool2d(k, s)
                else:
                    mod = AvgPoolSame(k, s, pads)
            else:
                mod = nn.MaxPool2d(k, s) if t == "max_pool2d" else nn.AvgPool2d(k, s)
        elif t == "flatten":
            mod = nn.Flatten()
        elif t == "reshape":
            mod = Reshape(shapes[i + 1])
        elif t == "dropout":
            mod = nn.Dropout(layer.rate)
        elif t == "batch_norm":
            mod = KerasBatchNorm(shape_in[0], layer.momentum, layer.epsilon, layer.center, layer.scale)
        elif t == "layer_norm":
            mod = nn.LayerNorm(shape_in[-1], eps=layer.epsilon, elementwise_affine=layer.center or layer.scale, bias=layer.center)
            if not layer.scale and mod.weight is not None:
                mod.weight.requires_grad_(False)
        elif t == "activation":
            mod = ACTIVATION_MODULES[layer.activation]() if layer.activation != "linear" else nn.Identity()
        else:  # pragma: no cover - the spec's discriminator makes this unreachable
            raise ValueError(f"unknown layer type {t!r}")
        modules[name] = mod
        last_name = name

        if t in ("dense", "conv2d"):
            init_(mod.weight, layer.kernel_initializer or spec.model.kernel_initializer)
            if mod.bias is not None:
                init_(mod.bias, layer.bias_initializer or spec.model.bias_initializer)
            if layer.kernel_regularizer and (layer.kernel_regularizer.l1 or layer.kernel_regularizer.l2):
                built.weight_penalties.append((mod.weight, layer.kernel_regularizer.l1, layer.kernel_regularizer.l2))
            if mod.bias is not None and layer.bias_regularizer and (layer.bias_regularizer.l1 or layer.bias_regularizer.l2):
                built.weight_penalties.append((mod.bias, layer.bias_regularizer.l1, layer.bias_regularizer.l2))
            act = layer.activation
            is_last = i == len(layers) - 1
            if act != "linear" and not (is_last and strip_output_activation):
                modules[f"{i}_act"] = ACTIVATION_MODULES[act]()
                last_name = f"{i}_act"
            if layer.activity_regularizer and (layer.activity_regularizer.l1 or layer.activity_regularizer.l2):
                hooks.append((last_name, layer.activity_regularizer))
        elif t == "activation" and i == len(layers) - 1 and strip_output_activation:
            modules[name] = nn.Identity()

    built.module = nn.Sequential(modules)
    for mod_name, reg in hooks:
        built.module.get_submodule(mod_name).register_forward_hook(_activity_hook(built, reg))
    last = layers[-1]
    built.output_activation = getattr(last, "activation", "linear")
    built.stripped_output_activation = strip_output_activation
    built.parameter_count = sum(p.numel() for p in built.module.parameters() if p.requires_grad)
    return built
