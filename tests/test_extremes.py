"""Values at the edges of what the ops accept: every integer argument out of its range gets a
TypeError / ValueError naming the argument and the value (never a binding's signature dump, an
OverflowError or a crash); scores beyond float32 keep the attention contract (a finite output where
the float64 reference has one, lse never -inf for a row that saw keys), and merge_attention stays
exact across such partials."""

import pytest
import torch

import dlmfuse
from dlmfuse import KVCache, Mask

from conftest import assert_fp32_close, check_beyond_float32, downward_overflow_inputs, overflow_inputs

BIG = (2**31, 2**63, 2**64, 2**70)


def _logits():
    return torch.randn(2, 50, generator=torch.Generator().manual_seed(0))


# ------------------------------------------------------------------------------ integer arguments
INT_ERRORS = [
    # (call, exception, pattern naming the argument and the value)
    (lambda: dlmfuse.sample_tokens(_logits(), temperature=1.0, top_k=-1), ValueError, r"top_k must be >= 1 .* got -1"),
    (lambda: dlmfuse.sample_tokens(_logits(), seed=-1), ValueError, r"seed must be in \[0, 2\*\*63\), got -1"),
    (lambda: dlmfuse.sample_tokens(_logits(), seed=2**64), ValueError, r"seed must be in \[0, 2\*\*63\), got 18446744073709551616"),
    (lambda: dlmfuse.sample_tokens(_logits(), seed=0, offset=2**63), ValueError, r"offset must be in \[0, 2\*\*63\), got 9223372036854775808"),
    (lambda: dlmfuse.sample_tokens(_logits(), suppress_tokens=[2**70]), ValueError, r"suppress_tokens must be token ids in \[0, V=50\), got \[1180591620717411303424\]"),
    (lambda: dlmfuse.sample_tokens(_logits(), suppress_tokens=[3, -2**64]), ValueError, r"suppress_tokens must be token ids in \[0, V=50\), got \[3, -18446744073709551616\]"),
    (lambda: dlmfuse.sample_tokens(_logits(), suppress_tokens=torch.tensor([2**40])), ValueError, r"suppress_tokens must lie in \[0, V=50\), got \[1099511627776\]"),
    (lambda: dlmfuse.select_unmask(torch.rand(2, 4), torch.ones(2, 4, dtype=torch.bool), k=-2**64), ValueError, r"k must be >= 0, got -18446744073709551616"),
    (lambda: dlmfuse.attention(*[torch.randn(1, 8, 2, 64)] * 3, kv_lens=torch.tensor([2**40])), ValueError, r"kv_lens values must lie in \[0, Lk=8\], got \[1099511627776\]"),
    (lambda: dlmfuse.attention(*[torch.randn(1, 8, 2, 64)] * 3, scale=2**1100), ValueError, r"scale must be finite in float32 .* got 1358"),
    (lambda: dlmfuse.attention(*[torch.randn(1, 8, 2, 64)] * 3, scale=1e39), ValueError, r"scale must be finite in float32 .* got 1e\+39"),
    (lambda: dlmfuse.kv_scatter_(torch.zeros(1, 8, 1, 64), torch.zeros(1, 8, 1, 64), torch.ones(1, 1, 1, 64),
                                 torch.ones(1, 1, 1, 64), torch.tensor([[2**62]])), ValueError, r"positions\[0, 0\] = 4611686018427387904 is outside"),
    (lambda: Mask(torch.tensor([[2**40]]), torch.tensor([[0]]), torch.tensor([[0]]), torch.tensor([[0]])), ValueError, r"q_order has value 1099511627776 outside the int32 range"),
    (lambda: Mask.causal(2**31), ValueError, r"seq_len must be at most 2147483647 .* got 2147483648"),
    (lambda: Mask.bd3_train(2**64, 4), ValueError, r"seq_len must be at most 2147483647 .* got 18446744073709551616"),
    (lambda: Mask.bidirectional(4, k_len=2**40), ValueError, r"k_len must be at most 2147483647 .* got 1099511627776"),
    (lambda: Mask.prefix_lm(8, 2**64), ValueError, r"prefix_len must be an int in \[0, seq_len=8\], got 18446744073709551616"),
    (lambda: Mask.causal(8).gather_queries(torch.tensor([[2**40]])), ValueError, r"index value 1099511627776 is outside \[0, q_len=8\)"),
    (lambda: dlmfuse.KVCache(2**63, 1, 8, 1, 64, torch.float32), ValueError, r"num_layers must be at most 2147483647, got 9223372036854775808"),
    (lambda: dlmfuse.KVCache(1, 1, 2**31, 1, 64, torch.float32), ValueError, r"max_len must be at most 2147483647, got 2147483648"),
    (lambda: dlmfuse.set_num_threads(-2**64), ValueError, r"n must be >= 1, got -18446744073709551616"),
]


