"""Local and global Lipschitz bounds of a graph of blocks (docs/method.md).

Local: for each affine-ReLU block, the reachable pre-activation
ȳ = y0 + ε_k·||a_iᵀ D||, the ReLU chord slopes r, and L_k = ||R A D||; ε is
carried as ε_{k+1} = L_k ε_k and D (the inputs that can change) is tracked
through ReLU, max-pooling and reshapes; where a block reads several blocks
their contributions add. Global: the product of ||A_k||, likewise composed.
"""

from __future__ import annotations

import hashlib
import math
import time
import weakref
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import scipy.sparse as sp

from .blocks import INPUT, AffineBlock, Block, MaxPoolBlock, flow, relu_error
from .operators.base import BLAS_THREADS, SLACK, U64, LinearMap, gamma
from .operators.chain import _carried
from .operators.matrix import DenseMap
from .spectral import Solver, SpectralNorm, dense_gram_norm, gram_norm


@dataclass
class LayerRecord:
    """What one block contributed to a bound."""

    index: int
    name: str
    kind: str
    ops: list[str]
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    representation: str
    bound: float
    eps_in: float | None = None
    active: int | None = None
    inactive: int | None = None
    uncertain: int | None = None
    iterations: int = 0
    residual: float = 0.0
    converged: bool = True
    seconds: float = 0.0
    ritz: float | None = None  # the solve's Ritz value: at most the block's true norm
    guarantee: str = "deterministic"  # or "probabilistic" (fails with probability ≤ delta)
    delta: float = 0.0
    seed: int | None = None


@dataclass
class BoundResult:
    """A Lipschitz bound with its per-block record.

    guarantee: 'deterministic' (proven, under the arithmetic assumptions of the
    README's "Guarantees") or 'probabilistic': the bound holds with probability
    at least 1 − delta over the random start vectors drawn from `seed`
    (delta: the union bound, the sum of the solves' failure probabilities).
    """

    bound: float
    layers: list[LayerRecord]
    seconds: float
    eps: float | None = None
    delta: float = 0.0
    seed: int | None = None

    @property
    def guarantee(self) -> str:
        return "probabilistic" if self.delta > 0 else "deterministic"

    def to_dict(self) -> dict:
        return asdict(self) | {"guarantee": self.guarantee}

    @property
    def ritz(self) -> float:
        """The product of the blocks' Ritz values: an estimate from below of the
        product of their true norms. Two upper bounds of nearly equal products
        (local and global, or L(ε) and L(2ε)) can come out in either order by up
        to their tolerances; compare one's `ritz` with the other's `bound`."""
        return math.prod(r.bound if r.ritz is None else r.ritz for r in self.layers)


@dataclass
class Trace:
    """The nominal forward pass: the network's input x, each block's input (its
    sources' values concatenated) and pre-activation, the output, and (when
    traced with rounding) bounds of their rounding errors, elementwise:
    |computed − exact| ≤ in_errors[k] for inputs[k] (kept for blocks without a
    pre-activation only) and ≤ pre_errors[k] for pre[k], and pre_local[k] ≥
    |pre[k] − the exact block applied to inputs[k]| (the block's own rounding);
    None where not kept."""

    x: np.ndarray
    inputs: list[np.ndarray]
    pre: list[np.ndarray | None]
    output: np.ndarray
    in_errors: list[np.ndarray] | None = None
    pre_errors: list[np.ndarray | None] | None = None
    pre_local: list[np.ndarray | None] | None = None
    #: ||R A D|| already solved around this x0, keyed by block and exact (R, D):
    #: radii whose masks and slopes coincide (radii too small to make a neuron
    #: uncertain, some steps of a certificate's bisection) share one eigensolve
    #: and so get the same value.
    norms: dict = field(default_factory=dict, repr=False)


