"""The Python API: a loaded network with its forward pass and bounds."""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from collections.abc import Iterable
from dataclasses import replace

import numpy as np

from . import bounds
from .auto import auto_local_bound
from .blocks import Block, BlockOptions, Lowered, build_blocks
from .certify import SQRT2, TOP_CLASS, Rule, certify
from .errors import OnnxlipError
from .evaluate import ModelRunner
from .graph import ModelGraph, load_graph, release
from .jacobian import Jacobian
from .lower import LowerBounds, LowerBoundSearch
from .lowering import NodeContext, lower
from .lowering.registry import node_name
from .reach import Reach, analyse
from .spectral import DEFAULT_DELTA, DEFAULT_TOL, Solver
from .tight import tight_local_bound

OPERATOR_MODES = ("auto", "sparse", "matrix-free")
#: Local bound methods: 'auto' (the default, onnxlip.auto), 'paper' (Avant &
#: Morgansen's product of per-block bounds), 'tight' (onnxlip.tight).
METHODS = ("auto", "paper", "tight")


#: Re-solves with fresh starts before a lower bound above an upper bound is an error.
RETRIES = 2


class Network:
    """An ONNX model lowered to a graph of affine(-activation), max-pooling and activation blocks.

    `solver` says how spectral norms are certified (tolerance, failure
    probability, the run's seed: see onnxlip.spectral.Solver). The network
    remembers the bounds it computed at each x0: a lower bound of the same run
    above an upper bound (never possible unless a probabilistic solve failed)
    makes it re-solve that bound with fresh starts and a tighter tolerance, and
    if it persists, raise an OnnxlipError.
    """

    def __init__(self, graph: ModelGraph, blocks: list[Block], solver: Solver | None = None,
                 memory_budget: float = 1e9, time_budget: float = 0.0):
        self.graph = graph
        self.blocks = blocks
        self.solver = solver or Solver()
        self.memory_budget = memory_budget
        self.time_budget = time_budget
        self._global: bounds.BoundResult | None = None
        self._runner: ModelRunner | None = None
        self._uppers: dict[bytes, list[tuple[float, str, bounds.BoundResult, bounds.Trace]]] = {}
        self._lowers: dict[bytes, list[tuple[float, float, str]]] = {}

    @property
    def tol(self) -> float:
        return self.solver.tol

    @property
    def seed(self) -> int:
        """The run's seed: load(..., seed=this) replays every bound exactly."""
        return self.solver.seed

    @property
    def path(self) -> str:
        return self.graph.path

    @property
    def notes(self) -> list[str]:
        """What was assumed in reading the model (e.g. the logits bounded, not a final softmax)."""
        return list(self.graph.notes)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.graph.input_shape

    @property
    def output_shape(self) -> tuple[int, ...]:
        return self.blocks[-1].out_shape if self.blocks else self.input_shape

    def check_input(self, x, source: str | None = None) -> np.ndarray:
        """x as a flat float64 vector, after checking its size and values.

        `source` (the file x came from) starts any error message."""
        where = f"{source}: " if source else ""
        x = np.asarray(x)
        if x.dtype.kind not in "fiu":
            raise OnnxlipError(f"{where}input has dtype {x.dtype}; expected numbers")
        size = math.prod(self.input_shape)
        if x.size != size:
            batch = x.size // size if x.ndim > 1 and x.size % size == 0 and x.size > size else 0
            hint = (f"; it holds {batch} inputs: a bound takes one, "
                    "'onnxlip certify --inputs FILE' takes a batch") if batch else ""
            raise OnnxlipError(f"{where}input of shape {x.shape} does not match the model's "
                               f"input {self.input_shape}{hint}")
        x = x.astype(np.float64).ravel()
        if not np.all(np.isfinite(x)):
            raise OnnxlipError(f"{where}input contains NaN or Inf")
        return x

    def forward(self, x) -> np.ndarray:
        """The model's output at x (through the engine's own blocks)."""
        return self.trace(x).output.reshape(self.output_shape)

    def trace(self, x) -> bounds.Trace:
        return bounds.trace(self.blocks, self.check_input(x))

    def local_bound(self, x0, eps: float, method: str = "auto") -> bounds.BoundResult:
        """Upper bound of the local Lipschitz constant at x0 in the L2 ball of radius eps.

        method: 'auto' (the default: ||J(x0)|| itself where every neuron provably
        keeps its state over the ball, else the tighter of the two below with
        the exact reach of every neuron; see onnxlip.auto), 'paper' (Avant &
        Morgansen: the product of per-block bounds) or 'tight' (the norm of the
        product with its uncertain neurons bounded apart, never above 'paper';
        see onnxlip.tight). The result's `source` says what produced the number.
        """
        return self.local_bounds(x0, [eps], method)[0]

    def local_bounds(self, x0, eps_values: Iterable[float],
                     method: str = "auto") -> list[bounds.BoundResult]:
        """Local bounds at several radii, sharing one forward pass."""
        eps_values = [check_eps(e) for e in eps_values]
        nominal = self.trace(x0)
        return [self.local_bound_from(nominal, e, method) for e in eps_values]

    def local_bound_from(self, nominal: bounds.Trace, eps: float, method: str = "auto",
                         target: float = math.inf) -> bounds.BoundResult:
        """The local bound at eps around an already computed forward pass. `target`:
        a bound below it is all the caller needs (a certificate's test), so the
        joint bound (onnxlip.joint) is not pursued where it cannot get below it."""
        check_method(method)
        eps = check_eps(eps)
        result = self._local(nominal, eps, method, self.solver, target)
        key = _digest(nominal.inputs[0])
        _remember(self._uppers, key, (eps, method, result, nominal))
        self._reconcile(key)
        return result

    def reach(self, nominal: bounds.Trace, eps: float) -> Reach:
        """How far every neuron and the output can move over the ball (onnxlip.reach),
        within the memory budget."""
        return analyse(self.blocks, nominal, check_eps(eps), self.memory_budget)

    def _local(self, nominal: bounds.Trace, eps: float, method: str, solver: Solver,
               target: float = math.inf) -> bounds.BoundResult:
        if method == "auto":
            result = auto_local_bound(self.blocks, nominal, eps, solver, self.memory_budget, target,
                                      self.time_budget)
        elif method == "tight":
            result = tight_local_bound(self.blocks, nominal, eps, solver, target=target,
                                       seconds=self.time_budget)
        else:
            result = bounds.local_bound(self.blocks, nominal, eps, solver)
        result = _finite(result, self.path)
        glob = self._global
        if glob is not None and glob.bound < result.bound:  # the global bound holds at every ε
            result = replace(result, bound=glob.bound, delta=result.delta + glob.delta)
        return result

    def found_lower(self, x0, eps: float, value: float, what: str) -> None:
        """Record a lower bound of L(x0, ε') for every ε' ≥ eps (eps = 0: every ε),
        found by this run, and reconcile the upper bounds with it."""
        key = _digest(self.check_input(x0))
        _remember(self._lowers, key, (eps, value, what))
        self._reconcile(key)

    def _reconcile(self, key: bytes) -> None:
        """Re-solve (fresh starts, tighter tolerance) every upper bound at x0 below a
        lower bound of this run; an OnnxlipError if one stays below after RETRIES."""
        for eps_low, low, what in self._lowers.get(key, []):
            if self._global is not None and low > self._global.bound:
                self._resolve(lambda solver: _finite(bounds.global_bound(self.blocks, solver), self.path),
                              self._global, low, f"{what} (ε = {eps_low:g})", "the global bound")
            for eps, method, result, nominal in self._uppers.get(key, []):
                if eps_low <= eps and low > result.bound:
                    self._resolve(lambda solver, n=nominal, e=eps, m=method: self._local(n, e, m, solver),
                                  result, low, f"{what} (ε = {eps_low:g})", f"the local bound at ε = {eps:g}")

    def _resolve(self, solve, result: bounds.BoundResult, low: float, what: str, which: str) -> None:
        """Solve again until the bound is at least `low`; the caller's result object is updated."""
        for _ in range(RETRIES):
            self.solver = self.solver.retry()
            fresh = solve(self.solver)
            vars(result).update(vars(fresh))
            if result.bound >= low:
                return
        raise OnnxlipError(
            f"{self.path}: a lower bound found by this run, {what} = {low:.9g}, exceeds {which} "
            f"{result.bound:.9g} after {RETRIES} re-solves with fresh random starts (seed "
            f"{self.solver.seed}); the spectral norms cannot be trusted here")

    def jacobian(self, x0) -> Jacobian:
        """J(x0), matrix-free (matvec / rmatvec / dense)."""
        return Jacobian(self.blocks, self.trace(x0))

    def jacobian_norm(self, x0) -> float:
        """||J(x0)||: a lower bound of L(x0, ε) for every ε when no activation input is at a
        kink."""
        return self.jacobian(x0).norm().value

    def lower_bounds(self, x0, eps_values: Iterable[float], samples: int = 64,
                     ascent_steps: int = 20, seed: int = 0) -> list[LowerBounds]:
        """Lower bounds of L(x0, ε) from onnxruntime evaluations (see onnxlip.lower)."""
        eps_values = [check_eps(e) for e in eps_values]
        search = self.lower_bound_search(x0, seed)
        return [search.at(e, samples, ascent_steps) for e in eps_values]

    def lower_bound_search(self, x0, seed: int = 0) -> LowerBoundSearch:
        """The ε-independent part of the lower bounds at x0 (f(x0), J(x0), its top
        direction); every lower bound it finds is checked against this run's upper bounds."""
        return _CheckedSearch(self, self.blocks, self.runner(), self.check_input(x0), seed)

    def runner(self) -> ModelRunner:
        """onnxruntime on the user's own model: the reference evaluations."""
        if self._runner is None:
            self._runner = ModelRunner(self.graph)
        return self._runner

    def certify(self, x0, rel_tol: float = 1e-3, label: int | None = None,
                method: str = "auto", rule: Rule = TOP_CLASS):
        """Certified L2 radius of x0's decision (by default its top class), see onnxlip.certify."""
        for _ in range(RETRIES + 1):
            cert = certify(self, x0, rel_tol=rel_tol, label=label, method=method, rule=rule)
            radius = cert.radius
            if not cert.attack_distance < radius or cert.attack_rounding:  # rounding: no contradiction
                return cert
            # The attack crossed the margin within the certified radius: a ratio of at
            # least (margin − required)/(√2·d) at distance d, above the bound used there.
            slack = cert.margin - cert.required_margin
            if cert.attack_distance > 0:  # (0: onnxruntime's decision at x0 itself differs)
                self.found_lower(x0, cert.attack_distance, slack / (SQRT2 * cert.attack_distance),
                                 "the attack's ratio")
        raise OnnxlipError(f"{self.path}: the attack found the decision failing at distance "
                           f"{cert.attack_distance:.6g}, inside the certified radius {radius:.6g}")

    def global_bound(self) -> bounds.BoundResult:
        """Product of the blocks' spectral norms (and max-pooling constants)."""
        if self._global is None:
            self._global = _finite(bounds.global_bound(self.blocks, self.solver), self.path)
            for key in self._lowers:
                self._reconcile(key)
        return self._global


