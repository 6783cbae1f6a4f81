"""Random ONNX networks that are not chains, and their float64 twins.

Residual MLPs and CNNs (identity and projection shortcuts, Sub), Concat of
branches, Split into branches, a tensor read by three nodes, MobileNet-style
inverted residuals (depthwise / grouped convolutions, ReduceMean with axes as
an input), Inception-style pooling branches, pre-activation ResNets (the
network input is the first shortcut), a U-Net (ConvTranspose, skip Concat),
DenseNet-style growing Concats, and MLPs split unevenly and sliced with steps.

Every family takes the activation by name (`ACTIVATIONS`: the ONNX node or
node pattern an exporter writes), so that new activations drop into every
structure. Each net is written as a float32 ONNX model (as exporters write
them); its float64 twin is the same graph with the same (float32-rounded)
weights and every tensor in float64, run by onnx's reference evaluator, so
sampled difference quotients carry no float32 noise.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from netgen import AveragePool, MaxPool
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
    activation: str = "relu"
    opset: int = 17

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

    def act(self, x: str) -> str:
        """The net's activation (`ACTIVATIONS[self.activation]`) applied to x."""
        return ACTIVATIONS[self.activation](self, x)

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

    def conv_transpose(self, x: str, c_in: int, c_out: int, size: int) -> str:
        """A kernel-2 stride-2 ConvTranspose back from size // 2 to size (output_padding if odd)."""
        w = self.rng.standard_normal((c_in, c_out, 2, 2)) / np.sqrt(c_in)
        b = self.rng.standard_normal(c_out) * 0.2
        return self.node("ConvTranspose", [x, self.const(w), self.const(b)], kernel_shape=[2, 2],
                         strides=[2, 2], output_padding=[size % 2] * 2)

    def pool(self, x: str, kind: str, k: int, stride: int, pad: int = 0) -> str:
        """MaxPool or AveragePool (count_include_pad drawn) with a square window."""
        attrs = {"kernel_shape": [k, k], "strides": [stride, stride], "pads": [pad] * 4}
        if kind == "AveragePool":
            attrs["count_include_pad"] = int(self.rng.integers(2))
        return self.node(kind, [x], **attrs)

    def model(self, dtype=np.float32) -> onnx.ModelProto:
        """The graph with float tensors in dtype; the weights are rounded to float32 first
        (the float32 model's own weights, also in the float64 twin)."""
        elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
        inits = [numpy_helper.from_array(
            np.asarray(v).astype(np.float32).astype(dtype) if v.dtype.kind == "f" else v, n)
            for n, v in self.weights.items()]
        graph = helper.make_graph(
            self.nodes, self.name,
            [helper.make_tensor_value_info("x", elem, ["N", *self.input_shape[1:]])],
            [helper.make_tensor_value_info(self.output, elem, list(self.output_shape))], inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])
        model.ir_version = 8 if self.opset <= 18 else 9
        return model

    def save(self, path: Path) -> Path:
        onnx.save(self.model(), path)
        return path

    def twin(self):
        """The float64 network as a batched function of flat inputs."""
        session = ReferenceEvaluator(self.model(np.float64), new_ops=[MaxPool, AveragePool])

        def f(points: np.ndarray) -> np.ndarray:
            x = np.asarray(points, np.float64).reshape((-1, *self.input_shape[1:]))
            return session.run(None, {"x": x})[0].reshape(len(x), -1)

        return f


def residual_mlp(seed: int, activation: str = "relu") -> DagNet:
    """x -> Gemm -> [h + ReLU(Gemm(ReLU(Gemm h)))] x depth (Add or Sub) -> Gemm."""
    rng = np.random.default_rng(seed)
    n_in, width, n_out = rng.integers(3, 9), rng.integers(4, 12), rng.integers(2, 6)
    net = DagNet(f"resmlp{seed}", (1, int(n_in)), rng, activation=activation)
    h = net.act(net.gemm("x", n_in, width))
    for _ in range(rng.integers(1, 4)):
        branch = net.gemm(net.act(net.gemm(h, width, width)), width, width, 0.7)
        joined = net.node("Sub" if rng.random() < 0.25 else "Add", [h, branch])
        h = net.act(joined) if rng.random() < 0.7 else joined
    net.output = net.gemm(h, width, n_out)
    return net


