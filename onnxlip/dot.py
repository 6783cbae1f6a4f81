"""The graph of blocks as Graphviz DOT (networkx + pydot), or rendered by `dot`."""

from __future__ import annotations

import shutil
from pathlib import Path

import networkx as nx
import pydot

from .blocks import INPUT, Block
from .errors import OnnxlipError
from .report import check_output

#: Formats written as DOT text, and those rendered by Graphviz's dot program.
TEXT = {".dot", ".gv"}
RENDERED = {".svg", ".png", ".pdf"}


def check_graph_path(path: str | Path) -> None:
    """Refuse, before any work, a path that cannot be written, of an unknown format,
    or of a format that needs a missing `dot`."""
    check_output(path, "--graph", sorted(f[1:] for f in TEXT | RENDERED))
    suffix = Path(path).suffix.lower()
    if suffix in RENDERED and shutil.which("dot") is None:
        raise OnnxlipError(f"--graph {path}: writing {suffix[1:].upper()} needs Graphviz's 'dot' "
                           "program, which is not installed (install graphviz, or write .dot)")


def block_graph(blocks: list[Block], input_shape, norms: list[float] | None = None) -> nx.DiGraph:
    """A DiGraph of the blocks: nodes 'input' and 'b{k}', edges from each source
    to its reader labelled with the tensor's shape."""
    graph = nx.DiGraph()
    shape = "x".join(map(str, input_shape))
    graph.add_node("input", label=f"input\n{shape}", shape="oval")
    for k, block in enumerate(blocks):
        lines = [f"#{k} {block.name}", f"{block.kind}: {'+'.join(block.ops)}",
                 "x".join(map(str, block.out_shape))]
        if norms is not None:
            lines.append(f"norm {norms[k]:.6g}")
        graph.add_node(f"b{k}", label="\n".join(lines), shape="box")
        for j in block.inputs:
            source = "input" if j == INPUT else f"b{j}"
            size = "x".join(map(str, input_shape if j == INPUT else blocks[j].out_shape))
            graph.add_edge(source, f"b{k}", label=size)
    return graph


def write_graph(graph: nx.DiGraph, path: str | Path) -> None:
    """Write DOT text, or the picture `dot` renders from it (pydot quotes every
    attribute itself: networkx's own converter does not in every version)."""
    dot = pydot.Dot(graph_type="digraph")
    for name, attrs in graph.nodes(data=True):
        dot.add_node(pydot.Node(name, **attrs))
    for source, target, attrs in graph.edges(data=True):
        dot.add_edge(pydot.Edge(source, target, **attrs))
    suffix = Path(path).suffix.lower()
    if suffix in TEXT:
        Path(path).write_text(dot.to_string())
    else:
        Path(path).write_bytes(dot.create(format=suffix[1:]))
