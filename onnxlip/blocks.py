"""The graph of blocks: affine(-activation), max-pooling and lone activation blocks.

`build_blocks` groups the layers of the nodes: affine layers compose into one
map (where the composition keeps row norms exact and cheap), an activation
(ReLU, sigmoid, GELU, ...: onnxlip.activations) closes an affine-activation
block, a MaxPool is a block of its own, and a block may read the outputs of
several earlier blocks (residual Add, Concat): its map is then a block row
[A_1 … A_k] on the concatenation of their values. The blocks are held in a
topological order; `flow` and `flow_t` are the one traversal every forward
pass, Jacobian product and bound walks.

The forward pass applies an affine block's layers one by one, as the model
does (never the composed map plus the composed bias: a normalization's Sub of
a mean folded into a float32 convolution would subtract two large numbers),
each input's own layers where a block reads several, and `*_bounded` carries a
rigorous elementwise bound of its rounding error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import scipy.sparse as sp

from .activations import Activation, ReLU
from .errors import OnnxlipError
from .layers import Activate, Affine, Layer, MaxPool, Merge, Reshape
from .operators.base import SLACK, U64, LinearMap
from .operators.chain import chain
from .operators.conv import ConvMap
from .operators.matrix import DenseMap, SparseMap, sparse_bytes
from .operators.monomial import MonomialMap
from .operators.ort import NodeSession
from .operators.stack import StackMap

#: The source index of the network's input among a block's inputs.
INPUT = -1

#: The largest norm (and bias) of one block: its Gram operator, applied in
#: float32 by onnxruntime's convolution kernels, must stay finite.
MAX_BLOCK_NORM = 1e18


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

    @property
    def relu(self) -> bool:
        """Whether the block ends in the plain ReLU."""
        return False

    def describe(self) -> str:
        return "-"

    def reachable(self) -> bool:
        """Whether the reach analysis (onnxlip.reach) follows this block exactly."""
        return True

    def equal_outputs(self, x: np.ndarray, groups: list[np.ndarray]) -> np.ndarray:
        """Per group of output indices: whether the block's outputs there are proven
        equal in exact arithmetic at the exact input x (False: not proven)."""
        return np.zeros(len(groups), dtype=bool)

    def where(self, path: str) -> str:
        """The block as an error message names it."""
        return f"{path}: block {self.name!r} ({'+'.join(self.ops)})"

    def check_magnitude(self, path: str) -> None:
        """An OnnxlipError if the block's coefficients are beyond the float arithmetic
        its bounds are computed in (a block without coefficients has none)."""


@dataclass
class AffineBlock(Block):
    """z = σ(A y + b), σ the block's `activation` (None: z = A y + b)."""

    map: LinearMap = None
    bias: np.ndarray = None
    activation: Activation | None = None
    #: The model's own layers (map, bias), in order, one list per input: how the
    #: forward pass evaluates the block, Σ_j (input j through its layers) +
    #: shared (None: the composed map and bias).
    layers: list[list[tuple[LinearMap, np.ndarray]]] | None = None
    #: The bias added after the inputs are summed (post-merge layers' biases).
    shared: np.ndarray | None = None

    @property
    def relu(self) -> bool:
        """Whether the activation is the plain ReLU (the paper's affine-ReLU block)."""
        return isinstance(self.activation, ReLU)

    def reachable(self) -> bool:
        """The reach analysis and the telescoping follow affine maps and ReLUs."""
        return self.activation is None or self.relu

    @property
    def kind(self) -> str:
        return "affine" if self.activation is None else f"affine-{self.activation.name}"

    def activate(self, y: np.ndarray) -> np.ndarray:
        """The activation applied to pre-activations y (y itself without one)."""
        return y if self.activation is None else self.activation.value(y)

    def activate_bounded(self, y: np.ndarray, err: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """σ(y) and a bound of its error when |y − y*| ≤ err (Activation.value_bounded:
        for ReLU, errors do not grow and vanish where y + err ≤ 0; for a smooth σ,
        sup |σ'| near y times err plus σ's evaluation error, REL·scale as the
        activations module assumes)."""
        return (y, err) if self.activation is None else self.activation.value_bounded(y, err)

    def describe(self) -> str:
        return self.map.describe()

    def equal_outputs(self, x: np.ndarray, groups: list[np.ndarray]) -> np.ndarray:
        """Proven for a block of one model layer with stored coefficients (a Gemm or a
        Conv: its CSR matrix holds them exactly): outputs i and j are equal when
        their biases are and their rows pair the same multiset of (weight, input)
        values over the nonzero products, whatever the order of the sums."""
        proven = np.zeros(len(groups), dtype=bool)
        if self._one_layer is None:
            return proven
        matrix, bias = self._one_layer

        def key(i):
            row = slice(matrix.indptr[i], matrix.indptr[i + 1])
            weights, values = matrix.data[row], x[matrix.indices[row]]
            keep = (weights != 0) & (values != 0)
            weights, values = weights[keep], values[keep]
            order = np.lexsort((values, weights))
            return bias[i], weights[order].tobytes(), values[order].tobytes()

        for g, members in enumerate(groups):
            first = key(members[0])
            proven[g] = all(key(i) == first for i in members[1:])
        return proven

    @cached_property
    def _one_layer(self) -> tuple[sp.csr_matrix, np.ndarray] | None:
        """(CSR matrix, bias) of a block of one Gemm or Conv layer (made once), else None."""
        if self.layers is None or len(self.layers) != 1 or len(self.layers[0]) != 1 or \
                self.shared is not None:
            return None
        linear, bias = self.layers[0][0]
        if not isinstance(linear, (ConvMap, DenseMap)):
            return None
        matrix = linear.to_sparse().tocsr()
        return matrix, (np.zeros(matrix.shape[0]) if bias is None else
                        np.asarray(bias, dtype=np.float64).ravel())

    def check_magnitude(self, path: str) -> None:
        """Refuse a composed bias that overflowed, or one or a map too large for float
        arithmetic (the map's norm bounded from its stored coefficients)."""
        bias = self.bias
        if not np.all(np.isfinite(bias)):
            raise OnnxlipError(f"{self.where(path)}: its composed bias overflows to Inf or NaN "
                               "(check the magnitude of the weights)")
        if bias.size and np.max(np.abs(bias)) > MAX_BLOCK_NORM:
            raise OnnxlipError(f"{self.where(path)}: its bias reaches {np.max(np.abs(bias)):.3g}, "
                               f"beyond the {MAX_BLOCK_NORM:g} onnxlip computes with")
        bound = self.map.coefficient_bound()
        if not bound <= MAX_BLOCK_NORM:
            raise OnnxlipError(f"{self.where(path)}: its weights are too large for floating-point "
                               f"arithmetic (norm up to {bound:.3g}; onnxlip handles up to "
                               f"{MAX_BLOCK_NORM:g})")

    def parts(self) -> list[LinearMap]:
        """The map of each input: [A_1 … A_k] where the block reads k blocks."""
        return self.map.parts if len(self.inputs) > 1 else [self.map]

    def model_layers(self) -> list[list[tuple[LinearMap, np.ndarray]]]:
        """For each input, the (map, bias) pairs the forward pass applies to it."""
        return self.layers or [[(self.map, self.bias)]]

    def split_input(self, x: np.ndarray) -> list[np.ndarray]:
        """The input vector cut into the values of the blocks it reads."""
        return [x] if len(self.inputs) == 1 else self.map.split(x)

    def pre_activation(self, x: np.ndarray) -> np.ndarray:
        total = None
        for layers, piece in zip(self.model_layers(), self.split_input(x)):
            for linear, bias in layers:
                piece = linear.matvec(piece) + bias
            total = piece if total is None else total + piece
        return total if self.shared is None else total + self.shared

    def pre_activation_bounded(self, x: np.ndarray, err: np.ndarray
                               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(y, local, total): the pre-activation from the layers' precise products, a
        bound of the block's own rounding (|y − exact block of the computed x|), and
        one of its whole error (|y − exact y*| given |x − x*| ≤ err). Each layer adds
        its products' rounding (LinearMap.matvec_bounded), then its bias in float64:
        |fl(y + b) − (y + b)| ≤ u/(1 − u)·|fl(y + b)|, none where y or b is 0."""
        y, (local, total) = self.apply_bounded(x, [np.zeros(x.size), err])
        return y, local, total

    def apply_bounded(self, x: np.ndarray, errors: list[np.ndarray], biases: bool = True
                      ) -> tuple[np.ndarray, list[np.ndarray]]:
        """The block's affine map (its linear part without `biases`) applied to x by
        its model layers, each input through its own then summed, with each error
        bound in `errors` carried and the products' and sums' rounding added."""
        total = sums = None
        pieces = zip(self.model_layers(), self.split_input(x), *[self.split_input(e) for e in errors])
        for layers, piece, *piece_errors in pieces:
            y, part = _run_bounded(layers, piece, piece_errors, biases)
            if total is None:
                total, sums = y, part
                continue
            total = total + y  # a sum of the inputs' values: one rounding each
            sums = [(a + b + 2 * U64 * np.abs(total)) * SLACK for a, b in zip(sums, part)]
        if biases and self.shared is not None:
            total, sums = _add_bias(total + self.shared, total, self.shared, sums)
        return total, sums

    def forward(self, x: np.ndarray) -> np.ndarray:
        return self.activate(self.pre_activation(x))


def _run_bounded(layers, x: np.ndarray, errors: list[np.ndarray], biases: bool = True):
    """x through (map, bias) layers with its error bounds: each layer adds its
    products' rounding (LinearMap.matvec_bounded), then (with `biases`) its bias in float64."""
    for linear, bias in layers:
        x, errors = linear.matvec_bounded(x, errors)
        if biases:
            x, errors = _add_bias(x + bias, x, bias, errors)
    return x, errors


def _add_bias(x: np.ndarray, y: np.ndarray, bias: np.ndarray, errors: list[np.ndarray]):
    """x = fl(y + b): |fl(y + b) − (y + b)| ≤ u/(1 − u)·|fl(y + b)|, none where y or b is 0."""
    added = np.where((y != 0) & (bias != 0), 2 * U64 * np.abs(x), 0.0)
    return x, [(e + added) * SLACK for e in errors]


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
                           dtype=np.float64, outputs=("y", "argmax"), entries=math.prod(p.in_shape))

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
class ActivationBlock(Block):
    """An activation that follows a block it cannot join (e.g. MaxPool then Relu, or a
    tensor that other nodes read too): z = σ(x), elementwise."""

    activation: Activation = None

    @property
    def kind(self) -> str:
        return self.activation.name

    @property
    def relu(self) -> bool:
        return isinstance(self.activation, ReLU)

    def reachable(self) -> bool:
        return self.relu

    def forward(self, x: np.ndarray) -> np.ndarray:
        return self.activation.value(x)

    def forward_bounded(self, x: np.ndarray, err: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """σ(x) and its error bound (Activation.value_bounded)."""
        return self.activation.value_bounded(x, err)


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
    layers: list[tuple[LinearMap, np.ndarray]] = field(default_factory=list)  # as lowered


@dataclass
class _Pending:
    """A tensor as an affine expression of block outputs that is not a block yet:
    Σ_j part_j + bias, with the names of the ops folded into it."""

    parts: list[_Part]
    shape: tuple[int, ...]
    bias: np.ndarray | None = None
    ops: list[str] = field(default_factory=list)
    shared: np.ndarray | None = None  # the part of `bias` added after the parts are summed

    @property
    def trivial(self) -> bool:
        """A block's output itself (or the input), up to reshapes."""
        return len(self.parts) == 1 and not self.parts[0].maps and self.bias is None

    def copy(self) -> _Pending:
        parts = [_Part(p.source, list(p.maps), list(p.names), list(p.layers)) for p in self.parts]
        return _Pending(parts, self.shape, self.bias, list(self.ops), self.shared)


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
            pending = self._close(pending)
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
            pending = self.state[name] = self._close(pending)
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
        if isinstance(layer, Activate):
            if not pending.trivial:
                return self._close(pending, layer.activation, label=node.op)
            source = pending.parts[0].source
            last = self.blocks[source] if source != INPUT else None
            relu = isinstance(layer.activation, ReLU)
            if relu and isinstance(last, (AffineBlock, ActivationBlock)) and last.relu and not pending.ops:
                last.ops.append(node.op)  # a ReLU of a ReLU
                return pending
            return self._block(ActivationBlock(node.name, pending.ops + [node.op], pending.shape,
                                               pending.shape, inputs=(source,),
                                               activation=layer.activation))
        if isinstance(layer, MaxPool):
            if not pending.trivial:
                pending = self._close(pending)
            block = MaxPoolBlock(node.name, pending.ops + [node.op], layer.in_shape,
                                 layer.out_shape, inputs=(pending.parts[0].source,), layer=layer)
            return self._block(block)
        raise TypeError(f"unknown layer {layer!r}")

    def _affine(self, pending: _Pending, layer: Affine, node: Lowered) -> _Pending:
        """Compose an affine layer into every part; a second heavy (not monomial)
        map closes the block first unless the two compose into one dense matrix."""
        heavy = not layer.map.monomial
        if heavy and len(pending.parts) > 1:
            pending = self._close(pending)
        merged = False
        if heavy and any(not m.monomial for m in pending.parts[0].maps):
            merged = _merge_dense(pending.parts[0], layer, self.options)
            if not merged:
                pending = self._close(pending)
        single = len(pending.parts) == 1
        for part in pending.parts:
            if not merged:
                part.maps.append(layer.map)
            part.names.append((node.name, layer.map.monomial))
            part.layers.append((layer.map, layer.bias if single else 0.0))
        if not single:
            shared = pending.shared
            pending.shared = layer.bias if shared is None else layer.map.matvec(shared) + layer.bias
        bias = layer.bias if pending.bias is None else layer.map.matvec(pending.bias) + layer.bias
        pending.bias = bias
        pending.ops.append(node.op)
        pending.shape = layer.map.out_shape
        return pending

    def _close(self, pending: _Pending, activation: Activation | None = None,
               label: str | None = None) -> _Pending:
        """Make the pending expression (and the activation after it) a block; its output."""
        maps = [chain(p.maps) if p.maps else MonomialMap.diagonal(np.ones(pending.shape), pending.shape)
                for p in pending.parts]
        names = [n for p in pending.parts for n in p.names]
        heavy = [n for n, mono in names if not mono]
        name = heavy[0] if heavy else (names[0][0] if names else "")
        linear = _represent(maps[0], self.options) if len(maps) == 1 else StackMap(maps)
        bias = np.zeros(linear.out_size) if pending.bias is None else pending.bias
        ops = pending.ops + ([label] if label else [])
        layers = [p.layers or [(m, 0.0)] for p, m in zip(pending.parts, maps)]
        block = AffineBlock(name, ops, linear.in_shape, pending.shape,
                            inputs=tuple(p.source for p in pending.parts), map=linear, bias=bias,
                            activation=activation, layers=layers, shared=pending.shared)
        return self._block(block)

    def _block(self, block: Block) -> _Pending:
        self.blocks.append(block)
        return _Pending([_Part(len(self.blocks) - 1)], block.out_shape)


def _merged(pendings: list[_Pending], layer: Merge, node: Lowered) -> _Pending:
    """Σ_j maps[j](pending_j): the parts of every input, each placed by its map."""
    parts, ops, bias, shared = [], [], None, None
    for pending, placement in zip(pendings, layer.maps):
        for part in pending.parts:
            parts.append(_Part(part.source, part.maps + [placement],
                               part.names + [(node.name, True)],
                               part.layers + [(placement, 0.0)]))
        ops.extend(pending.ops)
        if pending.bias is not None:
            placed = placement.matvec(pending.bias)
            bias = placed if bias is None else bias + placed
        if pending.shared is not None:
            placed = placement.matvec(pending.shared)
            shared = placed if shared is None else shared + placed
    return _Pending(parts, layer.shape, bias, ops + [node.op], shared)


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
    """The transpose of a flow (u a vector or columns): u at the last block's output goes back to the
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
    return pending.get(INPUT, np.zeros((in_size, *u.shape[1:])))


def is_chain(blocks: list[Block]) -> bool:
    """Whether every block reads exactly the one before it."""
    return all(b.inputs == (k - 1,) for k, b in enumerate(blocks))
