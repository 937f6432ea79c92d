"""The printed report of a benchmark run.

Default: one line per dlmfuse row (a workload, or a dlmfuse variant of it such as a cache mode)
with its time, its fastest peer, the ratio, the ratio's spread, a verdict and, where the workload
has a floor, how close dlmfuse comes to it; then the warnings. ``wide=True`` first prints the full
table: every implementation of every workload, with its ratio and that ratio's spread.
"""

from __future__ import annotations

from typing import Optional, Sequence, TextIO

from .common import DLMFUSE, KIND_DLMFUSE, KIND_FLOOR, Timing, format_ratio, format_time
from .stats import MIN_ROUNDS, NOISY_SPREAD

__all__ = ["print_report", "print_compact_table", "print_wide_table", "line_label"]


def line_label(row: dict) -> str:
    """``"C1 block-causal 32 L=1024"``; a dlmfuse variant adds its name (``"... / prefix"``)."""
    label = f"{row['workload']} {row['desc']}"
    if row["impl"] != DLMFUSE:
        label += f" / {row['impl'].removeprefix(DLMFUSE + '.')}"
    return label


def _ratio_range(q1: Optional[float], q3: Optional[float]) -> str:
    return "-" if q1 is None else f"{format_ratio(q1)}-{format_ratio(q3)}x"


def _columns(header: list[str], lines: list[list[str]], out: TextIO) -> None:
    widths = [max(len(line[c]) for line in [header] + lines) for c in range(len(header))]
    for line in [header] + lines:
        print("  ".join(text.ljust(width) for text, width in zip(line, widths)).rstrip(), file=out)


def print_compact_table(rows: Sequence[dict], out: TextIO) -> None:
    """One line per dlmfuse row: workload, dlmfuse, best peer, ratio, spread, verdict[, % of floor]."""
    ours = [r for r in rows if r["kind"] == KIND_DLMFUSE]
    with_floor = any(r["floor_percent"] is not None for r in ours)
    header = ["workload", "dlmfuse", "best peer", "ratio", "spread", "verdict"] + (["% of floor"] if with_floor else [])
    lines = []
    for r in ours:
        if r["status"] != "ok":
            line = [line_label(r), "failed", "-", "-", "-", "-"]
        elif r["best_peer"] is None:
            line = [line_label(r), format_time(r["time_ms"]), "-", "-", "-", "-"]
        else:
            line = [line_label(r), format_time(r["time_ms"]),
                    f"{r['best_peer']} {format_time(r['best_peer_time_ms'])}", f"{format_ratio(r['best_peer_ratio'])}x",
                    _ratio_range(r["best_peer_ratio_q1"], r["best_peer_ratio_q3"]), r["verdict"]]
        if with_floor:
            line.append("-" if r["floor_percent"] is None else f"{r['floor_percent']:.0f}% {r['floor']}")
        lines.append(line)
    _columns(header, lines, out)


def print_wide_table(rows: Sequence[dict], out: TextIO) -> None:
    """Workloads down, implementations across: "time" for dlmfuse rows, "time ratio (IQR)" for
    the others (ratio = their time / dlmfuse's), "time floor" for floors; max |diff| last."""
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    workloads = list(dict.fromkeys((r["workload"], r["desc"]) for r in rows))

    def cell(row: Optional[dict]) -> str:
        if row is None:
            return "-"
        if row["status"] != "ok":
            return "failed"
        text = format_time(row["time_ms"])
        if row["kind"] == KIND_FLOOR:
            return text + " floor"
        if row["ratio_vs_dlmfuse"] is not None:
            text += f" {format_ratio(row['ratio_vs_dlmfuse'])}x ({_ratio_range(row['ratio_q1'], row['ratio_q3'])})"
        return text

    header = ["workload"] + impls + ["max |diff|"]
    lines = []
    for wid, desc in workloads:
        by_impl = {r["impl"]: r for r in rows if r["workload"] == wid and r["desc"] == desc}
        diffs = [r["max_abs_diff_vs_dlmfuse"] for r in by_impl.values() if r["max_abs_diff_vs_dlmfuse"] is not None]
        lines.append([f"{wid} {desc}"] + [cell(by_impl.get(name)) for name in impls]
                     + [f"{max(diffs):.1e}" if diffs else "-"])
    _columns(header, lines, out)


def _print_timing(rows: Sequence[dict], timing: Timing, out: TextIO) -> None:
    """The rounds of the run; workloads with their own timing are named."""
    timings = {(r["workload"], r["desc"]): (r["repeats"], r["warmup"]) for r in rows}
    repeats, warmup = (next(iter(timings.values())) if len(set(timings.values())) == 1
                       else (timing.repeats, timing.warmup))
    print(f"{repeats} interleaved rounds after {warmup} warm-up (every implementation once per round); "
          "times are medians", file=out)
    for (wid, desc), (own_repeats, own_warmup) in timings.items():
        if (own_repeats, own_warmup) != (repeats, warmup):
            print(f"  {wid} {desc}: {own_repeats} rounds after {own_warmup} warm-up", file=out)


def print_report(rows: Sequence[dict], env: dict, timing: Timing, out: TextIO, *, wide: bool = False,
                 run_warning: Optional[str] = None) -> None:
    print(f"\ndlmfuse {env['dlmfuse']} on {env['device']}; torch {env['torch']}, "
          f"CUDA {env['cuda']}, Python {env['python']}, git {env['git_sha'][:12]}", file=out)
    _print_timing(rows, timing, out)
    if wide:
        print("\nevery implementation: ratio = its time / dlmfuse's, median over rounds (IQR); "
              "max |diff| = largest output difference from dlmfuse", file=out)
        print_wide_table(rows, out)
        print(file=out)
    print("ratio = best peer time / dlmfuse time, median over rounds (>1: dlmfuse faster); spread = the "
          "ratio's interquartile range\nverdict: faster / slower (spread above / below 1), tie (spread contains 1); "
          f"(noisy): spread wider than {NOISY_SPREAD:.0%} of the ratio, too wide to support it; too few rounds: "
          f"< {MIN_ROUNDS}\n% of floor = floor time / dlmfuse time (100%: as fast as the floor)", file=out)
    print_compact_table(rows, out)
    _print_details(rows, out)
    _print_warnings(rows, out, run_warning)


def _print_details(rows: Sequence[dict], out: TextIO) -> None:
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


def _print_warnings(rows: Sequence[dict], out: TextIO, run_warning: Optional[str]) -> None:
    """Each distinct warning once: the run's, then the workloads' (machine drift, noisy ratios)."""
    seen = [run_warning] if run_warning else []
    for r in rows:
        for warning in r.get("warnings", ()):
            if warning not in seen:
                seen.append(warning)
    if seen:
        print("WARNING: these results may not reproduce:", file=out)
        for warning in seen:
            print(f"  ! {warning}", file=out)


def _format_stat(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)
