"""Fuzz campaigns against onnxlip's model loader (onnxlip.load).

Each case is a valid seed model with one to three byte- or field-level
mutations (tests/fuzzing.py), loaded in a memory-limited child process with a
per-case timeout. Every case must end in success or onnxlip.OnnxlipError; any
other exception, a timeout or a dead process is a failure, saved with a
reproducer (the model bytes and a .txt with the mutations and the traceback).

    python tools/fuzz.py --cases 5000 --seed 1 --timeout 60
    python tools/fuzz.py --cases 500 --bound          # also forward pass + bounds of models that load
    python tools/fuzz.py --corpus tests/corpus        # the stored nasty models
    python tools/fuzz.py --replay fuzz-failures/case-1-42.onnx
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from fuzzing import Outcome, Worker, generate, seed_models  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=1000, help="number of mutated models (1000)")
    parser.add_argument("--seed", type=int, default=0, help="campaign seed (0)")
    parser.add_argument("--start", type=int, default=0, help="first case index (0)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per case (60)")
    parser.add_argument("--workers", type=int, default=1, help="child processes (1)")
    parser.add_argument("--memory", type=float, default=6.0, help="GiB of address space per child (6)")
    parser.add_argument("--bound", action="store_true",
                        help="also run the forward pass and the bounds of models that load")
    parser.add_argument("--corpus", type=Path, help="run the .onnx files of this folder instead")
    parser.add_argument("--replay", type=Path, nargs="+", help="run these model files and show details")
    parser.add_argument("--out", type=Path, default=Path("fuzz-failures"),
                        help="folder for reproducers of failures (fuzz-failures/)")
    args = parser.parse_args(argv)

    if args.replay or args.corpus:
        files = args.replay or sorted(args.corpus.glob("*.onnx"))
        jobs = [(f.name, f.read_bytes(), str(f)) for f in files]
    else:
        seeds = seed_models()
        jobs = ((f"case-{args.seed}-{i}", *generate(args.seed, i, seeds))
                for i in range(args.start, args.start + args.cases))
    return run(jobs, args)


def run(jobs, args) -> int:
    counts: collections.Counter = collections.Counter()
    kinds: collections.Counter = collections.Counter()
    failures: list[tuple[str, str, Outcome]] = []
    slowest: list[tuple[float, str]] = []
    lock = threading.Lock()
    source = iter(jobs)
    start = time.perf_counter()

    def drain() -> None:
        with Worker(bound=args.bound, memory_bytes=int(args.memory * 2**30)) as worker:
            while True:
                with lock:
                    job = next(source, None)
                if job is None:
                    return
                name, data, description = job
                outcome = worker.run(data, args.timeout)
                with lock:
                    counts[outcome.status] += 1
                    kinds[_kind(outcome)] += 1
                    slowest.append((outcome.seconds, name))
                    if outcome.failed:
                        failures.append((name, description, outcome))
                        _save(args.out, name, data, description, outcome)
                    if args.replay:
                        print(f"{name}: {outcome.status} ({outcome.seconds:.2f} s)\n  {description}\n"
                              f"  {outcome.detail.strip()}")
                    done = sum(counts.values())
                    if done % 500 == 0:
                        print(f"  {done} cases, {dict(counts)}, {time.perf_counter() - start:.0f} s",
                              file=sys.stderr, flush=True)

    threads = [threading.Thread(target=drain) for _ in range(max(1, args.workers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    total = sum(counts.values())
    print(f"{total} cases in {time.perf_counter() - start:.1f} s: "
          + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    print("most common outcomes:")
    for kind, n in kinds.most_common(15):
        print(f"  {n:6d}  {kind}")
    print("slowest cases: " + ", ".join(f"{n} {s:.2f} s" for s, n in sorted(slowest)[-5:]))
    if failures:
        print(f"{len(failures)} FAILURES (reproducers in {args.out}/):")
        for name, description, outcome in failures:
            last = outcome.detail.strip().splitlines()[-1] if outcome.detail.strip() else ""
            print(f"  {name}: {outcome.status}: {last}\n      {description}")
        return 1
    print("no failures")
    return 0


def _kind(outcome: Outcome) -> str:
    """The outcome with file names and numbers blurred, to group similar messages."""
    text = outcome.detail.strip().splitlines()[-1] if outcome.detail.strip() else ""
    text = re.sub(r"^\S*case\.onnx: ", "", text)
    text = re.sub(r"'[^'\s]*'", "'…'", text)
    text = re.sub(r"\d+", "N", text)
    return f"{outcome.status}: {text[:100]}"


def _save(folder: Path, name: str, data: bytes, description: str, outcome: Outcome) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.onnx").write_bytes(data)
    (folder / f"{name}.txt").write_text(
        f"{description}\n{outcome.status} after {outcome.seconds:.2f} s\n{outcome.detail}\n")


if __name__ == "__main__":
    sys.exit(main())
