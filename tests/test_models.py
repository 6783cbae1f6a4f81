"""The shipped example models (models/*.onnx with models/<name>_x0.npy)."""

from __future__ import annotations

import math
from pathlib import Path

import netgen
import numpy as np
import pytest

import onnxlip
from onnxlip.blocks import is_chain

MODELS_DIR = Path(__file__).resolve().parents[1] / "models"
MODELS = sorted(p for p in MODELS_DIR.glob("*.onnx") if p.with_name(f"{p.stem}_x0.npy").is_file())
EPS = 1e-3
#: The exporter zoo's MLPs (tools/models/zoo.py), one per activation, TorchScript and dynamo.
ACTIVATIONS = ("leakyrelu", "prelu", "relu6", "hardtanh", "sigmoid", "tanh", "softplus", "elu",
               "gelu_erf", "gelu_tanh", "silu", "hardsigmoid", "hardswish")


def test_models_are_there():
    assert {"tiny_dense", "digits_mlp", "digits_cnn", "cifar_bn"} <= {p.stem for p in MODELS}
    tight = {"mlp6x50", "mlp6x50_matmul", "cnn_maxpool", "cnn_avgpool", "cnn_bn"}
    tight = {f"tight_{name}" for name in tight}
    assert tight <= {p.stem for p in MODELS}
    assert {f"act_{a}_{e}" for a in ACTIVATIONS for e in ("ts", "dynamo")} <= {p.stem for p in MODELS}


def _ort_lower_bound(session, x0: np.ndarray, eps: float, directions, rng, n_random: int = 64) -> float:
    """Largest ||f(x) - f(x0)|| / ||x - x0|| over onnxruntime evaluations in the ball.

    The points are rounded to float32 first and the distance is measured to the
    rounded point, so every ratio is a real difference quotient of the model.
    """
    flat = x0.astype(np.float64).ravel()
    f0 = netgen.ort_run(session, x0)
    candidates = [v / np.linalg.norm(v) for v in directions]
    candidates += list(rng.standard_normal((n_random, flat.size)))
    best = 0.0
    for v in candidates:
        v = v / np.linalg.norm(v)
        for t in (0.25 * eps, 0.5 * eps, eps):
            for sign in (1.0, -1.0):
                x = (flat + sign * t * v).astype(np.float32)
                dx = np.linalg.norm(x.astype(np.float64) - flat)
                if 0 < dx <= eps:
                    df = np.linalg.norm(netgen.ort_run(session, x.reshape(x0.shape)) - f0)
                    best = max(best, df / dx)
    return best


@pytest.mark.parametrize("path", MODELS, ids=[p.stem for p in MODELS])
def test_model(path):
    """Forward == onnxruntime; ||J(x0)|| <= sampled-from-ORT ratios <= local(1e-3) <= global."""
    x0 = np.load(path.with_name(f"{path.stem}_x0.npy"))
    engine = onnxlip.load(path)
    session = netgen.ort_session(path)
    y_ort = netgen.ort_run(session, x0)
    assert netgen.rel_err(engine.forward(x0), y_ort) <= 1e-4
    assert tuple(engine.output_shape) == tuple(session.get_outputs()[0].shape)

    local = engine.local_bound(x0, EPS, method="paper")
    glob = engine.global_bound()
    assert 0 < local.bound <= glob.bound * (1 + 1e-6)
    assert all(layer.converged for layer in local.layers + glob.layers)
    assert local.layers[0].eps_in == pytest.approx(EPS)
    if is_chain(engine.blocks):  # the paper's radii: ε_{k+1} = L_k ε_k
        for before, after in zip(local.layers, local.layers[1:]):
            assert after.eps_in == pytest.approx(before.eps_in * before.bound)

    twin = netgen.float64_twin(path)
    assert netgen.rel_err(twin(x0)[0], y_ort) <= 1e-4
    _, sv, vt = np.linalg.svd(netgen.central_jacobian(twin, x0))
    assert sv[0] <= local.bound * (1 + 1e-6)

    rng = np.random.default_rng(0)
    lower = _ort_lower_bound(session, x0, EPS, list(vt[:2]), rng)
    # float32 outputs differ by a few ulps of |f| ~ 1e-6 against |Δf| ~ 1e-3 L: 1e-3 is ample
    assert lower <= local.bound * (1 + 1e-3)
    assert lower >= 0.9 * sv[0], "sampling along the top singular vector should reach ||J||"
    assert local.bound >= lower


