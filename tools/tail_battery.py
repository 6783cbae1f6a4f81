"""Soundness battery of the chain tail split (onnxlip.tight._split_joint).

    python tools/tail_battery.py                          # 5 families x 12 seeds: 60 nets
    python tools/tail_battery.py --seeds 3 --families kink cnn --json out.json

On a chain whose uncertain units are too many for one joint bound, the 'auto'
local bound may be the joint bound J_k of a tail (blocks k, k+1, ...) times
g_k, the product of the paper's block bounds before k; its note then starts
"the joint bound of the blocks from". The generated nets make that happen:
wide ReLU MLPs with narrowing tails ('mlp'), the same with biases that put
many units at or near their kink at x0 ('kink'), a head of small gain before a
tail of large gain or the reverse ('lopsided'), deep MLPs of moderate width
whose tails hold several layers ('deep'), and small CNNs (Conv + ReLU,
optional max-pooling and second Conv, then Gemm layers; 'cnn'). Every net is
a float32 ONNX model (ir_version 8, tests/netgen.py's RefNet).

For every net and radius ε = level·||x0||: 'auto' and 'paper' (and, on every
--budget-every'th net at the larger radii, 'auto' of the model loaded with
time_budget=--budget, where tails up to joint.FORMS_MAX_TAIL forms are tried);
then in float64 (the net's twin: onnx's reference evaluator on the same
float32 weights, tools/dag_battery.py) the largest difference quotient
||f(x) − f(x0)|| / ||x − x0|| over points of the ball (sphere, interior,
J(x0)'s top singular directions), projected gradient ascent from the best of
them (dag_battery.ascent), and onnxlip's own lower bounds (onnxruntime). Where
the split produced a bound, its two factors are checked apart at the same
points (numpy float64 evaluation of the RefNet and of its prefix before block
k): ||Δv_k|| ≤ g_k ||Δx|| and ||Δf|| ≤ J_k ||Δv_k||, the latter also after a
projected gradient ascent of ||Δf|| / ||Δv_k|| over the ball; and the bound
must be g_k · J_k (J_k taken from tight.joint_bound, wrapped at run time).

A violation is any of:

- a sampled, ascent or onnxlip lower ratio above an 'auto' bound (relative slack 1e-6);
- ||J(x0)|| (exact: no unit at its kink) above an 'auto' bound;
- 'auto' above 'paper' (slack 2·tol, as dag_battery);
- a split bound that is not g_k · J_k (rel. 1e-9), or a factor exceeded at a point;
- the forward pass off the float64 twin's by more than 1e-9 relative, or an error
  (onnxruntime's float32 pass off by more than 1e-5: a note).

Not unsound, but noted: a budgeted bound above the unbudgeted one, a budgeted
bound taking more than twice its budget, 'auto' L(ε) above L(ε') at ε < ε'.
"""

from __future__ import annotations

import argparse
import hashlib
import math
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
sys.path.insert(0, str(ROOT / "tools"))
import dag_battery  # noqa: E402
import netgen  # noqa: E402
from netgen import Op, RefNet  # noqa: E402

import onnxlip  # noqa: E402
from onnxlip import joint, tight  # noqa: E402

SLACK = dag_battery.SLACK
FORWARD_TOL = dag_battery.FORWARD_TOL
EXACT_TOL = 1e-9  # float64 evaluations of the same float32 weights
LEVELS = (0.01, 0.05, 0.3, 1.0, 3.0, 10.0)  # radii relative to ||x0||
BUDGET_LEVELS = (0.3, 1.0, 3.0)
SPLIT_NOTE = "the joint bound of the blocks from"
F32 = np.float32

# ---------------------------------------------------------------------- the tail's J_k
# tight._split_joint calls tight.joint_bound once per tail it tries: wrapped (by bound(),
# at run time, onnxlip's files untouched) so that the battery knows each tail's value.
CALLS: list[tuple[int, int, float, float]] = []  # (blocks of the net bounded, forms, value, seconds)
_joint_bound = tight.joint_bound


def _spy(net, *args, **kwargs):
    start = time.perf_counter()
    result = _joint_bound(net, *args, **kwargs)
    CALLS.append((len(net.blocks), joint.search_side(net), float(result[0]), time.perf_counter() - start))
    return result



# ---------------------------------------------------------------------- networks


