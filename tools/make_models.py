#!/usr/bin/env python3
"""Create the small ONNX example models used by onnxlip.

Usage: ``python tools/make_models.py [--out models]``

Writes, into the output directory:

* ``tiny_dense.onnx``  - hand-written Gemm/Relu/Gemm net (onnx.helper, no torch).
* ``digits_mlp.onnx``  - MLP trained on sklearn digits (torch legacy exporter).
* ``digits_cnn.onnx``  - LeNet-style CNN trained on sklearn digits (torch exporter).
* ``cifar_bn.onnx``    - CIFAR-shaped CNN with BatchNormalization, random seeded
  weights, never trained (onnx.helper with numpy weights, no torch).
* ``<name>_x0.npy``    - nominal input for each model (float32, batch 1).
* ``digits_test.npz``  - 100 held-out digits images ``x`` [100,1,8,8] and labels ``y``.

Everything is seeded and deterministic. Each model is checked with
``onnx.checker.check_model(full_check=True)``, restricted to a simple chain of
allowed ops, and run in onnxruntime on its nominal input.

Large benchmark models: ``python tools/make_models.py --large [NAME ...] [--cache DIR]``

Writes ``alexnet.onnx`` (244 MB), ``vgg16.onnx`` (553 MB) and ``vgg11.onnx``
(42 MB, 64x64 input, 10 classes) plus ``<name>_x0.npy`` into a cache folder
outside the repository (default ``$ONNXLIP_CACHE``, else ``~/.cache/onnxlip``),
never into ``models/``. They mirror torchvision's architectures (node and
initializer names as in its ``state_dict``, Dropout omitted) with seeded,
untrained He-initialised weights, built with onnx.helper from numpy (no torch).
Each is checked by path (``check_model(path, full_check=True)``) and timed in
onnxruntime (median of 10 forward passes after one warm-up).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SEED = 0
OPSET = 17
IR_VERSION = 8  # what the torch exporter writes; readable by old and new runtimes

ALLOWED_OPS = frozenset(
    {
        "Conv", "Gemm", "MatMul", "Add", "Sub", "Mul", "Div", "BatchNormalization",
        "Flatten", "Reshape", "Relu", "MaxPool", "AveragePool", "Constant", "Shape",
        "Gather", "Unsqueeze", "Concat", "Identity",
    }
)  # fmt: skip

# sklearn digits split shared by both digits models
DIGITS_TEST_FRACTION = 0.25
DIGITS_N_SAVED = 100


# --------------------------------------------------------------------------- checks


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


def check_and_run(model: onnx.ModelProto, path: Path, x0: np.ndarray) -> np.ndarray:
    """Validate ``model``, save it to ``path`` and return its onnxruntime output on ``x0``."""
    import onnxruntime as ort

    onnx.checker.check_model(model, full_check=True)
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
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {sess.get_inputs()[0].name: x0})
    return np.asarray(y)


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
    print(f"   chain  {' -> '.join(main_chain(model))}")
    print(f"   nodes  {dict(sorted(counts.items()))}")
    if extra:
        print(f"   {extra}")
    print(f"   ort(x0) = {np.array2string(y.ravel(), precision=4, max_line_width=200)}")


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


# --------------------------------------------------------------------------- tiny_dense


def build_tiny_dense() -> tuple[onnx.ModelProto, np.ndarray]:
    """Hand-checkable 3 -> 4 -> 2 Gemm/Relu/Gemm net built with onnx.helper.

    At x0 = [0.5, -0.25, 1.0] the hidden pre-activations are
    W1 x0 + b1 = [0.75, 1.0, -0.75, -0.5] (two active, two inactive units).
    """
    w1 = np.array([[1, -1, 0], [2, 0, 1], [0, 1, -1], [-1, 2, 1]], dtype=np.float32)
    b1 = np.array([0.0, -1.0, 0.5, -0.5], dtype=np.float32)
    w2 = np.array([[1, 2, -1, 0], [0, -1, 1, 3]], dtype=np.float32)
    b2 = np.array([0.5, -1.0], dtype=np.float32)
    x0 = np.array([[0.5, -0.25, 1.0]], dtype=np.float32)

    nodes = [
        helper.make_node("Gemm", ["x", "W1", "b1"], ["h"], name="fc1", transB=1),
        helper.make_node("Relu", ["h"], ["a"], name="relu1"),
        helper.make_node("Gemm", ["a", "W2", "b2"], ["y"], name="fc2", transB=1),
    ]
    inits = [
        numpy_helper.from_array(v, n)
        for n, v in [("W1", w1), ("b1", b1), ("W2", w2), ("b2", b2)]
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_dense",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
        inits,
    )
    model = make_model(
        graph,
        "y = W2 relu(W1 x + b1) + b2; Gemm weights stored [out, in] with transB=1",
    )

    pre = w1 @ x0[0] + b1
    assert np.all(pre != 0) and np.any(pre > 0) and np.any(pre < 0)
    return model, x0


def tiny_dense_reference(x: np.ndarray) -> np.ndarray:
    """NumPy evaluation of tiny_dense for cross-checking onnxruntime."""
    model, _ = build_tiny_dense()
    p = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return np.maximum(x @ p["W1"].T + p["b1"], 0) @ p["W2"].T + p["b2"]


# --------------------------------------------------------------------------- cifar_bn


def cifar_bn_params(seed: int = SEED) -> dict[str, np.ndarray]:
    """Seeded He-initialised weights and non-trivial BatchNorm statistics."""
    rng = np.random.default_rng(seed)

    def he(shape: tuple[int, ...], fan_in: int) -> np.ndarray:
        return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)

    def bn(c: int, prefix: str) -> dict[str, np.ndarray]:
        return {
            f"{prefix}.scale": rng.uniform(0.5, 1.5, c).astype(np.float32),
            f"{prefix}.bias": (0.1 * rng.standard_normal(c)).astype(np.float32),
            f"{prefix}.mean": (0.2 * rng.standard_normal(c)).astype(np.float32),
            f"{prefix}.var": rng.uniform(0.5, 2.0, c).astype(np.float32),
        }

    p: dict[str, np.ndarray] = {}
    p["conv1.weight"] = he((16, 3, 3, 3), 3 * 9)
    p["conv1.bias"] = (0.05 * rng.standard_normal(16)).astype(np.float32)
    p.update(bn(16, "bn1"))
    p["conv2.weight"] = he((32, 16, 3, 3), 16 * 9)
    p["conv2.bias"] = (0.05 * rng.standard_normal(32)).astype(np.float32)
    p.update(bn(32, "bn2"))
    p["fc1.weight"] = he((64, 512), 512)
    p["fc1.bias"] = (0.05 * rng.standard_normal(64)).astype(np.float32)
    p["fc2.weight"] = he((10, 64), 64)
    p["fc2.bias"] = (0.05 * rng.standard_normal(10)).astype(np.float32)
    return p


def build_cifar_bn() -> tuple[onnx.ModelProto, np.ndarray]:
    """CIFAR-shaped CNN with separate BatchNormalization nodes, untrained.

    [1,3,32,32] Conv(16,3,p1) BN Relu MaxPool(2) -> [1,16,16,16]
    Conv(32,3,s2,p1) BN Relu AveragePool(2) -> [1,32,4,4] Flatten -> 512
    Gemm(512->64) Relu Gemm(64->10).
    """
    p = cifar_bn_params()
    eps = 1e-5
    mk = helper.make_node
    nodes = [
        mk("Conv", ["x", "conv1.weight", "conv1.bias"], ["c1"], name="conv1",
           kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1]),
        mk("BatchNormalization", ["c1", "bn1.scale", "bn1.bias", "bn1.mean", "bn1.var"], ["n1"],
           name="bn1", epsilon=eps),
        mk("Relu", ["n1"], ["r1"], name="relu1"),
        mk("MaxPool", ["r1"], ["p1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
        mk("Conv", ["p1", "conv2.weight", "conv2.bias"], ["c2"], name="conv2",
           kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2]),
        mk("BatchNormalization", ["c2", "bn2.scale", "bn2.bias", "bn2.mean", "bn2.var"], ["n2"],
           name="bn2", epsilon=eps),
        mk("Relu", ["n2"], ["r2"], name="relu2"),
        mk("AveragePool", ["r2"], ["p2"], name="pool2", kernel_shape=[2, 2], strides=[2, 2]),
        mk("Flatten", ["p2"], ["f"], name="flatten", axis=1),
        mk("Gemm", ["f", "fc1.weight", "fc1.bias"], ["g1"], name="fc1", transB=1),
        mk("Relu", ["g1"], ["r3"], name="relu3"),
        mk("Gemm", ["r3", "fc2.weight", "fc2.bias"], ["logits"], name="fc2", transB=1),
    ]  # fmt: skip
    graph = helper.make_graph(
        nodes,
        "cifar_bn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])],
        [numpy_helper.from_array(v, k) for k, v in p.items()],
    )
    model = make_model(
        graph,
        "CIFAR-shaped CNN with BatchNormalization; seeded random weights, untrained",
    )
    add_metadata(model, trained="no", seed=SEED, bn_epsilon=eps)
    x0 = (
        np.random.default_rng(SEED + 1)
        .uniform(0.0, 1.0, (1, 3, 32, 32))
        .astype(np.float32)
    )
    return model, x0


def cifar_bn_torch_reference(x: np.ndarray) -> np.ndarray | None:
    """Evaluate cifar_bn with torch.nn.functional (None if torch is missing)."""
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return None
    p = {k: torch.from_numpy(v) for k, v in cifar_bn_params().items()}
    with torch.no_grad():
        h = F.conv2d(torch.from_numpy(x), p["conv1.weight"], p["conv1.bias"], padding=1)
        h = F.batch_norm(
            h, p["bn1.mean"], p["bn1.var"], p["bn1.scale"], p["bn1.bias"], eps=1e-5
        )
        h = F.max_pool2d(F.relu(h), 2)
        h = F.conv2d(h, p["conv2.weight"], p["conv2.bias"], stride=2, padding=1)
        h = F.batch_norm(
            h, p["bn2.mean"], p["bn2.var"], p["bn2.scale"], p["bn2.bias"], eps=1e-5
        )
        h = F.avg_pool2d(F.relu(h), 2).flatten(1)
        h = F.relu(F.linear(h, p["fc1.weight"], p["fc1.bias"]))
        return F.linear(h, p["fc2.weight"], p["fc2.bias"]).numpy()


# --------------------------------------------------------------------------- digits


def load_digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """sklearn digits scaled to [0,1], shape [N,1,8,8], stratified seeded split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None, :, :]
    y = d.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=DIGITS_TEST_FRACTION, random_state=SEED, stratify=y
    )
    return x_tr, y_tr, x_te, y_te


