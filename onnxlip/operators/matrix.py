"""Maps held as explicit matrices: dense numpy arrays and scipy CSR."""

from __future__ import annotations

from functools import cached_property

import numpy as np
import scipy.sparse as sp

from .base import F32, F64, LinearMap, frobenius_cap, gamma


class DenseMap(LinearMap):
    """A dense weight matrix W of shape (out_size, in_size) (Gemm, MatMul).

    Matrices above FLOAT32_ABOVE entries are kept in float32 (the model's own
    precision), products computed in float32 and returned in float64: a VGG16
    classifier in float64 with its square would take 3 GB.
    """

    FLOAT32_ABOVE = 1 << 20
    representation = "dense"

    def __init__(self, weight: np.ndarray, in_shape, out_shape):
        super().__init__(in_shape, out_shape)
        dtype = np.float32 if np.size(weight) > self.FLOAT32_ABOVE else np.float64
        self.weight = np.ascontiguousarray(weight, dtype=dtype)

    @cached_property
    def _squared(self) -> np.ndarray | None:
        """W∘W, kept only for matrices held in float64 (the small ones)."""
        return self.weight**2 if self.weight.dtype == np.float64 else None

    def nnz(self) -> int:
        return int(self.weight.size)

    @cached_property
    def _frobenius(self) -> float:
        return frobenius_cap(self.weight)

    def norm_cap(self) -> float:
        return self._frobenius

    def rounding(self) -> tuple[float, float]:
        """float32 weights: x is rounded to float32 (u·||W||), then each output sums
        in_size (out_size) products: γ_m·|| |W| || ≤ γ_m·||W||_F."""
        frob = self._frobenius
        if self.weight.dtype == np.float64:
            return gamma(self.in_size, F64) * frob, gamma(self.out_size, F64) * frob
        lift = frob * (1 + F32)
        return (F32 * frob + gamma(self.in_size, F32) * lift,
                F32 * frob + gamma(self.out_size, F32) * lift)

    def matmat(self, x):
        return (self.weight @ x.astype(self.weight.dtype, copy=False)).astype(x.dtype, copy=False)

    def rmatmat(self, u):
        return (self.weight.T @ u.astype(self.weight.dtype, copy=False)).astype(u.dtype, copy=False)

    def sq_matvec(self, d):
        if self._squared is not None:
            return self._squared @ d.astype(np.float64)
        d = d.astype(self.weight.dtype)
        rows = max(1, (1 << 24) // self.weight.shape[1])  # 64 MB of squares at a time
        return np.concatenate([(self.weight[i:i + rows] ** 2) @ d
                               for i in range(0, self.weight.shape[0], rows)]).astype(np.float64)

    def to_sparse(self):
        return sp.csr_matrix(self.weight.astype(np.float64))

    def sparse_nnz_estimate(self) -> int:
        return int(self.weight.size)


class SparseMap(LinearMap):
    """An exact scipy CSR matrix."""

    def __init__(self, matrix: sp.spmatrix, in_shape, out_shape):
        super().__init__(in_shape, out_shape)
        self.matrix = sp.csr_matrix(matrix, dtype=np.float64)
        self._transpose = self.matrix.T.tocsr()
        self._squared = self.matrix.multiply(self.matrix).tocsr()

    representation = "sparse"

    def nnz(self) -> int:
        return int(self.matrix.nnz)

    def norm_cap(self) -> float:
        return frobenius_cap(self.matrix.data)

    def matmat(self, x):
        return np.asarray(self.matrix @ x).astype(x.dtype, copy=False)

    def rmatmat(self, u):
        return np.asarray(self._transpose @ u).astype(u.dtype, copy=False)

    def sq_matvec(self, d):
        return np.asarray(self._squared @ d)

    def to_sparse(self):
        return self.matrix

    def sparse_nnz_estimate(self) -> int:
        return int(self.matrix.nnz)


def sparse_bytes(nnz: int, rows: int) -> int:
    """Memory of a float64 CSR matrix with its transpose and square kept too."""
    return 3 * (12 * nnz + 8 * (rows + 1))
