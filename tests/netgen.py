"""Random small ONNX ReLU networks with an exact float64 numpy twin.

A `RefNet` is a list of `Op`s holding float32 weights. It writes itself as a
float32 ONNX model (opset 17) and evaluates the same function in float64
numpy, batched over a leading axis, together with its exact Jacobian (the
network is piecewise linear: the Jacobian at x0 is the composition of the
linear parts with x0's ReLU pattern and max-pool selections).

`dense_net(seed)`, `conv_net(seed)` and `shallow_net(seed)` draw random
networks; `from_onnx(path)` reads a chain model built from the same ops (the
shipped models and the paper's reference models) into a RefNet.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from onnx.reference.ops import op_average_pool, op_max_pool

OPSET = 17
AFFINE_KINDS = {"gemm", "matmul", "add", "sub", "rsub", "mul", "div", "conv", "bn", "avgpool",
                "flatten", "reshape", "transpose", "pad"}


@dataclass
class Op:
    """One ONNX node: its kind and its parameters (numpy float32 weights, ints)."""

    kind: str
    p: dict = field(default_factory=dict)


@dataclass
class RefNet:
    """A chain of ops on an input of shape `input_shape` (batch 1)."""

    input_shape: tuple[int, ...]
    ops: list[Op]
    name: str = "net"

    # ------------------------------------------------------------------ evaluation

    @property
    def input_size(self) -> int:
        return math.prod(self.input_shape)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """f on a batch: x of shape (B, input_size) or (B, *input_shape[1:]) -> (B, out_size)."""
        x = np.asarray(x, dtype=np.float64).reshape(-1, *self.input_shape[1:])
        for op in self.ops:
            x = _apply(op, x, linear=False)
        return x.reshape(x.shape[0], -1)

    def activations(self, x0: np.ndarray) -> list[np.ndarray]:
        """The input of every op at x0 (batch 1), and the output last."""
        x = np.asarray(x0, dtype=np.float64).reshape(1, *self.input_shape[1:])
        values = [x]
        for op in self.ops:
            x = _apply(op, x, linear=False)
            values.append(x)
        return values

    def jvp(self, x0: np.ndarray, v: np.ndarray) -> np.ndarray:
        """J(x0) applied to the rows of v (k, input_size) -> (k, out_size)."""
        values = self.activations(x0)
        t = np.asarray(v, dtype=np.float64).reshape(-1, *self.input_shape[1:])
        for op, x in zip(self.ops, values):
            t = _tangent(op, x, t)
        return t.reshape(t.shape[0], -1)

    def vjp(self, x0: np.ndarray, u: np.ndarray) -> np.ndarray:
        """J(x0)ᵀ applied to the rows of u (k, out_size) -> (k, input_size)."""
        values = self.activations(x0)
        g = np.asarray(u, dtype=np.float64).reshape(-1, *values[-1].shape[1:])
        for op, x in zip(reversed(self.ops), reversed(values[:-1])):
            g = _cotangent(op, x, g)
        return g.reshape(g.shape[0], -1)

    def jacobian(self, x0: np.ndarray) -> np.ndarray:
        """The exact Jacobian (out_size, input_size) at x0 (assumed off every kink)."""
        out_size = self.activations(x0)[-1].size
        if out_size < self.input_size:
            return self.vjp(x0, np.eye(out_size))
        return self.jvp(x0, np.eye(self.input_size)).T

    def kink_margin(self, x0: np.ndarray) -> float:
        """Distance of x0's activations to a kink that changes the Jacobian.

        The smallest |pre-activation| of a ReLU input that depends on x, and the
        smallest max-pool gap between a window's maximum and an entry whose
        derivative differs from the maximum's (ties of constants are harmless).
        """
        margin = np.inf
        t = np.eye(self.input_size).reshape(-1, *self.input_shape[1:])
        for op, x in zip(self.ops, self.activations(x0)):
            if op.kind == "relu":
                moving = np.any(t != 0, axis=0, keepdims=True)
                margin = min(margin, float(np.abs(x[moving]).min(initial=np.inf)))
            elif op.kind == "maxpool":
                k, s, pads = op.p["kernel"], op.p["strides"], op.p["pads"]
                cols = patches(x, k, s, pads, None, -np.inf)
                tcols = patches(t, k, s, pads, None, 0.0)
                top = cols.argmax(axis=2)[:, :, None]
                top_t = np.take_along_axis(tcols, np.broadcast_to(top, (len(t), *top.shape[1:])), axis=2)
                differs = np.any(tcols != top_t, axis=0, keepdims=True)
                gap = np.take_along_axis(cols, top, axis=2) - cols
                margin = min(margin, float(gap[differs & np.isfinite(gap)].min(initial=np.inf)))
            t = _tangent(op, x, t)
        return margin

    # ------------------------------------------------------------------ ONNX

    def to_onnx(self) -> onnx.ModelProto:
        """The network as a float32 ONNX model with input 'x' and output 'y'."""
        nodes, inits = [], []
        current = "x"
        for i, op in enumerate(self.ops):
            out = "y" if i == len(self.ops) - 1 else f"t{i}"
            nodes_i, inits_i = _onnx_node(op, current, out, f"n{i}")
            nodes += nodes_i
            inits += inits_i
            current = out
        out_shape = self.activations(np.zeros(self.input_shape))[-1].shape
        graph = helper.make_graph(
            nodes, self.name,
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(self.input_shape))],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(out_shape))],
            inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
        model.ir_version = 8
        onnx.checker.check_model(model, full_check=True)
        return model

    def save(self, path: str | Path) -> Path:
        onnx.save(self.to_onnx(), str(path))
        return Path(path)


# ---------------------------------------------------------------------- numpy kernels


def _f64(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def patches(x, kernel, strides, pads, dilations, value) -> np.ndarray:
    """(B, C, K, *out) windows of x (B, C, *spatial), K = prod(kernel), padded with value."""
    rank = len(kernel)
    dilations = dilations or (1,) * rank
    width = [(0, 0), (0, 0)] + [(pads[i], pads[rank + i]) for i in range(rank)]
    xp = np.pad(x, width, constant_values=value)
    out = [(xp.shape[2 + i] - dilations[i] * (kernel[i] - 1) - 1) // strides[i] + 1 for i in range(rank)]
    cols = []
    for offs in itertools.product(*[range(k) for k in kernel]):
        index = tuple(slice(o * d, o * d + (n - 1) * s + 1, s)
                      for o, d, n, s in zip(offs, dilations, out, strides))
        cols.append(xp[(slice(None), slice(None), *index)])
    return np.stack(cols, axis=2)


def conv_nd(x, w, strides, pads, dilations, group) -> np.ndarray:
    """Bias-free N-d convolution (ONNX Conv semantics) in float64, batched.

    One matrix product per kernel offset over a strided view of the padded input.
    """
    w = _f64(w)
    m, cg = w.shape[:2]
    kernel, rank = w.shape[2:], w.ndim - 2
    width = [(0, 0), (0, 0)] + [(pads[i], pads[rank + i]) for i in range(rank)]
    xp = np.pad(x, width)
    out = [(xp.shape[2 + i] - dilations[i] * (kernel[i] - 1) - 1) // strides[i] + 1 for i in range(rank)]
    b = x.shape[0]
    y = np.zeros((b, group, m // group, math.prod(out)))
    wg = w.reshape(group, m // group, cg, *kernel)
    for offs in itertools.product(*[range(k) for k in kernel]):
        index = tuple(slice(o * d, o * d + (n - 1) * s + 1, s)
                      for o, d, n, s in zip(offs, dilations, out, strides))
        xs = xp[(slice(None), slice(None), *index)].reshape(b, group, cg, -1)
        y += wg[(..., *offs)] @ xs  # (g, m, c) @ (b, g, c, p)
    return y.reshape(b, m, *out)


def _bn_scale(p) -> tuple[np.ndarray, np.ndarray]:
    scale = _f64(p["scale"]) / np.sqrt(_f64(p["var"]) + float(np.float32(p["epsilon"])))
    return scale, _f64(p["bias"]) - _f64(p["mean"]) * scale


def _channel(v, ndim) -> np.ndarray:
    return _f64(v).reshape((1, -1) + (1,) * (ndim - 2))


def _apply(op: Op, x: np.ndarray, linear: bool) -> np.ndarray:
    """One op on a batch x; with linear=True, its linear part (no offsets)."""
    k, p = op.kind, op.p
    on = 0.0 if linear else 1.0
    if k == "gemm":
        b = _f64(p["B"])
        b = b.T if p.get("transB", 0) else b
        y = float(np.float32(p.get("alpha", 1.0))) * (x @ b)
        if "C" in p:
            y = y + on * float(np.float32(p.get("beta", 1.0))) * _f64(p["C"])
        return y
    if k == "matmul":
        return x @ _f64(p["B"])
    if k == "add":
        return x + on * _f64(p["c"])
    if k == "sub":
        return x - on * _f64(p["c"])
    if k == "rsub":
        return on * _f64(p["c"]) - x
    if k == "mul":
        return x * _f64(p["c"])
    if k == "div":
        return x / _f64(p["c"])
    if k == "conv":
        y = conv_nd(x, p["W"], p["strides"], p["pads"], p["dilations"], p["group"])
        if "b" in p:
            y = y + on * _channel(p["b"], y.ndim)
        return y
    if k == "bn":
        scale, shift = _bn_scale(p)
        return x * _channel(scale, x.ndim) + on * _channel(shift, x.ndim)
    if k == "relu":
        return np.maximum(x, 0.0)
    if k == "maxpool":
        return patches(x, p["kernel"], p["strides"], p["pads"], None, -np.inf).max(axis=2)
    if k == "avgpool":
        total = patches(x, p["kernel"], p["strides"], p["pads"], None, 0.0).sum(axis=2)
        if p.get("count_include_pad", 0):
            count = float(math.prod(p["kernel"]))
        else:
            ones = np.ones((1, 1, *x.shape[2:]))
            count = patches(ones, p["kernel"], p["strides"], p["pads"], None, 0.0).sum(axis=2)
        return total / count
    if k == "flatten":
        return x.reshape(x.shape[0], -1)
    if k == "reshape":
        return x.reshape(x.shape[0], *p["shape"][1:])
    if k == "transpose":
        return x.transpose(p["perm"])
    if k == "pad":
        rank = x.ndim
        width = [(p["pads"][i], p["pads"][rank + i]) for i in range(rank)]
        return np.pad(x, width, constant_values=0.0 if linear else float(np.float32(p["value"])))
    raise ValueError(f"unknown op {k}")


def _tangent(op: Op, x: np.ndarray, t: np.ndarray) -> np.ndarray:
    """The derivative of op at the nominal input x (batch 1) applied to tangents t."""
    if op.kind in AFFINE_KINDS:
        return _apply(op, t, linear=True)
    if op.kind == "relu":
        return t * (x > 0)
    if op.kind == "maxpool":
        p = op.p
        cols = patches(x, p["kernel"], p["strides"], p["pads"], None, -np.inf)
        pick = cols.argmax(axis=2)[:, :, None]
        tcols = patches(t, p["kernel"], p["strides"], p["pads"], None, 0.0)
        pick = np.broadcast_to(pick, (t.shape[0], *pick.shape[1:]))
        return np.take_along_axis(tcols, pick, axis=2)[:, :, 0]
    raise ValueError(f"unknown op {op.kind}")


def conv_nd_adjoint(g, w, in_shape, strides, pads, dilations, group) -> np.ndarray:
    """The adjoint of conv_nd: g (B, M, *out) -> (B, C, *in_shape[2:])."""
    w = _f64(w)
    m, cg = w.shape[:2]
    kernel, rank = w.shape[2:], w.ndim - 2
    out = g.shape[2:]
    b = g.shape[0]
    padded = [in_shape[2 + i] + pads[i] + pads[rank + i] for i in range(rank)]
    xp = np.zeros((b, group * cg, *padded))
    gg = g.reshape(b, group, m // group, -1)
    wg = w.reshape(group, m // group, cg, *kernel)
    for offs in itertools.product(*[range(k) for k in kernel]):
        index = tuple(slice(o * d, o * d + (n - 1) * s + 1, s)
                      for o, d, n, s in zip(offs, dilations, out, strides))
        part = np.swapaxes(wg[(..., *offs)], -1, -2) @ gg  # (g, c, m) @ (b, g, m, p)
        xp[(slice(None), slice(None), *index)] += part.reshape(b, group * cg, *out)
    crop = tuple(slice(pads[i], pads[i] + in_shape[2 + i]) for i in range(rank))
    return xp[(slice(None), slice(None), *crop)]


def _window_index(shape, op: Op) -> np.ndarray:
    """(C, K, *out) flat index into one (C, *spatial) image of every window entry (-1 on padding)."""
    index = np.arange(math.prod(shape[1:]), dtype=float).reshape(1, *shape[1:])
    cols = patches(index, op.p["kernel"], op.p["strides"], op.p["pads"], None, -1.0)
    return cols[0].astype(np.int64)


def _scatter(shape, index: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Sum values (B, *index.shape) into images (B, *shape[1:]) at the flat positions index."""
    b = values.shape[0]
    out = np.zeros((b, math.prod(shape[1:]) + 1))  # the last slot takes the padding (-1)
    flat = np.where(index < 0, out.shape[1] - 1, index).ravel()
    np.add.at(out, (np.arange(b)[:, None], flat[None, :]), values.reshape(b, -1))
    return out[:, :-1].reshape(b, *shape[1:])


