"""Shape ops: Flatten, Reshape, Squeeze, Unsqueeze (free), Transpose (a permutation)
and Concat of computed tensors (a placement of each)."""

from __future__ import annotations

import math

import numpy as np

from ..layers import Affine, Merge, Reshape
from ..operators.monomial import MonomialMap
from .registry import NodeContext, lowering


@lowering("Flatten")
def lower_flatten(ctx: NodeContext) -> list[Reshape]:
    axis = ctx.attr("axis", 1)
    axis = axis + len(ctx.in_shape) if axis < 0 else axis
    if not 0 <= axis <= len(ctx.in_shape):
        raise ctx.fail(f"axis {ctx.attr('axis')} is out of range for shape {ctx.in_shape}")
    return [Reshape((math.prod(ctx.in_shape[:axis]), math.prod(ctx.in_shape[axis:])))]


@lowering("Reshape")
def lower_reshape(ctx: NodeContext) -> list[Reshape]:
    target = [int(v) for v in ctx.require_const(1, "shape").ravel()]
    if not ctx.attr("allowzero", 0):
        target = [ctx.in_shape[i] if v == 0 and i < len(ctx.in_shape) else v for i, v in enumerate(target)]
    try:
        shape = np.empty(ctx.in_shape, dtype=np.bool_).reshape(target).shape
    except ValueError:
        raise ctx.fail(f"cannot reshape {ctx.in_shape} to {target}") from None
    return [Reshape(shape)]


@lowering("Squeeze")
def lower_squeeze(ctx: NodeContext) -> list[Reshape]:
    axes = ctx.axes()
    rank = len(ctx.in_shape)
    if axes is None:
        axes = [i for i, d in enumerate(ctx.in_shape) if d == 1 and i > 0]
    axes = set(ctx.check_axes(axes, rank))
    if any(ctx.in_shape[a] != 1 for a in axes):
        raise ctx.fail(f"cannot squeeze axes {sorted(axes)} of shape {ctx.in_shape}")
    return [Reshape(tuple(d for i, d in enumerate(ctx.in_shape) if i not in axes))]


@lowering("Unsqueeze")
def lower_unsqueeze(ctx: NodeContext) -> list[Reshape]:
    axes = ctx.axes()
    if axes is None:
        raise ctx.fail("no axes given")
    shape = list(ctx.in_shape)
    for a in sorted(ctx.check_axes(axes, len(ctx.in_shape) + len(axes))):
        shape.insert(a, 1)
    return [Reshape(tuple(shape))]


def permutation(in_shape: tuple[int, ...], perm: list[int]) -> MonomialMap:
    """The map of numpy's transpose(perm) on the C-order flat vector."""
    source = np.arange(math.prod(in_shape)).reshape(in_shape).transpose(perm)
    return MonomialMap(source.ravel(), None, in_shape, source.shape)


@lowering("Transpose")
def lower_transpose(ctx: NodeContext) -> list[Affine]:
    rank = len(ctx.in_shape)
    perm = list(ctx.attr("perm", list(range(rank))[::-1]))
    if sorted(perm) != list(range(rank)):
        raise ctx.fail(f"perm {perm} is not a permutation of the {rank} axes")
    perm_map = permutation(ctx.in_shape, perm)
    return [Affine(perm_map, np.zeros(perm_map.out_size))]


@lowering("Concat", merging=True)
def lower_concat(ctx: NodeContext) -> list[Merge | Affine]:
    """Each input placed into its part of the output (a monomial map per input)."""
    rank = len(ctx.in_shape)
    axis = ctx.attr("axis")
    if axis is None or not -rank <= axis < rank:
        raise ctx.fail(f"axis {axis} is out of range for rank {rank}")
    axis %= rank
    if axis == 0:
        raise ctx.fail("concatenating along the batch axis is not supported")
    if len(ctx.in_shapes) != len([n for n in ctx.node.input if n]):
        raise ctx.fail("Concat of computed tensors with constants is not supported")
    if any(len(s) != rank or s[:axis] + s[axis + 1:] != ctx.in_shape[:axis] + ctx.in_shape[axis + 1:]
           for s in ctx.in_shapes):
        raise ctx.fail(f"input shapes {list(ctx.in_shapes)} do not fit along axis {axis}")
    owner = np.concatenate([np.full(s, j) for j, s in enumerate(ctx.in_shapes)], axis=axis)
    local = np.concatenate([np.arange(math.prod(s)).reshape(s) for s in ctx.in_shapes], axis=axis)
    shape, owner, local = owner.shape, owner.ravel(), local.ravel()
    maps = [MonomialMap(np.where(owner == j, local, -1), None, s, shape)
            for j, s in enumerate(ctx.in_shapes)]
    if len(maps) == 1:
        return [Affine(maps[0], np.zeros(owner.size))]
    return [Merge(maps, shape)]
