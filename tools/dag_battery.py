"""Soundness battery on random DAG networks (tests/dagnets.py), issue 12.

    python tools/dag_battery.py                       # 10 families x 21 seeds, ReLU: 210 nets
    python tools/dag_battery.py --per-family 5 --activations relu leakyrelu --json out.json

For every net (each family x activation x seed) and radius ε = level·||x0||:
the engine's forward pass against onnxruntime; the local bounds ('paper' and
'tight') computed before the global bound (which would otherwise cap them);
then, in float64 on the net's twin (the same float32 weights, onnx's reference
evaluator), the largest difference quotient ||f(x) − f(x0)|| / ||x − x0|| over
points of the ball (uniform on the sphere, inside, along J(x0)'s top singular
directions) and after projected gradient ascent from the best of them (driven by
the engine's Jacobian, every iterate evaluated by the twin); and onnxlip's own
lower bounds (onnxruntime). A violation is any of:

- a sampled or ascent ratio above a local bound (relative slack 1e-6);
- onnxlip's lower bound above a local bound (same slack);
- ||J(x0)|| (exact: no ReLU at its kink) above a local bound;
- 'tight' above 'paper'; the global bound below a local bound, or L(ε) above
  'paper' L(ε) above L(ε') for ε < ε', where two upper bounds are compared as BoundResult.ritz
  says: the Ritz value of one (a lower estimate of its product of true norms)
  against the other's bound;
- the forward pass off onnxruntime's by more than 1e-5 relative, or an error.

A 'tight' L(ε) above L(ε') at a larger ε' is sound (both are upper bounds of
L(ε) ≤ L(ε')) but loose: it is counted as a note.

Activations whose ops onnxlip does not lower yet are reported and skipped.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
import dagnets  # noqa: E402
import netgen  # noqa: E402

import onnxlip  # noqa: E402
from onnxlip.errors import OnnxlipError  # noqa: E402

SLACK = 1e-6
LEVELS = (0.003, 0.03, 0.3, 1.0)  # radii relative to ||x0||
FORWARD_TOL = 1e-5


@dataclass
class Outcome:
    """One net's record: its counts and any violations (each a dict of what and values)."""

    family: str
    activation: str
    seed: int
    points: int = 0
    seconds: float = 0.0
    violations: list[dict] = field(default_factory=list)
    notes: list[dict] = field(default_factory=list)  # not unsound, worth a look
    ratios: list[dict] = field(default_factory=list)  # per ε: bounds and lower values

    def check(self, ok: bool, what: str, **values) -> None:
        if not ok:
            self.violations.append({"what": what, **values})


def climb(x0: np.ndarray, eps: float, starts: np.ndarray, steps: int, ratio) -> tuple[float, int]:
    """Projected gradient ascent in the ball from each start, steps shrinking by 0.8:
    `ratio(x)` gives (r, ∇r) or None where it stops. The largest r and the evaluations."""
    best, evaluations = 0.0, 0
    for start in starts:
        x, step = start.copy(), 0.25 * eps
        for _ in range(steps):
            found = ratio(x)
            evaluations += 1
            if found is None:
                break
            r, g = found
            best = max(best, r)
            if not np.all(np.isfinite(g)) or np.linalg.norm(g) == 0:
                break
            s = x - x0 + step * g / np.linalg.norm(g)
            if np.linalg.norm(s) > eps:
                s *= eps / np.linalg.norm(s)
            x, step = x0 + s, step * 0.8
    return best, evaluations


def ascent(engine: onnxlip.Network, twin, x0: np.ndarray, eps: float, starts: np.ndarray,
           steps: int) -> tuple[float, int]:
    """Projected gradient ascent of r(x) = ||f(x) − f(x0)|| / ||x − x0|| in the ball,
    from each start; f is the float64 twin, the gradient Jᵀ(x) d / (||d|| ||s||) − r s / ||s||²
    comes from the engine. The largest ratio the twin gave and the evaluations."""
    f0 = twin(x0[None])[0]

    def ratio(x):
        s, d = x - x0, twin(x[None])[0] - f0
        ns, nd = np.linalg.norm(s), np.linalg.norm(d)
        if ns == 0 or nd == 0:
            return None
        r = nd / ns
        return r, engine.jacobian(x).rmatvec(d) / (nd * ns) - r * s / ns**2

    return climb(x0, eps, starts, steps, ratio)


