"""Does a row's result depend on how many rows the GEMM / attention call has? (E1's bf16 identity)

generate()'s exact mode computes logits only for the rows a step unmasks from (``logits_for``);
the LLaDA-style reference loop computes them for every row and then selects. In float32 both
give identical greedy tokens. In bf16 on an H200 they agreed on only 18-29% of E1's tokens. The
suspected cause: the GEMM library picks a different kernel (tile shape, split-K) for 32 rows than
for 768, so the same row's logits round differently, and greedy argmax flips at near-ties.

This script checks that directly on LLaDA-8B's LM head shape (d 4096, vocab 126464) with random
bf16 weights: the logits of the last block's rows, computed alone and as a slice of all rows.
It prints whether they are bitwise equal, the largest difference, and how many rows' argmax
differ. With ``--layers`` it does the same for the shapes the last layer runs on the selected
rows only under ``logits_for`` (q/o projections, MLP up and down, and attention against all 768
keys). Usage: ``python scripts/lm_head_rounding.py [--device cuda] [--dtype bfloat16] [--layers]``.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F


def compare(device: str, dtype: torch.dtype, rows_total: int, block: int, d: int, vocab: int) -> dict:
    gen = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(rows_total, d, generator=gen, device=device, dtype=dtype)
    weight = torch.randn(vocab, d, generator=gen, device=device, dtype=dtype) * d ** -0.5
    block_rows = slice(rows_total - block, rows_total)
    alone = F.linear(hidden[block_rows], weight)
    sliced = F.linear(hidden, weight)[block_rows]
    diff = (alone.float() - sliced.float()).abs()
    return {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "shape": f"[{rows_total} or {block}, {d}] x [{d}, {vocab}]",
        "bitwise_equal": bool(torch.equal(alone, sliced)),
        "values_differing": f"{float((diff > 0).float().mean()):.4f}",
        "max_abs_diff": float(diff.max()),
        "argmax_rows_differing": int((alone.argmax(-1) != sliced.argmax(-1)).sum()),
        "rows": block,
    }


def compare_layers(device: str, dtype: torch.dtype, rows_total: int, block: int) -> None:
    """The last layer's shapes (LLaDA-8B): is the block's result bitwise that of all rows, sliced?"""
    import dlmfuse

    gen = torch.Generator(device=device).manual_seed(1)
    block_rows = slice(rows_total - block, rows_total)
    for name, d_in, d_out in (("q / o projection", 4096, 4096), ("MLP gate / up", 4096, 12288),
                              ("MLP down", 12288, 4096)):
        x = torch.randn(rows_total, d_in, generator=gen, device=device, dtype=dtype)
        w = torch.randn(d_out, d_in, generator=gen, device=device, dtype=dtype) * d_in ** -0.5
        _report(name, F.linear(x[block_rows], w), F.linear(x, w)[block_rows])
    q = torch.randn(1, rows_total, 32, 128, generator=gen, device=device, dtype=dtype)
    k, v = (torch.randn(1, rows_total, 32, 128, generator=gen, device=device, dtype=dtype) for _ in "kv")
    _report("attention (dlmfuse)", dlmfuse.attention(q[:, block_rows], k, v), dlmfuse.attention(q, k, v)[:, block_rows])


def _report(name: str, alone: torch.Tensor, sliced: torch.Tensor) -> None:
    print(f"{name:24s} bitwise_equal={torch.equal(alone, sliced)} "
          f"max_abs_diff={float((alone.float() - sliced.float()).abs().max()):.3g}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--rows", type=int, default=768, help="all rows (prompt 512 + gen 256)")
    parser.add_argument("--block", type=int, default=32, help="rows that need logits")
    parser.add_argument("--d", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=126464)
    parser.add_argument("--layers", action="store_true", help="also the last layer's shapes")
    args = parser.parse_args()
    result = compare(args.device, getattr(torch, args.dtype), args.rows, args.block, args.d, args.vocab)
    for key, value in result.items():
        print(f"{key:24s} {value}")
    if args.layers:
        compare_layers(args.device, getattr(torch, args.dtype), args.rows, args.block)


if __name__ == "__main__":
    main()
