"""The `onnxlip` command line: inspect a model, bound it."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import select
import sys
import time
from collections.abc import Sequence

from . import __version__
from .certify import DECISIONS, Rule
from .dataset import (
    ROW_FORMATS,
    DatasetResult,
    certify_dataset,
    plot_certified_accuracy,
    read_batch,
    read_results,
    write_rows,
)
from .dot import block_graph, check_graph_path, write_graph
from .errors import OnnxlipError
from .inputs import read_input
from .network import METHODS, OPERATOR_MODES, Network, load
from .report import (
    BLOCK_HEADERS,
    LAYER_HEADERS,
    block_rows,
    check_output,
    check_plot,
    layer_rows,
    shape_text,
    table,
)
from .spectral import DEFAULT_DELTA, DEFAULT_TOL, fresh_seed
from .sweep import eps_grid, plot, run_sweep, run_sweep_distributed, write_csv


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: exit 0 on success, 2 with a one-line message on a user error."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.seed is None:  # one seed for the whole run (workers too)
        args.seed = fresh_seed()
    try:
        _check_outputs(args)
        code = args.run(args)
        sys.stdout.flush()  # a reader that went away shows here, not in Python's exit
        return code
    except OnnxlipError as exc:
        print(f"onnxlip: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("onnxlip: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("onnxlip: error: out of memory (try --operators matrix-free)", file=sys.stderr)
        return 2
    except BrokenPipeError as exc:  # `onnxlip ... | head`: end quietly, as Unix tools do
        return 128 + 13 if _stdout_gone() else _internal_error(exc)
    except Exception as exc:
        return _internal_error(exc)


def _internal_error(exc: Exception) -> int:
    """A bug: say so in one line unless asked for the traceback."""
    if os.environ.get("ONNXLIP_DEBUG"):
        raise exc
    print(f"onnxlip: internal error: {type(exc).__name__}: {exc} "
          "(set ONNXLIP_DEBUG=1 for the traceback)", file=sys.stderr)
    return 3


def _stdout_gone() -> bool:
    """Whether stdout is a pipe nobody reads any more (a broken pipe elsewhere is
    a bug to report); if so it is pointed at /dev/null, so that Python's flush at
    exit stays quiet too. Exit 141 = 128 + SIGPIPE, what a shell shows for a
    Unix tool stopped by a closed pipe."""
    try:
        fd = sys.stdout.fileno()
        poll = select.poll()
        poll.register(fd, select.POLLOUT)
        if not any(events & select.POLLERR for _, events in poll.poll(0)):
            return False
    except (AttributeError, OSError, ValueError):  # no poll(), or no file behind stdout
        return False
    with contextlib.suppress(OSError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), fd)
    return True


def _check_outputs(args: argparse.Namespace) -> None:
    """The output files of every subcommand, checked before any work: a bad path or
    format fails in a second, not after hours of bounds."""
    if args.plot is not None:
        check_plot(args.plot, "--plot")
    if args.csv is not None:
        check_output(args.csv, "--csv")
    if args.out is not None:
        check_output(args.out, "--out", ROW_FORMATS)
    if args.graph is not None:
        check_graph_path(args.graph)


def _write(path: str, option: str, write, *what) -> None:
    """Write an output file (after the results are printed), one-line errors."""
    try:
        write(*what, path)
    except OSError as exc:
        raise OnnxlipError(f"{option} {path}: cannot write ({exc.strerror or exc})") from None


#: What main() reads of every subcommand's arguments: None where it has no such option.
COMMON_DEFAULTS = dict(seed=None, plot=None, csv=None, out=None, graph=None)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block), like every other error."""

    def error(self, message: str):
        self.exit(2, f"onnxlip: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="onnxlip",
        description="Local and global Lipschitz bounds of ONNX networks (ReLU and other common activations).")
    parser.add_argument("--version", action="version", version=f"onnxlip {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=_Parser)

    def command(name: str, summary: str) -> argparse.ArgumentParser:
        """A subcommand with every attribute of COMMON_DEFAULTS (its own options'
        defaults, added after, take precedence)."""
        p = sub.add_parser(name, help=summary)
        p.set_defaults(**COMMON_DEFAULTS)
        return p

    inspect = command("inspect", "show the graph of blocks of a model")
    _model_options(inspect, method=False)
    inspect.add_argument("--norms", action="store_true", help="also compute each block's spectral norm")
    inspect.add_argument("--json", action="store_true", help="print one JSON object")
    inspect.add_argument("--graph", help="write the graph of blocks to this .dot/.gv file, or "
                                         ".svg/.png/.pdf through Graphviz's dot program")
    inspect.set_defaults(run=run_inspect)

    bound = command("bound", "local bounds at radii eps, and the global bound")
    _model_options(bound, method=True)
    bound.add_argument("--input", "-x", required=True, help="nominal input x0 (.npy, .npz, .pb)")
    bound.add_argument("--eps", "-e", required=True, nargs="+", type=_number, metavar="E",
                       help="L2 radii of the input ball")
    bound.add_argument("--verbose", "-v", action="store_true", help="per-block table")
    bound.add_argument("--no-lower", action="store_true",
                       help="skip the lower bound ||J(x0)|| (one more eigensolve) and the ratio")
    bound.add_argument("--json", action="store_true", help="print one JSON object")
    bound.set_defaults(run=run_bound)

    sweep = command("sweep", "bounds against eps: local, global and lower bounds")
    _model_options(sweep, method=True)
    sweep.add_argument("--input", "-x", required=True, help="nominal input x0 (.npy, .npz, .pb)")
    sweep.add_argument("--eps-min", type=_number, default=1e-3, help="smallest radius (1e-3)")
    sweep.add_argument("--eps-max", type=_number, default=1.0, help="largest radius (1)")
    sweep.add_argument("-n", type=_count, default=30, help="number of radii (30)")
    sweep.add_argument("--spacing", choices=("log", "linear"), default="log")
    sweep.add_argument("--no-lower", action="store_true", help="skip the lower bounds")
    sweep.add_argument("--json", action="store_true", help="print one JSON object")
    sweep.add_argument("--csv", help="write the table to this CSV file")
    sweep.add_argument("--plot", help="write the figure to this PNG/SVG/PDF file")
    _cluster_options(sweep, "radii on a Dask LocalCluster of N processes (default: in this process)")
    sweep.set_defaults(run=run_sweep_command)

    cert = command("certify", "certified L2 radius of the top class")
    _model_options(cert, method=True)
    source = cert.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", "-x", help="one input (.npy, .npz, .pb)")
    source.add_argument("--inputs", help="a batch (.npy, .npz with inputs and labels) or a folder of .npy")
    cert.add_argument("--labels", help="integer labels (.npy) for --inputs")
    cert.add_argument("--rel-tol", type=_positive, default=1e-3,
                      help="relative precision of the certified radius (1e-3)")
    _cluster_options(cert, "--inputs on a Dask LocalCluster of N processes (default: one per "
                           "core; 1: in this process)")
    cert.add_argument("--start", type=_index, default=0, help="first input of the shard (0)")
    cert.add_argument("--end", type=_index, default=None, help="input after the shard's last")
    cert.add_argument("--radii", type=_number, nargs="+", default=[0.01, 0.05, 0.1, 0.2, 0.5],
                      help="radii for certified accuracy in the summary")
    cert.add_argument("--out", help="per-input rows: streamed to a .jsonl file (rerun to resume), "
                                    "or to a .csv or .json file at the end")
    cert.add_argument("--plot", help="certified accuracy against radius to this image")
    cert.add_argument("--json", action="store_true", help="print one JSON object")
    cert.add_argument("--decision", choices=DECISIONS, default="argmax",
                      help="the net's decision: its largest output (argmax) or smallest (argmin)")
    cert.add_argument("--target", type=int, default=None,
                      help="certify this class instead of the decision at each input")
    cert.add_argument("--margin", type=_nonnegative, default=0.0,
                      help="the lead the class must keep over every other (default 0)")
    cert.set_defaults(run=run_certify)

    report = command("report", "summary (and plot) of a certify --out .jsonl file")
    report.add_argument("results", help="results file of certify --inputs --out FILE.jsonl")
    report.add_argument("--radii", type=_number, nargs="+", default=[0.01, 0.05, 0.1, 0.2, 0.5],
                        help="radii for certified accuracy in the summary")
    report.add_argument("--plot", help="certified accuracy against radius to this image")
    report.add_argument("--json", action="store_true", help="print one JSON object")
    report.set_defaults(run=run_report)
    return parser


def _cluster_options(p: argparse.ArgumentParser, workers_help: str) -> None:
    p.add_argument("--workers", type=_count, default=None, metavar="N", help=workers_help)
    p.add_argument("--scheduler", metavar="ADDRESS",
                   help="use the Dask cluster of this scheduler, e.g. tcp://10.0.0.5:8786")


def _model_options(p: argparse.ArgumentParser, method: bool) -> None:
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
    if method:
        p.add_argument("--budget", type=_seconds, default=0.0, metavar="SECONDS",
                       help="seconds each local bound may spend on the joint bound, its "
                            "multiplier search and then an interior-point refinement (with "
                            "products of proven-nonnegative forms; default 0: none)")
        p.add_argument("--method", choices=METHODS, default="auto",
                       help="local bound: 'auto' (default: ||J(x0)|| where every neuron provably "
                            "keeps its state over the ball, else the tightest proven bound), "
                            "'paper' (the paper's product of per-block bounds) or 'tight'")


def _load_kwargs(args) -> dict:
    return dict(path=args.model, input_shape=args.input_shape, input_name=args.input_name,
                output_name=args.output_name, operators=args.operators,
                memory_budget=args.memory_budget, tol=args.tol, seed=args.seed, delta=args.delta,
                time_budget=getattr(args, "budget", 0.0))


def _guarantee(result) -> str:
    """How a bound holds, in one line."""
    if result.guarantee == "deterministic":
        return "guarantee: deterministic"
    return f"guarantee: probabilistic, fails with probability <= {result.delta:.3g} (seed {result.seed})"


def _header(args, net: Network, source: str | None = None, method: str | None = None) -> dict:
    """What every JSON output starts with: the paths as the user gave them, the shapes."""
    head = {"model": args.model}
    if source is not None:
        head["input"] = source
    head |= {"input_shape": list(net.input_shape), "output_shape": list(net.output_shape)}
    head |= {"method": method} if method is not None else {}
    head |= {"seed": net.seed}  # replays every bound of the run (--seed)
    return head | ({"notes": net.notes} if net.notes else {})


def _title(args, net: Network, details: str = "") -> str:
    """The first lines of every table output: the model as given, its shapes and
    blocks, and a line for each assumption the reading made (net.notes)."""
    lines = [f"{args.model}: input {shape_text(net.input_shape)} -> output "
             f"{shape_text(net.output_shape)}, {len(net.blocks)} blocks{details}"]
    return "\n".join(lines + [f"note: {note}" for note in net.notes])


def _read_x0(args, net: Network):
    """The nominal input of --input, checked against the model (the file named on error)."""
    return net.check_input(read_input(args.input), source=args.input)


def _load(args) -> Network:
    return load(**_load_kwargs(args))


def run_inspect(args) -> int:
    net = _load(args)
    glob = net.global_bound() if args.norms else None
    norms = [r.bound for r in glob.layers] if glob is not None else None
    if args.json:
        blocks = [dict(zip(["index", "name", "kind", "ops", "reads", "input_shape", "output_shape",
                            "operator", "norm"], row)) for row in block_rows(net.blocks, norms)]
        extra = {} if glob is None else {"guarantee": glob.guarantee, "delta": glob.delta}
        print(json.dumps(_header(args, net) | {
            "global_bound": glob.bound if glob is not None else None, **extra, "blocks": blocks}))
        if args.graph:
            _write(args.graph, "--graph", write_graph, block_graph(net.blocks, net.input_shape, norms))
        return 0
    print(_title(args, net))
    headers = BLOCK_HEADERS + (["norm"] if norms is not None else [])
    print(table(headers, block_rows(net.blocks, norms)))
    if glob is not None:
        print(f"{_guarantee(glob)}\nglobal bound: {glob.bound:.6g}")
    if args.graph:
        _write(args.graph, "--graph", write_graph, block_graph(net.blocks, net.input_shape, norms))
    return 0


def run_bound(args) -> int:
    start = time.perf_counter()
    net = _load(args)
    x0 = _read_x0(args, net)
    results = net.local_bounds(x0, args.eps, args.method)
    glob = net.global_bound()
    lower = None if args.no_lower else _jacobian_lower(net, x0)
    seconds = time.perf_counter() - start
    ratios = [None if not lower else r.bound / lower for r in results]
    notes = list(dict.fromkeys(n for r in results for n in r.notes))
    if args.json:
        print(json.dumps(_header(args, net, args.input, args.method) | {
            "global_bound": glob.bound, "global_guarantee": glob.guarantee,
            "global_delta": glob.delta, "delta": net.solver.delta,
            "points": [{"eps": r.eps, "local_bound": r.bound, "source": r.source,
                        "lower_bound": lower, "ratio": ratio, "guarantee": r.guarantee,
                        "delta": r.delta, "seconds": r.seconds, "notes": r.notes,
                        "layers": r.to_dict()["layers"]} for r, ratio in zip(results, ratios)],
            "seconds": seconds,
        }))
        return 0
    print(_title(args, net, f", x0 = {args.input}, method {args.method}"))
    print(table(["eps", "local bound", "from", "||J(x0)||", "bound/||J||", "global bound", "seconds"],
                [[r.eps, r.bound, r.source, lower, ratio, glob.bound, r.seconds]
                 for r, ratio in zip(results, ratios)]))
    print("\n".join(f"note: {n}" for n in notes) + ("\n" if notes else ""), end="")
    if lower is None and not args.no_lower:
        print("||J(x0)||: no lower bound here (a ReLU input or a max-pooling window is tied at x0)")
    worst = max([glob, *results], key=lambda r: r.delta)
    print(f"{_guarantee(worst)} (each bound)")
    if args.verbose:
        for r in results:
            print(f"\neps = {r.eps:g}: local bound {r.bound:.6g}")
            print(table(LAYER_HEADERS, layer_rows(r.layers)))
    return 0


def _jacobian_lower(net: Network, x0) -> float | None:
    """||J(x0) v|| for J's top direction v, less its rounding bound: a lower bound
    of L(x0, ε) at every ε when no ReLU input or max-pooling window is tied at
    x0 (None otherwise)."""
    search = net.lower_bound_search(x0)
    return search.jacobian_certified if search.ties == 0 else None


def run_sweep_command(args) -> int:
    grid = eps_grid(args.eps_min, args.eps_max, args.n, args.spacing)
    net = _load(args)
    x0 = _read_x0(args, net)
    common = dict(lower=not args.no_lower, progress=sys.stderr.isatty(),
                  input_name=args.input, method=args.method)
    if args.scheduler or (args.workers or 1) > 1:
        result = run_sweep_distributed(_load_kwargs(args), x0, grid, workers=args.workers,
                                       scheduler=args.scheduler, **common)
    else:
        result = run_sweep(net, x0, grid, **common)
    if args.json:
        print(json.dumps(_header(args, net, args.input, args.method) | result.to_dict()))
    else:
        rows = result.rows()
        # a bound at a larger radius is the smaller somewhere: show it, and where it is from
        better = any(r["upper_bound"] < r["local_bound"] for r in rows)
        columns = ["eps", "local_bound"] + (["upper_bound", "upper_bound_eps"] if better else []) + \
            ["lower_bound", "lower_bound_eps", "lower_jacobian_norm", "global_bound"]
        print(_title(args, net, f", x0 = {args.input}, method {args.method}: {len(grid)} radii "
                                f"in {result.seconds:.3g} s (upper bounds {result.upper_seconds:.3g} s)"))
        print(table(["eps", "local bound"] + (["upper bound", "(from eps)"] if better else []) +
                    ["lower bound", "(found at eps)", "||J(x0)||", "global bound"],
                    [[row.get(c) for c in columns] for row in rows]))
    if args.csv:
        _write(args.csv, "--csv", write_csv, result)
    if args.plot:
        _write(args.plot, "--plot", plot, result)
    return 0


def _rule(args) -> Rule:
    return Rule(args.decision, args.target, args.margin)


def _rule_text(rule: Rule) -> str:
    """How a title names a rule other than the default (the top class stays the top)."""
    parts = [f"decision {rule.decision}"] if rule.decision != "argmax" else []
    parts += [f"target class {rule.target}"] if rule.target is not None else []
    parts += [f"required margin {rule.margin:g}"] if rule.margin else []
    return "".join(f", {p}" for p in parts)


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def run_certify(args) -> int:
    if args.inputs is None:
        if args.labels is not None:
            raise OnnxlipError("--labels goes with --inputs (a batch), not --input")
        net = _load(args)
        cert = net.certify(_read_x0(args, net), rel_tol=args.rel_tol, method=args.method,
                           rule=_rule(args))
        if args.json:
            print(json.dumps(_header(args, net, args.input, args.method) | cert.to_dict()))
            return 0
        print(_title(args, net, f", x0 = {args.input}, method {args.method}"
                                + _rule_text(_rule(args))))
        print(table(["class", "margin", "certified radius (local)", "certified by", "radius (global)",
                     "attack distance", "local/global", "seconds"],
                    [[cert.top_class, cert.margin, cert.radius_local, cert.radius_test or "-",
                      cert.radius_global, cert.attack_distance,
                      _ratio(cert.radius_local, cert.radius_global), cert.seconds]]))
        if cert.attack_rounding:
            print(ROUNDING_NOTE)
        return 0
    load_kwargs = _load_kwargs(args)
    net = load(**load_kwargs)
    batch, labels = read_batch(args.inputs, args.labels, net.input_shape)
    jsonl = args.out is not None and args.out.lower().endswith(".jsonl")
    result = certify_dataset(load_kwargs, batch, labels, args.rel_tol, args.workers,
                             progress=sys.stderr.isatty(), method=args.method, rule=_rule(args),
                             out=args.out if jsonl else None, source=args.inputs, start=args.start,
                             end=args.end, scheduler=args.scheduler)
    title = _title(args, net, f", inputs {args.inputs}, method {args.method}"
                              + _rule_text(_rule(args)))
    code = _dataset_output(args, title, _header(args, net, args.inputs, args.method), result)
    if args.out and not jsonl:
        _write(args.out, "--out", write_rows, result)
    return code


def run_report(args) -> int:
    header, rows, _ = read_results(args.results)
    result = DatasetResult(sorted({r["index"]: r for r in rows}.values(), key=lambda r: r["index"]),
                           0.0)
    options = header.get("options", {})
    title = (f"{header['model']}: results {args.results}, {len(result.rows)} of "
             f"{header['count']} inputs from {header['inputs']}, method {options.get('method')}")
    head = {"model": header["model"], "input": header["inputs"], "method": options.get("method"),
            "results": args.results}
    return _dataset_output(args, title, head, result)


def _dataset_output(args, title: str, head: dict, result: DatasetResult) -> int:
    """The summary of certify --inputs and of report (printed, then the plot written);
    exit 1 when some inputs failed."""
    summary = result.summary(args.radii)
    if args.json:
        print(json.dumps(head | {"summary": summary, "certificates": result.rows}))
    else:
        print(title)
        print(_summary_line(summary))
        key, what = (("certified_accuracy", "certified accuracy") if summary["labelled"]
                     else ("certified", "certified"))
        rows = [[float(r), v["local"], v["global"]] for r, v in summary[key].items()]
        print(table(["radius", f"{what} (local)", f"{what} (global)"], rows))
    if args.plot:
        plot_title = (f"{os.path.basename(head['model'])}: {len(result.rows)} inputs from "
                      f"{os.path.basename(head['input'])}")
        _write(args.plot, "--plot", lambda r, path: plot_certified_accuracy(
            r, path, plot_title, head["method"] or "auto"), result)
    failed = result.failed
    if failed:
        first = min(failed)
        print(f"onnxlip: {len(failed)} input(s) failed, e.g. #{first}: {failed[first]}",
              file=sys.stderr)
    return 1 if failed else 0


#: Printed where onnxruntime's float32 rounding alone fails the rule inside a certified radius.
ROUNDING_NOTE = ("note: onnxruntime's float32 evaluation fails the rule at the attack's point, "
                 "inside the certified radius, where the model's exact arithmetic (float64 with "
                 "error bounds) keeps it: the certificate is for exact arithmetic")


def _summary_line(summary: dict) -> str:
    def number(key: str, digits: str = ".4g") -> str:
        return "n/a" if summary[key] is None else format(summary[key], digits)

    accuracy = ("n/a (no labels)"
                if summary["accuracy"] is None else number("accuracy", ".3f"))
    return (f"{summary['inputs']} inputs, accuracy: {accuracy}; median certified radius "
            f"{number('median_radius_local')} (local analysis) vs {number('median_radius_global')} "
            f"(global), median attack distance {number('median_attack_distance')}, "
            f"{summary['seconds']:.3g} s" + (f"; {summary['attack_rounding']} attacks inside a "
                                             "certified radius by float32 rounding only"
                                             if summary.get("attack_rounding") else ""))


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def _positive(text: str) -> float:
    value = _number(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number > 0")
    return value


def _nonnegative(text: str) -> float:
    value = _number(text)
    if not (value >= 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number ≥ 0")
    return value


def _seconds(text: str) -> float:
    value = _number(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number of seconds >= 0")
    return value


def _seed(text: str) -> int:
    if not text.strip().isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a non-negative whole number")
    return int(text)


def _count(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return int(text)


def _index(text: str) -> int:
    if not text.strip().isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number ≥ 0")
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
