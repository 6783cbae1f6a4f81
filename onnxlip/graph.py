"""Load an ONNX model and reduce it to the DAG of nodes that compute on the data.

Loading runs the ONNX checker and shape inference; the graph is held as a
networkx DiGraph; constant subgraphs (initializers, Constant nodes and the
Shape -> Gather -> Concat -> Reshape chains exporters emit) are folded with
onnx's reference evaluator; no-op nodes are dropped; activations that exporters
spell as several nodes (GELU, SiLU, HardSwish) are fused into one node each
(onnxlip.patterns) before the DAG is built.
"""

from __future__ import annotations

import math
import operator
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import networkx as nx
import numpy as np
import onnx
from onnx import numpy_helper, shape_inference
from onnx.reference import ReferenceEvaluator

from .errors import OnnxlipError
from .lowering.registry import MAX_ELEMENTS, OUTPUT_ONLY, check_size, node_label
from .patterns import THRESHOLDED_SOFTPLUS, fuse_activations, may_fuse

NO_OPS = {"Identity", "Dropout"}

#: Input element types that are real numbers onnxlip can perturb.
INPUT_TYPES = {
    onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
    onnx.TensorProto.BFLOAT16,
}


@dataclass
class ModelGraph:
    """The model reduced to the nodes that compute on the data, in topological order
    (a DAG: a tensor may feed several nodes, a node may read several tensors)."""

    path: str
    model: onnx.ModelProto | None  # None once released (see `release`)
    input_name: str
    input_shape: tuple[int, ...]
    output_name: str
    nodes: list[onnx.NodeProto]
    constants: dict[str, np.ndarray] = field(default_factory=dict)
    opset: int = 0
    #: What the user should know about how the model was read (e.g. a dropped softmax).
    notes: list[str] = field(default_factory=list)


def release(graph: ModelGraph) -> None:
    """Drop the weights held twice once the blocks hold their own (VGG16: 1.1 GB)."""
    graph.model = None
    graph.constants = {}


def runnable_model(graph: ModelGraph) -> onnx.ModelProto:
    """The user's model with its input shape fixed, read again if it was released."""
    if graph.model is not None:
        return graph.model
    model = read_model(graph.path)
    _fix_input_shape(model, graph.input_name, graph.input_shape)
    _expose_output(model, graph.output_name)
    return model


def _expose_output(model: onnx.ModelProto, name: str) -> None:
    """Make the tensor `name` (the logits before a dropped softmax) a graph output."""
    if any(o.name == name for o in model.graph.output):
        return
    info = _value_info(model, name)
    if info is None:
        info = _value_info(shape_inference.infer_shapes(model), name)
    if info is None:
        raise OnnxlipError(f"tensor {name!r}: its type is unknown, it cannot be evaluated")
    model.graph.output.append(info)


def _value_info(model: onnx.ModelProto, name: str) -> onnx.ValueInfoProto | None:
    return next((v for v in list(model.graph.value_info) + list(model.graph.input)
                 if v.name == name), None)


def load_graph(
    path: str | os.PathLike,
    input_shape: tuple[int, ...] | None = None,
    input_name: str | None = None,
    output_name: str | None = None,
) -> ModelGraph:
    """Load, check and fold the model at `path` into a ModelGraph.

    Only the nodes the chosen output depends on are considered: other outputs
    and the branches that feed only them are ignored.
    """
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        model = read_model(path)
        name = _choose(_graph_inputs(model), input_name, "input", path)
        out = _choose([o.name for o in model.graph.output], output_name, "output", path)
        shape = _static_input_shape(model, name, input_shape, path)
        _fix_input_shape(model, name, shape)
        model = _infer_shapes(model, path)
        # multi-node activation idioms (GELU, SiLU, HardSwish) become one node each;
        # `model` itself stays runnable by onnxruntime
        fused = fuse_activations(model) if may_fuse(model) else model
        graph = _needed_by(_build_digraph(fused), out)
        constants = _fold_constants(fused, graph, path)
        nodes, out = _data_nodes(graph, constants, name, out, path)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    nodes, logits, notes = _drop_output_softmax(nodes, out, _known_shapes(model), opset, path)
    thresholded = [node_label(n) for n in nodes if n.doc_string == THRESHOLDED_SOFTPLUS]
    if thresholded:
        notes.append(f"{', '.join(thresholded)}: torch's thresholded softplus Where(x > t, x, "
                     "Softplus(x)) is bounded as Softplus(x); the two differ by at most "
                     "log(1 + exp(-t)) <= 2.1e-9, below float32 resolution where x > t >= 20.")
    if logits != out:
        _expose_output(model, logits)
    return ModelGraph(str(path), model, name, shape, logits, nodes, constants, opset, notes)