def _cotangent(op: Op, x: np.ndarray, g: np.ndarray) -> np.ndarray:
    """The adjoint of op's derivative at the nominal input x (batch 1) applied to g."""
    k, p = op.kind, op.p
    if k == "gemm":
        b = _f64(p["B"])
        b = b.T if p.get("transB", 0) else b
        return float(np.float32(p.get("alpha", 1.0))) * (g @ b.T)
    if k == "matmul":
        return g @ _f64(p["B"]).T
    if k in ("add", "sub"):
        return g
    if k == "rsub":
        return -g
    if k == "mul":
        return g * _f64(p["c"])
    if k == "div":
        return g / _f64(p["c"])
    if k == "conv":
        return conv_nd_adjoint(g, p["W"], x.shape, p["strides"], p["pads"], p["dilations"], p["group"])
    if k == "bn":
        return g * _channel(_bn_scale(p)[0], g.ndim)
    if k == "relu":
        return g * (x > 0)
    if k == "maxpool":
        cols = patches(x, p["kernel"], p["strides"], p["pads"], None, -np.inf)
        pick = cols.argmax(axis=2)  # (1, C, *out)
        index = np.take_along_axis(_window_index(x.shape, op)[None], pick[:, :, None], axis=2)[0, :, 0]
        return _scatter(x.shape, index, g)
    if k == "avgpool":
        index = _window_index(x.shape, op)  # (C, K, *out)
        count = (index >= 0).sum(axis=1)  # entries that are not padding
        if p.get("count_include_pad", 0):
            count = np.full(count.shape, math.prod(p["kernel"]))
        share = np.broadcast_to((g / count)[:, :, None], (g.shape[0], *index.shape))
        return _scatter(x.shape, index, share)
    if k in ("flatten", "reshape"):
        return g.reshape(g.shape[0], *x.shape[1:])
    if k == "transpose":
        return g.transpose(np.argsort(p["perm"]))
    if k == "pad":
        rank = x.ndim
        crop = tuple(slice(p["pads"][i], p["pads"][i] + x.shape[i]) for i in range(1, rank))
        return g[(slice(None), *crop)]
    raise ValueError(f"unknown op {k}")