@pytest.mark.parametrize("case", range(len(INT_ERRORS)))
def test_out_of_range_integers_name_the_argument(case):
    call, exc, pattern = INT_ERRORS[case]
    with pytest.raises(exc, match=pattern):
        call()


@pytest.mark.parametrize("top_k", BIG)
def test_top_k_beyond_the_vocabulary_keeps_every_token(top_k):
    logits = _logits()
    tokens, conf = dlmfuse.sample_tokens(logits, temperature=1.0, top_k=top_k, seed=3)
    expected = dlmfuse.sample_tokens(logits, temperature=1.0, seed=3)
    assert torch.equal(tokens, expected[0]) and torch.equal(conf, expected[1])


@pytest.mark.parametrize("k", BIG)
def test_k_beyond_the_row_selects_every_candidate(k):
    conf = torch.rand(3, 6, generator=torch.Generator().manual_seed(1))
    cand = conf > 0.3
    assert torch.equal(dlmfuse.select_unmask(conf, cand, k=k), cand)
    assert torch.equal(dlmfuse.select_unmask(conf, cand, k=torch.tensor([k if k < 2**63 else 2**62] * 3)), cand)


@pytest.mark.parametrize("value, selected", [(2**2000, "best"), (-2**2000, "all")])
def test_huge_integer_thresholds_saturate(value, selected):
    conf = torch.tensor([[0.2, 0.9, 0.5]])
    cand = torch.ones(1, 3, dtype=torch.bool)
    expected = torch.tensor([[False, True, False]]) if selected == "best" else cand
    assert torch.equal(dlmfuse.select_unmask(conf, cand, threshold=value), expected)
    if value > 0:  # factor: 1 - huge / (m + 1) is -inf, so every candidate passes
        assert torch.equal(dlmfuse.select_unmask(conf, cand, factor=value), cand)


@pytest.mark.parametrize("block_size", [9, 2**31, 2**63, 2**70])
def test_blocks_larger_than_the_sequence_are_one_block(block_size):
    for make in (Mask.block_causal, Mask.block_diagonal, Mask.bd3_train):
        assert torch.equal(make(8, block_size).to_dense(), make(8, 8).to_dense()), make.__name__


# ------------------------------------------------------------------------- scores beyond float32
# On CUDA the planned family rescues these rows (tests/test_attention_family.py); the verified
# kernels, the default until a GPU run has verified it, do not yet.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("masked", [False, True], ids=["dense", "causal"])
def test_scores_beyond_float32_keep_the_contract(dtype, masked):
    q, k, v = overflow_inputs(dtype)
    kwargs = {"mask": Mask.causal(70)} if masked else {}
    out, lse = dlmfuse.attention(q, k, v, return_lse=True, **kwargs)
    check_beyond_float32(out, lse, q, k, v, **kwargs)
    if not masked:  # row 3 saw its dominating key 5: its output is v[5]
        assert torch.isposinf(lse[0, 0, 3]) and torch.equal(out[0, 3, 0], v[0, 5, 0])