def trace(blocks: list[Block], x: np.ndarray, rounding: bool = True) -> Trace:
    """The forward pass at x, each affine block's layers applied one by one. With
    `rounding` (needed by the bounds), in the layers' precise arithmetic (float64)
    and with rigorous bounds of every value's rounding error (about one more pass
    with |A|), which every activation-state decision is widened by."""
    if not rounding:
        inputs, pre = [], []

        def step(k, block, x_in):
            inputs.append(x_in)
            y = block.pre_activation(x_in) if isinstance(block, AffineBlock) else None
            pre.append(y)
            return block.forward(x_in) if y is None else np.maximum(y, 0.0) if block.relu else y

        return Trace(x, inputs, pre, flow(blocks, x, step)[-1])
    # numpy's BLAS threads spin between the many small float64 products and fight
    # onnxruntime's for the cores: one thread ran AlexNet's pass 8x faster (0.21 s
    # against 1.7 s on the loaded 2-core machine).
    with BLAS_THREADS.limit(limits=1, user_api="blas"):
        return _bounded_trace(blocks, x)


def _bounded_trace(blocks: list[Block], x: np.ndarray) -> Trace:
    inputs, pre, in_errors, pre_errors, pre_local = [], [], [], [], []
    values: dict[int, tuple[np.ndarray, np.ndarray]] = {INPUT: (x, np.zeros(x.size))}
    for k, block in enumerate(blocks):
        x_in = np.concatenate([values[j][0] for j in block.inputs])
        err = np.concatenate([values[j][1] for j in block.inputs])
        inputs.append(x_in)
        in_errors.append(None if isinstance(block, AffineBlock) else err)
        if isinstance(block, AffineBlock):
            y, local, err = block.pre_activation_bounded(x_in, err)
            pre.append(y)
            pre_errors.append(err)
            pre_local.append(local)
            out = (np.maximum(y, 0.0), relu_error(y, err)) if block.relu else (y, err)
        else:
            pre.append(None)
            pre_errors.append(None)
            pre_local.append(None)
            out = block.forward_bounded(x_in, err)
        values[k] = out
    return Trace(x, inputs, pre, values[len(blocks) - 1][0], in_errors, pre_errors, pre_local)


def chord_slopes(y0: np.ndarray, ybar: np.ndarray) -> np.ndarray:
    """Slope of the ReLU chord between y0 and ȳ ≥ y0 (0 where they coincide below 0).

    It grows with y0 for a fixed ȳ − y0: with y0 known only to lie in an
    interval, the chord from its upper end is the worst case (a sound slope)."""
    r = np.zeros_like(y0)
    r[y0 >= 0] = 1.0
    mixed = (y0 < 0) & (ybar > 0)
    r[mixed] = ybar[mixed] / (ybar[mixed] - y0[mixed])
    return r


#: Exact (LAPACK) norms where the smaller active side is at most this long...
DENSE_SIDE_MAX = 1024
#: ...and the map has at most this many nonzeros (its CSR form is cached)...
DENSE_NNZ_MAX = 8_000_000
#: ...and forming the Gram matrix (side × nonzeros) costs at most this many flops.
DENSE_WORK_MAX = 5e8


def masked_norm(linear: LinearMap, rows: np.ndarray, cols: np.ndarray,
                solver: Solver | float | None = None, key=0) -> SpectralNorm:
    """||diag(rows) A diag(cols)|| (cols a 0/1 mask), with its guarantee.

    Deterministic where cheap: exact for monomial maps, LAPACK on the Gram
    matrix of the smaller side when it is short (dense_norm). Otherwise
    certified Lanczos, matrix-free (spectral.gram_norm): the Gram operator
    D Aᵀ R² A D (or R A D Aᵀ R, on the smaller side) with the masks skipped
    where they are all ones, the start in the range of the mask, a proven cap
    (the map's sharp_cap where unmasked, else max |r| times its norm_cap), and
    its products' rounding (LinearMap.rounding) carried into a bound of the
    Gram operator's error.
    """
    solver = as_solver(solver)
    if not rows.any() or not cols.any():
        return SpectralNorm(0.0, 0)
    active_rows, active_cols = np.flatnonzero(rows), np.flatnonzero(cols)
    sub = linear.restricted(active_rows, active_cols)
    if sub is not None:  # the same norm, on the active part held apart (cheaper products)
        return masked_norm(sub, rows[active_rows], np.ones(active_cols.size), solver, key)
    exact = dense_norm(linear, rows, cols)
    if exact is not None:
        return exact
    scale = float(np.max(np.abs(rows)))
    error = gram_error(linear, scale)
    rows = None if np.all(rows == 1) else rows
    cols = None if np.all(cols == 1) else cols
    # The costlier sharp cap only for the unmasked map: a masked one's norm is
    # mostly well below ||A||, where no cap can stop the solve.
    cap = linear.sharp_cap() if rows is None and cols is None else scale * linear.norm_cap()
    if linear.in_size <= linear.out_size:
        weight = None if rows is None else rows**2

        def gram(x):
            return _masked(linear.rmatvec(_masked(linear.matvec(x), weight)), cols)
        size, mask = linear.in_size, cols
    else:
        def gram(u):
            u = u if rows is None else u * rows
            return _masked(linear.matvec(_masked(linear.rmatvec(u), cols)), rows)
        size, mask = linear.out_size, None if rows is None else (rows != 0).astype(float)
    # With onnxruntime kernels doing the products, numpy's BLAS threads (which
    # spin between calls) only steal its cores: 9.3 s -> 5.5 s on AlexNet.
    blas_threads = None if isinstance(linear, DenseMap) else 1
    with BLAS_THREADS.limit(limits=blas_threads, user_api="blas"):
        return gram_norm(gram, size, solver, key, mask=mask, cap=cap, error=error)


