"""The chain of blocks: affine(-ReLU), max-pooling and lone ReLU blocks.

`build_blocks` groups the layers of consecutive nodes: affine layers compose
into one map (where the composition keeps row norms exact and cheap), a ReLU
closes an affine-ReLU block, and a MaxPool is a block of its own.

The forward pass applies an affine block's layers one by one, as the model
does (never the composed map plus the composed bias: a normalization's Sub of
a mean folded into a float32 convolution would subtract two large numbers),
and `*_bounded` carries a rigorous elementwise bound of its rounding error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from .layers import Affine, Layer, MaxPool, Relu, Reshape
from .operators.base import SLACK, U64, LinearMap
from .operators.chain import apply_bias, chain
from .operators.matrix import DenseMap, SparseMap, sparse_bytes
from .operators.monomial import MonomialMap
from .operators.ort import NodeSession


@dataclass
class Block:
    """Common part of every block: its name, the ONNX nodes folded into it, its shapes."""

    name: str
    ops: list[str]
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]

    @property
    def kind(self) -> str:
        raise NotImplementedError

    def describe(self) -> str:
        return "-"


@dataclass
class AffineBlock(Block):
    """z = A y + b, followed by a ReLU when `relu` is set."""

    map: LinearMap = None
    bias: np.ndarray = None
    relu: bool = False
    #: The model's own layers (map, bias), in order: how the forward pass
    #: evaluates the block (None: the composed map and bias).
    layers: list[tuple[LinearMap, np.ndarray]] | None = None

    @property
    def kind(self) -> str:
        return "affine-relu" if self.relu else "affine"

    def describe(self) -> str:
        return self.map.describe()

    def model_layers(self) -> list[tuple[LinearMap, np.ndarray]]:
        """The (map, bias) pairs the forward pass applies one after the other."""
        return self.layers or [(self.map, self.bias)]

    def pre_activation(self, x: np.ndarray) -> np.ndarray:
        for linear, bias in self.model_layers():
            x = linear.matvec(x) + bias
        return x

    def pre_activation_bounded(self, x: np.ndarray, err: np.ndarray
                               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(y, local, total): the pre-activation from the layers' precise products, a
        bound of the block's own rounding (|y − exact block of the computed x|), and
        one of its whole error (|y − exact y*| given |x − x*| ≤ err). Each layer adds
        its products' rounding (LinearMap.matvec_bounded), then its bias in float64:
        |fl(y + b) − (y + b)| ≤ u/(1 − u)·|fl(y + b)|, none where y or b is 0."""
        errors = [np.zeros(x.size), err]
        for linear, bias in self.model_layers():
            y, errors = linear.matvec_bounded(x, errors)
            x = y + bias
            added = np.where((y != 0) & (bias != 0), 2 * U64 * np.abs(x), 0.0)
            errors = [(e + added) * SLACK for e in errors]
        return x, errors[0], errors[1]

    def forward(self, x: np.ndarray) -> np.ndarray:
        pre = self.pre_activation(x)
        return np.maximum(pre, 0.0) if self.relu else pre


