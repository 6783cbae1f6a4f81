#!/usr/bin/env python3
"""Create the ONNX example, test and benchmark models used by onnxlip.

Usage: ``python tools/make_models.py [--out models] [--skip-torch]``

Without a family flag this writes every shipped model into ``--out`` (default
``models/``): the original ones (``tiny_dense``, ``cifar_bn``, ``digits_mlp``,
``digits_cnn``, ``digits_test.npz``) and the small members of the tightness set
and of the exporter zoo, each with its ``<name>_x0.npy``. Everything is seeded and
deterministic: the output is byte-for-byte what ``models/`` holds.

Family flags build one family (all its members, or the NAMEs given): members
small enough to ship go to ``--out``, the others to the cache folder (``--cache``,
default ``$ONNXLIP_CACHE``, else ``~/.cache/onnxlip``; never inside the repository).

* ``--tight-set [NAME ...]``: trained digits nets with every ReLU and max-pool
  window provably stable at eps = 1e-3 around x0 (tools/models/tight.py).
* ``--zoo [NAME ...]``: torchvision ResNet-18/50 and MobileNetV2, a residual CNN,
  a global-mean-pool CNN and one MLP per activation, each exported with both torch
  exporters (tools/models/zoo.py).
* ``--large [NAME ...]``: AlexNet, VGG16, VGG11 chains from numpy (tools/models/large.py).

Each family module documents its members; tools/README.md has sizes and times.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

# tools/models/__init__.py pins torch's CPU kernels; it runs here, before anything imports torch
from models.common import REPO_ROOT, ModelRow, default_cache, print_rows  # noqa: E402

from models import large, shipped, tight, zoo  # noqa: E402


def _need_torch(parser: argparse.ArgumentParser) -> None:
    """Exit with a one-line message if torch or scikit-learn is missing."""
    try:
        import sklearn  # noqa: F401
        import torch  # noqa: F401
    except ImportError as exc:
        parser.exit(1, f"error: {exc}; install torch (CPU) and scikit-learn, or pass --skip-torch\n")


def build_shipped(out: Path, skip_torch: bool, parser: argparse.ArgumentParser) -> None:
    """Write every shipped model into ``out`` and list the files."""
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    shipped.build_helper_models(out)
    rows: list[ModelRow] = []
    if not skip_torch:
        _need_torch(parser)
        shipped.build_digits(out)
        rows += tight.build(list(tight.SHIPPED), out, None)
        rows += zoo.build(list(zoo.SHIPPED), out, None)
    if rows:
        print_rows(rows)
    files = sorted(p for p in out.iterdir() if p.suffix in {".onnx", ".npy", ".npz"})
    total = sum(p.stat().st_size for p in files)
    print(f"\n{len(files)} files in {out}/, {total} bytes total, {time.perf_counter() - t0:.1f}s")
    for p in files:
        print(f"  {p.name:32s} {p.stat().st_size:8d}")


def main(argv: list[str] | None = None) -> None:
    """Parse arguments; build the shipped models, or the families asked for."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: models)")
    parser.add_argument("--skip-torch", action="store_true", help="only build the models that need no torch")
    parser.add_argument(
        "--large", nargs="*", choices=large.LARGE_NAMES, metavar="NAME",
        help=f"instead build large benchmark models into the cache: {', '.join(large.LARGE_NAMES)} "
        "(default: all)",
    )  # fmt: skip
    parser.add_argument(
        "--tight-set", nargs="*", choices=tight.NAMES, metavar="NAME",
        help=f"instead build the tightness test set: {', '.join(tight.NAMES)} (default: all)",
    )  # fmt: skip
    parser.add_argument(
        "--zoo", nargs="*", choices=zoo.NAMES, metavar="NAME",
        help=f"instead build exporter-zoo models, each with both exporters: {', '.join(zoo.NAMES)} "
        "(default: all)",
    )  # fmt: skip
    parser.add_argument(
        "--cache", type=Path, default=None,
        help="cache directory for the family flags (default: $ONNXLIP_CACHE or ~/.cache/onnxlip)",
    )  # fmt: skip
    args = parser.parse_args(argv)

    families = [f for f in ("large", "tight_set", "zoo") if getattr(args, f) is not None]
    if not families:
        if args.cache is not None:
            parser.error("--cache only applies with --large, --tight-set or --zoo")
        build_shipped(args.out if args.out is not None else Path("models"), args.skip_torch, parser)
        return
    if args.skip_torch:
        parser.error("--skip-torch applies to the shipped models, not to a family flag")
    if families == ["large"] and args.out is not None:
        parser.error("--out and --skip-torch apply to the small models, not --large")
    cache = (args.cache or default_cache()).expanduser().resolve()
    if cache.is_relative_to(REPO_ROOT):
        parser.error(f"cache {cache} is inside the repository {REPO_ROOT}; use a folder outside it")
    out = args.out if args.out is not None else Path("models")
    if args.large is not None:
        large.build_large_models(args.large, cache)
    rows: list[ModelRow] = []
    if args.tight_set is not None or args.zoo is not None:
        _need_torch(parser)
    t0 = time.perf_counter()
    if args.tight_set is not None:
        rows += tight.build(args.tight_set or list(tight.NAMES), out, cache)
    if args.zoo is not None:
        rows += zoo.build(args.zoo or list(zoo.NAMES), out, cache)
    if rows:
        print_rows(rows)
        print(f"\n{len(rows)} models ({out}/ and {cache}/), {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    main()
