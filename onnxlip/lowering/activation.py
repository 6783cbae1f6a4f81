"""Relu: the nonlinearity of every affine-ReLU block."""

from __future__ import annotations

from ..layers import Relu
from .registry import NodeContext, lowering


@lowering("Relu")
def lower_relu(ctx: NodeContext) -> list[Relu]:
    return [Relu(ctx.in_shape)]
