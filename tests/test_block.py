"""The affine-ReLU bound ||R A D|| against dense numpy, block by block (METHOD.md).

Every matrix here is built from the float64 numpy twin of the network
(netgen), never from onnxlip's operators, and every spectral norm is
numpy.linalg.norm(., 2).
"""

from __future__ import annotations

import math

import netgen
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from netgen import Op, RefNet
from onnx import TensorProto, helper

import onnxlip
from onnxlip.blocks import ActivationBlock, AffineBlock, MaxPoolBlock

RTOL = 1e-5
# Reported norms are the Lanczos Ritz value plus its residual correction: at or
# above the exact norm, by up to about 1e-4 relative.
ABOVE = 2e-4


def above(value: float, exact: float, rel: float = ABOVE) -> bool:
    """exact <= value <= exact * (1 + rel), up to rounding."""
    return exact * (1 - RTOL) - 1e-12 <= value <= exact * (1 + rel) + 1e-12

ONNX_TYPE = {
    "gemm": "Gemm", "matmul": "MatMul", "add": "Add", "sub": "Sub", "rsub": "Sub", "mul": "Mul",
    "div": "Div", "conv": "Conv", "bn": "BatchNormalization", "relu": "Relu", "maxpool": "MaxPool",
    "avgpool": "AveragePool", "flatten": "Flatten", "reshape": "Reshape", "transpose": "Transpose",
    "pad": "Pad",
}
RESHAPES = {"flatten", "reshape"}


# ---------------------------------------------------------------------- dense pieces


def dense_affine(ops: list[Op], in_shape) -> tuple[np.ndarray, np.ndarray]:
    """(A, b) of a run of affine ops, from the numpy twin applied to the identity and to 0."""
    part = RefNet(tuple(in_shape), ops)
    n = math.prod(in_shape)
    b = part(np.zeros(n))[0]
    a = part.jvp(np.zeros(n), np.eye(n)).T
    return a, b


def chord(y0: np.ndarray, ybar: np.ndarray) -> np.ndarray:
    """ReLU chord slopes between y0 and ybar, written out case by case (METHOD.md step 2)."""
    r = np.zeros_like(y0)
    for i, (lo, hi) in enumerate(zip(y0, ybar)):
        if lo >= 0:
            r[i] = 1.0
        elif hi <= 0:
            r[i] = 0.0
        else:
            r[i] = hi / (hi - lo)
    return r


def spectral(m: np.ndarray) -> float:
    return float(np.linalg.norm(m, 2)) if m.size else 0.0


def pool_windows(op: Op, in_shape) -> np.ndarray:
    """(out_size, in_size) 0/1 matrix: which inputs each max-pool output sees."""
    index = np.arange(1, math.prod(in_shape) + 1, dtype=float).reshape(in_shape)
    cols = netgen.patches(index, op.p["kernel"], op.p["strides"], op.p["pads"], None, 0.0)
    cols = np.moveaxis(cols, 2, -1).reshape(-1, cols.shape[2])
    member = np.zeros((cols.shape[0], math.prod(in_shape)))
    for row, window in enumerate(cols):
        member[row, window[window > 0].astype(int) - 1] = 1.0
    return member


def split_ops(net: RefNet, engine) -> list[list[Op]]:
    """Cut the twin's ops into the engine's blocks, by the ONNX op types each block lists."""
    kinds = [ONNX_TYPE[op.kind] for op in net.ops]
    assert [t for b in engine.blocks for t in b.ops] == kinds, "blocks do not cover the nodes in order"
    pieces, start = [], 0
    for block in engine.blocks:
        pieces.append(net.ops[start:start + len(block.ops)])
        start += len(block.ops)
    return pieces


