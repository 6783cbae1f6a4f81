"""The graph of blocks: affine(-ReLU), max-pooling and lone ReLU blocks.

`build_blocks` groups the layers of the nodes: affine layers compose into one
map (where the composition keeps row norms exact and cheap), a ReLU closes an
affine-ReLU block, a MaxPool is a block of its own, and a block may read the
outputs of several earlier blocks (residual Add, Concat): its map is then a
block row [A_1 … A_k] on the concatenation of their values. The blocks are
held in a topological order; `flow` and `flow_t` are the one traversal every
forward pass, Jacobian product and bound walks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from .layers import Affine, Layer, MaxPool, Merge, Relu, Reshape
from .operators.base import LinearMap
from .operators.chain import chain
from .operators.matrix import DenseMap, SparseMap, sparse_bytes
from .operators.monomial import MonomialMap
from .operators.ort import NodeSession
from .operators.stack import StackMap

#: The source index of the network's input among a block's inputs.
INPUT = -1


@dataclass
class Block:
    """Common part of every block: its name, the ONNX nodes folded into it, its shapes."""

    name: str
    ops: list[str]
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    #: The blocks whose outputs it reads (INPUT: the network's input), in the
    #: order their values are concatenated into its input vector.
    inputs: tuple[int, ...] = (-1,)

    @property
    def kind(self) -> str:
        raise NotImplementedError

    @property
    def out_size(self) -> int:
        return math.prod(self.out_shape)

    def describe(self) -> str:
        return "-"


@dataclass
class AffineBlock(Block):
    """z = A y + b, followed by a ReLU when `relu` is set."""

    map: LinearMap = None
    bias: np.ndarray = None
    relu: bool = False

    @property
    def kind(self) -> str:
        return "affine-relu" if self.relu else "affine"

    def describe(self) -> str:
        return self.map.describe()

    def parts(self) -> list[LinearMap]:
        """The map of each input: [A_1 … A_k] where the block reads k blocks."""
        return self.map.parts if len(self.inputs) > 1 else [self.map]

    def pre_activation(self, x: np.ndarray) -> np.ndarray:
        return self.map.matvec(x) + self.bias

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


@dataclass
class BlockOptions:
    """How affine maps are held: 'auto' keeps each map's natural form (dense for
    Gemm, matrix-free onnxruntime kernels for convolutions); 'sparse' builds the
    exact CSR matrix wherever it fits in `memory_budget` bytes; 'matrix-free'
    never builds matrices beyond the dense weights the model already has."""

    operators: str = "auto"
    memory_budget: float = 1e9


@dataclass
class Lowered:
    """One node's layers, with the tensors it reads (data only) and writes."""

    name: str
    op: str
    layers: list[Layer]
    inputs: list[str]
    output: str


@dataclass
class _Part:
    """maps[-1] ∘ … ∘ maps[0] applied to the output of block `source`."""

    source: int
    maps: list[LinearMap] = field(default_factory=list)
    names: list[tuple[str, bool]] = field(default_factory=list)  # (node, monomial) per map


@dataclass
class _Pending:
    """A tensor as an affine expression of block outputs that is not a block yet:
    Σ_j part_j + bias, with the names of the ops folded into it."""

    parts: list[_Part]
    shape: tuple[int, ...]
    bias: np.ndarray | None = None
    ops: list[str] = field(default_factory=list)

    @property
    def trivial(self) -> bool:
        """A block's output itself (or the input), up to reshapes."""
        return len(self.parts) == 1 and not self.parts[0].maps and self.bias is None

    def copy(self) -> _Pending:
        parts = [_Part(p.source, list(p.maps), list(p.names)) for p in self.parts]
        return _Pending(parts, self.shape, self.bias, list(self.ops))


def build_blocks(lowered: list[Lowered], input_name: str, input_shape, output: str,
                 options: BlockOptions) -> list[Block]:
    """Group the nodes' layers (in topological order) into blocks.

    Affine layers compose into one map per path until a ReLU, a max-pooling,
    a second heavy map or a tensor read by several nodes closes them; Add,
    Sub and Concat of computed tensors become blocks that read several
    blocks' outputs (block inputs: indices of earlier blocks, INPUT for the
    network input).
    """
    readers: dict[str, int] = {}
    for node in lowered:
        for name in node.inputs:
            readers[name] = readers.get(name, 0) + 1
    builder = _Builder(options, {input_name: _Pending([_Part(INPUT)], tuple(input_shape))})
    for node in lowered:
        builder.add(node, readers)
    return builder.finish(output)


