"""The original small models committed in ``models/``.

* ``tiny_dense``  - hand-written Gemm/Relu/Gemm net (onnx.helper, no torch).
* ``cifar_bn``    - CIFAR-shaped CNN with BatchNormalization, random seeded
  weights, never trained (onnx.helper with numpy weights, no torch).
* ``digits_mlp``, ``digits_cnn`` - trained on sklearn digits (TorchScript exporter),
  plus ``digits_test.npz`` (100 held-out images ``x`` [100,1,8,8] and labels ``y``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .common import SEED, add_metadata, check_and_run, make_model, report
from .digits import DIGITS_N_SAVED, load_digits_split, normalization
from .torchutil import export_torch, predict, torch_setup, train

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


def build_digits(out: Path) -> None:
    """Train both digits models, export them, write x0 files and digits_test.npz."""
    torch = torch_setup()

    x_tr, y_tr, x_te, y_te = load_digits_split()
    mean, std = normalization(x_tr)
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
