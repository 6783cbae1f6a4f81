"""The linear-map interface every affine block is built from.

Vectors are the C-order flattening of a tensor with batch 1; a batch of k
vectors is an (n, k) array, as in scipy's LinearOperator.matmat.

Rounding: every map states the arithmetic its products use (`unit_roundoff`:
2^-24 for float32 kernels, 2^-53 for float64) and the most products summed
into one output (`fan_in`). In the standard model of floating-point
arithmetic, a computed sum of m products (any order, with or without fused
multiply-adds, the operand first rounded to the arithmetic's type, the
coefficient possibly rounded from the model's) is within γ_{m+3}·(|A||x|)
of the exact one, γ_n = n·u / (1 − n·u) (no overflow; underflow is covered by
an absolute term); `matvec_bounded` propagates such elementwise error bounds
(|computed − exact|) through a map, computing the map itself in its most
precise arithmetic (`precise_matvec`: float64 for convolutions and large
float32 matrices).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from functools import cached_property

import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import LinearOperator
from threadpoolctl import ThreadpoolController

#: Found once: threadpool_limits() would inspect the loaded libraries at every call (~1 ms).
BLAS_THREADS = ThreadpoolController()

#: Unit roundoffs of float32 and float64 arithmetic (round to nearest).
U32 = 2.0**-24
U64 = 2.0**-53
#: Smallest subnormal of each type: the absolute error a product can lose to underflow.
_TINY = {U32: 2.0**-149, U64: 2.0**-1074}
#: Covers the float64 roundings of the error bookkeeping itself (a few per element).
SLACK = 1.0 + 2.0**-30


def gamma(n: int, u: float) -> float:
    """Higham's γ_n = n·u / (1 − n·u): |fl(Σ a_i b_i) − Σ a_i b_i| ≤ γ_n Σ |a_i b_i| for n terms."""
    return n * u / (1.0 - n * u) if n * u < 0.5 else math.inf


def frobenius_cap(values: np.ndarray) -> float:
    """||values||₂ computed in float64, lifted past its own rounding."""
    flat, total, chunk = values.ravel(), 0.0, 1 << 22
    for i in range(0, flat.size, chunk):
        part = flat[i:i + chunk].astype(np.float64)
        total += float(part @ part)
    return math.sqrt(total * (1 + gamma(values.size + 1, U64))) * (1 + 2 * U64)


