"""Lower bounds of the truth: the matrix-free Jacobian against dense float64
computations, and lower <= upper on random networks; the sweep command."""

from __future__ import annotations

import json
from pathlib import Path

import netgen
import numpy as np
import pytest

import onnxlip
from onnxlip.cli import main

MODELS = Path(__file__).resolve().parents[1] / "models"


def _case(tmp_path, family: str, seed: int):
    net = {"dense": netgen.dense_net, "conv": netgen.conv_net}[family](seed)
    engine = onnxlip.load(net.save(tmp_path / f"{net.name}.onnx"))
    x0 = np.random.default_rng(seed).standard_normal(net.input_size)
    return net, engine, x0.astype(np.float32).astype(np.float64)


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("family", ["dense", "conv"])
def test_jacobian_matches_dense_float64(tmp_path, family, seed):
    """J v, Jᵀ u and ||J|| of the engine equal the float64 twin's exact Jacobian."""
    net, engine, x0 = _case(tmp_path, family, seed)
    exact = net.jacobian(x0)
    jac = engine.jacobian(x0)
    dense = jac.dense()
    scale = np.abs(exact).max()
    assert np.abs(dense - exact).max() <= 1e-5 * scale
    v = np.random.default_rng(1).standard_normal(exact.shape[1])
    assert np.allclose(jac.matvec(v), exact @ v, atol=1e-5 * scale * np.abs(v).sum())
    norm = jac.norm()
    direction = norm.direction
    assert isinstance(norm.value, float) and norm.value == norm.solve.value
    assert norm.value == pytest.approx(np.linalg.norm(exact, 2), rel=1e-5)
    assert norm.value <= np.linalg.norm(exact, 2) * (1 + 1e-5)  # a Ritz value: from below
    assert np.linalg.norm(exact @ direction) == pytest.approx(norm.value, rel=1e-4)


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("family", ["dense", "conv"])
def test_lower_bounds_below_local_bound(tmp_path, family, seed):
    """Every lower bound <= the local bound, and each is a real ratio of the float64 twin."""
    net, engine, x0 = _case(tmp_path, family, seed)
    scale = np.linalg.norm(x0)
    radii = [0.01 * scale, 0.3 * scale]
    lows = engine.lower_bounds(x0, radii, samples=24, ascent_steps=8)
    for low, up in zip(lows, engine.local_bounds(x0, radii, method="paper")):
        assert 0 < low.best <= up.bound
        assert max(low.sampled, low.ascent) <= up.bound
        if low.jacobian_exact:
            assert low.jacobian_norm <= up.bound
    assert lows[0].jacobian_norm == pytest.approx(np.linalg.norm(net.jacobian(x0), 2), rel=1e-5)


def test_lower_bound_noise_floor_keeps_small_radii_honest():
    """At a tiny radius the sampled ratio never exceeds ||J(x0)|| by float32 noise."""
    net = onnxlip.load(MODELS / "cifar_bn.onnx")
    x0 = np.load(MODELS / "cifar_bn_x0.npy")
    low = net.lower_bounds(x0, [1e-5], samples=16, ascent_steps=0)[0]
    assert low.jacobian_exact
    assert low.sampled <= low.jacobian_norm * (1 + 1e-3)


def test_sweep_shares_solves_only_where_slopes_and_masks_coincide():
    """Radii with identical (R, D) in a block reuse one eigensolve; every value
    equals the one computed around a fresh forward pass."""
    net = onnxlip.load(MODELS / "digits_cnn.onnx")
    x0 = np.load(MODELS / "digits_cnn_x0.npy")
    eps = np.geomspace(1e-7, 1.0, 12).tolist()
    nominal = net.trace(x0)
    shared = [net.local_bound_from(nominal, e, method="paper") for e in eps]
    for e, result in zip(eps, shared):
        fresh = net.local_bound(x0, e, method="paper")
        assert result.bound == fresh.bound
        assert [r.bound for r in result.layers] == [r.bound for r in fresh.layers]
    affine = sum(r.kind.startswith("affine") for r in shared[0].layers)
    assert affine <= len(nominal.norms) < affine * len(eps)
    assert shared[0].bound == shared[1].bound < shared[-1].bound


def test_sweep_command_outputs(tmp_path, capsys):
    csv_path, png, svg = tmp_path / "s.csv", tmp_path / "s.png", tmp_path / "s.svg"
    code = main(["sweep", str(MODELS / "digits_mlp.onnx"), "-x", str(MODELS / "digits_mlp_x0.npy"),
                 "--eps-min", "0.01", "--eps-max", "1", "-n", "4", "--csv", str(csv_path),
                 "--plot", str(png), "--json"])
    data = json.loads(capsys.readouterr().out)
    assert code == 0 and len(data["points"]) == 4
    points = data["points"]
    assert [p["eps"] for p in points] == pytest.approx(np.geomspace(0.01, 1, 4).tolist())
    for p in points:
        assert p["lower_best"] <= p["local_bound"] <= p["global_bound"] * (1 + 1e-4)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(csv_path.read_text().splitlines()) == 5
    code = main(["sweep", str(MODELS / "tiny_dense.onnx"), "-x", str(MODELS / "tiny_dense_x0.npy"),
                 "-n", "3", "--spacing", "linear", "--no-lower", "--plot", str(svg)])
    assert code == 0 and "<svg" in svg.read_text()


def test_sweep_rejects_bad_grid(capsys):
    code = main(["sweep", str(MODELS / "tiny_dense.onnx"), "-x", str(MODELS / "tiny_dense_x0.npy"),
                 "--eps-min", "1", "--eps-max", "0.1"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("onnxlip: error:") and err.count("\n") == 1
