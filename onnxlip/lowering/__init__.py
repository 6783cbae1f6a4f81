"""One lowering per ONNX op family; importing this package fills the registry."""

from . import activation, conv, dense, elementwise, pad, pool, reduce, shape  # noqa: F401
from .registry import LOWERINGS, NodeContext, lower

__all__ = ["LOWERINGS", "NodeContext", "lower"]
