"""The `onnxlip` command line: inspect a model, bound it."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Sequence

from . import __version__
from .dataset import certify_dataset, plot_certified_accuracy, read_batch, write_rows
from .errors import OnnxlipError
from .inputs import read_input
from .network import OPERATOR_MODES, Network, load
from .report import BLOCK_HEADERS, LAYER_HEADERS, block_rows, layer_rows, shape_text, table
from .spectral import DEFAULT_DELTA, DEFAULT_TOL, fresh_seed
from .sweep import eps_grid, plot, run_sweep, write_csv


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: exit 0 on success, 2 with a one-line message on a user error."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except OnnxlipError as exc:
        print(f"onnxlip: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("onnxlip: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("onnxlip: error: out of memory (try --operators matrix-free)", file=sys.stderr)
        return 2
    except Exception as exc:  # a bug: say so in one line unless asked for the traceback
        if os.environ.get("ONNXLIP_DEBUG"):
            raise
        print(f"onnxlip: internal error: {type(exc).__name__}: {exc} "
              "(set ONNXLIP_DEBUG=1 for the traceback)", file=sys.stderr)
        return 3


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block), like every other error."""

    def error(self, message: str):
        self.exit(2, f"onnxlip: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="onnxlip", description="Local and global Lipschitz bounds of ONNX ReLU networks.")
    parser.add_argument("--version", action="version", version=f"onnxlip {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=_Parser)

    inspect = sub.add_parser("inspect", help="show the chain of blocks of a model")
    _model_options(inspect)
    inspect.add_argument("--norms", action="store_true", help="also compute each block's spectral norm")
    inspect.add_argument("--json", action="store_true", help="print one JSON object")
    inspect.set_defaults(run=run_inspect)

    bound = sub.add_parser("bound", help="local bounds at radii eps, and the global bound")
    _model_options(bound)
    bound.add_argument("--input", "-x", required=True, help="nominal input x0 (.npy, .npz, .pb)")
    bound.add_argument("--eps", "-e", required=True, nargs="+", type=_number, metavar="E",
                       help="L2 radii of the input ball")
    bound.add_argument("--verbose", "-v", action="store_true", help="per-block table")
    bound.add_argument("--json", action="store_true", help="print one JSON object")
    bound.set_defaults(run=run_bound)

    sweep = sub.add_parser("sweep", help="bounds against eps: local, global and lower bounds")
    _model_options(sweep)
    sweep.add_argument("--input", "-x", required=True, help="nominal input x0 (.npy, .npz, .pb)")
    sweep.add_argument("--eps-min", type=_number, default=1e-3, help="smallest radius (1e-3)")
    sweep.add_argument("--eps-max", type=_number, default=1.0, help="largest radius (1)")
    sweep.add_argument("-n", type=_count, default=30, help="number of radii (30)")
    sweep.add_argument("--spacing", choices=("log", "linear"), default="log")
    sweep.add_argument("--no-lower", action="store_true", help="skip the lower bounds")
    sweep.add_argument("--json", action="store_true", help="print one JSON object")
    sweep.add_argument("--csv", help="write the table to this CSV file")
    sweep.add_argument("--plot", help="write the figure to this PNG/SVG/PDF file")
    sweep.set_defaults(run=run_sweep_command)

    cert = sub.add_parser("certify", help="certified L2 radius of the top class")
    _model_options(cert)
    source = cert.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", "-x", help="one input (.npy, .npz, .pb)")
    source.add_argument("--inputs", help="a batch (.npy, .npz with inputs and labels) or a folder of .npy")
    cert.add_argument("--labels", help="integer labels (.npy) for --inputs")
    cert.add_argument("--rel-tol", type=_number, default=1e-3, help="bisection tolerance (1e-3)")
    cert.add_argument("--workers", type=_count, default=None,
                      help="processes for --inputs (default: one per core)")
    cert.add_argument("--radii", type=_number, nargs="+", default=[0.01, 0.05, 0.1, 0.2, 0.5],
                      help="radii for certified accuracy in the summary")
    cert.add_argument("--out", help="per-input rows to this .csv or .json file")
    cert.add_argument("--plot", help="certified accuracy against radius to this image")
    cert.add_argument("--json", action="store_true", help="print one JSON object")
    cert.set_defaults(run=run_certify)
    return parser


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="ONNX model file")
    p.add_argument("--input-shape", type=_shape, help="input shape, e.g. 1,3,32,32 (symbolic dims)")
    p.add_argument("--input-name", help="graph input to use when there are several")
    p.add_argument("--output-name", help="graph output to use when there are several")
    p.add_argument("--operators", choices=OPERATOR_MODES, default="auto",
                   help="how affine maps are held (default: auto)")
    p.add_argument("--memory-budget", type=_bytes, default=1e9,
                   help="largest sparse matrix per block, e.g. 500M, 2G (default 1G)")
    p.add_argument("--tol", type=_number, default=DEFAULT_TOL,
                   help="each certified spectral norm within this factor of the true one "
                        f"(default {DEFAULT_TOL:g})")
    p.add_argument("--seed", type=_seed, default=None,
                   help="random seed of the spectral norms' start vectors (default: fresh "
                        "from the OS; every result prints it, pass it to replay the run)")
    p.add_argument("--delta", type=_number, default=DEFAULT_DELTA,
                   help=f"failure probability of each probabilistic norm (default {DEFAULT_DELTA:g})")
    if p.prog.split()[-1] in ("bound", "sweep", "certify"):
        p.add_argument("--method", choices=("paper", "tight"), default="paper",
                       help="local bound: the paper's product of per-block bounds (default), or "
                            "'tight', the norm of the product (slower, never looser)")


def _load(args) -> Network:
    return load(args.model, input_shape=args.input_shape, input_name=args.input_name,
                output_name=args.output_name, operators=args.operators,
                memory_budget=args.memory_budget, tol=args.tol, seed=args.seed, delta=args.delta)


def _guarantee(result) -> str:
    """How a bound holds, in one line."""
    if result.guarantee == "deterministic":
        return "guarantee: deterministic"
    return f"guarantee: probabilistic, fails with probability <= {result.delta:.3g} (seed {result.seed})"


def run_inspect(args) -> int:
    net = _load(args)
    norms = [r.bound for r in net.global_bound().layers] if args.norms else None
    if args.json:
        blocks = [dict(zip(["index", "name", "kind", "ops", "input_shape", "output_shape",
                            "operator", "norm"], row)) for row in block_rows(net.blocks, norms)]
        extra = {} if norms is None else {"global_bound": net.global_bound().bound,
                                          "guarantee": net.global_bound().guarantee,
                                          "delta": net.global_bound().delta, "seed": net.seed}
        print(json.dumps({"model": args.model, "input_shape": list(net.input_shape),
                          "output_shape": list(net.output_shape), "blocks": blocks, **extra}))
        return 0
    print(f"{args.model}: input {shape_text(net.input_shape)} -> output "
          f"{shape_text(net.output_shape)}, {len(net.blocks)} blocks")
    headers = BLOCK_HEADERS + (["norm"] if norms is not None else [])
    print(table(headers, block_rows(net.blocks, norms)))
    if norms is not None:
        print(f"global bound (product of norms): {net.global_bound().bound:.6g}; "
              f"{_guarantee(net.global_bound())}")
    return 0


def run_bound(args) -> int:
    start = time.perf_counter()
    net = _load(args)
    x0 = read_input(args.input)
    results = net.local_bounds(x0, args.eps, args.method)
    glob = net.global_bound()
    seconds = time.perf_counter() - start
    if args.json:
        print(json.dumps({
            "model": args.model, "input_shape": list(net.input_shape),
            "global_bound": glob.bound, "global_guarantee": glob.guarantee,
            "global_delta": glob.delta, "seed": net.seed, "delta": net.solver.delta,
            "local": [{"eps": r.eps, "bound": r.bound, "guarantee": r.guarantee, "delta": r.delta,
                       "seconds": r.seconds, "layers": r.to_dict()["layers"]} for r in results],
            "seconds": seconds,
        }))
        return 0
    print(f"{args.model}: input {shape_text(net.input_shape)}, {len(net.blocks)} blocks")
    print(table(["eps", "local bound", "global bound", "local/global", "seconds"],
                [[r.eps, r.bound, glob.bound, r.bound / glob.bound, r.seconds] for r in results]))
    worst = max([glob, *results], key=lambda r: r.delta)
    print(f"{_guarantee(worst)} (each bound)")
    if args.verbose:
        for r in results:
            print(f"\neps = {r.eps:g}: local bound {r.bound:.6g}")
            print(table(LAYER_HEADERS, layer_rows(r.layers)))
    return 0


def run_sweep_command(args) -> int:
    net = _load(args)
    x0 = read_input(args.input)
    grid = eps_grid(args.eps_min, args.eps_max, args.n, args.spacing)
    result = run_sweep(net, x0, grid, lower=not args.no_lower, progress=sys.stderr.isatty(),
                       input_name=os.path.basename(args.input), method=args.method)
    if args.csv:
        write_csv(result, args.csv)
    if args.plot:
        plot(result, args.plot)
    if args.json:
        print(json.dumps(result.to_dict()))
        return 0
    columns = ["eps", "local_bound", "lower_best", "lower_jacobian_norm", "global_bound"]
    rows = [[row.get(c) for c in columns] for row in result.rows()]
    print(f"{args.model}: input {shape_text(net.input_shape)}, x0 = {args.input}, "
          f"{len(grid)} radii in {result.seconds:.3g} s (upper bounds {result.upper_seconds:.3g} s)")
    print(table(["eps", "local bound", "lower bound", "||J(x0)||", "global bound"], rows))
    return 0


def run_certify(args) -> int:
    if args.inputs is None:
        net = _load(args)
        cert = net.certify(read_input(args.input), rel_tol=args.rel_tol, method=args.method)
        if args.json:
            print(json.dumps({"model": args.model, **cert.to_dict()}))
            return 0
        print(table(["class", "margin", "certified radius (local)", "radius (global)",
                     "attack distance", "local/global", "seconds"],
                    [[cert.top_class, cert.margin, cert.radius_local, cert.radius_global,
                      cert.attack_distance, cert.radius_local / cert.radius_global, cert.seconds]]))
        return 0
    load_kwargs = dict(path=args.model, input_shape=args.input_shape, input_name=args.input_name,
                       output_name=args.output_name, operators=args.operators,
                       memory_budget=args.memory_budget, tol=args.tol,
                       seed=fresh_seed() if args.seed is None else args.seed, delta=args.delta)
    net = load(**load_kwargs)
    batch, labels = read_batch(args.inputs, args.labels, net.input_shape)
    result = certify_dataset(load_kwargs, batch, labels, args.rel_tol, args.workers,
                             progress=sys.stderr.isatty(), method=args.method)
    summary = result.summary(args.radii)
    if args.out:
        write_rows(result, args.out)
    if args.plot:
        plot_certified_accuracy(result, args.plot, f"{os.path.basename(args.model)}: "
                                f"{len(batch)} inputs from {os.path.basename(args.inputs)}")
    if args.json:
        print(json.dumps({"model": args.model, "summary": summary, "seed": load_kwargs["seed"],
                          "inputs": [c.to_dict() for c in result.certificates]}))
        return 0
    print(f"{args.model}: {summary['inputs']} inputs, accuracy {summary['accuracy']:.3f}, "
          f"median certified radius {summary['median_radius_local']:.4g} (local bound) vs "
          f"{summary['median_radius_global']:.4g} (global), median attack distance "
          f"{summary['median_attack_distance']:.4g}, {summary['seconds']:.3g} s")
    rows = [[float(r), v["local"], v["global"]] for r, v in summary["certified_accuracy"].items()]
    print(table(["radius", "certified accuracy (local)", "certified accuracy (global)"], rows))
    return 0


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def _seed(text: str) -> int:
    if not text.strip().isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a non-negative whole number")
    return int(text)


def _count(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return int(text)


def _shape(text: str) -> tuple[int, ...]:
    parts = [p for p in re.split(r"[,x×\s]+", text.strip()) if p]
    if not parts or not all(p.isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape like 1,3,32,32")
    return tuple(int(p) for p in parts)


def _bytes(text: str) -> float:
    match = re.fullmatch(r"\s*([0-9.]+)\s*([kKmMgGtT]?)i?[bB]?\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 500M or 2G")
    scale = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}[match.group(2).lower()]
    return float(match.group(1)) * scale


if __name__ == "__main__":
    sys.exit(main())
