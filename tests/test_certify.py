"""Robustness certificates: never above a confirmed adversarial distance."""

from __future__ import annotations

import ast
import json
import math
from collections import Counter
from pathlib import Path

import netgen
import networkx as nx
import numpy as np
import pytest

import onnxlip
from onnxlip.certify import SQRT2, TOP_CLASS, _attack, _largest, _lead_floor, _lead_rows
from onnxlip.cli import main

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
REFERENCE = ROOT.parent / "shared" / "reference"


def _classifier(tmp_path, seed: int):
    family = netgen.dense_net if seed % 2 else netgen.conv_net
    net = family(seed)
    engine = onnxlip.load(net.save(tmp_path / f"{net.name}.onnx"))
    x0 = np.random.default_rng(seed).standard_normal(net.input_size).astype(np.float32)
    return net, engine, x0.astype(np.float64)


@pytest.mark.parametrize("seed", range(16))
def test_certificate_below_confirmed_attack(tmp_path, seed):
    """The certified radius is below every adversarial example the attack confirms,
    and no point sampled inside the certified ball changes the class."""
    net, engine, x0 = _classifier(tmp_path, seed)
    cert = engine.certify(x0, rel_tol=1e-2)
    logits = np.ravel(net(x0))
    assert cert.top_class == int(np.argmax(logits))
    assert cert.margin == pytest.approx(np.sort(logits)[-1] - np.sort(logits)[-2], rel=1e-4, abs=1e-6)
    assert 0 < cert.radius_global <= cert.radius_local * (1 + 1e-9)
    assert cert.radius == max(cert.radius_local, cert.radius_global)
    assert cert.radius_local < cert.attack_distance
    radius = cert.radius_local
    if cert.radius_test == "local bound":
        assert SQRT2 * radius * engine.local_bound(x0, radius).bound < cert.margin
    else:  # each lead's change bounded by the reach analysis
        assert cert.radius_test == "output bounds"
        rows = _lead_rows(TOP_CLASS, cert.top_class, logits.size)
        assert _lead_floor(engine, engine.trace(x0), radius, rows, 0.0) > 0
    rng = np.random.default_rng(seed)
    points = netgen.ball_points(rng, x0, radius, 200, 200, [])
    assert all(int(np.argmax(net(p))) == cert.top_class for p in points)
    for rival in (j for j in range(logits.size) if j != cert.top_class):
        assert _smallest_lead(net, x0, radius, cert.top_class, rival, rng) > 0
    if math.isfinite(cert.attack_distance):  # the attack's point really changes the class
        assert cert.attack_distance > cert.radius_local


@pytest.mark.parametrize("exact_fails", [False, True])
def test_attack_inside_the_radius_by_runtime_rounding_only(tmp_path, monkeypatch, exact_fails):
    """A runtime that fails the rule inside the certified radius (as onnxruntime's
    float32 rounding does where two classes tie within its resolution: found by an
    adversarial campaign, a lead of 1.4e-7 at x0) is no contradiction where the
    engine's float64 trace with error bounds proves the rule holds at that point:
    the certificate is returned, marked `attack_rounding`, and no lower bound is
    recorded from it. Where the exact arithmetic fails there too (simulated), the
    contradiction still stops the run with an error."""
    from onnxlip import certify as certify_module
    from onnxlip.errors import OnnxlipError

    _, engine, x0 = _classifier(tmp_path, 1)
    first = engine.certify(x0, rel_tol=1e-2)
    radius, top = first.radius_local, first.top_class
    runner = engine.runner()
    honest = type(runner).__call__

    def rounding(self, x):  # the decision "fails" from 40% of the radius on (the top class sunk)
        out = honest(self, x)
        if np.linalg.norm(np.ravel(x) - x0) > 0.4 * radius:
            out[top] = out.min() - 1.0
        return out

    monkeypatch.setattr(type(runner), "__call__", rounding)
    if exact_fails:
        monkeypatch.setattr(certify_module, "_holds_exactly", lambda *args: False)
        with pytest.raises(OnnxlipError, match="inside the certified radius|exceeds"):
            engine.certify(x0, rel_tol=1e-2)
        return
    cert = engine.certify(x0, rel_tol=1e-2)
    assert cert.attack_rounding
    assert cert.attack_distance < 0.5 * cert.radius_local
    assert cert.radius_local == pytest.approx(radius, rel=1e-2)
    assert not engine._lowers  # the attack's ratio is no lower bound here