def dense_bounds(net: RefNet, engine, x0: np.ndarray, eps: float | None):
    """METHOD.md in dense numpy over the engine's blocks: per-block records and the product.

    eps None gives the global bound (product of ||A_k|| and max-pool constants).
    """
    x = np.asarray(x0, dtype=np.float64).ravel()
    mask = np.ones(x.size)
    shape = net.input_shape
    eps_k, total, records = eps, 1.0, []
    for block, ops in zip(engine.blocks, split_ops(net, engine)):
        rec = {"eps_in": eps_k}
        if isinstance(block, AffineBlock):
            relus = [i for i, op in enumerate(ops) if op.kind == "relu"]
            assert block.relu == bool(relus)
            if relus:  # the ReLU may only be followed by reshapes, which commute with it
                assert all(op.kind in RESHAPES for op in ops[relus[0] + 1:])
            affine = [op for op in ops if op.kind != "relu"]
            a, b = dense_affine(affine, shape)
            y0 = a @ x + b
            if eps is None:
                rec["bound"] = spectral(a)
            else:
                reach = np.sqrt((a * a) @ mask)
                if block.relu:
                    ybar = y0 + eps_k * reach
                    r = chord(y0, ybar)
                    rec.update(active=int(np.sum(y0 >= 0)), inactive=int(np.sum(ybar <= 0)))
                    rec["uncertain"] = y0.size - rec["active"] - rec["inactive"]
                    next_mask = (ybar > 0).astype(float)
                else:
                    r = np.ones_like(y0)
                    next_mask = (reach > 0).astype(float)
                rec["bound"] = spectral(r[:, None] * a * mask[None, :])
                mask = next_mask
            x = np.maximum(y0, 0.0) if block.relu else y0
        elif isinstance(block, MaxPoolBlock):
            at = next(i for i, op in enumerate(ops) if op.kind == "maxpool")
            member = pool_windows(ops[at], netgen.apply_shapes(ops[:at], shape))
            rec["bound"] = math.sqrt(member.sum(axis=0).max())
            x = RefNet(tuple(shape), ops)(x)[0]
            if eps is not None:
                mask = (member @ mask > 0).astype(float)
        else:
            assert isinstance(block, ActivationBlock) and block.relu
            rec["bound"] = 1.0
            x = np.maximum(x, 0.0)
        shape = netgen.apply_shapes(ops, shape)
        records.append(rec)
        total *= rec["bound"]
        if eps_k is not None:
            eps_k *= rec["bound"]
    return total, records


# ---------------------------------------------------------------------- helpers


def _load(net: RefNet, tmp_path, **kwargs):
    return onnxlip.load(net.save(tmp_path / f"{net.name}.onnx"), **kwargs)


def _mixed_eps(a: np.ndarray, y0: np.ndarray) -> float:
    """A radius at which about half of the inactive units become uncertain."""
    neg = y0 < 0
    t = np.sort(-y0[neg] / np.linalg.norm(a[neg], axis=1))
    k = len(t) // 2
    return float(np.sqrt(t[k - 1] * t[k]))  # between two thresholds: no unit sits at ybar = 0


def _gemm(rng, n_in, n_out) -> Op:
    return Op("gemm", {"B": netgen.he(rng, (n_out, n_in), n_in), "C": netgen.small(rng, n_out),
                       "transB": 1})


def _conv(rng, c_in, c_out, k, **attrs) -> Op:
    p = {"W": netgen.he(rng, (c_out, c_in, k, k), c_in * k * k), "b": netgen.small(rng, c_out),
         "strides": (1, 1), "pads": (0, 0, 0, 0), "dilations": (1, 1), "group": 1}
    p.update(attrs)
    return Op("conv", p)


def _check_record(record, expected: dict) -> None:
    assert above(record.bound, expected["bound"])
    if expected.get("eps_in") is not None:
        assert above(record.eps_in, expected["eps_in"], rel=10 * ABOVE)
    for key in ("active", "inactive", "uncertain"):
        if key in expected:
            assert getattr(record, key) == expected[key], key


# ---------------------------------------------------------------------- one block


def test_gemm_relu_block(tmp_path):
    """First-layer bound of Gemm+Relu == ||R A|| with D = I."""
    rng = np.random.default_rng(1)
    gemm = _gemm(rng, 6, 14)
    net = RefNet((1, 6), [gemm, Op("relu")], "gemm_relu")
    x0 = rng.standard_normal(6)
    a = gemm.p["B"].astype(np.float64)
    y0 = a @ x0 + gemm.p["C"]
    eps = _mixed_eps(a, y0)
    ybar = y0 + eps * np.linalg.norm(a, axis=1)
    r = chord(y0, ybar)
    assert np.sum((y0 < 0) & (ybar > 0)) > 0 and np.any(ybar <= 0) and np.any(y0 >= 0)
    expected = spectral(r[:, None] * a)

    result = _load(net, tmp_path).local_bound(x0.reshape(1, 6), eps, method="paper")
    assert result.layers[0].kind == "affine-relu"
    _check_record(result.layers[0], {
        "bound": expected, "eps_in": eps, "active": int(np.sum(y0 >= 0)),
        "inactive": int(np.sum(ybar <= 0)), "uncertain": int(np.sum((y0 < 0) & (ybar > 0)))})
    assert above(result.bound, expected)
    assert expected < spectral(a)  # the chord slopes did something


