"""Activation idioms that exporters spell as several ONNX nodes, fused into one node.

`fuse_activations` rewrites a ModelProto: each idiom below becomes one node of the
private domain 'onnxlip.fused' (op Gelu with approximate='none'/'tanh', Silu, HardSwish)
whose input is the activation's argument x and whose output is the idiom's result:

- GELU, erf form: 0.5·x·(1 + Erf(x/√2)), with x/√2 as Div or Mul and the products in any
  order (torch's TorchScript exporter: ((x·(Erf(x/√2) + 1))·0.5; onnxscript (dynamo):
  x·(0.5·(Erf(x/√2) + 1)); (0.5·x)·(1 + Erf(x·(1/√2))) ...);
- GELU, tanh form: 0.5·x·(1 + Tanh(√(2/π)(x + 0.044715·x³))), the cube as Pow or Mul,
  √(2/π) as a constant or as a constant subgraph (Sqrt(Div(2, π))), or factored as
  x·√(2/π)·(1 + 0.044715·x²);
- SiLU: x·Sigmoid(x);
- HardSwish: x·HardSigmoid(x) with alpha = 1/6, beta = 1/2, and x·Clip(x + 3, 0, 6)/6;
- torch's thresholded softplus, Where(x > t, x, Softplus(x)) with t ≥ 20 (the dynamo
  exporter), becomes a standard Softplus node: the two differ by at most
  log(1 + e^−t) ≤ 2.1e-9, below float32 resolution there, and the node's doc_string
  (THRESHOLDED_SOFTPLUS) says so for the loader to report.

The argument of Erf/Tanh/... and the factors around it are read as polynomials in one
tensor x through Mul, Add, Sub, Div, Pow, Neg, Sqrt, Cast, CastLike and Identity nodes
whose outputs have that one consumer; the constants must match the canonical ones to a
relative 1e-6 (float32 rounding of the exporters' constants is 6e-8). A match is fused
only when no tensor inside it is used elsewhere or is a graph output.

`activation_of` maps an activation node (standard ONNX or fused) to its
`onnxlip.activations` object.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from . import activations as act
from .errors import OnnxlipError

DOMAIN = "onnxlip.fused"
RTOL = 1e-6
_MAX_NODES = 24  # nodes a polynomial may span

Poly = dict[int, float]  # power of x -> coefficient


def node_label(node: onnx.NodeProto) -> str:
    """How a node is named in messages: its name, else its first output."""
    return node.name or (node.output[0] if node.output else node.op_type)


def _constant_node_value(node: onnx.NodeProto) -> np.ndarray | None:
    for attr in node.attribute:
        if attr.name in ("value", "sparse_value"):
            return numpy_helper.to_array(attr.t) if attr.name == "value" else None
        if attr.name in ("value_float", "value_floats", "value_int", "value_ints"):
            return np.asarray(helper.get_attribute_value(attr), dtype=np.float64)
    return None


@dataclass
class _Graph:
    """Producers, consumers and constants of a graph's top level."""

    graph: onnx.GraphProto
    producer: dict[str, int] = field(default_factory=dict)
    consumers: dict[str, list[int]] = field(default_factory=dict)
    constants: dict[str, np.ndarray] = field(default_factory=dict)
    outputs: set[str] = field(default_factory=set)

    def __post_init__(self):
        self.constants = {t.name: numpy_helper.to_array(t) for t in self.graph.initializer}
        # graph outputs and tensors read inside subgraphs (If/Loop bodies) are used elsewhere
        self.outputs = {o.name for o in self.graph.output} | _subgraph_reads(self.graph)
        for i, node in enumerate(self.graph.node):
            for name in node.output:
                self.producer[name] = i
            for name in dict.fromkeys(node.input):
                if name:
                    self.consumers.setdefault(name, []).append(i)
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                value = _constant_node_value(node)
                if value is not None:
                    self.constants[node.output[0]] = value

    def node(self, i: int) -> onnx.NodeProto:
        return self.graph.node[i]

    def scalar(self, name: str) -> float | None:
        value = self.constants.get(name)
        if value is None or value.size != 1 or not np.issubdtype(value.dtype, np.number):
            return None
        return float(value.reshape(()))

    def private(self, name: str) -> bool:
        """Whether the tensor has exactly one consuming node and is not a graph output."""
        return len(self.consumers.get(name, ())) == 1 and name not in self.outputs


