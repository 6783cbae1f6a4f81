"""Plain-text tables, JSON-ready records and output files for the command line."""

from __future__ import annotations

import math
import shutil
from collections.abc import Sequence
from pathlib import Path

from .blocks import Block
from .bounds import LayerRecord
from .errors import OnnxlipError

#: How plots and tables name the local-bound methods.
METHOD_LABELS = {"auto": "onnxlip's default", "paper": "paper's method", "tight": "--method tight"}


def method_label(method: str) -> str:
    return METHOD_LABELS.get(method, f"method {method!r}")


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
        reads = ["x" if j < 0 else j for j in b.inputs]
        row = [i, b.name, b.kind, list(b.ops), reads, tuple(b.in_shape), tuple(b.out_shape),
               b.describe()]
        if norms is not None:
            row.append(norms[i])
        rows.append(row)
    return rows


#: "reads": the blocks whose outputs a block reads (x: the network's input).
BLOCK_HEADERS = ["#", "name", "kind", "ops", "reads", "input", "output", "operator"]


def layer_rows(layers: Sequence[LayerRecord]) -> list[list]:
    return [
        [r.index, r.name, r.kind, r.eps_in, r.bound, r.active, r.inactive, r.uncertain, r.test,
         r.iterations, r.residual if r.iterations else None, r.seconds]
        for r in layers
    ]


#: "decided by": how the states were proven (method auto: exact reach, relaxed
#: reach or paper radius; the paper's radii otherwise).
LAYER_HEADERS = ["#", "name", "kind", "eps_in", "L_k", "active", "inactive", "uncertain",
                 "decided by", "iters", "residual", "seconds"]


def plot_formats() -> list[str]:
    """The file suffixes matplotlib can write here (pgf only with its TeX system)."""
    import matplotlib
    from matplotlib.backend_bases import FigureCanvasBase

    formats = dict(FigureCanvasBase.get_supported_filetypes())  # a copy: pop below
    if shutil.which(matplotlib.rcParams["pgf.texsystem"]) is None:
        formats.pop("pgf", None)
    return sorted(formats)


def check_plot(path: str | Path, option: str = "plot") -> None:
    """check_output for a figure: a writable file of a format matplotlib writes."""
    check_output(path, option, plot_formats(), "a format matplotlib writes (.png, .svg, .pdf, ...)")


def check_output(path: str | Path, option: str, formats: Sequence[str] | None = None,
                 formats_text: str | None = None) -> None:
    """Refuse an output file that cannot be written, or of a format not in `formats`
    (suffixes without the dot; `formats_text` says what they are when they are many).
    An existing file is left as it is; a new one is created to prove the folder
    writable, then removed."""
    target = Path(path)
    if formats is not None:
        suffix = target.suffix.lower().lstrip(".")
        if suffix not in formats:
            found = f"format {target.suffix!r}" if suffix else "no file suffix"
            wanted = formats_text or f"one of {', '.join('.' + f for f in formats)}"
            raise OnnxlipError(f"{option} {path}: {found}; use {wanted}")
    if target.is_dir():
        raise OnnxlipError(f"{option} {path}: is a directory")
    if not target.parent.is_dir():
        raise OnnxlipError(f"{option} {path}: no such directory {str(target.parent)!r}")
    existed = target.exists()
    try:
        with open(target, "ab"):
            pass
    except OSError as exc:
        raise OnnxlipError(f"{option} {path}: cannot write ({exc.strerror})") from None
    if not existed:
        target.unlink(missing_ok=True)
