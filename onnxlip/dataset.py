"""Certify many inputs: read them, run them (in this process or on Dask), stream each
result to a resumable JSON-lines file, and summarize and plot them."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import math
import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .certify import TOP_CLASS, Certificate, Rule
from .errors import OnnxlipError
from .inputs import read_input
from .report import check_output, check_plot, method_label


def read_batch(path: str | os.PathLike, labels: str | None,
               input_shape) -> tuple[np.ndarray, np.ndarray | None]:
    """Inputs (N, *input_shape[1:]) and optional integer labels.

    `path` is a .npy batch, an .npz holding the inputs (and labels as its
    second, integer array, e.g. x and y), or a folder of single-input .npy files.
    """
    path = Path(path)
    found_labels = None
    if path.is_dir():
        files = sorted(path.glob("*.npy"))
        if not files:
            raise OnnxlipError(f"{path}: no .npy files in the folder")
        batch = np.stack([read_input(f).reshape(input_shape[1:]) for f in files])
    elif path.suffix.lower() == ".npz":
        batch, found_labels = _read_npz_batch(path)
    elif path.suffix.lower() == ".npy":
        batch = _map_npy(path)
    else:
        batch = read_input(path)
    if labels is not None:
        found_labels = read_input(labels)
    batch = _as_batch(batch, input_shape, path)
    if found_labels is not None:
        found_labels = np.asarray(found_labels).ravel()
        if found_labels.dtype.kind not in "iu" or found_labels.size != len(batch):
            raise OnnxlipError(f"labels: expected {len(batch)} integers, got {found_labels.size} "
                               f"of dtype {found_labels.dtype}")
    return batch, found_labels


def _map_npy(path: Path) -> np.ndarray:
    """A .npy batch memory-mapped: read a chunk at a time, never whole."""
    try:
        batch = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as exc:
        raise OnnxlipError(f"{path}: not a readable .npy array ({_one_line(exc)})") from None
    if batch.dtype.kind not in "fiu":
        raise OnnxlipError(f"{path}: holds {batch.dtype} values; expected numbers")
    return batch


def _read_npz_batch(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {k: archive[k] for k in archive.files}
    except Exception as exc:
        raise OnnxlipError(f"{path}: not a readable .npz archive ({exc})") from None
    inputs = [v for v in arrays.values() if v.dtype.kind == "f"]
    labels = [v for v in arrays.values() if v.dtype.kind in "iu"]
    if len(inputs) != 1 or len(labels) > 1:
        raise OnnxlipError(f"{path}: expected one float array of inputs and at most one integer "
                           f"array of labels, found {sorted(arrays)}")
    return inputs[0], labels[0] if labels else None


def _as_batch(batch: np.ndarray, input_shape, path) -> np.ndarray:
    sample = tuple(input_shape[1:])
    if batch.shape[1:] == sample:
        return batch
    if batch.ndim == len(input_shape) + 1 and batch.shape[1] == 1 and batch.shape[2:] == sample:
        return batch[:, 0]
    raise OnnxlipError(f"{path}: inputs of shape {batch.shape} do not match the model's input "
                       f"{tuple(input_shape)} (expected (N, {', '.join(map(str, sample))}))")


def certify_rows(net, indices: list[int], inputs: np.ndarray, labels: list[int | None],
                 rel_tol: float, method: str, rule: Rule = TOP_CLASS) -> list[dict]:
    """One row per input; an input that fails gets its one-line error, the others go on."""
    rows = []
    for index, x, label in zip(indices, inputs, labels):
        start = time.perf_counter()
        try:
            cert = net.certify(x[None], rel_tol=rel_tol, label=label, method=method, rule=rule)
        except (OnnxlipError, MemoryError, ArithmeticError, ValueError) as exc:
            rows.append(error_row(index, label, _one_line(exc), time.perf_counter() - start))
            continue
        except Exception as exc:  # a bug: recorded as such, the run goes on
            rows.append(error_row(index, label, f"internal error: {_one_line(exc)}",
                                  time.perf_counter() - start))
            continue
        rows.append(certificate_row(index, cert))
    return rows


def _certify_on_worker(options: dict, indices, inputs, labels, rel_tol, method,
                       rule) -> list[dict]:
    from . import distributed

    distributed.single_threaded()
    return certify_rows(distributed.network(options), indices, inputs, labels, rel_tol, method,
                        rule)


def certificate_row(index: int, cert: Certificate) -> dict:
    """A certificate as one JSON-ready row (an attack that found nothing: null)."""
    row = {"index": index} | cert.to_dict() | {"error": None}
    if math.isinf(row["attack_distance"]):
        row["attack_distance"] = None
    return row


def error_row(index: int, label: int | None, error: str, seconds: float = 0.0) -> dict:
    return {"index": index, "label": label, "error": error, "seconds": seconds}


def _one_line(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [""])[0][:300]
    return f"{type(exc).__name__}: {text}" if not isinstance(exc, OnnxlipError) else text


@dataclass
class DatasetResult:
    """The rows of a run (or of a results file), in input order."""

    rows: list[dict]
    seconds: float

    @property
    def certificates(self) -> list[Certificate]:
        fields = Certificate.__dataclass_fields__
        return [Certificate(**{k: math.inf if k == "attack_distance" and v is None else v
                               for k, v in r.items() if k in fields})
                for r in self.rows if r.get("error") is None]

    @property
    def failed(self) -> dict[int, str]:
        return {r["index"]: r["error"] for r in self.rows if r.get("error") is not None}

    @property
    def labelled(self) -> bool:
        return bool(self.certificates) and all(c.label is not None for c in self.certificates)

    def summary(self, radii: list[float]) -> dict:
        """Over the inputs that did not fail: accuracy and certified accuracy at
        `radii` (None without labels: there is no accuracy then), and `certified`:
        the fraction of inputs whose predicted class is certified at each radius;
        `radius_tests`: how many local radii each test certified; `attack_rounding`: how
        many attacks failed the rule inside a certified radius by onnxruntime's float32
        rounding only (Certificate.attack_rounding). Medians are over
        the correctly classified inputs (every input without labels)."""
        certs = self.certificates
        counted = [c for c in certs if c.correct is not False]

        def median(attr: str) -> float | None:
            return float(np.median([getattr(c, attr) for c in counted])) if counted else None

        def fractions(only_correct: bool) -> dict:
            keep = np.array([c.correct is not False or not only_correct for c in certs], dtype=bool)
            local = np.where(keep, [c.radius_local for c in certs], -np.inf)
            glob = np.where(keep, [c.radius_global for c in certs], -np.inf)
            return {str(r): {"local": float(np.mean(local >= r)) if certs else 0.0,
                             "global": float(np.mean(glob >= r)) if certs else 0.0}
                    for r in radii}

        labelled = self.labelled
        return {
            "inputs": len(certs), "failed": len(self.rows) - len(certs), "labelled": labelled,
            "accuracy": len(counted) / len(certs) if labelled else None,
            "median_radius_local": median("radius_local"),
            "median_radius_global": median("radius_global"),
            "median_attack_distance": median("attack_distance"),
            "certified_accuracy": fractions(True) if labelled else None,
            "certified": fractions(False),
            "radius_tests": dict(Counter(c.radius_test for c in certs if c.radius_test)),
            "attack_rounding": sum(c.attack_rounding for c in certs),
            "seconds": self.seconds,
            "input_seconds": float(sum(r.get("seconds", 0.0) for r in self.rows)),
        }


class ResultsFile:
    """A JSON-lines file: a header naming the model and options, then one row per input.

    Each row is written, flushed and synced as it arrives. Opening an existing
    file resumes it: its header must match, a torn last line (a run killed
    mid-write) is cut off, and the rows already there are `done`.
    """

    def __init__(self, path: str | os.PathLike, header: dict):
        self.path = Path(path)
        self.done: dict[int, dict] = {}
        if self.path.is_file() and self.path.stat().st_size:
            found, rows, good = read_results(self.path)
            _check_same_run(self.path, found, header)
            self.done = {r["index"]: r for r in rows}
            with open(self.path, "r+b") as handle:
                handle.truncate(good)
        else:
            self.path.write_text("")
            self.write(header)

    def write(self, row: dict) -> None:
        """Append one row, on disk when this returns."""
        with open(self.path, "a") as handle:
            handle.write(json.dumps(row) + "\n")
            handle.flush()
            os.fsync(handle.fileno())


def results_header(load_kwargs: dict, source: str, count: int, rel_tol: float, method: str,
                   rule: Rule = TOP_CLASS) -> dict:
    """What identifies a run: the model (by content), its load options, the inputs, the method."""
    digest = hashlib.sha256()
    with open(load_kwargs["path"], "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    # The seed is not part of a run's identity: a resumed run draws fresh start
    # vectors, each row's certificate holding with the same failure probability.
    options = {k: (list(v) if isinstance(v, tuple) else v)
               for k, v in load_kwargs.items() if k not in ("path", "seed")}
    return {"onnxlip_results": 1, "model": os.path.abspath(load_kwargs["path"]),
            "model_sha256": digest.hexdigest(),
            "options": options | {"rel_tol": rel_tol, "method": method, "decision": rule.decision,
                                  "target": rule.target, "margin": rule.margin},
            "inputs": os.path.abspath(source), "count": count}


def _check_same_run(path: Path, found: dict, header: dict) -> None:
    for key in ("model_sha256", "options", "inputs", "count"):
        if found.get(key) != header[key]:
            was, now = found.get(key), header[key]
            if key == "options":
                differ = sorted(k for k in set(was or {}) | set(now) if (was or {}).get(k) != now.get(k))
                was, now = ({k: (d or {}).get(k) for k in differ} for d in (was, now))
            raise OnnxlipError(f"{path}: holds results of another run ({key} {was} there, {now} "
                               "now); use another --out or remove the file")


def read_results(path: str | os.PathLike) -> tuple[dict, list[dict], int]:
    """(header, rows, bytes up to the end of the last whole row) of a results file.

    A last line without its newline is a row torn by a killed run: left out.
    """
    path = Path(path)
    if not path.is_file():
        raise OnnxlipError(f"{path}: no such results file")
    data = path.read_bytes()
    whole = data[:data.rfind(b"\n") + 1]
    parsed = []
    for number, line in enumerate(whole.splitlines(), 1):
        try:
            parsed.append(json.loads(line))
        except ValueError:
            raise OnnxlipError(f"{path}: line {number} is not a JSON row") from None
    if not parsed or not isinstance(parsed[0], dict) or "onnxlip_results" not in parsed[0]:
        raise OnnxlipError(f"{path}: not an onnxlip results file (no header line)")
    rows = parsed[1:]
    if any(not isinstance(r, dict) or not isinstance(r.get("index"), int) for r in rows):
        raise OnnxlipError(f"{path}: a row without an integer 'index'")
    return parsed[0], rows, len(whole)


def certify_dataset(load_kwargs: dict, batch: np.ndarray, labels: np.ndarray | None,
                    rel_tol: float = 1e-3, workers: int | None = None,
                    progress: bool = False, method: str = "auto", rule: Rule = TOP_CLASS, *,
                    out: str | os.PathLike | None = None, source: str = "",
                    start: int = 0, end: int | None = None, scheduler: str | None = None,
                    client=None) -> DatasetResult:
    """Certify inputs start..end-1 of `batch`: in this process when `workers` is 1, else
    on Dask (`client`, the cluster at `scheduler`, or a new LocalCluster of `workers`).

    With `out`, every row is appended to that results file as it arrives, and the
    inputs it already holds (of the same model and options) are not certified again.
    """
    begin = time.perf_counter()
    end = len(batch) if end is None else min(end, len(batch))
    if not 0 <= start < end:
        raise OnnxlipError(f"--start {start} / --end {end}: no inputs among the {len(batch)}")
    results = None
    if out is not None:
        header = results_header(load_kwargs, source, len(batch), rel_tol, method, rule)
        results = ResultsFile(out, header)
    done = {i: r for i, r in (results.done.items() if results else ()) if start <= i < end}
    pending = [i for i in range(start, end) if i not in done]
    rows = dict(done)
    with tqdm(total=end - start, initial=len(done), desc="certify", unit="input",
              disable=not progress, dynamic_ncols=True) as bar:
        for row in _run(load_kwargs, batch, labels, pending, (rel_tol, method, rule), workers,
                        scheduler, client):
            if results is not None:
                results.write(row)
            rows[row["index"]] = row
            bar.update(1)
    return DatasetResult([rows[i] for i in sorted(rows)], time.perf_counter() - begin)


def _run(load_kwargs, batch, labels, pending, settings: tuple, workers, scheduler,
         client) -> Iterator[dict]:
    """Rows of the pending inputs as they arrive; settings: (rel_tol, method, rule)."""
    if not pending:
        return

    def chunks(size: int) -> Iterator[tuple]:
        for at in range(0, len(pending), size):
            idx = pending[at:at + size]
            yield (load_kwargs, idx, np.array(batch[idx]),
                   [None if labels is None else int(labels[i]) for i in idx], *settings)

    if client is None and scheduler is None and workers == 1:
        from .distributed import network

        net = network(load_kwargs)
        for chunk in chunks(1):
            yield from certify_rows(net, *chunk[1:])
        return
    from . import distributed

    with contextlib.ExitStack() as stack:
        if client is None:
            client = stack.enter_context(distributed.open_client(workers, scheduler))
        slots = distributed.worker_count(client)
        size = max(1, min(CHUNK, len(pending) // (4 * slots)))
        for job, outcome in distributed.map_unordered(client, _certify_on_worker, chunks(size),
                                                      2 * slots + 1, _split):
            if isinstance(outcome, BaseException):
                yield error_row(job[1][0], job[3][0], f"lost: {_one_line(outcome)}")
            else:
                yield from outcome


#: Inputs per Dask task, at most: fewer tasks to schedule, fewer inputs in flight.
CHUNK = 4


def _split(job: tuple) -> list[tuple]:
    """A chunk that failed, as one job per input: only the culprit then fails."""
    options, idx, inputs, labels, *settings = job
    return [(options, [i], inputs[k:k + 1], [labels[k]], *settings) for k, i in enumerate(idx)]


#: The file suffixes write_rows knows (.jsonl: the streamed, resumable results file).
ROW_FORMATS = ("csv", "json", "jsonl")


def write_rows(result: DatasetResult, path: str | Path) -> None:
    """One row per input: CSV, or JSON when the name ends in .json."""
    check_output(path, "rows file", ("csv", "json"))
    rows = result.rows
    if str(path).lower().endswith(".json"):
        Path(path).write_text(json.dumps(rows, indent=1))
        return
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def plot_certified_accuracy(result: DatasetResult, path: str | Path, title: str,
                            method: str = "auto") -> None:
    """Certified accuracy against radius, from the local and the global bound, and
    the attack's curve: an upper limit of robust accuracy (not a certificate).
    Without labels, the fractions of inputs whose predicted class is certified."""
    check_plot(path)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    certs = result.certificates
    what = "accuracy" if result.labelled else "fraction"
    curves = (("radius_local", f"certified {what}, local analysis\n({method_label(method)})", "-"),
              ("radius_global", f"certified {what}, global bound", "--"),
              ("attack_distance", f"attack: upper limit of\nrobust {what} (not certified)", ":"))
    radii = {attr: np.array([getattr(c, attr) if c.correct is not False else -np.inf
                             for c in certs]) for attr, _, _ in curves}
    seen = np.concatenate(list(radii.values()))
    seen = seen[np.isfinite(seen) & (seen > 0)]
    left, right = (seen.min() / 1.25, seen.max() * 1.25) if seen.size else (1e-3, 1.0)
    grid = np.unique(np.concatenate([[left], seen, [right]]))  # every curve spans left..right
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    for attr, label, style in curves:  # the fraction with radius ≥ r, exact on every step
        ax.plot(grid, [np.mean(radii[attr] >= r) for r in grid], style, drawstyle="steps-pre",
                label=label)
    ax.set_xscale("log")
    ax.set_xlim(left, right)
    ax.set_xlabel("L2 radius")
    ax.set_ylabel("fraction of inputs" if result.labelled else "fraction of inputs (no labels)")
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
