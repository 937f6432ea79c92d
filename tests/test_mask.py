"""Mask: every family's labels against a dense mask built from the family's own definition.

The expected matrices below are written from how each family is described in its paper / codebase
(block-causal = "see your own and earlier blocks", BD3-LM = the three-quadrant [x_t ; x_0] mask, ...),
never from the label formulas, so a wrong label choice cannot hide behind a matching test.
"""

import doctest
import importlib

import pytest
import torch

from dlmfuse.mask import INT32_MAX, Mask

SIZES = [1, 7, 97, 130]


def grid(q_len, k_len=None):
    """Query index i as a column, key index j as a row (broadcast to [Lq, Lk])."""
    k_len = q_len if k_len is None else k_len
    return torch.arange(q_len)[:, None], torch.arange(k_len)[None, :]


def assert_dense(mask, expected):
    """mask.to_dense() equals expected ([Lq, Lk] or [B, Lq, Lk]) exactly."""
    dense = mask.to_dense()
    assert dense.dtype == torch.bool
    expected = expected if expected.dim() == 3 else expected[None]
    assert dense.shape == expected.shape
    mismatch = (dense != expected).nonzero()
    assert mismatch.numel() == 0, f"first mismatches at (b, i, j) = {mismatch[:5].tolist()}"


def random_eso_ranks(batch, seq_len, generator):
    """Random Eso-LM state: which tokens are clean, and each token's sorted slot r with every clean
    token before every mask token (random order inside each class)."""
    is_clean = torch.rand(batch, seq_len, generator=generator) < 0.5
    sort_key = torch.rand(batch, seq_len, generator=generator) + (~is_clean).float()  # masks last
    order = sort_key.argsort(dim=1)  # order[b, r] = token in slot r
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(seq_len).expand(batch, -1).contiguous())
    return rank, is_clean


# ------------------------------------------------------------------------------------------ families
@pytest.mark.parametrize("seq_len", SIZES)
def test_causal(seq_len):
    i, j = grid(seq_len)
    assert_dense(Mask.causal(seq_len), j <= i)


