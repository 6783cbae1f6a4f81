"""Robustness certificates: the L2 radius within which the decision cannot change.

The decision is the top class (argmax of the outputs), or the smallest output
(argmin, for nets whose action is the least cost); a target class may be given
instead of the decision at x0, and a margin it must keep. Each difference of
two outputs moves by at most √2·||Δf||, so the decision is certain within
radius ε when √2 · ε · L(x0, ε) < margin − required margin. With the default
method the reach analysis (onnxlip.reach) also bounds each lead's change over
the ball directly (the output's Δz = LΔx + e, and a backward pass through the
relaxed network for each lead's row: Reach.lower_changes); where
every lead's lower bound stays above the required margin the decision is
certain too, often at radii where the Lipschitz rule is not (a lead's own
change, not √2 times the whole output's). The certified radius is the largest
ε either test passes, found by a search on each test's room (growth, Brent's
method, bisection: _largest; certain on a ball means certain on every smaller
one); every reported radius was itself checked, and the certificate says
which test passed there (`radius_test`). An attack (DeepFool-style steps on
the engine's Jacobian, then a line search, every candidate confirmed by
onnxruntime) gives an upper bound on the true minimal adversarial distance.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Protocol

import numpy as np
from scipy.optimize import brentq

from .blocks import Block
from .bounds import BoundResult, Trace, trace
from .errors import OnnxlipError
from .evaluate import ModelRunner
from .jacobian import Jacobian
from .operators.base import U64
from .reach import Reach

SQRT2 = math.sqrt(2.0)
DECISIONS = ("argmax", "argmin")


@dataclass(frozen=True)
class Rule:
    """What is certified: the class chosen by `decision` over the outputs (or the
    `target` class) keeps a lead of more than `margin` over every other."""

    decision: str = "argmax"
    target: int | None = None
    margin: float = 0.0

    def __post_init__(self):
        if self.decision not in DECISIONS:
            raise OnnxlipError(f"decision must be one of {DECISIONS}, got {self.decision!r}")
        if not (math.isfinite(self.margin) and self.margin >= 0):
            raise OnnxlipError(f"the required margin must be a finite number ≥ 0, got {self.margin!r}")

    def scores(self, outputs: np.ndarray) -> np.ndarray:
        """The outputs oriented so that the decision is their argmax."""
        return outputs if self.decision == "argmax" else -outputs

    def chosen(self, outputs: np.ndarray) -> int:
        return int(np.argmax(self.scores(outputs))) if self.target is None else self.target

    def lead(self, outputs: np.ndarray, top: int) -> float:
        """How far class `top` leads every other (negative: it is not the decision)."""
        scores = self.scores(outputs)
        return float(scores[top] - np.max(np.delete(scores, top)))

    def holds(self, outputs: np.ndarray, top: int) -> bool:
        """Whether the specification holds at these outputs."""
        lead = self.lead(outputs, top)
        return lead > self.margin if self.margin else lead > 0 or (
            lead == 0 and int(np.argmax(self.scores(outputs))) == top)


#: The default rule: the top class stays the top class.
TOP_CLASS = Rule()


class Certifiable(Protocol):
    """What certification reads of a network: onnxlip.network.Network is one
    (this module does not import it: Network.certify calls into here)."""

    blocks: list[Block]

    @property
    def path(self) -> str: ...

    def check_input(self, x, source: str | None = None) -> np.ndarray: ...

    def forward(self, x) -> np.ndarray: ...

    def trace(self, x) -> Trace: ...

    def local_bound_from(self, nominal: Trace, eps: float, method: str = "paper",
                         target: float = math.inf) -> BoundResult: ...

    def reach(self, nominal: Trace, eps: float) -> Reach: ...

    def global_bound(self) -> BoundResult: ...

    def runner(self) -> ModelRunner: ...


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
    decision: str = "argmax"
    required_margin: float = 0.0
    #: What certified radius_local: "output bounds" (each lead's change bounded by
    #: the reach analysis) or "local bound" (√2·ε·L(x0, ε) below the margin);
    #: "" where nothing is certified.
    radius_test: str = ""
    #: True where the attack's point lies inside a certified radius and fails the rule
    #: by onnxruntime's float32 evaluation only: the engine's float64 trace with its
    #: error bounds proves the rule holds there. The certificate is for the model's
    #: exact arithmetic; the deployed float32 runtime decides differently there.
    attack_rounding: bool = False

    @property
    def radius(self) -> float:
        """The certified radius: the larger of the local analysis' and the global bound's."""
        return max(self.radius_local, self.radius_global)

    @property
    def correct(self) -> bool | None:
        """Whether the top class is the label; None without a label (no accuracy then)."""
        return None if self.label is None else self.label == self.top_class

    def to_dict(self) -> dict:
        return asdict(self) | {"correct": self.correct}


def certify(net: Certifiable, x0, rel_tol: float = 1e-3, attack_steps: int = 50,
            label: int | None = None, method: str = "auto", rule: Rule = TOP_CLASS) -> Certificate:
    """Certified radii (local and global bound) and an attack distance at x0: the
    radius within which `rule` holds (by default: the top class stays the top)."""
    import time

    start = time.perf_counter()
    if not 0 < rel_tol < math.inf:
        raise OnnxlipError(f"rel_tol must be a finite number > 0, got {rel_tol!r}")
    x = net.check_input(x0)
    logits = net.forward(x).ravel()
    if logits.size < 2:
        raise OnnxlipError(f"{net.path}: certification needs a classifier with ≥ 2 outputs")
    if rule.target is not None and not 0 <= rule.target < logits.size:
        raise OnnxlipError(f"target class {rule.target} is not one of the model's "
                           f"{logits.size} outputs")
    top = rule.chosen(logits)
    margin = rule.lead(logits, top)
    nominal = net.trace(x)
    rows = _lead_rows(rule, top, logits.size)
    # what the outputs may lose before the rule fails: from the exact leads at x0 (the
    # float64 trace less its rounding-error bounds), not only the computed margin
    proven = _smallest_lead(nominal, rows)
    slack = min(margin, margin if proven is None else proven) - rule.margin
    radius_global = max(slack, 0.0) / (SQRT2 * net.global_bound().bound)
    radius_local, evaluations, test = _local_radius(net, nominal, rows, rule, slack, radius_global,
                                                    rel_tol, method)
    attack, point = _attack(net, x, top, attack_steps, rule) if slack > 0 else (0.0, None)
    rounding = (point is not None and attack < max(radius_local, radius_global)
                and _holds_exactly(net, point, rule, top))
    return Certificate(top, margin, radius_local, radius_global, attack, label, evaluations,
                       time.perf_counter() - start, rule.decision, rule.margin, test, rounding)


def _holds_exactly(net: Certifiable, x: np.ndarray, rule: Rule, top: int) -> bool:
    """Whether the engine's float64 trace at x, with its rounding-error bounds,
    proves every lead of `top` above the required margin (the model's exact
    arithmetic keeps the decision at x)."""
    at = net.trace(x)
    lead = _smallest_lead(at, _lead_rows(rule, top, at.output.size))
    return lead is not None and lead > rule.margin


def _smallest_lead(at: Trace, rows: np.ndarray) -> float | None:
    """A proven lower bound of the smallest exact lead at a trace (None where the
    trace has no rounding-error bounds)."""
    lead = _traced_leads(at, rows)
    return None if lead is None else float(np.min(lead - 4 * U64 * np.abs(lead)))


def _traced_leads(at: Trace, rows: np.ndarray) -> np.ndarray | None:
    """Lower bounds of the leads (columns of `rows`) at a trace: its outputs less
    their rounding-error bounds (None where the trace has none)."""
    if at.output_error is None:
        return None
    out, error = at.output.ravel(), at.output_error.ravel()
    return rows.T @ out - np.abs(rows).T @ (error + 4 * U64 * np.abs(out))


def _local_radius(net: Certifiable, nominal: Trace, rows: np.ndarray, rule: Rule, slack: float,
                  floor: float, rel_tol: float, method: str) -> tuple[float, int, str]:
    """Largest ε (to rel_tol) where the decision is certain by one of the module's
    two tests, the bounds computed, and the test that passed there: the output
    bounds' radius first (auto), then the local bound's from there on (it costs a
    bound more only where it is not larger)."""
    if slack <= 0:
        return 0.0, 0, ""
    # each test's room: positive where the decision is certain at ε
    tests = {"output bounds": lambda eps: _lead_floor(net, nominal, eps, rows, rule.margin) - rule.margin,
             "local bound": lambda eps: slack - SQRT2 * eps * net.local_bound_from(
                 nominal, eps, method, target=slack / (SQRT2 * eps)).bound}
    if method != "auto":
        del tests["output bounds"]
    best, count, which = floor * (1 - 1e-9), 0, ""
    for name, room in tests.items():
        radius, calls = _largest(room, best, rel_tol)
        count += calls
        if radius is not None:
            best, which = radius, name
    return (best, count, which) if which else (0.0, count, "")  # none: not with a sound global bound


#: Growth of ε per step while the room stays positive (at most, and at least)...
GROW_MAX, GROW_MIN = 8.0, 2.0
#: ...towards this share of where the room, falling in proportion to ε, would reach 0.
GROW_AIM = 0.8


def _largest(room, low: float, rel_tol: float) -> tuple[float | None, int]:
    """The largest ε ≥ low (to rel_tol) found where `room` (a certified margin of
    the decision, falling with ε) is positive (None where it is not at low), and
    the tests run. Grows ε while the room stays positive (towards where a room
    falling in proportion to ε would end, ×2 to ×8 a step), then Brent's method
    (scipy's brentq, on log ε) between the last passing and the first failing ε,
    then bisection until they are within rel_tol. Only passing ε are returned:
    the search only picks which ε are tested."""
    runs: dict[float, float] = {}

    def value(eps: float) -> float:
        """The room at ε, tested once; for brentq, failures as at most −cap (not −inf)."""
        if eps not in runs:
            runs[eps] = room(eps)
        r = runs[eps]
        return r if r > 0 or r > -cap else -cap

    cap = math.inf
    first = value(low)
    if not first > 0:
        return None, 1
    cap = 4 * first
    high = low
    while runs[high] > 0:
        low, margin = high, runs[high]
        aim = GROW_AIM * low * first / (first - margin) if first > margin else math.inf
        high = min(GROW_MAX * low, max(GROW_MIN * low, aim))
        if high > 1e12:
            return low, len(runs)
        value(high)
    if high > (1 + rel_tol) * low:
        try:
            ends = {math.log(low): low, math.log(high): high}  # tested: no second run by rounding
            brentq(lambda t: value(ends.get(t) or math.exp(t)), *ends, xtol=rel_tol / 4, maxiter=40)
        except (ValueError, RuntimeError):  # a room that is not a function of ε: bisection alone
            pass
    while True:
        low = max(e for e, r in runs.items() if r > 0)
        high = min((e for e, r in runs.items() if not r > 0 and e > low), default=math.inf)
        mid = math.sqrt(low * high)
        if high - low <= rel_tol * low or not low < mid < high:  # (a rel_tol below the rounding)
            return low, len(runs)
        value(mid)


def _lead_rows(rule: Rule, top: int, outputs: int) -> np.ndarray:
    """One column per rival j: the lead of `top` over j is the column's product with the outputs."""
    rivals = [j for j in range(outputs) if j != top]
    rows = np.zeros((outputs, len(rivals)))
    rows[top] = 1.0
    rows[rivals, np.arange(len(rivals))] = -1.0
    return rule.scores(rows)


def _lead_floor(net: Certifiable, nominal: Trace, eps: float, rows: np.ndarray, margin: float) -> float:
    """A proven lower bound of the smallest lead over the ball (−inf where the
    reach analysis does not get to the output): the exact lead at x0 (the trace ±
    its rounding-error bounds) plus the lower bound of its change (searched no
    further than the required `margin` needs)."""
    at_x0 = _traced_leads(nominal, rows)
    if at_x0 is None:
        return -math.inf
    # a change bound of (margin − lead at x0) suffices: the search stops there
    change = net.reach(nominal, eps).lower_changes(rows, eps, margin - at_x0 + 1e-9 * np.abs(at_x0))
    if change is None:
        return -math.inf
    lead = at_x0 + change
    return float(np.min(lead - 4 * U64 * (np.abs(at_x0) + np.abs(change))))


def attack_distance(net: Certifiable, x0: np.ndarray, top: int, steps: int = 50,
                    rule: Rule = TOP_CLASS) -> float:
    """Distance to the nearest point found where onnxruntime confirms the rule fails
    (by default: the top class is no longer `top`).

    For each rival class: DeepFool steps across its boundary, else a ray along
    the margin's descent direction at x0; every end point is then pulled back
    towards x0 by bisection, keeping the class change confirmed.
    """
    return _attack(net, x0, top, steps, rule)[0]


def _attack(net: Certifiable, x0: np.ndarray, top: int, steps: int, rule: Rule
            ) -> tuple[float, np.ndarray | None]:
    """attack_distance, and the point at that distance (as onnxruntime evaluated it)."""
    runner = net.runner()
    best, nearest = math.inf, None
    scores0 = rule.scores(net.forward(x0).ravel())
    for rival in [int(j) for j in np.argsort(scores0)[::-1] if j != top][:9]:
        point = _deepfool(net, x0, top, rival, steps, rule)
        if point is None:
            point = _ray(runner, x0, top, _margin_gradient(net, x0, top, rival, rule), rule)
        if point is not None:
            distance, at = _shrink(runner, x0, point, top, rule)
            if distance < best:
                best, nearest = distance, at
    return best, nearest


def _margin_gradient(net: Certifiable, x: np.ndarray, top: int, rival: int, rule: Rule) -> np.ndarray:
    """The gradient of scores[top] − scores[rival] at x."""
    at = trace(net.blocks, x, rounding=False)
    seed = np.zeros(at.output.size)
    seed[top], seed[rival] = 1.0, -1.0
    return Jacobian(net.blocks, at).rmatvec(rule.scores(seed))


def _ray(runner, x0: np.ndarray, top: int, gradient: np.ndarray, rule: Rule) -> np.ndarray | None:
    """The first point along −gradient, at doubling distances, of another class."""
    size = np.linalg.norm(gradient)
    if not size:
        return None
    direction = -gradient / size
    t = 1e-3 * max(1.0, np.linalg.norm(x0))
    for _ in range(40):
        point = x0 + t * direction
        if not rule.holds(runner(runner.representable(point)).ravel(), top):
            return point
        t *= 2
    return None


def _deepfool(net: Certifiable, x0, top: int, rival: int, steps: int, rule: Rule) -> np.ndarray | None:
    """Linearized steps across the boundary where `rival` comes within the required
    margin of `top`."""
    x = x0.copy()
    for _ in range(steps):
        scores = rule.scores(trace(net.blocks, x, rounding=False).output)
        gap = scores[top] - scores[rival] - rule.margin
        if gap < 0:
            return x
        grad = _margin_gradient(net, x, top, rival, rule)
        size = grad @ grad
        if not size:
            return None
        x = x - 1.05 * (gap + 1e-6 * (1 + abs(gap))) / size * grad
    return None


def _shrink(runner, x0: np.ndarray, point: np.ndarray, top: int, rule: Rule,
            iterations: int = 30) -> tuple[float, np.ndarray | None]:
    """Bisect along x0 → point for the nearest confirmed failure of the rule: its
    distance and the point (inf, None where the end point does not fail)."""
    def flipped(t: float) -> tuple[bool, np.ndarray]:
        x = runner.representable(x0 + t * (point - x0))
        return not rule.holds(runner(x).ravel(), top), x

    changed, nearest = flipped(1.0)
    if not changed:
        return math.inf, None
    low, high = 0.0, 1.0
    for _ in range(iterations):
        mid = 0.5 * (low + high)
        changed, at = flipped(mid)
        if changed:
            high, nearest = mid, at
        else:
            low = mid
    return float(np.linalg.norm(nearest - x0)), nearest