# ---------------------------------------------------------------------- ONNX nodes


def _onnx_node(op: Op, x: str, y: str, name: str):
    k, p = op.kind, op.p
    mk = helper.make_node

    def init(key, value, dtype=np.float32):
        return numpy_helper.from_array(np.asarray(value, dtype=dtype), f"{name}.{key}")

    if k == "gemm":
        inits = [init("B", p["B"])] + ([init("C", p["C"])] if "C" in p else [])
        attrs = {"transB": p.get("transB", 0)}
        if "alpha" in p:
            attrs["alpha"] = float(p["alpha"])
        if "beta" in p:
            attrs["beta"] = float(p["beta"])
        return [mk("Gemm", [x] + [t.name for t in inits], [y], name=name, **attrs)], inits
    if k == "matmul":
        return [mk("MatMul", [x, f"{name}.B"], [y], name=name)], [init("B", p["B"])]
    if k in ("add", "sub", "mul", "div", "rsub"):
        onnx_op = {"add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div", "rsub": "Sub"}[k]
        inputs = [f"{name}.c", x] if k == "rsub" else [x, f"{name}.c"]
        if p.get("as_constant_node"):
            const = mk("Constant", [], [f"{name}.c"], name=f"{name}.const",
                       value=numpy_helper.from_array(np.asarray(p["c"], np.float32)))
            return [const, mk(onnx_op, inputs, [y], name=name)], []
        return [mk(onnx_op, inputs, [y], name=name)], [init("c", p["c"])]
    if k == "conv":
        inits = [init("W", p["W"])] + ([init("b", p["b"])] if "b" in p else [])
        return [mk("Conv", [x] + [t.name for t in inits], [y], name=name,
                   kernel_shape=list(np.shape(p["W"])[2:]), strides=list(p["strides"]),
                   pads=list(p["pads"]), dilations=list(p["dilations"]), group=p["group"])], inits
    if k == "bn":
        inits = [init(key, p[key]) for key in ("scale", "bias", "mean", "var")]
        return [mk("BatchNormalization", [x] + [t.name for t in inits], [y], name=name,
                   epsilon=float(p["epsilon"]))], inits
    if k == "relu":
        return [mk("Relu", [x], [y], name=name)], []
    if k == "maxpool":
        return [mk("MaxPool", [x], [y], name=name, kernel_shape=list(p["kernel"]),
                   strides=list(p["strides"]), pads=list(p["pads"]))], []
    if k == "avgpool":
        return [mk("AveragePool", [x], [y], name=name, kernel_shape=list(p["kernel"]),
                   strides=list(p["strides"]), pads=list(p["pads"]),
                   count_include_pad=p.get("count_include_pad", 0))], []
    if k == "flatten":
        return [mk("Flatten", [x], [y], name=name, axis=1)], []
    if k == "reshape":
        shape = init("shape", p["onnx_shape"], np.int64)
        return [mk("Reshape", [x, shape.name], [y], name=name)], [shape]
    if k == "transpose":
        return [mk("Transpose", [x], [y], name=name, perm=list(p["perm"]))], []
    if k == "pad":
        pads = init("pads", p["pads"], np.int64)
        value = init("value", p["value"])
        return [mk("Pad", [x, pads.name, value.name], [y], name=name, mode="constant")], [pads, value]
    raise ValueError(f"unknown op {k}")


