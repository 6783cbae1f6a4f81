"""The graph parser: exporters' shape chains, no-ops, external data, composition."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxlip


def _save(path, nodes, inits, in_shape, out_shape, opset=17):
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.save(model, path)
    return model


def _conv_flatten_gemm(rng):
    return {"W": rng.standard_normal((4, 2, 3, 3)).astype(np.float32),
            "B": rng.standard_normal((5, 4 * 4 * 4)).astype(np.float32),
            "zero": np.array([0], np.int64), "minus_one": np.array([-1], np.int64)}


def _ort(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x.astype(np.float32)})[0]


def test_pytorch_style_shape_chain_is_folded(tmp_path):
    """Shape -> Gather -> Unsqueeze -> Concat -> Reshape (x.view(x.size(0), -1)) plus
    Identity, Dropout and Cast to float are folded or dropped, and the result matches ort."""
    rng = np.random.default_rng(0)
    inits = _conv_flatten_gemm(rng)
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Identity", ["c"], ["c1"], name="id"),
        helper.make_node("Relu", ["c1"], ["r"], name="relu"),
        helper.make_node("Dropout", ["r"], ["d"], name="drop"),
        helper.make_node("Cast", ["d"], ["k"], to=TensorProto.FLOAT, name="cast"),
        helper.make_node("Shape", ["k"], ["s"], name="shape"),
        helper.make_node("Gather", ["s", "zero"], ["n"], axis=0, name="gather"),
        helper.make_node("Concat", ["n", "minus_one"], ["target"], axis=0, name="concat"),
        helper.make_node("Reshape", ["k", "target"], ["f"], name="reshape"),
        helper.make_node("Gemm", ["f", "B"], ["y"], transB=1, name="fc"),
    ]
    path = tmp_path / "chain.onnx"
    _save(path, nodes, inits, ["N", 2, 4, 4], ["N", 5])
    net = onnxlip.load(path)
    assert [b.kind for b in net.blocks] == ["affine-relu", "affine"]
    assert net.blocks[1].ops == ["Reshape", "Gemm"]
    x = rng.standard_normal((1, 2, 4, 4))
    assert np.allclose(net.forward(x), _ort(path, x), rtol=1e-4, atol=1e-5)


def test_external_data_is_loaded(tmp_path):
    rng = np.random.default_rng(1)
    inits = _conv_flatten_gemm(rng)
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Flatten", ["r"], ["f"]),
             helper.make_node("Gemm", ["f", "B"], ["y"], transB=1)]
    model = _save(tmp_path / "tmp.onnx", nodes, inits, [1, 2, 4, 4], [1, 5])
    path = tmp_path / "external.onnx"
    onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
              location="weights.bin", size_threshold=0)
    assert (tmp_path / "weights.bin").stat().st_size > 0
    net = onnxlip.load(path)
    x = rng.standard_normal((1, 2, 4, 4))
    assert np.allclose(net.forward(x), _ort(path, x), rtol=1e-4, atol=1e-5)


def test_normalization_and_batchnorm_compose_into_one_block(tmp_path):
    """Sub/Div before a conv and BatchNormalization after it form one affine-ReLU block
    whose bound equals the bound of the explicitly composed convolution."""
    rng = np.random.default_rng(2)
    w = rng.standard_normal((3, 2, 3, 3)).astype(np.float32)
    mean, std = np.float32(0.3), np.float32(0.7)
    gamma, beta = rng.uniform(0.5, 1.5, 3).astype(np.float32), rng.standard_normal(3).astype(np.float32)
    run_mean, var = rng.standard_normal(3).astype(np.float32), rng.uniform(0.5, 2, 3).astype(np.float32)
    norm = [helper.make_node("Sub", ["x", "m"], ["a"]), helper.make_node("Div", ["a", "s"], ["b"])]
    body = [helper.make_node("Conv", ["b", "W"], ["c"], pads=[0, 0, 0, 0]),
            helper.make_node("BatchNormalization", ["c", "g", "be", "rm", "v"], ["n"]),
            helper.make_node("Relu", ["n"], ["y"])]
    inits = {"m": np.array(mean), "s": np.array(std), "W": w, "g": gamma, "be": beta,
             "rm": run_mean, "v": var}
    path = tmp_path / "norm.onnx"
    _save(path, norm + body, inits, [1, 2, 6, 6], [1, 3, 4, 4])
    net = onnxlip.load(path)
    assert len(net.blocks) == 1 and net.blocks[0].ops == ["Sub", "Div", "Conv", "BatchNormalization",
                                                           "Relu"]
    x = rng.standard_normal((1, 2, 6, 6))
    assert np.allclose(net.forward(x), _ort(path, x), rtol=1e-4, atol=1e-5)
    scale = gamma / np.sqrt(var + 1e-5)
    folded = (w * scale[:, None, None, None] / std).astype(np.float64)
    dense = np.zeros((3 * 16, 2 * 36))
    for o in range(3):
        for i in range(4):
            for j in range(4):
                patch = np.zeros((2, 6, 6))
                patch[:, i:i + 3, j:j + 3] = folded[o]
                dense[o * 16 + i * 4 + j] = patch.ravel()
    assert net.global_bound().bound == pytest.approx(np.linalg.norm(dense, 2), rel=2e-4)