@dataclass
class MaxPoolBlock(Block):
    """Max-pooling: Lipschitz constant sqrt(most windows sharing one input)."""

    layer: MaxPool = None

    kind = "maxpool"

    @cached_property
    def _session(self) -> NodeSession:
        p = self.layer
        return NodeSession("MaxPool", {}, len(p.in_shape), kernel_shape=list(p.kernel),
                           strides=list(p.strides), pads=list(p.pads),
                           dilations=list(p.dilations), ceil_mode=p.ceil_mode,
                           dtype=np.float64, outputs=("y", "argmax"))

    def forward(self, x: np.ndarray) -> np.ndarray:
        return self._session(x.reshape(self.in_shape)).ravel()

    def forward_bounded(self, x: np.ndarray, err: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Max-pooling is exact in float64, and a window's maximum moves by at most
        the largest move of its entries: the error bound is the window's largest."""
        return self.forward(x), self.forward(err)

    def margins(self, z: np.ndarray, spread: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(flat input index of each window's largest entry in z, its margin): how far
        that entry, lowered by its spread, stays above every other entry of the
        window raised by theirs (+inf for a window of one entry). A margin ≥ 0
        keeps the winner for every z* with |z* − z| ≤ spread; > 0 keeps it strictly."""
        windows = self.windows
        padded = windows < 0
        index = np.where(padded, 0, windows)
        values = np.where(padded, -np.inf, z[index])
        spreads = np.where(padded, 0.0, spread[index])
        rows = np.arange(len(windows))
        top = np.argmax(values, axis=1)
        others = values + spreads
        others[rows, top] = -np.inf
        margin = values[rows, top] - spreads[rows, top] - others.max(axis=1, initial=-np.inf)
        return windows[rows, top], margin

    def contested(self, z: np.ndarray, spread: np.ndarray, varies: np.ndarray) -> np.ndarray:
        """Windows whose largest entry may be matched by another within the spreads
        (ties and near-ties), among which at least one entry varies with the input."""
        windows = self.windows
        padded = windows < 0
        index = np.where(padded, 0, windows)
        values = np.where(padded, -np.inf, z[index])
        spreads = np.where(padded, 0.0, spread[index])
        top = np.argmax(values, axis=1)[:, None]
        floor = np.take_along_axis(values - spreads, top, axis=1)
        tied = ~padded & (values + spreads >= floor)
        return (tied.sum(axis=1) >= 2) & (tied & varies[index]).any(axis=1)

    def selection(self, x: np.ndarray) -> MonomialMap:
        """The linear map that max-pooling is at x: each output picks its window's argmax."""
        argmax = self._session.run_all(x.reshape(self.in_shape))[1]
        return MonomialMap(argmax.ravel(), None, self.in_shape, self.out_shape)

    def pool_mask(self, d: np.ndarray) -> np.ndarray:
        """Outputs that can change: those with any changeable input in their window."""
        return (self._session(d.reshape(self.in_shape)).ravel() > 0).astype(float)

    @cached_property
    def windows(self) -> np.ndarray:
        """(outputs, window size) flat input indices of every window, -1 for padding."""
        p, rank = self.layer, len(self.layer.kernel)
        in_sp, out_sp = p.in_shape[2:], p.out_shape[2:]
        grids = np.meshgrid(*[np.arange(o) for o in out_sp], *[np.arange(k) for k in p.kernel],
                            indexing="ij")
        valid, positions = np.ones(grids[0].shape, dtype=bool), []
        for i in range(rank):
            q = grids[i] * p.strides[i] - p.pads[i] + grids[rank + i] * p.dilations[i]
            valid &= (q >= 0) & (q < in_sp[i])
            positions.append(np.clip(q, 0, in_sp[i] - 1))
        spatial = np.where(valid, np.ravel_multi_index(positions, in_sp), -1)
        spatial = spatial.reshape(math.prod(out_sp), math.prod(p.kernel))
        offsets = np.arange(p.in_shape[1])[:, None, None] * math.prod(in_sp)
        members = np.where(spatial[None] >= 0, spatial[None] + offsets, -1)
        return members.reshape(-1, spatial.shape[1])

    @cached_property
    def lipschitz(self) -> float:
        """sqrt of the largest number of windows that contain one input element."""
        p = self.layer
        most = 1
        for axis, size in enumerate(p.in_shape[2:]):
            count = np.zeros(size + p.pads[axis] + p.pads[len(p.kernel) + axis] + p.kernel[axis]
                             * p.dilations[axis], dtype=np.int64)
            for o in range(p.out_shape[2 + axis]):
                start = o * p.strides[axis]
                count[start:start + p.kernel[axis] * p.dilations[axis]:p.dilations[axis]] += 1
            most *= int(count.max())
        return math.sqrt(most)


@dataclass
class ReluBlock(Block):
    """A ReLU that follows a non-affine block (e.g. MaxPool then Relu): 1-Lipschitz."""

    kind = "relu"

    def forward(self, x: np.ndarray) -> np.ndarray:
        return np.maximum(x, 0.0)

    def forward_bounded(self, x: np.ndarray, err: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.forward(x), relu_error(x, err)


def relu_error(x: np.ndarray, err: np.ndarray) -> np.ndarray:
    """ReLU is exact and 1-Lipschitz: errors do not grow, and vanish where x + err ≤ 0
    (computed and exact value both at most 0, both map to 0)."""
    return np.where(x + err <= 0, 0.0, err)


@dataclass
class BlockOptions:
    """How affine maps are held: 'auto' keeps each map's natural form (dense for
    Gemm, matrix-free onnxruntime kernels for convolutions); 'sparse' builds the
    exact CSR matrix wherever it fits in `memory_budget` bytes; 'matrix-free'
    never builds matrices beyond the dense weights the model already has."""

    operators: str = "auto"
    memory_budget: float = 1e9


@dataclass
class _Pending:
    """Affine layers waiting for the ReLU (or the block boundary) that closes them."""

    maps: list = field(default_factory=list)
    biases: list = field(default_factory=list)
    ops: list = field(default_factory=list)
    names: list = field(default_factory=list)
    layers: list = field(default_factory=list)  # (map, bias) as lowered, never merged


def build_blocks(
    lowered: list[tuple[str, str, list[Layer]]], input_shape, options: BlockOptions
) -> list[Block]:
    """Group (node name, op type, layers) triples into the chain of blocks."""
    blocks: list[Block] = []
    pending = _Pending()
    shape = tuple(input_shape)
    for node_name, op, layers in lowered:
        for layer in layers:
            shape = _add_layer(blocks, pending, layer, node_name, op, shape, options)
    if pending.maps:
        blocks.append(_close(pending, relu=False, shape=shape, options=options))
    elif pending.ops and blocks:
        blocks[-1].ops.extend(pending.ops)
        blocks[-1].out_shape = shape
    return blocks


def _add_layer(blocks, pending, layer, node_name, op, shape, options):
    label = f"{op}"
    if isinstance(layer, Reshape):
        pending.ops.append(label)
        return layer.shape
    if isinstance(layer, Affine):
        if not layer.map.monomial and any(not m.monomial for m in pending.maps):
            if _merge_dense(pending, layer, options):
                pending.layers.append((layer.map, layer.bias))
                pending.ops.append(label)
                return layer.map.out_shape
            blocks.append(_close(pending, relu=False, shape=shape, options=options))
        pending.layers.append((layer.map, layer.bias))
        pending.maps.append(layer.map)
        pending.biases.append(layer.bias)
        pending.ops.append(label)
        pending.names.append((node_name, layer.map.monomial))
        return layer.map.out_shape
    if isinstance(layer, Relu):
        if pending.maps:
            pending.ops.append(label)
            blocks.append(_close(pending, relu=True, shape=shape, options=options))
        elif blocks and isinstance(blocks[-1], AffineBlock) and blocks[-1].relu and not pending.ops:
            blocks[-1].ops.append(label)
        else:
            blocks.append(ReluBlock(node_name, _take_ops(pending) + [label], shape, shape))
        return shape
    if isinstance(layer, MaxPool):
        if pending.maps:
            blocks.append(_close(pending, relu=False, shape=shape, options=options))
        blocks.append(MaxPoolBlock(node_name, _take_ops(pending) + [label], layer.in_shape,
                                   layer.out_shape, layer=layer))
        return layer.out_shape
    raise TypeError(f"unknown layer {layer!r}")


def _merge_dense(pending: _Pending, layer: Affine, options: BlockOptions) -> bool:
    """Compose two non-monomial maps into one dense matrix when one of them is
    dense and the product fits the memory budget (e.g. AveragePool then Gemm)."""
    first, second = chain(pending.maps), layer.map
    if not (isinstance(first, DenseMap) or isinstance(second, DenseMap)):
        return False
    if 16 * first.in_size * second.out_size > options.memory_budget:
        return False
    if isinstance(second, DenseMap):
        weight = np.asarray((first.to_sparse().T @ second.weight.T).T)
    else:
        weight = np.asarray(second.to_sparse() @ first.weight)
    bias = second.matvec(apply_bias(pending.maps, pending.biases)) + layer.bias
    pending.maps[:] = [DenseMap(weight, first.in_shape, second.out_shape)]
    pending.biases[:] = [bias]
    pending.names.append((pending.names[0][0] if pending.names else "", False))
    return True


def _take_ops(pending: _Pending) -> list[str]:
    ops = list(pending.ops)
    pending.ops.clear()
    return ops


def _close(pending: _Pending, relu: bool, shape, options: BlockOptions) -> AffineBlock:
    maps, biases = list(pending.maps), list(pending.biases)
    heavy = [n for n, mono in pending.names if not mono]
    name = heavy[0] if heavy else pending.names[0][0]
    linear = _represent(chain(maps), options)
    bias = apply_bias(maps, biases)
    block = AffineBlock(name, _take_ops(pending), maps[0].in_shape, shape,
                        map=linear, bias=bias, relu=relu, layers=list(pending.layers))
    pending.maps.clear()
    pending.biases.clear()
    pending.names.clear()
    pending.layers.clear()
    return block


def _represent(linear: LinearMap, options: BlockOptions) -> LinearMap:
    """Build the CSR form where asked for and within the memory budget."""
    if options.operators != "sparse" or isinstance(linear, SparseMap):
        return linear
    if sparse_bytes(linear.sparse_nnz_estimate(), linear.out_size) > options.memory_budget:
        return linear
    return SparseMap(linear.to_sparse(), linear.in_shape, linear.out_shape)
