"""Random ONNX networks that are not chains, and their float64 twins.

Residual MLPs and CNNs (identity and projection shortcuts, Sub), Concat of
branches, Split into branches, a tensor read by three nodes. Each net is
written as a float32 ONNX model (as exporters write them); its float64 twin
is the same graph with every tensor in float64, run by onnx's reference
evaluator, so sampled difference quotients carry no float32 noise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator


@dataclass
class DagNet:
    """An ONNX graph under construction: nodes, weights, input/output shapes."""

    name: str
    input_shape: tuple[int, ...]
    rng: np.random.Generator
    nodes: list = field(default_factory=list)
    weights: dict = field(default_factory=dict)
    output: str = "x"
    output_shape: tuple[int, ...] = ()

    def node(self, op: str, inputs: list[str], **attrs) -> str:
        out = f"t{len(self.nodes)}"
        self.nodes.append(helper.make_node(op, inputs, [out], name=f"{op.lower()}{len(self.nodes)}",
                                           **attrs))
        return out

    def const(self, value: np.ndarray) -> str:
        name = f"w{len(self.weights)}"
        self.weights[name] = np.asarray(value)
        return name

    def gemm(self, x: str, n_in: int, n_out: int, scale: float = 1.0) -> str:
        self.output_shape = ("N", int(n_out))  # the last Gemm is the output
        w = self.rng.standard_normal((n_out, n_in)) * scale / np.sqrt(n_in)
        b = self.rng.standard_normal(n_out) * 0.3
        return self.node("Gemm", [x, self.const(w), self.const(b)], transB=1)

    def conv(self, x: str, c_in: int, c_out: int, k: int = 3, stride: int = 1, group: int = 1) -> str:
        w = self.rng.standard_normal((c_out, c_in // group, k, k)) * 1.2 / np.sqrt(c_in // group * k * k)
        b = self.rng.standard_normal(c_out) * 0.2
        pad = k // 2
        return self.node("Conv", [x, self.const(w), self.const(b)], kernel_shape=[k, k],
                         strides=[stride, stride], pads=[pad] * 4, group=group)

    def bn(self, x: str, c: int) -> str:
        gamma, beta = self.rng.uniform(0.5, 1.5, c), self.rng.standard_normal(c) * 0.2
        mean, var = self.rng.standard_normal(c) * 0.2, self.rng.uniform(0.5, 2.0, c)
        return self.node("BatchNormalization", [x] + [self.const(v) for v in (gamma, beta, mean, var)])

    def model(self, dtype=np.float32) -> onnx.ModelProto:
        elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
        inits = [numpy_helper.from_array(np.asarray(v, dtype if v.dtype.kind == "f" else v.dtype), n)
                 for n, v in self.weights.items()]
        graph = helper.make_graph(
            self.nodes, self.name,
            [helper.make_tensor_value_info("x", elem, ["N", *self.input_shape[1:]])],
            [helper.make_tensor_value_info(self.output, elem, list(self.output_shape))], inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        return model

    def save(self, path: Path) -> Path:
        onnx.save(self.model(), path)
        return path

    def twin(self):
        """The float64 network as a batched function of flat inputs."""
        session = ReferenceEvaluator(self.model(np.float64))

        def f(points: np.ndarray) -> np.ndarray:
            x = np.asarray(points, np.float64).reshape((-1, *self.input_shape[1:]))
            return session.run(None, {"x": x})[0].reshape(len(x), -1)

        return f


def residual_mlp(seed: int) -> DagNet:
    """x -> Gemm -> [h + ReLU(Gemm(ReLU(Gemm h)))] x depth (Add or Sub) -> Gemm."""
    rng = np.random.default_rng(seed)
    n_in, width, n_out = rng.integers(3, 9), rng.integers(4, 12), rng.integers(2, 6)
    net = DagNet(f"resmlp{seed}", (1, int(n_in)), rng)
    h = net.node("Relu", [net.gemm("x", n_in, width)])
    for _ in range(rng.integers(1, 4)):
        branch = net.gemm(net.node("Relu", [net.gemm(h, width, width)]), width, width, 0.7)
        joined = net.node("Sub" if rng.random() < 0.25 else "Add", [h, branch])
        h = net.node("Relu", [joined]) if rng.random() < 0.7 else joined
    net.output = net.gemm(h, width, n_out)
    return net


def residual_cnn(seed: int) -> DagNet:
    """ResNet-style basic blocks (conv-bn-relu-conv-bn + identity or 1x1
    projection shortcut, then ReLU), max- or average-pooling, global pooling, Gemm."""
    rng = np.random.default_rng(seed)
    c, size = int(rng.integers(1, 4)), int(rng.integers(5, 9))
    net = DagNet(f"rescnn{seed}", (1, c, size, size), rng)
    width = int(rng.integers(2, 5))
    h = net.node("Relu", [net.bn(net.conv("x", c, width), width)])
    for _ in range(rng.integers(1, 3)):
        out = width + int(rng.integers(0, 3))
        stride = int(rng.choice([1, 2])) if size > 4 else 1
        branch = net.node("Relu", [net.bn(net.conv(h, width, out, stride=stride), out)])
        branch = net.bn(net.conv(branch, out, out), out)
        shortcut = h if (out == width and stride == 1) else net.bn(net.conv(h, width, out, 1, stride), out)
        h = net.node("Relu", [net.node("Add", [branch, shortcut])])
        width, size = out, (size - 1) // stride + 1
    if size >= 4 and rng.random() < 0.5:
        h = net.node("MaxPool" if rng.random() < 0.5 else "AveragePool", [h], kernel_shape=[2, 2],
                     strides=[2, 2])
    h = net.node("Flatten", [net.node("GlobalAveragePool", [h])])
    net.output = net.gemm(h, width, int(rng.integers(2, 5)))
    return net


def concat_net(seed: int) -> DagNet:
    """Two or three convolution branches on one input, concatenated along
    channels (some through a ReLU), then a convolution, a Split into two
    channel groups added back together, and a Gemm."""
    rng = np.random.default_rng(seed)
    c, size = int(rng.integers(1, 3)), int(rng.integers(4, 7))
    net = DagNet(f"concat{seed}", (1, c, size, size), rng)
    stem = net.node("Relu", [net.conv("x", c, 2)])  # read by every branch
    widths = [int(rng.integers(1, 4)) for _ in range(rng.integers(2, 4))]
    branches = []
    for w in widths:
        b = net.conv(stem, 2, w, k=int(rng.choice([1, 3])))
        branches.append(net.node("Relu", [b]) if rng.random() < 0.6 else b)
    h = net.node("Concat", branches, axis=1)
    h = net.node("Relu", [net.conv(h, sum(widths), 4)])
    first, second = net.node("Split", [h], axis=1), f"t{len(net.nodes)}b"
    net.nodes[-1].output.append(second)  # two equal channel groups
    h = net.node("Add", [net.node("Relu", [first]), second])
    h = net.node("Flatten", [h])
    net.output = net.gemm(h, 2 * size * size, int(rng.integers(2, 5)))
    return net


def fan_out_net(seed: int) -> DagNet:
    """One hidden tensor read by three Gemm branches, summed, with a slice of the
    input concatenated back in."""
    rng = np.random.default_rng(seed)
    n_in, width = int(rng.integers(4, 9)), int(rng.integers(3, 8))
    net = DagNet(f"fanout{seed}", (1, n_in), rng)
    h = net.node("Relu", [net.gemm("x", n_in, width)])
    parts = [net.gemm(h, width, width) for _ in range(3)]
    s = net.node("Sum", parts)
    starts, ends, axes = (net.const(np.array([v], np.int64)) for v in (1, n_in - 1, 1))
    piece = net.node("Slice", ["x", starts, ends, axes])
    h = net.node("Concat", [net.node("Relu", [s]), piece], axis=1)
    net.output = net.gemm(h, width + n_in - 2, int(rng.integers(2, 5)))
    return net


FAMILIES = {"resmlp": residual_mlp, "rescnn": residual_cnn, "concat": concat_net,
            "fanout": fan_out_net}
