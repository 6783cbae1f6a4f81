"""How close the default method gets to the truth, all in one run.

    python tools/tightness.py [--reference DIR] [--json out.json] [--budget BYTES]

For the reference networks (at every published ε), the shipped models and the
tight set (at ε = 1e-3): `auto` (the default), `paper`, and the best lower
bound found by evaluations (sampling, gradient ascent, ||J(x0)|| where no
neuron or window is tied at x0); the ratios auto/lower and paper/auto; what
produced each auto bound; seconds per bound; certified radii of each
reference x0 with both methods and the attack distance.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import onnxlip  # noqa: E402
from onnxlip.report import table  # noqa: E402

HERE = Path(__file__).resolve().parent
REFERENCE = HERE.parents[1] / "shared" / "reference"
MODELS = HERE.parent / "models"
SHIPPED = ["tight_mlp6x50", "tight_mlp6x50_matmul", "tight_cnn_maxpool", "tight_cnn_avgpool",
           "tight_cnn_bn", "digits_mlp", "digits_cnn", "cifar_bn", "digits_resnet_ts"]


def timed(func):
    start = time.perf_counter()
    value = func()
    return value, time.perf_counter() - start


def compare(net, x0, eps_values, samples: int, steps: int) -> list[dict]:
    """auto, paper and the best lower bound at each radius."""
    nominal = net.trace(x0)
    search = net.lower_bound_search(x0)
    rows = []
    for eps in eps_values:
        auto, auto_s = timed(lambda e=eps: net.local_bound_from(nominal, e, "auto"))
        paper, paper_s = timed(lambda e=eps: net.local_bound_from(nominal, e, "paper"))
        lower = search.at(eps, samples, steps)
        rows.append({"eps": eps, "auto": auto.bound, "source": auto.source, "paper": paper.bound,
                     "lower": lower.best, "ties": search.ties, "jacobian_norm": search.jacobian_norm,
                     "auto_over_lower": auto.bound / lower.best if lower.best else None,
                     "paper_over_auto": paper.bound / auto.bound, "auto_s": auto_s, "paper_s": paper_s,
                     "uncertain": [r.uncertain for r in auto.layers], "notes": auto.notes})
    return rows


def certified(net, x0) -> dict:
    out = {}
    for method in ("auto", "paper"):
        cert, seconds = timed(lambda m=method: net.certify(x0, method=m))
        out[method] = {"radius": cert.radius_local, "by": cert.radius_test, "attack": cert.attack_distance,
                       "seconds": seconds}
    return out


def show(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    print(table(["eps", "auto", "from", "paper", "lower", "auto/lower", "paper/auto", "auto s"],
                [[r["eps"], r["auto"], r["source"], r["paper"], r["lower"], r["auto_over_lower"],
                  r["paper_over_auto"], r["auto_s"]] for r in rows]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", type=Path, default=REFERENCE)
    parser.add_argument("--budget", type=float, default=1e9, help="memory budget of the reach analysis")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--json", help="also write everything to this file")
    args = parser.parse_args()
    report = {"load_average": os.getloadavg(), "budget": args.budget, "reference": {}, "models": {}}
    for name in ("mnist_avant", "cifar10_avant"):
        path = args.reference / f"{name}.onnx"
        if not path.is_file():
            print(f"{name}: not found under {args.reference}, skipped")
            continue
        published = json.loads((args.reference / f"{name}_published.json").read_text())
        net = onnxlip.load(path, memory_budget=args.budget)
        x0 = np.load(args.reference / f"{name}_x0.npy")
        rows = compare(net, x0, published["eps"], args.samples, args.steps)
        third = rows[: len(rows) // 3]
        summary = {"never_above_paper": all(r["auto"] <= r["paper"] for r in rows),
                   "min_paper_over_auto_first_third": min(r["paper_over_auto"] for r in third),
                   "certify": certified(net, x0)}
        report["reference"][name] = {"rows": rows, "summary": summary}
        show(f"{name} (published radii)", rows)
        print(json.dumps(summary))
    for name in SHIPPED:
        path = MODELS / f"{name}.onnx"
        if not path.is_file():
            continue
        net = onnxlip.load(path, memory_budget=args.budget)
        rows = compare(net, np.load(MODELS / f"{name}_x0.npy"), [1e-3], args.samples, args.steps)
        report["models"][name] = rows
        show(name, rows)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
