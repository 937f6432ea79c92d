"""The CPU thread pool: concurrent Python threads and fork()ed children get correct results; the
pool is bounded by the hardware, grows lazily, follows set_num_threads both ways, degrades
instead of hanging when the OS refuses a thread, and hands a task's error to the caller."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

import dlmfuse


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, 256, 4, 64, generator=g)


def _child(conn, q):
    # torch's own OpenMP pool is not fork-safe (a parallel region in the child can hang): keep the
    # child's torch single-threaded, so only dlmfuse's pool (rebuilt after fork) runs in parallel.
    torch.set_num_threads(1)
    conn.send(dlmfuse.attention(q, q, q).flatten().tolist())


def test_fork_after_the_pool_started():
    q = _inputs()
    expected = dlmfuse.attention(q, q, q)  # starts the parent's pool
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()
    process = ctx.Process(target=_child, args=(child, q))
    process.start()
    assert parent.poll(60), "the forked child hung"
    assert torch.equal(torch.tensor(parent.recv()).view_as(expected), expected)
    process.join(10)
    assert process.exitcode == 0


def test_concurrent_python_threads():
    q = _inputs()
    expected = dlmfuse.attention(q, q, q)
    results = []

    def worker():
        for _ in range(5):
            results.append(torch.equal(dlmfuse.attention(q, q, q), expected))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 20 and all(results)


# --------------------------------------------------------------------------- bounds and failures
# Each case runs in a child process under a watchdog: a regression (a thread per requested
# thread, a hang) must fail the test, never take the test machine down.
CHILD_TIMEOUT_S = 120


def _run_child(code: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "DLMFUSE_NUM_THREADS"}
    env.update(env_extra or {})
    try:
        return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True,
                              text=True, timeout=CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:  # subprocess.run kills the child first
        pytest.fail(f"the child hung for {CHILD_TIMEOUT_S} s; stderr: {e.stderr}")


_COUNT_THREADS = """
import os, torch
torch.set_num_threads(1)
def threads():
    return len(os.listdir('/proc/self/task'))
"""


def test_env_thread_count_is_clamped_to_the_hardware():
    result = _run_child(_COUNT_THREADS + """
    import dlmfuse
    before = threads()
    q = torch.randn(1, 256, 4, 64)
    dlmfuse.attention(q, q, q)
    print(dlmfuse.num_threads(), dlmfuse._C.max_threads(), threads() - before)
    """.replace("\n    ", "\n"), {"DLMFUSE_NUM_THREADS": "100000"})
    assert result.returncode == 0, result.stderr
    used, bound, started = map(int, result.stdout.split())
    assert bound == (os.cpu_count() or 1)
    assert used == bound, "DLMFUSE_NUM_THREADS above the hardware count must clamp to it"
    assert started <= bound - 1, f"started {started} threads for a pool bounded by {bound}"
    assert "DLMFUSE_NUM_THREADS=100000 exceeds the hardware thread count; clamped to" in result.stderr


def test_set_num_threads_clamps_with_one_warning_and_validates():
    bound = dlmfuse._C.max_threads()
    before = dlmfuse.num_threads()
    try:
        with pytest.warns(RuntimeWarning, match=rf"set_num_threads\(1000000\) clamped to {bound}") as record:
            assert dlmfuse.set_num_threads(10**6) == bound
        assert len(record) == 1
        assert dlmfuse.num_threads() == bound
        with pytest.warns(RuntimeWarning, match=f"clamped to {bound}"):
            assert dlmfuse.set_num_threads(2**70) == bound
        with pytest.raises(ValueError, match="n must be >= 1, got 0"):
            dlmfuse.set_num_threads(0)
        with pytest.raises(TypeError, match="n must be an int, got float"):
            dlmfuse.set_num_threads(2.0)
        with pytest.raises(TypeError, match="n must be an int, got bool"):
            dlmfuse.set_num_threads(True)
        assert dlmfuse.set_num_threads(1) == 1 and dlmfuse.num_threads() == 1
    finally:
        dlmfuse.set_num_threads(before)


def test_set_num_threads_works_in_both_directions_and_starts_threads_lazily():
    if dlmfuse._C.max_threads() < 2:
        pytest.skip("one hardware thread: the pool never grows")
    result = _run_child(_COUNT_THREADS + """
    import dlmfuse
    q = torch.randn(1, 256, 4, 64)
    expected = dlmfuse.attention(q, q, q)  # one thread: the pool starts nothing
    base = threads()
    dlmfuse.set_num_threads(2)
    same = torch.equal(dlmfuse.attention(q, q, q), expected)
    grown = threads() - base
    dlmfuse.set_num_threads(1)
    same = same and torch.equal(dlmfuse.attention(q, q, q), expected)
    print(int(same), grown)
    """.replace("\n    ", "\n"), {"DLMFUSE_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    same, grown = map(int, result.stdout.split())
    assert same == 1
    assert grown == 1, f"two threads need one worker beside the caller; {grown} started"


def test_a_thread_that_cannot_start_degrades_the_pool_without_hanging():
    """An address-space limit just above the process's current size refuses the worker's stack:
    the call must finish on the caller's thread with the right result and say so once."""
    if dlmfuse._C.max_threads() < 2:
        pytest.skip("one hardware thread: the pool never starts a worker")
    result = _run_child(_COUNT_THREADS + """
    import resource, dlmfuse
    q = torch.randn(1, 256, 4, 64)
    expected = dlmfuse.attention(q, q, q)  # one thread, so every lazy allocation is done
    out = torch.empty_like(expected)
    size = int(next(l for l in open('/proc/self/status') if l.startswith('VmSize')).split()[1]) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (size + (4 << 20), resource.RLIM_INFINITY))
    dlmfuse.set_num_threads(2)
    same = all(torch.equal(dlmfuse.attention(q, q, q), expected) for _ in range(3))
    print(int(same), dlmfuse.num_threads())
    """.replace("\n    ", "\n"), {"DLMFUSE_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    same, _ = map(int, result.stdout.split())
    assert same == 1
    assert result.stderr.count("dlmfuse: could not start CPU worker thread 1") == 1, result.stderr


def test_a_task_that_raises_stops_the_job_and_the_pool_keeps_working():
    """The first error of a job reaches the caller (after every thread has stopped using the job);
    later jobs run normally. Without this, a throwing worker aborted the process and a throwing
    caller left workers running a destroyed job."""
    before = dlmfuse.num_threads()
    try:
        dlmfuse.set_num_threads(dlmfuse._C.max_threads())
        for failing in (0, 1, 500, 9999):
            with pytest.raises(ValueError, match=f"task {failing} failed on purpose"):
                dlmfuse._C._parallel_for_check(10000, failing)
            assert dlmfuse._C._parallel_for_check(10000) == 10000
        q = _inputs()
        assert torch.equal(dlmfuse.attention(q, q, q), dlmfuse.attention(q, q, q))
    finally:
        dlmfuse.set_num_threads(before)
