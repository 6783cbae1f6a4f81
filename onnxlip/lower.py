"""Lower bounds of the true local Lipschitz constant, from real evaluations.

Three kinds, each below L(x0, ε):
- ||J(x0) v|| for its top singular vector v, computed with a rigorous bound of
  its rounding errors subtracted, when no activation input lies within its
  rounding-error bound of a kink and no max-pooling window is tied within
  the error bounds at x0 (then J(x0) is the exact Jacobian, f is differentiable
  at x0 and the ratio tends to ||J v|| along v). Otherwise ||J(x0)|| is reported
  but is no lower bound: ties at x0 can make it exceed L(x0, ε);
- ratios ||f(x) − f(x0)|| / ||x − x0|| at points of the ball, along the top
  singular vector of J(x0) and in random directions, evaluated by onnxruntime
  on the user's model;
- projected gradient ascent on that ratio inside the ball, driven by the
  engine's Jacobian products, every iterate's ratio checked by onnxruntime.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .blocks import AffineBlock, Block, flow
from .bounds import Trace, local_bound_detail, trace
from .evaluate import ModelRunner
from .jacobian import Jacobian


@dataclass
class LowerBounds:
    """Lower bounds of L(x0, ε); `best` is the largest that is valid."""

    eps: float
    jacobian_norm: float  # ||J(x0)||, the eigensolver's estimate
    jacobian_certified: float  # ||J(x0) v|| less its rounding-error bound (v: top direction)
    ties: int  # activation inputs near a kink + max-pooling windows tied, within error bounds
    sampled: float
    ascent: float
    evaluations: int

    @property
    def jacobian_exact(self) -> bool:
        """Whether J(x0) is the exact Jacobian (no ties within the error bounds)."""
        return self.ties == 0

    @property
    def best(self) -> float:
        jacobian = self.jacobian_certified if self.jacobian_exact else 0.0
        return max(self.sampled, self.ascent, jacobian)

    def to_dict(self) -> dict:
        return {"eps": self.eps, "jacobian_norm": self.jacobian_norm,
                "jacobian_exact": self.jacobian_exact, "jacobian_certified": self.jacobian_certified,
                "ties": self.ties, "sampled": self.sampled, "ascent": self.ascent,
                "best": self.best, "evaluations": self.evaluations}


class LowerBoundSearch:
    """Everything about x0 that does not depend on ε: f(x0), J(x0), its top direction."""

    def __init__(self, blocks: list[Block], runner: ModelRunner, x0: np.ndarray, seed: int = 0,
                 tol: float = 1e-6):
        self.blocks, self.runner, self.x0 = blocks, runner, x0
        self.f0 = runner(x0)
        self.nominal = nominal = trace(blocks, x0)
        self.engine_f0 = nominal.output
        # What one evaluation may be off by: its disagreement with the float64
        # engine, plus a margin of float32 rounding of the output.
        self.noise = 4 * (np.linalg.norm(self.f0 - self.engine_f0)
                          + np.finfo(np.float32).eps * np.linalg.norm(self.f0))
        jacobian = Jacobian(blocks, nominal)
        norm = jacobian.norm()
        self.direction = norm.direction
        self.jacobian_norm, self.ties = norm.value, jacobian.ties
        if self.ties:  # the elementwise error bounds swamp deep networks: retry with the
            # bound's 2-norm ones (one paper bound at a vanishing radius)
            widths = local_bound_detail(blocks, nominal, 1e-300, tol)[1]
            self.ties = sum(jacobian.count_ties(widths))
        self.jacobian_certified = jacobian.certified_gain(self.direction)
        self.rng = np.random.default_rng(seed)
        self.evaluations = 0

    def ratio(self, x: np.ndarray, eps: float) -> float:
        """A lower estimate of ||f(x) − f(x0)|| / ||x − x0||: the smaller of two
        evaluations, each made safe against its own rounding.

        onnxruntime on the user's model: at the point rounded to the model's
        input type, its numerator reduced by the noise floor. The engine: the
        change itself carried through the blocks (A Δ, then the ReLU or
        max-pooling of y0 + Δ minus that of y0, in float64), so that its error
        is relative to the change, not to the hidden values, less 1e-5 for
        the float32 convolutions. A float32 forward pass alone cannot resolve
        the change at small radii: hidden values much larger than the output
        lifted sampled ratios above ||J(x0)|| (by 5e-5 on a small network).
        """
        x = self.runner.representable(x)
        step = np.linalg.norm(x - self.x0)
        if step == 0 or step > eps:
            return 0.0
        self.evaluations += 1
        by_runtime = max(np.linalg.norm(self.runner(x) - self.f0) - self.noise, 0.0) / step
        by_engine = np.linalg.norm(output_change(self.blocks, self.nominal, x - self.x0)) / step
        return float(min(by_runtime, by_engine * (1 - 1e-5)))

    def at(self, eps: float, samples: int = 64, ascent_steps: int = 20) -> LowerBounds:
        self.evaluations = 0
        sampled = self.sample(eps, samples)
        ascent = max(self.ascend(eps, start, ascent_steps)
                     for start in (self.direction, -self.direction))
        return LowerBounds(eps, self.jacobian_norm, self.jacobian_certified, self.ties, sampled,
                           ascent, self.evaluations)

    def sample(self, eps: float, count: int) -> float:
        """Best ratio along ±(top singular vector) at a few radii, and at random points."""
        radii = eps * np.array([1.0, 0.5, 0.1])
        best = max(self.ratio(self.x0 + s * r * self.direction, eps) for r in radii for s in (1, -1))
        for _ in range(count):
            d = self.rng.standard_normal(self.x0.size)
            r = eps * self.rng.uniform(0.0, 1.0) ** (1.0 / 8)
            best = max(best, self.ratio(self.x0 + r * d / np.linalg.norm(d), eps))
        return best

    def ascend(self, eps: float, direction: np.ndarray, steps: int) -> float:
        """Projected normalized-gradient ascent of the ratio from x0 + ε·direction."""
        delta, step, best = eps * direction, eps / 4, 0.0
        for _ in range(steps):
            at = trace(self.blocks, self.x0 + delta, rounding=False)
            diff = at.output - self.engine_f0
            a, b = np.linalg.norm(diff), np.linalg.norm(delta)
            best = max(best, self.ratio(self.x0 + delta, eps))
            if a == 0 or b == 0:
                break
            grad = Jacobian(self.blocks, at).rmatvec(diff) / (a * b) - a * delta / b**3
            size = np.linalg.norm(grad)
            if not size:
                break
            delta = delta + step * grad / size
            length = np.linalg.norm(delta)
            if length > eps:
                delta *= eps / length
            step *= 0.8
        return best


def output_change(blocks: list[Block], nominal: Trace, delta: np.ndarray) -> np.ndarray:
    """f(x0 + Δ) − f(x0), carrying the change (not the values) through the blocks."""

    def step(k, block, change_in):
        x_in, pre = nominal.inputs[k], nominal.pre[k]
        if isinstance(block, AffineBlock):
            change = block.map.matvec(change_in)
            return change if block.activation is None else block.activate(pre + change) - block.activate(pre)
        return block.forward(x_in + change_in) - block.forward(x_in)

    return flow(blocks, delta, step)[-1]
