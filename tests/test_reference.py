"""The paper's two trained networks: the engine reproduces the published numbers.

The files live in shared/reference beside the repository (never copied into it);
the module is skipped when they are absent.
"""

from __future__ import annotations

import json
from pathlib import Path

import netgen
import numpy as np
import pytest

import onnxlip

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
NAMES = ["mnist_avant", "cifar10_avant"]

if not all((REFERENCE / f"{name}_published.json").is_file() for name in NAMES):
    pytest.skip(f"reference models not found in {REFERENCE}", allow_module_level=True)


class Case:
    """One reference model: the engine, the onnxruntime session, x0 and the published JSON."""

    def __init__(self, name: str):
        self.name = name
        self.path = REFERENCE / f"{name}.onnx"
        self.published = json.loads((REFERENCE / f"{name}_published.json").read_text())
        self.x0 = np.load(REFERENCE / self.published.get("input", f"{name}_x0.npy"))
        # The published values are 100 power iterations, below the truth (by up to 0.8% on
        # CIFAR-10: our own Ritz values, lower estimates, are that far above them). A
        # certified bound is above the truth, so 1% leaves 0.2% for the certificates of
        # CIFAR-10's four Lanczos blocks: a tolerance of 2e-4 each (1e-3 by default;
        # at 5e-4 one random start in a few went 1.0103 over).
        self.engine = onnxlip.load(self.path, tol=2e-4)
        self.session = netgen.ort_session(self.path)


@pytest.fixture(scope="module", params=NAMES)
def case(request) -> Case:
    return Case(request.param)


def test_forward(case):
    """Engine forward == onnxruntime == published logits (1e-4 relative)."""
    logits = np.asarray(case.published["logits"], dtype=np.float64)
    y_ort = netgen.ort_run(case.session, case.x0)
    y = case.engine.forward(case.x0).ravel()
    assert y.shape == logits.shape
    assert netgen.rel_err(y, y_ort) <= 1e-4
    assert netgen.rel_err(y, logits) <= 1e-4
    assert netgen.rel_err(y_ort, logits) <= 1e-4


def test_local_bounds_match_published(case):
    """All 30 published radii within 1%, in one local_bounds call."""
    eps = case.published["eps"]
    published = case.published["local_bound"]
    assert len(eps) == len(published) == 30
    results = case.engine.local_bounds(case.x0, eps, method="paper")
    ratios = np.array([r.bound / p for r, p in zip(results, published)])
    worst = int(np.argmax(np.abs(ratios - 1)))
    assert np.all(np.abs(ratios - 1) <= 0.01), f"eps={eps[worst]}: bound / published = {ratios[worst]}"
    for r, e in zip(results, eps):
        assert r.eps == pytest.approx(e)
    bounds = [r.bound for r in results]
    assert all(b <= a * (1 + 1e-6) for a, b in zip(bounds[1:], bounds)), "not monotone in eps"


def test_global_bound_matches_published(case):
    glob = case.engine.global_bound()
    assert glob.bound == pytest.approx(case.published["global_bound"], rel=0.01)
    local = case.engine.local_bound(case.x0, case.published["eps"][-1], method="paper").bound
    assert local <= glob.bound * (1 + 1e-6)


def test_jacobian_norm_is_below_the_bounds(case):
    """||J(x0)|| of the float64 twin == published value, and below the smallest local bound."""
    twin = netgen.from_onnx(case.path)
    assert netgen.rel_err(twin(case.x0)[0], netgen.ort_run(case.session, case.x0)) <= 1e-4
    jac_norm = float(np.linalg.norm(twin.jacobian(case.x0), 2))
    assert jac_norm == pytest.approx(case.published["jacobian_norm_at_x0"], rel=1e-4)
    smallest = case.engine.local_bound(case.x0, case.published["eps"][0], method="paper").bound
    assert jac_norm <= smallest


def test_mnist_auto_below_published_at_large_radii():
    """MNIST past ε ≈ 0.2: its uncertain units are too many for one joint bound, and
    the joint bound of the fully connected tail times the paper's bounds before it
    gives 0.65x the published values (which the paper's composition, computed
    exactly, exceeds by up to 0.7%: they are power iterations). Sound: above the
    ratios gradient ascent finds."""
    case = Case("mnist_avant")
    eps, published = case.published["eps"], case.published["local_bound"]
    for i in (1, 9, 29):  # 0.2423, 2.173, 7.0
        auto = case.engine.local_bound(case.x0, eps[i])
        assert any("the joint bound of the blocks from" in n for n in auto.notes)
        assert auto.bound <= (0.7 if i > 1 else 0.5) * published[i]
        lower = case.engine.lower_bounds(case.x0, [eps[i]], samples=16, ascent_steps=10)[0]
        assert lower.best <= auto.bound
