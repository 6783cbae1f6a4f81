"""The network's Jacobian at a point, matrix-free: J v forward, Jᵀ u backward.

J = A_K S_{K-1} A_{K-1} … S_1 A_1, with S_k = diag(pre-activation > 0) and
max-pooling replaced by its selection of each window's argmax at the point.

It is the Jacobian of the exact network (and f is affine around the point)
only when no ReLU input lies within its rounding-error bound of the kink and
no max-pooling window's largest entry is within the error bounds of another:
`ties` counts those (0: exact). A trace without error bounds counts exact
ties only.
"""

from __future__ import annotations

from functools import cached_property

import numpy as np

from .blocks import AffineBlock, Block, MaxPoolBlock
from .bounds import Trace
from .operators.base import U64, gamma
from .operators.gated import Gated, apply_steps, apply_steps_t
from .spectral import SpectralNorm, spectral_norm


class Jacobian:
    """J(x) of a chain of blocks, from the trace of a forward pass at x."""

    def __init__(self, blocks: list[Block], at: Trace):
        self.steps: list[Gated] = []
        for block, x_in, pre in zip(blocks, at.inputs, at.pre):
            if isinstance(block, AffineBlock):
                gate = (pre > 0).astype(float) if block.relu else None
                self.steps.append(Gated(block.map, gate))
            elif isinstance(block, MaxPoolBlock):
                self.steps.append(Gated(block.selection(x_in), None))
            else:
                self.steps.append(Gated(None, (x_in > 0).astype(float)))
        self.blocks, self.at = blocks, at
        self.in_size = at.inputs[0].size
        self.out_size = at.output.size

    @property
    def ties(self) -> int:
        """Activation states the point does not decide: 0 when J is the exact Jacobian."""
        return sum(self.tie_counts)

    @cached_property
    def tie_counts(self) -> tuple[int, int]:
        """count_ties with the trace's elementwise error bounds."""
        return self.count_ties()

    def count_ties(self, widths: list[np.ndarray] | None = None) -> tuple[int, int]:
        """(ReLU inputs within their error bound of the kink, max-pooling windows whose
        largest entry is within the error bounds of another), counting only values
        that vary with the input around the point (a ReLU input below its kink by
        more than its error, or a constant, does not vary): a tie between constants
        is no kink. `widths`: per block, error bounds of its pre-activations (affine)
        or inputs (others), e.g. bounds.local_bound_detail's; default the trace's
        elementwise ones (none: exact ties only)."""
        at = self.at
        if widths is None and at.pre_errors is not None:
            widths = [i if p is None else p for p, i in zip(at.pre_errors, at.in_errors)]
        widths = widths or [None] * len(self.blocks)
        relu = pool = 0
        varies = np.ones(self.in_size, dtype=bool)
        for k, block in enumerate(self.blocks):
            width = 0.0 if widths[k] is None else widths[k]
            if isinstance(block, AffineBlock):
                varies = block.map.abs_matvec(varies.astype(float)) > 0
                if block.relu:
                    low, high = at.pre[k] - width, at.pre[k] + width
                    relu += int(np.count_nonzero(varies & (low <= 0) & (high >= 0)))
                    varies &= high >= 0
            elif isinstance(block, MaxPoolBlock):
                x_in = at.inputs[k]
                spread = np.broadcast_to(width, x_in.shape)
                pool += int(np.count_nonzero(block.contested(x_in, spread, varies)))
                varies = block.forward(varies.astype(float)) > 0
            else:
                low, high = at.inputs[k] - width, at.inputs[k] + width
                relu += int(np.count_nonzero(varies & (low <= 0) & (high >= 0)))
                varies &= high >= 0
        return relu, pool

    def certified_gain(self, v: np.ndarray) -> float:
        """A proven lower bound of ||J_exact v|| / ||v||: the computed product less a
        rigorous bound of its rounding errors (each map's matvec_bounded; gates and
        selections are exact). With ties == 0, J_exact is the network's Jacobian at
        the point, so this is a lower bound of the local constant at every radius.
        Affine blocks apply the model's own layers (not a composed matrix, whose
        products were rounded when it was built)."""
        err = np.zeros(v.size)
        u = v
        for block, step in zip(self.blocks, self.steps):
            layers = block.model_layers() if isinstance(block, AffineBlock) else [
                (step.linear, None)]
            for linear, _ in layers:
                if linear is not None:
                    u, (err,) = linear.matvec_bounded(u, [err])
            if step.gate is not None:
                u, err = u * step.gate, err * step.gate
        n = max(u.size, v.size) + 2
        shrink = 1.0 - gamma(n, U64)
        value = (np.linalg.norm(u) * shrink - np.linalg.norm(err) / shrink) * shrink
        return max(0.0, float(value / np.linalg.norm(v)))

    def matvec(self, v: np.ndarray) -> np.ndarray:
        return apply_steps(self.steps, v)

    def rmatvec(self, u: np.ndarray) -> np.ndarray:
        return apply_steps_t(self.steps, u)

    def dense(self) -> np.ndarray:
        """The full matrix (out_size x in_size), for small networks and tests."""
        return np.stack([self.rmatvec(e) for e in np.eye(self.out_size)])

    def norm(self, tol: float = 1e-8) -> tuple[SpectralNorm, np.ndarray]:
        """||J|| and its top right singular vector (unit, in the input space)."""
        result = spectral_norm(self.matvec, self.rmatvec, self.in_size, self.out_size, tol=tol,
                               want_vector=True, upper=False)
        vector = result.vector
        if vector is not None and vector.size != self.in_size:
            vector = self.rmatvec(vector)
        if vector is None or not np.linalg.norm(vector):
            vector = np.zeros(self.in_size)
            vector[0] = 1.0
        return result, vector / np.linalg.norm(vector)
