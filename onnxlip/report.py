"""Plain-text tables and JSON-ready records for the command line."""

from __future__ import annotations

import math
from collections.abc import Sequence

from .blocks import Block
from .bounds import LayerRecord


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Columns padded to their widest cell, numbers right-aligned."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
              for i, h in enumerate(headers)]
    numeric = [bool(cells) and all(_is_number(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(h.rjust(w) if n else h.ljust(w) for h, w, n in zip(headers, widths, numeric))]
    lines.append("  ".join("-" * w for w in widths))
    for r in cells:
        lines.append("  ".join(c.rjust(w) if n else c.ljust(w) for c, w, n in zip(r, widths, numeric)))
    return "\n".join(line.rstrip() for line in lines)


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, tuple):
        return "x".join(str(v) for v in value)
    if isinstance(value, list):
        return "+".join(str(v) for v in value)
    return str(value)


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text)) or text in ("inf", "nan")
    except ValueError:
        return text == "-"


def shape_text(shape: Sequence[int]) -> str:
    return "x".join(str(d) for d in shape)


def block_rows(blocks: Sequence[Block], norms: Sequence[float] | None = None) -> list[list]:
    rows = []
    for i, b in enumerate(blocks):
        row = [i, b.name, b.kind, list(b.ops), tuple(b.in_shape), tuple(b.out_shape), b.describe()]
        if norms is not None:
            row.append(norms[i])
        rows.append(row)
    return rows


BLOCK_HEADERS = ["#", "name", "kind", "ops", "input", "output", "operator"]


def layer_rows(layers: Sequence[LayerRecord]) -> list[list]:
    return [
        [r.index, r.name, r.kind, r.eps_in, r.bound, r.active, r.inactive, r.uncertain,
         r.iterations, r.residual if r.iterations else None, r.seconds]
        for r in layers
    ]


LAYER_HEADERS = ["#", "name", "kind", "eps_in", "L_k", "active", "inactive", "uncertain",
                 "iters", "residual", "seconds"]
