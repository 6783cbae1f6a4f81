"""Local and global Lipschitz bounds of a chain of blocks (METHOD.md).

Local: for each affine-ReLU block, the reachable pre-activation
ȳ = y0 + ε_k·||a_iᵀ D||, the ReLU chord slopes r, and L_k = ||R A D||; ε is
carried as ε_{k+1} = L_k ε_k and D (the inputs that can change) is tracked
through ReLU, max-pooling and reshapes. Global: the product of ||A_k||.
"""

from __future__ import annotations

import hashlib
import math
import time
import weakref
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import scipy.sparse as sp

from .blocks import AffineBlock, Block, MaxPoolBlock
from .operators.base import BLAS_THREADS, F64, LinearMap, gamma
from .operators.chain import _carried
from .operators.matrix import DenseMap
from .spectral import Solver, SpectralNorm, dense_gram_norm, gram_norm

_THREADPOOLS = BLAS_THREADS


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
    """The nominal forward pass: each block's input and pre-activation."""

    inputs: list[np.ndarray]
    pre: list[np.ndarray | None]
    output: np.ndarray
    #: ||R A D|| already solved around this x0, keyed by block and exact (R, D):
    #: radii whose masks and slopes coincide (radii too small to make a neuron
    #: uncertain, some steps of a certificate's bisection) share one eigensolve
    #: and so get the same value.
    norms: dict = field(default_factory=dict, repr=False)


def trace(blocks: list[Block], x: np.ndarray) -> Trace:
    inputs, pre = [], []
    for block in blocks:
        inputs.append(x)
        if isinstance(block, AffineBlock):
            y = block.pre_activation(x)
            pre.append(y)
            x = np.maximum(y, 0.0) if block.relu else y
        else:
            pre.append(None)
            x = block.forward(x)
    return Trace(inputs, pre, x)


def chord_slopes(y0: np.ndarray, ybar: np.ndarray) -> np.ndarray:
    """Slope of the ReLU chord between y0 and ȳ ≥ y0 (0 where they coincide below 0)."""
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


def masked_norm(block: AffineBlock, rows: np.ndarray, cols: np.ndarray,
                solver: Solver | float | None = None, key=0) -> SpectralNorm:
    """||diag(rows) A diag(cols)|| (cols a 0/1 mask), with its guarantee.

    Deterministic where cheap: exact for monomial maps, LAPACK on the Gram
    matrix of the smaller side when it is short (dense_norm). Otherwise
    certified Lanczos, matrix-free (spectral.gram_norm): the Gram operator
    D Aᵀ R² A D (or R A D Aᵀ R, on the smaller side) with the masks skipped
    where they are all ones, the start in the range of the mask, the map's
    proven norm cap (times max |r|) as a cap, and its products' rounding
    (LinearMap.rounding) carried into a bound of the Gram operator's error.
    """
    solver = as_solver(solver)
    if not rows.any() or not cols.any():
        return SpectralNorm(0.0, 0)
    linear = block.map
    exact = dense_norm(linear, rows, cols)
    if exact is not None:
        return exact
    scale = float(np.max(np.abs(rows)))
    cap = scale * linear.norm_cap()
    error = gram_error(linear, scale)
    rows = None if np.all(rows == 1) else rows
    cols = None if np.all(cols == 1) else cols
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
    with _THREADPOOLS.limit(limits=blas_threads, user_api="blas"):
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
    so c₁ = r(η_f + η_a), c₀ = r²η_fη_a; the other side is symmetric."""
    a = linear.norm_cap()
    eta_f, eta_a = linear.rounding()
    u = float(np.finfo(np.float64).eps)
    eta_f, eta_a = max(eta_f, eta_a) + 2 * u * a, max(eta_f, eta_a) + 2 * u * a  # either order
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
        eta_f = _carried(caps, [m.rounding()[0] + F64 * c for m, c in zip(maps, caps)])
        eta_a = _carried(caps[::-1], [m.rounding()[1] + F64 * c for m, c in zip(maps[::-1], caps[::-1])])
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
        return SpectralNorm(top * (1 + 8 * F64), 0, ritz=top)
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
    error = (gamma(longest, F64) + 10 * F64) * frob2 * (1 + 1e-9)
    with _THREADPOOLS.limit(limits=1, user_api="blas"):  # threads only thrash on small LAPACK work
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
    solver = as_solver(solver)
    start = time.perf_counter()
    mask = np.ones(nominal.inputs[0].size)
    eps_k, total, records = eps, 1.0, []
    for k, block in enumerate(blocks):
        tic = time.perf_counter()
        record = _record(k, block)
        record.eps_in = eps_k
        if isinstance(block, AffineBlock):
            mask = _affine_local(block, nominal, k, mask, eps_k, solver, record)
        elif isinstance(block, MaxPoolBlock):
            record.bound = block.lipschitz
            mask = block.pool_mask(mask)
        else:
            record.bound = 1.0
        record.seconds = time.perf_counter() - tic
        records.append(record)
        total *= record.bound
        eps_k *= record.bound
    return _result(total, records, time.perf_counter() - start, eps, solver)


def _affine_local(block: AffineBlock, nominal: Trace, index: int, mask, eps_k, solver,
                  record: LayerRecord) -> np.ndarray:
    """Fill the record with L_k = ||R A D||; return the next block's mask."""
    y0 = nominal.pre[index]
    reach = np.sqrt(np.maximum(block.map.sq_matvec(mask), 0.0))
    if block.relu:
        ybar = y0 + eps_k * reach
        rows = chord_slopes(y0, ybar)
        record.active = int(np.count_nonzero(y0 >= 0))
        record.inactive = int(np.count_nonzero(ybar <= 0))
        record.uncertain = y0.size - record.active - record.inactive
        next_mask = (ybar > 0).astype(float)
    else:
        rows = np.ones_like(y0)
        next_mask = (reach > 0).astype(float)
    _fill(record, cached_norm(nominal, index, block, rows, mask, solver))
    return next_mask


