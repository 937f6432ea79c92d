"""The CPU thread pool: concurrent Python threads and fork()ed children get correct results."""

import multiprocessing
import threading

import torch

import dlmfuse


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, 256, 4, 64, generator=g)


def _child(conn, q, expected):
    conn.send(torch.equal(dlmfuse.attention(q, q, q), expected))


def test_fork_after_the_pool_started():
    q = _inputs()
    expected = dlmfuse.attention(q, q, q)  # starts the parent's pool
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()
    process = ctx.Process(target=_child, args=(child, q, expected))
    process.start()
    assert parent.poll(60), "the forked child hung"
    assert parent.recv() is True
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