def _smallest_lead(net, x0: np.ndarray, radius: float, top: int, rival: int, rng) -> float:
    """The smallest f_top − f_rival found by projected gradient descent in the ball (float64)."""
    coeff = np.zeros(np.ravel(net(x0)).size)
    coeff[top], coeff[rival] = 1.0, -1.0
    best = np.inf
    for start in range(3):
        d = rng.standard_normal(x0.size)
        x = x0 + radius * d / np.linalg.norm(d) * (1.0 if start else 1e-3)
        for _ in range(30):
            best = min(best, float(coeff @ np.ravel(net(x))))
            g = net.vjp(x, coeff[None])[0]
            if not np.any(g):
                break
            x = x - 0.3 * radius * g / np.linalg.norm(g)
            x = x0 + (x - x0) * min(1.0, radius / np.linalg.norm(x - x0))
        best = min(best, float(coeff @ np.ravel(net(x))))
    return best


def test_residual_net_certified_through_its_graph():
    """On a residual net the lead bounds' backward pass follows the graph (both
    paths of each unit meet before the next relaxation): the shipped
    digits_resnet_ts is certified by them to several times the local bound's
    radius, and no point of the ball (onnxruntime, sampled and after descent on
    the lead driven by the engine's Jacobian) changes the class."""
    model = MODELS / "digits_resnet_ts.onnx"
    x0 = np.load(MODELS / "digits_resnet_ts_x0.npy").astype(np.float64).ravel()
    engine = onnxlip.load(model, seed=1)
    cert = engine.certify(x0, rel_tol=1e-2)
    lipschitz = engine.certify(x0, rel_tol=1e-2, method="tight")
    assert cert.radius_test == "output bounds" and lipschitz.radius_test == "local bound"
    assert cert.radius_local >= 3 * lipschitz.radius_local  # 0.0751 against 0.0090
    assert cert.radius_local < cert.attack_distance
    session = netgen.ort_session(model)
    rng = np.random.default_rng(0)
    points = netgen.ball_points(rng, x0, cert.radius_local, 200, 200, [])
    outputs = np.array([netgen.ort_run(session, p) for p in points])
    assert np.all(np.argmax(outputs, axis=1) == cert.top_class)
    for rival in (j for j in range(outputs.shape[1]) if j != cert.top_class):
        coeff = np.zeros(outputs.shape[1])
        coeff[cert.top_class], coeff[rival] = 1.0, -1.0
        x = x0.copy()
        for _ in range(20):
            g = engine.jacobian(x).dense().T @ coeff
            x = x - 0.3 * cert.radius_local * g / np.linalg.norm(g)
            x = x0 + (x - x0) * min(1.0, cert.radius_local / np.linalg.norm(x - x0))
            out = netgen.ort_run(session, x)
            assert out[cert.top_class] > out[rival]


def _rooms():
    """Rooms of certificates' tests (positive: certain at ε), named: smooth, with a
    plunge past the radius (the output bounds'), -inf or NaN past it (the
    analysis not reaching the output), a step, not monotone, positive far out,
    and failing on a stretch below the radius (a test need not be monotone)."""
    r = 0.0123456
    yield "linear", lambda e: 1.0 - e / r, r
    yield "plunge", lambda e: 5.0 - 0.1 * e / r - 4.9 * (e / r) ** 8 if e <= r else -1e4 * (e - r), r
    yield "minus inf", lambda e: 1.0 - (e / r) ** 2 if e <= r else -math.inf, r
    yield "nan", lambda e: 2.0 - e / r if e <= r else math.nan, r
    yield "step", lambda e: 1.0 if e <= r else -1.0, r
    yield "wavy", lambda e: (1 - e / r) * (2 + math.sin(50 * math.log(e))), r
    yield "huge", lambda e: 1.0 - e / 3e5, 3e5
    # fails on (r/3, r/2) only: either end of a passing stretch is a radius
    yield "islands", lambda e: 1.0 - e / r if not r / 3 < e < r / 2 else -1.0, (r / 3, r)


