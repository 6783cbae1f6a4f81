"""Spectral norms of matrix-free operators by Lanczos on MᵀM (or MMᵀ).

scipy's eigsh (ARPACK) converges on the eigenvector, and the top singular
values of a convolution are tightly clustered, so it needs hundreds of
products; the largest Ritz value itself converges in a few dozen. This plain
Lanczos iteration stops when that value has settled, and reports the residual
of its Ritz pair. It reorthogonalizes fully while the basis is small; for long
vectors (AlexNet's and VGG16's activations) it keeps only the last two,
in float32,, as
lost orthogonality only duplicates converged Ritz values and the largest one
stays right (Paige), which saves gigabytes and most of the time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.linalg import eigh_tridiagonal

Apply = Callable[[np.ndarray], np.ndarray]

#: Longest vector for which the whole Lanczos basis is kept.
FULL_BASIS_MAX = 100_000
#: A settled Ritz value still counts as unconverged while its residual is above this.
SETTLED_RESIDUAL_MAX = 1e-2


@dataclass
class SpectralNorm:
    """σ_max of an operator, with what the solver did to get it."""

    value: float  # the reported norm (an upper estimate unless asked for the Ritz value)
    iterations: int
    residual: float  # ||B v - θ v|| / θ of the top Ritz pair (θ, v)
    converged: bool
    vector: np.ndarray | None = None  # top Ritz vector of the Gram operator
    ritz: float = 0.0  # sqrt(θ): approaches the norm from below


def spectral_norm(
    forward: Apply, adjoint: Apply, n_in: int, n_out: int, **options
) -> SpectralNorm:
    """||M|| for M given by forward (M x) and adjoint (Mᵀ u) on 1-D vectors,
    by Lanczos on the smaller of MᵀM and MMᵀ (options: see gram_norm)."""
    if n_out < n_in:
        return gram_norm(lambda u: forward(adjoint(u)), n_out, **options)
    return gram_norm(lambda x: adjoint(forward(x)), n_in, **options)


def gram_norm(
    gram: Apply, n: int, tol: float = 1e-6, max_iter: int = 300, seed: int = 0,
    start: np.ndarray | None = None, want_vector: bool = False, mask: np.ndarray | None = None,
    upper: bool = True,
) -> SpectralNorm:
    """sqrt(λ_max) of a Gram operator B = MᵀM on vectors of length n.

    `tol` is the relative change of the top Ritz value (an eigenvalue, σ²)
    below which it counts as settled. `residual` is ||B v - θ v|| / θ for that
    Ritz pair. The top Ritz vector is returned where the basis was kept (short
    vectors, or `want_vector`); long vectors are held in float32. `start` is
    mixed into a seeded random start, and `mask` (0/1) restricts the start to
    the subspace the operator's range lies in.

    The Ritz value θ approaches λ_max from below, and when the top singular
    values are clustered it creeps up for a long time after its steps have
    become small. With `upper` (for upper bounds) the value reported is
    sqrt(θ + ||B v − θ v||): the eigenvalue the Ritz pair approximates lies
    within its residual. Without it (for lower bounds) it is sqrt(θ).
    """
    full = want_vector or n <= FULL_BASIS_MAX
    v = start_vector(n, seed, start)
    if mask is not None:
        v = v * mask
    v = v.astype(np.float64 if full else np.float32)
    result = lanczos_max(gram, v, tol, max_iter, full=full)
    theta = max(result.value, 0.0)
    ritz = float(np.sqrt(theta))
    value = float(np.sqrt(theta * (1.0 + result.residual))) if upper else ritz
    return SpectralNorm(value, result.iterations, result.residual, result.converged,
                        result.vector, ritz)


def start_vector(n: int, seed: int, start: np.ndarray | None) -> np.ndarray:
    """A seeded random unit vector, plus `start` (normalized) where one is given.

    The random part keeps every eigenvector represented: a start vector alone
    could sit on an eigenvector that is not the top one, where Lanczos settles
    on the wrong value before its Krylov space grows towards the right one.
    """
    v = np.random.default_rng(seed).standard_normal(n)
    v /= np.linalg.norm(v)
    if start is None or start.size != n or not np.linalg.norm(start):
        return v
    return v + start.ravel() / np.linalg.norm(start)


def lanczos_max(gram: Apply, v: np.ndarray, tol: float, max_iter: int,
                full: bool = True) -> SpectralNorm:
    """Largest eigenvalue of a symmetric positive semi-definite operator."""
    norm = np.linalg.norm(v)
    if norm == 0.0 or not np.isfinite(norm):
        return SpectralNorm(0.0, 1, 0.0, bool(norm == 0.0))
    basis = _Basis(v / norm) if full else _RecentBasis(v / norm)
    alphas: list[float] = []
    betas: list[float] = []
    theta, settled = 0.0, 0
    for step in range(1, max_iter + 1):
        w = gram(basis.last)
        alphas.append(float(basis.last @ w))
        w = basis.orthogonalize(w)
        beta = float(np.linalg.norm(w))
        values, vectors = _ritz(alphas, betas)
        new_theta = float(values[-1])
        residual = abs(beta * vectors[-1, -1]) / new_theta if new_theta > 0 else 0.0
        settled = settled + 1 if new_theta - theta <= tol * abs(new_theta) else 0
        theta = new_theta
        exhausted = beta <= 1e-12 * max(abs(theta), 1e-300) or (full and step >= v.size)
        if (settled >= 3 and residual <= SETTLED_RESIDUAL_MAX) or residual <= tol or exhausted:
            return SpectralNorm(theta, step, residual, True, basis.combine(vectors[:, -1]))
        betas.append(beta)
        basis.append(w / beta)
    return SpectralNorm(theta, max_iter, residual, False, basis.combine(vectors[:, -1]))


class _Basis:
    """The Lanczos vectors, stored as rows of a preallocated array."""

    def __init__(self, first: np.ndarray):
        self._rows = np.empty((16, first.size))
        self._rows[0] = first
        self._count = 1

    @property
    def last(self) -> np.ndarray:
        return self._rows[self._count - 1]

    def append(self, v: np.ndarray) -> None:
        if self._count == len(self._rows):
            self._rows = np.concatenate([self._rows, np.empty_like(self._rows)])
        self._rows[self._count] = v
        self._count += 1

    def combine(self, coefficients: np.ndarray) -> np.ndarray:
        return self._rows[: self._count].T @ coefficients

    def orthogonalize(self, w: np.ndarray) -> np.ndarray:
        """Full reorthogonalization against the basis: classical Gram-Schmidt,
        repeated once when it cancelled most of w (Kahan's "twice is enough")."""
        rows = self._rows[: self._count]
        before = np.linalg.norm(w)
        w = w - rows.T @ (rows @ w)
        if np.linalg.norm(w) < 0.7 * before:
            w = w - rows.T @ (rows @ w)
        return w


class _RecentBasis:
    """The last two Lanczos vectors only (local reorthogonalization)."""

    def __init__(self, first: np.ndarray):
        self._previous: np.ndarray | None = None
        self.last = first

    def append(self, v: np.ndarray) -> None:
        self._previous, self.last = self.last, v

    def combine(self, coefficients: np.ndarray) -> None:
        return None

    def orthogonalize(self, w: np.ndarray) -> np.ndarray:
        for q in (self.last, self._previous):
            if q is not None:
                w = w - (q @ w) * q
        return w


def _ritz(alphas: list[float], betas: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """The largest Ritz value and its eigenvector of the tridiagonal matrix."""
    k = len(alphas)
    if k == 1:  # a 1x1 matrix; scipy < 1.13 refuses the empty off-diagonal
        return np.array(alphas), np.ones((1, 1))
    return eigh_tridiagonal(np.array(alphas), np.array(betas[: k - 1]),
                            select="i", select_range=(k - 1, k - 1))
