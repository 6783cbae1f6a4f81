"""What the command line writes: output files checked before any work, results
printed before files are written, a closed pipe, `python -m onnxlip`, inputs
without labels, the sweep's lower bounds, the plots and the JSON key names."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import matplotlib.figure
import numpy as np
import pytest

import onnxlip
from onnxlip import bounds, graph, network
from onnxlip.cli import main
from onnxlip.lower import LowerBounds
from onnxlip.sweep import Sweep, SweepPoint

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
MLP, MLP_X0 = str(MODELS / "digits_mlp.onnx"), str(MODELS / "digits_mlp_x0.npy")


def run(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def no_work(monkeypatch) -> list[str]:
    """Every model load and bound computation, counted (and refused)."""
    calls: list[str] = []

    def refuse(name):
        def call(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"{name} ran before the output options were checked")
        return call

    monkeypatch.setattr(graph, "load_graph", refuse("load_graph"))
    monkeypatch.setattr(network, "load_graph", refuse("load_graph"))
    monkeypatch.setattr(bounds, "local_bound", refuse("local_bound"))
    monkeypatch.setattr(bounds, "global_bound", refuse("global_bound"))
    monkeypatch.setattr(network, "tight_local_bound", refuse("tight_local_bound"))
    return calls


def bad_outputs(tmp_path: Path) -> dict[str, tuple[list, str]]:
    batch = str(MODELS / "digits_test.npz")
    sweep = ["sweep", MLP, "-x", MLP_X0, "-n", "2"]
    certify = ["certify", MLP, "--inputs", batch, "--workers", "1"]
    missing = tmp_path / "no" / "such"
    folder = tmp_path / "folder.png"
    folder.mkdir()
    return {
        "sweep --plot in a missing folder": (sweep + ["--plot", missing / "p.png"],
                                             "no such directory"),
        "sweep --plot of an unknown format": (sweep + ["--plot", tmp_path / "p.xyz"],
                                              "format '.xyz'; use a format matplotlib writes"),
        "sweep --plot without a suffix": (sweep + ["--plot", tmp_path / "p"], "no file suffix"),
        "sweep --csv in a missing folder": (sweep + ["--csv", missing / "t.csv"],
                                            "no such directory"),
        "certify --out in a missing folder": (certify + ["--out", missing / "rows.csv"],
                                              "no such directory"),
        "certify --out of an unknown format": (certify + ["--out", tmp_path / "rows.txt"],
                                               "format '.txt'; use one of .csv, .json"),
        "certify --plot that is a folder": (certify + ["--plot", folder], "is a directory"),
        "certify --plot under a file": (certify + ["--plot", Path(MLP) / "p.png"],
                                        "no such directory"),
    }


BAD_OUTPUTS = ["sweep --plot in a missing folder", "sweep --plot of an unknown format",
               "sweep --plot without a suffix", "sweep --csv in a missing folder",
               "certify --out in a missing folder", "certify --out of an unknown format",
               "certify --plot that is a folder", "certify --plot under a file"]


@pytest.mark.parametrize("case", BAD_OUTPUTS)
def test_bad_output_fails_before_any_work(tmp_path, capsys, no_work, case):
    args, expected = bad_outputs(tmp_path)[case]
    code, out, err = run(capsys, *args)
    assert code == 2 and out == ""
    assert err.startswith("onnxlip: error: ") and err.count("\n") == 1, err
    assert expected in err
    assert no_work == []


@pytest.mark.skipif(not Path("/sys").is_dir(), reason="needs a folder no one may write (Linux /sys)")
def test_unwritable_output_fails_before_any_work(capsys, no_work):
    code, out, err = run(capsys, "sweep", MLP, "-x", MLP_X0, "--csv", "/sys/onnxlip-table.csv")
    assert code == 2 and "/sys/onnxlip-table.csv: cannot write" in err and no_work == []
    assert not Path("/sys/onnxlip-table.csv").exists()


def test_output_check_leaves_no_file_and_keeps_existing(tmp_path, capsys):
    """The check proves a folder writable without leaving a file behind, and
    never truncates one that exists (here: the run fails later, on the input)."""
    new, old = tmp_path / "new.csv", tmp_path / "old.csv"
    old.write_text("kept")
    for path in (new, old):
        code, _, err = run(capsys, "sweep", MLP, "-x", tmp_path / "none.npy", "--csv", path)
        assert code == 2 and "none.npy" in err
    assert not new.exists() and old.read_text() == "kept"


def test_results_are_printed_before_a_late_file_error(tmp_path, capsys, monkeypatch):
    def disk_full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("onnxlip.cli.write_csv", disk_full)
    csv = tmp_path / "t.csv"
    code, out, err = run(capsys, "sweep", MLP, "-x", MLP_X0, "-n", "3", "--no-lower", "--csv", csv)
    assert code == 2
    assert err == f"onnxlip: error: --csv {csv}: cannot write (No space left on device)\n"
    assert "local bound" in out and len(out.splitlines()) == 3 + 3  # title, header, rule, rows


def test_plots_and_files_are_written(tmp_path, capsys):
    files = {"csv": tmp_path / "t.csv", "plot": tmp_path / "s.svg"}
    code, _, err = run(capsys, "sweep", MLP, "-x", MLP_X0, "-n", "3", "--csv", files["csv"],
                       "--plot", files["plot"])
    assert code == 0, err
    assert files["csv"].read_text().startswith(
        "eps,local_bound,upper_bound,upper_bound_eps,source,guarantee,delta,global_bound,notes,")
    assert files["plot"].read_text().lstrip().startswith("<?xml")


def _python_m(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "onnxlip", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def test_python_m_onnxlip():
    process = _python_m("inspect", "models/digits_mlp.onnx")
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    assert out.decode().startswith("models/digits_mlp.onnx: input 1x1x8x8 -> output 1x10")


def test_closed_pipe_ends_quietly():
    """`onnxlip ... | head`: the reader is gone before anything is written."""
    process = _python_m("sweep", "models/digits_mlp.onnx", "-x", "models/digits_mlp_x0.npy",
                        "-n", "3", "--no-lower")
    process.stdout.close()
    err = process.stderr.read().decode()
    assert process.wait(timeout=120) == 141 and err == ""


def test_closed_pipe_elsewhere_is_still_an_internal_error(capsys, monkeypatch):
    """Only stdout's own broken pipe is quiet: another one is a bug to report."""
    def broken(args):
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")

    monkeypatch.setattr("onnxlip.cli.run_inspect", broken)
    monkeypatch.delenv("ONNXLIP_DEBUG", raising=False)
    code, _, err = run(capsys, "inspect", MLP)
    assert code == 3 and "internal error: BrokenPipeError" in err


