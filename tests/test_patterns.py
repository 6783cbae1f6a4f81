"""Fusion of multi-node activation idioms (onnxlip.patterns): the exporters' spellings are
found and replaced by one node whose activation reproduces onnxruntime on the original;
near misses (other constants, shared intermediates) are left alone."""

from __future__ import annotations

import io
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxlip import activations as A
from onnxlip.errors import OnnxlipError
from onnxlip.patterns import DOMAIN, THRESHOLDED_SOFTPLUS, activation_of, fuse_activations

WIDTH = 5
KAPPA = 0.044715
BETA = math.sqrt(2 / math.pi)


class Builder:
    """A graph over input 'inp' (N, WIDTH), constants as initializers or Constant nodes."""

    def __init__(self, constants: str = "initializer"):
        self.mode, self.nodes, self.inits, self.count = constants, [], [], 0

    def _name(self, stem: str) -> str:
        self.count += 1
        return f"{stem}{self.count}"

    def const(self, value) -> str:
        name = self._name("c")
        tensor = numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)
        if self.mode == "initializer":
            self.inits.append(tensor)
        else:
            self.nodes.append(helper.make_node("Constant", [], [name], value=tensor))
        return name

    def op(self, op_type: str, *inputs: str, **attrs) -> str:
        out = self._name(op_type.lower())
        name = f"/{op_type}_{self.count}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=name, **attrs))
        return out

    def model(self, outputs: list[str], opset: int = 17) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, "g", [helper.make_tensor_value_info("inp", TensorProto.FLOAT, ["N", WIDTH])],
            [helper.make_tensor_value_info(o, TensorProto.FLOAT, ["N", WIDTH]) for o in outputs], self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        model.ir_version = helper.find_min_ir_version_for(model.opset_import)
        return model


def gelu_torchscript(b: Builder, x: str) -> str:
    """torch.onnx (TorchScript) opset 9-19: ((x · (Erf(x / √2) + 1)) · 0.5."""
    e = b.op("Erf", b.op("Div", x, b.const(1.4142135623730951)))
    return b.op("Mul", b.op("Mul", x, b.op("Add", e, b.const(1.0))), b.const(0.5))


def gelu_onnxscript(b: Builder, x: str) -> str:
    """onnxscript (dynamo) aten_gelu: x · (0.5 · (Erf(x / √2) + 1))."""
    e = b.op("Erf", b.op("Div", x, b.const(1.4142135623730951)))
    return b.op("Mul", x, b.op("Mul", b.const(0.5), b.op("Add", e, b.const(1.0))))


def gelu_halfx(b: Builder, x: str) -> str:
    """(0.5 · x) · (1 + Erf(x · 0.70710678)) (hand-written nets)."""
    e = b.op("Erf", b.op("Mul", x, b.const(0.7071067811865476)))
    return b.op("Mul", b.op("Mul", x, b.const(0.5)), b.op("Add", b.const(1.0), e))


def gelu_tanh_torchscript(b: Builder, x: str) -> str:
    """torch.onnx (TorchScript) gelu(approximate='tanh'): x·x·x by Mul."""
    cube = b.op("Mul", x, b.op("Mul", x, x))
    inner = b.op("Mul", b.const(BETA), b.op("Add", x, b.op("Mul", b.const(KAPPA), cube)))
    return b.op("Mul", b.const(0.5), b.op("Mul", x, b.op("Add", b.const(1.0), b.op("Tanh", inner))))


def gelu_tanh_onnxscript(b: Builder, x: str) -> str:
    """onnxscript aten_gelu(approximate='tanh'): Pow, and √(2/π) as Sqrt(CastLike(Div(2, π)))."""
    inner = b.op("Add", x, b.op("Mul", b.const(KAPPA), b.op("Pow", x, b.const(3.0))))
    root = b.op("Sqrt", b.op("CastLike", b.op("Div", b.const(2.0), b.const(math.pi)), x))
    t = b.op("Tanh", b.op("Mul", root, inner))
    return b.op("Mul", x, b.op("Mul", b.const(0.5), b.op("Add", t, b.const(1.0))))