def _drop_output_softmax(nodes: list[onnx.NodeProto], out: str, shapes: dict, opset: int,
                         path) -> tuple[list[onnx.NodeProto], str, list[str]]:
    """Drop the Softmax / LogSoftmax nodes that end the chain: the bounds are then
    of their input, the logits, and a note says so. Each must normalize over
    every output (one distribution): then the top class is the logits' top class."""
    nodes, notes = list(nodes), []
    while nodes and nodes[-1].op_type in OUTPUT_ONLY and nodes[-1].domain in ("", "ai.onnx"):
        node = nodes.pop()
        logits = node.input[0]
        shape = shapes.get(logits)
        if shape is None:
            raise OnnxlipError(f"{path}: {node_label(node)}: the shape of its input {logits!r} "
                               "is unknown")
        rank = len(shape)
        axis = next((a.i for a in node.attribute if a.name == "axis"), -1 if opset >= 13 else 1)
        if not -rank <= axis < rank:
            raise OnnxlipError(f"{path}: {node_label(node)}: axis {axis} is out of range for "
                               f"shape {shape}")
        axis %= rank
        group = shape[axis:axis + 1] if opset >= 13 else shape[axis:]
        if math.prod(shape) != math.prod(group):
            raise OnnxlipError(
                f"{path}: {node_label(node)} at the output normalizes axis {axis} of shape "
                f"{shape} separately for each of the other positions; only a softmax over all "
                "the outputs is dropped (its top class is the logits' top class)")
        extra = (" Softmax is 1-Lipschitz in L2, so the upper bounds also hold for the "
                 "probabilities." if node.op_type == "Softmax" else "")
        notes.insert(0, f"the output {out!r} is {node_label(node)} of {logits!r}: onnxlip bounds "
                        f"the logits {logits!r}, whose top class is the same." + extra)
        out = logits
    return nodes, out, notes


def read_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Read the protobuf and its external data safely, and run the checker."""
    path = Path(path)
    if path.is_dir():
        raise OnnxlipError(f"{path}: is a directory, not an ONNX file")
    if not path.is_file():
        raise OnnxlipError(f"{path}: no such file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises several unrelated types
        raise OnnxlipError(f"{path}: not a readable ONNX model ({_first_line(exc)})") from None
    if not model.graph.node:
        raise OnnxlipError(f"{path}: not an ONNX model (the graph has no nodes)")
    if not model.graph.output:
        raise OnnxlipError(f"{path}: the graph has no outputs")
    _load_external_data(model, path)
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise OnnxlipError(f"{path}: fails the ONNX checker: {_first_line(exc)}") from None
    return model


def _load_external_data(model: onnx.ModelProto, path: Path) -> None:
    """Load external tensors, refusing locations outside the model's folder."""
    base = path.resolve().parent
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        if not onnx.external_data_helper.uses_external_data(tensor):
            continue
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        if not isinstance(location, str):  # protobuf hands back bytes that are not UTF-8
            raise OnnxlipError(
                f"{path}: tensor {tensor.name!r} has an undecodable external data location; refused"
            )
        try:
            target = (base / location).resolve()
        except (OSError, ValueError, RuntimeError, TypeError):
            target = base
        if not location or os.path.isabs(location) or base not in target.parents:
            raise OnnxlipError(
                f"{path}: tensor {tensor.name!r} points outside the model's folder "
                f"({location!r}); refused"
            )
        if not target.is_file():
            raise OnnxlipError(
                f"{path}: external data file {location!r} of tensor {tensor.name!r} is missing"
            )
    try:
        onnx.external_data_helper.load_external_data_for_model(model, str(base))
    except Exception as exc:
        raise OnnxlipError(f"{path}: cannot read external data ({_first_line(exc)})") from None


