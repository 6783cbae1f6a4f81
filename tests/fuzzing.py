"""Fuzzing of the model loader: seed models, mutations, and a supervised worker.

`generate(seed, index)` makes one deterministic case: a valid seed model with
one to three mutations, at the level of bytes (bit flips, truncation, random
splices, ...) or of protobuf fields (wrong attribute types, negative pads,
zero strides, mismatched weight shapes, huge dims, wrong dtypes, missing
inputs, empty graphs, cycles, external-data paths, ...). A `Worker` runs cases
in a child process (memory-limited, ONNXLIP_DEBUG=1 so that no unexpected
exception is disguised) and reports, per case, "ok" (loaded), "error"
(onnxlip.OnnxlipError), or a failure: "crash" (any other exception),
"timeout", "died" (the process was killed or crashed).

Used by tests/test_fuzz.py, tools/fuzz.py and tools/make_corpus.py.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing as mp
import os
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
FAILURES = ("crash", "timeout", "died", "bad-bound")

# ----------------------------------------------------------------------------- seed models


def _vi(name: str, shape, elem: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def _c(name: str, value, dtype=np.float32) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)


def _model(nodes: list, x_shape: list, y_shape: list, inits: list, name: str) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, [_vi("x", x_shape)], [_vi("y", y_shape)], inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def _exporter_like(rng: np.random.Generator) -> onnx.ModelProto:
    """Sub, Div (Constant), Conv, BN, Relu, MaxPool, Shape-Gather-Concat-Reshape, Gemm, MatMul."""
    n = helper.make_node
    nodes = [
        n("Sub", ["x", "mean"], ["a"], name="sub"),
        n("Constant", [], ["std"], value=numpy_helper.from_array(np.array(0.5, np.float32)), name="k"),
        n("Div", ["a", "std"], ["b"], name="div"),
        n("Conv", ["b", "W1", "B1"], ["c"], pads=[1, 1, 1, 1], strides=[1, 1], kernel_shape=[3, 3],
          name="conv1"),
        n("BatchNormalization", ["c", "g", "be", "mu", "var"], ["d"], epsilon=1e-5, name="bn"),
        n("Relu", ["d"], ["e"], name="relu1"),
        n("MaxPool", ["e"], ["f"], kernel_shape=[2, 2], strides=[2, 2], name="pool"),
        n("Shape", ["f"], ["s"], name="shape"),
        n("Gather", ["s", "zero"], ["s0"], axis=0, name="gather"),
        n("Unsqueeze", ["s0", "axes"], ["s1"], name="unsq"),
        n("Concat", ["s1", "minus1"], ["target"], axis=0, name="concat"),
        n("Reshape", ["f", "target"], ["g1"], name="reshape"),
        n("Gemm", ["g1", "W2", "B2"], ["h"], transB=1, name="fc1"),
        n("Relu", ["h"], ["i"], name="relu2"),
        n("Identity", ["i"], ["j"], name="id"),
        n("MatMul", ["j", "W3"], ["y"], name="fc2"),
    ]
    inits = [
        _c("mean", 0.1), _c("W1", rng.standard_normal((2, 1, 3, 3)) * 0.5), _c("B1", [0.1, -0.1]),
        _c("g", [1.0, 0.5]), _c("be", [0.0, 0.1]), _c("mu", [0.0, 0.2]), _c("var", [1.0, 2.0]),
        _c("zero", 0, np.int64), _c("axes", [0], np.int64), _c("minus1", [-1], np.int64),
        _c("W2", rng.standard_normal((5, 18)) * 0.3), _c("B2", rng.standard_normal(5) * 0.1),
        _c("W3", rng.standard_normal((5, 3)) * 0.5),
    ]
    return _model(nodes, [1, 1, 6, 6], [1, 3], inits, "exporter")


def _pooling(rng: np.random.Generator) -> onnx.ModelProto:
    """Pad, AveragePool, Transpose, GlobalAveragePool, Squeeze, Unsqueeze, Flatten, Gemm."""
    n = helper.make_node
    nodes = [
        n("Pad", ["x", "pads", "pv"], ["a"], mode="constant", name="pad"),
        n("AveragePool", ["a"], ["b"], kernel_shape=[3, 3], strides=[1, 2], pads=[1, 1, 1, 1],
          count_include_pad=0, name="avg"),
        n("Transpose", ["b"], ["c"], perm=[0, 1, 3, 2], name="tr1"),
        n("Mul", ["scale", "c"], ["d"], name="mul"),
        n("Transpose", ["d"], ["e"], perm=[0, 1, 3, 2], name="tr2"),
        n("Relu", ["e"], ["f"], name="relu"),
        n("GlobalAveragePool", ["f"], ["g"], name="gap"),
        n("Squeeze", ["g", "sq"], ["h"], name="squeeze"),
        n("Unsqueeze", ["h", "usq"], ["i"], name="unsqueeze"),
        n("Flatten", ["i"], ["j"], axis=1, name="flatten"),
        n("Gemm", ["j", "W", "B"], ["k"], alpha=0.5, beta=2.0, name="fc"),
        n("Add", ["k", "shift"], ["y"], name="add"),
    ]
    inits = [
        _c("pads", [0, 0, 1, 0, 0, 0, 0, 1], np.int64), _c("pv", 0.25),
        _c("scale", rng.uniform(0.5, 1.5, (1, 2, 1, 1))), _c("sq", [2, 3], np.int64),
        _c("usq", [2], np.int64), _c("W", rng.standard_normal((2, 4))), _c("B", [0.1, 0.2, 0.3, 0.4]),
        _c("shift", [1.0, -1.0, 0.0, 2.0]),
    ]
    return _model(nodes, [1, 2, 5, 5], [1, 4], inits, "pooling")


def _conv1d(rng: np.random.Generator) -> onnx.ModelProto:
    """Cast, Conv 1-D (dilations, group 2, auto_pad), Dropout, MaxPool 1-D, Flatten, Gemm."""
    n = helper.make_node
    nodes = [
        n("Cast", ["x"], ["a"], to=TensorProto.FLOAT, name="cast"),
        n("Conv", ["a", "W"], ["b"], dilations=[2], group=2, auto_pad="SAME_UPPER", name="conv"),
        n("Dropout", ["b"], ["c"], name="dropout"),
        n("Relu", ["c"], ["d"], name="relu"),
        n("MaxPool", ["d"], ["e"], kernel_shape=[3], strides=[2], pads=[1, 1], name="pool"),
        n("Flatten", ["e"], ["f"], name="flatten"),
        n("Gemm", ["f", "W2"], ["y"], name="fc"),
    ]
    inits = [_c("W", rng.standard_normal((4, 1, 3))), _c("W2", rng.standard_normal((16, 2)))]
    return _model(nodes, [1, 2, 8], [1, 2], inits, "conv1d")


def seed_models() -> dict[str, bytes]:
    """Valid models to mutate: three built here, and the small shipped ones."""
    rng = np.random.default_rng(0)
    seeds = {f.__name__.strip("_"): f(rng).SerializeToString()
             for f in (_exporter_like, _pooling, _conv1d)}
    for name in ("tiny_dense", "digits_mlp", "digits_cnn"):
        path = ROOT / "models" / f"{name}.onnx"
        if path.is_file():
            seeds[name] = path.read_bytes()
    return seeds


# ----------------------------------------------------------------------------- mutations

INTERESTING = [0, 1, -1, 2, 3, -2**31, 2**31 - 1, 2**63 - 1, 10**9, 100000, 7, 255]
OPS = ["Relu", "Conv", "Gemm", "MatMul", "Add", "Mul", "Sub", "Div", "MaxPool", "AveragePool",
       "Sigmoid", "Softmax", "Concat", "Split", "Reshape", "Flatten", "Transpose", "Pad", "Identity",
       "Loop", "If", "Tile", "Expand", "ConstantOfShape", "BatchNormalization", "Squeeze",
       "Unsqueeze", "NoSuchOp", "", "Cast", "Shape", "Gather", "Range", "Resize", "Einsum"]


def _pick(rng: np.random.Generator, seq):
    return seq[int(rng.integers(len(seq)))]


def _int(rng: np.random.Generator) -> int:
    return int(_pick(rng, INTERESTING)) if rng.random() < 0.7 else int(rng.integers(-5, 20))


# -- byte level


def flip_bits(data: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
    out = bytearray(data)
    count = int(rng.integers(1, 9))
    for _ in range(count):
        i = int(rng.integers(len(out)))
        out[i] ^= 1 << int(rng.integers(8))
    return bytes(out), f"flip {count} bits"


def set_bytes(data: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
    out = bytearray(data)
    i = int(rng.integers(len(out)))
    value = _pick(rng, [0x00, 0xFF, 0x7F, 0x80, 0x01, int(rng.integers(256))])
    n = int(rng.integers(1, 5))
    out[i:i + n] = bytes([value]) * len(out[i:i + n])
    return bytes(out), f"set {n} bytes at {i} to {value:#x}"


def truncate(data: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
    n = int(rng.integers(len(data)))
    return data[:n], f"truncate to {n} bytes"


def splice(data: bytes, rng: np.random.Generator, other: bytes) -> tuple[bytes, str]:
    a, b = sorted(int(v) for v in rng.integers(0, len(data), 2))
    c = int(rng.integers(len(other)))
    chunk = other[c:c + int(rng.integers(1, 200))]
    return data[:a] + chunk + data[b:], f"splice {len(chunk)} bytes over [{a}:{b}]"


def duplicate_chunk(data: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
    a = int(rng.integers(len(data)))
    n = int(rng.integers(1, 64))
    return data[:a] + data[a:a + n] * int(rng.integers(2, 5)) + data[a + n:], f"repeat chunk at {a}"


# -- field level (model in place; return a description)


def _array(t: onnx.TensorProto) -> np.ndarray:
    """The tensor's values; never reads external data (the generator runs in the parent)."""
    if t.data_location == TensorProto.EXTERNAL or t.external_data:
        raise ValueError("external tensor")
    return numpy_helper.to_array(t)


