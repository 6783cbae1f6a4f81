"""ConvMap (matrix-free, onnxruntime float32) against its exact CSR matrix, onnxruntime's
Conv run directly and a float64 numpy convolution; sparse vs matrix-free networks."""

from __future__ import annotations

import math

import netgen
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import scipy.sparse as sp
from onnx import TensorProto, helper, numpy_helper

import onnxlip
from onnxlip.blocks import AffineBlock
from onnxlip.operators.base import LinearMap
from onnxlip.operators.chain import ChainMap
from onnxlip.operators.conv import CROP_MAX, ConvMap, ConvTransposeMap
from onnxlip.operators.matrix import DenseMap, SparseMap
from onnxlip.operators.monomial import MonomialMap
from onnxlip.operators.stack import StackMap

RTOL = 1e-5

# (in_shape, out_channels, group, kernel, strides, pads, dilations)
FIXED = [
    ((1, 3, 7, 7), 4, 1, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),
    ((1, 2, 8, 7), 3, 1, (3, 3), (2, 2), (0, 2, 1, 0), (1, 1)),
    ((1, 2, 11, 11), 2, 1, (5, 5), (3, 3), (2, 2, 2, 2), (1, 1)),
    ((1, 1, 9, 9), 3, 1, (3, 3), (1, 1), (2, 2, 2, 2), (2, 2)),
    ((1, 2, 10, 9), 2, 1, (3, 3), (2, 2), (1, 0, 2, 1), (2, 2)),
    ((1, 4, 6, 6), 6, 2, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),
    ((1, 3, 6, 6), 3, 3, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),  # depthwise
    ((1, 3, 7, 7), 6, 3, (3, 3), (2, 2), (0, 1, 1, 0), (1, 2)),  # depthwise, multiplier 2
    ((1, 2, 5, 5), 3, 1, (1, 1), (1, 1), (1, 1, 1, 1), (1, 1)),  # pad beyond the kernel's reach
    ((1, 2, 6, 8), 2, 1, (1, 3), (1, 3), (0, 1, 0, 2), (1, 1)),
    ((1, 1, 9, 6), 2, 1, (5, 2), (2, 1), (2, 0, 1, 1), (1, 2)),
    ((1, 2, 10, 10), 3, 1, (4, 4), (3, 3), (0, 0, 0, 0), (1, 1)),  # unused trailing rows
    ((1, 2, 9, 9), 2, 2, (2, 2), (3, 3), (2, 2, 0, 0), (2, 2)),
    ((1, 1, 4, 4), 1, 1, (4, 4), (1, 1), (0, 0, 0, 0), (1, 1)),  # one output pixel
    ((1, 3, 9, 7), 3, 3, (9, 7), (1, 1), (0, 0, 0, 0), (1, 1)),  # GlobalAveragePool's window
    ((1, 2, 6, 40), 2, 2, (5, 37), (1, 1), (1, 0, 0, 0), (1, 1)),  # output << input at stride 1
    ((1, 2, 12), 3, 1, (3,), (1,), (1, 1), (1,)),
    ((1, 2, 13), 4, 2, (5,), (2,), (2, 0), (1,)),
    ((1, 3, 14), 3, 3, (3,), (3,), (0, 2), (2,)),
    ((1, 1, 9), 2, 1, (2,), (2,), (1, 1), (2,)),
    ((1, 4, 10), 2, 1, (1,), (3,), (0, 0), (1,)),
    ((1, 2, 4, 5, 5), 2, 1, (2, 3, 3), (1, 2, 1), (0, 1, 1, 1, 0, 1), (1, 1, 2)),  # 3-D
]