class _Builder:
    def __init__(self, options: BlockOptions, state: dict[str, _Pending]):
        self.options = options
        self.state = state
        self.blocks: list[Block] = []

    def add(self, node: Lowered, readers: dict[str, int]) -> None:
        pendings = [self._take(name, readers[name] > 1) for name in node.inputs]
        pending = pendings[0]
        for layer in node.layers:
            pending = self._apply(layer, pending, pendings, node)
        self.state[node.output] = pending

    def finish(self, output: str) -> list[Block]:
        pending = self.state[output]
        if not pending.trivial:
            pending = self._close(pending, relu=False)
        source = pending.parts[0].source
        if source == INPUT:
            return []
        block = self.blocks[source]
        block.ops.extend(pending.ops)
        block.out_shape = pending.shape
        return self.blocks

    def _take(self, name: str, shared: bool) -> _Pending:
        """The pending expression of a tensor; one read by several nodes is made a block first."""
        pending = self.state[name]
        if shared and not pending.trivial:
            pending = self.state[name] = self._close(pending, relu=False)
        return pending.copy()

    def _apply(self, layer: Layer, pending: _Pending, pendings: list[_Pending], node: Lowered):
        if isinstance(layer, Reshape):
            pending.ops.append(node.op)
            pending.shape = layer.shape
            return pending
        if isinstance(layer, Merge):
            return _merged(pendings, layer, node)
        if isinstance(layer, Affine):
            return self._affine(pending, layer, node)
        if isinstance(layer, Relu):
            if not pending.trivial:
                return self._close(pending, relu=True, label=node.op)
            source = pending.parts[0].source
            last = self.blocks[source] if source != INPUT else None
            if isinstance(last, AffineBlock) and last.relu and not pending.ops:
                last.ops.append(node.op)  # a ReLU of a ReLU
                return pending
            return self._block(ReluBlock(node.name, pending.ops + [node.op], pending.shape,
                                         pending.shape, inputs=(source,)))
        if isinstance(layer, MaxPool):
            if not pending.trivial:
                pending = self._close(pending, relu=False)
            block = MaxPoolBlock(node.name, pending.ops + [node.op], layer.in_shape,
                                 layer.out_shape, inputs=(pending.parts[0].source,), layer=layer)
            return self._block(block)
        raise TypeError(f"unknown layer {layer!r}")

    def _affine(self, pending: _Pending, layer: Affine, node: Lowered) -> _Pending:
        """Compose an affine layer into every part; a second heavy (not monomial)
        map closes the block first unless the two compose into one dense matrix."""
        heavy = not layer.map.monomial
        if heavy and len(pending.parts) > 1:
            pending = self._close(pending, relu=False)
        merged = False
        if heavy and any(not m.monomial for m in pending.parts[0].maps):
            merged = _merge_dense(pending.parts[0], layer, self.options)
            if not merged:
                pending = self._close(pending, relu=False)
        for part in pending.parts:
            if not merged:
                part.maps.append(layer.map)
            part.names.append((node.name, layer.map.monomial))
        bias = layer.bias if pending.bias is None else layer.map.matvec(pending.bias) + layer.bias
        pending.bias = bias
        pending.ops.append(node.op)
        pending.shape = layer.map.out_shape
        return pending

    def _close(self, pending: _Pending, relu: bool, label: str | None = None) -> _Pending:
        """Make the pending expression (and a ReLU after it) a block; the block's output."""
        maps = [chain(p.maps) if p.maps else MonomialMap.diagonal(np.ones(pending.shape), pending.shape)
                for p in pending.parts]
        names = [n for p in pending.parts for n in p.names]
        heavy = [n for n, mono in names if not mono]
        name = heavy[0] if heavy else (names[0][0] if names else "")
        linear = _represent(maps[0], self.options) if len(maps) == 1 else StackMap(maps)
        bias = np.zeros(linear.out_size) if pending.bias is None else pending.bias
        ops = pending.ops + ([label] if label else [])
        block = AffineBlock(name, ops, linear.in_shape, pending.shape,
                            inputs=tuple(p.source for p in pending.parts), map=linear, bias=bias,
                            relu=relu)
        return self._block(block)

    def _block(self, block: Block) -> _Pending:
        self.blocks.append(block)
        return _Pending([_Part(len(self.blocks) - 1)], block.out_shape)


