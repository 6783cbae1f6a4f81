"""Elementwise activations as the Lipschitz analysis sees them.

For a neuron with nominal pre-activation y0 whose pre-activation stays in
[lo, hi] ∋ y0, the local bound (Avant & Morgansen, ../shared/METHOD.md) needs
the chord slopes relative to y0,

    S = {(σ(y) − σ(y0)) / (y − y0) : y ∈ [lo, hi], y ≠ y0}  ∪  {one-sided σ'(y0)}

(the one-sided derivatives from the sides the interval extends to; both when
lo = hi). `chord_slopes` returns a sound enclosure [smin, smax] of S,
`derivative_range` a sound enclosure of every chord slope between two points of
[lo, hi] (the range of σ' on (lo, hi); both one-sided derivatives when lo = hi).

Piecewise-linear activations are exact: a chord slope is the average of the
piece slopes weighted by the lengths of the pieces between y0 and y, computed
without cancellation and widened by 16 ulps of the largest slope; an interval
inside one linear piece gets that slope exactly. Kinks that are not doubles
(HardSigmoid's −β/α) are carried as enclosures [k_lo, k_hi].

The other activations are split at their special points (inflection points,
and derivative jumps) into pieces where σ is convex, concave or linear. On a
side of y0, the piece adjacent to y0 has chord slopes monotone in y (convexity),
so its extremes are σ'(y0±) and the chord to the far end; on a piece further
away the chord slope is unimodal, its endpoint values are candidates and its
interior extremum is bounded by the tangent line at a point m found by
bisection: σ ≤ σ(m) + σ'(m)(y − m) on a concave piece (≥ on a convex one),
which holds for every m of the piece, so soundness does not depend on the
bisection, only tightness does. The result is intersected with the derivative
range (mean value theorem), which is what keeps tiny intervals tight.

Use in the local bound: for a neuron reaching [lo, hi] = y0 ∓ ε‖a_i D‖, the paper's
r_i is `max_abs_slope(y0, lo, hi)` (|chord slope| ≤ r_i, so ‖diag(s) A Δ‖ ≤ ‖diag(r) A Δ‖
even where slopes are negative), and the next block's mask D is `~constant(lo, hi)`.

Floating point: numpy/scipy do not bound the error of exp, tanh, expit, ndtr,
logaddexp. Every evaluation of σ or σ' here is assumed accurate to REL = 1e-12
relative to a magnitude `scale` (the sum of the absolute values of the terms the
formula adds, times the sensitivity to rounded arguments where it exceeds 1),
plus ABS = 1e-300 (underflow). These libraries are accurate to a few ulps
(~1e-15), so the assumption has a margin of about 1000. Every candidate is
widened by its propagated error before it enters an enclosure. Inflection
points that are not doubles (±√2, and those found by root finding) are off by
δ ≲ 1e-14; treating σ as convex/concave up to them errs by O(|σ'''| δ³), far
inside the margins.
"""

from __future__ import annotations

import itertools
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np
from scipy import special
from scipy.optimize import brentq

from .errors import OnnxlipError

REL = 1e-12  # assumed relative accuracy of one evaluation of σ or σ' (see the module docstring)
ABS = 1e-300  # absolute error floor (underflow)
_ULP = np.finfo(np.float64).eps
_PL_MARGIN = 16 * _ULP  # rounding of a weighted average of piece slopes, relative to max |slope|
_LIMIT = 1e300  # largest |pre-activation| accepted
_BISECTIONS = 32  # only tightness depends on it: the bracket shrinks to 2e-10 of the piece

Pair = tuple[np.ndarray, np.ndarray]


