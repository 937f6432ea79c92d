"""Benchmark statistics: interleaved rounds, medians and quartiles, paired ratios, verdicts, floors,
machine warnings, --repeats, the compact and the wide table. Implementations here advance a fake
clock by scripted durations, so every number is known exactly; no kernel runs."""

import io
import json

import pytest
import torch

from dlmfuse import bench
from dlmfuse.__main__ import build_parser, main as cli_main
from dlmfuse.bench import common, machine, runner, stats

CPU = torch.device("cpu")


class FakeClock:
    """Stands in for the runner's ``time`` module: implementations advance it."""

    def __init__(self):
        self.now = 0.0
        self.calls = []  # implementation names in call order

    def perf_counter(self):
        return self.now

    def impl(self, name, durations, kind="peer", peers=None):
        """An Impl whose k-th call takes ``durations[k]`` seconds (the first call is untimed)."""
        count = iter(range(10**6))

        def call():
            self.now += durations[min(next(count), len(durations) - 1)]
            self.calls.append(name)
            return torch.zeros(1)
        return common.Impl(name, lambda: call, kind=kind, peers=peers)


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(runner, "time", fake)
    monkeypatch.setattr(machine, "calibration_seconds", lambda device: 1e-3)  # a steady machine
    monkeypatch.setattr(machine, "start_of_run", lambda device: machine.RunLoad(0.0, 2))  # and an idle one
    return fake


def run_case(impls, repeats=5, warmup=0, **kwargs):
    workload = common.Workload("X1", "toy", "toy", {}, lambda device: common.Case(impls=impls))
    out = io.StringIO()
    rows = bench.run([workload], device=CPU, timing=common.Timing(warmup=warmup, repeats=repeats),
                     out=out, progress=io.StringIO(), **kwargs)
    return {r["impl"]: r for r in rows}, out.getvalue()


def test_summaries_and_verdicts():
    s = stats.summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (s.median, s.q1, s.q3, s.count) == (3.0, 2.0, 4.0, 5) and s.spread == pytest.approx(2 / 3)
    assert stats.summarize([2.0]) == stats.Summary(2.0, 2.0, 2.0, 1)
    with pytest.raises(ValueError, match="non-empty"):
        stats.summarize([])
    assert stats.paired_ratios([2.0, 6.0], [1.0, 3.0]) == [2.0, 2.0]
    with pytest.raises(ValueError, match="one time per round, got 2 and 1"):
        stats.paired_ratios([1.0, 2.0], [1.0])
    assert stats.verdict(stats.Summary(1.5, 1.45, 1.6, 10)) == "faster"
    assert stats.verdict(stats.Summary(0.8, 0.75, 0.85, 10)) == "slower"
    assert stats.verdict(stats.Summary(1.02, 0.97, 1.05, 10)) == "tie"
    assert stats.verdict(stats.Summary(2.0, 1.2, 3.0, 10)) == "faster (noisy)"
    assert stats.verdict(stats.Summary(1.0, 0.5, 2.0, 10)) == "tie (noisy)"
    assert stats.verdict(stats.Summary(2.0, 2.0, 2.0, 2)) == "too few rounds"
    assert stats.spread_warning("w", stats.Summary(1.5, 1.45, 1.6, 10)) is None
    assert "too noisy" in stats.spread_warning("w", stats.Summary(2.0, 1.2, 3.0, 10))


def test_rounds_interleave_with_a_rotating_start(clock):
    run_case([clock.impl("dlmfuse", [1.0], kind="dlmfuse"), clock.impl("a", [1.0]), clock.impl("b", [1.0])],
             repeats=3, warmup=1)
    first_calls, rounds = clock.calls[:3], clock.calls[3:]
    assert first_calls == ["dlmfuse", "a", "b"]  # prepare + first call, in order
    assert [rounds[i:i + 3] for i in range(0, len(rounds), 3)] == [
        ["dlmfuse", "a", "b"],   # warm-up round
        ["a", "b", "dlmfuse"],   # timed rounds: every implementation once, the start rotating
        ["b", "dlmfuse", "a"],
        ["dlmfuse", "a", "b"]]