def _layer(rng, n_in: int, n_out: int, gain: float = 1.0) -> list[Op]:
    """netgen's dense layer (Gemm in either layout, alpha/beta, or MatMul + Add), its
    weights times `gain`."""
    ops = netgen._dense_layer(rng, n_in, n_out)
    ops[0].p["B"] = (ops[0].p["B"].astype(np.float64) * gain).astype(F32)
    return ops


def _add_to_bias(layer: list[Op], delta: np.ndarray) -> None:
    """Add delta to the layer's effective bias (Add's constant, or Gemm's beta·C)."""
    op = layer[-1]
    if op.kind == "add":
        op.p["c"] = (op.p["c"].astype(np.float64) + delta).astype(F32)
    else:
        c = op.p["C"]
        beta = float(F32(op.p.get("beta", 1.0)))
        op.p["C"] = (c.astype(np.float64) + (delta / beta).reshape(c.shape)).astype(F32)


def _widths(rng, depth: int, wide=(100, 400), narrow=(16, 80)) -> list[int]:
    """Hidden widths: wide layers, then 1-2 narrowing ones."""
    n_narrow = int(rng.integers(1, 3))
    n_wide = max(1, depth - n_narrow)
    wides = [int(rng.integers(*wide)) for _ in range(n_wide)]
    narrows = sorted((int(rng.integers(*narrow)) for _ in range(depth - n_wide)), reverse=True)
    return wides + narrows


def _mlp(rng, name: str, hidden: list[int], gains: list[float] | None = None,
         normalize: bool = False) -> tuple[RefNet, list[list[Op]], int]:
    """An MLP with these hidden widths; its layers (op lists) and the ops before the first."""
    n_in, n_out = int(rng.integers(8, 33)), int(rng.integers(3, 11))
    widths = [n_in, *hidden, n_out]
    gains = gains or [float(rng.uniform(0.7, 1.5)) for _ in widths[1:]]
    ops: list[Op] = []
    if normalize:
        ops += netgen._normalization(rng, (1, n_in), "feature" if rng.integers(2) else "scalar")
    lead = len(ops)
    layers = []
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        layer = _layer(rng, a, b, gains[i])
        layers.append(layer)
        ops += layer
        if i < len(widths) - 2:
            ops.append(Op("relu"))
    return RefNet((1, n_in), ops, name), layers, lead


def mlp_net(seed: int) -> tuple[RefNet, np.ndarray]:
    """A wide ReLU MLP (3-6 hidden layers of 100-400, narrowing at the end)."""
    rng = np.random.default_rng(31_000 + seed)
    net, _, _ = _mlp(rng, f"mlp{seed}", _widths(rng, int(rng.integers(3, 7))),
                     normalize=rng.integers(3) == 0)
    return net, rng.standard_normal(net.input_shape)


def deep_net(seed: int) -> tuple[RefNet, np.ndarray]:
    """5-7 hidden layers of 60-220 shrinking towards the output: tails of several layers."""
    rng = np.random.default_rng(32_000 + seed)
    depth = int(rng.integers(5, 8))
    top = int(rng.integers(160, 320))
    hidden = [max(12, int(top * rng.uniform(0.55, 0.9) ** i)) for i in range(depth)]
    net, _, _ = _mlp(rng, f"deep{seed}", hidden)
    return net, rng.standard_normal(net.input_shape)


def kink_net(seed: int) -> tuple[RefNet, np.ndarray]:
    """A wide MLP whose biases put a share of every hidden layer's units at x0 within
    0 (float32 rounding only), 1e-6, 1e-4 or 1e-2 (times the layer's typical
    pre-activation) of their kink, either side."""
    rng = np.random.default_rng(33_000 + seed)
    net, layers, lead = _mlp(rng, f"kink{seed}", _widths(rng, int(rng.integers(3, 6))))
    x0 = rng.standard_normal(net.input_shape)
    end = lead
    for layer in layers[:-1]:
        end += len(layer)
        pre = RefNet(net.input_shape, net.ops[:end])(x0)[0]
        share = rng.uniform(0.3, 1.0)
        pick = rng.random(pre.size) < share
        scale = float(np.median(np.abs(pre))) * rng.choice([0.0, 1e-6, 1e-4, 1e-2], pre.size)
        target = np.where(pick, scale * rng.choice([-1.0, 1.0], pre.size), pre)
        _add_to_bias(layer, target - pre)
        end += 1  # the ReLU
    return net, x0


