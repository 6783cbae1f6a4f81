"""The registry of lowerings, keyed by ONNX op type."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx

from ..errors import OnnxlipError
from ..layers import Layer

LOWERINGS: dict[str, Callable[[NodeContext], list[Layer]]] = {}


def lowering(*op_types: str):
    """Register a function as the lowering of these op types."""

    def register(func):
        for op in op_types:
            LOWERINGS[op] = func
        return func

    return register


@dataclass
class NodeContext:
    """What a lowering sees: the node, its data input's shape, folded constants."""

    node: onnx.NodeProto
    in_shape: tuple[int, ...]
    constants: dict[str, np.ndarray]
    opset: int
    path: str

    @property
    def label(self) -> str:
        return f"node {self.node.name!r} ({self.node.op_type})"

    def fail(self, problem: str) -> OnnxlipError:
        return OnnxlipError(f"{self.path}: {self.label}: {problem}")

    def attr(self, name: str, default=None):
        for a in self.node.attribute:
            if a.name == name:
                return onnx.helper.get_attribute_value(a)
        return default

    def const(self, index: int) -> np.ndarray | None:
        """The constant value of input `index`, None if absent or not constant."""
        if index >= len(self.node.input) or not self.node.input[index]:
            return None
        value = self.constants.get(self.node.input[index])
        return None if value is None else np.asarray(value)

    def is_data(self, index: int) -> bool:
        name = self.node.input[index] if index < len(self.node.input) else ""
        return bool(name) and name not in self.constants

    def require_const(self, index: int, what: str) -> np.ndarray:
        value = self.const(index)
        if value is None:
            raise self.fail(f"{what} (input {index}) must be a constant")
        if value.dtype.kind == "f" and not np.all(np.isfinite(value)):
            raise self.fail(f"{what} contains NaN or Inf")
        return value


def lower(ctx: NodeContext) -> list[Layer]:
    """Lower one node, or stop with an error that names it and what is supported."""
    func = LOWERINGS.get(ctx.node.op_type)
    if func is None:
        raise ctx.fail(f"op {ctx.node.op_type} is not supported (supported: {', '.join(sorted(LOWERINGS))})")
    return func(ctx)
