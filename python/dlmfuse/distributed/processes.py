"""Local process groups for trying tensor parallelism on one machine: ``world_size`` processes
joined by gloo over the loopback interface, each with a bounded number of threads, that run
functions on request (the tests and the ``distributed`` benchmark family use this; on GPUs use
``torchrun``, see the README).

A failing rank never leaves the others hanging: the parent waits on every rank's pipe and
process at once, and on the first error (an exception, a rank that died, or a deadline that
passed) ends every rank and raises with the failing rank's traceback. Ranks time out their own
collectives too (``init_process_group(timeout=...)``).
"""

from __future__ import annotations

import datetime
import multiprocessing
import multiprocessing.connection
import os
import shutil
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, Optional

__all__ = ["RankPool", "run_local", "rank_state"]

#: Per-process storage for functions run by a :class:`RankPool` (e.g. a model built by one call
#: and used by the next); empty in the parent.
rank_state: dict = {}

_READY = "ready"
_OK, _ERROR = "ok", "error"
_JOIN_SECONDS = 10.0  # how long close() waits for a rank to leave before it is terminated


class RankPool:
    """``world_size`` local processes in one gloo process group, running functions on request.

    Args:
        world_size: number of ranks (>= 1).
        threads: torch and dlmfuse CPU threads per rank (1 keeps ranks from competing for cores).
        timeout: seconds allowed for start-up (import, ``init_process_group``) and, by default,
            for each :meth:`run`; also the process group's collective timeout.

    Example::

        with RankPool(2) as pool:
            ranks = pool.run(torch.distributed.get_rank)   # [0, 1]
    """

    def __init__(self, world_size: int, *, threads: int = 1, timeout: float = 60.0):
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"RankPool: world_size must be an int >= 1, got {world_size!r}")
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"RankPool: threads must be an int >= 1, got {threads!r}")
        if not timeout > 0:
            raise ValueError(f"RankPool: timeout must be > 0 seconds, got {timeout!r}")
        self.world_size, self.timeout = world_size, float(timeout)
        # A file rendezvous: no port to pick (or to collide with another run); gloo then connects
        # the ranks over sockets on the loopback interface.
        self._store_dir = tempfile.mkdtemp(prefix="dlmfuse-ranks-")
        init_method = "file://" + os.path.join(self._store_dir, "store")
        context = multiprocessing.get_context("spawn")
        self._conns, self._processes = [], []
        try:
            for rank in range(world_size):
                parent_end, child_end = context.Pipe()
                process = context.Process(target=_rank_main, daemon=True, name=f"dlmfuse-rank-{rank}",
                                          args=(rank, world_size, init_method, threads, self.timeout, child_end))
                process.start()
                child_end.close()
                self._conns.append(parent_end)
                self._processes.append(process)
            self._collect(self.timeout, "start-up")
        except BaseException:
            self.close()
            raise

    @property
    def closed(self) -> bool:
        """True once the pool has been closed (by :meth:`close` or after a failed run)."""
        return not self._processes

    def run(self, fn: Callable[..., Any], *args, timeout: Optional[float] = None) -> list:
        """``fn(*args)`` on every rank (fn and args must pickle: a module-level function);
        returns the results in rank order. Raises RuntimeError with the rank's traceback when a
        rank raises or dies, TimeoutError after ``timeout`` seconds (default: the pool's); the
        pool is closed after either."""
        if not self._processes:
            raise RuntimeError("RankPool.run: the pool is closed")
        for conn in self._conns:
            conn.send((fn, args))
        return self._collect(self.timeout if timeout is None else timeout, getattr(fn, "__name__", repr(fn)))

    def close(self, *, wait: bool = True) -> None:
        """Ends every rank and removes the rendezvous files: asks them to leave and waits a
        little (``wait``), then terminates those still running (after a failure a rank may be
        blocked in a collective that will never complete)."""
        for conn in self._conns if wait else ():
            try:
                conn.send(None)
            except (OSError, ValueError):  # the rank is gone already
                pass
        deadline = time.monotonic() + (_JOIN_SECONDS if wait else 0.0)
        for process in self._processes:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.terminate()
                process.join()
        for conn in self._conns:
            conn.close()
        self._conns, self._processes = [], []
        shutil.rmtree(self._store_dir, ignore_errors=True)

    def __enter__(self) -> "RankPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        if getattr(self, "_processes", None):
            self.close(wait=False)

    def _collect(self, timeout: float, what: str) -> list:
        """One reply per rank, or the first failure (then every rank is ended)."""
        results: list = [None] * self.world_size
        waiting = set(range(self.world_size))
        deadline = time.monotonic() + timeout
        while waiting:
            remaining = deadline - time.monotonic()
            ready = multiprocessing.connection.wait(
                [self._conns[r] for r in waiting] + [self._processes[r].sentinel for r in waiting],
                timeout=max(0.0, remaining))
            if not ready:
                self.close(wait=False)
                raise TimeoutError(f"RankPool: rank(s) {sorted(waiting)} of {self.world_size} did not finish "
                                   f"{what} within {timeout:g} s; every rank was ended")
            for rank in sorted(waiting):
                conn, process = self._conns[rank], self._processes[rank]
                if conn in ready or conn.poll():
                    status, value = _receive(conn)
                    if status == _ERROR:
                        self.close(wait=False)
                        raise RuntimeError(f"RankPool: rank {rank} of {self.world_size} failed in {what}:\n{value}")
                    results[rank] = value
                    waiting.discard(rank)
                elif process.sentinel in ready:
                    self.close(wait=False)
                    raise RuntimeError(f"RankPool: rank {rank} of {self.world_size} died (exit code "
                                       f"{process.exitcode}) in {what}")
        return results


def run_local(fn: Callable[..., Any], world_size: int, *args, threads: int = 1, timeout: float = 60.0) -> list:
    """``fn(*args)`` once on each of ``world_size`` fresh local ranks (see :class:`RankPool`);
    returns the results in rank order."""
    with RankPool(world_size, threads=threads, timeout=timeout) as pool:
        return pool.run(fn, *args)


def _receive(conn):
    try:
        return conn.recv()
    except EOFError:
        return _ERROR, "the rank closed its pipe without replying"


def _rank_main(rank: int, world_size: int, init_method: str, threads: int, timeout: float, conn) -> None:
    """A rank's process: join the group, then run what the parent sends until it sends None."""
    try:
        import torch
        import torch.distributed as dist

        import dlmfuse

        torch.set_num_threads(threads)
        dlmfuse.set_num_threads(threads)
        if sys.platform.startswith("linux"):
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # the loopback interface
        dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout))
    except BaseException:
        conn.send((_ERROR, traceback.format_exc()))
        return
    conn.send((_READY, None))
    try:
        while True:
            try:
                message = conn.recv()
            except EOFError:  # the parent is gone
                break
            if message is None:
                break
            fn, args = message
            try:
                conn.send((_OK, fn(*args)))
            except BaseException:  # fn raised, or its result does not pickle
                conn.send((_ERROR, traceback.format_exc()))
    finally:
        rank_state.clear()
        dist.destroy_process_group()
