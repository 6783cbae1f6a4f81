"""Rerun the paper's experiment on the authors' networks (--reference DIR).

    python tools/reproduce.py [--reference DIR] [--out tools/reproduction]

For every published ε: our local bound, the published one and their ratio,
our lower bounds, and the global bound. Writes a Markdown report with the
tables and one sweep plot per network into --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import onnxlip  # noqa: E402
from onnxlip.report import table  # noqa: E402
from onnxlip.sweep import plot, run_sweep  # noqa: E402

HERE = Path(__file__).resolve().parent
REFERENCE = HERE.parents[1] / "shared" / "reference"
NETWORKS = {"mnist_avant": "MNIST (LeNet)", "cifar10_avant": "CIFAR-10"}


def reproduce(reference: Path, name: str, out: Path) -> tuple[str, dict]:
    published = json.loads((reference / f"{name}_published.json").read_text())
    x0 = np.load(reference / f"{name}_x0.npy")
    net = onnxlip.load(reference / f"{name}.onnx")
    start = time.perf_counter()
    net.local_bound(x0, published["eps"][0], method="paper")
    single_s = time.perf_counter() - start
    sweep = run_sweep(net, x0, published["eps"], lower=True, input_name=f"{name}_x0.npy", method="paper")
    plot(sweep, out / f"{name}_sweep.png",
         title=f"{NETWORKS[name]}: {name}.onnx, x0 = {name}_x0.npy")
    rows, ratios = [], []
    for p, ref in zip(sweep.points, published["local_bound"]):
        ratios.append(p.local.bound / ref)
        rows.append([p.eps, p.local.bound, ref, ratios[-1], p.lower.best, p.lower.jacobian_norm,
                     p.local.bound / p.lower.best, sweep.global_bound])
    summary = {
        "network": name, "ratio_min": min(ratios), "ratio_max": max(ratios),
        "global_bound": sweep.global_bound, "published_global_bound": published["global_bound"],
        "jacobian_norm": sweep.points[0].lower.jacobian_norm,
        "published_jacobian_norm": published["jacobian_norm_at_x0"],
        "single_bound_s": single_s, "sweep_upper_s": sweep.upper_seconds,
        "sweep_total_s": sweep.seconds, "lower_never_above_local": all(
            p.lower.best <= p.local.bound for p in sweep.points),
    }
    headers = ["eps", "ours", "published", "ours/published", "lower bound", "||J(x0)||",
               "ours/lower", "global"]
    text = (f"## {NETWORKS[name]} (`{name}.onnx`)\n\n"
            f"Global bound: ours {sweep.global_bound:.6g}, published {published['global_bound']:.6g} "
            f"(ratio {sweep.global_bound / published['global_bound']:.4f}). "
            f"||J(x0)||: ours {summary['jacobian_norm']:.6g}, published "
            f"{published['jacobian_norm_at_x0']:.6g}.\n\n"
            f"Local bound / published over the 30 radii: {min(ratios):.4f} to {max(ratios):.4f}. "
            f"One bound took {single_s:.3g} s; the 30 upper bounds {sweep.upper_seconds:.3g} s; "
            f"the whole sweep with lower bounds {sweep.seconds:.3g} s.\n\n"
            f"![{name} sweep]({name}_sweep.png)\n\n```\n{table(headers, rows)}\n```\n")
    return text, summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", type=Path, default=REFERENCE)
    parser.add_argument("--out", type=Path, default=HERE / "reproduction")
    args = parser.parse_args()
    if not (args.reference / "mnist_avant.onnx").is_file():
        print(f"reproduce: no reference networks in {args.reference}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    sections, summaries = [], []
    for name in NETWORKS:
        text, summary = reproduce(args.reference, name, args.out)
        print(text)
        sections.append(text)
        summaries.append(summary)
    header = ("# The paper's experiment, reproduced\n\nMade by `python tools/reproduce.py` from "
              "the authors' networks (not distributed with onnxlip). *ours/lower* is how far the "
              "upper bound is above the best lower bound of the truth.\n\n")
    (args.out / "README.md").write_text(header + "\n".join(sections))
    (args.out / "summary.json").write_text(json.dumps(summaries, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