# ----------------------------------------------------------------------------- labels


def test_dataset_without_labels_has_no_accuracy(tmp_path, capsys):
    x = np.load(MODELS / "digits_test.npz")["x"][:4]
    np.save(tmp_path / "x.npy", x)
    args = ["certify", MLP, "--inputs", tmp_path / "x.npy", "--workers", "1", "--radii", "0.01"]
    code, out, err = run(capsys, *args)
    assert code == 0, err
    assert "accuracy: n/a (no labels)" in out and "certified accuracy" not in out
    code, out, _ = run(capsys, *args, "--json")
    data = json.loads(out)
    assert data["summary"]["accuracy"] is None and data["summary"]["certified_accuracy"] is None
    assert data["summary"]["labelled"] is False
    assert all(c["label"] is None and c["correct"] is None for c in data["certificates"])
    certified = sum(c["radius_local"] >= 0.01 for c in data["certificates"]) / 4
    assert data["summary"]["certified"]["0.01"]["local"] == certified


def test_dataset_with_labels_counts_wrong_ones_as_not_certified(tmp_path, capsys):
    data = np.load(MODELS / "digits_test.npz")
    labels = data["y"][:4].copy()
    labels[:2] = (labels[:2] + 1) % 10
    np.savez(tmp_path / "d.npz", x=data["x"][:4], y=labels)
    code, out, _ = run(capsys, "certify", MLP, "--inputs", tmp_path / "d.npz", "--workers", "1",
                       "--radii", "1e-9", "--json")
    summary = json.loads(out)["summary"]
    assert code == 0 and summary["labelled"] is True and summary["accuracy"] <= 0.5
    assert summary["certified_accuracy"]["1e-09"]["local"] <= 0.5
    assert summary["certified"]["1e-09"]["local"] == 1.0  # every prediction is certified


