"""dlmfuse.reference against a naive per-(b, h, i) loop, and the exactness of merge_attention.

The naive oracle below walks every query row with Python floats and evaluates the visibility rule
element by element; it shares no code with the reference it checks.
"""

import doctest
import importlib
import math

import pytest
import torch

from dlmfuse.mask import Mask
from dlmfuse.reference import attention, merge_attention, visibility

NEG_INF = float("-inf")


def naive_attention(q, k, v, *, labels=None, bias=None, kv_lens=None, scale=None):
    """Row-by-row softmax attention in Python floats. labels: (q_order, q_group, k_order, k_group)
    as [batch or 1, L] tensors. Returns out [B, Lq, Hq, D] and lse [B, Hq, Lq] (float64)."""
    batch, q_len, q_heads, head_dim = q.shape
    k_len, kv_heads = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    bias = None if bias is None else bias.to(torch.float64).expand(batch, q_heads, q_len, k_len)
    out = torch.zeros(batch, q_len, q_heads, head_dim, dtype=torch.float64)
    lse = torch.full((batch, q_heads, q_len), NEG_INF, dtype=torch.float64)

    def visible(b, i, j):
        if kv_lens is not None and j >= kv_lens[b]:
            return False
        if labels is None:
            return True
        q_order, q_group, k_order, k_group = (t[b if t.shape[0] > 1 else 0].tolist() for t in labels)
        return k_order[j] < q_order[i] or k_group[j] == q_group[i]

    for b in range(batch):
        for h in range(q_heads):
            kv_head = h // (q_heads // kv_heads)
            for i in range(q_len):
                scores = {}
                for j in range(k_len):
                    if not visible(b, i, j):
                        continue
                    s = float(q[b, i, h].double() @ k[b, j, kv_head].double()) * scale
                    s += 0.0 if bias is None else float(bias[b, h, i, j])
                    if s != NEG_INF:
                        scores[j] = s
                if not scores:
                    continue  # empty row: out 0, lse -inf
                top = max(scores.values())
                weights = {j: math.exp(s - top) for j, s in scores.items()}
                total = sum(weights.values())
                lse[b, h, i] = top + math.log(total)
                for j, w in weights.items():
                    out[b, i, h] += (w / total) * v[b, j, kv_head].double()
    return out, lse


def random_labels(batch, q_len, k_len, generator, spread=3):
    """Small random labels (few distinct values, so that both rule branches fire and some rows are
    empty)."""
    def draw(b, n):
        return torch.randint(0, spread, (b, n), generator=generator, dtype=torch.int32)
    return draw(batch, q_len), draw(batch, q_len), draw(1, k_len), draw(batch, k_len)