def _subgraph_reads(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name read by a node of a subgraph of one of the graph's nodes."""
    names: set[str] = set()
    for node in graph.node:
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                names |= {name for n in sub.node for name in n.input} | _subgraph_reads(sub)
    return names


class _NoMatch(Exception):
    pass


class _Walker:
    """Reads tensors as polynomials in one non-constant tensor x, recording the nodes used."""

    def __init__(self, g: _Graph, x: str | None = None):
        self.g, self.x, self.nodes = g, x, set()

    def poly(self, name: str) -> Poly:
        c = self.g.scalar(name)
        if c is not None:
            return {0: c}
        i = self.g.producer.get(name)
        node = None if i is None else self.g.node(i)
        if node is None or not self.g.private(name) or node.domain not in ("", "ai.onnx") \
                or node.op_type not in _POLY_OPS:
            return self._leaf(name)
        if len(self.nodes) >= _MAX_NODES:
            raise _NoMatch
        self.nodes.add(i)
        return _POLY_OPS[node.op_type](self, node)

    def _leaf(self, name: str) -> Poly:
        if name in self.g.constants:  # a constant array: not an activation of x
            raise _NoMatch
        if self.x is None:
            self.x = name
        if name != self.x:
            raise _NoMatch
        return {1: 1.0}

    def constant(self, name: str) -> float:
        p = self.poly(name)
        if set(p) - {0}:
            raise _NoMatch
        return p.get(0, 0.0)


def _mul(p: Poly, q: Poly) -> Poly:
    out: Poly = {}
    for a, ca in p.items():
        for b, cb in q.items():
            out[a + b] = out.get(a + b, 0.0) + ca * cb
    return out


def _add(p: Poly, q: Poly, sign: float = 1.0) -> Poly:
    out = dict(p)
    for k, c in q.items():
        out[k] = out.get(k, 0.0) + sign * c
    return out


def _pow(w: _Walker, node: onnx.NodeProto) -> Poly:
    n = w.constant(node.input[1])
    if n != round(n) or not 0 <= n <= 4:
        raise _NoMatch
    out: Poly = {0: 1.0}
    base = w.poly(node.input[0])
    for _ in range(int(n)):
        out = _mul(out, base)
    return out


def _div(w: _Walker, node: onnx.NodeProto) -> Poly:
    d = w.constant(node.input[1])
    if d == 0:
        raise _NoMatch
    return {k: c / d for k, c in w.poly(node.input[0]).items()}


def _sqrt(w: _Walker, node: onnx.NodeProto) -> Poly:
    c = w.constant(node.input[0])
    if c < 0:
        raise _NoMatch
    return {0: math.sqrt(c)}


def _cast(w: _Walker, node: onnx.NodeProto) -> Poly:
    to = helper.get_attribute_value(node.attribute[0]) if node.op_type == "Cast" and node.attribute else None
    if node.op_type == "Cast" and to not in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE,
                                             onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16):
        raise _NoMatch
    return w.poly(node.input[0])  # CastLike's second input only gives the type


_POLY_OPS = {
    "Mul": lambda w, n: _mul(w.poly(n.input[0]), w.poly(n.input[1])),
    "Add": lambda w, n: _add(w.poly(n.input[0]), w.poly(n.input[1])),
    "Sub": lambda w, n: _add(w.poly(n.input[0]), w.poly(n.input[1]), -1.0),
    "Neg": lambda w, n: {k: -c for k, c in w.poly(n.input[0]).items()},
    "Div": _div,
    "Pow": _pow,
    "Sqrt": _sqrt,
    "Cast": _cast,
    "CastLike": _cast,
    "Identity": lambda w, n: w.poly(n.input[0]),
}


def _close(p: Poly, want: Poly) -> bool:
    keys = {k for k, c in p.items() if c != 0.0} | set(want)
    return all(math.isclose(p.get(k, 0.0), want.get(k, 0.0), rel_tol=RTOL, abs_tol=0.0) for k in keys)