def probes(engine: onnxlip.Network, x0: np.ndarray, seed: int, out) -> tuple:
    """(J(x0), ||J(x0)||, its top two right singular vectors: directions to sample
    along, the network's lower-bound search: None where the network's own check
    failed, recorded in `out`)."""
    jacobian = engine.jacobian(x0)
    dense = jacobian.dense()
    try:  # the network checks every lower bound it finds against its upper bounds
        search = engine.lower_bound_search(x0, seed)
    except OnnxlipError as exc:
        search = None
        out.check(False, "onnxlip's own check: a lower bound above an upper bound", error=str(exc))
    return jacobian, float(np.linalg.norm(dense, 2)), list(np.linalg.svd(dense)[2][:2]), search


def ratios_found(engine: onnxlip.Network, twin, x0: np.ndarray, eps: float, rng, directions: list,
                 search, samples: int, ascent_steps: int, out) -> tuple:
    """(points of the ball, the largest twin ratio there, after ascent from the best
    three, the network's own lower bound: 0 where its check failed, recorded in
    `out`, which counts the evaluations)."""
    points = netgen.ball_points(rng, x0, eps, samples, samples, directions)
    ratios = np.linalg.norm(twin(points) - twin(x0[None])[0], axis=1) / np.linalg.norm(points - x0, axis=1)
    climbed, evaluations = ascent(engine, twin, x0, eps, points[np.argsort(ratios)[-3:]], ascent_steps)
    try:
        lower = search.at(eps, samples=16, ascent_steps=10).best if search else 0.0
    except OnnxlipError as exc:
        lower = 0.0
        out.check(False, "onnxlip's own check: a lower bound above an upper bound", error=str(exc))
    out.points += len(points) + evaluations
    return points, netgen.max_ratio(twin, x0, points), climbed, lower


def run_one(family: str, activation: str, seed: int, workdir: Path, samples: int,
            ascent_steps: int) -> Outcome:
    out = Outcome(family, activation, seed)
    start = time.perf_counter()
    net = dagnets.FAMILIES[family](seed, activation)
    path = net.save(workdir / f"{net.name}_{activation}.onnx")
    engine = onnxlip.load(path, seed=seed)
    twin = net.twin()
    x0 = np.random.default_rng(seed + 1000).standard_normal(net.input_shape).ravel()
    y_ort = netgen.ort_run(netgen.ort_session(path), x0)
    err = netgen.rel_err(engine.forward(x0), y_ort)
    out.check(err <= FORWARD_TOL, "forward pass vs onnxruntime", rel_err=err)
    out.check(netgen.rel_err(twin(x0[None])[0], y_ort) <= FORWARD_TOL, "twin vs onnxruntime")

    radii = [level * float(np.linalg.norm(x0)) for level in LEVELS]
    # upper bounds first (as plain floats: a later reconciliation may re-solve them)
    paper = [(r.bound, r.ritz) for r in engine.local_bounds(x0, radii, "paper")]
    tight = [(r.bound, r.ritz) for r in engine.local_bounds(x0, radii, "tight")]
    auto = [(r.bound, r.ritz) for r in engine.local_bounds(x0, radii, "auto")]
    glob = engine.global_bound().bound
    jacobian, jac_norm, directions, search = probes(engine, x0, seed, out)
    rng = np.random.default_rng(seed)
    for k, eps in enumerate(radii):
        points, sampled, climbed, lower = ratios_found(engine, twin, x0, eps, rng, directions, search,
                                                       samples, ascent_steps, out)
        (pb, pr), (tb, tr), (ab, ar) = paper[k], tight[k], auto[k]
        smallest = min(pb, tb, ab)
        row = {"eps": eps, "paper": pb, "tight": tb, "auto": ab, "global": glob, "sampled": sampled,
               "ascent": climbed, "lower": lower, "jacobian": jac_norm}
        out.ratios.append(row)
        where = {"eps": eps, **row}
        out.check(sampled <= smallest * (1 + SLACK), "sampled ratio above a local bound", **where)
        out.check(climbed <= smallest * (1 + SLACK), "ascent ratio above a local bound", **where)
        out.check(lower <= smallest * (1 + SLACK), "onnxlip lower bound above a local bound",
                  **where)
        if (search.ties if search else jacobian.ties) == 0:  # J(x0) is the exact Jacobian
            out.check(jac_norm <= smallest * (1 + SLACK), "||J(x0)|| above a local bound", **where)
        out.check(tr <= pb * (1 + SLACK), "tight above paper", **where)
        out.check(ar <= pb * (1 + 2 * engine.tol), "auto above paper", **where)
        out.check(min(pr, tr) <= glob * (1 + SLACK), "local above global", **where)
        if k:
            out.check(paper[k - 1][1] <= pb * (1 + SLACK), "paper L(eps) not monotone",
                      previous=paper[k - 1], **where)
            if not tight[k - 1][1] <= tb * (1 + SLACK):  # sound, but L(ε) ≤ L(ε') ≤ tight(ε')
                out.notes.append({"what": "tight L(eps) above tight L(eps') for a larger eps'",
                                  "previous": tight[k - 1], **where})
    out.seconds = time.perf_counter() - start
    return out


