"""How a workload is run, identically for every family.

1. Each implementation is prepared and called once: compilation happens there, and so does the
   moment a peer refuses the inputs (the reason is recorded in its row instead of aborting the
   run). Its output is checked against dlmfuse's right away (max abs difference).
2. Warm-up rounds, then ``repeats`` timed rounds. A round calls every implementation once, the
   starting one rotating from round to round, so dlmfuse and each peer are timed *interleaved*: a
   slow spell of the machine lands on both sides of a ratio (CPU: ``time.perf_counter``; CUDA:
   CUDA events).
3. Per row the median time and its quartiles; per peer the per-round ratio to dlmfuse (median and
   quartiles); per dlmfuse row its best peer, the ratio with its spread and a verdict, and how
   close it comes to a floor (:mod:`.stats`). A calibration kernel timed before and after every
   workload and the load average at the start say whether the machine was quiet
   (:mod:`.machine`); what does not hold up becomes a warning in the rows and under the table.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
import warnings
from typing import Any, Callable, Iterable, Optional, Sequence, TextIO

import torch

from . import machine
from .common import (DLMFUSE, KIND_DLMFUSE, KIND_FLOOR, KIND_OVERHEAD, KIND_PEER, MAX_ERROR_CHARS, Impl, Timing,
                     Workload, environment, format_time)
from .plot import require_matplotlib, write_plot
from .report import print_report
from .stats import Summary, paired_ratios, spread_warning, summarize, verdict

__all__ = ["run", "run_workload", "is_skipped", "measure_graph", "synchronize"]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_graph(fn: Callable[[], Any], device: torch.device, timing: Timing) -> list[float]:
    """Seconds per replay of ``fn`` captured in a CUDA graph: the device time of the call without
    the host's launch overhead (which the eager timing includes when the host is the slower side).
    Replays of one implementation back to back (after the interleaved eager rounds)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # capture wants a warm-up call off the default stream
        fn()
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(timing.warmup):
        graph.replay()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(timing.repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(timing.repeats)]
    for start, end in zip(starts, ends):
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) / 1e3 for start, end in zip(starts, ends)]


class _Timed:
    """One implementation in the rounds: its callable and the seconds of each timed call."""

    def __init__(self, row: dict, impl: Impl, fn: Callable[[], Any]):
        self.row, self.impl, self.fn = row, impl, fn
        self.seconds: list[float] = []
        self.events: list[tuple] = []  # CUDA (start, end) event pairs, read after the rounds
        self.failed = False


def _time_rounds(entries: list[_Timed], device: torch.device, timing: Timing) -> None:
    """Warm-up and timed rounds over ``entries`` (rotating start); an implementation that raises
    leaves the rounds with its row marked failed."""
    if not entries:  # every implementation refused: nothing to time, no device to touch
        return
    cuda = device.type == "cuda"

    def call(entry: _Timed, timed: bool) -> None:
        try:
            if not timed:
                entry.fn()
            elif cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                entry.fn()
                end.record()
                entry.events.append((start, end))
            else:
                t0 = time.perf_counter()
                entry.fn()
                entry.seconds.append(time.perf_counter() - t0)
        except Exception as error:
            entry.failed = True
            entry.row.update(status="error", error=_describe_failure(error, []))

    for round_index in range(timing.warmup + timing.repeats):
        active = [e for e in entries if not e.failed]
        shift = round_index % max(len(active), 1)
        for entry in active[shift:] + active[:shift]:
            call(entry, timed=round_index >= timing.warmup)
        if round_index + 1 == timing.warmup:
            synchronize(device)  # timed rounds start on an idle device
    synchronize(device)
    if cuda:
        for entry in entries:
            entry.seconds = [start.elapsed_time(end) / 1e3 for start, end in entry.events]


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


