"""Elementwise activations (ReLU, LeakyRelu, PRelu, Clip, Sigmoid, Tanh, Softplus, Elu,
HardSigmoid, HardSwish, Gelu, and the idioms patterns.fuse_activations fuses into
'onnxlip.fused' nodes): one Activate layer carrying its onnxlip.activations object."""

from __future__ import annotations

import numpy as np

from .. import patterns
from ..activations import PRelu
from ..errors import OnnxlipError
from ..layers import Activate
from .registry import NodeContext, lowering


@lowering(*patterns.STANDARD_OPS, *(f"{patterns.DOMAIN}.{op}" for op in patterns.FUSED_OPS))
def lower_activation(ctx: NodeContext) -> list[Activate]:
    try:
        activation = patterns.activation_of(ctx.node, ctx.constants)
    except OnnxlipError as exc:
        raise OnnxlipError(f"{ctx.path}: {exc}") from None
    if isinstance(activation, PRelu):  # per-channel slopes, one per element of the flat vector
        slope = activation.slope
        try:
            if np.broadcast_shapes(slope.shape, ctx.in_shape) != tuple(ctx.in_shape):
                raise ValueError
        except ValueError:
            raise ctx.fail(f"slope of shape {slope.shape} does not broadcast to the input "
                           f"{ctx.in_shape}") from None
        activation = PRelu(np.broadcast_to(slope, ctx.in_shape).ravel())
    return [Activate(ctx.in_shape, activation)]
