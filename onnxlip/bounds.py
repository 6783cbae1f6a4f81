"""Local and global Lipschitz bounds of a graph of blocks (docs/method.md).

Local: for each affine-activation block, the reachable pre-activation
ȳ = y0 ± ε_k·||a_iᵀ D||, the activation's largest |chord slope| r_i relative to y0
over that interval (onnxlip.activations; for ReLU the paper's chord slopes), and
L_k = ||R A D||; ε is carried as ε_{k+1} = L_k ε_k and D (the inputs that can
change: the complement of the neurons whose activation is constant over their
interval) is tracked through activations, max-pooling and reshapes; where a block
reads several blocks their contributions add. Global: the product of
Lip(σ_k)·||A_k||, likewise composed.

The per-block record's active / inactive / uncertain counts: neurons whose
interval stays in one linear piece of σ with a nonzero slope (ReLU: on) / on
which σ is constant (ReLU: off) / the others (every neuron of a smooth σ such as
the sigmoid is 'uncertain' unless saturated to a constant).
"""

from __future__ import annotations

import hashlib
import math
import time
import weakref
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import scipy.sparse as sp

from .activations import Activation, relu_error
from .blocks import INPUT, ActivationBlock, AffineBlock, Block, MaxPoolBlock, flow
from .operators.base import BLAS_THREADS, SLACK, U64, LinearMap, gamma
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
    bound: float | None  # the block's factor (None: the result does not factor by block)
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
    test: str | None = None  # method 'auto': what decided the states (see onnxlip.auto.annotate)


@dataclass
class BoundResult:
    """A Lipschitz bound with its per-block record.

    guarantee: 'deterministic' (proven, under the arithmetic assumptions of the
    README's "Guarantees") or 'probabilistic': the bound holds with probability
    at least 1 − delta over the random start vectors drawn from `seed`
    (delta: the union bound, the sum of the solves' failure probabilities).
    source: what produced the number ('paper', 'tight': the telescoping of
    onnxlip.tight, 'joint': the uncertain units bounded together, onnxlip.joint,
    'joint (refined)': the same with multipliers from the refinement a time
    budget runs,
    or 'exact': ||J(x0)|| where f is proven affine on the ball, see
    onnxlip.auto); notes: what the method assumed or where it fell back.
    """

    bound: float
    layers: list[LayerRecord]
    seconds: float
    eps: float | None = None
    delta: float = 0.0
    seed: int | None = None
    source: str = "paper"
    notes: list[str] = field(default_factory=list)
    #: An estimate from below of what is bounded, where it is not the product of
    #: the blocks' Ritz values (see `ritz`).
    estimate: float | None = None

    @property
    def guarantee(self) -> str:
        return "probabilistic" if self.delta > 0 else "deterministic"

    def to_dict(self) -> dict:
        return asdict(self) | {"guarantee": self.guarantee}

    @property
    def ritz(self) -> float:
        """The bound with every block's norm scaled down to its Ritz value: on a
        chain the product of the Ritz values, an estimate from below of the
        product of the true norms. On a DAG the bound is a sum over paths of
        products of norms (each block on a path at most once), so scaling every
        factor k by ritz_k/bound_k ≤ 1 scales it by at least the product of those
        ratios (the product of all Ritz values would overshoot: it multiplies
        parallel branches). Blocks without a single Ritz value (several parts)
        count with their bound. Two upper bounds of nearly equal values (local
        and global, or L(ε) and L(2ε)) can come out in either order by up to
        their tolerances; compare one's `ritz` with the other's `bound`."""
        if self.estimate is not None:
            return self.estimate
        return self.bound * math.prod(r.ritz / r.bound for r in self.layers
                                      if r.ritz is not None and r.bound)


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
    #: |computed − exact| ≤ output_error for `output` (None where not kept).
    output_error: np.ndarray | None = None
    #: ||R A D|| already solved around this x0, keyed by block and exact (R, D):
    #: radii whose masks and slopes coincide (radii too small to make a neuron
    #: uncertain, some steps of a certificate's bisection) share one eigensolve
    #: and so get the same value. Also each block's full row norms (key ("row norms", k)).
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
            return block.forward(x_in) if y is None else block.activate(y)

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
            local, err = unknown_as_inf(local), unknown_as_inf(err)
            pre.append(y)
            pre_errors.append(err)
            pre_local.append(local)
            out = block.activate_bounded(y, err)
        else:
            pre.append(None)
            pre_errors.append(None)
            pre_local.append(None)
            out = block.forward_bounded(x_in, err)
        values[k] = (out[0], unknown_as_inf(out[1]))
    output, output_error = values[len(blocks) - 1]
    return Trace(x, inputs, pre, output, in_errors, pre_errors, pre_local, output_error)


