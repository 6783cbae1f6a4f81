"""How far each neuron can move over the input ball: exact while the network is
stable, a sound linear relaxation once it is not.

Over the ball ||Δx|| ≤ ε around x0 every block output is written

    Δz = L Δx + e,    e ∈ [e_lo, e_hi] elementwise,

with L a dense (outputs × inputs) matrix. Through an affine map both parts map
exactly (e by midpoint and radius with |A|). A ReLU whose pre-activation keeps
its sign over the ball passes its row (slope 1) or drops it (slope 0): while
every neuron does, L is the Jacobian of the prefix and the reach of a
pre-activation, ε·||L_i||, is exact (the paper's ε_k·||a_iᵀ D|| is its upper
bound by a product of norms). An uncertain ReLU is replaced by its chord over
the reachable interval plus a bounded error (the triangle relaxation); a
max-pooling window by its nominal winner plus a bounded error unless the
winner provably stays the largest.

Rounding is covered: the nominal values are intervals (Trace.pre_interval),
the computed rows of L carry a bound of their rounding error (from |A| and the
maps' γ), and the error terms are pushed with |A| rounded upwards.

L costs (outputs × inputs) floats per live tensor; past the memory budget the
analysis stops and the blocks from there on are left to the paper's radii.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .blocks import INPUT, AffineBlock, Block, MaxPoolBlock
from .bounds import Trace
from .operators.base import LinearMap, gamma

#: Relative widening of quantities computed in float64 from the bounds (a few
#: roundings each): far above their errors, far below anything that matters.
WIDEN = 1e-12


@dataclass
class _Linear:
    """Δz = L Δx + e over the ball: rows of L, their rounding bound, e's interval."""

    L: np.ndarray
    rho: np.ndarray  # ||computed row − exact row|| ≤ rho
    lo: np.ndarray
    hi: np.ndarray

    def change(self, eps: float) -> tuple[np.ndarray, np.ndarray]:
        """Bounds of Δz over the ball."""
        radius = eps * (np.linalg.norm(self.L, axis=1) + self.rho) * (1 + WIDEN)
        return self.lo - radius, self.hi + radius


