"""Every bad input ends in one clear line: through the CLI (exit code 2, one
line on stderr starting with "onnxlip: error: ", no traceback) and through the
API (onnxlip.OnnxlipError). The cases are in tests/badinputs.py; the ones
tests/test_cli.py already runs through the CLI are only run through the API here.
"""

from __future__ import annotations

import importlib.util
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import onnx
import pytest
from badinputs import Case, dense, make_cases, save

import onnxlip
from onnxlip.cli import main
from onnxlip.lowering import LOWERINGS

_FOLDER = tempfile.TemporaryDirectory(prefix="onnxlip-bad-")
_CASES = {c.name: c for c in make_cases(Path(_FOLDER.name))}
CLI_CASES = [name for name, c in _CASES.items() if not c.in_test_cli]
TOO_LARGE = [name for name in _CASES if "100000" in name or "10^9" in name or "40000" in name]
ROOT = Path(__file__).resolve().parents[1]
ESCAPES = ["external data at an absolute path", "external data escaping with ../",
           "external data through a symlink that leaves the folder"]


@pytest.fixture
def in_folder(monkeypatch) -> dict[str, Case]:
    """The cases, run from the folder that holds their files."""
    monkeypatch.chdir(_FOLDER.name)
    monkeypatch.delenv("ONNXLIP_DEBUG", raising=False)
    return _CASES


@pytest.mark.parametrize("name", CLI_CASES)
def test_cli(in_folder, capsys, name):
    case = in_folder[name]
    try:
        code = main(case.argv)
    except SystemExit as exc:  # argparse refuses the arguments themselves
        code = exc.code
    out, err = capsys.readouterr()
    assert code == case.code, err
    if case.code == 0:
        assert err == ""
        return
    assert err.startswith("onnxlip: error: ") and err.count("\n") == 1, err
    assert case.expect in err
    assert "Traceback" not in err and out == ""


@pytest.mark.parametrize("name", list(_CASES))
def test_api(in_folder, name):
    case = in_folder[name]
    if case.code == 0:
        case.api()
        return
    with pytest.raises(onnxlip.OnnxlipError) as info:
        case.api()
    message = str(info.value)
    assert case.api_message in message and "\n" not in message


@pytest.mark.parametrize("name", TOO_LARGE)
def test_too_large_fails_fast_before_allocating(in_folder, name):
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(onnxlip.OnnxlipError, match="elements"):
            in_folder[name].api()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - start < 5
    assert peak < 64 << 20, f"{peak / 2**20:.0f} MiB allocated"


@pytest.mark.parametrize("name", ESCAPES)
def test_external_data_outside_is_refused_before_any_read(in_folder, monkeypatch, name):
    def no_read(*args, **kwargs):
        raise AssertionError("external data was read")

    helper = onnx.external_data_helper
    monkeypatch.setattr(helper, "load_external_data_for_model", no_read)
    monkeypatch.setattr(helper, "load_external_data_for_tensor", no_read)
    monkeypatch.setattr(helper, "_read_external_data_bytes", no_read, raising=False)
    with pytest.raises(onnxlip.OnnxlipError, match="outside the model's folder"):
        in_folder[name].api()


def test_unexpected_lowering_error_names_the_node(tmp_path, monkeypatch):
    def broken(ctx):
        raise ValueError("boom\nsecond line")

    path = tmp_path / save(tmp_path, "m.onnx", dense())
    monkeypatch.setitem(LOWERINGS, "Gemm", broken)
    monkeypatch.delenv("ONNXLIP_DEBUG", raising=False)
    with pytest.raises(onnxlip.OnnxlipError, match=r"node 'fc' \(Gemm\): cannot be lowered "
                                                   r"\(ValueError: boom second line\)"):
        onnxlip.load(path)
    monkeypatch.setenv("ONNXLIP_DEBUG", "1")
    with pytest.raises(ValueError, match="boom"):
        onnxlip.load(path)


def test_two_outputs_bound_the_chosen_one(in_folder):
    net = onnxlip.load("two_outputs.onnx", output_name="logits")
    x = np.ones((1, 3), np.float32)
    assert net.output_shape == (1, 4)
    assert net.forward(x).ravel() == pytest.approx(net.runner()(x), rel=1e-6)
    aux = onnxlip.load("aux_head.onnx", output_name="y")
    assert [b.kind for b in aux.blocks] == ["affine-relu"]


def test_cases_cover_the_issue():
    names = " ".join(_CASES)
    for topic in ["does not exist", "not ONNX", "truncated", "corrupted", "checker", "unsupported",
                  "chain", "symbolic", "does not match", "NaN in the input", "Conv kernel",
                  "Gemm", "BatchNormalization", "Add constant", "eps < 0", "eps = NaN",
                  "two outputs", "two inputs", "missing", "absolute", "../", "100000x100000",
                  "object array", "batch of 5", "--plot", "--csv", "--out"]:
        assert topic in names, topic


def test_errors_md_table_is_current():
    """tools/ERRORS.md shows what the CLI prints today (regenerate with --write)."""
    spec = importlib.util.spec_from_file_location("error_table", ROOT / "tools" / "error_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = module.ERRORS_MD.read_text()
    stored = text.split(module.BEGIN, 1)[1].split(module.END, 1)[0].strip()
    assert stored == module.table().strip(), "run: python tools/error_table.py --write"
