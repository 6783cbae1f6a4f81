"""Checks, reports and ONNX helpers shared by every model family."""

from __future__ import annotations

import os
import statistics
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper

SEED = 0
OPSET = 17
IR_VERSION = 8  # what the torch exporter writes; readable by old and new runtimes
REPO_ROOT = Path(__file__).resolve().parents[2]
SHIP_MAX_BYTES = 100_000  # a new model larger than this goes to the cache, not models/
TIMING_RUNS = 10  # forward passes timed (median) after one warm-up
REL_TOL = 1e-4  # onnxruntime vs torch, relative to the largest output magnitude

ALLOWED_OPS = frozenset(
    {
        "Conv", "Gemm", "MatMul", "Add", "Sub", "Mul", "Div", "BatchNormalization",
        "Flatten", "Reshape", "Relu", "MaxPool", "AveragePool", "Constant", "Shape",
        "Gather", "Unsqueeze", "Concat", "Identity",
    }
)  # fmt: skip


def main_chain(model: onnx.ModelProto) -> list[str]:
    """Return the op types along the data path input -> output.

    Raises ValueError if the graph is not a simple chain: every tensor on the
    data path must be consumed by exactly one non-``Shape`` node, and that node
    must take exactly one data-path input (other inputs are initializers or
    outputs of constant/shape side subgraphs).
    """
    graph = model.graph
    init_names = {t.name for t in graph.initializer}
    inputs = [i.name for i in graph.input if i.name not in init_names]
    if len(inputs) != 1 or len(graph.output) != 1:
        raise ValueError(
            f"expected one input and one output, got {inputs}, {len(graph.output)}"
        )
    out_name = graph.output[0].name
    current = inputs[0]
    data_tensors = {current}
    chain: list[str] = []
    while current != out_name:
        consumers = [
            n for n in graph.node if current in n.input and n.op_type != "Shape"
        ]
        if len(consumers) != 1:
            raise ValueError(
                f"tensor {current!r} has {len(consumers)} non-Shape consumers"
            )
        node = consumers[0]
        on_path = [i for i in node.input if i in data_tensors]
        if len(on_path) != 1 or node.input[0] != current:
            raise ValueError(f"node {node.name or node.op_type} is not a chain step")
        if len(node.output) < 1:
            raise ValueError(f"node {node.name or node.op_type} has no output")
        chain.append(node.op_type)
        current = node.output[0]
        data_tensors.add(current)
    return chain


def ort_run(path: Path, x0: np.ndarray) -> np.ndarray:
    """The model's onnxruntime output on ``x0`` (CPU provider)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {sess.get_inputs()[0].name: x0})
    return np.asarray(y)


def check_and_run(
    model: onnx.ModelProto, path: Path, x0: np.ndarray, chain: bool = True
) -> np.ndarray:
    """Validate ``model``, save it to ``path`` and return its onnxruntime output on ``x0``.

    With ``chain`` the model must also be a chain of :data:`ALLOWED_OPS`; the
    exporter-zoo models (residual nets, other activations) are checked without it.
    """
    onnx.checker.check_model(model, full_check=True)
    if chain:
        bad = sorted({n.op_type for n in model.graph.node} - ALLOWED_OPS)
        if bad:
            raise ValueError(f"{path.name}: ops outside the allowed set: {bad}")
        main_chain(model)
    in_dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    if list(x0.shape) != in_dims or x0.dtype != np.float32:
        raise ValueError(
            f"{path.name}: x0 {x0.shape} {x0.dtype} does not match input {in_dims}"
        )
    onnx.save(model, str(path))
    return ort_run(path, x0)


def op_histogram(model: onnx.ModelProto) -> dict[str, int]:
    """Node count per op type (top-level graph), sorted by name."""
    return dict(sorted(Counter(n.op_type for n in model.graph.node).items()))


def report(
    path: Path, x0_path: Path, model: onnx.ModelProto, y: np.ndarray, extra: str = ""
) -> None:
    """Print a short summary of one written model."""
    counts = Counter(n.op_type for n in model.graph.node)
    n_params = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    print(
        f"== {path.name}  ({path.stat().st_size} bytes, {n_params} initializer values)"
    )
    print(
        f"   input  {[d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]}"
        f"  x0 -> {x0_path.name} ({x0_path.stat().st_size} bytes)"
    )
    try:
        print(f"   chain  {' -> '.join(main_chain(model))}")
    except ValueError as exc:
        print(f"   graph  not a chain ({exc})")
    print(f"   nodes  {dict(sorted(counts.items()))}")
    if extra:
        print(f"   {extra}")
    print(f"   ort(x0) = {np.array2string(y.ravel(), precision=4, max_line_width=200)}")


def destination(name: str, shipped: bool, out: Path, cache: Path | None) -> Path:
    """Where a family member goes (shipped ones to ``out``, others to ``cache``), created."""
    dest = out if shipped else cache
    if dest is None:
        raise ValueError(f"{name} goes to the cache: give a cache folder")
    dest.mkdir(parents=True, exist_ok=True)
    return dest


def make_model(graph: onnx.GraphProto, doc: str) -> onnx.ModelProto:
    """Wrap a graph into a model with the project's opset and IR version."""
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="onnxlip-make_models",
        doc_string=doc,
    )
    model.ir_version = IR_VERSION
    return model


