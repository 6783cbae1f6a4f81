"""Maps held as explicit matrices: dense numpy arrays and scipy CSR."""

from __future__ import annotations

from functools import cached_property

import numpy as np
import scipy.sparse as sp

from .base import BLAS_THREADS, F32, F64, LinearMap, frobenius_cap, gamma


class DenseMap(LinearMap):
    """A dense weight matrix W of shape (out_size, in_size) (Gemm, MatMul).

    Matrices above FLOAT32_ABOVE entries are kept in float32 (the model's own
    precision), products computed in float32 by blocks of BLOCK terms whose sums
    are added in float64, and returned in float64: a VGG16 classifier in float64
    with its square would take 3 GB.
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

    #: float32 products sum at most this many terms in float32; the partial sums
    #: are added in float64 (the rounding bound grows with the block, not the fan-in).
    BLOCK = 1024

    def rounding(self) -> tuple[float, float]:
        """float32 weights: x is rounded to float32 (u·||W||), each float32 partial sum
        of at most BLOCK products errs by γ_BLOCK·|W||x| (≤ γ·||W||_F·||x||), and the
        float64 sum of the partial sums by γ64 of their count."""
        frob = self._frobenius
        if self.weight.dtype == np.float64:
            return gamma(self.in_size, F64) * frob, gamma(self.out_size, F64) * frob
        lift = frob * (1 + F32)

        def eta(fan_in: int) -> float:
            block = min(fan_in, self.BLOCK)
            parts = -(-fan_in // block)
            return F32 * frob + gamma(block, F32) * lift + gamma(parts, F64) * lift * (1 + gamma(block, F32))

        return eta(self.in_size), eta(self.out_size)

    @cached_property
    def _transposed(self) -> np.ndarray:
        """Wᵀ, contiguous: its row blocks are W's column blocks (float32 maps only)."""
        return np.ascontiguousarray(self.weight.T)

    def matmat(self, x):
        if self.weight.dtype == np.float64:
            return self.weight @ x.astype(np.float64, copy=False)
        return _blocked(x.astype(np.float32), self._transposed, self.BLOCK).astype(x.dtype, copy=False)

    def rmatmat(self, u):
        if self.weight.dtype == np.float64:
            return self.weight.T @ u.astype(np.float64, copy=False)
        return _blocked(u.astype(np.float32), self.weight, self.BLOCK).astype(u.dtype, copy=False)

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


def _blocked(x: np.ndarray, rows: np.ndarray, block: int) -> np.ndarray:
    """rowsᵀ @ x, as float32 partial sums over `block` rows of `rows` added in float64."""
    # One BLAS thread: on 2 shared cores, threads woken for each short block
    # cost 10x (AlexNet's 4096x9216 classifier: 0.10 s a product against 0.0095 s).
    with BLAS_THREADS.limit(limits=1, user_api="blas"):
        if x.shape[1] == 1:  # a vector times a matrix: BLAS's gemv (a 1-row gemm is slow)
            v, out = x[:, 0], np.zeros(rows.shape[1])
            for i in range(0, rows.shape[0], block):
                out += v[i:i + block] @ rows[i:i + block]
            return out[:, None]
        out = np.zeros((rows.shape[1], x.shape[1]))
        for i in range(0, rows.shape[0], block):
            out += (x[i:i + block].T @ rows[i:i + block]).T
        return out


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
