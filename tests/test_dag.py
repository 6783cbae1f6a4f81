"""Graphs that are not chains: residual connections, Concat, Split, fan-out.

Each random net is loaded by onnxlip and checked against onnxruntime (forward
pass), its float64 twin (Jacobian by central differences; sampled difference
quotients in balls), and itself (||J(x0)|| <= local <= global, lower <= local).
"""

from __future__ import annotations

import os

import dagnets
import netgen
import numpy as np
import pytest

import onnxlip
from onnxlip.blocks import is_chain

SLACK = 1 + 1e-6
SOLVER = 1 + 1e-4
#: Nets per family: 12 of the first four families, 4 of the others; ONNXLIP_DAG_CASES=N
#: takes N of every family (N=20: 200 nets). tools/dag_battery.py checks more per net.
DEFAULT_CASES = {"resmlp": 12, "rescnn": 12, "concat": 12, "fanout": 12}
CASES = [(family, seed) for family in dagnets.FAMILIES
         for seed in range(int(os.environ.get("ONNXLIP_DAG_CASES", DEFAULT_CASES.get(family, 4))))]


def _load(tmp_path, family: str, seed: int):
    net = dagnets.FAMILIES[family](seed)
    path = net.save(tmp_path / f"{net.name}.onnx")
    x0 = np.random.default_rng(seed + 1000).standard_normal(net.input_shape)
    return net, path, onnxlip.load(path), x0


@pytest.mark.parametrize(("family", "seed"), CASES, ids=[f"{f}{s}" for f, s in CASES])
def test_dag_bounds_are_sound(tmp_path, family, seed):
    net, path, engine, x0 = _load(tmp_path, family, seed)
    assert not is_chain(engine.blocks)
    twin = net.twin()
    y_ort = netgen.ort_run(netgen.ort_session(path), x0)
    assert netgen.rel_err(engine.forward(x0), y_ort) <= 1e-5
    assert netgen.rel_err(twin(x0.ravel()[None])[0], y_ort) <= 1e-5

    jac = engine.jacobian(x0).dense()
    h = 1e-6
    basis = np.eye(x0.size)
    numeric = np.stack([(twin((x0.ravel() + h * e)[None])[0] - twin((x0.ravel() - h * e)[None])[0])
                        / (2 * h) for e in basis], axis=1)
    assert np.allclose(jac, numeric, rtol=1e-4, atol=1e-6 * max(1.0, np.abs(numeric).max()))
    jac_norm = float(np.linalg.norm(jac, 2))
    directions = list(np.linalg.svd(jac)[2][:2])

    rng = np.random.default_rng(seed)
    glob = engine.global_bound().bound
    radii = [level * float(np.linalg.norm(x0)) for level in (0.003, 0.03, 0.3)]
    previous = 0.0
    for eps, result in zip(radii, engine.local_bounds(x0, radii, method="paper")):
        bound = result.bound
        assert jac_norm <= bound * SLACK
        assert previous <= bound * SOLVER
        assert bound <= glob * SOLVER
        points = netgen.ball_points(rng, x0, eps, 300, 300, directions)
        # 'tight': the linearized graph (onnxlip.tight), never above the paper's composition
        tight = engine.local_bound(x0, eps, method="tight").bound
        assert tight <= bound * (1 + 1e-12)
        assert max(jac_norm, netgen.max_ratio(twin, x0, points)) <= tight * SLACK
        lower = engine.lower_bounds(x0, [eps], samples=16, ascent_steps=5)[0]
        assert lower.best <= tight * SLACK
        previous = bound


def test_jacobian_transpose_matches(tmp_path):
    """rmatvec is the transpose of matvec where a block reads several blocks."""
    for family in dagnets.FAMILIES:
        _, _, engine, x0 = _load(tmp_path, family, 3)
        jac = engine.jacobian(x0)
        rng = np.random.default_rng(0)
        v, u = rng.standard_normal(jac.in_size), rng.standard_normal(jac.out_size)
        assert u @ jac.matvec(v) == pytest.approx(jac.rmatvec(u) @ v, rel=1e-5)  # float32 convs


def test_sum_of_equal_branches_is_exact(tmp_path):
    """y = A x + A x: the local and global bounds are 2 ||A||, the truth."""
    net = dagnets.DagNet("twice", (1, 5), np.random.default_rng(0))
    w = net.const(np.random.default_rng(1).standard_normal((3, 5)))
    left, right = (net.node("Gemm", ["x", w], transB=1) for _ in range(2))
    net.output, net.output_shape = net.node("Add", [left, right]), ("N", 3)
    engine = onnxlip.load(net.save(tmp_path / "twice.onnx"))
    truth = 2 * np.linalg.norm(net.weights[w].astype(np.float32).astype(np.float64), 2)
    assert engine.global_bound().bound == pytest.approx(truth, rel=1e-5)
    assert engine.local_bound(np.ones(5), 0.1, method="paper").bound == pytest.approx(truth, rel=1e-5)
    assert len(engine.blocks) == 1 and engine.blocks[0].inputs == (-1, -1)


