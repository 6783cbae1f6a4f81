"""tools/make_models.py: the shipped models rebuild byte-for-byte and match their torch outputs."""

from __future__ import annotations

import filecmp
import json
import subprocess
import sys
from pathlib import Path

import netgen
import numpy as np
import onnx
import pytest

ROOT = Path(__file__).resolve().parents[1]
MODELS_DIR = ROOT / "models"
TOOL = ROOT / "tools" / "make_models.py"
SHIP_MAX_BYTES = 100_000  # tools/models/common.py: new models larger than this go to the cache
NEW_PREFIXES = ("tight_", "act_", "digits_resnet_", "digits_gapcnn_")  # the tight set and the zoo
NEW = sorted(p for p in MODELS_DIR.glob("*.onnx") if p.stem.startswith(NEW_PREFIXES))


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True, cwd=ROOT)


def _same_files(built: Path, names: list[str]) -> None:
    assert names, "nothing to compare"
    for name in names:
        assert filecmp.cmp(built / name, MODELS_DIR / name, shallow=False), f"{name} differs from models/"


def test_helper_models_rebuild_byte_for_byte(tmp_path):
    r = _run("--skip-torch", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["cifar_bn.onnx", "cifar_bn_x0.npy", "tiny_dense.onnx", "tiny_dense_x0.npy"]
    _same_files(tmp_path, names)


def test_torch_models_rebuild_byte_for_byte(tmp_path):
    """One trained member of each new family and exporter (the whole set takes a minute)."""
    pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    r = _run("--tight-set", "tight_cnn_bn", "--zoo", "digits_resnet", "--out", str(tmp_path),
             "--cache", str(tmp_path / "cache"))  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "onnxruntime vs torch" in r.stdout
    names = sorted(p.name for p in tmp_path.iterdir() if p.is_file())
    assert names == sorted(
        f"{stem}{ext}" for stem in ("tight_cnn_bn", "digits_resnet_ts", "digits_resnet_dynamo")
        for ext in (".onnx", "_x0.npy")
    )  # fmt: skip
    _same_files(tmp_path, names)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--cache", "/tmp/x"], "--cache only applies"),
        (["--large", "--out", "/tmp/x"], "--out and --skip-torch apply to the small models"),
        (["--zoo", "--skip-torch"], "--skip-torch applies to the shipped models"),
        (["--zoo", "nosuchnet"], "invalid choice"),
        (["--tight-set", "--cache", str(ROOT / "models")], "inside the repository"),
    ],
)
def test_cli_errors(args, message):
    r = _run(*args)
    assert r.returncode == 2
    assert message in r.stderr


def test_new_models_are_there_and_small():
    stems = {p.stem for p in NEW}
    assert {"digits_resnet_ts", "digits_resnet_dynamo", "digits_gapcnn_dynamo"} <= stems
    acts = ["leakyrelu", "prelu", "relu6", "hardtanh", "sigmoid", "tanh", "softplus", "elu",
            "gelu_erf", "gelu_tanh", "silu", "hardsigmoid", "hardswish"]  # fmt: skip
    assert {f"act_{a}_{kind}" for a in acts for kind in ("ts", "dynamo")} <= stems
    for p in NEW:
        assert p.stat().st_size <= SHIP_MAX_BYTES, p.name
        assert p.with_name(f"{p.stem}_x0.npy").is_file(), p.name


@pytest.mark.parametrize("path", NEW, ids=[p.stem for p in NEW])
def test_new_model_matches_stored_torch_output(path):
    """onnxruntime on x0 == the torch output stored at build time, within 1e-4 relative."""
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    props = {p.key: p.value for p in model.metadata_props}
    ref = np.asarray(json.loads(props["torch_output"]), dtype=np.float64)
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if path.stem.endswith("_dynamo"):
        assert props["exporter"].startswith("dynamo") and opset >= 18
    else:
        assert props["exporter"].startswith("TorchScript") and opset == 17
    x0 = np.load(path.with_name(f"{path.stem}_x0.npy"))
    y = netgen.ort_run(netgen.ort_session(path), x0).ravel()
    assert y.shape == ref.shape
    assert np.abs(y - ref).max() <= 1e-4 * np.abs(ref).max()
    assert int(y.argmax()) == int(props["x0_label"])  # trained nets: x0 is classified right


def test_tight_models_record_their_stability():
    """The tight set's metadata says how many ReLUs/windows were proven stable at eps = 1e-3."""
    tight = [p for p in NEW if p.stem.startswith("tight_")]
    assert len(tight) == 5
    for p in tight:
        props = {q.key: q.value for q in onnx.load(p).metadata_props}
        assert float(props["stable_eps"]) == 1e-3
        relus, windows = int(props["stable_relus"]), int(props["stable_maxpool_windows"])
        assert relus > 0
        assert (windows > 0) == ("MaxPool" in {n.op_type for n in onnx.load(p).graph.node})
        assert float(props["stable_min_ratio"]) > 1.01
