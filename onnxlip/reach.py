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
winner provably stays the largest. After the first uncertain block, the
pre-activations this leaves uncertain are bounded again by a backward pass
through every earlier block's relaxation, along the graph (onnxlip.refine);
the tighter interval is kept.

Rounding is covered: the exact values at x0 are only known to lie in the
computed trace ± its rigorous elementwise rounding-error bounds
(bounds.trace); the computed rows of L carry a bound ρ of their
distance to the exact rows (LinearMap.product_rounding); error terms are pushed
with |A| rounded upwards, and every interval is widened by WIDEN relative.

L is kept by boxes: for a tile of its columns (the input's coordinates; for
images a tile of 4 × 4 positions with their channels, _column_order), the rows
they reach and those rows' values, the other rows 0. Convolutions and
selections (LinearMap.boxed) compute only the outputs a box reaches
(LinearMap.matmat_box: the input cropped to their receptive fields), so L
holds the receptive fields and no zeros (the CIFAR-10 reference: 2.8% of
conv1's 28,800 × 3,072 entries are nonzero); other maps take dense column
chunks of at most CHUNK_BYTES. Products are made in float64, or in float32 for
float32 convolutions (their products are values of float32), and stored in
float64 where a dense L would fit the memory budget, else in float32.
ρ also covers the rounding of every stored entry (u relative plus TINY below
the normal range, only on rows that did not convert exactly), and the rows'
norms are upper bounds (float32 rows' squares summed in float32 within γ_w of
the exact sums, see _squares). Past the memory budget, or where an entry of L
leaves float32's range, the analysis stops, and the blocks from there on keep
the paper's radii.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field, replace
from functools import cached_property

import numpy as np

from .blocks import INPUT, AffineBlock, Block, MaxPoolBlock
from .bounds import Trace
from .operators.base import U32, U64, LinearMap, gamma
from .refine import (
    REFINE_PROBE,
    REFINE_ROWS,
    REFINE_WORK,
    REFINE_WORK_MIN,
    REFINE_YIELD,
    Relaxation,
    maxpool_relaxation,
    optimized_upper_bounds,
    refine,
    relu_relaxation,
)

#: Relative widening of quantities computed in float64 from the bounds (a few
#: roundings each): far above their errors, far below anything that matters.
WIDEN = 1e-12
#: The compact storage of L, where float64 does not fit (see the module's docstring).
COMPACT = np.dtype(np.float32)
#: float64 temporaries of one column chunk of a dense map's product (input, output,
#: the map's own copies).
CHUNK_BYTES = 64e6
#: Positions (2-d images: 4 × 4) or columns of a tile of L's columns (_column_order): a
#: tile through a 3 × 3 convolution reaches 6 × 6 outputs (per column 2.25x its 9,
#: against 5x for a row of the image).
TILE = 16
#: A block's refinement goes on past its probe (REFINE_PROBE rows) where it decides
#: one of them or narrows their intervals to below this share (median).
PROBE_NARROWS = 0.9
#: (u, tiny) of rounding to each storage: |fl(t) − t| ≤ u·|t| + tiny within its range.
ROUNDING = {np.dtype(np.float32): (U32, 2.0**-150), np.dtype(np.float64): (U64, 2.0**-1075)}


@dataclass
class Box:
    """L's columns `part`: its rows `rows` (increasing; None: every row) are `block`
    (Fortran order), every other row is 0 there."""

    part: slice
    rows: np.ndarray | None
    block: np.ndarray

    def of(self, values: np.ndarray) -> np.ndarray:
        """Per-row values at the box's rows."""
        return values if self.rows is None else values[self.rows]


@dataclass
class Linear:
    """Δz = L Δx + e over the ball: L by boxes of columns, the rows' rounding bound,
    e's interval."""

    boxes: list[Box]  # increasing, disjoint column ranges; columns in none are 0
    rho: np.ndarray  # ||stored row − exact row|| ≤ rho
    lo: np.ndarray
    hi: np.ndarray
    #: Rows that can change at all (the paper's mask D: where a row reads no
    #: moving value, Δz = 0 exactly and its rounding terms are dropped).
    moving: np.ndarray
    #: Upper bounds of the stored rows' norms ||L_i||.
    norms: np.ndarray
    #: Columns of L (the input's size).
    n0: int
    #: L's storage (float64, or COMPACT: see _storage).
    dtype: np.dtype

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rho.size, self.n0)

    @property
    def nbytes(self) -> int:
        return sum(b.block.nbytes + (0 if b.rows is None else b.rows.nbytes) for b in self.boxes)

    def split(self, width: int):
        """The boxes, cut into at most `width` columns each."""
        for box in self.boxes:
            start, stop = box.part.start, box.part.stop
            for first in range(start, stop, width):
                last = min(first + width, stop)
                yield Box(slice(first, last), box.rows, box.block[:, first - start:last - start])

    def columns(self, width: int):
        """(columns, L there as a dense array), at most `width` columns at a time: whole
        boxes put together (columns in no box are skipped: a linear map sends them to 0)."""
        group: list[Box] = []
        for box in self.split(width):
            apart = group and box.part.start != group[-1].part.stop
            if group and (apart or box.part.stop - group[0].part.start > width):
                yield self._dense(group)
                group = []
            group.append(box)
        if group:
            yield self._dense(group)

    def _dense(self, group: list[Box], part: slice | None = None) -> tuple[slice, np.ndarray]:
        """The columns `part` (default: the group's span) as a dense array, from the group's boxes."""
        part = part or slice(group[0].part.start, group[-1].part.stop)
        if len(group) == 1 and group[0].rows is None and group[0].part == part:
            return part, group[0].block
        out = np.zeros((self.shape[0], part.stop - part.start), self.dtype, order="F")
        for box in group:
            cut = slice(box.part.start - part.start, box.part.stop - part.start)
            if box.rows is None:
                out[:, cut] = box.block
            else:
                out[box.rows, cut] = box.block
        return part, out

    @property
    def L(self) -> np.ndarray:
        """L as a dense array."""
        return self._dense(self.boxes, slice(0, self.n0))[1]

    def scale(self, factors: np.ndarray) -> None:
        """Row i of L times factors[i] (one rounding to L's type; 0 and 1 exact), in place."""
        for box in self.boxes:
            box.block *= box.of(factors)[:, None].astype(self.dtype)

    def copy(self) -> Linear:
        """A copy whose L can be changed apart."""
        return replace(self, boxes=[replace(b, block=b.block.copy(order="F")) for b in self.boxes])

    def still(self, scaled: bool = False) -> Linear:
        """The same, with the rows that cannot move set exactly to Δz = 0 (`scaled`:
        L's rows there are 0 already)."""
        fixed = ~self.moving
        if fixed.any() and not scaled:  # L is finite: multiplying by 0 zeroes exactly
            self.scale(self.moving.astype(float))
        self.rho[fixed], self.lo[fixed], self.hi[fixed], self.norms[fixed] = 0.0, 0.0, 0.0, 0.0
        return self

    def change(self, eps: float) -> tuple[np.ndarray, np.ndarray]:
        """Bounds of Δz over the ball."""
        radius = eps * (self.norms + self.rho) * (1 + WIDEN)
        return _down(self.lo - radius), _up(self.hi + radius)


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
    #: Per block, how its output change follows its input's (None where not
    #: reached; onnxlip.refine), and the blocks: for backward bounds.
    relaxations: list[Relaxation | None] | None = None
    blocks: list[Block] | None = None

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
        L = self.output.L.astype(np.float64)
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

    def lower_changes(self, rows: np.ndarray, eps: float, enough: np.ndarray | None = None
                      ) -> np.ndarray | None:
        """Per column c of `rows` (outputs × m), a proven lower bound of c·Δz over
        the ball, Δz the change of the network's output (None where the analysis
        did not get there): the larger of the output's Δz = LΔx + e, which gives
        −ε(||cᵀL|| + Σ|c_i|ρ_i) + min of c·e over e's interval, and the
        backward pass through every block's relaxation (onnxlip.refine), which
        keeps the correlations the intervals of e lose; its lines are searched
        only for the columns whose bound is below `enough` (all without it)."""
        out = self.output
        if out is None:
            return None
        c = np.asarray(rows, np.float64)
        a, n = np.abs(c), c.shape[0]
        product = c.T @ out.L.astype(np.float64, copy=False)  # within γ_n·Σ|c_i|·||L_i|| of cᵀL
        radius = (np.linalg.norm(product, axis=1) * (1 + gamma(out.L.shape[1] + 2, U64))
                  + a.T @ out.rho + gamma(n, U64) * (a.T @ out.norms))
        terms = np.minimum(c * out.lo[:, None], c * out.hi[:, None])
        forward = terms.sum(0) - gamma(n + 1, U64) * np.abs(terms).sum(0) - eps * radius * (1 + WIDEN)
        enough = None if enough is None else np.where(forward >= enough, np.inf, -enough)
        backward = -optimized_upper_bounds(self.blocks, self.relaxations, -c, eps, out.L.shape[1], enough)
        return _down(np.maximum(forward, backward))


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
    last_read = {j: k for k, block in enumerate(blocks) for j in block.inputs}
    if COMPACT.itemsize * n0 * n0 > budget:  # not even the input's identity fits
        return Reach([None] * len(blocks), [None] * len(blocks), None, [
            f"the exact reach needs more than the memory budget ({budget:.3g} bytes) from the "
            "input on: the paper's radii"])
    shape = next((tuple(b.in_shape) for b in blocks if list(b.inputs) == [INPUT]), (n0,))
    order, tile = _column_order(shape if math.prod(shape) == n0 else (n0,))
    states = {INPUT: Linear(_identity(order, tile), np.zeros(n0), np.zeros(n0), np.zeros(n0),
                            np.ones(n0, bool), np.ones(n0), n0, COMPACT)}
    changes: list = []
    counts: list = []
    stop = None  # (block, why the analysis stopped there)
    # the blocks' relaxations for the backward refinement (None where not analysed),
    # and bounds of ||Δ(each block's output)||
    relaxations: list[Relaxation | None] = []
    out_bounds = {INPUT: eps}
    work = _Work.of(blocks, n0)
    for k, block in enumerate(blocks):
        why, state = None, None
        if not block.reachable():
            why = "its activation is not analysed"
        elif any(j not in states for j in block.inputs):
            why = "an input was not analysed"
        elif (dtype := _storage(states, block, n0, budget)) is None:
            why = f"it needs more than the memory budget ({budget:.3g} bytes)"
        else:
            state = _stack([states[j] for j in block.inputs])
            if isinstance(block, AffineBlock):
                state = _affine(block.map, state, dtype, tile)
                if state is None:
                    why = "its rows of L leave float32's range"
        if state is not None:
            change = state.change(eps)
            interval = _interval(nominal.pre[k] if isinstance(block, AffineBlock) else nominal.inputs[k],
                                 widths[k])
            if not all(np.isfinite(a).all() for a in (*change, *interval)):
                state, why = None, "its reach or its rounding-error bounds overflow"
        if state is None:
            stop = stop or (k, why)
            changes.append(None)
            counts.append(None)
            relaxations.append(None)
            states.pop(k, None)
            continue
        in_bound = math.sqrt(sum(out_bounds[j] ** 2 for j in block.inputs)) * (1 + WIDEN)
        if isinstance(block, AffineBlock):
            if block.relu and any(c[2] for c in counts if c is not None):
                change = _refined(blocks[:k + 1], relaxations, block.map, interval, change, state.moving,
                                  in_bound, eps, n0, work)
            changes.append(change)
            if block.relu:
                state, count, relaxation = _relu(state, interval, change, True, block.map, in_bound)
            else:
                count = (0, 0, 0)
                ones = np.ones(block.out_size)
                relaxation = Relaxation(block.map, ones, 0 * ones, ones, 0 * ones, in_bound, _bound(change),
                                        _bound(change))
        elif isinstance(block, MaxPoolBlock):
            changes.append(change)
            state, count, relaxation = _maxpool(block, state, interval, change, in_bound, eps)
        else:  # a lone ReLU
            changes.append(change)
            state, count, relaxation = _relu(state, interval, change, False, None, in_bound)
        relaxations.append(relaxation)
        out_bounds[k] = relaxation.out_bound
        counts.append(count)
        states[k] = state
        for j in set(block.inputs):
            if last_read[j] == k:
                states.pop(j, None)
    last = states.get(len(blocks) - 1)
    if last is not None:  # dense, its columns back in the input's order
        L = np.empty(last.shape, last.dtype, order="F")
        L[:, order] = last.L
        last.boxes = [Box(slice(0, n0), None, L)]
    notes = []
    if stop is not None:
        k, why = stop
        notes.append(f"the exact reach stops at block {k} ({blocks[k].name}): {why}; "
                     "the paper's radii from there on")
    return Reach(changes, counts, last, notes, relaxations, blocks)


