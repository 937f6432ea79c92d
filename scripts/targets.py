"""The issues' benchmark targets, with their same-run ratios, from `python -m dlmfuse bench --json` rows.

    python scripts/targets.py bench/results/cpu-2026-12-07.jsonl
    python scripts/targets.py gpu_out/bench_attention.jsonl --hbm-tbs 2.97

Prints one markdown table row per target (the open issues' "Targets" sections: CUDA attention
A1-A4, the fused backward A5 and C2, packed documents C3): dlmfuse's median time, the peer's from
the same file (same run), the ratio, the goal and whether it is met. A target whose rows are
missing or failed says so. GPU targets read CUDA rows only, CPU targets CPU rows. A4's bandwidth
target divides the row's GB/s (every K/V row counted, docs/benchmarks.md) by the HBM ceiling:
--hbm-tbs, else the measured copy ceiling of the card the rows name (H100 2.97 TB/s, H200 4.3).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from typing import Optional, Sequence

# Device-to-device copy ceilings measured on the lent cards (docs/benchmarks.md).
HBM_TBS = {"H100": 2.97, "H200": 4.3}


@dataclass(frozen=True)
class Target:
    issue: int
    device: str          # "cuda" or "cpu" (the rows' device_type)
    workload: str        # bench workload id
    desc: str            # a substring of the row's desc that picks the shape
    goal: float
    peer: str = ""       # the peer's impl name; "" for the bandwidth target
    higher: bool = False  # the goal bounds peer time / dlmfuse time from below (throughput), else
    #                       dlmfuse time / peer time from above
    other_desc: str = ""  # peer = dlmfuse itself on the row whose desc is this (C2's own forward)

    def label(self) -> str:
        against = f"dlmfuse {self.other_desc}" if self.other_desc else self.peer or "HBM ceiling"
        sign = ">=" if self.higher or not (self.peer or self.other_desc) else "<="
        return f"{self.workload} {self.desc.strip()}: {sign} {self.goal:g}x {against}"


TARGETS = [
    Target(14, "cuda", "A1", "L=4096", 1.0, "sdpa-flash", higher=True),
    Target(14, "cuda", "A1", "L=4096", 0.8, "sdpa-cudnn", higher=True),
    Target(14, "cuda", "A1", "L=2048", 1.0, "sdpa-flash", higher=True),
    Target(14, "cuda", "A1", "L=2048", 0.8, "sdpa-cudnn", higher=True),
    Target(14, "cuda", "A2", "block-causal", 0.7, "flex"),
    Target(14, "cuda", "A3", "dense+bias", 0.8, "flex"),
    Target(14, "cuda", "A4", "n=32 ", 0.85),
    Target(14, "cuda", "A4", "n=128 ", 0.85),
    Target(14, "cuda", "A4", "n=512 ", 0.7, "flex"),
    Target(14, "cuda", "A4", "n=32 ", 0.5, "flex"),
    Target(15, "cuda", "A5", "fwd+bwd", 0.8, "flex"),
    Target(15, "cpu", "C2", "fwd+bwd", 0.5, "sdpa"),
    Target(15, "cpu", "C2", "fwd+bwd", 4.0, other_desc="block 16"),
    Target(22, "cpu", "C3", "packed", 0.5, "sdpa"),
    Target(22, "cpu", "C3", "packed", 1.0, "flex"),
]


def _row(rows: Sequence[dict], device: str, workload: str, desc: str, impl: str, exact: bool = False) -> Optional[dict]:
    for row in rows:
        same_desc = row["desc"].endswith(desc) if exact else desc in row["desc"] + " "
        if row.get("device_type") == device and row["workload"] == workload and row["impl"] == impl and same_desc:
            return row
    return None


def _time(row: Optional[dict]) -> Optional[float]:
    return row["time_ms"] if row is not None and row.get("status") == "ok" else None


def evaluate(target: Target, rows: Sequence[dict], hbm_tbs: Optional[float]) -> dict:
    """{label, dlmfuse_ms, peer_ms, ratio, met}; ratio / met None where rows are missing or failed."""
    ours = _row(rows, target.device, target.workload, target.desc, "dlmfuse")
    result = {"label": target.label(), "issue": target.issue, "dlmfuse_ms": _time(ours), "peer_ms": None,
              "ratio": None, "met": None}
    if result["dlmfuse_ms"] is None:
        return result
    if not target.peer and not target.other_desc:  # bandwidth: the row's GB/s against the ceiling
        ceiling = hbm_tbs or next((tbs for card, tbs in HBM_TBS.items() if card in ours.get("device", "")), None)
        if ceiling is None or ours.get("gbps") is None:
            return result
        result["ratio"] = ours["gbps"] / (ceiling * 1e3)
        result["met"] = result["ratio"] >= target.goal
        return result
    if target.other_desc:
        peer = _row(rows, target.device, target.workload, target.other_desc, "dlmfuse", exact=True)
    else:
        peer = _row(rows, target.device, target.workload, target.desc, target.peer)
    result["peer_ms"] = _time(peer)
    if result["peer_ms"] is None:
        return result
    if target.higher:
        result["ratio"] = result["peer_ms"] / result["dlmfuse_ms"]
        result["met"] = result["ratio"] >= target.goal
    else:
        result["ratio"] = result["dlmfuse_ms"] / result["peer_ms"]
        result["met"] = result["ratio"] <= target.goal
    return result


def markdown(results: Sequence[dict]) -> str:
    def ms(value):
        return "-" if value is None else f"{value:.4g}"

    lines = ["| issue | target | dlmfuse ms | other ms | ratio | met |", "| --- | --- | --- | --- | --- | --- |"]
    for r in results:
        met = "not measured" if r["met"] is None else ("yes" if r["met"] else "no")
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.3g}x"
        lines.append(f"| {r['issue']} | {r['label']} | {ms(r['dlmfuse_ms'])} | {ms(r['peer_ms'])} | {ratio} | {met} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("jsonl", nargs="+", help="bench rows (python -m dlmfuse bench --json FILE)")
    parser.add_argument("--hbm-tbs", type=float, help="HBM ceiling in TB/s for A4 (default: by the rows' card)")
    parser.add_argument("--device", choices=("cuda", "cpu"), help="only this device's targets")
    args = parser.parse_args(argv)
    rows = [json.loads(line) for path in args.jsonl for line in open(path) if line.strip()]
    targets = [t for t in TARGETS if args.device in (None, t.device)]
    print(markdown([evaluate(t, rows, args.hbm_tbs) for t in targets]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
