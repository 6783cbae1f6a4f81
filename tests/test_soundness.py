"""Soundness on random networks: no sampled difference quotient exceeds the local bound.

Each case draws a network (dense, convolutional with batch-norm and pooling, or
a single affine layer where the bound is nearly tight), writes it as ONNX in
tmp_path, loads it with onnxlip, and compares the bounds at three radii with
ratios ||f(x) - f(x0)|| / ||x - x0|| of the float64 numpy twin of the network
at thousands of points of each ball, and with ||J(x0)||.
"""

from __future__ import annotations

import netgen
import numpy as np
import pytest

import onnxlip

EPS_LEVELS = (0.01, 0.1, 1.0)  # radii relative to ||x0||
SLACK = 1 + 1e-6
# Between two upper bounds (not against the truth): each carries its own
# eigensolver residual correction, of relative size up to about 1e-4.
SOLVER = 1 + 1e-4
N_SPHERE, N_INSIDE = 600, 600

CASES = (
    [("dense", s) for s in range(80)]
    + [("conv", s) for s in range(100)]
    + [("shallow", s) for s in range(30)]
)


def _network(family: str, seed: int) -> netgen.RefNet:
    return {"dense": netgen.dense_net, "conv": netgen.conv_net, "shallow": netgen.shallow_net}[family](seed)


