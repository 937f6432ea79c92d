"""dlmfuse.attention / merge_attention (CPU kernels) against dlmfuse.reference in float64.

The DESIGN.md section 7 matrix: odd sizes, Lq != Lk, GQA / MQA, both head dims, every dtype, every
mask family with broadcast and per-batch labels, broadcast bias shapes with -inf, kv_lens, custom
scale, lse, empty rows, strided views, sparse queries, merge exactness, every compiled CPU ISA and
the DLMFUSE_BACKEND=reference override. Tolerances live in conftest.py.
"""

import math

import pytest
import torch

import dlmfuse
from dlmfuse import Mask

from conftest import (DTYPE_IDS, DTYPES, UNIT_ROUNDOFF, assert_fp32_close, check_attention, cuda_usable,
                      lowp_attention_bound)

NEG_INF = float("-inf")
BATCH = 2


def make_qkv(batch, q_len, k_len, q_heads, kv_heads, head_dim, dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_len, q_heads, head_dim, generator=g)
    k = torch.randn(batch, k_len, kv_heads, head_dim, generator=g)
    v = torch.randn(batch, k_len, kv_heads, head_dim, generator=g)
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v))


def random_labels(batch, q_len, k_len, seed=0, values=4):
    """A random label mask: arbitrary visibility patterns, empty rows included."""
    g = torch.Generator().manual_seed(seed)
    draw = lambda n: torch.randint(0, values, (batch, n), generator=g, dtype=torch.int32)  # noqa: E731
    return Mask(draw(q_len), draw(q_len), draw(k_len), draw(k_len))


def stack_masks(*masks):
    """Per-batch labels: the batch-1 masks one after the other along the batch dim."""
    cat = lambda name: torch.cat([getattr(m, name).expand(1, -1) for m in masks])  # noqa: E731
    return Mask(cat("q_order"), cat("q_group"), cat("k_order"), cat("k_group"))


def eso_state(seq_len, seed):
    g = torch.Generator().manual_seed(seed)
    is_clean = torch.rand(1, seq_len, generator=g) < 0.5
    sort_key = torch.rand(1, seq_len, generator=g) + (~is_clean).float()
    slot_to_token = sort_key.argsort(dim=1)
    rank = torch.empty_like(slot_to_token)
    rank.scatter_(1, slot_to_token, torch.arange(seq_len)[None])
    return rank.to(torch.int32), is_clean


def clean_state(seq_len, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, seq_len, generator=g) < 0.4


# family -> builder(seq_len, variant) of a batch-1 mask; variants give the per-batch labels.
FAMILIES = {
    "causal": lambda L, i: Mask.causal(L),
    "block_causal": lambda L, i: Mask.block_causal(L, (16, 5)[i]),
    "block_causal_prefix": lambda L, i: Mask.block_causal(L, (8, 32)[i], prefix_len=(33, 10)[i]),
    "block_diagonal": lambda L, i: Mask.block_diagonal(L, (32, 7)[i]),
    "prefix_lm": lambda L, i: Mask.prefix_lm(L, (40, 3)[i]),
    "bd3_train": lambda L, i: Mask.bd3_train(L // 2, (4, 16)[i]),
    "eso_A": lambda L, i: Mask.eso(*eso_state(L, i), "A"),
    "eso_B": lambda L, i: Mask.eso(*eso_state(L, i), "B"),
    "clean_and_self": lambda L, i: Mask.clean_and_self(clean_state(L, i)),
    "bidirectional": lambda L, i: Mask.bidirectional(L),
    "none": None,
}


def family_mask(name, seq_len, per_batch):
    build = FAMILIES[name]
    if build is None:
        return None
    if per_batch:
        return stack_masks(build(seq_len, 0), build(seq_len, 1))
    return build(seq_len, 0)


dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=[DTYPE_IDS[d] for d in DTYPES])


# --------------------------------------------------------------------------------- sizes, heads
SIZES = [(1, 1), (1, 1025), (7, 97), (97, 7), (130, 130), (1025, 130), (130, 1025)]


@dtypes
@pytest.mark.parametrize("q_len, k_len", SIZES)
def test_odd_sizes(q_len, k_len, dtype):
    q, k, v = make_qkv(BATCH, q_len, k_len, 4, 2, 64, dtype)
    mask = random_labels(BATCH, q_len, k_len)
    out, lse = dlmfuse.attention(q, k, v, mask=mask, return_lse=True)
    check_attention(out, q, k, v, lse=lse, mask=mask)


@pytest.mark.parametrize("q_len, k_len, dtype", [(*size, DTYPES[i % len(DTYPES)]) for i, size in enumerate(SIZES)],
                         ids=[f"{lq}-{lk}-{DTYPE_IDS[DTYPES[i % len(DTYPES)]]}" for i, (lq, lk) in enumerate(SIZES)])
def test_odd_sizes_without_mask(q_len, k_len, dtype):
    q, k, v = make_qkv(BATCH, q_len, k_len, 4, 2, 64, dtype, seed=1)
    out, lse = dlmfuse.attention(q, k, v, return_lse=True)
    check_attention(out, q, k, v, lse=lse)


