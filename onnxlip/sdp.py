"""A small primal-dual interior-point method for the joint bound's semidefinite
programs, written for their structure.

The program (onnxlip.joint, with products of nonnegative forms): over t and
multipliers y ≥ 0,

    minimize t   subject to   S(t, y) = t·E + Σ_i y_i A_i − C ⪰ 0,

E the identity on the first `head` coordinates, each A_i = Σ_e c_e·sym(v_p v_qᵀ)
a short sum over pairs of a fixed set of vectors V (the joint bound's linear
forms). Its primal: maximize ⟨C, X⟩ over X ⪰ 0 with ⟨E, X⟩ = 1 and
⟨A_i, X⟩ ≤ 0 (slack w_i).

The method is the HKM direction with Mehrotra's predictor-corrector (Helmberg,
Rendl, Vanderbei and Wolkowicz 1996; Todd, Toh and Tütüncü 1998). Its Schur
complement M_ij = tr(A_i X A_j S⁻¹) is gathered from VᵀXV and VᵀS⁻¹V, a
product of (vectors)² entries rather than of matrices. Every iterate keeps
S ≻ 0 (the start is dual feasible, steps stop short of the boundary), so the
multipliers returned at any time, by the iteration cap or the deadline, are
a feasible point: its t is an upper bound of the program's value. The caller
proves its own bound from the multipliers (onnxlip.joint._proven); nothing
here needs to be exact.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import scipy.linalg as la
import scipy.sparse as sp

from .spectral import extreme_eigen

#: Fraction of the step to the boundary of the cone taken.
STEP = 0.95


@dataclass
class Program:
    """The data: vectors V (side × count), the constraints' terms (constraint,
    p, q, coefficient) on V's columns, C (side × side), E's size `head`."""

    V: np.ndarray
    con: np.ndarray
    p: np.ndarray
    q: np.ndarray
    coef: np.ndarray
    C: np.ndarray
    head: int

    @property
    def count(self) -> int:
        return int(self.con.max(initial=-1)) + 1

    def apply(self, y: np.ndarray, t: float) -> np.ndarray:
        """t·E + Σ y_i A_i."""
        w = y[self.con] * self.coef
        half = (self.V[:, self.p] * w) @ self.V[:, self.q].T
        out = (half + half.T) / 2
        out[np.arange(self.head), np.arange(self.head)] += t
        return out

    def inner(self, gathered: np.ndarray, count: int) -> np.ndarray:
        """⟨A_i, G⟩ for every i, from VᵀGV (`gathered`)."""
        return np.bincount(self.con, self.coef * gathered[self.p, self.q], minlength=count)


@dataclass
class Solution:
    t: float
    y: np.ndarray
    X: np.ndarray
    iterations: int


def solve(program: Program, y0: np.ndarray, deadline: float, iterations: int = 80,
          gap: float = 1e-3) -> Solution | None:
    """Iterate from multipliers y0 (raised until S's trailing block is definite)
    until the duality gap is below `gap`·t, the cap or the deadline
    (time.perf_counter(): no iteration starts that, as long as the last one, would end
    past it); None where no start is found or its S is not definite
    (a step that fails ends the iteration at the last point, which is returned)."""
    n, count = program.C.shape[0], program.count
    head, tail = np.arange(program.head), np.arange(program.head, n)
    y = np.array(y0, dtype=float)
    for _ in range(60):
        F = program.apply(y, 0.0) - program.C
        try:
            factor = la.cho_factor(F[np.ix_(tail, tail)], check_finite=False)
            break
        except la.LinAlgError:
            y = y * 2.0
    else:
        return None
    schur = F[np.ix_(head, head)] - F[np.ix_(head, tail)] @ la.cho_solve(factor, F[np.ix_(tail, head)])
    scale = float(np.abs(program.C).max()) + 1.0
    t = -float(extreme_eigen(schur, largest=False)[0]) + 0.1 * scale
    S = program.apply(y, t) - program.C
    X = np.eye(n) / program.head  # ⟨E, X⟩ = 1
    w = (np.sum(X * S) / n) / y
    # the t variable's terms: E = Σ_k e_k e_kᵀ on unit vectors appended to V
    V = np.hstack([program.V, np.eye(n)[:, head]])
    units = program.V.shape[1] + head
    con = np.concatenate([program.con, np.full(program.head, count)])
    p, q = np.concatenate([program.p, units]), np.concatenate([program.q, units])
    used, where = np.unique(np.concatenate([p, q]), return_inverse=True)  # the vectors any term reads
    V, p, q = V[:, used], where[:p.size], where[p.size:]
    coef = np.concatenate([program.coef, np.ones(program.head)])
    full = Program(V, con, p, q, coef, program.C, 0)
    collect = sp.csr_matrix((np.ones(con.size), (con, np.arange(con.size))), shape=(count + 1, con.size))
    try:
        lower_S = la.cholesky(S, lower=True, check_finite=False)
    except la.LinAlgError:
        return None
    done, last, began = 0, 0.0, time.perf_counter()
    while done < iterations:
        done += 1
        GX = V.T @ (X @ V)
        mu = (np.sum(X * S) + y @ w) / (n + count)
        if np.sum(X * S) + y @ w < gap * abs(t) and abs(1.0 - full.inner(GX, count + 1)[count]) < 1e-7:
            break
        now = time.perf_counter()  # one reading per iteration
        last, began = now - began, now
        if now + last > deadline:  # an iteration as long as the last one would overrun the deadline
            break
        try:  # each iteration factors X, M and the next S once
            lower_X = la.cholesky(X, lower=True, check_finite=False)
            Sinv = la.cho_solve((lower_S, True), np.eye(n), check_finite=False)
            Sinv = (Sinv + Sinv.T) / 2
            GS = V.T @ (Sinv @ V)
            T = _gather(GX, q, p) * _gather(GS, q, p).T  # GS is symmetric: GS[p, q] = GS[q, p]ᵀ
            T += T.T
            T += _gather(GX, q, q) * _gather(GS, p, p)
            T += _gather(GX, p, p) * _gather(GS, q, q)
            T *= np.outer(coef, coef) / 4
            M = np.asarray((collect @ (collect @ T).T).T)
            M[np.arange(count), np.arange(count)] += w / y
            factor = la.cho_factor(M, check_finite=False)
        except la.LinAlgError:
            break
        base = full.inner(GS, count + 1)
        del T

        point = (X, S, Sinv, y, w, lower_X, lower_S)
        dX, dS, dw, dy, dt, primal, dual = _direction(program, full, factor, base, point, mu, 0.0)
        affine = np.sum((X + primal * dX) * (S + dual * dS)) + (y + dual * dy) @ (w + primal * dw)
        sigma = min(1.0, (affine / (np.sum(X * S) + y @ w)) ** 3)
        step = _direction(program, full, factor, base, point, mu, sigma, (dX, dS, dw, dy))
        dX, dS, dw, dy, dt, primal, dual = step
        if primal == 0.0 and dual == 0.0:
            break
        X = X + STEP * primal * dX
        w = w + STEP * primal * dw
        t_new, y_new = t + STEP * dual * dt, y + STEP * dual * dy
        S_new = program.apply(y_new, t_new) - program.C  # recomputed: S stays S(t, y)
        try:
            lower_S = la.cholesky(S_new, lower=True, check_finite=False)
        except la.LinAlgError:
            break
        t, y, S = t_new, y_new, S_new
        X = (X + X.T) / 2
    if not math.isfinite(t):
        return None
    return Solution(t, y, X, done)


def _direction(program: Program, full: Program, factor, base: np.ndarray, point: tuple, mu: float,
               sigma: float, predicted=None):
    """The HKM step to the σμ-centre (`factor`: the Schur complement's Cholesky
    factor, `base`: ⟨A_i, S⁻¹⟩ and ⟨E, S⁻¹⟩; `point`: X, S, S⁻¹, y, w and the
    lower Cholesky factors of X and S); with the predictor's step
    (dX, dS, dw, dy), Mehrotra's second-order correction. Returns the step
    and the largest primal and dual step lengths ≤ 1."""
    X, S, Sinv, y, w, lower_X, lower_S = point
    count = y.size
    rhs = sigma * mu * base
    rhs[:count] += sigma * mu / y
    rhs[count] -= 1.0
    if predicted is not None:
        pX, pS, pw, py = predicted
        cross = pX @ pS @ Sinv
        cross = (cross + cross.T) / 2
        rhs -= full.inner(full.V.T @ (cross @ full.V), count + 1)
        rhs[:count] -= pw * py / y
    d = la.cho_solve(factor, rhs, check_finite=False)
    dy, dt = d[:count], d[count]
    dS = program.apply(dy, dt)
    dX = sigma * mu * Sinv - X - (X @ dS @ Sinv + Sinv @ dS @ X) / 2
    dw = (sigma * mu - w * y - w * dy) / y
    if predicted is not None:
        dX -= cross
        dw -= pw * py / y
    try:
        primal = min(_cone_step(lower_X, dX), _ray_step(w, dw))
        dual = min(_cone_step(lower_S, dS), _ray_step(y, dy))
    except la.LinAlgError:
        primal = dual = 0.0
    return dX, dS, dw, dy, dt, primal, dual


def _gather(G: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """G[np.ix_(rows, cols)], by two takes (a third of the time)."""
    return G.take(rows, axis=0).take(cols, axis=1)


def _cone_step(lower: np.ndarray, dZ: np.ndarray) -> float:
    """The largest α ≤ 1 with Z + α dZ ⪰ 0, Z = lower·lowerᵀ ≻ 0."""
    half = la.solve_triangular(lower, dZ, lower=True, check_finite=False)
    inner = la.solve_triangular(lower, half.T, lower=True, check_finite=False)
    lowest = float(extreme_eigen((inner + inner.T) / 2, largest=False, check_finite=False)[0])
    return 1.0 if lowest >= 0 else min(1.0, -1.0 / lowest)


def _ray_step(v: np.ndarray, dv: np.ndarray) -> float:
    """The largest α ≤ 1 with v + α dv ≥ 0 (v > 0)."""
    falling = dv < 0
    return float(min(1.0, np.min(-v[falling] / dv[falling], initial=1.0)))
