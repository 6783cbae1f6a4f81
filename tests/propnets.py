"""Hypothesis strategies that draw small random ONNX networks (mostly ReLU).

A drawn `NetSpec` holds the structure (input shape and a list of ops with
their hyper-parameters: what hypothesis shrinks) and a seed for the weights,
which numpy draws when the model is built. `build(spec)` makes the ONNX model
with onnx.helper (opset 17); `nominal(spec)` draws an input x0.

Ops: Gemm / MatMul, Conv (1-D and 2-D: kernel, stride, pads, dilation,
group), MaxPool, AveragePool, GlobalAveragePool, GlobalMaxPool, BatchNormalization,
Sub / Div / Mul / Add by a constant (scalar, per-channel or full shape, on
either side), Relu (or, one time in three, another activation: LeakyRelu,
Clip, Sigmoid, Tanh, Softplus, Elu, HardSigmoid, HardSwish, SiLU as
x·Sigmoid(x)), Flatten.

`dag_nets()` draws graphs that are not chains (a `DagSpec`: stages that keep
the spatial size, built with tests/dagnets.py's DagNet): residual blocks (Add
or Sub, batch-norm, grouped convolutions), fan-out into branches joined by Sum
or Concat, a Concat of a tensor with a function of itself, and pooling branches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
from dagnets import DagNet
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


@dataclass(frozen=True)
class NetSpec:
    """A network: input shape, ops (kind, params) in order, weight seed."""

    input_shape: tuple[int, ...]
    ops: tuple[tuple[str, tuple], ...]
    seed: int

    def __repr__(self) -> str:
        ops = ", ".join(f"{k}{dict(p) if p else ''}" for k, p in self.ops)
        return f"NetSpec(input={self.input_shape}, seed={self.seed}, ops=[{ops}])"


def _out(size: int, k: int, s: int, pb: int, pe: int, d: int) -> int:
    return (size + pb + pe - d * (k - 1) - 1) // s + 1


@st.composite
def _elementwise(draw, shape: tuple[int, ...]) -> tuple[str, tuple]:
    """Sub / Div / Mul / Add by a constant of a broadcastable shape."""
    op = draw(st.sampled_from(["Sub", "RSub", "Div", "Mul", "Add"]))
    forms = [(), (shape[1],) + (1,) * (len(shape) - 2), shape[1:], shape]
    const_shape = draw(st.sampled_from(forms))
    return op, (("const_shape", const_shape),)


#: Activations other than Relu ("Act" ops): name -> (ONNX op, attributes).
ACTIVATIONS = {
    "leakyrelu": ("LeakyRelu", {"alpha": 0.1}), "leakyneg": ("LeakyRelu", {"alpha": -0.3}),
    "relu6": ("Clip", {}), "sigmoid": ("Sigmoid", {}), "tanh": ("Tanh", {}),
    "softplus": ("Softplus", {}), "elu": ("Elu", {"alpha": 0.7}), "hardsigmoid": ("HardSigmoid", {}),
    "hardswish": ("HardSwish", {}), "silu": ("Sigmoid", {}),
}


def _activation(draw) -> tuple[str, tuple]:
    """Relu two times in three, else another activation."""
    if draw(st.integers(0, 2)) < 2:
        return ("Relu", ())
    return ("Act", (("kind", draw(st.sampled_from(sorted(ACTIVATIONS)))),))


@st.composite
def _dense_layer(draw, relu: bool) -> list[tuple[str, tuple]]:
    n_out = draw(st.integers(1, 12))
    if draw(st.booleans()):
        params = (("n_out", n_out), ("transB", draw(st.integers(0, 1))),
                  ("bias", draw(st.booleans())), ("alpha", draw(st.sampled_from([1.0, 0.5, 2.0]))))
        ops = [("Gemm", params)]
    else:
        ops = [("MatMul", (("n_out", n_out),))]
    if relu and draw(st.integers(0, 3)) == 0:
        ops.append(("BatchNormalization", ()))
    if draw(st.integers(0, 4)) == 0:
        ops.append(draw(_elementwise((1, n_out))))
    if relu:
        ops.append(_activation(draw))
    return ops


@st.composite
def dense_nets(draw) -> NetSpec:
    """x (1, n) -> [normalization] -> (Gemm|MatMul [BN] Relu)* -> Gemm|MatMul."""
    n = draw(st.integers(1, 12))
    ops: list[tuple[str, tuple]] = []
    for _ in range(draw(st.integers(0, 2))):
        ops.append(draw(_elementwise((1, n))))
    for _ in range(draw(st.integers(0, 3))):
        ops += draw(_dense_layer(relu=True))
    ops += draw(_dense_layer(relu=False))
    return NetSpec((1, n), tuple(ops), draw(st.integers(0, 2**31 - 1)))


@st.composite
def _conv(draw, shape: tuple[int, ...]) -> tuple[str, tuple] | None:
    rank, c = len(shape) - 2, shape[1]
    k = tuple(draw(st.integers(1, 3)) for _ in range(rank))
    s = tuple(draw(st.integers(1, 2)) for _ in range(rank))
    d = tuple(draw(st.integers(1, 2)) for _ in range(rank))
    p = tuple(draw(st.integers(0, 2)) for _ in range(2 * rank))
    group = draw(st.sampled_from(sorted({1, c})))
    m = group * draw(st.integers(1, 4 if group == 1 else 2))
    out = tuple(_out(shape[2 + i], k[i], s[i], p[i], p[rank + i], d[i]) for i in range(rank))
    if min(out) < 1:
        return None
    return "Conv", (("m", m), ("kernel", k), ("strides", s), ("pads", p), ("dilations", d),
                    ("group", group), ("bias", draw(st.booleans())), ("out", (1, m, *out)))


@st.composite
def _pool(draw, shape: tuple[int, ...]) -> tuple[str, tuple] | None:
    rank = len(shape) - 2
    kind = draw(st.sampled_from(["MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool"]))
    if kind.startswith("Global"):
        return kind, (("out", shape[:2] + (1,) * rank),)
    k = tuple(draw(st.integers(1, 3)) for _ in range(rank))
    s = tuple(draw(st.integers(1, 2)) for _ in range(rank))
    p = tuple(draw(st.integers(0, k[i % rank] - 1)) for i in range(2 * rank))
    out = tuple(_out(shape[2 + i], k[i], s[i], p[i], p[rank + i], 1) for i in range(rank))
    if min(out) < 1:
        return None
    params = [("kernel", k), ("strides", s), ("pads", p), ("out", (*shape[:2], *out))]
    if kind == "AveragePool":
        params.append(("count_include_pad", draw(st.integers(0, 1))))
    return kind, tuple(params)


@st.composite
def conv_nets(draw) -> NetSpec:
    """x (1, C, L) or (1, C, H, W) -> [normalization] -> (Conv [BN] Relu [pool])+ -> Flatten -> dense."""
    rank = draw(st.integers(1, 2))
    shape = (1, draw(st.integers(1, 3)), *(draw(st.integers(3, 9)) for _ in range(rank)))
    input_shape = shape
    ops: list[tuple[str, tuple]] = []
    for _ in range(draw(st.integers(0, 2))):
        ops.append(draw(_elementwise(shape)))
    for _ in range(draw(st.integers(1, 3))):
        conv = draw(_conv(shape))
        if conv is None:
            continue
        ops.append(conv)
        shape = dict(conv[1])["out"]
        if draw(st.booleans()):
            ops.append(("BatchNormalization", ()))
        if draw(st.integers(0, 4)) == 0:
            ops.append(draw(_elementwise(shape)))
        ops.append(_activation(draw))
        if draw(st.booleans()):
            pool = draw(_pool(shape))
            if pool is not None:
                ops.append(pool)
                shape = dict(pool[1])["out"]
    ops.append(("Flatten", ()))
    if draw(st.booleans()):
        ops += draw(_dense_layer(relu=True))
    ops += draw(_dense_layer(relu=False))
    return NetSpec(input_shape, tuple(ops), draw(st.integers(0, 2**31 - 1)))


def networks() -> st.SearchStrategy[NetSpec]:
    """Dense or convolutional networks."""
    return st.one_of(dense_nets(), conv_nets())


# ----------------------------------------------------------------------------- building


class _Builder:
    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def const(self, value: np.ndarray) -> str:
        name = f"c{len(self.inits)}"
        self.inits.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
        return name

    def node(self, op: str, inputs: list[str], **attrs) -> str:
        out = f"t{len(self.nodes)}"
        self.nodes.append(helper.make_node(op, inputs, [out], name=f"{op.lower()}{len(self.nodes)}",
                                           **attrs))
        return out


def _he(rng, shape, fan_in: int) -> np.ndarray:
    return rng.standard_normal(shape) * math.sqrt(2.0 / max(fan_in, 1))


def build(spec: NetSpec) -> onnx.ModelProto:
    """The ONNX model of a spec (float32 weights drawn from spec.seed)."""
    b = _Builder(spec.seed)
    rng, x, shape = b.rng, "x", spec.input_shape
    for kind, params in spec.ops:
        p = dict(params)
        if kind in ("Sub", "RSub", "Div", "Mul", "Add"):
            value = rng.uniform(0.5, 2.0, p["const_shape"]) * rng.choice([-1, 1], p["const_shape"])
            if kind in ("Sub", "RSub", "Add"):
                value = rng.standard_normal(p["const_shape"]) * 0.5
            c = b.const(value)
            op = "Sub" if kind == "RSub" else kind
            first = kind in ("RSub",) or (kind in ("Mul", "Add") and rng.random() < 0.5)
            x = b.node(op, [c, x] if first else [x, c])
        elif kind == "Gemm":
            n_in, n_out = shape[1], p["n_out"]
            w = _he(rng, (n_in, n_out), n_in) / p["alpha"]
            inputs = [x, b.const(w.T if p["transB"] else w)]
            if p["bias"]:
                inputs.append(b.const(rng.standard_normal(n_out) * 0.1))
            x = b.node("Gemm", inputs, transB=p["transB"], alpha=p["alpha"])
            shape = (1, n_out)
        elif kind == "MatMul":
            n_in, n_out = shape[1], p["n_out"]
            x = b.node("MatMul", [x, b.const(_he(rng, (n_in, n_out), n_in))])
            shape = (1, n_out)
        elif kind == "Conv":
            c, rank = shape[1], len(shape) - 2
            cg = c // p["group"]
            w = _he(rng, (p["m"], cg, *p["kernel"]), cg * math.prod(p["kernel"]))
            inputs = [x, b.const(w)]
            if p["bias"]:
                inputs.append(b.const(rng.standard_normal(p["m"]) * 0.1))
            x = b.node("Conv", inputs, kernel_shape=list(p["kernel"]), strides=list(p["strides"]),
                       pads=list(p["pads"]), dilations=list(p["dilations"]), group=p["group"])
            shape = p["out"]
            assert len(shape) == rank + 2
        elif kind == "BatchNormalization":
            ch = shape[1]
            params_ = [rng.uniform(0.5, 1.5, ch) * rng.choice([-1, 1], ch),
                       rng.standard_normal(ch) * 0.1, rng.standard_normal(ch) * 0.1,
                       rng.uniform(0.5, 2.0, ch)]
            x = b.node("BatchNormalization", [x, *(b.const(v) for v in params_)], epsilon=1e-5)
        elif kind == "Relu":
            x = b.node("Relu", [x])
        elif kind == "Act":
            op, attrs = ACTIVATIONS[p["kind"]]
            if p["kind"] == "relu6":
                x = b.node("Clip", [x, b.const(np.array(0.0)), b.const(np.array(6.0))])
            elif p["kind"] == "silu":
                x = b.node("Mul", [x, b.node("Sigmoid", [x])])
            else:
                x = b.node(op, [x], **attrs)
        elif kind == "MaxPool":
            x = b.node("MaxPool", [x], kernel_shape=list(p["kernel"]), strides=list(p["strides"]),
                       pads=list(p["pads"]))
            shape = p["out"]
        elif kind == "AveragePool":
            x = b.node("AveragePool", [x], kernel_shape=list(p["kernel"]),
                       strides=list(p["strides"]), pads=list(p["pads"]),
                       count_include_pad=p["count_include_pad"])
            shape = p["out"]
        elif kind in ("GlobalAveragePool", "GlobalMaxPool"):
            x = b.node(kind, [x])
            shape = p["out"]
        elif kind == "Flatten":
            x = b.node("Flatten", [x], axis=1)
            shape = (1, math.prod(shape))
        else:
            raise ValueError(f"unknown op {kind}")
    graph = helper.make_graph(
        b.nodes, "propnet",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(spec.input_shape))],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, list(shape))], b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    return model


def nominal(spec: NetSpec) -> np.ndarray:
    """A nominal input x0 drawn from the spec's seed."""
    rng = np.random.default_rng(spec.seed + 1)
    return rng.standard_normal(spec.input_shape).astype(np.float32)


