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
from dataclasses import asdict, dataclass, field, replace

import numpy as np
from threadpoolctl import ThreadpoolController

from .blocks import AffineBlock, Block, MaxPoolBlock, relu_error
from .operators.base import SLACK
from .operators.matrix import DenseMap
from .spectral import SpectralNorm, gram_norm

#: Found once: threadpool_limits() would inspect the loaded libraries at every call (~1 ms).
_THREADPOOLS = ThreadpoolController()


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


@dataclass
class BoundResult:
    """A Lipschitz bound with its per-block record."""

    bound: float
    layers: list[LayerRecord]
    seconds: float
    eps: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def ritz(self) -> float:
        """The bound without the blocks' residual lifts: the product of their
        Lanczos Ritz values, an estimate from below of the computed product.
        Two upper bounds of nearly equal products (local and global, or L(ε)
        and L(2ε)) can come out in either order by up to their residuals;
        compare one's `ritz` with the other's `bound`."""
        return self.bound / math.prod(math.sqrt(1.0 + r.residual) for r in self.layers)


@dataclass
class Trace:
    """The nominal forward pass: each block's input and pre-activation, and (when
    traced with rounding) bounds of their rounding errors, elementwise:
    |computed − exact| ≤ in_errors[k] for inputs[k] (kept for blocks without a
    pre-activation only) and ≤ pre_errors[k] for pre[k], and pre_local[k] ≥
    |pre[k] − the exact block applied to inputs[k]| (the block's own rounding);
    None where not kept."""

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
        for block in blocks:
            inputs.append(x)
            y = block.pre_activation(x) if isinstance(block, AffineBlock) else None
            pre.append(y)
            x = block.forward(x) if y is None else np.maximum(y, 0.0) if block.relu else y
        return Trace(inputs, pre, x)
    # numpy's BLAS threads spin between the many small float64 products and fight
    # onnxruntime's for the cores: one thread ran AlexNet's pass 8x faster (0.21 s
    # against 1.7 s on the loaded 2-core machine).
    with _THREADPOOLS.limit(limits=1, user_api="blas"):
        return _bounded_trace(blocks, x)


def _bounded_trace(blocks: list[Block], x: np.ndarray) -> Trace:
    inputs, pre, in_errors, pre_errors, pre_local = [], [], [], [], []
    err = np.zeros(x.size)
    for block in blocks:
        inputs.append(x)
        in_errors.append(None if isinstance(block, AffineBlock) else err)
        if isinstance(block, AffineBlock):
            y, local, err = block.pre_activation_bounded(x, err)
            pre.append(y)
            pre_errors.append(err)
            pre_local.append(local)
            if block.relu:
                x, err = np.maximum(y, 0.0), relu_error(y, err)
            else:
                x = y
        else:
            pre.append(None)
            pre_errors.append(None)
            pre_local.append(None)
            x, err = block.forward_bounded(x, err)
    return Trace(inputs, pre, x, in_errors, pre_errors, pre_local)


def chord_slopes(y0: np.ndarray, ybar: np.ndarray) -> np.ndarray:
    """Slope of the ReLU chord between y0 and ȳ ≥ y0 (0 where they coincide below 0).

    It grows with y0 for a fixed ȳ − y0: with y0 known only to lie in an
    interval, the chord from its upper end is the worst case (a sound slope)."""
    r = np.zeros_like(y0)
    r[y0 >= 0] = 1.0
    mixed = (y0 < 0) & (ybar > 0)
    r[mixed] = ybar[mixed] / (ybar[mixed] - y0[mixed])
    return r


def masked_norm(block: AffineBlock, rows: np.ndarray, cols: np.ndarray, tol: float,
                seed: int = 0) -> SpectralNorm:
    """||diag(rows) A diag(cols)|| by Lanczos, matrix-free; cols is a 0/1 mask.

    The Gram operator D Aᵀ R² A D (or R A D Aᵀ R, on the smaller side) is
    applied with the masks skipped where they are all ones, and the Lanczos
    vectors start (so stay) in the range of the mask.
    """
    if not rows.any() or not cols.any():
        return SpectralNorm(0.0, 0, 0.0, True)
    linear = block.map
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
        size, mask = linear.out_size, None if rows is None else (rows > 0).astype(float)
    # With onnxruntime kernels doing the products, numpy's BLAS threads (which
    # spin between calls) only steal its cores: 9.3 s -> 5.5 s on AlexNet.
    blas_threads = None if isinstance(linear, DenseMap) else 1
    with _THREADPOOLS.limit(limits=blas_threads, user_api="blas"):
        return gram_norm(gram, size, tol=tol, seed=seed, mask=mask)


def _masked(v: np.ndarray, weight: np.ndarray | None) -> np.ndarray:
    """v * weight, in place: v must be a fresh product."""
    if weight is None:
        return v
    v *= weight
    return v


def local_bound(blocks: list[Block], nominal: Trace, eps: float, tol: float) -> BoundResult:
    """Upper bound of the local Lipschitz constant in the L2 ball of radius eps."""
    return local_bound_detail(blocks, nominal, eps, tol)[0]


