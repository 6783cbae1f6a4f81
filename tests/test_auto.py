"""The default method 'auto' and the reach analysis behind it.

Soundness against float64 sampling on random chains and graphs, lower <= auto
<= paper, the analysis' linear part and error interval against sampled output
changes, exactness on networks that are affine on the ball (the tight set of
shipped models, with their proven counts), and adversarial cases:
pre-activations at the kink, max-pooling ties, first-layer pre-activations
just inside the ball's reach.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import dagnets
import netgen
import numpy as np
import onnx
import pytest
from hypothesis import given, note
from hypothesis import strategies as st
from propnets import build, networks, nominal

import onnxlip
from onnxlip import reach as reach_module
from onnxlip.blocks import INPUT, AffineBlock
from onnxlip.operators import conv as conv_module
from onnxlip.operators.base import U64, gamma
from onnxlip.reach import analyse
from onnxlip.refine import Relaxation, refine, upper_bounds

ROOT = Path(__file__).resolve().parent.parent
SLACK = 1 + 1e-6
TOL = 1e-3  # the solver's default tolerance: two certified bounds agree to this


def _chain(family: str, seed: int, tmp_path):
    makers = {"dense": netgen.dense_net, "conv": netgen.conv_net, "wide": lambda s: netgen.wide_net(s)[0]}
    net = makers[family](seed)
    path = net.save(tmp_path / f"{family}{seed}.onnx")
    x0 = np.random.default_rng(seed).standard_normal(net.input_shape)
    return (lambda p: net(p.reshape((-1, *net.input_shape[1:])))), onnxlip.load(path), x0


def _graph(family: str, seed: int, tmp_path):
    net = dagnets.FAMILIES[family](seed)
    path = net.save(tmp_path / f"{net.name}.onnx")
    x0 = np.random.default_rng(seed + 1000).standard_normal(net.input_shape)
    return net.twin(), onnxlip.load(path), x0


CASES = ([("chain", f, s) for f in ("dense", "conv") for s in range(8)]
         + [("graph", f, s) for f in dagnets.FAMILIES for s in range(3)])


@pytest.mark.parametrize(("kind", "family", "seed"), CASES, ids=[f"{f}{s}" for _, f, s in CASES])
def test_auto_is_sound_and_below_paper(tmp_path, kind, family, seed):
    twin, engine, x0 = (_chain if kind == "chain" else _graph)(family, seed, tmp_path)
    rng = np.random.default_rng(seed)
    jac = engine.jacobian(x0).dense()
    directions = list(np.linalg.svd(jac)[2][:2])
    for level in (1e-4, 1e-2, 0.3):
        eps = level * float(np.linalg.norm(x0))
        auto = engine.local_bound(x0, eps)
        assert auto.source in ("exact", "joint", "tight", "scaled", "paper")
        paper = engine.local_bound(x0, eps, method="paper")
        assert auto.bound <= paper.bound * (1 + 2 * TOL)
        points = netgen.ball_points(rng, x0, eps, 200, 200, directions)
        assert netgen.max_ratio(twin, x0, points) <= auto.bound * SLACK
        lower = engine.lower_bounds(x0, [eps], samples=16, ascent_steps=5)[0]
        assert lower.best <= auto.bound * SLACK
        # the analysis' Δz = L Δx + e holds at every sampled point
        reach = analyse(engine.blocks, engine.trace(x0), eps, 1e9)
        out = reach.output
        change = twin(points) - twin(x0.ravel()[None])
        linear = (points - x0.ravel()) @ out.L.T
        # the float64 twin keeps the weights unrounded: it is off by ~1e-7 relative
        slack = eps * (out.rho + 1e-6 * np.linalg.norm(out.L, axis=1)) + 1e-6 * np.abs(change)
        assert np.all(change - linear >= out.lo - slack)
        assert np.all(change - linear <= out.hi + slack)


def test_exact_where_the_network_is_affine_on_the_ball(tmp_path):
    """A tiny radius keeps every neuron (away from its kink) in its state: auto is
    ||J(x0)|| itself, deterministic, with no eigensolver, and the paper's bound is not."""
    for seed in range(5):
        _, engine, x0 = _chain("conv", seed, tmp_path)
        jac = np.linalg.norm(engine.jacobian(x0).dense(), 2)
        result = engine.local_bound(x0, 1e-7)
        assert result.source == "exact"
        assert result.guarantee == "deterministic"
        assert jac * (1 - 1e-6) <= result.bound <= jac * (1 + 1e-4)  # float32 convolutions
        assert all(r.test == "exact reach" for r in result.layers)


def _kink_net(tmp_path) -> onnxlip.Network:
    net = dagnets.DagNet("kink", (1, 1, 4, 4), np.random.default_rng(0))
    h = net.node("MaxPool", ["x"], kernel_shape=[2, 2], strides=[2, 2])
    h = net.node("Flatten", [h])
    w = net.const(np.eye(4))
    b = net.const(np.array([0.0, -1.0, 1.0, 0.0]))
    net.output, net.output_shape = net.node("Relu", [net.node("Gemm", [h, w, b], transB=1)]), ("N", 4)
    return onnxlip.load(net.save(tmp_path / "kink.onnx"))


def test_kinks_and_ties_are_uncertain(tmp_path):
    """A pre-activation exactly at 0 and a max-pooling window whose maximum is
    attained twice are never declared stable, at any radius, and the bound
    covers the slope that moving the tied entries shows."""
    engine = _kink_net(tmp_path)
    x0 = np.zeros((1, 1, 4, 4))
    x0[0, 0, 0, :2] = 1.0  # window 0: a tie (1, 1)
    x0[0, 0, 2:, 2:] = 5.0  # window 3: all tied at 5
    x0[0, 0, 0, 2] = 1.0  # window 1: max 1, minus 1: pre-activation exactly 0
    reach = analyse(engine.blocks, engine.trace(x0), 1e-12)
    pool, relu = reach.counts
    assert pool[2] >= 2 and relu[2] >= 1
    result = engine.local_bound(x0, 1e-12)
    assert result.source != "exact"
    assert result.bound >= 1.0 - 1e-9  # moving one entry of window 1 up moves the output at rate 1


def test_window_whose_winner_holds_is_exact(tmp_path):
    """Clear winners and clear signs: the same net is exact at a small radius."""
    engine = _kink_net(tmp_path)
    x0 = np.arange(16.0).reshape(1, 1, 4, 4) / 4
    result = engine.local_bound(x0, 1e-3)
    assert result.source == "exact"
    jac = engine.jacobian(x0).dense()
    assert result.bound == pytest.approx(np.linalg.norm(jac, 2), rel=1e-9)


