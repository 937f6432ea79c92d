"""Calls each CUDA kernel on its benchmark shape, for Nsight Compute (``gpu_check.sh profile``).

    ncu --kernel-name regex:'attention|kv_scatter|sample_tokens' --launch-skip 1 --launch-count 6 \
        --section SpeedOfLight --section Occupancy --section WarpStateStats ... \
        python3 scripts/profile_kernels.py

Each op runs twice (the first call warms up; ncu skips it with --launch-skip) on the docs/benchmarks.md
shapes: A1 dense, A2 block-causal and A3 dense + bias attention (L=2048, H=32, D=128, bf16), A4 with 32 sparse
queries (split-KV), K1 (n=256) and S1 (T=1). The output of ncu goes to stdout; nothing is timed
here (timings come from ``python -m dlmfuse bench``).
"""

from __future__ import annotations

import sys

import torch

import dlmfuse


def main() -> int:
    if not torch.cuda.is_available():
        print("profile_kernels.py: needs a GPU", file=sys.stderr)
        return 2
    gen = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, generator=gen, device="cuda", dtype=dtype)

    L, H, D = 2048, 32, 128
    q, k, v = randn(1, L, H, D), randn(1, L, H, D), randn(1, L, H, D)
    block_causal = dlmfuse.Mask.block_causal(L, 32, prefix_len=512, device="cuda")
    bias = randn(1, H, L, L)
    is_clean = torch.rand(8, L, generator=gen, device="cuda") < 0.5
    rows = torch.multinomial((~is_clean).float(), 32, generator=gen).sort(dim=1).values
    sparse = dlmfuse.Mask.clean_and_self(is_clean).gather_queries(rows)
    q_sparse, k8, v8 = randn(8, 32, H, D), randn(8, L, H, D), randn(8, L, H, D)
    k_cache, v_cache = randn(8, 4096, H, D), randn(8, 4096, H, D)
    k_new, v_new = randn(8, 256, H, D), randn(8, 256, H, D)
    positions = torch.stack([torch.randperm(4096, device="cuda")[:256] for _ in range(8)])
    logits = randn(8, 32, 126464)

    calls = {
        "A1 dense": lambda: dlmfuse.attention(q, k, v),
        "A2 block-causal": lambda: dlmfuse.attention(q, k, v, mask=block_causal),
        "A3 dense + bias": lambda: dlmfuse.attention(q, k, v, bias=bias),
        "A4 sparse n=32": lambda: dlmfuse.attention(q_sparse, k8, v8, mask=sparse),
        "K1 kv_scatter_ n=256": lambda: dlmfuse.kv_scatter_(k_cache, v_cache, k_new, v_new, positions, validate=False),
        "S1 sample_tokens T=1": lambda: dlmfuse.sample_tokens(logits, temperature=1.0, seed=0),
    }
    for name, call in calls.items():
        try:
            for _ in range(2):
                call()
        except ValueError as e:  # a plan forced through DLMFUSE_CUDA_ATTENTION that this call cannot take
            print(f"profile_kernels.py: skipped {name}: {e}", flush=True)
            continue
        torch.cuda.synchronize()
        print(f"profile_kernels.py: ran {name} twice", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
