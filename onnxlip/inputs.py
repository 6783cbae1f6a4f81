"""Reading nominal inputs: .npy, .npz with one array, ONNX TensorProto .pb."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import OnnxlipError


def read_input(path: str | os.PathLike) -> np.ndarray:
    """The array stored at `path` (never unpickled)."""
    path = Path(path)
    if not path.is_file():
        raise OnnxlipError(f"{path}: no such input file")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return _read_npy(path)
    if suffix == ".npz":
        return _read_npz(path)
    if suffix == ".pb":
        return _read_tensor(path)
    raise OnnxlipError(f"{path}: unknown input format {suffix!r} (use .npy, .npz or .pb)")


def _read_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except Exception as exc:
        raise OnnxlipError(f"{path}: not a readable .npy array ({_short(exc)})") from None


def _read_npz(path: Path) -> np.ndarray:
    try:
        with np.load(path, allow_pickle=False) as archive:
            names = list(archive.files)
            if len(names) != 1:
                raise OnnxlipError(f"{path}: holds {len(names)} arrays {names}; expected exactly one")
            return archive[names[0]]
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise OnnxlipError(f"{path}: not a readable .npz archive ({_short(exc)})") from None


def _read_tensor(path: Path) -> np.ndarray:
    tensor = onnx.TensorProto()
    try:
        tensor.ParseFromString(path.read_bytes())
        return numpy_helper.to_array(tensor)
    except Exception as exc:
        raise OnnxlipError(f"{path}: not a readable ONNX TensorProto ({_short(exc)})") from None


def _short(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
