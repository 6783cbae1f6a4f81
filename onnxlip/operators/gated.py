"""Products of gated maps: v -> gate * (A v), step after step (Jacobians, stable products).

A vector v of shape (n,) or a batch of them as columns, shape (n, k)."""

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


def along(d: np.ndarray, v: np.ndarray) -> np.ndarray:
    """A per-entry factor d shaped to scale v, a vector or columns."""
    return d if v.ndim == 1 else d[:, None]


def product(linear: LinearMap, v: np.ndarray) -> np.ndarray:
    """A v for a vector or columns."""
    return linear.matvec(v) if v.ndim == 1 else linear.matmat(v)


def product_t(linear: LinearMap, u: np.ndarray) -> np.ndarray:
    """Aᵀ u for a vector or columns."""
    return linear.rmatvec(u) if u.ndim == 1 else linear.rmatmat(u)


def apply_steps(steps: Sequence[Gated], v: np.ndarray) -> np.ndarray:
    """The product of the steps applied to v, first step first."""
    for step in steps:
        v = v if step.linear is None else product(step.linear, v)
        v = v if step.gate is None else v * along(step.gate, v)
    return v


def apply_steps_t(steps: Sequence[Gated], u: np.ndarray) -> np.ndarray:
    """The transpose of the product applied to u."""
    for step in reversed(steps):
        u = u if step.gate is None else u * along(step.gate, u)
        u = u if step.linear is None else product_t(step.linear, u)
    return u
