"""Write the corpus of nasty models that tests/test_fuzz.py loads: tests/corpus/.

Each file is a few KB at most and must end in onnxlip.OnnxlipError (or, for
the few marked "ok", load) quickly, without a crash, a hang or a large
allocation. MANIFEST.json records what each file is and the expected outcome.
The output is deterministic.

    python tools/make_corpus.py              # writes tests/corpus/
    python tools/make_corpus.py --out DIR
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from fuzzing import seed_models  # noqa: E402


def vi(name: str, shape, elem: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def const_node(name: str, value) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], name=f"make_{name}",
                            value=numpy_helper.from_array(np.asarray(value), f"{name}_value"))


def model(nodes: list, inits=(), x=(1, 3), y=(1, 3), opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "nasty", [vi("x", list(x))], [vi("y", list(y))], list(inits))
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def use(tensor: str) -> list[onnx.NodeProto]:
    """Make the data path depend on a constant tensor (so that it gets folded)."""
    return [helper.make_node("ReduceMax", [tensor], ["m"], keepdims=0, name="reduce"),
            helper.make_node("Add", ["x", "m"], ["y"], name="add")]


def external(location: str, offset: str = "0", length: str = "48") -> onnx.ModelProto:
    w = numpy_helper.from_array(np.ones((4, 3), np.float32), "W")
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", offset), ("length", length)):
        e = w.external_data.add()
        e.key, e.value = key, value
    return model([helper.make_node("Gemm", ["x", "W"], ["y"], transB=1, name="fc")], [w], y=(1, 4))


def loop_forever() -> onnx.ModelProto:
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Identity", ["v_in"], ["v_out"])],
        "body", [vi("i", [], TensorProto.INT64), vi("cond_in", [], TensorProto.BOOL), vi("v_in", [1])],
        [vi("cond_out", [], TensorProto.BOOL), vi("v_out", [1])])
    nodes = [const_node("trips", np.array(2**62, np.int64)), const_node("cond", np.array(True)),
             const_node("v0", np.ones(1, np.float32)),
             helper.make_node("Loop", ["trips", "cond", "v0"], ["v"], body=body, name="loop")]
    return model(nodes + use("v"))


def cases() -> dict[str, tuple[str, str, bytes]]:
    """file name -> (what it is, expected outcome, bytes)."""
    seeds = seed_models()
    good = seeds["exporter_like"]
    n = helper.make_node
    out: dict[str, tuple[str, str, object]] = {}

    out["truncated.onnx"] = ("a valid model cut in half", "error", good[: len(good) // 2])
    flipped = bytearray(good)
    for i in (5, 77, 301, 702):
        flipped[i] ^= 0x5A
    out["bit_flips.onnx"] = ("a valid model with four bytes flipped", "error", bytes(flipped))
    out["random_bytes.onnx"] = ("2 KB of random bytes", "error",
                                np.random.default_rng(0).integers(0, 256, 2048, np.uint8).tobytes())
    out["empty_graph.onnx"] = ("a model without nodes", "error", model([]))
    out["cycle.onnx"] = ("two nodes reading each other's output", "error", model(
        [n("Relu", ["y"], ["h"], name="a"), n("Relu", ["h"], ["y"], name="b")]))
    out["huge_input.onnx"] = ("Conv declared on a 1x3x100000x100000 input", "error", model(
        [n("Conv", ["x", "K"], ["y"], kernel_shape=[3, 3], name="conv")],
        [numpy_helper.from_array(np.ones((2, 3, 3, 3), np.float32), "K")],
        x=(1, 3, 100000, 100000), y=(1, 2, 99998, 99998)))
    out["huge_pads.onnx"] = ("Conv with pads of 30000 on a 1x1x5x5 input", "error", model(
        [n("Conv", ["x", "K"], ["y"], kernel_shape=[3, 3], pads=[30000] * 4, name="conv")],
        [numpy_helper.from_array(np.ones((2, 1, 3, 3), np.float32), "K")],
        x=(1, 1, 5, 5), y=(1, 2, 60003, 60003)))
    out["constant_of_shape_bomb.onnx"] = ("ConstantOfShape of (3^16, 3^16) by repeated squaring",
                                          "error", model(
        [const_node("s", np.array([3, 3], np.int64)), n("Mul", ["s", "s"], ["s2"], name="sq1"),
         n("Mul", ["s2", "s2"], ["s4"], name="sq2"), n("Mul", ["s4", "s4"], ["s8"], name="sq3"),
         n("Mul", ["s8", "s8"], ["s16"], name="sq4"), n("ConstantOfShape", ["s16"], ["big"], name="cos")]
        + use("big")))
    out["range_bomb.onnx"] = ("Range(0, 10^12) of Constant nodes", "error", model(
        [const_node("a", np.float32(0)), const_node("b", np.float32(1e6)), const_node("c", np.float32(1)),
         n("Mul", ["b", "b"], ["b2"], name="square"), n("Range", ["a", "b2", "c"], ["r"], name="range")]
        + use("r")))
    out["tile_bomb.onnx"] = ("Tile of a scalar by 10^5 x 10^5", "error", model(
        [const_node("one", np.ones((1, 1), np.float32)),
         const_node("rep", np.array([100000, 100000], np.int64)),
         n("Tile", ["one", "rep"], ["t"], name="tile")] + use("t")))
    out["loop_forever.onnx"] = ("a Loop with 2^62 iterations on constants", "error", loop_forever())
    out["nan_weights.onnx"] = ("Gemm weights with a NaN", "error", model(
        [n("Gemm", ["x", "W"], ["y"], transB=1, name="fc")],
        [numpy_helper.from_array(np.array([[1, np.nan, 0]] * 4, np.float32), "W")], y=(1, 4)))
    out["external_escape.onnx"] = ("external data at ../../../../etc/passwd", "error",
                                   external("../../../../etc/passwd"))
    out["external_dev_zero.onnx"] = ("external data at /dev/zero, length 10^12", "error",
                                     external("/dev/zero", length=str(10**12)))
    out["external_missing.onnx"] = ("external data file that does not exist", "error",
                                    external("weights_that_are_not_here.bin"))
    m = onnx.ModelProto()
    m.ParseFromString(good)
    w = next(t for t in m.graph.initializer if t.name == "W2")
    w.raw_data = w.raw_data[:10]
    out["short_raw_data.onnx"] = ("an initializer with 10 bytes of raw data for 90 floats", "error", m)
    m = onnx.ModelProto()
    m.ParseFromString(good)
    next(t for t in m.graph.initializer if t.name == "W1").data_type = TensorProto.DOUBLE
    out["dtype_mismatch.onnx"] = ("float32 bytes declared as float64", "error", m)
    m = onnx.ModelProto()
    m.ParseFromString(good)
    for node in m.graph.node:
        if node.op_type == "Conv":
            del node.attribute[:]
            node.attribute.extend([helper.make_attribute("strides", [0, 0]),
                                   helper.make_attribute("pads", [-1, -1, -1, -1])])
    out["zero_strides_negative_pads.onnx"] = ("Conv with strides 0 and pads -1", "error", m)
    m = onnx.ModelProto()
    m.ParseFromString(good)
    node = next(n for n in m.graph.node if n.op_type == "Gemm")
    next(a for a in node.attribute if a.name == "transB").type = onnx.AttributeProto.STRING
    out["attribute_wrong_type.onnx"] = ("Gemm transB declared as a string", "error", m)
    out["string_weights.onnx"] = ("a Gemm whose weight is a string tensor", "error", model(
        [n("Gemm", ["x", "W"], ["y"], transB=1, name="fc")],
        [helper.make_tensor("W", TensorProto.STRING, [4, 3], [b"w"] * 12)], y=(1, 4)))
    out["batch_axis_moved.onnx"] = ("Transpose moving the batch axis before a GlobalAveragePool",
                                    "error", model(
        [n("Transpose", ["x"], ["t"], perm=[2, 1, 0, 3], name="tr"),
         n("GlobalAveragePool", ["t"], ["y"], name="gap")], x=(1, 2, 5, 5), y=(5, 2, 1, 1)))
    chain = [n("Relu", ["x" if i == 0 else f"h{i}"], [f"h{i + 1}" if i < 299 else "y"], name=f"r{i}")
             for i in range(300)]
    out["deep_chain.onnx"] = ("300 Relu nodes in a row", "ok", model(chain))
    return {name: (what, expect, v if isinstance(v, bytes) else v.SerializeToString())
            for name, (what, expect, v) in out.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "tests" / "corpus")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    manifest = {}
    for name, (what, expect, data) in sorted(cases().items()):
        (args.out / name).write_bytes(data)
        manifest[name] = {"what": what, "expect": expect, "bytes": len(data)}
        print(f"{name:36s} {len(data):7d} bytes  {expect:5s}  {what}")
    (args.out / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
