"""Pooling: MaxPool and GlobalMaxPool (their own block), AveragePool and
GlobalAveragePool (affine)."""

from __future__ import annotations

import math

import numpy as np

from ..layers import Affine, MaxPool
from ..operators.chain import ChainMap
from ..operators.conv import ConvMap
from ..operators.monomial import MonomialMap
from ..operators.ort import NodeSession
from .registry import NodeContext, lowering
from .spatial import check_spatial_input, window_attrs


def _kernel(ctx: NodeContext) -> tuple[int, ...]:
    kernel = tuple(ctx.attr("kernel_shape", ()))
    if not kernel:
        raise ctx.fail("kernel_shape is missing")
    check_spatial_input(ctx, len(kernel))
    return kernel


def _pool_window(ctx: NodeContext, kernel) -> tuple[tuple, tuple, tuple]:
    """window_attrs, plus onnxruntime's rule for pooling: pads smaller than the kernel."""
    strides, pads, dilations = window_attrs(ctx, kernel)
    rank = len(kernel)
    if any(pads[i] >= kernel[i % rank] for i in range(2 * rank)):
        raise ctx.fail(f"pads {pads} must be smaller than the kernel {kernel}")
    return strides, pads, dilations


@lowering("MaxPool")
def lower_maxpool(ctx: NodeContext) -> list[MaxPool]:
    kernel = _kernel(ctx)
    strides, pads, dilations = _pool_window(ctx, kernel)
    ceil_mode = ctx.attr("ceil_mode", 0)
    session = NodeSession("MaxPool", {}, len(ctx.in_shape), kernel_shape=list(kernel),
                          strides=list(strides), pads=list(pads), dilations=list(dilations),
                          ceil_mode=ceil_mode)
    out_shape = session(np.zeros(ctx.in_shape, dtype=np.float32)).shape
    ctx.check_size(out_shape)
    return [MaxPool(ctx.in_shape, out_shape, kernel, strides, pads, dilations, ceil_mode)]


@lowering("GlobalMaxPool")
def lower_global_maxpool(ctx: NodeContext) -> list[MaxPool]:
    """One window per channel, the whole spatial extent: a MaxPool without pads."""
    return [window_max(ctx.in_shape, _global_kernel(ctx))]


def _global_kernel(ctx: NodeContext) -> tuple[int, ...]:
    """The whole spatial extent of a global pooling's input (checked to have one)."""
    if len(ctx.in_shape) < 3:
        raise ctx.fail(f"input shape {ctx.in_shape} has no spatial dimensions")
    check_spatial_input(ctx, len(ctx.in_shape) - 2)
    return tuple(ctx.in_shape[2:])


def window_max(in_shape: tuple[int, ...], kernel: tuple[int, ...]) -> MaxPool:
    """Max-pooling by windows of `kernel` that tile the input (stride = kernel, no pads)."""
    rank = len(kernel)
    out_shape = (*in_shape[:2], *(n // k for n, k in zip(in_shape[2:], kernel)))
    return MaxPool(in_shape, out_shape, kernel, kernel, (0,) * 2 * rank, (1,) * rank, 0)


@lowering("AveragePool")
def lower_averagepool(ctx: NodeContext) -> list[Affine]:
    kernel = _kernel(ctx)
    strides, pads, dilations = _pool_window(ctx, kernel)
    pool = window_sum(ctx, kernel, strides, pads, dilations)
    if ctx.attr("ceil_mode", 0):
        exact = NodeSession("AveragePool", {}, len(ctx.in_shape), kernel_shape=list(kernel),
                            strides=list(strides), pads=list(pads), ceil_mode=1)
        if exact(np.zeros(ctx.in_shape, np.float32)).shape != pool.out_shape:
            raise ctx.fail("ceil_mode=1 that adds partial windows is not supported")
    if ctx.attr("count_include_pad", 0) or not any(pads):
        count = np.full(pool.out_shape, float(math.prod(kernel)))
    else:
        ones = ConvMap(np.ones((1, 1, *kernel)), (1, 1, *ctx.in_shape[2:]), strides, pads,
                       dilations, 1)
        count = np.broadcast_to(ones.matvec(np.ones(ones.in_size)).reshape(ones.out_shape),
                                pool.out_shape)
    return scaled(pool, 1.0 / count)


@lowering("GlobalAveragePool")
def lower_global_averagepool(ctx: NodeContext) -> list[Affine]:
    kernel = _global_kernel(ctx)
    rank = len(kernel)
    pool = window_sum(ctx, kernel, (1,) * rank, (0,) * 2 * rank, (1,) * rank)
    return scaled(pool, np.full(pool.out_shape, 1.0 / math.prod(kernel)))


def window_sum(ctx: NodeContext, kernel, strides, pads, dilations) -> ConvMap:
    channels = ctx.in_shape[1]
    ctx.check_size((channels, *kernel), "kernel")
    pool = ConvMap(np.ones((channels, 1, *kernel)), ctx.in_shape, strides, pads, dilations,
                   channels)
    ctx.check_size(pool.out_shape)
    return pool


def scaled(pool: ConvMap, scale: np.ndarray) -> list[Affine]:
    average = ChainMap([pool, MonomialMap.diagonal(scale, pool.out_shape)])
    return [Affine(average, np.zeros(average.out_size))]
