"""Certified spectral norms of matrix-free operators: Lanczos from a random start.

σ_max(M)² = λ_max(B) for the Gram operator B = MᵀM (or MMᵀ, the smaller side).
No deterministic Krylov method can bound λ_max from above: a start vector
orthogonal to the top eigenvector never sees it (Kuczyński & Woźniakowski 1992).
With a start drawn uniformly on the unit sphere it can, with a stated failure
probability δ. Each solve draws its start from the run's seed (128 bits from
the OS unless given: `Solver.seed`, recorded in every result so that a run
replays exactly) and turns the top Ritz value θ_k after k steps into an upper
bound of λ_max that holds with probability ≥ 1 − δ, by the smaller of two
published bounds, each at δ/2:

* Kuczyński & Woźniakowski, "Estimating the largest eigenvalue by the power
  and Lanczos algorithms with a random start", SIAM J. Matrix Anal. Appl.
  13(4):1094-1122, 1992 (abstract: the probabilistic failure of Lanczos is "at
  most √n·e^{−(2k−1)√ε}" up to a constant; their Theorem 4.2 gives the constant
  1.648 ≈ √e, which we could not check against the paper's text (only its
  abstract, SIAM's and technical report CUCS-465-89's, which state the form
  without the constant) and round up to KW_CONSTANT = 2 ≥ 1.648): for a
  symmetric positive (semi-)definite n×n matrix,
  P[θ_k < (1 − ε)λ_max] ≤ C·√n·e^{−√ε(2k−1)}. Inverted: with
  ε_k = (ln(C√n/δ)/(2k−1))², λ_max ≤ θ_k/(1 − ε_k). Worst case over spectra.
  Their k counts matrix-vector products ([b, Ab, …, A^k b]); in case it means
  a Krylov space of dimension k + 1, the bound is applied with k − 1 for our
  dimension-k space (θ_k ≥ θ_{k−1}: one step of insurance). Their probability
  is for one k fixed in advance, not for a step chosen by looking at the
  results (the stopping step: the failure events of different k need not
  nest), so KW is evaluated only at the steps of a fixed geometric schedule
  (kw_steps), its share of δ split evenly among them (a union bound). The
  schedule starts at the first step where KW's inflation could be within the
  tolerance (kw_first_step: from n, δ, tol and max_iter alone, so still fixed in
  advance; ~350 for n = 10^5, δ = 1e-9, tol = 1e-3) and ends at max_iter: 6
  steps there instead of 22 from step 8, whose bounds were too loose to stop on.
* van Dorsselaer, Hochstenbach & van der Vorst, "Computing probabilistic bounds
  for extreme eigenvalues of symmetric matrices with the Lanczos method", SIAM
  J. Matrix Anal. Appl. 22(3), 2000 (the "Lanczos polynomial" bound): with
  c₁ the start's component on the top eigenvector, c₁² ~ Beta(1/2, (n−1)/2),
  so |c₁| ≥ t_δ with probability 1 − δ (t_δ² its δ-quantile, scipy's
  betaincinv). Their bound: for χ the characteristic polynomial of T_{k−1},
  |c₁χ(λ_max)| ≤ ||χ(B)b|| = β₁⋯β_{k−1}. We use every Lanczos polynomial at
  once (q_i with v_{i+1} = q_i(B)b, q_{k−1} = χ/(β₁⋯β_{k−1})): c₁²Σ_{i≤k} q_i(λ_max)² ≤ 1
  (_christoffel), so λ_max is at most the λ ≥ θ_k where the sum reaches 1/t_δ²:
  never above theirs (the sum holds their term), and one step further (q_k uses
  β_k). Adapts to the actual spectrum (tight after a gap), where KW covers every
  spectrum. It holds at every step at once (on the one event |c₁| ≥ t_δ), so the
  stopping step may depend on the results.

The solve stops when the certified bound is within `tol` of the Ritz value
sqrt(θ_k), which is below the true norm: the reported bound is then at most
(1 + tol)·σ_max. A deterministic cap (an upper bound proven otherwise: the
convolution's Fourier symbol, a dense SVD, a Frobenius norm) takes over when it
is lower, and then the result is deterministic. At max_iter the looser
certified value is returned (`converged` False), never an uncertified one.
When the Krylov space is exhausted (β_k ≈ 0), θ_k is λ_max itself for almost
every start (the start has a component on every eigenvector), plus β_k.

Arithmetic. The probabilities are for exact arithmetic. Where the Lanczos basis
fits `Solver.basis_bytes` (n·8·256 bytes: 125,000 entries at the default 256 MB)
it is kept in float64 and every vector is reorthogonalized against all the
others (twice when needed), which keeps the computed T_k that of an exact
Lanczos process on a matrix within a few units of roundoff of B (Paige); a
relative slack RITZ_SLACK is added for this. Beyond the budget (VGG16's
activations) only the three-term recurrence is run, with local
reorthogonalization, and only the polynomial bound is used: under Greenbaum's
model (Linear Algebra Appl. 113, 1989) finite-precision Lanczos is exact
Lanczos on a larger matrix whose eigenvalues lie in intervals of width
O(u·||B||) around B's, with the start's weight on each interval equal to its
component, so the bound holds up to that width (covered by RITZ_SLACK). This is
the assumption made for long vectors. Products that round (onnxruntime's float32
kernels) are covered by `error` = (c₁, c₀), a proven bound
||B̃ − B|| ≤ c₁·σ + c₀ for the computed Gram operator B̃ (σ the true norm: the
products' errors are carried through the map itself), assuming that the
computed products act as one fixed operator B̃: λ_max(B) ≤ λ_max(B̃) + ||B − B̃||
gives σ² ≤ λ + c₁σ + c₀ for the certified λ, so σ ≤ (c₁ + sqrt(c₁² + 4(λ + c₀)))/2.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field, replace

import numpy as np
from scipy.linalg import eigh, eigh_tridiagonal, eigvalsh_tridiagonal
from scipy.linalg.blas import daxpy, dgemv
from scipy.optimize import brentq
from scipy.special import betaincinv

Apply = Callable[[np.ndarray], np.ndarray]

#: Kuczyński-Woźniakowski's constant (1.648 in their Theorem 4.2), rounded up.
KW_CONSTANT = 2.0
#: Relative slack on every certified eigenvalue for the arithmetic of Lanczos itself.
RITZ_SLACK = 1e-10
#: β_k below this fraction of θ_k: the Krylov space is exhausted (invariant).
EXHAUSTED = 1e-10
#: Lanczos vectors the full basis must have room for within the memory budget.
BASIS_STEPS = 256


#: Defaults of Solver (and of load and the CLI).
DEFAULT_TOL = 1e-3
DEFAULT_DELTA = 1e-9


def fresh_seed() -> int:
    """128 bits of entropy from the operating system."""
    return int(np.random.SeedSequence().entropy)


@dataclass(frozen=True)
class Solver:
    """How spectral norms are certified.

    tol: stop when the certified upper bound is within this factor of the Ritz
    value (a lower bound): the bound is then ≤ (1 + tol)·σ_max. delta: failure
    probability of each probabilistic solve. seed: the run's seed (fresh from
    the OS unless given); every start vector derives from it and the solve's
    key. basis_bytes: memory for the full Lanczos basis. salt: bumped to
    re-solve with fresh starts.
    """

    tol: float = DEFAULT_TOL
    delta: float = DEFAULT_DELTA
    seed: int = field(default_factory=fresh_seed)
    basis_bytes: float = 256e6
    max_iter: int = 1000
    salt: int = 0

    def generator(self, key: Hashable) -> np.random.Generator:
        """The random stream of one solve: from the seed, the salt and the key."""
        digest = int.from_bytes(hashlib.blake2b(repr(key).encode(), digest_size=8).digest(), "big")
        return np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(self.salt, digest)))

    def retry(self) -> Solver:
        """Fresh starts and a tighter stopping rule (for a suspected failure)."""
        return replace(self, salt=self.salt + 1, tol=self.tol / 4, max_iter=2 * self.max_iter)


@dataclass
class SpectralNorm:
    """σ_max of an operator, with its guarantee and what the solver did."""

    value: float  # upper bound (a lower one, the Ritz value, for upper=False)
    iterations: int
    residual: float = 0.0  # ||B v − θ v|| / θ of the top Ritz pair (θ, v): a diagnostic
    converged: bool = True
    vector: np.ndarray | None = None  # top Ritz vector of the Gram operator
    ritz: float = 0.0  # sqrt(θ): at most the norm (up to rounding)
    guarantee: str = "deterministic"  # or "probabilistic": holds with probability ≥ 1 − delta
    delta: float = 0.0
    seed: int | None = None


def spectral_norm(forward: Apply, adjoint: Apply, n_in: int, n_out: int,
                  solver: Solver | None = None, key: Hashable = 0, **options) -> SpectralNorm:
    """||M|| for M given by forward (M x) and adjoint (Mᵀ u) on 1-D vectors,
    on the smaller of MᵀM and MMᵀ (options: see gram_norm)."""
    if n_out < n_in:
        return gram_norm(lambda u: forward(adjoint(u)), n_out, solver, key, **options)
    return gram_norm(lambda x: adjoint(forward(x)), n_in, solver, key, **options)


def gram_norm(gram: Apply, n: int, solver: Solver | None = None, key: Hashable = 0,
              mask: np.ndarray | None = None, want_vector: bool = False, upper: bool = True,
              cap: float = math.inf, error: tuple[float, float] = (0.0, 0.0)) -> SpectralNorm:
    """sqrt(λ_max) of a Gram operator B = MᵀM on vectors of length n.

    mask (0/1): B's range lies in its span; the start is uniform on that
    subspace's sphere, whose dimension enters the bounds, and a full Lanczos
    basis is held on its support only. cap: a proven upper
    bound of the norm. error: (c₁, c₀) with ||B̃ − B|| ≤ c₁·σ + c₀ for the computed B̃.
    upper=False (lower bounds): stop when the Ritz value has settled to
    solver.tol and report it.
    """
    solver = solver or Solver()
    dim = n if mask is None else int(np.count_nonzero(mask))
    if dim == 0:
        return SpectralNorm(0.0, 0)
    v = solver.generator(key).standard_normal(n)
    full = want_vector or n * 8 * BASIS_STEPS <= solver.basis_bytes
    support = None
    if full and mask is not None and dim < n:  # the stored basis on the mask's support only
        support = np.flatnonzero(mask)
        v, gram = v[support], _on_support(gram, support, n)
    elif mask is not None:
        v = v * (mask != 0)
    certify = _Certificate(dim, solver.delta, full, solver.max_iter, solver.tol) if upper else None
    result = _lanczos(gram, v, solver, full, certify, cap, error)
    if support is not None and result.vector is not None:
        vector = np.zeros(n)
        vector[support] = result.vector
        result.vector = vector
    result.seed = solver.seed
    return result


def _on_support(gram: Apply, support: np.ndarray, n: int) -> Apply:
    """The Gram operator on the coordinates `support` (B's range lies in their span, so
    B is P B P there): the same Lanczos process, its vectors (the basis that full
    reorthogonalization reads at every step) shorter by the masked-out entries."""
    def restricted(z: np.ndarray) -> np.ndarray:
        x = np.zeros(n)
        x[support] = z
        return gram(x)[support]
    return restricted


def kw_steps(max_iter: int, first: int = 8) -> frozenset[int]:
    """The steps (fixed in advance) where the KW bound is evaluated: ⌈first·1.25^j⌉ up
    to max_iter, and max_iter itself (the last step a solve can report), at most 25%
    past any step where it would first have stopped the solve."""
    steps, j = {max_iter}, 0
    while (k := math.ceil(first * 1.25**j)) <= max_iter:
        steps.add(k)
        j += 1
    return frozenset(steps)


def kw_first_step(dim: int, share: float, tol: float, max_iter: int) -> int:
    """The first step where KW could stop a solve to `tol`: its inflation 1/(1 − ε_k)
    of the Ritz value must be within (1 + tol)², i.e. ε_k ≤ 1 − (1 + tol)^−2. Before
    it KW only gives bounds too loose to stop on, so the schedule starts there (fixed
    from dim, δ, tol and max_iter, before the solve: the probability still holds)
    and its δ share is split among fewer steps. The count used here is that of the
    longest schedule (from step 8), an over-estimate: a later start stays valid."""
    log = math.log(KW_CONSTANT * math.sqrt(dim) * len(kw_steps(max_iter)) / share)
    eps = 1 - (1 + tol) ** -2
    return max(8, min(max_iter, math.floor((log / math.sqrt(eps) + 3) / 2)))


class _Certificate:
    """Upper bounds of λ_max from the Lanczos coefficients, each holding with
    probability ≥ 1 − δ over the random start (see the module docstring)."""

    def __init__(self, dim: int, delta: float, full: bool, max_iter: int, tol: float = DEFAULT_TOL):
        self.dim, self.delta = dim, delta
        self.use_kw = full  # KW needs the exact-arithmetic process: full reorthogonalization
        share = delta / 2 if full else delta
        self.kw_steps = kw_steps(max_iter, kw_first_step(dim, share, tol, max_iter))
        self.kw_log = math.log(KW_CONSTANT * math.sqrt(dim) * len(self.kw_steps) / share)
        # |c₁| ≥ t with probability 1 − share: t² is Beta(1/2, (dim−1)/2)'s share-quantile.
        self.log_t = 0.0 if dim == 1 else 0.5 * math.log(float(betaincinv(0.5, (dim - 1) / 2, share)))

    def bound(self, theta: float, alphas: list[float], betas: list[float],
              within: float = math.inf) -> float:
        """The smaller certified upper bound of λ_max after k = len(alphas) steps
        (theta: T_k's top eigenvalue; betas: β₁..β_k), or inf where neither is at
        most `within` (the solve goes on: the polynomial bound's root is only
        sought where it is known to be below `within`)."""
        k = len(alphas)
        best = math.inf
        if self.use_kw and k in self.kw_steps:
            eps = (self.kw_log / (2 * k - 3)) ** 2  # KW at k − 1 (module docstring)
            if eps < 1:
                best = theta / (1 - eps)
        if best > within:
            best = math.inf
        poly = self._polynomial(theta, alphas, betas, min(best, within))
        return min(best, poly)

    #: Relative safety on the computed Σ q_i(λ)² (the recurrence's rounding, ~k·u).
    SUM_SAFETY = 1e-6

    def _polynomial(self, theta: float, alphas: list[float], betas: list[float],
                    within: float) -> float:
        """The λ ≥ θ where Σ_{i≤m} q_i(λ)² = 1/t² (m: steps with β_i > 0), if at most
        `within` (else inf). Why it bounds λ_max: see _christoffel."""
        m = next((i for i, b in enumerate(betas) if not b > 0), len(betas))
        if m == 0:
            return math.inf
        target = -2 * self.log_t + self.SUM_SAFETY

        def excess(lam: float) -> float:  # increasing on [θ, ∞)
            return _christoffel(lam, alphas, betas, m) - target

        top = max(theta, 0.0)
        if excess(top) >= 0:  # λ_max ≥ θ (a Ritz value) and ≤ θ: it is θ
            return top * (1 + 1e-12)
        if math.isfinite(within):
            if within <= top or excess(within) < 0:
                return math.inf
            high = within
        else:
            gap = max(abs(top), float(max(betas[:m])), 1e-300)
            while excess(top + gap) < 0:
                gap *= 2
                if not np.isfinite(top + gap):
                    return math.inf
            high = top + gap
        root = brentq(excess, top, high, xtol=1e-15 * max(abs(top), 1e-300), rtol=1e-13)
        return root * (1 + 1e-12)


def _christoffel(lam: float, alphas: list[float], betas: list[float], m: int) -> float:
    """log Σ_{i=0}^{m} q_i(λ)², the Lanczos polynomials at λ: q₀ = 1,
    β_i q_i = (λ − α_i) q_{i−1} − β_{i−1} q_{i−2}, so that v_{i+1} = q_i(B) v₁.

    The bound (van Dorsselaer, Hochstenbach & van der Vorst's, with every Lanczos
    vector instead of the last one): for p = Σ a_i q_i, p(B)v₁ = Σ a_i v_{i+1} has
    norm ||a|| and component c₁ p(λ_max) on the top eigenvector, so
    |c₁ p(λ_max)| ≤ ||a||; a_i = q_i(λ_max) gives c₁² Σ q_i(λ_max)² ≤ 1. Each q_i
    (i ≤ m) is positive and increasing above its largest zero, T_i's top Ritz value
    ≤ θ = T_k's: with |c₁| ≥ t, λ_max ≤ the λ ≥ θ where the sum reaches 1/t².
    Above the spectrum the recurrence is the dominant solution (forward-stable);
    scaled against overflow, an underflowed term only makes the sum (and the
    bound) more conservative."""
    previous, current, total, shift = 0.0, 1.0, 1.0, 0.0
    for i in range(m):
        after = ((lam - alphas[i]) * current - (betas[i - 1] * previous if i else 0.0)) / betas[i]
        previous, current = current, after
        total += current * current
        if abs(current) > 1e150:
            previous, current, total, shift = previous * 1e-150, current * 1e-150, total * 1e-300, shift + 1
    return math.log(total) + shift * 300 * math.log(10)


def _lanczos(gram: Apply, v: np.ndarray, solver: Solver, full: bool,
             certify: _Certificate | None, cap: float, error: tuple[float, float]) -> SpectralNorm:
    """Lanczos on a symmetric positive semi-definite operator, until certified."""
    norm = np.linalg.norm(v)
    basis = _Basis(v / norm) if full else _RecentBasis(v / norm)
    alphas: list[float] = []
    betas: list[float] = []
    theta, settled = 0.0, 0
    for step in range(1, solver.max_iter + 1):
        w = gram(basis.last)
        alphas.append(float(basis.last @ w))
        w = basis.orthogonalize(w)
        beta = float(np.linalg.norm(w))
        if certify is None:  # the top Ritz vector at every step, for its residual
            values, vectors = _ritz(alphas, betas)
            residual = abs(beta * vectors[-1, -1]) / max(float(values[-1]), 1e-300)
            new_theta = max(float(values[-1]), 0.0)
        else:
            new_theta = max(_top_ritz(alphas, betas), 0.0)
        settled = settled + 1 if new_theta - theta <= solver.tol * new_theta else 0
        theta = new_theta
        ritz = math.sqrt(theta)
        exhausted = beta <= EXHAUSTED * max(theta, 1e-300) or (full and step >= v.size)
        if certify is None:  # a lower bound: the settled Ritz value
            if (settled >= 3 and residual <= 1e-2) or residual <= solver.tol or exhausted:
                return SpectralNorm(ritz, step, residual, True, basis.combine(vectors[:, -1]), ritz)
        else:
            floor = _with_rounding(theta, error)  # the rounding margin is there whatever the step
            # The largest λ whose value (below) is within the tolerance of the floor:
            # the certificate seeks its bound only where it is at most that.
            within = _without_rounding((1 + solver.tol) * floor, error) / (1 + RITZ_SLACK)
            lam = certify.bound(theta, alphas, betas + [beta], within)
            if exhausted:
                lam = min(lam, theta + beta)
            if lam <= within or exhausted or cap <= (1 + solver.tol) * floor:
                value = _with_rounding(lam * (1 + RITZ_SLACK), error) if np.isfinite(lam) else math.inf
                return _result(value, cap, step, True, basis, alphas, betas, beta, certify)
        if beta == 0.0:
            break
        betas.append(beta)
        basis.append(w, beta)
    if certify is None:
        return SpectralNorm(math.sqrt(theta), step, residual, False,
                            basis.combine(_padded(vectors[:, -1], basis)), math.sqrt(theta))
    lam = certify.bound(theta, alphas, betas)  # betas: β₁..β_k (β_k appended above)
    value = _with_rounding(lam * (1 + RITZ_SLACK), error) if np.isfinite(lam) else math.inf
    return _result(value, cap, step, False, basis, alphas, betas[: len(alphas) - 1], beta, certify)


def _with_rounding(lam: float, error: tuple[float, float]) -> float:
    """The largest σ with σ² ≤ lam + c₁σ + c₀."""
    c1, c0 = error
    return (c1 + math.sqrt(c1 * c1 + 4 * (lam + c0))) / 2


def _without_rounding(sigma: float, error: tuple[float, float]) -> float:
    """The λ with _with_rounding(λ, error) = σ: σ² − c₁σ − c₀."""
    c1, c0 = error
    return sigma * sigma - c1 * sigma - c0


def _result(value, cap, step, converged, basis, alphas, betas, beta, certify) -> SpectralNorm:
    """The certified value (or the cap, where lower), with the top Ritz pair of T_k
    (betas: its k − 1 off-diagonal coefficients; beta: β_k, for the residual)."""
    values, vectors = _ritz(alphas, betas)
    theta = max(float(values[-1]), 0.0)
    residual = abs(beta * vectors[-1, -1]) / theta if theta > 0 else 0.0
    vector, ritz = basis.combine(_padded(vectors[:, -1], basis)), math.sqrt(theta)
    if cap <= value:
        return SpectralNorm(cap, step, residual, True, vector, ritz)
    return SpectralNorm(value, step, residual, converged, vector, ritz, "probabilistic",
                        certify.delta)


def _padded(coefficients: np.ndarray, basis) -> np.ndarray:
    """Ritz coefficients over the whole basis (one vector longer after the last step)."""
    extra = basis.size - coefficients.size
    return np.concatenate([coefficients, np.zeros(extra)]) if extra > 0 else coefficients


class _Basis:
    """The Lanczos vectors, stored as rows of one preallocated array: room for
    BASIS_STEPS rows from the start (up to 256 MB: the budget the full basis is
    granted for; untouched pages cost nothing), doubled when a solve needs more. Growing
    it by doubling from 16 rows cost 0.7 s of AlexNet's local bound in copies."""

    def __init__(self, first: np.ndarray):
        rows = min(BASIS_STEPS, max(16, int(BASIS_STEPS * 125_000 // first.size)))  # ≤ 256 MB
        self._rows = np.empty((rows, first.size))
        self._rows[0] = first
        self._count = 1

    @property
    def last(self) -> np.ndarray:
        return self._rows[self._count - 1]

    @property
    def size(self) -> int:
        return self._count

    def append(self, w: np.ndarray, beta: float) -> None:
        """Appends w / beta."""
        if self._count == len(self._rows):
            self._rows = np.concatenate([self._rows, np.empty_like(self._rows)])
        np.divide(w, beta, out=self._rows[self._count])
        self._count += 1

    def combine(self, coefficients: np.ndarray) -> np.ndarray:
        return self._rows[: self._count].T @ coefficients

    def orthogonalize(self, w: np.ndarray) -> np.ndarray:
        """Full reorthogonalization: the three-term recurrence against the last two
        vectors first, then classical Gram-Schmidt against the whole basis,
        repeated once when it cancelled most of w (Kahan's "twice is enough")."""
        w = np.array(w, dtype=np.float64)  # a copy: updated in place below
        for i in range(max(self._count - 2, 0), self._count):
            w = daxpy(self._rows[i], w, a=-float(self._rows[i] @ w))
        rows = self._rows[: self._count]
        for _ in range(2):
            before = np.linalg.norm(w)
            # w −= rowsᵀ (rows w), in place (rows.T is Fortran-ordered: no copy)
            w = dgemv(-1.0, rows.T, rows @ w, beta=1.0, y=w, overwrite_y=1)
            if np.linalg.norm(w) >= 0.7 * before:
                break
        return w


class _RecentBasis:
    """The last two Lanczos vectors only (local reorthogonalization), in float64."""

    size = 0  # keeps no basis

    def __init__(self, first: np.ndarray):
        self._previous: np.ndarray | None = None
        self.last = first

    def append(self, w: np.ndarray, beta: float) -> None:
        w /= beta  # w is orthogonalize's own array
        self._previous, self.last = self.last, w

    def combine(self, coefficients: np.ndarray) -> None:
        return None

    def orthogonalize(self, w: np.ndarray) -> np.ndarray:
        w = np.array(w, dtype=np.float64)  # a copy: updated in place below
        for q in (self.last, self._previous):
            if q is not None:
                w = daxpy(q, w, a=-float(q @ w))
        return w


def _top_ritz(alphas: list[float], betas: list[float]) -> float:
    """The largest eigenvalue of the k×k tridiagonal matrix (bisection)."""
    k = len(alphas)
    if k == 1:
        return alphas[0]
    return float(eigvalsh_tridiagonal(np.array(alphas), np.array(betas[: k - 1]),
                                      select="i", select_range=(k - 1, k - 1))[0])


def _ritz(alphas: list[float], betas: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """The largest Ritz value and its eigenvector of the tridiagonal matrix."""
    k = len(alphas)
    if k == 1:  # a 1x1 matrix; scipy < 1.13 refuses the empty off-diagonal
        return np.array(alphas), np.ones((1, 1))
    return eigh_tridiagonal(np.array(alphas), np.array(betas[: k - 1]),
                            select="i", select_range=(k - 1, k - 1))


def extreme_eigen(matrix: np.ndarray, largest: bool = True, vectors: bool = False,
                  check_finite: bool = True) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """The largest (or smallest) eigenvalue of a symmetric matrix, as eigh gives it
    (an array of one; with `vectors`, and its eigenvector): LAPACK's MRRR for that
    one alone (dsyevr), or where it fails ("Internal Error" on some clustered
    spectra: a 61 × 61 Gram matrix with eigenvalues repeated up to 8 times, DAG
    battery seed 1903) the whole spectrum by divide and conquer (dsyevd). Both
    are backward stable: the same error bounds hold."""
    index = matrix.shape[0] - 1 if largest else 0
    try:
        return eigh(matrix, eigvals_only=not vectors, subset_by_index=[index, index], driver="evr",
                    check_finite=check_finite)
    except np.linalg.LinAlgError:
        found = eigh(matrix, eigvals_only=not vectors, driver="evd", check_finite=check_finite)
    return (found[0][[index]], found[1][:, [index]]) if vectors else found[[index]]


def dense_gram_norm(gram: np.ndarray, entry_error: float = 0.0) -> SpectralNorm:
    """sqrt(λ_max) of an explicit symmetric PSD Gram matrix by LAPACK (float64),
    plus a rounding margin: LAPACK's backward error (a modest multiple of m·u·||G||,
    taken as 8·m·u·||G||_F) and `entry_error`, a bound of ||G − G_exact||₂ from
    forming G. Deterministic."""
    m = gram.shape[0]
    if m == 0:
        return SpectralNorm(0.0, 0)
    top = float(extreme_eigen(gram)[0])
    frobenius = float(np.linalg.norm(gram))
    margin = 8 * m * np.finfo(np.float64).eps * frobenius + entry_error
    value = math.sqrt(max(top, 0.0) + margin)
    return SpectralNorm(value, 0, 0.0, True, None, math.sqrt(max(top, 0.0)))
