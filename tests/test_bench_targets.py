"""scripts/targets.py: the issues' benchmark targets read from bench JSONL rows, same run only."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("targets", ROOT / "scripts" / "targets.py")
targets = importlib.util.module_from_spec(_spec)
sys.modules["targets"] = targets  # (its dataclasses look their module up)
_spec.loader.exec_module(targets)


def row(workload, desc, impl, time_ms, device_type="cuda", status="ok", **extra):
    return dict(workload=workload, desc=desc, impl=impl, time_ms=time_ms if status == "ok" else None,
                device_type=device_type, status=status, device="NVIDIA H100 80GB HBM3", **extra)


def by_label(results):
    return {r["label"]: r for r in results}


def test_the_committed_cpu_run_meets_c2_and_c3():
    rows = [json.loads(line) for line in open(ROOT / "bench/results/cpu-2026-12-07.jsonl")]
    results = by_label(targets.evaluate(t, rows, None) for t in targets.TARGETS)
    c2 = results["C2 fwd+bwd: <= 0.5x sdpa"]
    assert c2["met"] and c2["ratio"] == pytest.approx(c2["dlmfuse_ms"] / c2["peer_ms"])
    assert 0.27 < c2["ratio"] < 0.28  # 17.8 ms against 65.1 ms
    assert results["C2 fwd+bwd: <= 4x dlmfuse block 16"]["peer_ms"] == pytest.approx(5.36726, rel=1e-4)
    assert results["C3 packed: <= 1x flex"]["met"] and results["C3 packed: <= 0.5x sdpa"]["met"]
    # CPU rows named A1 / A4 are CPU-sized shapes: the GPU targets stay unmeasured.
    assert all(r["met"] is None for label, r in results.items() if label.startswith(("A1", "A4")))


def test_directions_missing_failed_and_bandwidth_rows():
    rows = [row("A1", "dense L=4096", "dlmfuse", 0.5), row("A1", "dense L=4096", "sdpa-flash", 0.6),
            row("A1", "dense L=4096", "sdpa-cudnn", 0.3),
            row("A2", "block-causal 32 prompt=512 L=2048", "dlmfuse", 0.2),
            row("A2", "block-causal 32 prompt=512 L=2048", "flex", 0.1, status="error"),
            row("A4", "sparse n=32 Lk=2048 B=8", "dlmfuse", 0.1, gbps=2600.0),
            row("A4", "sparse n=320 Lk=2048 B=8", "flex", 0.01),
            row("A1", "dense L=2048", "dlmfuse", 0.1, device_type="cpu"),
            row("A1", "dense L=2048", "sdpa-flash", 9.0, device_type="cpu")]
    results = by_label(targets.evaluate(t, rows, None) for t in targets.TARGETS)
    flash = results["A1 L=4096: >= 1x sdpa-flash"]  # throughput: peer time / dlmfuse time
    assert flash["ratio"] == pytest.approx(1.2) and flash["met"]
    cudnn = results["A1 L=4096: >= 0.8x sdpa-cudnn"]
    assert cudnn["ratio"] == pytest.approx(0.6) and cudnn["met"] is False
    assert results["A2 block-causal: <= 0.7x flex"]["met"] is None  # the peer failed: no ratio
    assert results["A1 L=2048: >= 1x sdpa-flash"]["met"] is None  # CPU rows do not count for GPU targets
    hbm = results["A4 n=32: >= 0.85x HBM ceiling"]  # H100 ceiling from the row's card
    assert hbm["ratio"] == pytest.approx(2600 / 2970) and hbm["met"]
    assert results["A4 n=32: <= 0.5x flex"]["met"] is None  # "n=320" is another shape
    forced = by_label(targets.evaluate(t, rows, 4.3) for t in targets.TARGETS)
    assert forced["A4 n=32: >= 0.85x HBM ceiling"]["met"] is False


def test_markdown_lists_every_target(capsys):
    assert targets.main([str(ROOT / "bench/results/cpu-2026-12-07.jsonl"), "--device", "cpu"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("| issue | target") and len(out) == 2 + sum(t.device == "cpu" for t in targets.TARGETS)
    assert all(line.endswith("| yes |") for line in out[2:])
