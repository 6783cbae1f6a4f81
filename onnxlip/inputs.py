"""Reading nominal inputs: .npy, .npz with one array, ONNX TensorProto .pb."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import OnnxlipError
from .lowering.registry import MAX_ELEMENTS


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
        with open(path, "rb") as stream:
            need = _check_header(stream, path)
            have = os.fstat(stream.fileno()).st_size - stream.tell()
        if have < need:
            raise OnnxlipError(f"{path}: not a readable .npy array (truncated: {have} of {need} data bytes)")
        return np.load(path, allow_pickle=False)
    except OnnxlipError:
        raise
    except Exception as exc:
        raise OnnxlipError(f"{path}: not a readable .npy array ({_short(exc)})") from None


def _read_npz(path: Path) -> np.ndarray:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            if len(names) != 1:
                names = [n.removesuffix(".npy") for n in names]
                raise OnnxlipError(f"{path}: holds {len(names)} arrays {names}; expected exactly one")
            with archive.open(names[0]) as stream:
                _check_header(stream, path)
        with np.load(path, allow_pickle=False) as archive:
            return archive[archive.files[0]]
    except OnnxlipError:
        raise
    except Exception as exc:
        raise OnnxlipError(f"{path}: not a readable .npz archive ({_short(exc)})") from None


def _check_header(stream, path: Path) -> int:
    """Refuse, from the .npy header alone, arrays of objects or of too many elements;
    the number of data bytes the header promises."""
    fmt = np.lib.format
    version = fmt.read_magic(stream)
    read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
    shape, _, dtype = read(stream)
    if dtype.hasobject:
        raise OnnxlipError(f"{path}: holds Python objects (dtype {dtype}); only numeric arrays are read")
    _check_elements(shape, path)
    return int(np.prod([int(d) for d in shape], dtype=object)) * dtype.itemsize


def _check_elements(shape, path: Path) -> None:
    size = int(np.prod([int(d) for d in shape], dtype=object))
    if size > MAX_ELEMENTS:
        raise OnnxlipError(f"{path}: array of shape {tuple(shape)} is too large ({size:,} elements)")


def _read_tensor(path: Path) -> np.ndarray:
    tensor = onnx.TensorProto()
    try:
        tensor.ParseFromString(path.read_bytes())
    except Exception as exc:
        raise OnnxlipError(f"{path}: not a readable ONNX TensorProto ({_short(exc)})") from None
    if tensor.data_location == onnx.TensorProto.EXTERNAL or tensor.external_data:
        raise OnnxlipError(f"{path}: the tensor refers to external data; refused")
    if any(d < 0 for d in tensor.dims):
        raise OnnxlipError(f"{path}: the tensor has negative dimensions {list(tensor.dims)}")
    _check_elements(tensor.dims, path)
    try:
        return numpy_helper.to_array(tensor)
    except Exception as exc:
        raise OnnxlipError(f"{path}: not a readable ONNX TensorProto ({_short(exc)})") from None


def _short(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