def _new_row(workload: Workload, impl: Impl, timing: Timing) -> dict:
    return {"family": workload.family, "workload": workload.id, "desc": workload.desc,
            "impl": impl.name, "kind": impl.kind, "params": workload.params,
            "status": "ok", "error": None, "time_ms": None, "times_ms": None,
            "time_q1_ms": None, "time_q3_ms": None, "time_spread": None,
            "tflops_dense": None, "tflops_visible": None, "gbps": None,
            "ratio_vs_dlmfuse": None, "ratio_q1": None, "ratio_q3": None, "ratio_spread": None,
            "best_peer": None, "best_peer_time_ms": None, "best_peer_ratio": None,
            "best_peer_ratio_q1": None, "best_peer_ratio_q3": None, "best_peer_ratio_spread": None,
            "peer_ratios": None, "floor": None, "floor_percent": None, "verdict": None, "warnings": [],
            "max_abs_diff_vs_dlmfuse": None, "interleaved": True,
            "warmup": timing.warmup, "repeats": timing.repeats, "stats": None,
            "graph_time_ms": None, "graph_gbps": None, "graph_error": None}


def run_workload(workload: Workload, device: torch.device, timing: Timing,
                 skip: Iterable[str] = ()) -> list[dict]:
    """Rows (without environment and machine record) for every implementation of ``workload``
    not in ``skip``."""
    case = workload.setup(device)
    rows, entries = [], []
    reference = None  # dlmfuse's output in the common layout, float32
    for impl in case.impls:
        if is_skipped(impl.name, skip):
            continue
        row = _new_row(workload, impl, timing)
        rows.append(row)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                fn = impl.prepare()
                out = fn()  # first call: compiles, or shows that the implementation refuses
                synchronize(device)
            except Exception as error:  # a failing peer is a result, not a crash
                row.update(status="error", error=_describe_failure(error, caught))
                continue
        # Checked now, before another implementation runs (some share buffers, e.g. KV caches).
        if impl.to_common is not None:
            common = impl.to_common(out).float()
            if impl.kind == KIND_DLMFUSE:
                reference = common
            elif reference is not None:
                row["max_abs_diff_vs_dlmfuse"] = (common - reference).abs().max().item()
        entries.append(_Timed(row, impl, fn))
    _time_rounds(entries, device, timing)
    timed = [e for e in entries if not e.failed]
    for entry in timed:
        _fill_times(entry, case, device, timing)
    _compare(timed)
    if case.stats is not None:
        stats = case.stats({e.impl.name: e.row["time_ms"] / 1e3 for e in timed})
        for row in rows:
            row["stats"] = stats.get(row["impl"])
    return rows


def _fill_times(entry: _Timed, case, device: torch.device, timing: Timing) -> None:
    row, impl = entry.row, entry.impl
    times = summarize(entry.seconds)
    row.update(time_ms=times.median * 1e3, times_ms=[t * 1e3 for t in entry.seconds],
               time_q1_ms=times.q1 * 1e3, time_q3_ms=times.q3 * 1e3, time_spread=times.spread)
    if impl.kind != KIND_OVERHEAD:  # throughput of the op itself, not of a side cost
        if case.flops_dense is not None:
            row["tflops_dense"] = case.flops_dense / times.median / 1e12
        if case.flops_visible is not None:
            row["tflops_visible"] = case.flops_visible / times.median / 1e12
        if case.bytes_read is not None:
            row["gbps"] = case.bytes_read / times.median / 1e9
    if impl.graph and device.type == "cuda":
        try:
            graph_seconds = statistics.median(measure_graph(entry.fn, device, timing))
            row["graph_time_ms"] = graph_seconds * 1e3
            if case.bytes_read is not None:
                row["graph_gbps"] = case.bytes_read / graph_seconds / 1e9
        except Exception as error:  # the eager timing stands; say why the graph one is missing
            torch.cuda.synchronize(device)
            row["graph_error"] = _describe_failure(error, [])


def _ratio(numerator: _Timed, denominator: _Timed) -> Summary:
    return summarize(paired_ratios(numerator.seconds, denominator.seconds))