@pytest.mark.parametrize("brent", ["scipy", "stops"])
@pytest.mark.parametrize("rel_tol", [1e-3, 1e-2])
@pytest.mark.parametrize("low", [1e-9, 1e-4, 0.0123])
def test_radius_search_returns_a_passing_radius_within_tolerance(monkeypatch, low, rel_tol, brent):
    """certify's search (growth, Brent's method, bisection) returns only an ε its
    test passed at, with a failing ε within rel_tol above it (the room falls
    through 0 at r), never a result that it did not test; None where low fails;
    and fewer tests than doubling and bisection would take on the smooth rooms.
    Also where Brent's method stops at once (its iteration limit): the bisection
    after it finishes the search."""
    if brent == "stops":
        def stops(*args, **kwargs):
            raise RuntimeError("failed to converge")
        monkeypatch.setattr("onnxlip.certify.brentq", stops)
    for name, room, r in _rooms():
        tested = {}

        def counted(eps, room=room, tested=tested):
            tested[eps] = room(eps)
            return tested[eps]

        radius, count = _largest(counted, low, rel_tol)
        note = f"{name}: radius {radius} in {count} tests"
        assert count == len(tested), note
        assert tested[radius] > 0, note
        assert any(end * (1 - rel_tol) <= radius <= end for end in np.atleast_1d(r)), note
        assert any(not v > 0 and radius < e <= radius * (1 + rel_tol) for e, v in tested.items()), note
        if name in ("linear", "plunge") and low < 1e-3 and brent == "scipy":
            doubling = math.ceil(math.log2(r / low)) + math.ceil(math.log2(1 / rel_tol)) + 1
            assert count < doubling, note
    assert _largest(lambda e: -1.0, 1e-3, 1e-3) == (None, 1)
    radius, _ = _largest(lambda e: 1.0 - e / 0.5, 1e-3, 1e-30)  # below float64's resolution: ends
    assert 0.5 * (1 - 1e-15) <= radius < 0.5
    assert _largest(lambda e: math.nan, 1e-3, 1e-3) == (None, 1)


@pytest.mark.skipif(not (REFERENCE / "mnist_avant.onnx").is_file(), reason="../shared/reference absent")
def test_reference_certified_radius_matches_paper():
    """MNIST's x0 through the whole certify search; CIFAR-10's (80 s of search:
    tools/tightness.py) in the next test at the one radius issue 11 asks for."""
    name = "mnist_avant"
    published = json.loads((REFERENCE / f"{name}_published.json").read_text())
    net = onnxlip.load(REFERENCE / f"{name}.onnx")
    cert = net.certify(np.load(REFERENCE / f"{name}_x0.npy"))
    assert cert.margin == pytest.approx(published["margin"], rel=1e-4)
    # the default certifies each lead's change over the ball (the reach analysis):
    # issue 11's target, 3x the paper's: MNIST 0.1669 against 0.0522, CIFAR-10 0.01591 against 0.00421
    assert cert.radius_test == "output bounds"
    assert cert.radius_local >= 3 * published["certified_radius_paper_method"]
    assert cert.radius_global == pytest.approx(published["certified_radius_global"], rel=1e-2)
    assert cert.radius_local < cert.attack_distance


