"""Fuzzing of the model loader: the stored corpus of nasty models
(tests/corpus/, made by tools/make_corpus.py) and a few hundred seeded
mutations of valid models (tests/fuzzing.py). Every case must load or raise
onnxlip.OnnxlipError within the time limit, in a memory-limited child process
with ONNXLIP_DEBUG=1; never crash, hang or raise anything else.
Long campaigns: python tools/fuzz.py --cases 5000 --seed 1.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from fuzzing import Worker, generate, seed_models

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "tests" / "corpus"
MANIFEST = json.loads((CORPUS / "MANIFEST.json").read_text())
TIMEOUT = 20.0
MUTATIONS = 300


@pytest.fixture(scope="module")
def worker():
    with Worker(bound=False, memory_bytes=6 << 30) as w:
        yield w


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_corpus(worker, name):
    outcome = worker.run((CORPUS / name).read_bytes(), TIMEOUT)
    assert outcome.status == MANIFEST[name]["expect"], outcome.detail
    assert outcome.seconds < 5, f"{outcome.seconds:.1f} s"


def test_corpus_is_what_make_corpus_writes(tmp_path):
    spec = importlib.util.spec_from_file_location("make_corpus", ROOT / "tools" / "make_corpus.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--out", str(tmp_path)])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in CORPUS.iterdir())
    for path in tmp_path.iterdir():
        assert path.read_bytes() == (CORPUS / path.name).read_bytes(), path.name
    assert all(MANIFEST[name]["bytes"] < 16_000 for name in MANIFEST)


def test_seeded_mutations(worker):
    seeds = seed_models()
    failures, statuses = [], {}
    for index in range(MUTATIONS):
        data, description = generate(7, index, seeds)
        outcome = worker.run(data, TIMEOUT)
        statuses[outcome.status] = statuses.get(outcome.status, 0) + 1
        if outcome.failed:
            failures.append(f"case {index} ({description}): {outcome.status}: {outcome.detail}")
    assert not failures, "\n".join(failures)
    assert statuses.get("ok", 0) > 0 and statuses.get("error", 0) > 0, statuses