def test_long_block_causal_fp32():
    q, k, v = make_qkv(1, 1025, 1025, 2, 1, 64)
    mask = Mask.block_causal(1025, 32, prefix_len=100)
    out, lse = dlmfuse.attention(q, k, v, mask=mask, return_lse=True)
    check_attention(out, q, k, v, lse=lse, mask=mask)


@dtypes
@pytest.mark.parametrize("q_heads, kv_heads", [(1, 1), (4, 4), (4, 2), (8, 2), (4, 1), (6, 3)],
                         ids=["mha1", "mha4", "gqa2", "gqa4", "mqa4", "gqa2_6"])
def test_gqa(q_heads, kv_heads, dtype):
    q, k, v = make_qkv(BATCH, 33, 70, q_heads, kv_heads, 64, dtype)
    mask = random_labels(BATCH, 33, 70, seed=1)
    out, lse = dlmfuse.attention(q, k, v, mask=mask, return_lse=True)
    check_attention(out, q, k, v, lse=lse, mask=mask)


def test_gqa_head_mapping():
    """Query head h reads kv head h // (Hq // Hkv): copies of each kv head give MHA's result."""
    q, k, v = make_qkv(1, 9, 11, 8, 2, 64)
    out_gqa = dlmfuse.attention(q, k, v)
    out_mha = dlmfuse.attention(q, k.repeat_interleave(4, dim=2), v.repeat_interleave(4, dim=2))
    assert torch.equal(out_gqa, out_mha)


@dtypes
@pytest.mark.parametrize("head_dim", [64, 128])
def test_head_dims_with_everything(head_dim, dtype, device):
    B, Lq, Lk, Hq, Hkv = 3, 45, 77, 4, 2
    q, k, v = make_qkv(B, Lq, Lk, Hq, Hkv, head_dim, dtype, seed=head_dim, device=device)
    mask = random_labels(B, Lq, Lk, seed=2, values=3).to(device)
    bias = torch.randn(Hq, 1, Lk, generator=torch.Generator().manual_seed(3)).to(device=device, dtype=dtype)
    kv_lens = torch.tensor([Lk, 50, 1], dtype=torch.int32, device=device)
    out, lse = dlmfuse.attention(q, k, v, mask=mask, bias=bias, kv_lens=kv_lens, scale=0.3, return_lse=True)
    check_attention(out, q, k, v, lse=lse, mask=mask, bias=bias, kv_lens=kv_lens, scale=0.3)