def residual_cnn(seed: int, activation: str = "relu") -> DagNet:
    """ResNet-style basic blocks (conv-bn-relu-conv-bn + identity or 1x1
    projection shortcut, then ReLU), max- or average-pooling, global average (or, one seed
    in three, max) pooling, Gemm."""
    rng = np.random.default_rng(seed)
    c, size = int(rng.integers(1, 4)), int(rng.integers(5, 9))
    net = DagNet(f"rescnn{seed}", (1, c, size, size), rng, activation=activation)
    width = int(rng.integers(2, 5))
    h = net.act(net.bn(net.conv("x", c, width), width))
    for _ in range(rng.integers(1, 3)):
        out = width + int(rng.integers(0, 3))
        stride = int(rng.choice([1, 2])) if size > 4 else 1
        branch = net.act(net.bn(net.conv(h, width, out, stride=stride), out))
        branch = net.bn(net.conv(branch, out, out), out)
        shortcut = h if (out == width and stride == 1) else net.bn(net.conv(h, width, out, 1, stride), out)
        h = net.act(net.node("Add", [branch, shortcut]))
        width, size = out, (size - 1) // stride + 1
    if size >= 4 and rng.random() < 0.5:
        h = net.node("MaxPool" if rng.random() < 0.5 else "AveragePool", [h], kernel_shape=[2, 2],
                     strides=[2, 2])
    pool = "GlobalMaxPool" if seed % 3 == 0 else "GlobalAveragePool"  # no draw: same weights
    h = net.node("Flatten", [net.node(pool, [h])])
    net.output = net.gemm(h, width, int(rng.integers(2, 5)))
    return net


def concat_net(seed: int, activation: str = "relu") -> DagNet:
    """Two or three convolution branches on one input, concatenated along
    channels (some through a ReLU), then a convolution, a Split into two
    channel groups added back together, and a Gemm."""
    rng = np.random.default_rng(seed)
    c, size = int(rng.integers(1, 3)), int(rng.integers(4, 7))
    net = DagNet(f"concat{seed}", (1, c, size, size), rng, activation=activation)
    stem = net.act(net.conv("x", c, 2))  # read by every branch
    widths = [int(rng.integers(1, 4)) for _ in range(rng.integers(2, 4))]
    branches = []
    for w in widths:
        b = net.conv(stem, 2, w, k=int(rng.choice([1, 3])))
        branches.append(net.act(b) if rng.random() < 0.6 else b)
    h = net.node("Concat", branches, axis=1)
    h = net.act(net.conv(h, sum(widths), 4))
    first, second = net.node("Split", [h], axis=1), f"t{len(net.nodes)}b"
    net.nodes[-1].output.append(second)  # two equal channel groups
    h = net.node("Add", [net.act(first), second])
    h = net.node("Flatten", [h])
    net.output = net.gemm(h, 2 * size * size, int(rng.integers(2, 5)))
    return net


def fan_out_net(seed: int, activation: str = "relu") -> DagNet:
    """One hidden tensor read by three Gemm branches, summed, with a slice of the
    input concatenated back in."""
    rng = np.random.default_rng(seed)
    n_in, width = int(rng.integers(4, 9)), int(rng.integers(3, 8))
    net = DagNet(f"fanout{seed}", (1, n_in), rng, activation=activation)
    h = net.act(net.gemm("x", n_in, width))
    parts = [net.gemm(h, width, width) for _ in range(3)]
    s = net.node("Sum", parts)
    starts, ends, axes = (net.const(np.array([v], np.int64)) for v in (1, n_in - 1, 1))
    piece = net.node("Slice", ["x", starts, ends, axes])
    h = net.node("Concat", [net.act(s), piece], axis=1)
    net.output = net.gemm(h, width + n_in - 2, int(rng.integers(2, 5)))
    return net


def inverted_residual(seed: int, activation: str = "relu") -> DagNet:
    """MobileNetV2-style blocks: 1x1 expansion (BN, act), a depthwise or grouped 3x3
    convolution (BN, act, stride 1 or 2), a 1x1 projection (BN), plus the block's
    input when the shapes agree (always in the first block); global pooling as GlobalAveragePool or (opset 18)
    ReduceMean with its axes as an input; Gemm."""
    rng = np.random.default_rng(seed)
    c, size = int(rng.integers(1, 4)), int(rng.integers(5, 9))
    net = DagNet(f"invres{seed}", (1, c, size, size), rng, activation=activation)
    width = 2 * int(rng.integers(1, 3))
    h = net.act(net.bn(net.conv("x", c, width), width))
    for block in range(rng.integers(1, 4)):
        wide = width * int(rng.integers(2, 4))
        group = wide if rng.random() < 0.6 else 2  # depthwise, or two groups
        stride = int(rng.choice([1, 1, 2])) if size > 4 and block else 1
        out = width if rng.random() < 0.7 or not block else width + 2  # the first is residual
        branch = net.act(net.bn(net.conv(h, width, wide, k=1), wide))
        branch = net.act(net.bn(net.conv(branch, wide, wide, stride=stride, group=group), wide))
        branch = net.bn(net.conv(branch, wide, out, k=1), out)
        h = net.node("Add", [h, branch]) if (stride == 1 and out == width) else branch
        width, size = out, (size - 1) // stride + 1
    if rng.random() < 0.5:
        net.opset = 18
        h = net.node("ReduceMean", [h, net.const(np.array([2, 3], np.int64))], keepdims=0)
    else:
        h = net.node("Flatten", [net.node("GlobalAveragePool", [h])])
    net.output = net.gemm(h, width, int(rng.integers(2, 5)))
    return net