def _nodes(m: onnx.ModelProto) -> list:
    return m.graph.node


def _random_node(m: onnx.ModelProto, rng: np.random.Generator) -> onnx.NodeProto | None:
    return _pick(rng, list(_nodes(m))) if len(_nodes(m)) else None


def attr_wrong_type(m: onnx.ModelProto, rng: np.random.Generator) -> str:
    node = _random_node(m, rng)
    if node is None or not node.attribute:
        return "no attribute"
    a = _pick(rng, list(node.attribute))
    kind = _pick(rng, [1, 2, 3, 4, 5, 6, 7, 8, 0, 11, 13, 99])
    a.type = kind
    if rng.random() < 0.5:
        a.ClearField("ints")
        a.floats.extend([1.5, -2.0])
        a.s = b"junk"
    return f"{node.name}.{a.name}: type -> {kind}"


def attr_value(m: onnx.ModelProto, rng: np.random.Generator) -> str:
    """A new value of the attribute's own type: the model often stays valid."""
    node = _random_node(m, rng)
    if node is None or not node.attribute:
        return "no attribute"
    a = _pick(rng, list(node.attribute))
    kind = onnx.AttributeProto
    if a.type == kind.INT:
        a.i = _int(rng)
    elif a.type == kind.INTS:
        del a.ints[:]
        a.ints.extend(_int(rng) for _ in range(int(rng.integers(0, 6))))
    elif a.type == kind.FLOAT:
        a.f = float(_pick(rng, [np.nan, np.inf, -1.0, 0.0, 1e30, -1e-9, 3.0]))
    elif a.type == kind.STRING:
        a.s = _pick(rng, [b"", b"reflect", b"edge", b"SAME_LOWER", b"VALID", b"\xff\xfe"])
    elif a.type == kind.TENSOR:
        value = np.full(int(rng.integers(0, 4)), _pick(rng, [np.nan, 1e30, 0.0, -1.0]), np.float32)
        a.t.CopyFrom(numpy_helper.from_array(value, a.t.name))
    else:
        return f"{node.name}.{a.name}: type {a.type} left alone"
    return f"{node.name}.{a.name} -> {helper.get_attribute_value(a)!r}"[:200]