def _check(y0, lo, hi, order: str = "lo <= y0 <= hi") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Broadcast to float64 arrays; lo ≤ y0 ≤ hi, all finite."""
    y0, lo, hi = (np.array(a, dtype=np.float64) for a in np.broadcast_arrays(y0, lo, hi))
    for name, a in (("y0", y0), ("lo", lo), ("hi", hi)):
        if not np.all(np.abs(a) <= _LIMIT):
            raise OnnxlipError(f"activation bounds: {name} has values that are not finite or beyond "
                               f"±{_LIMIT:g} ({np.sum(~(np.abs(a) <= _LIMIT))} of {a.size})")
    bad = ~((lo <= y0) & (y0 <= hi))
    if bad.any():
        raise OnnxlipError(f"activation bounds: {order} fails at {int(bad.sum())} of {bad.size} neurons")
    return y0, lo, hi


def _check_interval(lo, hi) -> tuple[np.ndarray, np.ndarray]:
    return _check(lo, lo, hi, "lo <= hi")[1:]


def _touched(lo: np.ndarray, hi: np.ndarray, k_lo: np.ndarray, k_hi: np.ndarray) -> list[np.ndarray]:
    """Per piece j (between kinks j−1 and j, kinks enclosed in [k_lo, k_hi]), the mask of
    intervals that may meet its interior, or contain a point of it when lo = hi."""
    left = np.concatenate([[-np.inf], k_lo])
    right = np.concatenate([k_hi, [np.inf]])
    point = lo == hi
    return [((lo < r) & (hi > a)) | (point & (a <= lo) & (lo <= r)) for a, r in zip(left, right)]


class Activation(ABC):
    """An elementwise activation σ: values, chord-slope and derivative enclosures."""

    #: True when σ is continuous piecewise linear.
    is_piecewise_linear: bool = False
    #: Short name (block kinds and reports).
    name: str = "activation"

    @abstractmethod
    def value_error(self, y) -> np.ndarray:
        """A bound of |value(y) − σ(y)|, the evaluation's own rounding (for the smooth
        activations: the REL·scale + ABS this module assumes)."""

    def value_bounded(self, y, err) -> Pair:
        """(σ(y) as computed, e) with |computed − σ(y*)| ≤ e for every exact y* with
        |y* − y| ≤ err: sup |σ'| over [y − err, y + err] (derivative_range; the mean
        value theorem) times err, plus value_error(y), lifted by 4 ulps for these
        float64 operations. Sound under the module's assumption on σ's evaluation."""
        y = np.asarray(y, dtype=np.float64)
        err = np.asarray(err, dtype=np.float64)
        with np.errstate(all="ignore"):
            lo, hi = np.nextafter(y - err, -np.inf), np.nextafter(y + err, np.inf)
        dmin, dmax = self.derivative_range(lo, hi)
        slope = np.maximum(np.abs(dmin), np.abs(dmax))
        return self.value(y), (slope * err + self.value_error(y)) * (1 + 4 * _ULP)

    def kinked(self, lo, hi) -> np.ndarray:
        """Mask of intervals [lo, hi] that hold a point where σ' jumps (σ has no
        derivative there: a Jacobian tie)."""
        lo, hi = _check_interval(lo, hi)
        out = np.zeros(lo.shape, dtype=bool)
        for k in self.kinks:
            out |= (lo <= k) & (k <= hi)
        return out

    @abstractmethod
    def value(self, y) -> np.ndarray:
        """σ(y), elementwise, float64."""

    @abstractmethod
    def derivative(self, y, side: int = 1) -> np.ndarray:
        """One-sided derivative σ'(y±) (side +1: right, −1: left); equal away from kinks."""

    @abstractmethod
    def chord_slopes(self, y0, lo, hi) -> Pair:
        """Sound enclosure (smin, smax) of the chord slopes relative to y0 over [lo, hi]."""

    @abstractmethod
    def derivative_range(self, lo, hi) -> Pair:
        """Sound enclosure (dmin, dmax) of σ' on (lo, hi): every chord slope between
        two points of [lo, hi] lies in it (pairwise constants)."""

    @property
    @abstractmethod
    def kinks(self) -> np.ndarray:
        """Points where σ' jumps (sorted)."""

    @property
    @abstractmethod
    def breakpoints(self) -> np.ndarray:
        """Points where σ changes piece: kinks (both ends of their enclosures) and
        inflection points (sorted)."""

    @abstractmethod
    def stable(self, lo, hi) -> np.ndarray:
        """Mask of intervals [lo, hi] inside one linear piece: σ is affine there and the
        chord slope is exactly that piece's slope."""

    @property
    def global_lipschitz(self) -> float:
        """sup |σ'| over the real line (an upper bound)."""
        dmin, dmax = self.derivative_range(-_LIMIT, _LIMIT)
        return float(np.max(np.maximum(np.abs(dmin), np.abs(dmax))))

    def constant(self, lo, hi) -> np.ndarray:
        """Mask of intervals on which σ is constant (the neuron's output cannot change:
        the next block's input mask D is its complement)."""
        dmin, dmax = self.derivative_range(lo, hi)
        lo, hi = _check_interval(lo, hi)
        return (lo == hi) | ((dmin == 0) & (dmax == 0))

    def max_abs_slope(self, y0, lo, hi) -> np.ndarray:
        """The paper's per-neuron factor: the largest |chord slope|, max(|smin|, |smax|)."""
        smin, smax = self.chord_slopes(y0, lo, hi)
        return np.maximum(np.abs(smin), np.abs(smax))


