"""Certify many inputs: a batch file or a folder, a process pool, a summary and a plot."""

from __future__ import annotations

import csv
import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .certify import TOP_CLASS, Certificate, Rule
from .errors import OnnxlipError
from .inputs import read_input
from .report import check_output, check_plot, method_label

_WORKER: dict = {}


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


def _init_worker(load_kwargs: dict) -> None:
    from .network import load
    from .operators import ort

    ort.THREADS = 1  # one process per core
    _WORKER["net"] = load(**load_kwargs)


def _certify_one(args) -> Certificate:
    x, label, rel_tol, method, rule = args
    return _WORKER["net"].certify(x[None], rel_tol=rel_tol, label=label, method=method, rule=rule)


@dataclass
class DatasetResult:
    certificates: list[Certificate]
    seconds: float

    @property
    def labelled(self) -> bool:
        return bool(self.certificates) and all(c.label is not None for c in self.certificates)

    def summary(self, radii: list[float]) -> dict:
        """Accuracy and certified accuracy at `radii` (None without labels: there is
        no accuracy then), and `certified`: the fraction of inputs whose predicted
        class is certified at each radius. Medians are over the correctly classified
        inputs (every input without labels)."""
        certs = self.certificates
        counted = [c for c in certs if c.correct is not False]

        def median(attr: str) -> float | None:
            return float(np.median([getattr(c, attr) for c in counted])) if counted else None

        def fractions(only_correct: bool) -> dict:
            keep = np.array([c.correct is not False or not only_correct for c in certs])
            local = np.where(keep, [c.radius_local for c in certs], -np.inf)
            glob = np.where(keep, [c.radius_global for c in certs], -np.inf)
            return {str(r): {"local": float(np.mean(local >= r)),
                             "global": float(np.mean(glob >= r))} for r in radii}

        labelled = self.labelled
        return {
            "inputs": len(certs), "labelled": labelled,
            "accuracy": len(counted) / len(certs) if labelled else None,
            "median_radius_local": median("radius_local"),
            "median_radius_global": median("radius_global"),
            "median_attack_distance": median("attack_distance"),
            "certified_accuracy": fractions(True) if labelled else None,
            "certified": fractions(False),
            "seconds": self.seconds,
        }


def certify_dataset(load_kwargs: dict, batch: np.ndarray, labels: np.ndarray | None,
                    rel_tol: float = 1e-3, workers: int | None = None,
                    progress: bool = False, method: str = "paper",
                    rule: Rule = TOP_CLASS) -> DatasetResult:
    """Certify every input, in a pool of `workers` processes (default: one per core)."""
    import time

    start = time.perf_counter()
    workers = workers or os.cpu_count() or 1
    jobs = [(batch[i], None if labels is None else int(labels[i]), rel_tol, method, rule)
            for i in range(len(batch))]
    bar = dict(total=len(jobs), desc="certify", unit="input", disable=not progress)
    if workers == 1:
        _init_worker(load_kwargs)
        certs = [_certify_one(j) for j in tqdm(jobs, **bar)]
    else:
        with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(load_kwargs,)) as pool:
            certs = list(tqdm(pool.map(_certify_one, jobs, chunksize=4), **bar))
    return DatasetResult(certs, time.perf_counter() - start)


#: The file suffixes write_rows knows.
ROW_FORMATS = ("csv", "json")


def write_rows(result: DatasetResult, path: str | Path) -> None:
    """One row per input: CSV, or JSON when the name ends in .json."""
    check_output(path, "rows file", ROW_FORMATS)
    rows = [{"index": i} | c.to_dict() for i, c in enumerate(result.certificates)]
    if str(path).lower().endswith(".json"):
        Path(path).write_text(json.dumps(rows, indent=1))
        return
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def plot_certified_accuracy(result: DatasetResult, path: str | Path, title: str,
                            method: str = "paper") -> None:
    """Certified accuracy against radius, from the local and the global bound, and
    the attack's curve: an upper limit of robust accuracy (not a certificate).
    Without labels, the fractions of inputs whose predicted class is certified."""
    check_plot(path)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    certs = result.certificates
    what = "accuracy" if result.labelled else "fraction"
    curves = (("radius_local", f"certified {what}, local bound\n({method_label(method)})", "-"),
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
