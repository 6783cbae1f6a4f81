"""Tighter pre-activation bounds after the first uncertain neurons: a backward
(CROWN-style) pass in the L2 ball (../shared/METHOD.md, "Linear relaxation in
an L2 ball") for the rows the forward reach analysis (onnxlip.reach) leaves
uncertain.

In the analysis' terms (changes relative to the exact values at x0), every
block relaxes as

    lower·Δy + lower_c ≤ Δa ≤ upper·Δy + upper_c   (elementwise),

Δy its input change and Δa its output change: a ReLU's stable rows exactly
(slope 1 or 0), an uncertain row by its chord from the lowest reachable value
above and by αΔy (α ∈ {0, 1}, 1 where the reach above the kink is the larger)
below; a max-pooling window by its winner plus its t interval (reach._maxpool).
A row's change c·Δy_k is then bounded by pushing c back through the graph of
blocks (blocks.flow_t, the traversal every adjoint product uses: a block's
input coefficient is split among its sources, a value read by several blocks
sums its readers'): at each relaxation a positive coefficient takes the upper
line, a negative one the lower, and the intercepts add up; at the input,
Λ·Δx ≤ ε·||Λ||. The lower bound is −(the upper bound of −c·Δy_k). On a
residual unit the coefficient reaches the unit's input both through the
branch and directly, and the two add before the next relaxation: the
correlation the forward intervals lose. For a few rows of the output (a
certificate's leads), optimized_upper_bounds also searches each uncertain
ReLU's lower slope α ∈ [0, 1] per row.

Rounding: each computed product Aᵀu is within η_a·||u|| of the exact one
(LinearMap.rounding) and every elementwise product within u64 relative; the
identity w·(AΔv) = (Aᵀw)·Δv then holds up to ||error||·||Δv||, with ||Δv||
bounded from the analysis' own intervals (`Relaxation.bound`); the sums of
intercepts carry γ_n. Everything is added to the bound.

Cost: per refined block, one backward pass of 2·rows columns through every
block before it per chunk of at most REFINE_ROWS rows (and 64 MB of columns;
reach._refined: the most nearly decided rows first). The next chunk runs only
while a chunk decides at least REFINE_YIELD of its rows, so where the rows
are deep in their kinks (large radii) the cost stays one chunk per block, and
while the whole analysis' refinement has passed at most REFINE_WORK times the
entries of its forward pass (reach._Work: a ResNet-18 on 32x32 inputs spent
3.5x, 21 s of a 23 s bound, before the cap; 5 s with it). On
the CIFAR-10 reference (one chunk of 138 rows before; reach._rise as before):
ε = 0.00624, 499 -> 412; 0.01, 1117 -> 809; 0.02, 2689 -> 2256 (1923 without
the work cap); 0.0699, 8297 -> 8141.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property

import numpy as np
import scipy.sparse as sp

from .blocks import Block, flow, flow_t
from .operators.base import U64, LinearMap, gamma

#: At most this many uncertain rows are refined at once (2 columns each), the
#: first chunk of a block at most REFINE_PROBE...
REFINE_ROWS = 256
REFINE_PROBE = 32
#: ...and the next chunk of a block's rows only while a chunk decides this share...
REFINE_YIELD = 0.1
#: ...and while the refinement has cost at most this many times the forward
#: analysis (n0 columns through every block; reach._Work)...
REFINE_WORK = 1.0
#: ...or this many output entries passed (small networks: a few milliseconds).
REFINE_WORK_MIN = 1e8


@dataclass
class Relaxation:
    """How a block's output change follows its input change (see the module's
    docstring). `linear`: the map applied before the relaxation (affine blocks).
    Max-pooling: `select[w]` the input window w follows (−1: the window cannot
    change), plus a change in [lower_c, upper_c]; `in_size` its input's size.
    `in_bound`, `bound`, `out_bound`: upper bounds of ||Δ(the map's input)||,
    ||Δy|| (the relaxation's input) and ||Δa|| (its output). ReLUs: `free`,
    the uncertain rows, whose lower line may be any αΔy + min over y* ∈ [low,
    high] of (αy* − relu y*), α ∈ [0, 1] (relu y ≥ αy; see optimized_upper_bounds)."""

    linear: LinearMap | None
    upper: np.ndarray | None
    upper_c: np.ndarray
    lower: np.ndarray | None
    lower_c: np.ndarray
    in_bound: float
    bound: float
    out_bound: float
    select: np.ndarray | None = None
    in_size: int = 0
    free: np.ndarray | None = None
    low: np.ndarray | None = None
    high: np.ndarray | None = None

    def lines(self, positive: np.ndarray, lower: np.ndarray | None = None,
              lower_c: np.ndarray | None = None, rows: np.ndarray | None = None
              ) -> tuple[np.ndarray | None, np.ndarray]:
        """The slope (None for max-pooling: `gather`) and intercept each coefficient
        takes: the upper line where it is ≥ 0 (`positive`), the lower elsewhere
        (`lower`, `lower_c`: per column, in place of the relaxation's own); `rows`:
        for these rows only (positive's rows)."""
        pick = slice(None) if rows is None else rows
        lower_c = self.lower_c[pick, None] if lower_c is None else lower_c
        shift = np.where(positive, self.upper_c[pick, None], lower_c)
        if self.select is not None:
            return None, shift
        lower = self.lower[pick, None] if lower is None else lower
        return np.where(positive, self.upper[pick, None], lower), shift

    def through(self, coeff: np.ndarray, scratch: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """coeff read back through the lines (`lines`): the coefficients on the
        relaxation's input change, and per column the sum of the intercepts' terms
        and of their magnitudes (within γ_{rows+1} of the exact sums: see
        _relaxed). Where the two lines differ on few rows (the uncertain ones, at
        small radii a few of a block's), the line is chosen on those rows only;
        where on many (1/8 of the rows), on every row at once, from the exact
        split coeff = P + N (P = max(coeff, 0), N = min(coeff, 0)): the
        coefficients P·upper + N·lower (one of the two products is 0, so each
        entry is the one rounded product of choosing), the intercepts two
        matrix products, upper_cᵀP + lower_cᵀN, and no matrix of slopes or terms
        (`scratch`: coeff's memory may hold N)."""
        shifted = self._shifted
        if self._picked * 8 > coeff.shape[0]:
            positive = np.maximum(coeff, 0.0)
            gathered = None if self.select is None else self.gathered(coeff)
            negative = np.minimum(coeff, 0.0, out=coeff if scratch else None)
            up = np.stack([self.upper_c, np.abs(self.upper_c)]) @ positive
            down = np.stack([self.lower_c, np.abs(self.lower_c)]) @ negative
            if gathered is not None:
                out = gathered
            else:
                out = np.multiply(positive, self.upper[:, None], out=positive)
                out += np.multiply(negative, self.lower[:, None], out=negative)
            return out, up[0] + down[0], up[1] - down[1]
        sub = coeff[shifted]
        terms = sub * self.lines(sub >= 0, rows=shifted)[1]
        sums, magnitudes = terms.sum(axis=0), np.abs(terms).sum(axis=0)
        if self.select is not None:
            return self.gathered(coeff), sums, magnitudes
        out = coeff * self.upper[:, None]
        sub = coeff[self._bent]
        out[self._bent] = sub * self.lines(sub >= 0, rows=self._bent)[0]
        return out, sums, magnitudes

    @cached_property
    def _picked(self) -> int:
        """How many rows a line is chosen on (where the slopes or intercepts differ)."""
        return self._shifted.size if self.select is not None else np.union1d(self._shifted, self._bent).size

    @cached_property
    def _shifted(self) -> np.ndarray:
        """Rows whose upper or lower intercept is not 0."""
        return np.flatnonzero((self.upper_c != 0) | (self.lower_c != 0))

    @cached_property
    def _bent(self) -> np.ndarray:
        """Rows whose upper and lower slopes differ."""
        return np.flatnonzero(self.upper != self.lower)

    def gathered(self, coeff: np.ndarray) -> np.ndarray:
        """Max-pooling: gather @ coeff, in coeff's memory order (a column-major coeff
        stays so: the convolution before reads it without a transposing copy).
        Where windows share an input their coefficients add (as the product's sums)."""
        targets, windows = self.routes
        out = np.zeros((self.in_size, *coeff.shape[1:]), np.result_type(coeff, np.float64),
                       order="F" if coeff.flags.f_contiguous else "C")
        if self.shared <= 1:
            out[targets] = coeff[windows]
        else:
            np.add.at(out, targets, coeff[windows])
        return out

    @cached_property
    def routes(self) -> tuple[np.ndarray, np.ndarray]:
        """Max-pooling: the input each moving window follows, and the window."""
        moves = np.flatnonzero(self.select >= 0)
        return self.select[moves], moves

    @cached_property
    def shared(self) -> int:
        """Max-pooling: the most moving windows that follow one input."""
        return int(np.bincount(self.routes[0], minlength=1).max())

    @cached_property
    def gather(self) -> sp.csr_matrix:
        """Max-pooling: the 0/1 matrix taking a window's coefficient to the input it follows."""
        targets, windows = self.routes
        return sp.csr_matrix((np.ones(windows.size), (targets, windows)),
                             shape=(self.in_size, self.select.size))

    def with_slopes(self, alpha: np.ndarray) -> Relaxation:
        """The same with the free rows' lower lines of slopes `alpha`."""
        lower, lower_c = self.lower.copy(), self.lower_c.copy()
        lower[self.free] = alpha
        lower_c[self.free] = alpha_intercept(alpha, self.low[self.free], self.high[self.free])[0]
        return replace(self, lower=lower, lower_c=lower_c)


def alpha_intercept(alpha: np.ndarray, low: np.ndarray, high: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """min over y* ∈ [low, high] of αy* − relu(y*) (concave in y*: at an end),
    rounded down, and its derivative in α (that end)."""
    at_low = alpha * low - np.maximum(low, 0.0)
    at_high = alpha * high - np.maximum(high, 0.0)
    value = np.minimum(at_low, at_high)
    return value - 4 * U64 * (np.abs(low) + np.abs(high)) - 1e-300, np.where(at_low <= at_high, low, high)


def relu_relaxation(linear: LinearMap | None, chord: np.ndarray, upper_c: np.ndarray, low: np.ndarray,
                    high: np.ndarray, y_lo: np.ndarray, y_hi: np.ndarray, active: np.ndarray,
                    uncertain: np.ndarray, in_bound: float, bound: float) -> Relaxation:
    """A ReLU whose input is exactly in [low, high] at x0 and in [y_lo, y_hi] over
    the ball: above, the forward analysis' line (slope `chord`, intercept
    `upper_c`, reach._relu); below, Δa ≥ Δy + min(y*, 0) where the reach above the
    kink is the larger, else Δa ≥ −relu(y*) (min and max round exactly). Rows
    neither active nor uncertain do not change (slope 0)."""
    alpha = np.where(active, 1.0, 0.0)
    up_side = uncertain & (y_hi >= -y_lo)
    alpha[up_side] = 1.0
    lower_c = np.zeros(low.size)
    lower_c[up_side] = np.minimum(low[up_side], 0.0)
    down_side = uncertain & ~up_side
    lower_c[down_side] = -np.maximum(high[down_side], 0.0)
    return Relaxation(linear, chord, np.where(uncertain, upper_c, 0.0), alpha, lower_c, in_bound, bound,
                      bound,  # |Δa| ≤ |Δy|: `bound` is over the rows that are not still or inactive
                      free=uncertain, low=low, high=high)


def maxpool_relaxation(select: np.ndarray, t_lo: np.ndarray, t_hi: np.ndarray, in_size: int,
                       in_bound: float, out_bound: float) -> Relaxation:
    """Window w changes by Δz[select[w]] + t, t ∈ [t_lo, t_hi] (select −1: by nothing)."""
    return Relaxation(None, None, t_hi, None, t_lo, in_bound, in_bound, out_bound, select, in_size)


def refine(blocks: list[Block], relaxations: list[Relaxation | None], linear: LinearMap, rows: np.ndarray,
           in_bound: float, eps: float, in_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Bounds (lo, hi) of the changes of rows `rows` of the last block's map
    `linear` applied to its input vector, over the ball: the relaxed network
    of the blocks before it (`relaxations`, theirs) read back through the graph
    (blocks.flow_t); `in_bound` ≥ ||Δ(linear's input)||, `in_size` the input's size."""
    r = rows.size
    unit = np.zeros((linear.out_size, 2 * r), order="F")  # column-major: what convolutions read fastest
    unit[rows, np.arange(r)] = 1.0
    unit[rows, r + np.arange(r)] = -1.0
    top = upper_bounds(blocks, relaxations, unit, eps, in_size, first=(linear, in_bound))
    return -top[r:], top[:r]


def upper_bounds(blocks: list[Block], relaxations: list[Relaxation | None], coeff: np.ndarray, eps: float,
                 in_size: int, first: tuple[LinearMap, float] | None = None) -> np.ndarray:
    """Per column c of `coeff`, an upper bound of c·Δa over the ball, Δa the change
    of the last block's output through the relaxed network (`first`: of its map
    alone, with a bound of its input's change, in place of its relaxation)."""
    extra = np.zeros(coeff.shape[1])

    def step_t(k: int, block: Block, u: np.ndarray) -> np.ndarray:
        nonlocal extra
        if first is not None and k == len(blocks) - 1:
            u, added = _pushed(first[0], u, first[1])
            extra = extra + added
            return u
        step = relaxations[k]
        u, added = _relaxed(step, u, scratch=not np.may_share_memory(u, coeff))
        extra = extra + added
        if step.linear is not None:
            u, added = _pushed(step.linear, u, step.in_bound)
            extra = extra + added
        return u

    at_input = flow_t(blocks, coeff, step_t, in_size)
    return (eps * _norms(at_input) + extra) * (1 + 4 * U64)


#: Projected sign-gradient steps on the free lower lines' slopes (optimized_upper_bounds).
ALPHA_STEPS = 12


def optimized_upper_bounds(blocks: list[Block], relaxations: list[Relaxation | None], coeff: np.ndarray,
                           eps: float, in_size: int, enough: np.ndarray | None = None) -> np.ndarray:
    """upper_bounds with the free rows' lower lines chosen per column: projected
    sign-gradient descent on the bound over the slopes α ∈ [0, 1] (α-CROWN's
    idea, the other blocks' intervals fixed), from the default lines, for the
    columns whose default bound is above `enough` (all without it), until 3
    steps in a row gain less than 0.1%. Each column's bound is the smaller of
    upper_bounds' with the default lines and with the best slopes found: any α
    gives a sound bound, the search only picks."""
    default = upper_bounds(blocks, relaxations, coeff, eps, in_size)
    free = [k for k, r in enumerate(relaxations) if r is not None and r.free is not None and r.free.any()]
    open_ = np.flatnonzero(default > enough) if enough is not None else np.arange(coeff.shape[1])
    if not free or not ALPHA_STEPS or not open_.size:
        return default
    coeff, best = coeff[:, open_], default[open_]
    m = coeff.shape[1]
    alpha = {k: np.repeat(relaxations[k].lower[relaxations[k].free][:, None], m, axis=1) for k in free}
    found, lowest, step, idle = {k: a.copy() for k, a in alpha.items()}, np.full(m, np.inf), 0.25, 0
    for _ in range(ALPHA_STEPS):
        value, gradient = _value_and_gradient(blocks, relaxations, coeff, eps, in_size, alpha)
        better = value < lowest
        idle = 0 if np.any(value < lowest * (1 - 1e-3 * np.sign(lowest))) else idle + 1  # 0.1% of |lowest|
        if idle == 3:
            break
        lowest = np.where(better, value, lowest)
        for k in free:
            found[k][:, better] = alpha[k][:, better]
            alpha[k] = np.clip(alpha[k] - step * np.sign(gradient.get(k, 0.0)), 0.0, 1.0)
        step *= 0.85
    for j in range(m):
        chosen = [r.with_slopes(found[k][:, j]) if k in found else r for k, r in enumerate(relaxations)]
        best[j] = min(best[j], upper_bounds(blocks, chosen, coeff[:, j:j + 1], eps, in_size)[0])
    default[open_] = best
    return default


def _value_and_gradient(blocks: list[Block], relaxations: list[Relaxation | None], coeff: np.ndarray,
                        eps: float, in_size: int, alpha: dict[int, np.ndarray]
                        ) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """The backward pass's bound per column without its rounding terms (floating
    point, only to search with) and its gradient in the free rows' slopes: the
    coefficients of the backward pass (blocks.flow_t), then their sensitivities
    forward again (blocks.flow: a source's sensitivity is each reader's)."""
    stash, intercept = {}, np.zeros(coeff.shape[1])
    ends = {k: (relaxations[k].low[relaxations[k].free, None], relaxations[k].high[relaxations[k].free, None])
            for k in alpha}

    def step_t(k: int, block: Block, u: np.ndarray) -> np.ndarray:
        nonlocal intercept
        step = relaxations[k]
        lower = lower_c = None
        if k in alpha:
            lower = np.broadcast_to(step.lower[:, None], u.shape).copy()
            lower_c = np.broadcast_to(step.lower_c[:, None], u.shape).copy()
            lower[step.free] = alpha[k]
            lower_c[step.free], _ = alpha_intercept(alpha[k], *ends[k])
        slope, shift = step.lines(u >= 0, lower, lower_c)
        out = step.gather @ u if slope is None else u * slope
        intercept = intercept + (u * shift).sum(axis=0)
        stash[k] = (u, slope, shift)
        return step.linear.rmatmat(out) if step.linear is not None else out

    at_input = flow_t(blocks, coeff, step_t, in_size)
    size = np.sqrt(np.einsum("ij,ij->j", at_input, at_input))
    gradient = {}

    def step(k: int, block: Block, sense: np.ndarray) -> np.ndarray:
        if k not in stash:  # not read back from the output: no part in the bound
            return np.zeros((block.out_size, coeff.shape[1]))
        relaxation, (u, slope, shift) = relaxations[k], stash[k]
        sense = relaxation.linear.matmat(sense) if relaxation.linear is not None else sense  # ∂/∂out
        if slope is None:
            return relaxation.gather.T @ sense + shift
        if k in alpha:
            rows = u[relaxation.free]
            _, slope_of_shift = alpha_intercept(alpha[k], *ends[k])
            gradient[k] = np.where(rows < 0, rows * (sense[relaxation.free] + slope_of_shift), 0.0)
        return slope * sense + shift

    flow(blocks, eps * at_input / np.where(size > 0, size, 1.0), step)  # ∂value/∂(the input's coefficients)
    return eps * size + intercept, gradient


def _norms(coeff: np.ndarray) -> np.ndarray:
    """Upper bounds of the columns' norms, summed in float64 (each square's underflow
    loses at most 2^-1074)."""
    squares = np.einsum("ij,ij->j", coeff, coeff, dtype=np.float64) + coeff.shape[0] * 2.0**-1074
    return np.sqrt(squares) * (1 + gamma(coeff.shape[0] + 4, U64))


def _pushed(linear: LinearMap, coeff: np.ndarray, in_bound: float) -> tuple[np.ndarray, np.ndarray]:
    """Aᵀ·coeff, and per column the bound of (its rounding)·Δv, ||Δv|| ≤ in_bound."""
    adjoint = linear.rounding()[1]
    return linear.rmatmat(coeff), adjoint * _norms(coeff) * in_bound * (1 + 4 * U64)


def _relaxed(step: Relaxation, coeff: np.ndarray, scratch: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The coefficients on the relaxation's input change, and per column the
    intercepts (upper line where a coefficient is ≥ 0, lower line elsewhere) plus
    the rounding of the products times step.bound. `scratch`: coeff's memory may
    be overwritten."""
    if step.select is not None:  # max-pooling: each window's coefficient to the input it follows
        error = gamma(step.shared + 1, U64) * np.sqrt(max(step.shared, 1)) * _norms(coeff)  # (a 0/1 product)
    rows = coeff.shape[0]
    out, sums, magnitudes = step.through(coeff, scratch)
    # the sums of n rounded products, in any order (BLAS: blocked, with FMA), and one
    # addition: within γ_{n+1} of the exact sum, itself ≤ magnitudes/(1 − γ_{n+1})
    intercept = sums + gamma(rows + 4, U64) * magnitudes
    if step.select is None:
        error = 2 * U64 * _norms(out)
    return out, intercept + error * step.bound * (1 + 4 * U64)