def _merged(pendings: list[_Pending], layer: Merge, node: Lowered) -> _Pending:
    """Σ_j maps[j](pending_j): the parts of every input, each placed by its map."""
    parts, ops, bias = [], [], None
    for pending, placement in zip(pendings, layer.maps):
        for part in pending.parts:
            parts.append(_Part(part.source, part.maps + [placement],
                               part.names + [(node.name, True)]))
        ops.extend(pending.ops)
        if pending.bias is not None:
            placed = placement.matvec(pending.bias)
            bias = placed if bias is None else bias + placed
    return _Pending(parts, layer.shape, bias, ops + [node.op])


def _merge_dense(part: _Part, layer: Affine, options: BlockOptions) -> bool:
    """Compose two non-monomial maps into one dense matrix when one of them is
    dense and the product fits the memory budget (e.g. AveragePool then Gemm)."""
    first, second = chain(part.maps), layer.map
    if not (isinstance(first, DenseMap) or isinstance(second, DenseMap)):
        return False
    if 16 * first.in_size * second.out_size > options.memory_budget:
        return False
    if isinstance(second, DenseMap):
        weight = np.asarray((first.to_sparse().T @ second.weight.T).T)
    else:
        weight = np.asarray(second.to_sparse() @ first.weight)
    part.maps[:] = [DenseMap(weight, first.in_shape, second.out_shape)]
    return True


def _represent(linear: LinearMap, options: BlockOptions) -> LinearMap:
    """Build the CSR form where asked for and within the memory budget."""
    if options.operators != "sparse" or isinstance(linear, SparseMap):
        return linear
    if sparse_bytes(linear.sparse_nnz_estimate(), linear.out_size) > options.memory_budget:
        return linear
    return SparseMap(linear.to_sparse(), linear.in_shape, linear.out_shape)


def block_input(values, block: Block, x: np.ndarray) -> np.ndarray:
    """A block's input vector: its sources' values concatenated (x for INPUT)."""
    parts = [x if j == INPUT else values[j] for j in block.inputs]
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def flow(blocks: list[Block], x: np.ndarray, step, keep: bool = False) -> list[np.ndarray | None]:
    """Values of the blocks in order: value_k = step(k, block_k, input_k).

    With `keep` every value is returned; otherwise a value is dropped once
    its last reader has run (long Jacobian products keep only what is live),
    and the last block's value is returned at the end of the list.
    """
    last_read = {}
    for k, block in enumerate(blocks):
        for j in block.inputs:
            last_read[j] = k
    values: list[np.ndarray | None] = []
    for k, block in enumerate(blocks):
        values.append(step(k, block, block_input(values, block, x)))
        if not keep:
            for j in set(block.inputs):
                if j != INPUT and last_read[j] == k:
                    values[j] = None
    return values


def flow_t(blocks: list[Block], u: np.ndarray, step_t, in_size: int) -> np.ndarray:
    """The transpose of a flow: u at the last block's output goes back to the
    input; step_t(k, block, u_k) returns the change of block k's input vector,
    which is split among its sources and summed where a value is read twice."""
    pending: dict[int, np.ndarray] = {len(blocks) - 1: u}
    for k in range(len(blocks) - 1, -1, -1):
        u_k = pending.pop(k, None)
        if u_k is None:
            continue
        back = step_t(k, blocks[k], u_k)
        offset = 0
        for j in blocks[k].inputs:
            size = in_size if j == INPUT else blocks[j].out_size
            piece = back[offset:offset + size]
            offset += size
            pending[j] = piece if j not in pending else pending[j] + piece
    return pending.get(INPUT, np.zeros(in_size))


def is_chain(blocks: list[Block]) -> bool:
    """Whether every block reads exactly the one before it."""
    return all(b.inputs == (k - 1,) for k, b in enumerate(blocks))
