"""Gemm and MatMul -> a weight matrix plus bias, the constant on either side.

MatMul follows numpy's matmul: a 1-D operand is a vector, the data's leading
axes are a stack of independent products (held as a block-diagonal CSR matrix).
Gemm's transposed data (transA / transB on the data input) is a permutation
before the product.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp

from ..layers import Affine
from ..operators.base import LinearMap
from ..operators.matrix import DenseMap, SparseMap
from .registry import MAX_ELEMENTS, NodeContext, lowering
from .shape import permutation


def _data_side(ctx: NodeContext) -> bool:
    """Whether the data is the first of the two operands (the other must be constant)."""
    if len(ctx.node.input) < 2 or ctx.is_data(0) == ctx.is_data(1):
        raise ctx.fail("exactly one of the two operands must be a constant")
    return ctx.is_data(0)


def _matrix(ctx: NodeContext, index: int, what: str) -> np.ndarray:
    value = ctx.require_const(index, what).astype(np.float64)
    if value.ndim not in (1, 2):
        raise ctx.fail(f"{what} of shape {value.shape} is not a matrix or a vector")
    return value


def _product(ctx: NodeContext, const: np.ndarray, data_first: bool,
             shape: tuple[int, ...]) -> tuple[LinearMap, tuple[int, ...]]:
    """The linear map x -> matmul(x, const) or matmul(const, x) on data of `shape`."""
    if not shape:
        raise ctx.fail("the data is a scalar, not a vector or matrix")
    vector_const = const.ndim == 1
    if data_first:  # x @ B: rows of x times B (n, m)
        b = const.reshape(-1, 1) if vector_const else const
        lead = shape[:-1]
        if shape[-1] != b.shape[0]:
            raise ctx.fail(f"matrix of shape {const.shape} does not fit input shape {shape}")
        out_shape = lead + (() if vector_const else (b.shape[1],))
        block, stack, inner = b.T, math.prod(lead), 1
    else:  # A @ x: A (m, n) times each column of x (n, k), for each leading index
        a = const.reshape(1, -1) if vector_const else const
        vector_data = len(shape) == 1
        n = shape[0] if vector_data else shape[-2]
        if n != a.shape[1]:
            raise ctx.fail(f"matrix of shape {const.shape} does not fit input shape {shape}")
        lead = () if vector_data else shape[:-2]
        k = 1 if vector_data else shape[-1]
        out_shape = lead + (() if vector_const else (a.shape[0],)) + (() if vector_data else (k,))
        block, stack, inner = a, math.prod(lead), k
    ctx.check_size(out_shape)
    if stack == 1 and inner == 1:
        return DenseMap(block, shape, out_shape), out_shape
    nnz = stack * inner * block.size
    if nnz > MAX_ELEMENTS:
        raise ctx.fail(f"the product on input shape {shape} has {nnz:,} weights, more than the "
                       f"{MAX_ELEMENTS:,} onnxlip handles (too large for memory)")
    matrix = sp.kron(sp.identity(stack), sp.kron(sp.csr_matrix(block), sp.identity(inner)))
    return SparseMap(matrix, shape, out_shape), out_shape


def _transposed(shape: tuple[int, ...]) -> list[Affine]:
    swap = permutation(shape, [1, 0])
    return [Affine(swap, np.zeros(swap.out_size))]


@lowering("Gemm")
def lower_gemm(ctx: NodeContext) -> list[Affine]:
    data_first = _data_side(ctx)
    if len(ctx.in_shape) != 2:
        raise ctx.fail(f"input shape {ctx.in_shape} is not a matrix")
    trans_data, trans_const = ("transA", "transB") if data_first else ("transB", "transA")
    layers, shape = [], ctx.in_shape
    if ctx.attr(trans_data, 0):
        layers, shape = _transposed(shape), shape[::-1]
    const = _matrix(ctx, 1 if data_first else 0, "matrix B" if data_first else "matrix A")
    if const.ndim != 2:
        raise ctx.fail(f"{'matrix B' if data_first else 'matrix A'} of shape {const.shape} is not "
                       "a matrix")
    if ctx.attr(trans_const, 0):
        const = const.T
    const = ctx.float_attr("alpha", 1.0) * const
    product, out_shape = _product(ctx, const, data_first, shape)
    bias = np.zeros(out_shape)
    if len(ctx.node.input) > 2 and ctx.node.input[2]:
        if ctx.is_data(2):
            raise ctx.fail("bias C must be a constant")
        c = ctx.require_const(2, "bias C").astype(np.float64)
        try:
            bias = bias + ctx.float_attr("beta", 1.0) * np.broadcast_to(c, out_shape)
        except ValueError:
            raise ctx.fail(f"bias C of shape {c.shape} does not broadcast to {out_shape}") from None
    return layers + [Affine(product, bias.ravel())]


@lowering("MatMul")
def lower_matmul(ctx: NodeContext) -> list[Affine]:
    data_first = _data_side(ctx)
    const = _matrix(ctx, 1 if data_first else 0, "matrix")
    product, out_shape = _product(ctx, const, data_first, ctx.in_shape)
    return [Affine(product, np.zeros(math.prod(out_shape)))]
