"""Torch helpers for the families that train or export with torch (import torch lazily)."""

from __future__ import annotations

import importlib.util
import json
import sys
import time
import types
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from .common import OPSET, SEED


def torch_setup(seed: int = SEED) -> Any:
    """Import torch single-threaded, deterministic and seeded; return the module."""
    import torch

    torch.manual_seed(seed)
    torch.set_num_threads(1)  # bitwise-reproducible and fast enough for these sizes
    torch.use_deterministic_algorithms(True)
    return torch


def import_torchvision_models() -> Any:
    """Return ``torchvision.models`` without running ``torchvision/__init__``.

    torchvision's compiled ops do not load with the CPU torch build used here; its
    pure-Python model definitions do, once the package path is registered by hand.
    """
    if "torchvision" not in sys.modules:
        spec = importlib.util.find_spec("torchvision")
        if spec is None or spec.submodule_search_locations is None:
            raise ImportError("torchvision is not installed (pip install --no-deps torchvision)")
        pkg = types.ModuleType("torchvision")
        pkg.__path__ = list(spec.submodule_search_locations)
        pkg.__spec__ = spec  # torch.onnx's dynamo exporter calls find_spec("torchvision")
        sys.modules["torchvision"] = pkg
    return importlib.import_module("torchvision.models")


def train(net: Any, x: np.ndarray, y: np.ndarray, epochs: int, lr: float, seed: int) -> None:
    """Seeded minibatch Adam training with cross-entropy."""
    import torch

    g = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    loss_fn = torch.nn.CrossEntropyLoss()
    net.train()
    for _ in range(epochs):
        perm = torch.randperm(len(xt), generator=g)
        for i in range(0, len(xt), 64):
            idx = perm[i : i + 64]
            opt.zero_grad()
            loss_fn(net(xt[idx]), yt[idx]).backward()
            opt.step()
        sched.step()
    net.eval()


def predict(net: Any, x: np.ndarray) -> np.ndarray:
    """Class predictions of a torch net on a numpy batch."""
    import torch

    with torch.no_grad():
        return net(torch.from_numpy(x)).argmax(1).numpy()


def torch_forward(net: Any, x: np.ndarray) -> np.ndarray:
    """The net's float32 output on a numpy input."""
    import torch

    with torch.no_grad():
        return net(torch.from_numpy(x)).numpy()


def export_torch(
    net: Any, path: Path, shape: tuple[int, ...] = (1, 1, 8, 8), preserve: bool = False
) -> onnx.ModelProto:
    """Export with the legacy TorchScript exporter (dynamo=False, opset 17, static batch 1).

    ``preserve`` exports with ``TrainingMode.PRESERVE`` (the net is in eval mode):
    BatchNormalization then stays a node instead of being folded into the Conv.
    """
    import torch

    mode = torch.onnx.TrainingMode.PRESERVE if preserve else torch.onnx.TrainingMode.EVAL
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        # PRESERVE warns about constant folding in training mode; the net is in eval mode
        warnings.filterwarnings("ignore", "It is recommended that constant folding", UserWarning)
        torch.onnx.export(
            net,
            (torch.zeros(*shape),),
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=["x"],
            output_names=["logits"],
            training=mode,
        )
    return onnx.load(str(path))


def export_dynamo(net: Any, shape: tuple[int, ...]) -> onnx.ModelProto:
    """Export with torch's default (dynamo) exporter, its default opset, weights inline.

    The per-node ``pkg.torch.onnx.stack_trace`` metadata is dropped (it holds absolute
    file paths); the other node metadata (module names, FX node) is kept as emitted.
    """
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            net,
            (torch.zeros(*shape),),
            dynamo=True,
            input_names=["x"],
            output_names=["logits"],
            external_data=False,
            verbose=False,
        )
    model = program.model_proto
    for node in model.graph.node:  # stack traces name this machine's paths: not reproducible
        keep = [p for p in node.metadata_props if p.key != "pkg.torch.onnx.stack_trace"]
        del node.metadata_props[:]
        node.metadata_props.extend(keep)
    return model


EXPORTERS = {"ts": "TorchScript (dynamo=False, opset 17)", "dynamo": "dynamo (torch default)"}


def export(net: Any, kind: str, path: Path, shape: tuple[int, ...]) -> tuple[onnx.ModelProto, float]:
    """Export ``net`` with exporter ``kind`` ('ts' or 'dynamo'); return the model and seconds taken."""
    t0 = time.perf_counter()
    if kind == "ts":
        model = export_torch(net, path, shape)
    elif kind == "dynamo":
        model = export_dynamo(net, shape)
    else:
        raise ValueError(f"unknown exporter {kind!r}")
    return model, time.perf_counter() - t0


def output_metadata(y: np.ndarray) -> str:
    """The torch output as a JSON list of float32 values (stored in the model's metadata)."""
    return json.dumps([float(v) for v in np.asarray(y, np.float32).ravel()])
