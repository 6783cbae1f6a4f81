"""Conv and ConvTranspose -> a (transposed) convolution map plus its bias."""

from __future__ import annotations

import numpy as np

from ..layers import Affine
from ..operators.conv import ConvMap, ConvTransposeMap
from .registry import NodeContext, lowering
from .spatial import check_spatial_input, check_window_values, window_attrs


@lowering("Conv")
def lower_conv(ctx: NodeContext) -> list[Affine]:
    weight = _kernel_weight(ctx)
    kernel = weight.shape[2:]
    group = ctx.attr("group", 1)
    channels = ctx.in_shape[1]
    if group <= 0 or weight.shape[1] * group != channels or weight.shape[0] % group:
        raise ctx.fail(
            f"weight shape {weight.shape} with group {group} does not fit input shape {ctx.in_shape}"
        )
    strides, pads, dilations = window_attrs(ctx, kernel)
    conv = ConvMap(weight, ctx.in_shape, strides, pads, dilations, group)
    ctx.check_size(conv.out_shape)
    return [Affine(conv, _bias(ctx, conv.out_shape))]


def _kernel_weight(ctx: NodeContext) -> np.ndarray:
    """The constant kernel (M, C/group, k1, ...) as the model has it, matching
    kernel_shape (ConvMap keeps it where float32 rounds it)."""
    if not ctx.is_data(0) or ctx.is_data(1):
        raise ctx.fail("only a data input convolved with a constant kernel is supported")
    weight = ctx.require_const(1, "kernel")
    if weight.ndim < 3:
        raise ctx.fail(f"kernel of shape {weight.shape} is not (M, C/group, k1, ...)")
    _check_float32_range(ctx, weight, "kernel")
    check_spatial_input(ctx, weight.ndim - 2)
    kernel = tuple(ctx.attr("kernel_shape", weight.shape[2:]))
    if kernel != weight.shape[2:]:
        raise ctx.fail(f"kernel shape {kernel} does not match weight shape {weight.shape}")
    return weight


def _bias(ctx: NodeContext, out_shape: tuple[int, ...]) -> np.ndarray:
    """Input 2 (one value per output channel) broadcast over the output, flat."""
    bias = np.zeros(out_shape)
    if ctx.const(2) is not None:
        b = ctx.require_const(2, "bias").astype(np.float64)
        if b.shape != (out_shape[1],):
            raise ctx.fail(f"bias shape {b.shape} does not match {out_shape[1]} output channels")
        bias += b.reshape((1, -1) + (1,) * (len(out_shape) - 2))
    return bias.ravel()


@lowering("ConvTranspose")
def lower_conv_transpose(ctx: NodeContext) -> list[Affine]:
    """The adjoint of the convolution from the output back to the input (the
    weight (C, M/group, k...) read as a convolution's (M', C'/group, k...))."""
    weight = _kernel_weight(ctx)
    rank = weight.ndim - 2
    group = ctx.attr("group", 1)
    if group <= 0 or weight.shape[0] != ctx.in_shape[1] or weight.shape[0] % group:
        raise ctx.fail(
            f"weight shape {weight.shape} with group {group} does not fit input shape {ctx.in_shape}"
        )
    strides = tuple(ctx.attr("strides", [1] * rank))
    dilations = tuple(ctx.attr("dilations", [1] * rank))
    extra = tuple(ctx.attr("output_padding", [0] * rank))
    if len(extra) != rank or any(not 0 <= e < max(s, d) for e, s, d in zip(extra, strides, dilations)):
        raise ctx.fail(f"output_padding {list(extra)} must be below the strides or dilations")
    full = tuple(strides[i] * (ctx.in_shape[2 + i] - 1) + extra[i]
                 + (weight.shape[2 + i] - 1) * dilations[i] + 1 for i in range(rank))
    pads = _transpose_pads(ctx, full, strides)
    check_window_values(ctx, weight.shape[2:], strides, pads, dilations)
    spatial = tuple(full[i] - pads[i] - pads[rank + i] for i in range(rank))
    out_shape = (1, weight.shape[1] * group, *spatial)
    if min(spatial) <= 0:
        raise ctx.fail(f"pads {list(pads)} leave an empty output {out_shape}")
    ctx.check_size(out_shape)
    conv = ConvMap(weight, out_shape, strides, pads, dilations, group)
    if conv.out_shape != ctx.in_shape:
        raise ctx.fail(f"pads {list(pads)} and output_padding {list(extra)} do not make the "
                       f"adjoint of a convolution on input shape {ctx.in_shape}")
    return [Affine(ConvTransposeMap(conv), _bias(ctx, out_shape))]


def _check_float32_range(ctx: NodeContext, value: np.ndarray, what: str) -> None:
    """The map computes in float32 (onnxruntime's Conv kernels): squares must stay finite."""
    if value.size and np.max(np.abs(value)) > 1e19:
        raise ctx.fail(f"{what} has values of magnitude above 1e19, beyond float32 arithmetic")


def _transpose_pads(ctx: NodeContext, full: tuple[int, ...], strides) -> tuple[int, ...]:
    """Explicit pads of a ConvTranspose whose unpadded output is `full`: from the
    pads attribute, or (ONNX's rule) from output_shape / auto_pad SAME_*, the odd
    unit at the end for SAME_UPPER and at the start otherwise."""
    rank = len(full)
    auto = ctx.str_attr("auto_pad", "NOTSET")
    if auto not in ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"):
        raise ctx.fail(f"auto_pad {auto!r} is not supported")
    target = ctx.attr("output_shape")
    if target is None and auto.startswith("SAME"):
        target = [d * s for d, s in zip(ctx.in_shape[2:], strides)]
    if target is None:
        return (0,) * 2 * rank if auto == "VALID" else tuple(ctx.attr("pads", [0] * 2 * rank))
    target = list(target)[-rank:]
    total = [f - t for f, t in zip(full, target)]
    if len(target) != rank or min(total) < 0:
        raise ctx.fail(f"output_shape {list(ctx.attr('output_shape', target))} does not fit the "
                       f"input shape {ctx.in_shape} (at most {list(full)})")
    small = [t // 2 for t in total]
    if auto == "SAME_UPPER":
        return tuple(small) + tuple(t - h for t, h in zip(total, small))
    return tuple(t - h for t, h in zip(total, small)) + tuple(small)
