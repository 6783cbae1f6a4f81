"""Large benchmark models, written to the cache folder (never into ``models/``).

``alexnet.onnx`` (244 MB), ``vgg16.onnx`` (553 MB) and ``vgg11.onnx`` (42 MB,
64x64 input, 10 classes) plus ``<name>_x0.npy``. They mirror torchvision's
architectures (node and initializer names as in its ``state_dict``, Dropout
omitted) with seeded, untrained He-initialised weights, built with onnx.helper
from numpy (no torch). Each is checked by path (``check_model(path,
full_check=True)``) and timed in onnxruntime (median of 10 forward passes after
one warm-up).
"""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .common import ALLOWED_OPS, TIMING_RUNS, add_metadata, main_chain, make_model, ort_forward

LARGE_NAMES = ("alexnet", "vgg16", "vgg11")
LARGE_BIAS_STD = 0.01
VGG_CFG: dict[str, list[int | str]] = {
    "A": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "D": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


@dataclass(frozen=True)
class Layer:
    """One chain step named like torchvision's module path.

    ``op`` is conv, relu, maxpool, flatten or linear; ``cin``/``cout`` are
    channels (conv) or features (linear); ``kernel``/``stride``/``pad`` apply
    to conv and maxpool.
    """

    op: str
    name: str
    cin: int = 0
    cout: int = 0
    kernel: int = 0
    stride: int = 1
    pad: int = 0


@dataclass(frozen=True)
class LargeSpec:
    """A large benchmark model: input shape, layer chain, weight seed, description."""

    name: str
    input_shape: tuple[int, int, int, int]
    layers: tuple[Layer, ...]
    seed: int
    doc: str


def _conv(name: str, cin: int, cout: int, k: int, s: int, p: int) -> Layer:
    """Conv2d(cin, cout, kernel k, stride s, padding p)."""
    return Layer("conv", name, cin, cout, k, s, p)


def _linear(name: str, fin: int, fout: int) -> Layer:
    """Linear(fin, fout)."""
    return Layer("linear", name, fin, fout)


def alexnet_layers() -> tuple[Layer, ...]:
    """torchvision AlexNet; avgpool (identity at 224x224) and the Dropouts are omitted."""
    return (
        _conv("features.0", 3, 64, 11, 4, 2), Layer("relu", "features.1"),
        Layer("maxpool", "features.2", kernel=3, stride=2),
        _conv("features.3", 64, 192, 5, 1, 2), Layer("relu", "features.4"),
        Layer("maxpool", "features.5", kernel=3, stride=2),
        _conv("features.6", 192, 384, 3, 1, 1), Layer("relu", "features.7"),
        _conv("features.8", 384, 256, 3, 1, 1), Layer("relu", "features.9"),
        _conv("features.10", 256, 256, 3, 1, 1), Layer("relu", "features.11"),
        Layer("maxpool", "features.12", kernel=3, stride=2),
        Layer("flatten", "flatten"),
        # classifier.0 and classifier.3 are Dropout in torchvision
        _linear("classifier.1", 256 * 6 * 6, 4096), Layer("relu", "classifier.2"),
        _linear("classifier.4", 4096, 4096), Layer("relu", "classifier.5"),
        _linear("classifier.6", 4096, 1000),
    )  # fmt: skip


def vgg_layers(cfg: list[int | str], flat: int, hidden: int, classes: int) -> tuple[Layer, ...]:
    """torchvision VGG without batch norm; avgpool and the Dropouts are omitted."""
    layers: list[Layer] = []
    cin, i = 3, 0
    for v in cfg:
        if v == "M":
            layers.append(Layer("maxpool", f"features.{i}", kernel=2, stride=2))
            i += 1
        else:
            assert isinstance(v, int)
            layers += [_conv(f"features.{i}", cin, v, 3, 1, 1), Layer("relu", f"features.{i + 1}")]
            cin, i = v, i + 2
    # torchvision classifier: 0 Linear, 1 ReLU, 2 Dropout, 3 Linear, 4 ReLU, 5 Dropout, 6 Linear
    layers += [
        Layer("flatten", "flatten"),
        _linear("classifier.0", flat, hidden), Layer("relu", "classifier.1"),
        _linear("classifier.3", hidden, hidden), Layer("relu", "classifier.4"),
        _linear("classifier.6", hidden, classes),
    ]  # fmt: skip
    return tuple(layers)


def large_specs() -> dict[str, LargeSpec]:
    """The large benchmark models, by name."""
    specs = [
        LargeSpec(
            "alexnet", (1, 3, 224, 224), alexnet_layers(), 1000,
            "torchvision AlexNet at 1x3x224x224 (Dropout omitted; AdaptiveAvgPool2d(6) "
            "omitted: the feature map is already 6x6); untrained, seeded He init",
        ),
        LargeSpec(
            "vgg16", (1, 3, 224, 224), vgg_layers(VGG_CFG["D"], 512 * 7 * 7, 4096, 1000), 1016,
            "torchvision VGG16 (configuration D, no batch norm) at 1x3x224x224 (Dropout omitted; "
            "AdaptiveAvgPool2d(7) omitted: the feature map is already 7x7); untrained, seeded He init",
        ),
        LargeSpec(
            "vgg11", (1, 3, 64, 64), vgg_layers(VGG_CFG["A"], 512 * 2 * 2, 512, 10), 1011,
            "VGG11 features (configuration A, no batch norm) at 1x3x64x64, no avgpool, small "
            "classifier 2048->512->512->10 (Dropout omitted); untrained, seeded He init",
        ),
    ]  # fmt: skip
    return {s.name: s for s in specs}


def layer_shapes(input_shape: tuple[int, ...], layers: tuple[Layer, ...]) -> list[tuple[int, ...]]:
    """Output shape of every layer; raises ValueError on a channel/feature mismatch."""
    shape, shapes = tuple(input_shape), []
    for layer in layers:
        if layer.op in ("conv", "maxpool"):
            n, c, h, w = shape
            if layer.op == "conv" and c != layer.cin:
                raise ValueError(f"{layer.name}: expects {layer.cin} channels, gets {c}")
            k, s, p = layer.kernel, layer.stride, layer.pad
            h, w = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
            shape = (n, layer.cout if layer.op == "conv" else c, h, w)
        elif layer.op == "flatten":
            shape = (shape[0], int(np.prod(shape[1:])))
        elif layer.op == "linear":
            if shape[1] != layer.cin:
                raise ValueError(f"{layer.name}: expects {layer.cin} features, gets {shape[1]}")
            shape = (shape[0], layer.cout)
        elif layer.op != "relu":
            raise ValueError(f"{layer.name}: unknown op {layer.op!r}")
        shapes.append(shape)
    return shapes


def large_params(spec: LargeSpec) -> dict[str, np.ndarray]:
    """Seeded float32 weights: kaiming normal (fan_in, gain sqrt 2), biases N(0, 0.01^2)."""
    rng = np.random.default_rng(spec.seed)
    p: dict[str, np.ndarray] = {}
    for layer in spec.layers:
        if layer.op == "conv":
            shape: tuple[int, ...] = (layer.cout, layer.cin, layer.kernel, layer.kernel)
        elif layer.op == "linear":
            shape = (layer.cout, layer.cin)
        else:
            continue
        fan_in = int(np.prod(shape[1:]))
        w = rng.standard_normal(shape, dtype=np.float32)
        w *= np.float32(np.sqrt(2.0 / fan_in))
        b = rng.standard_normal(layer.cout, dtype=np.float32)
        b *= np.float32(LARGE_BIAS_STD)
        p[f"{layer.name}.weight"], p[f"{layer.name}.bias"] = w, b
    return p


def large_x0(spec: LargeSpec) -> np.ndarray:
    """Seeded standard-normal float32 nominal input of the model's input shape."""
    return np.random.default_rng(spec.seed + 1).standard_normal(spec.input_shape, dtype=np.float32)


def build_large(spec: LargeSpec, params: dict[str, np.ndarray]) -> onnx.ModelProto:
    """Conv/Relu/MaxPool/Flatten/Gemm chain x -> logits with ``params`` as initializers."""
    shapes = layer_shapes(spec.input_shape, spec.layers)
    mk = helper.make_node
    nodes: list[onnx.NodeProto] = []
    current = "x"
    for i, layer in enumerate(spec.layers):
        out = "logits" if i == len(spec.layers) - 1 else layer.name
        wb = [current, f"{layer.name}.weight", f"{layer.name}.bias"]
        if layer.op == "conv":
            k, s, p = layer.kernel, layer.stride, layer.pad
            node = mk("Conv", wb, [out], name=layer.name,
                      kernel_shape=[k, k], strides=[s, s], pads=[p, p, p, p])  # fmt: skip
        elif layer.op == "relu":
            node = mk("Relu", [current], [out], name=layer.name)
        elif layer.op == "maxpool":
            k, s = layer.kernel, layer.stride
            node = mk("MaxPool", [current], [out], name=layer.name, kernel_shape=[k, k], strides=[s, s])
        elif layer.op == "flatten":
            node = mk("Flatten", [current], [out], name=layer.name, axis=1)
        else:
            node = mk("Gemm", wb, [out], name=layer.name, transB=1)
        nodes.append(node)
        current = out
    graph = helper.make_graph(
        nodes,
        spec.name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(spec.input_shape))],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, list(shapes[-1]))],
        [numpy_helper.from_array(v, k) for k, v in params.items()],
    )
    model = make_model(graph, spec.doc)
    add_metadata(
        model,
        trained="no",
        seed=spec.seed,
        x0_seed=spec.seed + 1,
        init=f"kaiming normal (fan_in, gain sqrt(2)); bias normal std {LARGE_BIAS_STD}",
        omitted="Dropout (identity at inference); AdaptiveAvgPool2d (identity at this input size)",
    )
    return model


