"""How far each neuron can move over the input ball: exact while the network is
stable, a sound linear relaxation once it is not (../shared/METHOD.md, "Exact
radii while the prefix is stable").

Over the ball ||Δx|| ≤ ε around x0 every block output is written

    Δz = L Δx + e,    e ∈ [e_lo, e_hi] elementwise,

Δz the change of the exact value from its exact value at x0, and L a dense
(outputs × inputs) matrix: the input's identity pushed through the
linearized prefix. Through an affine map both parts map exactly (e by
midpoint and radius with |A|). A ReLU whose pre-activation keeps its sign
over the ball passes its row (slope 1) or drops it (slope 0): while every
neuron does, L is the Jacobian of the prefix and the reach of a
pre-activation, ε·||L_i||, is exact (the paper's ε_k·||a_iᵀ D|| bounds it by
a product of norms). An uncertain ReLU is replaced by its chord over the
reachable interval plus a bounded error (the triangle relaxation); a
max-pooling window by its nominal winner plus a bounded error unless the
winner provably stays the largest.

Rounding is covered: the exact values at x0 are only known to lie in the
computed trace ± its rigorous elementwise rounding-error bounds
(bounds.trace); the computed rows of L carry a bound ρ of their
distance to the exact rows (LinearMap.matmat_bounded); error terms are pushed
with |A| rounded upwards, and every interval is widened by WIDEN relative.

L costs (outputs × inputs) floats per live tensor; past the memory budget
the analysis stops, and the blocks from there on keep the paper's radii.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from .blocks import INPUT, AffineBlock, Block, MaxPoolBlock
from .bounds import Trace
from .operators.base import U64, LinearMap

#: Relative widening of quantities computed in float64 from the bounds (a few
#: roundings each): far above their errors, far below anything that matters.
WIDEN = 1e-12


@dataclass
class Linear:
    """Δz = L Δx + e over the ball: rows of L, their rounding bound, e's interval."""

    L: np.ndarray
    rho: np.ndarray  # ||computed row − exact row|| ≤ rho
    lo: np.ndarray
    hi: np.ndarray
    #: Rows that can change at all (the paper's mask D: where a row reads no
    #: moving value, Δz = 0 exactly and its rounding terms are dropped).
    moving: np.ndarray

    def still(self) -> Linear:
        """The same, with the rows that cannot move set exactly to Δz = 0."""
        fixed = ~self.moving
        self.L[fixed], self.rho[fixed], self.lo[fixed], self.hi[fixed] = 0.0, 0.0, 0.0, 0.0
        self.__dict__.pop("row_norms", None)  # L changed
        return self

    @cached_property
    def row_norms(self) -> np.ndarray:
        """||L_i|| of every row (one pass over L, shared by change() and the ReLU step)."""
        return np.linalg.norm(self.L, axis=1)

    def change(self, eps: float) -> tuple[np.ndarray, np.ndarray]:
        """Bounds of Δz over the ball."""
        radius = eps * (self.row_norms + self.rho) * (1 + WIDEN)
        return _down(self.lo - radius), _up(self.hi + radius)

    def rows(self, index: np.ndarray) -> Linear:
        return Linear(self.L[index], self.rho[index], self.lo[index], self.hi[index], self.moving[index])


@dataclass
class Reach:
    """The analysis at x0 and ε. Per block (None where it did not get, past the
    memory budget): `changes`, bounds (lo, hi) of the change over the ball of
    its pre-activation (affine blocks) or of its input (the others), and
    `counts`: (active, inactive, uncertain) ReLUs, or (stable, 0, unstable)
    max-pooling windows. `output`: the network output's Δz when it got there."""

    changes: list[tuple[np.ndarray, np.ndarray] | None]
    counts: list[tuple[int, int, int] | None]
    output: Linear | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def uncertain(self) -> int:
        """Uncertain neurons and unstable windows in the blocks reached."""
        return sum(c[2] for c in self.counts if c is not None)

    @property
    def exact(self) -> bool:
        """Every neuron and window provably keeps its state: f is affine on the ball."""
        return self.output is not None and self.uncertain == 0

    @cached_property
    def _top(self) -> float:
        """||L|| of the output's dense L (LAPACK SVD, float64)."""
        L = self.output.L
        return float(np.linalg.norm(L, 2)) if L.size else 0.0

    def jacobian_norm_bound(self) -> float:
        """||J(x0)|| ≤ ||L|| + ||ρ||₂, where the analysis is exact (||J − L||₂ ≤
        ||J − L||_F ≤ ||ρ||₂; LAPACK's singular values are within a small multiple
        of u·||L|| of the exact ones, covered here by 64·u·(smaller side))."""
        out = self.output
        lift = 1 + 64 * U64 * min(out.L.shape, default=1)
        return float(self._top * lift + np.linalg.norm(out.rho)) * (1 + WIDEN)

    def jacobian_norm_estimate(self) -> float:
        """||L||: J(x0)'s norm up to the rounding bounds (the exact case's estimate)."""
        return self._top

    def jacobian_norm_lower(self) -> float:
        """A proven lower bound of ||J(x0)||: ||L|| − ||ρ||₂, lowered by LAPACK's margin."""
        out = self.output
        lift = 1 + 64 * U64 * min(out.L.shape, default=1)
        return max(0.0, float(self._top * (2 - lift) - np.linalg.norm(out.rho)) * (1 - WIDEN))