def spatial_attr(m: onnx.ModelProto, rng: np.random.Generator) -> str:
    nodes = [n for n in _nodes(m) if n.op_type in ("Conv", "MaxPool", "AveragePool")]
    if not nodes:
        return "no spatial node"
    node = _pick(rng, nodes)
    name = _pick(rng, ["pads", "strides", "dilations", "kernel_shape", "group", "auto_pad",
                       "ceil_mode", "count_include_pad"])
    for a in list(node.attribute):
        if a.name == name:
            node.attribute.remove(a)
    if name in ("group", "ceil_mode", "count_include_pad"):
        node.attribute.append(helper.make_attribute(name, _int(rng)))
    elif name == "auto_pad":
        node.attribute.append(helper.make_attribute(name, _pick(
            rng, ["SAME_UPPER", "SAME_LOWER", "VALID", "NOTSET", "BOGUS", ""])))
    else:
        count = int(rng.integers(0, 6))
        node.attribute.append(helper.make_attribute(name, [_int(rng) for _ in range(count)]))
    return f"{node.name}.{name} changed"


def weight_shape(m: onnx.ModelProto, rng: np.random.Generator) -> str:
    inits = [t for t in m.graph.initializer if t.dims]
    if not inits:
        return "no initializer"
    t = _pick(rng, inits)
    arr = _array(t)
    axis = int(rng.integers(arr.ndim))
    new = list(arr.shape)
    new[axis] = max(1, new[axis] + int(rng.integers(-2, 3)))
    value = np.resize(arr, new) if rng.random() < 0.8 else arr.reshape(-1)
    t.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(value), t.name))
    return f"initializer {t.name} reshaped to {value.shape}"