def _column_order(shape: tuple[int, ...]) -> tuple[np.ndarray, int]:
    """The input coordinate of each column of L, and the columns of a tile: for
    images (N, C, *spatial), tiles of about TILE positions (4 × 4 in 2-d), each
    position's channels together, so that a tile's columns reach a small box of
    every convolution's outputs (LinearMap.matmat_box); else the input's order,
    in tiles of TILE columns. L is used by rows only until the output's, whose
    columns are put back in the input's order."""
    n = math.prod(shape)
    if len(shape) < 3 or shape[0] != 1:
        return np.arange(n), min(TILE, n)
    channels, spatial = shape[1], shape[2:]
    edge = max(1, round(TILE ** (1 / len(spatial))))
    grid = np.moveaxis(np.arange(n).reshape(shape[1:]), 0, -1)  # positions, then channels
    tiles = [grid[tuple(slice(s, s + edge) for s in start)].reshape(-1, channels)
             for start in itertools.product(*(range(0, size, edge) for size in spatial))]
    return np.concatenate(tiles).ravel(), edge ** len(spatial) * channels


def _identity(order: np.ndarray, tile: int) -> list[Box]:
    """The input's identity in column order `order`, a box per tile."""
    boxes = []
    for start in range(0, order.size, tile):
        columns = order[start:start + tile]
        rows = np.sort(columns)
        block = np.zeros((rows.size, columns.size), COMPACT, order="F")
        block[np.searchsorted(rows, columns), np.arange(columns.size)] = 1
        boxes.append(Box(slice(start, start + columns.size), rows, block))
    return boxes


