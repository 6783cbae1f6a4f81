"""Real exporter output (issue 12): what torch.onnx.export emits for common architectures.

Every member is exported twice, with the TorchScript exporter (``_ts``: dynamo=False,
opset 17) and with torch's default dynamo exporter (``_dynamo``: its default opset,
weights inline), checked with onnx.checker, run in onnxruntime and compared with
torch on its x0 (within REL_TOL relative, else the build fails).

* torchvision (cache): ResNet-18 at 32x32 (10 classes) and 224x224, ResNet-50 and
  MobileNetV2 at 224x224; seeded init, BatchNorm affine parameters randomized and
  running statistics calibrated on seeded N(0,1) inputs; x0 seeded N(0,1). Untrained.
* digits (shipped, trained on sklearn digits, x0 the first held-out digit the net
  classifies correctly): a small residual CNN with batch-norm, a CNN with global
  mean pooling (``x.mean((2, 3))``), and one MLP 64-32-32-10 per activation.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .common import (
    SEED,
    SHIP_MAX_BYTES,
    ModelRow,
    add_metadata,
    check_and_run,
    destination,
    op_histogram,
    ort_forward,
    require_close,
)
from .digits import load_digits_split, normalization
from .torchutil import (
    EXPORTERS,
    export,
    import_torchvision_models,
    output_metadata,
    predict,
    torch_forward,
    torch_setup,
    train,
)

TIMING_RUNS = 5
BN_CALIBRATION = (2, 4)  # batches x images of N(0,1) inputs for the running statistics


@dataclass(frozen=True)
class ZooSpec:
    """One member: a factory for the torch net, its input shape, and training (epochs 0: none)."""

    name: str
    factory: Callable[..., Any]  # torchvision: no arguments; digits: (mean, std)
    shape: tuple[int, ...]
    doc: str
    epochs: int = 0
    lr: float = 0.0

    @property
    def shipped(self) -> bool:
        """Digits members are small and go to models/; torchvision ones to the cache."""
        return self.epochs > 0


def _torchvision(fn: str, **kwargs: Any) -> Callable[[], Any]:
    def make() -> Any:
        return getattr(import_torchvision_models(), fn)(**kwargs)

    return make


def _normalize(mean: float, std: float) -> Any:
    """(x - mean) / std as a module (Sub/Div with scalar constants)."""
    import torch
    from torch import nn

    class Normalize(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (x - mean) / std

    return Normalize()


def digits_resnet(mean: float, std: float) -> Any:
    """A small residual CNN with batch-norm, in torchvision's ResNet idioms at 8x8."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.shortcut = (
                nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                if stride != 1 or cin != cout
                else nn.Identity()
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.bn1(self.conv1(x)))
            return torch.relu(self.bn2(self.conv2(h)) + self.shortcut(x))

    return nn.Sequential(
        _normalize(mean, std),
        nn.Conv2d(1, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        Block(8, 8, 1), Block(8, 16, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )  # fmt: skip


def digits_gapcnn(mean: float, std: float) -> Any:
    """A small CNN with global pooling written as ``x.mean((2, 3))``."""
    import torch
    from torch import nn

    class SpatialMean(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean((2, 3))

    return nn.Sequential(
        _normalize(mean, std),
        nn.Conv2d(1, 16, 3, 1, 1), nn.ReLU(), nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU(),
        SpatialMean(), nn.Linear(32, 10),
    )  # fmt: skip


def _activations() -> dict[str, Callable[[], Any]]:
    """Activation modules by member name (a new module per call: PReLU has weights)."""
    from torch import nn

    return {
        "leakyrelu": lambda: nn.LeakyReLU(0.1),
        "prelu": lambda: nn.PReLU(32),
        "relu6": nn.ReLU6,
        "hardtanh": nn.Hardtanh,
        "sigmoid": nn.Sigmoid,
        "tanh": nn.Tanh,
        "softplus": nn.Softplus,
        "elu": nn.ELU,
        "gelu_erf": nn.GELU,
        "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
        "silu": nn.SiLU,
        "hardsigmoid": nn.Hardsigmoid,
        "hardswish": nn.Hardswish,
    }


ACTIVATIONS = (
    "leakyrelu", "prelu", "relu6", "hardtanh", "sigmoid", "tanh", "softplus", "elu",
    "gelu_erf", "gelu_tanh", "silu", "hardsigmoid", "hardswish",
)  # fmt: skip


def _act_mlp(act: str) -> Callable[[float, float], Any]:
    def make(mean: float, std: float) -> Any:
        from torch import nn

        a = _activations()[act]
        return nn.Sequential(
            _normalize(mean, std), nn.Flatten(),
            nn.Linear(64, 32), a(), nn.Linear(32, 32), a(), nn.Linear(32, 10),
        )  # fmt: skip

    return make


SPECS = {
    s.name: s
    for s in [
        ZooSpec("resnet18_32", _torchvision("resnet18", num_classes=10), (1, 3, 32, 32),
                "torchvision ResNet-18, 10 classes, at 1x3x32x32"),
        ZooSpec("resnet18_224", _torchvision("resnet18"), (1, 3, 224, 224),
                "torchvision ResNet-18 at 1x3x224x224"),
        ZooSpec("resnet50_224", _torchvision("resnet50"), (1, 3, 224, 224),
                "torchvision ResNet-50 at 1x3x224x224"),
        ZooSpec("mobilenet_v2_224", _torchvision("mobilenet_v2"), (1, 3, 224, 224),
                "torchvision MobileNetV2 at 1x3x224x224 (ReLU6 = Clip, depthwise convs, residual adds)"),
        ZooSpec("digits_resnet", digits_resnet, (1, 1, 8, 8),
                "residual CNN with batch-norm on digits: Conv(8) BN ReLU, basic blocks 8->8 and "
                "8->16 stride 2 (1x1 conv shortcut), AdaptiveAvgPool2d(1), Linear(16, 10)",
                epochs=40, lr=3e-3),
        ZooSpec("digits_gapcnn", digits_gapcnn, (1, 1, 8, 8),
                "CNN with global mean pooling on digits: Conv(16) ReLU Conv(32, stride 2) ReLU, "
                "x.mean((2, 3)), Linear(32, 10)",
                epochs=60, lr=1e-2),
        *[
            ZooSpec(f"act_{a}", _act_mlp(a), (1, 1, 8, 8), f"MLP 64-32-32-10 with {a} on digits",
                    epochs=30, lr=3e-3)
            for a in ACTIVATIONS
        ],
    ]
}  # fmt: skip
NAMES = tuple(SPECS)
SHIPPED = tuple(n for n, s in SPECS.items() if s.shipped)


def calibrate_bn(net: Any, shape: tuple[int, ...], seed: int) -> None:
    """Randomize BatchNorm affine parameters, then set running statistics from N(0,1) batches."""
    import torch
    from torch import nn

    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0.0, 0.1, generator=g)
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration batches
    batches, size = BN_CALIBRATION
    net.train()
    with torch.no_grad():
        for _ in range(batches):
            net(torch.randn((size, *shape[1:]), generator=g))
    net.eval()


def build(names: list[str], out: Path, cache: Path | None) -> list[ModelRow]:
    """Build the named members with both exporters (shipped ones to ``out``, others to ``cache``)."""
    import torch

    torch_setup()
    digits = None
    rows = []
    for name in names:
        spec = SPECS[name]
        dest = destination(name, spec.shipped, out, cache)
        t0 = time.perf_counter()
        torch.manual_seed(SEED)
        meta: dict[str, Any]
        if spec.shipped:
            if digits is None:
                digits = load_digits_split()
            x_tr, y_tr, x_te, y_te = digits
            mean, std = normalization(x_tr)
            net = spec.factory(mean, std)
            train(net, x_tr, y_tr, epochs=spec.epochs, lr=spec.lr, seed=SEED)
            right = predict(net, x_te) == y_te
            acc, i0 = float(right.mean()), int(np.flatnonzero(right)[0])
            x0 = x_te[i0 : i0 + 1].copy()
            meta = dict(trained="sklearn digits", test_accuracy=f"{acc:.4f}",
                        input_scale="pixels/16 in [0,1]", norm_mean=mean, norm_std=std,
                        x0_test_index=i0, x0_label=int(y_te[i0]))  # fmt: skip
            note = f"test acc {acc:.4f}, x0 = held-out #{i0} (label {int(y_te[i0])})"
        else:
            net = spec.factory().eval()
            calibrate_bn(net, spec.shape, SEED)
            x0 = np.random.default_rng(SEED + 1).standard_normal(spec.shape, dtype=np.float32)
            calib = f"{BN_CALIBRATION[0]}x{BN_CALIBRATION[1]} N(0,1) images"
            meta = dict(trained="no", seed=SEED, x0_seed=SEED + 1,
                        init="torchvision default; BatchNorm weight U(0.5,1.5), bias N(0,0.1^2), "
                             f"running statistics from {calib}")  # fmt: skip
            note = "untrained"
        t_net = time.perf_counter() - t0
        y_torch = torch_forward(net, x0)
        for kind in EXPORTERS:
            rows.append(_export_one(spec, net, kind, dest, x0, y_torch, meta, t_net, note))
    return rows


def _export_one(
    spec: ZooSpec, net: Any, kind: str, dest: Path, x0: np.ndarray, y_torch: np.ndarray,
    meta: dict[str, Any], t_net: float, note: str,
) -> ModelRow:  # fmt: skip
    """Export ``net`` with one exporter, check it against torch, save it and its x0."""
    name = f"{spec.name}_{kind}"
    path, x0_path = dest / f"{name}.onnx", dest / f"{name}_x0.npy"
    model, t_export = export(net, kind, path, spec.shape)
    add_metadata(model, **meta, exporter=EXPORTERS[kind], torch_output=output_metadata(y_torch))
    np.save(x0_path, x0)
    check_and_run(model, path, x0, chain=False)
    y, fwd = ort_forward(path, x0, TIMING_RUNS)
    err = require_close(name, y, y_torch)
    size = path.stat().st_size
    if spec.shipped and size > SHIP_MAX_BYTES:
        raise ValueError(f"{name}: {size} bytes is too large to ship (> {SHIP_MAX_BYTES})")
    n_params = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    ops = op_histogram(model)
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    print(
        f"== {path}  ({size / 1e3:.0f} kB, {n_params} parameters, opset {opset}, IR {model.ir_version})\n"
        f"   {spec.doc}; {note}\n"
        f"   net {t_net:.1f}s, export {t_export:.1f}s, ort forward {fwd * 1e3:.1f} ms; "
        f"onnxruntime vs torch {err:.1e} relative\n   ops {ops}"
    )
    return ModelRow(name, "zoo", kind, spec.shipped, path, size, n_params, t_net + t_export, ops, err)