def test_conv_relu_block(tmp_path):
    """First-layer bound of a strided, asymmetrically padded Conv+Relu == ||R A||."""
    rng = np.random.default_rng(2)
    conv = _conv(rng, 2, 3, 3, strides=(2, 2), pads=(1, 0, 1, 1))
    net = RefNet((1, 2, 6, 6), [conv, Op("relu")], "conv_relu")
    x0 = rng.standard_normal((1, 2, 6, 6))
    a, b = dense_affine([conv], (1, 2, 6, 6))
    assert a.shape == (3 * 3 * 3, 72)
    y0 = a @ x0.ravel() + b
    eps = _mixed_eps(a, y0)
    ybar = y0 + eps * np.linalg.norm(a, axis=1)
    r = chord(y0, ybar)
    expected = spectral(r[:, None] * a)

    engine = _load(net, tmp_path)
    assert engine.blocks[0].map.representation == "matrix-free"
    result = engine.local_bound(x0, eps, method="paper")
    _check_record(result.layers[0], {
        "bound": expected, "eps_in": eps, "active": int(np.sum(y0 >= 0)),
        "inactive": int(np.sum(ybar <= 0)), "uncertain": int(np.sum((y0 < 0) & (ybar > 0)))})
    assert result.layers[0].uncertain > 0


@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_second_block_uses_mask_of_first(tmp_path, kind):
    """Block 2: eps_2 = L_1 eps, D = diag(ybar_1 > 0), bound ||R_2 A_2 D||."""
    rng = np.random.default_rng(3)
    if kind == "dense":
        shape = (1, 8)
        first, second = _gemm(rng, 8, 16), _gemm(rng, 16, 10)
        ops = [first, Op("relu"), second, Op("relu")]
    else:
        shape = (1, 2, 7, 7)
        first = _conv(rng, 2, 4, 3, pads=(1, 1, 1, 1))
        second = _conv(rng, 4, 3, 3, strides=(2, 2), dilations=(1, 2))
        ops = [first, Op("relu"), second, Op("relu")]
    net = RefNet(shape, ops, f"two_{kind}")
    x0 = rng.standard_normal(shape)
    a1, b1 = dense_affine([first], shape)
    a2, b2 = dense_affine([second], netgen.apply_shapes(ops[:2], shape))
    y1 = a1 @ x0.ravel() + b1
    eps = _mixed_eps(a1, y1)
    ybar1 = y1 + eps * np.linalg.norm(a1, axis=1)
    l1 = spectral(chord(y1, ybar1)[:, None] * a1)
    d = (ybar1 > 0).astype(float)
    assert 0 < d.sum() < d.size, "D should not be the identity"

    eps2 = l1 * eps
    y2 = a2 @ np.maximum(y1, 0) + b2
    ybar2 = y2 + eps2 * np.sqrt((a2 * a2) @ d)
    r2 = chord(y2, ybar2)
    l2 = spectral(r2[:, None] * a2 * d[None, :])
    assert l2 < spectral(r2[:, None] * a2) * (1 - 1e-3), "D should matter"

    result = _load(net, tmp_path).local_bound(x0, eps, method="paper")
    assert len(result.layers) == 2
    _check_record(result.layers[0], {"bound": l1, "eps_in": eps})
    _check_record(result.layers[1], {
        "bound": l2, "eps_in": eps2, "active": int(np.sum(y2 >= 0)),
        "inactive": int(np.sum(ybar2 <= 0)), "uncertain": int(np.sum((y2 < 0) & (ybar2 > 0)))})
    assert above(result.bound, l1 * l2, rel=2 * ABOVE)


# ---------------------------------------------------------------------- global


