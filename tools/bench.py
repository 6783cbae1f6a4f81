"""Time onnxlip against onnxruntime's forward pass, all in one run.

    python tools/bench.py                      # the reference networks in ../shared/reference
    python tools/bench.py --model m.onnx --input x.npy --name mine
    python tools/bench.py --json bench.json

For each network: one onnxruntime forward pass, one local bound, one global
bound, a 30-point sweep, peak memory, and each time's ratio to the forward pass.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import onnxlip  # noqa: E402
from onnxlip.report import table  # noqa: E402

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"


def median_time(func, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        func()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def forward_time(path: str, x0: np.ndarray, repeat: int) -> float:
    options = ort.SessionOptions()
    options.intra_op_num_threads = os.cpu_count() or 1
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    feed = {name: x0.astype(np.float32)}
    session.run(None, feed)
    return median_time(lambda: session.run(None, feed), repeat)


def bench(name: str, path: str, x0: np.ndarray, eps: float, sweep: list[float],
          repeat: int, published: dict | None) -> dict:
    fwd = forward_time(path, x0, max(repeat, 20))
    start = time.perf_counter()
    net = onnxlip.load(path)
    load_s = time.perf_counter() - start
    net.local_bound(x0, eps)  # warm-up: sessions, caches
    local = net.local_bound(x0, eps)
    local_s = median_time(lambda: net.local_bound(x0, eps), repeat)
    start = time.perf_counter()
    glob = onnxlip.bounds.global_bound(net.blocks, net.tol)
    global_s = time.perf_counter() - start
    start = time.perf_counter()
    net.local_bounds(x0, sweep)
    sweep_s = time.perf_counter() - start
    row = {
        "network": name, "forward_s": fwd, "load_s": load_s,
        "local_bound": local.bound, "local_s": local_s, "global_bound": glob.bound,
        "global_s": global_s, "sweep_points": len(sweep), "sweep_s": sweep_s,
        "local_over_forward": local_s / fwd, "global_over_forward": global_s / fwd,
        "sweep_over_forward": sweep_s / fwd, "sweep_over_local": sweep_s / local_s,
        "iterations": [r.iterations for r in local.layers],
        "max_residual": max(r.residual for r in local.layers),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if published:
        row["published_local_bound"] = published["local_bound"][0]
        row["local_over_published"] = local.bound / published["local_bound"][0]
        ref_s = published.get("reference_seconds_per_eps_2core_cpu")
        if ref_s:
            row["reference_s"] = ref_s
            row["speedup_vs_reference"] = ref_s / local_s
    return row


def machine() -> dict:
    return {"python": platform.python_version(), "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "onnxruntime": ort.__version__, "onnxlip": onnxlip.__version__}


def reference_cases() -> list[tuple[str, str, np.ndarray, dict]]:
    cases = []
    for name in ("mnist_avant", "cifar10_avant"):
        model = REFERENCE / f"{name}.onnx"
        if model.is_file():
            published = json.loads((REFERENCE / f"{name}_published.json").read_text())
            cases.append((name, str(model), np.load(REFERENCE / f"{name}_x0.npy"), published))
    return cases


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", default=[], help="extra ONNX model")
    parser.add_argument("--input", action="append", default=[], help="its x0 (.npy)")
    parser.add_argument("--name", action="append", default=[], help="its name in the table")
    parser.add_argument("--eps", type=float, default=1e-3, help="radius of the single bound")
    parser.add_argument("--repeat", type=int, default=5, help="repetitions per timing (median)")
    parser.add_argument("--no-reference", action="store_true", help="skip ../shared/reference")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    cases = [] if args.no_reference else reference_cases()
    for i, model in enumerate(args.model):
        name = args.name[i] if i < len(args.name) else Path(model).stem
        cases.append((name, model, np.load(args.input[i], allow_pickle=False), None))
    rows = []
    for name, path, x0, published in cases:
        sweep = published["eps"] if published else list(np.geomspace(1e-3, 1.0, 30))
        rows.append(bench(name, path, x0, args.eps, sweep, args.repeat, published))
        print(f"{name}: done", file=sys.stderr)
    result = {"machine": machine(), "eps": args.eps, "results": rows}
    headers = ["network", "forward_s", "local_s", "global_s", "sweep_s", "local_over_forward",
               "sweep_over_local", "speedup_vs_reference", "local_over_published", "peak_rss_mb"]
    print(json.dumps(result["machine"]))
    print(table(headers, [[r.get(h) for h in headers] for r in rows]))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