@pytest.mark.skipif(not (REFERENCE / "cifar10_avant.onnx").is_file(), reason="../shared/reference absent")
def test_reference_cifar10_certified_at_three_times_the_paper():
    """CIFAR-10's x0: the output bounds keep the top class at 3x the paper's
    certified radius (0.01263; the search finds 0.0159), the attack needs more,
    and the global radius is the published one."""
    name = "cifar10_avant"
    published = json.loads((REFERENCE / f"{name}_published.json").read_text())
    net = onnxlip.load(REFERENCE / f"{name}.onnx")
    x = net.check_input(np.load(REFERENCE / f"{name}_x0.npy"))
    logits = net.forward(x).ravel()
    top = TOP_CLASS.chosen(logits)
    assert TOP_CLASS.lead(logits, top) == pytest.approx(published["margin"], rel=1e-4)
    eps = 3 * published["certified_radius_paper_method"]
    assert _lead_floor(net, net.trace(x), eps, _lead_rows(TOP_CLASS, top, logits.size), 0.0) > 0
    assert _attack(net, x, top, 50, TOP_CLASS)[0] > eps
    radius_global = published["margin"] / (SQRT2 * net.global_bound().bound)
    assert radius_global == pytest.approx(published["certified_radius_global"], rel=1e-2)


