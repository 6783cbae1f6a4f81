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

from .blocks import AffineBlock, Block, MaxPoolBlock
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
    start = time.perf_counter()
    mask = np.ones(nominal.inputs[0].size)
    eps_k, total, records = eps, 1.0, []
    for k, block in enumerate(blocks):
        tic = time.perf_counter()
        record = _record(k, block)
        record.eps_in = eps_k
        if isinstance(block, AffineBlock):
            mask = _affine_local(block, nominal, k, mask, eps_k, tol, record)
        elif isinstance(block, MaxPoolBlock):
            record.bound = block.lipschitz
            mask = block.pool_mask(mask)
        else:
            record.bound = 1.0
        record.seconds = time.perf_counter() - tic
        records.append(record)
        total *= record.bound
        eps_k *= record.bound
    return BoundResult(total, records, time.perf_counter() - start, eps)


def _affine_local(block: AffineBlock, nominal: Trace, index: int, mask, eps_k, tol,
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
    _fill(record, cached_norm(nominal, index, block, rows, mask, tol))
    return next_mask


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