def gelu_tanh_factored(b: Builder, x: str) -> str:
    """HF FastGELU: 0.5·x·(1 + tanh(x·0.7978845608·(1 + 0.044715·x·x)))."""
    poly = b.op("Add", b.const(1.0), b.op("Mul", b.op("Mul", b.const(KAPPA), x), x))
    t = b.op("Tanh", b.op("Mul", b.op("Mul", x, b.const(0.7978845608)), poly))
    return b.op("Mul", b.op("Mul", b.const(0.5), x), b.op("Add", b.const(1.0), t))


def silu(b: Builder, x: str) -> str:
    return b.op("Mul", x, b.op("Sigmoid", x))


def silu_swapped(b: Builder, x: str) -> str:
    return b.op("Mul", b.op("Sigmoid", x), x)


def hardswish_hardsigmoid(b: Builder, x: str) -> str:
    """torch.onnx opset < 14: x · HardSigmoid(x; 1/6, 1/2)."""
    return b.op("Mul", x, b.op("HardSigmoid", x, alpha=1 / 6, beta=0.5))


def hardswish_relu6(b: Builder, x: str) -> str:
    """Keras / TF: x · Relu6(x + 3) / 6."""
    clipped = b.op("Clip", b.op("Add", x, b.const(3.0)), b.const(0.0), b.const(6.0))
    return b.op("Div", b.op("Mul", x, clipped), b.const(6.0))


FORMS = [
    (gelu_torchscript, "Gelu", A.GELU("none")),
    (gelu_onnxscript, "Gelu", A.GELU("none")),
    (gelu_halfx, "Gelu", A.GELU("none")),
    (gelu_tanh_torchscript, "Gelu", A.GELU("tanh")),
    (gelu_tanh_onnxscript, "Gelu", A.GELU("tanh")),
    (gelu_tanh_factored, "Gelu", A.GELU("tanh")),
    (silu, "Silu", A.SiLU()),
    (silu_swapped, "Silu", A.SiLU()),
    (hardswish_hardsigmoid, "HardSwish", A.HardSwish()),
    (hardswish_relu6, "HardSwish", A.HardSwish()),
]


def _run(model: onnx.ModelProto, inp: np.ndarray, names: list[str]) -> list[np.ndarray]:
    """Run the model, reading the named tensors (intermediate ones added as outputs)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    have = {o.name for o in model.graph.output}
    model.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
                              for n in names if n not in have)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(names, {session.get_inputs()[0].name: inp})


def _prefixed(form, constants: str = "initializer"):
    """inp -> x = inp + bias -> form(x): the activation's argument is an inner tensor."""
    b = Builder(constants)
    x = b.op("Add", "inp", b.const(np.linspace(-0.5, 0.5, WIDTH)))
    return b, x, form(b, x)


def _fused_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.domain == DOMAIN]


def _inputs(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    inp = rng.uniform(-8, 8, (400, WIDTH))
    inp[:5] = [-3.0, 3.0, -1.4142135, 0.0, -0.75]  # kinks, inflection points, minima
    return inp.astype(np.float32)


@pytest.mark.parametrize("constants", ["initializer", "constant"])
@pytest.mark.parametrize(("form", "op", "expected"), FORMS, ids=[f[0].__name__ for f in FORMS])
def test_exporter_forms_fuse_and_match_onnxruntime(form, op, expected, constants):
    b, x, y = _prefixed(form, constants)
    model = b.model([y])
    onnx.checker.check_model(model)
    before = model.SerializeToString()
    fused = fuse_activations(model)
    assert model.SerializeToString() == before  # the input model is left as it was
    nodes = _fused_nodes(fused)
    assert [(n.op_type, list(n.input), list(n.output)) for n in nodes] == [(op, [x], [y])]
    # every idiom node and constant is gone: what is left is the prefix (and its bias)
    assert [n.op_type for n in fused.graph.node if n.op_type != "Constant"] == ["Add", op]
    bias = next(n.input[1] for n in fused.graph.node if n.op_type == "Add")
    assert {t.name for t in fused.graph.initializer} | {n.output[0] for n in fused.graph.node
                                                      if n.op_type == "Constant"} == {bias}
    onnx.checker.check_model(fused)
    activation = activation_of(nodes[0], {})
    assert repr(activation) == repr(expected)
    x_ort, y_ort = _run(model, _inputs(), [x, y])
    np.testing.assert_allclose(activation.value(x_ort.astype(np.float64)), y_ort, rtol=2e-6, atol=2e-6)


def test_chain_of_idioms_fuses_each_in_order():
    b = Builder()
    x = b.op("Add", "inp", b.const(np.zeros(WIDTH)))
    g = gelu_torchscript(b, x)
    z = b.op("Add", g, b.const(np.full(WIDTH, 0.25)))
    s = silu(b, z)
    h = hardswish_relu6(b, b.op("Mul", s, b.const(np.full(WIDTH, 2.0))))
    model = b.model([h])
    fused = fuse_activations(model)
    assert [n.op_type for n in fused.graph.node] == ["Add", "Gelu", "Add", "Silu", "Mul", "HardSwish"]
    onnx.checker.check_model(fused)
    inp = _inputs(1)
    (expected,) = _run(model, inp, [h])
    value = inp.astype(np.float64)
    for node in fused.graph.node:
        if node.domain == DOMAIN:
            value = activation_of(node, {}).value(value)
        elif node.op_type == "Add":
            bias = next(t for t in fused.graph.initializer if t.name == node.input[1])
            value = value + numpy_helper.to_array(bias)
        else:
            value = value * 2.0
    np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-5)


