"""Dask as the parallel engine: a real LocalCluster of 2 worker processes, killed
workers and clients, resumed results files, failing inputs, an external cluster.

Every wait is bounded; nothing asserts on time.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

try:
    import fcntl
except ImportError:  # not POSIX: each xdist worker makes its own reference rows
    fcntl = None

pytest.importorskip("distributed")

from onnxlip import distributed  # noqa: E402
from onnxlip.cli import main  # noqa: E402
from onnxlip.dataset import certify_dataset, read_batch, read_results  # noqa: E402
from onnxlip.network import load  # noqa: E402
from onnxlip.sweep import run_sweep, run_sweep_distributed  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL = str(ROOT / "models" / "digits_cnn.onnx")
DATA = ROOT / "models" / "digits_test.npz"
OPTIONS = dict(path=MODEL, input_shape=None, input_name=None, output_name=None,
               operators="auto", memory_budget=1e9, tol=1e-6)
WAIT = 600  # seconds: the ceiling of any one wait on a loaded 2-core machine
COUNT = 40  # the digits the dataset runs certify (of 100): enough for a kill mid-run


def within(seconds: float, func, *args, **kwargs):
    """func(*args) in a thread, failing the test if it takes longer than `seconds`."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(func, *args, **kwargs).result(timeout=seconds)


@pytest.fixture(scope="session")  # session: once per pytest-xdist worker, whatever runs between
def client():
    with distributed.open_client(workers=2, announce=False) as c:
        c.wait_for_workers(2, timeout=WAIT)
        yield c


@pytest.fixture(scope="session")
def digits():
    data = np.load(DATA)
    return data["x"], data["y"]


@pytest.fixture(scope="session")
def clean(tmp_path_factory, digits, worker_id):
    """The first COUNT digits certified in one process, without interruption: the
    reference rows. Made once per run: under pytest-xdist the first worker to need
    them writes them in the run's shared temporary directory, under a lock, and
    the others read them (pytest-xdist's recipe for session data)."""
    alone = worker_id == "master" or fcntl is None
    home = tmp_path_factory.mktemp("clean") if alone else tmp_path_factory.getbasetemp().parent
    rows = home / "clean.jsonl"
    with open(rows.with_suffix(".lock"), "w") as lock:
        if not alone:
            fcntl.flock(lock, fcntl.LOCK_EX)
        if not rows.exists():
            partial = rows.with_suffix(".partial")
            certify_dataset(OPTIONS, *digits, workers=1, out=partial, source=str(DATA), end=COUNT)
            partial.replace(rows)
    return rows_of(rows)


def rows_of(path) -> list[dict]:
    return read_results(path)[1]


def comparable(rows: list[dict]) -> set[str]:
    """Rows as a set, less their timing."""
    return {json.dumps({k: v for k, v in r.items() if k != "seconds"}, sort_keys=True)
            for r in rows}


def wait_for_rows(path: Path, count: int, seconds: float = WAIT) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if path.is_file() and path.read_text().count("\n") > count:
            return
        time.sleep(0.1)
    raise AssertionError(f"{path}: fewer than {count} rows after {seconds} s")