def inception(seed: int, activation: str = "relu") -> DagNet:
    """Inception-style: a stem read by a 1x1 conv, a 3x3 conv, a 3x3 max-pool (stride 1,
    padded) then 1x1 conv, and a 3x3 average pool then 1x1 conv; the branches
    concatenated (or, equal in width, summed), pooled by 2, Gemm."""
    rng = np.random.default_rng(seed)
    c, size = int(rng.integers(1, 3)), int(rng.integers(4, 8))
    net = DagNet(f"incept{seed}", (1, c, size, size), rng, activation=activation)
    width = int(rng.integers(2, 4))
    stem = net.act(net.conv("x", c, width))
    same = rng.random() < 0.4
    widths = [width if same else int(rng.integers(1, 4)) for _ in range(4)]
    branches = [net.conv(stem, width, widths[0], k=1), net.conv(stem, width, widths[1], k=3),
                net.conv(net.pool(stem, "MaxPool", 3, 1, 1), width, widths[2], k=1),
                net.conv(net.pool(stem, "AveragePool", 3, 1, 1), width, widths[3], k=1)]
    branches = [net.act(b) if rng.random() < 0.7 else b for b in branches]
    h = net.node("Sum", branches) if same else net.node("Concat", branches, axis=1)
    channels = width if same else sum(widths)
    if size >= 4:
        h, size = net.pool(h, str(rng.choice(["MaxPool", "AveragePool"])), 2, 2), size // 2
    net.output = net.gemm(net.node("Flatten", [h]), channels * size * size, int(rng.integers(2, 5)))
    return net


def preact_resnet(seed: int, activation: str = "relu") -> DagNet:
    """Pre-activation residual blocks: h + conv(act(BN(conv(act(BN(h)))))), where the
    first h is the network input itself; a final BN, act, global pooling, Gemm."""
    rng = np.random.default_rng(seed)
    c, size = int(rng.integers(1, 4)), int(rng.integers(4, 8))
    net = DagNet(f"preact{seed}", (1, c, size, size), rng, activation=activation)
    h = "x"
    for _ in range(rng.integers(1, 4)):
        mid = int(rng.integers(1, 5))
        branch = net.conv(net.act(net.bn(h, c)), c, mid)
        branch = net.conv(net.act(net.bn(branch, mid)), mid, c)
        h = net.node("Add" if rng.random() < 0.8 else "Sub", [h, branch])
    h = net.act(net.bn(h, c))
    h = net.node("Flatten", [net.node("GlobalAveragePool", [h])])
    net.output = net.gemm(h, c, int(rng.integers(2, 5)))
    return net


def unet(seed: int, activation: str = "relu") -> DagNet:
    """A small U-Net: conv (act), max- or average-pool by 2, conv (BN, act), a stride-2
    ConvTranspose back to full size, joined to the first features by Concat or Add,
    conv (act), Flatten, Gemm."""
    rng = np.random.default_rng(seed)
    c, size = int(rng.integers(1, 3)), int(rng.integers(4, 8))
    net = DagNet(f"unet{seed}", (1, c, size, size), rng, activation=activation)
    width = int(rng.integers(2, 4))
    skip = net.act(net.conv("x", c, width))
    down = net.pool(skip, str(rng.choice(["MaxPool", "AveragePool"])), 2, 2)
    deep = net.act(net.bn(net.conv(down, width, 2 * width), 2 * width))
    up = net.conv_transpose(deep, 2 * width, width, size)
    if rng.random() < 0.5:
        h, channels = net.node("Concat", [up, skip], axis=1), 2 * width
    else:
        h, channels = net.node("Add", [skip, up]), width
    h = net.act(net.conv(h, channels, 2))
    net.output = net.gemm(net.node("Flatten", [h]), 2 * size * size, int(rng.integers(2, 5)))
    return net