@dataclass
class _Work:
    """What the backward refinement may still cost, in entries of the blocks'
    outputs its columns pass (a refined row: 2 columns through every block
    before its own): REFINE_WORK times the forward analysis' n0 columns through
    every block, and at least REFINE_WORK_MIN."""

    left: float

    @classmethod
    def of(cls, blocks: list[Block], n0: int) -> _Work:
        return cls(max(REFINE_WORK * n0 * sum(b.out_size for b in blocks), REFINE_WORK_MIN))


def _refined(blocks: list[Block], relaxations: list[Relaxation | None], linear: LinearMap,
             interval: tuple[np.ndarray, np.ndarray], change: tuple[np.ndarray, np.ndarray],
             moving: np.ndarray, in_bound: float, eps: float, n0: int,
             work: _Work) -> tuple[np.ndarray, np.ndarray]:
    """The change bounds of the last block's pre-activation with the rows they
    leave uncertain tightened by the backward pass through the blocks before it,
    those nearest to a decision first, in chunks of at most REFINE_ROWS rows
    (and no more than CHUNK_BYTES of columns), for as long as a chunk decides
    at least REFINE_YIELD of its rows and the analysis' `work` allows: where
    refining pays (rows near a decision, mid radii) it goes on, where it does
    not (most rows deep in their kink, large radii) one chunk costs little, and
    deep graphs stop at about the forward analysis' own cost."""
    low, high = interval
    y_lo, y_hi = _down(low + change[0]), _up(high + change[1])
    uncertain = np.flatnonzero(moving & (y_lo < 0) & (y_hi > 0))
    if not uncertain.size:
        return change
    nearest = np.minimum(-y_lo, y_hi)[uncertain] / (y_hi - y_lo)[uncertain]
    order = uncertain[np.argsort(nearest, kind="stable")]
    # the pass holds 2 float64 columns per row at every block: within one chunk's memory
    widest = max([linear.out_size, linear.in_size] + [r.upper_c.size for r in relaxations if r is not None])
    count = max(1, min(REFINE_ROWS, int(CHUNK_BYTES // (16 * widest))))
    change = change[0].copy(), change[1].copy()
    depth = sum(b.out_size for b in blocks[:-1])  # what one column passes, at most
    # the first of several chunks in two: a probe of the rows nearest to a decision, which
    # at large radii (all uncertain) it neither decides nor narrows much: the pass then
    # costs a few rows, not a chunk
    done, first = 0, []
    probe = min(count, REFINE_PROBE) if order.size > count else count  # rows for one chunk: no probe
    for end in sorted({probe, *range(count, order.size + count, count)}):
        rows = order[done:end]
        done = end
        if not rows.size or 2 * rows.size * depth > work.left:
            break
        work.left -= 2 * rows.size * depth
        before = change[1][rows] - change[0][rows]
        lo, hi = refine(blocks, relaxations, linear, rows, in_bound, eps, n0)
        change[0][rows] = np.fmax(change[0][rows], lo)  # fmax, fmin: a NaN bound (inf·0) is ignored
        change[1][rows] = np.fmin(change[1][rows], hi)
        decided = (_down(low[rows] + change[0][rows]) >= 0) | (_up(high[rows] + change[1][rows]) <= 0)
        if end < count:  # the probe: on where it decides some rows or narrows them
            narrowed = np.median((change[1][rows] - change[0][rows]) / before) < PROBE_NARROWS
            if REFINE_YIELD > 0 and not decided.any() and not narrowed:
                break
        if end <= count:  # the first chunk's yield counts the probe's rows
            first.append(decided)
            decided = np.concatenate(first)
        if end >= count and decided.mean() < REFINE_YIELD:
            break
    return change


def _pairs(members: np.ndarray, padded: np.ndarray, winner: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per member of each window that is not its winner: (its window, its row, the winner's row)."""
    pairs = np.argwhere(~padded & (members != winner[:, None]))
    return pairs[:, 0], members[pairs[:, 0], pairs[:, 1]], winner[pairs[:, 0]]


def _gather(block: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """block[rows] in Fortran order (gathered along the contiguous columns)."""
    return np.take(block.T, rows, axis=1).T


def _apart(block: np.ndarray, j: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Σ over the block's columns of (row j − row w)², in float64, a chunk of pairs at a time."""
    out = np.empty(j.size)
    step = max(1, int(CHUNK_BYTES // (8 * max(block.shape[1], 1))))
    for first in range(0, j.size, step):
        part = slice(first, first + step)
        diff = block[j[part]].astype(np.float64) - block[w[part]]
        out[part] = np.einsum("ij,ij->i", diff, diff)
    return out


def _rise(state: Linear, zlo: np.ndarray, zhi: np.ndarray, members: np.ndarray, padded: np.ndarray,
          winner: np.ndarray, eps: float, squares: np.ndarray) -> np.ndarray:
    """Per window (its `members`, `padded` marks, `winner`), an upper bound of
    max(0, max_j (y_j − y_w)) over the ball, y the members' values: the highest
    of z_j − z_w at x0 plus the highest of Δz_j − Δz_w = (L_j − L_w)Δx + e_j − e_w
    (rows of members that cannot move are 0, and so are their e). `squares`:
    ||L_j − L_w||² per pair (_pairs, _apart), summed in float64 over the boxes."""
    pairs, j, w = _pairs(members, padded, winner)
    n0 = state.shape[1]
    apart = np.sqrt(squares) * (1 + gamma(n0 + 2, U64))
    reach = eps * (apart + state.rho[j] + state.rho[w]) * (1 + WIDEN)
    rise = _up(zhi[j] - zlo[w] + state.hi[j] - state.lo[w] + reach)
    top = np.zeros(len(members))
    np.maximum.at(top, pairs, rise)
    return top


def _interval(value: np.ndarray, width: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where the exact value at x0 lies."""
    return _down(value - width), _up(value + width)


def _down(x: np.ndarray) -> np.ndarray:
    return x - WIDEN * np.abs(x) - 1e-300


def _up(x: np.ndarray) -> np.ndarray:
    return x + WIDEN * np.abs(x) + 1e-300


def _storage(states: dict, block: Block, n0: int, budget: float) -> np.dtype | None:
    """The storage of the block's L (counted dense: at most that) with the L matrices
    alive while it runs (their boxes) and the float64 temporaries of one column
    chunk: float64 within a quarter of the budget (room left for the blocks after
    it), else COMPACT within the budget for affine blocks (their products are
    rounded to it; the other blocks keep their input's), None where nothing
    fits. Maps computing in COMPACT (float32 convolutions) store in it: their
    products are exact there."""
    widest = max(states[j].shape[0] for j in block.inputs) + 2 * block.out_size
    live = sum(s.nbytes for s in states.values()) + min(CHUNK_BYTES, 8.0 * n0 * widest)
    if isinstance(block, AffineBlock) and block.map.compute_dtype == COMPACT:
        options = [(COMPACT, budget)]  # its products are exact there: half the memory for nothing
    elif isinstance(block, AffineBlock):
        options = [(np.dtype(np.float64), budget / 4), (COMPACT, budget)]
    else:
        options = [(np.result_type(*(states[j].dtype for j in block.inputs)), budget)]
    return next((d for d, room in options if live + d.itemsize * n0 * block.out_size <= room), None)


def _stack(parts: list[Linear]) -> Linear:
    """The states one above the other (a block reading several): their boxes cut at
    one another's column edges, rows offset."""
    if len(parts) == 1:
        return parts[0]
    edges = sorted({e for p in parts for b in p.boxes for e in (b.part.start, b.part.stop)})
    offsets = np.cumsum([0] + [p.shape[0] for p in parts])
    dtype = np.result_type(*(p.dtype for p in parts))
    pieces: dict[int, list] = {}
    for p, offset in zip(parts, offsets):
        for box in p.boxes:
            cuts = [e for e in edges if box.part.start <= e <= box.part.stop]
            for a, b in zip(cuts[:-1], cuts[1:]):
                block = box.block[:, a - box.part.start:b - box.part.start]
                pieces.setdefault(a, []).append((b, box.of(np.arange(p.shape[0])) + offset, block))
    boxes = []
    for a in sorted(pieces):
        stop, rows, blocks = zip(*pieces[a])
        boxes.append(Box(slice(a, stop[0]), np.concatenate(rows),
                         np.asarray(np.concatenate(blocks), dtype, order="F")))
    fields = ("rho", "lo", "hi", "moving", "norms")
    return Linear(boxes, *(np.concatenate([getattr(p, f) for p in parts]) for f in fields),
                  parts[0].n0, dtype)


def _affine(linear: LinearMap, state: Linear, dtype: np.dtype, tile: int) -> Linear | None:
    """Δz = A Δy: L and e mapped exactly, the rounding of every product bounded.
    L by its boxes (maps that compute only the outputs a box reaches: convolutions,
    selections; LinearMap.boxed) or by dense column chunks (in float64, or as stored
    where the map computes in that type: float32 convolutions), without incoming
    error: the products' rounding is bounded once from the rows' norms
    (LinearMap.product_rounding) and the rows' incoming error is pushed by |A|;
    stored in `dtype`, with its rounding added to ρ on the rows it changed (none
    where the map's products are values of `dtype`: float32 kernels stored in
    float32). None where an entry leaves the storage's range."""
    n_in, n0 = state.shape
    n_out = linear.out_size
    exact = np.can_cast(linear.compute_dtype, dtype, "safe")
    feed = linear.compute_dtype if state.dtype == linear.compute_dtype else np.dtype(np.float64)
    width = _width(linear, n_in, n0, tile)
    if linear.boxed:
        products = ((b.part, b.block, *linear.matmat_box(b.rows, b.block.astype(feed, copy=False)))
                    for b in state.split(width))
    else:
        products = ((part, columns, None, linear.matmat_local(columns.astype(feed, copy=False)))
                    for part, columns in state.columns(width))
    boxes, squares, inexact = [], np.zeros(n_out), np.zeros(n_out, bool)
    with np.errstate(over="ignore", invalid="ignore"):
        for part, source, rows, product in products:
            if rows is not None and not rows.size:  # reaches no output
                continue
            block = np.asarray(product, dtype, order="F")
            if np.may_share_memory(block, source):  # a map that hands its input back
                block = block.copy(order="F")
            every = slice(None) if rows is None else rows
            if not exact:
                inexact[every] |= (block != product).any(axis=1)
            squares[every] += _squares(block)
            boxes.append(Box(part, rows, block))
    norms = np.sqrt(squares) * (1 + gamma(n0 + 4, U64))  # the boxes' sums added in float64 (≤ n0)
    rounding = linear.product_rounding(state.norms, state.rho)
    if not (np.all(np.isfinite(norms)) and np.all(np.isfinite(rounding))):
        return None
    u, tiny = ROUNDING[np.dtype(dtype)]
    stored = np.where(inexact, u * norms * (1 + 2 * u) + np.sqrt(n0) * tiny, 0.0)  # the rounding to dtype
    rho = (rounding + stored) * (1 + gamma(4, U64))
    mid = (state.lo + state.hi) / 2
    radius = (state.hi - state.lo) / 2 * (1 + 4 * U64) + 2 * U64 * np.abs(mid)
    image, (mid_err,) = linear.matvec_bounded(mid, [np.zeros(mid.size)])
    radius = linear.abs_bound(radius) + mid_err
    moving = linear.sq_matvec(state.moving.astype(float)) > 0
    return Linear(boxes, rho, _down(image - radius), _up(image + radius), moving, norms, n0,
                  np.dtype(dtype)).still()


def _width(linear: LinearMap, n_in: int, n0: int, tile: int) -> int:
    """The columns of L one product takes: within CHUNK_BYTES, and for maps with
    local_columns whole tiles, about that many columns (at least one tile)."""
    width = max(1, int(CHUNK_BYTES // (8 * (n_in + 2 * linear.out_size))))
    if linear.local_columns:
        width = min(width, max(tile, linear.local_columns // tile * tile))
    return min(width, n0)


def _squares(rows: np.ndarray) -> np.ndarray:
    """Upper bounds of the rows' sums of squares, in float64. float32 rows are summed
    in float32 (5x faster): a computed sum of w nonnegative rounded products is within
    γ_w of the exact sum, plus 2^-150 per product lost to underflow; where a sum
    overflows, and float64 rows, in float64 (within γ_{w+1} of the exact sums)."""
    if rows.dtype == np.float32:
        sums = np.einsum("ij,ij->i", rows, rows).astype(np.float64)
        if np.all(np.isfinite(sums)):
            width = rows.shape[1]
            return (sums + width * 2.0**-150) / (1 - gamma(width, U32)) * (1 + 4 * U64)
    return np.einsum("ij,ij->i", rows, rows, dtype=np.float64) * (1 + gamma(rows.shape[1] + 1, U64))


def _relu(state: Linear, nominal: tuple[np.ndarray, np.ndarray],
          change: tuple[np.ndarray, np.ndarray], own: bool, linear: LinearMap | None = None,
          in_bound: float = np.inf) -> tuple[Linear, tuple[int, int, int], Relaxation]:
    """ReLU after a pre-activation y* ∈ [low, high] (its exact value at x0) that
    moves by Δy = state, Δy ∈ change over the ball.

    Active rows (y ≥ 0 over the ball) pass, inactive rows (y ≤ 0) vanish, rows
    that cannot move stay still (Δz = 0); an uncertain row takes the chord
    slope λ of the ReLU over [y_lo, y_hi], the reachable values: λy ≤ relu(y)
    ≤ λ(y − y_lo), so Δz = λΔy + δ with δ ∈ [min(λy* − relu y*),
    max(λ(y* − y_lo) − relu y*)] over y* ∈ [low, high].

    The rows are scaled in place where the state is `own` (no other block reads
    it): in the storage's u and tiny (ROUNDING), fl(fl(λ)·L_ij) is within
    (2u + u²)·λ|L_ij| + tiny of λL_ij. The relaxation for the backward pass
    (onnxlip.refine) has the same upper line; `linear` the map before it.
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
    scaled = state if own else state.copy()
    scaled.scale(lam)  # one pass: the slopes, 0 where inactive or still (×1 and ×0 are exact)
    u, tiny = ROUNDING[scaled.dtype]
    tiny = np.where(uncertain, np.sqrt(scaled.shape[1]) * tiny, 0.0)
    rho = np.where(active, state.rho, (state.rho + 3 * u * state.norms) * lam * (1 + 2 * U64) + tiny)
    norms = np.where(active, state.norms, state.norms * lam * (1 + 3 * u) + tiny)
    out = Linear(scaled.boxes, rho, _down(lam * state.lo + d_lo - slack),
                 _up(lam * state.hi + d_hi + slack), active | uncertain, norms, state.n0,
                 state.dtype).still(scaled=True)
    out.lo[active], out.hi[active] = state.lo[active], state.hi[active]
    relaxation = relu_relaxation(linear, lam, _up(d_hi + slack), low, high, y_lo, y_hi, active, uncertain,
                                 in_bound, _bound(change, active | uncertain))
    # a row that cannot move keeps its state: active or inactive by its sign at x0
    return out, (int((active | still & (low >= 0)).sum()), int((inactive | still & (low < 0)).sum()),
                 int(uncertain.sum())), relaxation


def _bound(change: tuple[np.ndarray, np.ndarray], rows: np.ndarray | None = None) -> float:
    """An upper bound of ||Δ|| over the ball from elementwise bounds of Δ (on `rows`)."""
    top = np.maximum(-change[0], change[1])
    top = top if rows is None else top[rows]
    return float(np.linalg.norm(top)) * (1 + gamma(top.size + 4, U64))


def _maxpool(block: MaxPoolBlock, state: Linear, nominal: tuple[np.ndarray, np.ndarray],
             change: tuple[np.ndarray, np.ndarray], in_bound: float,
             eps: float) -> tuple[Linear, tuple[int, int, int], Relaxation]:
    """Each window as its nominal winner w plus t: out − out* = Δz_w + t with
    t = (out − z_w) − (out* − z*_w).

    Members that cannot move are constants: their maximum is one constant c.
    A window is stable when c provably stays above every moving member over
    the ball (then Δout = 0), or when a moving winner's lowest value over the
    ball beats c and every other member's highest (then t = 0). Otherwise t ∈
    [−(max_j z_hi_j − z_lo_w), max_j y_hi_j − y_lo_w] (z: the members' exact
    values at x0, y: over the ball), w the member largest at x0; the upper end
    also at most max(0, max_j of the largest y_j − y_w over the ball), bounded
    from the rows' difference L_j − L_w (members that move together: far below
    y_hi_j − y_lo_w, which counts the winner's own move twice)."""
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
    loose = np.flatnonzero(~stable)
    _, j, w = _pairs(index[loose], padded[loose], winner[loose])
    boxes, squares = [], np.zeros(j.size)
    at = np.full(state.shape[0] + 1, -1)  # a row's place in a box (the last: rows it has not, 0)
    for box in state.boxes:
        rows = box.of(np.arange(state.shape[0]))
        at[rows] = np.arange(rows.size)
        out_rows = np.flatnonzero(at[winner] >= 0)
        if out_rows.size:
            kept = None if box.rows is None else out_rows
            boxes.append(Box(box.part, kept, _gather(box.block, at[winner[out_rows]])))
        if j.size:  # the members' rows less the winners', a row not in the box 0
            squares += _apart(np.concatenate([box.block, np.zeros((1, box.block.shape[1]), state.dtype)]),
                              at[j], at[w])
        at[rows] = -1
    if loose.size:
        t_hi[loose] = np.minimum(t_hi[loose], _rise(state, zlo, zhi, index[loose], padded[loose],
                                                    winner[loose], eps, squares))
    follows = moves.any(axis=1) & ~constant
    out = Linear(boxes, state.rho[winner], _down(state.lo[winner] + t_lo), _up(state.hi[winner] + t_hi),
                 follows, state.norms[winner], state.n0, state.dtype).still()
    # |Δ max| ≤ the largest |Δ| of a moving member
    reach = np.where(moves, np.maximum(-change[0], change[1])[index], 0.0).max(axis=1)
    relaxation = maxpool_relaxation(np.where(follows, winner, -1), t_lo, t_hi, zlo.size, in_bound,
                                    _bound((-reach, reach)))
    return out, (int(stable.sum()), 0, int((~stable).sum())), relaxation