def _random_config(seed: int):
    rng = np.random.default_rng(300 + seed)
    rank = int(rng.integers(1, 3))
    while True:
        c_in = int(rng.choice([1, 2, 3, 4, 6]))
        group = int(rng.choice([g for g in (1, 2, c_in) if c_in % g == 0]))
        c_out = group * int(rng.integers(1, 4))
        kernel = tuple(int(v) for v in rng.integers(1, 6, rank))
        strides = tuple(int(v) for v in rng.integers(1, 4, rank))
        dilations = tuple(int(v) for v in rng.integers(1, 3, rank))
        pads = tuple(int(v) for v in rng.integers(0, 3, 2 * rank))
        spatial = tuple(int(v) for v in rng.integers(4, 12 if rank == 2 else 20, rank))
        out = [(spatial[i] + pads[i] + pads[rank + i] - dilations[i] * (kernel[i] - 1) - 1) // strides[i] + 1
               for i in range(rank)]
        if min(out) >= 1:
            return (1, c_in, *spatial), c_out, group, kernel, strides, pads, dilations


CONFIGS = FIXED + [_random_config(s) for s in range(30)]


def _conv_map(config, seed=0):
    in_shape, c_out, group, kernel, strides, pads, dilations = config
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((c_out, in_shape[1] // group, *kernel)).astype(np.float32)
    return ConvMap(weight, in_shape, strides, pads, dilations, group), weight


def _ort_conv(weight, config, images: np.ndarray) -> np.ndarray:
    """onnxruntime's own Conv on a batch of images (float32), built here from scratch."""
    in_shape, _, group, kernel, strides, pads, dilations = config
    node = helper.make_node("Conv", ["x", "W"], ["y"], kernel_shape=list(kernel), strides=list(strides),
                            pads=list(pads), dilations=list(dilations), group=group)
    graph = helper.make_graph(
        [node], "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, *in_shape[1:]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [numpy_helper.from_array(weight, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": images.astype(np.float32)})[0]


def _close(actual, expected, rtol=RTOL):
    """Entrywise agreement relative to the largest entry (float32 kernels round each sum)."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape
    scale = max(float(np.abs(expected).max(initial=0.0)), 1e-30)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize("config", CONFIGS, ids=[f"c{i}" for i in range(len(CONFIGS))])
def test_conv_map(config):
    conv, weight = _conv_map(config)
    in_shape, group = config[0], config[2]
    n_in = math.prod(in_shape)

    # the exact matrix: CSR by index arithmetic == the float64 numpy convolution of the identity
    eye = np.eye(n_in).reshape(n_in, *in_shape[1:])
    dense = netgen.conv_nd(eye, weight, config[4], config[5], config[6], group).reshape(n_in, -1).T
    csr = conv.to_sparse()
    assert sp.issparse(csr) and csr.shape == (conv.out_size, conv.in_size) == dense.shape
    assert conv.out_shape == (1, *netgen.conv_nd(eye[:1], weight, *config[4:], group).shape[1:])
    np.testing.assert_allclose(csr.toarray(), dense, rtol=0, atol=1e-12)
    assert csr.nnz <= conv.sparse_nnz_estimate()

    rng = np.random.default_rng(1)
    x = rng.standard_normal((conv.in_size, 4))
    u = rng.standard_normal((conv.out_size, 4))
    ax, atu = conv.matmat(x), conv.rmatmat(u)
    _close(ax, csr @ x)
    _close(atu, csr.T @ u)
    _close(conv.matvec(x[:, 0]), csr @ x[:, 0])
    _close(conv.rmatvec(u[:, 0]), csr.T @ u[:, 0])
    op = conv.as_operator()
    _close(op.matvec(x[:, 1]), csr @ x[:, 1])
    _close(op.rmatvec(u[:, 1]), csr.T @ u[:, 1])

    # onnxruntime's Conv run directly on the same weights and float32 inputs
    images = np.ascontiguousarray(x.T).reshape(4, *in_shape[1:]).astype(np.float32)
    direct = _ort_conv(weight, config, images).reshape(4, -1).T
    _close(ax, direct)
    _close(conv.matmat(images.reshape(4, -1).T.astype(np.float64)), direct, rtol=1e-6)

    # the transpose: <A x, u> == <x, A^T u>
    for k in range(4):
        lhs, rhs = float(ax[:, k] @ u[:, k]), float(x[:, k] @ atu[:, k])
        scale = np.linalg.norm(ax[:, k]) * np.linalg.norm(u[:, k])
        assert abs(lhs - rhs) <= RTOL * scale

    # (A∘A) d for a 0/1 mask and for a positive vector
    squared = csr.multiply(csr)
    for d in (rng.integers(0, 2, conv.in_size).astype(float), rng.uniform(0, 1, conv.in_size)):
        _close(conv.sq_matvec(d), squared @ d)


@pytest.mark.parametrize("config", CONFIGS, ids=[f"c{i}" for i in range(len(CONFIGS))])
def test_conv_matmat_local_crops_to_the_support(config, monkeypatch):
    """Columns nonzero on a small box of the image (one position, a corner, a
    band, all zero): the cropped product equals the full one, every output the
    support cannot reach is exactly 0, and the crop is taken where the support
    reaches at most half the outputs."""
    conv, _ = _conv_map(config)
    in_shape = config[0]
    csr = conv.to_sparse()
    rng = np.random.default_rng(2)
    spatial = in_shape[2:]
    boxes = [tuple(slice(p, p + 1) for p in rng.integers(0, spatial)),
             tuple(slice(0, 1) for _ in spatial),
             tuple(slice(n - 1, n) for n in spatial),
             (slice(1, 3),) + tuple(slice(None) for _ in spatial[1:]),
             tuple(slice(0, 0) for _ in spatial)]
    full = conv.matmat
    for box in boxes:
        images = np.zeros((3, *in_shape[1:]), np.float32)
        images[(slice(None), slice(None), *box)] = rng.standard_normal(
            images[(slice(None), slice(None), *box)].shape)
        x = np.asfortranarray(images.reshape(3, -1).T)
        support = (abs(csr) @ (x != 0).astype(float)) > 0
        calls: list[int] = []
        monkeypatch.setattr(conv, "matmat", lambda v, calls=calls: calls.append(1) or full(v))
        local = conv.matmat_local(x)
        monkeypatch.undo()
        assert local.shape == (conv.out_size, 3) and local.dtype == x.dtype
        _close(local, full(x))
        assert np.all(local[~support] == 0)
        # the box of the support's rows: the rows it reaches, the others 0 (or all of them)
        rows = np.flatnonzero(x.any(axis=1))
        reached, block = conv.matmat_box(rows, x[rows])
        assert block.dtype == x.dtype
        if reached is None:
            assert np.array_equal(block, local)
        else:
            assert np.array_equal(block, local[reached]) and not local[np.setdiff1d(
                np.arange(conv.out_size), reached)].any()
        # the box of the reached outputs, widened by the taps' stride classes per axis
        reached = support.any(axis=1).reshape(conv.out_shape[1], -1).any(axis=0).reshape(conv.out_shape[2:])
        widen = [d * k // s + 1 for k, s, d in zip(config[3], config[4], config[6])]
        if reached.any():
            extents = [min(n, np.ptp(np.flatnonzero(reached.any(axis=tuple(j for j in range(reached.ndim)
                                                                            if j != i)))) + 1 + 2 * w)
                       for i, (n, w) in enumerate(zip(conv.out_shape[2:], widen))]
            assert not calls or math.prod(extents) > CROP_MAX * reached.size


def test_conv_matmat_local_takes_the_crop_on_a_band(monkeypatch):
    """Bands of rows of a 30x30 image through a 3x3 convolution: the crop of their
    union is convolved (the full product never runs) and equals it."""
    conv, _ = _conv_map(((1, 4, 30, 30), 5, 1, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)))
    images = np.zeros((6, 4, 30, 30), np.float32)
    rng = np.random.default_rng(3)
    images[:3, :, 10:13] = rng.standard_normal((3, 4, 3, 30))
    images[5, :, 13] = rng.standard_normal((4, 30))  # the last column alone reaches row 14
    x = np.asfortranarray(images.reshape(6, -1).T)
    expected = conv.matmat(x)
    monkeypatch.setattr(conv, "matmat", lambda v: pytest.fail("the full product ran"))
    local = conv.matmat_local(x).reshape(5, 30, 30, 6)
    _close(local, expected.reshape(5, 30, 30, 6))
    assert np.all(local[:, :9] == 0) and np.all(local[:, 15:] == 0)
    assert np.all(local[:, 9:15].any(axis=(0, 2, 3)))


def test_matmat_box_of_chains_stacks_and_selections():
    """A box of rows through a convolution, a selection, chains and stacks of them
    and a dense map: the product of the columns zero outside the rows, on the rows
    it says it reaches (all of them for a dense map), the others exactly 0."""
    conv, _ = _conv_map(((1, 2, 9, 9), 2, 1, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)))
    dense = DenseMap(np.arange(3 * conv.in_size, dtype=np.float32).reshape(3, -1) / 50,
                     (1, conv.in_size), (1, 3))
    rng = np.random.default_rng(4)
    shuffle = MonomialMap(np.arange(conv.out_size)[::-1].copy(), rng.standard_normal(conv.out_size),
                          conv.out_shape, conv.out_shape)  # the image turned around, scaled
    rows = np.flatnonzero(np.isin(np.arange(conv.in_size) % 81, [30, 31, 39, 40]))  # 2 x 2 positions
    block = rng.standard_normal((rows.size, 5))
    for linear in (conv, shuffle, ChainMap([conv, shuffle]), ChainMap([shuffle, conv]),
                   StackMap([conv, conv]), StackMap([conv, shuffle]), dense):
        x = np.zeros((linear.in_size, 5))
        x[rows] = block
        expected = linear.matmat(x)
        reached, values = linear.matmat_box(rows, block)
        assert linear.boxed == (reached is not None) and values.dtype == np.float64
        full = np.zeros_like(expected)
        full[slice(None) if reached is None else reached] = values
        _close(full, expected)
        if reached is not None:
            assert reached.size < linear.out_size and np.all(np.diff(reached) > 0)


def test_local_columns_follow_the_convolutions():
    """Only convolutions ask for narrow column chunks; chains and stacks take their
    parts' smallest limit, dense maps none."""
    conv, _ = _conv_map(((1, 2, 6, 6), 2, 1, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)))
    dense = DenseMap(np.ones((3, conv.out_size), np.float32), (1, conv.out_size), (1, 3))
    shuffle = MonomialMap(np.arange(conv.out_size)[::-1].copy(), None, conv.out_shape, conv.out_shape)
    assert conv.local_columns == 64 and dense.local_columns is None and shuffle.local_columns is None
    assert ChainMap([conv, shuffle]).local_columns == 64
    assert StackMap([conv, conv]).local_columns == 64
    assert StackMap([dense, dense]).local_columns is None