def test_global_max_pooling_with_every_entry_tied(tmp_path):
    """GlobalMaxPool: one window per channel. On a constant image every entry of
    a channel ties; moving all of them up together moves the maximum at rate 1,
    so the bound covers ||W|| times that direction's gain, at every method."""
    net = dagnets.DagNet("gmax", (1, 2, 3, 3), np.random.default_rng(1))
    w = np.array([[1.0, 2.0], [-3.0, 0.5]])
    h = net.node("Flatten", [net.node("GlobalMaxPool", ["x"])])
    net.output, net.output_shape = net.node("Gemm", [h, net.const(w)], transB=1), ("N", 2)
    engine = onnxlip.load(net.save(tmp_path / "gmax.onnx"))
    x0 = np.ones((1, 2, 3, 3))
    x0[0, 1] = -2.0
    assert np.allclose(engine.forward(x0), w @ np.array([1.0, -2.0]))
    eps = 1e-3
    one_each = np.zeros((2, 9))
    one_each[:, 0] = np.abs(np.linalg.svd(w)[2][0])  # one entry per channel, up
    directions = [np.ones(18), one_each.ravel(), *np.random.default_rng(2).standard_normal((200, 18))]
    worst = 0.0
    for d in directions:
        x = x0 + eps * (d / np.linalg.norm(d)).reshape(x0.shape)
        worst = max(worst, np.linalg.norm(engine.forward(x) - engine.forward(x0)) / eps)
    assert worst > 0.5 * np.linalg.norm(w, 2)  # the tied entries' slope was found
    for method in ("auto", "paper", "tight"):
        result = engine.local_bound(x0, eps, method=method)
        assert result.bound >= worst * (1 - 1e-9), method
        assert result.source != "exact"
    assert engine.global_bound().bound >= worst * (1 - 1e-9)


def test_first_layer_just_inside_the_reach(tmp_path):
    """Adversarial: pre-activations placed at ±(1 ± 1e-3)·ε·||a_i|| from the kink.
    Those just outside the ball's reach are stable, those just inside are not,
    and the bound still covers sampled ratios."""
    rng = np.random.default_rng(7)
    net = dagnets.DagNet("edge", (1, 8), rng)
    a = rng.standard_normal((6, 8))
    x0 = rng.standard_normal(8)
    eps = 1e-2
    reach = eps * np.linalg.norm(a, axis=1)
    signs = np.array([1, -1, 1, -1, 1, -1])
    margin = np.array([1 + 1e-3, 1 + 1e-3, 1 - 1e-3, 1 - 1e-3, 3.0, 3.0])
    b = signs * margin * reach - a @ x0
    h = net.node("Relu", [net.node("Gemm", ["x", net.const(a), net.const(b)], transB=1)])
    net.output, net.output_shape = net.node("Gemm", [h, net.const(rng.standard_normal((3, 6)))],
                                            transB=1), ("N", 3)
    engine = onnxlip.load(net.save(tmp_path / "edge.onnx"))
    counts = analyse(engine.blocks, engine.trace(x0[None]), eps).counts[0]
    assert counts == (2, 2, 2)  # rows 0, 4 active; 1, 5 inactive; 2, 3 (just inside) uncertain
    result = engine.local_bound(x0[None], eps)
    points = netgen.ball_points(rng, x0, eps, 400, 400, [])
    twin = net.twin()
    assert netgen.max_ratio(twin, x0, points) <= result.bound * SLACK


def _compact(monkeypatch):
    """Every affine block's L stored in float32 (as where float64 would not fit the budget)."""
    monkeypatch.setattr(reach_module, "_storage", lambda states, block, n0, budget: reach_module.COMPACT)


@pytest.mark.parametrize(("family", "seed"), [(f, s) for f in ("dense", "conv") for s in range(8)])
def test_compact_storage_is_sound(tmp_path, monkeypatch, family, seed):
    """L stored in float32: every stored row is within ρ of the float64
    analysis' row (which is within its own ρ of the exact one), and Δz = LΔx + e
    still holds at sampled points. Normalization and batch-norm folds make
    float64 maps whose products float32 cannot hold exactly."""
    twin, engine, x0 = _chain(family, seed, tmp_path)
    rng = np.random.default_rng(seed)
    nominal_trace = engine.trace(x0)
    for level in (1e-4, 1e-2):
        eps = level * float(np.linalg.norm(x0))
        wide = analyse(engine.blocks, nominal_trace, eps, 1e9)
        with monkeypatch.context() as m:
            _compact(m)
            compact = analyse(engine.blocks, nominal_trace, eps, 1e9)
        out, ref = compact.output, wide.output
        assert out.L.dtype == np.float32 and ref.L.dtype == np.float64
        if compact.counts == wide.counts:  # the same relaxation: the same rows up to rounding
            gap = np.linalg.norm(out.L.astype(np.float64) - ref.L, axis=1)
            assert np.all(gap <= out.rho + ref.rho)
        points = netgen.ball_points(rng, x0, eps, 200, 200, [])
        change = twin(points) - twin(x0.ravel()[None])
        linear = (points - x0.ravel()) @ out.L.astype(np.float64).T
        slack = eps * (out.rho + 1e-6 * out.norms) + 1e-6 * np.abs(change)
        assert np.all(change - linear >= out.lo - slack)
        assert np.all(change - linear <= out.hi + slack)


