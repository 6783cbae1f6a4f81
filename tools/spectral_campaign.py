"""Randomized campaign of the certified spectral norms (onnxlip.spectral) on hard spectra.

    python tools/spectral_campaign.py                      # 1,000 spectra, default solver
    python tools/spectral_campaign.py --count 3000 --seed 2 --max-n 1000000 --tol 1e-2

Families (each spectrum's exact norm is known in float64): a cluster at 1 with
one outlier 1 + δ (exact cluster, or spread over 1e-6..1e-2), geometric decays,
near-ties at the top (gaps 1e-12..1e-4), uniform and power-law dense tops,
dense operators whose top eigenvector is orthogonal to a fixed vector (the old
solver's start), and onnxruntime float32 convolutions on long vectors (a
two-tap 1-D kernel, whose norm is sqrt(a² + b² + 2|ab|cos(π/n))). Prints
shortfalls (bound below the exact norm: must be 0) and the largest bound/exact
(the acceptance is ≤ 1.02), per family.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from onnxlip.bounds import gram_error  # noqa: E402
from onnxlip.operators.conv import ConvMap  # noqa: E402
from onnxlip.spectral import DEFAULT_TOL, Solver, gram_norm  # noqa: E402

FAMILIES = ("cluster_outlier", "geometric", "near_tie", "dense_top", "adversarial_start",
            "float32_conv")


def _size(rng, max_n: int) -> int:
    """Log-uniform sizes, one in twenty at the largest."""
    if rng.uniform() < 0.05:
        return max_n
    return int(math.exp(rng.uniform(math.log(1000), math.log(max_n))))


def spectrum(family: str, rng: np.random.Generator, max_n: int):
    """(gram operator, n, exact norm, description) of one random case."""
    n = _size(rng, max_n)
    if family == "cluster_outlier":
        delta = 10 ** rng.uniform(-3, math.log10(0.3))
        spread = 0.0 if rng.uniform() < 0.5 else 10 ** rng.uniform(-6, -2)
        d = 1.0 - spread * rng.uniform(size=n)
        d[rng.integers(n)] = 1.0 + delta
        return _diagonal(d, f"n={n} delta={delta:.2g} spread={spread:.1g}")
    if family == "geometric":
        ratio = 1 - 10 ** rng.uniform(-4, -0.5)
        d = ratio ** rng.permutation(n).astype(float)
        return _diagonal(d, f"n={n} ratio={ratio:.6f}")
    if family == "near_tie":
        gap = 10 ** rng.uniform(-12, -4)
        d = rng.uniform(0, 1 - 10 * gap, size=n)
        top = rng.choice(n, size=int(rng.integers(2, 6)), replace=False)
        d[top] = 1.0 - gap * rng.uniform(size=top.size)
        d[top[0]] = 1.0
        return _diagonal(d, f"n={n} gap={gap:.1g}")
    if family == "dense_top":
        power = 10 ** rng.uniform(-2, 0)
        d = rng.uniform(size=n) ** power
        return _diagonal(d, f"n={n} power={power:.3g}")
    if family == "adversarial_start":
        m = int(rng.integers(100, 800))
        fixed = np.random.default_rng(0).standard_normal(m)
        q, _ = np.linalg.qr(np.column_stack([fixed, rng.standard_normal((m, m - 1))]))
        d = rng.uniform(0, 1, size=m) ** 0.3
        d[0] = 0.5 * d.min()  # the fixed vector is the eigenvector of (almost) the least eigenvalue
        top = int(rng.integers(1, m))
        d[top] = 1.0
        b = (q * d) @ q.T
        return (lambda x: b @ x), m, float(np.sqrt(np.linalg.eigvalsh(b)[-1])), (0.0, 0.0), f"m={m}"
    if family == "float32_conv":
        a, b = rng.standard_normal(2)
        w = np.array([[[a, b]]], dtype=np.float32)
        conv = ConvMap(w, (1, 1, n), (1,), (0, 0), (1,), 1)
        a, b = float(w[0, 0, 0]), float(w[0, 0, 1])
        exact = math.sqrt(a * a + b * b + 2 * abs(a * b) * math.cos(math.pi / n))
        return (lambda x: conv.rmatvec(conv.matvec(x))), n, exact, gram_error(conv, 1.0), \
            f"n={n} taps=({a:.3f}, {b:.3f})"
    raise ValueError(family)


def _diagonal(d: np.ndarray, text: str):
    return (lambda x: d * x), d.size, float(math.sqrt(d.max())), (0.0, 0.0), text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1000, help="spectra (1000)")
    parser.add_argument("--seed", type=int, default=1, help="campaign seed (1)")
    parser.add_argument("--max-n", type=int, default=1_000_000, help="largest size (10^6)")
    parser.add_argument("--tol", type=float, default=DEFAULT_TOL, help="solver tolerance")
    parser.add_argument("--delta", type=float, default=1e-9, help="failure probability per solve")
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    stats = defaultdict(lambda: {"cases": 0, "shortfalls": 0, "worst": 0.0, "steps": 0, "seconds": 0.0})
    start = time.perf_counter()
    for i in range(args.count):
        family = FAMILIES[i % len(FAMILIES)]
        gram, n, exact, error, text = spectrum(family, rng, args.max_n)
        tic = time.perf_counter()
        result = gram_norm(gram, n, Solver(tol=args.tol, delta=args.delta, seed=args.seed * 10**6 + i),
                           error=error)
        row = stats[family]
        row["cases"] += 1
        row["steps"] += result.iterations
        row["seconds"] += time.perf_counter() - tic
        ratio = result.value / exact
        row["worst"] = max(row["worst"], ratio)
        if result.value < exact:
            row["shortfalls"] += 1
            print(f"SHORTFALL {family} {text}: bound {result.value!r} < exact {exact!r}", flush=True)
        if (i + 1) % 100 == 0 and i + 1 < args.count:  # a running summary: long campaigns get cut
            summary(stats, i + 1, args, time.perf_counter() - start, file=sys.stderr)
    return summary(stats, args.count, args, time.perf_counter() - start, file=sys.stdout)


def summary(stats: dict, count: int, args, seconds: float, file) -> int:
    """Print the per-family table; 1 if any shortfall or a bound above 1.02x, else 0."""
    print(f"{'family':18s} {'cases':>6s} {'shortfalls':>10s} {'max bound/exact':>16s} "
          f"{'mean steps':>10s} {'seconds':>8s}", file=file)
    for family in FAMILIES:
        row = stats[family]
        print(f"{family:18s} {row['cases']:6d} {row['shortfalls']:10d} {row['worst']:16.6f} "
              f"{row['steps'] / max(row['cases'], 1):10.1f} {row['seconds']:8.1f}", file=file)
    total = sum(r["shortfalls"] for r in stats.values())
    worst = max(r["worst"] for r in stats.values())
    print(f"total: {count} spectra, {total} shortfalls, max bound/exact {worst:.6f}, "
          f"tol {args.tol:g}, delta {args.delta:g}, {seconds:.0f} s", file=file, flush=True)
    return 1 if total or worst > 1.02 else 0


if __name__ == "__main__":
    sys.exit(main())
