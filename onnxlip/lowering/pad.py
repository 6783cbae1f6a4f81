"""Pad (constant mode) -> a selection map plus the pad value as bias."""

from __future__ import annotations

import math

import numpy as np

from ..layers import Affine
from ..operators.monomial import MonomialMap
from .registry import NodeContext, lowering


@lowering("Pad")
def lower_pad(ctx: NodeContext) -> list[Affine]:
    mode = ctx.str_attr("mode", "constant")
    if mode != "constant":
        raise ctx.fail(f"mode {mode!r} is not supported (only 'constant')")
    rank = len(ctx.in_shape)
    if rank == 0:
        raise ctx.fail("cannot pad a scalar")
    pads = ctx.attr("pads")
    if pads is None:
        pads = ctx.require_const(1, "pads").astype(np.int64).ravel().tolist()
    value = ctx.attr("value", None)
    if value is None:
        value = ctx.const(2)
    value = 0.0 if value is None or np.size(value) == 0 else float(np.ravel(value)[0])
    if not np.isfinite(value):
        raise ctx.fail(f"pad value {value} is not finite")
    axes = ctx.const(3)
    begin, end = _per_axis(ctx, pads, rank, None if axes is None else axes.ravel().tolist())
    out_shape = tuple(d + b + e for d, b, e in zip(ctx.in_shape, begin, end))
    if min(out_shape) <= 0:
        raise ctx.fail(f"pads {pads} leave an empty output from {ctx.in_shape}")
    ctx.check_size(out_shape)
    source = np.full(out_shape, -1, dtype=np.int64)
    index = np.arange(math.prod(ctx.in_shape)).reshape(ctx.in_shape)
    src = tuple(slice(max(0, -b), d - max(0, -e)) for d, b, e in zip(ctx.in_shape, begin, end))
    dst = tuple(slice(max(0, b), max(0, b) + s.stop - s.start) for b, s in zip(begin, src))
    source[dst] = index[src]
    select = MonomialMap(source.ravel(), None, ctx.in_shape, out_shape)
    bias = np.where(source.ravel() < 0, value, 0.0)
    return [Affine(select, bias)]


def _per_axis(ctx: NodeContext, pads, rank: int, axes) -> tuple[list[int], list[int]]:
    if axes is not None and any(not -rank <= a < rank for a in axes):
        raise ctx.fail(f"axes {axes} are out of range for rank {rank}")
    axes = list(range(rank)) if axes is None else [a % rank for a in axes]
    if len(pads) != 2 * len(axes):
        raise ctx.fail(f"pads {pads} do not match {len(axes)} axes")
    begin, end = [0] * rank, [0] * rank
    for i, a in enumerate(axes):
        begin[a], end[a] = int(pads[i]), int(pads[len(axes) + i])
    if begin[0] or end[0]:
        raise ctx.fail("padding the batch dimension is not supported")
    return begin, end
