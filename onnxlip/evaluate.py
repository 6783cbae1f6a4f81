"""The reference forward pass: onnxruntime on the user's own model."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort

from .errors import OnnxlipError
from .graph import ModelGraph, runnable_model
from .operators import ort as ort_settings

_NUMPY_TYPES = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.DOUBLE: np.float64,
                onnx.TensorProto.FLOAT16: np.float16}


class ModelRunner:
    """Runs the original ONNX model (not the engine's blocks) on single inputs."""

    def __init__(self, graph: ModelGraph):
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = ort_settings.THREADS
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        model = runnable_model(graph)
        try:
            self._session = ort.InferenceSession(model.SerializeToString(), options,
                                                 providers=["CPUExecutionProvider"])
        except Exception as exc:
            text = (str(exc).splitlines() or [""])[0][:200]
            raise OnnxlipError(f"{graph.path}: onnxruntime cannot run the model ({text})") from None
        value = next(i for i in model.graph.input if i.name == graph.input_name)
        self._dtype = _NUMPY_TYPES.get(value.type.tensor_type.elem_type, np.float32)
        self._input, self._output = graph.input_name, graph.output_name
        self._shape = graph.input_shape

    def representable(self, x: np.ndarray) -> np.ndarray:
        """x rounded to the model's input type (as float64): the point actually evaluated."""
        return np.asarray(x, dtype=self._dtype).astype(np.float64)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """f(x) as a flat float64 vector."""
        feed = {self._input: np.asarray(x, dtype=self._dtype).reshape(self._shape)}
        return np.asarray(self._session.run([self._output], feed)[0], dtype=np.float64).ravel()
