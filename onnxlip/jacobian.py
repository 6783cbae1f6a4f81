"""The network's Jacobian at a point, matrix-free: J v forward, Jᵀ u backward.

J = A_K S_{K-1} A_{K-1} … S_1 A_1, with S_k = diag(pre-activation > 0) and
max-pooling replaced by its selection of each window's argmax at the point.
"""

from __future__ import annotations

import numpy as np

from .blocks import AffineBlock, Block, MaxPoolBlock
from .bounds import Trace
from .operators.gated import Gated, apply_steps, apply_steps_t
from .spectral import Solver, SpectralNorm, spectral_norm


class Jacobian:
    """J(x) of a chain of blocks, from the trace of a forward pass at x."""

    def __init__(self, blocks: list[Block], at: Trace):
        self.steps: list[Gated] = []
        self.ties = 0  # pre-activations exactly at a ReLU kink
        for block, x_in, pre in zip(blocks, at.inputs, at.pre):
            if isinstance(block, AffineBlock):
                gate = (pre > 0).astype(float) if block.relu else None
                self.ties += int(np.count_nonzero(pre == 0)) if block.relu else 0
                self.steps.append(Gated(block.map, gate))
            elif isinstance(block, MaxPoolBlock):
                self.steps.append(Gated(block.selection(x_in), None))
            else:
                self.ties += int(np.count_nonzero(x_in == 0))
                self.steps.append(Gated(None, (x_in > 0).astype(float)))
        self.in_size = at.inputs[0].size
        self.out_size = at.output.size

    def matvec(self, v: np.ndarray) -> np.ndarray:
        return apply_steps(self.steps, v)

    def rmatvec(self, u: np.ndarray) -> np.ndarray:
        return apply_steps_t(self.steps, u)

    def dense(self) -> np.ndarray:
        """The full matrix (out_size x in_size), for small networks and tests."""
        return np.stack([self.rmatvec(e) for e in np.eye(self.out_size)])

    def norm(self, tol: float = 1e-8) -> tuple[SpectralNorm, np.ndarray]:
        """||J|| and its top right singular vector (unit, in the input space)."""
        # A Ritz value is a lower bound from any start: a fixed seed keeps it reproducible.
        result = spectral_norm(self.matvec, self.rmatvec, self.in_size, self.out_size,
                               Solver(tol=tol, seed=0, max_iter=300), want_vector=True, upper=False)
        vector = result.vector
        if vector is not None and vector.size != self.in_size:
            vector = self.rmatvec(vector)
        if vector is None or not np.linalg.norm(vector):
            vector = np.zeros(self.in_size)
            vector[0] = 1.0
        return result, vector / np.linalg.norm(vector)