def supported(activation: str, workdir: Path) -> str | None:
    """None if onnxlip loads a small net with this activation, else its error."""
    net = dagnets.residual_mlp(0, activation)
    try:
        onnxlip.load(net.save(workdir / f"probe_{activation}.onnx"))
    except OnnxlipError as exc:
        return str(exc)
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="*", default=list(dagnets.FAMILIES),
                        choices=list(dagnets.FAMILIES))
    parser.add_argument("--activations", nargs="*", default=["relu"],
                        choices=list(dagnets.ACTIVATIONS) + ["all"])
    parser.add_argument("--per-family", type=int, default=21, help="seeds per family and activation")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--samples", type=int, default=300,
                        help="points on the sphere and inside the ball, each, per radius")
    parser.add_argument("--ascent-steps", type=int, default=12)
    parser.add_argument("--json", help="write every net's record here")
    args = parser.parse_args()
    activations = list(dagnets.ACTIVATIONS) if "all" in args.activations else args.activations
    workdir = Path(tempfile.mkdtemp(prefix="dag_battery_"))
    skipped = {a: why for a in activations if (why := supported(a, workdir))}
    for a, why in skipped.items():
        print(f"skipped {a}: {why}", file=sys.stderr)
    outcomes: list[Outcome] = []
    start = time.perf_counter()
    for activation in (a for a in activations if a not in skipped):
        for family in args.families:
            for seed in range(args.first_seed, args.first_seed + args.per_family):
                try:
                    outcome = run_one(family, activation, seed, workdir, args.samples, args.ascent_steps)
                except Exception as exc:  # an error is a finding too: record it, go on
                    outcome = Outcome(family, activation, seed)
                    outcome.check(False, "error", error=f"{type(exc).__name__}: {exc}")
                outcomes.append(outcome)
                for v in outcome.violations:
                    print(f"VIOLATION {family} {activation} seed {seed}: {v}", file=sys.stderr)
    seconds = time.perf_counter() - start
    violations = [v for o in outcomes for v in o.violations]
    rows = [r for o in outcomes for r in o.ratios]
    summary = {
        "nets": len(outcomes), "points": sum(o.points for o in outcomes),
        "radii": len(rows), "violations": len(violations),
        "notes": dict(Counter(n["what"] for o in outcomes for n in o.notes)),
        "by_kind": dict(Counter(v["what"] for v in violations)),
        "families": dict(Counter(o.family for o in outcomes)),
        "activations": dict(Counter(o.activation for o in outcomes)), "skipped": skipped,
        "median_paper_over_sampled": float(np.median(over)) if (
            over := [r["paper"] / r["sampled"] for r in rows if r["sampled"] > 0]) else None,
        # a net whose every ReLU is off over the ball has paper = tight = 0: no ratio
        "median_tight_over_paper": float(np.median(tight)) if (
            tight := [r["tight"] / r["paper"] for r in rows if r["paper"] > 0]) else None,
        "zero_bounds": sum(r["paper"] == 0 for r in rows),
        "seconds": round(seconds, 1),
    }
    return report(summary, outcomes, args.json)


def report(summary: dict, outcomes: list, path: str | None) -> int:
    """Print the summary, write every net's record to `path` (JSON) where given; the
    exit status: 1 where there are violations."""
    print(json.dumps(summary, indent=1))
    if path:
        Path(path).write_text(json.dumps(
            {"summary": summary, "nets": [vars(o) for o in outcomes]}, indent=1, default=float))
    return 1 if summary["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