@pytest.mark.parametrize("bias_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_row_whose_bias_is_finfo_min_on_every_key_averages_its_values(bias_dtype):
    """finfo.min (transformers' padding) times log2 e is -inf in the kernel's units, which passed
    for hidden keys (output 0, lse -inf); in float64, as in the reference and SDPA, every score is
    finfo.min and the row averages its values. A -inf bias still hides."""
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(2, 40, 2, 64, generator=g) for _ in range(3))
    bias = torch.zeros(2, 1, 40, 40, dtype=bias_dtype)
    bias[1, :, 30:] = bias[1, :, :, 30:] = torch.finfo(bias_dtype).min
    bias[0, :, 5] = float("-inf")
    out, lse = dlmfuse.attention(q, k, v, bias=bias, return_lse=True)
    ref_out, ref_lse = dlmfuse.reference.attention(q, k, v, bias=bias, return_lse=True)
    assert_fp32_close(out, ref_out, "out")
    assert torch.equal(lse.isneginf(), ref_lse.isneginf()) and lse[0, :, 5].isneginf().all()
    torch.testing.assert_close(lse, ref_lse)
    torch.testing.assert_close(out[1, 35], v[1].mean(0), rtol=1e-5, atol=1e-5)


def test_merge_is_exact_across_partials_whose_scores_overflowed():
    q, k, v = overflow_inputs(torch.float32)
    full_out, full_lse = dlmfuse.attention(q, k, v, return_lse=True)
    for cut in (7, 35):  # the dominating keys in the first or the second part
        a = dlmfuse.attention(q, k[:, :cut], v[:, :cut], return_lse=True)
        b = dlmfuse.attention(q, k[:, cut:], v[:, cut:], return_lse=True)
        for merge in (dlmfuse.merge_attention, dlmfuse.reference.merge_attention):
            out, lse = merge(*a, *b)
            assert torch.isfinite(out).all(), merge
            torch.testing.assert_close(out, full_out, rtol=1e-5, atol=1e-5)
            assert torch.equal(torch.isposinf(lse), torch.isposinf(full_lse))


def test_merge_rules_for_infinite_and_nan_lse():
    out_a, out_b = torch.full((1, 4, 1, 2), 1.0), torch.full((1, 4, 1, 2), 3.0)
    inf, nan = float("inf"), float("nan")
    lse_a = torch.tensor([[[inf, inf, nan, nan]]])
    lse_b = torch.tensor([[[0.0, inf, -inf, inf]]])
    for merge in (dlmfuse.merge_attention, dlmfuse.reference.merge_attention):
        out, lse = merge(out_a, lse_a, out_b, lse_b)
        assert out[0, 0].eq(1.0).all() and lse[0, 0, 0] == inf, "+inf outweighs a finite lse"
        assert out[0, 1].eq(2.0).all() and lse[0, 0, 1] == inf, "two +inf sides weigh 1/2 each"
        assert out[0, 2:].isnan().all() and lse[0, 0, 2:].isnan().all(), "a NaN lse gives a NaN row"


def test_merge_gradients_follow_the_same_rules():
    """The partial that takes a row takes its gradient: a +inf side all of it (it had none), two
    +inf sides half each, two empty sides none (0, not NaN)."""
    inf = float("inf")
    outs = [torch.randn(1, 3, 1, 2, generator=torch.Generator().manual_seed(s)).requires_grad_(True) for s in (0, 1)]
    lses = [torch.tensor([[[inf, inf, -inf]]], requires_grad=True), torch.tensor([[[0.0, inf, -inf]]], requires_grad=True)]
    out, lse = dlmfuse.merge_attention(outs[0], lses[0], outs[1], lses[1])
    (out.sum() + lse.nan_to_num(0.0, posinf=0.0, neginf=0.0).sum()).backward()
    assert outs[0].grad[0, :, 0, 0].tolist() == [1.0, 0.5, 0.0]
    assert outs[1].grad[0, :, 0, 0].tolist() == [0.0, 0.5, 0.0]
    # d lse_b = w_b sum_d (out_b - out): 0 beside a +inf side, 1/4 sum_d (out_b - out_a) beside another.
    quarter = 0.25 * float((outs[1] - outs[0]).detach()[0, 1, 0].sum())
    assert lses[1].grad[0, 0, 0] == 0 and lses[1].grad[0, 0, 2] == 0
    assert abs(float(lses[1].grad[0, 0, 1]) - quarter) < 1e-6 and not lses[0].grad.isnan().any()