def test_compact_rounding_counted_at_the_kink(tmp_path, monkeypatch):
    """Adversarial: a normalized input (a float64 map, whose rows float32 rounds)
    and first-layer pre-activations at ±(1 − 1e-9)·ε·||a_i/3|| from the kink,
    inside the ball's reach by far less than float32's rounding of the rows: they
    stay uncertain with L in float32; those at 1 + 1e-3 are stable."""
    rng = np.random.default_rng(11)
    net = dagnets.DagNet("kink32", (1, 8), rng)
    a = rng.standard_normal((6, 8)).astype(np.float32)  # the model's weights are float32
    b = rng.standard_normal(6).astype(np.float32)
    eps = 1e-2
    scaled = a.astype(np.float64) / 3.0
    reach = eps * np.linalg.norm(scaled, axis=1)
    signs = np.array([1, -1, 1, -1, 1, -1])
    margin = np.array([1 + 1e-3, 1 + 1e-3, 1 - 1e-9, 1 - 1e-9, 1 - 1e-9, 1 - 1e-9])
    x0 = np.linalg.lstsq(scaled, signs * margin * reach - b, rcond=None)[0]  # a x0 / 3 + b there
    assert np.allclose(scaled @ x0 + b, signs * margin * reach, rtol=0, atol=1e-11 * reach.min())
    h = net.node("Div", ["x", net.const(np.array([3.0]))])
    h = net.node("Relu", [net.node("Gemm", [h, net.const(a), net.const(b)], transB=1)])
    net.output, net.output_shape = net.node("Gemm", [h, net.const(rng.standard_normal((3, 6)))],
                                            transB=1), ("N", 3)
    engine = onnxlip.load(net.save(tmp_path / "kink32.onnx"))
    _compact(monkeypatch)
    result = analyse(engine.blocks, engine.trace(x0[None]), eps, 1e9)
    assert result.output.L.dtype == np.float32
    assert sum(c[2] for c in result.counts if c) == 4
    assert sum(c[0] + c[1] for c in result.counts if c) == 2


def _ascent(twin, x0: np.ndarray, eps: float, coeff: np.ndarray, rng, steps: int = 40) -> float:
    """The largest coeff·(f(x) − f(x0)) found by projected gradient ascent in the ball."""
    x0 = x0.ravel()
    base = float(coeff @ twin(x0[None])[0])
    best = -np.inf
    for start in range(3):
        d = rng.standard_normal(x0.size)
        x = x0 + eps * d / np.linalg.norm(d) * (0.5 if start else 1e-3)
        for _ in range(steps):
            best = max(best, float(coeff @ twin(x[None])[0]) - base)
            g = twin.vjp(x, coeff[None])[0]
            if not np.any(g):
                break
            x = x + 0.3 * eps * g / np.linalg.norm(g)
            d = x - x0
            x = x0 + d * min(1.0, eps / np.linalg.norm(d))
        best = max(best, float(coeff @ twin(x[None])[0]) - base)
    return best


@pytest.mark.parametrize(("family", "seed"), [(f, s) for f in ("dense", "conv") for s in range(8)])
def test_backward_bounds_hold(tmp_path, family, seed):
    """The backward (CROWN-style) bounds of the output's change, pushed through
    every block's relaxation from the analysis, contain the changes found by
    sampling and by gradient ascent on each output (both signs) in float64."""
    net = {"dense": netgen.dense_net, "conv": netgen.conv_net}[family](seed)
    twin, engine, x0 = _chain(family, seed, tmp_path)
    rng = np.random.default_rng(seed)
    last = engine.blocks[-1]
    assert isinstance(last, AffineBlock) and not last.relu
    for level in (1e-3, 3e-2, 0.3):
        eps = level * float(np.linalg.norm(x0))
        reach = analyse(engine.blocks, engine.trace(x0), eps, 1e9)
        prefix = reach.relaxations[:-1]
        lo, hi = refine(engine.blocks, prefix, last.map, np.arange(last.out_size), prefix[-1].out_bound, eps,
                        x0.size)
        points = netgen.ball_points(rng, x0, eps, 200, 200, [])
        change = twin(points) - twin(x0.ravel()[None])
        slack = 1e-6 * (np.abs(change) + eps)  # the float64 twin keeps the weights unrounded
        assert np.all(change >= lo - slack) and np.all(change <= hi + slack)
        for i in range(last.out_size):
            for sign in (1.0, -1.0):
                coeff = np.zeros(last.out_size)
                coeff[i] = sign
                found = _ascent(net, x0, eps, coeff, rng)
                assert found <= (hi[i] if sign > 0 else -lo[i]) + 1e-6 * (abs(found) + eps)


def test_backward_bounds_at_the_kink(tmp_path):
    """Adversarial: hidden pre-activations at the kink (0), just on either side
    (±1e-9 of the reach) and well inside the reach on the side whose reach is the
    smaller (±0.2, ±0.6 of it: the lower line there is −relu(y*), not αΔy), under
    output rows of both signs; the backward bounds contain the largest and
    smallest output changes gradient ascent finds (f = C relu(Ax + b) in float64)."""
    rng = np.random.default_rng(5)
    net = dagnets.DagNet("kinks", (1, 8), rng)
    a = rng.standard_normal((8, 8)).astype(np.float32)
    c = rng.standard_normal((4, 8)).astype(np.float32)
    eps = 0.05
    reach = eps * np.linalg.norm(a.astype(np.float64), axis=1)
    margin = np.array([0.0, 1e-9, -1e-9, 0.2, -0.2, 0.6, -0.6, 1.5])
    b = (margin * reach).astype(np.float32).astype(np.float64)
    x0 = np.zeros(8)
    h = net.node("Relu", [net.node("Gemm", ["x", net.const(a), net.const(b)], transB=1)])
    net.output, net.output_shape = net.node("Gemm", [h, net.const(c)], transB=1), ("N", 4)
    engine = onnxlip.load(net.save(tmp_path / "kinks.onnx"))
    A, C = a.astype(np.float64), c.astype(np.float64)
    reach_ = analyse(engine.blocks, engine.trace(x0[None]), eps, 1e9)
    assert reach_.counts[0][2] >= 6
    last = engine.blocks[-1]
    lo, hi = refine(engine.blocks, reach_.relaxations[:-1], last.map, np.arange(4),
                    reach_.relaxations[-2].out_bound, eps, 8)
    low = reach_.lower_changes(np.hstack([np.eye(4), -np.eye(4)]), eps)  # a certificate's bounds

    def f(x):
        return C @ np.maximum(A @ x + b, 0.0)

    base = f(x0)
    for i in range(4):
        for sign in (1.0, -1.0):
            for _ in range(8):
                d = rng.standard_normal(8)
                x = x0 + eps * d / np.linalg.norm(d)
                for _ in range(60):
                    g = sign * A.T @ ((A @ x + b > 0) * C[i])
                    if not np.any(g):
                        break
                    x = x + 0.2 * eps * g / np.linalg.norm(g)
                    x = x0 + (x - x0) * min(1.0, eps / np.linalg.norm(x - x0))
                    found = f(x)[i] - base[i]
                    assert lo[i] - 1e-9 <= found <= hi[i] + 1e-9
                    assert low[i] - 1e-9 <= found <= -low[4 + i] + 1e-9