def large_torch_reference(spec: LargeSpec, params: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray | None:
    """Evaluate the chain with torch.nn.functional (None if torch is missing)."""
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return None
    h = torch.from_numpy(x)
    with torch.no_grad():
        for layer in spec.layers:
            if layer.op in ("conv", "linear"):
                w = torch.from_numpy(params[f"{layer.name}.weight"])
                b = torch.from_numpy(params[f"{layer.name}.bias"])
                if layer.op == "conv":
                    h = F.conv2d(h, w, b, stride=layer.stride, padding=layer.pad)
                else:
                    h = F.linear(h, w, b)
            elif layer.op == "relu":
                h = F.relu(h)
            elif layer.op == "maxpool":
                h = F.max_pool2d(h, layer.kernel, layer.stride)
            else:
                h = h.flatten(1)
    return h.numpy()


def build_large_model(spec: LargeSpec, cache: Path) -> dict[str, Any]:
    """Build, save, check and time one large model; return a summary row."""
    t0 = time.perf_counter()
    params = large_params(spec)
    model = build_large(spec, params)
    bad = sorted({n.op_type for n in model.graph.node} - ALLOWED_OPS)
    if bad:
        raise ValueError(f"{spec.name}: ops outside the allowed set: {bad}")
    chain = main_chain(model)
    n_params = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    t_build = time.perf_counter() - t0

    t0 = time.perf_counter()
    path, x0_path = cache / f"{spec.name}.onnx", cache / f"{spec.name}_x0.npy"
    tmp = path.with_name(path.name + ".tmp")
    onnx.save(model, str(tmp))
    os.replace(tmp, path)
    del model
    x0 = large_x0(spec)
    np.save(x0_path, x0)
    t_save = time.perf_counter() - t0

    t0 = time.perf_counter()
    onnx.checker.check_model(str(path), full_check=True)  # path form: safe beyond 2 GB
    t_check = time.perf_counter() - t0

    y, fwd = ort_forward(path, x0)
    ref = large_torch_reference(spec, params, x0)
    del params
    size = path.stat().st_size
    print(f"== {path}  ({size / 1e6:.1f} MB, {n_params} parameters)")
    print(f"   input  {list(spec.input_shape)}  x0 -> {x0_path.name} ({x0_path.stat().st_size} bytes)")
    print(f"   chain  {len(chain)} nodes: {dict(sorted(Counter(chain).items()))}")
    print(f"   built {t_build:.1f}s, saved {t_save:.1f}s, check_model(path, full_check) {t_check:.1f}s")
    extra = "" if ref is None else f"; torch.nn.functional max|diff| {np.abs(y - ref).max():.2e}"
    print(
        f"   output {list(y.shape)}, forward {fwd * 1e3:.1f} ms (median of {TIMING_RUNS}), "
        f"|y|max {np.abs(y).max():.3g}{extra}"
    )
    return {"name": spec.name, "bytes": size, "params": n_params, "output": list(y.shape), "forward_s": fwd}


def build_large_models(names: list[str], cache: Path) -> None:
    """Build the named large models (all if ``names`` is empty) into ``cache``."""
    specs = large_specs()
    cache.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rows = [build_large_model(specs[n], cache) for n in (names or LARGE_NAMES)]
    print(f"\n{len(rows)} models in {cache}/, {time.perf_counter() - t0:.1f}s")
    for r in rows:
        print(
            f"  {r['name'] + '.onnx':14s} {r['bytes']:11d} bytes  {r['params']:10d} params  "
            f"out {r['output']}  forward {r['forward_s'] * 1e3:8.1f} ms"
        )