def as_solver(solver: Solver | float | None) -> Solver:
    """A Solver; a bare number is a tolerance (fresh seed)."""
    if isinstance(solver, Solver):
        return solver
    return Solver() if solver is None else Solver(tol=float(solver))


def gram_error(linear: LinearMap, scale: float) -> tuple[float, float]:
    """(c₁, c₀) with ||B̃ − B|| ≤ c₁·σ + c₀ for the computed Gram operator of
    M = diag(r) A diag(d), |r| ≤ scale, d 0/1, σ = ||M||. The products are off by
    η_f, η_a per unit input (LinearMap.rounding); the float64 weighting by r² by a
    relative 2u, folded into η_a as 2u·a (a ≥ ||A||). Forward first:
    B̃x − Bx = Mᵀ(R e₁) + e₂ with ||R e₁|| ≤ r·η_f||x||, ||e₂|| ≤ η_a·r(σ + r·η_f)||x||,
    so c₁ = r(η_f + η_a), c₀ = r²η_fη_a. Adjoint first (R u, Aᵀ, D, A, R) the
    same with η_f and η_a swapped, the two weightings by r folded into η_f: both
    get 2u·a, and either order is covered."""
    a = linear.norm_cap()
    eta_f, eta_a = linear.rounding()
    u = float(np.finfo(np.float64).eps)
    eta_f, eta_a = eta_f + 2 * u * a, eta_a + 2 * u * a
    return _lift(scale * (eta_f + eta_a), scale**2 * eta_f * eta_a)


def _lift(c1: float, c0: float) -> tuple[float, float]:
    return c1 * (1 + 1e-9), c0 * (1 + 1e-9)


@dataclass
class Solves:
    """A solver and the failure probability spent with it, for bounds made of
    several norms (the union bound: the sum of the solves' delta)."""

    solver: Solver
    delta: float = 0.0

    def product_norm(self, forward, adjoint, in_size: int, out_size: int,
                     maps: list[LinearMap], key, in_mask: np.ndarray | None = None) -> float:
        """Certified ||M|| of a product M of `maps` (in order) interleaved with
        diagonal gates of entries in [0, 1]: the cap is the product of the maps'
        caps, the products' rounding is carried through the factors."""
        caps = [m.norm_cap() for m in maps]
        eta_f = _carried(caps, [m.rounding()[0] + U64 * c for m, c in zip(maps, caps)])
        eta_a = _carried(caps[::-1], [m.rounding()[1] + U64 * c for m, c in zip(maps[::-1], caps[::-1])])
        a = math.prod(caps)
        eta = max(eta_f, eta_a)
        error = _lift(2 * eta, eta * eta) if a > 0 else (0.0, 0.0)  # as in gram_error, r ≤ 1
        if out_size < in_size:
            result = gram_norm(lambda u: forward(adjoint(u)), out_size, self.solver, key,
                               cap=a, error=error)
        else:
            result = gram_norm(lambda x: adjoint(forward(x)), in_size, self.solver, key,
                               mask=in_mask, cap=a, error=error)
        self.delta += result.delta
        return result.value


