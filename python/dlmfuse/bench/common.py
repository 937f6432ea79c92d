"""Benchmark harness shared by every op family: timing, environment, rows, table, JSONL, plot.

A family module (``attention.py``, later ``kv_cache.py``, ``sampling.py``, ...) only describes
*what* to run: a list of :class:`Workload`, each of which builds a :class:`Case` holding the
implementations to compare (dlmfuse first, then its peers). This module decides *how* it is run
and reported, identically for every family:

* each implementation is prepared and called once (compilation, and the moment a peer refuses the
  inputs: the reason is recorded in its row instead of aborting the run), then warmed up and timed;
  the median of the repeats is reported (CPU: ``time.perf_counter``; CUDA: CUDA events);
* peers are checked against dlmfuse's output (max abs difference) in the same run;
* one row per (workload, implementation), with the environment and a reproducer command.

Two hooks serve end-to-end rows (``generate``), whose calls take seconds: a workload may carry
its own :class:`Timing`, and a case may add family-specific numbers to its rows (``stats``:
tokens/s, steps, speedups over a reference loop), printed below the table.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence, TextIO

import torch

DLMFUSE = "dlmfuse"   # name of the implementation every peer is compared with
MAX_ERROR_CHARS = 500  # a peer's failure reason is cut to this length in rows and tables


@dataclass
class Impl:
    """One implementation of a workload.

    ``prepare()`` does the untimed setup (layout copies, BlockMask, compilation happens on the
    first call) and returns the callable that is timed. ``to_common`` maps that callable's output
    to dlmfuse's output layout for the correctness check; None means "nothing to compare" (e.g. a
    mask-building overhead). ``kind`` is "dlmfuse", "peer" (a competitor: ratio, plot) or
    "overhead" (a cost a peer pays besides its kernel: ratio, no plot).
    """

    name: str
    prepare: Callable[[], Callable[[], Any]]
    to_common: Optional[Callable[[Any], torch.Tensor]] = None
    kind: str = "peer"
    # The call can be captured in a CUDA graph (no host sync): on CUDA its row also reports
    # graph_time_ms, the time of a graph replay, i.e. the device time without launch overhead.
    graph: bool = False


@dataclass
class Case:
    """The inputs of one workload, built on the device, and the work they represent."""

    impls: list[Impl]
    flops_dense: Optional[float] = None    # as if every (query, key) pair were computed
    flops_visible: Optional[float] = None  # only the visible pairs (DESIGN.md §8 "effective")
    bytes_read: Optional[float] = None     # minimum bytes an implementation must read, for GB/s
    # {impl name: median seconds} of the implementations that ran -> {impl name: {stat: value}},
    # stored in those rows' "stats" (called once, after every implementation ran).
    stats: Optional[Callable[[dict], dict]] = None


@dataclass
class Workload:
    """A fixed benchmark row of DESIGN.md §8. ``setup(device)`` allocates its inputs lazily."""

    id: str           # DESIGN.md §8 row id, e.g. "A2" or "C1"
    desc: str         # short human description, e.g. "block-causal L=1024"
    family: str       # op family, e.g. "attention"
    params: dict      # shapes and dtypes, copied into every JSONL row
    setup: Callable[[torch.device], Case]
    timing: Optional[Timing] = None  # replaces the run's warm-up/repeats (seconds-long calls)


@dataclass
class Timing:
    """How many untimed warm-up calls and timed repeats each implementation gets."""

    warmup: int
    repeats: int


def default_timing(device: torch.device, quick: bool) -> Timing:
    if device.type == "cuda":
        return Timing(warmup=5, repeats=20) if quick else Timing(warmup=10, repeats=100)
    return Timing(warmup=1, repeats=3) if quick else Timing(warmup=3, repeats=10)


# --------------------------------------------------------------------------------------- timing

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_graph(fn: Callable[[], Any], device: torch.device, timing: Timing) -> list[float]:
    """Seconds per replay of ``fn`` captured in a CUDA graph: the device time of the call without
    the host's launch overhead (which the eager timing includes when the host is the slower side)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # capture wants a warm-up call off the default stream
        fn()
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return measure(graph.replay, device, timing)


def measure(fn: Callable[[], Any], device: torch.device, timing: Timing) -> list[float]:
    """Seconds per call of ``fn`` for ``timing.repeats`` calls, after ``timing.warmup`` calls."""
    for _ in range(timing.warmup):
        fn()
    synchronize(device)
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(timing.repeats)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(timing.repeats)]
        for start, end in zip(starts, ends):
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) / 1e3 for start, end in zip(starts, ends)]
    times = []
    for _ in range(timing.repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


# ---------------------------------------------------------------------------------- environment

def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model} ({os.cpu_count()} cpus, torch threads {torch.get_num_threads()})"