def local_bound_detail(blocks: list[Block], nominal: Trace, eps: float,
                       tol: float) -> tuple[BoundResult, list[np.ndarray]]:
    """The local bound, and per block the rounding-error bound its decisions used
    (elementwise, of its pre-activations for affine blocks, else of its inputs).

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
    start = time.perf_counter()
    mask = np.ones(nominal.inputs[0].size)
    eps_k, total, records, widths = eps, 1.0, [], []
    carried, elem = 0.0, np.zeros(mask.size)  # 2-norm and elementwise error of the input
    for k, block in enumerate(blocks):
        tic = time.perf_counter()
        record = _record(k, block)
        record.eps_in = eps_k
        if nominal.in_errors[k] is not None:
            elem = np.minimum(elem, nominal.in_errors[k])
        if isinstance(block, AffineBlock):
            mask, elem, carried, width = _affine_local(block, nominal, k, mask, eps_k, tol,
                                                       record, carried)
        elif isinstance(block, MaxPoolBlock):
            width, record.bound = elem, block.lipschitz
            mask = block.pool_mask(mask)
            elem = block.forward(elem)
            carried = min(block.lipschitz * carried, float(np.linalg.norm(elem)))
        else:
            width, record.bound = elem, 1.0
            elem = relu_error(nominal.inputs[k], elem)
        if np.any((elem > 0) & (mask == 0)):
            carried = math.inf  # an error outside the next mask: only the elementwise bound holds
        widths.append(width)
        record.seconds = time.perf_counter() - tic
        records.append(record)
        total *= record.bound
        eps_k *= record.bound
    return BoundResult(total, records, time.perf_counter() - start, eps), widths


#: Lifts row norms computed in float32 (γ_m/2 < 1e-2 for fan-ins m below 3e5).
ROW_NORMS = 1.01


def _affine_local(block: AffineBlock, nominal: Trace, index: int, mask, eps_k, tol,
                  record: LayerRecord, carried: float):
    """Fill the record with L_k = ||R A D||; return the next block's mask, the
    elementwise and 2-norm bounds of its input's rounding error, and this block's.

    The exact pre-activation y* is only known to lie in [low, high] (the
    computed y0 ± its rounding-error bound): a neuron is active when low ≥ 0,
    inactive when high + reach ≤ 0, and its chord slope is the one from high,
    the largest over the interval."""
    y0, local = nominal.pre[index], nominal.pre_local[index]
    rownorm = np.sqrt(np.maximum(block.map.sq_matvec(mask), 0.0))
    width = nominal.pre_errors[index]
    if math.isfinite(carried):
        width = np.minimum(width, (local + carried * ROW_NORMS * rownorm) * SLACK)
    low, high = y0 - width, y0 + width
    if block.relu:
        ybar = high + eps_k * rownorm
        rows = chord_slopes(high, ybar)
        record.active = int(np.count_nonzero(low >= 0))
        record.inactive = int(np.count_nonzero((ybar <= 0) & (low < 0)))
        record.uncertain = ybar.size - record.active - record.inactive
        next_mask = (ybar > 0).astype(float)
        out = relu_error(y0, width)
    else:
        rows = np.ones_like(y0)
        next_mask = (rownorm > 0).astype(float)
        out = width
    _fill(record, cached_norm(nominal, index, block, rows, mask, tol))
    carried = min(record.bound * carried + float(np.linalg.norm(rows * local)),
                  float(np.linalg.norm(rows * width))) * SLACK
    return next_mask, out, carried, width


def cached_norm(nominal: Trace, index: int, block: AffineBlock, rows: np.ndarray,
                cols: np.ndarray, tol: float) -> SpectralNorm:
    """masked_norm, solved once per exact (block, rows, cols, tol) around this trace."""
    digest = hashlib.blake2b(rows.tobytes(), digest_size=16)
    digest.update(cols.tobytes())
    key = (index, tol, digest.digest())
    if key not in nominal.norms:
        nominal.norms[key] = replace(masked_norm(block, rows, cols, tol), vector=None)
    return nominal.norms[key]


def global_bound(blocks: list[Block], tol: float) -> BoundResult:
    """Product of the blocks' global Lipschitz constants (spectral norms)."""
    start = time.perf_counter()
    total, records = 1.0, []
    for k, block in enumerate(blocks):
        tic = time.perf_counter()
        record = _record(k, block)
        if isinstance(block, AffineBlock):
            ones_out, ones_in = np.ones(block.map.out_size), np.ones(block.map.in_size)
            _fill(record, masked_norm(block, ones_out, ones_in, tol))
        elif isinstance(block, MaxPoolBlock):
            record.bound = block.lipschitz
        else:
            record.bound = 1.0
        record.seconds = time.perf_counter() - tic
        records.append(record)
        total *= record.bound
    return BoundResult(total, records, time.perf_counter() - start)


def _record(index: int, block: Block) -> LayerRecord:
    return LayerRecord(index, block.name, block.kind, list(block.ops), tuple(block.in_shape),
                       tuple(block.out_shape), block.describe(), 1.0)


def _fill(record: LayerRecord, norm: SpectralNorm) -> None:
    record.bound = norm.value
    record.iterations = norm.iterations
    record.residual = norm.residual
    record.converged = norm.converged
