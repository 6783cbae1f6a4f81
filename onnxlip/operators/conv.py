"""Convolution as a linear map: matrix-free through onnxruntime, or exact CSR."""

from __future__ import annotations

import itertools
import math
from functools import cached_property

import numpy as np
import scipy.sparse as sp

from .base import BLAS_THREADS, U32, U64, FixedMap, LinearMap, gamma, scattered
from .ort import NodeSession


def conv_output_size(size: int, kernel: int, stride: int, pad: int, dilation: int) -> int:
    """Output length of one spatial axis of a convolution (floor mode)."""
    return (size + pad - dilation * (kernel - 1) - 1) // stride + 1


class ConvMap(LinearMap):
    """A bias-free N-d convolution with explicit pads (begin..., end...)."""

    representation = "matrix-free"
    unit_roundoff = U32  # onnxruntime's float32 kernels
    compute_dtype = np.dtype(np.float32)
    #: In channels-last order 64 columns sit in a row or so of an image (onnxlip.reach).
    local_columns = 64
    boxed = True

    def __init__(self, weight, in_shape, strides, pads, dilations, group: int):
        given = np.asarray(weight)
        weight = given.astype(np.float32)
        #: The model's kernel where float32 rounds it (a float64 model), else None.
        self._exact = None if np.array_equal(weight, given) else given.astype(np.float64)
        rank = weight.ndim - 2
        spatial = in_shape[2:]
        out_spatial = tuple(
            conv_output_size(spatial[i], weight.shape[2 + i], strides[i],
                             pads[i] + pads[rank + i], dilations[i])
            for i in range(rank)
        )
        super().__init__(in_shape, (1, weight.shape[0], *out_spatial))
        self.weight, self.strides, self.pads = weight, tuple(strides), tuple(pads)
        self.dilations, self.group = tuple(dilations), group

    @property
    def rank(self) -> int:
        return self.weight.ndim - 2

    def _attrs(self) -> dict:
        return dict(strides=list(self.strides), pads=list(self.pads),
                    dilations=list(self.dilations), group=self.group, entries=self._entries)

    @property
    def _entries(self) -> int:
        """The larger side, which decides whether its sessions keep a memory arena."""
        return max(self.in_size, self.out_size)

    @cached_property
    def _forward(self) -> NodeSession:
        return NodeSession("Conv", {"W": self.weight}, self.rank + 2, **self._attrs())

    @cached_property
    def _squared(self) -> NodeSession:
        return NodeSession("Conv", {"W": self.weight**2}, self.rank + 2, **self._attrs())

    @cached_property
    def _absolute(self) -> NodeSession:
        return NodeSession("Conv", {"W": np.abs(self.weight)}, self.rank + 2, **self._attrs())

    @property
    def fan_in(self) -> int:
        return math.prod(self.weight.shape[1:])

    @cached_property
    def _transpose(self) -> NodeSession:
        """Aᵀ: a flipped convolution for stride 1 (onnxruntime's Conv is the faster
        kernel), else a ConvTranspose. The flipped convolution slides the kernel
        over every input position, so where the output is much smaller than the
        input (a kernel as large as the image: GlobalAveragePool) its cost grows
        with the square of the image and ConvTranspose is used instead."""
        reach = [d * (k - 1) for d, k in zip(self.dilations, self.weight.shape[2:])]
        flip_pads = [reach[i % self.rank] - p for i, p in enumerate(self.pads)]
        similar = math.prod(self.in_shape[2:]) <= 4 * math.prod(self.out_shape[2:])
        if all(s == 1 for s in self.strides) and min(flip_pads) >= 0 and similar:
            return NodeSession("Conv", {"W": self._flipped_weight()}, self.rank + 2,
                               **{**self._attrs(), "pads": flip_pads})
        full = [
            self.strides[i] * (self.out_shape[2 + i] - 1) + reach[i] + 1
            - self.pads[i] - self.pads[self.rank + i]
            for i in range(self.rank)
        ]
        extra = [self.in_shape[2 + i] - full[i] for i in range(self.rank)]
        return NodeSession("ConvTranspose", {"W": self.weight}, self.rank + 2,
                           output_padding=extra, **self._attrs())

    def _flipped_weight(self) -> np.ndarray:
        m, cg = self.weight.shape[:2]
        w = self.weight.reshape(self.group, m // self.group, cg, *self.weight.shape[2:])
        w = np.swapaxes(w, 1, 2).reshape(cg * self.group, m // self.group, *self.weight.shape[2:])
        return np.ascontiguousarray(np.flip(w, axis=tuple(range(2, 2 + self.rank))))

    def matmat(self, x):
        return _run(self._forward, x, self.in_shape, self.out_size)

    def matmat_local(self, x):
        """A x through matmat_box on the rows where x is nonzero: the outputs they
        cannot reach are exactly 0."""
        rows = np.flatnonzero(x.any(axis=1))
        reached, block = self.matmat_box(rows, x[rows])
        if reached is None:
            return block.astype(x.dtype, copy=False)
        out = np.zeros((self.out_size, x.shape[1]), x.dtype)
        out[reached] = block
        return out

    def matmat_box(self, rows, block):
        """The outputs whose receptive fields meet the rows' positions (a box per
        spatial axis), from the input cropped to the box's receptive fields;
        all outputs where the box holds most of them (CROP_MAX)."""
        if rows is None:
            return None, self.matmat_local(block)
        where = np.unravel_index(rows, self.in_shape[1:])
        box = self._box([(int(p.min()), int(p.max())) for p in where[1:]]) if rows.size else None
        if box is None:
            return np.zeros(0, np.intp), np.zeros((0, block.shape[1]), self._cropped.dtype)
        if math.prod(hi - lo for lo, hi in box) > CROP_MAX * math.prod(self.out_shape[2:]):
            return None, self.matmat(scattered(rows, block, self.in_size))
        starts, crop = self._crop(box)
        at = [p - start for p, start in zip(where[1:], starts)]
        inside = np.logical_and.reduce([(a >= 0) & (a < n) for a, n in zip(at, crop)])
        batch = block.shape[1]
        cropped = np.zeros((batch, self.in_shape[1], *crop), self._cropped.dtype)
        with np.errstate(over="ignore"):  # inf past float32, as in _run
            cropped[(slice(None), where[0][inside], *(a[inside] for a in at))] = block[inside].T
        out = self._cropped(cropped)
        index = np.arange(self.out_size).reshape(self.out_shape[1:])
        reached = index[(slice(None), *(slice(lo, hi) for lo, hi in box))].ravel()
        return reached, out.reshape(batch, reached.size).T.astype(block.dtype, copy=False)

    def _box(self, extent: list[tuple[int, int]]) -> list[tuple[int, int]] | None:
        """Per spatial axis, the range [lo, hi) of output positions some tap reads an
        input position in [first, last] through (None where none does). Output o
        reads input o·s − p + j·d for the taps j < k."""
        box = []
        for i, (first, last) in enumerate(extent):
            s, p, d, k = self._axis(i)
            lo = max(0, -(-(first + p - d * (k - 1)) // s))
            hi = min(self.out_shape[2 + i], (last + p) // s + 1)
            if hi <= lo:
                return None
            box.append((lo, hi))
        return box

    def _crop(self, box: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
        """Per spatial axis, the first input position the box's outputs read and
        how many they span (past the image's edge: padding)."""
        starts, crop = [], []
        for i, (lo, hi) in enumerate(box):
            s, p, d, k = self._axis(i)
            start, stop = lo * s - p, (hi - 1) * s - p + d * (k - 1) + 1
            starts.append(start)
            crop.append(stop - start)
        return starts, crop

    def _axis(self, i: int) -> tuple[int, int, int, int]:
        """Spatial axis i's (stride, leading pad, dilation, kernel length)."""
        return self.strides[i], self.pads[i], self.dilations[i], self.weight.shape[2 + i]

    @cached_property
    def _cropped(self) -> NodeSession:
        """The convolution without padding, for inputs padded explicitly (matmat_box)."""
        return NodeSession("Conv", {"W": self.weight}, self.rank + 2,
                           **{**self._attrs(), "pads": [0] * (2 * self.rank)})

    def rmatmat(self, u):
        return _run(self._transpose, u, self.out_shape, self.in_size)

    def sq_matvec(self, d):
        d = d.reshape(-1, 1).astype(np.float64)
        return _run(self._squared, d, self.in_shape, self.out_size)[:, 0]

    def abs_matvec(self, v):
        columns = v.reshape(self.in_size, -1).astype(np.float64)
        return _run(self._absolute, columns, self.in_shape, self.out_size).reshape(
            (self.out_size,) + v.shape[1:])

    def precise_matvec(self, x):
        """The convolution in float64 (numpy, with the model's kernel): onnxruntime's
        float32 kernels would leave errors up to γ_m·|W||x| (m the fan-in), which a
        rigorous bound carries through |A| of every later layer and which then swamps
        a deep network's small pre-activations. (The error bound's own |W| product
        runs in float32 on onnxruntime, lifted by its rounding: abs_bound.)"""
        return self.float64_matvec(x)

    @property
    def precise_gamma(self) -> float:
        return gamma(self.fan_in + 2, U64)

    def float64_matvec(self, x: np.ndarray) -> np.ndarray:
        """A x in float64 (see float64_matmat)."""
        return self.float64_matmat(x.reshape(-1, 1))[:, 0]

    def float64_rmatvec(self, u: np.ndarray) -> np.ndarray:
        """Aᵀ u in float64 (see float64_rmatmat)."""
        return self.float64_rmatmat(u.reshape(-1, 1))[:, 0]

    def float64_matmat(self, x: np.ndarray) -> np.ndarray:
        """A X in float64 for columns X: per group, matrix products of the kernel's
        offsets (batched to about 16 MB of patches) with the strided, dilated
        views of the padded input, the columns a trailing axis of the positions."""
        weight = self.weight.astype(np.float64) if self._exact is None else self._exact
        rank, spatial, k = self.rank, self.out_shape[2:], x.shape[1]
        image = np.pad(x.reshape(*self.in_shape[1:], k),
                       [(0, 0)] + [(self.pads[i], self.pads[rank + i]) for i in range(rank)] + [(0, 0)])
        m, cg = weight.shape[:2]
        mg, positions = m // self.group, math.prod(spatial) * k
        offsets = list(itertools.product(*[range(n) for n in weight.shape[2:]]))
        batch = max(1, (1 << 21) // (cg * positions))
        out = np.zeros((m, positions))
        for g in range(self.group):
            rows, chans = slice(g * mg, (g + 1) * mg), slice(g * cg, (g + 1) * cg)
            for start in range(0, len(offsets), batch):
                part = offsets[start:start + batch]
                patches = np.concatenate([image[(chans, *self._window(o))].reshape(cg, positions)
                                          for o in part])
                kernel = np.concatenate([weight[(rows, slice(None), *o)] for o in part], axis=1)
                out[rows] += kernel @ patches
        return out.reshape(self.out_size, k)

    def float64_rmatmat(self, u: np.ndarray) -> np.ndarray:
        """Aᵀ U in float64 for columns U: float64_matmat's products transposed, each
        kernel offset's scattered back onto its strided window."""
        weight = self.weight.astype(np.float64) if self._exact is None else self._exact
        rank, spatial, k = self.rank, self.out_shape[2:], u.shape[1]
        padded = [self.in_shape[2 + i] + self.pads[i] + self.pads[rank + i] for i in range(rank)]
        image = np.zeros((self.in_shape[1], *padded, k))
        m, cg = weight.shape[:2]
        mg, positions = m // self.group, math.prod(spatial) * k
        grad = u.reshape(m, positions)
        for g in range(self.group):
            rows, chans = slice(g * mg, (g + 1) * mg), slice(g * cg, (g + 1) * cg)
            for offset in itertools.product(*[range(n) for n in weight.shape[2:]]):
                part = weight[(rows, slice(None), *offset)].T @ grad[rows]
                image[(chans, *self._window(offset))] += part.reshape(cg, *spatial, k)
        crop = tuple(slice(self.pads[i], self.pads[i] + self.in_shape[2 + i]) for i in range(rank))
        return image[(slice(None), *crop)].reshape(self.in_size, k)

    @cached_property
    def exact64(self) -> LinearMap:
        """The convolution's products in float64 (float64_matmat: BLAS per kernel
        offset, several times faster than its CSR matrix on many columns)."""
        return Float64Conv(self)

    def _window(self, offset: tuple[int, ...]) -> tuple[slice, ...]:
        """The input positions that kernel offset `offset` meets, one per output position."""
        return tuple(slice(o * d, o * d + s * (n - 1) + 1, s) for o, d, s, n in
                     zip(offset, self.dilations, self.strides, self.out_shape[2:]))

    def sparse_nnz_estimate(self) -> int:
        return self.out_size * math.prod(self.weight.shape[1:])

    @cached_property
    def _abs_norm(self) -> float:
        """A bound of || |A| ||₂, the convolution with |W|: the norm of the c_out×c_in
        matrix of the kernels' absolute sums (per group), which is |W|'s Fourier symbol
        at frequency 0, its largest (see fourier_cap)."""
        sums = np.abs(self.weight.astype(np.float64)).sum(axis=tuple(range(2, 2 + self.rank)))
        m, cg = sums.shape
        blocks = sums.reshape(self.group, m // self.group, cg)
        with BLAS_THREADS.limit(limits=1, user_api="blas"):  # see fourier_cap
            top = max(float(np.linalg.norm(b, 2)) for b in blocks)
        return top * (1 + 8 * max(m, cg) * U64) + gamma(self.weight[0, 0].size, U64) * top

    def norm_cap(self) -> float:
        """|| |A| || (see _abs_norm): cheap, and enough for the rounding margins."""
        return self._abs_norm

    @cached_property
    def _sharp_cap(self) -> float:
        return min(fourier_cap(self), self._abs_norm)

    def sharp_cap(self) -> float:
        return self._sharp_cap

    @property
    def fan_out(self) -> int:
        """The most nonzero products in one output of the adjoint: c_out/group times,
        per axis, the kernel taps that can meet one input position. Tap j meets
        input p when p + pad − j·d ≡ 0 (mod s): one residue class of j modulo
        s/gcd(s, d), at most ceil(k·gcd(s, d)/s) taps of k (all k for stride 1)."""
        taps = math.prod(min(k, -(-k * math.gcd(s, d) // s)) for k, s, d in
                         zip(self.weight.shape[2:], self.strides, self.dilations))
        return self.weight.shape[0] // self.group * taps

    def coefficient_bound(self) -> float:
        """Σ|w|: Schur's test, each row's and each column's absolute sum being at most it."""
        with np.errstate(all="ignore"):
            return float(np.abs(self.weight).sum(dtype=np.float64))

    def coefficients_finite(self) -> bool:
        return bool(np.all(np.isfinite(self.weight)))

    def rounding(self) -> tuple[float, float]:
        """onnxruntime's float32 kernels: x rounded to float32 (u·||A||), then each
        output sums its nonzero products (c_in/group·kernel; the adjoint: fan_out,
        9·c_out where a stride-4 11x11 kernel meets each input at most 3x3 times):
        γ_m·|| |A| ||·||x32||. Assumes the kernel computes each output as a sum of
        those products in some order, zeros aside (im2col + GEMM, col2im for the
        adjoint, or direct; no Winograd/FFT)."""
        fan_in = self.weight.shape[1] * math.prod(self.weight.shape[2:])
        cap, lift = self.norm_cap(), self._abs_norm * (1 + U32)
        return U32 * cap + gamma(fan_in, U32) * lift, U32 * cap + gamma(self.fan_out, U32) * lift

    def to_sparse(self) -> sp.csr_matrix:
        """The exact matrix, built by vectorized index arithmetic."""
        return conv_matrix(self)


#: Float64Conv.rmatmat goes through the CSR matrix where at most 1/SPARSE_PULL of the
#: entries are nonzero.
SPARSE_PULL = 8
#: matmat_box convolves a crop where it holds at most this share of the outputs.
CROP_MAX = 0.5
#: Largest work (frequencies × c_out × c_in × min(c_out, c_in)) spent on the Fourier cap.
FOURIER_WORK_MAX = 2e9


def fourier_cap(conv: ConvMap, work_max: float | None = None) -> float:
    """A deterministic upper bound of ||conv|| (inf where too costly to compute).

    A zero-padded stride-1 convolution of an input of length N with a kernel of
    extent K = d(k−1)+1 is a compression (a submatrix) of the linear convolution,
    which equals the circular one on P = N + K − 1 points (no wrap-around):
    its norm is the largest σ_max over the P-point DFT frequencies f of the
    kernel's c_out×c_in symbol Ŵ(f) = Σ_j w_j e^{−2πi f·j d/P} (per axis,
    per group). Stride s keeps every s-th output: a row selection, norm ≤ 1.
    The kernel is real, so Ŵ(−f) is Ŵ(f)'s conjugate (the same singular values):
    the first axis's frequencies 0..P₀/2 cover all.

    Rounding: the phase is reduced exactly in integers, (f_i j_i d_i mod P_i),
    before one division per axis, so the angle θ ∈ [0, 2π·rank) is off by at
    most 2π·(2·rank + 2)·u and each computed e^{−iθ} by that plus 2u; the real
    and imaginary parts are sums of `taps` products (γ_taps); so
    |fl(Ŵ) − Ŵ| ≤ √2·(γ_taps + (13·rank + 15)·u)·Σ|w| entrywise (covered by
    γ_{taps + 13·rank + 15}·√2), bounded through ||(Σ|w|)||_F, plus LAPACK's SVD
    backward error (8·max(c_out, c_in)·u relative, through the same norm).

    On one BLAS thread: on the shared 2-core machine, threads woken for each of
    the many small SVDs made AlexNet's second convolution's cap 20 s against 1.1 s.
    """
    with BLAS_THREADS.limit(limits=1, user_api="blas"):
        return _fourier_cap(conv, FOURIER_WORK_MAX if work_max is None else work_max)


def _fourier_cap(conv: ConvMap, work_max: float) -> float:
    w = conv.weight.astype(np.float64)
    m, cg = w.shape[:2]
    kernel, rank = w.shape[2:], conv.rank
    periods = [conv.in_shape[2 + i] + conv.dilations[i] * (kernel[i] - 1) for i in range(rank)]
    axes = [np.arange(periods[0] // 2 + 1)] + [np.arange(p) for p in periods[1:]]
    freqs = math.prod(a.size for a in axes)
    if freqs * m * cg * min(m // conv.group, cg) > work_max:
        return math.inf
    grids_f = np.meshgrid(*axes, indexing="ij")
    grids_k = np.meshgrid(*[np.arange(k) for k in kernel], indexing="ij")
    turns = np.zeros((freqs, math.prod(kernel)))  # the phase in turns, Σ_i (f_i j_i d_i mod P_i)/P_i
    for i in range(rank):
        step = np.outer(grids_f[i].ravel(), grids_k[i].ravel() * conv.dilations[i])
        turns += (step % periods[i]) / periods[i]
    taps = w.reshape(conv.group * (m // conv.group) * cg, -1).T  # (taps, g·m/g·cg)
    top, chunk = 0.0, max(1, int(2e7 // max(1, m * cg)))
    for start in range(0, freqs, chunk):
        angle = 2 * np.pi * turns[start:start + chunk]
        real, imag = np.cos(angle) @ taps, np.sin(angle) @ taps
        symbol = (real - 1j * imag).reshape(-1, conv.group, m // conv.group, cg)
        top = max(top, float(np.linalg.norm(symbol, 2, axis=(-2, -1)).max()))
    sums = np.abs(w.reshape(conv.group, m // conv.group, cg, -1)).sum(axis=-1)
    frob = max(float(np.linalg.norm(b)) for b in sums)
    count = taps.shape[0] + 13 * rank + 15
    margin = (math.sqrt(2) * gamma(count, U64) + 8 * max(m, cg) * U64) * frob
    return (top + margin) * (1 + 4 * U64)


def _run(session: NodeSession, x: np.ndarray, shape, out_size: int) -> np.ndarray:
    batch = x.shape[1]
    with np.errstate(over="ignore"):  # one copy: transposed and converted at once (inf past float32)
        images = np.ascontiguousarray(x.T, dtype=session.dtype).reshape(batch, *shape[1:])
    return session(images).reshape(batch, out_size).T.astype(x.dtype, copy=False)


def conv_matrix(conv: ConvMap) -> sp.csr_matrix:
    """The convolution's exact matrix (float64), built in CSR order: row by row
    (output channel, then position), each row's columns increasing (input
    channel, then kernel offset), so no sort is needed (CIFAR-10's 25,088 ×
    28,800 conv2, 7.2M entries: 0.85 s through COO before)."""
    w = conv.weight
    m, cg = w.shape[:2]
    out_sp, in_sp, ker = conv.out_shape[2:], conv.in_shape[2:], w.shape[2:]
    rank = conv.rank
    grids = np.meshgrid(
        np.arange(m), *[np.arange(o) for o in out_sp], np.arange(cg), *[np.arange(k) for k in ker],
        indexing="ij", sparse=True,
    )
    oc, opos, ic, kpos = grids[0], grids[1:1 + rank], grids[1 + rank], grids[2 + rank:]
    channel = (oc // (m // conv.group)) * cg + ic
    valid = np.ones((), dtype=bool)
    col = channel
    for i in range(rank):
        p = opos[i] * conv.strides[i] - conv.pads[i] + kpos[i] * conv.dilations[i]
        valid = valid & (p >= 0) & (p < in_sp[i])
        col = col * in_sp[i] + p
    shape = np.broadcast_shapes(*(g.shape for g in grids))
    valid = np.broadcast_to(valid, shape)
    counts = valid.reshape(conv.out_size, -1).sum(axis=1)
    indptr = np.concatenate([[0], np.cumsum(counts)])
    values = np.broadcast_to(w.reshape(m, *([1] * rank), cg, *ker), shape)[valid]
    return sp.csr_matrix((values.astype(np.float64), np.broadcast_to(col, shape)[valid], indptr),
                         shape=(conv.out_size, conv.in_size))


class ConvTransposeMap(LinearMap):
    """A bias-free transposed convolution: the adjoint of the convolution `conv`
    that maps this map's output shape back to its input shape (same weight,
    strides, pads, dilations and groups)."""

    representation = "matrix-free"

    def __init__(self, conv: ConvMap):
        super().__init__(conv.out_shape, conv.in_shape)
        self.conv = conv

    @cached_property
    def _squared(self) -> NodeSession:
        """(Aᵀ∘Aᵀ): the transposed convolution of the squared weight."""
        conv = self.conv
        squared = ConvMap(conv.weight**2, conv.in_shape, conv.strides, conv.pads, conv.dilations,
                          conv.group)
        return squared._transpose

    def matmat(self, x):
        return self.conv.rmatmat(x)

    def rmatmat(self, u):
        return self.conv.matmat(u)

    def sq_matvec(self, d):
        d = d.reshape(-1, 1).astype(np.float64)
        return _run(self._squared, d, self.in_shape, self.out_size)[:, 0]

    unit_roundoff = U32  # onnxruntime's float32 kernels
    compute_dtype = np.dtype(np.float32)

    @property
    def fan_in(self) -> int:
        """The products summed into one output: the convolution's adjoint fan-in."""
        return self.conv.fan_out

    @cached_property
    def _absolute(self) -> ConvMap:
        conv = self.conv
        return ConvMap(np.abs(conv.weight), conv.in_shape, conv.strides, conv.pads,
                       conv.dilations, conv.group)

    def abs_matvec(self, v):
        """|Aᵀ| v = (|A|)ᵀ v: the transposed convolution of the kernel's absolute values."""
        columns = v.reshape(self.in_size, -1).astype(np.float64)
        return self._absolute.rmatmat(columns).reshape((self.out_size,) + v.shape[1:])

    def norm_cap(self) -> float:
        return self.conv.norm_cap()

    def coefficient_bound(self) -> float:
        return self.conv.coefficient_bound()  # ||Aᵀ|| = ||A||

    def coefficients_finite(self) -> bool:
        return self.conv.coefficients_finite()

    def sharp_cap(self) -> float:
        return self.conv.sharp_cap()

    def rounding(self) -> tuple[float, float]:
        forward, adjoint = self.conv.rounding()
        return adjoint, forward

    def sparse_nnz_estimate(self) -> int:
        return self.conv.sparse_nnz_estimate()

    def to_sparse(self) -> sp.csr_matrix:
        return self.conv.to_sparse().T.tocsr()


class Float64Conv(FixedMap):
    """A ConvMap's products in float64 (ConvMap.float64_matmat / float64_rmatmat),
    rounded as its CSR matrix's would be (LinearMap.rounding: float64 sums of at
    most a row's or a column's nonzeros, in any order)."""

    representation = "float64 convolution"

    def __init__(self, conv: ConvMap):
        super().__init__(conv.in_shape, conv.out_shape)
        self.conv = conv

    def matmat(self, x):
        return self.conv.float64_matmat(np.asarray(x, dtype=np.float64))

    def rmatmat(self, u):
        """Aᵀ u: through the CSR matrix where u is sparse (a few units pulled back to the
        input: their nonzeros' columns only), else per kernel offset."""
        u = np.asarray(u, dtype=np.float64)
        if np.count_nonzero(u) * SPARSE_PULL <= u.size:
            return (self._sparse.T @ sp.csc_matrix(u)).toarray()
        return self.conv.float64_rmatmat(u)

    def sq_matvec(self, d):
        return np.asarray(self._sparse.multiply(self._sparse) @ d)

    def abs_matvec(self, v):
        return np.asarray(abs(self._sparse) @ v)

    @property
    def fan_in(self) -> int:
        return self.conv.fan_in

    def coefficient_bound(self) -> float:
        return self.conv.coefficient_bound()

    def coefficients_finite(self) -> bool:
        return self.conv.coefficients_finite()

    def to_sparse(self) -> sp.csr_matrix:
        return self._sparse

    @cached_property
    def _sparse(self) -> sp.csr_matrix:
        return self.conv.to_sparse()

    def fixed_cap(self) -> float:
        return self.conv.norm_cap()

    def sparse_nnz_estimate(self) -> int:
        return self.conv.sparse_nnz_estimate()
