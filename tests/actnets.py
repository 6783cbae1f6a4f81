"""Random small nets (MLP, CNN with a lone activation, residual DAG) with any one
activation, written as exporters write them (GELU and SiLU as their multi-node
idioms), with float32-exact weights so the float64 twin is the same network.

`emit` writes one activation as ONNX nodes; `SPECIAL` lists each activation's
kinks and inflection points (independently of onnxlip.activations), where the
MLP's first layer places some pre-activations at x0.
"""

from __future__ import annotations

import math

import numpy as np
from dagnets import DagNet
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun
from scipy import special

ACTIVATIONS = ("relu", "leakyrelu", "leakyrelu_neg", "prelu", "relu6", "hardtanh", "sigmoid", "tanh",
               "softplus", "elu", "elu_half", "hardsigmoid", "hardswish", "gelu_erf", "gelu_tanh",
               "silu")

#: Kinks, inflection points and derivative extrema of each activation.
SPECIAL = {
    "relu": [0.0], "leakyrelu": [0.0], "leakyrelu_neg": [0.0], "prelu": [0.0], "relu6": [0.0, 6.0],
    "hardtanh": [-1.0, 1.0], "sigmoid": [0.0], "tanh": [0.0], "softplus": [0.0], "elu": [0.0],
    "elu_half": [0.0], "hardsigmoid": [-2.5, 2.5], "hardswish": [-3.0, 3.0, -1.5],
    "gelu_erf": [-math.sqrt(2), math.sqrt(2), -0.7518], "gelu_tanh": [-1.5, 1.5, -0.75],
    "silu": [-2.3994, 2.3994, -1.2785],
}


def emit(net: DagNet, h: str, kind: str, channels: int, rank: int) -> str:
    """The activation `kind` of tensor h (channels on axis 1 of a tensor of this rank)."""
    c = net.const
    if kind == "relu":
        return net.node("Relu", [h])
    if kind == "leakyrelu":
        return net.node("LeakyRelu", [h], alpha=0.1)
    if kind == "leakyrelu_neg":
        return net.node("LeakyRelu", [h], alpha=-0.4)  # not monotone: negative chord slopes
    if kind == "prelu":
        slope = net.rng.uniform(-0.5, 0.5, (channels,) + (1,) * (rank - 2))
        return net.node("PRelu", [h, c(slope.astype(np.float32))])
    if kind in ("relu6", "hardtanh"):
        low, high = (0.0, 6.0) if kind == "relu6" else (-1.0, 1.0)
        return net.node("Clip", [h, c(np.array(low, np.float32)), c(np.array(high, np.float32))])
    if kind in ("sigmoid", "tanh", "softplus"):
        return net.node(kind.capitalize(), [h])
    if kind in ("elu", "elu_half"):
        return net.node("Elu", [h], alpha=1.0 if kind == "elu" else 0.5)
    if kind == "hardsigmoid":
        return net.node("HardSigmoid", [h], alpha=0.2, beta=0.5)
    if kind == "hardswish":
        return net.node("HardSwish", [h])
    if kind == "gelu_erf":  # torch's TorchScript form: (x * (Erf(x / √2) + 1)) * 0.5
        erf = net.node("Erf", [net.node("Div", [h, c(np.array(math.sqrt(2), np.float32))])])
        one = net.node("Add", [erf, c(np.array(1.0, np.float32))])
        return net.node("Mul", [net.node("Mul", [h, one]), c(np.array(0.5, np.float32))])
    if kind == "gelu_tanh":  # 0.5 x (1 + tanh(√(2/π)(x + 0.044715 x³)))
        cube = net.node("Pow", [h, c(np.array(3.0, np.float32))])
        inner = net.node("Add", [h, net.node("Mul", [cube, c(np.array(0.044715, np.float32))])])
        t = net.node("Tanh", [net.node("Mul", [inner, c(np.array(math.sqrt(2 / math.pi), np.float32))])])
        one = net.node("Add", [t, c(np.array(1.0, np.float32))])
        return net.node("Mul", [net.node("Mul", [h, c(np.array(0.5, np.float32))]), one])
    if kind == "silu":
        return net.node("Mul", [h, net.node("Sigmoid", [h])])
    raise ValueError(kind)