def analyse(blocks: list[Block], nominal: Trace, eps: float, budget: float = 1e9,
            widths: list[np.ndarray] | None = None) -> Reach:
    """The reach analysis of the blocks at the nominal trace, with at most
    `budget` bytes of L matrices alive at once. `widths`: bounds of the
    rounding errors of the trace's values, of pre-activations for affine blocks
    and of inputs for the others (default: the trace's own elementwise bounds)."""
    if widths is None:
        widths = [e if isinstance(b, AffineBlock) else i
                  for b, e, i in zip(blocks, nominal.pre_errors, nominal.in_errors)]
    n0 = nominal.x.size
    if 8.0 * n0 * n0 > budget:  # not even the input's identity fits
        return Reach([None] * len(blocks), [None] * len(blocks), None, [
            f"the exact reach needs more than the memory budget ({budget:.3g} bytes) from the "
            "input on: the paper's radii"])
    last_read = {j: k for k, block in enumerate(blocks) for j in block.inputs}
    states = {INPUT: Linear(np.eye(n0), np.zeros(n0), np.zeros(n0), np.zeros(n0), np.ones(n0, bool))}
    changes: list = []
    counts: list = []
    for k, block in enumerate(blocks):
        if not block.reachable() or any(j not in states for j in block.inputs) \
                or _bytes(states, block, n0) > budget:
            changes.append(None)
            counts.append(None)
            states.pop(k, None)
            continue
        state = _stack([states[j] for j in block.inputs])
        if isinstance(block, AffineBlock):
            state = _affine(block.map, state)
            changes.append(state.change(eps))
            if block.relu:
                state, count = _relu(state, _interval(nominal.pre[k], widths[k]), changes[-1])
            else:
                count = (0, 0, 0)
        elif isinstance(block, MaxPoolBlock):
            changes.append(state.change(eps))
            state, count = _maxpool(block, state, _interval(nominal.inputs[k], widths[k]), changes[-1])
        else:  # a lone ReLU
            changes.append(state.change(eps))
            state, count = _relu(state, _interval(nominal.inputs[k], widths[k]), changes[-1])
        counts.append(count)
        states[k] = state
        for j in set(block.inputs):
            if last_read[j] == k:
                states.pop(j, None)
    last = states.get(len(blocks) - 1)
    notes = []
    stop = next((k for k, c in enumerate(changes) if c is None), None)
    if stop is not None:
        notes.append(f"the exact reach stops at block {stop} ({blocks[stop].name}): "
                     + ("its activation is not analysed" if not blocks[stop].reachable() else
                        f"it needs more than the memory budget ({budget:.3g} bytes)")
                     + "; the paper's radii from there on")
    return Reach(changes, counts, last, notes)