# ---------------------------------------------------------------------- whole networks


def _conv_models(tmp_path):
    nets = [netgen.conv_net(s) for s in (1, 3, 6, 9)]
    assert any(op.kind == "maxpool" for net in nets for op in net.ops)
    assert any(op.kind == "bn" for net in nets for op in net.ops)
    return [(net, net.save(tmp_path / f"{net.name}.onnx")) for net in nets]


def test_sparse_and_matrix_free_agree(tmp_path):
    """Same forward, same local bounds at three radii and same global bound (1e-6 rel)."""
    for net, path in _conv_models(tmp_path):
        sparse = onnxlip.load(path, operators="sparse")
        free = onnxlip.load(path, operators="matrix-free")
        reps = {b.map.representation for b in sparse.blocks if isinstance(b, AffineBlock)}
        assert reps == {"sparse"}
        assert "matrix-free" in {b.map.representation for b in free.blocks if isinstance(b, AffineBlock)}
        x0 = np.random.default_rng(0).standard_normal(net.input_shape)
        assert netgen.rel_err(sparse.forward(x0), free.forward(x0)) <= 1e-6
        assert netgen.rel_err(sparse.forward(x0), net(x0)[0]) <= 1e-6
        radii = [level * np.linalg.norm(x0) for level in (0.01, 0.1, 1.0)]
        for a, b in zip(sparse.local_bounds(x0, radii, method="paper"),
                        free.local_bounds(x0, radii, method="paper")):
            assert a.bound == pytest.approx(b.bound, rel=1e-6, abs=1e-12), net.name
        assert sparse.global_bound().bound == pytest.approx(free.global_bound().bound, rel=1e-6)


