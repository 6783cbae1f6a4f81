"""Dask distributed: the parallel engine of dataset certification and of sweeps.

A `LocalCluster` of single-threaded worker processes started in-process by
default, or an existing cluster by its scheduler's address (`dask scheduler`,
`dask worker`; the workers must be able to import onnxlip and read the model's
path). Each worker thread loads a model once, cached by its load options, with
onnxruntime and BLAS at one thread so that the workers share the cores rather
than oversubscribe them, and with glibc's malloc left to size its own
thresholds (see `keep_malloc_dynamic`). Tasks run through a bounded window: the client holds
only the inputs in flight, and a task whose worker died too often is split and
retried piece by piece, so that one poisonous input fails alone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from itertools import islice

from .errors import OnnxlipError

#: How often a task may lose its worker before it is given up (Dask's default is 3).
ALLOWED_FAILURES = 2

#: Tasks a worker holds per thread. At 1 a worker holds only the task it runs, so a
#: worker that dies takes no innocent queued task's retries with it (Dask's 1.1 let
#: an input queued behind a poisonous one be given up with it).
WORKER_SATURATION = 1.0

#: Loaded models (and other per-input state) kept per worker thread, newest last.
_CACHE: OrderedDict = OrderedDict()
_CACHE_SIZE = 4
_LOADS = [0]  # models loaded by this process
_SINGLE_THREADED = [False]

#: What a Dask nanny sets in its workers' environment (distributed.nanny.pre-spawn-environ)
#: so that freed memory goes back to the OS at once. Set at all, it also fixes glibc's
#: mmap threshold at 128 KiB: every hidden-layer array is then mapped, page-faulted and
#: unmapped afresh, which doubled the CPU time of a CIFAR-10 sweep (7.6 s of its 18.6 in
#: the kernel against 0.2 s of 9.3 without it).
TRIM_VARIABLE = "MALLOC_TRIM_THRESHOLD_"

#: glibc's own ceilings for its dynamic thresholds on 64-bit (mallopt(3)): what it
#: would grow them to by itself on these arrays.
MMAP_THRESHOLD, TRIM_THRESHOLD = 32 * 2**20, 64 * 2**20


@contextlib.contextmanager
def open_client(workers: int | None = None, scheduler: str | None = None,
                announce: bool = True) -> Iterator:
    """A Client of a new LocalCluster of `workers` processes (default: one per core),
    or of the cluster whose scheduler is at `scheduler`; closed on exit."""
    import dask
    from distributed import Client, LocalCluster

    if scheduler is not None:
        try:
            client = Client(scheduler, timeout="20s")
        except OSError as exc:
            raise OnnxlipError(f"cannot reach the Dask scheduler at {scheduler} ({exc})") from None
        try:
            client.wait_for_workers(1, timeout=60)
        except TimeoutError:
            client.close()
            raise OnnxlipError(f"no Dask worker joined the scheduler at {scheduler} in 60 s") from None
        cluster = None
    else:
        with dask.config.set({"distributed.scheduler.allowed-failures": ALLOWED_FAILURES,
                              "distributed.scheduler.worker-saturation": WORKER_SATURATION,
                              # None unsets it: nor does the nanny put it in this process's environment
                              f"distributed.nanny.pre-spawn-environ.{TRIM_VARIABLE}": None}):
            cluster = LocalCluster(n_workers=workers or os.cpu_count() or 1, threads_per_worker=1,
                                   processes=True, dashboard_address=":0",
                                   silence_logs=logging.ERROR)
        client = Client(cluster)
    try:
        if announce:
            print(f"onnxlip: Dask cluster {client.scheduler.address}, {worker_count(client)} "
                  f"workers, dashboard {_dashboard(client)}", file=sys.stderr)
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def _dashboard(client) -> str:
    """The dashboard's address; without bokeh the scheduler serves no dashboard pages."""
    import importlib.util

    if importlib.util.find_spec("bokeh") is None:
        return "off (install bokeh for one)"
    return client.dashboard_link


