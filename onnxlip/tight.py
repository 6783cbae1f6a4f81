"""A tighter local bound: the norm of the product, not the product of norms.

Within the ball, f(x) − f(x0) = S_K A_K ⋯ S_1 A_1 (x − x0), where S_k is
diagonal (ReLU secant slopes) or a convex selection (max-pooling). With the
paper's per-block radii ε_k (or the exact reach of onnxlip.reach) every neuron
is stable (its slope is exactly 1 or 0 all over the ball) or uncertain, every
max-pooling window stable (one input stays the largest, or none can change)
or not. Write S_k = S⁰_k + U_k, the fixed part (stable slopes, the slope of an
uncertain neuron's side at x0, every window's nominal winner unless tied at
x0) plus the
uncertain rest, E for the product with every U set to 0 (J(x0) where no
neuron is at its kink), and E_{l←m} for its blocks m..l. Telescoping over the
first uncertain block l,

    P − E = Σ_l P_{K←l+1} U_l A_l E_{l−1←1},

and, with η^(m) a bound of ||P_{K←m} − E_{K←m}||, Q_l the uncertain outputs
of block l, ρ_l(M) = ||R_u A_l M|| (ReLU: bounds of |U|, see _relu_gates)
or ||P_l M|| (max-pooling: member-minus-winner rows scaled by how far past its
gap each member can rise, and the members of tied windows, see _maxpool_step):

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
import scipy.sparse as sp

from .blocks import AffineBlock, Block, MaxPoolBlock, is_chain
from .bounds import BoundResult, Solves, Trace, as_solver, chord_slopes, local_bound_detail
from .operators.base import LinearMap
from .operators.gated import Gated, apply_steps, apply_steps_t
from .operators.matrix import SparseMap
from .operators.monomial import MonomialMap
from .spectral import Solver


@dataclass
class _Step(Gated):
    """One block of the stable product (its gate: the fixed slopes S⁰, 0/1 for
    ReLUs, the nominal winners for max-pooling), and what is uncertain in it:
    its uncertain part U moves the output by at most ||diag(slopes)·head·Δ||
    for an input change Δ (head None: the identity; slopes None: all ones)."""

    in_mask: np.ndarray = None  # inputs that can change
    uncertain: np.ndarray | None = None  # outputs with an uncertain slope / unstable window
    slopes: np.ndarray | None = None
    head: LinearMap | None = None
    #: A proven bound of ||gate · linear|| on the vectors the product feeds it
    #: (the paper's factor ||R A D|| of the block: R ≥ the gate, D ⊇ the support
    #: of the previous gate), for the rounding bound of products (Solves.product_norm).
    cap: float = np.inf


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
    caps = [s.cap for s in steps if s.linear is not None] + ([head.norm_cap()] if head is not None else [])
    return solves.product_norm(forward, adjoint, in_size, out_size, maps, key, in_mask, caps)


def tight_local_bound(blocks: list[Block], nominal: Trace, eps: float,
                      solver: Solver | float | None = None, reach: list | None = None) -> BoundResult:
    """min(paper bound, ||E|| + η^(1)); the per-block records are the paper's.

    `reach` (optional, see onnxlip.reach): per block, proven bounds (lo, hi) of
    the change over the ball of its pre-activation (affine blocks) or input
    (the others); each decision uses them where tighter than the paper's radii."""
    start = time.perf_counter()
    solver = as_solver(solver)
    paper, widths = local_bound_detail(blocks, nominal, eps, solver, reach)
    solves = Solves(solver)
    if not is_chain(blocks) or not all(b.reachable() for b in blocks):
        return paper  # the telescoping below is written for chains of ReLU and max-pooling
    bound = min(_telescoped(_stable_steps(blocks, nominal, paper, widths, eps, reach, centered),
                            nominal, solves, centered) for centered in (True, False))
    if bound >= paper.bound:
        return paper
    return BoundResult(bound, paper.layers, time.perf_counter() - start, eps,
                       paper.delta + solves.delta, solver.seed, source="tight")


