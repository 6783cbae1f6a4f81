"""A block row [A_1 … A_k]: the affine map of a block that reads several tensors."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from .base import LinearMap


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
        touched = sum((p.sq_matvec(np.ones(p.in_size)) > 0).astype(int) for p in parts)
        self.monomial = all(p.monomial for p in parts) and int(touched.max(initial=0)) <= 1

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

    def rmatmat(self, u):
        return np.concatenate([p.rmatmat(u) for p in self.parts])

    def sq_matvec(self, d):
        return sum(p.sq_matvec(dj) for p, dj in zip(self.parts, self.split(d)))

    def to_sparse(self):
        return sp.hstack([p.to_sparse() for p in self.parts]).tocsr()

    def sparse_nnz_estimate(self) -> int:
        return sum(p.sparse_nnz_estimate() for p in self.parts)