def worker_count(client) -> int:
    """Threads of the cluster's workers: the tasks that can run at once."""
    return max(1, sum(w.get("nthreads", 1) for w in client.scheduler_info()["workers"].values()))


def map_unordered(client, func: Callable, jobs: Iterable[tuple], window: int,
                  split: Callable[[tuple], list[tuple]]) -> Iterator[tuple[tuple, object]]:
    """(job, func(*job)) for every job, in order of completion, at most `window` in flight.

    A job whose future failed (its workers died ALLOWED_FAILURES + 1 times, or
    it raised) is retried as the jobs split(job) returns when that is several.
    A single job whose workers died may only have shared them with the job that
    killed them: it runs again at the end, alone on the cluster, and its
    outcome there is final. Otherwise a failed job is yielded with the
    exception as its result.
    """
    from distributed import as_completed
    from distributed.scheduler import KilledWorker

    todo = iter(jobs)
    running = as_completed()
    job_of: dict = {}
    suspects: list[tuple] = []

    def submit(job: tuple) -> None:
        future = client.submit(func, *job, pure=False)
        job_of[future.key] = job
        running.add(future)

    for job in islice(todo, window):
        submit(job)
    for future in running:
        job = job_of.pop(future.key)
        failed = future.status != "finished"
        outcome = future.exception() if failed else future.result()
        future.release()
        parts = split(job) if failed else [job]
        if len(parts) > 1:
            for part in parts:
                submit(part)
            continue
        if isinstance(outcome, KilledWorker) or (failed and outcome is None):  # None: lost
            suspects.append(job)
        else:
            yield job, outcome
        following = next(todo, None)
        if following is not None:
            submit(following)
    for job in suspects:  # one at a time: a death now is the job's own
        future = client.submit(func, *job, pure=False)
        try:
            outcome = future.result()
        except Exception as error:  # the job's own failure is its outcome
            outcome = error
        future.release()
        yield job, outcome


def single_threaded() -> None:
    """onnxruntime and BLAS at one thread in this process: one worker per core (and
    malloc's thresholds dynamic again on a worker whose nanny fixed them)."""
    if _SINGLE_THREADED[0]:
        return
    from threadpoolctl import threadpool_limits

    from .operators import ort

    ort.THREADS = 1
    threadpool_limits(1)
    keep_malloc_dynamic()
    _SINGLE_THREADED[0] = True


def keep_malloc_dynamic() -> bool:
    """On a worker started with MALLOC_TRIM_THRESHOLD_ (a `dask worker` of another
    cluster: the LocalCluster unsets it), set glibc's mmap and trim thresholds to the
    ceilings its dynamic thresholds reach, so that large arrays are reused rather than
    mapped and unmapped by every operation. Whether they were set."""
    import ctypes
    import platform

    if TRIM_VARIABLE not in os.environ or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    return bool(libc.mallopt(m_mmap_threshold, MMAP_THRESHOLD)
                and libc.mallopt(m_trim_threshold, TRIM_THRESHOLD))


def cached(key: tuple, make: Callable[[], object]) -> object:
    """make(), computed once per key and thread of this process (an LRU of a few entries)."""
    key = (key, threading.get_ident())
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    value = _CACHE[key] = make()
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return value


def network(options: dict):
    """The Network of these load options, loaded once per worker thread."""
    from .network import load

    def make():
        _LOADS[0] += 1
        return load(**options)

    return cached(("network", *option_key(options)), make)


def option_key(options: dict) -> tuple:
    """Load options as a hashable key (shapes given as lists become tuples)."""
    return tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in sorted(options.items()))


def loads() -> tuple[int, int]:
    """(this process's id, models it has loaded): lets tests check one load per worker."""
    return os.getpid(), _LOADS[0]


def clear_cache() -> None:
    """Forget this process's loaded models and per-input state (a cold start, for timings)."""
    _CACHE.clear()
