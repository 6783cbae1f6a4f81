"""The linear-map interface every affine block is built from.

Vectors are the C-order flattening of a tensor with batch 1; a batch of k
vectors is an (n, k) array, as in scipy's LinearOperator.matmat.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import LinearOperator
from threadpoolctl import ThreadpoolController

#: Found once: threadpool_limits() would inspect the loaded libraries at every call (~1 ms).
BLAS_THREADS = ThreadpoolController()

#: Unit roundoffs.
F64 = float(np.finfo(np.float64).eps) / 2
F32 = float(np.finfo(np.float32).eps) / 2


def gamma(m: int, u: float) -> float:
    """Higham's γ_m = m·u / (1 − m·u): |fl(Σ a_i b_i) − Σ a_i b_i| ≤ γ_m Σ |a_i b_i| for m terms."""
    if m * u >= 0.5:
        return math.inf
    return m * u / (1 - m * u)


def frobenius_cap(values: np.ndarray) -> float:
    """||values||₂ computed in float64, lifted past its own rounding."""
    flat, total, chunk = values.ravel(), 0.0, 1 << 22
    for i in range(0, flat.size, chunk):
        part = flat[i:i + chunk].astype(np.float64)
        total += float(part @ part)
    return math.sqrt(total * (1 + gamma(values.size + 1, F64))) * (1 + 2 * F64)


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

    @abstractmethod
    def rmatmat(self, u: np.ndarray) -> np.ndarray:
        """A.T @ u for u of shape (out_size, k)."""

    @abstractmethod
    def sq_matvec(self, d: np.ndarray) -> np.ndarray:
        """(A∘A) @ d: squared row norms of A restricted to the mask d."""

    @property
    @abstractmethod
    def representation(self) -> str:
        """How the map is held, for reports: 'sparse', 'dense', 'matrix-free', ..."""

    def nnz(self) -> int | None:
        """Stored nonzeros, where the map is held as a matrix."""
        return None

    def norm_cap(self) -> float:
        """A proven upper bound of ||A||₂ (cheap; the Frobenius norm unless a map knows better)."""
        return frobenius_cap(self.to_sparse().data)

    def rounding(self) -> tuple[float, float]:
        """(η_f, η_a): proven bounds of ||fl(A x) − A x|| / ||x|| and ||fl(Aᵀu) − Aᵀu|| / ||u||
        for the products as this map computes them. Default: float64 sums of at most
        the row (column) nonzeros, |fl(Ax) − Ax| ≤ γ_m |A||x| and || |A| || ≤ ||A||_F."""
        matrix = self.to_sparse()
        frob = frobenius_cap(matrix.data)
        rows = int(np.diff(matrix.indptr).max(initial=0))
        cols = int(np.bincount(matrix.indices, minlength=1).max(initial=0))
        return gamma(rows, F64) * frob, gamma(cols, F64) * frob

    def to_sparse(self) -> sp.csr_matrix:
        """The exact CSR matrix of the map."""
        eye = np.eye(self.in_size)
        return sp.csr_matrix(self.matmat(eye))

    def sparse_nnz_estimate(self) -> int:
        """Nonzeros the CSR form would hold (an upper estimate)."""
        return self.in_size * self.out_size

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
