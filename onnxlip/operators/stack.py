"""A block row [A_1 … A_k]: the affine map of a block that reads several tensors."""

from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp

from .base import SLACK, U64, LinearMap, gamma


class StackMap(LinearMap):
    """x -> Σ_j A_j x_j on the concatenation x = [x_1; …; x_k] of the inputs.

    Its entrywise square is [A_1∘A_1 … A_k∘A_k], so row norms stay exact. It
    is monomial when every part is and no output reads two parts (Concat).
    """

    def __init__(self, parts: list[LinearMap]):
        out_shape = parts[0].out_shape
        if any(p.out_size != parts[0].out_size for p in parts):
            raise ValueError("the parts of a StackMap must have one output size")
        self.parts = list(parts)
        self.sizes = [p.in_size for p in parts]
        self.offsets = np.cumsum([0] + self.sizes)
        super().__init__((int(self.offsets[-1]),), out_shape)
        self.unit_roundoff = max(p.unit_roundoff for p in parts)
        touched = sum((p.sq_matvec(np.ones(p.in_size)) > 0).astype(int) for p in parts)
        self.monomial = all(p.monomial for p in parts) and int(touched.max(initial=0)) <= 1

    @property
    def fan_in(self) -> int:
        return sum(p.fan_in for p in self.parts)

    def split(self, x: np.ndarray) -> list[np.ndarray]:
        """The input (or a batch of inputs) cut into the parts' inputs."""
        return [x[a:b] for a, b in zip(self.offsets[:-1], self.offsets[1:])]

    @property
    def representation(self) -> str:
        return "+".join(dict.fromkeys(p.representation for p in self.parts))

    def nnz(self) -> int | None:
        counts = [p.nnz() for p in self.parts]
        return None if None in counts else sum(counts)

    def matmat(self, x):
        return sum(p.matmat(xj) for p, xj in zip(self.parts, self.split(x)))

    def matmat_local(self, x):
        return sum(p.matmat_local(xj) for p, xj in zip(self.parts, self.split(x)))

    def matmat_box(self, rows, block):
        """The parts' boxes on their rows, added on the union of the rows they reach."""
        if rows is None:
            return None, self.matmat_local(block)
        products = []
        for p, start, stop in zip(self.parts, self.offsets[:-1], self.offsets[1:]):
            lo, hi = np.searchsorted(rows, [start, stop])
            if hi > lo:
                products.append(p.matmat_box(rows[lo:hi] - start, block[lo:hi]))
        dtype = np.result_type(block, *(v for _, v in products))
        if any(r is None for r, _ in products):  # some part reaches every output
            out = np.zeros((self.out_size, block.shape[1]), dtype)
            for r, v in products:
                out[slice(None) if r is None else r] += v
            return None, out
        reached = np.unique(np.concatenate([r for r, _ in products] + [np.zeros(0, np.intp)]))
        out = np.zeros((reached.size, block.shape[1]), dtype)
        for r, v in products:
            out[np.searchsorted(reached, r)] += v
        return reached, out

    def rmatmat(self, u):
        return np.concatenate([p.rmatmat(u) for p in self.parts])

    def sq_matvec(self, d):
        return sum(p.sq_matvec(dj) for p, dj in zip(self.parts, self.split(d)))

    def abs_matvec(self, v):
        return sum(p.abs_matvec(vj) for p, vj in zip(self.parts, self.split(v)))

    def abs_bound(self, v):
        """Σ_j |A_j| v_j, each part bounded in its own arithmetic, lifted by the
        float64 sum of the k parts."""
        total = sum(p.abs_bound(vj) for p, vj in zip(self.parts, self.split(v)))
        return total * (1 + gamma(len(self.parts), U64)) * SLACK

    def precise_matvec(self, x):
        return sum(p.precise_matvec(xj) for p, xj in zip(self.parts, self.split(x)))

    def matvec_bounded(self, x, errors):
        """Each part with its own rounding, then the float64 sum of the parts."""
        total, bounds = None, None
        for p, xj, ej in zip(self.parts, self.split(x), zip(*[self.split(e) for e in errors])):
            y, e = p.matvec_bounded(xj, list(ej))
            total = y if total is None else total + y
            bounds = e if bounds is None else [a + b for a, b in zip(bounds, e)]
        added = gamma(len(self.parts), U64) * np.abs(total)
        return total, [(b + added) * SLACK for b in bounds]

    def product_rounding(self, norms, rho):
        """Each part with its own rounding, then the float64 sum of the parts
        (the sum's rows have norms at most Σ_j |A_j| norms_j + ρ_j')."""
        bound, size = 0.0, 0.0
        for p, nj, rj in zip(self.parts, self.split(norms), self.split(rho)):
            r = p.product_rounding(nj, rj)
            bound, size = bound + r, size + p.abs_bound(nj) + r
        return (bound + gamma(len(self.parts), U64) * size) * SLACK

    @property
    def compute_dtype(self) -> np.dtype:
        return self.parts[0].compute_dtype if len(self.parts) == 1 else np.dtype(np.float64)

    @property
    def boxed(self) -> bool:
        return all(m.boxed for m in self.parts)

    @property
    def local_columns(self) -> int | None:
        return min((p.local_columns for p in self.parts if p.local_columns), default=None)

    def norm_cap(self) -> float:
        """||[A_1 … A_k]|| ≤ sqrt(Σ_j ||A_j||²)."""
        return math.sqrt(sum(p.norm_cap() ** 2 for p in self.parts)) * (1 + 4 * U64)

    def coefficient_bound(self) -> float:
        """sqrt(Σ_j b_j²) of the parts' bounds (hypot: no overflow of the squares)."""
        return math.hypot(*(p.coefficient_bound() for p in self.parts)) * (1 + 4 * U64)

    def coefficients_finite(self) -> bool:
        return all(p.coefficients_finite() for p in self.parts)

    def sharp_cap(self) -> float:
        return math.sqrt(sum(p.sharp_cap() ** 2 for p in self.parts)) * (1 + 4 * U64)

    def rounding(self) -> tuple[float, float]:
        """Forward: the parts' errors and the float64 sum of k vectors
        (γ_k·Σ_j ||A_j x_j||); adjoint: the parts' errors, stacked."""
        errors = [p.rounding() for p in self.parts]
        forward = math.sqrt(sum(e[0] ** 2 for e in errors))
        forward += gamma(len(self.parts), U64) * sum(p.norm_cap() for p in self.parts)
        adjoint = math.sqrt(sum(e[1] ** 2 for e in errors))
        return forward * (1 + 4 * U64), adjoint * (1 + 4 * U64)

    def to_sparse(self):
        return sp.hstack([p.to_sparse() for p in self.parts]).tocsr()

    def sparse_nnz_estimate(self) -> int:
        return sum(p.sparse_nnz_estimate() for p in self.parts)
