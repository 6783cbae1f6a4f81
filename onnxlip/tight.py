"""A tighter local bound: the norm of the product, not the product of norms.

Within the ball, f(x) − f(x0) = S_K A_K ⋯ S_1 A_1 (x − x0), where S_k is
diagonal (ReLU secant slopes) or a convex selection (max-pooling). With the
paper's per-block radii ε_k every neuron is stable (its slope is exactly 1 or
0 all over the ball) or uncertain (slope in [0, r_i]), every max-pooling
window stable (one input stays the largest, or none can change) or not.
Write S_k = S⁰_k + U_k, the fixed stable part plus the uncertain rest, E for
the product with every U set to 0 (the Jacobian of the stable part), and
E_{l←m} for its blocks m..l. Telescoping over the first uncertain block l,

    P − E = Σ_l P_{K←l+1} U_l A_l E_{l−1←1},

and, with η^(m) a bound of ||P_{K←m} − E_{K←m}||, Q_l the uncertain outputs
of block l, ρ_l(M) = ||R_u A_l M|| (ReLU: chord slopes of the uncertain rows)
or √c·||Π_l M|| (max-pooling: the inputs of its unstable windows, c the most
windows sharing one input):

    η^(m) = Σ_{l ≥ m} (||E_{K←l+1} Q_l|| + η^(l+1)) · ρ_l(E_{l−1←m}),

    L(x0, ε) ≤ ||E|| + η^(1).

Where nothing is uncertain this is ||J(x0)||, the truth. Each term is a
Lanczos norm of a matrix-free product (upper estimates, as everywhere). The
reported bound is the smaller of this and the paper's.

Only ReLU activations (and max-pooling) are telescoped: the split S = S⁰ + U
above assumes slopes in [0, 1] with exact 0/1 stable slopes. A network with any
other activation (sigmoid, GELU, LeakyReLU, Clip, ...) gets the paper's bound
(bounds.local_bound_detail, sound for signed slopes through |chord slope|), and
so does a network that is not a chain.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from .blocks import AffineBlock, Block, MaxPoolBlock, is_chain
from .bounds import BoundResult, Solves, Trace, as_solver, chord_slopes, local_bound_detail
from .operators.base import LinearMap
from .operators.gated import Gated, apply_steps, apply_steps_t
from .operators.monomial import MonomialMap
from .spectral import Solver


@dataclass
class _Step(Gated):
    """One block of the stable product (its gate: the stable slopes, 0/1), and
    what is uncertain in it."""

    in_mask: np.ndarray = None  # inputs that can change
    uncertain: np.ndarray | None = None  # outputs with an uncertain slope / unstable window
    slopes: np.ndarray | None = None  # ReLU: chord slopes of the uncertain rows (0 elsewhere)
    members: np.ndarray | None = None  # max-pooling: inputs of the unstable windows
    overlap: float = 1.0  # max-pooling: √c


def _norm(steps: list[_Step], in_size: int, in_mask: np.ndarray | None,
          out_rows: np.ndarray | None, head: LinearMap | None, solves: Solves, key) -> float:
    """||diag(out_rows) · head · E_steps · diag(in_mask)||, certified (bounds.Solves)."""
    if (out_rows is not None and not out_rows.any()) or (in_mask is not None and not in_mask.any()):
        return 0.0

    def forward(v):
        v = v if in_mask is None else v * in_mask
        v = apply_steps(steps, v)
        v = v if head is None else head.matvec(v)
        return v if out_rows is None else v * out_rows

    def adjoint(u):
        u = u if out_rows is None else u * out_rows
        u = u if head is None else head.rmatvec(u)
        u = apply_steps_t(steps, u)
        return u if in_mask is None else u * in_mask

    out_size = forward(np.zeros(in_size)).size
    maps = [s.linear for s in steps if s.linear is not None] + ([head] if head is not None else [])
    return solves.product_norm(forward, adjoint, in_size, out_size, maps, key, in_mask)


def tight_local_bound(blocks: list[Block], nominal: Trace, eps: float,
                      solver: Solver | float | None = None) -> BoundResult:
    """min(paper bound, ||E|| + η^(1)); the per-block records are the paper's."""
    start = time.perf_counter()
    solver = as_solver(solver)
    paper, widths = local_bound_detail(blocks, nominal, eps, solver)
    solves = Solves(solver)
    if not is_chain(blocks) or not all(_telescoped(b) for b in blocks):
        return paper  # the telescoping below is written for chains of ReLU and max-pooling
    steps = _stable_steps(blocks, nominal, paper, widths, eps)
    sizes = [x.size for x in nominal.inputs]
    uncertain = [j for j, s in enumerate(steps) if s.uncertain is not None and s.uncertain.any()]
    carry: dict[int, float] = {}  # ||E_{K←l+1} Q_l|| + η^(l+1) for every uncertain block l
    for j in reversed(uncertain):
        suffix = _norm(steps[j + 1:], steps[j].uncertain.size, steps[j].uncertain, None, None, solves,
                       ("suffix", j))
        carry[j] = suffix + _eta(j + 1, uncertain, carry, steps, sizes, solves)
    eta = _eta(0, uncertain, carry, steps, sizes, solves)
    bound = _norm(steps, sizes[0], steps[0].in_mask, None, None, solves, ("stable",)) + eta
    if bound >= paper.bound:
        return paper
    return BoundResult(bound, paper.layers, time.perf_counter() - start, eps,
                       paper.delta + solves.delta, solver.seed)