_MATRICES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def dense_norm(linear: LinearMap, rows: np.ndarray, cols: np.ndarray) -> SpectralNorm | None:
    """||diag(rows) A diag(cols)|| by LAPACK in float64 from A's exact entries, where
    the smaller active side is short and the Gram matrix cheap (None elsewhere);
    deterministic.

    The entries are exact (float32 weights widen exactly; composed monomial
    factors round each entry by a few u). S = R A D is formed with a relative
    error ≤ 4u per entry, G = S Sᵀ (or SᵀS) with γ_p (p the longest row), so
    ||G − G_exact|| ≤ (γ_p + 10u)·||S||_F², added to LAPACK's own margin.
    """
    active_rows, active_cols = np.flatnonzero(rows), np.flatnonzero(cols)
    small = min(active_rows.size, active_cols.size)
    if linear.monomial:
        entries = _matrix(linear)
        if entries is None:
            return None
        sub = entries[active_rows][:, active_cols].multiply(rows[active_rows, None])
        top = float(np.abs(sub.multiply(cols[None, active_cols]).tocsr().data).max(initial=0.0))
        return SpectralNorm(top * (1 + 8 * U64), 0, ritz=top)
    if small > DENSE_SIDE_MAX or small * linear.sparse_nnz_estimate() > DENSE_WORK_MAX:
        return None
    entries = _matrix(linear)
    if entries is None:
        return None
    sub = entries[active_rows][:, active_cols]
    if sp.issparse(sub):
        sub = sub.multiply(rows[active_rows, None]).multiply(cols[None, active_cols]).tocsr()
        frob2 = float(np.sum(sub.data**2))
        longest = int(max(np.diff(sub.indptr).max(initial=0), np.bincount(sub.indices, minlength=1).max()))
        gram = (sub @ sub.T if sub.shape[0] <= sub.shape[1] else sub.T @ sub).toarray()
        gram = gram if sub.nnz else np.zeros((0, 0))
    else:
        sub = sub * rows[active_rows, None] * cols[None, active_cols]
        frob2 = float(np.sum(sub**2))
        longest = max(sub.shape)
        gram = sub @ sub.T if sub.shape[0] <= sub.shape[1] else sub.T @ sub
    error = (gamma(longest, U64) + 10 * U64) * frob2 * (1 + 1e-9)
    with BLAS_THREADS.limit(limits=1, user_api="blas"):  # threads only thrash on small LAPACK work
        return dense_gram_norm(gram, error)


def _matrix(linear: LinearMap):
    """A's exact entries, float64 (dense for dense maps, CSR otherwise), cached per map;
    None when the CSR form would exceed DENSE_NNZ_MAX."""
    if linear not in _MATRICES:
        if isinstance(linear, DenseMap):
            small = linear.weight.size <= DENSE_NNZ_MAX
            _MATRICES[linear] = linear.weight.astype(np.float64) if small else None
        elif linear.sparse_nnz_estimate() <= DENSE_NNZ_MAX:
            _MATRICES[linear] = linear.to_sparse().tocsr()
        else:
            _MATRICES[linear] = None
    return _MATRICES[linear]


def _masked(v: np.ndarray, weight: np.ndarray | None) -> np.ndarray:
    """v * weight, in place: v must be a fresh product."""
    if weight is None:
        return v
    v *= weight
    return v


def local_bound(blocks: list[Block], nominal: Trace, eps: float,
                solver: Solver | float | None = None) -> BoundResult:
    """Upper bound of the local Lipschitz constant in the L2 ball of radius eps."""
    return local_bound_detail(blocks, nominal, eps, solver)[0]


