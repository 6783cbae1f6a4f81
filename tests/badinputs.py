"""Bad inputs for onnxlip, each written into a folder: the models, input
files and the command that must fail with one clear line (or succeed).

`make_cases(folder)` writes every file into `folder` and returns the cases;
paths in the commands are relative to `folder` (run them from there).
tests/test_errors.py runs them through the CLI and the API, and
tools/error_table.py prints them as the Markdown table of tools/ERRORS.md.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import onnxlip
from onnxlip.dataset import DatasetResult, plot_certified_accuracy, write_rows
from onnxlip.inputs import read_input
from onnxlip.sweep import plot as sweep_plot
from onnxlip.sweep import run_sweep, write_csv

OPSET = 17


@dataclass
class Case:
    """One bad input: the CLI arguments, the same through the API, and a
    substring the one-line message must contain (code 0: must succeed)."""

    name: str
    argv: list[str]
    expect: str
    api: Callable[[], object]
    code: int = 2
    in_test_cli: bool = False  # already covered by tests/test_cli.py
    argparse: bool = False  # refused by argparse (one error line, exit 2)
    api_expect: str | None = None  # what the API's message contains, when it differs

    @property
    def api_message(self) -> str:
        return self.expect if self.api_expect is None else self.api_expect


# ----------------------------------------------------------------------------- model helpers


def vi(name: str, shape, elem: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def const(name: str, value) -> onnx.TensorProto:
    value = np.asarray(value)
    if value.dtype.kind == "f":
        value = value.astype(np.float32)
    return numpy_helper.from_array(value, name)


def model(nodes: list, inputs: list, outputs: list, inits=(), opset: int = OPSET) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "bad", inputs, outputs, list(inits))
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def save(folder: Path, name: str, m: onnx.ModelProto) -> str:
    """Save without any check (bad models are the point) and return the file name."""
    (folder / name).write_bytes(m.SerializeToString())
    return name


def dense(weight=None, bias=None, alpha: float = 1.0, shape=(1, 3)) -> onnx.ModelProto:
    """x (1, 3) -> Gemm 'fc' -> Relu -> y (1, 4)."""
    w = np.arange(12, dtype=np.float32).reshape(4, 3) / 10 if weight is None else weight
    inits = [const("W", w)] + ([const("B", bias)] if bias is not None else [])
    nodes = [helper.make_node("Gemm", ["x", "W"] + (["B"] if bias is not None else []), ["h"],
                              transB=1, alpha=alpha, name="fc"),
             helper.make_node("Relu", ["h"], ["y"], name="act")]
    return model(nodes, [vi("x", list(shape))], [vi("y", [1, 4])], inits)


def conv(kernel=None, pads=(0, 0, 0, 0), strides=(1, 1), in_shape=(1, 1, 5, 5), out_shape=None):
    """x -> Conv 'conv' (2 output channels, 3x3) -> Relu -> y."""
    k = np.ones((2, in_shape[1], 3, 3), np.float32) / 9 if kernel is None else kernel
    out_shape = out_shape or [1, 2, None, None]
    nodes = [helper.make_node("Conv", ["x", "K"], ["h"], kernel_shape=[3, 3], pads=list(pads),
                              strides=list(strides), name="conv"),
             helper.make_node("Relu", ["h"], ["y"], name="act")]
    return model(nodes, [vi("x", list(in_shape))], [vi("y", out_shape)], [const("K", k)])


def _nan(shape, where=0, value=np.nan) -> np.ndarray:
    a = np.ones(shape, np.float32)
    a.flat[where] = value
    return a


def _external(folder: Path, name: str, location: str, write_data: bool = True) -> str:
    """The dense model with its weight W stored as external data at `location`."""
    m = dense()
    w = next(t for t in m.graph.initializer if t.name == "W")
    data = numpy_helper.to_array(w).tobytes()
    if write_data:
        (folder / "weights.bin").write_bytes(data)
    w.ClearField("raw_data")
    w.ClearField("float_data")
    w.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(len(data)))):
        entry = w.external_data.add()
        entry.key, entry.value = key, value
    return save(folder, name, m)


# ----------------------------------------------------------------------------- the cases


def make_cases(folder: Path) -> list[Case]:
    """Write every bad file into `folder`; return the cases (paths relative to it)."""
    folder = Path(folder)
    f = folder
    cases: list[Case] = []

    def add(name, argv, expect, api, **kw):
        cases.append(Case(name, [str(a) for a in argv], expect, api, **kw))

    good = save(f, "good.onnx", dense())
    np.save(f / "x.npy", np.ones((1, 3), np.float32))
    np.save(f / "x_conv.npy", np.ones((1, 1, 5, 5), np.float32))

    def load(path, **kw):
        return lambda: onnxlip.load(path, **kw)

    def bound(path, x, eps=0.1, **kw):
        return lambda: onnxlip.load(path, **kw).local_bound(read_input(x), eps)

    # --- files that are not ONNX models
    add("model path does not exist", ["inspect", "missing.onnx"], "no such file",
        load("missing.onnx"), in_test_cli=True)
    (f / "folder.onnx").mkdir(exist_ok=True)
    add("model path is a directory", ["inspect", "folder.onnx"], "is a directory", load("folder.onnx"))
    (f / "junk.onnx").write_bytes(b"this is not a protobuf \x00\xff" * 10)
    add("file that is not ONNX", ["inspect", "junk.onnx"], "not a readable ONNX model",
        load("junk.onnx"), in_test_cli=True)
    (f / "empty.onnx").write_bytes(b"")
    add("empty file", ["inspect", "empty.onnx"], "has no nodes", load("empty.onnx"))
    raw = dense().SerializeToString()
    (f / "truncated.onnx").write_bytes(raw[: len(raw) // 2])
    add("truncated protobuf", ["inspect", "truncated.onnx"], "not a readable ONNX model",
        load("truncated.onnx"))
    corrupt = bytearray(raw)
    corrupt[3] ^= 0xFF
    (f / "corrupt.onnx").write_bytes(bytes(corrupt))
    add("corrupted protobuf (one byte flipped)", ["inspect", "corrupt.onnx"],
        "not a readable ONNX model", load("corrupt.onnx"))

    # --- models the ONNX checker or shape inference refuses
    m = dense()
    m.graph.node[1].input[0] = "nowhere"
    add("fails the ONNX checker (undefined tensor)", ["inspect", save(f, "checker.onnx", m)],
        "fails the ONNX checker", load("checker.onnx"))
    cyc = model([helper.make_node("Relu", ["y"], ["h"], name="act"),
                 helper.make_node("Relu", ["h"], ["y"], name="act2")], [vi("x", [1, 3])],
                [vi("y", [1, 3])])
    add("graph with a cycle", ["inspect", save(f, "cycle.onnx", cyc)], "fails the ONNX checker",
        load("cycle.onnx"))
    m = dense()
    next(a for a in m.graph.node[0].attribute if a.name == "transB").type = onnx.AttributeProto.FLOAT
    add("attribute of the wrong type (transB as float)", ["inspect", save(f, "attrtype.onnx", m)],
        "fails the ONNX checker", load("attrtype.onnx"))
    m = dense()
    m.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 5
    add("declared output shape contradicts the weights", ["inspect", save(f, "shape.onnx", m)],
        "shape inference failed", load("shape.onnx"))
    m = model([helper.make_node("Gemm", ["x", "W"], ["y"], transB=1, name="fc")],
              [vi("x", [1, 3])], [vi("y", [1, 4])], [const("W", np.ones((4, 5)))])
    add("weight shape does not fit the input", ["inspect", save(f, "mismatch.onnx", m)],
        "shape inference failed", load("mismatch.onnx"))

    # --- graphs onnxlip does not handle
    m = dense()
    m.graph.node.append(helper.make_node("Softsign", ["y"], ["s"], name="squash"))
    m.graph.output[0].name = "s"
    add("unsupported op (names node and op)", ["inspect", save(f, "softsign.onnx", m)],
        "'squash' (Softsign)", load("softsign.onnx"), in_test_cli=True)
    m = dense()
    m.graph.node[1].op_type = "Selu"
    add("unsupported op in the middle of the chain", ["inspect", save(f, "selu.onnx", m)],
        "node 'act' (Selu): op Selu is not supported", load("selu.onnx"))
    m = dense()
    m.graph.node.append(helper.make_node("Mul", ["h", "y"], ["s"], name="gate"))
    m.graph.output[0].name = "s"
    add("product of two computed tensors (not affine)", ["inspect", save(f, "product.onnx", m)],
        "node 'gate' (Mul): combines 2 computed tensors, which is not affine", load("product.onnx"),
        in_test_cli=True)
    m = dense()
    m.graph.initializer.append(const("W1", np.ones((1, 3), np.float32)))
    m.graph.node.append(helper.make_node("Gemm", ["x", "W1"], ["z"], transB=1, name="fc1"))
    m.graph.node.append(helper.make_node("Add", ["y", "z"], ["s"], name="skip"))
    m.graph.output[0].name = "s"
    add("residual Add broadcasting computed tensors", ["inspect", save(f, "skipshape.onnx", m)],
        "node 'skip' (Add): adds computed tensors of different shapes [(1, 4), (1, 1)]",
        load("skipshape.onnx"))
    m = model([helper.make_node("Transpose", ["x"], ["t"], perm=[2, 1, 0, 3], name="swap"),
               helper.make_node("MaxPool", ["t"], ["y"], kernel_shape=[1, 2], name="pool")],
              [vi("x", [1, 1, 5, 5])], [vi("y", [5, 1, 1, 4])])
    add("Transpose moves the batch axis before a pooling", ["inspect", save(f, "batchaxis.onnx", m)],
        "node 'pool' (MaxPool): input shape (5, 1, 1, 5) has batch 5; only batch 1 is bounded",
        load("batchaxis.onnx"))
    then = helper.make_graph([helper.make_node("Identity", ["x"], ["t"])], "then", [],
                             [vi("t", [1, 3])])
    m = model([helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=then, name="if")],
              [vi("x", [1, 3])], [vi("y", [1, 3])], [const("c", np.array(True))])
    add("control flow (If)", ["inspect", save(f, "if.onnx", m)], "control flow", load("if.onnx"))
    m = model([helper.make_node("Relu", ["x"], ["y"], name="act", domain="com.example")],
              [vi("x", [1, 3])], [vi("y", [1, 3])])
    m.opset_import.append(helper.make_opsetid("com.example", 1))
    add("op from a custom domain", ["inspect", save(f, "domain.onnx", m)],
        "node 'act' (Relu): op Relu of domain 'com.example' is not supported", load("domain.onnx"))

    # --- several inputs or outputs
    two_out = dense()
    two_out.graph.node.append(helper.make_node("Gemm", ["y", "W2"], ["logits"], transB=1, name="fc2"))
    two_out.graph.node.append(helper.make_node("Softmax", ["logits"], ["probs"], name="softmax"))
    two_out.graph.initializer.append(const("W2", np.eye(4)))
    del two_out.graph.output[:]
    two_out.graph.output.extend([vi("logits", [1, 4]), vi("probs", [1, 4])])
    save(f, "two_outputs.onnx", two_out)
    add("two outputs, no --output-name", ["inspect", "two_outputs.onnx"],
        "2 outputs ['logits', 'probs']; choose one with --output-name", load("two_outputs.onnx"))
    add("two outputs, --output-name logits", ["inspect", "two_outputs.onnx", "--output-name", "logits"],
        "", load("two_outputs.onnx", output_name="logits"), code=0)
    add("two outputs, --output-name probs (the softmax head: its logits are bounded)",
        ["inspect", "two_outputs.onnx", "--output-name", "probs"],
        "", load("two_outputs.onnx", output_name="probs"), code=0)
    add("--output-name that does not exist", ["inspect", "two_outputs.onnx", "--output-name", "z"],
        "no graph output named 'z'", load("two_outputs.onnx", output_name="z"))
    m = dense()
    m.graph.node.append(helper.make_node("Softmax", ["h"], ["aux"], name="aux_head"))
    m.graph.output.append(vi("aux", [1, 4]))
    add("an output that branches off mid-chain, --output-name y",
        ["inspect", save(f, "aux_head.onnx", m), "--output-name", "y"], "",
        load("aux_head.onnx", output_name="y"), code=0)
    m = dense()
    m.graph.input.append(vi("bias", [1, 4]))
    m.graph.node[1].input[0] = "h2"
    m.graph.node.insert(1, helper.make_node("Add", ["h", "bias"], ["h2"], name="add_input"))
    save(f, "two_inputs.onnx", m)
    add("two inputs, no --input-name", ["inspect", "two_inputs.onnx"],
        "2 inputs ['x', 'bias']; choose one with --input-name", load("two_inputs.onnx"))
    add("two inputs, --input-name x, both used", ["inspect", "two_inputs.onnx", "--input-name", "x"],
        "node 'add_input' (Add) reads tensor 'bias', which is neither the input 'x' nor computed "
        "from it", load("two_inputs.onnx", input_name="x"))
    add("--input-name that does not exist", ["inspect", "two_inputs.onnx", "--input-name", "z"],
        "no graph input named 'z'", load("two_inputs.onnx", input_name="z"))

    # --- input shapes
    sym = model([helper.make_node("Relu", ["x"], ["y"], name="act")], [vi("x", [1, "features"])],
                [vi("y", [1, "features"])])
    save(f, "symbolic.onnx", sym)
    add("symbolic dim without --input-shape", ["inspect", "symbolic.onnx"], "--input-shape",
        load("symbolic.onnx"), in_test_cli=True)
    add("--input-shape of the wrong rank", ["inspect", "symbolic.onnx", "--input-shape", "1,3,4"],
        "has rank 3, input 'x' has rank 2", load("symbolic.onnx", input_shape=(1, 3, 4)))
    batch = model([helper.make_node("Relu", ["x"], ["y"], name="act")], [vi("x", ["N", 3])],
                  [vi("y", ["N", 3])])
    add("--input-shape with batch 2", ["inspect", save(f, "batch_n.onnx", batch), "--input-shape",
                                       "2,3"],
        "batch dimension must be 1", load("batch_n.onnx", input_shape=(2, 3)))
    add("--input-shape contradicting a fixed dim", ["inspect", good, "--input-shape", "1,5"],
        "disagrees with input 'x' in dim 1 (3)", load(good, input_shape=(1, 5)))
    add("--input-shape with a zero", ["inspect", "symbolic.onnx", "--input-shape", "1,0"],
        "every dimension must be positive", load("symbolic.onnx", input_shape=(1, 0)))
    m = dense(shape=(4, 3))
    m.graph.output[0].type.tensor_type.shape.dim[0].dim_value = 4
    add("declared batch of 4", ["inspect", save(f, "batch4.onnx", m)], "only batch 1 is bounded",
        load("batch4.onnx"))
    m = model([helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT, name="cast")],
              [vi("x", [1, 3], TensorProto.INT64)], [vi("y", [1, 3])])
    add("integer input", ["inspect", save(f, "int_input.onnx", m)],
        "input 'x' has element type INT64", load("int_input.onnx"))

    # --- input files
    np.save(f / "x5.npy", np.ones((1, 5), np.float32))
    add("input size does not match", ["bound", good, "-x", "x5.npy", "-e", "0.1"], "(1, 5)",
        bound(good, "x5.npy"), in_test_cli=True)
    np.save(f / "nan.npy", _nan((1, 3)))
    add("NaN in the input", ["bound", good, "-x", "nan.npy", "-e", "0.1"], "NaN",
        bound(good, "nan.npy"), in_test_cli=True)
    np.save(f / "inf.npy", _nan((1, 3), 2, -np.inf))
    add("Inf in the input", ["bound", good, "-x", "inf.npy", "-e", "0.1"],
        "input contains NaN or Inf", bound(good, "inf.npy"))
    np.save(f / "bool.npy", np.ones((1, 3), bool))
    add("input of dtype bool", ["bound", good, "-x", "bool.npy", "-e", "0.1"],
        "input has dtype bool", bound(good, "bool.npy"))
    np.save(f / "objects.npy", np.array([[1.0, None, "x"]], dtype=object), allow_pickle=True)
    add("pickled object array (.npy)", ["bound", good, "-x", "objects.npy", "-e", "0.1"],
        "holds Python objects", bound(good, "objects.npy"))
    np.savez(f / "objects.npz", x=np.array([[1.0, None, 2.0]], dtype=object))
    add("pickled object array (.npz)", ["bound", good, "-x", "objects.npz", "-e", "0.1"],
        "holds Python objects", bound(good, "objects.npz"))
    np.savez(f / "two.npz", a=np.ones((1, 3)), b=np.ones((1, 3)))
    add(".npz with two arrays", ["bound", good, "-x", "two.npz", "-e", "0.1"],
        "holds 2 arrays ['a', 'b']; expected exactly one", bound(good, "two.npz"))
    (f / "truncated.npy").write_bytes((f / "x.npy").read_bytes()[:-4])
    add("truncated .npy", ["bound", good, "-x", "truncated.npy", "-e", "0.1"],
        "not a readable .npy array", bound(good, "truncated.npy"))
    header = np.lib.format
    with open(f / "huge.npy", "wb") as stream:
        header.write_array_header_1_0(stream, {"descr": "<f8", "fortran_order": False,
                                               "shape": (1, 10**12)})
    add(".npy declaring 10^12 elements", ["bound", good, "-x", "huge.npy", "-e", "0.1"],
        "is too large", bound(good, "huge.npy"))
    tensor = numpy_helper.from_array(np.ones((1, 3), np.float32))
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", "/etc/hostname"
    (f / "external.pb").write_bytes(tensor.SerializeToString())
    add(".pb tensor pointing to external data", ["bound", good, "-x", "external.pb", "-e", "0.1"],
        "refers to external data; refused", bound(good, "external.pb"))
    add("input file does not exist", ["bound", good, "-x", "none.npy", "-e", "0.1"], "none.npy",
        bound(good, "none.npy"), in_test_cli=True)
    add("unknown input format", ["bound", good, "-x", "junk.onnx", "-e", "0.1"],
        "unknown input format", bound(good, "junk.onnx"), in_test_cli=True)

    np.save(f / "batch5.npy", np.ones((5, 3), np.float32))
    add("a batch of 5 inputs passed to bound -x", ["bound", good, "-x", "batch5.npy", "-e", "0.1"],
        "batch5.npy: input of shape (5, 3) does not match the model's input (1, 3); it holds 5 "
        "inputs: a bound takes one, 'onnxlip certify --inputs FILE' takes a batch",
        bound(good, "batch5.npy"), api_expect="'onnxlip certify --inputs FILE' takes a batch")

    # --- output files: refused before any work
    sweep = ["sweep", good, "-x", "x.npy", "-n", "2"]
    add("--plot in a folder that does not exist", sweep + ["--plot", "nowhere/p.png"],
        "--plot nowhere/p.png: no such directory 'nowhere'", write_sweep(good, plot="nowhere/p.png"),
        api_expect="plot nowhere/p.png: no such directory 'nowhere'")
    add("--plot of a format matplotlib does not write", sweep + ["--plot", "p.xyz"],
        "--plot p.xyz: format '.xyz'; use a format matplotlib writes",
        write_sweep(good, plot="p.xyz"), api_expect="plot p.xyz: format '.xyz'")
    add("--csv in a folder that does not exist", sweep + ["--csv", "nowhere/t.csv"],
        "--csv nowhere/t.csv: no such directory", write_sweep(good, csv="nowhere/t.csv"),
        api_expect="CSV file nowhere/t.csv: no such directory")
    add("--csv that is a directory", sweep + ["--csv", "folder.onnx"],
        "--csv folder.onnx: is a directory", write_sweep(good, csv="folder.onnx"),
        api_expect="CSV file folder.onnx: is a directory")
    np.savez(f / "batch.npz", x=np.ones((2, 3), np.float32), y=np.array([0, 1]))
    certify = ["certify", good, "--inputs", "batch.npz"]
    add("--out of an unknown format", certify + ["--out", "rows.txt"],
        "--out rows.txt: format '.txt'; use one of .csv, .json", write_dataset(rows="rows.txt"),
        api_expect="rows file rows.txt: format '.txt'; use one of .csv, .json")
    add("--out under a file, not a folder", certify + ["--out", "x.npy/rows.csv"],
        "--out x.npy/rows.csv: no such directory 'x.npy'", write_dataset(rows="x.npy/rows.csv"),
        api_expect="rows file x.npy/rows.csv: no such directory 'x.npy'")
    add("certify --plot without a file suffix", certify + ["--plot", "plot"],
        "--plot plot: no file suffix", write_dataset(plot="plot"),
        api_expect="plot plot: no file suffix")

    add("certify --rel-tol 0", ["certify", good, "-x", "x.npy", "--rel-tol", "0"],
        "argument --rel-tol: '0' is not a finite number > 0",
        lambda: onnxlip.load(good).certify(np.ones((1, 3)), rel_tol=0.0), argparse=True,
        api_expect="rel_tol must be a finite number > 0, got 0.0")
    add("certify --rel-tol NaN", ["certify", good, "-x", "x.npy", "--rel-tol", "nan"],
        "argument --rel-tol: 'nan' is not a finite number > 0",
        lambda: onnxlip.load(good).certify(np.ones((1, 3)), rel_tol=float("nan")), argparse=True,
        api_expect="rel_tol must be a finite number > 0, got nan")

    # --- radii
    add("eps = 0", ["bound", good, "-x", "x.npy", "-e", "0"], "eps", bound(good, "x.npy", 0.0),
        in_test_cli=True)
    add("eps < 0", ["bound", good, "-x", "x.npy", "-e", "-1"],
        "eps must be a positive finite number, got -1.0", bound(good, "x.npy", -1.0))
    add("eps = NaN", ["bound", good, "-x", "x.npy", "-e", "nan"],
        "eps must be a positive finite number, got nan", bound(good, "x.npy", float("nan")))
    add("eps = Inf", ["bound", good, "-x", "x.npy", "-e", "inf"], "eps",
        bound(good, "x.npy", float("inf")), in_test_cli=True)
    add("eps = 0 among good radii", ["bound", good, "-x", "x.npy", "-e", "0.1", "0"], "got 0.0",
        lambda: onnxlip.load(good).local_bounds(np.ones((1, 3)), [0.1, 0.0]))
    add("eps that is not a number", ["bound", good, "-x", "x.npy", "-e", "abc"],
        "argument --eps/-e: 'abc' is not a number", bound(good, "x.npy", "abc"), argparse=True,
        api_expect="eps 'abc' is not a number")
    add("--input-shape that is not a shape", ["inspect", good, "--input-shape", "1,a"],
        "'1,a' is not a shape like 1,3,32,32", lambda: onnxlip.load(good, input_shape=("1", "a")),
        argparse=True, api_expect="--input-shape ('1', 'a') is not a list of integers")
    add("--tol 0", ["inspect", good, "--tol", "0"], "tol must be a positive finite number",
        load(good, tol=0.0))
    add("--memory-budget 0", ["inspect", good, "--memory-budget", "0"],
        "memory budget must be a positive finite number", load(good, memory_budget=0))
    add("--budget -1", ["bound", good, "-x", "x.npy", "-e", "0.1", "--budget", "-1"],
        "argument --budget: '-1' is not a finite number of seconds >= 0", load(good, time_budget=-1),
        argparse=True, api_expect="time budget (seconds) must be a non-negative finite number, got -1")

    # --- NaN / Inf / huge weights, named by node
    k = _nan((2, 1, 3, 3), 4)
    add("NaN in a Conv kernel", ["inspect", save(f, "nan_conv.onnx", conv(k, out_shape=[1, 2, 3, 3]))],
        "node 'conv' (Conv): kernel contains NaN or Inf", load("nan_conv.onnx"))
    add("Inf in a Gemm bias", ["inspect", save(f, "inf_gemm.onnx", dense(bias=_nan(4, 1, np.inf)))],
        "node 'fc' (Gemm): bias C contains NaN or Inf", load("inf_gemm.onnx"))
    add("NaN in a Gemm weight", ["inspect", save(f, "nan_gemm.onnx", dense(weight=_nan((4, 3), 5)))],
        "node 'fc' (Gemm): matrix B contains NaN or Inf", load("nan_gemm.onnx"))
    add("NaN Gemm alpha", ["inspect", save(f, "nan_alpha.onnx", dense(alpha=float("nan")))],
        "node 'fc' (Gemm): attribute alpha=nan is not a finite number", load("nan_alpha.onnx"))
    bn = model([helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], name="bn")],
               [vi("x", [1, 3, 2, 2])], [vi("y", [1, 3, 2, 2])],
               [const("s", np.ones(3)), const("b", np.zeros(3)), const("m", np.zeros(3)),
                const("v", _nan(3, 1))])
    add("NaN in a BatchNormalization variance", ["inspect", save(f, "nan_bn.onnx", bn)],
        "node 'bn' (BatchNormalization): var contains NaN or Inf", load("nan_bn.onnx"))
    add_model = model([helper.make_node("Add", ["x", "c"], ["y"], name="shift")], [vi("x", [1, 3])],
                      [vi("y", [1, 3])], [const("c", _nan(3, 2))])
    add("NaN in an Add constant", ["inspect", save(f, "nan_add.onnx", add_model)],
        "node 'shift' (Add): constant operand contains NaN or Inf", load("nan_add.onnx"))
    folded = model([helper.make_node("Div", ["one", "zero"], ["c"], name="make_inf"),
                    helper.make_node("Mul", ["x", "c"], ["y"], name="scale")],
                   [vi("x", [1, 3])], [vi("y", [1, 3])],
                   [const("one", np.ones(3)), const("zero", np.zeros(3))])
    add("Inf made by constant folding (1/0)", ["inspect", save(f, "folded_inf.onnx", folded)],
        "node 'scale' (Mul): constant operand contains NaN or Inf", load("folded_inf.onnx"))
    add("Conv kernel beyond float32 range",
        ["inspect", save(f, "big_conv.onnx", conv(_nan((2, 1, 3, 3), 0, 1e30),
                                                   out_shape=[1, 2, 3, 3]))],
        "node 'conv' (Conv): kernel has values of magnitude above 1e19", load("big_conv.onnx"))
    add("Gemm weight whose norm exceeds 1e18",
        ["inspect", save(f, "big_gemm.onnx", dense(weight=np.full((4, 3), 3e17, np.float32)))],
        "block 'fc' (Gemm+Relu): its weights are too large for floating-point arithmetic "
        "(norm up to 1.04e+18", load("big_gemm.onnx"))
    residual = model([helper.make_node("Gemm", ["x", "A"], ["h"], transB=1, name="fc1"),
                      helper.make_node("Relu", ["h"], ["r"], name="act1"),
                      helper.make_node("Gemm", ["r", "B"], ["g"], transB=1, name="fc2"),
                      helper.make_node("Add", ["g", "r"], ["s"], name="residual"),
                      helper.make_node("Relu", ["s"], ["y"], name="act2")],
                     [vi("x", [1, 3])], [vi("y", [1, 3])],
                     [const("A", np.eye(3)), const("B", np.full((3, 3), 1e18))])
    add("residual block (two inputs) whose weights exceed 1e18",
        ["inspect", save(f, "big_residual.onnx", residual)],
        "block 'fc2' (Gemm+Add+Relu): its weights are too large for floating-point arithmetic",
        load("big_residual.onnx"))
    add("Gemm bias of 1e19", ["inspect", save(f, "big_bias.onnx", dense(bias=np.full(4, 1e19, np.float32)))],
        "block 'fc' (Gemm+Relu): its bias reaches 1e+19, beyond the 1e+18", load("big_bias.onnx"))

    # --- too large for memory: refused before allocating
    big = conv(in_shape=(1, 3, 100000, 100000), kernel=np.ones((2, 3, 3, 3), np.float32),
               out_shape=[1, 2, 99998, 99998])
    add("Conv declared on a 1x3x100000x100000 input", ["inspect", save(f, "huge_conv.onnx", big)],
        "input 'x' shape (1, 3, 100000, 100000) has 30,000,000,000 elements", load("huge_conv.onnx"))
    pads = conv(pads=(40000, 40000, 40000, 40000), out_shape=[1, 2, 80003, 80003])
    add("Conv with pads of 40000", ["inspect", save(f, "huge_pads.onnx", pads)],
        "node 'conv' (Conv): padded input shape (1, 80005, 80005)", load("huge_pads.onnx"))
    gen = model([helper.make_node("ConstantOfShape", ["s"], ["W"], name="make_weight",
                                  value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])),
                 helper.make_node("Gemm", ["x", "W"], ["y"], name="fc")],
                [vi("x", [1, 100000])], [vi("y", [1, 100000])],
                [const("s", np.array([100000, 100000], np.int64))])
    add("Gemm on a generated 100000x100000 weight", ["inspect", save(f, "huge_gemm.onnx", gen)],
        "constant node 'make_weight' (ConstantOfShape): output shape (100000, 100000)",
        load("huge_gemm.onnx"))
    pad = model([helper.make_node("Pad", ["x", "p"], ["y"], name="pad")], [vi("x", [1, 3])],
                [vi("y", [1, 3 + 2 * 10**9])], [const("p", np.array([0, 10**9, 0, 10**9]))])
    add("Pad by 10^9 on each side", ["inspect", save(f, "huge_pad.onnx", pad)],
        "node 'pad' (Pad): output shape (1, 2000000003)", load("huge_pad.onnx"))
    wide = dense(shape=(1, 10**9))
    add("Gemm declared on a 1x10^9 input", ["inspect", save(f, "huge_input.onnx", wide)],
        "input 'x' shape (1, 1000000000)", load("huge_input.onnx"))

    # --- spatial attributes
    add("Conv with zero strides", ["inspect", save(f, "zero_strides.onnx", conv(strides=(0, 1)))],
        "zero_strides.onnx", load("zero_strides.onnx"))
    add("Conv with negative pads", ["inspect", save(f, "neg_pads.onnx", conv(pads=(-1, 0, 0, 0)))],
        "neg_pads.onnx", load("neg_pads.onnx"))
    add("Conv kernel larger than the input", ["inspect", save(f, "small_in.onnx",
                                                              conv(in_shape=(1, 1, 2, 2)))],
        "small_in.onnx", load("small_in.onnx"))

    # --- external data
    add("external-data weights whose file is missing",
        ["inspect", _external(f, "ext_missing.onnx", "nowhere.bin")],
        "external data file 'nowhere.bin' of tensor 'W' is missing", load("ext_missing.onnx"))
    add("external data at an absolute path", ["inspect", _external(f, "ext_abs.onnx", "/etc/hostname")],
        "tensor 'W' points outside the model's folder ('/etc/hostname'); refused",
        load("ext_abs.onnx"))
    add("external data escaping with ../", ["inspect", _external(f, "ext_up.onnx", "../weights.bin")],
        "points outside the model's folder ('../weights.bin'); refused", load("ext_up.onnx"))
    link = f / "link.bin"
    if not link.is_symlink():
        with contextlib.suppress(OSError):
            os.symlink("/etc/hostname", link)
    add("external data through a symlink that leaves the folder",
        ["inspect", _external(f, "ext_link.onnx", "link.bin")],
        "points outside the model's folder ('link.bin'); refused", load("ext_link.onnx"))
    add("external data length beyond the file",
        ["inspect", _external_length(f, "ext_length.onnx")], "cannot read external data",
        load("ext_length.onnx"))
    add("external data in the model's folder (fine)", ["inspect", _external(f, "ext_ok.onnx",
                                                                            "weights.bin")],
        "", load("ext_ok.onnx"), code=0)

    # --- layer forms (issue 12): unnamed nodes are named by their output
    m = model([helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Hardmax", ["r"], ["hm"]),
               helper.make_node("Relu", ["hm"], ["y"])], [vi("x", [1, 3])], [vi("y", [1, 3])])
    add("unsupported op on an unnamed node (named by its output)",
        ["inspect", save(f, "unnamed.onnx", m)],
        "node 'hm' (Hardmax): op Hardmax is not supported (supported: ", load("unnamed.onnx"))
    m = dense()
    m.graph.node.append(helper.make_node("Softmax", ["y"], ["p"], name="mid_softmax"))
    m.graph.node.append(helper.make_node("Relu", ["p"], ["z"], name="after"))
    m.graph.output[0].name = "z"
    add("Softmax inside the network", ["inspect", save(f, "mid_softmax.onnx", m)],
        "node 'mid_softmax' (Softmax): op Softmax is supported only as the last node",
        load("mid_softmax.onnx"))
    m = model([helper.make_node("Reshape", ["x", "s"], ["m"], name="rows"),
               helper.make_node("Softmax", ["m"], ["y"], axis=-1, name="sm")],
              [vi("x", [1, 4])], [vi("y", [1, 2, 2])], [const("s", np.array([1, 2, 2]))], opset=13)
    add("Softmax at the output over each row separately", ["inspect", save(f, "row_softmax.onnx", m)],
        "node 'sm' (Softmax) at the output normalizes axis 2 of shape (1, 2, 2) separately",
        load("row_softmax.onnx"))
    m = model([helper.make_node("MatMul", ["x", "B"], ["y"], name="mm")], [vi("x", [1, 4])],
              [vi("y", [2, 1, 5])], [const("B", np.ones((2, 4, 5)))])
    add("MatMul with a stacked (3-D) constant", ["inspect", save(f, "matmul3d.onnx", m)],
        "node 'mm' (MatMul): matrix of shape (2, 4, 5) is not a matrix or a vector",
        load("matmul3d.onnx"))
    for name, attrs, message in [
        ("an output_shape beyond its reach", dict(output_shape=[6, 6]),
         "output_shape [6, 6] does not fit the input shape (1, 1, 3, 3) (at most [5, 5])"),
        ("output_padding of a stride", dict(strides=[2, 2], output_padding=[2, 0]),
         "output_padding [2, 0] must be below the strides or dilations"),
    ]:
        m = model([helper.make_node("ConvTranspose", ["x", "K"], ["y"], name="up", **attrs)],
                  [vi("x", [1, 1, 3, 3])], [vi("y", [1, 2, "h", "w"])],
                  [const("K", np.ones((1, 2, 3, 3)))])
        file = f"convt_{name.split()[-1]}.onnx"
        add(f"ConvTranspose with {name}", ["inspect", save(f, file, m)],
            f"node 'up' (ConvTranspose): {message}", load(file))
    m = model([helper.make_node("Pad", ["x", "p"], ["y"], mode="reflect", name="pad")],
              [vi("x", [1, 3])], [vi("y", [1, 9])], [const("p", np.array([0, 3, 0, 3]))])
    add("reflect Pad wider than the input", ["inspect", save(f, "reflect_wide.onnx", m)],
        "node 'pad' (Pad): reflect pads [0, 3, 0, 3] are too wide for input shape (1, 3)",
        load("reflect_wide.onnx"))
    m = model([helper.make_node("MatMul", ["W", "x"], ["y"])], [vi("x", ["n"])], [vi("y", [2])],
              [const("W", np.ones((2, 3)))])
    add("vector input with a symbolic length", ["inspect", save(f, "vector_sym.onnx", m)],
        "input 'x' has symbolic dimension 0 (n); give the shape with --input-shape",
        load("vector_sym.onnx"))
    m = model([helper.make_node("Split", ["x"], ["y", "b", "c"], axis=1, num_outputs=1,
                                name="split")], [vi("x", [1, 6])], [vi("y", [1, 2])], opset=18)
    add("Split whose num_outputs disagrees with its outputs", ["inspect", save(f, "split_n.onnx", m)],
        "node 'split' (Split): num_outputs=1 but it has 3 outputs", load("split_n.onnx"))
    add("vector input with its length given (fine)",
        ["inspect", "vector_sym.onnx", "--input-shape", "3"], "",
        load("vector_sym.onnx", input_shape=(3,)), code=0)
    return cases


def write_sweep(model_path: str, csv: str | None = None, plot: str | None = None):
    """A sweep through the API, written to `csv` / `plot`."""
    def run():
        net = onnxlip.load(model_path)
        result = run_sweep(net, np.ones(3), [0.1], lower=False)
        if csv is not None:
            write_csv(result, csv)
        if plot is not None:
            sweep_plot(result, plot)
    return run


def write_dataset(rows: str | None = None, plot: str | None = None):
    """A dataset result through the API (no inputs needed), written to `rows` / `plot`."""
    def run():
        result = DatasetResult([], 0.0)
        if rows is not None:
            write_rows(result, rows)
        if plot is not None:
            plot_certified_accuracy(result, plot, "title")
    return run


def _external_length(folder: Path, name: str) -> str:
    path = _external(folder, name, "weights.bin")
    m = onnx.load(str(folder / path), load_external_data=False)
    w = next(t for t in m.graph.initializer if t.name == "W")
    next(e for e in w.external_data if e.key == "length").value = "4096"
    return save(folder, name, m)