# ---------------------------------------------------------------------- random networks


def he(rng, shape, fan_in) -> np.ndarray:
    return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)


def small(rng, shape, scale=0.3) -> np.ndarray:
    return (scale * rng.standard_normal(shape)).astype(np.float32)


def _dense_layer(rng, n_in: int, n_out: int) -> list[Op]:
    """Gemm (either layout, sometimes alpha/beta) or MatMul + Add."""
    w = he(rng, (n_out, n_in), n_in)
    b = small(rng, n_out)
    style = rng.integers(4)
    if style == 0:
        return [Op("matmul", {"B": np.ascontiguousarray(w.T)}), Op("add", {"c": b})]
    if style == 1:
        return [Op("gemm", {"B": w, "C": b, "transB": 1})]
    if style == 2:
        return [Op("gemm", {"B": np.ascontiguousarray(w.T), "C": b, "transB": 0})]
    alpha, beta = float(rng.uniform(0.5, 2.0)), float(rng.uniform(0.5, 2.0))
    return [Op("gemm", {"B": w, "C": b.reshape(1, -1), "transB": 1, "alpha": alpha, "beta": beta})]


def _normalization(rng, shape: tuple[int, ...], per: str) -> list[Op]:
    """Input normalization: Sub/Div or Mul/Add by constants (scalar or per feature/channel)."""
    if per == "channel":
        cshape = (1, shape[1]) + (1,) * (len(shape) - 2)
    elif per == "feature":
        cshape = shape
    else:
        cshape = ()
    mean = small(rng, cshape, 0.5)
    std = rng.uniform(0.3, 2.0, cshape).astype(np.float32)
    as_node = bool(rng.integers(2))
    if rng.integers(2):
        return [Op("sub", {"c": mean, "as_constant_node": as_node}), Op("div", {"c": std})]
    return [Op("mul", {"c": (1 / std).astype(np.float32)}),
            Op("add", {"c": mean, "as_constant_node": as_node})]


