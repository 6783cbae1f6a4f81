"""onnxlip: sound local and global Lipschitz bounds of ONNX networks (ReLU and other common activations)."""

from .bounds import BoundResult, LayerRecord
from .errors import OnnxlipError
from .network import Network, load

__all__ = ["BoundResult", "LayerRecord", "Network", "OnnxlipError", "load"]
__version__ = "0.1.0"