def _interval(value: np.ndarray, width: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where the exact value at x0 lies."""
    return _down(value - width), _up(value + width)


def _down(x: np.ndarray) -> np.ndarray:
    return x - WIDEN * np.abs(x) - 1e-300


def _up(x: np.ndarray) -> np.ndarray:
    return x + WIDEN * np.abs(x) + 1e-300


def _bytes(states: dict, block: Block, n0: int) -> float:
    """Memory of the L matrices alive while this block runs (inputs, output, temporaries)."""
    live = sum(s.L.shape[0] for s in states.values())
    return 8.0 * n0 * (live + 2 * block.out_size)


def _stack(parts: list[Linear]) -> Linear:
    if len(parts) == 1:
        return parts[0]
    return Linear(*(np.concatenate([getattr(p, f) for p in parts])
                    for f in ("L", "rho", "lo", "hi", "moving")))


def _affine(linear: LinearMap, state: Linear) -> Linear:
    """Δz = A Δy: L and e mapped exactly, the rounding of every product bounded."""
    L, rho = linear.matmat_bounded(state.L, state.rho)
    mid = (state.lo + state.hi) / 2
    radius = (state.hi - state.lo) / 2 * (1 + 4 * U64) + 2 * U64 * np.abs(mid)
    image, (mid_err,) = linear.matvec_bounded(mid, [np.zeros(mid.size)])
    radius = linear.abs_bound(radius) + mid_err
    moving = linear.sq_matvec(state.moving.astype(float)) > 0
    return Linear(L, rho, _down(image - radius), _up(image + radius), moving).still()


def _relu(state: Linear, nominal: tuple[np.ndarray, np.ndarray],
          change: tuple[np.ndarray, np.ndarray]) -> tuple[Linear, tuple[int, int, int]]:
    """ReLU after a pre-activation y* ∈ [low, high] (its exact value at x0) that
    moves by Δy = state, Δy ∈ change over the ball.

    Active rows (y ≥ 0 over the ball) pass, inactive rows (y ≤ 0) vanish, rows
    that cannot move stay still (Δz = 0); an uncertain row takes the chord
    slope λ of the ReLU over [y_lo, y_hi], the reachable values: λy ≤ relu(y)
    ≤ λ(y − y_lo), so Δz = λΔy + δ with δ ∈ [min(λy* − relu y*),
    max(λ(y* − y_lo) − relu y*)] over y* ∈ [low, high].
    """
    low, high = nominal
    y_lo, y_hi = _down(low + change[0]), _up(high + change[1])
    still = ~state.moving
    active, inactive = (y_lo >= 0) & ~still, (y_hi <= 0) & ~still
    uncertain = ~(active | inactive | still)
    lam = np.where(active, 1.0, 0.0)
    lam[uncertain] = y_hi[uncertain] / (y_hi[uncertain] - y_lo[uncertain])

    def lower(y):
        return lam * y - np.maximum(y, 0.0)

    def upper(y):
        return lam * (y - y_lo) - np.maximum(y, 0.0)

    kink = np.clip(0.0, low, high)
    d_lo = np.where(uncertain, np.minimum(lower(low), lower(high)), 0.0)
    d_hi = np.where(uncertain, np.maximum.reduce([upper(low), upper(high), upper(kink)]), 0.0)
    slack = np.where(uncertain, WIDEN * (np.abs(d_lo) + np.abs(d_hi) + np.abs(y_lo) + np.abs(y_hi))
                     + 1e-300, 0.0)
    rows = state.row_norms
    rho = np.where(active, state.rho, (state.rho + U64 * rows) * lam * (1 + 2 * U64))
    out = Linear(state.L * lam[:, None], rho, _down(lam * state.lo + d_lo - slack),
                 _up(lam * state.hi + d_hi + slack), active | uncertain).still()
    out.lo[active], out.hi[active] = state.lo[active], state.hi[active]
    # a row that cannot move keeps its state: active or inactive by its sign at x0
    return out, (int((active | still & (low >= 0)).sum()), int((inactive | still & (low < 0)).sum()),
                 int(uncertain.sum()))


def _maxpool(block: MaxPoolBlock, state: Linear, nominal: tuple[np.ndarray, np.ndarray],
             change: tuple[np.ndarray, np.ndarray]) -> tuple[Linear, tuple[int, int, int]]:
    """Each window as its nominal winner w plus t: out − out* = Δz_w + t with
    t = (out − z_w) − (out* − z*_w).

    Members that cannot move are constants: their maximum is one constant c.
    A window is stable when c provably stays above every moving member over
    the ball (then Δout = 0), or when a moving winner's lowest value over the
    ball beats c and every other member's highest (then t = 0). Otherwise t ∈
    [−(max_j z_hi_j − z_lo_w), max_j y_hi_j − y_lo_w] (z: the members' exact
    values at x0, y: over the ball), w the member largest at x0."""
    zlo, zhi = nominal
    windows = block.windows
    padded = windows < 0
    index = np.where(padded, 0, windows)
    rows = np.arange(len(windows))
    y_lo, y_hi = _down(zlo + change[0]), _up(zhi + change[1])
    moves = state.moving[index] & ~padded
    fixed = ~moves & ~padded
    fixed_lo = np.where(fixed, zlo[index], -np.inf).max(axis=1)
    fixed_hi = np.where(fixed, zhi[index], -np.inf).max(axis=1)
    moving_hi = np.where(moves, y_hi[index], -np.inf).max(axis=1)
    constant = moving_hi <= fixed_lo  # no moving member reaches c: the output is c
    mover = index[rows, np.argmax(np.where(moves, (zlo + zhi)[index], -np.inf), axis=1)]
    others = np.where(moves & (index != mover[:, None]), y_hi[index], -np.inf).max(axis=1)
    held = moves.any(axis=1) & (y_lo[mover] >= np.maximum(others, fixed_hi))
    mid = (zlo + zhi) / 2
    winner = np.where(held, mover, index[rows, np.argmax(np.where(padded, -np.inf, mid[index]), axis=1)])
    stable = constant | held
    top_z = np.where(padded, -np.inf, zhi[index]).max(axis=1)
    top_y = np.where(padded, -np.inf, y_hi[index]).max(axis=1)
    t_lo = np.where(stable, 0.0, _down(-(top_z - zlo[winner])))
    t_hi = np.where(stable, 0.0, _up(top_y - y_lo[winner]))
    out = state.rows(winner)
    out = Linear(out.L, out.rho, _down(out.lo + t_lo), _up(out.hi + t_hi),
                 moves.any(axis=1) & ~constant).still()
    return out, (int(stable.sum()), 0, int((~stable).sum()))