def lopsided_net(seed: int) -> tuple[RefNet, np.ndarray]:
    """A wide MLP whose wide layers (the head of any split) have gains 0.05-0.3 and
    narrow ones (the tail) 2.5-6: a small head bound before a large tail (two
    seeds in three); the reverse otherwise."""
    rng = np.random.default_rng(34_000 + seed)
    hidden = _widths(rng, int(rng.integers(3, 7)))
    small_head = seed % 3 != 2
    gains = []
    for i in range(len(hidden) + 1):
        head = i < len(hidden) and hidden[i] >= 100
        low, high = (0.05, 0.3) if head == small_head else (2.5, 6.0)
        gains.append(float(rng.uniform(low, high)))
    net, _, _ = _mlp(rng, f"lopsided{seed}", hidden, gains)
    return net, rng.standard_normal(net.input_shape)


def _conv(rng, c_in: int, c_out: int) -> Op:
    return Op("conv", {"W": netgen.he(rng, (c_out, c_in, 3, 3), 9 * c_in),
                       "b": netgen.small(rng, c_out, 0.2), "strides": (1, 1), "pads": (1, 1, 1, 1),
                       "dilations": (1, 1), "group": 1})


def cnn_net(seed: int) -> tuple[RefNet, np.ndarray]:
    """Conv(3x3) + ReLU, optional 2x2 (or overlapping 3x3) max-pooling, an optional
    second Conv + ReLU, flatten, Gemm + ReLU (100-300), Gemm + ReLU (16-64), Gemm."""
    rng = np.random.default_rng(35_000 + seed)
    c, size = int(rng.integers(1, 4)), int(rng.integers(8, 15))
    shape = (1, c, size, size)
    m = int(rng.integers(4, 11))
    ops = [_conv(rng, c, m), Op("relu")]
    if rng.random() < 0.6:
        k = 2 if rng.random() < 0.7 else 3
        ops.append(Op("maxpool", {"kernel": (k, k), "strides": (2, 2), "pads": (0, 0, 0, 0)}))
    if rng.random() < 0.4:
        m2 = int(rng.integers(4, 9))
        ops += [_conv(rng, m, m2), Op("relu")]
    ops.append(Op("flatten"))
    flat = math.prod(netgen.apply_shapes(ops, shape)[1:])
    h1, h2, out = int(rng.integers(100, 301)), int(rng.integers(16, 65)), int(rng.integers(3, 11))
    ops += _layer(rng, flat, h1) + [Op("relu")] + _layer(rng, h1, h2) + [Op("relu")]
    ops += _layer(rng, h2, out)
    return RefNet(shape, ops, f"cnn{seed}"), rng.standard_normal(shape)


FAMILIES = {"mlp": mlp_net, "deep": deep_net, "kink": kink_net, "lopsided": lopsided_net,
            "cnn": cnn_net}


# ---------------------------------------------------------------------- checks


@dataclass
class Outcome:
    """One net's record (dag_battery.Outcome's, with the split's figures per radius)."""

    family: str
    seed: int
    name: str = ""
    units: int = 0
    points: int = 0
    seconds: float = 0.0
    violations: list[dict] = field(default_factory=list)
    notes: list[dict] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)

    def check(self, ok: bool, what: str, **values) -> None:
        if not ok:
            self.violations.append({"what": what, **values})


def prefix_ends(net: RefNet, engine: onnxlip.Network, x0: np.ndarray) -> list[int | None]:
    """Per block k, an op count i with net.ops[:i] computing block k's input (its values
    at x0 and at another point equal the engine's trace), None where none does."""
    probe = x0.ravel() + 0.5 * np.random.default_rng(1).standard_normal(x0.size)
    traces = [engine.trace(x0), engine.trace(probe)]
    values = [net.activations(x) for x in (x0, probe)]
    ends: list[int | None] = []
    for k in range(len(engine.blocks)):
        ends.append(next((i for i in range(len(net.ops) + 1)
                          if all(v[i].size == t.inputs[k].size and
                                 np.allclose(v[i].ravel(), t.inputs[k], rtol=1e-9, atol=1e-9)
                                 for v, t in zip(values, traces))), None))
    return ends


def factor_ascent(net: RefNet, prefix: RefNet, x0: np.ndarray, eps: float, starts: np.ndarray,
                  steps: int) -> tuple[float, int]:
    """Projected gradient ascent of ||f(x) − f(x0)|| / ||v(x) − v(x0)|| over the ball
    (v the prefix), numpy float64; the largest ratio and the evaluations."""
    x0 = x0.ravel()
    f0, v0 = net(x0[None])[0], prefix(x0[None])[0]

    def ratio(x):
        df, dv = net(x[None])[0] - f0, prefix(x[None])[0] - v0
        nf, nv = np.linalg.norm(df), np.linalg.norm(dv)
        if nf == 0 or nv == 0:
            return None
        r = nf / nv
        return r, (net.vjp(x, (df / nf)[None])[0] - r * prefix.vjp(x, (dv / nv)[None])[0]) / nv

    return dag_battery.climb(x0, eps, starts, steps, ratio)


