"""Bounds as a function of ε: the local bound, the global bound and lower bounds."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import math
import operator
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from . import bounds
from .errors import OnnxlipError
from .lower import LowerBounds
from .network import Network, check_eps
from .report import check_output, check_plot, method_label


@dataclass
class SweepPoint:
    eps: float
    local: bounds.BoundResult
    lower: LowerBounds | None


@dataclass
class Sweep:
    """A sweep's results; `seconds` covers the whole sweep, lower bounds included."""

    model: str
    input_name: str
    global_bound: float
    points: list[SweepPoint]
    seconds: float
    upper_seconds: float
    method: str = "auto"

    def lower_bounds(self) -> list[tuple[float, float | None]]:
        """At each ε, the largest lower bound found at any radius up to ε, and that radius.

        L(x0, ε) never decreases in ε (the ball only grows), so a lower bound
        found at one radius holds at every larger one.
        """
        return self._running(lambda p: p.lower and p.lower.best, operator.gt, (0.0, None))

    def upper_bounds(self) -> list[tuple[float, float]]:
        """At each ε, the smallest local bound at any radius from ε on, and that radius:
        for the same reason, an upper bound at one radius holds at every smaller one
        (a bound at a larger radius can be the smaller: its joint bounds, whose tails
        differ between radii, are not monotone in ε)."""
        return self._running(lambda p: p.local.bound, operator.lt, (math.inf, math.inf), downwards=True)

    def _running(self, value, better, start: tuple, downwards: bool = False) -> list[tuple]:
        """Per point, the best (value, ε) of the points met so far in order of ε
        (decreasing where `downwards`); `value` None where a point has none."""
        out: list = [None] * len(self.points)
        best = start
        for i in sorted(range(len(self.points)), key=lambda i: self.points[i].eps, reverse=downwards):
            found = value(self.points[i])
            if found is not None and better(found, best[0]):
                best = (found, self.points[i].eps)
            out[i] = best
        return out

    def rows(self) -> list[dict]:
        """One row per ε: `local_bound` is the bound at this ε itself, `upper_bound` the
        running minimum over the radii from ε on (from `upper_bound_eps`);
        `lower_bound` is the running maximum (from `lower_bound_eps`), the `lower_*`
        columns are what the search found at this ε itself; `ratio` is upper ÷ lower."""
        out = []
        running = self.lower_bounds()
        for p, (best, where), (upper, above) in zip(self.points, running, self.upper_bounds()):
            row = {"eps": p.eps, "local_bound": p.local.bound, "upper_bound": upper,
                   "upper_bound_eps": above, "source": p.local.source,
                   "guarantee": p.local.guarantee, "delta": p.local.delta,
                   "global_bound": self.global_bound, "notes": p.local.notes}
            if p.lower is not None:
                row.update({"lower_bound": best, "lower_bound_eps": where,
                            "ratio": upper / best if best > 0 else None})
                low = p.lower.to_dict()
                row.update({f"lower_{k}": v for k, v in low.items() if k != "eps"})
            row["seconds"] = p.local.seconds
            out.append(row)
        return out

    def to_dict(self) -> dict:
        return {"model": self.model, "input": self.input_name, "method": self.method,
                "global_bound": self.global_bound, "seconds": self.seconds,
                "upper_seconds": self.upper_seconds, "points": self.rows()}


def eps_grid(eps_min: float, eps_max: float, count: int, spacing: str = "log") -> list[float]:
    """`count` radii from eps_min to eps_max, log- or linearly spaced."""
    eps_min, eps_max = check_eps(eps_min), check_eps(eps_max)
    if eps_max < eps_min or count < 1:
        raise OnnxlipError(f"need eps-min ≤ eps-max and n ≥ 1 (got {eps_min}, {eps_max}, {count})")
    grid = np.geomspace if spacing == "log" else np.linspace
    return [float(e) for e in grid(eps_min, eps_max, count)]


def run_sweep(net: Network, x0, eps_values: list[float], lower: bool = True,
              progress: bool = False, input_name: str = "x0", method: str = "auto") -> Sweep:
    """Local bound (and lower bounds) at every ε, sharing the forward pass and J(x0)."""
    start = time.perf_counter()
    eps_values = [check_eps(e) for e in eps_values]
    nominal = net.trace(x0)
    search = net.lower_bound_search(x0) if lower else None
    points = []
    for index, eps in enumerate(tqdm(eps_values, desc="sweep", unit="eps", disable=not progress,
                                     leave=False)):
        points.append(_point(net, nominal, search, index, eps, method))
    glob = net.global_bound()
    return _sweep(net.path, input_name, glob, points, start, method)