_SQRT_2_PI = math.sqrt(2.0 / math.pi)
#: (op of the core node, its attributes) -> (argument polynomial, outer (c0, c1) with
#: result = x·(c0 + c1·core), fused op, fused attributes)
_IDIOMS = [
    ("Erf", {}, {1: 1.0 / math.sqrt(2.0)}, (0.5, 0.5), "Gelu", {"approximate": "none"}),
    ("Tanh", {}, {1: _SQRT_2_PI, 3: _SQRT_2_PI * 0.044715}, (0.5, 0.5), "Gelu", {"approximate": "tanh"}),
    ("Sigmoid", {}, {1: 1.0}, (0.0, 1.0), "Silu", {}),
    ("HardSigmoid", {"alpha": 1.0 / 6.0, "beta": 0.5}, {1: 1.0}, (0.0, 1.0), "HardSwish", {}),
    ("Clip", {"min": 0.0, "max": 6.0}, {0: 3.0, 1: 1.0}, (0.0, 1.0 / 6.0), "HardSwish", {}),
]


_CORES = {op for op, *_ in _IDIOMS} | {"Softplus"}


@dataclass
class _Match:
    x: str
    output: str
    last: int  # index of the node producing the output
    nodes: set[int]
    op: str
    attrs: dict
    domain: str = DOMAIN
    doc: str = ""


def _core_attrs_match(g: _Graph, node: onnx.NodeProto, want: dict) -> bool:
    if node.op_type == "HardSigmoid":
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        got = {"alpha": attrs.get("alpha", 0.2), "beta": attrs.get("beta", 0.5)}
    elif node.op_type == "Clip":
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}  # opset < 11
        got = {key: g.scalar(node.input[k]) if len(node.input) > k and node.input[k] else attrs.get(key)
               for k, key in ((1, "min"), (2, "max"))}
        if None in got.values():
            return False
    else:
        return True
    return all(math.isclose(got[k], v, rel_tol=RTOL, abs_tol=1e-12) for k, v in want.items())


def _match_at(g: _Graph, i: int) -> _Match | None:
    core = g.node(i)
    if core.domain not in ("", "ai.onnx"):
        return None
    for op, attrs, inner, (c0, c1), fused, fused_attrs in _IDIOMS:
        if core.op_type != op or not _core_attrs_match(g, core, attrs):
            continue
        try:
            return _match_idiom(g, i, inner, c0, c1, fused, fused_attrs)
        except _NoMatch:
            continue
    return None


def _match_idiom(g: _Graph, i: int, inner: Poly, c0: float, c1: float, fused: str, attrs: dict) -> _Match:
    """Read core(p(x)) and the products and sums around it as x^e·(a0 + a1·core)."""
    core = g.node(i)
    walker = _Walker(g)
    if not _close(walker.poly(core.input[0]), inner):
        raise _NoMatch
    nodes = set(walker.nodes) | {i}
    e, a0, a1 = 0, 0.0, 1.0
    tensor = core.output[0]
    for _ in range(8):
        if not g.private(tensor):
            raise _NoMatch
        j = g.consumers[tensor][0]
        node = g.node(j)
        others = [name for name in node.input if name != tensor]
        if node.domain not in ("", "ai.onnx") or len(node.input) != 2 or len(others) != 1:
            raise _NoMatch
        other = _Walker(g, walker.x)
        p = other.poly(others[0])
        first = node.input[0] == tensor
        if node.op_type in ("Add", "Sub") and e == 0 and set(p) <= {0}:
            k = p.get(0, 0.0)
            if node.op_type == "Add":
                a0 += k
            elif first:
                a0 -= k
            else:
                a0, a1 = k - a0, -a1
        elif node.op_type == "Mul" and len(p) == 1:
            (m, k), = p.items()
            e, a0, a1 = e + m, a0 * k, a1 * k
        elif node.op_type == "Div" and first and set(p) == {0} and p[0] != 0:
            a0, a1 = a0 / p[0], a1 / p[0]
        else:
            raise _NoMatch
        nodes |= other.nodes | {j}
        tensor = node.output[0]
        if e > 1:
            raise _NoMatch
        if e == 1 and _close({0: a0, 1: a1}, {0: c0, 1: c1}):
            _check_private(g, nodes, j)
            return _Match(walker.x, tensor, j, nodes, fused, attrs)
    raise _NoMatch