def huge_dims(m: onnx.ModelProto, rng: np.random.Generator) -> str:
    values = list(m.graph.input) + list(m.graph.output) + list(m.graph.value_info)
    v = _pick(rng, values)
    dims = v.type.tensor_type.shape.dim
    if not dims:
        return "no dims"
    d = _pick(rng, list(dims))
    choice = rng.random()
    if choice < 0.6:
        d.dim_value = _pick(rng, [10**5, 10**9, 2**40, 0, 2**31, 65536])
    elif choice < 0.8:
        d.dim_param = "N"
    else:
        d.Clear()
    return f"{v.name} dim -> {d}"


def wrong_dtype(m: onnx.ModelProto, rng: np.random.Generator) -> str:
    if rng.random() < 0.5 and m.graph.initializer:
        t = _pick(rng, list(m.graph.initializer))
        t.data_type = _pick(rng, [0, 2, 3, 6, 7, 8, 9, 10, 11, 14, 16, 17, 19, 99])
        return f"initializer {t.name} data_type -> {t.data_type}"
    v = _pick(rng, list(m.graph.input) + list(m.graph.output))
    v.type.tensor_type.elem_type = _pick(rng, [0, 2, 6, 7, 8, 9, 10, 11, 14, 16])
    return f"{v.name} elem_type -> {v.type.tensor_type.elem_type}"


def missing_input(m: onnx.ModelProto, rng: np.random.Generator) -> str:
    node = _random_node(m, rng)
    if node is None or not node.input:
        return "no input"
    i = int(rng.integers(len(node.input)))
    choice = rng.random()
    if choice < 0.4:
        del node.input[i]
    elif choice < 0.7:
        node.input[i] = ""
    else:
        node.input[i] = "ghost"
    return f"{node.name} input {i} removed"


def drop_initializer(m: onnx.ModelProto, rng: np.random.Generator) -> str:
    if not m.graph.initializer:
        return "no initializer"
    i = int(rng.integers(len(m.graph.initializer)))
    name = m.graph.initializer[i].name
    del m.graph.initializer[i]
    return f"initializer {name} removed"


def empty_graph(m: onnx.ModelProto, rng: np.random.Generator) -> str:
    what = _pick(rng, ["node", "output", "input", "initializer", "opset_import"])
    field = m if what == "opset_import" else m.graph
    del getattr(field, what)[:]
    return f"all {what}s removed"


def make_cycle(m: onnx.ModelProto, rng: np.random.Generator) -> str:
    nodes = list(_nodes(m))
    if len(nodes) < 2:
        return "too few nodes"
    i, j = sorted(int(v) for v in rng.choice(len(nodes), 2, replace=False))
    if nodes[i].input and nodes[j].output:
        nodes[i].input[0] = nodes[j].output[0]
    return f"{nodes[i].name} reads {nodes[j].name}'s output"


def change_op(m: onnx.ModelProto, rng: np.random.Generator) -> str:
    node = _random_node(m, rng)
    if node is None:
        return "no node"
    old, node.op_type = node.op_type, _pick(rng, OPS)
    return f"{node.name}: {old} -> {node.op_type}"


def change_opset(m: onnx.ModelProto, rng: np.random.Generator) -> str:
    if rng.random() < 0.5 and m.opset_import:
        m.opset_import[0].version = _pick(rng, [1, 6, 7, 11, 13, 18, 21, 99, 0, -1])
        return f"opset -> {m.opset_import[0].version}"
    m.ir_version = _pick(rng, [0, 1, 3, 4, 7, 10, 11, 99])
    return f"ir_version -> {m.ir_version}"


def swap_nodes(m: onnx.ModelProto, rng: np.random.Generator) -> str:
    nodes = _nodes(m)
    if len(nodes) < 2:
        return "too few nodes"
    i, j = (int(v) for v in rng.choice(len(nodes), 2, replace=False))
    a, b = onnx.NodeProto(), onnx.NodeProto()
    a.CopyFrom(nodes[i])
    b.CopyFrom(nodes[j])
    nodes[i].CopyFrom(b)
    nodes[j].CopyFrom(a)
    return f"swap nodes {i} and {j}"