def dense_block(seed: int, activation: str = "relu") -> DagNet:
    """DenseNet-style: each layer reads the Concat of all earlier features through
    BN, act and a conv; the last Concat, act, an average pool, Gemm."""
    rng = np.random.default_rng(seed)
    c, size = int(rng.integers(1, 3)), int(rng.integers(4, 7))
    net = DagNet(f"dense{seed}", (1, c, size, size), rng, activation=activation)
    features, widths = ["x"], [c]
    for _ in range(rng.integers(2, 4)):
        joined = features[0] if len(features) == 1 else net.node("Concat", features, axis=1)
        grow = int(rng.integers(1, 3))
        features.append(net.conv(net.act(net.bn(joined, sum(widths))), sum(widths), grow))
        widths.append(grow)
    h = net.act(net.node("Concat", features, axis=1))
    h = net.pool(h, "AveragePool", 2, 2)
    flat = sum(widths) * (size // 2) ** 2
    net.output = net.gemm(net.node("Flatten", [h]), flat, int(rng.integers(2, 5)))
    return net


def split_mlp(seed: int, activation: str = "relu") -> DagNet:
    """A hidden layer split unevenly (sizes as an input) into three parts: one through a
    Gemm and act, one through act alone, one sliced with step 2; concatenated, minus
    a Gemm of itself (Sub of two computed tensors), Gemm."""
    rng = np.random.default_rng(seed)
    n_in = int(rng.integers(3, 8))
    sizes = [int(v) for v in rng.integers(1, 5, 3)]
    sizes[2] += 1  # the stepped slice keeps at least one entry
    width = sum(sizes)
    net = DagNet(f"split{seed}", (1, n_in), rng, activation=activation)
    h = net.act(net.gemm("x", n_in, width))
    first = net.node("Split", [h, net.const(np.array(sizes, np.int64))], axis=1)
    second, third = (f"t{len(net.nodes) - 1}{k}" for k in "bc")
    net.nodes[-1].output.extend([second, third])
    stepped = net.node("Slice", [third] + [net.const(np.array([v], np.int64)) for v in (0, sizes[2], 1, 2)])
    parts = [net.act(net.gemm(first, sizes[0], sizes[0])), net.act(second), stepped]
    merged = sizes[0] + sizes[1] + math.ceil(sizes[2] / 2)
    h = net.node("Concat", parts, axis=1)
    h = net.node("Sub", [h, net.gemm(h, merged, merged, 0.5)])
    net.output = net.gemm(h, merged, int(rng.integers(2, 5)))
    return net


FAMILIES: dict[str, Callable[..., DagNet]] = {
    "resmlp": residual_mlp, "rescnn": residual_cnn, "concat": concat_net, "fanout": fan_out_net,
    "invres": inverted_residual, "incept": inception, "preact": preact_resnet, "unet": unet,
    "dense": dense_block, "split": split_mlp}


def _const_node(op: str, *constants: float, **attrs) -> Callable[[DagNet, str], str]:
    """An activation that is one node reading x and scalar constants."""

    def apply(net: DagNet, x: str) -> str:
        return net.node(op, [x, *(net.const(np.array(v, np.float32)) for v in constants)], **attrs)

    return apply


def _gelu_erf(net: DagNet, x: str) -> str:
    """x * 0.5 * (1 + Erf(x / sqrt 2)), as torch's exporter writes GELU."""
    erf = net.node("Erf", [net.node("Div", [x, net.const(np.array(math.sqrt(2), np.float32))])])
    half = net.node("Mul", [x, net.const(np.array(0.5, np.float32))])
    return net.node("Mul", [half, net.node("Add", [erf, net.const(np.array(1.0, np.float32))])])


def _gelu_tanh(net: DagNet, x: str) -> str:
    """0.5 x (1 + Tanh(sqrt(2/pi) (x + 0.044715 x^3))), GELU's tanh approximation."""
    cube = net.node("Mul", [net.node("Mul", [x, x]), x])
    inner = net.node("Add", [x, net.node("Mul", [cube, net.const(np.array(0.044715, np.float32))])])
    scaled = net.node("Mul", [inner, net.const(np.array(math.sqrt(2 / math.pi), np.float32))])
    one = net.node("Add", [net.node("Tanh", [scaled]), net.const(np.array(1.0, np.float32))])
    return net.node("Mul", [net.node("Mul", [x, net.const(np.array(0.5, np.float32))]), one])


#: Activation name -> how it is written into a net (the ops exporters emit).
ACTIVATIONS: dict[str, Callable[[DagNet, str], str]] = {
    "relu": _const_node("Relu"),
    "leakyrelu": _const_node("LeakyRelu", alpha=0.1),
    "prelu": _const_node("PRelu", [0.25]),
    "relu6": _const_node("Clip", 0.0, 6.0),
    "hardtanh": _const_node("Clip", -1.0, 1.0),
    "sigmoid": _const_node("Sigmoid"),
    "tanh": _const_node("Tanh"),
    "softplus": _const_node("Softplus"),
    "elu": _const_node("Elu", alpha=1.0),
    "gelu_erf": _gelu_erf,
    "gelu_tanh": _gelu_tanh,
    "silu": lambda net, x: net.node("Mul", [x, net.node("Sigmoid", [x])]),
    "hardsigmoid": _const_node("HardSigmoid", alpha=0.2, beta=0.5),
    "hardswish": _const_node("HardSwish"),
}