def _check_private(g: _Graph, nodes: set[int], last: int) -> None:
    """Every tensor made inside the match is used only inside it."""
    for k in nodes - {last}:
        for name in g.node(k).output:
            if name in g.outputs or any(c not in nodes for c in g.consumers.get(name, ())):
                raise _NoMatch


def may_fuse(model: onnx.ModelProto) -> bool:
    """Whether the model has a node an idiom is built around (else fuse_activations,
    which copies the model, has nothing to do)."""
    return any(node.op_type in _CORES for node in model.graph.node)


#: The smallest threshold t of Where(x > t, x, Softplus(x)) read as Softplus.
SOFTPLUS_THRESHOLD = 20.0
THRESHOLDED_SOFTPLUS = ("onnxlip: Where(x > t, x, Softplus(x)) with t >= 20 read as Softplus(x) "
                        "(they differ by at most log(1 + exp(-t)) <= 2.1e-9)")


def _match_softplus(g: _Graph, i: int) -> _Match | None:
    """Where(Greater(x, t), x, Softplus(x)) (t ≥ SOFTPLUS_THRESHOLD), or Less(t, x)."""
    core = g.node(i)
    x, out = core.input[0], core.output[0]
    if core.domain not in ("", "ai.onnx") or not g.private(out):
        return None
    j = g.consumers[out][0]
    where = g.node(j)
    if where.op_type != "Where" or where.domain not in ("", "ai.onnx") or list(where.input[1:]) != [x, out]:
        return None
    k = g.producer.get(where.input[0])
    if k is None or not g.private(where.input[0]):
        return None
    test = g.node(k)
    if test.op_type == "Greater" and test.input[0] == x:
        t = g.scalar(test.input[1])
    elif test.op_type == "Less" and test.input[1] == x:
        t = g.scalar(test.input[0])
    else:
        return None
    if t is None or not t >= SOFTPLUS_THRESHOLD:
        return None
    nodes = {i, j, k}
    try:
        _check_private(g, nodes, j)
    except _NoMatch:
        return None
    return _Match(x, where.output[0], j, nodes, "Softplus", {}, domain="", doc=THRESHOLDED_SOFTPLUS)


