"""The tight bound on graphs (onnxlip.tight): the linearized network with its
uncertain neurons bounded apart, on residual, concat and fan-out nets with
uncertain neurons in a branch, max-pooling in a branch, and ties at kinks.

Each case is built so that the reach analysis leaves neurons or windows
uncertain at the radius tested (asserted), and the tight bound must come from
the graph's telescoping (source 'tight', below the paper's composition) and
cover float64 sampling (the net's twin, with J(x0)'s top singular directions)
and projected gradient ascent (tools/dag_battery.py's), as well as onnxlip's
own lower bounds.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import dagnets
import netgen
import numpy as np
import pytest

import onnxlip
from onnxlip import tight as tight_module
from onnxlip.blocks import is_chain
from onnxlip.reach import analyse
from onnxlip.tight import tight_local_bound

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from dag_battery import ascent  # noqa: E402

SLACK = 1 + 1e-6
TOL = 1e-3


def _f32(a: np.ndarray) -> np.ndarray:
    """What the float32 model holds."""
    return np.asarray(a).astype(np.float32).astype(np.float64)


def _dense(net: dagnets.DagNet, x: str, w: np.ndarray, b: np.ndarray) -> str:
    net.output_shape = ("N", w.shape[0])
    return net.node("Gemm", [x, net.const(w), net.const(b)], transB=1)


def _near_kinks(rng, w: np.ndarray, h0: np.ndarray, scale: float, offsets) -> np.ndarray:
    """Biases putting row i's pre-activation at x0 at offsets[i]·scale·||w_i|| from its kink."""
    return _f32(-(w @ h0) + np.asarray(offsets) * scale * np.linalg.norm(w, axis=1))


def residual_branch(eps: float, tie: bool = False):
    """x -> h = relu(W1 x + 2) (stable) -> h + W3 relu(W2 h + b2) -> relu -> W4, with
    half of the branch's neurons within reach of their kink (tie: exactly at it)."""
    rng = np.random.default_rng(11)
    net = dagnets.DagNet("resbranch", (1, 6), rng)
    x0 = np.zeros(6) if tie else _f32(rng.standard_normal(6) * 0.3)
    w1, b1 = _f32(rng.standard_normal((8, 6)) / 3), np.full(8, 2.0)
    w2 = _f32(rng.integers(-3, 4, (8, 8)) if tie else rng.standard_normal((8, 8)) / 3)
    h0 = np.maximum(w1 @ x0 + b1, 0)
    b2 = _near_kinks(rng, w2, h0, eps, [0.0, 0.0, 0.0, 0.0, 3, -3, 3, -3] if tie else
                     [-0.3, 0.2, 0.05, -0.1, 3, -3, 3, -3])
    w3, w4 = _f32(rng.standard_normal((8, 8)) / 2), _f32(rng.standard_normal((3, 8)) / 3)
    h = net.node("Relu", [_dense(net, "x", w1, b1)])
    branch = _dense(net, net.node("Relu", [_dense(net, h, w2, b2)]), w3, np.zeros(8))
    h = net.node("Relu", [net.node("Add", [h, branch])])
    net.output = _dense(net, h, w4, np.zeros(3))
    return net, x0


def _stable_stem(name: str, size: int, width: int, seed: int):
    """(net, rng, x0, h0, h): an input of `size` and a ReLU layer of `width` whose
    pre-activations sit near 2 (stable), h its tensor and h0 its value at x0."""
    rng = np.random.default_rng(seed)
    net = dagnets.DagNet(name, (1, size), rng)
    x0 = _f32(rng.standard_normal(size) * 0.3)
    w1, b1 = _f32(rng.standard_normal((width, size)) / 2), np.full(width, 2.0)
    h0 = np.maximum(w1 @ x0 + b1, 0)
    return net, rng, x0, h0, net.node("Relu", [_dense(net, "x", w1, b1)])