def test_global_bound_is_product_of_spectral_norms(tmp_path):
    """Conv/BN/ReLU/MaxPool(3, 2)/Gemm net: global == prod ||A_k|| * sqrt(4)."""
    rng = np.random.default_rng(4)
    shape = (1, 2, 9, 9)
    conv = _conv(rng, 2, 3, 3, pads=(1, 1, 1, 1))
    bn = netgen.bn_op(rng, 3)
    pool = Op("maxpool", {"kernel": (3, 3), "strides": (2, 2), "pads": (0, 0, 0, 0)})
    gemm1, gemm2 = _gemm(rng, 3 * 4 * 4, 12), _gemm(rng, 12, 4)
    ops = [conv, bn, Op("relu"), pool, Op("flatten"), gemm1, Op("relu"), gemm2]
    net = RefNet(shape, ops, "global")
    a_conv, _ = dense_affine([conv, bn], shape)
    expected = spectral(a_conv) * 2.0 * spectral(gemm1.p["B"].astype(float)) * \
        spectral(gemm2.p["B"].astype(float))
    result = _load(net, tmp_path).global_bound()
    assert above(result.bound, expected)
    assert [layer.kind for layer in result.layers] == ["affine-relu", "maxpool", "affine-relu", "affine"]
    assert result.layers[1].bound == pytest.approx(2.0)


def test_maxpool_constants(tmp_path):
    """sqrt(most windows over one element): 1 for (2, 2), 2 for (3, 2) in 2-D, sqrt 2 in 1-D."""
    for shape, kernel, stride, expected in [((1, 1, 8, 8), (2, 2), (2, 2), 1.0),
                                            ((1, 1, 9, 9), (3, 3), (2, 2), 2.0),
                                            ((1, 1, 9), (3,), (2,), math.sqrt(2)),
                                            ((1, 1, 9, 9), (3, 3), (1, 1), 3.0)]:
        pool = Op("maxpool", {"kernel": kernel, "strides": stride, "pads": (0,) * 2 * len(kernel)})
        net = RefNet(shape, [pool, Op("flatten")], f"pool{len(kernel)}{kernel[0]}{stride[0]}")
        assert math.sqrt(pool_windows(pool, shape).sum(axis=0).max()) == pytest.approx(expected)
        assert _load(net, tmp_path).global_bound().bound == pytest.approx(expected)


POOLS = [  # (spatial, kernel, strides, pads, dilations, ceil_mode)
    ((8, 8), (2, 2), (2, 2), (0, 0, 0, 0), (1, 1), 0),
    ((9, 9), (3, 3), (2, 2), (0, 0, 0, 0), (1, 1), 0),
    ((9, 9), (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 0),
    ((8, 9), (3, 3), (2, 2), (0, 0, 0, 0), (1, 1), 1),
    ((7, 7), (2, 2), (2, 2), (0, 0, 0, 0), (1, 1), 1),
    ((9, 8), (3, 2), (1, 2), (1, 0, 1, 1), (1, 1), 0),
    ((9, 9), (2, 2), (1, 1), (0, 0, 0, 0), (2, 2), 0),
    ((10, 10), (3, 3), (2, 2), (2, 2, 2, 2), (2, 2), 1),
    ((9, 9), (4, 4), (3, 3), (1, 2, 2, 1), (1, 1), 1),
    ((6, 6), (5, 5), (1, 1), (2, 2, 2, 2), (1, 1), 0),
    ((11,), (3,), (2,), (0, 0), (1,), 0),
    ((12,), (4,), (3,), (1, 1), (1,), 1),
    ((10,), (2,), (1,), (0, 0), (3,), 0),
]


@pytest.mark.parametrize("config", POOLS, ids=[f"p{i}" for i in range(len(POOLS))])
def test_maxpool_constant_counts_windows(tmp_path, config):
    """MaxPool alone: global bound == sqrt(most windows containing one element), the windows
    counted by running onnxruntime's MaxPool on one-hot inputs (ceil_mode and dilations too)."""
    spatial, kernel, strides, pads, dilations, ceil_mode = config
    shape = (1, 1, *spatial)
    attrs = dict(kernel_shape=list(kernel), strides=list(strides), pads=list(pads),
                 dilations=list(dilations), ceil_mode=ceil_mode)
    nodes = [helper.make_node("MaxPool", ["x"], ["m"], **attrs),
             helper.make_node("Flatten", ["m"], ["y"])]
    n = math.prod(shape)
    probe = helper.make_model(helper.make_graph(
        nodes[:1], "probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *shape[1:]])],
        [helper.make_tensor_value_info("m", TensorProto.FLOAT, None)]),
        opset_imports=[helper.make_opsetid("", 17)])
    probe.ir_version = 8
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    one_hot = (2 * np.eye(n) - 1).astype(np.float32).reshape(n, *shape[1:])
    pooled = session.run(None, {"x": one_hot})[0]
    counts = (pooled.reshape(n, -1) > 0).sum(axis=1)
    expected = math.sqrt(counts.max())

    flat = math.prod(pooled.shape[1:])
    model = helper.make_model(helper.make_graph(
        nodes, "pool", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, flat])]),
        opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "pool.onnx"
    onnx.save(model, str(path))
    engine = onnxlip.load(path)
    assert engine.global_bound().bound == pytest.approx(expected, rel=1e-12)
    x0 = np.random.default_rng(0).standard_normal(shape)
    assert engine.local_bound(x0, 0.3, method="paper").bound == pytest.approx(expected, rel=1e-12)
    np.testing.assert_allclose(engine.forward(x0).ravel(),
                               session.run(None, {"x": x0.astype(np.float32)})[0].ravel(), rtol=1e-6)