@pytest.mark.parametrize(("family", "seed"), [("dense", 1), ("dense", 3)] + [("conv", s) for s in range(4)])
def test_refinement_in_chunks_changes_no_bound(tmp_path, monkeypatch, family, seed):
    """Each refined row's backward pass is its own: refining a block's uncertain
    rows in chunks of 3 (every chunk, REFINE_YIELD 0) gives the bounds of one
    chunk holding them all; a yield above 1 stops after the first chunk, whose
    rows alone are tightened: wider intervals in all."""
    _, engine, x0 = _chain(family, seed, tmp_path)
    nominal = engine.trace(x0)
    eps = 0.3 * float(np.linalg.norm(x0))  # more than 3 uncertain rows in a refined block

    def run(rows: int, share: float):
        monkeypatch.setattr(reach_module, "REFINE_ROWS", rows)
        monkeypatch.setattr(reach_module, "REFINE_YIELD", share)
        return analyse(engine.blocks, nominal, eps, 1e9)

    whole, chunks, first = run(10**6, 0.0), run(3, 0.0), run(3, 1.01)
    assert whole.counts == chunks.counts
    for a, b in zip(whole.changes, chunks.changes):
        for i in range(2):
            np.testing.assert_allclose(a[i], b[i], rtol=1e-9, atol=1e-12)
    # the later chunks count (the sum: a relaxation is not monotone row by row)
    assert sum(np.sum(c[1] - c[0]) for c in first.changes) > sum(np.sum(c[1] - c[0]) for c in chunks.changes)


@pytest.mark.parametrize("seed", range(3))
def test_refinement_stays_within_its_work(tmp_path, monkeypatch, seed):
    """The backward refinement's columns pass at most REFINE_WORK times the
    forward analysis' entries (n0 columns through every block): counted on every
    chunk it runs, on a conv chain with many uncertain rows; with no work
    allowed nothing is refined and the intervals are the forward relaxation's,
    wider."""
    _, engine, x0 = _chain("conv", seed, tmp_path)
    nominal = engine.trace(x0)
    eps = 0.3 * float(np.linalg.norm(x0))
    n0, blocks = x0.size, engine.blocks
    spent = []
    refine_ = reach_module.refine

    def counted(graph, relaxations, linear, rows, *args):
        spent.append(2 * rows.size * sum(b.out_size for b in graph[:-1]))
        return refine_(graph, relaxations, linear, rows, *args)

    monkeypatch.setattr(reach_module, "refine", counted)
    monkeypatch.setattr(reach_module, "REFINE_WORK_MIN", 0.0)
    monkeypatch.setattr(reach_module, "REFINE_ROWS", 2)
    monkeypatch.setattr(reach_module, "REFINE_YIELD", 0.0)  # every chunk, unless the work stops it
    full = analyse(blocks, nominal, eps, 1e9)
    assert len(spent) >= 3
    budget = sum(spent[:-1]) - 1  # short of the last chunk
    monkeypatch.setattr(reach_module, "REFINE_WORK", budget / (n0 * sum(b.out_size for b in blocks)))
    spent.clear()
    capped = analyse(blocks, nominal, eps, 1e9)
    assert 0 < sum(spent) <= budget
    monkeypatch.setattr(reach_module, "REFINE_WORK", 0.0)
    spent.clear()
    none = analyse(blocks, nominal, eps, 1e9)
    assert not spent

    def width(reach):
        return sum(np.sum(c[1] - c[0]) for c in reach.changes)

    assert width(none) > width(capped) >= width(full) * (1 - 1e-9)


LEAD_CASES = ([("chain", f, s) for f in ("dense", "conv") for s in range(6)]
              + [("graph", f, s) for f in dagnets.FAMILIES for s in range(2)])


@pytest.mark.parametrize(("kind", "family", "seed"), LEAD_CASES, ids=[f"{f}{s}" for _, f, s in LEAD_CASES])
def test_output_change_lower_bounds_hold(tmp_path, kind, family, seed):
    """Reach.lower_changes (what certificates bound each lead's change with) is
    below every c·Δf found in float64 by sampling the ball and by projected
    gradient descent on c·f (driven by the engine's Jacobian), for the leads of
    the top output over the others and random rows, from a few uncertain
    neurons to most of them."""
    twin, engine, x0 = (_chain if kind == "chain" else _graph)(family, seed, tmp_path)
    rng = np.random.default_rng(seed)
    out0 = twin(x0.ravel()[None])[0]
    n, top = out0.size, int(np.argmax(out0))
    rivals = [j for j in range(n) if j != top]
    leads = np.zeros((n, len(rivals)))
    leads[top], leads[rivals, np.arange(len(rivals))] = 1.0, -1.0
    rows = np.hstack([leads, rng.standard_normal((n, 2))])
    for level in (1e-3, 3e-2, 0.3):
        eps = level * float(np.linalg.norm(x0))
        reach = analyse(engine.blocks, engine.trace(x0), eps, 1e9)
        low = reach.lower_changes(rows, eps)
        assert low.shape == (rows.shape[1],) and np.all(low <= 0)
        points = netgen.ball_points(rng, x0, eps, 100, 100, [])
        change = (twin(points) - out0) @ rows
        slack = 1e-6 * (np.abs(change) + eps * np.linalg.norm(rows, axis=0))
        assert np.all(change >= low - slack)
        for i in range(min(3, rows.shape[1])):
            x = points[np.argmin(change[:, i])].copy()
            for _ in range(15):
                g = engine.jacobian(x).dense().T @ rows[:, i]
                if not np.any(g):
                    break
                x = x - 0.3 * eps * g / np.linalg.norm(g)
                x = x0.ravel() + (x - x0.ravel()) * min(1.0, eps / np.linalg.norm(x - x0.ravel()))
                found = float((twin(x[None])[0] - out0) @ rows[:, i])
                assert found >= low[i] - 1e-6 * (abs(found) + eps * np.linalg.norm(rows[:, i]))