def _graph_inputs(model: onnx.ModelProto) -> list[str]:
    inits = {t.name for t in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits]


def _choose(names: list[str], wanted: str | None, what: str, path) -> str:
    if wanted is not None:
        if wanted not in names:
            raise OnnxlipError(f"{path}: no graph {what} named {wanted!r} (it has {names})")
        return wanted
    if len(names) != 1:
        raise OnnxlipError(
            f"{path}: the model has {len(names)} {what}s {names}; choose one with --{what}-name"
        )
    return names[0]


def _static_input_shape(model, name: str, override, path) -> tuple[int, ...]:
    """The input's shape with a batch of 1; symbolic dims need `override`."""
    value = next(i for i in model.graph.input if i.name == name)
    _check_input_type(value, path)
    shape = _input_dims(value, name, override, path)
    check_size(shape, f"{path}: input {name!r}")
    return shape


def _check_input_type(value: onnx.ValueInfoProto, path) -> None:
    if not value.type.HasField("tensor_type"):
        raise OnnxlipError(f"{path}: input {value.name!r} is not a tensor")
    elem = value.type.tensor_type.elem_type
    if elem not in INPUT_TYPES:
        kind = onnx.TensorProto.DataType.Name(elem) if elem in onnx.TensorProto.DataType.values() else elem
        raise OnnxlipError(
            f"{path}: input {value.name!r} has element type {kind}; onnxlip bounds float inputs"
        )


def _input_dims(value: onnx.ValueInfoProto, name: str, override, path) -> tuple[int, ...]:
    dims = value.type.tensor_type.shape.dim
    if override is not None:
        try:
            shape = tuple(operator.index(d) if not isinstance(d, str) else int(d) for d in override)
        except (TypeError, ValueError):
            raise OnnxlipError(f"--input-shape {override!r} is not a list of integers") from None
        if not shape:
            raise OnnxlipError("--input-shape: give at least one dimension")
        if any(d <= 0 for d in shape):
            raise OnnxlipError(f"--input-shape {shape}: every dimension must be positive")
        if len(dims) and len(shape) != len(dims):
            raise OnnxlipError(
                f"{path}: --input-shape {shape} has rank {len(shape)}, input {name!r} has rank {len(dims)}"
            )
        for i, d in enumerate(dims):
            if d.HasField("dim_value") and d.dim_value != shape[i]:
                raise OnnxlipError(
                    f"{path}: --input-shape {shape} disagrees with input {name!r} in dim {i} "
                    f"({d.dim_value})"
                )
        if shape[0] != 1 and len(shape) > 1:
            raise OnnxlipError(f"--input-shape {shape}: the batch dimension must be 1")
        return shape
    shape = []
    for i, d in enumerate(dims):
        if d.HasField("dim_value") and d.dim_value > 0:
            shape.append(d.dim_value)
        elif i == 0 and len(dims) > 1:
            shape.append(1)
        else:
            raise OnnxlipError(
                f"{path}: input {name!r} has symbolic dimension {i} ({d.dim_param or '?'}); "
                "give the shape with --input-shape"
            )
    if not shape:
        raise OnnxlipError(f"{path}: input {name!r} has no declared shape; use --input-shape")
    if shape[0] != 1 and len(shape) > 1:  # a vector (rank 1) has no batch axis
        raise OnnxlipError(f"{path}: input {name!r} has batch {shape[0]}; only batch 1 is bounded")
    return tuple(shape)


def _fix_input_shape(model: onnx.ModelProto, name: str, shape: tuple[int, ...]) -> None:
    value = next(i for i in model.graph.input if i.name == name)
    tshape = value.type.tensor_type.shape
    del tshape.dim[:]
    for d in shape:
        tshape.dim.add().dim_value = d


def _infer_shapes(model: onnx.ModelProto, path) -> onnx.ModelProto:
    for node in model.graph.node:  # onnx 1.23's Split inference aborts the process on these
        parts = next((a.i for a in node.attribute if a.name == "num_outputs"), None)
        if node.op_type == "Split" and parts is not None and parts != len(node.output):
            raise OnnxlipError(f"{path}: {node_label(node)}: num_outputs={parts} but it has "
                               f"{len(node.output)} outputs")
    try:
        return shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    except Exception as exc:
        raise OnnxlipError(f"{path}: shape inference failed: {_first_line(exc)}") from None