def _point(net: Network, nominal, search, index: int, eps: float, method: str) -> SweepPoint:
    """The bounds at one radius. The random samples of its lower bound are seeded by the
    radius's place in the grid: the same on any worker, in any order."""
    local = net.local_bound_from(nominal, eps, method)
    if search is None:
        return SweepPoint(eps, local, None)
    search.rng = np.random.default_rng((0, index))
    return SweepPoint(eps, local, search.at(eps))


def _sweep(path: str, input_name: str, glob: bounds.BoundResult, points: list[SweepPoint],
           start: float, method: str) -> Sweep:
    upper = sum(p.local.seconds for p in points) + glob.seconds
    return Sweep(path, input_name, glob.bound, points, time.perf_counter() - start, upper, method)


def run_sweep_distributed(load_kwargs: dict, x0, eps_values: list[float], lower: bool = True,
                          progress: bool = False, input_name: str = "x0", method: str = "auto",
                          workers: int | None = None, scheduler: str | None = None,
                          client=None) -> Sweep:
    """run_sweep with the radii (and the global bound) as Dask tasks: each worker makes
    the forward pass (and J(x0)) once, then takes radii. Same values as run_sweep."""
    from . import distributed

    start = time.perf_counter()
    eps_values = [check_eps(e) for e in eps_values]
    x0 = np.asarray(x0)
    with contextlib.ExitStack() as stack:
        if client is None:
            client = stack.enter_context(distributed.open_client(workers, scheduler))
        glob = client.submit(_global_on_worker, load_kwargs, pure=False)
        [x0_data] = client.scatter([x0], hash=False)
        jobs = [(load_kwargs, x0_data, i, eps, lower, method) for i, eps in enumerate(eps_values)]
        points = {}
        with tqdm(total=len(jobs), desc="sweep", unit="eps", disable=not progress,
                  leave=False) as bar:
            for job, outcome in distributed.map_unordered(client, _point_on_worker, jobs,
                                                          len(jobs), lambda job: [job]):
                if isinstance(outcome, BaseException):
                    raise _as_error(outcome, job[3])
                points[job[2]] = outcome
                bar.update(1)
        glob = glob.result()
    return _sweep(load_kwargs["path"], input_name, glob, [points[i] for i in sorted(points)], start,
                  method)


def _as_error(exc: BaseException, eps: float) -> Exception:
    if isinstance(exc, (OnnxlipError, MemoryError)):
        return exc
    return OnnxlipError(f"the bound at eps = {eps:g} failed on the cluster "
                        f"({type(exc).__name__}: {exc})")


def _global_on_worker(options: dict) -> bounds.BoundResult:
    from . import distributed

    distributed.single_threaded()
    return distributed.network(options).global_bound()


def _point_on_worker(options: dict, x0: np.ndarray, index: int, eps: float, lower: bool,
                     method: str) -> SweepPoint:
    from . import distributed

    distributed.single_threaded()
    net = distributed.network(options)
    key = ("sweep", *distributed.option_key(options), hashlib.sha256(x0.tobytes()).hexdigest(), lower)
    nominal, search = distributed.cached(
        key, lambda: (net.trace(x0), net.lower_bound_search(x0) if lower else None))
    return _point(net, nominal, search, index, eps, method)


def write_csv(sweep: Sweep, path: str | Path) -> None:
    check_output(path, "CSV file")
    rows = [r | {"notes": "; ".join(r["notes"])} for r in sweep.rows()]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def plot(sweep: Sweep, path: str | Path, title: str | None = None) -> None:
    """The paper's figure: bounds against ε on a log scale (PNG, SVG, PDF, ... by suffix)."""
    check_plot(path)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    eps = [p.eps for p in sweep.points]
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    ax.plot(eps, [p.local.bound for p in sweep.points], "o-", color="C0", ms=3,
            label=f"local bound ({method_label(sweep.method)})")
    upper = [u for u, _ in sweep.upper_bounds()]
    if any(u < p.local.bound for u, p in zip(upper, sweep.points)):
        ax.plot(eps, upper, "--", color="C0", label="upper bound (best at any radius ≥ ε)")
    ax.axhline(sweep.global_bound, color="C3", ls="--", label="global bound (product of norms)")
    if all(p.lower is not None for p in sweep.points):
        ax.plot(eps, [best for best, _ in sweep.lower_bounds()], "s-", color="C2", ms=3,
                label="lower bound (best at any radius ≤ ε)")
        ax.plot(eps, [p.lower.jacobian_norm for p in sweep.points], ":", color="C7",
                label="||J(x0)||")
    ax.set_yscale("log")
    if len(eps) > 2 and eps[-1] / eps[0] > 50 and np.allclose(np.diff(np.log(eps)), np.log(eps[1] / eps[0])):
        ax.set_xscale("log")
    ax.set_xlabel("ε (L2 radius of the input ball)")
    ax.set_ylabel("Lipschitz constant")
    ax.set_title(title or f"{Path(sweep.model).name}, x0 = {Path(sweep.input_name).name}, "
                          f"method {sweep.method!r}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