def concat_branches(eps: float):
    """Two ReLU branches on one stable stem, concatenated, then a Gemm; neurons of
    both branches within reach of their kinks."""
    net, rng, x0, h0, stem = _stable_stem("catbranch", 5, 6, 12)
    branches = []
    for offsets in ([0.2, -0.4, 2, -2, 3], [-0.1, 0.3, 0.1, 4]):
        w = _f32(rng.standard_normal((len(offsets), 6)) / 2)
        branches.append(net.node("Relu", [_dense(net, stem, w, _near_kinks(rng, w, h0, eps, offsets))]))
    h = net.node("Concat", branches, axis=1)
    net.output = _dense(net, h, _f32(rng.standard_normal((3, 9)) / 2), np.zeros(3))
    return net, x0


def fan_out(eps: float):
    """A stable hidden tensor read by three ReLU branches (neurons near their kinks)
    that are summed, with the input's middle concatenated back in."""
    net, rng, x0, h0, h = _stable_stem("fanbranch", 6, 5, 13)
    parts = []
    for offsets in ([0.1, -0.2, 3, -3], [-0.3, 2, 2, 0.25], [3, -3, 0.0, -0.05]):
        w = _f32(rng.standard_normal((4, 5)) / 2)
        parts.append(net.node("Relu", [_dense(net, h, w, _near_kinks(rng, w, h0, eps, offsets))]))
    s = net.node("Sum", parts)
    starts, ends, axes = (net.const(np.array([v], np.int64)) for v in (1, 5, 1))
    h = net.node("Concat", [s, net.node("Slice", ["x", starts, ends, axes])], axis=1)
    net.output = _dense(net, h, _f32(rng.standard_normal((3, 8)) / 2), np.zeros(3))
    return net, x0


def pool_branch(eps: float, tie: bool = False):
    """x (4x4) -> [MaxPool 2x2 -> Gemm] + [AveragePool 2x2] -> relu -> Gemm -> relu -> Gemm:
    max-pooling windows in a branch whose runner-up is within reach of the winner
    (tie: equal), the rest stable."""
    rng = np.random.default_rng(14)
    net = dagnets.DagNet("poolbranch", (1, 1, 4, 4), rng)
    x0 = np.arange(16.0).reshape(4, 4) / 4
    x0[0, 1] = x0[1, 1] - (0.0 if tie else 0.3 * eps)  # window 0: a near tie (tie: a tie)
    x0[2, 2] = x0[3, 3] - (0.0 if tie else 0.5 * eps)  # window 3
    pooled = net.node("Flatten", [net.node("MaxPool", ["x"], kernel_shape=[2, 2], strides=[2, 2])])
    branch = _dense(net, pooled, _f32(rng.standard_normal((4, 4)) / 2), np.zeros(4))
    skip = net.node("Flatten", [net.node("AveragePool", ["x"], kernel_shape=[2, 2], strides=[2, 2])])
    h = net.node("Relu", [net.node("Add", [branch, skip])])
    h = net.node("Relu", [_dense(net, h, _f32(rng.standard_normal((6, 4)) / 2), np.full(6, 20.0))])
    net.output = _dense(net, h, _f32(rng.standard_normal((3, 6)) / 2), np.zeros(3))
    return net, x0.reshape(1, 1, 4, 4)


CASES = {
    "residual": lambda eps: residual_branch(eps),
    "residual_tie": lambda eps: residual_branch(eps, tie=True),
    "concat": concat_branches,
    "fan_out": fan_out,
    "pool": lambda eps: pool_branch(eps),
    "pool_tie": lambda eps: pool_branch(eps, tie=True),
}


