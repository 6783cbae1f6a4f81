"""The uncertain units bounded jointly: an S-lemma over their quadratic constraints.

onnxlip.tight bounds the uncertain part of f(x) − f(x0) apart from the stable
network E, by the triangle inequality: ||E|| + ||Post|| · ||U A Pre||. Here the
two are bounded together. Over the ball (Δx = ε·d, ||d|| ≤ 1, everything per
unit ε), with r_k what block k's uncertain outputs add to the stable
network's (their true slopes or windows less the fixed part S⁰):

    Δf = E d + Σ_k B_k r_k,          B_k = Post^E_k on the uncertain outputs,
    Δv_k = Pre_k d + Σ_{j<k} Pre_{k←j} r_j      (block k's input vector),

and each uncertain unit u of block k is bounded by a linear centre and a
radius, both linear in Δv_k (Spread):

    |r_u − s_uᵀ Δv_k| ≤ ||G_u Δv_k||     (ReLU: the middle of its slope
    interval and half its width; max-pooling: the members' mean and their
    deviations, or half the rise past the winner).

With z = (d, r) every quantity is a linear form of z: out(z), c_u(z) = r_u −
s_uᵀΔv_k and g_u(z) = G_u Δv_k. For multipliers λ_u ≥ 0 and a t with

    t·||d||² − ||out(z)||² + Σ_u λ_u (c_u(z)² − ||g_u(z)||²) ≥ 0  for every z,

every admissible z (c_u² ≤ ||g_u||²) has ||Δf||² ≤ t·||d||²: L(x0, ε) ≤ √t
(the S-lemma's easy direction, weak duality; it needs no convexity). d
enters only through the forms' d-parts D (rows × inputs): with D̂ᵀ = Q R
(Householder QR), Dd = Rᵀa with a = Qᵀd and ||a|| ≤ ||d||, so the test is on a
matrix of (rows + units) sides, whatever the input's size.

The multipliers are chosen in float64 (L-BFGS on log λ: t(λ) is convex, its
gradient ||g_u(z*)||² − c_u(z*)² at the maximizer z*); the chosen t
is then proven: the forms' rounding (the pulled products' bounds, and QR's
backward error) is an extra variable w with ||w|| ≤ η||z||, one more
multiplier μ, and the test matrix's smallest eigenvalue, less bounds of its
float64 evaluation's and LAPACK's errors, must be ≥ 0. Deterministic: no
eigensolver's start vector is involved.

Refinement (a time budget, `refine`): some forms are nonnegative on the ball
(Spread.floors: a rising window's r_u = t ≥ 0; a tied window whose members
are proven exactly equal at x0 moves by the largest of their changes, so
r_u − Δz_i ≥ 0), so the product of any two is ≥ 0 there and may enter the
S-lemma with its own multiplier: −ν_ab·n_a(z)·n_b(z) joins the quadratic form,
whose weights Ω are then a symmetric matrix. The multipliers come from an
interior-point method (onnxlip.sdp) with cutting planes over the products;
the proof is the same as above, with Ω's w-block I + Ω/s². On the MNIST
reference at ε = 1e-3 the bound goes from 1.103x ||J(x0)|| to 1.039x.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import scipy.linalg as la
import scipy.sparse as sp
import scipy.sparse.linalg  # noqa: F401  (sp.linalg.norm)
from scipy.optimize import minimize

from .blocks import INPUT
from .bounds import BLAS_THREADS
from .operators.base import U64, LinearMap, gamma
from .sdp import Program, solve
from .spectral import extreme_eigen

#: Largest network output (rows of E) and side of the search's matrices (forms:
#: output, centres and radii rows; plus units) the joint bound takes on; past
#: them tight's bound stands alone.
OUT_MAX = 256
FORMS_MAX = 800
#: ... and with a time budget (refine): its interior-point method handles
#: larger programs (MNIST reference at ε = 0.1, side 1215: 613 → 138 in 30 s).
FORMS_MAX_REFINED = 1500
#: ... and for a tail of a chain with a time budget (onnxlip.tight): the CIFAR-10
#: reference's fc1 (all 512 units uncertain from ε = 0.07 on, side 1546).
FORMS_MAX_TAIL = 2000
#: Seconds per side³ of one proof try (_proven: the test matrix built and its
#: smallest eigenvalue), as last measured in this process on a side of at least
#: 500 (before: a first guess): a time budget's refinement rounds start only
#: with time left to prove their result (a side of 2,800: ~2.5 s).
_PROOF_RATE = [1.2e-10]
#: Largest d-part of the forms, forms × inputs in float64.
FORMS_BYTES = 256e6
#: Evaluations of t(λ) in the multipliers' search (each a Cholesky and an
#: eigenproblem of the forms' size, side³ flops or so): EVAL_FLOPS / side³,
#: within [EVALS_MIN, EVALS_MAX]. (CIFAR-10 reference at ε = 1e-3, side 481:
#: 16.94 after 20 evaluations, 16.93 after 50; MNIST: 52.65, 52.01; the budget
#: gives 27 and 40. A certificate or a sweep computes many bounds: 150 made the
#: digits dataset's certificates 10x slower for 2% larger radii.)
EVAL_FLOPS = 3e9
EVALS_MIN, EVALS_MAX = 8, 40
#: The multipliers' search keeps log λ within ±SPAN of its start.
SPAN = 40.0
#: The search stops after EVALS_MIN where √t is still above GIVE_UP × the bound to beat.
GIVE_UP = 1.25
#: ... and before it starts, where its start's √t is above GIVE_UP_START × that bound
#: (the search lowered √t by 1.19x on MNIST, 2.7x on CIFAR-10 from its start).
GIVE_UP_START = 4.0
#: QR's backward error per column, relative: γ̃ = QR_C · inputs · forms · u.
QR_C = 16
#: The refinement (refine): products added per round, the violation that counts
#: (relative to t), a new product's first multiplier (relative to the mean λ),
#: and the floor of the λ it proves, relative to the largest.
PRODUCTS_PER_ROUND = 400
ROUNDS_MAX = 50
VIOLATION = 1e-7
NEW_PRODUCT = 1e-3
LAMBDA_FLOOR = 1e-8
#: The refinement's reduction drops trailing rows of R within this share of ||D||_F,
#: and applies where the floors are at most FLOORS_MAX.
DROP = 1e-12
FLOORS_MAX = 1000
#: A LAPACK symmetric eigenvalue's error, relative to the matrix's Frobenius
#: norm: EIG_C · side · u (Higham, backward stable; generous constant).
EIG_C = 64


@dataclass
class Spread:
    """How a block's uncertain outputs move, beyond the stable network's fixed
    part: |r_u − shift_u·y| ≤ ||rows_u·y||, y = head·Δv (head None: Δv, the
    block's input vector), rows_u the rows of `rows` whose owner is u."""

    head: LinearMap | None
    units: np.ndarray  # the block's output index of each uncertain unit
    shift: sp.csr_matrix  # units × head's outputs
    rows: sp.csr_matrix  # radius rows × head's outputs
    owner: np.ndarray  # the unit (0 … units − 1) of each radius row
    #: Forms proven nonnegative on the ball: r_u − floors_i·y ≥ 0, u = floor_owner[i]
    #: (products of two are the refinement's constraints, see refine).
    floors: sp.csr_matrix | None = None
    floor_owner: np.ndarray | None = None


def relu_spread(head: LinearMap | None, size: int, uncertain: np.ndarray, gate: np.ndarray,
                slopes: np.ndarray, sure: np.ndarray | None = None) -> Spread:
    """Uncertain ReLUs: slope gate + U with |U| ≤ slopes, U ≤ 0 where the gate is 1
    (≥ 0 where 0): the slope's interval is [gate − slope, gate] or [0, slope].
    Floors where the exact input y* at x0 is `sure`ly on the gate's side (y* ≥ 0
    with gate 1, y* < 0 with gate 0): r_u = relu(y) − y ≥ 0 or relu(y) ≥ 0."""
    units = np.flatnonzero(uncertain)
    half = slopes[units] / 2
    centre = np.where(gate[units] > 0, -half, half)
    m = units.size
    shift = sp.csr_matrix((centre, (np.arange(m), units)), shape=(m, size))
    rows = sp.csr_matrix((half, (np.arange(m), units)), shape=(m, size))
    floor_owner = np.flatnonzero(sure[units]) if sure is not None else np.zeros(0, dtype=int)
    floors = sp.csr_matrix((floor_owner.size, size))  # r_u itself: empty rows
    return Spread(head, units, shift, rows, np.arange(m), floors, floor_owner)


def window_spread(size: int, units: np.ndarray, members: list[np.ndarray], winners: np.ndarray,
                  tied: np.ndarray, rises: list[tuple[np.ndarray, np.ndarray]],
                  exact: np.ndarray | None = None) -> Spread:
    """Unstable max-pooling windows (inputs' indices). A tied window (no winner in S⁰)
    moves by a value between its members' changes (`members`: the candidates that
    can be the largest): the mean, with the deviations from it scaled by
    √((k−1)/k) (k members; the value's distance to the mean is at most the
    largest |deviation|, and the deviations sum to 0), one row, half the
    difference, for two. A window whose winner w stays in S⁰ rises
    above Δz_w by t ∈ [0, max_j s_j·(Δz_j − Δz_w)⁺] (`rises`: (j, s_j) rows):
    for one j, half of s_j·(Δz_j − Δz_w) ± as much; else 0 ± all of them.

    Floors (forms ≥ 0 on the ball): a rising window's r_u = t ≥ 0; a tied window
    whose members are `exact`ly equal at x0 (proven, not within rounding) moves
    by the largest of their changes, so r_u − Δz_i ≥ 0 for each member i."""
    shift_entries, row_entries, owner = [], [], []
    floor_entries, floor_owner = [], []
    exact = np.zeros(len(members), dtype=bool) if exact is None else exact
    for u, (mem, w, is_tied, rise) in enumerate(zip(members, winners, tied, rises)):
        if is_tied and exact[u]:
            floor_entries += [(len(floor_owner) + i, j, 1.0) for i, j in enumerate(mem)]
            floor_owner += [u] * mem.size
        elif not is_tied:
            floor_owner.append(u)  # r_u itself: an empty row
        if is_tied:
            k = mem.size
            shift_entries += [(u, j, 1.0 / k) for j in mem]
            if k == 2:
                row = len(owner)
                row_entries += [(row, mem[0], 0.5), (row, mem[1], -0.5)]
                owner.append(u)
            else:  # a zero-sum vector's largest |entry| is at most √((k−1)/k) its norm
                scale = math.sqrt((k - 1) / k)
                for i in mem:
                    row = len(owner)
                    row_entries += [(row, j, ((1.0 if j == i else 0.0) - 1.0 / k) * scale) for j in mem]
                    owner.append(u)
        else:
            js, ss = rise
            if js.size == 1:  # t ∈ [0, s·d⁺] ⊂ s·d/2 ± s·|d|/2
                ss = ss / 2
                shift_entries += [(u, js[0], ss[0]), (u, w, -ss[0])]
            for j, s in zip(js, ss):
                row = len(owner)
                row_entries += [(row, j, s), (row, w, -s)]
                owner.append(u)

    def matrix(entries, count):
        if not entries:
            return sp.csr_matrix((count, size))
        i, j, v = zip(*entries)
        return sp.csr_matrix((v, (i, j)), shape=(count, size))  # duplicates add

    return Spread(None, units, matrix(shift_entries, units.size), matrix(row_entries, len(owner)),
                  np.asarray(owner, dtype=int), matrix(floor_entries, len(floor_owner)),
                  np.asarray(floor_owner, dtype=int))


@dataclass
class _Forms:
    """The linear forms over (a, r): rows [output; centres c_u; radii g_u], their
    d-part reduced to R (forms × a) and r-part P; η bounds the exact forms'
    distance, ||ΔL|| ≤ η (over (d, r))."""

    R: np.ndarray
    P: np.ndarray
    outputs: int
    owner: np.ndarray  # unit of each radius row
    level: np.ndarray  # per unit: how many uncertain blocks come after its block
    eta: float
    floors: int = 0  # the last rows: the floors (nonnegative forms)

    @property
    def units(self) -> int:
        return self.P.shape[1]

    @property
    def proof_seconds(self) -> float:
        """The expected time of one proof try (_PROOF_RATE)."""
        return _PROOF_RATE[0] * (self.R.shape[0] + self.units + self.L.shape[0]) ** 3

    def weights(self, lam: np.ndarray) -> np.ndarray:
        """Ω: −1 on the outputs, λ_u on the centres, −λ_owner on the radii (0 on floors)."""
        return np.concatenate([-np.ones(self.outputs), lam, -lam[self.owner], np.zeros(self.floors)])

    @cached_property
    def L(self) -> np.ndarray:
        """[Rᵀ P]: every form over (a, r)."""
        return np.hstack([self.R.T, self.P])


def joint_bound(net, limit: float = math.inf, budget: float = 0.0, enough: float = 0.0,
                forms_max: int | None = None) -> tuple[float, bool]:
    """(bound, refined): √t proven as in the module's docstring, or inf where it does not apply
    (nothing uncertain, too large) or does not beat `limit`. `net`: tight's
    _Linearized, whose uncertain steps carry a Spread. `budget` > 0: seconds
    the joint bound may take from here, the search's and the refinement's
    (refine, from the search's multipliers whether or not they beat `limit`;
    with products of floors where there are some; where the bound is above
    `enough`, what the caller needs); programs up to FORMS_MAX_REFINED then
    qualify (`forms_max`: another limit). `refined`: the refinement's multipliers gave
    the bound."""
    deadline = time.perf_counter() + budget
    dense = _dense(net, forms_max or (FORMS_MAX_REFINED if budget > 0 else FORMS_MAX))
    if dense is None:
        return math.inf, False
    forms = _forms(dense)
    with BLAS_THREADS.limit(limits=1, user_api="blas"):  # small problems: threads only contend
        # with a budget, the search's multipliers are the refinement's start even where
        # they do not beat `limit` (the interior-point method often does: MNIST at 0.1);
        # the search stops with time left for a proof
        found = _multipliers(forms, math.inf, deadline - forms.proof_seconds) if budget > 0 else \
            _multipliers(forms, limit)
        if found is None:
            return math.inf, False
        lam, value = found
        bound = math.inf
        stop = deadline if budget > 0 else math.inf
        if math.isfinite(value) and math.sqrt(value) < limit:
            t = _proven(forms, lam, value, deadline=stop)
            if t is None:  # multipliers many decades apart leave a radius block nearly singular
                lam = np.maximum(lam, LAMBDA_FLOOR * lam.max())
                value = _value(forms, lam)[0]
                if math.isfinite(value) and math.sqrt(value) < limit:
                    t = _proven(forms, lam, value, deadline=stop)
            bound = math.inf if t is None else math.sqrt(t) * (1 + 4 * U64)
        refined = False
        if budget > 0 and bound > enough:
            floored = dense.DN is not None and 0 < dense.DN.shape[0] <= FLOORS_MAX
            better = refine(_forms(dense, floors=floored), lam, deadline)
            refined, bound = better < bound, min(bound, better)
    return (bound, refined) if bound < limit else (math.inf, False)


@dataclass
class _Dense:
    """The forms over (d, r) before the reduction: D (forms × inputs), P (forms ×
    units), `error` ≥ the Frobenius distance of [D P] to the exact forms; the
    uncertain blocks and, per block, its units (block output indices)."""

    D: np.ndarray
    P: np.ndarray
    outputs: int
    owner: np.ndarray
    level: np.ndarray
    error: float
    blocks: list[int]
    units: list[np.ndarray]
    #: The spreads' floors (nonnegative forms): d-part, r-part, error (as `error`).
    DN: np.ndarray | None = None
    PN: np.ndarray | None = None
    floor_error: float = 0.0


def _forms(dense: _Dense, floors: bool = False) -> _Forms:
    """The reduced forms (Householder QR of the d-part; its backward error joins η);
    with the floors as the last rows where asked for. Only the inputs some form
    reads enter the QR (Dd = D̂d̂, d̂ those entries of d, ||d̂|| ≤ ||d||): a tail's
    forms read the receptive fields of its few uncertain units (CIFAR-10 at
    ε = 0.00316: 2,244 of conv2's 25,088 outputs, the QR 0.05 s instead of 0.6 s)."""
    P, error = dense.P, dense.error
    if not floors:
        D = _read(dense.D)
        p, n = D.shape
        with BLAS_THREADS.limit(limits=1, user_api="blas"):  # onnxruntime's threads may still spin
            R = la.qr(D.T, mode="r", overwrite_a=False, check_finite=False)[0]
        qr_error = QR_C * n * p * U64 * float(np.linalg.norm(D))
        eta = (error + qr_error) * (1 + 1e-6)
        return _Forms(R[:min(n, p)], P, dense.outputs, dense.owner, dense.level, eta)
    # the floors' d-parts are (nearly) in the span of the others' (a tie's members
    # are its mean and deviations; a rise has none): QR with column pivoting,
    # and the trailing rows of R whose Frobenius norm is below DROP·||D|| are
    # dropped, their norm added to η (the dropped coordinates of a = Qᵀd only
    # shorten it)
    D, P = _read(np.vstack([dense.D, dense.DN])), np.vstack([P, dense.PN])
    error = math.hypot(error, dense.floor_error)
    p, n = D.shape
    with BLAS_THREADS.limit(limits=1, user_api="blas"):
        R, pivots = la.qr(D.T, mode="r", pivoting=True, overwrite_a=False, check_finite=False)
    R = R[:min(n, p)]
    total = float(np.linalg.norm(D))
    tails = np.sqrt(np.cumsum((R * R).sum(axis=1)[::-1])[::-1])  # ||R[k:]||_F per k
    keep = int(np.argmax(np.append(tails, 0.0) <= DROP * total)) if total > 0 else 0
    dropped = float(tails[keep]) if keep < tails.size else 0.0
    reduced = np.empty((keep, p))
    reduced[:, pivots] = R[:keep]
    qr_error = QR_C * n * p * U64 * total
    eta = (error + qr_error + dropped) * (1 + 1e-6)
    return _Forms(reduced, P, dense.outputs, dense.owner, dense.level, eta, dense.DN.shape[0])


def _read(D: np.ndarray) -> np.ndarray:
    """D's columns that are not all zero (a NaN counts as read)."""
    used = D.any(axis=0)
    return D if used.all() else D[:, used]


def search_side(net) -> int:
    """The side of the search's matrices for `net` (tight's _Linearized): the output's
    rows, each uncertain unit's centre and radius rows, and the units (compared
    with FORMS_MAX and kin)."""
    spreads = [s.spread for s in net.steps if s.spread is not None and s.spread.units.size]
    return net.size(len(net.blocks) - 1) + sum(2 * s.units.size + s.rows.shape[0] for s in spreads)


def _dense(net, forms_max: int = FORMS_MAX) -> _Dense | None:
    """The forms, pulled back through the network (float32 maps as their exact
    float64 matrices, _Linearized.precise): None where nothing is uncertain, the
    sizes exceed OUT_MAX, `forms_max` or FORMS_BYTES, or an entry is not finite."""
    steps = net.steps
    uncertain = [k for k, s in enumerate(steps) if s.spread is not None and s.spread.units.size]
    if not uncertain:
        return None
    n, o = net.in_size, net.size(len(net.blocks) - 1)
    spreads = [steps[k].spread for k in uncertain]
    sizes = [s.units.size for s in spreads]
    p = o + sum(sizes) + sum(s.rows.shape[0] for s in spreads)
    if o > OUT_MAX or search_side(net) > forms_max or 8.0 * p * (n + p) > FORMS_BYTES:
        return None
    net = net.precise()
    spreads = [net.steps[k].spread for k in uncertain]
    offset = np.concatenate([[0], np.cumsum(sizes)])
    m = int(offset[-1])
    D, P = np.zeros((p, n)), np.zeros((p, m))
    err2 = 0.0
    pulled = net.pulls([INPUT] + uncertain, None, np.eye(o))
    D[:o], e = pulled[INPUT][0].T, pulled[INPUT][1]
    err2 += e * e
    for i, k in enumerate(uncertain):
        back, e = pulled[k]
        P[:o, offset[i]:offset[i + 1]], err2 = back[spreads[i].units].T, err2 + e * e
    floors = [s.floors.shape[0] if s.floors is not None else 0 for s in spreads]
    f = sum(floors)
    DN, PN, floor2 = np.zeros((f, n)), np.zeros((f, m)), 0.0
    c_row, g_row, n_row = o, o + m, 0
    owner, level = [], []
    for i, k in enumerate(uncertain):
        s = spreads[i]
        mi, qi, fi = s.units.size, s.rows.shape[0], floors[i]
        # c_u = r_u − s_u·y, g_u = G_u·y and the floors r_u − F_u·y: the unit vectors of
        # the coordinates of y they read are pulled back, then combined (each pulled once)
        parts = [-s.shift, s.rows] + ([-s.floors] if fi else [])
        coefficients = sp.vstack(parts).tocsc()
        support = np.flatnonzero(np.diff(coefficients.indptr))
        basis = np.zeros((coefficients.shape[1], support.size))
        basis[support, np.arange(support.size)] = 1.0
        combine = coefficients[:, support]
        # ≥ the spectral norms of the spread's rows and of its floors: the errors' factors
        factor = float(sp.linalg.norm(combine[:mi + qi]))
        factor_n = float(sp.linalg.norm(combine[mi + qi:])) if fi else 0.0
        cut = [slice(c_row, c_row + mi), slice(g_row, g_row + qi)]
        pulled = net.pulls([INPUT] + uncertain[:i], k, basis, s.head)
        back, e = pulled[INPUT]
        err2, floor2 = err2 + (factor * e) ** 2, floor2 + (factor_n * e) ** 2
        block = combine @ back.T
        D[cut[0]], D[cut[1]] = block[:mi], block[mi:mi + qi]
        DN[n_row:n_row + fi] = block[mi + qi:]
        for j, earlier in enumerate(uncertain[:i]):
            back, e = pulled[earlier]
            err2, floor2 = err2 + (factor * e) ** 2, floor2 + (factor_n * e) ** 2
            block = combine @ back[spreads[j].units].T
            P[cut[0], offset[j]:offset[j + 1]] = block[:mi]
            P[cut[1], offset[j]:offset[j + 1]] = block[mi:mi + qi]
            PN[n_row:n_row + fi, offset[j]:offset[j + 1]] = block[mi + qi:]
        P[c_row + np.arange(mi), offset[i] + np.arange(mi)] += 1.0
        if fi:
            PN[n_row + np.arange(fi), offset[i] + s.floor_owner] += 1.0
        owner.append(offset[i] + s.owner)
        level.append(np.full(mi, len(uncertain) - 1 - i))
        c_row, g_row, n_row = c_row + mi, g_row + qi, n_row + fi
    if not (np.isfinite(D).all() and np.isfinite(P).all()):
        return None
    if not (np.isfinite(DN).all() and np.isfinite(PN).all()):
        DN, PN = DN[:0], PN[:0]
    return _Dense(D, P, o, np.concatenate(owner), np.concatenate(level), math.sqrt(err2), uncertain,
                  [s.units for s in spreads], DN, PN, math.sqrt(floor2))


def _value(forms: _Forms, lam: np.ndarray, omega: np.ndarray | None = None
           ) -> tuple[float, np.ndarray | None]:
    """(t(λ), the gradient ∂t/∂λ) in float64; (inf, None) where the r-part is not
    negative definite (no t works). `omega`: the weights as a symmetric matrix
    (with products), in place of forms.weights(λ)."""
    if not (np.isfinite(lam).all() and (lam > 0).all()):
        return math.inf, None
    L = forms.L
    with np.errstate(all="ignore"):  # an overflow is caught as a non-finite K or Schur complement
        # the quadratic form t·||a||² must dominate
        K = -(L.T * forms.weights(lam)) @ L if omega is None else -(L.T @ omega) @ L
    if not np.isfinite(K).all():
        return math.inf, None
    na = forms.R.shape[0]
    Kaa, Kar, Krr = K[:na, :na], K[:na, na:], K[na:, na:]
    try:
        factor = la.cho_factor(-Krr, check_finite=False)
    except la.LinAlgError:
        return math.inf, None
    solved = la.cho_solve(factor, Kar.T, check_finite=False)
    schur = Kaa + Kar @ solved
    if not np.isfinite(schur).all():
        return math.inf, None
    values, vectors = extreme_eigen(schur, vectors=True, check_finite=False)
    if vectors.shape[1] == 0:  # LAPACK found no eigenvalue (an extreme λ)
        return math.inf, None
    a = vectors[:, -1]
    z = np.concatenate([a, solved @ a])
    f = L @ z
    m = forms.units
    centre = f[forms.outputs:forms.outputs + m] ** 2
    radius = np.bincount(forms.owner, f[forms.outputs + m:forms.outputs + m + forms.owner.size] ** 2,
                         minlength=m)
    return float(values[-1]), radius - centre


def _multipliers(forms: _Forms, limit: float = math.inf, deadline: float = math.inf
                 ) -> tuple[np.ndarray, float] | None:
    """(λ, t(λ)): multipliers with a small t(λ), within an evaluation budget (EVAL_FLOPS, at
    least EVALS_MIN, at most EVALS_MAX): a feasible start (each block's units' λ a
    factor above the next uncertain block's, raised until the r-part is
    definite), its best common scale (e^0, e^-2, …, while t falls), then
    L-BFGS-B on log λ (an infeasible λ counts as a large t whose gradient
    raises every λ); where `deadline` (time.perf_counter()) passes, the best
    point so far. None where no start is feasible, or where √t is still above
    GIVE_UP times `limit` (a bound it would not beat) after EVALS_MIN."""
    side = forms.R.shape[0] + forms.units
    budget = int(min(EVALS_MAX, max(EVALS_MIN, EVAL_FLOPS / side**3)))
    top = float(np.linalg.norm(forms.P[:forms.outputs], 2)) ** 2 + 1.0
    start = None
    for ratio in (1.0, 1.5, 2.0, 3.0, 4.0, 8.0, 16.0, 64.0, 256.0, 1024.0, 4096.0):
        trial = 2 * top * ratio ** forms.level
        first = _value(forms, trial)[0]
        if math.isfinite(first):
            start = trial
            break
    if start is None:
        return None
    best, scale = first, 1.0
    for tau in (-2.0, -4.0, -6.0, -8.0):
        value = _value(forms, start * math.exp(tau))[0]
        if not value < best:
            break
        best, scale = value, math.exp(tau)
    if best > (GIVE_UP_START * limit) ** 2:  # the search gains 1.2-2.7x on its start
        return None

    theta = np.log(start * scale)
    seen = [best, theta]  # the best point evaluated: what a passed deadline leaves

    def objective(theta):
        if time.perf_counter() > deadline:
            raise _Deadline
        value, grad = _value(forms, np.exp(theta))
        if not math.isfinite(value):
            return 1e3 * first, -first * np.ones_like(theta)
        if value < seen[0]:
            seen[:] = [value, theta.copy()]
        return value, grad * np.exp(theta)

    box = [(t - SPAN, t + SPAN) for t in theta]  # λ within e^±SPAN of the start: finite
    for evals in (EVALS_MIN, budget - EVALS_MIN):  # a first leg, then the rest if it is worth it
        if evals <= 0:
            break
        try:
            minimize(objective, seen[1], jac=True, method="L-BFGS-B", bounds=box,
                     options={"maxfun": evals, "maxiter": evals})
        except _Deadline:
            break
        if seen[0] > (GIVE_UP * limit) ** 2:
            return None
    return np.exp(seen[1]), float(seen[0])


class _Deadline(Exception):
    """The search's deadline passed (caught in _multipliers)."""


def _proven(forms: _Forms, lam: np.ndarray, value: float, omega: np.ndarray | None = None,
            deadline: float = math.inf) -> float | None:
    """A t ≥ value for which the test matrix over (a, r, w) (w the forms'
    rounding, ||w|| ≤ η||z||, multiplier μ = s², w scaled by s) is proven
    positive semidefinite: its computed smallest eigenvalue exceeds bounds of
    the entries' float64 errors and of LAPACK's (Weyl). `omega`: as in _value
    (its w-block I + Ω/s², its coupling LᵀΩ/s). Past `deadline`
    (time.perf_counter()) no further (s, t) is tried: None (each try is one
    eigenvalue problem of the test matrix, ~1 s for 2,000 forms: a budget is
    overrun by one try at most)."""
    L = forms.L
    na, m, p = forms.R.shape[0], forms.units, L.shape[0]
    side = na + m + p
    if omega is None:
        diagonal = forms.weights(lam)
        big = float(np.abs(diagonal).max())
        weighted = L.T * diagonal
        gram_error = (np.abs(weighted) @ np.abs(L)) * gamma(p + 2, U64)  # of K's entries
        coupling_error = np.abs(weighted) * 2 * U64  # of weighted's
        omega, omega_abs = np.diag(diagonal), np.diag(np.abs(diagonal))
    else:
        omega_abs = np.abs(omega)
        big = float(omega_abs.sum(axis=1).max())  # ≥ ||Ω||
        per_row = int((omega != 0).sum(axis=1).max())
        weighted = L.T @ omega
        spread = np.abs(L).T @ omega_abs
        gram_error = (spread @ np.abs(L)) * gamma(p + per_row + 2, U64)
        coupling_error = spread * gamma(per_row + 2, U64)
    base = -weighted @ L  # K
    for s in (math.sqrt(big) * 1e3, math.sqrt(big) * 1e5, math.sqrt(big) * 1e7):
        mu_eta = s * s * forms.eta * forms.eta
        for lift in (1e-9, 1e-6, 1e-4, 1e-2):
            tic = time.perf_counter()
            t = value * (1 + lift) + mu_eta + 1e-300
            W = np.empty((side, side))
            W[:na + m, :na + m] = -base
            W[np.arange(na), np.arange(na)] += t - mu_eta
            W[na + np.arange(m), na + np.arange(m)] -= mu_eta
            W[:na + m, na + m:] = weighted / s
            W[na + m:, :na + m] = W[:na + m, na + m:].T
            W[na + m:, na + m:] = np.eye(p) + omega / (s * s)
            bound = np.zeros((side, side))
            bound[:na + m, :na + m] = gram_error
            bound[np.arange(na + m), np.arange(na + m)] += 4 * U64 * (t + mu_eta + np.abs(np.diag(base)))
            bound[:na + m, na + m:] = coupling_error / s + np.abs(W[:na + m, na + m:]) * 2 * U64
            bound[na + m:, :na + m] = bound[:na + m, na + m:].T
            bound[na + m:, na + m:] = 4 * U64 * (np.eye(p) + omega_abs / (s * s))
            entries = float(np.linalg.norm(bound)) * (1 + 1e-6)
            lowest = float(extreme_eigen(W, largest=False, check_finite=False)[0])
            if side >= 500:
                _PROOF_RATE[0] = (time.perf_counter() - tic) / side**3
            lapack = EIG_C * side * U64 * float(np.linalg.norm(W))
            if lowest > entries + lapack:
                return t * (1 + 4 * U64)
            if time.perf_counter() > deadline:
                return None
    return None


def refine(forms: _Forms, lam: np.ndarray, deadline: float) -> float:
    """The S-lemma with products of floors (forms proven ≥ 0 on the ball, so
    n_a(z)·n_b(z) ≥ 0 there, each with its multiplier ν_ab ≥ 0): cutting planes
    until `deadline` (time.perf_counter()), at most ROUNDS_MAX rounds. Each
    round solves the program with the products chosen so far (onnxlip.sdp,
    from the multipliers `lam`) and adds the PRODUCTS_PER_ROUND most violated
    by its primal X (n_aᵀ X n_b most negative). The multipliers of every round (λ floored at
    LAMBDA_FLOOR·max λ: the proof's rounding terms need every λ's radius
    block definite) are proven as the plain S-lemma's (_proven); the best
    proven √t, or inf."""
    L, o, m = forms.L, forms.outputs, forms.units
    radius_rows = forms.owner.size
    floors = o + m + radius_rows + np.arange(forms.floors)
    con = [np.arange(m), forms.owner]
    p = [o + np.arange(m), o + m + np.arange(radius_rows)]
    coef = [np.ones(m), -np.ones(radius_rows)]
    base = Program(L.T, np.concatenate(con), np.concatenate(p), np.concatenate(p), np.concatenate(coef),
                   L[:o].T @ L[:o], forms.R.shape[0])
    chosen = np.zeros((0, 2), dtype=int)
    y, fresh = lam.copy(), 0
    best = math.inf
    proof = forms.proof_seconds  # a round starts, and solves, only with time left for its proof
    for _ in range(ROUNDS_MAX):
        if time.perf_counter() + proof >= deadline:
            break
        count = chosen.shape[0]
        program = Program(base.V, np.concatenate([base.con, m + np.arange(count)]),
                          np.concatenate([base.p, floors[chosen[:, 0]]]),
                          np.concatenate([base.q, floors[chosen[:, 1]]]),
                          np.concatenate([base.coef, -np.ones(count)]), base.C, base.head)
        found = None
        for share in (1.0, 1e-3, 1e-6):  # new products' first multipliers: smaller where no start is found
            found = solve(program, np.concatenate([y[:y.size - fresh], y[y.size - fresh:] * share]),
                          deadline - proof)
            if found is not None or not fresh:
                break
        if found is None:
            break
        best = min(best, _proven_products(forms, found.y[:m], found.y[m:], chosen, deadline))
        gram = L[floors] @ found.X @ L[floors].T
        gram[np.tril_indices(forms.floors)] = np.inf
        gram[chosen[:, 0], chosen[:, 1]] = np.inf
        order = np.argsort(gram, axis=None)[:PRODUCTS_PER_ROUND]
        order = order[gram.ravel()[order] < -VIOLATION * abs(found.t)]
        if not order.size:
            break
        pairs = np.column_stack(np.unravel_index(order, gram.shape))
        chosen = np.vstack([chosen, pairs])
        y = np.concatenate([found.y, np.full(pairs.shape[0], NEW_PRODUCT * float(found.y[:m].mean()))])
        fresh = pairs.shape[0]
    return best


def _proven_products(forms: _Forms, lam: np.ndarray, nu: np.ndarray, pairs: np.ndarray,
                     deadline: float = math.inf) -> float:
    """√t proven for multipliers λ (units) and ν (products of the floors `pairs`),
    tried until `deadline` (_proven)."""
    if not (np.isfinite(lam).all() and np.isfinite(nu).all()) or lam.max() <= 0:
        return math.inf
    lam = np.maximum(lam, LAMBDA_FLOOR * lam.max())
    omega = np.diag(forms.weights(lam))
    rows = forms.outputs + forms.units + forms.owner.size + pairs
    nu = np.maximum(nu, 0.0)
    np.add.at(omega, (rows[:, 0], rows[:, 1]), -nu / 2)
    np.add.at(omega, (rows[:, 1], rows[:, 0]), -nu / 2)
    value = _value(forms, lam, omega)[0]
    if not math.isfinite(value):
        return math.inf
    t = _proven(forms, lam, value, omega, deadline)
    return math.inf if t is None else math.sqrt(t) * (1 + 4 * U64)