class PiecewiseLinear(Activation):
    """A continuous piecewise-linear σ with kinks k_1 < … < k_n (each enclosed in
    [k_lo, k_hi]) and slopes c_0 … c_n (broadcastable arrays: PRelu's per-channel slopes)."""

    is_piecewise_linear = True

    def __init__(self, k_lo: Sequence[float], k_hi: Sequence[float], slopes: Sequence):
        self._k_lo = np.asarray(k_lo, dtype=np.float64).reshape(-1)
        self._k_hi = np.asarray(k_hi, dtype=np.float64).reshape(-1)
        self._slopes = [np.asarray(c, dtype=np.float64) for c in slopes]
        if len(self._slopes) != self._k_lo.size + 1 or np.any(self._k_lo > self._k_hi) \
                or np.any(self._k_hi[:-1] >= self._k_lo[1:]):
            raise ValueError("piecewise-linear activation: need sorted disjoint kinks, one slope per piece")
        self._cmax = max(float(np.max(np.abs(c))) for c in self._slopes)

    @property
    def kinks(self) -> np.ndarray:
        return 0.5 * (self._k_lo + self._k_hi)

    @property
    def breakpoints(self) -> np.ndarray:
        return np.unique(np.concatenate([self._k_lo, self._k_hi]))

    def _shape(self, *arrays) -> tuple[int, ...]:
        return np.broadcast_shapes(*(np.shape(a) for a in arrays), *(c.shape for c in self._slopes))

    def _piece_slope(self, y: np.ndarray, side: int, kinks: Sequence[float],
                     slopes: Sequence[np.ndarray] | None = None) -> np.ndarray:
        slopes = self._slopes if slopes is None else slopes
        index = sum((y >= k) if side > 0 else (y > k) for k in kinks)
        out = np.zeros(np.broadcast_shapes(y.shape, *(c.shape for c in slopes)))
        for j, c in enumerate(slopes):
            out = np.where(index == j, c, out)
        return out

    def derivative(self, y, side: int = 1) -> np.ndarray:
        return self._piece_slope(np.asarray(y, dtype=np.float64), side, self.kinks)

    @staticmethod
    def _chord(y0: np.ndarray, y: np.ndarray, kinks: Sequence[float], slopes: Sequence) -> np.ndarray:
        """Chord slope between y0 and y ≠ y0 as the length-weighted mean of piece slopes."""
        p, q = np.minimum(y0, y), np.maximum(y0, y)
        edges = [p, *(np.clip(k, p, q) for k in kinks), q]
        total = sum(c * (edges[j + 1] - edges[j]) for j, c in enumerate(slopes))
        return total / (q - p)

    def _corners(self) -> list[tuple[float, ...]]:
        return sorted(set(itertools.product(*zip(self._k_lo, self._k_hi))))

    def _hull(self, lo: np.ndarray, hi: np.ndarray) -> Pair:
        """Smallest and largest slope of the pieces [lo, hi] can touch."""
        shape = self._shape(lo, hi)
        tmin, tmax = np.full(shape, np.inf), np.full(shape, -np.inf)
        for touched, c in zip(_touched(lo, hi, self._k_lo, self._k_hi), self._slopes):
            tmin = np.where(touched, np.minimum(tmin, c), tmin)
            tmax = np.where(touched, np.maximum(tmax, c), tmax)
        return tmin, tmax

    def stable(self, lo, hi) -> np.ndarray:
        lo, hi = _check_interval(lo, hi)
        return sum(t.astype(int) for t in _touched(lo, hi, self._k_lo, self._k_hi)) == 1

    def kinked(self, lo, hi) -> np.ndarray:
        return ~self.stable(lo, hi)

    def value_error(self, y) -> np.ndarray:
        """One product by a piece slope (maxima, minima and selections are exact)."""
        return _ULP * self._cmax * np.abs(np.asarray(y, dtype=np.float64))

    def derivative_range(self, lo, hi) -> Pair:
        lo, hi = _check_interval(lo, hi)
        return self._hull(lo, hi)

    def chord_slopes(self, y0, lo, hi) -> Pair:
        y0, lo, hi = _check(y0, lo, hi)
        tmin, tmax = self._hull(lo, hi)  # equal where stable: the exact slope
        shape = tmin.shape
        tmin, tmax = tmin.reshape(-1), tmax.reshape(-1)
        todo = np.nonzero(tmin != tmax)
        if todo[0].size:
            y0, lo, hi = (np.broadcast_to(a, shape).reshape(-1)[todo] for a in (y0, lo, hi))
            slopes = [np.broadcast_to(c, shape).reshape(-1)[todo] for c in self._slopes]
            smin, smax = self._mixed(y0, lo, hi, slopes)
            margin = _PL_MARGIN * self._cmax
            low, high = tmin[todo], tmax[todo]
            tmin[todo] = np.clip(smin - margin, low, high)
            tmax[todo] = np.clip(smax + margin, low, high)
        return tmin.reshape(shape), tmax.reshape(shape)

    def _mixed(self, y0, lo, hi, slopes) -> Pair:
        """Extreme chord slopes (unwidened) over intervals that meet several pieces: at
        the ends, at the kinks, and the one-sided derivatives at y0; with each corner of
        the kinks' enclosures (the chord slope is monotone in each kink)."""
        smin, smax = np.full(y0.shape, np.inf), np.full(y0.shape, -np.inf)
        point = lo == hi
        with np.errstate(invalid="ignore", divide="ignore"):
            for kinks in self._corners():
                for side, reach in ((1, hi > y0), (-1, lo < y0)):
                    d = self._piece_slope(y0, side, kinks, slopes)
                    smin = np.where(reach | point, np.minimum(smin, d), smin)
                    smax = np.where(reach | point, np.maximum(smax, d), smax)
                for y in (lo, hi, *(np.clip(k, lo, hi) for k in kinks)):
                    valid = y != y0
                    s = self._chord(y0, np.where(valid, y, y0 + 1.0), kinks, slopes)
                    smin = np.where(valid, np.minimum(smin, s), smin)
                    smax = np.where(valid, np.maximum(smax, s), smax)
        return smin, smax