@pytest.mark.parametrize("seed", range(4))
def test_window_rise_from_the_rows_difference_holds(tmp_path, seed):
    """Adversarial for reach._rise (a window's members bounded by their rows'
    difference): a 1-D convolution then max-pooling over adjacent outputs (members
    that move together), at an x0 that is 0 on half the input (every window
    there tied exactly: all members equal the bias) and small elsewhere (near
    ties); the output's lower bounds (Reach.lower_changes, both signs of every
    output) hold against 20,000 points of the ball and hill-climbing from the
    best of them, in float64, and the pre-activations' reach after the pooling
    contains every sampled value."""
    rng = np.random.default_rng(seed)
    net = dagnets.DagNet("rise", (1, 1, 16), rng)
    w = rng.standard_normal((2, 1, 3)).astype(np.float32)
    b = rng.standard_normal(2).astype(np.float32)
    c = rng.standard_normal((3, 14)).astype(np.float32)
    conv = net.node("Conv", ["x", net.const(w), net.const(b)])
    h = net.node("MaxPool", [conv], kernel_shape=[2], strides=[2])
    net.output = net.node("Gemm", [net.node("Flatten", [h]), net.const(c)], transB=1)
    net.output_shape = ("N", 3)
    engine = onnxlip.load(net.save(tmp_path / "rise.onnx"))
    x0 = np.zeros(16)
    x0[8:] = (1e-3 * rng.standard_normal(8)).astype(np.float32)
    W, B, C = w.astype(np.float64), b.astype(np.float64), c.astype(np.float64)

    def f(x: np.ndarray) -> np.ndarray:
        x = np.atleast_2d(x)
        conv = np.stack([sum(W[o, 0, k] * x[:, k:k + 14] for k in range(3)) + B[o] for o in range(2)], 1)
        return conv.reshape(len(x), 2, 7, 2).max(-1).reshape(len(x), 14) @ C.T

    eps = 0.05
    reach = analyse(engine.blocks, engine.trace(x0[None]), eps, 1e9)
    assert sum(c[2] for c in reach.counts if c) >= 4  # the tied windows are unstable
    # the members are linear in x: the largest y_j − y_w over the ball is exact,
    # (z_j − z_w) + eps·||a_j − a_w||, and the relaxation's t bound is that (from above)
    pool = next(r for r in reach.relaxations if r is not None and r.select is not None)
    rows_ = np.zeros((2, 14, 16))
    for o in range(2):
        for p in range(14):
            rows_[o, p, p:p + 3] = W[o, 0]
    rows_ = rows_.reshape(28, 16)
    z0 = rows_ @ x0 + np.repeat(B, 14)
    windows = np.arange(28).reshape(14, 2)
    for win, t_hi in zip(windows, pool.upper_c):
        top = int(np.argmax(z0[win]))
        if t_hi == 0.0:
            continue
        rise = max(0.0, max(z0[j] - z0[win[top]] + eps * np.linalg.norm(rows_[j] - rows_[win[top]])
                            for j in win if j != win[top]))
        assert rise * (1 - 1e-9) - 1e-12 <= t_hi <= rise * (1 + 1e-6) + 1e-6  # + the float32 trace's widths
    rows = np.hstack([np.eye(3), -np.eye(3)])
    low = reach.lower_changes(rows, eps)
    d = rng.standard_normal((20000, 16))
    points = x0 + eps * d / np.linalg.norm(d, axis=1)[:, None] * rng.random((20000, 1)) ** (1 / 16)
    points[:10000] = x0 + eps * d[:10000] / np.linalg.norm(d[:10000], axis=1)[:, None]
    change = (f(points) - f(x0)) @ rows
    assert np.all(change >= low - 1e-9)
    for i in range(rows.shape[1]):
        x = points[np.argmin(change[:, i])]
        for step in np.geomspace(eps / 4, eps / 1e3, 300):  # hill-climbing on the sphere
            trial = x + step * rng.standard_normal(16)
            trial = x0 + eps * (trial - x0) / np.linalg.norm(trial - x0)
            if (f(trial) - f(x0)) @ rows[:, i] < (f(x) - f(x0)) @ rows[:, i]:
                x = trial
        assert ((f(x) - f(x0)) @ rows[:, i])[0] >= low[i] - 1e-9


def test_relu_relaxation_lines_hold():
    """Every ReLU relaxation line holds: for y* anywhere in [low, high] (where the
    exact value at x0 lies) and y anywhere in the reachable [y* + Δ_lo, y* + Δ_hi],
    lower·Δy + lower_c ≤ relu(y) − relu(y*) ≤ upper·Δy + upper_c. Adversarial
    intervals: asymmetric reaches, y* on the side whose reach is the smaller,
    at the kink, l = u (zero-width), and within rounding of 0."""
    rng = np.random.default_rng(3)
    n = 4000
    low = rng.standard_normal(n) * 10.0 ** rng.integers(-12, 1, n)
    low[:50] = 0.0
    width = np.where(rng.random(n) < 0.3, 0.0, rng.random(n) * 10.0 ** rng.integers(-14, 0, n))
    high = low + width
    fall = rng.random(n) * 10.0 ** rng.integers(-3, 1, n)
    rise = rng.random(n) * 10.0 ** rng.integers(-3, 1, n)
    boxes = [reach_module.Box(slice(0, 1), None, np.zeros((n, 1)))]
    state = reach_module.Linear(boxes, np.zeros(n), np.zeros(n), np.zeros(n), np.ones(n, bool), np.ones(n), 1,
                                np.dtype(np.float64))
    _, counts, relax = reach_module._relu(state, (low, high), (-fall, rise), True)
    assert counts[2] > 1000
    for _ in range(20):
        y_star = low + rng.random(n) * (high - low)
        y_star[::7] = low[::7]
        y_star[1::7] = high[1::7]
        delta = np.where(rng.random(n) < 0.5, -fall, rise) * rng.random(n) ** 0.2
        delta[2::7], delta[3::7] = -fall[2::7], rise[3::7]
        truth = np.maximum(y_star + delta, 0.0) - np.maximum(y_star, 0.0)
        scale = 1e-12 * (np.abs(y_star) + np.abs(delta))
        assert np.all(truth <= relax.upper * delta + relax.upper_c + scale)
        assert np.all(truth >= relax.lower * delta + relax.lower_c - scale)
        # any lower slope α ∈ [0, 1] of the uncertain rows (what the lead bounds search over)
        for alpha in (0.0, 1.0, rng.random(int(relax.free.sum()))):
            line = relax.with_slopes(np.broadcast_to(alpha, (int(relax.free.sum()),)))
            assert np.all(truth >= line.lower * delta + line.lower_c - scale)


