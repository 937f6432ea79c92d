"""Is the machine quiet enough for the timings to mean something?

Two probes, recorded in every row (``machine``) and turned into warnings:

* the 1-minute load average when the run starts (before the benchmark itself adds load): other
  processes competing for the CPUs slow whichever implementation they happen to overlap;
* a calibration kernel (a fixed matrix product on the benchmark's device) timed before and after
  every workload: if its time changes by more than DRIFT_LIMIT across a workload, the machine's
  speed changed while that workload ran;
* on CPU, the same kernel with torch's threads and with one thread when the run starts: where
  other processes hold the cores, a parallel region waits for descheduled threads and the threads
  are no faster than one (on a loaded 2-core machine every multi-threaded torch op then took
  ~16 ms, however small), which inflates the time of every peer built on torch's thread pool.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from typing import Optional

import torch

#: A 1-minute load average above this many processes per CPU at the start flags the run as busy.
BUSY_LOAD_PER_CPU = 0.25
#: A calibration time that changes by more than this fraction across a workload flags its rows.
DRIFT_LIMIT = 0.15
#: torch's threads are "stalled" when they run the calibration kernel at more than this fraction of
#: one thread's time (ideal with n threads: 1/n).
THREAD_STALL_FRACTION = 0.9
CALIBRATION_SIZE = {"cpu": 384, "cuda": 4096}  # square matmul; ~1 ms on a 2-core CPU, ~0.2 ms on an H100
CALIBRATION_CALLS = 9


def load_average() -> Optional[float]:
    """The 1-minute load average, or None where the OS has none."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def cpu_count() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def calibration_seconds(device: torch.device) -> float:
    """Median seconds of a fixed matrix product on ``device`` (its own inputs, seeded; on CPU with
    torch's current thread count)."""
    n = CALIBRATION_SIZE["cuda" if device.type == "cuda" else "cpu"]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, generator=gen, device=device, dtype=dtype)
    b = torch.randn(n, n, generator=gen, device=device, dtype=dtype)
    torch.mm(a, b)  # warm-up: allocation, library initialisation
    times = []
    for _ in range(CALIBRATION_CALLS):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.mm(a, b)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            torch.mm(a, b)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def single_thread_seconds(device: torch.device) -> float:
    """:func:`calibration_seconds` with torch limited to one thread (restored after)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return calibration_seconds(device)
    finally:
        torch.set_num_threads(threads)


@dataclass
class RunLoad:
    """The machine when the run started: load average against the CPUs available; on CPU with
    several torch threads, the calibration kernel's seconds with them and with one thread."""

    load_average: Optional[float]
    cpus: int
    threads: int = 1
    threaded_s: Optional[float] = None
    single_s: Optional[float] = None

    @property
    def loaded(self) -> bool:
        return self.load_average is not None and self.load_average > BUSY_LOAD_PER_CPU * self.cpus

    @property
    def threads_stalled(self) -> bool:
        return self.threaded_s is not None and self.threaded_s > THREAD_STALL_FRACTION * self.single_s

    @property
    def busy(self) -> bool:
        return self.loaded or self.threads_stalled

    def warning(self) -> Optional[str]:
        parts = []
        if self.loaded:
            parts.append(f"1-minute load average {self.load_average:.2f} on {self.cpus} CPU(s) when the run "
                         f"started (limit {BUSY_LOAD_PER_CPU * self.cpus:.2f})")
        if self.threads_stalled:
            parts.append(f"torch's {self.threads} threads ran the calibration kernel in "
                         f"{self.threaded_s * 1e3:.3g} ms, one thread in {self.single_s * 1e3:.3g} ms: threaded "
                         f"peers wait for descheduled threads")
        if not parts:
            return None
        return "machine busy: " + "; ".join(parts) + ": other processes compete with the timings"

    def record(self) -> dict:
        return {"load_average_at_start": self.load_average, "cpus": self.cpus, "torch_threads": self.threads,
                "threaded_calibration_ms": None if self.threaded_s is None else self.threaded_s * 1e3,
                "single_thread_calibration_ms": None if self.single_s is None else self.single_s * 1e3}


def start_of_run(device: torch.device) -> RunLoad:
    """Probe the machine before the benchmark adds its own load."""
    run_load = RunLoad(load_average(), cpu_count(), torch.get_num_threads())
    if device.type == "cpu" and run_load.threads > 1:
        run_load.threaded_s = calibration_seconds(device)
        run_load.single_s = single_thread_seconds(device)
    return run_load


def drift(before_s: float, after_s: float) -> float:
    """Relative change of the calibration time across a workload (0 = unchanged)."""
    return abs(after_s - before_s) / min(before_s, after_s)


def machine_record(run_load: RunLoad, before_s: float, after_s: float) -> dict:
    """The ``machine`` field of a workload's rows."""
    change = drift(before_s, after_s)
    return {**run_load.record(), "calibration_ms_before": before_s * 1e3, "calibration_ms_after": after_s * 1e3,
            "calibration_drift": change, "busy": run_load.busy or change > DRIFT_LIMIT}


def drift_warning(workload: str, before_s: float, after_s: float) -> Optional[str]:
    change = drift(before_s, after_s)
    if change <= DRIFT_LIMIT:
        return None
    return (f"machine speed changed during {workload}: the calibration kernel took {before_s * 1e3:.3g} ms "
            f"before it and {after_s * 1e3:.3g} ms after ({change:.0%}, limit {DRIFT_LIMIT:.0%})")
