"""Attribute handling shared by convolution and pooling lowerings."""

from __future__ import annotations

import math

from .registry import NodeContext


def window_attrs(ctx: NodeContext, kernel: tuple[int, ...]) -> tuple[tuple, tuple, tuple]:
    """(strides, pads, dilations) with auto_pad resolved to explicit pads."""
    rank = len(kernel)
    strides = tuple(ctx.attr("strides", [1] * rank))
    dilations = tuple(ctx.attr("dilations", [1] * rank))
    pads = tuple(ctx.attr("pads", [0] * 2 * rank))
    check_window_values(ctx, kernel, strides, pads, dilations)
    auto = ctx.str_attr("auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        pads = _same_pads(ctx.in_shape[2:], kernel, strides, dilations, auto == "SAME_UPPER")
    elif auto == "VALID":
        pads = (0,) * 2 * rank
    elif auto != "NOTSET":
        raise ctx.fail(f"auto_pad {auto!r} is not supported")
    _check_window(ctx, kernel, pads, dilations)
    return strides, pads, dilations


def check_window_values(ctx: NodeContext, kernel, strides, pads, dilations) -> None:
    """Lengths that match the kernel's rank, positive strides and dilations, pads >= 0."""
    rank = len(kernel)
    if len(strides) != rank or len(dilations) != rank or len(pads) != 2 * rank:
        raise ctx.fail(f"strides/pads/dilations do not match kernel rank {rank}")
    if min(strides) <= 0 or min(dilations) <= 0 or min(kernel) <= 0:
        raise ctx.fail(f"kernel {kernel}, strides {strides} and dilations {dilations} must be positive")
    if min(pads) < 0:
        raise ctx.fail(f"negative pads {pads} are not supported")


def _check_window(ctx: NodeContext, kernel, pads, dilations) -> None:
    """The padded input must be of a sane size and hold one dilated kernel."""
    rank = len(kernel)
    spatial = ctx.in_shape[2:]
    padded = tuple(spatial[i] + pads[i] + pads[rank + i] for i in range(rank))
    ctx.check_size((ctx.in_shape[1], *padded), "padded input")
    for i in range(rank):
        extent = (kernel[i] - 1) * dilations[i] + 1
        if extent > padded[i]:
            raise ctx.fail(
                f"the kernel (extent {extent} on spatial axis {i}) is larger than the padded "
                f"input {padded} of input shape {ctx.in_shape}"
            )


def _same_pads(spatial, kernel, strides, dilations, upper: bool) -> tuple[int, ...]:
    begin, end = [], []
    for size, k, s, d in zip(spatial, kernel, strides, dilations):
        total = max(0, (math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size)
        small = total // 2
        begin.append(small if upper else total - small)
        end.append(total - begin[-1])
    return tuple(begin + end)


def check_spatial_input(ctx: NodeContext, rank: int) -> None:
    """The input must be (1, C, ...) with `rank` spatial dims: windows are per image."""
    if len(ctx.in_shape) != rank + 2:
        raise ctx.fail(f"input shape {ctx.in_shape} is not (N, C, ...) with {rank} spatial dims")
    if ctx.in_shape[0] != 1:
        raise ctx.fail(f"input shape {ctx.in_shape} has batch {ctx.in_shape[0]}; only batch 1 "
                       "is bounded (does a Transpose or Reshape before it move the batch axis?)")