def dense_net(seed: int) -> RefNet:
    """An MLP with 2-4 affine layers, optional input normalization and image-shaped input."""
    rng = np.random.default_rng(1000 + seed)
    n_in = int(rng.integers(2, 25))
    ops: list[Op] = []
    if rng.integers(3) == 0:  # image-shaped input, flattened first
        h = int(rng.integers(2, 5))
        input_shape = (1, 1, h, h + 1)
        n_in = h * (h + 1)
        if rng.integers(2):
            ops += _normalization(rng, input_shape, "channel")
        ops.append(Op("flatten") if rng.integers(2) else
                   Op("reshape", {"shape": (1, n_in), "onnx_shape": [1, -1]}))
    else:
        input_shape = (1, n_in)
        if rng.integers(2):
            ops += _normalization(rng, input_shape, str(rng.choice(["feature", "scalar"])))
    layers = int(rng.integers(2, 5))
    width = n_in
    for i in range(layers):
        last = i == layers - 1
        n_out = int(rng.integers(2, 7)) if last else int(rng.integers(4, 25))
        ops += _dense_layer(rng, width, n_out)
        if not last or rng.integers(6) == 0:
            ops.append(Op("relu"))
        width = n_out
    return RefNet(input_shape, ops, f"dense{seed}")


def wide_net(seed: int) -> tuple[RefNet, list[int]]:
    """A 12-260-260-40-24-6 ReLU MLP (its first layers hold too many units for one
    joint bound, its last ones fit), and the number of ops before each block."""
    rng = np.random.default_rng(7000 + seed)
    widths = [12, 260, 260, 40, 24, 6]
    ops: list[Op] = []
    starts = []
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        starts.append(len(ops))
        ops += _dense_layer(rng, a, b)
        if i < len(widths) - 2:
            ops.append(Op("relu"))
    return RefNet((1, widths[0]), ops, f"wide{seed}"), starts


def shallow_net(seed: int) -> RefNet:
    """One affine map (dense or conv), with or without a ReLU: bounds are nearly tight."""
    rng = np.random.default_rng(5000 + seed)
    if seed % 2 == 0:
        n_in, n_out = int(rng.integers(2, 20)), int(rng.integers(2, 20))
        ops = _dense_layer(rng, n_in, n_out)
        shape = (1, n_in)
    else:
        c, h = int(rng.integers(1, 4)), int(rng.integers(4, 8))
        shape = (1, c, h, h)
        k, m = int(rng.integers(1, 4)), int(rng.integers(1, 5))
        pads = tuple(int(v) for v in rng.integers(0, 2, 4))
        ops = [Op("conv", {"W": he(rng, (m, c, k, k), c * k * k), "b": small(rng, m),
                           "strides": (1, 1), "pads": pads, "dilations": (1, 1), "group": 1})]
    if seed % 4 in (2, 3):
        ops.append(Op("relu"))
    return RefNet(shape, ops, f"shallow{seed}")


def _out(size, k, s, p, d=1) -> int:
    return (size + p - d * (k - 1) - 1) // s + 1