def split_of(engine: onnxlip.Network, result, calls: list[tuple[int, int, float, float]]) -> dict | None:
    """The split behind a bound: its block k, g_k, J_k, the tail's forms, and the
    seconds of every joint bound tried (None if no split)."""
    notes = [n for n in result.notes if n.startswith(SPLIT_NOTE)]
    if not notes:
        return None
    k = next(i for i, b in enumerate(engine.blocks) if f"from {b.name} on" in notes[0])
    tails = [(forms, value) for n, forms, value, _ in calls if n == len(engine.blocks) - k]
    head = math.prod(r.bound for r in result.layers[:k])
    forms, value = tails[-1] if tails else (None, math.nan)
    return {"k": k, "block": engine.blocks[k].name, "blocks": len(engine.blocks), "head": head,
            "tail": value, "forms": forms, "large": forms is not None and forms > joint.FORMS_MAX,
            "tried": [{"blocks": n, "forms": f, "value": v, "seconds": round(t, 3)} for n, f, v, t in calls]}


def uncertain_share(result) -> float | None:
    counted = [r for r in result.layers if r.uncertain is not None]
    total = sum((r.active or 0) + (r.inactive or 0) + r.uncertain for r in counted)
    return sum(r.uncertain for r in counted) / total if total else None


def bound(engine: onnxlip.Network, x0: np.ndarray, eps: float, method: str = "auto") -> dict:
    """The local bound as plain values (a lower bound found later may re-solve the
    result in place): bound, source, split (method 'auto'), uncertain share, seconds."""
    tight.joint_bound = _spy
    CALLS.clear()
    start = time.perf_counter()
    result = engine.local_bound(x0, eps, method)
    return {"bound": float(result.bound), "source": result.source,
            "split": split_of(engine, result, list(CALLS)) if method == "auto" else None,
            "uncertain": uncertain_share(result), "seconds": time.perf_counter() - start}


def check_split(out: Outcome, name: str, split: dict, value: float, net: RefNet,
                ends: list[int | None], x0: np.ndarray, eps: float, points: np.ndarray,
                ascent_steps: int, where: dict) -> int:
    """The split's bound is g_k · J_k and each factor holds at the points (and J_k
    after an ascent of its ratio); the evaluations spent."""
    out.check(math.isfinite(split["tail"]) and
              abs(value - split["head"] * split["tail"]) <= 1e-9 * value,
              f"{name}: split bound is not head x tail", **where, split=split)
    end = ends[split["k"]]
    if end is None:
        out.check(False, f"{name}: block input not found among the net's ops", **where, split=split)
        return 0
    prefix = RefNet(net.input_shape, net.ops[:end])
    x0 = x0.ravel()
    f0, v0 = net(x0[None])[0], prefix(x0[None])[0]
    dx = np.linalg.norm(points - x0, axis=1)
    dv = np.linalg.norm(prefix(points) - v0, axis=1)
    df = np.linalg.norm(net(points) - f0, axis=1)
    noise_f, noise_v = 1e-12 * (1 + np.linalg.norm(f0)), 1e-12 * (1 + np.linalg.norm(v0))
    head_ratio = float(np.max(np.maximum(dv - noise_v, 0) / dx))
    moved = dv > noise_v
    tail_ratios = np.maximum(df[moved] - noise_f, 0) / dv[moved]
    tail_ratio = float(tail_ratios.max(initial=0.0))
    starts = points[moved][np.argsort(tail_ratios)[-3:]] if moved.any() else points[:0]
    climbed, evaluations = factor_ascent(net, prefix, x0, eps, starts, ascent_steps)
    split.update(head_sampled=head_ratio, tail_sampled=tail_ratio, tail_ascent=climbed)
    out.check(head_ratio <= split["head"] * (1 + SLACK), f"{name}: head factor exceeded",
              **where, split=split)
    out.check(max(tail_ratio, climbed) <= split["tail"] * (1 + SLACK),
              f"{name}: tail factor exceeded", **where, split=split)
    return 3 * len(points) + evaluations