# ---------------------------------------------------------------------- random nets


NETS = [("dense", s) for s in range(20)] + [("conv", s) for s in range(40)]


@pytest.mark.parametrize(("family", "seed"), NETS, ids=[f"{f}{s}" for f, s in NETS])
def test_every_block_matches_dense(tmp_path, family, seed):
    """On random nets, every block's record and the product equal METHOD.md in dense numpy.

    The engine runs with tol=1e-10 so that this checks the method (reach, chord
    slopes, masks, eps_k, max-pool constants) apart from the Lanczos stopping
    rule, which test_soundness.py::test_linear_layer_with_clustered_spectrum covers.
    """
    net = (netgen.dense_net if family == "dense" else netgen.conv_net)(seed)
    engine = _load(net, tmp_path, tol=1e-10)
    rng = np.random.default_rng(seed)
    x0 = rng.standard_normal(net.input_shape)
    level = (0.01, 0.1, 1.0)[seed % 3]
    eps = level * float(np.linalg.norm(x0))

    total, records = dense_bounds(net, engine, x0, eps)
    result = engine.local_bound(x0, eps, method="paper")
    assert len(result.layers) == len(records)
    for record, expected in zip(result.layers, records):
        _check_record(record, expected)
    assert above(result.bound, total, rel=len(result.layers) * ABOVE)

    total, records = dense_bounds(net, engine, x0, None)
    glob = engine.global_bound()
    for record, expected in zip(glob.layers, records):
        assert above(record.bound, expected["bound"])
    assert above(glob.bound, total, rel=len(glob.layers) * ABOVE)


# ---------------------------------------------------------------------- the pieces


def test_chord_slopes_cases():
    """r = 1 where y0 >= 0, 0 where ybar <= 0, ybar / (ybar - y0) in between."""
    y0 = np.array([1.0, 0.0, -1.0, -1.0, -2.0, -1.0, -3.0])
    ybar = np.array([2.0, 0.5, 1.0, -1.0, -0.5, 0.0, 1.0])
    expected = np.array([1.0, 1.0, 0.5, 0.0, 0.0, 0.0, 0.25])
    np.testing.assert_allclose(onnxlip.bounds.chord_slopes(y0, ybar), expected)
    np.testing.assert_allclose(chord(y0, ybar), expected)


@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_masked_norm(tmp_path, kind):
    """||diag(rows) A diag(cols)|| against numpy, for slopes in [0, 1] and a 0/1 column mask."""
    rng = np.random.default_rng(5)
    if kind == "dense":
        net = RefNet((1, 9), [_gemm(rng, 9, 13), Op("relu")], "masked_dense")
    else:
        net = RefNet((1, 2, 6, 6), [_conv(rng, 2, 3, 3, pads=(1, 1, 0, 0)), Op("relu")], "masked_conv")
    block = _load(net, tmp_path).blocks[0]
    a, _ = dense_affine(net.ops[:1], net.input_shape)
    for trial in range(4):
        rows = rng.uniform(0, 1, a.shape[0]) * (rng.uniform(size=a.shape[0]) > 0.3)
        cols = (rng.uniform(size=a.shape[1]) > 0.4).astype(float)
        if trial == 0:
            rows, cols = np.ones(a.shape[0]), np.ones(a.shape[1])
        norm = onnxlip.bounds.masked_norm(block.map, rows, cols, 1e-10)
        assert above(norm.value, spectral(rows[:, None] * a * cols[None, :]))
    zero = onnxlip.bounds.masked_norm(block.map, np.zeros(a.shape[0]), np.ones(a.shape[1]), 1e-6)
    assert zero.value == 0.0
