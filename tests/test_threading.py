"""The CPU thread pool: concurrent Python threads and fork()ed children get correct results."""

import multiprocessing
import threading

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