def test_paired_ratio_quartiles_verdict_and_floor(clock):
    ours = [0.0, 1.0, 1.0, 2.0, 1.0, 1.0]       # first call, then 5 rounds
    peer = [0.0, 3.0, 3.0, 6.0, 3.3, 2.7]       # 3x dlmfuse in every round, even the slow one
    slow_peer = [0.0, 9.0, 9.0, 9.0, 9.0, 9.0]
    floor = [0.0, 0.5, 0.5, 1.0, 0.5, 0.5]
    by, table = run_case([clock.impl("dlmfuse", ours, kind="dlmfuse"), clock.impl("fast", peer),
                          clock.impl("slow", slow_peer), clock.impl("floor.x", floor, kind="floor")])
    fast, mine = by["fast"], by["dlmfuse"]
    assert mine["times_ms"] == [1e3, 1e3, 2e3, 1e3, 1e3]
    assert (mine["time_ms"], mine["time_q1_ms"], mine["time_q3_ms"]) == (1e3, 1e3, 1e3)
    assert (fast["ratio_vs_dlmfuse"], fast["ratio_q1"], fast["ratio_q3"]) == pytest.approx((3.0, 3.0, 3.0))
    assert fast["verdict"] == "faster" and by["slow"]["verdict"] == "faster"
    # The best peer is the fastest one; the slow round of both sides leaves the ratio at 3.
    assert mine["best_peer"] == "fast" and mine["best_peer_ratio"] == pytest.approx(3.0)
    assert mine["best_peer_time_ms"] == fast["time_ms"] and mine["verdict"] == "faster"
    assert set(mine["peer_ratios"]) == {"fast", "slow"}
    # A floor is no peer: no verdict, no bar; dlmfuse reaches 50% of its speed.
    assert by["floor.x"]["verdict"] is None and "floor.x" not in mine["peer_ratios"]
    assert (mine["floor"], mine["floor_percent"]) == ("floor.x", pytest.approx(50.0))
    assert mine["warnings"] == [] and "WARNING" not in table
    assert mine["machine"]["busy"] is False and mine["machine"]["calibration_drift"] == 0.0


def test_noisy_ratio_is_flagged(clock):
    ours = [0.0] + [1.0] * 5
    peer = [0.0, 1.0, 4.0, 2.0, 0.5, 3.0]  # ratios 1, 4, 2, 0.5, 3: IQR 1-3 around a median of 2
    by, table = run_case([clock.impl("dlmfuse", ours, kind="dlmfuse"), clock.impl("p", peer)])
    mine = by["dlmfuse"]
    assert (mine["best_peer_ratio"], mine["best_peer_ratio_q1"], mine["best_peer_ratio_q3"]) == (2.0, 1.0, 3.0)
    assert mine["best_peer_ratio_spread"] == 1.0 and mine["verdict"] == "tie (noisy)"
    assert any("too noisy to support it" in w for w in mine["warnings"])
    assert "WARNING: these results may not reproduce" in table and "too noisy" in table


def test_variant_rows_compare_with_their_own_peers(clock):
    """A dlmfuse variant (a cache mode, greedy sampling) gets its own line and best peer."""
    by, table = run_case([clock.impl("dlmfuse", [0.0] + [1.0] * 5, kind="dlmfuse"),
                          clock.impl("dlmfuse.fast", [0.0] + [0.5] * 5, kind="dlmfuse", peers=("b",)),
                          clock.impl("a", [0.0] + [1.5] * 5), clock.impl("b", [0.0] + [2.0] * 5),
                          clock.impl("build", [0.0] + [4.0] * 5, kind="overhead")])
    assert by["dlmfuse"]["best_peer"] == "a" and by["dlmfuse"]["best_peer_ratio"] == pytest.approx(1.5)
    assert by["dlmfuse.fast"]["best_peer"] == "b" and by["dlmfuse.fast"]["best_peer_ratio"] == pytest.approx(4.0)
    assert by["build"]["ratio_vs_dlmfuse"] == pytest.approx(4.0) and by["build"]["verdict"] is None
    lines = table.splitlines()
    header = next(line for line in lines if line.startswith("workload"))
    assert header.split() == ["workload", "dlmfuse", "best", "peer", "ratio", "spread", "verdict"]
    assert next(line for line in lines if line.startswith("X1 toy / fast")).split() == \
        ["X1", "toy", "/", "fast", "500", "ms", "b", "2.00", "s", "4.00x", "4.00-4.00x", "faster"]
    assert "X1 toy " in table and "build" not in header  # overheads are not peers of the compact table


def test_wide_table_lists_every_implementation(clock):
    by, table = run_case([clock.impl("dlmfuse", [0.0] + [1.0] * 5, kind="dlmfuse"),
                          clock.impl("a", [0.0] + [1.5] * 5), clock.impl("floor.x", [0.0] + [0.5] * 5, kind="floor")],
                         wide=True)
    wide_header = next(line for line in table.splitlines() if line.startswith("workload") and "floor.x" in line)
    assert wide_header.split() == ["workload", "dlmfuse", "a", "floor.x", "max", "|diff|"]
    assert "1.50 s 1.50x (1.50-1.50x)" in table and "500 ms floor" in table