def test_shape_inference_carries_on_past_fused_nodes():
    b = Builder()
    x = b.op("Add", "inp", b.const(np.zeros(WIDTH)))
    g = gelu_torchscript(b, x)
    r = b.op("Tanh", b.op("Relu", g))
    model = b.model([r])
    onnx.checker.check_model(model, full_check=True)
    del model.graph.output[0].type.tensor_type.shape.dim[:]
    fused = onnx.shape_inference.infer_shapes(fuse_activations(model))
    shapes = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in [*fused.graph.value_info, *fused.graph.output]}
    assert shapes[g] == ["N", WIDTH]
    relu = next(n.output[0] for n in fused.graph.node if n.op_type == "Relu")
    assert shapes[relu] == ["N", WIDTH]


def _near_misses():
    """Models that look like an idiom but are not one (or share an intermediate)."""
    cases = {}
    b, x, y = _prefixed(gelu_torchscript)
    erf = next(n.output[0] for n in b.nodes if n.op_type == "Erf")
    cases["erf output is a graph output"] = b.model([y, erf])
    b, x, y = _prefixed(gelu_torchscript)
    add = next(n.output[0] for n in b.nodes if n.op_type == "Add" and n.input[0].startswith("erf"))
    other = b.op("Relu", add)
    cases["1 + erf feeds another node"] = b.model([y, other])
    for case, root2, half in (("x / 1.5 in Erf", 1.5, 0.5), ("0.49 instead of 0.5", math.sqrt(2), 0.49)):
        b = Builder()
        x = b.op("Add", "inp", b.const(np.zeros(WIDTH)))
        e = b.op("Erf", b.op("Div", x, b.const(root2)))
        cases[case] = b.model([b.op("Mul", b.op("Mul", x, b.op("Add", e, b.const(1.0))), b.const(half))])
    b = Builder()
    x = b.op("Add", "inp", b.const(np.zeros(WIDTH)))
    quick = b.op("Mul", x, b.op("Sigmoid", b.op("Mul", x, b.const(1.702))))
    cases["QuickGELU x·sigmoid(1.702x)"] = b.model([quick])
    b = Builder()
    x = b.op("Add", "inp", b.const(np.zeros(WIDTH)))
    z = b.op("Add", "inp", b.const(np.ones(WIDTH)))
    cases["x·sigmoid(z)"] = b.model([b.op("Mul", x, b.op("Sigmoid", z))])
    b = Builder()
    x = b.op("Add", "inp", b.const(np.zeros(WIDTH)))
    sig = b.op("Sigmoid", x)
    cases["sigmoid(x) used twice"] = b.model([b.op("Mul", x, sig), b.op("Relu", sig)])
    b = Builder()
    x = b.op("Add", "inp", b.const(np.zeros(WIDTH)))
    sig = b.op("Sigmoid", x)
    y = b.op("Mul", x, sig)
    body = helper.make_graph([helper.make_node("Identity", [sig], ["out"])], "body", [],
                             [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", WIDTH])])
    b.inits.append(numpy_helper.from_array(np.array(True), "cond"))
    b.nodes.append(helper.make_node("If", ["cond"], ["branch"], then_branch=body, else_branch=body))
    cases["sigmoid(x) read in a subgraph"] = b.model([y, "branch"])
    b = Builder()
    x = b.op("Add", "inp", b.const(np.zeros(WIDTH)))
    cases["HardSigmoid alpha 0.2"] = b.model([b.op("Mul", x, b.op("HardSigmoid", x))])
    b = Builder()
    x = b.op("Add", "inp", b.const(np.zeros(WIDTH)))
    cases["sigmoid(x) times a vector"] = b.model([b.op("Mul", b.op("Sigmoid", x), b.const(np.ones(WIDTH)))])
    return cases


@pytest.mark.parametrize("case", list(_near_misses()))
def test_near_misses_are_not_fused(case):
    model = _near_misses()[case]
    onnx.checker.check_model(model)
    fused = fuse_activations(model)
    assert not _fused_nodes(fused)
    assert [n.op_type for n in fused.graph.node] == [n.op_type for n in model.graph.node]


def test_idiom_inside_a_bigger_expression():
    """x·(x·sigmoid(x)) is a SiLU times x; a SiLU whose output feeds two nodes is fused
    (the shared tensor is the match's output, not an intermediate)."""
    b = Builder()
    x = b.op("Add", "inp", b.const(np.zeros(WIDTH)))
    y = b.op("Mul", x, silu(b, x))
    model = b.model([b.op("Relu", y), b.op("Tanh", y)])
    fused = fuse_activations(model)
    assert [n.op_type for n in fused.graph.node] == ["Add", "Silu", "Mul", "Relu", "Tanh"]
    inp = _inputs(3)
    x_ort, y_ort = _run(model, inp, [x, y])
    # onnxruntime's float32 Sigmoid is off by up to 1.7e-7 absolute, times |x| <= 8.5 here
    np.testing.assert_allclose(x_ort * A.SiLU().value(x_ort.astype(np.float64)), y_ort, rtol=2e-6, atol=2e-5)


# --------------------------------------------------------------- activation_of

def _node(op: str, inputs=("x",), domain: str = "", **attrs) -> onnx.NodeProto:
    return helper.make_node(op, list(inputs), ["y"], domain=domain, **attrs)


def test_activation_of_standard_ops():
    consts = {"lo": np.array(0.0), "hi": np.array(6.0), "slope": np.array([[0.1], [0.2]]), "v": np.ones(3)}
    cases = [
        (_node("Relu"), "ReLU()"),
        (_node("LeakyRelu", alpha=-0.25), "LeakyReLU(alpha=-0.25)"),
        (_node("LeakyRelu"), "LeakyReLU(alpha=0.01)"),
        (_node("Clip", ("x", "lo", "hi")), "Clip(min=0.0, max=6.0)"),
        (_node("Clip", ("x", "", "hi")), "Clip(min=None, max=6.0)"),
        (_node("Clip", min=-1.0, max=1.0), "Clip(min=-1.0, max=1.0)"),
        (_node("Sigmoid"), "Sigmoid()"),
        (_node("Tanh"), "Tanh()"),
        (_node("Softplus"), "Softplus()"),
        (_node("Elu", alpha=0.5), "ELU(alpha=0.5)"),
        (_node("Gelu"), "GELU(approximate='none')"),
        (_node("Gelu", approximate="tanh"), "GELU(approximate='tanh')"),
        (_node("HardSigmoid", alpha=0.25, beta=0.5), "HardSigmoid(alpha=0.25, beta=0.5)"),
        (_node("HardSwish"), "HardSwish()"),
        (_node("Silu", domain=DOMAIN), "SiLU()"),
        (_node("Gelu", domain=DOMAIN, approximate="tanh"), "GELU(approximate='tanh')"),
    ]
    for node, text in cases:
        assert repr(activation_of(node, consts)) == text
    prelu = activation_of(_node("PRelu", ("x", "slope")), consts)
    assert isinstance(prelu, A.PRelu) and prelu.slope.shape == (2, 1)
    assert activation_of(_node("Conv", ("x", "w")), consts) is None
    assert activation_of(_node("Relu", domain="com.microsoft"), consts) is None


def test_activation_of_refuses_what_it_cannot_bound():
    with pytest.raises(OnnxlipError, match=r"'y' \(PRelu\).*slope 's' must be a constant"):
        activation_of(_node("PRelu", ("x", "s")), {})
    with pytest.raises(OnnxlipError, match="Clip.*max must be a scalar"):
        activation_of(_node("Clip", ("x", "", "v")), {"v": np.ones(3)})
    with pytest.raises(OnnxlipError, match="approximate"):
        activation_of(_node("Gelu", approximate="fast"), {})
    with pytest.raises(OnnxlipError, match="unknown fused op"):
        activation_of(_node("Mish", domain=DOMAIN), {})


# --------------------------------------------------------------- torch's own exports

@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")  # torch's exporters
@pytest.mark.parametrize(("dynamo", "opset"), [(False, 17), (True, 18)])
def test_torch_exports_are_recognized(dynamo, opset):
    """nn.GELU (both forms), nn.SiLU and nn.Hardswish of one Linear's output, exported by
    torch, end as one activation node each (fused, or the standard op) whose activation
    reproduces onnxruntime."""
    torch = pytest.importorskip("torch", reason="torch is not installed in this environment")
    modules = [torch.nn.GELU(), torch.nn.GELU(approximate="tanh"), torch.nn.SiLU(), torch.nn.Hardswish()]
    expected = ["GELU(approximate='none')", "GELU(approximate='tanh')", "SiLU()", "HardSwish()"]

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(WIDTH, WIDTH)

        def forward(self, inp):
            x = self.linear(inp)
            return tuple(module(x) for module in modules)

    torch.manual_seed(0)
    net, args = Net().eval(), (torch.zeros(2, WIDTH),)
    if dynamo:
        model = torch.onnx.export(net, args, dynamo=True, opset_version=opset,
                                  dynamic_shapes=({0: torch.export.Dim("N")},), verbose=False).model_proto
    else:
        buffer = io.BytesIO()
        torch.onnx.export(net, args, buffer, dynamo=False, opset_version=opset, input_names=["inp"],
                          dynamic_axes={"inp": {0: "N"}})
        model = onnx.load_from_string(buffer.getvalue())
    fused = fuse_activations(model)
    ops = [n for n in fused.graph.node if n.op_type != "Constant"]
    assert sorted(n.op_type for n in ops) == ["Gelu", "Gelu", "Gemm", "HardSwish", "Silu"], \
        [n.op_type for n in model.graph.node]
    producer = {n.output[0]: n for n in ops}
    outputs = [o.name for o in model.graph.output]
    x_name = next(n.output[0] for n in ops if n.op_type == "Gemm")
    x, *values = _run(model, _inputs(2), [x_name, *outputs])
    for name, value, text in zip(outputs, values, expected):
        node = producer[name]
        assert list(node.input) == [x_name]
        activation = activation_of(node, {})
        assert repr(activation) == text
        np.testing.assert_allclose(activation.value(x.astype(np.float64)), value, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize(("threshold", "compare", "fused"), [
    (20.0, "Greater", True), (30.0, "Less", True), (5.0, "Greater", False), (20.0, "GreaterOrEqual", False)])
def test_thresholded_softplus(threshold, compare, fused):
    """torch's dynamo softplus, Where(x > t, x, Softplus(x)), is a standard Softplus for t ≥ 20
    (with a doc_string the loader reports); a lower threshold or another test is left alone."""
    b = Builder()
    x = b.op("Add", "inp", b.const(np.zeros(WIDTH)))
    soft = b.op("Softplus", x)
    t = b.const(np.float32(threshold))
    test = b.op(compare, t, x) if compare == "Less" else b.op(compare, x, t)
    y = b.op("Where", test, x, soft)
    result = fuse_activations(b.model([y]))
    ops = [n.op_type for n in result.graph.node]
    if not fused:
        assert "Where" in ops
        return
    assert ops == ["Add", "Softplus"]
    node = result.graph.node[1]
    assert (list(node.input), list(node.output), node.domain) == ([x], [y], "")
    assert node.doc_string == THRESHOLDED_SOFTPLUS
    assert repr(activation_of(node, {})) == "Softplus()"
    onnx.checker.check_model(result)
