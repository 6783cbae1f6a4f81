"""Conv -> a convolution map plus its bias."""

from __future__ import annotations

import numpy as np

from ..layers import Affine
from ..operators.conv import ConvMap
from .registry import NodeContext, lowering
from .spatial import check_spatial_input, window_attrs


@lowering("Conv")
def lower_conv(ctx: NodeContext) -> list[Affine]:
    if not ctx.is_data(0) or ctx.is_data(1):
        raise ctx.fail("only a data input convolved with a constant kernel is supported")
    weight = ctx.require_const(1, "kernel")
    if weight.ndim < 3:
        raise ctx.fail(f"kernel of shape {weight.shape} is not (M, C/group, k1, ...)")
    _check_float32_range(ctx, weight, "kernel")
    rank = weight.ndim - 2
    check_spatial_input(ctx, rank)
    kernel = tuple(ctx.attr("kernel_shape", weight.shape[2:]))
    if kernel != weight.shape[2:]:
        raise ctx.fail(f"kernel shape {kernel} does not match weight shape {weight.shape}")
    group = ctx.attr("group", 1)
    channels = ctx.in_shape[1]
    if group <= 0 or weight.shape[1] * group != channels or weight.shape[0] % group:
        raise ctx.fail(
            f"weight shape {weight.shape} with group {group} does not fit input shape {ctx.in_shape}"
        )
    strides, pads, dilations = window_attrs(ctx, kernel)
    conv = ConvMap(weight, ctx.in_shape, strides, pads, dilations, group)
    ctx.check_size(conv.out_shape)
    bias = np.zeros(conv.out_shape)
    if ctx.const(2) is not None:
        b = ctx.require_const(2, "bias").astype(np.float64)
        if b.shape != (weight.shape[0],):
            raise ctx.fail(f"bias shape {b.shape} does not match {weight.shape[0]} output channels")
        bias += b.reshape((1, -1) + (1,) * rank)
    return [Affine(conv, bias.ravel())]


def _check_float32_range(ctx: NodeContext, value: np.ndarray, what: str) -> None:
    """The map computes in float32 (onnxruntime's Conv kernels): squares must stay finite.
    The model's own values go to ConvMap, which keeps them where float32 rounds them."""
    if value.size and np.max(np.abs(value)) > 1e19:
        raise ctx.fail(f"{what} has values of magnitude above 1e19, beyond float32 arithmetic")