@pytest.mark.parametrize(("family", "seed"), CASES, ids=[f"{f}{s}" for f, s in CASES])
def test_local_bound_is_sound(tmp_path, family, seed):
    """Engine forward == onnxruntime; ||J(x0)|| <= sampled ratios <= local <= global."""
    net = _network(family, seed)
    path = net.save(tmp_path / f"{net.name}.onnx")
    rng = np.random.default_rng(seed)
    x0 = rng.standard_normal(net.input_shape)
    engine = onnxlip.load(path)

    y_ort = netgen.ort_run(netgen.ort_session(path), x0)
    assert netgen.rel_err(net(x0)[0], y_ort) <= 1e-4, "the numpy twin disagrees with onnxruntime"
    assert netgen.rel_err(engine.forward(x0), y_ort) <= 1e-4
    assert engine.forward(x0).size == y_ort.size

    assert net.kink_margin(x0) > 1e-9, "x0 on a kink: the Jacobian is not defined"
    jac = net.jacobian(x0)
    _, sv, vt = np.linalg.svd(jac)
    jac_norm = float(sv[0])
    directions = list(vt[: min(3, len(vt))])

    radii = [level * float(np.linalg.norm(x0)) for level in EPS_LEVELS]
    results = engine.local_bounds(x0, radii, method="paper")
    autos = engine.local_bounds(x0, radii)  # the default, never above the paper's
    glob = engine.global_bound().bound
    assert np.isfinite(glob) and glob >= 0

    previous = 0.0
    for eps, result in zip(radii, results):
        bound = result.bound
        assert np.isfinite(bound)
        assert result.layers[0].eps_in == pytest.approx(eps)
        assert jac_norm <= bound * SLACK, f"||J(x0)|| = {jac_norm} above the local bound {bound}"
        assert bound <= glob * SOLVER, f"local bound {bound} above the global bound {glob}"
        assert bound >= previous / SOLVER, "the local bound decreased as eps grew"
        previous = bound

        points = netgen.ball_points(rng, x0, eps, N_SPHERE, N_INSIDE, directions)
        ratio = netgen.max_ratio(net, x0, points)
        assert ratio <= bound * SLACK, (
            f"eps={eps:.4g}: sampled ratio {ratio!r} above the local bound {bound!r}"
        )
    for eps, auto, paper in zip(radii, autos, results):
        assert jac_norm <= auto.bound * SLACK
        assert auto.bound <= paper.bound * (1 + 2 * engine.tol)
        points = netgen.ball_points(rng, x0, eps, N_SPHERE // 2, N_INSIDE // 2, directions)
        assert netgen.max_ratio(net, x0, points) <= auto.bound * SLACK, (eps, auto.source)


# ---------------------------------------------------------------------- tight cases
#
# Networks where METHOD.md's bound equals the true local Lipschitz constant, so
# the bound must match the sampled supremum both ways: any loss of soundness
# (a smaller chord slope, a smaller eps_k, a smaller max-pool constant) shows.


def _neuron_chain(rng, n: int, eps: float, depth: int):
    """x -> ReLU(w.x + b) -> ReLU(c z + d) ... -> g z: a chain of scalar neurons.

    The first neuron is active over the whole ball; every later one is uncertain
    with its pre-activation at -0.4 of its reach, so its chord slope is 0.6 (the
    second neuron's weight has either sign, later ones are positive).
    Sup ratio = bound = ||w|| * prod(0.6 |c|) * |g|, reached at x0 +- eps w/||w||.
    """
    w = rng.standard_normal(n).astype(np.float32)
    x0 = rng.standard_normal(n)
    wn = float(np.linalg.norm(w.astype(np.float64)))
    z0 = 1.0 + 2.0 * eps * wn  # active on the whole ball
    b = np.float32(z0 - float(w.astype(np.float64) @ x0))
    z0 = float(w.astype(np.float64) @ x0 + np.float64(b))
    ops = [netgen.Op("gemm", {"B": w.reshape(1, n), "C": np.array([b]), "transB": 1}),
           netgen.Op("relu")]
    eps_k, expected, sign = eps * wn, wn, 1.0
    for k in range(depth - 1):
        # past the first uncertain neuron z only grows from 0: later weights must be positive
        c = np.float32((rng.choice([-1, 1]) if k == 0 else 1) * rng.uniform(0.5, 2.0))
        d = np.float32(-0.4 * abs(float(c)) * eps_k - float(c) * z0)
        ops += [netgen.Op("matmul", {"B": np.array([[c]], np.float32)}),
                netgen.Op("add", {"c": np.array([d], np.float32)}), netgen.Op("relu")]
        y0 = float(c) * z0 + float(d)
        reach = abs(float(c)) * eps_k
        slope = (y0 + reach) / reach
        expected *= slope * abs(float(c))
        sign *= np.sign(float(c))
        eps_k *= slope * abs(float(c))
        z0 = max(y0, 0.0)
    g = np.float32(rng.uniform(0.5, 2.0))
    ops.append(netgen.Op("gemm", {"B": np.array([[g]], np.float32), "C": np.array([0.3], np.float32)}))
    expected *= float(g)
    direction = w.astype(np.float64) * (sign if depth > 1 else 1.0)
    return netgen.RefNet((1, n), ops, f"chain{depth}"), x0, expected, direction


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
@pytest.mark.parametrize("seed", range(3))
def test_neuron_chain_bound_is_exact(tmp_path, seed, depth):
    """Chord slopes and eps_k = L_{k-1} eps_{k-1}: bound == sup ratio (1e-6)."""
    rng = np.random.default_rng(100 + seed)
    eps = float(rng.uniform(0.05, 2.0))
    net, x0, expected, direction = _neuron_chain(rng, int(rng.integers(2, 12)), eps, depth)
    result = onnxlip.load(net.save(tmp_path / "chain.onnx")).local_bound(x0, eps, method="paper")
    ratio = netgen.max_ratio(net, x0, netgen.ball_points(rng, x0, eps, 200, 200, [direction]))
    assert ratio <= result.bound * SLACK
    assert result.bound == pytest.approx(expected, rel=1e-6)
    assert ratio == pytest.approx(expected, rel=1e-6), "the chain was built to be tight"
    if depth > 1:
        assert [layer.uncertain for layer in result.layers[1:depth]] == [1] * (depth - 1)


@pytest.mark.parametrize(("in_shape", "kernel", "stride", "pads", "spike", "expected"), [
    ((1, 1, 9, 9), (3, 3), (2, 2), (0, 0, 0, 0), (2, 2), 2.0),
    ((1, 2, 9, 9), (3, 3), (2, 2), (1, 1, 1, 1), (3, 3), 2.0),
    ((1, 1, 9, 9), (3, 3), (1, 1), (0, 0, 0, 0), (4, 4), 3.0),
    ((1, 1, 8, 8), (2, 2), (2, 2), (0, 0, 0, 0), (3, 3), 1.0),
    ((1, 1, 11), (3,), (2,), (0, 0), (4,), np.sqrt(2.0)),
    ((1, 1, 10), (3,), (1,), (1, 1), (5,), np.sqrt(3.0)),
])
def test_maxpool_constant_is_reached(tmp_path, in_shape, kernel, stride, pads, spike, expected):
    """A spike shared by the most windows: ratio sqrt(count) == the max-pool constant."""
    rng = np.random.default_rng(7)
    pool = netgen.Op("maxpool", {"kernel": kernel, "strides": stride, "pads": pads})
    net = netgen.RefNet(in_shape, [netgen.Op("mul", {"c": np.float32(1.5)}), pool,
                                   netgen.Op("flatten")], "pool")
    x0 = rng.uniform(-1, 0, in_shape)
    x0[(0, 0, *spike)] = 5.0
    direction = np.zeros(in_shape)
    direction[(0, 0, *spike)] = 1.0
    eps = 0.5
    result = onnxlip.load(net.save(tmp_path / "pool.onnx")).local_bound(x0, eps, method="paper")
    ratio = netgen.max_ratio(net, x0, netgen.ball_points(rng, x0, eps, 300, 300, [direction]))
    assert result.bound == pytest.approx(1.5 * expected, rel=1e-6)
    assert ratio == pytest.approx(1.5 * expected, rel=1e-6)
    assert ratio <= result.bound * SLACK


def test_linear_layer_with_clustered_spectrum(tmp_path):
    """y = W x with the top singular values of W within 6e-4: bound >= ||W|| = sup ratio."""
    worst = np.inf
    for seed in range(20):
        rng = np.random.default_rng(seed)
        n = 40
        sv = np.linspace(1.0, 0.1, n)
        sv[:4] = [1.0, 1 - 2e-4, 1 - 4e-4, 1 - 6e-4]
        q1, _ = np.linalg.qr(rng.standard_normal((n, n)))
        q2, _ = np.linalg.qr(rng.standard_normal((n, n)))
        w = ((q1 * sv) @ q2).astype(np.float32)
        net = netgen.RefNet((1, n), [netgen.Op("matmul", {"B": w})], f"clustered{seed}")
        engine = onnxlip.load(net.save(tmp_path / f"{net.name}.onnx"))
        x0 = rng.standard_normal(n)
        top = np.linalg.svd(w.T.astype(np.float64))[2][0]  # input direction of largest gain
        ratio = netgen.max_ratio(net, x0, netgen.ball_points(rng, x0, 1.0, 10, 10, [top]))
        worst = min(worst, engine.global_bound().bound / ratio, engine.local_bound(x0, 1.0).bound / ratio)
    assert worst >= 1 - 1e-6, f"bound / sampled ratio = {worst}"


def test_two_tap_convolution_norm(tmp_path):
    """Conv1D with kernel [1, 1] on length 200: ||A|| = 2 cos(pi / 400), reached along the top
    right singular vector; the bound must not be below the sampled ratio."""
    n = 200
    conv = netgen.Op("conv", {"W": np.ones((1, 1, 2), np.float32), "strides": (1,), "pads": (0, 0),
                              "dilations": (1,), "group": 1})
    net = netgen.RefNet((1, 1, n), [conv], "two_tap")
    engine = onnxlip.load(net.save(tmp_path / "two_tap.onnx"))
    exact = 2 * np.cos(np.pi / (2 * n))
    top = np.linalg.svd(net.jacobian(np.zeros(n)))[2][0]
    x0 = np.random.default_rng(0).standard_normal(n)
    ratio = netgen.max_ratio(net, x0, netgen.ball_points(np.random.default_rng(1), x0, 1.0, 10, 10, [top]))
    assert ratio == pytest.approx(exact, rel=1e-9)
    assert engine.global_bound().bound >= ratio * (1 - 1e-6)
    assert engine.local_bound(x0, 1.0).bound >= ratio * (1 - 1e-6)


# ---------------------------------------------------------------------- method="tight"

TIGHT_CASES = [("dense", s) for s in range(40)] + [("conv", s) for s in range(40)]
TIGHT_LEVELS = (0.001, 0.01, 0.1)  # small radii, where the tight method differs


@pytest.mark.parametrize(("family", "seed"), TIGHT_CASES, ids=[f"{f}{s}" for f, s in TIGHT_CASES])
def test_tight_bound_is_sound(tmp_path, family, seed):
    """||J(x0)|| <= sampled ratios <= tight bound <= paper bound, at small radii."""
    net = _network(family, seed)
    engine = onnxlip.load(net.save(tmp_path / f"{net.name}.onnx"))
    rng = np.random.default_rng(1000 + seed)
    x0 = rng.standard_normal(net.input_shape)
    _, sv, vt = np.linalg.svd(net.jacobian(x0))
    radii = [level * float(np.linalg.norm(x0)) for level in TIGHT_LEVELS]
    tight = engine.local_bounds(x0, radii, method="tight")
    paper = engine.local_bounds(x0, radii, method="paper")
    for eps, t, p in zip(radii, tight, paper):
        assert t.bound <= p.bound
        assert sv[0] <= t.bound * SLACK
        points = netgen.ball_points(rng, x0, eps, N_SPHERE, N_INSIDE, list(vt[:3]))
        ratio = netgen.max_ratio(net, x0, points)
        assert ratio <= t.bound * SLACK, f"eps={eps:.4g}: ratio {ratio!r} above the tight bound {t.bound!r}"


def test_tight_bound_is_much_tighter_on_a_trained_cnn():
    """On the shipped digits CNN at a small radius the tight bound is well below the paper's."""
    from pathlib import Path

    models = Path(__file__).resolve().parents[1] / "models"
    engine = onnxlip.load(models / "digits_cnn.onnx")
    x0 = np.load(models / "digits_cnn_x0.npy")
    tight = engine.local_bound(x0, 1e-3, method="tight").bound
    paper = engine.local_bound(x0, 1e-3, method="paper").bound
    assert engine.jacobian_norm(x0) <= tight < paper / 2
