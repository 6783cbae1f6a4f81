"""The registry of lowerings, keyed by ONNX op type."""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx

from ..errors import OnnxlipError
from ..layers import Affine, Layer

#: The most elements of any activation, bias or generated constant: larger
#: tensors stop with an error before anything of that size is allocated.
MAX_ELEMENTS = 1 << 28

LOWERINGS: dict[str, Callable[[NodeContext], list[Layer]]] = {}

#: Ops supported only as the last node(s): the graph drops them and bounds their input.
OUTPUT_ONLY = ("Softmax", "LogSoftmax")


def node_name(node: onnx.NodeProto) -> str:
    """The node's name, or its first output's name when it has none."""
    return node.name or next((o for o in node.output if o), "")


def op_key(node: onnx.NodeProto) -> str:
    """The registry key of a node: its op type, prefixed by its domain outside the
    standard one (the activations onnxlip fuses: 'onnxlip.fused.Silu')."""
    standard = node.domain in ("", "ai.onnx")
    return node.op_type if standard else f"{node.domain}.{node.op_type}"


def node_label(node: onnx.NodeProto) -> str:
    """How errors name a node: node 'name' (OpType)."""
    return f"node {node_name(node)!r} ({node.op_type})"


def supported_ops() -> str:
    """The ops onnxlip lowers, for error messages (from the registry)."""
    standard = sorted(op for op in LOWERINGS if "." not in op)  # not the fused private ops
    return (", ".join(standard) + "; GELU, SiLU, HardSwish as exporters spell them; "
            + "/".join(OUTPUT_ONLY) + " as the last node")


#: Lowerings that accept several computed tensors (Add, Concat, ...).
MERGING: set[Callable] = set()
#: Lowerings of ops with several data outputs (Split), called once per output.
MULTI_OUTPUT: set[Callable] = set()


def lowering(*op_types: str, merging: bool = False, outputs: bool = False):
    """Register a function as the lowering of these op types; `merging` ones may
    read several computed tensors (the others exactly one), `outputs` ones lower
    each output (NodeContext.output) of a node with several."""

    def register(func):
        for op in op_types:
            LOWERINGS[op] = func
        if merging:
            MERGING.add(func)
        if outputs:
            MULTI_OUTPUT.add(func)
        return func

    return register


@dataclass
class NodeContext:
    """What a lowering sees: the node, its (first) data input's shape, folded
    constants, and the shapes of all its data inputs in order."""

    node: onnx.NodeProto
    in_shape: tuple[int, ...]
    constants: dict[str, np.ndarray]
    opset: int
    path: str
    in_shapes: tuple[tuple[int, ...], ...] = ()
    #: Which output is lowered (Split has one lowering per output, other ops one).
    output: int = 0

    def __post_init__(self):
        self.in_shapes = tuple(self.in_shapes) or (self.in_shape,)

    @property
    def outputs(self) -> int:
        """How many of the node's outputs carry data onnxlip follows."""
        return len(self.node.output) if LOWERINGS.get(self.node.op_type) in MULTI_OUTPUT else 1

    @property
    def label(self) -> str:
        return node_label(self.node)

    @property
    def data_inputs(self) -> int:
        """How many of the node's inputs are computed tensors."""
        return len(self.in_shapes)

    def fail(self, problem: str) -> OnnxlipError:
        return OnnxlipError(f"{self.path}: {self.label}: {problem}")

    def attr(self, name: str, default=None):
        for a in self.node.attribute:
            if a.name == name:
                return onnx.helper.get_attribute_value(a)
        return default

    def str_attr(self, name: str, default: str) -> str:
        """A string attribute, decoded (undecodable bytes replaced)."""
        value = self.attr(name, default)
        return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)

    def float_attr(self, name: str, default: float) -> float:
        """A float attribute, which must be finite."""
        value = self.attr(name, default)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.fail(f"attribute {name}={value!r} is not a finite number")
        return float(value)

    def check_size(self, shape, what: str = "output") -> None:
        """Stop before allocating a tensor of `shape` that is empty or too large."""
        check_size(shape, f"{self.path}: {self.label}: {what}")

    def const(self, index: int) -> np.ndarray | None:
        """The constant value of input `index`, None if absent or not constant."""
        if index >= len(self.node.input) or not self.node.input[index]:
            return None
        value = self.constants.get(self.node.input[index])
        return None if value is None else np.asarray(value)

    def axes(self, index: int = 1) -> list[int] | None:
        """The `axes` attribute (older opsets) or constant input `index` (opset 13/18+);
        None when neither is given."""
        axes = self.attr("axes")
        if axes is None and index < len(self.node.input) and self.node.input[index]:
            value = self.require_const(index, "axes")
            if value.dtype.kind not in "iu":
                raise self.fail(f"axes have dtype {value.dtype}; expected integers")
            axes = value.ravel().tolist()
        return None if axes is None else [int(a) for a in axes]

    def check_axes(self, axes: list[int], rank: int) -> list[int]:
        """The axes as non-negative indices, refused when out of range or repeated."""
        if any(not -rank <= a < rank for a in axes):
            raise self.fail(f"axes {axes} are out of range for rank {rank}")
        normal = [a % rank for a in axes]
        if len(set(normal)) != len(normal):
            raise self.fail(f"axes {axes} repeat an axis")
        return normal

    def is_data(self, index: int) -> bool:
        name = self.node.input[index] if index < len(self.node.input) else ""
        return bool(name) and name not in self.constants

    def require_const(self, index: int, what: str) -> np.ndarray:
        """The constant input `index`: integers, or finite real numbers."""
        value = self.const(index)
        if value is None:
            raise self.fail(f"{what} (input {index}) must be a constant")
        if value.dtype.kind in "biu":
            return value
        if value.dtype.kind not in "fV":
            raise self.fail(f"{what} has dtype {value.dtype}; expected real numbers")
        if value.dtype.kind == "V":  # bfloat16 and other ml_dtypes floats
            try:
                value = value.astype(np.float64)
            except (TypeError, ValueError):
                raise self.fail(f"{what} has dtype {value.dtype}; expected real numbers") from None
        if not np.all(np.isfinite(value)):
            raise self.fail(f"{what} contains NaN or Inf")
        return value