def test_single_input_label_and_correct(capsys):
    net = onnxlip.load(MLP)
    x0 = np.load(MLP_X0)
    assert net.certify(x0).correct is None
    top = int(np.argmax(net.forward(x0)))
    assert net.certify(x0, label=top).correct is True
    assert net.certify(x0, label=(top + 1) % 10).correct is False
    code, out, _ = run(capsys, "certify", MLP, "-x", MLP_X0, "--json")
    data = json.loads(out)
    assert code == 0 and data["label"] is None and data["correct"] is None
    code, out, _ = run(capsys, "certify", MLP, "-x", MLP_X0)
    assert out.splitlines()[0] == (f"{MLP}: input 1x1x8x8 -> output 1x10, {len(net.blocks)} blocks, "
                                   f"x0 = {MLP_X0}, method auto")


# ----------------------------------------------------------------------------- sweep


def _lower(eps: float, best: float) -> LowerBounds:
    return LowerBounds(eps, jacobian_norm=1.0, jacobian_certified=1.0, ties=1, sampled=best,
                       ascent=0.0, evaluations=1)


def test_sweep_lower_bound_is_the_running_maximum():
    local = bounds.BoundResult(10.0, [], 0.0)
    found = {0.1: 3.0, 0.01: 2.0, 0.3: 2.5, 0.03: 1.0, 1.0: 4.0}  # not monotone, not sorted
    sweep = Sweep("m.onnx", "x.npy", 20.0, [SweepPoint(e, local, _lower(e, b))
                                            for e, b in found.items()], 0.0, 0.0)
    rows = {r["eps"]: r for r in sweep.rows()}
    expected = {0.01: (2.0, 0.01), 0.03: (2.0, 0.01), 0.1: (3.0, 0.1), 0.3: (3.0, 0.1),
                1.0: (4.0, 1.0)}
    for eps, (best, where) in expected.items():
        assert (rows[eps]["lower_bound"], rows[eps]["lower_bound_eps"]) == (best, where)
        assert rows[eps]["lower_best"] == found[eps]  # what this radius's own search found


def test_sweep_upper_bound_is_the_running_minimum():
    """L(x0, ε) never decreases in ε: a bound at a larger radius holds at every
    smaller one, and the smallest from ε on is the sweep's upper bound there;
    the ratio is upper ÷ lower."""
    own = {0.1: 7.0, 0.01: 9.0, 0.3: 8.0, 0.03: 5.0, 1.0: 12.0}  # not monotone, not sorted
    sweep = Sweep("m.onnx", "x.npy", 20.0, [SweepPoint(e, bounds.BoundResult(b, [], 0.0), _lower(e, 1.0))
                                            for e, b in own.items()], 0.0, 0.0)
    rows = {r["eps"]: r for r in sweep.rows()}
    expected = {0.01: (5.0, 0.03), 0.03: (5.0, 0.03), 0.1: (7.0, 0.1), 0.3: (8.0, 0.3), 1.0: (12.0, 1.0)}
    for eps, (best, where) in expected.items():
        assert (rows[eps]["upper_bound"], rows[eps]["upper_bound_eps"]) == (best, where)
        assert rows[eps]["local_bound"] == own[eps] and rows[eps]["ratio"] == best