def _build_digraph(model: onnx.ModelProto) -> nx.DiGraph:
    """Nodes are ONNX nodes (by index); edges are the tensors between them."""
    graph = nx.DiGraph()
    producer: dict[str, int] = {}
    for i, node in enumerate(model.graph.node):
        graph.add_node(i, node=node)
        for out in node.output:
            producer[out] = i
    for i, node in enumerate(model.graph.node):
        for name in node.input:
            if name in producer:
                graph.add_edge(producer[name], i, tensor=name)
    return graph


def _needed_by(graph: nx.DiGraph, output: str) -> nx.DiGraph:
    """The subgraph of the nodes the output depends on."""
    producer = next((i for i in graph.nodes if output in graph.nodes[i]["node"].output), None)
    if producer is None:
        return graph.subgraph([]).copy()
    return graph.subgraph(nx.ancestors(graph, producer) | {producer}).copy()


def _fold_constants(model: onnx.ModelProto, graph: nx.DiGraph, path) -> dict[str, np.ndarray]:
    """Evaluate every node whose inputs are all known before the data arrives."""
    consts = {}
    for t in model.graph.initializer:
        try:
            consts[t.name] = numpy_helper.to_array(t)
        except Exception as exc:
            raise OnnxlipError(f"{path}: initializer {t.name!r} is unreadable ({_first_line(exc)})") from None
    shapes = _known_shapes(model)
    for i in nx.topological_sort(graph):
        node = graph.nodes[i]["node"]
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise OnnxlipError(
                f"{path}: {node_label(node)}: control flow (subgraphs) is not supported"
            )
        if node.op_type == "Shape" and node.input[0] not in consts and node.input[0] in shapes:
            consts[node.output[0]] = _shape_of(node, shapes[node.input[0]])
        elif node.op_type == "Constant" or (
            node.input and all(n == "" or n in consts for n in node.input)
        ):
            _check_folded_size(node, consts, shapes, path)
            consts.update(_evaluate(node, consts, model, path))
    return consts


def _check_folded_size(node: onnx.NodeProto, consts: dict, shapes: dict, path) -> None:
    """Refuse, before evaluating it, a constant node whose output would be too large."""
    where = f"{path}: constant {node_label(node)}: output"
    for out in node.output:
        if out in shapes:
            check_size(shapes[out], where, allow_empty=True)
    try:
        size = _generated_size(node, [consts.get(n) for n in node.input])
    except (TypeError, ValueError, OverflowError, ZeroDivisionError):
        return  # the evaluator reports malformed inputs itself
    if size is not None and size > MAX_ELEMENTS:
        raise OnnxlipError(f"{where} would have {size:,} elements, more than the {MAX_ELEMENTS:,} "
                           "onnxlip handles (too large for memory)")


def _generated_size(node: onnx.NodeProto, inputs: list) -> int | None:
    """The output size of the ops that can make large tensors from small inputs."""
    op = node.op_type
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    dims = [np.asarray(v).ravel() if v is not None else None for v in inputs]
    if op == "ConstantOfShape":
        return math.prod(int(d) for d in dims[0]) if inputs and dims[0] is not None else 1
    if op == "Expand":
        return math.prod(np.broadcast_shapes(np.shape(inputs[0]), tuple(int(d) for d in dims[1])))
    if op == "Tile":
        return math.prod(int(a) * int(b) for a, b in zip(np.shape(inputs[0]), dims[1]))
    if op == "Range":
        start, limit, delta = (float(d[0]) for d in dims[:3])
        return max(math.ceil((limit - start) / delta), 0)
    if op == "Pad":
        shape = np.shape(inputs[0])
        pads = [int(p) for p in (attrs["pads"] if "pads" in attrs else dims[1])]
        if len(pads) != 2 * len(shape):
            return None
        return math.prod(max(d + pads[i] + pads[len(shape) + i], 0) for i, d in enumerate(shape))
    if op in ("Resize", "Upsample"):
        return _resize_size(np.shape(inputs[0]), dims)
    if op == "OneHot":
        return int(np.size(inputs[0])) * int(dims[1][0])
    if op in ("RandomNormal", "RandomUniform"):
        return math.prod(int(d) for d in attrs.get("shape", []))
    return None