def bad_values(m: onnx.ModelProto, rng: np.random.Generator) -> str:
    inits = [t for t in m.graph.initializer if t.data_type in (TensorProto.FLOAT, TensorProto.DOUBLE)]
    if not inits:
        return "no float initializer"
    t = _pick(rng, inits)
    arr = _array(t).copy()
    if arr.size == 0:
        return "empty initializer"
    value = _pick(rng, [np.nan, np.inf, -np.inf, 1e38, -3e38, 1e-45, 0.0, 1e20])
    arr.flat[int(rng.integers(arr.size))] = value
    if rng.random() < 0.3:
        arr[...] = value
    t.CopyFrom(numpy_helper.from_array(arr, t.name))
    return f"initializer {t.name} gets {value}"


def truncate_raw(m: onnx.ModelProto, rng: np.random.Generator) -> str:
    inits = [t for t in m.graph.initializer if t.raw_data]
    if not inits:
        return "no raw data"
    t = _pick(rng, inits)
    t.raw_data = t.raw_data[: int(rng.integers(len(t.raw_data)))]
    return f"initializer {t.name} raw data truncated"


def external_data(m: onnx.ModelProto, rng: np.random.Generator) -> str:
    if not m.graph.initializer:
        return "no initializer"
    t = _pick(rng, list(m.graph.initializer))
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    del t.external_data[:]
    location = _pick(rng, ["weights.bin", "../weights.bin", "/etc/passwd", "/dev/zero", "",
                           "sub/../weights.bin", "missing.bin", "a\x00b", ".", "..",
                           "weights.bin/", "~/x", "/proc/self/mem"])
    entries = [("location", location)]
    if rng.random() < 0.7:
        entries.append(("offset", str(_pick(rng, [0, 4, -1, 10**12, "x"]))))
    if rng.random() < 0.7:
        entries.append(("length", str(_pick(rng, [0, 16, 64, -5, 10**12, "y"]))))
    if rng.random() < 0.2:
        entries.append(("bogus", "1"))
    for key, value in entries:
        e = t.external_data.add()
        e.key, e.value = key, value
    return f"initializer {t.name} -> external {entries}"


def reshape_target(m: onnx.ModelProto, rng: np.random.Generator) -> str:
    ints = [t for t in m.graph.initializer if t.data_type == TensorProto.INT64]
    if not ints:
        return "no int64 initializer"
    t = _pick(rng, ints)
    shape = _array(t).shape
    arr = _array(t).copy().ravel()
    if arr.size == 0:
        return "empty"
    arr[int(rng.integers(arr.size))] = _int(rng)
    t.CopyFrom(numpy_helper.from_array(arr.reshape(shape), t.name))
    return f"int64 initializer {t.name} -> {arr.tolist()}"


def node_domain(m: onnx.ModelProto, rng: np.random.Generator) -> str:
    node = _random_node(m, rng)
    if node is None:
        return "no node"
    node.domain = _pick(rng, ["com.microsoft", "ai.onnx.ml", "custom", "ai.onnx"])
    return f"{node.name}.domain -> {node.domain}"


def duplicate_node(m: onnx.ModelProto, rng: np.random.Generator) -> str:
    node = _random_node(m, rng)
    if node is None:
        return "no node"
    copy = m.graph.node.add()
    copy.CopyFrom(node)
    if rng.random() < 0.5:
        copy.output[0] = copy.output[0] + "_2"
        m.graph.output.add().CopyFrom(_vi(copy.output[0], None))
    return f"{node.name} duplicated"


def drop_attribute(m: onnx.ModelProto, rng: np.random.Generator) -> str:
    node = _random_node(m, rng)
    if node is None or not node.attribute:
        return "no attribute"
    i = int(rng.integers(len(node.attribute)))
    name = node.attribute[i].name
    del node.attribute[i]
    if rng.random() < 0.3:
        node.attribute.append(helper.make_attribute("unknown_attr", 3))
    return f"{node.name}.{name} removed"


def shadow_input(m: onnx.ModelProto, rng: np.random.Generator) -> str:
    if not m.graph.initializer:
        return "no initializer"
    t = _pick(rng, list(m.graph.initializer))
    if rng.random() < 0.5:
        m.graph.input.append(_vi(t.name, list(t.dims), t.data_type or 1))
        return f"initializer {t.name} also a graph input"
    extra = m.graph.input.add()
    extra.CopyFrom(m.graph.input[0])
    extra.name = "x2"
    return "second graph input x2"