def check_size(shape, where: str, allow_empty: bool = False) -> None:
    """Refuse a tensor shape that is empty or holds more than MAX_ELEMENTS."""
    shape = tuple(int(d) for d in shape)
    if any(d < 0 for d in shape) or (not allow_empty and 0 in shape):
        raise OnnxlipError(f"{where} shape {shape} is empty")
    size = math.prod(shape)
    if size > MAX_ELEMENTS:
        raise OnnxlipError(
            f"{where} shape {shape} has {size:,} elements, more than the {MAX_ELEMENTS:,} onnxlip "
            "handles (too large for memory)"
        )


def lower(ctx: NodeContext) -> list[Layer]:
    """Lower one node, or stop with an error that names it and what is supported.

    Unexpected exceptions inside a lowering become an OnnxlipError naming the
    node (set ONNXLIP_DEBUG=1 to let them through), and every layer produced
    is checked for a sane size and finite constants.
    """
    func = LOWERINGS.get(op_key(ctx.node))
    if ctx.node.domain not in ("", "ai.onnx") and func is None:
        raise ctx.fail(f"op {ctx.node.op_type} of domain {ctx.node.domain!r} is not supported "
                       "(only standard ONNX ops)")
    if ctx.node.op_type in OUTPUT_ONLY:
        raise ctx.fail(f"op {ctx.node.op_type} is supported only as the last node (onnxlip then "
                       "bounds its input, the logits), not inside the network")
    if func is None:
        raise ctx.fail(f"op {ctx.node.op_type} is not supported (supported: {supported_ops()})")
    for shape in ctx.in_shapes:
        ctx.check_size(shape, "input")
    if ctx.data_inputs > 1 and func not in MERGING:
        raise ctx.fail(f"combines {ctx.data_inputs} computed tensors, which is not affine "
                       f"(supported: {', '.join(sorted(op for op, f in LOWERINGS.items() if f in MERGING))})")
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            layers = func(ctx)
    except OnnxlipError:
        raise
    except MemoryError:
        raise ctx.fail("out of memory while lowering") from None
    except Exception as exc:
        if os.environ.get("ONNXLIP_DEBUG"):
            raise
        text = " ".join(str(exc).split())[:200]
        raise ctx.fail(f"cannot be lowered ({type(exc).__name__}: {text})") from None
    for layer in layers:
        _check_layer(ctx, layer)
    return layers


def _check_layer(ctx: NodeContext, layer: Layer) -> None:
    ctx.check_size(layer.out_shape)
    if isinstance(layer, Affine):
        if not np.all(np.isfinite(layer.bias)):
            raise ctx.fail("the bias it computes contains NaN or Inf (check its constants)")
        if not layer.map.coefficients_finite():
            raise ctx.fail("its linear map contains NaN or Inf (check its constants)")