def qkv(batch, q_len, k_len, q_heads, kv_heads, head_dim, generator, dtype=torch.float64):
    q = torch.randn(batch, q_len, q_heads, head_dim, generator=generator, dtype=torch.float64)
    k = torch.randn(batch, k_len, kv_heads, head_dim, generator=generator, dtype=torch.float64)
    v = torch.randn(batch, k_len, kv_heads, head_dim, generator=generator, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def assert_same_attention(out, lse, ref_out, ref_lse, atol=1e-12):
    assert not out.isnan().any() and not lse.isnan().any()
    torch.testing.assert_close(out.double(), ref_out, atol=atol, rtol=atol)
    # -inf must match exactly (assert_close treats equal infinities as equal).
    torch.testing.assert_close(lse.double(), ref_lse, atol=atol, rtol=atol)


# ------------------------------------------------------------------------------------------ attention
@pytest.mark.parametrize("q_heads, kv_heads", [(2, 2), (4, 2), (4, 1)])
@pytest.mark.parametrize("use_mask", [False, True])
@pytest.mark.parametrize("use_bias", [False, True])
@pytest.mark.parametrize("use_kv_lens", [False, True])
def test_attention_matches_naive_loop(q_heads, kv_heads, use_mask, use_bias, use_kv_lens):
    gen = torch.Generator().manual_seed(q_heads * 10 + kv_heads)
    batch, q_len, k_len, head_dim = 2, 5, 6, 8
    q, k, v = qkv(batch, q_len, k_len, q_heads, kv_heads, head_dim, gen)
    labels = random_labels(batch, q_len, k_len, gen) if use_mask else None
    bias = None
    if use_bias:  # [B, 1, Lq, Lk] broadcast over heads, with -inf holes
        bias = torch.randn(batch, 1, q_len, k_len, generator=gen, dtype=torch.float64)
        bias[torch.rand(bias.shape, generator=gen) < 0.3] = NEG_INF
        bias[0, 0, 1] = NEG_INF  # a whole row masked by the bias
    kv_lens = torch.tensor([k_len, 3], dtype=torch.int32) if use_kv_lens else None

    mask = Mask(*labels) if use_mask else None
    out, lse = attention(q, k, v, mask=mask, bias=bias, kv_lens=kv_lens, return_lse=True)
    ref_out, ref_lse = naive_attention(q, k, v, labels=labels, bias=bias, kv_lens=kv_lens)
    assert out.shape == (batch, q_len, q_heads, head_dim) and out.dtype == torch.float64
    assert lse.shape == (batch, q_heads, q_len) and lse.dtype == torch.float32
    assert_same_attention(out, lse, ref_out, ref_lse.float().double(), atol=1e-6)
    torch.testing.assert_close(out, ref_out, atol=1e-12, rtol=1e-12)


def test_lse_is_logsumexp_of_scaled_scores():
    gen = torch.Generator().manual_seed(0)
    q, k, v = qkv(1, 3, 4, 2, 2, 16, gen)
    _, lse = attention(q, k, v, scale=0.3, return_lse=True, out_dtype=torch.float64)
    scores = torch.einsum("bihd,bjhd->bhij", q, k) * 0.3
    torch.testing.assert_close(lse, torch.logsumexp(scores, dim=-1), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("bias_shape", [(1, 1, 1, 7), (3, 1, 7), (2, 3, 1, 1), (7,)])
def test_bias_broadcasts(bias_shape):
    gen = torch.Generator().manual_seed(1)
    q, k, v = qkv(2, 5, 7, 3, 3, 4, gen)
    bias = torch.randn(bias_shape, generator=gen, dtype=torch.float64)
    expanded = bias.expand(2, 3, 5, 7)
    torch.testing.assert_close(attention(q, k, v, bias=bias), attention(q, k, v, bias=expanded.clone()))
    ref_out, _ = naive_attention(q, k, v, bias=expanded)
    torch.testing.assert_close(attention(q, k, v, bias=bias), ref_out, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize(
    "how", ["kv_lens_zero", "bias_all_neg_inf", "labels_see_nothing", "no_keys"]
)
def test_empty_rows_give_zero_and_neg_inf(how):
    gen = torch.Generator().manual_seed(2)
    k_len = 0 if how == "no_keys" else 4
    q, k, v = qkv(2, 3, k_len, 2, 1, 8, gen, dtype=torch.float32)
    kwargs = {}
    if how == "kv_lens_zero":
        kwargs["kv_lens"] = torch.tensor([0, 0])
    elif how == "bias_all_neg_inf":
        kwargs["bias"] = torch.full((1, 1, 3, 4), NEG_INF)
    elif how == "labels_see_nothing":  # equal orders, different groups
        zeros = torch.zeros(1, 3, dtype=torch.int32)
        kwargs["mask"] = Mask(zeros, zeros + 1, torch.zeros(1, 4, dtype=torch.int32),
                              torch.zeros(1, 4, dtype=torch.int32))
    out, lse = attention(q, k, v, return_lse=True, **kwargs)
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.equal(lse, torch.full_like(lse, NEG_INF))


def test_partially_empty_rows_do_not_leak_nan():
    gen = torch.Generator().manual_seed(3)
    q, k, v = qkv(2, 4, 5, 2, 2, 8, gen, dtype=torch.bfloat16)
    kv_lens = torch.tensor([0, 5])
    out, lse = attention(q, k, v, kv_lens=kv_lens, return_lse=True)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    assert torch.equal(out[0], torch.zeros_like(out[0])) and (lse[0] == NEG_INF).all()
    assert out[1].isfinite().all() and lse[1].isfinite().all()


def test_compute_and_out_dtype():
    gen = torch.Generator().manual_seed(4)
    q, k, v = qkv(1, 6, 9, 2, 2, 16, gen, dtype=torch.bfloat16)
    exact = attention(q, k, v)  # float64 math, bf16 output
    in_bf16, lse_bf16 = attention(q, k, v, compute_dtype=torch.bfloat16, return_lse=True)
    wide, lse_wide = attention(q, k, v, out_dtype=torch.float64, return_lse=True)
    assert exact.dtype == in_bf16.dtype == torch.bfloat16
    assert wide.dtype == lse_wide.dtype == torch.float64 and lse_bf16.dtype == torch.float32
    torch.testing.assert_close(exact, wide.to(torch.bfloat16), atol=0, rtol=0)
    assert 0 < (in_bf16.double() - wide).abs().max() < 0.05  # bf16 math: small but nonzero error


def test_default_scale_is_inverse_sqrt_head_dim():
    gen = torch.Generator().manual_seed(5)
    q, k, v = qkv(1, 3, 3, 1, 1, 64, gen)
    torch.testing.assert_close(attention(q, k, v), attention(q, k, v, scale=0.125))


# ----------------------------------------------------------------------------------------- visibility
def test_visibility_matches_rule_and_kv_lens():
    gen = torch.Generator().manual_seed(6)
    labels = random_labels(3, 5, 7, gen)
    mask = Mask(*labels)
    kv_lens = torch.tensor([7, 2, 0])
    got = visibility(mask, 3, 5, 7, kv_lens=kv_lens)
    assert got.shape == (3, 5, 7) and got.dtype == torch.bool
    q_order, q_group, k_order, k_group = labels
    for b in range(3):
        for i in range(5):
            for j in range(7):
                rule = bool(k_order[0, j] < q_order[b, i]) or bool(k_group[b, j] == q_group[b, i])
                assert bool(got[b, i, j]) == (rule and j < kv_lens[b])


def test_visibility_without_mask_and_broadcast_labels():
    assert visibility(None, 2, 3, 4).all() and visibility(None, 2, 3, 4).shape == (2, 3, 4)
    got = visibility(Mask.causal(4), 2, 4, 4, kv_lens=[4, 3])
    expected = torch.ones(4, 4, dtype=torch.bool).tril()
    assert torch.equal(got[0], expected)
    assert torch.equal(got[1], expected & (torch.arange(4) < 3))


def test_visibility_rejects_wrong_lengths():
    with pytest.raises(ValueError, match="q_len=4"):
        visibility(Mask.causal(4), 1, 5, 4)


# ------------------------------------------------------------------------------------------ merging
@pytest.mark.parametrize("split", [0, 1, 4, 9])
def test_merge_of_key_halves_equals_full_attention(split):
    gen = torch.Generator().manual_seed(split)
    batch, q_len, k_len = 2, 6, 9
    q, k, v = qkv(batch, q_len, k_len, 4, 2, 8, gen)
    q_order, q_group, k_order, k_group = random_labels(batch, q_len, k_len, gen)
    bias = torch.randn(batch, 1, q_len, k_len, generator=gen, dtype=torch.float64)
    kv_lens = torch.tensor([k_len, 5])
    full = attention(q, k, v, mask=Mask(q_order, q_group, k_order, k_group), bias=bias,
                     kv_lens=kv_lens, return_lse=True, out_dtype=torch.float64)

    def part(lo, hi):
        keys = slice(lo, hi)
        return attention(
            q, k[:, keys], v[:, keys],
            mask=Mask(q_order, q_group, k_order[:, keys], k_group[:, keys]),
            bias=bias[..., keys], kv_lens=(kv_lens - lo).clamp(0, hi - lo),
            return_lse=True, out_dtype=torch.float64,
        )

    out, lse = merge_attention(*part(0, split), *part(split, k_len))
    assert out.dtype == torch.float64 and lse.dtype == torch.float32
    assert_same_attention(out, lse, full[0], full[1].float().double(), atol=1e-6)
    torch.testing.assert_close(out, full[0], atol=1e-12, rtol=1e-12)


def test_merge_both_empty_is_zero_even_with_garbage_outputs():
    out_a = torch.full((1, 2, 1, 4), float("nan"))
    out_b = torch.full((1, 2, 1, 4), float("inf"))
    lse = torch.full((1, 1, 2), NEG_INF)
    out, merged_lse = merge_attention(out_a, lse, out_b, lse)
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.equal(merged_lse, lse)


def test_merge_one_side_empty_returns_other_side():
    gen = torch.Generator().manual_seed(8)
    out_a = torch.randn(2, 3, 2, 4, generator=gen, dtype=torch.float16)
    lse_a = torch.randn(2, 2, 3, generator=gen)
    out, lse = merge_attention(out_a, lse_a, torch.zeros_like(out_a), torch.full_like(lse_a, NEG_INF))
    assert out.dtype == torch.float16 and lse.dtype == torch.float32
    assert torch.equal(out, out_a) and torch.equal(lse, lse_a)


def test_docstring_examples_run():
    module = importlib.import_module("dlmfuse.reference.attention")
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


def test_gradients_are_finite_and_match_finite_differences():
    # The reference doubles as the gradient oracle: autograd through it must be correct and
    # finite, also for rows with no visible key (out 0, lse -inf, zero gradient).
    gen = torch.Generator().manual_seed(9)
    q, k, v = (t.requires_grad_() for t in qkv(1, 3, 4, 2, 1, 4, gen))
    bias = torch.randn(1, 2, 3, 4, generator=gen, dtype=torch.float64)
    bias[0, :, 2] = NEG_INF  # query row 2 sees nothing
    bias.requires_grad_()
    mask = Mask.causal(4).gather_queries(torch.tensor([0, 3, 1]))

    def run(q, k, v, bias):
        out, lse = attention(q, k, v, mask=mask, bias=bias, return_lse=True, out_dtype=torch.float64)
        return out, lse.masked_fill(lse == NEG_INF, 0.0)  # finite differences cannot see -inf

    assert torch.autograd.gradcheck(run, (q, k, v, bias))
    out, lse = attention(q, k, v, mask=mask, bias=bias, return_lse=True, out_dtype=torch.float64)
    (out.sum() + lse[lse.isfinite()].sum()).backward()
    for t in (q, k, v, bias):
        assert not t.grad.isnan().any()
    assert torch.equal(q.grad[0, 2], torch.zeros_like(q.grad[0, 2]))


def test_reference_never_reads_keys_past_kv_lens():
    """The reference is the CUDA fallback: like the kernels, it must ignore garbage past kv_lens."""
    from dlmfuse import reference

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 5, 2, 64, generator=g) for _ in range(3))
    kv_lens = torch.tensor([5, 3], dtype=torch.int32)
    expected = reference.attention(q, k, v, kv_lens=kv_lens)
    k2, v2 = k.clone(), v.clone()
    k2[1, 3:], v2[1, 3:] = float("nan"), float("inf")
    torch.testing.assert_close(reference.attention(q, k2, v2, kv_lens=kv_lens), expected, rtol=0, atol=0)