class Erf(OpRun):
    """Erf in float64 (onnx's reference Erf rounds to float32)."""

    op_domain = ""

    def _run(self, x):
        return (special.erf(x),)


def twin(net: DagNet):
    """The float64 network as a batched function of flat inputs (every op in float64)."""
    session = ReferenceEvaluator(net.model(np.float64), new_ops=[Erf])

    def f(points: np.ndarray) -> np.ndarray:
        x = np.asarray(points, np.float64).reshape((-1, *net.input_shape[1:]))
        return session.run(None, {"x": x})[0].reshape(len(x), -1)

    return f


def _exact32(net: DagNet) -> DagNet:
    """Round the float weights to float32 (the float64 twin then computes the same net)."""
    net.weights = {k: v.astype(np.float32).astype(np.float64) if v.dtype.kind == "f" else v
                   for k, v in net.weights.items()}
    return net


def mlp(kind: str, seed: int) -> tuple[DagNet, np.ndarray]:
    """x -> Gemm -> σ -> Gemm -> σ -> Gemm; some first-layer pre-activations at x0 sit
    (within float32 rounding) on σ's special points. Returns the net and x0."""
    rng = np.random.default_rng(seed)
    n_in, width = int(rng.integers(3, 7)), int(rng.integers(4, 10))
    net = DagNet(f"mlp_{kind}_{seed}", (1, n_in), rng)
    x0 = rng.standard_normal((1, n_in)) * 1.5
    w = (rng.standard_normal((width, n_in)) * 1.5 / np.sqrt(n_in)).astype(np.float32).astype(np.float64)
    targets = rng.standard_normal(width) * 2.0
    points = SPECIAL[kind]
    for i in range(0, width, 2):
        targets[i] = points[(i // 2) % len(points)]
    bias = targets - w @ x0.ravel()
    h = net.node("Gemm", ["x", net.const(w), net.const(bias)], transB=1)
    h = emit(net, h, kind, width, 2)
    h = emit(net, net.gemm(h, width, width, 1.5), kind, width, 2)
    net.output = net.gemm(h, width, int(rng.integers(2, 5)))
    return _exact32(net), x0


def cnn(kind: str, seed: int) -> tuple[DagNet, np.ndarray]:
    """Conv -> BN -> σ -> Conv (stride 2) -> MaxPool -> σ (a lone activation block) ->
    Flatten -> Gemm."""
    rng = np.random.default_rng(seed)
    c, size = int(rng.integers(1, 3)), int(rng.integers(6, 9))
    net = DagNet(f"cnn_{kind}_{seed}", (1, c, size, size), rng)
    width = int(rng.integers(2, 4))
    h = emit(net, net.bn(net.conv("x", c, width), width), kind, width, 4)
    h = net.conv(h, width, width, stride=2)
    size = (size - 1) // 2 + 1
    h = net.node("MaxPool", [h], kernel_shape=[2, 2], strides=[1, 1])
    size -= 1
    h = emit(net, h, kind, width, 4)
    h = net.node("Flatten", [h])
    net.output = net.gemm(h, width * size * size, int(rng.integers(2, 4)))
    return _exact32(net), rng.standard_normal(net.input_shape)


def residual(kind: str, seed: int) -> tuple[DagNet, np.ndarray]:
    """x -> Gemm -> σ -> [h + Gemm(σ(Gemm h))] -> σ, a tensor read by two nodes -> Gemm."""
    rng = np.random.default_rng(seed)
    n_in, width = int(rng.integers(3, 7)), int(rng.integers(3, 8))
    net = DagNet(f"res_{kind}_{seed}", (1, n_in), rng)
    h = emit(net, net.gemm("x", n_in, width, 2.0), kind, width, 2)
    branch = net.gemm(emit(net, net.gemm(h, width, width, 1.5), kind, width, 2), width, width, 0.8)
    h = emit(net, net.node("Add", [h, branch]), kind, width, 2)
    net.output = net.gemm(h, width, int(rng.integers(2, 5)))
    return _exact32(net), rng.standard_normal(net.input_shape)


FAMILIES = {"mlp": mlp, "cnn": cnn, "residual": residual}