def test_residual_blocks_read_their_shortcut(tmp_path):
    """A ResNet basic block folds the second conv, its batch-norm, the Add and
    the ReLU into one block that reads the block before and the shortcut."""
    net, _, engine, _ = _load(tmp_path, "rescnn", 0)
    joined = [b for b in engine.blocks if len(b.inputs) > 1]
    assert joined and all(b.kind == "affine-relu" and "Add" in b.ops for b in joined)
    for b in joined:
        assert all(j < engine.blocks.index(b) for j in b.inputs)


def test_block_graph_dot_round_trips(tmp_path):
    """The DOT file of a residual net parses back (pydot) with every block and edge;
    where Graphviz is installed it also renders to SVG."""
    import shutil

    import networkx as nx

    from onnxlip.dot import block_graph, check_graph_path, write_graph
    from onnxlip.errors import OnnxlipError

    _, _, engine, _ = _load(tmp_path, "rescnn", 1)
    graph = block_graph(engine.blocks, engine.input_shape)
    write_graph(graph, tmp_path / "g.dot")
    back = nx.nx_pydot.read_dot(tmp_path / "g.dot")
    assert set(back.nodes) == set(graph.nodes) and len(back.edges) == len(graph.edges)
    joined = [k for k, b in enumerate(engine.blocks) if len(b.inputs) > 1]
    assert joined and all(back.in_degree(f"b{k}") == 2 for k in joined)
    with pytest.raises(OnnxlipError, match="format '.txt'"):
        check_graph_path(tmp_path / "g.txt")
    if shutil.which("dot"):
        write_graph(graph, tmp_path / "g.svg")
        assert (tmp_path / "g.svg").read_text().lstrip().startswith(("<?xml", "<svg"))
    else:
        with pytest.raises(OnnxlipError, match="needs Graphviz's 'dot' program"):
            check_graph_path(tmp_path / "g.svg")


def test_inspect_graph_option(tmp_path, capsys):
    """`inspect --graph` writes the DOT file; a bad path fails before the model is read."""
    from onnxlip.cli import main

    _, path, engine, _ = _load(tmp_path, "rescnn", 2)
    assert main(["inspect", str(path), "--norms", "--graph", str(tmp_path / "g.dot")]) == 0
    out = capsys.readouterr().out
    assert "reads" in out and "global bound" in out
    text = (tmp_path / "g.dot").read_text()
    assert text.count("->") == sum(len(b.inputs) for b in engine.blocks) and "norm " in text
    assert main(["inspect", str(tmp_path / "missing.onnx"), "--graph", str(tmp_path / "g.xyz")]) == 2
    assert "--graph" in capsys.readouterr().err


def test_bias_after_a_merge_is_added(tmp_path):
    """(x + x) + c and BN(x + Relu(x)): the bias of a layer after an Add of computed
    tensors (the block's shared bias) is in the forward pass (it was dropped once)."""
    for joined in (["x", "x"], ["x", "relu"]):
        net = dagnets.DagNet("merged", (1, 3), np.random.default_rng(0))
        net.node("Relu", ["x"])
        h = net.node("Add", [name if name == "x" else "t0" for name in joined])
        net.output, net.output_shape = net.bn(net.node("Add", [h, net.const(np.ones(3) * 5)]), 3), ("N", 3)
        path = net.save(tmp_path / "merged.onnx")
        x0 = np.array([0.5, -0.25, 2.0])
        expected = netgen.ort_run(netgen.ort_session(path), x0)
        assert netgen.rel_err(onnxlip.load(path).forward(x0), expected) <= 1e-6


def test_battery_finds_nothing_on_one_net_and_flags_a_bad_bound(tmp_path, monkeypatch):
    """tools/dag_battery.py on one pre-activation ResNet: no violation, points counted; with
    the paper bounds shrunk a millionfold (a fake unsound engine), it reports the sampled
    ratio above them and 'tight' above 'paper'."""
    import importlib.util
    import sys
    from pathlib import Path

    from onnxlip import bounds

    path = Path(__file__).resolve().parents[1] / "tools" / "dag_battery.py"
    spec = importlib.util.spec_from_file_location("dag_battery", path)
    battery = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "dag_battery", battery)  # for its dataclasses
    spec.loader.exec_module(battery)
    clean = battery.run_one("preact", "relu", 1, tmp_path, samples=40, ascent_steps=3)
    assert clean.violations == [] and clean.points > 4 * 80
    assert all(r["sampled"] <= r["paper"] for r in clean.ratios)
    honest = bounds.local_bound

    def shrunk(*args, **kwargs):
        result = honest(*args, **kwargs)
        result.bound *= 1e-6
        return result

    monkeypatch.setattr(bounds, "local_bound", shrunk)
    caught = {v["what"] for v in battery.run_one("preact", "relu", 1, tmp_path, samples=40,
                                                 ascent_steps=3).violations}
    assert {"sampled ratio above a local bound", "tight above paper"} <= caught
