"""Shape inference and parameter counting for a model spec, in pure Python.

The API uses it to reject a model that cannot run (bad conv arithmetic, a head that does not fit
the task, too many parameters) before anything is allocated; the engine uses the same shapes to
build the torch modules. Per-sample shapes, channels first: flat ``(F,)`` or images ``(C, H, W)``.
"""

from __future__ import annotations

import math
from typing import Any

Shape = tuple[int, ...]


class ShapeError(ValueError):
    """A layer that cannot take its input. ``index`` is the layer's position, ``field`` the
    offending field inside it (may be empty)."""

    def __init__(self, index: int, message: str, field: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.index = index
        self.field = field


def pair(v: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(v, int):
        return v, v
    a, b = v
    return int(a), int(b)


def conv_out(size: int, kernel: int, stride: int, padding: str, dilation: int = 1) -> int:
    """Output length along one axis (Keras/TF rules; 'same' pads so out = ceil(size / stride))."""
    if padding == "same":
        return math.ceil(size / stride)
    return (size - dilation * (kernel - 1) - 1) // stride + 1


def same_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """(before, after) padding for TF-style 'same' (the extra pixel goes after, as in Keras)."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + dilation * (kernel - 1) + 1 - size, 0)
    return total // 2, total - total // 2


def _layer_out(i: int, layer: Any, shape: Shape) -> Shape:
    t = layer.type
    if t == "dense":
        return (*shape[:-1], layer.units)
    if t in ("conv2d", "max_pool2d", "avg_pool2d"):
        if len(shape) != 3:
            raise ShapeError(
                i, f"{t} needs (channels, height, width) input, got {list(shape)}; "
                "use data.layout 'image' (digits) or add a reshape layer before it",
            )
        c, h, w = shape
        if t == "conv2d":
            (kh, kw), (sh, sw), (dh, dw) = pair(layer.kernel_size), pair(layer.strides), pair(layer.dilation_rate)
            field = ("kernel_size",)
        else:
            kh, kw = pair(layer.pool_size)
            sh, sw = pair(layer.strides if layer.strides is not None else layer.pool_size)
            dh = dw = 1
            field = ("pool_size",)
        if min(kh, kw, sh, sw, dh, dw) < 1:
            raise ShapeError(i, f"{t}: sizes, strides and dilation must be >= 1", field)
        oh = conv_out(h, kh, sh, layer.padding, dh)
        ow = conv_out(w, kw, sw, layer.padding, dw)
        if oh < 1 or ow < 1:
            raise ShapeError(
                i, f"{t}: a {kh}x{kw} window (stride {sh}x{sw}, padding {layer.padding!r}) does not fit "
                f"the {h}x{w} input; use a smaller kernel/pool, padding 'same', or fewer downsampling layers",
                field,
            )
        return (layer.filters if t == "conv2d" else c, oh, ow)
    if t == "flatten":
        return (math.prod(shape),)
    if t == "reshape":
        target = list(layer.target_shape)
        if target.count(-1) > 1 or any(d == 0 or d < -1 for d in target):
            raise ShapeError(i, "reshape: target_shape takes positive sizes and at most one -1", ("target_shape",))
        total = math.prod(shape)
        known = math.prod(d for d in target if d != -1)
        if -1 in target:
            if total % known:
                raise ShapeError(i, f"reshape: {total} values per sample cannot be arranged as {target}", ("target_shape",))
            target[target.index(-1)] = total // known
        if math.prod(target) != total:
            raise ShapeError(i, f"reshape: {list(shape)} has {total} values per sample, {target} needs {math.prod(target)}", ("target_shape",))
        return tuple(target)
    return shape  # dropout, batch_norm, layer_norm, activation


def infer_shapes(model: Any, input_shape: Shape) -> list[Shape]:
    """Per-sample output shape after each layer (``[input, after layer 0, ...]``)."""
    shapes = [tuple(input_shape)]
    for i, layer in enumerate(model.layers):
        shapes.append(_layer_out(i, layer, shapes[-1]))
    return shapes


def count_parameters(model: Any, input_shape: Shape) -> int:
    """Trainable parameters of the model the spec describes (no allocation)."""
    shapes = infer_shapes(model, input_shape)
    total = 0
    for layer, shape in zip(model.layers, shapes, strict=False):
        t = layer.type
        if t == "dense":
            total += shape[-1] * layer.units + (layer.units if layer.use_bias else 0)
        elif t == "conv2d":
            kh, kw = pair(layer.kernel_size)
            total += shape[0] * layer.filters * kh * kw + (layer.filters if layer.use_bias else 0)
        elif t == "batch_norm":
            total += shape[0] * (int(layer.center) + int(layer.scale))
        elif t == "layer_norm":
            total += shape[-1] * (int(layer.center) + int(layer.scale))
    return total


def multiply_adds(model: Any, input_shape: Shape) -> int:
    """Multiply-adds of one sample's forward pass through the dense and conv2d layers (the
    arithmetic of a step; the backward pass is about twice as much again). Dense: each output
    position's inputs x units; conv2d: each output pixel's ``in_channels x kh x kw`` x filters."""
    shapes = infer_shapes(model, input_shape)
    total = 0
    for layer, shape, out in zip(model.layers, shapes, shapes[1:], strict=False):
        if layer.type == "dense":
            total += math.prod(shape) * layer.units
        elif layer.type == "conv2d":
            kh, kw = pair(layer.kernel_size)
            total += math.prod(out) * shape[0] * kh * kw
    return total
