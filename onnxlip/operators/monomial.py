"""Selection maps: out[i] = scale[i] * in[source[i]], or 0 where source[i] < 0.

When each input feeds at most one output (the map is monomial) they cover
diagonal scalings (batch-norm, input normalization), permutations (Transpose),
zero padding and cropping, and compose with any map keeping row norms exact.
An input may also feed several outputs (max-pooling's selection of its argmax
in overlapping windows, in the Jacobian); then the transpose adds them up.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp

from .base import U64, LinearMap, gamma


class MonomialMap(LinearMap):
    """out = scale * in[source] with source = -1 meaning a constant-zero output."""

    representation = "monomial"
    boxed = True

    def __init__(self, source: np.ndarray, scale: np.ndarray | None, in_shape, out_shape):
        super().__init__(in_shape, out_shape)
        self.source = np.asarray(source, dtype=np.int64).ravel()
        self.scale = np.ones(self.out_size) if scale is None else np.broadcast_to(
            np.asarray(scale, dtype=np.float64).ravel(), (self.out_size,)
        ).copy()
        self.scale[self.source < 0] = 0.0
        self._valid = self.source >= 0
        self._rows = np.flatnonzero(self._valid)
        self._cols = self.source[self._valid]
        # bincount, not np.unique: the latter sorts (seconds on millions of entries).
        self.monomial = bool(np.bincount(self._cols, minlength=1).max(initial=0) <= 1)

    @classmethod
    def diagonal(cls, scale: np.ndarray, shape) -> MonomialMap:
        n = int(np.prod(shape))
        return cls(np.arange(n), np.broadcast_to(scale, shape), shape, shape)

    def nnz(self) -> int:
        return int(self._rows.size)

    def norm_cap(self) -> float:
        """Exact up to rounding: the largest norm of the outputs one input feeds."""
        weights = np.bincount(self._cols, weights=self.scale[self._rows] ** 2, minlength=1)
        return float(np.sqrt(weights.max(initial=0.0))) * (1 + 4 * U64)

    def coefficient_bound(self) -> float:
        """max |scale| · sqrt(the most outputs one input feeds)."""
        widest = 1 if self.monomial else int(np.bincount(self._cols, minlength=1).max(initial=0))
        with np.errstate(all="ignore"):
            return float(np.abs(self.scale).max(initial=0.0)) * math.sqrt(widest)

    def coefficients_finite(self) -> bool:
        return bool(np.all(np.isfinite(self.scale)))

    def rounding(self) -> tuple[float, float]:
        """One float64 product per entry forward; the adjoint also sums the outputs an input feeds."""
        cap = self.norm_cap()
        feeds = int(np.bincount(self._cols, minlength=1).max(initial=0))
        return U64 * cap, gamma(feeds + 1, U64) * cap * (1 if self.monomial else np.sqrt(feeds))

    def matmat(self, x):
        out = np.zeros((self.out_size, x.shape[1]), dtype=x.dtype)
        out[self._rows] = x[self._cols] * self.scale[self._rows, None]
        return out

    def matmat_box(self, rows, block):
        """The outputs whose source is one of the rows."""
        if rows is None:
            return None, self.matmat(block)
        at = np.full(self.in_size + 1, -1)  # the last: no source
        at[rows] = np.arange(rows.size)
        where = at[self.source]
        reached = np.flatnonzero(where >= 0)
        return reached, (block[where[reached]] * self.scale[reached, None]).astype(block.dtype, copy=False)

    def rmatmat(self, u):
        out = np.zeros((self.in_size, u.shape[1]), dtype=u.dtype)
        values = u[self._rows] * self.scale[self._rows, None]
        if self.monomial:
            out[self._cols] = values
        else:
            np.add.at(out, self._cols, values)
        return out

    def sq_matvec(self, d):
        out = np.zeros(self.out_size)
        out[self._rows] = d[self._cols] * self.scale[self._rows] ** 2
        return out

    def abs_matvec(self, v):
        scale = np.abs(self.scale[self._rows]).reshape((-1,) + (1,) * (v.ndim - 1))
        out = np.zeros((self.out_size,) + v.shape[1:])
        out[self._rows] = v[self._cols] * scale
        return out

    @property
    def fan_in(self) -> int:
        return 1

    def to_sparse(self):
        shape = (self.out_size, self.in_size)
        return sp.csr_matrix((self.scale[self._rows], (self._rows, self._cols)), shape=shape)

    def sparse_nnz_estimate(self) -> int:
        return self.nnz()