def _conv_op(rng, shape: tuple[int, ...]) -> Op | None:
    """A random Conv on `shape` (N, C, *spatial), or None if it does not fit."""
    rank, c = len(shape) - 2, shape[1]
    groups = [g for g in (1, 2, c) if c % g == 0]
    group = int(rng.choice(groups))
    m = group * int(rng.integers(1, 4)) if group == c and c > 1 else int(rng.integers(2, 7))
    if m % group:
        m = group * max(1, m // group)
    kernel = tuple(int(rng.integers(1, 4)) for _ in range(rank))
    strides = tuple(int(rng.integers(1, 3)) for _ in range(rank))
    dilations = tuple(int(rng.integers(1, 3)) for _ in range(rank))
    pads = tuple(int(rng.integers(0, 3)) for _ in range(2 * rank))
    out = [_out(shape[2 + i], kernel[i], strides[i], pads[i] + pads[rank + i], dilations[i])
           for i in range(rank)]
    if min(out) < 2:
        return None
    cg = c // group
    op = Op("conv", {"W": he(rng, (m, cg, *kernel), cg * math.prod(kernel)),
                     "b": small(rng, m, 0.2), "strides": strides, "pads": pads,
                     "dilations": dilations, "group": group})
    # some windows may fall on the padding only, but most must see the input
    seen = conv_nd(np.ones((1, *shape[1:])), np.abs(op.p["W"]), strides, pads, dilations, group)
    return op if np.mean(seen > 0) >= 0.6 else None


def bn_op(rng, c: int) -> Op:
    return Op("bn", {"scale": rng.uniform(0.5, 1.5, c).astype(np.float32),
                     "bias": small(rng, c, 0.1), "mean": small(rng, c, 0.2),
                     "var": rng.uniform(0.5, 2.0, c).astype(np.float32), "epsilon": 1e-5})


def _pool_op(rng, shape) -> Op | None:
    rank = len(shape) - 2
    kind = int(rng.integers(4))
    if kind in (0, 1):  # MaxPool kernel 2 stride 2
        kernel, strides, pads = (2,) * rank, (2,) * rank, (0,) * 2 * rank
    elif kind == 2:  # MaxPool kernel 3 stride 2 (overlapping windows), sometimes padded
        kernel, strides = (3,) * rank, (2,) * rank
        pads = tuple(int(rng.integers(0, 2)) for _ in range(2 * rank))
    else:  # AveragePool, sometimes padded (count_include_pad 0 or 1)
        kernel, strides = (2,) * rank, (2,) * rank
        pads = tuple(int(rng.integers(0, 2)) for _ in range(2 * rank))
    out = [_out(shape[2 + i], kernel[i], strides[i], pads[i] + pads[rank + i]) for i in range(rank)]
    if min(out) < 1:
        return None
    if kind == 3:
        return Op("avgpool", {"kernel": kernel, "strides": strides, "pads": pads,
                              "count_include_pad": int(rng.integers(2))})
    return Op("maxpool", {"kernel": kernel, "strides": strides, "pads": pads})


def apply_shapes(ops: list[Op], input_shape) -> tuple[int, ...]:
    x = np.zeros(input_shape)
    for op in ops:
        x = _apply(op, x, linear=False)
    return x.shape


def conv_net(seed: int) -> RefNet:
    """A small CNN: 1-2 conv stages (BN, ReLU, max/average pooling), flatten, 1-2 Gemm."""
    rng = np.random.default_rng(2000 + seed)
    rank = 1 if seed % 5 == 4 else 2
    c = int(rng.integers(1, 4))
    size = int(rng.integers(6, 11)) if rank == 2 else int(rng.integers(8, 20))
    input_shape = (1, c) + (size,) * rank
    ops: list[Op] = []
    if rng.integers(3) == 0:
        ops += _normalization(rng, input_shape, "channel")
    stages = int(rng.integers(1, 3))
    for _ in range(stages):
        shape = apply_shapes(ops, input_shape)
        conv = None
        for _try in range(20):
            conv = _conv_op(rng, shape)
            if conv is not None:
                break
        if conv is None:
            break
        ops.append(conv)
        m = conv.p["W"].shape[0]
        order = int(rng.integers(4))
        pool_first = rng.integers(5) == 0  # Conv -> MaxPool -> Relu (a lone ReLU block)
        if order in (0, 1):
            ops.append(bn_op(rng, m))
        if pool_first:
            pool = _pool_op(rng, apply_shapes(ops, input_shape))
            if pool is not None:
                ops.append(pool)
        ops.append(Op("relu"))
        if order == 2:
            ops.append(bn_op(rng, m))  # BN after the ReLU: composes with the next affine map
        if not pool_first and rng.integers(3):
            pool = _pool_op(rng, apply_shapes(ops, input_shape))
            if pool is not None:
                ops.append(pool)
        if rng.integers(6) == 0:
            rank_now = len(apply_shapes(ops, input_shape)) - 2
            pads = (0, 0) + tuple(int(v) for v in rng.integers(0, 2, rank_now)) + \
                (0, 0) + tuple(int(v) for v in rng.integers(0, 2, rank_now))
            ops.append(Op("pad", {"pads": pads, "value": np.float32(rng.uniform(-0.5, 0.5))}))
    shape = apply_shapes(ops, input_shape)
    flat = math.prod(shape[1:])
    how = int(rng.integers(4))
    if how == 0:
        ops.append(Op("flatten"))
    elif how == 1:
        ops.append(Op("reshape", {"shape": (1, flat), "onnx_shape": [1, -1]}))
    elif how == 2:
        ops.append(Op("reshape", {"shape": (1, flat), "onnx_shape": [-1, flat]}))
    else:  # channels-last then flatten: a permutation
        perm = (0, *range(2, len(shape)), 1)
        ops += [Op("transpose", {"perm": perm}), Op("flatten")]
    width = flat
    if rng.integers(2):
        hidden = int(rng.integers(4, 17))
        ops += _dense_layer(rng, width, hidden) + [Op("relu")]
        width = hidden
    ops += _dense_layer(rng, width, int(rng.integers(2, 6)))
    return RefNet(input_shape, ops, f"conv{seed}")


def tie_net(seed: int) -> tuple[RefNet, np.ndarray]:
    """Conv → ReLU → 2x2 max-pooling → Gemm → ReLU → Gemm, with an x0 that is one
    constant value but for a random square: the windows over the constant part
    are exact ties (every member the same sum of the same products), the others
    are not. Returns the net and its x0."""
    rng = np.random.default_rng(seed)
    size = int(rng.integers(8, 13))
    W = he(rng, (int(rng.integers(2, 5)), 1, 3, 3), 9)
    ops = [Op("conv", {"W": W, "b": small(rng, W.shape[0], 0.3) + 0.3, "strides": (1, 1),
                       "pads": (0, 0, 0, 0), "dilations": (1, 1), "group": 1}),
           Op("relu"), Op("maxpool", {"kernel": (2, 2), "strides": (2, 2), "pads": (0, 0, 0, 0)}),
           Op("flatten")]
    flat = W.shape[0] * ((size - 2) // 2) ** 2
    ops += _dense_layer(rng, flat, 12) + [Op("relu")] + _dense_layer(rng, 12, 4)
    x0 = np.full((1, 1, size, size), np.float32(rng.uniform(-1, 1)), np.float32)
    k = int(rng.integers(2, size // 2 + 1))
    a, b = rng.integers(0, size - k, 2)
    x0[0, 0, a:a + k, b:b + k] = rng.uniform(-1, 1, (k, k)).astype(np.float32)
    return RefNet((1, 1, size, size), ops, f"tie{seed}"), x0


# ---------------------------------------------------------------------- ONNX -> RefNet


def from_onnx(path: str | Path) -> RefNet:
    """Read a chain model made of the ops above (Constant nodes allowed) into a RefNet."""
    model = onnx.load(str(path))
    g = model.graph
    consts = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    for node in g.node:
        if node.op_type == "Constant":
            consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    x_name = next(i.name for i in g.input if i.name not in consts)
    value = next(i for i in g.input if i.name == x_name)
    shape = tuple(d.dim_value or 1 for d in value.type.tensor_type.shape.dim)
    ops: list[Op] = []
    for node in g.node:
        if node.op_type == "Constant":
            continue
        a = {at.name: helper.get_attribute_value(at) for at in node.attribute}
        c = [consts.get(n) for n in node.input]
        t = node.op_type
        if t == "Gemm":
            p = {"B": c[1], "transB": a.get("transB", 0), "alpha": a.get("alpha", 1.0),
                 "beta": a.get("beta", 1.0)}
            if len(c) > 2 and c[2] is not None:
                p["C"] = c[2]
            ops.append(Op("gemm", p))
        elif t == "MatMul":
            ops.append(Op("matmul", {"B": c[1]}))
        elif t in ("Add", "Sub", "Mul", "Div"):
            kind = t.lower()
            if c[0] is not None:
                kind = {"add": "add", "mul": "mul", "sub": "rsub"}[kind]
                ops.append(Op(kind, {"c": c[0]}))
            else:
                ops.append(Op(kind, {"c": c[1]}))
        elif t == "Conv":
            w = c[1]
            rank = w.ndim - 2
            p = {"W": w, "strides": tuple(a.get("strides", [1] * rank)),
                 "pads": tuple(a.get("pads", [0] * 2 * rank)),
                 "dilations": tuple(a.get("dilations", [1] * rank)), "group": a.get("group", 1)}
            if len(c) > 2 and c[2] is not None:
                p["b"] = c[2]
            ops.append(Op("conv", p))
        elif t == "BatchNormalization":
            ops.append(Op("bn", {"scale": c[1], "bias": c[2], "mean": c[3], "var": c[4],
                                 "epsilon": a.get("epsilon", 1e-5)}))
        elif t == "Relu":
            ops.append(Op("relu"))
        elif t in ("MaxPool", "AveragePool"):
            kernel = tuple(a["kernel_shape"])
            rank = len(kernel)
            if a.get("ceil_mode", 0) or a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
                raise ValueError(f"{t}: ceil_mode/auto_pad not supported by the reference")
            p = {"kernel": kernel, "strides": tuple(a.get("strides", [1] * rank)),
                 "pads": tuple(a.get("pads", [0] * 2 * rank))}
            if t == "AveragePool":
                p["count_include_pad"] = a.get("count_include_pad", 0)
            ops.append(Op("maxpool" if t == "MaxPool" else "avgpool", p))
        elif t == "Flatten":
            if a.get("axis", 1) != 1:
                raise ValueError("Flatten axis != 1 not supported by the reference")
            ops.append(Op("flatten"))
        elif t == "Reshape":
            target = [int(v) for v in c[1]]
            cur = apply_shapes(ops, shape)
            new = np.empty(cur).reshape([cur[i] if v == 0 else v for i, v in enumerate(target)]).shape
            ops.append(Op("reshape", {"shape": new, "onnx_shape": target}))
        elif t in ("Identity", "Dropout"):
            continue
        else:
            raise ValueError(f"op {t} not supported by the reference")
    return RefNet(shape, ops, Path(path).stem)


# ---------------------------------------------------------------------- onnxruntime


def ort_session(path: str | Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ort_run(session: ort.InferenceSession, x: np.ndarray) -> np.ndarray:
    """The model's output at x (batch 1), flat float64."""
    name = session.get_inputs()[0].name
    shape = [d if isinstance(d, int) else 1 for d in session.get_inputs()[0].shape]
    feed = np.asarray(x, dtype=np.float32).reshape(shape)
    return np.asarray(session.run(None, {name: feed})[0], dtype=np.float64).ravel()


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """||a - b|| / ||b|| (with a floor so that tiny outputs compare absolutely)."""
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-3))


# ---------------------------------------------------------------------- sampling


def ball_points(rng, x0: np.ndarray, eps: float, n_sphere: int, n_inside: int,
                directions: list[np.ndarray] = ()) -> np.ndarray:
    """Points of the L2 ball around x0 (flat), all different from x0.

    n_sphere uniform directions at radius eps, n_inside at random radii
    (log-uniform from 1e-4 eps to eps), and +-t v for each given direction v and
    several t <= eps.
    """
    n = x0.size
    d = rng.standard_normal((n_sphere + n_inside, n))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    radii = np.concatenate([np.full(n_sphere, eps), eps * 10 ** rng.uniform(-4, 0, n_inside)])
    points = [x0.ravel() + radii[:, None] * d]
    ts = eps * np.array([1e-4, 1e-3, 1e-2, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0])
    for v in directions:
        v = np.ravel(v) / np.linalg.norm(v)
        for sign in (1.0, -1.0):
            points.append(x0.ravel() + sign * ts[:, None] * v)
    return np.concatenate(points)


def ratio_ascent(net: RefNet, x0: np.ndarray, eps: float, rng, starts: int = 40, steps: int = 40) -> float:
    """The largest ||f(x) − f(x0)|| / ||x − x0|| found by gradient ascent on the
    ratio in the ball (the float64 twin), from random directions at random radii."""
    x0 = x0.ravel().astype(np.float64)
    f0, best = net(x0[None])[0], 0.0
    for _ in range(starts):
        d = rng.standard_normal(x0.size)
        radius = eps * 10 ** rng.uniform(-5, 0)
        x = x0 + radius * d / np.linalg.norm(d)
        for _ in range(steps):
            dx = x - x0
            size = np.linalg.norm(dx)
            df = net(x[None])[0] - f0
            ratio = np.linalg.norm(df) / size
            best = max(best, ratio)
            if not np.any(df):
                break
            grad = (net.vjp(x, (df / np.linalg.norm(df))[None])[0] - ratio * dx / size) / size
            x = x + 0.1 * radius * grad / (np.linalg.norm(grad) + 1e-300)
            dx = x - x0
            if np.linalg.norm(dx) > eps:
                x = x0 + dx * eps / np.linalg.norm(dx)
    return best


def max_ratio(f, x0: np.ndarray, points: np.ndarray, noise: float = 1e-12) -> float:
    """max over points of ||f(x) - f(x0)|| / ||x - x0|| (f batched).

    `noise` * (1 + ||f(x0)||) is taken off each numerator: BLAS rounds a batch
    differently from a single row, so a constant f shows differences ~1e-17.
    """
    x0 = x0.ravel()
    f0 = f(x0[None])[0]
    tol = noise * (1.0 + np.linalg.norm(f0))
    num = np.maximum(np.linalg.norm(f(points) - f0, axis=1) - tol, 0.0)
    den = np.linalg.norm(points - x0, axis=1)
    return float(np.max(num / den))


def _fast(attributes: dict, x: np.ndarray, outputs: int) -> bool:
    """Whether _pool computes this pool: one output, explicit pads, no ceil mode or dilation."""
    return (x.ndim >= 3 and outputs == 1 and attributes.get("auto_pad") in (None, "NOTSET", b"NOTSET")
            and not attributes.get("ceil_mode") and all(d == 1 for d in attributes.get("dilations") or ()))


def _pool(kind: str, x: np.ndarray, attributes: dict) -> tuple[np.ndarray]:
    """An ONNX pool's attributes run by the numpy nets' own pooling (_apply)."""
    rank = x.ndim - 2
    p = {"kernel": attributes["kernel_shape"], "strides": attributes.get("strides") or (1,) * rank,
         "pads": attributes.get("pads") or (0,) * (2 * rank),
         "count_include_pad": attributes.get("count_include_pad") or 0}
    return (_apply(Op(kind, p), x, linear=False).astype(x.dtype),)


class MaxPool(op_max_pool.MaxPool):
    """onnx's reference MaxPool (~1 ms per window row), by the numpy nets' pooling where it applies."""

    def _run(self, x, **attributes):
        if not _fast(attributes, x, len(self.output)):
            return super()._run(x, **attributes)
        return _pool("maxpool", x, attributes)


class AveragePool(op_average_pool.AveragePool_19):
    """onnx's reference AveragePool (a Python loop over windows), by the numpy nets' pooling
    where it applies."""

    def _run(self, x, **attributes):
        if not _fast(attributes, x, 1):
            return super()._run(x, **attributes)
        return _pool("avgpool", x, attributes)


def float64_twin(path: str | Path):
    """Any ONNX model of float32 tensors as a float64 function of flat inputs (batched):
    its initializers, Constant nodes, Casts and inputs/outputs made DOUBLE, run by
    onnx's reference evaluator."""
    model = onnx.load(str(path))
    g = model.graph
    double = onnx.TensorProto.DOUBLE
    for init in g.initializer:
        if init.data_type == onnx.TensorProto.FLOAT:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float64),
                                                  init.name))
    for node in g.node:
        for at in node.attribute:
            if at.name == "to" and at.i == onnx.TensorProto.FLOAT:
                at.i = double
            if at.type == onnx.AttributeProto.TENSOR and at.t.data_type == onnx.TensorProto.FLOAT:
                at.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(at.t).astype(np.float64)))
    for value in list(g.input) + list(g.output):
        if value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT:
            value.type.tensor_type.elem_type = double
    del g.value_info[:]
    consts = {t.name for t in g.initializer}
    x = next(i for i in g.input if i.name not in consts)
    shape = [d.dim_value or 1 for d in x.type.tensor_type.shape.dim]
    session = ReferenceEvaluator(model, new_ops=[MaxPool, AveragePool])

    def one(p: np.ndarray) -> np.ndarray:
        return session.run(None, {x.name: p.reshape(shape)})[0].ravel()

    def many(points: np.ndarray) -> np.ndarray:
        out = session.run(None, {x.name: points.reshape((-1, *shape[1:]))})[0]
        return out.reshape(points.shape[0], -1)

    # points along the leading axis (of size 1) as one batch, where a probe of two
    # points runs as point by point (not where the graph fixes its batch size)
    probe = np.random.default_rng(0).standard_normal((2, math.prod(shape)))
    try:
        batched = shape[0] == 1 and np.allclose(many(probe), [one(p) for p in probe], rtol=1e-12, atol=1e-12)
    except Exception:  # a Reshape to 1 × …
        batched = False

    def f(points: np.ndarray) -> np.ndarray:
        points = np.asarray(points, np.float64).reshape(-1, math.prod(shape))
        if not batched:
            return np.stack([one(p) for p in points])
        return np.concatenate([many(points[i:i + 256]) for i in range(0, points.shape[0], 256)])

    return f


def central_jacobian(f, x0: np.ndarray, h: float = 1e-6) -> np.ndarray:
    """The Jacobian of a float64 function of flat inputs by central differences."""
    x0 = np.ravel(x0).astype(np.float64)
    eye = np.eye(x0.size) * h
    return ((f(x0 + eye) - f(x0 - eye)) / (2 * h)).T