def block_causal_cases():
    for seq_len in SIZES:
        for block_size in (1, 3, 32):
            for prefix_len in sorted({0, 1, seq_len // 3, seq_len}):
                yield seq_len, block_size, prefix_len


@pytest.mark.parametrize("seq_len, block_size, prefix_len", list(block_causal_cases()))
def test_block_causal(seq_len, block_size, prefix_len):
    # Semi-autoregressive decoding: the prompt is one bidirectional block, then blocks of
    # block_size; a query sees everything up to the end of its own block.
    i, j = grid(seq_len)
    blocks_done = (i - prefix_len).div(block_size, rounding_mode="floor") + 1  # counting i's block
    block_end = torch.where(
        i < prefix_len,
        torch.full_like(i, prefix_len),
        (prefix_len + blocks_done * block_size).clamp(max=seq_len),
    )
    assert_dense(Mask.block_causal(seq_len, block_size, prefix_len=prefix_len), j < block_end)


@pytest.mark.parametrize("seq_len", SIZES)
@pytest.mark.parametrize("block_size", [1, 4, 32, 200])
def test_block_diagonal(seq_len, block_size):
    i, j = grid(seq_len)
    same_block = i.div(block_size, rounding_mode="floor") == j.div(block_size, rounding_mode="floor")
    assert_dense(Mask.block_diagonal(seq_len, block_size), same_block)


@pytest.mark.parametrize("seq_len", SIZES)
@pytest.mark.parametrize("prefix_frac", [0.0, 0.3, 1.0])
def test_prefix_lm(seq_len, prefix_frac):
    # Prompt bidirectional; the response is causal and sees the whole prompt.
    prefix_len = int(seq_len * prefix_frac)
    i, j = grid(seq_len)
    assert_dense(Mask.prefix_lm(seq_len, prefix_len), (j < prefix_len) | (j <= i))


@pytest.mark.parametrize("seq_len", SIZES)
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_bd3_train(seq_len, block_size):
    # BD3-LM's training mask over [x_t ; x_0]: x_t block b sees x_t block b (block-diagonal) and
    # x_0 blocks < b (offset block-causal); x_0 block b sees x_0 blocks <= b (block-causal); x_0
    # never sees x_t.
    i, j = grid(2 * seq_len)
    q_noisy, k_noisy = i < seq_len, j < seq_len
    q_block = torch.where(q_noisy, i, i - seq_len).div(block_size, rounding_mode="floor")
    k_block = torch.where(k_noisy, j, j - seq_len).div(block_size, rounding_mode="floor")
    expected = (
        (q_noisy & k_noisy & (k_block == q_block))
        | (q_noisy & ~k_noisy & (k_block < q_block))
        | (~q_noisy & ~k_noisy & (k_block <= q_block))
    )
    mask = Mask.bd3_train(seq_len, block_size)
    assert (mask.q_len, mask.k_len) == (2 * seq_len, 2 * seq_len)
    assert_dense(mask, expected)


@pytest.mark.parametrize("seq_len", SIZES)
@pytest.mark.parametrize("variant", ["A", "B"])
def test_eso(seq_len, variant):
    gen = torch.Generator().manual_seed(seq_len)
    rank, is_clean = random_eso_ranks(3, seq_len, gen)
    r_q, r_k = rank[:, :, None], rank[:, None, :]
    clean_q, clean_k = is_clean[:, :, None], is_clean[:, None, :]
    if variant == "B":
        expected = r_k <= r_q  # causal in the sorted order
    else:
        # Clean tokens see all clean tokens; masks see all clean tokens and the masks whose rank is
        # <= their own.
        expected = clean_k | (~clean_q & ~clean_k & (r_k <= r_q))
    mask = Mask.eso(rank, is_clean, variant)
    assert mask.batch == 3
    assert_dense(mask, expected)


def test_eso_does_not_alias_inputs():
    rank = torch.arange(4, dtype=torch.int32)[None]
    mask = Mask.eso(rank, torch.tensor([[True, True, False, False]]), "B")
    rank.zero_()
    assert mask.q_order.tolist() == [[0, 1, 2, 3]]


def test_eso_broadcasts_batch():
    rank = torch.tensor([0, 1, 2])
    is_clean = torch.tensor([[True, False, False], [True, True, False]])
    mask = Mask.eso(rank, is_clean, "A")
    assert mask.batch == 2
    i, j = grid(3)
    expected = is_clean[:, None, :] | (~is_clean[:, :, None] & ~is_clean[:, None, :] & (j <= i))
    assert_dense(mask, expected)


@pytest.mark.parametrize("seq_len", SIZES)
def test_clean_and_self(seq_len):
    gen = torch.Generator().manual_seed(seq_len + 1)
    is_clean = torch.rand(2, seq_len, generator=gen) < 0.4
    i, j = grid(seq_len)
    # Every row sees the clean keys; a mask row also sees itself; no one sees another mask.
    expected = is_clean[:, None, :] | (i == j)
    assert_dense(Mask.clean_and_self(is_clean), expected)


@pytest.mark.parametrize("q_len, k_len", [(1, 1), (7, None), (5, 130)])
def test_bidirectional(q_len, k_len):
    mask = Mask.bidirectional(q_len, k_len=k_len)
    expected_k = q_len if k_len is None else k_len
    assert_dense(mask, torch.ones(q_len, expected_k, dtype=torch.bool))


# ------------------------------------------------------------------------------------ gather_queries
@pytest.mark.parametrize("seq_len", [1, 7, 97])
def test_gather_queries_batched(seq_len):
    gen = torch.Generator().manual_seed(7)
    rank, is_clean = random_eso_ranks(3, seq_len, gen)
    mask = Mask.eso(rank, is_clean, "A")
    index = torch.randint(0, seq_len, (3, 5), generator=gen)  # repeats allowed
    sub = mask.gather_queries(index)
    dense = mask.to_dense()
    expected = torch.stack([dense[b, index[b]] for b in range(3)])
    assert (sub.q_len, sub.k_len) == (5, seq_len)
    assert sub.k_order is mask.k_order and sub.k_group is mask.k_group
    assert_dense(sub, expected)


def test_gather_queries_broadcasts_labels_to_index_batch():
    mask = Mask.block_causal(12, 4, prefix_len=2)  # label batch 1
    index = torch.tensor([[0, 11], [5, 6]], dtype=torch.int32)
    sub = mask.gather_queries(index)
    assert sub.batch == 2
    dense = mask.to_dense()[0]
    assert_dense(sub, torch.stack([dense[index[0].long()], dense[index[1].long()]]))


def test_gather_queries_1d_index():
    mask = Mask.causal(9)
    index = torch.tensor([8, 0, 3])
    assert_dense(mask.gather_queries(index), mask.to_dense()[0, index])


@pytest.mark.parametrize("bad", [9, -1])
def test_gather_queries_out_of_range(bad):
    with pytest.raises(ValueError, match=rf"{bad}.*q_len=9"):
        Mask.causal(9).gather_queries(torch.tensor([[0, bad]]))


def test_gather_queries_uint64_out_of_range_names_the_unsigned_value():
    huge = torch.tensor([[0, 2 ** 63 + 5]], dtype=torch.uint64)
    with pytest.raises(ValueError, match=rf"index value {2 ** 63 + 5} is outside \[0, q_len=9\)"):
        Mask.causal(9).gather_queries(huge)


def test_gather_queries_bad_dtype_and_batch():
    mask = Mask.causal(4)
    with pytest.raises(TypeError, match="float32"):
        mask.gather_queries(torch.tensor([0.0, 1.0]))
    with pytest.raises(TypeError, match="bool"):
        mask.gather_queries(torch.tensor([True]))
    batched = Mask.eso(torch.arange(4).expand(2, 4), torch.ones(2, 4, dtype=torch.bool), "B")
    with pytest.raises(ValueError, match="3"):
        batched.gather_queries(torch.zeros(3, 1, dtype=torch.long))


# -------------------------------------------------------------------------------------- construction
def test_int32_labels_are_stored_without_copy():
    labels = [torch.arange(5, dtype=torch.int32)[None] for _ in range(4)]
    mask = Mask(*labels)
    assert mask.q_order is labels[0] and mask.q_group is labels[1]
    assert mask.k_order is labels[2] and mask.k_group is labels[3]


def test_1d_and_other_integer_dtypes():
    q = torch.arange(4, dtype=torch.int32)
    mask = Mask(q, q.to(torch.int64), torch.arange(6, dtype=torch.int16), torch.zeros(6, dtype=torch.uint8))
    for t in (mask.q_order, mask.q_group, mask.k_order, mask.k_group):
        assert t.dtype == torch.int32 and t.dim() == 2 and t.shape[0] == 1
    assert mask.q_order.data_ptr() == q.data_ptr()  # 1-D int32 becomes a view, not a copy
    assert (mask.batch, mask.q_len, mask.k_len, mask.device) == (1, 4, 6, torch.device("cpu"))


def test_batch_broadcast():
    q = torch.zeros(3, 4, dtype=torch.int32)
    k = torch.zeros(1, 5, dtype=torch.int32)
    mask = Mask(q, q, k, k)
    assert mask.batch == 3
    assert mask.to_dense().shape == (3, 4, 5)


def test_int32_max_is_never_earlier():
    # Padding keys (order INT32_MAX, unused group) are invisible to every query.
    q = torch.tensor([[INT32_MAX, 0]], dtype=torch.int32)
    k = torch.tensor([[INT32_MAX]], dtype=torch.int32)
    assert not Mask(q, q, k, torch.tensor([[-5]], dtype=torch.int32)).to_dense().any()


def _labels(n=4, batch=1):
    return torch.zeros(batch, n, dtype=torch.int32)


@pytest.mark.parametrize(
    "args, error, pattern",
    [
        (([0, 1], _labels(2), _labels(2), _labels(2)), TypeError, "q_order.*list"),
        ((_labels(), _labels(), _labels(), _labels().float()), TypeError, "k_group.*float32"),
        ((_labels(), _labels().bool(), _labels(), _labels()), TypeError, "q_group.*bool"),
        ((_labels(), _labels(), _labels().to(torch.complex64), _labels()), TypeError, "k_order.*complex64"),
        ((torch.zeros(2, 3, 4, dtype=torch.int32), _labels(), _labels(), _labels()), ValueError,
         r"q_order.*\[2, 3, 4\]"),
        ((_labels(4), _labels(5), _labels(), _labels()), ValueError, r"\[1, 4\].*\[1, 5\]"),
        ((_labels(), _labels(), _labels(3), _labels(4)), ValueError, r"\[1, 3\].*\[1, 4\]"),
        ((_labels(batch=2), _labels(), _labels(batch=3), _labels()), ValueError, "2.*3"),
        ((torch.tensor([0, 2**31]), _labels(2), _labels(), _labels()), ValueError, "2147483648"),
        ((_labels(), _labels(), torch.tensor([-(2**31) - 1]), _labels(1)), ValueError, "-2147483649"),
        ((_labels(), _labels(), _labels(), _labels().to("meta")), TypeError, "meta"),
    ],
)
def test_constructor_errors(args, error, pattern):
    with pytest.raises(error, match=pattern):
        Mask(*args)


@pytest.mark.parametrize(
    "build, error, pattern",
    [
        (lambda: Mask.causal(0), ValueError, "seq_len.*0"),
        (lambda: Mask.causal(2.5), ValueError, "2.5"),
        (lambda: Mask.causal(True), ValueError, "True"),
        (lambda: Mask.block_causal(8, 0), ValueError, "block_size.*0"),
        (lambda: Mask.block_causal(8, 2, prefix_len=9), ValueError, "prefix_len.*9"),
        (lambda: Mask.block_diagonal(8, -3), ValueError, "-3"),
        (lambda: Mask.prefix_lm(4, -1), ValueError, "prefix_len.*-1"),
        (lambda: Mask.bd3_train(8, 0), ValueError, "block_size.*0"),
        (lambda: Mask.bidirectional(3, k_len=0), ValueError, "k_len.*0"),
        (lambda: Mask.eso(torch.arange(3), torch.ones(3, dtype=torch.bool), "C"), ValueError, "'C'"),
        (lambda: Mask.eso(torch.arange(3), torch.ones(4, dtype=torch.bool), "A"), ValueError,
         r"\[3\].*\[4\]"),
        (lambda: Mask.eso(torch.arange(3), torch.ones(3, dtype=torch.int64), "A"), TypeError, "int64"),
        (lambda: Mask.eso(torch.arange(3.0), torch.ones(3, dtype=torch.bool), "B"), TypeError, "float32"),
        (lambda: Mask.clean_and_self(torch.ones(3)), TypeError, "float32"),
    ],
)
def test_family_argument_errors(build, error, pattern):
    with pytest.raises(error, match=pattern):
        build()


# ------------------------------------------------------------------------------------------ the rest
def test_to_returns_new_mask():
    mask = Mask.block_causal(10, 3, prefix_len=2)
    moved = mask.to("meta")
    assert moved is not mask and moved.device.type == "meta"
    assert mask.device.type == "cpu"
    assert "block_causal" in repr(moved)


def test_repr_is_short_and_named():
    assert repr(Mask.causal(7)) == "Mask(causal, q=[1, 7], k=[1, 7], device=cpu)"
    raw = Mask(_labels(3, batch=2), _labels(3), _labels(5), _labels(5))
    assert repr(raw) == "Mask(q=[2, 3], k=[1, 5], device=cpu)"


def test_docstring_examples_run():
    module = importlib.import_module("dlmfuse.mask")
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.slow
def test_torch_compile_fullgraph_reads_labels():
    @torch.compile(fullgraph=True, backend="eager")
    def masked_scores(scores, mask):
        visible = (mask.k_order[:, None, :] < mask.q_order[:, :, None]) | (
            mask.k_group[:, None, :] == mask.q_group[:, :, None]
        )
        return scores.masked_fill(~visible, float("-inf")), mask.batch, mask.q_len

    scores = torch.randn(2, 6, 6)
    mask = Mask.eso(torch.arange(6).expand(2, 6), torch.tensor([[True] * 3 + [False] * 3] * 2), "A")
    out, batch, q_len = masked_scores(scores, mask)
    assert (batch, q_len) == (2, 6)
    assert torch.equal(out, scores.masked_fill(~mask.to_dense(), float("-inf")))
    # New label values (same shapes) run through the same graph.
    other = Mask.eso(torch.arange(6).expand(2, 6), torch.tensor([[True] * 5 + [False]] * 2), "A")
    out, _, _ = masked_scores(scores, other)
    assert torch.equal(out, scores.masked_fill(~other.to_dense(), float("-inf")))