# ------------------------------------------------------------- found by the fuzz tests (test_fuzz_*.py)
def test_unsigned_integer_tensors_are_integers():
    q = torch.randn(2, 3, 2, 8)
    expected = dlmfuse.attention(q, q, q, kv_lens=torch.tensor([1, 2]))
    for dtype in (torch.uint16, torch.uint32, torch.uint64):
        assert torch.equal(dlmfuse.attention(q, q, q, kv_lens=torch.tensor([1, 2], dtype=dtype)), expected)
        conf, cand = torch.rand(2, 4, generator=torch.Generator().manual_seed(0)), torch.ones(2, 4, dtype=torch.bool)
        assert torch.equal(dlmfuse.select_unmask(conf, cand, k=torch.tensor([2, 1], dtype=dtype)),
                           dlmfuse.select_unmask(conf, cand, k=torch.tensor([2, 1])))
    with pytest.raises(ValueError, match=r"kv_lens values must lie in \[0, Lk=3\]"):
        dlmfuse.attention(q, q, q, kv_lens=torch.tensor([1, 2**64 - 1], dtype=torch.uint64))
    numpy = pytest.importorskip("numpy")
    assert dlmfuse.select_unmask(conf, cand, k=numpy.uint64(2**64 - 1)).all()


def test_kv_cache_labels_of_any_integer_kind():
    cache = KVCache(1, 1, 8, 1, 64, torch.float32)
    k = torch.randn(1, 1, 1, 64)
    cache.write(0, torch.tensor([[1]]), k, k, order=torch.tensor([[3]], dtype=torch.uint32), group=numpy_int(5))
    assert int(cache.k_order[0, 1]) == 3 and int(cache.k_group[0, 1]) == 5
    with pytest.raises(ValueError, match="KVCache.write: order values must fit in int32, got 9223372036854775808"):
        cache.write(0, torch.tensor([[1]]), k, k, order=2**63)
    with pytest.raises(TypeError, match="KVCache.write: order must be an integer tensor or an int, got str"):
        cache.write(0, torch.tensor([[1]]), k, k, order="0")


def numpy_int(value):
    return pytest.importorskip("numpy").int64(value)


SAMPLING_EDGES = [
    # (logits, kwargs, expected token, expected confidence): confidences are the float64 softmax's
    (torch.tensor([[1e308, -1e308]], dtype=torch.float64), dict(confidence="neg_entropy"), 0, 0.0),
    (torch.tensor([[15.41, -21.79]]), dict(temperature=1e-307, seed=1, tempered_confidence=True, confidence="neg_entropy"), 0, 0.0),
    (torch.tensor([[1e308, 0.0]], dtype=torch.float64), dict(temperature=0.5, seed=1, tempered_confidence=True), 0, 1.0),
    (torch.tensor([[2.0, 1.0, 3.0]]), dict(temperature=1e-320, seed=0, tempered_confidence=True), 2, 1.0),
    (torch.tensor([[1.0, -1.0]]), dict(temperature=5e-324, seed=0, suppress_tokens=[0]), 1, 1.0),
]


@pytest.mark.parametrize("case", range(len(SAMPLING_EDGES)))
def test_sampling_where_logits_over_temperature_overflow(case):
    """l / T beyond float64: the token is still the most likely kept one (not the first index, not
    a suppressed one) and confidences are the softmax's, not NaN; kernel and reference agree."""
    logits, kwargs, token, confidence = SAMPLING_EDGES[case]
    for sample in (dlmfuse.sample_tokens, dlmfuse.reference.sample_tokens):
        tokens, conf = sample(logits, **kwargs)
        assert int(tokens[0]) == token and float(conf[0]) == pytest.approx(confidence, abs=1e-6), sample
    with pytest.raises(ValueError, match="temperature must be finite and >= 0"):
        dlmfuse.sample_tokens(logits.float(), temperature=2**1100)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_scores_that_all_overflow_downwards_are_not_an_empty_row(dtype):
    """Every visible q.k of a row below -3.4e38: the float32 scores are all -inf, which looked like
    a row that saw no key (output 0, lse -inf); in float64 the row attends to its largest score."""
    q, k, v = downward_overflow_inputs(dtype)
    out, lse = dlmfuse.attention(q, k, v, return_lse=True)
    check_beyond_float32(out, lse, q, k, v)
    assert torch.equal(out[0, 2, 0], v[0, 4, 0])
