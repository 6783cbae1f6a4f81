"""Every activation, end to end, on random small nets (tests/actnets.py): MLPs whose
first-layer pre-activations sit on the activation's kinks and inflection points at
x0, CNNs with a lone activation after max-pooling, residual DAGs.

Checked: the engine's forward pass against onnxruntime; the Jacobian against central
differences of the float64 twin (away from kinks); at three radii, every sampled
difference quotient of the float64 twin (and the lower-bound search) ≤ local ≤ global,
||J(x0)|| ≤ local, and 'tight' equal to 'paper' where it falls back.
"""

from __future__ import annotations

import os
from pathlib import Path

import actnets
import netgen
import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import onnxlip
from onnxlip.blocks import ActivationBlock, AffineBlock

SLACK = 1 + 1e-6
SOLVER = 1 + 1e-4
#: Seeds per (family, activation): 2 gives 96 nets; ONNXLIP_ACT_SEEDS=5 the 240-net battery.
SEEDS = int(os.environ.get("ONNXLIP_ACT_SEEDS", "2"))
CASES = [(family, kind, seed) for family in actnets.FAMILIES for kind in actnets.ACTIVATIONS
         for seed in range(SEEDS)]


@pytest.mark.parametrize(("family", "kind", "seed"), CASES, ids=[f"{f}-{k}-{s}" for f, k, s in CASES])
def test_activation_bounds_are_sound(tmp_path, family, kind, seed):
    net, x0 = actnets.FAMILIES[family](kind, seed)
    path = net.save(tmp_path / f"{net.name}.onnx")
    engine = onnxlip.load(path)
    kinds = {b.kind for b in engine.blocks}
    assert any(kind.split("_")[0].replace("relu6", "clip").replace("hardtanh", "clip") in k
               for k in kinds), kinds  # the activation was lowered (idioms fused), not skipped
    twin = actnets.twin(net)
    y_ort = netgen.ort_run(netgen.ort_session(path), x0)
    assert netgen.rel_err(engine.forward(x0), y_ort) <= 1e-4
    assert netgen.rel_err(twin(x0.ravel()[None])[0], y_ort) <= 1e-4

    jacobian = engine.jacobian(x0)
    jac = jacobian.dense()
    if family != "mlp":  # x0 is away from kinks: J is the derivative
        h = 1e-6
        numeric = np.stack([(twin((x0.ravel() + h * e)[None])[0] - twin((x0.ravel() - h * e)[None])[0])
                            / (2 * h) for e in np.eye(x0.size)], axis=1)
        assert np.allclose(jac, numeric, rtol=1e-4, atol=1e-5 * max(1.0, np.abs(numeric).max()))
    jac_norm = float(np.linalg.norm(jac, 2))
    directions = list(np.linalg.svd(jac)[2][:2])

    rng = np.random.default_rng(seed)
    glob = engine.global_bound().bound
    radii = [level * float(np.linalg.norm(x0)) for level in (1e-3, 0.03, 0.3)]
    for eps, result in zip(radii, engine.local_bounds(x0, radii)):
        bound = result.bound
        assert 0 <= bound <= glob * SOLVER  # 0: every unit saturated over the ball
        if jacobian.ties == 0:
            assert jac_norm <= bound * SLACK
        points = netgen.ball_points(rng, x0, eps, 300, 300, directions)
        assert netgen.max_ratio(twin, x0, points) <= bound * SLACK
        lower = engine.lower_bounds(x0, [eps], samples=16, ascent_steps=5)[0]
        assert lower.best <= bound * SLACK
        tight = engine.local_bound(x0, eps, method="tight").bound
        paper = engine.local_bound(x0, eps, method="paper").bound
        assert tight <= paper * SOLVER and bound <= paper * (1 + 2 * engine.tol)  # bound: auto
        if kind != "relu":
            assert tight == pytest.approx(paper, rel=1e-12)  # falls back to the paper's bound


def _model(nodes, inits, shape, out_shape, opset=17):
    weights = [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, list(shape))],
                              [helper.make_tensor_value_info("y", 1, list(out_shape))], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 9
    return model