class LeakyReLU(PiecewiseLinear):
    """max(y, 0) + alpha·min(y, 0) (ONNX LeakyRelu; alpha may be negative or > 1)."""

    name = "leakyrelu"

    def __init__(self, alpha: float = 0.01):
        self.alpha = float(alpha)
        super().__init__([0.0], [0.0], [self.alpha, 1.0])

    def value(self, y) -> np.ndarray:
        y = np.asarray(y, dtype=np.float64)
        return np.where(y >= 0, y, self.alpha * y)

    def value_error(self, y) -> np.ndarray:
        """Exact for y ≥ 0, one product below."""
        y = np.asarray(y, dtype=np.float64)
        return np.where(y >= 0, 0.0, _ULP * np.abs(self.alpha * y))

    def __repr__(self) -> str:
        return f"LeakyReLU(alpha={self.alpha})"


class ReLU(LeakyReLU):
    """max(y, 0)."""

    name = "relu"

    def __init__(self):
        super().__init__(0.0)

    def value(self, y) -> np.ndarray:
        return np.maximum(np.asarray(y, dtype=np.float64), 0.0)

    def value_error(self, y) -> np.ndarray:
        return np.zeros(np.shape(y))

    def value_bounded(self, y, err) -> Pair:
        y = np.asarray(y, dtype=np.float64)
        return np.maximum(y, 0.0), relu_error(y, err)

    def __repr__(self) -> str:
        return "ReLU()"


def relu_error(x: np.ndarray, err: np.ndarray) -> np.ndarray:
    """ReLU is exact and 1-Lipschitz: errors do not grow, and vanish where x + err ≤ 0
    (computed and exact value both at most 0, both map to 0)."""
    return np.where(x + err <= 0, 0.0, err)


class PRelu(PiecewiseLinear):
    """ONNX PRelu: y for y ≥ 0, slope·y below, slope a constant array broadcastable to y."""

    name = "prelu"

    def __init__(self, slope):
        self.slope = np.asarray(slope, dtype=np.float64)
        super().__init__([0.0], [0.0], [self.slope, 1.0])

    def value(self, y) -> np.ndarray:
        y = np.asarray(y, dtype=np.float64)
        return np.where(y >= 0, y, self.slope * y)

    def value_error(self, y) -> np.ndarray:
        """Exact for y ≥ 0, one product below."""
        y = np.asarray(y, dtype=np.float64)
        return np.where(y >= 0, 0.0, _ULP * np.abs(self.slope * y))

    def __repr__(self) -> str:
        return f"PRelu(slope shape {self.slope.shape})"


class Clip(PiecewiseLinear):
    """ONNX Clip: min(max(y, low), high), either bound optional (Relu6 = Clip(0, 6),
    HardTanh = Clip(−1, 1)); constant when low ≥ high."""

    name = "clip"

    def __init__(self, low: float | None = None, high: float | None = None):
        self.low = None if low is None else float(low)
        self.high = None if high is None else float(high)
        bounds = [b for b in (self.low, self.high) if b is not None]
        if any(not math.isfinite(b) for b in bounds):
            raise OnnxlipError(f"Clip bounds must be finite, got min={low}, max={high}")
        if len(bounds) == 2 and self.low >= self.high:
            super().__init__([], [], [0.0])
        else:
            slopes = [0.0] * (self.low is not None) + [1.0] + [0.0] * (self.high is not None)
            super().__init__(bounds, bounds, slopes)

    def value(self, y) -> np.ndarray:
        y = np.asarray(y, dtype=np.float64)
        if self.low is not None:
            y = np.maximum(y, self.low)
        if self.high is not None:
            y = np.minimum(y, self.high)
        return y

    def value_error(self, y) -> np.ndarray:
        """Maxima and minima are exact."""
        return np.zeros(np.shape(y))

    def __repr__(self) -> str:
        return f"Clip(min={self.low}, max={self.high})"


