"""Single-node onnxruntime sessions: the fast float32 kernels behind conv maps."""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

OPSET = 17

#: onnxruntime threads per session: one per logical CPU. Its own default (0)
#: ran a VGG16 convolution 1.5x slower here (59-74 ms against 39-48 ms with 2
#: threads on 2 cores). Dask workers set 1 (onnxlip.distributed.single_threaded) so
#: that they share the cores.
THREADS = os.cpu_count() or 1
#: Entries of one input or output (per batch item) above which a node runs without
#: onnxruntime's memory arena. An arena keeps the largest buffers a session ever
#: ran with, one arena per session: on VGG16's 224x224 convolutions (four sessions
#: each) they held 0.5 GB for the whole run. Large buffers cost no time to allocate
#: afresh; small ones (the CIFAR-10 reference's analysis, column chunks through its
#: 32x32 maps) did: its bounds took 0-10% longer without arenas.
ARENA_ENTRIES_MAX = 2**19


def node_model(op_type: str, weights: dict[str, np.ndarray], rank: int, dtype: np.dtype,
               outputs: tuple[str, ...] = ("y",), **attrs) -> onnx.ModelProto:
    """A one-node model over input 'x' (batch axis 'N'), at the lowest IR version
    its opset needs: an onnxruntime older than the installed onnx refuses
    onnx's newest IR version (onnxruntime 1.30 with onnx 1.23)."""
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    node = helper.make_node(op_type, ["x", *weights], list(outputs), **attrs)
    graph = helper.make_graph(
        [node],
        op_type.lower(),
        [helper.make_tensor_value_info("x", elem, ["N"] + [None] * (rank - 1))],
        [helper.make_tensor_value_info(name, elem if i == 0 else onnx.TensorProto.INT64, None)
         for i, name in enumerate(outputs)],
        [numpy_helper.from_array(np.asarray(w, dtype), n) for n, w in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = helper.find_min_ir_version_for(model.opset_import)
    return model


class NodeSession:
    """One ONNX node over an input 'x' with a dynamic batch dimension.

    float32 by default (onnxruntime's fast kernels); float64 where the op has a
    double kernel and exactness matters (max-pooling selects values). `entries`:
    the larger of the node's input and output sizes per batch item, which decides
    whether it gets a memory arena (ARENA_ENTRIES_MAX).
    """

    def __init__(self, op_type: str, weights: dict[str, np.ndarray], rank: int,
                 dtype: type = np.float32, outputs: tuple[str, ...] = ("y",),
                 entries: int = 0, **attrs):
        self._dtype = np.dtype(dtype)
        self.op_type = op_type
        model = node_model(op_type, weights, rank, self._dtype, outputs, **attrs)
        options = ort.SessionOptions()
        options.log_severity_level = 4  # fatal only: failures reach the caller as exceptions
        options.intra_op_num_threads = THREADS
        options.enable_cpu_mem_arena = entries <= ARENA_ENTRIES_MAX
        # Spinning worker threads would steal the cores from numpy's BLAS between runs.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._session = ort.InferenceSession(
            model.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )

    @property
    def dtype(self) -> np.dtype:
        """The type the node computes in (its input is converted to it)."""
        return self._dtype

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.run_all(x)[0]

    def run_all(self, x: np.ndarray) -> list[np.ndarray]:
        """Every output of the node (values beyond float32 become inf, which the
        bound's finiteness check then reports as an error)."""
        with np.errstate(over="ignore"):
            x = np.ascontiguousarray(x, dtype=self._dtype)
        try:
            return self._session.run(None, {"x": x})
        except Exception as exc:  # onnxruntime raises its own Fail for a failed allocation
            if "Failed to allocate memory" in str(exc):
                raise MemoryError(f"onnxruntime could not allocate memory for {self.op_type}") from None
            raise