def test_sweep_command_shows_a_smaller_bound_from_a_larger_radius(capsys, monkeypatch):
    """Where a larger radius's bound is the smaller, the table shows it and its radius."""
    original = onnxlip.Network.local_bound_from

    def shrinking(self, nominal, eps, *args, **kwargs):  # a sound bound, scaled up at small radii
        result = original(self, nominal, eps, *args, **kwargs)
        return replace(result, bound=result.bound * (1 + 0.1 / eps))

    monkeypatch.setattr(onnxlip.Network, "local_bound_from", shrinking)
    code, out, _ = run(capsys, "sweep", MLP, "-x", MLP_X0, "--eps-min", "0.01", "--eps-max", "3", "-n", "4",
                       "--no-lower")
    assert code == 0 and "upper bound" in out and "(from eps)" in out
    code, out, _ = run(capsys, "sweep", MLP, "-x", MLP_X0, "--eps-min", "0.01", "--eps-max", "3", "-n", "4",
                       "--no-lower", "--json")
    points = json.loads(out)["points"]
    assert all(p["upper_bound"] <= p["local_bound"] for p in points)
    assert any(p["upper_bound"] < p["local_bound"] and p["upper_bound_eps"] > p["eps"] for p in points)


def test_sweep_command_lower_bounds_never_decrease(capsys):
    code, out, _ = run(capsys, "sweep", MLP, "-x", MLP_X0, "--eps-min", "0.01", "--eps-max", "3",
                       "-n", "5", "--json")
    points = json.loads(out)["points"]
    assert code == 0
    running = [p["lower_bound"] for p in points]
    assert running == sorted(running)
    by_eps = {p["eps"]: p for p in points}
    for p in points:
        assert p["lower_bound_eps"] <= p["eps"]
        assert p["lower_bound"] == by_eps[p["lower_bound_eps"]]["lower_best"]
        assert p["lower_bound"] <= p["local_bound"]


# ----------------------------------------------------------------------------- plots