@pytest.mark.parametrize(("family", "seed"), [("dense", 1), ("conv", 0)])
def test_through_is_every_rows_line_choice(tmp_path, family, seed):
    """Relaxation.through (the backward pass: a line chosen only on the rows where
    the two differ, or from the split into positive and negative parts) gives the
    products of choosing on every row: the same coefficients, and per column the
    sums of the intercepts' terms and of their magnitudes within γ_{n+1}; for
    every ReLU and max-pooling relaxation of nets with many uncertain rows, on
    coefficients with zeros, both signs and -0.0. The backward pass reuses the
    memory of its own coefficients only: a caller's are left as they were."""
    _, engine, x0 = _chain(family, seed, tmp_path)
    eps = 0.3 * float(np.linalg.norm(x0))
    every_block = analyse(engine.blocks, engine.trace(x0), eps, 1e9).relaxations
    relaxations = [r for r in every_block if r is not None]
    assert any(r.free is not None and r.free.any() for r in relaxations)
    rng = np.random.default_rng(seed)
    last = max(k for k, r in enumerate(every_block) if r is not None and r._picked * 8 > r.upper_c.size)
    coeff = rng.standard_normal((engine.blocks[last].out_size, 3))
    given = coeff.copy()
    first = upper_bounds(engine.blocks[:last + 1], every_block[:last + 1], coeff, eps, x0.size)
    assert np.array_equal(coeff, given)
    assert np.array_equal(upper_bounds(engine.blocks[:last + 1], every_block[:last + 1], coeff, eps, x0.size),
                          first)
    # and lines set apart: either slope or intercept alone differing or nonzero, on
    # many rows (chosen on every row at once) and on few (chosen on those rows only)
    for every in (3, 97):
        n = 1000
        upper, upper_c, lower_c = rng.random(n), np.zeros(n), np.zeros(n)
        lower = upper.copy()
        lower[::every] = rng.random(n)[::every]
        upper_c[1::every], lower_c[2::every] = rng.standard_normal((2, len(range(1, n, every))))[:, :]
        lower_c[3::every] = upper_c[3::every] = 1.0
        relaxations.append(Relaxation(None, upper, upper_c, lower, lower_c, 1.0, 1.0, 1.0))
    picked = 0
    for r in relaxations:
        coeff = rng.standard_normal((r.upper_c.size, 5))
        coeff[rng.random(coeff.shape) < 0.2] = 0.0
        coeff[:, 0] = -0.0
        slope, shift = r.lines(coeff >= 0)
        out, sums, magnitudes = r.through(coeff)
        expected = r.gather @ coeff if slope is None else coeff * slope
        assert np.array_equal(out, expected)
        full = coeff * shift
        exact = [math.fsum(column) for column in full.T]
        size = [math.fsum(column) for column in np.abs(full).T]
        slack = gamma(coeff.shape[0] + 1, U64) * np.array(size)
        assert np.all(np.abs(sums - exact) <= slack)
        assert np.all(np.abs(magnitudes - size) <= slack)
        picked += r._picked * 8 <= coeff.shape[0]
        spent = coeff.copy()  # the same where the coefficients' memory may be reused
        again = r.through(spent, scratch=True)
        assert np.array_equal(again[0], out) and np.array_equal(again[1], sums)
        assert np.array_equal(again[2], magnitudes)
    assert 0 < picked < len(relaxations)  # both ways of choosing ran


@pytest.mark.parametrize(("family", "seed"), [("dense", 1), ("conv", 0), ("conv", 2)])
def test_slope_search_gradient_and_gain(tmp_path, family, seed):
    """The lead bounds' search over the uncertain rows' lower slopes: its gradient
    matches finite differences of its value, and on these nets (many uncertain
    rows at 0.3·||x0||) it lowers some column's bound below the default lines'
    (both bounds are evaluated soundly; test_output_change_lower_bounds_hold
    checks them against float64 evaluations)."""
    from onnxlip import refine as refine_module

    _, engine, x0 = _chain(family, seed, tmp_path)
    eps = 0.3 * float(np.linalg.norm(x0))
    relaxations = analyse(engine.blocks, engine.trace(x0), eps, 1e9).relaxations
    rng = np.random.default_rng(seed)
    coeff = rng.standard_normal((engine.blocks[-1].out_size, 4))
    free = {k: int(r.free.sum()) for k, r in enumerate(relaxations) if r.free is not None and r.free.any()}
    alpha = {k: rng.uniform(0.1, 0.9, (n, 4)) for k, n in free.items()}
    blocks = engine.blocks
    value, gradient = refine_module._value_and_gradient(blocks, relaxations, coeff, eps, x0.size, alpha)
    for k, n in free.items():
        for i in rng.integers(n, size=3):
            j = int(rng.integers(4))
            moved = {key: a.copy() for key, a in alpha.items()}
            moved[k][i, j] += 1e-2  # the value is piecewise linear in α; float32 convolutions add noise
            finite = (refine_module._value_and_gradient(engine.blocks, relaxations, coeff, eps, x0.size,
                                                        moved)[0][j] - value[j]) / 1e-2
            assert finite == pytest.approx(gradient[k][i, j], rel=1e-2, abs=1e-4 * (1 + abs(value[j])))
    default = refine_module.upper_bounds(engine.blocks, relaxations, coeff, eps, x0.size)
    searched = refine_module.optimized_upper_bounds(engine.blocks, relaxations, coeff, eps, x0.size)
    assert np.all(searched <= default) and np.any(searched < default * (1 - 1e-3))
    # columns already good enough are not searched; the others are, as before
    enough = np.where(np.arange(4) % 2, default, -np.inf)
    some = refine_module.optimized_upper_bounds(engine.blocks, relaxations, coeff, eps, x0.size, enough)
    assert np.array_equal(some[1::2], default[1::2])
    alone = refine_module.optimized_upper_bounds(blocks, relaxations, coeff[:, ::2], eps, x0.size)
    assert np.array_equal(some[::2], alone) and np.all(alone <= default[::2])


TIGHT_SET = ["tight_mlp6x50", "tight_mlp6x50_matmul", "tight_cnn_maxpool", "tight_cnn_avgpool",
             "tight_cnn_bn"]