def test_busy_machine_and_drift_are_warned(clock, monkeypatch):
    monkeypatch.setattr(machine, "start_of_run", lambda device: machine.RunLoad(8.0, 2))
    calibrations = iter([1e-3, 2e-3])  # before and after the workload: the machine halved its speed
    monkeypatch.setattr(machine, "calibration_seconds", lambda device: next(calibrations))
    by, table = run_case([clock.impl("dlmfuse", [0.0] + [1.0] * 5, kind="dlmfuse"), clock.impl("a", [0.0] + [2.0] * 5)])
    record = by["dlmfuse"]["machine"]
    assert record["busy"] and record["calibration_ms_before"] == 1.0 and record["calibration_ms_after"] == 2.0
    assert record["calibration_drift"] == 1.0 and record["load_average_at_start"] == 8.0
    for row in by.values():
        assert any(w.startswith("machine busy") for w in row["warnings"])
        assert any(w.startswith("machine speed changed during X1 toy") for w in row["warnings"])
    assert "! machine busy: 1-minute load average" in table and "! machine speed changed during X1 toy" in table
    assert table.count("! machine busy") == 1  # each warning once, not once per row


def test_stalled_threads_are_a_busy_machine(monkeypatch):
    """torch's threads no faster than one thread: the symptom of cores held by other processes."""
    monkeypatch.setattr(machine, "load_average", lambda: 0.0)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(machine, "calibration_seconds", lambda device: 16e-3)
    monkeypatch.setattr(machine, "single_thread_seconds", lambda device: 1.2e-3)
    stalled = machine.start_of_run(CPU)
    assert stalled.busy and stalled.threads_stalled and not stalled.loaded
    assert "torch's 2 threads ran the calibration kernel in 16 ms, one thread in 1.2 ms" in stalled.warning()
    monkeypatch.setattr(machine, "calibration_seconds", lambda device: 0.7e-3)  # threads help: quiet
    assert not machine.start_of_run(CPU).busy and machine.start_of_run(CPU).warning() is None


def test_real_calibration_and_load_probe():
    seconds = machine.calibration_seconds(CPU)
    assert 0 < seconds < 1.0
    threads = torch.get_num_threads()
    assert 0 < machine.single_thread_seconds(CPU) < 1.0 and torch.get_num_threads() == threads
    load = machine.start_of_run(CPU)
    assert load.cpus >= 1 and (load.load_average is None or load.load_average >= 0)


def test_repeats_replace_every_workloads_rounds(clock):
    own = common.Workload("X1", "own timing", "toy", {},
                          lambda device: common.Case(impls=[clock.impl("dlmfuse", [1.0], kind="dlmfuse")]),
                          timing=common.Timing(warmup=0, repeats=2))
    rows = bench.run([own], device=CPU, timing=common.Timing(warmup=0, repeats=3), repeats=7,
                     out=io.StringIO(), progress=io.StringIO())
    assert rows[0]["repeats"] == 7 and len(rows[0]["times_ms"]) == 7
    with pytest.raises(ValueError, match="repeats must be a positive int, got 0"):
        bench.run([own], device=CPU, repeats=0)


def test_cli_repeats_and_wide_flags(capsys, tmp_path, monkeypatch):
    args = build_parser().parse_args(["bench", "--repeats", "4", "--wide"])
    assert args.repeats == 4 and args.wide
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "--repeats", "0"])
    assert "argument --repeats: must be a positive integer, got '0'" in capsys.readouterr().err
    # End to end through the CLI on the smallest family run, with the flags reaching the rows.
    seen = {}
    monkeypatch.setattr(bench, "run", lambda workloads, **kwargs: seen.update(kwargs) or [])
    assert cli_main(["bench", "--only", "kv_cache", "--repeats", "4", "--wide", "--device", "cpu"]) == 0
    assert seen["repeats"] == 4 and seen["wide"] is True


def test_rows_are_json(clock, tmp_path):
    path = tmp_path / "rows.jsonl"
    run_case([clock.impl("dlmfuse", [0.0] + [1.0] * 5, kind="dlmfuse"), clock.impl("a", [0.0] + [2.0] * 5)],
             json_path=str(path))
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["impl"] for r in rows] == ["dlmfuse", "a"]
    assert rows[0]["verdict"] == "faster" and rows[0]["interleaved"] is True
    assert rows[0]["peer_ratios"] == {"a": {"ratio": 2.0, "q1": 2.0, "q3": 2.0}}


def test_an_implementation_failing_mid_rounds_leaves_them(clock):
    """A peer that raises in a timed round is recorded as failed; the others keep every round."""
    calls = iter(range(100))

    def flaky():
        if next(calls) == 2:  # first call and round 1 pass, round 2 raises
            raise RuntimeError("out of workspace")
        clock.now += 1.0
        return torch.zeros(1)
    by, table = run_case([clock.impl("dlmfuse", [0.0] + [1.0] * 5, kind="dlmfuse"),
                          common.Impl("flaky", lambda: flaky), clock.impl("a", [0.0] + [2.0] * 5)])
    assert by["flaky"]["status"] == "error" and "RuntimeError: out of workspace" in by["flaky"]["error"]
    assert by["flaky"]["time_ms"] is None and by["dlmfuse"]["best_peer"] == "a"
    assert len(by["dlmfuse"]["times_ms"]) == len(by["a"]["times_ms"]) == 5
    assert "flaky: RuntimeError: out of workspace" in table