# ------------------------------------------------------------------------------------- families
@pytest.mark.parametrize("dtype", DTYPES, ids=[DTYPE_IDS[d] for d in DTYPES])
@pytest.mark.parametrize("per_batch", [False, True], ids=["labels_b1", "labels_bB"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_mask_families(family, per_batch, dtype):
    seq_len = 96 if family == "bd3_train" else 97
    mask = family_mask(family, seq_len, per_batch)
    q, k, v = make_qkv(BATCH, seq_len, seq_len, 4, 2, 64, dtype, seed=7)
    out, lse = dlmfuse.attention(q, k, v, mask=mask, return_lse=True)
    check_attention(out, q, k, v, lse=lse, mask=mask)


def test_bidirectional_mask_equals_none():
    q, k, v = make_qkv(BATCH, 31, 40, 2, 2, 64)
    out_none = dlmfuse.attention(q, k, v)
    out_mask = dlmfuse.attention(q, k, v, mask=Mask.bidirectional(31, k_len=40))
    torch.testing.assert_close(out_mask, out_none, rtol=1e-6, atol=1e-6)


def test_padding_keys_with_order_infinity():
    """Padding: key order INT32_MAX and a group no query uses hides the key."""
    q, k, v = make_qkv(1, 10, 20, 2, 2, 64)
    pad = torch.arange(20) >= 13
    k_order = torch.where(pad, 2**31 - 1, 0).to(torch.int32)[None]
    k_group = torch.where(pad, -7, 0).to(torch.int32)[None]
    zeros = torch.zeros(1, 10, dtype=torch.int32)
    out = dlmfuse.attention(q, k, v, mask=Mask(zeros + 1, zeros, k_order, k_group))
    assert_fp32_close(out, dlmfuse.reference.attention(q[:, :, :], k[:, :13], v[:, :13], out_dtype=torch.float64))


INT32_MAX, INT32_MIN = 2**31 - 1, -(2**31)


def structured_masks(seq_len):
    """Label patterns that exercise tile skipping and the no-test fast path at L > one tile."""
    g = torch.Generator().manual_seed(12)
    coin = lambda shape: torch.rand(shape, generator=g) < 0.5  # noqa: E731
    full = lambda shape, value: torch.full(shape, value, dtype=torch.int32)  # noqa: E731
    descending = torch.arange(seq_len, 0, -1, dtype=torch.int32)[None]
    ascending = torch.arange(seq_len, dtype=torch.int32)[None]
    return {
        "block_causal_prefix": Mask.block_causal(seq_len, 32, prefix_len=70),
        "per_batch_bc_causal": stack_masks(Mask.block_causal(seq_len, 32, prefix_len=70), Mask.causal(seq_len)),
        "eso_A_per_batch": stack_masks(Mask.eso(*eso_state(seq_len, 0), "A"), Mask.eso(*eso_state(seq_len, 1), "A")),
        "reversed_order": Mask(descending, descending.clone(), ascending, ascending.clone()),
        "extreme_values": Mask(full((2, seq_len), INT32_MIN), full((2, seq_len), INT32_MAX),
                               full((2, seq_len), INT32_MAX),
                               torch.where(coin((2, seq_len)), INT32_MAX, INT32_MIN).to(torch.int32)),
        "extreme_orders": Mask(full((1, seq_len), INT32_MAX), full((1, seq_len), INT32_MIN),
                               torch.where(coin((1, seq_len)), INT32_MAX - 1, INT32_MIN).to(torch.int32),
                               torch.where(coin((1, seq_len)), INT32_MIN, 5).to(torch.int32)),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", ["block_causal_prefix", "per_batch_bc_causal", "eso_A_per_batch",
                                  "reversed_order", "extreme_values", "extreme_orders"])
def test_structured_labels_with_bias_and_kv_lens(name, dtype):
    L = 257
    mask = structured_masks(L)[name]
    q, k, v = make_qkv(2, L, L, 4, 2, 128, dtype, seed=3)
    bias = torch.randn(4, 1, L, generator=torch.Generator().manual_seed(4))
    bias[..., 100:110] = NEG_INF
    kv_lens = torch.tensor([L, 141], dtype=torch.int32)
    for kwargs in (dict(mask=mask), dict(mask=mask, bias=bias, kv_lens=kv_lens)):
        out, lse = dlmfuse.attention(q, k, v, return_lse=True, **kwargs)
        check_attention(out, q, k, v, lse=lse, **kwargs)


# ------------------------------------------------------------------------------------------ bias
def bias_of_shape(shape_id, B, Hq, Lq, Lk, dtype, seed=4):
    g = torch.Generator().manual_seed(seed)
    if shape_id == "Lk":
        bias = torch.randn(Lk, generator=g)
        bias[3] = NEG_INF
    elif shape_id == "11Lk":
        bias = torch.randn(1, 1, 1, Lk, generator=g)
        bias[..., :70] = NEG_INF  # the first key tile(s) hidden, later ones visible
    elif shape_id == "Hq11":
        bias = torch.randn(Hq, 1, 1, generator=g) * 3
    elif shape_id == "full":
        bias = torch.randn(B, Hq, Lq, Lk, generator=g)
        bias[torch.rand(B, Hq, Lq, Lk, generator=g) < 0.3] = NEG_INF
        bias[0, 1, 5] = NEG_INF  # a whole row hidden by bias alone
        bias[1, :, 7, :-1] = NEG_INF  # only the last key visible
    elif shape_id == "B1Lq1":
        bias = torch.randn(B, 1, Lq, 1, generator=g) * 5
    elif shape_id == "LqLk":
        bias = torch.randn(Lq, Lk, generator=g)
    else:
        raise AssertionError(shape_id)
    return bias.to(dtype)


@dtypes
@pytest.mark.parametrize("shape_id", ["Lk", "11Lk", "Hq11", "full", "B1Lq1", "LqLk"])
def test_bias_broadcast_shapes(shape_id, dtype):
    B, Lq, Lk, Hq, Hkv = 2, 19, 130, 4, 2
    q, k, v = make_qkv(B, Lq, Lk, Hq, Hkv, 64, dtype)
    bias = bias_of_shape(shape_id, B, Hq, Lq, Lk, dtype)
    mask = random_labels(B, Lq, Lk, seed=5, values=2) if shape_id == "full" else None
    out, lse = dlmfuse.attention(q, k, v, bias=bias, mask=mask, return_lse=True)
    check_attention(out, q, k, v, lse=lse, bias=bias, mask=mask)


def test_bias_stride0_expanded_and_other_dtype():
    B, Lq, Lk, Hq = 2, 9, 33, 4
    q, k, v = make_qkv(B, Lq, Lk, Hq, Hq, 64)
    base = torch.randn(1, Hq, 1, Lk)
    expanded = base.expand(B, Hq, Lq, Lk)  # stride-0 view, never materialised
    assert expanded.stride(0) == 0 and expanded.stride(2) == 0
    out = dlmfuse.attention(q, k, v, bias=expanded)
    check_attention(out, q, k, v, bias=base)
    assert torch.equal(out, dlmfuse.attention(q, k, v, bias=base))
    # A bf16 bias with fp32 q: read in its own dtype, no error.
    bias_bf16 = base.to(torch.bfloat16)
    out_bf16 = dlmfuse.attention(q, k, v, bias=bias_bf16)
    check_attention(out_bf16, q, k, v, bias=bias_bf16.float())
    # fp32 bias with fp16 q.
    q16, k16, v16 = (t.half() for t in (q, k, v))
    out16, lse16 = dlmfuse.attention(q16, k16, v16, bias=base, return_lse=True)
    check_attention(out16, q16, k16, v16, lse=lse16, bias=base)


def test_bias_non_contiguous():
    B, Lq, Lk, Hq = 2, 11, 23, 2
    q, k, v = make_qkv(B, Lq, Lk, Hq, Hq, 64)
    bias = torch.randn(B, Hq, Lk, Lq).transpose(2, 3)  # last dim strided
    out = dlmfuse.attention(q, k, v, bias=bias)
    check_attention(out, q, k, v, bias=bias)
    assert torch.equal(out, dlmfuse.attention(q, k, v, bias=bias.contiguous()))


def test_bias_all_neg_inf_gives_empty_rows():
    q, k, v = make_qkv(1, 5, 8, 2, 2, 64)
    bias = torch.full((8,), NEG_INF)
    out, lse = dlmfuse.attention(q, k, v, bias=bias, return_lse=True)
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.isneginf(lse).all()


# --------------------------------------------------------------------------------------- kv_lens
@dtypes
@pytest.mark.parametrize("lens", [[97, 1, 50], [0, 97, 64], [0, 0, 0]])
def test_kv_lens(lens, dtype):
    B, Lq, Lk = 3, 20, 97
    q, k, v = make_qkv(B, Lq, Lk, 4, 1, 64, dtype)
    kv_lens = torch.tensor(lens, dtype=torch.int32)
    out, lse = dlmfuse.attention(q, k, v, kv_lens=kv_lens, return_lse=True)
    check_attention(out, q, k, v, lse=lse, kv_lens=kv_lens)
    for b, n in enumerate(lens):
        if n == 0:
            assert torch.equal(out[b], torch.zeros_like(out[b]))
            assert torch.isneginf(lse[b]).all()
        else:
            # Keys past kv_lens are never read: garbage there changes nothing.
            k2, v2 = k.clone(), v.clone()
            k2[b, n:], v2[b, n:] = float("nan"), float("nan")
            assert torch.equal(dlmfuse.attention(q, k2, v2, kv_lens=kv_lens)[b], out[b])


def test_kv_lens_with_mask_and_int64():
    B, L = 2, 40
    q, k, v = make_qkv(B, L, L, 2, 2, 64)
    mask = Mask.block_causal(L, 8)
    kv_lens = torch.tensor([17, 33])
    out, lse = dlmfuse.attention(q, k, v, mask=mask, kv_lens=kv_lens, return_lse=True)
    check_attention(out, q, k, v, lse=lse, mask=mask, kv_lens=kv_lens)


# ----------------------------------------------------------------------------- scale, lse, rows
@dtypes
@pytest.mark.parametrize("scale", [0.02, 1.0, 2.5])
def test_custom_scale(scale, dtype):
    q, k, v = make_qkv(2, 13, 29, 2, 2, 128, dtype)
    out, lse = dlmfuse.attention(q, k, v, scale=scale, return_lse=True)
    check_attention(out, q, k, v, lse=lse, scale=scale)


def test_default_scale_is_inverse_sqrt_head_dim():
    q, k, v = make_qkv(1, 6, 9, 2, 2, 128)
    explicit = dlmfuse.attention(q, k, v, scale=1 / math.sqrt(128))
    assert torch.equal(dlmfuse.attention(q, k, v), explicit)


def test_return_lse_is_natural_log_sum_exp():
    q, k, v = make_qkv(2, 7, 15, 2, 1, 64)
    out, lse = dlmfuse.attention(q, k, v, return_lse=True)
    assert torch.equal(out, dlmfuse.attention(q, k, v))  # the lse flag never changes out
    scores = torch.einsum("bihd,bjhd->bhij", q.double(), k.double().expand(-1, -1, 2, -1)) / 8.0
    assert_fp32_close(lse, torch.logsumexp(scores, dim=-1), "lse")


def test_large_scores_are_stable():
    """Scores in the hundreds: the online softmax must not overflow."""
    q, k, v = make_qkv(1, 33, 130, 2, 2, 64)
    out, lse = dlmfuse.attention(q * 30, k * 30, v, return_lse=True)
    check_attention(out, q * 30, k * 30, v, lse=lse)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()


@dtypes
def test_empty_rows_from_labels(dtype, device):
    """Rows that see no key (empty by labels) give out exactly 0 and lse exactly -inf."""
    B, Lq, Lk = 2, 70, 90
    q, k, v = make_qkv(B, Lq, Lk, 2, 2, 64, dtype, device=device)
    q_order = torch.zeros(B, Lq, dtype=torch.int32)  # order 0: nothing is strictly earlier
    q_group = torch.randint(0, 3, (B, Lq), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    q_group[:, ::3] = 99  # every third query row is in a group no key has
    k_order = torch.zeros(B, Lk, dtype=torch.int32)
    k_group = torch.randint(0, 3, (B, Lk), dtype=torch.int32, generator=torch.Generator().manual_seed(1))
    mask = Mask(q_order, q_group, k_order, k_group).to(device)
    out, lse = dlmfuse.attention(q, k, v, mask=mask, return_lse=True)
    check_attention(out, q, k, v, lse=lse, mask=mask)
    assert torch.equal(out[:, ::3], torch.zeros_like(out[:, ::3]))
    assert torch.isneginf(lse[:, :, ::3]).all()
    assert torch.isfinite(out).all()


def test_zero_length_shapes():
    q, k, v = make_qkv(1, 5, 0, 2, 2, 64)
    out, lse = dlmfuse.attention(q, k, v, return_lse=True)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()
    q, k, v = make_qkv(1, 0, 5, 2, 2, 64)
    out, lse = dlmfuse.attention(q, k, v, return_lse=True)
    assert out.shape == (1, 0, 2, 64) and lse.shape == (1, 2, 0)
    q, k, v = make_qkv(0, 5, 5, 2, 2, 64)
    out, lse = dlmfuse.attention(q, k, v, return_lse=True)
    assert out.shape == (0, 5, 2, 64) and lse.shape == (0, 2, 5)


def test_inputs_untouched_and_deterministic():
    q, k, v = make_qkv(2, 50, 70, 4, 2, 64, torch.bfloat16)
    mask = random_labels(2, 50, 70)
    bias = torch.randn(4, 50, 70)
    copies = [t.clone() for t in (q, k, v, bias, mask.q_order, mask.k_group)]
    first = dlmfuse.attention(q, k, v, mask=mask, bias=bias, return_lse=True)
    second = dlmfuse.attention(q, k, v, mask=mask, bias=bias, return_lse=True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    for before, after in zip(copies, (q, k, v, bias, mask.q_order, mask.k_group)):
        assert torch.equal(before, after)


# --------------------------------------------------------------------------------- strided views
def test_packed_qkv_views_match_contiguous():
    B, L, H, D = 2, 37, 4, 64
    qkv = torch.randn(B, L, 3, H, D)
    q, k, v = qkv.unbind(2)
    assert not q.is_contiguous()
    mask = Mask.block_causal(L, 8, prefix_len=5)
    out, lse = dlmfuse.attention(q, k, v, mask=mask, return_lse=True)
    out_c, lse_c = dlmfuse.attention(q.contiguous(), k.contiguous(), v.contiguous(), mask=mask, return_lse=True)
    assert torch.equal(out, out_c) and torch.equal(lse, lse_c)
    check_attention(out, q, k, v, lse=lse, mask=mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_other_strided_views_match_contiguous(dtype):
    B, L, Lk, Hq, Hkv, D = 3, 21, 45, 4, 2, 128
    q = torch.randn(L, B, Hq, D).to(dtype).transpose(0, 1)  # transposed batch
    k = torch.randn(B, 2 * Lk, 2 * Hkv, D).to(dtype)[:, ::2, 1::2]  # every other row and head
    v = torch.randn(B, Lk, Hkv, 3 * D).to(dtype)[..., D:2 * D]  # a slice of a wider last dim
    labels = torch.randint(0, 3, (4, B, 2 * max(L, Lk)), dtype=torch.int32)[:, :, ::2]  # strided rows
    mask = Mask(labels[0, :, :L], labels[1, :, :L], labels[2, :, :Lk], labels[3, :, :Lk])
    out, lse = dlmfuse.attention(q, k, v, mask=mask, return_lse=True)
    contiguous_mask = Mask(*(t.contiguous() for t in (mask.q_order, mask.q_group, mask.k_order, mask.k_group)))
    out_c, lse_c = dlmfuse.attention(q.contiguous(), k.contiguous(), v.contiguous(), mask=contiguous_mask,
                                     return_lse=True)
    assert torch.equal(out, out_c) and torch.equal(lse, lse_c)
    check_attention(out, q, k, v, lse=lse, mask=mask)


def test_labels_expanded_over_batch():
    """Labels given as a stride-0 [B, L] expansion of a [1, L] tensor."""
    B, L = 3, 30
    q, k, v = make_qkv(B, L, L, 2, 2, 64)
    base = Mask.block_causal(L, 4)
    expanded = Mask(*(t.expand(B, -1) for t in (base.q_order, base.q_group, base.k_order, base.k_group)))
    assert torch.equal(dlmfuse.attention(q, k, v, mask=expanded), dlmfuse.attention(q, k, v, mask=base))


# -------------------------------------------------------------------------------- sparse queries
@pytest.mark.parametrize("family", ["clean_and_self", "block_causal", "eso_A"])
def test_sparse_queries_equal_rows_of_full(family, device):
    B, L, H, D = 2, 97, 4, 64
    q, k, v = make_qkv(B, L, L, H, H // 2, D, device=device)
    mask = family_mask(family, L, per_batch=True).to(device)
    g = torch.Generator().manual_seed(11)
    index = torch.stack([torch.randperm(L, generator=g)[:23] for _ in range(B)]).to(device)
    index[:, -1] = index[:, 0]  # a repeated row
    rows = index[:, :, None, None].expand(-1, -1, H, D)
    q_sparse = q.gather(1, rows)
    sparse_mask = mask.gather_queries(index)
    out, lse = dlmfuse.attention(q_sparse, k, v, mask=sparse_mask, return_lse=True)
    full, full_lse = dlmfuse.attention(q, k, v, mask=mask, return_lse=True)
    assert_fp32_close(out, full.gather(1, rows), "out")
    assert_fp32_close(lse, full_lse.gather(2, index[:, None, :].expand(-1, H, -1)), "lse")
    check_attention(out, q_sparse, k, v, lse=lse, mask=sparse_mask)


# ---------------------------------------------------------------------------------------- merge
@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def merge_device(request) -> torch.device:
    """cpu, and cuda where the standalone CUDA merge kernel runs (checked: the cuda runs must test
    the kernel, not the reference)."""
    device = torch.device(request.param)
    if device.type == "cuda":
        if not cuda_usable():
            pytest.skip("needs a CUDA build of dlmfuse and a visible GPU")
        assert not dlmfuse._ext.use_reference("merge_attention", device)
    return device


@dtypes
@pytest.mark.parametrize("split", [1, 40, 96])
def test_merge_attention_equals_full(split, dtype, merge_device):
    B, Lq, Lk, Hq, Hkv = 2, 30, 97, 4, 2
    q, k, v = make_qkv(B, Lq, Lk, Hq, Hkv, 64, dtype, device=merge_device)
    mask = random_labels(B, Lq, Lk, seed=9).to(merge_device)
    part_mask = lambda s: Mask(mask.q_order, mask.q_group, mask.k_order[:, s], mask.k_group[:, s])  # noqa: E731
    a = dlmfuse.attention(q, k[:, :split], v[:, :split], mask=part_mask(slice(None, split)), return_lse=True)
    b = dlmfuse.attention(q, k[:, split:], v[:, split:], mask=part_mask(slice(split, None)), return_lse=True)
    out, lse = dlmfuse.merge_attention(*a, *b)
    assert out.dtype == dtype and lse.dtype == torch.float32
    ref_out, ref_lse = dlmfuse.reference.merge_attention(*a, *b)
    assert_fp32_close(lse, ref_lse.double(), "merged lse")
    if dtype == torch.float32:
        check_attention(out, q, k, v, lse=lse, mask=mask)
        assert_fp32_close(out, ref_out.double(), "merged out")
        return
    # Three roundings to the dtype: each partial's, then the merged output's. Against the exact merge
    # of the same partials only the last counts; against full attention each partial's bound adds
    # with its merge weight.
    u = UNIT_ROUNDOFF[dtype]
    exact = dlmfuse.reference.merge_attention(a[0].double(), a[1], b[0].double(), b[1])[0]
    assert ((out.cpu().double() - exact.cpu()).abs() <= u * exact.cpu().abs() + 2.0**-20).all(), "merged out"
    full = dlmfuse.reference.attention(q, k, v, mask=mask, return_lse=True, out_dtype=torch.float64)
    bound = lowp_attention_bound(q, k, v, full[0], rounded_p=out.is_cuda, mask=mask)
    for part, keys in ((a, slice(None, split)), (b, slice(split, None))):
        weight = torch.exp(part[1].cpu().double() - full[1].cpu()).nan_to_num(0.0).transpose(1, 2)[..., None]
        part_ref = dlmfuse.reference.attention(q, k[:, keys], v[:, keys], mask=part_mask(keys), out_dtype=torch.float64)
        bound = bound + weight * lowp_attention_bound(q, k[:, keys], v[:, keys], part_ref, rounded_p=out.is_cuda,
                                                      mask=part_mask(keys))
    excess = (out.cpu().double() - full[0].cpu()).abs() - bound
    assert (excess <= 0).all(), f"merged out vs full attention: {int((excess > 0).sum())} elements over the bound"


def test_merge_attention_nan_lse_propagates_like_the_reference(merge_device):
    """A NaN lse gives a NaN row (out and lse) in the kernel and in the reference alike, not a
    silent 0; an empty side (-inf) next to a finite one still contributes exactly nothing."""
    out_a, out_b = torch.randn(1, 3, 1, 4, device=merge_device), torch.randn(1, 3, 1, 4, device=merge_device)
    lse_a = torch.tensor([[[0.5, float("nan"), float("-inf")]]], device=merge_device)
    lse_b = torch.tensor([[[float("nan"), 0.2, 0.3]]], device=merge_device)
    for out, lse in (dlmfuse.merge_attention(out_a, lse_a, out_b, lse_b),
                     dlmfuse.reference.merge_attention(out_a, lse_a, out_b, lse_b)):
        assert torch.isnan(out[0, :2]).all() and torch.isnan(lse[0, 0, :2]).all()
        assert torch.equal(out[0, 2], out_b[0, 2]) and lse[0, 0, 2] == 0.3


def test_merge_attention_empty_sides(merge_device):
    B, L, H, D = 1, 6, 2, 64
    g = torch.Generator().manual_seed(0)
    out_a, out_b = torch.randn(B, L, H, D, generator=g), torch.randn(B, L, H, D, generator=g)
    lse_a, lse_b = torch.randn(B, H, L, generator=g), torch.randn(B, H, L, generator=g)
    lse_a[0, 0, :2] = NEG_INF  # a empty: merge = b exactly
    lse_b[0, 1, 2:4] = NEG_INF  # b empty: merge = a
    lse_a[0, :, 5] = lse_b[0, :, 5] = NEG_INF  # both empty: 0 / -inf
    out_a[0, 5], out_b[0, 5] = 0.0, 0.0
    out_a, out_b, lse_a, lse_b = (t.to(merge_device) for t in (out_a, out_b, lse_a, lse_b))
    out, lse = dlmfuse.merge_attention(out_a, lse_a, out_b, lse_b)
    torch.testing.assert_close(out[0, :2, 0], out_b[0, :2, 0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lse[0, 0, :2], lse_b[0, 0, :2], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out[0, 2:4, 1], out_a[0, 2:4, 1], rtol=1e-6, atol=1e-6)
    assert torch.equal(out[0, 5], torch.zeros_like(out[0, 5]))
    assert torch.isneginf(lse[0, :, 5]).all()
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    ref_out, ref_lse = dlmfuse.reference.merge_attention(out_a, lse_a, out_b, lse_b)
    assert_fp32_close(out, ref_out.double(), "out")
    assert_fp32_close(lse, ref_lse.double(), "lse")


def test_merge_of_two_empty_attentions():
    """Both partial attentions empty for every row (kv_lens 0): the merge stays 0 / -inf."""
    q, k, v = make_qkv(2, 4, 8, 2, 2, 64)
    zero = torch.zeros(2, dtype=torch.int32)
    a = dlmfuse.attention(q, k[:, :3], v[:, :3], kv_lens=zero, return_lse=True)
    b = dlmfuse.attention(q, k[:, 3:], v[:, 3:], kv_lens=zero, return_lse=True)
    out, lse = dlmfuse.merge_attention(*a, *b)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()


def test_merge_attention_strided_inputs(merge_device):
    B, L, H, D = 2, 9, 2, 64
    g = torch.Generator().manual_seed(2)
    outs = torch.randn(B, L, 2, H, D, generator=g).to(merge_device)
    lses = torch.randn(B, H, 2 * L, generator=g).to(merge_device)
    out_a, out_b, lse_a, lse_b = outs[:, :, 0], outs[:, :, 1], lses[..., ::2], lses[..., 1::2]
    out, lse = dlmfuse.merge_attention(out_a, lse_a, out_b, lse_b)
    out_c, lse_c = dlmfuse.merge_attention(out_a.contiguous(), lse_a.contiguous(),
                                           out_b.contiguous(), lse_b.contiguous())
    assert torch.equal(out, out_c) and torch.equal(lse, lse_c)


# ------------------------------------------------------------------------------ CPU ISA variants
def supported_isas():
    return dlmfuse._C.COMPILED_CPU_ISAS.split(",")


@pytest.fixture
def restore_isa():
    original = dlmfuse._C.cpu_isa()
    yield
    dlmfuse._C.set_cpu_isa(original)
    assert dlmfuse._C.cpu_isa() == original


def test_isa_list_has_baseline_and_current(restore_isa):
    isas = supported_isas()
    assert "baseline" in isas
    assert dlmfuse._C.cpu_isa() in isas
    with pytest.raises(ValueError, match="nonsense"):
        dlmfuse._C.set_cpu_isa("nonsense")


ISA_CASES = [
    (torch.float32, 64), (torch.bfloat16, 64), (torch.float16, 64),
    (torch.float32, 128), (torch.bfloat16, 128), (torch.float16, 128),
]


@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx512"])
def test_cpu_isa_variants_agree(isa, restore_isa):
    if isa not in supported_isas():
        pytest.skip(f"{isa} is not compiled into this build")
    try:
        dlmfuse._C.set_cpu_isa(isa)
    except ValueError as e:
        assert "not supported by this CPU" in str(e)
        pytest.skip(f"{isa}: {e}")
    assert dlmfuse._C.cpu_isa() == isa
    B, Lq, Lk, Hq, Hkv = 2, 37, 130, 4, 2
    for dtype, head_dim in ISA_CASES:
        q, k, v = make_qkv(B, Lq, Lk, Hq, Hkv, head_dim, dtype, seed=head_dim)
        mask = random_labels(B, Lq, Lk, seed=3, values=3)
        bias = bias_of_shape("11Lk", B, Hq, Lq, Lk, torch.float32)
        kv_lens = torch.tensor([Lk, 100], dtype=torch.int32)
        kwargs = dict(mask=mask, bias=bias, kv_lens=kv_lens)
        out, lse = dlmfuse.attention(q, k, v, return_lse=True, **kwargs)
        check_attention(out, q, k, v, lse=lse, **kwargs)
        # Also against the default (best) variant: the same math, tight agreement.
        dlmfuse._C.set_cpu_isa("baseline")
        base_out, base_lse = dlmfuse.attention(q, k, v, return_lse=True, **kwargs)
        dlmfuse._C.set_cpu_isa(isa)
        tol = 1e-5 if dtype == torch.float32 else 2 ** -7
        torch.testing.assert_close(out.double(), base_out.double(), rtol=tol, atol=tol * float(base_out.abs().max()))
        torch.testing.assert_close(lse, base_lse, rtol=1e-5, atol=1e-5)
    # merge_attention runs through the variant too.
    g = torch.Generator().manual_seed(1)
    for dtype in DTYPES:
        out_a, out_b = (torch.randn(2, 8, 3, 64, generator=g).to(dtype) for _ in range(2))
        lse_a, lse_b = (torch.randn(2, 3, 8, generator=g) * 4 for _ in range(2))
        lse_a[0, 0, :3] = NEG_INF
        out, lse = dlmfuse.merge_attention(out_a, lse_a, out_b, lse_b)
        ref_out, ref_lse = dlmfuse.reference.merge_attention(out_a, lse_a, out_b, lse_b)
        tol = 1e-5 if dtype == torch.float32 else 2 ** -7
        torch.testing.assert_close(out.double(), ref_out.double(), rtol=tol, atol=tol * float(ref_out.abs().max()))
        assert_fp32_close(lse, ref_lse.double(), "lse")


def test_thread_count_does_not_change_results():
    """Rows are independent: 1 thread and the default pool give bit-identical results."""
    q, k, v = make_qkv(3, 77, 300, 8, 2, 64, torch.bfloat16)
    mask = random_labels(3, 77, 300)
    default = dlmfuse._C.num_threads()
    many = dlmfuse.attention(q, k, v, mask=mask, return_lse=True)
    try:
        dlmfuse._C.set_num_threads(1)
        assert dlmfuse._C.num_threads() == 1
        one = dlmfuse.attention(q, k, v, mask=mask, return_lse=True)
    finally:
        dlmfuse._C.set_num_threads(default)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])


# ------------------------------------------------------------------------------- backend override
def test_backend_reference_override(monkeypatch):
    q, k, v = make_qkv(2, 17, 33, 4, 2, 64)
    mask = Mask.block_causal(33, 8).gather_queries(torch.arange(16, 33))
    bias = torch.randn(4, 1, 33)
    kv_lens = torch.tensor([33, 20], dtype=torch.int32)
    kwargs = dict(mask=mask, bias=bias, kv_lens=kv_lens, scale=0.2)
    kernel_out, kernel_lse = dlmfuse.attention(q, k, v, return_lse=True, **kwargs)

    calls = []
    real_reference = dlmfuse.reference.attention

    def counting_reference(*args, **kw):
        calls.append(1)
        return real_reference(*args, **kw)

    monkeypatch.setattr(dlmfuse.reference, "attention", counting_reference)
    dlmfuse.attention(q, k, v, **kwargs)
    assert calls == [], "without the override the kernel must run, not the reference"

    monkeypatch.setenv("DLMFUSE_BACKEND", "reference")
    assert dlmfuse.build_info()["backend_override"] == "reference"
    ref_out, ref_lse = dlmfuse.attention(q, k, v, return_lse=True, **kwargs)
    assert len(calls) == 1, "DLMFUSE_BACKEND=reference must route through dlmfuse.reference"
    assert ref_out.dtype == q.dtype and ref_lse.dtype == torch.float32
    torch.testing.assert_close(ref_out, kernel_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ref_lse, kernel_lse, rtol=1e-5, atol=1e-5)
    merged = dlmfuse.merge_attention(ref_out, ref_lse, ref_out, ref_lse)
    torch.testing.assert_close(merged[0], ref_out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(merged[1], ref_lse + math.log(2), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("head_dim", [1, 8, 16, 40, 96, 200, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_any_head_dim_on_cpu(head_dim, dtype):
    """Head dims other than 64 / 128 run in the next wider tile (zero-padded) on every CPU ISA."""
    g = torch.Generator().manual_seed(head_dim)
    B, Lq, Lk, Hq, Hkv = 2, 70, 97, 4, 2
    q = torch.randn(B, Lq, Hq, head_dim, generator=g).to(dtype)
    k = torch.randn(B, Lk, Hkv, head_dim, generator=g).to(dtype)
    v = torch.randn(B, Lk, Hkv, head_dim, generator=g).to(dtype)
    mask = Mask.block_causal(Lk, 16, prefix_len=20).gather_queries(torch.arange(Lk - Lq, Lk).expand(B, Lq))
    bias = torch.randn(Hq, 1, Lk, generator=g)
    original = dlmfuse._C.cpu_isa()
    try:
        for isa in dlmfuse._C.COMPILED_CPU_ISAS.split(","):
            try:
                dlmfuse._C.set_cpu_isa(isa)
            except ValueError:  # compiled but not supported by this CPU
                continue
            out, lse = dlmfuse.attention(q, k, v, mask=mask, bias=bias, return_lse=True)
            check_attention(out, q, k, v, lse=lse, mask=mask, bias=bias)
    finally:
        dlmfuse._C.set_cpu_isa(original)
