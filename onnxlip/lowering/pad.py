"""Pad, Slice and Split -> selection maps (plus the pad value as bias).

Each output element is one input element (or, for constant padding, the pad
value): the map picks it by index. Edge, reflect and wrap padding repeat input
elements, so their maps are selections that are not monomial.
"""

from __future__ import annotations

import math

import numpy as np

from ..layers import Affine
from ..operators.monomial import MonomialMap
from .registry import NodeContext, lowering

#: ONNX pad modes and numpy's name for each.
PAD_MODES = {"constant": "constant", "edge": "edge", "reflect": "reflect", "wrap": "wrap"}


def _selection(ctx: NodeContext, source: np.ndarray, value: float = 0.0) -> list[Affine]:
    """out = in[source] (value where source < 0) as an affine layer."""
    ctx.check_size(source.shape)
    select = MonomialMap(source.ravel(), None, ctx.in_shape, source.shape)
    return [Affine(select, np.where(source.ravel() < 0, value, 0.0))]


def _index(ctx: NodeContext) -> np.ndarray:
    return np.arange(math.prod(ctx.in_shape)).reshape(ctx.in_shape)


@lowering("Pad")
def lower_pad(ctx: NodeContext) -> list[Affine]:
    mode = ctx.str_attr("mode", "constant")
    if mode not in PAD_MODES:
        raise ctx.fail(f"mode {mode!r} is not supported (only {', '.join(PAD_MODES)})")
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
    axes = ctx.axes(3)
    begin, end = _per_axis(ctx, pads, rank, axes)
    out_shape = tuple(d + b + e for d, b, e in zip(ctx.in_shape, begin, end))
    if min(out_shape) <= 0:
        raise ctx.fail(f"pads {pads} leave an empty output from {ctx.in_shape}")
    ctx.check_size(out_shape)
    crop = tuple(slice(max(0, -b), d - max(0, -e)) for d, b, e in zip(ctx.in_shape, begin, end))
    kept = _index(ctx)[crop]
    widths = [(max(0, b), max(0, e)) for b, e in zip(begin, end)]
    if mode == "constant":
        return _selection(ctx, np.pad(kept, widths, constant_values=-1), value)
    shorter = {"edge": -math.inf, "reflect": 1, "wrap": 0}[mode]  # widest pad: dim - shorter
    if any(max(w) > d - shorter for w, d in zip(widths, kept.shape) if max(w)):
        raise ctx.fail(f"{mode} pads {pads} are too wide for input shape {ctx.in_shape}")
    return _selection(ctx, np.pad(kept, widths, mode=PAD_MODES[mode]))


def _per_axis(ctx: NodeContext, pads, rank: int, axes) -> tuple[list[int], list[int]]:
    axes = list(range(rank)) if axes is None else ctx.check_axes(axes, rank)
    if len(pads) != 2 * len(axes):
        raise ctx.fail(f"pads {pads} do not match {len(axes)} axes")
    begin, end = [0] * rank, [0] * rank
    for i, a in enumerate(axes):
        begin[a], end[a] = int(pads[i]), int(pads[len(axes) + i])
    if begin[0] or end[0]:
        raise ctx.fail("padding the batch dimension is not supported")
    return begin, end


@lowering("Slice")
def lower_slice(ctx: NodeContext) -> list[Affine]:
    """Starts, ends, axes, steps as inputs (opset 10+) or attributes (opset 1)."""
    rank = len(ctx.in_shape)
    if ctx.attr("starts") is not None:
        starts, ends = ctx.attr("starts"), ctx.attr("ends")
        axes, steps = ctx.attr("axes"), None
    else:
        starts, ends = (ctx.require_const(i, what).ravel().tolist()
                        for i, what in ((1, "starts"), (2, "ends")))
        axes = ctx.axes(3)
        steps = None if ctx.const(4) is None else ctx.require_const(4, "steps").ravel().tolist()
    axes = list(range(len(starts))) if axes is None else ctx.check_axes(list(axes), rank)
    steps = [1] * len(axes) if steps is None else [int(s) for s in steps]
    if not len(starts) == len(ends) == len(axes) == len(steps) or 0 in steps:
        raise ctx.fail(f"starts {starts}, ends {ends}, axes {axes} and steps {steps} do not "
                       "match (or a step is 0)")
    window = [slice(None)] * rank
    for a, b, e, s in zip(axes, starts, ends, steps):
        window[a] = slice(int(b), int(e), s)
    return _selection(ctx, _index(ctx)[tuple(window)])


@lowering("Split", outputs=True)
def lower_split(ctx: NodeContext) -> list[Affine]:
    """Output ctx.output of the split: sizes from the split input (opset 13+),
    the split attribute, num_outputs (opset 18+) or equal parts."""
    return _selection(ctx, split_part(ctx, ctx.output))


def split_part(ctx: NodeContext, k: int) -> np.ndarray:
    """The input indices of output k of the Split node."""
    rank = len(ctx.in_shape)
    axis = ctx.check_axes([ctx.attr("axis", 0)], rank)[0]
    size = ctx.in_shape[axis]
    split = ctx.attr("split")
    if split is None and ctx.const(1) is not None:
        split = ctx.require_const(1, "split").ravel().tolist()
    outputs = len(ctx.node.output)
    if split is None:
        parts = ctx.attr("num_outputs", outputs)
        if parts <= 0:
            raise ctx.fail(f"num_outputs {parts} is not positive")
        chunk = math.ceil(size / parts)
        split = [min(chunk, max(size - i * chunk, 0)) for i in range(parts)]
    split = [int(s) for s in split]
    if sum(split) != size or min(split) < 0 or len(split) != outputs:
        raise ctx.fail(f"split {split} does not cut axis {axis} of size {size} into {outputs} parts")
    start = sum(split[:k])
    return np.take(_index(ctx), np.arange(start, start + split[k]), axis=axis)