def add_metadata(model: onnx.ModelProto, **items: Any) -> None:
    """Attach key/value strings to ``model.metadata_props``."""
    helper.set_model_props(model, {k: str(v) for k, v in items.items()})


def rel_diff(y: np.ndarray, ref: np.ndarray) -> float:
    """max |y - ref| / max |ref| (max |y - ref| when ref is all zero)."""
    scale = float(np.abs(ref).max())
    err = float(np.abs(np.asarray(y, np.float64) - ref).max())
    return err / scale if scale > 0 else err


def require_close(name: str, y: np.ndarray, ref: np.ndarray, tol: float = REL_TOL) -> float:
    """Raise if onnxruntime's ``y`` is not within ``tol`` of torch's ``ref``; return the error."""
    if y.shape != ref.shape:
        raise ValueError(f"{name}: onnxruntime output {y.shape} vs torch {ref.shape}")
    err = rel_diff(y, ref)
    if not err <= tol:
        raise ValueError(f"{name}: onnxruntime differs from torch by {err:.2e} relative (> {tol:g})")
    return err


def ort_forward(path: Path, x0: np.ndarray, runs: int = TIMING_RUNS) -> tuple[np.ndarray, float]:
    """Output on ``x0`` and median seconds of ``runs`` forward passes after one warm-up."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = os.cpu_count() or 1  # as tools/bench.py
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: x0}
    (y,) = sess.run(None, feed)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t0)
    return np.asarray(y), statistics.median(times)


def default_cache() -> Path:
    """``$ONNXLIP_CACHE`` if set and non-empty, else ``~/.cache/onnxlip``."""
    env = os.environ.get("ONNXLIP_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "onnxlip"


@dataclass
class ModelRow:
    """What one built model is, for the summary tables."""

    name: str
    family: str
    exporter: str  # ts or dynamo
    shipped: bool  # in models/ (else in the cache)
    path: Path
    bytes: int
    params: int
    seconds: float  # training + export (+ BN calibration)
    ops: dict[str, int]
    rel_err: float  # onnxruntime vs torch


def print_rows(rows: list[ModelRow]) -> None:
    """A Markdown table of the built models and the op types their exporter emitted."""
    print("\n| model | exporter | where | size | params | build s | ort vs torch | op types |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        where = "models/" if r.shipped else "cache"
        ops = ", ".join(f"{k} {v}" for k, v in r.ops.items())
        size = f"{r.bytes / 1e6:.1f} MB" if r.bytes >= 1e6 else f"{r.bytes / 1e3:.0f} kB"
        print(f"| {r.name} | {r.exporter} | {where} | {size} | {r.params:,} | {r.seconds:.1f} "
              f"| {r.rel_err:.0e} | {ops} |")  # fmt: skip