def run_one(family: str, seed: int, workdir: Path, samples: int, ascent_steps: int,
            budget: float) -> Outcome:
    out = Outcome(family, seed)
    start = time.perf_counter()
    net, x0 = FAMILIES[family](seed)
    out.name = net.name
    path = net.save(workdir / f"{net.name}.onnx")
    engine = onnxlip.load(path, seed=seed)
    budgeted = onnxlip.load(path, seed=seed, time_budget=budget) if budget > 0 else None
    out.units = sum(b.out_size for b in engine.blocks[:-1])
    twin = netgen.float64_twin(path)
    x0 = x0.ravel().astype(np.float64)
    # the engine's float64 pass against the float64 evaluations; onnxruntime's float32
    # one may be further off (kink nets cancel: 1.7e-5 relative on kink35), a note
    y_twin, y_ort = twin(x0[None])[0], netgen.ort_run(netgen.ort_session(path), x0)
    out.check(netgen.rel_err(engine.forward(x0), y_twin) <= EXACT_TOL, "forward pass vs the float64 twin",
              rel_err=netgen.rel_err(engine.forward(x0), y_twin))
    out.check(netgen.rel_err(net(x0[None])[0], y_twin) <= EXACT_TOL, "numpy net vs the float64 twin")
    if netgen.rel_err(y_twin, y_ort) > FORWARD_TOL:
        out.notes.append({"what": "onnxruntime's float32 pass off the float64 one",
                          "rel_err": netgen.rel_err(y_twin, y_ort)})
    ends = prefix_ends(net, engine, x0)
    radii = [level * float(np.linalg.norm(x0)) for level in LEVELS]
    # upper bounds first, as plain floats (a lower bound found later may re-solve them)
    plain = [bound(engine, x0, eps) for eps in radii]
    paper = [bound(engine, x0, eps, "paper")["bound"] for eps in radii]
    budgeted_rows = [bound(budgeted, x0, eps) if budgeted and level in BUDGET_LEVELS else None
                     for level, eps in zip(LEVELS, radii)]
    jacobian, jac_norm, directions, search = dag_battery.probes(engine, x0, seed, out)
    rng = np.random.default_rng(seed)
    for k, (level, eps) in enumerate(zip(LEVELS, radii)):
        points, sampled, climbed, lower = dag_battery.ratios_found(
            engine, twin, x0, eps, rng, directions, search, samples, ascent_steps, out)
        auto, rich = plain[k], budgeted_rows[k]
        row = {"level": level, "eps": eps, "auto": auto["bound"], "paper": paper[k],
               "source": auto["source"], "split": auto["split"], "uncertain": auto["uncertain"],
               "seconds": auto["seconds"], "sampled": sampled, "ascent": climbed, "lower": lower,
               "jacobian": jac_norm}
        where = {"level": level, "eps": eps, "auto": auto["bound"], "paper": paper[k],
                 "sampled": sampled, "ascent": climbed, "lower": lower, "jacobian": jac_norm}
        uppers = [("auto", auto)]
        if rich is not None:
            row.update(budgeted=rich["bound"], budgeted_source=rich["source"],
                       budgeted_split=rich["split"], budgeted_seconds=rich["seconds"])
            where["budgeted"] = rich["bound"]
            uppers.append((f"auto (time_budget={budget:g})", rich))
        out.rows.append(row)
        found = max(sampled, climbed, lower)
        for name, upper in uppers:
            value = upper["bound"]
            out.check(found <= value * (1 + SLACK), f"{name}: a ratio found above the bound", **where)
            if jacobian.ties == 0:  # J(x0) is the exact Jacobian there
                out.check(jac_norm <= value * (1 + SLACK), f"{name}: ||J(x0)|| above the bound", **where)
            out.check(value <= paper[k] * (1 + 2 * engine.tol), f"{name}: above paper", **where)
            if upper["split"] is not None:
                out.points += check_split(out, name, upper["split"], value, net, ends, x0, eps, points,
                                          ascent_steps, where)
        if rich is not None:
            if rich["bound"] > auto["bound"] * (1 + SLACK):
                out.notes.append({"what": "budgeted bound above the unbudgeted one", **where})
            if rich["seconds"] > 2 * budget:
                out.notes.append({"what": "budgeted bound took over twice its budget",
                                  "seconds": rich["seconds"], **where})
        if k and out.rows[k - 1]["auto"] > auto["bound"] * (1 + SLACK):
            out.notes.append({"what": "auto L(eps) above auto L(eps') for a larger eps'",
                              "previous": out.rows[k - 1]["auto"], **where})
    out.seconds = time.perf_counter() - start
    return out


