"""The network's Jacobian at a point, matrix-free: J v forward, Jᵀ u backward.

On a chain J = A_K S_{K-1} A_{K-1} … S_1 A_1, with S_k = diag(pre-activation
> 0) and max-pooling replaced by its selection of each window's argmax at the
point; on a graph of blocks the same steps run along the graph (products add
where a block reads several blocks, and their transposes split).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .blocks import AffineBlock, Block, MaxPoolBlock, flow, flow_t
from .bounds import Trace
from .operators.gated import Gated, apply_steps, apply_steps_t
from .spectral import Solver, SpectralNorm, spectral_norm


@dataclass
class JacobianNorm:
    """||J(x)||, from below: the top Ritz value of Lanczos on JᵀJ (or JJᵀ).

    `value` is that Ritz value (no residual lift: it is used as a lower bound),
    `direction` the unit input direction it belongs to (||J d|| ≈ value), and
    `solve` the eigensolver's record (iterations, residual, convergence).
    """

    value: float
    direction: np.ndarray
    solve: SpectralNorm


class Jacobian:
    """J(x) of a graph of blocks, from the trace of a forward pass at x."""

    def __init__(self, blocks: list[Block], at: Trace):
        self.blocks = blocks
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
        self.in_size = at.x.size
        self.out_size = at.output.size

    def matvec(self, v: np.ndarray) -> np.ndarray:
        return flow(self.blocks, v, lambda k, _, x: apply_steps(self.steps[k:k + 1], x))[-1]

    def rmatvec(self, u: np.ndarray) -> np.ndarray:
        return flow_t(self.blocks, u, lambda k, _, y: apply_steps_t(self.steps[k:k + 1], y),
                      self.in_size)

    def dense(self) -> np.ndarray:
        """The full matrix (out_size x in_size), for small networks and tests."""
        return np.stack([self.rmatvec(e) for e in np.eye(self.out_size)])

    def norm(self, tol: float = 1e-8) -> JacobianNorm:
        """||J|| (a Ritz value, from below) and its top right singular vector."""
        # A Ritz value is a lower bound from any start: a fixed seed keeps it reproducible.
        result = spectral_norm(self.matvec, self.rmatvec, self.in_size, self.out_size,
                               Solver(tol=tol, seed=0), want_vector=True, upper=False)
        vector = result.vector
        if vector is not None and vector.size != self.in_size:
            vector = self.rmatvec(vector)
        if vector is None or not np.linalg.norm(vector):
            vector = np.zeros(self.in_size)
            vector[0] = 1.0
        return JacobianNorm(result.value, vector / np.linalg.norm(vector), result)