def test_sparse_mode_falls_back_to_matrix_free(tmp_path):
    """With a memory budget too small for any CSR matrix, 'sparse' keeps the original forms."""
    for net, path in _conv_models(tmp_path):
        tiny = onnxlip.load(path, operators="sparse", memory_budget=1)
        affine = [b for b in tiny.blocks if isinstance(b, AffineBlock)]
        assert affine
        for block in affine:
            assert block.map.representation in ("matrix-free", "dense", "monomial"), block.ops
            if "Conv" in block.ops:
                assert block.map.representation == "matrix-free"
        # the budget also stops dense compositions, so compare with matrix-free at the same budget
        free = onnxlip.load(path, operators="matrix-free", memory_budget=1)
        assert [b.ops for b in free.blocks] == [b.ops for b in tiny.blocks]
        x0 = np.random.default_rng(1).standard_normal(net.input_shape)
        assert netgen.rel_err(tiny.forward(x0), net(x0)[0]) <= 1e-6
        eps = 0.1 * np.linalg.norm(x0)
        bound = tiny.local_bound(x0, eps, method="paper").bound
        assert bound == pytest.approx(free.local_bound(x0, eps, method="paper").bound, rel=1e-6)
        assert bound >= np.linalg.norm(net.jacobian(x0), 2) * (1 - 1e-6)


