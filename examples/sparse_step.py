"""One "mask-only" denoising step: only the still-masked positions are queries, they see the clean
tokens and themselves, then the most confident of them are unmasked and the KV cache is updated.

Nothing is rebuilt when the set of clean tokens changes: the mask is labels (docs/visibility.md).

Run: python examples/sparse_step.py   (CPU, a few seconds)
"""

import torch

import dlmfuse

torch.manual_seed(0)
B, L, H, D, V = 2, 128, 4, 64, 1000
n = 16  # masked rows computed this step

# K/V of the whole sequence (in a real model: the KV cache) and which tokens are clean.
k_cache, v_cache = torch.randn(B, L, H, D), torch.randn(B, L, H, D)
is_clean = torch.rand(B, L) < 0.5

# The query rows: n masked positions per sequence.
rows = torch.stack([(~c).nonzero()[:n, 0] for c in is_clean])  # int64 [B, n]
mask = dlmfuse.Mask.clean_and_self(is_clean).gather_queries(rows)
q = torch.randn(B, n, H, D)
out = dlmfuse.attention(q, k_cache, v_cache, mask=mask)      # [B, n, H, D]

# Each row sees exactly the clean keys plus its own position.
visible = mask.to_dense()                                     # bool [B, n, L]
expected = is_clean[:, None, :].expand(B, n, L).clone()
expected[torch.arange(B)[:, None], torch.arange(n)[None, :], rows] = True
assert torch.equal(visible, expected)
print(f"query rows {tuple(q.shape)} see {visible.sum(-1).float().mean():.1f} of {L} keys on average")

# Tokens for those rows (a random LM head here) and the 4 most confident per row to unmask.
logits = out.reshape(B, n, H * D) @ torch.randn(H * D, V)
tokens, confidence = dlmfuse.sample_tokens(logits, temperature=1.0, seed=0, confidence="prob")
unmask = dlmfuse.select_unmask(confidence, torch.ones(B, n, dtype=torch.bool), k=4)
assert unmask.sum(dim=1).tolist() == [4, 4]
print("unmasked positions:", [r[u].tolist() for r, u in zip(rows, unmask)])

# The same seed gives the same tokens (on CPU and CUDA alike).
again, _ = dlmfuse.sample_tokens(logits, temperature=1.0, seed=0, confidence="prob")
assert torch.equal(tokens, again)

# The unmasked tokens' new K/V go into the cache in place, one call for K and V.
positions = torch.stack([r[u] for r, u in zip(rows, unmask)])  # [B, 4]
k_new, v_new = torch.randn(B, 4, H, D), torch.randn(B, 4, H, D)
dlmfuse.kv_scatter_(k_cache, v_cache, k_new, v_new, positions)
assert torch.equal(k_cache[torch.arange(B)[:, None], positions], k_new)
is_clean[torch.arange(B)[:, None], positions] = True
print(f"cache updated at {positions.numel()} positions; {int(is_clean.sum())} of {B * L} tokens clean now")