def make_digits_mlp(mean: float, std: float) -> Any:
    """Normalize -> Flatten -> Linear(64,32) ReLU Linear(32,16) ReLU Linear(16,10)."""
    import torch
    from torch import nn

    class DigitsMLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mean, self.std = mean, std  # python floats -> scalar Constant nodes
            self.flatten = nn.Flatten()
            self.fc1 = nn.Linear(64, 32)
            self.fc2 = nn.Linear(32, 16)
            self.fc3 = nn.Linear(16, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = (x - self.mean) / self.std
            x = self.flatten(x)
            x = torch.relu(self.fc1(x))
            x = torch.relu(self.fc2(x))
            return self.fc3(x)

    return DigitsMLP()


def make_digits_cnn(mean: float, std: float) -> Any:
    """Normalize, Conv(1,8) ReLU MaxPool Conv(8,16) ReLU MaxPool reshape Linear(64,32) ReLU Linear(32,10)."""
    import torch
    from torch import nn

    class DigitsCNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mean, self.std = mean, std
            self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
            self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
            self.pool = nn.MaxPool2d(2)
            self.fc1 = nn.Linear(16 * 2 * 2, 32)
            self.fc2 = nn.Linear(32, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = (x - self.mean) / self.std
            x = self.pool(torch.relu(self.conv1(x)))
            x = self.pool(torch.relu(self.conv2(x)))
            x = x.reshape(
                x.size(0), -1
            )  # view() fails: maxpool output may be non-contiguous
            x = torch.relu(self.fc1(x))
            return self.fc2(x)

    return DigitsCNN()


def train(
    net: Any, x: np.ndarray, y: np.ndarray, epochs: int, lr: float, seed: int
) -> None:
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


def export_torch(net: Any, path: Path) -> onnx.ModelProto:
    """Export with the legacy TorchScript exporter (dynamo=False, opset 17, static batch 1)."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            net,
            (torch.zeros(1, 1, 8, 8),),
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=["x"],
            output_names=["logits"],
        )
    return onnx.load(str(path))


def build_digits(out: Path) -> None:
    """Train both digits models, export them, write x0 files and digits_test.npz."""
    import torch

    torch.manual_seed(SEED)
    torch.set_num_threads(1)  # bitwise-reproducible and fast enough for these sizes
    torch.use_deterministic_algorithms(True)

    x_tr, y_tr, x_te, y_te = load_digits_split()
    mean, std = float(x_tr.mean()), float(x_tr.std())
    print(
        f"digits: {len(x_tr)} train / {len(x_te)} test images, normalization mean={mean:.6f} std={std:.6f}"
    )

    nets: dict[str, Any] = {}
    accs: dict[str, float] = {}
    for name, factory, epochs, lr in [
        ("digits_mlp", make_digits_mlp, 100, 1e-2),
        ("digits_cnn", make_digits_cnn, 60, 1e-2),
    ]:
        torch.manual_seed(SEED)
        net = factory(mean, std)
        t0 = time.perf_counter()
        train(net, x_tr, y_tr, epochs=epochs, lr=lr, seed=SEED)
        accs[name] = float((predict(net, x_te) == y_te).mean())
        nets[name] = net
        print(
            f"{name}: trained {epochs} epochs in {time.perf_counter() - t0:.1f}s, "
            f"test accuracy {accs[name]:.4f} ({len(y_te)} images)"
        )

    # one shared nominal input: first held-out image that both nets classify correctly
    ok = np.ones(len(y_te), dtype=bool)
    for net in nets.values():
        ok &= predict(net, x_te) == y_te
    i0 = int(np.flatnonzero(ok)[0])
    x0 = x_te[i0 : i0 + 1].copy()

    np.savez(
        out / "digits_test.npz",
        x=x_te[:DIGITS_N_SAVED].copy(),
        y=y_te[:DIGITS_N_SAVED].copy(),
    )
    print(
        f"== digits_test.npz  ({(out / 'digits_test.npz').stat().st_size} bytes): "
        f"x {x_te[:DIGITS_N_SAVED].shape} float32, y {y_te[:DIGITS_N_SAVED].shape} int64; "
        f"x0 = test image #{i0}, label {int(y_te[i0])}"
    )

    for name, net in nets.items():
        path = out / f"{name}.onnx"
        model = export_torch(net, path)
        add_metadata(
            model,
            trained="sklearn digits",
            test_accuracy=f"{accs[name]:.4f}",
            input_scale="pixels/16 in [0,1]",
            norm_mean=mean,
            norm_std=std,
            x0_test_index=i0,
            x0_label=int(y_te[i0]),
        )
        x0_path = out / f"{name}_x0.npy"
        np.save(x0_path, x0)
        y = check_and_run(model, path, x0)
        with torch.no_grad():
            y_torch = net(torch.from_numpy(x0)).numpy()
        report(
            path,
            x0_path,
            model,
            y,
            f"test acc {accs[name]:.4f}; ort vs torch max|diff| {np.abs(y - y_torch).max():.2e}; "
            f"argmax {int(y.argmax())} (label {int(y_te[i0])})",
        )


# --------------------------------------------------------------------------- large (cache)

REPO_ROOT = Path(__file__).resolve().parents[1]
LARGE_NAMES = ("alexnet", "vgg16", "vgg11")
LARGE_BIAS_STD = 0.01
LARGE_TIMING_RUNS = 10
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


def ort_forward(path: Path, x0: np.ndarray, runs: int = LARGE_TIMING_RUNS) -> tuple[np.ndarray, float]:
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
        f"   output {list(y.shape)}, forward {fwd * 1e3:.1f} ms (median of {LARGE_TIMING_RUNS}), "
        f"|y|max {np.abs(y).max():.3g}{extra}"
    )
    return {"name": spec.name, "bytes": size, "params": n_params, "output": list(y.shape), "forward_s": fwd}


def default_cache() -> Path:
    """``$ONNXLIP_CACHE`` if set and non-empty, else ``~/.cache/onnxlip``."""
    env = os.environ.get("ONNXLIP_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "onnxlip"


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


# --------------------------------------------------------------------------- main


def build_helper_models(out: Path) -> None:
    """Write the two onnx.helper models (no torch needed) and their x0 files."""
    model, x0 = build_tiny_dense()
    path, x0_path = out / "tiny_dense.onnx", out / "tiny_dense_x0.npy"
    np.save(x0_path, x0)
    y = check_and_run(model, path, x0)
    report(
        path,
        x0_path,
        model,
        y,
        f"numpy reference max|diff| {np.abs(y - tiny_dense_reference(x0)).max():.2e}",
    )

    model, x0 = build_cifar_bn()
    path, x0_path = out / "cifar_bn.onnx", out / "cifar_bn_x0.npy"
    np.save(x0_path, x0)
    y = check_and_run(model, path, x0)
    ref = cifar_bn_torch_reference(x0)
    extra = "untrained (seeded random He init, random BN statistics)"
    if ref is not None:
        extra += (
            f"; torch.nn.functional reference max|diff| {np.abs(y - ref).max():.2e}"
        )
    report(path, x0_path, model, y, extra)


def main(argv: list[str] | None = None) -> None:
    """Parse arguments; build the small models, or with ``--large`` the cached ones."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output directory (default: models)",
    )
    parser.add_argument(
        "--skip-torch",
        action="store_true",
        help="only build the models that need no torch",
    )
    parser.add_argument(
        "--large",
        nargs="*",
        choices=LARGE_NAMES,
        metavar="NAME",
        help=f"instead build large benchmark models into the cache: {', '.join(LARGE_NAMES)} "
        "(default: all)",
    )
    parser.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="cache directory for --large (default: $ONNXLIP_CACHE or ~/.cache/onnxlip)",
    )
    args = parser.parse_args(argv)

    if args.large is not None:
        if args.out is not None or args.skip_torch:
            parser.error("--out and --skip-torch apply to the small models, not --large")
        cache = (args.cache or default_cache()).expanduser().resolve()
        if cache.is_relative_to(REPO_ROOT):
            parser.error(f"cache {cache} is inside the repository {REPO_ROOT}; use a folder outside it")
        build_large_models(args.large, cache)
        return
    if args.cache is not None:
        parser.error("--cache only applies with --large")

    out: Path = args.out if args.out is not None else Path("models")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    build_helper_models(out)
    if not args.skip_torch:
        try:
            import sklearn  # noqa: F401
            import torch  # noqa: F401
        except ImportError as exc:
            parser.exit(
                1,
                f"error: {exc}; install torch (CPU) and scikit-learn, or pass --skip-torch\n",
            )
        build_digits(out)
    files = sorted(p for p in out.iterdir() if p.suffix in {".onnx", ".npy", ".npz"})
    total = sum(p.stat().st_size for p in files)
    print(
        f"\n{len(files)} files in {out}/, {total} bytes total, {time.perf_counter() - t0:.1f}s"
    )
    for p in files:
        print(f"  {p.name:24s} {p.stat().st_size:8d}")


if __name__ == "__main__":
    main()
