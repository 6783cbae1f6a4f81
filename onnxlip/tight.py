"""A tighter local bound: the norm of the linearized network, not the product of norms.

Within the ball, f(x) − f(x0) = P (x − x0), P the network's graph of blocks
with every activation replaced by its secant: S_k (diagonal ReLU secant
slopes, or a convex selection for max-pooling) after the block's map A_k,
products adding where a block reads several blocks (Add: J_g + J_h, the
residual x + g(x): I + J_g) and stacking at Concat; on a chain P = S_K A_K ⋯
S_1 A_1. With the paper's per-block radii ε_k (or the exact reach of
onnxlip.reach) every neuron is stable (its slope is exactly 1 or 0 all over
the ball) or uncertain, every max-pooling window stable (one input stays the
largest, or none can change) or not. Write S_k = S⁰_k + U_k, the fixed part
(stable slopes, the slope of an uncertain neuron's side at x0, every window's
nominal winner unless tied at x0) plus the uncertain rest, and E for the
network with every U set to 0 (J(x0) where no neuron is at its kink).

P is linear in each S_l (every block appears once in the graph), so swapping
S for S⁰ one block at a time, in the blocks' topological order, telescopes:

    P − E = Σ_l Post_l · U_l A_l · Pre_l,

Pre_l the stable network from the input to block l's input vector (blocks
before l at S⁰), Post_l the network from block l's output to the output with
every block after l at its true S. The same expansion holds from any block
s's output: with Post^E_s the stable network from s's output to the output,
Q_s the projection onto s's uncertain outputs, Pre_{l←s} the stable network
from s's output to l's input (zero where l reads nothing that depends on s),
and ρ_l(M) = ||R_u A_l M|| (ReLU: bounds of |U|, see _relu_gates) or ||P_l M||
(max-pooling: member-minus-winner rows scaled by how far past its gap each
member can rise, and the members of tied windows, see _maxpool_step):

    carry_s = ||Post^E_s Q_s|| + η(s) ≥ ||Post_s Q_s||,
    η(s)    = Σ_{l uncertain, after s} carry_l · ρ_l(Pre_{l←s} Q_s),

    L(x0, ε) ≤ ||E|| + η(input).

On a chain, ||Post_s|| is also at most the product of the paper's block bounds
after s (each bounds its block's factor for every slope the ball allows), and
carry_s takes the smaller: where many neurons are uncertain after s the nested
η(s) exceeds it (CIFAR-10 reference at ε = 0.00624: 617 -> 499).

On a residual unit this bounds ||I + J_branch|| with the linearized branch
directly, where the paper's composition pays 1 + the product of the branch's
block norms. Where nothing is uncertain it is ||J(x0)||, the truth. Each term
is a certified norm of a matrix-free product over the graph (_Linearized: the
blocks' own traversal, blocks.flow / flow_t). The reported bound is the
smaller of this and the paper's.

Only ReLU activations (and max-pooling) are telescoped: the split S = S⁰ + U
above assumes slopes in [0, 1] with exact 0/1 stable slopes. A network with any
other activation (sigmoid, GELU, LeakyReLU, Clip, ...) gets the paper's bound
(bounds.local_bound_detail, sound for signed slopes through |chord slope|).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from functools import partial

import numpy as np
import scipy.sparse as sp

from .blocks import INPUT, AffineBlock, Block, MaxPoolBlock, flow, flow_t, is_chain
from .bounds import (
    BoundResult,
    Solves,
    Trace,
    as_solver,
    block_factors,
    cached_norm,
    chord_slopes,
    local_bound_detail,
)
from .joint import (
    FORMS_MAX,
    FORMS_MAX_REFINED,
    FORMS_MAX_TAIL,
    Spread,
    joint_bound,
    relu_spread,
    search_side,
    window_spread,
)
from .operators.base import U64, LinearMap, gamma
from .operators.gated import Gated, along, apply_steps, apply_steps_t, product, product_t
from .operators.matrix import SparseMap
from .operators.monomial import MonomialMap
from .scaling import scaled_bound
from .spectral import Solver

#: Nonzeros of the float64 versions of float32 maps made for the joint bound (_Linearized.precise).
PRECISE_NNZ = 3e7
#: ... for maps whose rounding per unit input exceeds this many float64 units times their norm cap.
PRECISE_GAIN = 1e4
#: Columns pulled back at once (their vectors' bytes, float64).
PULL_BATCH_BYTES = 64e6


@dataclass
class _Step(Gated):
    """One block of the stable network (its gate: the fixed slopes S⁰, 0/1 for
    ReLUs, the nominal winners for max-pooling), and what is uncertain in it:
    its uncertain part U moves the output by at most ||diag(slopes)·head·Δ||
    for a change Δ of its input vector (head None: the identity; slopes None:
    all ones)."""

    in_mask: np.ndarray = None  # entries of the input vector that can change
    uncertain: np.ndarray | None = None  # outputs with an uncertain slope / unstable window
    slopes: np.ndarray | None = None
    head: LinearMap | None = None
    #: A proven bound of ||gate · linear · diag(in_mask)||, for the rounding
    #: bound and the cap of products (Solves.product_norm).
    cap: float = np.inf
    #: The uncertain outputs' centres and radii, for the joint bound (onnxlip.joint;
    #: made for the centred steps only, which it reads).
    spread: Spread | None = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        """gate · A · (in_mask ∘ x): the mask only zeroes what is zero in exact
        arithmetic, and keeps the computed products within the caps."""
        return apply_steps((self,), x * along(self.in_mask, x))

    def adjoint(self, u: np.ndarray) -> np.ndarray:
        back = apply_steps_t((self,), u)
        return back * along(self.in_mask, back)

    def factors(self, direction: int) -> tuple[float, float]:
        """(cap, rounding per unit input) of the step's product (direction 0:
        forward, 1: adjoint); gates and masks multiply exactly or within U64."""
        if self.linear is None:
            return 1.0, 0.0
        cap = min(self.linear.norm_cap(), self.cap)
        return cap, self.linear.rounding()[direction] + U64 * cap


class _Linearized:
    """The stable network E as a graph: `steps` in the blocks' topological
    order, each reading what its block reads. Norms of its pieces: from the
    input or a block's output (`start`, masked) to the output or to a block's
    input vector (`end`, then a head and row weights), every block that does
    not depend on `start` holding 0. A chain is the case where every block
    reads the one before."""

    def __init__(self, blocks: list[Block], steps: list[_Step], in_size: int):
        self.blocks, self.steps, self.in_size = blocks, steps, in_size
        self._after: dict[int, np.ndarray] = {}

    def size(self, j: int) -> int:
        return self.in_size if j == INPUT else self.blocks[j].out_size

    def precise(self, nnz_max: float = PRECISE_NNZ) -> _Linearized:
        """The same network with every map whose products round far above float64's
        unit (onnxruntime's float32 kernels, chains holding them) replaced by its
        exact float64 version (LinearMap.exact64: a CSR matrix, or a convolution's
        float64 products), where those have at most `nnz_max` nonzeros in all:
        for the joint bound's dense forms."""
        maps = {id(m): m for s in self.steps for m in (s.linear, s.head, s.spread and s.spread.head)
                if m is not None and max(m.rounding()) > PRECISE_GAIN * U64 * m.norm_cap()}
        if sum(m.sparse_nnz_estimate() for m in maps.values()) > nnz_max:
            return self
        exact = {key: m.exact64 for key, m in maps.items()}

        def swap(m):
            return exact.get(id(m), m)

        steps = [replace(s, linear=swap(s.linear), head=swap(s.head),
                         spread=s.spread and replace(s.spread, head=swap(s.spread.head))) for s in self.steps]
        return _Linearized(self.blocks, steps, self.in_size)

    def input_size(self, k: int) -> int:
        return sum(self.size(j) for j in self.blocks[k].inputs)

    def after(self, start: int) -> np.ndarray:
        """Which blocks depend on the output of `start` (every block for the input)."""
        if start not in self._after:
            reached = np.full(len(self.blocks), start == INPUT)
            for k, block in enumerate(self.blocks):
                reached[k] |= k > start and any(j == start or (j != INPUT and reached[j])
                                                for j in block.inputs)
            self._after[start] = reached
        return self._after[start]

    def reads(self, start: int, end: int | None) -> bool:
        """Whether the map from `start` to `end` (None: the output) can be nonzero."""
        last = len(self.blocks) - 1 if end is None else end
        after = self.after(start)
        return start == last or any(j == start or (j != INPUT and after[j])
                                    for j in self.blocks[last].inputs)

    def products(self, start: int, in_mask: np.ndarray, end: int | None,
                 out_rows: np.ndarray | None = None, head: LinearMap | None = None):
        """(forward, adjoint, out_size, (η_f, η_a), cap) of M = diag(out_rows) · head ·
        E_{end←start} · diag(in_mask) (end None: to the network's output, without
        head and rows): its products with a vector or columns, their rounding
        bounds per unit input and a proven bound of ||M|| (see _rounding)."""
        last = len(self.blocks) - 1 if end is None else end
        after = self.after(start)
        live = np.flatnonzero(after[:last + (end is None)])
        blocks = self.blocks[:last + 1]
        steps = self.steps

        def tail(x):
            x = x if head is None else product(head, x)
            return x if out_rows is None else x * along(out_rows, x)

        def forward(v):  # a vector or columns, as adjoint
            v = v * along(in_mask, v)
            batch = v.shape[1:]

            def step(k, block, x):
                if k == start:
                    return v
                if k == end:
                    return tail(x)
                return steps[k].forward(x) if after[k] else np.zeros((block.out_size, *batch))

            return flow(blocks, v if start == INPUT else np.zeros((self.in_size, *batch)), step)[-1]

        def adjoint(u):
            held, batch = [], u.shape[1:]

            def step_t(k, block, w):
                if k == end:
                    w = w if out_rows is None else w * along(out_rows, w)
                    return w if head is None else product_t(head, w)
                if k == start:
                    held.append(w)
                elif after[k]:
                    return steps[k].adjoint(w)
                return np.zeros((self.input_size(k), *batch))

            back = flow_t(blocks, u, step_t, self.in_size)
            if start != INPUT:
                back = held[0] if held else np.zeros((self.size(start), *batch))
            return back * along(in_mask, back)

        out_size = self.size(last) if end is None else \
            self.input_size(end) if head is None else head.out_size
        rounding, cap = self._rounding(start, live, end, head)
        return forward, adjoint, out_size, rounding, cap

    def norm(self, start: int, in_mask: np.ndarray, end: int | None, solves: Solves, key,
             out_rows: np.ndarray | None = None, head: LinearMap | None = None) -> float:
        """||diag(out_rows) · head · E_{end←start} · diag(in_mask)|| (end None: to the
        network's output, without head and rows), certified (bounds.Solves)."""
        if not in_mask.any() or (out_rows is not None and not out_rows.any()) or \
                not self.reads(start, end):
            return 0.0
        forward, adjoint, out_size, rounding, cap = self.products(start, in_mask, end, out_rows, head)
        last = len(self.blocks) - 1 if end is None else end
        width = max([self.in_size] + [b.out_size for b in self.blocks[:last + 1]])
        return solves.product_norm(forward, adjoint, self.size(start), out_size, key, in_mask,
                                   rounding, cap, width)

    def pulls(self, starts: list[int], end: int | None, columns: np.ndarray,
              head: LinearMap | None = None) -> dict[int, tuple[np.ndarray, float]]:
        """Per start s (INPUT: the input), (M_sᵀ C, e_s): M_s = head · E_{end←s}
        (end None: to the output, no head) applied to the columns C by adjoint
        products, read off one pass where it goes by s's output (what reaches it
        comes from the blocks that depend on s only), and a bound e_s of the
        computed matrix's Frobenius distance to the exact one (η_a per unit
        column norm, _rounding)."""
        last = len(self.blocks) - 1 if end is None else end
        blocks, wanted = self.blocks[:last + 1], set(starts)
        held: dict[int, list[np.ndarray]] = {s: [] for s in starts}

        def step_t(k, block, w):
            if k == end:
                return w if head is None else product_t(head, w)
            if k in wanted:
                held[k].append(w)
            return self.steps[k].adjoint(w)

        width = max([self.in_size, columns.shape[0]] + [b.out_size for b in blocks])
        batch = max(1, int(PULL_BATCH_BYTES // (8 * width)))
        for i in range(0, columns.shape[1], batch):
            back = flow_t(blocks, columns[:, i:i + batch], step_t, self.in_size)
            if INPUT in wanted:
                held[INPUT].append(back)
        norm = float(np.linalg.norm(columns))
        out = {}
        for s in starts:
            if not self.reads(s, end):
                out[s] = np.zeros((self.size(s), columns.shape[1])), 0.0
                continue
            live = np.flatnonzero(self.after(s)[:last + (end is None)])
            (_, eta), _ = self._rounding(s, live, end, head)
            out[s] = np.concatenate(held[s], axis=1), eta * norm * (1 + 4 * U64)
        return out

    def _rounding(self, start: int, live: np.ndarray, end: int | None, head: LinearMap | None):
        """((η_f, η_a), cap): bounds of the computed products' distance to the exact
        ones per unit input, forward and adjoint, and of the norm itself, carried
        through the graph from the steps' caps and roundings: a value's norm g and
        its error r become c·g and c·r + η·(g + r) through a step (c its cap, η its
        rounding); the values a block reads stack (forward, exact) or add (adjoint,
        with the float64 sum's rounding). On a chain this is the chain map's
        carried rounding (operators.chain)."""
        blocks, steps = self.blocks, self.steps
        head_factors = [(1.0, 0.0)] if head is None else [
            (head.norm_cap(), head.rounding()[d] + U64 * head.norm_cap()) for d in (0, 1)]
        # forward: norms and errors of each value per unit input
        g, r = {start: 1.0}, {start: 0.0}

        def stacked(k):
            pieces = [j for j in blocks[k].inputs if j in g]
            return (math.sqrt(sum(g[j] ** 2 for j in pieces)),
                    math.sqrt(sum(r[j] ** 2 for j in pieces)))

        for k in live:
            gk, rk = stacked(k)
            c, eta = steps[k].factors(0)
            g[k], r[k] = c * gk, c * rk + eta * (gk + rk)
        if end is None:
            gk, rk = g.get(len(blocks) - 1, 0.0), r.get(len(blocks) - 1, 0.0)
        else:
            gk, rk = stacked(end)
            c, eta = head_factors[0]
            gk, rk = c * gk, c * rk + eta * (gk + rk)
        cap_f, eta_f = gk, (rk + U64 * (gk + rk)) * (1 + 4 * U64)  # and the rows' product
        # adjoint: the same backwards, pieces of a value read several times summed
        h: dict[int, list[tuple[float, float]]] = {}

        def send(k, gk, rk):
            for j in blocks[k].inputs:
                h.setdefault(j, []).append((gk, rk))

        def gathered(j):
            pieces = h.get(j, [])
            gj, rj = sum(p[0] for p in pieces), sum(p[1] for p in pieces)
            return gj, rj + gamma(max(len(pieces) - 1, 0), U64) * (gj + rj)

        if end is None:
            h[len(blocks) - 1] = [(1.0, 0.0)]
        else:
            c, eta = head_factors[-1]
            send(end, c, eta + U64 * c)
        for k in live[::-1]:
            if k == end or k not in h:
                continue
            gk, rk = gathered(k)
            c, eta = steps[k].factors(1)
            send(k, c * gk, c * rk + eta * (gk + rk))
        cap_a, eta_a = gathered(start)
        return (eta_f, eta_a * (1 + 4 * U64)), min(cap_f, cap_a) * (1 + 4 * U64)


def tight_local_bound(blocks: list[Block], nominal: Trace, eps: float,
                      solver: Solver | float | None = None, reach: list | None = None,
                      telescope: bool = True, target: float = math.inf, seconds: float = 0.0
                      ) -> BoundResult:
    """The joint bound (onnxlip.joint) where it applies, else min(paper bound,
    ||E|| + η(input)); on a chain, where the paper's product stands (nothing beat
    it, or a tail's joint bound times the paper's head did), also that product
    with diagonal scalings between dense blocks (onnxlip.scaling), where lower;
    the per-block records are the paper's.

    `reach` (optional, see onnxlip.reach): per block, proven bounds (lo, hi) of
    the change over the ball of its pre-activation (affine blocks) or input
    (the others); each decision uses them where tighter than the paper's radii.
    `telescope` False: the joint bound (onnxlip.joint) and the paper's only.
    `target`: a bound below it is all the caller needs; the joint bound is
    given up where it cannot get below it (its search stops early). `seconds` > 0:
    the joint bound (search and refinement, joint.refine) may take that long."""
    start = time.perf_counter()
    solver = as_solver(solver)
    paper, widths, weights = local_bound_detail(blocks, nominal, eps, solver, reach)
    solves = Solves(solver)
    if not all(b.reachable() for b in blocks) or not math.isfinite(paper.bound):
        return paper  # the telescoping below is written for ReLU and max-pooling
    bound = paper.bound
    suffix = _suffix_products(paper) if is_chain(blocks) else None
    source, notes = "tight", []
    headed = False  # a tail's joint bound times the paper's head won
    for centered in (True, False):
        steps = _stable_steps(blocks, nominal, paper, widths, eps, solves, reach, centered)
        net = _Linearized(blocks, steps, nominal.x.size)
        if centered:
            # the budget counts from the joint bound's start
            deadline = time.perf_counter() + seconds if seconds > 0 else None
            joint, refined = joint_bound(net, min(bound, target), seconds,
                                         target if math.isfinite(target) else 0.0)
            whole = FORMS_MAX_REFINED if seconds > 0 else FORMS_MAX
            if joint >= bound and suffix is not None and search_side(net) > whole:  # too many units for one
                joint, split, refined = _split_joint(net, paper, min(bound, target), deadline)
                headed = joint < bound
                if headed:
                    notes = [f"the joint bound of the blocks from {blocks[split].name} on, times the "
                             "paper's bounds of the blocks before"]
            if joint < bound:
                bound, source = joint, "joint (refined)" if refined else "joint"
                break  # the telescoping is then looser (87 radii of test nets: always; median 0.59x)
        if not telescope:
            break
        bound = min(bound, _telescoped(net, solves, centered, bound, suffix))
    # where the paper's product stands, alone or as a tail's head (not where one joint
    # bound of the whole network won: far below it, and the search costs ~0.3 s)
    if suffix is not None and (bound >= paper.bound or headed):
        scaled, names = scaled_bound(blocks, paper, weights, bound)
        if scaled < bound:
            bound, source = scaled, "scaled"
            notes = [f"the paper's product with diagonal scalings between {', '.join(names)}"]
    if bound >= paper.bound:
        return paper
    return BoundResult(bound, paper.layers, time.perf_counter() - start, eps,
                       paper.delta + solves.delta, solver.seed, source=source, notes=notes)


def _split_joint(net: _Linearized, paper: BoundResult, limit: float, deadline: float | None = None
                 ) -> tuple[float, int, bool]:
    """On a chain whose uncertain units are too many for one joint bound: g_k · J_k,
    its k and whether a refinement gave J_k (inf where it is not below `limit`),
    J_k the joint bound of the blocks from k on as a network of their own (its
    input block k's input vector: every unit's spread is linear in it, so √t
    bounds ||Δf|| / ||Δv_k|| for every x of the ball) and g_k the product of
    the paper's block bounds before k, which bounds ||Δv_k|| / ||Δx||. The
    longest tail whose uncertain units fit joint.FORMS_MAX first (its g_k has
    the fewest factors), shorter ones only where it gives nothing; then, where a
    time budget sets a `deadline` (time.perf_counter()), the longest of the
    larger tails up to joint.FORMS_MAX_TAIL, searched and refined until it (the
    CIFAR-10 reference's fc1). The MNIST reference at ε = 2.173: 0.65x the
    paper's composition."""
    factors, lift = block_factors(paper)
    small, large = [], []
    for k in range(len(net.blocks) - 1, 0, -1):
        tail = _Linearized([replace(b, inputs=(j - 1,)) for j, b in enumerate(net.blocks[k:])],
                           net.steps[k:], net.blocks[k - 1].out_size)
        if not any(s.spread is not None and s.spread.units.size for s in tail.steps):
            continue  # a stable tail: the joint bound does not apply
        forms = search_side(tail)
        if forms > (FORMS_MAX if deadline is None else FORMS_MAX_TAIL):
            break  # longer tails only add units
        (small if forms <= FORMS_MAX else large).append((k, tail))
    best = (math.inf, 0, False)
    for k, tail in reversed(small):
        head = math.prod(factors[:k]) * lift
        if 0 < head < math.inf:
            value, _ = joint_bound(tail, limit / head)
            if head * value * lift < limit:
                best = (head * value * lift, k, False)
                break
    for k, tail in reversed(large):  # only where a deadline is set
        head, left = math.prod(factors[:k]) * lift, deadline - time.perf_counter()
        if left <= 0:
            break
        if 0 < head < math.inf:
            value, refined = joint_bound(tail, min(limit, best[0]) / head, left, forms_max=FORMS_MAX_TAIL)
            if head * value * lift < min(limit, best[0]):
                best = (head * value * lift, k, refined)
                break
    return best if best[0] < limit else (math.inf, 0, False)


def _suffix_products(paper: BoundResult) -> list[float]:
    """On a chain, per block l: Π_{k>l} of the paper's block bounds, each a bound of
    ||S_k A_k D_{k−1}|| for every slope the ball allows, so their product bounds
    ||Post_l||, the true network after block l (rounded upwards)."""
    factors, lift = block_factors(paper)
    return [math.prod(factors[k + 1:]) * lift for k in range(len(factors))]


def _telescoped(net: _Linearized, solves: Solves, variant, limit: float = math.inf,
                suffix: list[float] | None = None) -> float:
    """||E|| + η(input) for one choice of the fixed part S⁰ (see _stable_steps);
    inf as soon as its partial sum reaches `limit` (the terms are not negative).
    `suffix` (chains): bounds of ||Post_l|| from the paper's block bounds, each
    block's carry the smaller of the two (where many neurons are uncertain
    after l, η(l) exceeds it)."""
    steps = net.steps
    uncertain = [j for j, s in enumerate(steps) if s.uncertain is not None and s.uncertain.any()]
    ones = np.ones(net.in_size)
    total = net.norm(INPUT, ones, None, solves, ("stable", variant))
    carry: dict[int, float] = {}  # ||Post^E_l Q_l|| + η(l) for every uncertain block l
    for j in reversed(uncertain):
        if total >= limit:
            return math.inf
        q = steps[j].uncertain
        cap = math.inf if suffix is None else suffix[j]
        carry[j] = min(cap, net.norm(j, q, None, solves, ("suffix", j, variant)))
        if carry[j] < cap:  # else η(j), nested norms, could only add to what the cap already is
            carry[j] = min(cap, carry[j] + _eta(net, j, q, uncertain, carry, solves, variant))
        total += _eta(net, INPUT, ones, [j], carry, solves, variant)  # its term of η(input)
    return total if total < limit else math.inf


def _eta(net: _Linearized, start: int, mask: np.ndarray, uncertain: list[int], carry: dict,
         solves: Solves, variant) -> float:
    """η(start) = Σ_{l uncertain after start} carry_l · ρ_l(Pre_{l←start} diag(mask))."""
    after = net.after(start)
    total = 0.0
    for j in uncertain:
        if j > start and after[j]:
            s = net.steps[j]
            total += carry[j] * net.norm(start, mask, j, solves, ("rho", start, j, variant),
                                         s.slopes, s.head)
    return total


def _stable_steps(blocks: list[Block], nominal: Trace, paper: BoundResult, widths, eps: float,
                  solves: Solves, reach: list | None = None, centered: bool = True) -> list[_Step]:
    """Each block's stable part and what is uncertain in it, every decision made on
    the interval that holds the exact value: computed ± the rounding-error bound
    the paper's bound used (`widths`, see bounds.local_bound_detail).

    Two choices of S⁰ are sound; neither is always tighter, and the bound takes
    the better. `centered`: uncertain neurons keep the slope of their side at x0
    and windows their nominal winner (E close to J(x0), small U where the
    states barely change). Otherwise every uncertain neuron and unstable
    window is left out of S⁰ (E smaller, and the suffixes after uncertain rows
    often vanish).

    A block reading one block takes the paper's radius (record.eps_in) and
    its factor ||R A D|| as the cap of its step (its masks are within the
    paper's: the same decisions). A block reading several adds the reaches of
    its sources (each source's output moves by at most its record's eps_in
    times its factor, the paper's gain), and its cap, like that of every
    affine block after it (whose masks may then differ from the paper's by
    rounding), is its own gated norm (bounds.cached_norm)."""
    n = nominal.x.size
    steps: list[_Step] = []
    masks, changes = {INPUT: np.ones(n)}, {INPUT: np.full(n, eps)}  # per output: can change, |Δ| bound
    moved, paper_masks = {INPUT: eps}, {INPUT: True}  # ||Δ|| bound; masks within the paper's
    for k, (block, record) in enumerate(zip(blocks, paper.layers)):
        proven = None if reach is None else reach[k]
        sources = block.inputs
        mask = np.concatenate([masks[j] for j in sources])
        if isinstance(block, AffineBlock):
            interval = nominal.pre[k] - widths[k], nominal.pre[k] + widths[k]
            radius = sum(moved[j] * np.sqrt(np.maximum(part.sq_matvec(masks[j]), 0.0))
                         for j, part in zip(sources, block.parts())) if len(sources) > 1 else \
                record.eps_in * np.sqrt(np.maximum(block.map.sq_matvec(mask), 0.0))
            step, change, next_mask = _affine_step(block, interval, radius, mask, proven, centered)
        else:
            change = changes[sources[0]]
            if proven is not None:
                change = np.minimum(change, np.maximum(-proven[0], proven[1]))
            if isinstance(block, MaxPoolBlock):
                step, change, next_mask = _maxpool_step(block, nominal.inputs[k], widths[k],
                                                        change, mask, centered,
                                                        _equal_values(blocks, nominal, sources[0]))
            else:
                interval = nominal.inputs[k] - widths[k], nominal.inputs[k] + widths[k]
                step, change, next_mask = _relu_step(interval, change, mask, centered)
        paper_masks[k] = len(sources) == 1 and paper_masks[sources[0]]
        if isinstance(block, AffineBlock) and not paper_masks[k]:
            # gate ∨ uncertain is the same for both choices of S⁰ (one solve) and above each
            rows = np.ones(block.out_size) if step.gate is None else np.maximum(step.gate, step.uncertain)
            norm = cached_norm(nominal, ("tight cap", k), block.map, rows, mask, solves.solver)
            solves.delta += norm.delta
            step.cap = norm.value
        else:
            step.cap = record.bound
        steps.append(step)
        masks[k], changes[k] = next_mask, change
        moved[k] = record.eps_in * record.bound * (1 + 4 * U64)
    return steps


def _equal_values(blocks: list[Block], nominal: Trace, source: int):
    """Groups of `source`'s outputs → proven equal at x0 in exact arithmetic, where
    they are computed from the input alone (the input itself, or a block reading
    it: Block.equal_outputs); None past that (the values carry rounding)."""
    x = np.asarray(nominal.x, dtype=np.float64).ravel()
    if source == INPUT:
        return lambda groups: np.array([(x[g] == x[g[0]]).all() for g in groups], dtype=bool)
    if blocks[source].inputs == (INPUT,):
        return partial(blocks[source].equal_outputs, x)
    return None


def _affine_step(block: AffineBlock, interval, reach, mask, proven=None, centered=True):
    """ReLU rows: active where low − fall ≥ 0, inactive where high + rise ≤ 0,
    uncertain otherwise (rows that cannot move, reach 0, never are). The paper's
    `reach` bounds both the fall and the rise; `proven` (lo, hi) bounds of the
    change tighten them. See _relu_gates for the uncertain rows."""
    low, high = interval
    fall, rise = reach, reach
    if proven is not None:
        fall = np.minimum(reach, np.maximum(-proven[0], 0.0))
        rise = np.minimum(reach, np.maximum(proven[1], 0.0))
    moves = np.maximum(fall, rise)
    if not block.relu:
        return _Step(block.map, None, mask), moves, (reach > 0).astype(float)
    gate, uncertain, slopes, inactive = _relu_gates(low, high, fall, rise, reach > 0, centered)
    sure = (low >= 0) & (gate > 0) | (high < 0) & (gate == 0)  # y* on the gate's side, proven
    spread = relu_spread(block.map, block.out_size, uncertain, gate, slopes, sure) if centered else None
    step = _Step(block.map, gate, mask, uncertain.astype(float), slopes, block.map, spread=spread)
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


def _maxpool_step(block: MaxPoolBlock, z0, err, change, mask, centered=True, equal=None):
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
    Stable windows (no member can move, or every s_j = 0) have no rows.
    `equal` (groups of input indices → proven equal at x0, exactly) tells the
    tied windows whose candidates are exactly equal (joint.window_spread)."""
    windows = block.windows
    padded = windows < 0
    index = np.where(padded, 0, windows)
    rows = np.arange(len(windows))
    first = np.argmax(np.where(padded, -np.inf, z0[index]), axis=1)
    winner = index[rows, first]
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
    spread = None
    if centered:  # (the joint bound reads the centred steps only)
        units = np.flatnonzero(~stable)
        rising = slopes > 0  # can overtake the winner on the ball (every tie with a moving member)
        can_win = rising.copy()
        can_win[rows, first] = True
        members = [index[u][can_win[u]] for u in units]
        exact = np.zeros(units.size, dtype=bool)
        if equal is not None and tied[units].any():
            exact[tied[units]] = equal([m for m, t in zip(members, tied[units]) if t])
        spread = window_spread(z0.size, units, members, winner[units], tied[units],
                               [(index[u][rising[u]], slopes[u][rising[u]]) for u in units], exact)
    step = _Step(selection, None, mask, (~stable).astype(float), None, head, spread=spread)
    return step, block.forward(change), block.pool_mask(mask)


def _relu_step(interval, change, mask, centered=True):
    """A lone ReLU: as the rows of an affine-ReLU block (_relu_gates), on its input."""
    low, high = interval
    gate, uncertain, slopes, inactive = _relu_gates(low, high, change, change, change > 0, centered)
    sure = (low >= 0) & (gate > 0) | (high < 0) & (gate == 0)  # y* on the gate's side, proven
    spread = relu_spread(None, gate.size, uncertain, gate, slopes, sure) if centered else None
    step = _Step(None, gate, mask, uncertain.astype(float), slopes, spread=spread)
    return step, np.where(inactive, 0.0, change), mask * ~inactive