def git_sha() -> str:
    """DLMFUSE_GIT_SHA when set (scripts/gpu_check.sh sets it to the commit the carried wheel was
    built from: a device machine's copy of the checkout may carry stale git metadata), else HEAD
    of the checkout dlmfuse was loaded from (else of the cwd), or "unknown"."""
    if os.environ.get("DLMFUSE_GIT_SHA"):
        return os.environ["DLMFUSE_GIT_SHA"]
    package_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for where in (package_dir, os.getcwd()):
        try:
            result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True,
                                    text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            continue
        if result.returncode == 0 and result.stdout.strip():
            return result.stdout.strip()
    return "unknown"


def environment(device: torch.device, command: str) -> dict:
    """What every row records so that a number can be traced and reproduced."""
    import dlmfuse

    return {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "dlmfuse": dlmfuse.__version__,
        "build_info": dlmfuse.build_info(),
        "git_sha": git_sha(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
    }


# -------------------------------------------------------------------------------------- running

def _describe_failure(error: BaseException, caught: Sequence[warnings.WarningMessage]) -> str:
    """One line: the exception, plus the warnings raised meanwhile (SDPA says there why a backend
    refused the inputs)."""
    text = f"{type(error).__name__}: {str(error).strip()}"
    reasons = [str(w.message).strip() for w in caught]
    if reasons:
        text += " | " + " | ".join(reasons)
    text = " ".join(text.split())
    return text if len(text) <= MAX_ERROR_CHARS else text[:MAX_ERROR_CHARS - 3] + "..."


def is_skipped(name: str, skip: Iterable[str]) -> bool:
    """``skip=["flex"]`` drops "flex" and its variants ("flex.create_block_mask"); same for
    "sdpa" and "sdpa-flash". dlmfuse itself is never skipped."""
    if name == DLMFUSE:
        return False
    return any(name == s or name.startswith(s + "-") or name.startswith(s + ".") for s in skip)


def run_workload(workload: Workload, device: torch.device, timing: Timing,
                 skip: Iterable[str] = ()) -> list[dict]:
    """Rows (without environment) for every implementation of ``workload`` not in ``skip``."""
    case = workload.setup(device)
    rows = []
    reference = None  # dlmfuse's output in the common layout, float32
    for impl in case.impls:
        if is_skipped(impl.name, skip):
            continue
        row = {"family": workload.family, "workload": workload.id, "desc": workload.desc,
               "impl": impl.name, "kind": impl.kind, "params": workload.params,
               "status": "ok", "error": None, "time_ms": None, "times_ms": None,
               "tflops_dense": None, "tflops_visible": None, "gbps": None,
               "ratio_vs_dlmfuse": None, "max_abs_diff_vs_dlmfuse": None,
               "warmup": timing.warmup, "repeats": timing.repeats, "stats": None,
               "graph_time_ms": None, "graph_gbps": None, "graph_error": None}
        rows.append(row)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                fn = impl.prepare()
                out = fn()  # first call: compiles, or shows that the implementation refuses
                synchronize(device)
                times = measure(fn, device, timing)
            except Exception as error:  # a failing peer is a result, not a crash
                row.update(status="error", error=_describe_failure(error, caught))
                continue
        if impl.graph and device.type == "cuda":
            try:
                graph_seconds = statistics.median(measure_graph(fn, device, timing))
                row["graph_time_ms"] = graph_seconds * 1e3
                if case.bytes_read is not None:
                    row["graph_gbps"] = case.bytes_read / graph_seconds / 1e9
            except Exception as error:  # the eager timing stands; say why the graph one is missing
                torch.cuda.synchronize(device)
                row["graph_error"] = _describe_failure(error, [])
        seconds = statistics.median(times)
        row["time_ms"] = seconds * 1e3
        row["times_ms"] = [t * 1e3 for t in times]
        if impl.kind != "overhead":  # throughput of the op itself, not of a side cost
            if case.flops_dense is not None:
                row["tflops_dense"] = case.flops_dense / seconds / 1e12
            if case.flops_visible is not None:
                row["tflops_visible"] = case.flops_visible / seconds / 1e12
            if case.bytes_read is not None:
                row["gbps"] = case.bytes_read / seconds / 1e9
        if impl.to_common is not None:
            common = impl.to_common(out).float()
            if impl.kind == DLMFUSE:
                reference = common
            elif reference is not None:
                row["max_abs_diff_vs_dlmfuse"] = (common - reference).abs().max().item()
    base = next((r["time_ms"] for r in rows if r["kind"] == DLMFUSE and r["status"] == "ok"), None)
    for row in rows:
        if base is not None and row["time_ms"] is not None and row["kind"] != DLMFUSE:
            row["ratio_vs_dlmfuse"] = row["time_ms"] / base
    if case.stats is not None:
        stats = case.stats({r["impl"]: r["time_ms"] / 1e3 for r in rows if r["status"] == "ok"})
        for row in rows:
            row["stats"] = stats.get(row["impl"])
    return rows


def run(workloads: Sequence[Workload], *, device: torch.device, timing: Timing,
        skip: Iterable[str] = (), command: str = "", json_path: Optional[str] = None,
        plot_path: Optional[str] = None, out: TextIO = sys.stdout,
        progress: TextIO = sys.stderr) -> list[dict]:
    """Run ``workloads`` in order, print progress and the table, write JSONL and the plot.

    Returns every row (environment included). The JSONL file is rewritten and flushed after each
    workload, so an interrupted run keeps what it measured.
    """
    if plot_path is not None:
        require_matplotlib()  # fail before minutes of benchmarking, not after
    for path in (json_path, plot_path):
        if path is not None:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    skip = list(skip)
    env = environment(device, command)
    rows: list[dict] = []
    json_file = open(json_path, "w") if json_path else None
    try:
        for i, workload in enumerate(workloads, 1):
            print(f"[{i}/{len(workloads)}] {workload.id} {workload.desc} ...", end=" ",
                  file=progress, flush=True)
            own_timing = workload.timing if workload.timing is not None else timing
            new_rows = [{**row, **env} for row in run_workload(workload, device, own_timing, skip)]
            print(_progress_summary(new_rows), file=progress, flush=True)
            rows.extend(new_rows)
            if json_file is not None:
                for row in new_rows:
                    json_file.write(json.dumps(row) + "\n")
                json_file.flush()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        if json_file is not None:
            json_file.close()
    print_table(rows, env, timing, out)
    if plot_path is not None:
        write_plot(rows, plot_path)
        print(f"plot written to {plot_path}", file=out)
    if json_path is not None:
        print(f"{len(rows)} rows written to {json_path}", file=out)
    return rows


# ------------------------------------------------------------------------------------ reporting

def format_time(ms: Optional[float]) -> str:
    if ms is None:
        return "-"
    if ms < 1.0:
        us = ms * 1e3
        return f"{us:.1f} us" if us < 100 else f"{us:.0f} us"
    decimals = 2 if ms < 10 else 1 if ms < 100 else 0
    return f"{ms:.{decimals}f} ms"


def _progress_summary(rows: Sequence[dict]) -> str:
    parts = []
    for row in rows:
        if row["status"] != "ok":
            parts.append(f"{row['impl']} failed")
        elif row["impl"] == DLMFUSE:
            parts.append(format_time(row["time_ms"]))
        else:
            parts.append(f"{row['impl']} {format_time(row['time_ms'])}")
    return ", ".join(parts)


def print_table(rows: Sequence[dict], env: dict, timing: Timing, out: TextIO) -> None:
    """Workloads down, implementations across; each peer cell is "time ratio" where
    ratio = peer time / dlmfuse time (> 1: dlmfuse is faster)."""
    impls = []
    for row in rows:
        if row["impl"] not in impls:
            impls.append(row["impl"])
    workloads = []
    for row in rows:
        key = (row["workload"], row["desc"])
        if key not in workloads:
            workloads.append(key)

    def cell(row: Optional[dict]) -> str:
        if row is None:
            return "-"
        if row["status"] != "ok":
            return "failed"
        text = format_time(row["time_ms"])
        if row["ratio_vs_dlmfuse"] is not None:
            text += f" {row['ratio_vs_dlmfuse']:.2f}x"
        return text

    header = ["workload"] + impls + ["max |diff|"]
    lines = []
    for wid, desc in workloads:
        by_impl = {r["impl"]: r for r in rows if r["workload"] == wid and r["desc"] == desc}
        diffs = [r["max_abs_diff_vs_dlmfuse"] for r in by_impl.values()
                 if r["max_abs_diff_vs_dlmfuse"] is not None]
        lines.append([f"{wid} {desc}"] + [cell(by_impl.get(name)) for name in impls]
                     + [f"{max(diffs):.1e}" if diffs else "-"])
    widths = [max(len(line[c]) for line in [header] + lines) for c in range(len(header))]

    print(f"\ndlmfuse {env['dlmfuse']} on {env['device']}; torch {env['torch']}, "
          f"CUDA {env['cuda']}, Python {env['python']}, git {env['git_sha'][:12]}", file=out)
    # Workloads may carry their own timing; name it per workload when the rows disagree.
    timings = {(r["workload"], r["desc"]): (r["repeats"], r["warmup"]) for r in rows}
    repeats, warmup = (next(iter(timings.values())) if len(set(timings.values())) == 1
                       else (timing.repeats, timing.warmup))
    print(f"median of {repeats} runs after {warmup} warm-up; "
          "ratio = peer time / dlmfuse time (>1: dlmfuse faster); "
          "max |diff| = largest peer-vs-dlmfuse output difference", file=out)
    for (wid, desc), (own_repeats, own_warmup) in timings.items():
        if (own_repeats, own_warmup) != (repeats, warmup):
            print(f"  {wid} {desc}: median of {own_repeats} runs after {own_warmup} warm-up", file=out)
    for line in [header] + lines:
        print("  ".join(text.ljust(width) for text, width in zip(line, widths)).rstrip(), file=out)
    detailed = [r for r in rows if r["stats"]]
    if detailed:
        print("stats:", file=out)
        for r in detailed:
            values = ", ".join(f"{name}={_format_stat(value)}" for name, value in r["stats"].items())
            print(f"  {r['workload']} {r['desc']} / {r['impl']}: {values}", file=out)
    replayed = [r for r in rows if r["graph_time_ms"] is not None or r["graph_error"] is not None]
    if replayed:
        print("CUDA-graph replay (device time without launch overhead):", file=out)
        for r in replayed:
            if r["graph_time_ms"] is None:
                print(f"  {r['workload']} {r['desc']} / {r['impl']}: not captured: {r['graph_error']}", file=out)
                continue
            rate = f", {r['graph_gbps']:.0f} GB/s" if r["graph_gbps"] is not None else ""
            print(f"  {r['workload']} {r['desc']} / {r['impl']}: {format_time(r['graph_time_ms'])}{rate}", file=out)
    failures = [r for r in rows if r["status"] != "ok"]
    if failures:
        print("failed:", file=out)
        for r in failures:
            print(f"  {r['workload']} {r['desc']} / {r['impl']}: {r['error']}", file=out)


def _format_stat(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


class MissingMatplotlib(RuntimeError):
    """--plot was asked for but matplotlib is not installed."""


def require_matplotlib():
    """Return matplotlib.pyplot (non-interactive backend) or raise :class:`MissingMatplotlib`
    saying how to get it."""
    try:
        import matplotlib
    except ImportError as error:
        raise MissingMatplotlib("--plot needs matplotlib, which is not installed: "
                           "pip install matplotlib (or dlmfuse[bench])") from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_plot(rows: Sequence[dict], path: str) -> None:
    """PNG bar chart: per workload, one bar per peer with its time ratio to dlmfuse (log scale)."""
    plt = require_matplotlib()
    from matplotlib.ticker import FuncFormatter

    peers = [r for r in rows if r["kind"] == "peer" and r["ratio_vs_dlmfuse"] is not None
             and math.isfinite(r["ratio_vs_dlmfuse"])]
    labels = list(dict.fromkeys(f"{r['workload']} {r['desc']}" for r in rows))
    names = list(dict.fromkeys(r["impl"] for r in peers))
    width = 0.8 / max(len(names), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(labels) + 2), 4.5))
    for k, name in enumerate(names):
        mine = [r for r in peers if r["impl"] == name]
        xs = [labels.index(f"{r['workload']} {r['desc']}") + (k - (len(names) - 1) / 2) * width
              for r in mine]
        bars = ax.bar(xs, [r["ratio_vs_dlmfuse"] for r in mine], width, label=name)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ratios = [r["ratio_vs_dlmfuse"] for r in peers] + [1.0]
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_ylim(min(ratios) / 1.5, max(ratios) * 1.5)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}x"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda y, _: ""))
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("peer time / dlmfuse time")
    device = rows[0]["device"] if rows else "?"
    ax.set_title(f"dlmfuse vs peers on {device} (>1: dlmfuse faster)", fontsize=9)
    if names:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)