def _telescoped(steps: list[_Step], nominal: Trace, solves: Solves, variant) -> float:
    """||E|| + η^(1) for one choice of the fixed part S⁰ (see _stable_steps)."""
    sizes = [x.size for x in nominal.inputs]
    uncertain = [j for j, s in enumerate(steps) if s.uncertain is not None and s.uncertain.any()]
    carry: dict[int, float] = {}  # ||E_{K←l+1} Q_l|| + η^(l+1) for every uncertain block l
    for j in reversed(uncertain):
        suffix = _norm(steps[j + 1:], steps[j].uncertain.size, steps[j].uncertain, None, None, solves,
                       ("suffix", j, variant))
        carry[j] = suffix + _eta(j + 1, uncertain, carry, steps, sizes, solves, variant)
    eta = _eta(0, uncertain, carry, steps, sizes, solves, variant)
    return _norm(steps, sizes[0], steps[0].in_mask, None, None, solves, ("stable", variant)) + eta


def _eta(m: int, uncertain: list[int], carry: dict, steps: list[_Step], sizes, solves,
         variant) -> float:
    """η^(m) = Σ_{l ≥ m uncertain} carry_l · ρ_l(E_{l−1←m})."""
    total = 0.0
    for j in uncertain:
        if j >= m:
            total += carry[j] * _rho(steps, m, j, sizes, solves, variant)
    return total


def _rho(steps: list[_Step], m: int, j: int, sizes, solves, variant) -> float:
    """ρ_j(E_{j−1←m}): how far block j's uncertain part can move, per unit input of block m."""
    s = steps[j]
    return _norm(steps[m:j], sizes[m], steps[m].in_mask, s.slopes, s.head, solves, ("rho", m, j, variant))


def _stable_steps(blocks: list[Block], nominal: Trace, paper: BoundResult, widths,
                  eps: float, reach: list | None = None, centered: bool = True) -> list[_Step]:
    """Each block's stable part and what is uncertain in it, every decision made on
    the interval that holds the exact value: computed ± the rounding-error bound
    the paper's bound used (`widths`, see bounds.local_bound_detail).

    Two choices of S⁰ are sound; neither is always tighter, and the bound takes
    the better. `centered`: uncertain neurons keep the slope of their side at x0
    and windows their nominal winner (E close to J(x0), small U where the
    states barely change). Otherwise every uncertain neuron and unstable
    window is left out of S⁰ (E smaller, and the suffixes after uncertain rows
    often vanish)."""
    steps, mask = [], np.ones(nominal.x.size)
    change = np.full(mask.size, eps)  # bound on |Δ| of each coordinate of the block input
    for k, (block, record) in enumerate(zip(blocks, paper.layers)):
        proven = None if reach is None else reach[k]
        if isinstance(block, AffineBlock):
            interval = nominal.pre[k] - widths[k], nominal.pre[k] + widths[k]
            step, change, next_mask = _affine_step(block, interval, record.eps_in, mask, proven,
                                                   centered)
        else:
            if proven is not None:
                change = np.minimum(change, np.maximum(-proven[0], proven[1]))
            if isinstance(block, MaxPoolBlock):
                step, change, next_mask = _maxpool_step(block, nominal.inputs[k], widths[k],
                                                        change, mask, centered)
            else:
                interval = nominal.inputs[k] - widths[k], nominal.inputs[k] + widths[k]
                step, change, next_mask = _relu_step(interval, change, mask, centered)
        step.cap = record.bound
        steps.append(step)
        mask = next_mask
    return steps


def _affine_step(block: AffineBlock, interval, eps_k, mask, proven=None, centered=True):
    """ReLU rows: active where low − fall ≥ 0, inactive where high + rise ≤ 0,
    uncertain otherwise (rows that cannot move, reach 0, never are). The paper's
    reach bounds both the fall and the rise; `proven` (lo, hi) bounds of the
    change tighten them. See _relu_gates for the uncertain rows."""
    low, high = interval
    reach = eps_k * np.sqrt(np.maximum(block.map.sq_matvec(mask), 0.0))
    fall, rise = reach, reach
    if proven is not None:
        fall = np.minimum(reach, np.maximum(-proven[0], 0.0))
        rise = np.minimum(reach, np.maximum(proven[1], 0.0))
    moves = np.maximum(fall, rise)
    if not block.relu:
        return _Step(block.map, None, mask), moves, (reach > 0).astype(float)
    gate, uncertain, slopes, inactive = _relu_gates(low, high, fall, rise, reach > 0, centered)
    step = _Step(block.map, gate, mask, uncertain.astype(float), slopes, block.map)
    return step, np.where(inactive, 0.0, moves), (~inactive & (reach > 0)).astype(float)


