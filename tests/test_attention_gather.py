"""Keys gathered from PARTIAL tiles (dlmfuse/visibility.h classify_key): layouts that put many keys
of each class (seen by every query row of a tile, by some, by none) in every key tile, more than
one gathered tile's worth (64) of each, with ragged ends, against the float64 reference on every
device (CUDA: the default kernel here; gpu_check.sh also runs this file per kernel, and
test_torch_integration.py has the CUDA gather kernels' own test)."""

import pytest
import torch

import dlmfuse
from dlmfuse import Mask

from conftest import assert_fp32_close, run_and_check
from test_attention import NEG_INF, make_qkv, stack_masks


def mask_only_labels(batch, q_len, k_len, seed):
    """Sparse masked queries over scattered clean keys (each sees the clean keys and itself)."""
    g = torch.Generator().manual_seed(seed)
    masks = []
    for _ in range(batch):
        is_clean = torch.rand(k_len, generator=g) < 0.5
        masked = (~is_clean).nonzero().flatten()
        index = masked[torch.randperm(len(masked), generator=g)[:q_len]].sort().values
        masks.append(Mask.clean_and_self(is_clean[None]).gather_queries(index[None]))
    return stack_masks(*masks)


def one_group_labels(batch, q_len, k_len, seed):
    """Every query in group 5 at order 3: keys of group 5 or of order < 3 are visible to all,
    the rest to none (no per-element test should remain)."""
    g = torch.Generator().manual_seed(seed)
    q_order = torch.full((batch, q_len), 3, dtype=torch.int32)
    q_group = torch.full((batch, q_len), 5, dtype=torch.int32)
    k_order = torch.randint(0, 6, (batch, k_len), generator=g, dtype=torch.int32)
    k_group = torch.randint(4, 7, (batch, k_len), generator=g, dtype=torch.int32)
    return Mask(q_order, q_group, k_order, k_group)


def sparse_group_labels(batch, q_len, k_len, seed):
    """Query groups spread over the key range with gaps: keys whose group lies inside the tile's
    group range but is no query's group must be dropped, members seen by their rows only."""
    g = torch.Generator().manual_seed(seed)
    q_order = torch.randint(1, 3, (batch, q_len), generator=g, dtype=torch.int32)
    q_group = 3 * torch.randint(0, k_len // 3, (batch, q_len), generator=g, dtype=torch.int32)
    k_order = torch.randint(0, 4, (batch, k_len), generator=g, dtype=torch.int32)
    k_group = torch.randint(0, k_len, (batch, k_len), generator=g, dtype=torch.int32)
    return Mask(q_order, q_group, k_order, k_group)


def few_hidden_labels(batch, q_len, k_len, seed):
    """Orders interleaved (an Eso-LM-like layout): hardly a key is hidden from a whole query tile,
    so after a few tiles the CPU kernel stops gathering and runs PARTIAL tiles as they are, with
    the keys gathered so far still pending."""
    g = torch.Generator().manual_seed(seed)
    q_order = torch.randint(k_len // 2, k_len, (batch, q_len), generator=g, dtype=torch.int32)
    k_order = torch.randint(0, k_len, (batch, k_len), generator=g, dtype=torch.int32)
    q_group = torch.randint(0, 50, (batch, q_len), generator=g, dtype=torch.int32)
    k_group = torch.randint(0, 50, (batch, k_len), generator=g, dtype=torch.int32)
    return Mask(q_order, q_group, k_order, k_group)


@pytest.mark.parametrize("labels", [mask_only_labels, one_group_labels, sparse_group_labels, few_hidden_labels])
@pytest.mark.parametrize("extra", ["plain", "bias", "kv_lens_gqa"])
def test_keys_gathered_from_partial_tiles(labels, extra, device):
    B, Lq, Lk, D = 2, 130, 1025, 64
    q_heads, kv_heads = (4, 2) if extra == "kv_lens_gqa" else (2, 2)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    q, k, v = make_qkv(B, Lq, Lk, q_heads, kv_heads, D, dtype=dtype, seed=3, device=device)
    kwargs = dict(mask=labels(B, Lq, Lk, seed=5).to(device))
    if extra == "bias":  # a key-strided view: each gathered key reads its own column
        g = torch.Generator().manual_seed(6)
        kwargs["bias"] = torch.randn(1, q_heads, Lq, 2 * Lk, generator=g).to(device, dtype)[..., ::2]
    elif extra == "kv_lens_gqa":
        kwargs["kv_lens"] = torch.tensor([700, 1000], dtype=torch.int32, device=device)
    run_and_check(q, k, v, **kwargs)


def test_gathered_keys_match_dense_bool_mask():
    """The same visibility given as labels (gathered tiles) and as a -inf bias (dense tiles)."""
    B, Lq, Lk = 2, 130, 1025
    q, k, v = make_qkv(B, Lq, Lk, 2, 2, 64, seed=8)
    mask = mask_only_labels(B, Lq, Lk, seed=9)
    bias = torch.zeros(B, 1, Lq, Lk).masked_fill(~mask.to_dense()[:, None], NEG_INF)
    out_labels, lse_labels = dlmfuse.attention(q, k, v, mask=mask, return_lse=True)
    out_bias, lse_bias = dlmfuse.attention(q, k, v, bias=bias, return_lse=True)
    assert_fp32_close(out_labels, out_bias, "out")
    assert_fp32_close(lse_labels, lse_bias, "lse")
