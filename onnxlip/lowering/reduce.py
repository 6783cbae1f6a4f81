"""ReduceSum and ReduceMean -> linear maps; ReduceMax over spatial axes -> max-pooling.

Over spatial axes only (global pooling as torch's dynamo exporter writes it:
ReduceMean over axes [2, 3]) the map is the window sum of GlobalAveragePool,
with a window the size of the reduced axes; over any other axes (channels,
features) it is the exact CSR matrix that adds each input into its output.
Axes come as an attribute (ReduceSum before opset 13, ReduceMean before 18) or
as a constant input; no axes reduce everything unless noop_with_empty_axes.
ReduceMax (global max-pooling as the dynamo exporter may write it) is a
max-pooling block with one window over the reduced spatial axes; over the
batch or channel axis it is refused.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp

from ..layers import Affine, Layer, Reshape
from ..operators.matrix import SparseMap
from .pool import scaled, window_max, window_sum
from .registry import NodeContext, lowering


def _reduced(ctx: NodeContext) -> tuple[list[int] | None, tuple[int, ...], tuple[int, ...]]:
    """(the reduced axes, None for none; the shape with them kept as 1; the output shape)."""
    rank = len(ctx.in_shape)
    axes = ctx.axes(1)
    if not axes:
        if ctx.attr("noop_with_empty_axes", 0):
            return None, ctx.in_shape, ctx.in_shape
        axes = list(range(rank))
    axes = ctx.check_axes(axes, rank)
    kept = tuple(1 if i in axes else d for i, d in enumerate(ctx.in_shape))
    out_shape = kept if ctx.attr("keepdims", 1) else tuple(
        d for i, d in enumerate(ctx.in_shape) if i not in axes)
    return axes, kept, out_shape


def _spatial_kernel(ctx: NodeContext, axes: list[int]) -> tuple[int, ...] | None:
    """The window over the reduced axes of size > 1 when all are spatial (batch 1), else
    None; () when none is larger than 1."""
    moved = [a for a in axes if ctx.in_shape[a] > 1]
    if not moved:
        return ()
    if len(ctx.in_shape) < 3 or ctx.in_shape[0] != 1 or min(moved) < 2:
        return None
    return tuple(ctx.in_shape[i] if i in moved else 1 for i in range(2, len(ctx.in_shape)))


@lowering("ReduceMax")
def lower_reduce_max(ctx: NodeContext) -> list[Layer]:
    axes, kept, out_shape = _reduced(ctx)
    if axes is None:
        return [Reshape(out_shape)]
    kernel = _spatial_kernel(ctx, axes)
    if kernel is None:
        raise ctx.fail(f"ReduceMax over axes {axes} of shape {ctx.in_shape}: only spatial "
                       "axes (2 and beyond, batch 1) are supported")
    layers: list[Layer] = [window_max(ctx.in_shape, kernel)] if kernel else []
    return layers + [Reshape(out_shape)]


@lowering("ReduceSum", "ReduceMean")
def lower_reduce(ctx: NodeContext) -> list[Layer]:
    axes, kept, out_shape = _reduced(ctx)
    if axes is None:
        return [Reshape(out_shape)]
    count = math.prod(ctx.in_shape[a] for a in axes)
    scale = 1.0 / count if ctx.node.op_type == "ReduceMean" else 1.0
    kernel = _spatial_kernel(ctx, axes)
    if kernel == ():  # only axes of size 1: a change of shape (and the mean of one value)
        layers: list[Layer] = []
    elif kernel is not None:
        pool = window_sum(ctx, kernel, (1,) * len(kernel), (0,) * 2 * len(kernel),
                          (1,) * len(kernel))
        layers = scaled(pool, np.full(pool.out_shape, scale)) if scale != 1.0 else [
            Affine(pool, np.zeros(pool.out_size))]
    else:
        layers = [_sum_matrix(ctx, kept, scale)]
    return layers + [Reshape(out_shape)]


def _sum_matrix(ctx: NodeContext, kept: tuple[int, ...], scale: float) -> Affine:
    """out[kept index of i] += scale * in[i], as a CSR matrix."""
    ctx.check_size(kept)
    positions = np.indices(ctx.in_shape, sparse=True)
    rows = np.ravel_multi_index(
        [np.broadcast_to(p if k > 1 else 0, ctx.in_shape) for p, k in zip(positions, kept)], kept
    ).ravel()
    size = math.prod(ctx.in_shape)
    matrix = sp.csr_matrix((np.full(size, scale), (rows, np.arange(size))),
                           shape=(math.prod(kept), size))
    return Affine(SparseMap(matrix, ctx.in_shape, kept), np.zeros(matrix.shape[0]))