def test_operator_mode_is_checked(tmp_path):
    net, path = _conv_models(tmp_path)[0]
    with pytest.raises(onnxlip.OnnxlipError):
        onnxlip.load(path, operators="csr")


def test_adjoint_kernel_follows_the_cost():
    """A flipped convolution for stride-1 'same'-sized maps; a ConvTranspose where the
    output is much smaller than the input (a whole-image window would cost the
    square of the image as a flipped convolution)."""
    same = ConvMap(np.ones((2, 2, 3, 3)), (1, 2, 16, 16), (1, 1), (1, 1, 1, 1), (1, 1), 1)
    whole = ConvMap(np.ones((2, 1, 400, 3)), (1, 2, 400, 3), (1, 1), (0, 0, 0, 0), (1, 1), 2)
    assert same._transpose.op_type == "Conv"
    assert whole._transpose.op_type == "ConvTranspose"
    u = np.random.default_rng(0).standard_normal(whole.out_size)
    _close(whole.rmatvec(u), whole.to_sparse().T @ u)


def test_node_models_take_the_lowest_ir_version_of_their_opset():
    """onnxruntime 1.30 refuses onnx 1.23's newest IR version (11): every
    one-node model onnxlip runs declares the IR version its opset needs."""
    from onnxlip.operators.ort import OPSET, node_model

    model = node_model("MaxPool", {}, 4, np.float64, ("y", "argmax"), kernel_shape=[2, 2])
    assert model.ir_version == onnx.helper.find_min_ir_version_for(model.opset_import)
    assert OPSET == 17 and model.ir_version == 8