class _CheckedSearch(LowerBoundSearch):
    """Lower bounds that the network checks against its upper bounds as they are found."""

    def __init__(self, net: Network, *args):
        super().__init__(*args)
        self._net = net
        if self.ties == 0:  # J(x0) is the exact Jacobian: its certified gain is a lower bound
            net.found_lower(self.x0, 0.0, self.jacobian_certified, "||J(x0)||")

    def at(self, eps: float, samples: int = 64, ascent_steps: int = 20) -> LowerBounds:
        result = super().at(eps, samples, ascent_steps)
        self._net.found_lower(self.x0, eps, max(result.sampled, result.ascent), "a sampled ratio")
        return result


#: Inputs x0 whose bounds the network keeps for its consistency checks (the latest ones).
REMEMBERED_INPUTS = 4


def _remember(table: dict, key: bytes, entry) -> None:
    """Append to table[key], forgetting the oldest input beyond REMEMBERED_INPUTS
    (a dataset's certification must not keep every forward pass alive)."""
    if key not in table and len(table) >= REMEMBERED_INPUTS:
        del table[next(iter(table))]
    table.setdefault(key, []).append(entry)


def _digest(x: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(x, dtype=np.float64).tobytes(), digest_size=16).digest()


def _finite(result: bounds.BoundResult, path: str) -> bounds.BoundResult:
    """A bound that overflowed float arithmetic is an error, never a number."""
    if not np.isfinite(result.bound):
        worst = next((r for r in result.layers if not np.isfinite(r.bound)), None)
        where = f" at block {worst.name!r}" if worst else ""
        raise OnnxlipError(f"{path}: the bound overflowed float arithmetic{where}")
    return result


