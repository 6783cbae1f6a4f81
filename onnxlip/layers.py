"""The pieces a lowering turns an ONNX node into, before blocks are formed.

Each has an `out_shape`: the shape of the tensor it outputs (() for a scalar)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .activations import Activation
from .operators.base import LinearMap


@dataclass
class Affine:
    """x -> map(x) + bias."""

    map: LinearMap
    bias: np.ndarray

    @property
    def out_shape(self) -> tuple[int, ...]:
        return self.map.out_shape


@dataclass
class Activate:
    """An elementwise activation σ (ReLU, sigmoid, GELU, ...), on the flat vector."""

    shape: tuple[int, ...]
    activation: Activation

    @property
    def out_shape(self) -> tuple[int, ...]:
        return self.shape


@dataclass
class Reshape:
    """A change of shape that keeps the C-order flat vector as it is."""

    shape: tuple[int, ...]

    @property
    def out_shape(self) -> tuple[int, ...]:
        return self.shape


@dataclass
class MaxPool:
    """N-d max-pooling with explicit pads (begin..., end...)."""

    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    pads: tuple[int, ...]
    dilations: tuple[int, ...]
    ceil_mode: int


@dataclass
class Merge:
    """Several data tensors combined linearly: out = Σ_j maps[j](in_j) (Add, Sub,
    Sum and Concat of computed tensors), one monomial map per data input."""

    maps: list[LinearMap]
    shape: tuple[int, ...]

    @property
    def out_shape(self) -> tuple[int, ...]:
        return self.shape


Layer = Affine | Activate | Reshape | MaxPool | Merge