def _compare(timed: list[_Timed]) -> None:
    """Ratios against dlmfuse (peer, overhead and floor rows), and for every dlmfuse row its best
    peer, the verdict and the share of the floor it reaches."""
    ours = [e for e in timed if e.impl.kind == KIND_DLMFUSE]
    peers = [e for e in timed if e.impl.kind == KIND_PEER]
    floor = next((e for e in timed if e.impl.kind == KIND_FLOOR), None)
    if not ours:
        return
    primary = ours[0]
    for entry in timed:
        if entry.impl.kind == KIND_DLMFUSE:
            continue
        ratio = _ratio(entry, primary)
        entry.row.update(ratio_vs_dlmfuse=ratio.median, ratio_q1=ratio.q1, ratio_q3=ratio.q3,
                         ratio_spread=ratio.spread)
        if entry.impl.kind == KIND_PEER:
            entry.row["verdict"] = verdict(ratio)
    for entry in ours:
        row = entry.row
        if floor is not None:
            row.update(floor=floor.impl.name, floor_percent=100.0 * _ratio(floor, entry).median)
        mine = [p for p in peers if entry.impl.peers is None or p.impl.name in entry.impl.peers]
        if not mine:
            continue
        ratios = {p.impl.name: _ratio(p, entry) for p in mine}
        row["peer_ratios"] = {name: {"ratio": r.median, "q1": r.q1, "q3": r.q3} for name, r in ratios.items()}
        best = min(mine, key=lambda p: p.row["time_ms"])
        ratio = ratios[best.impl.name]
        row.update(best_peer=best.impl.name, best_peer_time_ms=best.row["time_ms"],
                   best_peer_ratio=ratio.median, best_peer_ratio_q1=ratio.q1, best_peer_ratio_q3=ratio.q3,
                   best_peer_ratio_spread=ratio.spread, verdict=verdict(ratio))
        warning = spread_warning(f"{row['workload']} {row['desc']} / {row['impl']} vs {best.impl.name}", ratio)
        if warning is not None:
            row["warnings"].append(warning)


def run(workloads: Sequence[Workload], *, device: torch.device, timing: Timing,
        repeats: Optional[int] = None, skip: Iterable[str] = (), command: str = "",
        json_path: Optional[str] = None, plot_path: Optional[str] = None, wide: bool = False,
        out: TextIO = sys.stdout, progress: TextIO = sys.stderr) -> list[dict]:
    """Run ``workloads`` in order, print progress and the table, write JSONL and the plot.

    ``repeats`` (when given) replaces the timed rounds of every workload, its own timing included.
    Returns every row (environment included). The JSONL file is rewritten and flushed after each
    workload, so an interrupted run keeps what it measured.
    """
    if plot_path is not None:
        require_matplotlib()  # fail before minutes of benchmarking, not after
    for path in (json_path, plot_path):
        if path is not None:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    skip = list(skip)
    run_load = machine.start_of_run(device)  # before the benchmark adds its own load
    env = environment(device, command)
    rows: list[dict] = []
    json_file = open(json_path, "w") if json_path else None
    try:
        calibration = machine.calibration_seconds(device)
        for i, workload in enumerate(workloads, 1):
            print(f"[{i}/{len(workloads)}] {workload.id} {workload.desc} ...", end=" ",
                  file=progress, flush=True)
            own = workload.timing if workload.timing is not None else timing
            if repeats is not None:
                own = Timing(warmup=own.warmup, repeats=repeats)
            new_rows = run_workload(workload, device, own, skip)
            after = machine.calibration_seconds(device)
            _add_machine(new_rows, f"{workload.id} {workload.desc}", run_load, calibration, after)
            calibration = after
            new_rows = [{**row, **env} for row in new_rows]
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
    print_report(rows, env, timing, out, wide=wide, run_warning=run_load.warning())
    if plot_path is not None:
        write_plot(rows, plot_path)
        print(f"plot written to {plot_path}", file=out)
    if json_path is not None:
        print(f"{len(rows)} rows written to {json_path}", file=out)
    return rows


def _add_machine(rows: list[dict], workload: str, run_load: machine.RunLoad, before: float, after: float) -> None:
    record = machine.machine_record(run_load, before, after)
    extra = [w for w in (run_load.warning(), machine.drift_warning(workload, before, after)) if w is not None]
    for row in rows:
        row["machine"] = record
        row["warnings"] = extra + row["warnings"]


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
