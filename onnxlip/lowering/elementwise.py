"""Elementwise affine ops: Add/Sub/Mul/Div by a constant, BatchNormalization, and
Add/Sub/Sum of computed tensors (residual connections)."""

from __future__ import annotations

import numpy as np

from ..layers import Affine, Merge
from ..operators.monomial import MonomialMap
from .registry import NodeContext, lowering


def _constant_operand(ctx: NodeContext) -> tuple[np.ndarray, bool]:
    """The constant operand broadcast to the data's shape, and whether data comes first."""
    if len(ctx.node.input) != 2 or ctx.is_data(0) == ctx.is_data(1):
        raise ctx.fail("exactly one operand must be a constant")
    data_first = ctx.is_data(0)
    value = ctx.require_const(1 if data_first else 0, "constant operand").astype(np.float64)
    try:
        fits = np.broadcast_shapes(value.shape, ctx.in_shape) == ctx.in_shape
    except ValueError:
        fits = False
    if not fits:
        raise ctx.fail(f"constant of shape {value.shape} would change the data shape {ctx.in_shape}")
    return np.broadcast_to(value, ctx.in_shape), data_first


def _affine(ctx: NodeContext, scale, shift) -> list[Affine]:
    scale = np.broadcast_to(np.asarray(scale, dtype=np.float64), ctx.in_shape)
    shift = np.broadcast_to(np.asarray(shift, dtype=np.float64), ctx.in_shape)
    return [Affine(MonomialMap.diagonal(scale, ctx.in_shape), shift.ravel().copy())]


def _sum(ctx: NodeContext, signs: list[float]) -> list[Merge]:
    """Σ signs[j] · input_j of computed tensors of one shape."""
    if any(shape != ctx.in_shape for shape in ctx.in_shapes):
        raise ctx.fail(f"adds computed tensors of different shapes {list(ctx.in_shapes)} "
                       "(broadcasting between computed tensors is not supported)")
    return [Merge([MonomialMap.diagonal(np.full(ctx.in_shape, s), ctx.in_shape) for s in signs],
                  ctx.in_shape)]


@lowering("Add", merging=True)
def lower_add(ctx: NodeContext) -> list[Affine | Merge]:
    if ctx.data_inputs == 2:
        return _sum(ctx, [1.0, 1.0])
    value, _ = _constant_operand(ctx)
    return _affine(ctx, 1.0, value)


@lowering("Sub", merging=True)
def lower_sub(ctx: NodeContext) -> list[Affine | Merge]:
    if ctx.data_inputs == 2:
        return _sum(ctx, [1.0, -1.0])
    value, data_first = _constant_operand(ctx)
    return _affine(ctx, 1.0, -value) if data_first else _affine(ctx, -1.0, value)


@lowering("Sum", merging=True)
def lower_sum(ctx: NodeContext) -> list[Merge]:
    if ctx.data_inputs != len(ctx.node.input):
        raise ctx.fail("Sum of computed tensors and constants is not supported")
    return _sum(ctx, [1.0] * ctx.data_inputs)


@lowering("Mul")
def lower_mul(ctx: NodeContext) -> list[Affine]:
    value, _ = _constant_operand(ctx)
    return _affine(ctx, value, 0.0)


@lowering("Div")
def lower_div(ctx: NodeContext) -> list[Affine]:
    value, data_first = _constant_operand(ctx)
    if not data_first:
        raise ctx.fail("a constant divided by the data is not affine")
    if np.any(value == 0):
        raise ctx.fail("division by a constant that contains zeros")
    return _affine(ctx, 1.0 / value, 0.0)


@lowering("BatchNormalization")
def lower_batchnorm(ctx: NodeContext) -> list[Affine]:
    if ctx.attr("training_mode", 0):
        raise ctx.fail("training_mode=1 is not supported (export the model in eval mode)")
    if not ctx.is_data(0) or len(ctx.in_shape) < 2:
        raise ctx.fail(f"expects data of shape (N, C, ...), got {ctx.in_shape}")
    gamma, beta, mean, var = (
        ctx.require_const(i, name).astype(np.float64).ravel()
        for i, name in enumerate(["scale", "bias", "mean", "var"], start=1)
    )
    channels = ctx.in_shape[1]
    if any(v.shape != (channels,) for v in (gamma, beta, mean, var)):
        raise ctx.fail(f"parameters do not all have {channels} channels")
    epsilon = ctx.float_attr("epsilon", 1e-5)
    if np.any(var + epsilon <= 0):
        raise ctx.fail("variance + epsilon is not positive")
    scale = gamma / np.sqrt(var + epsilon)
    per_channel = (1, channels) + (1,) * (len(ctx.in_shape) - 2)
    return _affine(ctx, scale.reshape(per_channel), (beta - mean * scale).reshape(per_channel))