def test_only_small_nodes_keep_a_memory_arena():
    """onnxruntime's arena keeps a session's largest buffers for good: maps past
    ARENA_ENTRIES_MAX entries per input or output (VGG16's 224x224 layers) run
    without one, every session of theirs; smaller ones keep it (it saves time on
    their many small runs). The products are the same either way."""
    from onnxlip.operators.ort import ARENA_ENTRIES_MAX

    def arenas(conv):
        sessions = (conv._forward, conv._transpose, conv._squared, conv._absolute, conv._cropped)
        return {s._session.get_session_options().enable_cpu_mem_arena for s in sessions}

    side = math.isqrt(ARENA_ENTRIES_MAX // 2) + 1  # two channels: just past the limit
    large = ConvMap(np.ones((2, 2, 3, 3)), (1, 2, side, side), (1, 1), (1, 1, 1, 1), (1, 1), 1)
    small = ConvMap(np.ones((2, 2, 3, 3)), (1, 2, 16, 16), (1, 1), (1, 1, 1, 1), (1, 1), 1)
    assert large.in_size > ARENA_ENTRIES_MAX >= small.in_size
    assert arenas(large) == {False} and arenas(small) == {True}
    x = np.random.default_rng(0).standard_normal(large.in_size)
    _close(large.matvec(x), large.to_sparse() @ x)


def _coefficient_cases() -> dict[str, LinearMap]:
    """One map of each operator class, some built so that the cheap bound is tight."""
    rng = np.random.default_rng(11)
    dense = DenseMap(rng.standard_normal((5, 4)), (4,), (5,))
    rank_one = DenseMap(np.ones((3, 4)), (4,), (3,))  # ||A|| = Frobenius
    conv, _ = _conv_map(FIXED[0])
    strided, _ = _conv_map(FIXED[4], seed=3)
    positive = ConvMap(np.ones((1, 1, 3, 3), np.float32), (1, 1, 30, 30), (1, 1), (1, 1, 1, 1),
                       (1, 1), 1)  # interior rows and columns sum to Σ|w|: Schur's test nearly tight
    # one input feeding three outputs at the largest scale: ||A|| = 3·√3, the bound exactly
    fan_out = MonomialMap(np.array([0, 0, 0, 1, -1]), np.array([3.0, -3.0, 3.0, 1.0, 9.0]), (2,), (5,))
    diagonal = MonomialMap.diagonal(np.array([0.5, -4.0, 2.0]), (3,))
    return {
        "dense": dense, "rank_one": rank_one,
        "sparse": SparseMap(sp.random(6, 5, density=0.5, random_state=1), (5,), (6,)),
        "conv": conv, "strided": strided, "positive": positive,
        "transpose": ConvTransposeMap(strided),
        "fan_out": fan_out, "diagonal": diagonal,
        "chain": ChainMap([diagonal, DenseMap(rng.standard_normal((4, 3)), (3,), (4,))]),
        "stack": StackMap([dense, DenseMap(rng.standard_normal((5, 2)), (2,), (5,))]),
    }


@pytest.mark.parametrize("name", list(_coefficient_cases()))
def test_coefficient_bound_is_above_the_norm(name):
    linear = _coefficient_cases()[name]
    exact = np.linalg.norm(linear.to_sparse().toarray(), 2)
    bound = linear.coefficient_bound()
    assert bound >= exact * (1 - 1e-9)
    if name in ("rank_one", "fan_out"):
        assert bound == pytest.approx(exact, rel=1e-9)
    if name == "positive":
        assert bound == pytest.approx(exact, rel=0.02)


@pytest.mark.parametrize("name", list(_coefficient_cases()))
def test_coefficients_finite_sees_a_nan_in_any_factor(name):
    linear = _coefficient_cases()[name]
    assert linear.coefficients_finite()
    for stored in _stored_coefficients(linear):
        stored.flat[stored.size // 2] = np.nan
        assert not linear.coefficients_finite()
        assert not linear.coefficient_bound() <= 1e300  # NaN: no bound, and load refuses it
        stored.flat[stored.size // 2] = 1.0


def _stored_coefficients(linear: LinearMap) -> list[np.ndarray]:
    """The arrays a map keeps its coefficients in (this test's own knowledge of them)."""
    if isinstance(linear, (ChainMap, StackMap)):
        parts = linear.maps if isinstance(linear, ChainMap) else linear.parts
        return [a for part in parts for a in _stored_coefficients(part)]
    if isinstance(linear, ConvTransposeMap):
        return _stored_coefficients(linear.conv)
    if isinstance(linear, SparseMap):
        return [linear.matrix.data]
    if isinstance(linear, MonomialMap):
        return [linear.scale]
    return [linear.weight]