def rename_tensor(m: onnx.ModelProto, rng: np.random.Generator) -> str:
    node = _random_node(m, rng)
    if node is None or not node.output:
        return "no node"
    node.output[0] = _pick(rng, ["x", "y", node.input[0] if node.input else "z", "W", ""])
    return f"{node.name} output renamed to {node.output[0]!r}"


SWAPS = [{"Relu", "Identity", "Dropout", "Flatten"}, {"Add", "Sub", "Mul", "Div"},
         {"MaxPool", "AveragePool", "GlobalAveragePool"}, {"Gemm", "MatMul"},
         {"Squeeze", "Unsqueeze"}]


def swap_supported_op(m: onnx.ModelProto, rng: np.random.Generator) -> str:
    """Replace an op by another supported op of the same family (inputs kept)."""
    nodes = [n for n in _nodes(m) if any(n.op_type in g for g in SWAPS)]
    if not nodes:
        return "no swappable node"
    node = _pick(rng, nodes)
    group = next(g for g in SWAPS if node.op_type in g)
    old, node.op_type = node.op_type, _pick(rng, sorted(group - {node.op_type}))
    return f"{node.name}: {old} -> {node.op_type}"


def insert_node(m: onnx.ModelProto, rng: np.random.Generator) -> str:
    """Insert a supported op with random attributes after a random node."""
    nodes = [n for n in _nodes(m) if n.output and n.op_type != "Constant"]
    if not nodes:
        return "no node"
    at = _pick(rng, nodes)
    tensor, new = at.output[0], at.output[0] + "_ins"
    shape = _SHAPES.get(tensor) if rng.random() < 0.85 else None
    shape = shape or tuple(int(rng.integers(1, 6)) for _ in range(int(rng.integers(1, 5))))
    rank = len(shape)
    channels = shape[1] if rank > 1 else 1
    kind = _pick(rng, ["Transpose", "Pad", "Reshape", "Squeeze", "Unsqueeze", "Mul", "Add",
                       "BatchNormalization", "MaxPool", "AveragePool", "Flatten", "Relu", "Div",
                       "GlobalAveragePool", "Conv", "Gemm"])
    inputs, attrs, name = [tensor], {}, f"ins_{kind.lower()}"
    values = [-3, -1, 0, 1, 2, 3, 5, 100000]

    def const(value, dtype=np.float32) -> str:
        cname = f"{name}_c{len(m.graph.initializer)}"
        m.graph.initializer.append(numpy_helper.from_array(np.asarray(value, dtype), cname))
        return cname

    def ints(n: int, lo: int = -2, hi: int = 4) -> list[int]:
        return [int(rng.integers(lo, hi)) if rng.random() < 0.8 else int(_pick(rng, values))
                for _ in range(n)]

    if kind == "Transpose":
        perm = list(rng.permutation(rank)) if rng.random() < 0.8 else ints(rank)
        attrs["perm"] = [int(v) for v in perm]
    elif kind == "Pad":
        inputs += [const(ints(2 * rank, -1, 3), np.int64),
                   const(float(_pick(rng, [0.0, 1.5, np.nan, 1e30]))) if rng.random() < 0.5 else ""]
    elif kind == "Reshape":
        inputs.append(const(ints(int(rng.integers(1, 5)), -1, 20), np.int64))
    elif kind in ("Squeeze", "Unsqueeze"):
        inputs.append(const(ints(int(rng.integers(1, 3)), -3, 4), np.int64))
    elif kind in ("Mul", "Add", "Div"):
        shape = [int(rng.integers(1, 4)) for _ in range(int(rng.integers(0, 3)))]
        value = rng.standard_normal(shape) * float(_pick(rng, [1.0, 1e-30, 1e20]))
        if rng.random() < 0.1:
            value = np.zeros(shape)
        inputs.append(const(value))
    elif kind == "BatchNormalization":
        c = channels if rng.random() < 0.8 else int(rng.integers(1, 9))
        inputs += [const(rng.standard_normal(c)) for _ in range(3)] + [const(rng.uniform(-0.1, 2, c))]
        attrs["epsilon"] = float(_pick(rng, [1e-5, 0.0, -1.0, 1e-30]))
    elif kind in ("MaxPool", "AveragePool"):
        k = rank - 2 if rng.random() < 0.8 else int(rng.integers(1, 4))
        attrs.update(kernel_shape=ints(k, 1, 4), strides=ints(k, 1, 3), pads=ints(2 * k, 0, 3))
        if rng.random() < 0.3:
            attrs["ceil_mode"] = int(rng.integers(0, 2))
        if rng.random() < 0.3 and kind == "MaxPool":
            attrs["dilations"] = ints(k, 1, 3)
    elif kind == "Flatten":
        attrs["axis"] = int(rng.integers(-3, 4))
    elif kind == "Conv":
        k = rank - 2 if rng.random() < 0.8 else int(rng.integers(1, 3))
        c_in = channels if rng.random() < 0.8 else int(rng.integers(1, 9))
        c_out = int(rng.integers(1, 5))
        inputs.append(const(rng.standard_normal((c_out, c_in, *ints(k, 1, 4)))))
        attrs.update(strides=ints(k, 1, 3), pads=ints(2 * k, 0, 3), dilations=ints(k, 1, 3))
    elif kind == "Gemm":
        n_in = shape[-1] if rng.random() < 0.8 else int(rng.integers(1, 20))
        attrs["transB"] = int(rng.integers(0, 2))
        weight = rng.standard_normal((n_in, int(rng.integers(1, 9))))
        inputs.append(const(weight.T if attrs["transB"] else weight))
    for node in _nodes(m):
        for i, n in enumerate(node.input):
            if n == tensor:
                node.input[i] = new
    for out in m.graph.output:
        if out.name == tensor:
            out.name = new
    index = list(_nodes(m)).index(at) + 1
    m.graph.node.insert(index, helper.make_node(kind, inputs, [new], name=name, **attrs))
    return f"insert {kind} {attrs} after {at.name}"[:200]