def relu6() -> Clip:
    return Clip(0.0, 6.0)


def hardtanh() -> Clip:
    return Clip(-1.0, 1.0)


def _widen(x: float, ulps: int = 4) -> tuple[float, float]:
    lo = hi = float(x)
    for _ in range(ulps):
        lo, hi = np.nextafter(lo, -np.inf), np.nextafter(hi, np.inf)
    return float(lo), float(hi)


class HardSigmoid(PiecewiseLinear):
    """ONNX HardSigmoid: max(0, min(1, alpha·y + beta)). Its kinks −β/α and (1−β)/α
    are enclosed in a few ulps (they are rarely doubles)."""

    name = "hardsigmoid"

    def __init__(self, alpha: float = 0.2, beta: float = 0.5):
        self.alpha, self.beta = float(alpha), float(beta)
        if self.alpha == 0.0:
            super().__init__([], [], [0.0])
            return
        t = sorted([-self.beta / self.alpha, (1.0 - self.beta) / self.alpha])
        (a0, b0), (a1, b1) = _widen(t[0]), _widen(t[1])
        super().__init__([a0, a1], [b0, b1], [0.0, self.alpha, 0.0])

    def value(self, y) -> np.ndarray:
        return np.clip(self.alpha * np.asarray(y, dtype=np.float64) + self.beta, 0.0, 1.0)

    def value_error(self, y) -> np.ndarray:
        """A product and a sum (the clip is exact); none where the computed and the exact
        αy + β are both beyond the same end of [0, 1]."""
        t = self.alpha * np.asarray(y, dtype=np.float64)
        error = 2 * _ULP * (np.abs(t) + abs(self.beta))
        t = t + self.beta
        return np.where((t + error < 0) | (t - error > 1), 0.0, error)

    def __repr__(self) -> str:
        return f"HardSigmoid(alpha={self.alpha}, beta={self.beta})"


