"""Maps held as explicit matrices: dense numpy arrays and scipy CSR."""

from __future__ import annotations

from functools import cached_property

import numpy as np
import scipy.sparse as sp

from .base import BLAS_THREADS, U32, U64, FixedMap, LinearMap, frobenius_cap, gamma


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
        #: Whether storing in float32 rounded any of the model's coefficients.
        self._rounded = dtype == np.float32 and not all(
            np.array_equal(chunk, given) for chunk, given in
            zip(self._row_chunks(), _row_blocks(np.asarray(weight), self._chunk_rows())))

    @cached_property
    def _squared(self) -> np.ndarray | None:
        """W∘W, kept only for matrices held in float64 (the small ones)."""
        return self.weight**2 if self.weight.dtype == np.float64 else None

    @cached_property
    def _absolute(self) -> np.ndarray | None:
        """|W|, kept only for matrices held in float64 (the small ones)."""
        return np.abs(self.weight) if self.weight.dtype == np.float64 else None

    @property
    def unit_roundoff(self) -> float:
        return U32 if self.weight.dtype == np.float32 else U64

    def _chunk_rows(self) -> int:
        return max(1, (1 << 18) // max(1, self.weight.shape[1]))

    def _row_chunks(self):
        """The weight's rows, 2^18 entries at a time (cache-sized: 10x faster than 64 MB)."""
        return _row_blocks(self.weight, self._chunk_rows())

    def nnz(self) -> int:
        return int(self.weight.size)

    #: Restrict (copy) a float32 matrix to active rows and columns when they hold at
    #: most this fraction of it: a copy costs about two products, a local bound's
    #: solve a hundred or more (AlexNet's 9216x4096 classifier: 28% of it active).
    RESTRICT_BELOW = 0.7

    def restricted(self, rows, cols):
        if self.weight.dtype == np.float64 or rows.size * cols.size > self.RESTRICT_BELOW * self.weight.size:
            return None
        sub = DenseMap(self.weight[np.ix_(rows, cols)], (1, cols.size), (1, rows.size))
        sub._rounded = self._rounded  # of the model's coefficients, which sub's are too
        return sub

    @cached_property
    def _frobenius(self) -> float:
        return frobenius_cap(self.weight)

    def norm_cap(self) -> float:
        return self._frobenius

    def coefficient_bound(self) -> float:
        """The Frobenius norm, in the stored precision."""
        with np.errstate(all="ignore"):
            return float(np.linalg.norm(self.weight.ravel()))

    def coefficients_finite(self) -> bool:
        return bool(np.all(np.isfinite(self.weight)))

    #: float32 products sum at most this many terms in float32; the partial sums
    #: are added in float64 (the rounding bound grows with the block, not the fan-in).
    BLOCK = 1024

    def rounding(self) -> tuple[float, float]:
        """float32 weights: x is rounded to float32 (u·||W||), and so was the model's
        matrix where it was not float32 already (u·||W|| more), each float32 partial sum
        of at most BLOCK products errs by γ_BLOCK·|W||x| (≤ γ·||W||_F·||x||), and the
        float64 sum of the partial sums by γ64 of their count."""
        frob = self._frobenius
        if self.weight.dtype == np.float64:
            return gamma(self.in_size, U64) * frob, gamma(self.out_size, U64) * frob
        lift = frob * (1 + U32)
        stored = (2 if self._rounded else 1) * U32 * lift

        def eta(fan_in: int) -> float:
            block = min(fan_in, self.BLOCK)
            parts = -(-fan_in // block)
            return stored + gamma(block, U32) * lift + gamma(parts, U64) * lift * (1 + gamma(block, U32))

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
        return np.concatenate([chunk**2 @ d for chunk in self._row_chunks()]).astype(np.float64)

    def abs_matvec(self, v):
        if self._absolute is not None:
            return self._absolute @ v.astype(np.float64)
        v = v.astype(self.weight.dtype)
        return np.concatenate([np.abs(chunk) @ v for chunk in self._row_chunks()]).astype(np.float64)

    def precise_matvec(self, x):
        """A float32 matrix is applied in float64 here (one pass over it, by chunks):
        its own float32 products would be off by up to γ_n·|W||x| with n its width
        (1.5e-3 relative on VGG16's first classifier layer)."""
        if self.weight.dtype == np.float64:
            return self.matvec(x)
        return np.concatenate([chunk.astype(np.float64) @ x for chunk in self._row_chunks()])

    @property
    def precise_gamma(self) -> float:
        """float64 products; a stored float32 weight that rounded the model's adds 2·u32."""
        rounding = 2 * U32 if self._rounded else 0.0
        return gamma(self.fan_in + 3, U64) + rounding

    def abs_bound(self, v):
        """As LinearMap's, plus |W_model| ≤ (1 + 2·u32)|W| where storing rounded it."""
        return super().abs_bound(v) * (1.0 + 2 * U32 if self._rounded else 1.0)

    def to_sparse(self):
        return sp.csr_matrix(self.weight.astype(np.float64))

    def sparse_nnz_estimate(self) -> int:
        return int(self.weight.size)


def _row_blocks(matrix: np.ndarray, rows: int):
    for i in range(0, matrix.shape[0], rows):
        yield matrix[i:i + rows]


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


class SparseMap(FixedMap):
    """An exact scipy CSR matrix (its rounding bound and cap computed once)."""

    def __init__(self, matrix: sp.spmatrix, in_shape, out_shape):
        super().__init__(in_shape, out_shape)
        self.matrix = sp.csr_matrix(matrix, dtype=np.float64)
        self._transpose = self.matrix.T.tocsr()
        self._squared = self.matrix.multiply(self.matrix).tocsr()

    representation = "sparse"

    def nnz(self) -> int:
        return int(self.matrix.nnz)

    def coefficient_bound(self) -> float:
        """The Frobenius norm of the stored entries."""
        with np.errstate(all="ignore"):
            return float(np.linalg.norm(self.matrix.data))

    def coefficients_finite(self) -> bool:
        return bool(np.all(np.isfinite(self.matrix.data)))

    def matmat(self, x):
        return np.asarray(self.matrix @ x).astype(x.dtype, copy=False)

    def rmatmat(self, u):
        return np.asarray(self._transpose @ u).astype(u.dtype, copy=False)

    def sq_matvec(self, d):
        return np.asarray(self._squared @ d)

    def abs_matvec(self, v):
        return np.asarray(abs(self.matrix) @ v)

    @property
    def fan_in(self) -> int:
        return max(1, int(np.diff(self.matrix.indptr).max(initial=0)))

    def to_sparse(self):
        return self.matrix

    def sparse_nnz_estimate(self) -> int:
        return int(self.matrix.nnz)


def sparse_bytes(nnz: int, rows: int) -> int:
    """Memory of a float64 CSR matrix with its transpose and square kept too."""
    return 3 * (12 * nnz + 8 * (rows + 1))