class LinearMap(ABC):
    """A linear map A from in_shape to out_shape."""

    #: True for monomial maps (diagonal, permutation, padding): at most one
    #: nonzero in each row and column, so they compose with row norms exactly.
    monomial = False

    def __init__(self, in_shape: tuple[int, ...], out_shape: tuple[int, ...]):
        self.in_shape = tuple(in_shape)
        self.out_shape = tuple(out_shape)

    @property
    def in_size(self) -> int:
        return math.prod(self.in_shape)

    @property
    def out_size(self) -> int:
        return math.prod(self.out_shape)

    @abstractmethod
    def matmat(self, x: np.ndarray) -> np.ndarray:
        """A @ x for x of shape (in_size, k)."""

    def matmat_local(self, x: np.ndarray) -> np.ndarray:
        """A @ x for columns whose nonzeros may all lie in a small part of the input
        (the identity pushed through a few local layers: the reach analysis' L).
        The same products as matmat; maps that can skip the zeros' outputs
        (convolutions: only the outputs the columns' joint support reaches) do."""
        return self.matmat(x)

    def matmat_box(self, rows: np.ndarray | None, block: np.ndarray
                   ) -> tuple[np.ndarray | None, np.ndarray]:
        """A @ x for columns x that are 0 outside `rows` (increasing; None: all), whose
        values there are `block` (rows × k): (the output rows that can be nonzero, None
        for all, and their values), the reach analysis' boxed L (onnxlip.reach). Maps
        whose outputs depend on a part of the input (convolutions) compute only the
        outputs the rows reach; here all, through matmat_local."""
        return None, self.matmat_local(block if rows is None else scattered(rows, block, self.in_size))

    #: matmat_box gives the outputs a box of rows reaches only (convolutions,
    #: selections), not all of them.
    boxed: bool = False

    #: The most columns matmat_local should take at once, where fewer columns have
    #: a smaller joint support (None: no limit, as many as memory allows).
    local_columns: int | None = None

    @abstractmethod
    def rmatmat(self, u: np.ndarray) -> np.ndarray:
        """A.T @ u for u of shape (out_size, k)."""

    @abstractmethod
    def sq_matvec(self, d: np.ndarray) -> np.ndarray:
        """(A∘A) @ d: squared row norms of A restricted to the mask d."""

    @abstractmethod
    def abs_matvec(self, v: np.ndarray) -> np.ndarray:
        """|A| @ v (entrywise absolute values of A) for v of shape (in_size,) or
        (in_size, k), computed in the map's arithmetic."""

    #: Unit roundoff of the arithmetic matvec uses.
    unit_roundoff = U64
    #: The type matmat computes in: an input of this type is used as it is, and
    #: the products are values of it (float32 for onnxruntime's float32 kernels).
    compute_dtype = np.dtype(np.float64)

    @property
    def fan_in(self) -> int:
        """The most products summed into one output of matvec (at most in_size)."""
        return self.in_size

    def _gamma(self) -> float:
        return gamma(self.fan_in + 3, self.unit_roundoff)

    def abs_bound(self, v: np.ndarray) -> np.ndarray:
        """An upper bound of |A| @ v for v ≥ 0 (a vector or columns): the computed
        product lifted by its own rounding (a computed sum of nonnegative terms is
        within γ of the exact one)."""
        m, u = self.fan_in, self.unit_roundoff
        product = self.abs_matvec(v) / (1.0 - self._gamma())
        return (product + (m + 3) * _TINY[u]) * SLACK

    def precise_matvec(self, x: np.ndarray) -> np.ndarray:
        """A x in the most precise arithmetic the map offers cheaply (the nominal
        forward pass): matvec itself unless a subclass says otherwise."""
        return self.matvec(x)

    @property
    def precise_gamma(self) -> float:
        """|precise_matvec(x) − A x| ≤ precise_gamma·|A||x| elementwise."""
        return self._gamma()

    def matvec_bounded(self, x: np.ndarray,
                       errors: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """(precise_matvec(x), [e_out for each e in errors]): e_out ≥ |precise_matvec(x)
        − A x*| elementwise for every x* with |x − x*| ≤ e, i.e. |A|·e for the
        incoming error plus γ·|A||x| for this product's own rounding (one |A|
        product for all the errors, as columns)."""
        own = self.precise_gamma * np.abs(x)
        bounds = self.abs_bound(np.stack([e + own for e in errors], axis=1))
        return self.precise_matvec(x), list(bounds.T)

    def product_rounding(self, norms: np.ndarray, rho: np.ndarray) -> np.ndarray:
        """ρ': ρ'_i ≥ ||row i of matmat(x) − A x*|| (2-norms over the columns) for
        every x whose rows have norms ≤ `norms` and every x* whose row j is within
        ρ_j of x's, however the columns of x are split into products. Column c of
        a product is off by at most γ|A||x_c|, so by Minkowski's inequality over
        the columns row i is off by at most γ Σ_j |a_ij| ||x_j|| (+ |A|ρ)."""
        return self.abs_bound(rho + self._gamma() * norms)

    @property
    @abstractmethod
    def representation(self) -> str:
        """How the map is held, for reports: 'sparse', 'dense', 'matrix-free', ..."""

    def nnz(self) -> int | None:
        """Stored nonzeros, where the map is held as a matrix."""
        return None

    @abstractmethod
    def coefficient_bound(self) -> float:
        """An upper bound of ||A||₂ read off the stored coefficients alone, in their
        stored precision: cheaper than norm_cap (no transform, no matrix built), and
        inf or NaN where they overflow it. What load checks against float range."""

    @abstractmethod
    def coefficients_finite(self) -> bool:
        """Whether every stored coefficient (of every factor) is finite."""

    def norm_cap(self) -> float:
        """A proven upper bound of ||A||₂ (cheap; the Frobenius norm unless a map knows better)."""
        return frobenius_cap(self.to_sparse().data)

    def restricted(self, rows: np.ndarray, cols: np.ndarray) -> LinearMap | None:
        """The map from the input coordinates `cols` to the output coordinates `rows`
        (index arrays; 1-D shapes), where holding that copy makes its products
        cheaper than masking the full map's (None: mask instead)."""
        return None

    def sharp_cap(self) -> float:
        """A proven upper bound of ||A||₂ at most norm_cap, where a tighter one costs
        more (a convolution's Fourier symbol: seconds); worth it for the unmasked
        norm (global bounds), where it can be within the tolerance of the truth."""
        return self.norm_cap()

    def rounding(self) -> tuple[float, float]:
        """(η_f, η_a): proven bounds of ||fl(A x) − A x|| / ||x|| and ||fl(Aᵀu) − Aᵀu|| / ||u||
        for the products as this map computes them. Default: float64 sums of at most
        the row (column) nonzeros, |fl(Ax) − Ax| ≤ γ_m |A||x| and || |A| || ≤ ||A||_F."""
        matrix = self.to_sparse()
        frob = frobenius_cap(matrix.data)
        rows = int(np.diff(matrix.indptr).max(initial=0))
        cols = int(np.bincount(matrix.indices, minlength=1).max(initial=0))
        return gamma(rows, U64) * frob, gamma(cols, U64) * frob

    def to_sparse(self) -> sp.csr_matrix:
        """The exact CSR matrix of the map."""
        eye = np.eye(self.in_size)
        return sp.csr_matrix(self.matmat(eye))

    def sparse_nnz_estimate(self) -> int:
        """Nonzeros the CSR form would hold (an upper estimate)."""
        return self.in_size * self.out_size

    @cached_property
    def exact64(self) -> LinearMap:
        """The map as its exact float64 CSR matrix (products rounded at float64's
        unit), made once."""
        from .matrix import SparseMap

        return SparseMap(self.to_sparse(), self.in_shape, self.out_shape)

    def matvec(self, x: np.ndarray) -> np.ndarray:
        return self.matmat(x.reshape(-1, 1))[:, 0]

    def rmatvec(self, u: np.ndarray) -> np.ndarray:
        return self.rmatmat(u.reshape(-1, 1))[:, 0]

    def as_operator(self) -> LinearOperator:
        """The map as a scipy LinearOperator (matvec, rmatvec, matmat)."""
        return LinearOperator(
            (self.out_size, self.in_size),
            matvec=self.matvec,
            rmatvec=self.rmatvec,
            matmat=self.matmat,
            rmatmat=self.rmatmat,
            dtype=np.float64,
        )

    def describe(self) -> str:
        nnz = self.nnz()
        return self.representation if nnz is None else f"{self.representation} nnz={nnz}"


class FixedMap(LinearMap, ABC):
    """A map whose coefficients never change: its rounding bound and norm cap are
    computed once (fixed_cap: the cap, the Frobenius norm unless a map knows better)."""

    @cached_property
    def _fixed_rounding(self) -> tuple[float, float]:
        return LinearMap.rounding(self)

    def rounding(self) -> tuple[float, float]:
        return self._fixed_rounding

    @cached_property
    def _fixed_cap(self) -> float:
        return self.fixed_cap()

    def norm_cap(self) -> float:
        return self._fixed_cap

    def fixed_cap(self) -> float:
        return LinearMap.norm_cap(self)


def scattered(rows: np.ndarray, block: np.ndarray, size: int) -> np.ndarray:
    """The columns that are `block` on `rows` and 0 elsewhere (size × k)."""
    x = np.zeros((size, block.shape[1]), block.dtype)
    x[rows] = block
    return x