class PiecewiseConvex(Activation):
    """σ split at special points p_1 < … < p_n into pieces where it is convex (+1),
    concave (−1) or linear (0, with a known slope); σ' may jump at the p_i.

    Subclasses give `_eval(y)` and `_deriv(y, side)`, each returning (value, scale)
    with |computed − exact| ≤ REL·scale + ABS.
    """

    def __init__(self, points: Sequence[float], convexity: Sequence[int],
                 linear_slopes: Sequence[float | None], kinks: Sequence[float] = ()):
        self._points = np.asarray(points, dtype=np.float64).reshape(-1)
        self._convexity = list(convexity)
        self._linear = list(linear_slopes)
        self._kinks = np.asarray(kinks, dtype=np.float64).reshape(-1)
        if len(self._convexity) != self._points.size + 1 or len(self._linear) != len(self._convexity):
            raise ValueError("need one convexity sign and one linear slope entry per piece")

    @abstractmethod
    def _eval(self, y: np.ndarray) -> Pair:
        """(σ(y), error scale)."""

    @abstractmethod
    def _deriv(self, y: np.ndarray, side: int) -> Pair:
        """(σ'(y±), error scale)."""

    @property
    def kinks(self) -> np.ndarray:
        return self._kinks

    @property
    def breakpoints(self) -> np.ndarray:
        return self._points

    def value(self, y) -> np.ndarray:
        with np.errstate(all="ignore"):
            return self._eval(np.asarray(y, dtype=np.float64))[0]

    def value_error(self, y) -> np.ndarray:
        with np.errstate(all="ignore"):
            return REL * self._eval(np.asarray(y, dtype=np.float64))[1] + ABS

    def derivative(self, y, side: int = 1) -> np.ndarray:
        with np.errstate(all="ignore"):
            return self._deriv(np.asarray(y, dtype=np.float64), side)[0]

    def _linear_piece(self, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(mask of intervals inside exactly one piece that is linear, its slope)."""
        touched = _touched(lo, hi, self._points, self._points)
        count = sum(t.astype(int) for t in touched)
        mask, slope = np.zeros(lo.shape, dtype=bool), np.zeros(lo.shape)
        for t, c in zip(touched, self._linear):
            if c is not None:
                hit = t & (count == 1)
                mask |= hit
                slope = np.where(hit, c, slope)
        return mask, slope

    def stable(self, lo, hi) -> np.ndarray:
        lo, hi = _check_interval(lo, hi)
        return self._linear_piece(lo, hi)[0]

    def _deriv_bounds(self, y: np.ndarray, side: int) -> Pair:
        d, scale = self._deriv(y, side)
        margin = REL * scale + ABS
        return d - margin, d + margin

    def derivative_range(self, lo, hi) -> Pair:
        lo, hi = _check_interval(lo, hi)
        with np.errstate(all="ignore"):
            dmin, dmax = self._deriv_bounds(lo, 1)
            for y, side, mask in [(hi, -1, None)] + [
                    (np.full(lo.shape, p), s, (lo < p) & (p < hi)) for p in self._points for s in (-1, 1)]:
                if mask is not None and not mask.any():
                    continue
                a, b = self._deriv_bounds(y, side)
                keep = np.ones(lo.shape, dtype=bool) if mask is None else mask
                dmin = np.where(keep, np.minimum(dmin, a), dmin)
                dmax = np.where(keep, np.maximum(dmax, b), dmax)
        linear, slope = self._linear_piece(lo, hi)
        return np.where(linear, slope, dmin), np.where(linear, slope, dmax)

    def _chord(self, y0: np.ndarray, v0: np.ndarray, c0: np.ndarray, y: np.ndarray) -> Pair:
        """(chord slope between y0 and y ≠ y0, its error bound)."""
        v, c = self._eval(y)
        den = y - y0
        s = (v - v0) / den
        return s, (REL * (c + c0) + 2 * ABS) / np.abs(den) + REL * np.abs(s)

    def chord_slopes(self, y0, lo, hi) -> Pair:
        y0, lo, hi = _check(y0, lo, hi)
        shape = y0.shape
        y0, lo, hi = y0.reshape(-1), lo.reshape(-1), hi.reshape(-1)
        with np.errstate(all="ignore"):
            v0, c0 = self._eval(y0)
            point = lo == hi
            smin, smax = np.full(y0.shape, np.inf), np.full(y0.shape, -np.inf)
            for side, reach in ((1, hi > y0), (-1, lo < y0)):
                a, b = self._deriv_bounds(y0, side)
                smin = np.where(reach | point, np.minimum(smin, a), smin)
                smax = np.where(reach | point, np.maximum(smax, b), smax)
            for y, reach in ((lo, lo < y0), (hi, hi > y0)):
                s, m = self._chord(y0, v0, c0, np.where(reach, y, y0 + 1.0))
                smin = np.where(reach, np.minimum(smin, s - m), smin)
                smax = np.where(reach, np.maximum(smax, s + m), smax)
            # Intervals with a special point strictly inside: piece by piece.
            split = np.zeros(y0.shape, dtype=bool)
            for p in self._points:
                split |= (lo < p) & (p < hi)
            if split.any():
                idx = np.nonzero(split)
                pmin, pmax = self._split_candidates(y0[idx], v0[idx], c0[idx], lo[idx], hi[idx])
                smin[idx] = np.minimum(smin[idx], pmin)
                smax[idx] = np.maximum(smax[idx], pmax)
        dmin, dmax = self.derivative_range(lo, hi)
        smin, smax = np.maximum(smin, dmin), np.minimum(smax, dmax)
        linear, slope = self._linear_piece(lo, hi)
        return np.where(linear, slope, smin).reshape(shape), np.where(linear, slope, smax).reshape(shape)

    def _split_candidates(self, y0, v0, c0, lo, hi) -> Pair:
        """Candidates from every piece of each side of y0 (the adjacent pieces' far ends,
        the further pieces' endpoints and tangent bounds)."""
        smin, smax = np.full(y0.shape, np.inf), np.full(y0.shape, -np.inf)
        edges = np.concatenate([[-np.inf], self._points, [np.inf]])
        for j, kappa in enumerate(self._convexity):
            left, right = edges[j], edges[j + 1]
            for side in (1, -1):
                if side > 0:
                    a, b = np.maximum(y0, left), np.minimum(hi, right)
                    near, far = a, b
                else:
                    a, b = np.maximum(lo, left), np.minimum(y0, right)
                    near, far = b, a
                valid = a < b
                further = valid & (near != y0)
                for y, mask in ((far, valid), (near, further)):
                    s, m = self._chord(y0, v0, c0, np.where(mask, y, y0 + 1.0))
                    smin = np.where(mask, np.minimum(smin, s - m), smin)
                    smax = np.where(mask, np.maximum(smax, s + m), smax)
                if kappa != 0 and further.any():
                    i = np.nonzero(further)
                    bound = self._tangent_bound(y0[i], v0[i], c0[i], a[i], b[i], kappa * side)
                    if kappa * side > 0:
                        smin[i] = np.minimum(smin[i], bound)
                    else:
                        smax[i] = np.maximum(smax[i], bound)
        return smin, smax

    def _tangent_bound(self, y0, v0, c0, a, b, direction: int) -> np.ndarray:
        """Bound of the chord slope over [a, b] (one piece, y0 outside): a lower bound if
        direction > 0 (σ convex right of y0 or concave left of it), else an upper bound.

        The chord slope's extremum sits where the tangent passes through (y0, σ(y0)), the
        root of g(y) = σ'(y)(y − y0) − (σ(y) − σ(y0)), which is monotone on the piece
        (g' = σ''·(y − y0)); bisection finds it, and the tangent line at that point bounds
        σ on the whole piece whatever the point.
        """
        left, right = a.copy(), b.copy()
        for _ in range(_BISECTIONS):
            mid = 0.5 * (left + right)
            g = self._deriv(mid, 1)[0] * (mid - y0) - (self._eval(mid)[0] - v0)
            go_right = (g < 0) if direction > 0 else (g > 0)
            left, right = np.where(go_right, mid, left), np.where(go_right, right, mid)
        m = np.clip(0.5 * (left + right), a, b)
        s_m, e_s = self._chord(y0, v0, c0, m)
        d_m, c_d = self._deriv(m, np.where(m == b, -1, 1))
        e_d = REL * c_d + ABS
        bounds = []
        for y in (a, b):
            f = (y - m) / (y - y0)
            h = s_m + (d_m - s_m) * f
            err = e_s + (e_d + e_s) * np.abs(f) + REL * (np.abs(s_m) + np.abs((d_m - s_m) * f))
            bounds.append(h - err if direction > 0 else h + err)
        return np.minimum(*bounds) if direction > 0 else np.maximum(*bounds)


def _side_is_right(y: np.ndarray, at: float, side) -> np.ndarray:
    """Whether the one-sided derivative at y uses the piece right of the point `at`."""
    return (y > at) | ((y == at) & (np.asarray(side) > 0))


class Sigmoid(PiecewiseConvex):
    """1 / (1 + e^−y): convex below 0, concave above."""

    name = "sigmoid"

    def __init__(self):
        super().__init__([0.0], [1, -1], [None, None])

    def _eval(self, y):
        v = special.expit(y)
        return v, v

    def _deriv(self, y, side):
        d = special.expit(y) * special.expit(-y)
        return d, d

    def __repr__(self) -> str:
        return "Sigmoid()"


class Tanh(PiecewiseConvex):
    """tanh(y): convex below 0, concave above."""

    name = "tanh"

    def __init__(self):
        super().__init__([0.0], [1, -1], [None, None])

    def _eval(self, y):
        v = np.tanh(y)
        return v, np.abs(v)

    def _deriv(self, y, side):
        e = np.exp(-2.0 * np.abs(y))
        d = 4.0 * e / (1.0 + e) ** 2  # sech², no cancellation
        return d, d

    def __repr__(self) -> str:
        return "Tanh()"


class Softplus(PiecewiseConvex):
    """log(1 + e^y): convex."""

    name = "softplus"

    def __init__(self):
        super().__init__([], [1], [None])

    def _eval(self, y):
        v = np.logaddexp(0.0, y)
        return v, v

    def _deriv(self, y, side):
        d = special.expit(y)
        return d, d

    def __repr__(self) -> str:
        return "Softplus()"


class ELU(PiecewiseConvex):
    """ONNX Elu: y for y ≥ 0, alpha·(e^y − 1) below; a kink at 0 unless alpha = 1.
    Convex below 0 for alpha > 0, concave for alpha < 0 (negative slopes)."""

    name = "elu"

    def __init__(self, alpha: float = 1.0):
        self.alpha = float(alpha)
        below = int(np.sign(self.alpha))
        super().__init__([0.0], [below, 0], [0.0 if below == 0 else None, 1.0],
                         kinks=[] if self.alpha == 1.0 else [0.0])

    def _eval(self, y):
        v = np.where(y > 0, y, self.alpha * np.expm1(np.minimum(y, 0.0)))
        return v, np.abs(v)

    def _deriv(self, y, side):
        d = np.where(_side_is_right(y, 0.0, side), 1.0, self.alpha * np.exp(np.minimum(y, 0.0)))
        return d, np.abs(d)

    def __repr__(self) -> str:
        return f"ELU(alpha={self.alpha})"


_SQRT_2_PI = math.sqrt(2.0 / math.pi)
_KAPPA = 0.044715
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _tanh_gelu_parts(y: np.ndarray):
    """u = √(2/π)(y + κy³) (argument clipped where σ is already saturated), E = expit(2u),
    1 − E (both from one exp, without cancellation), u'."""
    yc = np.clip(y, -1e3, 1e3)
    y2 = yc * yc
    u = _SQRT_2_PI * (yc + _KAPPA * y2 * yc)
    t = np.exp(-2.0 * np.abs(u))
    big = 1.0 / (1.0 + t)
    small = t * big
    positive = u >= 0
    return yc, u, np.where(positive, big, small), np.where(positive, small, big), \
        _SQRT_2_PI * (1.0 + 3.0 * _KAPPA * y2)


def _tanh_gelu_curvature(x: float) -> float:
    """σ''(x)/(E(1−E)) for the tanh GELU: its sign is the convexity."""
    _, u, e, _, du = _tanh_gelu_parts(np.float64(x))
    return float(4.0 * du + 4.0 * x * du**2 * (1.0 - 2.0 * e) + 2.0 * x * 6.0 * _SQRT_2_PI * _KAPPA * x)


_TANH_GELU_INFLECTION = brentq(_tanh_gelu_curvature, 0.5, 3.0, xtol=1e-15, rtol=1e-15)
_SILU_INFLECTION = brentq(lambda x: 2.0 - x * math.tanh(x / 2.0), 1.0, 4.0, xtol=1e-15, rtol=1e-15)


class GELU(PiecewiseConvex):
    """y·Φ(y) (approximate='none') or 0.5·y·(1 + tanh(√(2/π)(y + 0.044715·y³)))
    (approximate='tanh'). Concave outside its inflection points ±c, convex between;
    σ' < 0 left of its minimum near −0.75."""

    name = "gelu"

    def __init__(self, approximate: str = "none"):
        if approximate not in ("none", "tanh"):
            raise OnnxlipError(f"GELU approximate must be 'none' or 'tanh', got {approximate!r}")
        self.approximate = approximate
        c = math.sqrt(2.0) if approximate == "none" else _TANH_GELU_INFLECTION
        super().__init__([-c, c], [-1, 1, -1], [None, None, None])

    def _eval(self, y):
        if self.approximate == "none":
            yc = np.clip(y, -60.0, 60.0)
            phi = _INV_SQRT_2PI * np.exp(-0.5 * yc * yc)
            v = y * special.ndtr(y)
            return v, np.abs(v) + (1.0 + yc * yc) * np.abs(yc) * phi
        _, u, e, em, _ = _tanh_gelu_parts(y)
        v = y * e  # 0.5·(1 + tanh(u)) = expit(2u): no cancellation
        return v, np.abs(v) * (1.0 + 2.0 * np.abs(u) * em)

    def _deriv(self, y, side):
        if self.approximate == "none":
            yc = np.clip(y, -60.0, 60.0)
            phi = _INV_SQRT_2PI * np.exp(-0.5 * yc * yc)
            big = special.ndtr(y)
            return big + yc * phi, big + (2.0 + yc * yc) * (1.0 + np.abs(yc)) * phi
        yc, u, e, em, du = _tanh_gelu_parts(y)
        t = 2.0 * yc * e * em * du
        return e + t, e * (1.0 + 2.0 * np.abs(u) * em) + np.abs(t) * (1.0 + 2.0 * np.abs(u))

    def __repr__(self) -> str:
        return f"GELU(approximate={self.approximate!r})"


class SiLU(PiecewiseConvex):
    """y·sigmoid(y) (SiLU, Swish with β = 1). Concave outside ±2.3994, convex between;
    σ' < 0 left of its minimum near −1.278."""

    name = "silu"

    def __init__(self):
        c = _SILU_INFLECTION
        super().__init__([-c, c], [-1, 1, -1], [None, None, None])

    def _eval(self, y):
        v = y * special.expit(y)
        return v, np.abs(v)

    def _deriv(self, y, side):
        e = special.expit(y)
        t = y * e * special.expit(-y)
        return e + t, e + np.abs(t)

    def __repr__(self) -> str:
        return "SiLU()"


class HardSwish(PiecewiseConvex):
    """ONNX HardSwish: y·max(0, min(1, y/6 + 1/2)): 0 below −3, y above 3, y(y+3)/6
    between (convex); σ' jumps at ±3 (0 → −1/2 and 3/2 → 1)."""

    name = "hardswish"

    def __init__(self):
        super().__init__([-3.0, 3.0], [0, 1, 0], [0.0, None, 1.0], kinks=[-3.0, 3.0])

    def _eval(self, y):
        v = np.where(y <= -3.0, 0.0, np.where(y >= 3.0, y, y * (y + 3.0) / 6.0))
        return v, np.abs(v)

    def _deriv(self, y, side):
        above = _side_is_right(y, 3.0, side)
        below = ~_side_is_right(y, -3.0, side)
        mid = (2.0 * y + 3.0) / 6.0
        d = np.where(above, 1.0, np.where(below, 0.0, mid))
        return d, np.where(above | below, np.abs(d), np.abs(y) / 3.0 + 0.5)

    def __repr__(self) -> str:
        return "HardSwish()"