@pytest.fixture
def saved_figures(monkeypatch) -> list:
    """The figures the CLI saves, kept for inspection."""
    figures = []
    original = matplotlib.figure.Figure.savefig

    def savefig(fig, *args, **kwargs):
        figures.append(fig)
        return original(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    return figures


@pytest.mark.parametrize("method", ["auto", "paper", "tight"])
def test_sweep_plot_names_the_method(tmp_path, capsys, saved_figures, method):
    code, _, err = run(capsys, "sweep", MLP, "-x", MLP_X0, "-n", "3", "--method", method,
                       "--plot", tmp_path / "s.png")
    assert code == 0, err
    ax = saved_figures[0].axes[0]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    name = {"auto": "onnxlip's default", "paper": "paper's method", "tight": "--method tight"}[method]
    assert any(name in t for t in legend) and repr(method) in ax.get_title()


def test_certified_plot_labels_the_attack_and_shares_the_x_range(tmp_path, capsys,
                                                                 saved_figures):
    code, _, err = run(capsys, "certify", MLP, "--inputs", MODELS / "digits_test.npz", "--end", "40",
                       "--workers", "1", "--plot", tmp_path / "c.png", "--method", "tight")
    assert code == 0, err
    ax = saved_figures[0].axes[0]
    assert "certified" not in ax.get_ylabel()
    labels = [line.get_label().replace("\n", " ") for line in ax.get_lines()]
    assert "--method tight" in labels[0]
    assert labels[0].startswith("certified accuracy") and labels[1].startswith("certified")
    assert labels[2].startswith("attack: upper limit of robust accuracy (not certified)")
    spans = {(min(line.get_xdata()), max(line.get_xdata())) for line in ax.get_lines()}
    assert len(spans) == 1 and spans == {ax.get_xlim()}
    starts = {line.get_ydata()[0] for line in ax.get_lines()}
    assert len(starts) == 1 and 0.9 < starts.pop() < 1  # the accuracy: digits_mlp misses 2 of 40
    for line in ax.get_lines():
        assert all(np.diff(line.get_ydata()) <= 0)
    assert [line.get_ydata()[-1] for line in ax.get_lines()[:2]] == [0.0, 0.0]


# ----------------------------------------------------------------------------- JSON names


def test_json_outputs_use_the_same_names(tmp_path, capsys):
    """One scheme everywhere: model and input as given, shapes, method, global_bound,
    points of {eps, local_bound}; no `bound` or `local` key at the top."""
    batch = str(MODELS / "digits_test.npz")
    outputs = {}
    for name, args in {
        "inspect": ["inspect", MLP, "--norms"],
        "bound": ["bound", MLP, "-x", MLP_X0, "-e", "0.01", "0.1"],
        "sweep": ["sweep", MLP, "-x", MLP_X0, "-n", "2"],
        "certify": ["certify", MLP, "-x", MLP_X0],
        "certify --inputs": ["certify", MLP, "--inputs", batch, "--workers", "1"],
    }.items():
        code, out, err = run(capsys, *args, "--json")
        assert code == 0, err
        outputs[name] = json.loads(out)
    for name, data in outputs.items():
        assert data["model"] == MLP, name
        assert data["input_shape"] == [1, 1, 8, 8] and data["output_shape"] == [1, 10], name
        assert "bound" not in data and "local" not in data and "local_bound" not in data, name
        if name != "inspect":
            assert data["input"] == (batch if name == "certify --inputs" else MLP_X0), name
            assert data["method"] == "auto", name
    for name in ("inspect", "bound", "sweep"):  # each run's recorded seed replays it
        glob = onnxlip.load(MLP, seed=outputs[name]["seed"]).global_bound().bound
        assert outputs[name]["global_bound"] == pytest.approx(glob, rel=1e-12), name
    assert set(outputs["bound"]["points"][0]) <= set(outputs["sweep"]["points"][0]) | {"layers"}
    for name in ("bound", "sweep"):
        assert [set(p) >= {"eps", "local_bound"} for p in outputs[name]["points"]] == [True] * 2
    single, many = outputs["certify"], outputs["certify --inputs"]["certificates"]
    assert set(many[0]) - {"index", "error"} == set(single) - {
        "model", "input", "input_shape", "output_shape", "method", "seed"}


def test_inspect_json_has_the_global_bound_the_table_prints(capsys):
    _, table_out, _ = run(capsys, "inspect", MLP, "--norms")
    _, out, _ = run(capsys, "inspect", MLP, "--norms", "--json")
    printed = float(table_out.rsplit("global bound: ", 1)[1])
    data = json.loads(out)
    assert data["global_bound"] == pytest.approx(printed, rel=1e-5)
    assert data["global_bound"] == pytest.approx(np.prod([b["norm"] for b in data["blocks"]]))
    _, out, _ = run(capsys, "inspect", MLP, "--json")
    assert json.loads(out)["global_bound"] is None  # not computed without --norms


def test_labels_without_a_batch_are_refused(capsys):
    code, out, err = run(capsys, "certify", MLP, "-x", MLP_X0, "--labels", MLP_X0)
    assert code == 2 and out == "" and "--labels goes with --inputs" in err


# ----------------------------------------------------------------------------- docs


def test_docs_link_only_inside_the_repository():
    """README links docs/method.md; every relative link of the user docs resolves
    inside the repository, and none names a path outside it."""
    import re

    readme = (ROOT / "README.md").read_text()
    assert "](docs/method.md)" in readme and (ROOT / "docs" / "method.md").is_file()
    docs = [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "tools").rglob("*.md")]
    for doc in docs:
        text = doc.read_text()
        assert "../shared" not in text, doc
        for target in re.findall(r"\]\(([^)#\s]+)", text):
            if "://" in target:
                continue
            path = (doc.parent / target).resolve()
            assert path.is_relative_to(ROOT) and path.exists(), (doc, target)