def local_bound_detail(blocks: list[Block], nominal: Trace, eps: float,
                       solver: Solver | float | None = None) -> tuple[BoundResult, list[np.ndarray]]:
    """The local bound, and per block the rounding-error bound its decisions used
    (elementwise, of its pre-activations for affine blocks, else of its inputs).

    Each block's output carries a gain g (its change is at most g·ε over the
    ball) and a mask of the outputs that can change. A block that reads
    several blocks adds their contributions (the reach of a sum is at most the
    sum of the reaches): g = Σ_j g_j ||R A_j D_j||. On a chain g is the paper's
    product of the blocks' ||R A D||.

    Two bounds of each value's rounding error are combined (the smaller holds):
    the trace's elementwise one (|A| carries every earlier error: rigorous, but it
    grows by about √(fan-in) per layer, and swamps deep networks), and one that
    carries the 2-norm E of the error instead, with the bound's own block norms:
    a block input off by d (||d|| ≤ E, d within the mask D) moves pre-activation
    i by at most ||a_iᵀ D||·E plus the block's own rounding, and
    ||R (A d + δ)|| ≤ L_k E + ||R δ|| for the next block (R ≥ the ReLU's
    0/1 slopes wherever the error can pass it). E then grows like the bound, and
    acts as a radius E/(∏ L) added to ε: ~1e-15·||x0|| for the float64 pass.
    """
    if nominal.pre_errors is None:
        raise ValueError("local bounds need a trace with rounding-error bounds")
    solver = as_solver(solver)
    start = time.perf_counter()
    n = nominal.x.size
    gains, masks, records, widths = {INPUT: 1.0}, {INPUT: np.ones(n)}, [], []
    elems, carries = {INPUT: np.zeros(n)}, {INPUT: 0.0}  # elementwise and 2-norm errors
    for k, block in enumerate(blocks):
        tic = time.perf_counter()
        record = _record(k, block)
        gain_in = sum(gains[j] for j in block.inputs)
        record.eps_in = eps * gain_in
        elem = np.concatenate([elems[j] for j in block.inputs])
        carried = math.sqrt(sum(carries[j] ** 2 for j in block.inputs))
        if nominal.in_errors[k] is not None:
            elem = np.minimum(elem, nominal.in_errors[k])
        if isinstance(block, AffineBlock):
            changes = [eps * gains[j] for j in block.inputs]
            norms, masks[k], elem, carried, width = _affine_local(
                block, nominal, k, masks, changes, solver, record, carried)
        else:
            mask = masks[block.inputs[0]]
            width = elem
            if isinstance(block, MaxPoolBlock):
                norms, masks[k] = [block.lipschitz], block.pool_mask(mask)
                elem = block.forward(elem)
                carried = min(block.lipschitz * carried, float(np.linalg.norm(elem)))
            else:
                norms, masks[k] = [1.0], mask
                elem = relu_error(nominal.inputs[k], elem)
        if np.any((elem > 0) & (masks[k] == 0)):
            carried = math.inf  # an error outside the next mask: only the elementwise bound holds
        elems[k], carries[k] = elem, carried
        widths.append(width)
        gains[k], record.bound = _compose(gains, block, norms)
        record.seconds = time.perf_counter() - tic
        records.append(record)
    result = _result(gains[len(blocks) - 1], records, time.perf_counter() - start, eps, solver)
    return result, widths


def _compose(gains: dict, block: Block, norms: list[float]) -> tuple[float, float]:
    """The gain of a block's output, Σ_j g_j · norms[j] over the blocks it reads,
    and the block's own factor (its norm; the ratio of gains where it reads several)."""
    gain = 0.0
    for j, norm in zip(block.inputs, norms):
        gain += gains[j] * norm
    if len(norms) == 1:
        return gain, norms[0]
    gain_in = sum(gains[j] for j in block.inputs)
    return gain, gain / gain_in if gain_in else 0.0


#: Lifts row norms computed in float32 (γ_m/2 < 1e-2 for fan-ins m below 3e5).
ROW_NORMS = 1.01