# ----------------------------------------------------------------------------- DAGs


@dataclass(frozen=True)
class DagSpec:
    """A DAG network: input shape, stages (kind, params) in order, weight seed, activation."""

    input_shape: tuple[int, ...]
    stages: tuple[tuple[str, tuple], ...]
    seed: int
    activation: str = "relu"

    def __repr__(self) -> str:
        stages = ", ".join(f"{k}{dict(p)}" for k, p in self.stages)
        return (f"DagSpec(input={self.input_shape}, seed={self.seed}, "
                f"activation={self.activation!r}, stages=[{stages}])")


@st.composite
def _dag_stage(draw, conv: bool) -> tuple[str, tuple]:
    kinds = ["residual", "fanout", "selfconcat"] + (["pool"] if conv else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "residual":
        return kind, (("join", draw(st.sampled_from(["Add", "Sub"]))), ("bn", draw(st.booleans())),
                      ("mid", draw(st.integers(1, 4))), ("grouped", conv and draw(st.booleans())),
                      ("act_after", draw(st.booleans())))
    if kind == "fanout":
        branches = draw(st.integers(2, 3))
        return kind, (("join", draw(st.sampled_from(["Sum", "Concat"]))),
                      ("acts", tuple(draw(st.booleans()) for _ in range(branches))),
                      ("width", draw(st.integers(1, 3))))
    if kind == "selfconcat":
        return kind, (("width", draw(st.integers(1, 3))), ("act", draw(st.booleans())))
    return kind, (("op", draw(st.sampled_from(["MaxPool", "AveragePool"]))),
                  ("join", draw(st.sampled_from(["Add", "Concat"]))))


@st.composite
def dag_nets(draw, activation: str = "relu") -> DagSpec:
    """x (1, n) or (1, C, H, W) -> an affine stem (act) -> 1-3 DAG stages -> [Flatten] -> Gemm."""
    conv = draw(st.booleans())
    shape = (1, draw(st.integers(1, 3)), *(draw(st.integers(2, 5)),) * 2) if conv else \
        (1, draw(st.integers(1, 8)))
    stages = tuple(draw(_dag_stage(conv)) for _ in range(draw(st.integers(1, 3))))
    return DagSpec(shape, stages, draw(st.integers(0, 2**31 - 1)), activation)


def build_dag(spec: DagSpec) -> DagNet:
    """The DagNet of a spec (weights drawn from spec.seed); every stage keeps the
    spatial size, so only the width (features or channels) changes."""
    net = DagNet("propdag", spec.input_shape, np.random.default_rng(spec.seed),
                 activation=spec.activation)
    conv = len(spec.input_shape) == 4
    width = 3

    def layer(x: str, n_in: int, n_out: int, k: int = 3, group: int = 1) -> str:
        return net.conv(x, n_in, n_out, k=k, group=group) if conv else net.gemm(x, n_in, n_out)

    h = net.act(layer("x", spec.input_shape[1], width))
    for kind, params in spec.stages:
        p = dict(params)
        if kind == "residual":
            mid = p["mid"] * width if p["grouped"] else p["mid"]
            branch = layer(h, width, mid, k=1) if p["grouped"] else layer(h, width, mid)
            if p["bn"]:
                branch = net.bn(branch, mid)
            branch = net.act(branch)
            branch = layer(branch, mid, width, group=width if p["grouped"] else 1)
            h = net.node(p["join"], [h, branch])
            h = net.act(h) if p["act_after"] else h
        elif kind == "fanout":
            outs = width if p["join"] == "Sum" else p["width"]
            parts = [layer(h, width, outs) for _ in p["acts"]]
            parts = [net.act(b) if a else b for b, a in zip(parts, p["acts"])]
            h = net.node(p["join"], parts, **({"axis": 1} if p["join"] == "Concat" else {}))
            width = outs if p["join"] == "Sum" else outs * len(parts)
        elif kind == "selfconcat":
            grown = layer(h, width, p["width"])
            grown = net.act(grown) if p["act"] else grown
            h = net.node("Concat", [h, grown], axis=1)
            width += p["width"]
        else:  # a stride-1 padded pool of h, added or concatenated to h
            pooled = net.pool(h, p["op"], 3, 1, 1)
            if p["join"] == "Add":
                h = net.node("Add", [h, pooled])
            else:
                h, width = net.node("Concat", [h, pooled], axis=1), 2 * width
    if conv:
        h = net.node("Flatten", [h])
        width *= spec.input_shape[2] * spec.input_shape[3]
    net.output = net.gemm(h, width, 2)
    return net


def dag_nominal(spec: DagSpec) -> np.ndarray:
    """A nominal input x0 drawn from the spec's seed."""
    return np.random.default_rng(spec.seed + 1).standard_normal(spec.input_shape)