def test_certify_command_single_and_dataset(tmp_path, capsys):
    model = str(MODELS / "digits_mlp.onnx")
    assert main(["certify", model, "-x", str(MODELS / "digits_mlp_x0.npy"), "--json"]) == 0
    single = json.loads(capsys.readouterr().out)
    assert single["radius_global"] <= single["radius_local"] < single["attack_distance"]
    data = np.load(MODELS / "digits_test.npz")
    batch = tmp_path / "batch.npz"
    labels = data["y"][:6].copy()
    labels[0] = (labels[0] + 1) % 10  # a deliberately wrong label: reported, not certified
    np.savez(batch, x=data["x"][:6], y=labels)
    rows, png = tmp_path / "rows.csv", tmp_path / "acc.png"
    code = main(["certify", model, "--inputs", str(batch), "--workers", "2", "--out", str(rows),
                 "--plot", str(png), "--radii", "0.001", "0.01", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["summary"]["inputs"] == 6
    tests = out["summary"]["radius_tests"]  # each input's radius comes from one of the two tests
    assert set(tests) <= {"output bounds", "local bound"} and sum(tests.values()) == 6
    assert tests == dict(Counter(c["radius_test"] for c in out["certificates"]))
    assert out["certificates"][0]["correct"] is False
    assert out["summary"]["certified_accuracy"]["0.001"]["local"] <= 5 / 6
    assert len(rows.read_text().splitlines()) == 7 and png.stat().st_size > 0


def test_certify_folder_and_bad_labels(tmp_path, capsys):
    data = np.load(MODELS / "digits_test.npz")
    folder = tmp_path / "inputs"
    folder.mkdir()
    for i in range(3):
        np.save(folder / f"{i}.npy", data["x"][i])
    model = str(MODELS / "digits_mlp.onnx")
    assert main(["certify", model, "--inputs", str(folder), "--workers", "1"]) == 0
    assert "3 inputs" in capsys.readouterr().out
    bad = tmp_path / "labels.npy"
    np.save(bad, np.zeros(5, np.int64))
    code = main(["certify", model, "--inputs", str(folder), "--labels", str(bad)])
    err = capsys.readouterr().err
    assert code == 2 and "labels" in err and err.count("\n") == 1


@pytest.mark.parametrize("seed", range(6))
def test_other_decision_rules(tmp_path, seed):
    """argmin certifies the smallest output (the certificate of the argmax of -f);
    a required margin is kept over the whole certified ball; a target class that
    is not the decision gets radius 0."""
    from onnxlip.certify import Rule

    net, engine, x0 = _classifier(tmp_path, seed)
    logits = np.ravel(net(x0))
    low = engine.certify(x0, rel_tol=1e-2, rule=Rule("argmin"))
    assert low.top_class == int(np.argmin(logits)) and low.decision == "argmin"
    assert low.margin == pytest.approx(np.sort(logits)[1] - np.sort(logits)[0], rel=1e-4, abs=1e-6)
    rng = np.random.default_rng(seed)
    points = netgen.ball_points(rng, x0, low.radius_local, 200, 200, [])
    assert all(int(np.argmin(net(p))) == low.top_class for p in points)
    assert low.radius_local < low.attack_distance

    top = engine.certify(x0, rel_tol=1e-2)
    keep = 0.5 * top.margin
    strict = engine.certify(x0, rel_tol=1e-2, rule=Rule(margin=keep))
    # equal where ε·L(x0, ε) jumps past both margins at one radius (a neuron turning uncertain)
    assert strict.radius_local <= top.radius_local and strict.required_margin == keep
    for p in netgen.ball_points(rng, x0, strict.radius_local, 200, 200, []):
        out = np.ravel(net(p))
        assert out[top.top_class] - np.max(np.delete(out, top.top_class)) > keep
    assert strict.radius_local < strict.attack_distance

    other = int(np.argsort(logits)[-2])
    wrong = engine.certify(x0, rel_tol=1e-2, rule=Rule(target=other))
    assert wrong.top_class == other and wrong.margin < 0
    assert wrong.radius_local == wrong.radius_global == wrong.attack_distance == 0.0


def test_decision_rules_on_the_command_line(capsys):
    model, x0 = MODELS / "digits_cnn.onnx", MODELS / "digits_cnn_x0.npy"
    assert main(["certify", str(model), "-x", str(x0), "--decision", "argmin", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["decision"] == "argmin" and out["radius_local"] > 0
    assert main(["certify", str(model), "-x", str(x0), "--target", "3", "--margin", "5"]) == 0
    text = capsys.readouterr().out
    assert "target class 3, required margin 5" in text and "nan" in text
    assert main(["certify", str(model), "-x", str(x0), "--target", "12"]) == 2
    assert "target class 12 is not one of the model's 10 outputs" in capsys.readouterr().err



def test_no_import_cycles_among_the_modules():
    """Module-level imports (TYPE_CHECKING ones included) form no cycle: certify.py
    works on its Certifiable protocol rather than importing network.py, which imports it."""
    package = ROOT / "onnxlip"
    graph = nx.DiGraph()
    for path in package.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        here = parts[:-1] if parts[-1] == "__init__" else parts
        folder = parts[:-1]
        graph.add_node(".".join(here))
        for target in _relative_imports(ast.parse(path.read_text()).body, folder):
            graph.add_edge(".".join(here), target)
    assert "onnxlip.network" in graph["onnxlip.cli"]  # the graph sees the imports
    assert list(nx.simple_cycles(graph)) == []


def _relative_imports(body: list, folder: tuple[str, ...]):
    """The modules a block of statements imports relatively (`from .x import y`:
    onnxlip.x; `from . import x`: onnxlip.x), descending into if-blocks, not functions."""
    for statement in body:
        if isinstance(statement, ast.If):
            yield from _relative_imports(statement.body + statement.orelse, folder)
        elif isinstance(statement, ast.ImportFrom) and statement.level:
            base = folder[:len(folder) - statement.level + 1]
            if statement.module:
                yield ".".join((*base, statement.module))
            else:
                yield from (".".join((*base, alias.name)) for alias in statement.names)


def test_margin_within_the_rounding_bound_certifies_nothing():
    """Both radii start from the exact leads at x0 (the float64 trace less its
    rounding-error bounds), not from the computed margin: where that bound
    exceeds the margin (two classes tied within the arithmetic's resolution, as
    an adversarial DAG net had: margin 1.2e-7, bound 3.7e-6, which raised a
    ZeroDivisionError from an attack at distance 0) nothing is certified."""
    from dataclasses import replace

    engine = onnxlip.load(MODELS / "digits_cnn.onnx", seed=0)
    x0 = np.load(MODELS / "digits_cnn_x0.npy")
    honest = engine.certify(x0)
    assert honest.radius > 0
    trace = engine.trace

    def blurred(x):  # the same values, a rounding-error bound above the margin
        at = trace(x)
        return replace(at, output_error=at.output_error + 2 * honest.margin)

    engine.trace = blurred
    cert = engine.certify(x0)
    assert cert.radius_local == cert.radius_global == 0.0 and cert.radius_test == ""
