"""The benchmark harness end to end on tiny workloads (FlexAttention is skipped: compiling it takes
~20 s on these CPUs), plus the workload lists and the command line. A few seconds on CPU."""

import io
import json
import math
import sys

import pytest
import torch

from dlmfuse import bench
from dlmfuse.__main__ import main as cli_main
from dlmfuse.bench import common
from dlmfuse.bench.attention import AttnSpec, workload, workloads

CPU = torch.device("cpu")
TINY_TIMING = common.Timing(warmup=0, repeats=2)
TINY = [AttnSpec("T1", "dense", L=64, H=2),
        AttnSpec("T2", "bias", L=32, H=2),
        AttnSpec("T3", "block_causal", L=64, H=2, block=16, prompt=16),
        AttnSpec("T4", "sparse", L=64, B=2, H=2, n=8)]

ROW_KEYS = {"family", "workload", "desc", "impl", "kind", "params", "status", "error", "time_ms",
            "times_ms", "tflops_dense", "tflops_visible", "gbps", "ratio_vs_dlmfuse",
            "max_abs_diff_vs_dlmfuse", "device", "torch", "cuda", "python", "dlmfuse",
            "build_info", "git_sha", "timestamp", "command"}


def run_tiny(specs, tmp_path, **kwargs):
    out, progress = io.StringIO(), io.StringIO()
    json_path = tmp_path / "out" / "rows.jsonl"  # the harness creates the folder
    rows = bench.run([workload(s) for s in specs], device=CPU, timing=TINY_TIMING, skip=["flex"],
                     command="pytest", json_path=str(json_path), out=out, progress=progress,
                     **kwargs)
    return rows, json_path, out.getvalue(), progress.getvalue()


def test_tiny_run_writes_rows_table_and_progress(tmp_path):
    rows, json_path, table, progress = run_tiny(TINY, tmp_path)

    parsed = [json.loads(line) for line in json_path.read_text().splitlines()]
    assert parsed == json.loads(json.dumps(rows))
    assert {(r["workload"], r["impl"]) for r in parsed} == \
        {(s.id, impl) for s in TINY for impl in ("dlmfuse", "sdpa")}
    for row in parsed:
        assert ROW_KEYS <= row.keys()
        assert row["status"] == "ok", row["error"]
        assert row["command"] == "pytest" and row["git_sha"]
        assert math.isfinite(row["time_ms"]) and row["time_ms"] > 0
        assert row["tflops_visible"] <= row["tflops_dense"]
        if row["impl"] == "sdpa":
            assert math.isfinite(row["ratio_vs_dlmfuse"]) and row["ratio_vs_dlmfuse"] > 0
            assert row["max_abs_diff_vs_dlmfuse"] < 1e-4  # fp32: the same attention
    assert all(r["gbps"] > 0 for r in parsed if r["workload"] == "T4")

    for i, spec in enumerate(TINY, 1):
        assert f"[{i}/{len(TINY)}] {spec.id} {spec.desc} ..." in progress
        assert f"{spec.id} {spec.desc}" in table
    assert "sdpa" in table and "dlmfuse faster" in table and "failed" not in table


def test_failing_peer_is_recorded_not_fatal(tmp_path):
    def setup(device):
        x = torch.ones(4)

        def refuse():
            raise RuntimeError("No available kernel for these inputs")
        return common.Case(impls=[common.Impl("dlmfuse", lambda: lambda: x * 2,
                                              to_common=lambda out: out, kind="dlmfuse"),
                                  common.Impl("broken", refuse),
                                  common.Impl("other", lambda: lambda: x + x,
                                              to_common=lambda out: out)])
    w = common.Workload("X1", "toy", "toy", {}, setup)
    out = io.StringIO()
    rows = bench.run([w], device=CPU, timing=TINY_TIMING, out=out, progress=io.StringIO())
    by_impl = {r["impl"]: r for r in rows}
    assert by_impl["broken"]["status"] == "error"
    assert "No available kernel" in by_impl["broken"]["error"]
    assert by_impl["other"]["max_abs_diff_vs_dlmfuse"] == 0.0
    assert "broken: RuntimeError: No available kernel" in out.getvalue()


def test_plot_is_png(tmp_path):
    pytest.importorskip("matplotlib")
    plot = tmp_path / "ratios.png"
    run_tiny(TINY[:1], tmp_path, plot_path=str(plot))
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    with pytest.raises(common.MissingMatplotlib, match="pip install matplotlib"):
        common.require_matplotlib()


def test_skip_matches_peer_variants():
    assert common.is_skipped("flex.create_block_mask", ["flex"])
    assert common.is_skipped("sdpa-cudnn", ["sdpa"])
    assert not common.is_skipped("sdpa", ["sdpa-cudnn"])
    assert not common.is_skipped("dlmfuse", ["dlmfuse"])


def test_default_workloads_follow_design():
    """DESIGN.md §8 rows; building the lists allocates nothing and never touches a GPU."""
    for quick in (False, True):
        cpu = workloads(CPU, quick)
        c1 = [w for w in cpu if w.id == "C1"]
        assert len(c1) == 1 and c1[0].params == dict(
            id="C1", pattern="block_causal", L=1024, B=1, H=8, D=64, dtype="float32",
            block=32, prompt=0, n=0)
        assert {"A1", "A2", "A4"} <= {w.id for w in cpu}
    gpu = workloads(torch.device("cuda"), quick=False)
    assert {w.id for w in gpu} == {"A1", "A2", "A3", "A4"}
    assert sorted(w.params["n"] for w in gpu if w.id == "A4") == [32, 128, 512]
    assert {w.params["dtype"] for w in gpu} == {"bfloat16"}


def test_cli_info_prints_build_info(capsys):
    assert cli_main(["info"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert {"version", "cuda", "cuda_archs"} <= info.keys()


@pytest.mark.parametrize("argv", [["--help"], ["bench", "--help"]])
def test_cli_help(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(argv)
    assert exit_info.value.code == 0
    assert "bench" in capsys.readouterr().out