def test_tiny_dense_by_hand():
    """y = W2 relu(W1 x + b1) + b2 at x0 = [0.5, -0.25, 1]: pre-activations [0.75, 1, -0.75, -0.5].

    Row norms of W1: [√2, √5, √2, √6]. At eps = 1e-3 no unit changes state:
    R = diag(1, 1, 0, 0), L1 = ||[[1,-1,0],[2,0,1]]|| = √6 (eigenvalues of
    [[2,2],[2,5]] are 6 and 1); D = diag(1, 1, 0, 0) for the second layer,
    L2 = ||[[1,2],[0,-1]]|| = 1 + √2. Bound √6 (1 + √2); the Jacobian
    [[5,-1,2],[-2,0,-1]] has norm sqrt((35 + √1201) / 2).
    """
    engine = onnxlip.load(MODELS_DIR / "tiny_dense.onnx")
    x0 = np.load(MODELS_DIR / "tiny_dense_x0.npy")
    np.testing.assert_allclose(x0.ravel(), [0.5, -0.25, 1.0])
    w1 = np.array([[1, -1, 0], [2, 0, 1], [0, 1, -1], [-1, 2, 1]], dtype=float)
    w2 = np.array([[1, 2, -1, 0], [0, -1, 1, 3]], dtype=float)
    # hidden relu([0.75, 1, -0.75, -0.5]) = [0.75, 1, 0, 0]; y = [0.75 + 2 + 0.5, -1 - 1]
    np.testing.assert_allclose(engine.forward(x0).ravel(), [3.25, -2.0], atol=1e-6)

    r = engine.local_bound(x0, EPS, method="paper")
    assert r.bound == pytest.approx(math.sqrt(6) * (1 + math.sqrt(2)), rel=1e-9)
    first, second = r.layers
    assert (first.bound, first.active, first.inactive, first.uncertain) == \
        (pytest.approx(math.sqrt(6), rel=1e-9), 2, 2, 0)
    assert second.bound == pytest.approx(1 + math.sqrt(2), rel=1e-9)
    assert second.eps_in == pytest.approx(math.sqrt(6) * EPS)
    jac_norm = math.sqrt((35 + math.sqrt(1201)) / 2)
    assert jac_norm <= r.bound

    # eps = 0.5: unit 4 (pre -0.5, reach 0.5√6) is uncertain with slope (√6-1)/√6; unit 3 stays off
    eps = 0.5
    r = engine.local_bound(x0, eps, method="paper")
    slope = (math.sqrt(6) - 1) / math.sqrt(6)
    rows = np.diag([1, 1, 0, slope]) @ w1
    l1 = np.linalg.norm(rows, 2)
    l2 = np.linalg.norm(w2 @ np.diag([1, 1, 0, 1]), 2)
    assert (r.layers[0].active, r.layers[0].inactive, r.layers[0].uncertain) == (2, 1, 1)
    assert r.layers[0].bound == pytest.approx(l1, rel=1e-9)
    assert r.layers[1].bound == pytest.approx(l2, rel=1e-9)
    assert r.bound == pytest.approx(l1 * l2, rel=1e-9)

    g = engine.global_bound()
    assert g.bound == pytest.approx(np.linalg.norm(w1, 2) * np.linalg.norm(w2, 2), rel=1e-9)


def test_user_errors_are_onnxlip_errors(tmp_path):
    engine = onnxlip.load(MODELS_DIR / "tiny_dense.onnx")
    x0 = np.load(MODELS_DIR / "tiny_dense_x0.npy")
    for eps in (0.0, -1.0, float("nan"), float("inf"), "big"):
        with pytest.raises(onnxlip.OnnxlipError):
            engine.local_bound(x0, eps, method="paper")
    with pytest.raises(onnxlip.OnnxlipError):
        engine.local_bound(np.zeros(4), 0.1, method="paper")
    with pytest.raises(onnxlip.OnnxlipError):
        engine.forward(np.array([0.0, np.nan, 1.0]))
    with pytest.raises(onnxlip.OnnxlipError):
        onnxlip.load(tmp_path / "missing.onnx")
    (tmp_path / "garbage.onnx").write_bytes(b"not a model")
    with pytest.raises(onnxlip.OnnxlipError):
        onnxlip.load(tmp_path / "garbage.onnx")


@pytest.mark.parametrize("op", ["MaxPool", "AveragePool"])
def test_twin_pools_agree_with_onnxruntime(op):
    """The float64 twins' own pools (netgen.MaxPool / AveragePool: the numpy nets'
    pooling, in place of onnx's reference loops) against onnxruntime on random
    windows, strides, asymmetric pads and count_include_pad: the same shapes and
    values within float32's rounding. (onnx 1.23's reference reads asymmetric
    pads wrongly: pads [1, 1, 0, 0] with a 3x2 window on 7x5 gives it 7x4, the
    spec and onnxruntime 6x5.)"""
    from onnx import TensorProto, helper
    from onnx.reference import ReferenceEvaluator

    rng = np.random.default_rng(3)
    for _ in range(40):
        kernel = [int(k) for k in rng.integers(1, 4, 2)]
        attrs = {"kernel_shape": kernel, "strides": [int(s) for s in rng.integers(1, 4, 2)],
                 "pads": [int(min(p, k - 1)) for p, k in zip(rng.integers(0, 2, 4), kernel * 2)]}
        if op == "AveragePool":
            attrs["count_include_pad"] = int(rng.integers(0, 2))
        shape = [2, 3, *(int(s) for s in rng.integers(5, 10, 2))]
        graph = helper.make_graph(
            [helper.make_node(op, ["x"], ["y"], **attrs)], "pool",
            [helper.make_tensor_value_info("x", TensorProto.DOUBLE, shape)],
            [helper.make_tensor_value_info("y", TensorProto.DOUBLE, None)])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8  # what onnxruntime 1.18 (the oldest supported) reads
        x = rng.standard_normal(shape).astype(np.float32).astype(np.float64)
        ours = ReferenceEvaluator(model, new_ops=[netgen.MaxPool, netgen.AveragePool]).run(None, {"x": x})[0]
        model.graph.input[0].type.tensor_type.elem_type = TensorProto.FLOAT
        model.graph.output[0].type.tensor_type.elem_type = TensorProto.FLOAT
        session = netgen.ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        theirs = session.run(None, {"x": x.astype(np.float32)})[0]
        assert ours.shape == theirs.shape, attrs
        assert np.allclose(ours, theirs, rtol=1e-6, atol=1e-6), attrs