def _resize_size(shape: tuple[int, ...], dims: list) -> int | None:
    sizes = dims[3] if len(dims) > 3 and dims[3] is not None and dims[3].size else None
    if sizes is not None:
        return math.prod(int(d) for d in sizes)
    scales = next((d for d in dims[1:3] if d is not None and d.size == len(shape)), None)
    if scales is None:
        return None
    return math.prod(int(math.floor(s * float(k))) for s, k in zip(shape, scales))


def _known_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for v in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        dims = v.type.tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims) and v.type.tensor_type.HasField("shape"):
            shapes[v.name] = tuple(d.dim_value for d in dims)
    return shapes


def _shape_of(node: onnx.NodeProto, shape: tuple[int, ...]) -> np.ndarray:
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    start, end = attrs.get("start", 0), attrs.get("end", len(shape))
    return np.array(shape[start:end], dtype=np.int64)


def _evaluate(node: onnx.NodeProto, consts: dict, model: onnx.ModelProto, path) -> dict:
    """Run one constant node through onnx's reference evaluator."""
    opsets = {o.domain or "": o.version for o in model.opset_import}
    inputs = [onnx.helper.make_tensor_value_info(n, 1, None) for n in node.input if n]
    outputs = [onnx.helper.make_tensor_value_info(n, 1, None) for n in node.output if n]
    graph = onnx.helper.make_graph([node], "fold", inputs, outputs)
    sub = onnx.helper.make_model(
        graph, opset_imports=[onnx.helper.make_opsetid(d, v) for d, v in opsets.items()]
    )
    feeds = {n: consts[n] for n in node.input if n}
    try:
        values = ReferenceEvaluator(sub).run(None, feeds)
    except Exception as exc:
        raise OnnxlipError(
            f"{path}: cannot fold constant {node_label(node)}: {_first_line(exc)}"
        ) from None
    return {n: np.asarray(v) for n, v in zip([o for o in node.output if o], values)}


def _data_nodes(graph: nx.DiGraph, consts: dict, input_name: str, output_name: str,
                path) -> tuple[list[onnx.NodeProto], str]:
    """The nodes that compute on the data, in a topological order (the file's
    order where it is one), with no-ops removed and their outputs renamed to
    their inputs; and the (renamed) output tensor.

    Every data tensor a node reads must be the input or computed from it.
    """
    try:
        order = list(nx.lexicographical_topological_sort(graph))
    except nx.NetworkXUnfeasible:
        raise OnnxlipError(f"{path}: the graph has a cycle") from None
    computed, alias, nodes = {input_name}, {}, []
    for i in order:
        node = graph.nodes[i]["node"]
        if all(o in consts for o in node.output if o):
            continue
        data = [alias.get(n, n) for n in node.input if n and n not in consts]
        strays = [n for n in data if n not in computed]
        if strays:
            raise OnnxlipError(
                f"{path}: {node_label(node)} reads tensor {strays[0]!r}, which is neither the input "
                f"{input_name!r} nor computed from it (a second graph input?)"
            )
        if not data:
            continue
        if _is_no_op(node):
            alias[node.output[0]] = data[0]
            continue
        node = _renamed(node, alias)
        computed.update(o for o in node.output if o)
        nodes.append(node)
    output = alias.get(output_name, output_name)
    if output not in computed:
        raise OnnxlipError(f"{path}: output {output_name!r} does not depend on input {input_name!r}")
    return nodes, output


def _renamed(node: onnx.NodeProto, alias: dict[str, str]) -> onnx.NodeProto:
    if not any(n in alias for n in node.input):
        return node
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    for k, name in enumerate(copy.input):
        copy.input[k] = alias.get(name, name)
    return copy


def _is_no_op(node: onnx.NodeProto) -> bool:
    if node.domain not in ("", "ai.onnx"):
        return False
    if node.op_type in NO_OPS:
        return len([o for o in node.output if o]) == 1 or node.op_type == "Dropout"
    if node.op_type == "Cast":
        to = next((a.i for a in node.attribute if a.name == "to"), None)
        return to in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE)
    return False


def _first_line(exc: BaseException) -> str:
    """The exception's message on one line (whitespace collapsed, at most 300 characters)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."