@pytest.mark.parametrize("eps", [1e-3, 1e-2])
@pytest.mark.parametrize("case", list(CASES))
def test_tight_on_graphs_is_sound_and_below_paper(tmp_path, case, eps, monkeypatch):
    net, x0 = CASES[case](eps)
    engine = onnxlip.load(net.save(tmp_path / f"{case}.onnx"), seed=0)
    assert not is_chain(engine.blocks)
    twin = net.twin()
    nominal = engine.trace(x0)
    reach = analyse(engine.blocks, nominal, eps)
    assert reach.uncertain > 0  # the case has uncertain neurons or windows
    joint = tight_local_bound(engine.blocks, nominal, eps, engine.tol, reach=reach.changes)
    with monkeypatch.context() as m:  # the graph's telescoping alone
        m.setattr(tight_module, "joint_bound", lambda *a: (math.inf, False))
        tight = tight_local_bound(engine.blocks, nominal, eps, engine.tol, reach=reach.changes)
    paper = engine.local_bound(x0, eps, method="paper")
    assert tight.source == "tight"  # the graph's telescoping, below the paper's composition
    assert tight.bound < paper.bound
    assert joint.bound <= tight.bound
    bounds = {"tight+reach": tight.bound, "joint+reach": joint.bound,
              "auto": engine.local_bound(x0, eps).bound,
              "tight": engine.local_bound(x0, eps, method="tight").bound}
    for name in ("auto", "tight"):
        assert bounds[name] <= paper.bound * (1 + 2 * TOL), name
    rng = np.random.default_rng(0)
    dense = engine.jacobian(x0).dense()
    points = netgen.ball_points(rng, x0, eps, 300, 300, list(np.linalg.svd(dense)[2][:2]))
    ratios = np.linalg.norm(twin(points) - twin(x0.reshape(1, -1)), axis=1) / np.linalg.norm(
        points - x0.ravel(), axis=1)
    sampled = netgen.max_ratio(twin, x0, points)
    climbed, _ = ascent(engine, twin, x0.ravel(), eps, points[np.argsort(ratios)[-4:]], 15)
    lower = engine.lower_bounds(x0, [eps], samples=16, ascent_steps=5)[0].best
    smallest = min(bounds.values())
    assert max(sampled, climbed, lower) <= smallest * SLACK, (bounds, sampled, climbed, lower)



@pytest.mark.parametrize("family", list(dagnets.FAMILIES))
def test_stable_graph_is_its_jacobian(tmp_path, family):
    """With every neuron and window stable the linearized graph E is J(x0): the
    tight bound's walk of the graph (sources stacked, fan-outs summed back) gives
    ||J(x0)||, on every DAG family, up to the solver's tolerance and the products'
    rounding bound (float32 convolutions: ~1e-5 per block of the product of the
    blocks' norms, which the paper's composition is; 0.7% of the truth on
    rescnn, where that product is 32 times it)."""
    net = dagnets.FAMILIES[family](4)
    engine = onnxlip.load(net.save(tmp_path / f"{family}.onnx"), seed=0)
    x0 = np.random.default_rng(1004).standard_normal(net.input_shape)
    jac = np.linalg.norm(engine.jacobian(x0).dense(), 2)
    nominal = engine.trace(x0)
    eps = 1e-9 * float(np.linalg.norm(x0))
    reach = analyse(engine.blocks, nominal, eps)
    assert reach.exact
    tight = tight_local_bound(engine.blocks, nominal, eps, engine.tol, reach=reach.changes)
    assert tight.source == "tight"
    assert jac * (1 - 1e-6) <= tight.bound <= jac * 1.03


@pytest.mark.parametrize("case", ["concat", "pool"])
def test_dense_products_batched_equal_one_by_one(tmp_path, monkeypatch, case):
    """The tight bound's dense product norms (bounds.Solves._dense) apply unit vectors
    as columns through the graph's forward and adjoint walks: the same bound,
    up to the float32 kernels' summation order, as one vector at a time."""
    from onnxlip import bounds

    net, x0 = CASES[case](1e-2)
    engine = onnxlip.load(net.save(tmp_path / f"{case}.onnx"), seed=0)
    nominal = engine.trace(x0)
    reach = analyse(engine.blocks, nominal, 1e-2)
    # the telescoping's products
    monkeypatch.setattr(tight_module, "joint_bound", lambda *a: (math.inf, False))
    batched = tight_local_bound(engine.blocks, nominal, 1e-2, engine.tol, reach=reach.changes)
    monkeypatch.setattr(bounds, "PRODUCT_BATCH_BYTES", 1.0)  # one column at a time
    single = tight_local_bound(engine.blocks, engine.trace(x0), 1e-2, engine.tol, reach=reach.changes)
    assert batched.source == single.source == "tight"
    assert batched.bound == pytest.approx(single.bound, rel=1e-6)
