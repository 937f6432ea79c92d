"""Attention under the mask families of diffusion LMs, checked against PyTorch's SDPA.

Every mask is a set of per-token labels (docs/visibility.md): key j is visible to query i iff
k_order[j] < q_order[i] or k_group[j] == q_group[i]. ``mask.to_dense()`` turns the labels into the
boolean matrix SDPA takes, which is how this script checks each result.

Run: python examples/attention_masks.py   (CPU, a few seconds)
"""

import torch
import torch.nn.functional as F

import dlmfuse


def sdpa(q, k, v, mask=None, bias=None):
    """PyTorch's attention in dlmfuse's [B, L, H, D] layout, K/V heads repeated for GQA."""
    groups = q.shape[2] // k.shape[2]
    k, v = (x.repeat_interleave(groups, dim=2) for x in (k, v))
    attn_mask = bias if mask is None else mask.to_dense()[:, None]
    out = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)), attn_mask=attn_mask)
    return out.transpose(1, 2)


def check(name, got, expected, tol=1e-5):
    err = (got - expected).abs().max().item()
    assert err < tol, f"{name}: max |dlmfuse - sdpa| = {err:.2e}"
    print(f"{name:<46} max |dlmfuse - sdpa| = {err:.1e}")


torch.manual_seed(0)
B, L, H, D = 2, 96, 4, 64
q, k, v = (torch.randn(B, L, H, D) for _ in range(3))

# What a mask looks like: block-causal with a 2-token prompt and blocks of 2 (1 = visible).
print(dlmfuse.Mask.block_causal(6, block_size=2, prefix_len=2).to_dense()[0].int(), "\n")

# Semi-autoregressive decoding (LLaDA / BD3-LM style): a 32-token prompt, then blocks of 16.
mask = dlmfuse.Mask.block_causal(L, block_size=16, prefix_len=32)
check("block-causal, prompt 32, blocks of 16", dlmfuse.attention(q, k, v, mask=mask), sdpa(q, k, v, mask))

# Causal attention with grouped-query heads: 4 query heads share 2 K/V heads (never repeated).
k2, v2 = k[:, :, :2].contiguous(), v[:, :, :2].contiguous()
mask = dlmfuse.Mask.causal(L)
check("causal, GQA 4 query / 2 K/V heads", dlmfuse.attention(q, k2, v2, mask=mask), sdpa(q, k2, v2, mask))

# Prefix-LM and block-diagonal.
for name, mask in (("prefix-LM, prompt 40", dlmfuse.Mask.prefix_lm(L, prefix_len=40)),
                   ("block-diagonal, blocks of 24", dlmfuse.Mask.block_diagonal(L, block_size=24))):
    check(name, dlmfuse.attention(q, k, v, mask=mask), sdpa(q, k, v, mask))

# Eso-LM (variant A): clean tokens attend to each other both ways, masked tokens causally in a
# random generation order and to every clean token.
rank = torch.rand(B, L).argsort(dim=1).argsort(dim=1)           # each token's slot in the order
is_clean = rank < L // 2                                          # the first half of the order is clean
mask = dlmfuse.Mask.eso(rank, is_clean, "A")
check("Eso-LM variant A", dlmfuse.attention(q, k, v, mask=mask), sdpa(q, k, v, mask))

# An additive bias (e.g. relative positions), broadcast over the batch without being expanded,
# and the log-sum-exp of every row.
bias = torch.randn(1, H, L, L)
out, lse = dlmfuse.attention(q, k, v, bias=bias, return_lse=True)
check("dense + bias [1, H, L, L]", out, sdpa(q, k, v, bias=bias))
print(f"{'lse shape':<46} {tuple(lse.shape)}")

# Training under BD3-LM's mask on [x_t ; x_0] (2L tokens): gradients flow to q, k and v.
Lt = 32
mask = dlmfuse.Mask.bd3_train(Lt, block_size=8)
qt, kt, vt = (torch.randn(1, 2 * Lt, H, D, requires_grad=True) for _ in range(3))
dlmfuse.attention(qt, kt, vt, mask=mask).square().sum().backward()
grads = [x.grad.clone() for x in (qt, kt, vt)]
for x in (qt, kt, vt):
    x.grad = None
sdpa(qt, kt, vt, mask).square().sum().backward()
for name, got, x in zip(("dq", "dk", "dv"), grads, (qt, kt, vt)):
    check(f"BD3 training mask, {name}", got, x.grad, tol=1e-4)
