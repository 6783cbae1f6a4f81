"""Composition of linear maps applied one after the other."""

from __future__ import annotations

import math

import numpy as np

from .base import LinearMap


class ChainMap(LinearMap):
    """maps[-1] ∘ … ∘ maps[0], with at most one map that is not monomial.

    That restriction keeps (A∘A) d exact: squaring a product entrywise equals
    the product of the entrywise squares when every other factor has at most
    one nonzero in each row and column.
    """

    def __init__(self, maps: list[LinearMap]):
        heavy = [m for m in maps if not m.monomial]
        if len(heavy) > 1:
            raise ValueError("a ChainMap holds at most one non-monomial map")
        super().__init__(maps[0].in_shape, maps[-1].out_shape)
        self.maps = list(maps)
        self.monomial = not heavy
        self._core = heavy[0] if heavy else maps[0]

    @property
    def representation(self) -> str:
        return self._core.representation

    def nnz(self) -> int | None:
        return self._core.nnz()

    def norm_cap(self) -> float:
        return math.prod(m.norm_cap() for m in self.maps)

    def coefficient_bound(self) -> float:
        return math.prod(m.coefficient_bound() for m in self.maps)

    def coefficients_finite(self) -> bool:
        return all(m.coefficients_finite() for m in self.maps)

    def sharp_cap(self) -> float:
        return math.prod(m.sharp_cap() for m in self.maps)

    def rounding(self) -> tuple[float, float]:
        """Errors of the factors carried through the others: applying M_L ⋯ M_1 one
        at a time, ||error|| ≤ Σ_j (Π_{i>j} a_i) η_j Π_{i<j} (a_i + η_i)."""
        caps = [m.norm_cap() for m in self.maps]
        errors = [m.rounding() for m in self.maps]
        return (_carried(caps, [e[0] for e in errors]),
                _carried(caps[::-1], [e[1] for e in errors][::-1]))

    def matmat(self, x):
        for m in self.maps:
            x = m.matmat(x)
        return x

    def matmat_local(self, x):
        for m in self.maps:
            x = m.matmat_local(x)
        return x

    def matmat_box(self, rows, block):
        for m in self.maps:
            if rows is not None and not rows.size:
                return np.zeros(0, np.intp), np.zeros((0, block.shape[1]), block.dtype)
            rows, block = m.matmat_box(rows, block)
        return rows, block

    def rmatmat(self, u):
        for m in reversed(self.maps):
            u = m.rmatmat(u)
        return u

    def sq_matvec(self, d):
        for m in self.maps:
            d = m.sq_matvec(d)
        return d

    def abs_matvec(self, v):
        for m in self.maps:
            v = m.abs_matvec(v)
        return v

    def abs_bound(self, v):
        """|A_n ⋯ A_1| ≤ |A_n| ⋯ |A_1|, each factor bounded in its own arithmetic."""
        for m in self.maps:
            v = m.abs_bound(v)
        return v

    def precise_matvec(self, x):
        for m in self.maps:
            x = m.precise_matvec(x)
        return x

    def matvec_bounded(self, x, errors):
        """The maps one after the other, each adding its own rounding."""
        for m in self.maps:
            x, errors = m.matvec_bounded(x, errors)
        return x, errors

    def product_rounding(self, norms, rho):
        """The factors one after the other; the intermediate rows' norms are at
        most |M| (the input's norms) plus the intermediate's rounding bound."""
        for m in self.maps:
            rho = m.product_rounding(norms, rho)
            norms = m.abs_bound(norms) + rho
        return rho

    @property
    def compute_dtype(self) -> np.dtype:
        return np.result_type(*(m.compute_dtype for m in self.maps))

    @property
    def boxed(self) -> bool:
        return all(m.boxed for m in self.maps)

    @property
    def local_columns(self) -> int | None:
        return min((m.local_columns for m in self.maps if m.local_columns), default=None)

    def to_sparse(self):
        result = self.maps[0].to_sparse()
        for m in self.maps[1:]:
            result = m.to_sparse() @ result
        return result.tocsr()

    def sparse_nnz_estimate(self) -> int:
        return self._core.sparse_nnz_estimate()


def _carried(caps: list[float], errors: list[float]) -> float:
    """Σ_j (Π_{i>j} caps_i) errors_j Π_{i<j} (caps_i + errors_i), factors applied in order."""
    total, before = 0.0, 1.0
    for j, (a, e) in enumerate(zip(caps, errors)):
        total += math.prod(caps[j + 1:]) * e * before
        before *= a + e
    return total


def chain(maps: list[LinearMap]) -> LinearMap:
    """One map for a list of maps (the map itself when there is one)."""
    return maps[0] if len(maps) == 1 else ChainMap(maps)


def apply_bias(maps: list[LinearMap], biases: list[np.ndarray]) -> np.ndarray:
    """The total bias of x -> maps[k](… maps[0](x) + biases[0] …) + biases[k]."""
    total = np.zeros(maps[0].out_size)
    total += biases[0]
    for m, b in zip(maps[1:], biases[1:]):
        total = m.matvec(total) + b
    return total
