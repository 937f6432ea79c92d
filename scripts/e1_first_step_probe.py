"""Where do exact mode's bf16 logits part from the reference loop's? (E1 token identity, GPU)

E1's first step, on the LLaDA-8B-shaped random model of `python -m dlmfuse bench`: the block's
logits from the full forward (the reference loop: ``model(x)`` then the block's rows) and from
``model(x, logits_for=rows)`` (exact mode: the last layer runs only the block's query rows). Every
layer but the last runs the same shapes in both. The LM head gives the same rows bitwise for 32
and 768 rows (scripts/lm_head_rounding.py, H200), so a difference comes from the last layer's
32-row projections, MLP or attention.

The suspect is the attention: 32 query rows against 768 keys make the split-KV heuristic split
the key range, which sums in another order than the unsplit 768-row call, and auto may pick
another kernel for 32 rows than for 768. So the probe runs under several settings:
DLMFUSE_CUDA_ATTENTION (the kernel) x DLMFUSE_ATTENTION_SPLITS=1 or the heuristic. If the
difference vanishes with one split, that is the cause.

Usage: ``python scripts/e1_first_step_probe.py [--layers 32] [--batch 1]`` (CUDA; about 16 GB of
bf16 weights at 32 layers; on a machine without CUDA it runs GenSpec's small CPU model once).
"""
from __future__ import annotations

import argparse
import os

import torch

from dlmfuse.bench.generate import GPU_SETTINGS, LLADA_8B, GenSpec, build_model, first_block_logits, random_prompt

SETTINGS = [  # (DLMFUSE_CUDA_ATTENTION, DLMFUSE_ATTENTION_SPLITS; "" = the heuristic)
    ("auto", ""), ("auto", "1"), ("double_buffer", ""), ("double_buffer", "1"),
]


def probe(model, spec: GenSpec, prompt: torch.Tensor) -> dict:
    every_row, only_rows = first_block_logits(model, spec, prompt)
    diff = (every_row.float() - only_rows.float()).abs()
    return {"bitwise_equal": bool(torch.equal(every_row, only_rows)),
            "max_abs_diff": float(diff.max()),
            "argmax_agree": float((every_row.argmax(-1) == only_rows.argmax(-1)).double().mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=LLADA_8B["layers"])
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    shape = dict(**GPU_SETTINGS, **dict(LLADA_8B, layers=args.layers)) if cuda else {}
    spec = GenSpec(B=args.batch, **shape)
    model = build_model(spec, device)
    prompt = random_prompt(spec, device)
    print(f"{spec.desc} on {torch.cuda.get_device_name() if cuda else 'cpu'}: first block's logits, "
          f"full forward vs logits_for")
    for kernel, splits in SETTINGS if cuda else SETTINGS[:1]:
        os.environ["DLMFUSE_CUDA_ATTENTION"] = kernel
        os.environ["DLMFUSE_ATTENTION_SPLITS"] = splits
        result = probe(model, spec, prompt)
        print(f"  kernel={kernel:14s} splits={splits or 'heuristic':9s} " + "  ".join(f"{k}={v}" for k, v in result.items()))


if __name__ == "__main__":
    main()