def chord_slopes(y0: np.ndarray, ybar: np.ndarray) -> np.ndarray:
    """Slope of the ReLU chord between y0 and ȳ ≥ y0 (0 where they coincide below 0).

    It grows with y0 for a fixed ȳ − y0: with y0 known only to lie in an
    interval, the chord from its upper end is the worst case (a sound slope)."""
    r = np.ones_like(y0)  # also where y0 or ȳ is unbounded (inf, NaN): the largest slope
    r[(ybar <= 0) & (y0 < 0)] = 0.0
    mixed = (y0 < 0) & (ybar > 0) & np.isfinite(ybar) & np.isfinite(y0)
    r[mixed] = ybar[mixed] / (ybar[mixed] - y0[mixed])
    return r


def unknown_as_inf(bound: np.ndarray) -> np.ndarray:
    """An error bound with NaN (inf·0 in |A|·err, inf − inf) made +inf: unknown."""
    return np.where(np.isnan(bound), np.inf, bound)


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

    def product_norm(self, forward, adjoint, in_size: int, out_size: int, key,
                     in_mask: np.ndarray | None, rounding: tuple[float, float], cap: float,
                     width: int | None = None) -> float:
        """Certified ||M|| of a linear map M applied by `forward` and `adjoint`
        (products of maps and diagonal gates of entries in [0, 1], see
        onnxlip.tight; a vector or columns): `rounding` = (η_f, η_a) bounds the
        distance of each computed product to the exact one per unit input,
        `cap` is a proven bound of ||M||, `width` the longest vector a product
        holds (default: the longer side)."""
        eta_f, eta_a = rounding
        eta = max(eta_f, eta_a)
        error = _lift(2 * eta, eta * eta) if cap > 0 else (0.0, 0.0)  # as in gram_error, r ≤ 1
        width = max(in_size, out_size, width or 0)
        dense = self._dense(forward, adjoint, in_size, out_size, in_mask, eta_f, eta_a, width)
        if dense is not None:
            return dense
        # onnxruntime's kernels do the products: BLAS threads spinning between
        # the basis' small products would only take its cores (as in masked_norm)
        with BLAS_THREADS.limit(limits=1, user_api="blas"):
            if out_size < in_size:
                result = gram_norm(lambda u: forward(adjoint(u)), out_size, self.solver, key,
                                   cap=cap, error=error)
            else:
                result = gram_norm(lambda x: adjoint(forward(x)), in_size, self.solver, key,
                                   mask=in_mask, cap=cap, error=error)
        self.delta += result.delta
        return result.value


    @staticmethod
    def _dense(forward, adjoint, in_size: int, out_size: int, in_mask, eta_f: float,
               eta_a: float, width: int) -> float | None:
        """||M|| from M itself where one side is at most PRODUCT_SIDE_MAX long: its
        columns (or rows) applied to unit vectors, as many at once as
        PRODUCT_BATCH_BYTES holds for vectors of `width`, then LAPACK. Each
        computed column is within η (the product's rounding per unit input) of
        the exact one, so ||M̃ − M|| ≤ √k·η for k columns; deterministic."""
        columns = np.flatnonzero(np.ones(in_size) if in_mask is None else in_mask)
        use_rows = out_size < columns.size
        count = out_size if use_rows else columns.size
        if count > PRODUCT_SIDE_MAX:
            return None
        apply, eta = (adjoint, eta_a) if use_rows else (forward, eta_f)
        if not count:
            return 0.0
        units = np.arange(out_size) if use_rows else columns
        batch = max(1, int(PRODUCT_BATCH_BYTES // (8 * width)))
        stack = []
        for first in range(0, count, batch):
            chosen = units[first:first + batch]
            unit = np.zeros((out_size if use_rows else in_size, chosen.size))
            unit[chosen, np.arange(chosen.size)] = 1.0
            stack.append(apply(unit).T)
        matrix = np.concatenate(stack)
        gram = matrix @ matrix.T
        frob2 = float(np.sum(matrix**2))
        entry = (gamma(matrix.shape[1], U64) + 10 * U64) * frob2 * (1 + 1e-9)
        with BLAS_THREADS.limit(limits=1, user_api="blas"):
            top = dense_gram_norm(gram, entry).value
        return (top + math.sqrt(count) * eta) * (1 + 1e-12)


#: Products (onnxlip.tight) with a side at most this long are formed densely...
PRODUCT_SIDE_MAX = 256
#: ...applied to this many bytes of unit vectors at once (the live vectors of a
#: product take a few times more).
PRODUCT_BATCH_BYTES = 16e6

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
                solver: Solver | float | None = None, reach: list | None = None) -> BoundResult:
    """Upper bound of the local Lipschitz constant in the L2 ball of radius eps
    (`reach`: see local_bound_detail)."""
    return local_bound_detail(blocks, nominal, eps, solver, reach)[0]


def local_bound_detail(blocks: list[Block], nominal: Trace, eps: float,
                       solver: Solver | float | None = None, reach: list | None = None
                       ) -> tuple[BoundResult, list[np.ndarray], list[tuple | None]]:
    """The local bound, per block the rounding-error bound its decisions used
    (elementwise, of its pre-activations for affine blocks, else of its inputs),
    and per affine block reading one block the weights of its factor ||R A D||:
    (R, D), the row weights (slopes) and the column mask (None elsewhere).

    `reach` (optional, per block (lo, hi) or None, see onnxlip.reach): proven
    bounds of the change of each block's pre-activation over the ball, used
    where they are tighter than the paper's radii (any valid bound of the
    reach keeps the paper's argument).

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
    weights: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # a one-input affine block's (R, D)
    for k, block in enumerate(blocks):
        tic = time.perf_counter()
        record = block_record(k, block)
        gain_in = sum(gains[j] for j in block.inputs)
        record.eps_in = eps * gain_in
        elem = np.concatenate([elems[j] for j in block.inputs])
        carried = math.sqrt(sum(carries[j] ** 2 for j in block.inputs))
        if nominal.in_errors[k] is not None:
            elem = np.minimum(elem, nominal.in_errors[k])
        if isinstance(block, AffineBlock):
            changes = [eps * gains[j] for j in block.inputs]
            limit = None if reach is None or reach[k] is None else reach[k][1]
            norms, masks[k], elem, carried, width, rows = _affine_local(
                block, nominal, k, masks, changes, solver, record, carried, limit)
            if len(block.inputs) == 1:
                weights[k] = (rows, masks[block.inputs[0]])
        else:
            mask = masks[block.inputs[0]]
            width = elem
            if isinstance(block, MaxPoolBlock):
                norms, masks[k] = [block.lipschitz], block.pool_mask(mask)
                elem = block.forward(elem)
                carried = min(block.lipschitz * carried, float(np.linalg.norm(elem)))
            elif block.relu:
                norms, masks[k] = [1.0], mask
                elem = relu_error(nominal.inputs[k], elem)
            else:
                norms, masks[k], elem, carried = _activation_local(
                    block, nominal.inputs[k], elem, mask, eps * gain_in, carried)
        if np.any((elem > 0) & (masks[k] == 0)):
            carried = math.inf  # an error outside the next mask: only the elementwise bound holds
        elems[k], carries[k] = elem, carried
        widths.append(width)
        gains[k], record.bound = _compose(gains, block, norms)
        record.seconds = time.perf_counter() - tic
        records.append(record)
    result = _result(gains[len(blocks) - 1], records, time.perf_counter() - start, eps, solver)
    return result, widths, [weights.get(k) for k in range(len(blocks))]


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
                  solver: Solver, record: LayerRecord, carried: float, limit: np.ndarray | None = None):
    """||R A_j D_j|| for each part of the block, the next mask, the elementwise and
    2-norm bounds of the output's rounding error, and the pre-activations' width;
    fills the record.

    The reach of a pre-activation adds those of the parts, Σ_j ε_j ||a_ijᵀ D_j||,
    with ε_j = changes[j] the largest change of input j over the ball. The exact
    pre-activation y* is only known to lie in [low, high] (the computed y0 ± its
    rounding-error bound): a neuron is active when low ≥ 0, inactive when
    high + reach ≤ 0, and its chord slope is the one from high, the largest over
    the interval. `limit`: a proven bound of the rise of each pre-activation over
    the ball, used where below the paper's reach.
    """
    y0, local = nominal.pre[index], nominal.pre_local[index]
    parts = block.parts()
    cols = [masks[j] for j in block.inputs]
    rownorms = [np.sqrt(np.maximum(part.sq_matvec(d), 0.0)) for part, d in zip(parts, cols)]
    reach = sum(change * r for change, r in zip(changes, rownorms))
    width = nominal.pre_errors[index]
    if math.isfinite(carried):  # |a_i·e| ≤ ||a_i||·||e||₂: rows in full (errors off the masks too)
        key = ("row norms", index)  # x0's trace keeps them for its other radii
        if key not in nominal.norms:
            full = sum(part.sq_matvec(np.ones(part.in_size)) for part in parts)
            nominal.norms[key] = np.sqrt(np.maximum(full, 0.0))  # of [A_1 … A_k], stacked input
        rownorm = nominal.norms[key]
        width = np.minimum(width, (local + carried * ROW_NORMS * rownorm) * SLACK)
    low, high = y0 - width, y0 + width
    extra = 0.0  # 2-norm of the activation's own evaluation error
    if block.relu:  # the paper's ReLU, exactly as published (reach: see `limit`)
        ybar = high + (reach if limit is None else np.minimum(reach, np.maximum(limit, 0.0)))
        rows = chord_slopes(high, ybar)
        record.active = int(np.count_nonzero(low >= 0))
        record.inactive = int(np.count_nonzero((ybar <= 0) & (low < 0)))
        record.uncertain = ybar.size - record.active - record.inactive
        next_mask = (ybar > 0).astype(float)
        out = relu_error(y0, width)
    elif block.activation is not None:
        activation = block.activation
        rows, lowest, highest = slope_bounds(activation, y0, width, reach)
        stable = activation.stable(lowest, highest)
        constant = activation.constant(lowest, highest)
        record.active = int(np.count_nonzero(stable & ~constant))
        record.inactive = int(np.count_nonzero(constant))
        record.uncertain = y0.size - record.active - record.inactive
        next_mask = (~constant).astype(float)
        out = activation.value_bounded(y0, width)[1]
        extra = float(np.linalg.norm(activation.value_error(y0)))
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
    with np.errstate(invalid="ignore"):
        carried = (min(sum(norms) * carried + float(np.linalg.norm(rows * local)),
                       float(np.linalg.norm(rows * width))) + extra) * SLACK
    carried = math.inf if math.isnan(carried) else carried
    return norms, next_mask, out, carried, width, rows


def slope_bounds(activation: Activation, y0: np.ndarray, width, reach: np.ndarray):
    """(r, lowest, highest): r_i ≥ |chord slope of σ relative to the exact y0*_i| over
    [y0* − reach_i, y0* + reach_i], for every y0* in [low, high] = y0 ∓ width (the
    paper's R where y0 is known only within its rounding-error bound), and an interval
    [lowest, highest] ⊇ [low − reach, high + reach] that holds every pre-activation of
    the ball (all rounded outwards).

    A chord from y0* to y > high is a convex combination of the chord from y0* to high
    (in σ' 's range over [low, high], mean value theorem) and the chord from high to y
    (relative to high, over [high, high + reach]); likewise below low; a y inside
    [low, high] gives a chord within σ' 's range there. With width 0 it is the paper's
    chord relative to y0 over [y0 − reach, y0 + reach]."""
    low = np.nextafter(y0 - width, -np.inf)
    high = np.nextafter(y0 + width, np.inf)
    reach = np.nextafter(reach, np.inf)
    dmin, dmax = activation.derivative_range(low, high)
    inner = np.maximum(np.abs(dmin), np.abs(dmax))
    lowest, highest = np.nextafter(low - reach, -np.inf), np.nextafter(high + reach, np.inf)
    up = activation.max_abs_slope(high, high, highest)
    down = activation.max_abs_slope(low, lowest, low)
    return np.maximum(inner, np.maximum(up, down)), lowest, highest


def _activation_local(block: ActivationBlock, x: np.ndarray, elem: np.ndarray, mask: np.ndarray,
                      change: float, carried: float):
    """A lone activation z = σ(x) whose inputs each move by at most `change` (the ball's
    2-norm change): its factor max r_i over the inputs that can change (a diagonal map),
    the next mask, and the output's elementwise and 2-norm error bounds (the 2-norm one
    through σ's global Lipschitz constant, plus its own evaluation error)."""
    activation = block.activation
    rows, lowest, highest = slope_bounds(activation, x, elem, np.full(x.size, float(change)))
    norm = float(np.max(rows[mask > 0], initial=0.0))
    next_mask = mask * ~activation.constant(lowest, highest)
    out = activation.value_bounded(x, elem)[1]
    extra = float(np.linalg.norm(activation.value_error(x)))
    carried = min(activation.global_lipschitz * carried + extra, float(np.linalg.norm(out))) * SLACK
    return [norm], next_mask, out, carried


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
        record = block_record(k, block)
        if isinstance(block, AffineBlock):
            norms = []
            for p, part in enumerate(block.parts()):
                ones_out, ones_in = np.ones(part.out_size), np.ones(part.in_size)
                norm = masked_norm(part, ones_out, ones_in, solver, key=(k, p))
                _fill(record, norm, first=p == 0)
                norms.append(norm.value)
            if block.activation is not None:  # ||σ(A y) − σ(A y')|| ≤ Lip(σ) ||A|| ||y − y'||
                lip = block.activation.global_lipschitz
                norms = [n * lip for n in norms]
                record.ritz = None if record.ritz is None else record.ritz * lip
        elif isinstance(block, MaxPoolBlock):
            norms = [block.lipschitz]
        else:
            norms = [block.activation.global_lipschitz]
        gains[k], record.bound = _compose(gains, block, norms)
        record.seconds = time.perf_counter() - tic
        records.append(record)
    return _result(gains[len(blocks) - 1], records, time.perf_counter() - start, None, solver)


def _result(total: float, records: list[LayerRecord], seconds: float, eps: float | None,
            solver: Solver) -> BoundResult:
    return BoundResult(total, records, seconds, eps, sum(r.delta for r in records), solver.seed)


def block_factors(result: BoundResult) -> tuple[list[float], float]:
    """A result's block bounds (inf where a block has none), and the factor that
    rounds a product of them (and of one more bound) upwards."""
    factors = [math.inf if record.bound is None else record.bound for record in result.layers]
    return factors, 1 + gamma(len(factors) + 2, U64)


def block_record(index: int, block: Block, bound: float | None = 1.0) -> LayerRecord:
    """A fresh record of a block."""
    return LayerRecord(index, block.name, block.kind, list(block.ops), tuple(block.in_shape),
                       tuple(block.out_shape), block.describe(), bound)


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