def fuse_activations(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of the model with each multi-node activation idiom replaced by one
    'onnxlip.fused' node (the input model is not changed)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    g = _Graph(model.graph)
    matches: list[_Match] = []
    claimed: set[int] = set()
    for i, node in enumerate(model.graph.node):
        if node.op_type in _CORES and i not in claimed:
            match = _match_softplus(g, i) if node.op_type == "Softplus" else _match_at(g, i)
            if match is not None and not match.nodes & claimed:
                matches.append(match)
                claimed |= match.nodes
    if not matches:
        return model
    by_last = {m.last: m for m in matches}
    removed_inputs = {name for k in claimed for name in model.graph.node[k].input}
    nodes = []
    for i, node in enumerate(model.graph.node):
        if i in by_last:
            m = by_last[i]
            nodes.append(helper.make_node(m.op, [m.x], [m.output], name=node.name or f"{m.op}_{m.output}",
                                          domain=m.domain, doc_string=m.doc or None, **m.attrs))
        elif i not in claimed:
            nodes.append(node)
    _drop_unused_constants(model, nodes, removed_inputs)
    _keep_types(model, matches)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return model


def _keep_types(model: onnx.ModelProto, matches: list[_Match]) -> None:
    """Give each fused output the type and shape of its input (the ops are elementwise),
    so that shape inference, which skips the private domain, carries on past them."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model).graph
    except Exception:  # a model shape inference cannot read: leave the types unknown
        return
    types = {v.name: v.type for v in [*inferred.input, *inferred.value_info, *inferred.output]}
    known = {v.name for v in [*model.graph.value_info, *model.graph.output]}
    for m in matches:
        if m.x in types and m.output not in known:
            model.graph.value_info.append(helper.make_value_info(m.output, types[m.x]))


def _drop_unused_constants(model: onnx.ModelProto, nodes: list, candidates: set[str]) -> None:
    """Drop the Constant nodes and initializers only the fused nodes used."""
    used = {name for node in nodes for name in node.input} | {o.name for o in model.graph.output} \
        | {i.name for i in model.graph.input}
    dead = candidates - used
    nodes[:] = [n for n in nodes if not (n.op_type == "Constant" and n.output[0] in dead)]
    keep = [t for t in model.graph.initializer if t.name not in dead]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


# --------------------------------------------------------------- nodes -> activations

def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _constant_input(node: onnx.NodeProto, index: int, constants: Mapping[str, np.ndarray], what: str,
                    scalar: bool = True) -> np.ndarray | None:
    if len(node.input) <= index or not node.input[index]:
        return None
    value = constants.get(node.input[index])
    if value is None:
        raise OnnxlipError(f"node '{node_label(node)}' ({node.op_type}): its {what} '{node.input[index]}' "
                           "must be a constant")
    if scalar and np.size(value) != 1:
        raise OnnxlipError(f"node '{node_label(node)}' ({node.op_type}): its {what} must be a scalar, "
                           f"got shape {np.shape(value)}")
    return np.asarray(value, dtype=np.float64)


def _clip(node: onnx.NodeProto, constants: Mapping[str, np.ndarray]) -> act.Clip:
    attrs = _attrs(node)
    low = _constant_input(node, 1, constants, "min")
    high = _constant_input(node, 2, constants, "max")
    low = attrs.get("min") if low is None else float(low.reshape(()))
    high = attrs.get("max") if high is None else float(high.reshape(()))
    return act.Clip(low, high)


def _gelu(node: onnx.NodeProto, constants) -> act.GELU:
    approximate = _attrs(node).get("approximate", b"none")
    approximate = approximate.decode() if isinstance(approximate, bytes) else approximate
    if approximate not in ("none", "tanh"):
        raise OnnxlipError(f"node '{node_label(node)}' (Gelu): approximate must be 'none' or 'tanh', "
                           f"got {approximate!r}")
    return act.GELU(approximate)


_STANDARD = {
    "Relu": lambda n, c: act.ReLU(),
    "LeakyRelu": lambda n, c: act.LeakyReLU(_attrs(n).get("alpha", 0.01)),
    "PRelu": lambda n, c: act.PRelu(_constant_input(n, 1, c, "slope", scalar=False)),
    "Clip": _clip,
    "Sigmoid": lambda n, c: act.Sigmoid(),
    "Tanh": lambda n, c: act.Tanh(),
    "Softplus": lambda n, c: act.Softplus(),
    "Elu": lambda n, c: act.ELU(_attrs(n).get("alpha", 1.0)),
    "Gelu": _gelu,
    "HardSigmoid": lambda n, c: act.HardSigmoid(_attrs(n).get("alpha", 0.2), _attrs(n).get("beta", 0.5)),
    "HardSwish": lambda n, c: act.HardSwish(),
}
_FUSED = {
    "Gelu": _gelu,
    "Silu": lambda n, c: act.SiLU(),
    "HardSwish": lambda n, c: act.HardSwish(),
}

#: Elementwise activation ops understood: standard ONNX ops, and ops of DOMAIN.
STANDARD_OPS = sorted(_STANDARD)
FUSED_OPS = sorted(_FUSED)
SUPPORTED = STANDARD_OPS + [f"{DOMAIN}.{op}" for op in FUSED_OPS]


def activation_of(node: onnx.NodeProto, constants: Mapping[str, np.ndarray]) -> act.Activation | None:
    """The activation a node computes, or None when it is not an elementwise activation.
    `constants` holds the constant tensors by name (PRelu's slope, Clip's bounds)."""
    if node.domain in ("", "ai.onnx"):
        make = _STANDARD.get(node.op_type)
    elif node.domain == DOMAIN:
        make = _FUSED.get(node.op_type)
        if make is None:
            raise OnnxlipError(f"node '{node_label(node)}': unknown fused op {DOMAIN}.{node.op_type}")
    else:
        return None
    return None if make is None else make(node, constants)
