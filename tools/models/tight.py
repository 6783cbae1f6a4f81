"""Tightness test set (issue 11): digits nets whose every ReLU and max-pool window is stable.

Each net is trained on sklearn digits, exported with the TorchScript exporter
(opset 17) and saved with an x0: the first held-out digit that the net
classifies correctly and at which every ReLU and every max-pool window is
provably stable for all x with ||x - x0|| <= EPS. The proof is the exact-prefix
argument: while the prefix up to a layer is stable it is affine on the ball, so a
unit's reach is exactly EPS * ||row of the prefix Jacobian||; a ReLU is stable when
|pre-activation| exceeds its reach by the factor MARGIN, a max-pool window when
the winner's lower end exceeds every other entry's upper end (reaches scaled by
MARGIN) or when all its entries are constant on the ball (dead ReLUs). It runs in
float64 on the torch net. Such nets are affine on the ball, so their local
Lipschitz constant there is exactly ||J(x0)||: a bound on them can be checked
against the truth.
"""

from __future__ import annotations

import copy
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
    require_close,
)
from .digits import load_digits_split, normalization
from .torchutil import export_torch, output_metadata, predict, torch_forward, torch_setup, train

EPS = 1e-3
MARGIN = 1.01  # |pre-activation| > MARGIN * reach: a 1% slack for the engine's float32 rounding


@dataclass(frozen=True)
class TightSpec:
    """One member: how to build the net, how long to train it, and where it goes."""

    name: str
    layers: Callable[[], list[Any]]  # the layers after the Normalize/Flatten front
    epochs: int
    lr: float
    shipped: bool
    doc: str
    flatten: bool = True  # MLPs flatten first; CNNs keep [1,1,8,8]
    preserve_bn: bool = False
    derived_from: str = ""  # same trained weights as this member, other export form


def _mlp(widths: list[int]) -> Callable[[], list[Any]]:
    def layers() -> list[Any]:
        from torch import nn

        out: list[Any] = []
        for fin, fout in zip(widths[:-1], widths[1:]):
            out += [nn.Linear(fin, fout), nn.ReLU()]
        return out[:-1]  # no ReLU after the logits

    return layers


def _cnn(pool: str, bn: bool) -> Callable[[], list[Any]]:
    def layers() -> list[Any]:
        from torch import nn

        def stage(cin: int, cout: int) -> list[Any]:
            conv = [nn.Conv2d(cin, cout, 3, padding=1)]
            norm = [nn.BatchNorm2d(cout)] if bn else []
            p = nn.MaxPool2d(2) if pool == "max" else nn.AvgPool2d(2)
            return conv + norm + [nn.ReLU(), p]

        return stage(1, 8) + stage(8, 16) + [nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)]

    return layers


SPECS = {
    s.name: s
    for s in [
        TightSpec("tight_mlp6x50", _mlp([64] + [50] * 6 + [10]), 60, 1e-3, True,
                  "MLP 64-50x6-10 (6 hidden ReLU layers of 50), Linear layers: Gemm"),
        TightSpec("tight_mlp6x50_matmul", _mlp([64] + [50] * 6 + [10]), 0, 0.0, True,
                  "tight_mlp6x50's weights written as x @ W + b: MatMul + Add",
                  derived_from="tight_mlp6x50"),
        TightSpec("tight_mlp256x4", _mlp([64] + [256] * 4 + [10]), 30, 1e-3, False,
                  "MLP 64-256x4-10 (4 hidden ReLU layers of 256), Gemm"),
        TightSpec("tight_cnn_maxpool", _cnn("max", False), 40, 3e-3, True,
                  "Conv(8) ReLU MaxPool2 Conv(16) ReLU MaxPool2 Linear(64,32) ReLU Linear(32,10)",
                  flatten=False),
        TightSpec("tight_cnn_avgpool", _cnn("avg", False), 40, 3e-3, True,
                  "Conv(8) ReLU AvgPool2 Conv(16) ReLU AvgPool2 Linear(64,32) ReLU Linear(32,10)",
                  flatten=False),
        TightSpec("tight_cnn_bn", _cnn("max", True), 40, 3e-3, True,
                  "Conv(8) BN ReLU MaxPool2 Conv(16) BN ReLU MaxPool2 Linear(64,32) ReLU Linear(32,10); "
                  "exported with TrainingMode.PRESERVE so BatchNormalization stays a node",
                  flatten=False, preserve_bn=True),
    ]
}  # fmt: skip
NAMES = tuple(SPECS)
SHIPPED = tuple(n for n, s in SPECS.items() if s.shipped)