def cli(*args: str, timeout: float = WAIT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "onnxlip.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, check=False)


def test_cluster_rows_equal_in_process_and_one_load_per_worker(client, digits, clean, tmp_path):
    x, y = digits
    out = tmp_path / "r.jsonl"
    result = within(WAIT, certify_dataset, OPTIONS, x, y, out=out, source=str(DATA), end=24,
                    client=client)
    assert [r["index"] for r in result.rows] == list(range(24))
    assert comparable(rows_of(out)) == comparable(clean[:24])
    loads = client.run(distributed.loads)
    assert sorted(n for _, n in loads.values()) == [1, 1]  # each worker: the model once


def test_worker_killed_mid_run_every_input_once(client, digits, clean, tmp_path):
    x, y = digits
    out = tmp_path / "r.jsonl"
    victim = next(iter(client.run(os.getpid).values()))
    with ThreadPoolExecutor(1) as pool:
        run = pool.submit(certify_dataset, OPTIONS, x, y, out=out, source=str(DATA), end=COUNT,
                          client=client)
        wait_for_rows(out, 6)
        os.kill(victim, signal.SIGKILL)
        result = run.result(timeout=WAIT)
    assert victim not in client.run(os.getpid).values()  # it really died
    indices = [r["index"] for r in rows_of(out)]
    assert sorted(indices) == list(range(COUNT))  # every input exactly once
    assert not result.failed
    assert comparable(rows_of(out)) == comparable(clean)


def test_client_killed_then_rerun_resumes(clean, tmp_path):
    out = tmp_path / "r.jsonl"
    command = ["certify", MODEL, "--inputs", str(DATA), "--end", str(COUNT), "--workers", "2",
               "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "onnxlip.cli", *command], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        wait_for_rows(out, 10)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        kill_group(proc)
    before = rows_of(out)
    assert 10 <= len(before) < COUNT
    with open(out, "a") as handle:
        handle.write(f'{{"index": {COUNT - 1}, "top_cl')  # a row torn by the kill
    done = cli(*command)
    assert done.returncode == 0, done.stderr
    after = rows_of(out)
    assert after[:len(before)] == before  # resumed: nothing redone
    assert sorted(r["index"] for r in after) == list(range(COUNT))
    assert comparable(after) == comparable(clean)


def test_failing_input_recorded_and_exit_code(client, digits, tmp_path, capsys):
    x, y = digits
    bad = np.array(x[:5], dtype=np.float32)
    bad[2, 0, 3, 3] = np.nan
    batch = tmp_path / "bad.npy"
    np.save(batch, bad)
    out = tmp_path / "r.jsonl"
    assert main(["certify", MODEL, "--inputs", str(batch), "--workers", "1", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "1 input(s) failed" in err and "NaN" in err
    rows = {r["index"]: r for r in rows_of(out)}
    assert sorted(rows) == list(range(5)) and "NaN" in rows[2]["error"]
    assert all(rows[i]["error"] is None for i in (0, 1, 3, 4))
    on_cluster = within(WAIT, certify_dataset, OPTIONS, read_batch(batch, None, (1, 1, 8, 8))[0],
                        None, client=client)
    assert on_cluster.failed.keys() == {2} and len(on_cluster.certificates) == 4
    assert main(["report", str(out), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["summary"]["inputs"] == 4 and report["summary"]["failed"] == 1


def test_mismatched_resume_refused_and_shards(tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    base = ["certify", MODEL, "--inputs", str(DATA), "--workers", "1", "--out", str(out)]
    assert main([*base, "--start", "3", "--end", "5"]) == 0
    assert [r["index"] for r in rows_of(out)] == [3, 4]
    assert main([*base, "--end", "4"]) == 0  # another shard into the same file: 0..2 added
    assert sorted(r["index"] for r in rows_of(out)) == [0, 1, 2, 3, 4]
    capsys.readouterr()
    text = out.read_text()
    assert main([*base, "--rel-tol", "0.01"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "another run" in err and "rel_tol" in err
    other = str(ROOT / "models" / "digits_mlp.onnx")
    assert main(["certify", other, "--inputs", str(DATA), "--workers", "1", "--out", str(out)]) == 2
    assert "model_sha256" in capsys.readouterr().err
    assert out.read_text() == text  # refused runs leave the file alone


def test_report_recomputes_summary_and_plot(clean, tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    header = {"onnxlip_results": 1, "model": MODEL, "inputs": str(DATA), "count": COUNT}
    out.write_text("\n".join(json.dumps(r) for r in [header, *clean]) + "\n")
    png = tmp_path / "acc.png"
    assert main(["report", str(out), "--radii", "0.01", "--plot", str(png), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)["summary"]
    local = [r["radius_local"] for r in clean if r["correct"]]
    assert summary["inputs"] == COUNT
    assert summary["median_radius_local"] == pytest.approx(float(np.median(local)))
    expected = np.mean([r["radius_local"] >= 0.01 if r["correct"] else False for r in clean])
    assert summary["certified_accuracy"]["0.01"]["local"] == pytest.approx(expected)
    assert png.stat().st_size > 0


def test_large_npy_is_memory_mapped_and_sent_in_chunks(tmp_path, digits, monkeypatch):
    batch = tmp_path / "x.npy"
    np.save(batch, digits[0][:10])
    x, _ = read_batch(batch, None, (1, 1, 8, 8))
    assert isinstance(x, np.memmap) or isinstance(x.base, np.memmap)
    sizes = []

    def fake_map(client, func, jobs, window, split):  # the jobs the cluster would be sent
        for job in jobs:
            sizes.append(len(job[2]))
            assert not isinstance(job[2], np.memmap)
            yield job, [{"index": i, "label": None, "error": "not run"} for i in job[1]]

    monkeypatch.setattr(distributed, "map_unordered", fake_map)
    monkeypatch.setattr(distributed, "worker_count", lambda client: 1)
    certify_dataset(OPTIONS, x, None, client=object())
    assert sum(sizes) == 10 and max(sizes) <= 4


def test_poisonous_chunk_is_split_and_only_its_culprit_fails(client):
    def die_on_two(*items):
        if 2 in items:
            os._exit(1)  # the worker process dies, as from the kernel's OOM killer
        return sum(items)

    def split(job):
        return [(i,) for i in job]

    outcomes = dict(within(WAIT, lambda: list(distributed.map_unordered(
        client, die_on_two, [(1, 2, 3), (4,)], 2, split))))
    assert outcomes[(1,)] == 1 and outcomes[(3,)] == 3 and outcomes[(4,)] == 4
    assert isinstance(outcomes[(2,)], Exception) and len(outcomes) == 4


def test_jobs_that_shared_a_worker_with_the_culprit_still_succeed(client):
    """Single jobs queued on the worker a culprit kills die with it, each time:
    they run again at the end, alone, and only the culprit fails (CI saw an
    innocent job reported failed when its worker died under it three times)."""
    from distributed.scheduler import KilledWorker

    def die_on_two(item):
        if item == 2:
            os._exit(1)
        time.sleep(0.05)
        return item * 10

    jobs = [(2,)] + [(i,) for i in range(3, 11)]
    outcomes = dict(within(WAIT, lambda: list(distributed.map_unordered(
        client, die_on_two, jobs, len(jobs), lambda job: [job]))))
    assert isinstance(outcomes[(2,)], KilledWorker)
    assert {job: outcomes[job] for job in jobs[1:]} == {(i,): i * 10 for i in range(3, 11)}


def test_sweep_on_cluster_equals_sequential(client):
    x0 = np.load(ROOT / "models" / "digits_cnn_x0.npy")
    eps = list(np.geomspace(1e-3, 1.0, 6))
    parallel = within(WAIT, run_sweep_distributed, OPTIONS, x0, eps, client=client)
    sequential = run_sweep(load(**OPTIONS), x0, eps)
    assert parallel.global_bound == pytest.approx(sequential.global_bound, rel=1e-9)
    for a, b in zip(parallel.rows(), sequential.rows()):
        for key in ("eps", "local_bound", "lower_best", "lower_sampled"):
            assert a[key] == pytest.approx(b[key], rel=1e-6), key


def test_seeded_sweep_on_cluster_has_the_sequential_rows(client):
    """With the run's seed given, every value of every row is the in-process sweep's,
    whichever worker took which radius and in whatever order."""
    options = dict(OPTIONS, seed=5)
    x0 = np.load(ROOT / "models" / "digits_cnn_x0.npy")
    eps = list(np.geomspace(1e-3, 1.0, 6))
    parallel = within(WAIT, run_sweep_distributed, options, x0, eps, client=client)
    sequential = run_sweep(load(**options), x0, eps)
    assert parallel.global_bound == sequential.global_bound
    assert comparable(parallel.rows()) == comparable(sequential.rows())
    assert len(comparable(parallel.rows())) == len(eps)


def test_local_cluster_keeps_malloc_thresholds_dynamic(client):
    """Dask's nanny sets MALLOC_TRIM_THRESHOLD_, which fixes glibc's mmap threshold
    (each large array then mapped and unmapped afresh: twice the CPU of a sweep). The
    LocalCluster unsets it, in its workers and in this process's environment."""
    client.wait_for_workers(2, timeout=WAIT)  # a worker killed by an earlier test comes back
    assert set(client.run(trim_setting()).values()) == {None}
    assert distributed.TRIM_VARIABLE not in os.environ


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_worker_of_another_cluster_sets_malloc_thresholds(monkeypatch):
    monkeypatch.delenv(distributed.TRIM_VARIABLE, raising=False)
    assert not distributed.keep_malloc_dynamic()  # nothing fixed them: left to glibc
    monkeypatch.setenv(distributed.TRIM_VARIABLE, "65536")
    assert distributed.keep_malloc_dynamic()


def trim_setting():
    """A function that returns its worker's MALLOC_TRIM_THRESHOLD_, made here so that
    it is sent by value (the workers cannot import this module), and reading the
    worker's environment (os.environ.get would be sent with this process's)."""
    def setting() -> str | None:
        import os

        return os.environ.get("MALLOC_TRIM_THRESHOLD_")

    return setting


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_separate_scheduler_and_workers_certify_digits(digits, clean, tmp_path):
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    dask = [sys.executable, "-m", "dask"]
    started = [subprocess.Popen([*dask, "scheduler", "--host", "127.0.0.1", "--port", str(port),
                                 "--no-dashboard"], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)]
    try:
        for _ in range(2):
            started.append(subprocess.Popen(
                [*dask, "worker", address, "--nthreads", "1", "--no-dashboard",
                 "--host", "127.0.0.1", "--death-timeout", "120"], env=env,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        out = tmp_path / "r.jsonl"
        done = cli("certify", MODEL, "--inputs", str(DATA), "--end", "20", "--scheduler", address,
                   "--out", str(out))
        assert done.returncode == 0, done.stderr
        assert f"Dask cluster {address}" in done.stderr
        assert comparable(rows_of(out)) == comparable(clean[:20])
        with distributed.open_client(scheduler=address, announce=False) as other:
            # these workers' nanny fixed malloc's thresholds; onnxlip's tasks set them again
            assert all(other.run(trim_setting()).values())
            assert set(other.run(distributed.keep_malloc_dynamic).values()) == {True}
    finally:
        for proc in started:
            kill_group(proc)


def kill_group(proc: subprocess.Popen) -> None:
    """End a process started here in its own session, and whatever it started."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


def test_workers_run_single_threaded(client, digits):
    x = np.array(digits[0][:1])

    def certify_then_settings():
        from threadpoolctl import threadpool_info

        from onnxlip.certify import TOP_CLASS
        from onnxlip.dataset import _certify_on_worker
        from onnxlip.operators import ort

        [row] = _certify_on_worker(OPTIONS, [0], x, [None], 1e-3, "paper", TOP_CLASS)
        blas = [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]
        return row["error"], ort.THREADS, max(blas, default=1)

    assert set(within(WAIT, client.run, certify_then_settings).values()) == {(None, 1, 1)}


def test_sweep_command_on_a_running_cluster(client, capsys):
    x0 = str(ROOT / "models" / "digits_cnn_x0.npy")
    args = ["sweep", MODEL, "-x", x0, "-n", "3", "--no-lower", "--json"]
    assert within(WAIT, main, [*args, "--scheduler", client.scheduler.address]) == 0
    captured = capsys.readouterr()
    # the count is the cluster's at that moment (a worker killed by an earlier test
    # may not have come back yet)
    assert re.search(rf"Dask cluster {re.escape(client.scheduler.address)}, [12] workers", captured.err)
    parallel = json.loads(captured.out)
    assert main(args) == 0
    sequential = json.loads(capsys.readouterr().out)
    assert [p["local_bound"] for p in parallel["points"]] == pytest.approx(
        [p["local_bound"] for p in sequential["points"]], rel=1e-6)