@dataclass
class Decision:
    """What the analysis proved about one block over the ball."""

    low: np.ndarray | None = None  # ReLU: bounds of the exact pre-activation over the ball
    high: np.ndarray | None = None
    stable_windows: np.ndarray | None = None  # max-pooling: windows whose winner stays

    def relu_states(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(active, inactive, uncertain) masks of a ReLU."""
        active, inactive = self.low >= 0, self.high <= 0
        return active, inactive & ~active, ~(active | inactive)


@dataclass
class Reach:
    """The analysis of a network at x0 and ε: a decision for each block it reached
    (None past the memory budget), and the output's linear part when it got there."""

    decisions: list[Decision | None]
    output: _Linear | None = None
    uncertain: int = 0  # uncertain neurons and unstable windows among the decided blocks
    notes: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return self.output is not None and all(d is not None for d in self.decisions)

    @property
    def exact(self) -> bool:
        """Every neuron and window provably keeps its state: f is affine on the ball."""
        return self.complete and self.uncertain == 0

    def jacobian_norm_bound(self) -> float:
        """||J(x0)|| from the output's dense L (LAPACK, float64), lifted by the
        rows' rounding bounds: ||L_exact|| ≤ ||L|| + ||ρ||₂."""
        out = self.output
        return float(np.linalg.norm(out.L, 2) * (1 + WIDEN) + np.linalg.norm(out.rho))


def analyse(blocks: list[Block], nominal: Trace, eps: float, budget: float) -> Reach:
    """The reach analysis of the blocks at the nominal trace, with at most `budget`
    bytes of L matrices alive at once."""
    n0 = nominal.x.size
    readers = {}
    for k, block in enumerate(blocks):
        for j in block.inputs:
            readers[j] = k
    states: dict[int, _Linear] = {INPUT: _Linear(np.eye(n0), np.zeros(n0), np.zeros(n0), np.zeros(n0))}
    decisions: list[Decision | None] = []
    uncertain = 0
    for k, block in enumerate(blocks):
        if any(j not in states for j in block.inputs) or _bytes(states, block, n0) > budget:
            decisions.append(None)
            continue
        state = _stack([states[j] for j in block.inputs])
        if isinstance(block, AffineBlock):
            state = _affine(block.map, state)
            if block.relu:
                low, high = nominal.pre_interval(k)
                lo, hi = state.change(eps)
                decision = Decision(low + lo, high + hi)
                state = _relu(state, low, high, decision)
                uncertain += int(decision.relu_states()[2].sum())
            else:
                decision = Decision()
        elif isinstance(block, MaxPoolBlock):
            state, decision = _maxpool(block, state, nominal.in_interval(k), eps)
            uncertain += int((~decision.stable_windows).sum())
        else:  # a lone ReLU
            low, high = nominal.in_interval(k)
            lo, hi = state.change(eps)
            decision = Decision(low + lo, high + hi)
            state = _relu(state, low, high, decision)
            uncertain += int(decision.relu_states()[2].sum())
        decisions.append(decision)
        states[k] = state
        for j in set(block.inputs):
            if readers.get(j) == k and j != len(blocks) - 1:
                states.pop(j, None)
    last = states.get(len(blocks) - 1)
    notes = [] if last is not None else [
        f"the exact reach needs more than the memory budget ({budget:.3g} bytes) from block "
        f"{next(k for k, d in enumerate(decisions) if d is None)} on: the paper's radii there"]
    return Reach(decisions, last, uncertain, notes)


def _bytes(states: dict, block: Block, n0: int) -> float:
    """Memory of the L matrices alive while this block runs (its input and output)."""
    live = sum(s.L.shape[0] for s in states.values())
    return 8.0 * n0 * (live + 2 * block.out_size)


def _stack(parts: list[_Linear]) -> _Linear:
    if len(parts) == 1:
        return parts[0]
    return _Linear(np.concatenate([p.L for p in parts]), np.concatenate([p.rho for p in parts]),
                   np.concatenate([p.lo for p in parts]), np.concatenate([p.hi for p in parts]))


def _affine(linear: LinearMap, state: _Linear) -> _Linear:
    """A Δz: L and e mapped exactly, with the rounding of every product bounded."""
    g = gamma(linear.fan_in + 3, linear.unit_roundoff)
    L = linear.matmat(state.L)
    rows = np.linalg.norm(state.L, axis=1)
    rho = linear.abs_bound(state.rho + g * rows)
    mid, mid_err = linear.matvec_bounded((state.lo + state.hi) / 2, np.zeros(state.lo.size))
    radius = linear.abs_bound((state.hi - state.lo) / 2) + mid_err
    return _Linear(L, rho, mid - radius, mid + radius)


def _relu(state: _Linear, low: np.ndarray, high: np.ndarray, decision: Decision) -> _Linear:
    """ReLU after a pre-activation y* ∈ [low, high] (nominal) moved by Δy = state.

    Active rows pass, inactive rows vanish; an uncertain row takes the chord
    slope λ of the ReLU over [y_lo, y_hi] (the decision's bounds), with
    λy ≤ relu(y) ≤ λ(y − y_lo): Δz = λΔy + δ, δ ∈ [min(λy* − relu y*),
    max(λ(y* − y_lo) − relu y*)] over y* ∈ [low, high].
    """
    active, _, uncertain = decision.relu_states()
    y_lo, y_hi = decision.low, decision.high
    lam = np.where(active, 1.0, 0.0)
    width = np.where(uncertain, y_hi - y_lo, 1.0)
    lam = np.where(uncertain, np.maximum(y_hi, 0.0) / width, lam)
    d_lo = np.zeros_like(lam)
    d_hi = np.zeros_like(lam)

    def lower(y):
        return lam * y - np.maximum(y, 0.0)

    def upper(y):
        return lam * (y - y_lo) - np.maximum(y, 0.0)

    kink = np.clip(0.0, low, high)
    d_lo[uncertain] = np.minimum(lower(low), lower(high))[uncertain]
    d_hi[uncertain] = np.maximum.reduce([upper(low), upper(high), upper(kink)])[uncertain]
    slack = WIDEN * (np.abs(d_lo) + np.abs(d_hi) + np.abs(y_lo) + np.abs(y_hi)) + 1e-300
    lo = lam * state.lo + np.where(uncertain, d_lo - slack, 0.0)
    hi = lam * state.hi + np.where(uncertain, d_hi + slack, 0.0)
    return _Linear(state.L * lam[:, None], state.rho * lam, lo, hi)


def _maxpool(block: MaxPoolBlock, state: _Linear, nominal: tuple[np.ndarray, np.ndarray],
             eps: float) -> tuple[_Linear, Decision]:
    """Each window as its nominal winner w plus t, with t = 0 where w provably
    stays the largest (its lowest value beats every other member's highest)
    and otherwise t ∈ [−(max_j z_hi_j − z_lo_w), max_j y_hi_j − y_lo_w] (y the
    members' values over the ball, z their nominal intervals)."""
    zlo, zhi = nominal
    lo, hi = state.change(eps)
    windows = block.windows
    padded = windows < 0
    index = np.where(padded, 0, windows)
    rows = np.arange(len(windows))
    mid = (zlo + zhi) / 2
    winner = index[rows, np.argmax(np.where(padded, -np.inf, mid[index]), axis=1)]
    y_lo_w = zlo[winner] + lo[winner]
    others_hi = np.where(padded | (index == winner[:, None]), -np.inf, zhi[index] + hi[index])
    stable = y_lo_w >= others_hi.max(axis=1, initial=-np.inf)
    top_z = np.where(padded, -np.inf, zhi[index]).max(axis=1)
    top_y = np.where(padded, -np.inf, zhi[index] + hi[index]).max(axis=1)
    t_lo = np.where(stable, 0.0, -(top_z - zlo[winner]))
    t_hi = np.where(stable, 0.0, top_y - y_lo_w)
    slack = WIDEN * (np.abs(t_lo) + np.abs(t_hi))
    out = _Linear(state.L[winner], state.rho[winner], state.lo[winner] + t_lo - slack,
                  state.hi[winner] + t_hi + slack)
    return out, Decision(stable_windows=stable)