def test_mobilenet_clip_after_depthwise(tmp_path):
    """MobileNetV2's inverted residual: 1x1 expand, Clip(0, 6), depthwise 3x3, Clip(0, 6),
    1x1 project, + x; global pooling; Gemm. Bounds are sound against sampling."""
    rng = np.random.default_rng(0)
    c, e = 3, 6
    inits = {"w1": rng.standard_normal((e, c, 1, 1)) * 0.8, "b1": rng.standard_normal(e) * 0.3,
             "wd": rng.standard_normal((e, 1, 3, 3)) * 0.6, "bd": rng.standard_normal(e) * 0.3,
             "w2": rng.standard_normal((c, e, 1, 1)) * 0.5, "b2": rng.standard_normal(c) * 0.1,
             "lo": np.array(0.0), "hi": np.array(6.0),
             "wf": rng.standard_normal((4, c)), "bf": np.zeros(4)}
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["e"], kernel_shape=[1, 1]),
             helper.make_node("Clip", ["e", "lo", "hi"], ["e6"]),
             helper.make_node("Conv", ["e6", "wd", "bd"], ["d"], kernel_shape=[3, 3], pads=[1] * 4, group=e),
             helper.make_node("Clip", ["d", "lo", "hi"], ["d6"]),
             helper.make_node("Conv", ["d6", "w2", "b2"], ["p"], kernel_shape=[1, 1]),
             helper.make_node("Add", ["p", "x"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], transB=1)]
    path = tmp_path / "mbv2_block.onnx"
    onnx.save(_model(nodes, inits, (1, c, 6, 6), (1, 4)), path)
    engine = onnxlip.load(path)
    assert [b.kind for b in engine.blocks if isinstance(b, AffineBlock)][:2] == ["affine-clip"] * 2
    x0 = rng.standard_normal((1, c, 6, 6)) * 2
    session = netgen.ort_session(path)
    assert netgen.rel_err(engine.forward(x0), netgen.ort_run(session, x0)) <= 1e-4
    twin = netgen.float64_twin(path)
    glob = engine.global_bound().bound
    for eps in (0.01, 0.3, 3.0):
        bound = engine.local_bound(x0, eps).bound
        assert bound <= glob * SOLVER
        points = netgen.ball_points(rng, x0, eps, 200, 200)
        assert netgen.max_ratio(twin, x0, points) <= bound * SLACK
    record = engine.local_bound(x0, 0.01).layers[0]
    assert record.active + record.inactive + record.uncertain == e * 36
    assert record.inactive > 0 or record.active > 0


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_op_of_opset_20(tmp_path, approximate):
    """The Gelu op itself (opset 20), not the idiom."""
    rng = np.random.default_rng(1)
    inits = {"w": rng.standard_normal((5, 3)), "b": rng.standard_normal(5), "v": rng.standard_normal((2, 5))}
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["h"], transB=1),
             helper.make_node("Gelu", ["h"], ["a"], approximate=approximate),
             helper.make_node("Gemm", ["a", "v"], ["y"], transB=1)]
    path = tmp_path / "gelu.onnx"
    onnx.save(_model(nodes, inits, (1, 3), (1, 2), opset=20), path)
    engine = onnxlip.load(path)
    assert [b.kind for b in engine.blocks] == ["affine-gelu", "affine"]
    assert engine.blocks[0].activation.approximate == approximate
    x0 = rng.standard_normal((1, 3))
    assert netgen.rel_err(engine.forward(x0), netgen.ort_run(netgen.ort_session(path), x0)) <= 1e-4


def test_lone_activation_after_fan_out(tmp_path):
    """A tensor read by a Sigmoid and by an Add: the sigmoid is a block of its own."""
    rng = np.random.default_rng(2)
    inits = {"w": rng.standard_normal((4, 3)), "b": rng.standard_normal(4), "v": rng.standard_normal((2, 4))}
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["h"], transB=1),
             helper.make_node("Sigmoid", ["h"], ["s"]),
             helper.make_node("Add", ["s", "h"], ["a"]),
             helper.make_node("Gemm", ["a", "v"], ["y"], transB=1)]
    path = tmp_path / "fan.onnx"
    onnx.save(_model(nodes, inits, (1, 3), (1, 2)), path)
    engine = onnxlip.load(path)
    assert any(isinstance(b, ActivationBlock) and b.kind == "sigmoid" for b in engine.blocks)
    x0 = rng.standard_normal((1, 3))
    assert netgen.rel_err(engine.forward(x0), netgen.ort_run(netgen.ort_session(path), x0)) <= 1e-4
    twin = netgen.float64_twin(path)
    for eps in (0.01, 1.0):
        bound = engine.local_bound(x0, eps).bound
        points = netgen.ball_points(rng, x0, eps, 200, 200)
        assert netgen.max_ratio(twin, x0, points) <= bound * SLACK
        assert bound <= engine.global_bound().bound * SOLVER


def test_bad_activation_inputs_are_one_line_errors(tmp_path):
    """PRelu with a computed slope, PRelu slopes that do not broadcast, Clip with a computed bound."""
    rng = np.random.default_rng(3)
    w = {"w": rng.standard_normal((4, 3)), "b": np.zeros(4), "s3": np.ones(3) * 0.1}
    cases = {
        "prelu_data": ([helper.make_node("Gemm", ["x", "w", "b"], ["h"], transB=1),
                        helper.make_node("PRelu", ["h", "h"], ["y"])], "computed tensors"),
        "prelu_shape": ([helper.make_node("Gemm", ["x", "w", "b"], ["h"], transB=1),
                         helper.make_node("PRelu", ["h", "s3"], ["y"])], "slope"),
        "clip_data": ([helper.make_node("Gemm", ["x", "w", "b"], ["h"], transB=1),
                       helper.make_node("Clip", ["h", "h"], ["y"])], "computed tensors"),
    }
    for name, (nodes, words) in cases.items():
        path = tmp_path / f"{name}.onnx"
        model = _model(nodes, w, (1, 3), (1, 4))
        onnx.save(model, path)
        with pytest.raises(onnxlip.OnnxlipError, match=words) as info:
            onnxlip.load(path)
        assert "\n" not in str(info.value)


def test_dynamo_softplus_is_read_with_a_note():
    """torch's dynamo export of nn.Softplus is Where(x > 20, x, Softplus(x)): bounded as
    Softplus, and the engine's notes say so."""
    path = Path(__file__).resolve().parents[1] / "models" / "act_softplus_dynamo.onnx"
    engine = onnxlip.load(path)
    assert [b.kind for b in engine.blocks] == ["affine-softplus", "affine-softplus", "affine"]
    assert any("thresholded softplus" in note for note in engine.notes)
