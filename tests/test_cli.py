"""The command line: outputs, JSON, and one-line errors with non-zero exits."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxlip.cli import main

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def save_model(path: Path, nodes, inputs, outputs, inits=()) -> Path:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def dense_model(path: Path, batch="1", with_unsupported=False, product=False) -> Path:
    """x -> Gemm; with `product`, h * Relu(h) (two computed tensors multiplied: refused)."""
    w = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(4, 3) / 10, "W")
    nodes = [helper.make_node("Gemm", ["x", "W"], ["h"], transB=1, name="fc")]
    last = "h"
    if with_unsupported:
        nodes.append(helper.make_node("Softsign", ["h"], ["s"], name="squash"))
        last = "s"
    if product:
        nodes.append(helper.make_node("Relu", ["h"], ["r"], name="act"))
        nodes.append(helper.make_node("Mul", ["h", "r"], ["s"], name="skip"))
        last = "s"
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3])
    y = helper.make_tensor_value_info(last, TensorProto.FLOAT, [batch, 4])
    return save_model(path, nodes, [x], [y], [w])


def test_inspect_table_and_json(capsys):
    code, out, _ = run(capsys, "inspect", MODELS / "digits_cnn.onnx", "--norms")
    assert code == 0
    assert "MaxPool" in out and "matrix-free" in out and "global bound" in out
    code, out, _ = run(capsys, "inspect", MODELS / "cifar_bn.onnx", "--json")
    data = json.loads(out)
    assert code == 0 and data["input_shape"] == [1, 3, 32, 32]
    assert any("BatchNormalization" in b["ops"] for b in data["blocks"])


def test_bound_json_matches_api(capsys):
    import onnxlip

    model, x = MODELS / "digits_mlp.onnx", MODELS / "digits_mlp_x0.npy"
    code, out, _ = run(capsys, "bound", model, "--input", x, "--eps", "0.01", "0.5", "--json")
    data = json.loads(out)
    assert code == 0 and set(data) == {"model", "input", "input_shape", "output_shape", "method",
                                       "global_bound", "points", "seconds", "global_guarantee",
                                       "global_delta", "seed", "delta"}
    assert data["model"] == str(model) and data["input"] == str(x) and data["method"] == "auto"
    points = data["points"]
    assert [e["eps"] for e in points] == [0.01, 0.5]
    assert {"guarantee", "delta", "source", "lower_bound", "ratio", "notes"} <= set(points[0])
    net = onnxlip.load(model, seed=data["seed"])  # the recorded seed replays the run
    expected = net.local_bound(np.load(x), 0.5).bound
    assert points[1]["local_bound"] == pytest.approx(expected, rel=1e-9)
    assert all(p["lower_bound"] <= p["local_bound"] <= data["global_bound"] * (1 + 1e-9) for p in points)
    assert len(points[0]["layers"]) == len(net.blocks)


def test_bound_verbose_table(capsys):
    code, out, _ = run(capsys, "bound", MODELS / "digits_cnn.onnx", "-x",
                       MODELS / "digits_cnn_x0.npy", "-e", "0.1", "-v")
    assert code == 0 and "uncertain" in out and "residual" in out


@pytest.mark.parametrize("suffix", [".npz", ".pb"])
def test_other_input_formats(tmp_path, capsys, suffix):
    x = np.load(MODELS / "tiny_dense_x0.npy")
    path = tmp_path / f"x{suffix}"
    if suffix == ".npz":
        np.savez(path, x=x)
    else:
        path.write_bytes(numpy_helper.from_array(x).SerializeToString())
    code, out, _ = run(capsys, "bound", MODELS / "tiny_dense.onnx", "-x", path, "-e", "0.1", "--json")
    assert code == 0 and json.loads(out)["points"][0]["local_bound"] > 0


def test_symbolic_batch_is_one(tmp_path, capsys):
    model = dense_model(tmp_path / "m.onnx", batch="N")
    x = tmp_path / "x.npy"
    np.save(x, np.ones((1, 3), np.float32))
    code, _, err = run(capsys, "bound", model, "-x", x, "-e", "0.1")
    assert code == 0, err


def error_cases(tmp_path: Path) -> dict[str, tuple[list, str]]:
    x = tmp_path / "x.npy"
    np.save(x, np.ones((1, 3), np.float32))
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.ones((1, 5), np.float32))
    nan = tmp_path / "nan.npy"
    np.save(nan, np.array([[np.nan, 0, 0]], np.float32))
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"this is not a protobuf \x00\xff" * 10)
    good = dense_model(tmp_path / "good.onnx")
    symbolic = tmp_path / "sym.onnx"
    save_model(symbolic, [helper.make_node("Relu", ["x"], ["y"])],
               [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "features"])],
               [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "features"])])
    return {
        "missing model": (["bound", tmp_path / "nope.onnx", "-x", x, "-e", "1"], "no such file"),
        "not onnx": (["inspect", junk], "junk.onnx"),
        "unsupported op": (["inspect", dense_model(tmp_path / "s.onnx", with_unsupported=True)],
                           "'squash' (Softsign)"),
        "not affine": (["inspect", dense_model(tmp_path / "r.onnx", product=True)], "not affine"),
        "symbolic dim": (["inspect", symbolic], "--input-shape"),
        "wrong input size": (["bound", good, "-x", wrong, "-e", "1"], "(1, 5)"),
        "nan input": (["bound", good, "-x", nan, "-e", "1"], "NaN"),
        "zero eps": (["bound", good, "-x", x, "-e", "0"], "eps"),
        "infinite eps": (["bound", good, "-x", x, "-e", "inf"], "eps"),
        "missing input": (["bound", good, "-x", tmp_path / "none.npy", "-e", "1"], "none.npy"),
        "bad input format": (["bound", good, "-x", junk, "-e", "1"], "unknown input format"),
    }


@pytest.mark.parametrize("case", [
    "missing model", "not onnx", "unsupported op", "not affine", "symbolic dim",
    "wrong input size", "nan input", "zero eps", "infinite eps", "missing input", "bad input format",
])
def test_user_errors_are_one_line(tmp_path, capsys, case):
    args, expected = error_cases(tmp_path)[case]
    code, out, err = run(capsys, *args)
    assert code == 2
    assert err.startswith("onnxlip: error: ") and err.count("\n") == 1, err
    assert expected in err
    assert "Traceback" not in err and out == ""


def test_symbolic_dim_with_input_shape(tmp_path, capsys):
    symbolic = save_model(tmp_path / "sym.onnx", [helper.make_node("Relu", ["x"], ["y"])],
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "f"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "f"])])
    code, out, err = run(capsys, "inspect", symbolic, "--input-shape", "1,7")
    assert code == 0, err
    assert "1x7" in out


def test_readme_commands_are_the_ones_ci_and_users_run(capsys):
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    test_command = next(line for line in ci.splitlines() if "pytest" in line)
    assert test_command.strip() in readme
    main_command = re.search(r"^\s+(python3 -m venv .*onnxlip bound .*)$", readme, re.M).group(1)
    args = shlex.split(main_command.split("&& onnxlip ", 1)[1])
    code, out, err = run(capsys, *[ROOT / a if a.startswith("models/") else a for a in args])
    assert code == 0, err
    assert "local bound" in out


@pytest.mark.parametrize("args", [
    ["bound", "m.onnx", "-x", "x.npy", "-e", "abc"],
    ["sweep", "m.onnx", "-x", "x.npy", "-n", "0"],
    ["certify", "m.onnx", "--inputs", "d.npz", "--workers", "-1"],
    ["bound", "m.onnx", "-e", "1"],
    ["nonsense"],
])
def test_usage_errors_are_one_line(capsys, args):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.startswith("onnxlip: error: ") and err.count("\n") == 1, err