def _affine_local(block: AffineBlock, nominal: Trace, index: int, masks, changes: list[float],
                  solver: Solver, record: LayerRecord, carried: float):
    """||R A_j D_j|| for each part of the block, the next mask, the elementwise and
    2-norm bounds of the output's rounding error, and the pre-activations' width;
    fills the record.

    The reach of a pre-activation adds those of the parts, Σ_j ε_j ||a_ijᵀ D_j||,
    with ε_j = changes[j] the largest change of input j over the ball. The exact
    pre-activation y* is only known to lie in [low, high] (the computed y0 ± its
    rounding-error bound): a neuron is active when low ≥ 0, inactive when
    high + reach ≤ 0, and its chord slope is the one from high, the largest over
    the interval.
    """
    y0, local = nominal.pre[index], nominal.pre_local[index]
    parts = block.parts()
    cols = [masks[j] for j in block.inputs]
    rownorms = [np.sqrt(np.maximum(part.sq_matvec(d), 0.0)) for part, d in zip(parts, cols)]
    reach = sum(change * r for change, r in zip(changes, rownorms))
    width = nominal.pre_errors[index]
    if math.isfinite(carried):
        rownorm = np.sqrt(sum(r**2 for r in rownorms))  # of [A_1 … A_k] on the stacked input
        width = np.minimum(width, (local + carried * ROW_NORMS * rownorm) * SLACK)
    low, high = y0 - width, y0 + width
    if block.relu:
        ybar = high + reach
        rows = chord_slopes(high, ybar)
        record.active = int(np.count_nonzero(low >= 0))
        record.inactive = int(np.count_nonzero((ybar <= 0) & (low < 0)))
        record.uncertain = ybar.size - record.active - record.inactive
        next_mask = (ybar > 0).astype(float)
        out = relu_error(y0, width)
    else:
        rows = np.ones_like(y0)
        next_mask = (reach > 0).astype(float)
        out = width
    norms = []
    for p, (part, d) in enumerate(zip(parts, cols)):
        norm = cached_norm(nominal, (index, p), part, rows, d, solver)
        _fill(record, norm, first=p == 0)
        norms.append(norm.value)
    # ||R [A_1 … A_k] D|| ≤ Σ_j ||R A_j D_j|| carries the 2-norm error
    carried = min(sum(norms) * carried + float(np.linalg.norm(rows * local)),
                  float(np.linalg.norm(rows * width))) * SLACK
    return norms, next_mask, out, carried, width


def cached_norm(nominal: Trace, key, linear: LinearMap, rows: np.ndarray,
                cols: np.ndarray, solver: Solver | float | None = None) -> SpectralNorm:
    """masked_norm, solved once per exact (key, rows, cols, solver) around this trace."""
    solver = as_solver(solver)
    digest = hashlib.blake2b(rows.tobytes(), digest_size=16)
    digest.update(cols.tobytes())
    cache = (key, solver, digest.digest())
    if cache not in nominal.norms:
        nominal.norms[cache] = replace(masked_norm(linear, rows, cols, solver, key=key), vector=None)
    return nominal.norms[cache]


def global_bound(blocks: list[Block], solver: Solver | float | None = None) -> BoundResult:
    """The blocks' global Lipschitz constants (spectral norms) composed along
    the graph: their product on a chain, g = Σ_j g_j ||A_j|| where a block
    reads several blocks."""
    solver = as_solver(solver)
    start = time.perf_counter()
    gains, records = {INPUT: 1.0}, []
    for k, block in enumerate(blocks):
        tic = time.perf_counter()
        record = _record(k, block)
        if isinstance(block, AffineBlock):
            norms = []
            for p, part in enumerate(block.parts()):
                ones_out, ones_in = np.ones(part.out_size), np.ones(part.in_size)
                norm = masked_norm(part, ones_out, ones_in, solver, key=(k, p))
                _fill(record, norm, first=p == 0)
                norms.append(norm.value)
        else:
            norms = [block.lipschitz if isinstance(block, MaxPoolBlock) else 1.0]
        gains[k], record.bound = _compose(gains, block, norms)
        record.seconds = time.perf_counter() - tic
        records.append(record)
    return _result(gains[len(blocks) - 1], records, time.perf_counter() - start, None, solver)


def _result(total: float, records: list[LayerRecord], seconds: float, eps: float | None,
            solver: Solver) -> BoundResult:
    return BoundResult(total, records, seconds, eps, sum(r.delta for r in records), solver.seed)


def _record(index: int, block: Block) -> LayerRecord:
    return LayerRecord(index, block.name, block.kind, list(block.ops), tuple(block.in_shape),
                       tuple(block.out_shape), block.describe(), 1.0)


def _fill(record: LayerRecord, norm: SpectralNorm, first: bool = True) -> None:
    """Add one solve to the record (a block that reads several tensors has one per
    part; its Ritz value is then the parts' largest, its delta their sum)."""
    record.iterations = norm.iterations + (0 if first else record.iterations)
    record.residual = norm.residual if first else max(record.residual, norm.residual)
    record.converged = norm.converged and (first or record.converged)
    record.ritz = norm.ritz if first else None  # no single Ritz value for a sum of parts
    record.delta = norm.delta + (0.0 if first else record.delta)
    record.guarantee = "probabilistic" if record.delta > 0 else "deterministic"
    record.seed = norm.seed if first else record.seed or norm.seed