def _front(mean: float, std: float, flatten: bool) -> list[Any]:
    """(x - mean) / std as Sub/Div with scalar constants, then Flatten for MLPs."""
    import torch
    from torch import nn

    class Normalize(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (x - mean) / std

    return [Normalize()] + ([nn.Flatten()] if flatten else [])


def matmul_form(net: Any) -> Any:
    """A copy of ``net`` with every Linear replaced by x @ W.T + b (exported as MatMul + Add)."""
    import torch
    from torch import nn

    class MatMulAdd(nn.Module):
        def __init__(self, linear: nn.Linear) -> None:
            super().__init__()
            self.weight = nn.Parameter(linear.weight.detach().T.contiguous())
            self.bias = nn.Parameter(linear.bias.detach().clone())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x @ self.weight + self.bias

    return nn.Sequential(*[MatMulAdd(m) if isinstance(m, nn.Linear) else m for m in net]).eval()


def stability(net: Any, x0: np.ndarray, eps: float = EPS) -> tuple[int, int, int, float]:
    """(ReLUs checked, max-pool windows checked, how many not provably stable, smallest margin ratio).

    Exact-prefix analysis in float64 (module docstring); once a layer has an
    unstable unit the later layers are not provable by it, so they all count as unstable.
    """
    import torch
    from torch import nn

    net64 = copy.deepcopy(net).double().eval().requires_grad_(False)
    layers = list(net64)
    x = torch.from_numpy(x0).double()
    relus = windows_checked = unstable = 0
    ratio = float("inf")
    for i, layer in enumerate(layers):
        if not isinstance(layer, (nn.ReLU, nn.MaxPool2d)):
            continue
        prefix = nn.Sequential(*layers[:i])
        with torch.no_grad():
            v = prefix(x)
        jac = torch.func.jacfwd(lambda z, p=prefix: p(z).flatten())(x)
        reach = eps * jac.reshape(v.numel(), -1).norm(dim=1).reshape(v.shape)
        if isinstance(layer, nn.ReLU):
            r = v.abs() / reach
            n_units = v.numel()
            bad = int((r <= MARGIN).sum()) if unstable == 0 else n_units
        else:
            k = layer.kernel_size
            if layer.stride != k or v.shape[-1] % k or v.shape[-2] % k:
                raise ValueError("stability: only non-overlapping max-pool windows are analysed")
            c, h, w = v.shape[1:]

            def windows(t: torch.Tensor, c: int = c, h: int = h, w: int = w, k: int = k) -> torch.Tensor:
                return t.reshape(c, h // k, k, w // k, k).permute(0, 1, 3, 2, 4).reshape(-1, k * k)

            vals, reaches = windows(v), windows(reach)
            win = vals.argmax(1, keepdim=True)
            others_v = vals.scatter(1, win, -torch.inf)
            lo_win = vals.gather(1, win)[:, 0] - MARGIN * reaches.gather(1, win)[:, 0]
            hi = (others_v + MARGIN * reaches).max(1).values
            # a window whose entries are all constant on the ball (dead ReLUs: 0 with reach 0) is constant
            constant = (reaches == 0).all(1)
            r = (vals.gather(1, win)[:, 0] - others_v.max(1).values) / (
                reaches.gather(1, win)[:, 0] + reaches.scatter(1, win, 0).max(1).values
            )
            r[constant] = torch.inf
            n_units = vals.shape[0]
            bad = int(((lo_win <= hi) & ~constant).sum()) if unstable == 0 else n_units
        if isinstance(layer, nn.ReLU):
            relus += n_units
        else:
            windows_checked += n_units
        unstable += bad
        ratio = min(ratio, float(r.min()))
    return relus, windows_checked, unstable, ratio


def build(names: list[str], out: Path, cache: Path | None) -> list[ModelRow]:
    """Train, export, check and save the named members (shipped ones to ``out``, others to ``cache``)."""
    torch_setup()
    x_tr, y_tr, x_te, y_te = load_digits_split()
    mean, std = normalization(x_tr)
    trained: dict[str, Any] = {}
    rows = []
    for name in names:
        spec = SPECS[name]
        dest = destination(name, spec.shipped, out, cache)
        t0 = time.perf_counter()
        if spec.derived_from:
            base = trained.get(spec.derived_from) or _train(SPECS[spec.derived_from], mean, std, x_tr, y_tr)
            net = matmul_form(base)
        else:
            net = _train(spec, mean, std, x_tr, y_tr)
        trained[name] = net
        t_train = time.perf_counter() - t0
        acc = float((predict(net, x_te) == y_te).mean())
        i0 = _choose_x0(net, x_te, y_te)
        x0 = x_te[i0 : i0 + 1].copy()
        relus, windows, unstable, ratio = stability(net, x0)
        assert unstable == 0

        path, x0_path = dest / f"{name}.onnx", dest / f"{name}_x0.npy"
        t0 = time.perf_counter()
        model = export_torch(net, path, preserve=spec.preserve_bn)
        t_export = time.perf_counter() - t0
        y_torch = torch_forward(net, x0)
        add_metadata(
            model, trained="sklearn digits", test_accuracy=f"{acc:.4f}", input_scale="pixels/16 in [0,1]",
            norm_mean=mean, norm_std=std, x0_test_index=i0, x0_label=int(y_te[i0]),
            exporter="TorchScript (dynamo=False, opset 17)", stable_eps=EPS,
            stable_relus=relus, stable_maxpool_windows=windows, stable_min_ratio=f"{ratio:.4g}",
            torch_output=output_metadata(y_torch),
        )  # fmt: skip
        np.save(x0_path, x0)
        y = check_and_run(model, path, x0)
        err = require_close(name, y, y_torch)
        size = path.stat().st_size
        if spec.shipped and size > SHIP_MAX_BYTES:
            raise ValueError(f"{name}: {size} bytes is too large to ship (> {SHIP_MAX_BYTES})")
        n_params = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
        print(
            f"== {path}  ({size} bytes, {n_params} parameters)  "
            f"trained {t_train:.1f}s, exported {t_export:.1f}s\n"
            f"   {spec.doc}\n   test acc {acc:.4f}; x0 = held-out #{i0} (label {int(y_te[i0])}); "
            f"{relus} ReLUs and {windows} max-pool windows, all stable at eps={EPS:g} "
            f"(min |pre|/reach {ratio:.3g})\n"
            f"   ops {op_histogram(model)}; onnxruntime vs torch {err:.1e} relative"
        )
        ops = op_histogram(model)
        seconds = t_train + t_export
        rows.append(ModelRow(name, "tight", "ts", spec.shipped, path, size, n_params, seconds, ops, err))
    return rows


def _train(spec: TightSpec, mean: float, std: float, x_tr: np.ndarray, y_tr: np.ndarray) -> Any:
    """The member's net, seeded and trained."""
    import torch
    from torch import nn

    torch.manual_seed(SEED)
    net = nn.Sequential(*_front(mean, std, spec.flatten), *spec.layers())
    train(net, x_tr, y_tr, epochs=spec.epochs, lr=spec.lr, seed=SEED)
    return net


def _choose_x0(net: Any, x_te: np.ndarray, y_te: np.ndarray) -> int:
    """First held-out digit the net classifies correctly with every unit stable at EPS."""
    ok = predict(net, x_te) == y_te
    for i in np.flatnonzero(ok):
        if stability(net, x_te[i : i + 1])[2] == 0:
            return int(i)
    raise ValueError("no held-out digit has every ReLU and window stable")