def check_method(method) -> str:
    if method not in METHODS:
        raise OnnxlipError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    return method


def check_eps(eps) -> float:
    try:
        value = float(eps)
    except (TypeError, ValueError):
        raise OnnxlipError(f"eps {eps!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise OnnxlipError(f"eps must be a positive finite number, got {eps!r}")
    return value


def load(
    path: str | os.PathLike,
    input_shape: tuple[int, ...] | None = None,
    input_name: str | None = None,
    output_name: str | None = None,
    operators: str = "auto",
    memory_budget: float = 1e9,
    tol: float = DEFAULT_TOL,
    seed: int | None = None,
    delta: float = DEFAULT_DELTA,
    time_budget: float = 0.0,
) -> Network:
    """Load an ONNX model and lower it to a Network.

    operators: 'auto' (dense Gemm weights, matrix-free onnxruntime convolutions),
    'sparse' (exact CSR wherever it fits in memory_budget bytes) or 'matrix-free'.
    tol: each certified spectral norm is within a factor 1 + tol of its Ritz value
    (so of the true norm). seed: the run's random seed (None: fresh from the OS;
    every result records it, and passing it again replays the run exactly).
    delta: failure probability of each probabilistic spectral norm (README, "Guarantees").
    time_budget: seconds each local bound may spend on the joint bound: its
    multiplier search, then its refinement (an interior-point method, with
    products of proven-nonnegative forms); 0: no refinement (README, "Tight by
    default").
    """
    if operators not in OPERATOR_MODES:
        raise OnnxlipError(f"operators must be one of {OPERATOR_MODES}, got {operators!r}")
    _check_positive(tol, "tol")
    _check_positive(delta, "delta")
    if not float(delta) < 1:
        raise OnnxlipError(f"delta must be below 1, got {delta!r}")
    if seed is not None and (not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0):
        raise OnnxlipError(f"seed must be a non-negative integer, got {seed!r}")
    _check_positive(memory_budget, "memory budget")
    _check_positive(time_budget, "time budget (seconds)", zero=True)
    graph = load_graph(path, input_shape, input_name, output_name)
    lowered, shapes = [], {graph.input_name: graph.input_shape}
    for node in graph.nodes:
        data = [n for n in node.input if n and n not in graph.constants]
        in_shapes = tuple(shapes[n] for n in data)
        ctx = NodeContext(node, in_shapes[0], graph.constants, graph.opset, graph.path, in_shapes)
        for k, output in enumerate(node.output[:ctx.outputs]):
            if output:
                ctx.output = k
                layers = lower(ctx)
                name = node_name(node) + (f":{k}" if k else "")
                lowered.append(Lowered(name, node.op_type, layers, data, output))
                shapes[output] = tuple(layers[-1].out_shape) if layers else in_shapes[0]
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        blocks = build_blocks(lowered, graph.input_name, graph.input_shape, graph.output_name,
                              BlockOptions(operators, memory_budget))
    if not blocks:
        raise OnnxlipError(f"{graph.path}: the model has no layers to bound")
    for block in blocks:
        block.check_magnitude(graph.path)
    release(graph)
    solver = Solver(tol=float(tol), delta=float(delta)) if seed is None else \
        Solver(tol=float(tol), delta=float(delta), seed=int(seed))
    return Network(graph, blocks, solver, float(memory_budget), float(time_budget))


def _check_positive(value, what: str, zero: bool = False) -> None:
    """A finite number > 0 (≥ 0 where `zero`), else a one-line error."""
    try:
        ok = math.isfinite(float(value)) and (float(value) > 0 or zero and float(value) == 0)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise OnnxlipError(f"{what} must be a {'non-negative' if zero else 'positive'} finite number, "
                           f"got {value!r}")
