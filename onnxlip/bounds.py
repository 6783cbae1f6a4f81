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

from .blocks import INPUT, AffineBlock, Block, MaxPoolBlock, flow
from .operators.base import LinearMap
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
    """The nominal forward pass: the network's input x, each block's input (its
    sources' values concatenated) and pre-activation, and the output."""

    x: np.ndarray
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

    def step(k, block, x_in):
        inputs.append(x_in)
        if isinstance(block, AffineBlock):
            y = block.pre_activation(x_in)
            pre.append(y)
            return np.maximum(y, 0.0) if block.relu else y
        pre.append(None)
        return block.forward(x_in)

    values = flow(blocks, x, step)
    return Trace(x, inputs, pre, values[-1])


def chord_slopes(y0: np.ndarray, ybar: np.ndarray) -> np.ndarray:
    """Slope of the ReLU chord between y0 and ȳ ≥ y0 (0 where they coincide below 0)."""
    r = np.zeros_like(y0)
    r[y0 >= 0] = 1.0
    mixed = (y0 < 0) & (ybar > 0)
    r[mixed] = ybar[mixed] / (ybar[mixed] - y0[mixed])
    return r


def masked_norm(linear: LinearMap, rows: np.ndarray, cols: np.ndarray, tol: float,
                seed: int = 0) -> SpectralNorm:
    """||diag(rows) A diag(cols)|| by Lanczos, matrix-free; cols is a 0/1 mask.

    The Gram operator D Aᵀ R² A D (or R A D Aᵀ R, on the smaller side) is
    applied with the masks skipped where they are all ones, and the Lanczos
    vectors start (so stay) in the range of the mask.
    """
    if not rows.any() or not cols.any():
        return SpectralNorm(0.0, 0, 0.0, True)
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
    """Upper bound of the local Lipschitz constant in the L2 ball of radius eps.

    Each block's output carries a gain g (its change is at most g·ε over the
    ball) and a mask of the outputs that can change. A block that reads
    several blocks adds their contributions (the reach of a sum is at most the
    sum of the reaches): g = Σ_j g_j ||R A_j D_j||. On a chain g is the paper's
    product of the blocks' ||R A D||.
    """
    start = time.perf_counter()
    gains, masks, records = {INPUT: 1.0}, {INPUT: np.ones(nominal.x.size)}, []
    for k, block in enumerate(blocks):
        tic = time.perf_counter()
        record = _record(k, block)
        gain_in = sum(gains[j] for j in block.inputs)
        record.eps_in = eps * gain_in
        if isinstance(block, AffineBlock):
            changes = [eps * gains[j] for j in block.inputs]
            norms, masks[k] = _affine_local(block, nominal, k, masks, changes, tol, record)
        else:
            norms = [block.lipschitz if isinstance(block, MaxPoolBlock) else 1.0]
            mask = masks[block.inputs[0]]
            masks[k] = block.pool_mask(mask) if isinstance(block, MaxPoolBlock) else mask
        gains[k], record.bound = _compose(gains, block, norms)
        record.seconds = time.perf_counter() - tic
        records.append(record)
    return BoundResult(gains[len(blocks) - 1], records, time.perf_counter() - start, eps)


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


def _affine_local(block: AffineBlock, nominal: Trace, index: int, masks, changes: list[float],
                  tol, record: LayerRecord) -> tuple[list[float], np.ndarray]:
    """||R A_j D_j|| for each part of the block, and its output mask; fills the record.

    The reach of a pre-activation adds those of the parts, Σ_j ε_j ||a_ijᵀ D_j||,
    with ε_j = changes[j] the largest change of input j over the ball.
    """
    y0 = nominal.pre[index]
    parts = block.parts()
    cols = [masks[j] for j in block.inputs]
    reach = sum(change * np.sqrt(np.maximum(part.sq_matvec(d), 0.0))
                for change, part, d in zip(changes, parts, cols))
    if block.relu:
        ybar = y0 + reach
        rows = chord_slopes(y0, ybar)
        record.active = int(np.count_nonzero(y0 >= 0))
        record.inactive = int(np.count_nonzero(ybar <= 0))
        record.uncertain = y0.size - record.active - record.inactive
        next_mask = (ybar > 0).astype(float)
    else:
        rows = np.ones_like(y0)
        next_mask = (reach > 0).astype(float)
    norms = []
    for p, (part, d) in enumerate(zip(parts, cols)):
        norm = cached_norm(nominal, (index, p), part, rows, d, tol)
        _fill(record, norm, first=p == 0)
        norms.append(norm.value)
    return norms, next_mask


def cached_norm(nominal: Trace, key, linear: LinearMap, rows: np.ndarray,
                cols: np.ndarray, tol: float) -> SpectralNorm:
    """masked_norm, solved once per exact (key, rows, cols, tol) around this trace."""
    digest = hashlib.blake2b(rows.tobytes(), digest_size=16)
    digest.update(cols.tobytes())
    key = (key, tol, digest.digest())
    if key not in nominal.norms:
        nominal.norms[key] = replace(masked_norm(linear, rows, cols, tol), vector=None)
    return nominal.norms[key]


def global_bound(blocks: list[Block], tol: float) -> BoundResult:
    """The blocks' global Lipschitz constants (spectral norms) composed along
    the graph: their product on a chain, g = Σ_j g_j ||A_j|| where a block
    reads several blocks."""
    start = time.perf_counter()
    gains, records = {INPUT: 1.0}, []
    for k, block in enumerate(blocks):
        tic = time.perf_counter()
        record = _record(k, block)
        if isinstance(block, AffineBlock):
            norms = []
            for p, part in enumerate(block.parts()):
                norm = masked_norm(part, np.ones(part.out_size), np.ones(part.in_size), tol)
                _fill(record, norm, first=p == 0)
                norms.append(norm.value)
        else:
            norms = [block.lipschitz if isinstance(block, MaxPoolBlock) else 1.0]
        gains[k], record.bound = _compose(gains, block, norms)
        record.seconds = time.perf_counter() - tic
        records.append(record)
    return BoundResult(gains[len(blocks) - 1], records, time.perf_counter() - start)


def _record(index: int, block: Block) -> LayerRecord:
    return LayerRecord(index, block.name, block.kind, list(block.ops), tuple(block.in_shape),
                       tuple(block.out_shape), block.describe(), 1.0)


def _fill(record: LayerRecord, norm: SpectralNorm, first: bool = True) -> None:
    """Add one solve to the record (a block that reads several tensors has one per part)."""
    record.iterations = norm.iterations + (0 if first else record.iterations)
    record.residual = norm.residual if first else max(record.residual, norm.residual)
    record.converged = norm.converged and (first or record.converged)
