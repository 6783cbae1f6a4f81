"""Robustness certificates: the L2 radius within which the top class cannot change.

Each logit difference moves by at most √2·||Δf||, so the class of x0 is
certain within radius ε when √2 · ε · L(x0, ε) < margin. The certified radius
is the largest such ε found by bisection (the bound grows with ε); every
reported radius was itself checked to satisfy the inequality. An attack
(DeepFool-style steps on the engine's Jacobian, then a line search, every
candidate confirmed by onnxruntime) gives an upper bound on the true minimal
adversarial distance.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from .bounds import trace
from .errors import OnnxlipError
from .jacobian import Jacobian
from .network import Network

SQRT2 = math.sqrt(2.0)


@dataclass
class Certificate:
    """The certificate of one input."""

    top_class: int
    margin: float
    radius_local: float
    radius_global: float
    attack_distance: float  # inf when the attack found nothing
    label: int | None = None
    bound_evaluations: int = 0
    seconds: float = 0.0

    @property
    def correct(self) -> bool:
        return self.label is None or self.label == self.top_class

    def to_dict(self) -> dict:
        return asdict(self) | {"correct": self.correct}


def certify(net: Network, x0, rel_tol: float = 1e-3, attack_steps: int = 50,
            label: int | None = None, method: str = "paper") -> Certificate:
    """Certified radii (local and global bound) and an attack distance at x0."""
    import time

    start = time.perf_counter()
    x = net.check_input(x0)
    logits = net.forward(x).ravel()
    if logits.size < 2:
        raise OnnxlipError(f"{net.path}: certification needs a classifier with ≥ 2 outputs")
    top = int(np.argmax(logits))
    margin = float(logits[top] - np.max(np.delete(logits, top)))
    radius_global = margin / (SQRT2 * net.global_bound().bound)
    radius_local, evaluations = _local_radius(net, x, margin, radius_global, rel_tol, method)
    attack = attack_distance(net, x, top, attack_steps)
    return Certificate(top, margin, radius_local, radius_global, attack, label, evaluations,
                       time.perf_counter() - start)


def _local_radius(net: Network, x: np.ndarray, margin: float, floor: float,
                  rel_tol: float, method: str) -> tuple[float, int]:
    """Largest ε (to rel_tol) with √2·ε·L(x0, ε) < margin, and the bounds computed."""
    if margin <= 0:
        return 0.0, 0
    nominal = net.trace(x)
    count = 0

    def certified(eps: float) -> bool:
        nonlocal count
        count += 1
        return SQRT2 * eps * net.local_bound_from(nominal, eps, method).bound < margin

    low = floor * (1 - 1e-9)
    if not certified(low):  # cannot happen with a sound global bound; stay safe
        return 0.0, count
    high = max(2 * low, 1e-12)
    while certified(high):
        low, high = high, 2 * high
        if high > 1e12:
            return low, count
    while (high - low) > rel_tol * low:
        mid = math.sqrt(low * high) if high / low > 4 else 0.5 * (low + high)
        low, high = (mid, high) if certified(mid) else (low, mid)
    return low, count


def attack_distance(net: Network, x0: np.ndarray, top: int, steps: int = 50) -> float:
    """Distance to the nearest point found whose class onnxruntime confirms is not `top`.

    For each rival class: DeepFool steps across its boundary, else a ray along
    the margin's descent direction at x0; every end point is then pulled back
    towards x0 by bisection, keeping the class change confirmed.
    """
    runner = net.runner()
    best = math.inf
    logits0 = net.forward(x0).ravel()
    for rival in [int(j) for j in np.argsort(logits0)[::-1] if j != top][:9]:
        point = _deepfool(net, x0, top, rival, steps)
        if point is None:
            point = _ray(runner, x0, top, _margin_gradient(net, x0, top, rival))
        if point is not None:
            best = min(best, _shrink(runner, x0, point, top))
    return best


def _margin_gradient(net: Network, x: np.ndarray, top: int, rival: int) -> np.ndarray:
    at = trace(net.blocks, x, rounding=False)
    seed = np.zeros(at.output.size)
    seed[top], seed[rival] = 1.0, -1.0
    return Jacobian(net.blocks, at).rmatvec(seed)


def _ray(runner, x0: np.ndarray, top: int, gradient: np.ndarray) -> np.ndarray | None:
    """The first point along −gradient, at doubling distances, of another class."""
    size = np.linalg.norm(gradient)
    if not size:
        return None
    direction = -gradient / size
    t = 1e-3 * max(1.0, np.linalg.norm(x0))
    for _ in range(40):
        point = x0 + t * direction
        if int(np.argmax(runner(runner.representable(point)))) != top:
            return point
        t *= 2
    return None


def _deepfool(net: Network, x0, top: int, rival: int, steps: int) -> np.ndarray | None:
    """Linearized steps across the boundary between `top` and `rival`."""
    x = x0.copy()
    for _ in range(steps):
        logits = trace(net.blocks, x, rounding=False).output
        gap = logits[top] - logits[rival]
        if gap < 0:
            return x
        grad = _margin_gradient(net, x, top, rival)
        size = grad @ grad
        if not size:
            return None
        x = x - 1.05 * (gap + 1e-6 * (1 + abs(gap))) / size * grad
    return None


def _shrink(runner, x0: np.ndarray, point: np.ndarray, top: int, iterations: int = 30) -> float:
    """Bisect along x0 → point for the nearest confirmed class change."""
    def flipped(t: float) -> tuple[bool, float]:
        x = runner.representable(x0 + t * (point - x0))
        return int(np.argmax(runner(x))) != top, float(np.linalg.norm(x - x0))

    changed, distance = flipped(1.0)
    if not changed:
        return math.inf
    low, high = 0.0, 1.0
    for _ in range(iterations):
        mid = 0.5 * (low + high)
        changed, at = flipped(mid)
        if changed:
            high, distance = mid, at
        else:
            low = mid
    return distance
