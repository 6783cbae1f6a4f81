"""Gemm and MatMul -> a dense weight matrix plus bias."""

from __future__ import annotations

import numpy as np

from ..layers import Affine
from ..operators.matrix import DenseMap
from .registry import NodeContext, lowering


def _as_vector_input(ctx: NodeContext) -> int:
    if len(ctx.in_shape) != 2 or ctx.in_shape[0] != 1:
        raise ctx.fail(f"input shape {ctx.in_shape} is not (1, features)")
    return ctx.in_shape[1]


@lowering("Gemm")
def lower_gemm(ctx: NodeContext) -> list[Affine]:
    if not ctx.is_data(0) or ctx.is_data(1):
        raise ctx.fail("only data (input A) times a constant matrix (input B) is supported")
    n = _as_vector_input(ctx) if not ctx.attr("transA", 0) else _transposed_input(ctx)
    b = ctx.require_const(1, "matrix B").astype(np.float64)
    if ctx.attr("transB", 0):
        b = b.T
    if b.ndim != 2 or b.shape[0] != n:
        raise ctx.fail(f"matrix B of shape {b.shape} does not fit input shape {ctx.in_shape}")
    weight = ctx.float_attr("alpha", 1.0) * b.T
    out_shape = (1, b.shape[1])
    ctx.check_size(out_shape)
    bias = np.zeros(out_shape)
    if ctx.const(2) is not None:
        c = ctx.require_const(2, "bias C").astype(np.float64)
        try:
            bias = bias + ctx.float_attr("beta", 1.0) * np.broadcast_to(c, out_shape)
        except ValueError:
            raise ctx.fail(f"bias C of shape {c.shape} does not broadcast to {out_shape}") from None
    return [Affine(DenseMap(weight, ctx.in_shape, out_shape), bias.ravel())]


def _transposed_input(ctx: NodeContext) -> int:
    if len(ctx.in_shape) != 2 or ctx.in_shape[1] != 1:
        raise ctx.fail(f"input shape {ctx.in_shape} with transA=1 is not (features, 1)")
    return ctx.in_shape[0]


@lowering("MatMul")
def lower_matmul(ctx: NodeContext) -> list[Affine]:
    if not ctx.is_data(0) or ctx.is_data(1):
        raise ctx.fail("only data (first input) times a constant matrix is supported")
    n = _as_vector_input(ctx)
    b = ctx.require_const(1, "matrix").astype(np.float64)
    if b.ndim != 2 or b.shape[0] != n:
        raise ctx.fail(f"matrix of shape {b.shape} does not fit input shape {ctx.in_shape}")
    out_shape = (1, b.shape[1])
    ctx.check_size(out_shape)
    return [Affine(DenseMap(b.T, ctx.in_shape, out_shape), np.zeros(b.shape[1]))]