#: Shapes of the tensors of the seed model being mutated (for insert_node).
_SHAPES: dict[str, tuple[int, ...]] = {}


def _static_shapes(m: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    inferred = onnx.shape_inference.infer_shapes(m)
    shapes = {}
    for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        dims = v.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            shapes[v.name] = tuple(d.dim_value for d in dims)
    return shapes


def relax_shapes(m: onnx.ModelProto) -> None:
    """Forget intermediate and output shapes, so that attribute changes pass shape inference."""
    del m.graph.value_info[:]
    for out in m.graph.output:
        for d in out.type.tensor_type.shape.dim:
            d.dim_param = "?"


DEEP_MUTATIONS: list[Callable] = [
    attr_value, spatial_attr, bad_values, reshape_target, swap_supported_op, insert_node,
    insert_node, insert_node, weight_shape, huge_dims,
]
BYTE_MUTATIONS: list[Callable] = [flip_bits, set_bytes, truncate, duplicate_chunk]
FIELD_MUTATIONS: list[Callable] = [
    attr_wrong_type, attr_value, attr_value, spatial_attr, spatial_attr, weight_shape, huge_dims,
    wrong_dtype, missing_input,
    drop_initializer, empty_graph, make_cycle, change_op, change_opset, swap_nodes, bad_values,
    truncate_raw, external_data, reshape_target, node_domain, duplicate_node, drop_attribute,
    shadow_input, rename_tensor,
]


def generate(seed: int, index: int, seeds: dict[str, bytes]) -> tuple[bytes, str]:
    """Case `index` of campaign `seed`: (model bytes, description)."""
    rng = np.random.default_rng([seed, index])
    names = sorted(seeds)
    base = _pick(rng, names)
    data = seeds[base]
    if rng.random() < 0.5:
        return _deep(data, rng, base)
    steps = []
    for _ in range(int(rng.choice([1, 1, 2, 3]))):
        if rng.random() < 0.2:
            if rng.random() < 0.2:
                data, text = splice(data, rng, seeds[_pick(rng, names)])
            else:
                data, text = _pick(rng, BYTE_MUTATIONS)(data, rng)
            steps.append(text)
            continue
        m = onnx.ModelProto()
        try:
            m.ParseFromString(data)
        except Exception:
            steps.append("(unparsable: field mutation skipped)")
            continue
        func = _pick(rng, FIELD_MUTATIONS)
        try:
            steps.append(f"{func.__name__}: {func(m, rng)}")
        except Exception as exc:  # a mutation that does not apply to this model
            steps.append(f"{func.__name__}: not applied ({type(exc).__name__})")
        data = m.SerializeToString()
    return data, f"{base}: " + "; ".join(steps)


def _deep(data: bytes, rng: np.random.Generator, base: str) -> tuple[bytes, str]:
    """Mutations that keep the model well-formed, so that most cases reach the lowerings."""
    m = onnx.ModelProto()
    m.ParseFromString(data)
    _SHAPES.clear()
    _SHAPES.update(_static_shapes(m))  # a valid seed model: safe to infer here
    relax_shapes(m)
    steps = []
    for _ in range(int(rng.choice([1, 1, 2, 3]))):
        func = _pick(rng, DEEP_MUTATIONS)
        try:
            steps.append(f"{func.__name__}: {func(m, rng)}")
        except Exception as exc:
            steps.append(f"{func.__name__}: not applied ({type(exc).__name__})")
    return m.SerializeToString(), f"{base} (deep): " + "; ".join(steps)


# ----------------------------------------------------------------------------- running cases


@dataclass
class Outcome:
    """What loading one case did."""

    status: str  # ok | error | crash | timeout | died | bad-bound
    detail: str
    seconds: float

    @property
    def failed(self) -> bool:
        return self.status in FAILURES


def check_bytes(data: bytes, folder: Path, bound: bool = False) -> Outcome:
    """Load `data` as a model in `folder` (in this process); classify the result."""
    import onnxlip

    path = folder / "case.onnx"
    path.write_bytes(data)
    start = time.perf_counter()
    try:
        net = onnxlip.load(path)
        status, detail = "ok", f"{len(net.blocks)} blocks"
        if bound:
            status, detail = _check_bounds(net)
    except onnxlip.OnnxlipError as exc:
        status, detail = "error", str(exc)
        if "\n" in detail:
            status, detail = "crash", f"multi-line message: {detail!r}"
    except Exception:
        status, detail = "crash", traceback.format_exc()
    return Outcome(status, detail, time.perf_counter() - start)


def _check_bounds(net) -> tuple[str, str]:
    """Forward pass and bounds of a model that loaded: finite numbers or an OnnxlipError."""
    import onnxlip

    x0 = np.random.default_rng(0).standard_normal(net.input_shape)
    try:
        y = net.forward(x0)
        result = net.local_bound(x0, 0.1)
        glob = net.global_bound().bound
    except onnxlip.OnnxlipError as exc:
        return "error", f"(at bound time) {exc}"
    local = result.bound
    if not (np.all(np.isfinite(y)) and math.isfinite(local) and math.isfinite(glob)):
        return "bad-bound", f"output finite {np.all(np.isfinite(y))}, local {local}, global {glob}"
    if result.ritz > glob * (1 + 1e-6):  # both are lifted by their residuals: see BoundResult.ritz
        return "bad-bound", f"local {local} above global {glob}"
    return "ok", f"{len(net.blocks)} blocks, local {local:.4g}, global {glob:.4g}"


def _worker_main(conn, bound: bool, memory_bytes: int) -> None:
    """Child process: load each model sent through `conn` and send back the Outcome."""
    if memory_bytes:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    os.environ["ONNXLIP_DEBUG"] = "1"
    from onnxlip.operators import ort as ort_settings

    ort_settings.THREADS = 1
    folder = Path(tempfile.mkdtemp(prefix="onnxlip-fuzz-"))
    (folder / "weights.bin").write_bytes(np.arange(64, dtype=np.float32).tobytes())
    conn.send("ready")
    while True:
        data = conn.recv()
        if data is None:
            break
        conn.send(check_bytes(data, folder, bound))


class Worker:
    """A child process that loads models, restarted after a timeout or a death."""

    def __init__(self, bound: bool = False, memory_bytes: int = 6 << 30):
        self.bound, self.memory_bytes = bound, memory_bytes
        self._ctx = mp.get_context("spawn")
        self._proc = None
        self._conn = None
        self._exitcode: int | None = None

    def _start(self) -> None:
        self._conn, child = self._ctx.Pipe()
        self._proc = self._ctx.Process(target=_worker_main, args=(child, self.bound, self.memory_bytes),
                                       daemon=True)
        self._proc.start()
        child.close()
        if not self._conn.poll(300) or self._conn.recv() != "ready":
            raise RuntimeError("the fuzz worker did not start")

    def run(self, data: bytes, timeout: float) -> Outcome:
        if self._proc is None or not self._proc.is_alive():
            self._start()
        start = time.perf_counter()
        self._conn.send(data)
        if self._conn.poll(timeout):
            try:
                return self._conn.recv()
            except EOFError:
                pass
        elapsed = time.perf_counter() - start
        alive = self._proc.is_alive()
        self.close(kill=True)
        if alive:
            return Outcome("timeout", f"no answer within {timeout:g} s", elapsed)
        return Outcome("died", f"worker exit code {self._exitcode}", elapsed)

    def close(self, kill: bool = False) -> None:
        if self._proc is None:
            return
        if kill:
            self._proc.kill()
        else:
            with contextlib.suppress(OSError):
                self._conn.send(None)
        self._proc.join(5)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join()
        self._exitcode = self._proc.exitcode
        self._conn.close()
        self._proc = None

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