def _relu_gates(low, high, fall, rise, moving, centered=True):
    """(S⁰, uncertain, |U| bounds, inactive) of ReLUs whose exact input at x0 is in
    [low, high] and moves down by at most `fall`, up by at most `rise`.

    Relative to y* the chord slope of a ReLU is 1 while y stays ≥ 0 and 0 while
    y ≤ 0. Uncertain rows keep the slope of their side at x0 as S⁰: y* ≥ 0
    (low ≥ 0) gate 1, the slope falls at worst to low/fall (y = y* − fall < 0),
    so |U| ≤ 1 − low/fall; y* < 0 (high < 0) gate 0, |U| ≤ ȳ/(ȳ − high) with
    ȳ = high + rise (bounds.chord_slopes); a y* that may be on either side
    (within its rounding bound of the kink): gate 0, |U| ≤ 1. Not `centered`:
    every uncertain row has gate 0 and |U| ≤ the chord slope from high."""
    active, inactive = low - fall >= 0, high + rise <= 0
    uncertain = ~(active | inactive) & moving
    above = uncertain & (low >= 0) & centered
    gate = (active | above).astype(float)
    slopes = np.where(uncertain, chord_slopes(high, high + rise), 0.0)
    slopes[above] = 1.0 - low[above] / fall[above]
    return gate, uncertain, slopes, inactive


def _maxpool_step(block: MaxPoolBlock, z0, err, change, mask, centered=True):
    """Every window selects its nominal winner w in S⁰, or nothing when tied; U
    adds the rest.

    A window's output moves by Δz_w + t. With w provably the largest at x0 (its
    gaps g_j = z_w − z_j > 0 beyond the rounding bounds `err`), t = max_j
    relu(d_j − g_j), d_j = Δz_j − Δz_w ≤ d̄_j = change_j + change_w: t = λ·d_j for
    one member j and λ ∈ [0, s_j], s_j = relu(d̄_j − g_j)/d̄_j (the chord slope
    of relu(· − g_j) from 0), so ||U M|| ≤ ||P M|| with P's rows s_j·(e_j − e_w).
    A window tied at x0 (within the rounding bounds) selects nothing in S⁰:
    its change is a convex combination of its members', θᵀΔz_W, and
    Σ_i (θ_iᵀ M v)² ≤ Σ_i Σ_{j∈W_i} (M v)_j², so P has a unit row e_j for each
    of its members; not `centered`, every unstable window is treated so.
    Stable windows (no member can move, or every s_j = 0) have no rows."""
    windows = block.windows
    padded = windows < 0
    index = np.where(padded, 0, windows)
    rows = np.arange(len(windows))
    winner = index[rows, np.argmax(np.where(padded, -np.inf, z0[index]), axis=1)]
    gap = (z0[winner] - err[winner])[:, None] - (z0[index] + err[index])
    reach = change[index] + change[winner][:, None]
    others = ~padded & (index != winner[:, None])
    moving = block.forward(change) > 0
    slopes = np.where(others & (reach > 0),
                      np.maximum(reach - gap, 0.0) / np.where(reach > 0, reach, 1.0), 0.0)
    slopes[~moving] = 0.0
    tied = moving & (others & (gap <= 0) & (reach > 0)).any(axis=1)
    stable = ~tied & ~(slopes > 0).any(axis=1)
    if not centered:
        tied = ~stable
    pair_w, pair_j = np.nonzero(slopes * ~tied[:, None])
    s = slopes[pair_w, pair_j]
    unit_w, unit_j = np.nonzero(tied[:, None] & ~padded)
    count, units = s.size, unit_w.size
    values = np.concatenate([s, -s, np.ones(units)])
    out_rows = np.concatenate([np.arange(count), np.arange(count), count + np.arange(units)])
    in_cols = np.concatenate([index[pair_w, pair_j], winner[pair_w], index[unit_w, unit_j]])
    pairs = sp.csr_matrix((values, (out_rows, in_cols)), shape=(count + units, z0.size))
    head = SparseMap(pairs, block.in_shape, (count + units,))
    selection = MonomialMap(np.where(tied, -1, winner), None, block.in_shape, block.out_shape)
    step = _Step(selection, None, mask, (~stable).astype(float), None, head)
    return step, block.forward(change), block.pool_mask(mask)


def _relu_step(interval, change, mask, centered=True):
    """A lone ReLU: as the rows of an affine-ReLU block (_relu_gates), on its input."""
    low, high = interval
    gate, uncertain, slopes, inactive = _relu_gates(low, high, change, change, change > 0, centered)
    step = _Step(None, gate, mask, uncertain.astype(float), slopes)
    return step, np.where(inactive, 0.0, change), mask * ~inactive
