"""Rerun the paper's experiment on the authors' networks (--reference DIR).

    python tools/reproduce.py [--reference DIR] [--out tools/reproduction]

For every published ε: our local bound by the paper's method, the published
one and their ratio, our lower bounds, the global bound, and the default
method's (`auto`) bound beside them. Writes a Markdown report with the tables
and one sweep plot per network into --out.

The paper's method runs at the spectral tolerance REPRODUCE_TOL: the published
values are 100 power iterations, below the truth (by up to 0.8% on CIFAR-10),
while every certified bound is above it, by up to the tolerance per Lanczos
block; at the default 1e-3 CIFAR-10's four such blocks put the bounds up to
1.15% above the published ones (2026-11-29), at 2e-4 up to 0.9%.
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
#: The paper's method's spectral tolerance here (see the docstring).
REPRODUCE_TOL = 2e-4


def reproduce(reference: Path, name: str, out: Path) -> tuple[str, dict]:
    published = json.loads((reference / f"{name}_published.json").read_text())
    x0 = np.load(reference / f"{name}_x0.npy")
    net = onnxlip.load(reference / f"{name}.onnx", tol=REPRODUCE_TOL)
    start = time.perf_counter()
    net.local_bound(x0, published["eps"][0], method="paper")
    single_s = time.perf_counter() - start
    sweep = run_sweep(net, x0, published["eps"], lower=True, input_name=f"{name}_x0.npy", method="paper")
    plot(sweep, out / f"{name}_sweep.png",
         title=f"{NETWORKS[name]}: {name}.onnx, x0 = {name}_x0.npy")
    start = time.perf_counter()
    auto = onnxlip.load(reference / f"{name}.onnx").local_bounds(x0, published["eps"])  # the defaults
    auto_s = time.perf_counter() - start
    rows, ratios, auto_ratios = [], [], []
    for p, ref, a in zip(sweep.points, published["local_bound"], auto):
        ratios.append(p.local.bound / ref)
        auto_ratios.append(a.bound / ref)
        rows.append([p.eps, p.local.bound, ref, ratios[-1], a.bound, auto_ratios[-1], a.source,
                     p.lower.best, p.lower.jacobian_norm, a.bound / p.lower.best, sweep.global_bound])
    summary = {
        "network": name, "ratio_min": min(ratios), "ratio_max": max(ratios),
        "global_bound": sweep.global_bound, "published_global_bound": published["global_bound"],
        "jacobian_norm": sweep.points[0].lower.jacobian_norm,
        "published_jacobian_norm": published["jacobian_norm_at_x0"],
        "single_bound_s": single_s, "sweep_upper_s": sweep.upper_seconds,
        "sweep_total_s": sweep.seconds, "lower_never_above_local": all(
            p.lower.best <= p.local.bound for p in sweep.points),
        "tol": REPRODUCE_TOL, "auto_over_published": auto_ratios, "auto_s": auto_s,
        "lower_never_above_auto": all(p.lower.best <= a.bound for p, a in zip(sweep.points, auto)),
    }
    headers = ["eps", "ours", "published", "ours/published", "auto", "auto/published", "from",
               "lower bound", "||J(x0)||", "auto/lower", "global"]
    text = (f"## {NETWORKS[name]} (`{name}.onnx`)\n\n"
            f"Global bound: ours {sweep.global_bound:.6g}, published {published['global_bound']:.6g} "
            f"(ratio {sweep.global_bound / published['global_bound']:.4f}). "
            f"||J(x0)||: ours {summary['jacobian_norm']:.6g}, published "
            f"{published['jacobian_norm_at_x0']:.6g}.\n\n"
            f"Local bound (the paper's method, tol {REPRODUCE_TOL:g}) / published over the 30 "
            f"radii: {min(ratios):.4f} to {max(ratios):.4f}. One bound took {single_s:.3g} s; the "
            f"30 upper bounds {sweep.upper_seconds:.3g} s; the whole sweep with lower bounds "
            f"{sweep.seconds:.3g} s. The default method (`auto`, default settings) / published: "
            f"{min(auto_ratios):.4f} to {max(auto_ratios):.4f}, the 30 bounds in {auto_s:.3g} s.\n\n"
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
              "the authors' networks (not distributed with onnxlip). *ours* is the paper's method "
              f"(spectral tolerance {REPRODUCE_TOL:g}), *auto* onnxlip's default method at its "
              "default settings, *from* what produced it, *auto/lower* how far it is above the "
              "best lower bound of the truth.\n\n")
    (args.out / "README.md").write_text(header + "\n".join(sections))
    (args.out / "summary.json").write_text(json.dumps(summaries, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