def cached_norm(nominal: Trace, index: int, block: AffineBlock, rows: np.ndarray,
                cols: np.ndarray, solver: Solver | float | None = None) -> SpectralNorm:
    """masked_norm, solved once per exact (block, rows, cols, solver) around this trace."""
    solver = as_solver(solver)
    digest = hashlib.blake2b(rows.tobytes(), digest_size=16)
    digest.update(cols.tobytes())
    key = (index, solver, digest.digest())
    if key not in nominal.norms:
        nominal.norms[key] = replace(masked_norm(block, rows, cols, solver, key=index), vector=None)
    return nominal.norms[key]


def global_bound(blocks: list[Block], solver: Solver | float | None = None) -> BoundResult:
    """Product of the blocks' global Lipschitz constants (spectral norms)."""
    solver = as_solver(solver)
    start = time.perf_counter()
    total, records = 1.0, []
    for k, block in enumerate(blocks):
        tic = time.perf_counter()
        record = _record(k, block)
        if isinstance(block, AffineBlock):
            ones_out, ones_in = np.ones(block.map.out_size), np.ones(block.map.in_size)
            _fill(record, masked_norm(block, ones_out, ones_in, solver, key=k))
        elif isinstance(block, MaxPoolBlock):
            record.bound = block.lipschitz
        else:
            record.bound = 1.0
        record.seconds = time.perf_counter() - tic
        records.append(record)
        total *= record.bound
    return _result(total, records, time.perf_counter() - start, None, solver)


def _result(total: float, records: list[LayerRecord], seconds: float, eps: float | None,
            solver: Solver) -> BoundResult:
    return BoundResult(total, records, seconds, eps, sum(r.delta for r in records), solver.seed)


def _record(index: int, block: Block) -> LayerRecord:
    return LayerRecord(index, block.name, block.kind, list(block.ops), tuple(block.in_shape),
                       tuple(block.out_shape), block.describe(), 1.0)


def _fill(record: LayerRecord, norm: SpectralNorm) -> None:
    record.bound = norm.value
    record.iterations = norm.iterations
    record.residual = norm.residual
    record.converged = norm.converged
    record.ritz = norm.ritz
    record.guarantee = norm.guarantee
    record.delta = norm.delta
    record.seed = norm.seed
