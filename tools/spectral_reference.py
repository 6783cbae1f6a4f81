"""Each block's certified global norm against a float64 reference, for one network.

    python tools/spectral_reference.py alexnet            # from $ONNXLIP_CACHE or ~/.cache/onnxlip
    python tools/spectral_reference.py path/to/model.onnx --blocks features.0 classifier.1
    python tools/spectral_reference.py vgg16 --blocks features.24 --json ref.json
    python tools/spectral_reference.py vgg16 --blocks features.24 --references ref.json \
        --solver-tol 2.5e-3 --delta 1e-6   # other solver settings against the same references

For every affine block (each part of one that reads several): the certified
norm onnxlip's global bound uses (bounds.masked_norm, unmasked: LAPACK, a proven
cap, or certified Lanczos at the default tolerance and delta) and a reference
computed apart: ARPACK (scipy.sparse.linalg.eigsh, tol 1e-12 by default) on the
smaller Gram operator with float64 products (convolutions by numpy with the
model's kernel, float32 matrices widened exactly), started from its own random
vector. Prints the ratio certified / reference per block: it must be ≥ 1 (the
reference is a Ritz value, below the norm up to its tolerance) and the
acceptance is ≤ 1.01. Exit status 1 when a block falls outside [1, 1.01].
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
from scipy.sparse.linalg import LinearOperator, eigsh

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import onnxlip  # noqa: E402
from onnxlip import bounds  # noqa: E402
from onnxlip.blocks import AffineBlock  # noqa: E402
from onnxlip.operators.base import LinearMap  # noqa: E402
from onnxlip.operators.conv import ConvMap  # noqa: E402
from onnxlip.operators.matrix import DenseMap  # noqa: E402
from onnxlip.report import table  # noqa: E402

CACHE = Path(os.environ.get("ONNXLIP_CACHE", Path.home() / ".cache" / "onnxlip"))


def float64_products(part: LinearMap):
    """(A x, Aᵀ u) in float64 for the reference, or None where too large to form."""
    if isinstance(part, ConvMap):
        return part.float64_matvec, part.float64_rmatvec
    if isinstance(part, DenseMap):
        weight = part.weight.astype(np.float64)
        return (lambda x: weight @ x), (lambda u: weight.T @ u)
    if part.sparse_nnz_estimate() <= 5e7:
        matrix = part.to_sparse()
        return (lambda x: matrix @ x), (lambda u: matrix.T @ u)
    return None


def reference_norm(part: LinearMap, tol: float, seed: int) -> tuple[float, float]:
    """(σ from ARPACK on the smaller Gram operator in float64, its relative residual)."""
    products = float64_products(part)
    if products is None:
        return math.nan, math.nan
    forward, adjoint = products
    if part.out_size < part.in_size:
        size, gram = part.out_size, (lambda u: forward(adjoint(u)))
    else:
        size, gram = part.in_size, (lambda x: adjoint(forward(x)))
    operator = LinearOperator((size, size), matvec=lambda v: gram(np.ravel(v)), dtype=np.float64)
    start = np.random.default_rng(seed).standard_normal(size)
    values, vectors = eigsh(operator, k=1, which="LA", tol=tol, v0=start, ncv=min(size - 1, 40),
                            maxiter=100_000)
    theta, v = float(values[0]), vectors[:, 0]
    residual = float(np.linalg.norm(gram(v) - theta * v) / max(theta, 1e-300))
    return math.sqrt(max(theta, 0.0)), residual


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a model path, or a name in the cache (alexnet, vgg16)")
    parser.add_argument("--blocks", nargs="*", help="only these blocks (by name)")
    parser.add_argument("--tol", type=float, default=1e-12, help="ARPACK tolerance (1e-12)")
    parser.add_argument("--seed", type=int, default=None, help="onnxlip's seed (fresh by default)")
    parser.add_argument("--solver-tol", type=float, default=None,
                        help="onnxlip's tolerance (load's tol; its default otherwise)")
    parser.add_argument("--delta", type=float, default=None,
                        help="onnxlip's failure probability (load's delta; its default otherwise)")
    parser.add_argument("--references", help="reuse the references of an earlier --json (by block and part)")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    path = Path(args.model)
    if not path.is_file():
        path = CACHE / f"{args.model}.onnx"
    settings = {k: v for k, v in (("tol", args.solver_tol), ("delta", args.delta)) if v is not None}
    net = onnxlip.load(str(path), seed=args.seed, **settings)
    known = {}
    if args.references:
        known = {(r["block"], r["part"]): r for r in json.loads(Path(args.references).read_text())}
    solver = bounds.as_solver(net.solver)
    rows, worst_low, worst_high = [], math.inf, 0.0
    for k, block in enumerate(net.blocks):
        if not isinstance(block, AffineBlock) or (args.blocks and block.name not in args.blocks):
            continue
        for p, part in enumerate(block.parts()):
            tic = time.perf_counter()
            certified = bounds.masked_norm(part, np.ones(part.out_size), np.ones(part.in_size),
                                           solver, key=(k, p))
            certified_s = time.perf_counter() - tic
            tic = time.perf_counter()
            if (block.name, p) in known:  # computed by an earlier run
                earlier = known[block.name, p]
                reference, residual = earlier["reference"], earlier["reference_residual"]
                reference_s = earlier["reference_s"]
            else:
                reference, residual = reference_norm(part, args.tol, seed=k)
                reference_s = time.perf_counter() - tic
            ratio = certified.value / reference
            worst_low, worst_high = min(worst_low, ratio), max(worst_high, ratio)
            rows.append({"block": block.name, "part": p, "shape": f"{part.out_size}x{part.in_size}",
                         "certified": certified.value, "guarantee": certified.guarantee,
                         "iterations": certified.iterations, "certified_s": certified_s,
                         "reference": reference, "reference_residual": residual,
                         "reference_s": reference_s, "ratio": ratio})
            print(f"{block.name}: {ratio:.6f}", file=sys.stderr, flush=True)
    headers = ["block", "shape", "certified", "guarantee", "iterations", "certified_s",
               "reference", "reference_residual", "reference_s", "ratio"]
    print(table(headers, [[r[h] for h in headers] for r in rows]))
    print(f"{path.name}: {len(rows)} norms, certified/reference in [{worst_low:.6f}, {worst_high:.6f}], "
          f"tol {solver.tol:g}, delta {solver.delta:g}, seed {solver.seed}, load {os.getloadavg()[0]:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0 if worst_low >= 1 and worst_high <= 1.01 else 1


if __name__ == "__main__":
    sys.exit(main())