def _fingerprint() -> str:
    """A digest of onnxlip's sources (someone else may edit them during a run)."""
    digest = hashlib.sha256()
    for path in sorted((ROOT / "onnxlip").rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _median(values: list[float]) -> float | None:
    return float(np.median(values)) if values else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="*", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--seeds", type=int, default=12, help="seeds per family")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--samples", type=int, default=300,
                        help="points on the sphere and inside the ball, each, per radius")
    parser.add_argument("--ascent-steps", type=int, default=12)
    parser.add_argument("--budget", type=float, default=3.0,
                        help="time_budget (seconds) of the budgeted runs; 0: none")
    parser.add_argument("--budget-every", type=int, default=3,
                        help="the budgeted run on every n-th seed of each family")
    parser.add_argument("--json", help="write every net's record here")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="tail_battery_"))
    fingerprint = _fingerprint()
    outcomes: list[Outcome] = []
    start = time.perf_counter()
    for family in args.families:
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            budget = args.budget if args.budget > 0 and (seed - args.first_seed) % args.budget_every == 0 \
                else 0.0
            try:
                outcome = run_one(family, seed, workdir, args.samples, args.ascent_steps, budget)
            except Exception as exc:  # an error is a finding too: record it, go on
                outcome = Outcome(family, seed)
                outcome.check(False, "error", error=f"{type(exc).__name__}: {exc}")
            outcomes.append(outcome)
            splits = sum(r["split"] is not None for r in outcome.rows)
            rich = sum(r.get("budgeted_split") is not None for r in outcome.rows)
            print(f"{family} {seed} {outcome.name}: {outcome.units} units, split at {splits}/"
                  f"{len(outcome.rows)} radii (+{rich} budgeted), {outcome.points} points, "
                  f"{len(outcome.violations)} violations, {outcome.seconds:.1f} s", file=sys.stderr)
            for v in outcome.violations:
                print(f"VIOLATION {family} seed {seed}: {v}", file=sys.stderr)
    seconds = time.perf_counter() - start
    violations = [v for o in outcomes for v in o.violations]
    rows = [r for o in outcomes for r in o.rows]
    split_rows = [r for r in rows if r["split"]]
    rich_rows = [r for r in rows if "budgeted" in r]
    rich_split = [r for r in rich_rows if r["budgeted_split"]]
    summary = {
        "nets": len(outcomes),
        "nets_with_split": sum(any(r["split"] or r.get("budgeted_split") for r in o.rows)
                               for o in outcomes),
        "radii": len(rows), "bounds": len(rows) + len(rich_rows),
        "split_bounds": len(split_rows),
        "split_bounds_by_family": dict(Counter(o.family for o in outcomes for r in o.rows if r["split"])),
        "split_bounds_by_level": {str(level): sum(1 for r in split_rows if r["level"] == level)
                                  for level in LEVELS},
        "budgeted_bounds": len(rich_rows), "budgeted_split_bounds": len(rich_split),
        "budgeted_large_tails": sum(r["budgeted_split"]["large"] for r in rich_split),
        "points": sum(o.points for o in outcomes),
        "violations": len(violations), "by_kind": dict(Counter(v["what"] for v in violations)),
        "notes": dict(Counter(n["what"] for o in outcomes for n in o.notes)),
        "median_auto_over_paper_split": _median([r["auto"] / r["paper"] for r in split_rows]),
        "median_budgeted_over_paper_split": _median(
            [r["budgeted"] / r["paper"] for r in rich_split]),
        "median_auto_over_found_split": _median(
            [r["auto"] / max(r["sampled"], r["ascent"], r["lower"]) for r in split_rows]),
        "median_tail_over_tail_found": _median(
            [r["split"]["tail"] / r["split"]["tail_ascent"] for r in split_rows
             if r["split"].get("tail_ascent")]),
        "median_uncertain_share_split": _median([r["uncertain"] for r in split_rows
                                                 if r["uncertain"] is not None]),
        "tail_forms": [min((r["split"]["forms"] for r in split_rows), default=None),
                       max((r["split"]["forms"] for r in split_rows), default=None)],
        "max_budgeted_seconds": max((r["budgeted_seconds"] for r in rich_rows), default=None),
        "onnxlip_changed_during_run": _fingerprint() != fingerprint,
        "seconds": round(seconds, 1),
    }
    return dag_battery.report(summary, outcomes, args.json)


if __name__ == "__main__":
    sys.exit(main())
