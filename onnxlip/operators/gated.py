"""Products of gated maps: v -> gate * (A v), step after step (Jacobians, stable products)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .base import LinearMap


@dataclass
class Gated:
    """A linear map (None: the identity) followed by a diagonal gate (None: none)."""

    linear: LinearMap | None
    gate: np.ndarray | None


def apply_steps(steps: Sequence[Gated], v: np.ndarray) -> np.ndarray:
    """The product of the steps applied to v, first step first."""
    for step in steps:
        v = v if step.linear is None else step.linear.matvec(v)
        v = v if step.gate is None else v * step.gate
    return v


def apply_steps_t(steps: Sequence[Gated], u: np.ndarray) -> np.ndarray:
    """The transpose of the product applied to u."""
    for step in reversed(steps):
        u = u if step.gate is None else u * step.gate
        u = u if step.linear is None else step.linear.rmatvec(u)
    return u
