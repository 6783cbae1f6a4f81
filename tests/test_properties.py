"""Property-based tests: random small networks (tests/propnets.py) must keep
the engine's forward pass equal to onnxruntime's and the bounds in order:
lower bounds ≤ local bound ≤ global bound, the local bound non-decreasing in
ε, and each block's local bound below its global spectral norm.

Upper bounds are certified values within a factor 1 + tol of the Lanczos Ritz
value (onnxlip.spectral), so two upper bounds of nearly equal true values can
come out in either order by up to tol. Comparisons between two upper bounds
therefore put the Ritz value of the smaller side (`ritz`, a lower estimate)
against the upper bound of the larger side, with the relative slack SLACK.
Lower bounds from real evaluations are compared with the upper bound as reported.

The same order holds over random DAGs (propnets.dag_nets: residual Add/Sub,
fan-out, Concat, pooling branches), where the local bounds are computed before
the global bound (a network caps its local bounds by a global bound it knows)
and also checked against float64 difference quotients of the net's twin.

Quick by default (25 examples per property); ONNXLIP_HYPOTHESIS_PROFILE=long
runs thousands (profiles in tests/conftest.py).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import example, given, note
from hypothesis import strategies as st
from netgen import ball_points, max_ratio
from propnets import NetSpec, build, build_dag, dag_nets, dag_nominal, dense_nets, networks, nominal

import onnxlip

SLACK = 1e-6
EPS = st.floats(-4.0, 1.0).map(lambda e: float(10.0**e))
_counter = itertools.count()

# Examples the long profile found (kept as regression cases).
SETTLED_EARLY = NetSpec((1, 2, 9), (
    ("Sub", (("const_shape", (2, 9)),)), ("Sub", (("const_shape", (2, 9)),)),
    ("Conv", (("m", 4), ("kernel", (1,)), ("strides", (1,)), ("pads", (0, 0)), ("dilations", (1,)),
              ("group", 2), ("bias", False), ("out", (1, 4, 9)))),
    ("BatchNormalization", ()), ("Relu", ()),
    ("Conv", (("m", 8), ("kernel", (1,)), ("strides", (1,)), ("pads", (0, 0)), ("dilations", (1,)),
              ("group", 4), ("bias", True), ("out", (1, 8, 9)))),
    ("Relu", ()), ("Flatten", ()), ("MatMul", (("n_out", 1),)), ("Sub", (("const_shape", ()),))),
    37270)  # L(ε) settles with residual 8e-4: its upper bound is above L(2ε)'s
ONE_BY_ONE = NetSpec((1, 2, 3, 6), (
    ("Conv", (("m", 1), ("kernel", (1, 1)), ("strides", (1, 1)), ("pads", (0, 0, 0, 0)),
              ("dilations", (1, 1)), ("group", 1), ("bias", False), ("out", (1, 1, 3, 6)))),
    ("RSub", (("const_shape", ()),)), ("Relu", ()), ("Flatten", ()), ("MatMul", (("n_out", 1),)),
    ("Sub", (("const_shape", ()),))), 0)  # block local above block global by its residual
SMALL_OUTPUT = NetSpec((1, 7), (
    ("MatMul", (("n_out", 2),)), ("BatchNormalization", ()), ("Relu", ()),
    ("MatMul", (("n_out", 1),))), 326)  # f(x0) = 0.075 but hidden values ~1.4


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("propnets")


def _load(workdir: Path, spec: NetSpec, inside_hypothesis: bool = True) -> tuple[onnxlip.Network, Path]:
    if inside_hypothesis:
        note(repr(spec))
    path = workdir / f"net{next(_counter)}.onnx"
    onnx.save(build(spec), path)
    return onnxlip.load(path), path


def _onnxruntime(path: Path, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0].astype(np.float64)


@given(spec=networks())
def test_forward_matches_onnxruntime(workdir, spec):
    net, path = _load(workdir, spec)
    x0 = nominal(spec)
    ours, ref = net.forward(x0), _onnxruntime(path, x0)
    assert ours.shape == ref.shape
    assert np.linalg.norm(ours - ref) <= 1e-4 * np.linalg.norm(ref) + 1e-7


@given(spec=networks(), eps=EPS)
def test_lower_local_global_are_ordered(workdir, spec, eps):
    net, _ = _load(workdir, spec)
    x0 = nominal(spec)
    lower = net.lower_bounds(x0, [eps], samples=16, ascent_steps=5)[0].best
    result = net.local_bound(x0, eps)
    local, glob = result.bound, net.global_bound().bound
    note(f"lower {lower!r}, local {local!r}, global {glob!r}")
    assert np.isfinite(local) and np.isfinite(glob)
    assert 0 <= lower <= local * (1 + SLACK)
    assert result.ritz <= glob * (1 + SLACK)


@given(spec=networks(), eps=EPS)
@example(spec=SETTLED_EARLY, eps=5.623413251903491)
def test_local_bound_grows_with_eps(workdir, spec, eps):
    net, _ = _load(workdir, spec)
    small, large = net.local_bounds(nominal(spec), [eps, 2 * eps], method="paper")
    note(f"L(eps) {small.bound!r}, L(2 eps) {large.bound!r}")
    assert small.ritz <= large.bound * (1 + SLACK)


@given(spec=networks(), eps=EPS)
@example(spec=ONE_BY_ONE, eps=10.0)
def test_block_local_bounds_below_block_norms(workdir, spec, eps):
    net, _ = _load(workdir, spec)
    local, glob = net.local_bound(nominal(spec), eps, method="paper"), net.global_bound()
    assert len(local.layers) == len(glob.layers) == len(net.blocks)
    for mine, norm in zip(local.layers, glob.layers):
        ritz = mine.bound if mine.ritz is None else mine.ritz  # at most the block's true norm
        assert ritz <= norm.bound * (1 + SLACK), (mine.name, mine.bound, mine.ritz, norm.bound)


@given(spec=dense_nets())
def test_operator_modes_agree(workdir, spec):
    """Dense and sparse representations give the same global bound."""
    path = workdir / f"net{next(_counter)}.onnx"
    onnx.save(build(spec), path)
    note(repr(spec))
    auto = onnxlip.load(path).global_bound().bound
    sparse = onnxlip.load(path, operators="sparse").global_bound().bound
    assert sparse == pytest.approx(auto, rel=1e-5)


def test_sampled_lower_bound_below_jacobian_norm_on_affine_ball(workdir):
    """All ReLUs are stable in the ball, so the truth is ||J(x0)|| = the local bound exactly."""
    net, _ = _load(workdir, SMALL_OUTPUT, inside_hypothesis=False)
    x0, eps = nominal(SMALL_OUTPUT), 0.011547819846894581
    lower = net.lower_bounds(x0, [eps], samples=16, ascent_steps=5)[0]
    assert lower.jacobian_exact
    assert lower.sampled <= lower.jacobian_norm * (1 + SLACK)


def _load_dag(workdir: Path, spec) -> tuple[onnxlip.Network, Path, object]:
    note(repr(spec))
    net = build_dag(spec)
    path = net.save(workdir / f"dag{next(_counter)}.onnx")
    return onnxlip.load(path), path, net


@given(spec=dag_nets(), eps=EPS)
def test_dag_lower_local_global_are_ordered(workdir, spec, eps):
    """On a DAG: forward pass = onnxruntime's; sampled ratios (float64 twin) and onnxlip's
    lower bounds ≤ local ('paper' and 'tight') ≤ global, compared as BoundResult.ritz says."""
    engine, path, net = _load_dag(workdir, spec)
    x0 = dag_nominal(spec)
    ours, ref = engine.forward(x0), _onnxruntime(path, x0.astype(np.float32))
    assert np.linalg.norm(ours - ref) <= 1e-4 * np.linalg.norm(ref) + 1e-7
    paper, tight = engine.local_bound(x0, eps, method="paper"), engine.local_bound(x0, eps, method="tight")
    auto = engine.local_bound(x0, eps)
    upper = [(r.bound, r.ritz) for r in (paper, tight, auto)]  # before anything can re-solve them
    glob = engine.global_bound().bound
    twin = net.twin()
    sampled = max_ratio(twin, x0, ball_points(np.random.default_rng(spec.seed), x0, eps, 40, 40))
    lower = engine.lower_bounds(x0, [eps], samples=16, ascent_steps=5)[0].best
    note(f"sampled {sampled!r}, lower {lower!r}, paper {upper[0]!r}, tight {upper[1]!r}, global {glob!r}")
    assert upper[1][1] <= upper[0][0] * (1 + SLACK)
    assert upper[2][0] <= upper[0][0] * (1 + 2 * engine.tol)
    for bound, ritz in upper:
        assert max(sampled, lower) <= bound * (1 + SLACK)
        assert ritz <= glob * (1 + SLACK)


@given(spec=dag_nets(), eps=EPS)
def test_dag_local_bound_grows_with_eps(workdir, spec, eps):
    engine, _, _ = _load_dag(workdir, spec)
    small, large = engine.local_bounds(dag_nominal(spec), [eps, 2 * eps], method="paper")
    note(f"L(eps) {small.bound!r}, L(2 eps) {large.bound!r}")
    assert small.ritz <= large.bound * (1 + SLACK)