@pytest.mark.parametrize("name", TIGHT_SET)
def test_tight_set_is_exact(name):
    """Issue acceptance: at ε = 1e-3 every ReLU and window of the trained tight
    set is proven stable (the counts the model was built with, in its
    metadata) and the bound is within 0.1% of ||J(x0)||."""
    path = ROOT / "models" / f"{name}.onnx"
    meta = {p.key: p.value for p in onnx.load(path).metadata_props}
    engine = onnxlip.load(path)
    x0 = np.load(ROOT / "models" / f"{name}_x0.npy")
    eps = float(meta["stable_eps"])
    result = engine.local_bound(x0, eps)
    assert result.source == "exact"
    relus = sum(r.active + r.inactive for r in result.layers if r.kind in ("affine-relu", "relu"))
    windows = sum(r.active for r in result.layers if r.kind == "maxpool")
    assert relus == int(meta["stable_relus"])
    assert windows == int(meta["stable_maxpool_windows"])
    assert all(not r.uncertain for r in result.layers)
    lower = engine.lower_bounds(x0, [eps], samples=8, ascent_steps=3)[0]
    assert lower.jacobian_certified <= result.bound <= 1.001 * lower.jacobian_certified
    assert result.bound <= engine.local_bound(x0, eps, method="paper").bound


@pytest.mark.parametrize("name", ["digits_mlp", "digits_cnn", "cifar_bn", "tiny_dense"])
def test_shipped_models_never_above_paper(name):
    engine = onnxlip.load(ROOT / "models" / f"{name}.onnx")
    x0 = np.load(ROOT / "models" / f"{name}_x0.npy")
    for eps in (1e-3, 1e-1):
        auto = engine.local_bound(x0, eps)
        paper = engine.local_bound(x0, eps, method="paper")
        jac = engine.jacobian_norm(x0)
        assert jac * (1 - 1e-6) <= auto.bound <= paper.bound * (1 + 2 * TOL)


def test_memory_budget_falls_back_with_a_note(tmp_path):
    """Past the budget the analysis stops, the blocks keep the paper's radii, and
    the result says so; the bound stays sound."""
    _, engine, x0 = _chain("dense", 1, tmp_path)
    engine.memory_budget = 10.0
    result = engine.local_bound(x0, 1e-3)
    assert result.source in ("paper", "tight")
    assert any("memory budget" in n for n in result.notes)
    assert all(r.test == "paper radius" for r in result.layers)


def test_input_past_the_budget_allocates_nothing(tmp_path, monkeypatch):
    """An input whose identity alone exceeds the budget (ImageNet-sized: 150,528² floats
    would be 84 GiB even in float32) stops the analysis before any allocation."""
    _, engine, x0 = _chain("conv", 2, tmp_path)
    engine.memory_budget = reach_module.COMPACT.itemsize * x0.size**2 - 1
    monkeypatch.setattr(reach_module, "_column_order", lambda *a: pytest.fail("built the identity"))
    result = engine.local_bound(x0, 1e-3)
    assert any("from the input on" in n for n in result.notes)


BOX_CASES = [("chain", f, s) for f in ("dense", "conv", "wide") for s in (0, 2, 5)] + \
    [("graph", f, s) for f in dagnets.FAMILIES for s in (0, 1)]


def _expand(boxes: list, rows: int) -> None:
    """The boxes expanded to all `rows` rows (the others 0), in place."""
    for box in boxes:
        if box.rows is not None:
            full = np.zeros((rows, box.block.shape[1]), box.block.dtype, order="F")
            full[box.rows] = box.block
            box.rows, box.block = None, full


def _expanded(make):
    """reach's `make` (_identity, _affine or _maxpool) with the boxes of what it returns expanded."""
    def expanded(*args):
        result = make(*args)
        if isinstance(result, list):  # _identity(order, tile)
            _expand(result, args[0].size)
        elif result is not None:
            state = result[0] if isinstance(result, tuple) else result
            _expand(state.boxes, state.shape[0])
        return result
    return expanded


@pytest.mark.parametrize(("kind", "family", "seed"), BOX_CASES, ids=[f"{f}{s}" for _, f, s in BOX_CASES])
def test_boxes_change_nothing(tmp_path, monkeypatch, kind, family, seed):
    """L kept by boxes (the rows a tile of columns reaches through convolutions,
    max-pooling, stacks and ReLU slopes) is L: the analysis equals (up to the
    order of dense products' sums) the one where every box is expanded to all
    rows (the other rows 0), at radii
    from all stable to mostly uncertain, also with column chunks of a few
    columns; and where the first map keeps boxes (convolutions, selections), boxes
    of a part of the rows are kept."""
    _, engine, x0 = (_chain if kind == "chain" else _graph)(family, seed, tmp_path)
    nominal = engine.trace(x0)
    partial, affine = [], reach_module._affine

    def watched(linear, state, *args):
        out = affine(linear, state, *args)
        partial.extend(b.rows is not None and b.rows.size < out.shape[0] for b in getattr(out, "boxes", []))
        return out

    for level, small in ((1e-4, False), (0.01, False), (0.3, False), (0.01, True), (0.3, True)):
        eps = level * float(np.linalg.norm(x0))
        if small:  # tiles of 2 × 2 positions, every convolution cropped, products of a few columns
            monkeypatch.setattr(reach_module, "TILE", 4)
            monkeypatch.setattr(conv_module, "CROP_MAX", 1.0)
            monkeypatch.setattr(reach_module, "CHUNK_BYTES", 8 * 20 * max(b.out_size for b in engine.blocks))
        with monkeypatch.context() as m:
            for name in ("_identity", "_affine", "_maxpool"):
                m.setattr(reach_module, name, _expanded(getattr(reach_module, name)))
            dense = analyse(engine.blocks, nominal, eps, 1e9)
        monkeypatch.setattr(reach_module, "_affine", watched)
        result = analyse(engine.blocks, nominal, eps, 1e9)
        assert result.counts == dense.counts
        for x, y in zip(result.changes, dense.changes):
            assert (x is None) == (y is None)
            if x is not None:  # a dense map's products grouped by other columns: BLAS may round apart
                np.testing.assert_allclose(x, y, rtol=1e-13, atol=0)
        for field in ("L", "rho", "lo", "hi", "norms", "moving"):
            want = getattr(dense.output, field)
            np.testing.assert_allclose(getattr(result.output, field), want, rtol=1e-13,
                                       atol=1e-13 * float(np.abs(want).max(initial=0)))
    # a boxed map reading the input (its boxes: a tile's rows) keeps boxes
    assert any(partial) or not any(isinstance(b, AffineBlock) and b.map.boxed and list(b.inputs) == [INPUT]
                                   for b in engine.blocks)


def test_cli_defaults_to_auto_and_reports_it(tmp_path):
    model, x0 = ROOT / "models" / "tight_mlp6x50.onnx", ROOT / "models" / "tight_mlp6x50_x0.npy"
    out = subprocess.run([sys.executable, "-m", "onnxlip", "bound", str(model), "-x", str(x0),
                          "--eps", "1e-3", "--json"], capture_output=True, text=True, cwd=ROOT, check=True)
    data = json.loads(out.stdout)
    assert data["method"] == "auto"
    point = data["points"][0]
    assert point["source"] == "exact" and point["guarantee"] == "deterministic"
    assert point["lower_bound"] <= point["local_bound"] <= 1.001 * point["lower_bound"]