def _telescoped(block: Block) -> bool:
    """Whether the telescoping handles the block: affine (alone or with ReLU), max-pooling,
    a lone ReLU."""
    if isinstance(block, AffineBlock):
        return block.activation is None or block.relu
    return isinstance(block, MaxPoolBlock) or block.relu


def _eta(m: int, uncertain: list[int], carry: dict, steps: list[_Step], sizes, solves) -> float:
    """η^(m) = Σ_{l ≥ m uncertain} carry_l · ρ_l(E_{l−1←m})."""
    total = 0.0
    for j in uncertain:
        if j >= m:
            total += carry[j] * _rho(steps, m, j, sizes, solves)
    return total


def _rho(steps: list[_Step], m: int, j: int, sizes, solves) -> float:
    """ρ_j(E_{j−1←m}): how far block j's uncertain part can move, per unit input of block m."""
    s = steps[j]
    if s.slopes is not None:
        return _norm(steps[m:j], sizes[m], steps[m].in_mask, s.slopes, s.linear, solves, ("rho", m, j))
    return s.overlap * _norm(steps[m:j], sizes[m], steps[m].in_mask, s.members, None, solves,
                             ("rho", m, j))


def _stable_steps(blocks: list[Block], nominal: Trace, paper: BoundResult, widths,
                  eps: float) -> list[_Step]:
    """Each block's stable part and what is uncertain in it, every decision made on
    the interval that holds the exact value: computed ± the rounding-error bound
    the paper's bound used (`widths`, see bounds.local_bound_detail)."""
    steps, mask = [], np.ones(nominal.x.size)
    change = np.full(mask.size, eps)  # bound on |Δ| of each coordinate of the block input
    for k, (block, record) in enumerate(zip(blocks, paper.layers)):
        if isinstance(block, AffineBlock):
            interval = nominal.pre[k] - widths[k], nominal.pre[k] + widths[k]
            step, change, next_mask = _affine_step(block, interval, record.eps_in, mask)
        elif isinstance(block, MaxPoolBlock):
            step, change, next_mask = _maxpool_step(block, nominal.inputs[k], widths[k],
                                                    change, mask)
        else:
            interval = nominal.inputs[k] - widths[k], nominal.inputs[k] + widths[k]
            step, change, next_mask = _relu_step(interval, change, mask)
        steps.append(step)
        mask = next_mask
    return steps


def _affine_step(block: AffineBlock, interval, eps_k, mask):
    """ReLU rows: active where low − reach ≥ 0, inactive where high + reach ≤ 0,
    uncertain otherwise (rows that cannot move, reach 0, never are), with the
    chord slope from high (the worst case over [low, high])."""
    low, high = interval
    reach = eps_k * np.sqrt(np.maximum(block.map.sq_matvec(mask), 0.0))
    if not block.relu:
        return _Step(block.map, None, mask), reach, (reach > 0).astype(float)
    active, inactive = low - reach >= 0, high + reach <= 0
    uncertain = ~(active | inactive) & (reach > 0)
    slopes = np.where(uncertain, chord_slopes(high, high + reach), 0.0)
    step = _Step(block.map, active.astype(float), mask, uncertain.astype(float), slopes)
    return step, np.where(inactive, 0.0, reach), (~inactive & (reach > 0)).astype(float)


def _maxpool_step(block: MaxPoolBlock, z0, err, change, mask):
    """Stable windows select a fixed input; the others a convex combination of theirs.
    A window is stable when no input can change, or when its largest entry, lowered
    by its move and rounding error, stays above every other raised by theirs: ties
    and near-ties within the error bounds are unstable."""
    source, margin = block.margins(z0, change + err)
    moves = block.forward(change)
    constant = moves == 0
    stable = constant | (margin >= 0)
    members = np.zeros(z0.size)
    unstable = block.windows[~stable]
    members[unstable[unstable >= 0]] = 1.0
    selection = MonomialMap(np.where(stable & ~constant, source, -1), None, block.in_shape,
                            block.out_shape)
    step = _Step(selection, None, mask, (~stable).astype(float), members=members,
                 overlap=block.lipschitz)
    return step, moves, block.pool_mask(mask)


def _relu_step(interval, change, mask):
    """A lone ReLU: an unstable input passes a slope in [0, 1], a window of one."""
    low, high = interval
    active, inactive = low - change >= 0, high + change <= 0
    uncertain = ~(active | inactive) & (change > 0)
    step = _Step(None, active.astype(float), mask, uncertain.astype(float),
                 members=uncertain.astype(float))
    return step, np.where(inactive, 0.0, change), mask * ~inactive
