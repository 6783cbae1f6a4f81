"""Soundness and gain of the joint bound's refinement (--budget) on nets with exact
max-pooling ties (tests/netgen.py's tie_net: conv, ReLU, 2x2 max-pooling over a
constant background, two Gemm layers).

    python tools/tie_battery.py                          # seeds 0-39, ε 1e-4 1e-3 1e-2, 5 s each
    python tools/tie_battery.py --seeds 0 100 --budget 10 --json out.json

For every net and radius: the `auto` bound without and with the refinement, the
largest ratio ||f(x) − f(x0)|| / ||x − x0|| gradient ascent on the ratio finds
in float64 (the net's twin, from random directions at random radii), and
onnxlip's own lower bound. A violation is a ratio or lower bound above either
bound (relative slack 1e-6) or the refined bound above the plain one.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
import netgen  # noqa: E402

import onnxlip  # noqa: E402

SLACK = 1e-6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs=2, default=(0, 40), metavar=("FIRST", "END"))
    parser.add_argument("--eps", type=float, nargs="+", default=[1e-4, 1e-3, 1e-2])
    parser.add_argument("--budget", type=float, default=5.0, help="seconds per refined bound")
    parser.add_argument("--json", help="write every record to this file")
    args = parser.parse_args(argv)
    records, violations = [], 0
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(*args.seeds):
            net, x0 = netgen.tie_net(seed)
            path = net.save(Path(tmp) / f"tie{seed}.onnx")
            plain = onnxlip.load(path, seed=0)
            refined = onnxlip.load(path, seed=0, time_budget=args.budget)
            rng = np.random.default_rng(seed)
            for eps in args.eps:
                before = plain.local_bound(x0, eps)
                start = time.perf_counter()
                after = refined.local_bound(x0, eps)
                seconds = time.perf_counter() - start
                found = netgen.ratio_ascent(net, x0, eps, rng)
                lower = refined.lower_bounds(x0, [eps], samples=32, ascent_steps=20)[0].best
                low = max(found, lower if lower == lower else 0.0)
                bad = low > after.bound * (1 + SLACK) or low > before.bound * (1 + SLACK) or \
                    after.bound > before.bound * (1 + SLACK)
                violations += bad
                record = dict(seed=seed, eps=eps, plain=before.bound, refined=after.bound,
                              source=after.source, ascent=found, lower=lower, seconds=seconds,
                              violation=bool(bad))
                records.append(record)
                print(f"tie{seed:<3d} eps {eps:<7g} plain {before.bound:<10.5g} refined {after.bound:<10.5g}"
                      f" ({after.source}, {seconds:5.1f} s)  ascent {found:<10.5g} lower {lower:<10.5g}"
                      f"{'  VIOLATION' if bad else ''}", flush=True)
    gains = [r["plain"] / r["refined"] for r in records if r["refined"] < r["plain"]]
    over = [r["refined"] / max(r["ascent"], r["lower"]) for r in records if r["ascent"] > 0]
    print(f"{len(records)} bounds, {violations} violations; refined lower in {len(gains)}"
          f" (median gain {np.median(gains) if gains else 1.0:.3f}x, largest {max(gains, default=1.0):.3f}x);"
          f" refined / best lower: median {np.median(over):.3f}, largest {max(over):.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=1))
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