@given(spec=networks(), eps=st.floats(-4.0, 1.0).map(lambda e: float(10.0**e)))
def test_lower_auto_paper_are_ordered(tmp_path_factory, spec, eps):
    """hypothesis: lower ≤ auto ≤ paper on random small networks (tests/propnets.py)."""
    note(repr(spec))
    path = tmp_path_factory.mktemp("auto") / "net.onnx"
    onnx.save(build(spec), path)
    net = onnxlip.load(path)
    x0 = nominal(spec)
    lower = net.lower_bounds(x0, [eps], samples=16, ascent_steps=5)[0].best
    auto, paper = net.local_bound(x0, eps), net.local_bound(x0, eps, method="paper")
    note(f"lower {lower!r}, auto {auto.bound!r} ({auto.source}), paper {paper.bound!r}")
    assert 0 <= lower <= auto.bound * SLACK
    assert auto.bound <= paper.bound * (1 + 2 * TOL)


def test_carry_capped_by_the_paper_suffix(tmp_path, monkeypatch):
    """On a chain the telescoping's carry of a block is also capped by the product of
    the paper's block bounds after it (onnxlip.tight._suffix_products): on this net
    at this radius the cap binds (the bound is lower than without it), and the
    bound still covers sampled ratios of the float64 twin and the lower bounds.
    (The windows' rise bounded without the rows' difference, reach._rise: with
    it, no net of the family leaves enough uncertain for the cap to bind.)"""
    from onnxlip import tight

    monkeypatch.setattr(reach_module, "_rise",
                        lambda state, zlo, zhi, members, *_: np.full(len(members), np.inf))
    monkeypatch.setattr(tight, "joint_bound", lambda *a: (math.inf, False))  # the telescoping alone
    twin, engine, x0 = _chain("conv", 6, tmp_path)
    eps = 0.03 * float(np.linalg.norm(x0))
    nominal = engine.trace(x0)
    reach = analyse(engine.blocks, nominal, eps, 1e9)
    capped = tight.tight_local_bound(engine.blocks, nominal, eps, engine.tol, reach=reach.changes)
    monkeypatch.setattr(tight, "_suffix_products", lambda paper: [np.inf] * len(paper.layers))
    uncapped = tight.tight_local_bound(engine.blocks, engine.trace(x0), eps, engine.tol,
                                       reach=reach.changes)
    assert capped.source == uncapped.source == "tight"
    assert capped.bound < uncapped.bound * (1 - 2 * TOL)
    rng = np.random.default_rng(6)
    directions = list(np.linalg.svd(engine.jacobian(x0).dense())[2][:2])
    points = netgen.ball_points(rng, x0, eps, 400, 400, directions)
    assert netgen.max_ratio(twin, x0, points) <= capped.bound * SLACK
    lower = engine.lower_bounds(x0, [eps], samples=32, ascent_steps=20)[0]
    assert lower.best <= capped.bound * SLACK


@pytest.mark.parametrize("order", ["C", "F"])
def test_maxpool_relaxation_gathers_like_its_matrix(order):
    """A max-pooling relaxation reads coefficients back to the inputs its windows
    follow as its 0/1 matrix does, windows sharing an input adding up (overlapping
    windows) and still windows dropping out, in the coefficients' memory order."""
    from onnxlip.refine import maxpool_relaxation

    rng = np.random.default_rng(5)
    for select in (rng.permutation(12)[:8], np.array([0, 0, 3, -1, 3, 3, 7, 11, 0]), np.full(4, -1)):
        step = maxpool_relaxation(select, np.zeros(select.size), np.zeros(select.size), 12, 1.0, 1.0)
        coeff = np.asarray(rng.standard_normal((select.size, 3)), order=order)
        gathered = step.gathered(coeff)
        assert np.allclose(gathered, step.gather @ coeff, rtol=1e-15, atol=0)
        assert gathered.flags.f_contiguous if order == "F" else gathered.flags.c_contiguous
        assert np.all(gathered[np.setdiff1d(np.arange(12), select)] == 0)


def test_refinement_probe_stops_where_nothing_is_decided(tmp_path, monkeypatch):
    """A block with more uncertain rows than a chunk starts its refinement with a
    probe of its REFINE_PROBE rows nearest to a decision: where the backward pass
    neither decides nor narrows them it stops there (a few rows' passes, not a
    chunk's); where it does it goes on in whole chunks, the probe's rows counted
    in the first chunk's yield: the same intervals as without a probe."""
    _, engine, x0 = _chain("wide", 0, tmp_path)
    nominal = engine.trace(x0)
    eps = 0.05 * float(np.linalg.norm(x0))
    sizes, refine_ = [], reach_module.refine

    def counted(graph, relaxations, linear, rows, *args):
        sizes.append(rows.size)
        return refine_(graph, relaxations, linear, rows, *args)

    monkeypatch.setattr(reach_module, "refine", counted)
    monkeypatch.setattr(reach_module, "REFINE_ROWS", 40)
    monkeypatch.setattr(reach_module, "REFINE_PROBE", 8)
    probed = analyse(engine.blocks, nominal, eps, 1e9)
    assert sizes[0] == 8 and 32 in sizes, sizes  # on past the probe, to the first chunk's end
    monkeypatch.setattr(reach_module, "REFINE_PROBE", 40)  # no probe: whole chunks from the start
    plain = analyse(engine.blocks, nominal, eps, 1e9)
    assert probed.counts == plain.counts
    for a, b in zip(probed.changes, plain.changes):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
    # a backward pass that gains nothing: one probe per block with more rows than a chunk
    monkeypatch.setattr(reach_module, "REFINE_PROBE", 8)
    calls = []  # (block, rows)
    monkeypatch.setattr(reach_module, "refine", lambda graph, relaxations, linear, rows, *args: (
        calls.append((len(graph), rows.size)), (np.full(rows.size, -np.inf), np.full(rows.size, np.inf)))[1])
    analyse(engine.blocks, nominal, eps, 1e9)
    blocks = [k for k, _ in calls]
    assert len(set(blocks)) == len(blocks) and (8 in dict(calls).values()), calls  # one pass per block
