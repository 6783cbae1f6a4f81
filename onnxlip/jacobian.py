"""The network's Jacobian at a point, matrix-free: J v forward, Jᵀ u backward.

On a chain J = A_K S_{K-1} A_{K-1} … S_1 A_1, with S_k = diag(σ'(pre-activation))
(ReLU: diag(pre-activation > 0)) and max-pooling replaced by its selection of each window's argmax at the
point; on a graph of blocks the same steps run along the graph (products add
where a block reads several blocks, and their transposes split).

It is the Jacobian of the exact network only when no activation input lies
within its rounding-error bound of a kink (where σ' jumps: ReLU's 0, Clip's
bounds, ...) and no max-pooling window's largest entry is within the error
bounds of another: `ties` counts those (0: exact). A trace without error bounds
counts exact ties only. For an activation that is not ReLU the gate is σ' at the
computed pre-activation, and `certified_gain` carries its distance to σ' 's range
over the rounding interval, which holds the slope at the exact pre-activation.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from .activations import Activation
from .blocks import INPUT, AffineBlock, Block, MaxPoolBlock, flow, flow_t
from .bounds import Trace
from .operators.base import U64, gamma
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
        #: per block, a bound of |gate − σ'(exact pre-activation)| (None: the gate is exact)
        self.gate_errors: list[np.ndarray | None] = []
        for k, (block, x_in, pre) in enumerate(zip(blocks, at.inputs, at.pre)):
            gate_error = None
            if isinstance(block, AffineBlock):
                gate = None
                if block.relu:
                    gate = (pre > 0).astype(float)
                elif block.activation is not None:
                    width = 0.0 if at.pre_errors is None else at.pre_errors[k]
                    gate, gate_error = _slope_gate(block.activation, pre, width)
                self.steps.append(Gated(block.map, gate))
            elif isinstance(block, MaxPoolBlock):
                self.steps.append(Gated(block.selection(x_in), None))
            elif block.relu:
                self.steps.append(Gated(None, (x_in > 0).astype(float)))
            else:
                width = 0.0 if at.in_errors is None else at.in_errors[k]
                gate, gate_error = _slope_gate(block.activation, x_in, width)
                self.steps.append(Gated(None, gate))
            self.gate_errors.append(gate_error)
        self.at = at
        self.in_size = at.x.size
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
        """(activation inputs within their error bound of a kink, max-pooling windows whose
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
        outputs = {INPUT: np.ones(self.in_size, dtype=bool)}  # which values vary, per block
        for k, block in enumerate(self.blocks):
            varies = np.concatenate([outputs[j] for j in block.inputs])
            width = 0.0 if widths[k] is None else widths[k]
            if isinstance(block, AffineBlock):
                varies = block.map.abs_matvec(varies.astype(float)) > 0
                if block.activation is not None:
                    low, high = at.pre[k] - width, at.pre[k] + width
                    relu, varies = _kinks(block.activation, block.relu, low, high, varies, relu)
            elif isinstance(block, MaxPoolBlock):
                x_in = at.inputs[k]
                spread = np.broadcast_to(width, x_in.shape)
                pool += int(np.count_nonzero(block.contested(x_in, spread, varies)))
                varies = block.forward(varies.astype(float)) > 0
            else:
                low, high = at.inputs[k] - width, at.inputs[k] + width
                relu, varies = _kinks(block.activation, block.relu, low, high, varies, relu)
            outputs[k] = varies
        return relu, pool

    def certified_gain(self, v: np.ndarray) -> float:
        """A proven lower bound of ||J_exact v|| / ||v||: the computed product less a
        rigorous bound of its rounding errors (each map's matvec_bounded; gates and
        selections are exact). With ties == 0, J_exact is the network's Jacobian at
        the point, so this is a lower bound of the local constant at every radius.
        Affine blocks apply the model's own layers (not a composed matrix, whose
        products were rounded when it was built)."""
        values: dict[int, tuple[np.ndarray, np.ndarray]] = {INPUT: (v, np.zeros(v.size))}
        for k, (block, step) in enumerate(zip(self.blocks, self.steps)):
            u = np.concatenate([values[j][0] for j in block.inputs])
            err = np.concatenate([values[j][1] for j in block.inputs])
            if isinstance(block, AffineBlock):
                u, (err,) = block.apply_bounded(u, [err], biases=False)
            elif step.linear is not None:
                u, (err,) = step.linear.matvec_bounded(u, [err])
            gate_error = self.gate_errors[k]
            if gate_error is not None:  # |g* w* − fl(g w)| ≤ |g| e + δg (|w| + e) + rounding
                w = u
                u = w * step.gate
                err = (np.abs(step.gate) * err + gate_error * (np.abs(w) + err)
                       + 2 * U64 * np.abs(u)) * (1 + 4 * U64)
            elif step.gate is not None:
                u, err = u * step.gate, err * step.gate
            values[k] = (u, err)
        n = max(u.size, v.size) + 2
        shrink = 1.0 - gamma(n, U64)
        value = (np.linalg.norm(u) * shrink - np.linalg.norm(err) / shrink) * shrink
        return max(0.0, float(value / np.linalg.norm(v)))

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
                               Solver(tol=tol, seed=0, max_iter=300), want_vector=True, upper=False)
        vector = result.vector
        if vector is not None and vector.size != self.in_size:
            vector = self.rmatvec(vector)
        if vector is None or not np.linalg.norm(vector):
            vector = np.zeros(self.in_size)
            vector[0] = 1.0
        return JacobianNorm(result.value, vector / np.linalg.norm(vector), result)



def _slope_gate(activation: Activation, y: np.ndarray, width) -> tuple[np.ndarray, np.ndarray]:
    """(gate, error): σ'(y) at the computed pre-activation (the right derivative at a
    kink), and a bound of its distance to σ' anywhere in [y − width, y + width], which
    holds the exact pre-activation (σ' 's range there, derivative_range)."""
    with np.errstate(all="ignore"):
        low, high = np.nextafter(y - width, -np.inf), np.nextafter(y + width, np.inf)
    dmin, dmax = activation.derivative_range(low, high)
    gate = np.clip(activation.derivative(y), dmin, dmax)
    return gate, np.maximum(dmax - gate, gate - dmin) * (1 + 4 * U64) + 1e-300


def _kinks(activation: Activation, relu: bool, low: np.ndarray, high: np.ndarray, varies: np.ndarray,
           count: int) -> tuple[int, np.ndarray]:
    """Add the varying inputs whose interval holds a kink of σ to `count`; the outputs
    that still vary (σ not constant over the interval)."""
    if relu:
        count += int(np.count_nonzero(varies & (low <= 0) & (high >= 0)))
        return count, varies & (high >= 0)
    count += int(np.count_nonzero(varies & activation.kinked(low, high)))
    return count, varies & ~activation.constant(low, high)
