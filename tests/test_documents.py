"""Packed sequences: document labels ANDed with the visibility rule.

Every check compares a packed row (3-5 documents of uneven lengths) with its documents taken one
by one: the dense mask equals the per-document masks placed on the diagonal, and attention
(outputs, lse, gradients) equals attention run on each document alone. Documents aligned to the
kernel's 64-row tiles with NaN keys in the other documents show that tiles of other documents are
never read.
"""

import pytest
import torch

import dlmfuse
from dlmfuse import KVCache, Mask
from dlmfuse.mask import document_positions

from conftest import DTYPE_IDS, DTYPES, check_attention

LENGTHS = [(37, 5, 90, 1, 64), (64, 128, 64), (130, 7, 7)]  # documents per packed row


def doc_ids(lengths, device="cpu"):
    return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).to(device)


def spans(lengths):
    starts = torch.tensor([0, *lengths]).cumsum(0).tolist()
    return [slice(a, b) for a, b in zip(starts[:-1], starts[1:])]


def random_eso(length, seed, variant):
    g = torch.Generator().manual_seed(seed)
    clean = torch.rand(1, length, generator=g) < 0.5
    key = torch.rand(1, length, generator=g) + (~clean).float()  # clean tokens first
    rank = torch.empty(1, length, dtype=torch.int64)
    rank.scatter_(1, key.argsort(1), torch.arange(length)[None])
    return rank, clean


# One packed mask and its documents' own masks, per family. The Eso-LM ranks of a packed row are
# each document's ranks side by side (rank r of document d is its r-th token).
def family_masks(family, lengths):
    L, docs = sum(lengths), doc_ids(lengths)
    if family == "block_causal":
        return Mask.block_causal(L, 4, prefix_len=3, documents=docs), [Mask.block_causal(n, 4, prefix_len=min(3, n)) for n in lengths]
    if family == "causal":
        return Mask.causal(L, documents=docs), [Mask.causal(n) for n in lengths]
    if family == "prefix_lm":
        return Mask.prefix_lm(L, 6, documents=docs), [Mask.prefix_lm(n, min(6, n)) for n in lengths]
    if family == "block_diagonal":
        return Mask.block_diagonal(L, 8, documents=docs), [Mask.block_diagonal(n, 8) for n in lengths]
    if family == "bidirectional":
        return Mask.bidirectional(L, documents=docs), [Mask.bidirectional(n) for n in lengths]
    if family in ("eso_A", "eso_B"):
        variant = family[-1]
        parts = [random_eso(n, seed, variant) for seed, n in enumerate(lengths)]
        rank, clean = (torch.cat([p[i] for p in parts], 1) for i in (0, 1))
        return Mask.eso(rank, clean, variant, documents=docs), [Mask.eso(r, c, variant) for r, c in parts]
    if family == "clean_and_self":
        clean = torch.rand(1, L, generator=torch.Generator().manual_seed(3)) < 0.5
        return (Mask.clean_and_self(clean, documents=docs),
                [Mask.clean_and_self(clean[:, s]) for s in spans(lengths)])
    raise AssertionError(family)


FAMILIES = ["block_causal", "causal", "prefix_lm", "block_diagonal", "bidirectional", "eso_A", "eso_B",
            "clean_and_self"]


@pytest.mark.parametrize("lengths", LENGTHS, ids=str)
@pytest.mark.parametrize("family", FAMILIES)
def test_dense_mask_is_the_documents_masks_on_the_diagonal(family, lengths):
    packed, singles = family_masks(family, lengths)
    expected = torch.zeros(sum(lengths), sum(lengths), dtype=torch.bool)
    for s, single in zip(spans(lengths), singles):
        expected[s, s] = single.to_dense()[0]
    assert torch.equal(packed.to_dense()[0], expected)


@pytest.mark.parametrize("lengths", LENGTHS, ids=str)
def test_bd3_train_packed_is_each_documents_bd3_mask(lengths):
    """[x_t ; x_0] of a packed row: document d's x_t tokens at its span of the first half, its x_0
    tokens at the same span of the second half; blocks restart at every document."""
    L = sum(lengths)
    packed = Mask.bd3_train(L, 4, documents=doc_ids(lengths)).to_dense()[0]
    expected = torch.zeros(2 * L, 2 * L, dtype=torch.bool)
    for s in spans(lengths):
        n = s.stop - s.start
        rows = torch.cat([torch.arange(s.start, s.stop), torch.arange(L + s.start, L + s.stop)])
        expected[rows[:, None], rows[None, :]] = Mask.bd3_train(n, 4).to_dense()[0]
    assert torch.equal(packed, expected)


def test_document_positions_restart_at_every_run():
    doc, pos = document_positions(torch.tensor([[7, 7, 3, 3, 3, 7], [1, 1, 1, 1, 2, 2]]), 6)
    assert doc.tolist() == [[0, 0, 1, 1, 1, 2], [0, 0, 0, 0, 1, 1]]
    assert pos.tolist() == [[0, 1, 0, 1, 2, 0], [0, 1, 2, 3, 0, 1]]


def test_within_documents_ands_with_the_rule_and_composes():
    base = Mask.causal(6)
    first, second = torch.tensor([0, 0, 0, 1, 1, 1]), torch.tensor([5, 5, 6, 6, 6, 6])
    once = base.within_documents(first)
    twice = once.within_documents(second)
    same = lambda d: d[:, :, None] == d[:, None, :]  # noqa: E731
    assert torch.equal(once.to_dense(), base.to_dense() & same(first[None]))
    assert torch.equal(twice.to_dense(), base.to_dense() & same(first[None]) & same(second[None]))
    # Lq != Lk needs k_doc; with it, a gathered query keeps its document.
    rows = torch.tensor([[4, 1]])
    gathered = once.gather_queries(rows)
    assert gathered.q_doc.tolist() == [[1, 0]] and torch.equal(gathered.to_dense()[0], once.to_dense()[0][rows[0]])
    sparse = Mask(base.q_order[:, :2], base.q_group[:, :2], base.k_order, base.k_group)
    with pytest.raises(ValueError, match=r"within_documents: k_doc is needed when Lq \(2\) != Lk \(6\)"):
        sparse.within_documents(first[:2])
    explicit = sparse.within_documents(torch.tensor([1, 0]), first)
    assert explicit.to_dense()[0].int().tolist() == [[0, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0]]


@pytest.mark.parametrize("call, exc, pattern", [
    (lambda: Mask.causal(4).within_documents(torch.zeros(5, dtype=torch.int64)), ValueError, r"q_doc must have length 4, got shape \[1, 5\]"),
    (lambda: Mask.causal(4).within_documents(torch.zeros(4)), TypeError, r"q_doc must have an integer dtype .* got torch.float32"),
    (lambda: Mask.causal(4).within_documents([0, 0, 1, 1]), TypeError, r"q_doc must be a torch.Tensor, got list"),
    (lambda: Mask.causal(4).within_documents(torch.tensor([0, 2**40, 0, 0])), ValueError, r"q_doc has value 1099511627776 outside the int32"),
    (lambda: Mask(*Mask.causal(4).labels()[:4], q_doc=torch.zeros(1, 4, dtype=torch.int32)), ValueError, "give both q_doc and k_doc or neither"),
    (lambda: Mask(*Mask.causal(4).labels()[:4], torch.zeros(1, 4, dtype=torch.int32), torch.zeros(1, 3, dtype=torch.int32)),
     ValueError, r"k_order and k_doc must have the same length"),
    (lambda: Mask(*Mask.causal(4).labels()[:4], torch.zeros(3, 4, dtype=torch.int32), torch.zeros(2, 4, dtype=torch.int32)),
     ValueError, r"label batches must each be 1 or a common B"),
    (lambda: Mask.block_causal(6, 2, documents=torch.zeros(5, dtype=torch.int64)), ValueError, r"documents must have length 6, got shape \[5\]"),
    (lambda: Mask.bidirectional(4, k_len=5, documents=torch.zeros(4, dtype=torch.int64)), ValueError, "documents need k_len == seq_len"),
])
def test_bad_document_labels(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call()


# ------------------------------------------------------------------------------------- attention
def packed_inputs(lengths, dtype, device, seed=0, heads=(4, 2), head_dim=64, length=None):
    g = torch.Generator().manual_seed(seed)
    L = sum(lengths) if length is None else length
    q = torch.randn(2, L, heads[0], head_dim, generator=g)
    k, v = (torch.randn(2, L, heads[1], head_dim, generator=g) for _ in range(2))
    return (t.to(device=device, dtype=dtype) for t in (q, k, v))


def attention_inputs(family, lengths, dtype, device):
    """(q, k, v, packed mask, per document: (query rows, key rows, the document's own mask))."""
    L = sum(lengths)
    if family == "bd3_train":  # queries and keys over [x_t ; x_0]
        q, k, v = packed_inputs(lengths, dtype, device, length=2 * L)
        packed = Mask.bd3_train(L, 4, documents=doc_ids(lengths))
        parts = []
        for s in spans(lengths):
            rows = torch.cat([torch.arange(s.start, s.stop), torch.arange(L + s.start, L + s.stop)])
            parts.append((rows, rows, Mask.bd3_train(s.stop - s.start, 4)))
        return q, k, v, packed.to(device), parts
    q, k, v = packed_inputs(lengths, dtype, device)
    packed, singles = family_masks(family, lengths)
    parts = [(torch.arange(s.start, s.stop),) * 2 + (single,) for s, single in zip(spans(lengths), singles)]
    return q, k, v, packed.to(device), parts


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("family", ["block_causal", "bd3_train", "eso_A", "eso_B"])
@pytest.mark.parametrize("lengths", LENGTHS, ids=str)
def test_packed_attention_equals_each_document_alone(lengths, family, dtype, device):
    q, k, v, packed, parts = attention_inputs(family, lengths, dtype, device)
    out, lse = dlmfuse.attention(q, k, v, mask=packed, return_lse=True)
    check_attention(out, q, k, v, lse=lse, mask=packed)
    for q_rows, k_rows, single in parts:
        q_rows, k_rows = q_rows.to(device), k_rows.to(device)
        alone, alone_lse = dlmfuse.attention(q[:, q_rows], k[:, k_rows], v[:, k_rows], mask=single.to(device),
                                             return_lse=True)
        tol = 1e-5 if dtype == torch.float32 else 2.0**-7  # two roundings of one fp32 value may differ by an ulp
        torch.testing.assert_close(out[:, q_rows].double(), alone.double(), rtol=tol, atol=tol)
        torch.testing.assert_close(lse[:, :, q_rows], alone_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["block_causal", "bd3_train"])
def test_packed_gradients_equal_each_document_alone(family, device):
    lengths = LENGTHS[0]
    q, k, v, packed, parts = attention_inputs(family, lengths, torch.float32, device)
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(9)).to(device)
    out, lse = dlmfuse.attention(q, k, v, mask=packed, return_lse=True)
    torch.autograd.backward((out, lse), (grad_out, torch.ones_like(lse)))
    for q_rows, k_rows, single in parts:
        q_rows, k_rows = q_rows.to(device), k_rows.to(device)
        leaves = [t.detach()[:, rows].clone().requires_grad_(True) for t, rows in ((q, q_rows), (k, k_rows), (v, k_rows))]
        alone, alone_lse = dlmfuse.attention(*leaves, mask=single.to(device), return_lse=True)
        torch.autograd.backward((alone, alone_lse), (grad_out[:, q_rows], torch.ones_like(alone_lse)))
        for name, packed_grad, leaf, rows in (("dq", q.grad, leaves[0], q_rows), ("dk", k.grad, leaves[1], k_rows),
                                               ("dv", v.grad, leaves[2], k_rows)):
            torch.testing.assert_close(packed_grad[:, rows], leaf.grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_tiles_of_other_documents_are_never_read(dtype):
    """Documents on tile boundaries: NaN K/V everywhere but one document must not reach its rows,
    which needs every tile pair of two documents to be skipped, not read and weighted 0."""
    lengths = (64, 128, 64, 192)
    L = sum(lengths)
    mask = Mask.block_causal(L, 16, documents=doc_ids(lengths))
    q, k, v = packed_inputs(lengths, dtype, "cpu")
    for s in spans(lengths):
        poisoned_k, poisoned_v = torch.full_like(k, float("nan")), torch.full_like(v, float("nan"))
        poisoned_k[:, s], poisoned_v[:, s] = k[:, s], v[:, s]
        out = dlmfuse.attention(q, poisoned_k, poisoned_v, mask=mask)
        expected = dlmfuse.attention(q[:, s], k[:, s], v[:, s], mask=Mask.block_causal(s.stop - s.start, 16))
        assert torch.isfinite(out[:, s]).all()
        torch.testing.assert_close(out[:, s], expected, rtol=0, atol=0)


def test_documents_with_bias_kv_lens_and_sparse_queries():
    lengths = (40, 25, 70)
    L = sum(lengths)
    q, k, v = packed_inputs(lengths, torch.float32, "cpu")
    mask = Mask.block_causal(L, 8, documents=doc_ids(lengths))
    rows = torch.tensor([[3, 50, 100, 134], [0, 41, 64, 90]])
    bias = torch.randn(1, 4, 1, L)
    kwargs = dict(mask=mask.gather_queries(rows), bias=bias.expand(2, 4, 4, L), kv_lens=torch.tensor([L, 90], dtype=torch.int32))
    q_rows = torch.gather(q, 1, rows[..., None, None].expand(-1, -1, 4, 64))
    out, lse = dlmfuse.attention(q_rows, k, v, return_lse=True, **kwargs)
    check_attention(out, q_rows, k, v, lse=lse, **kwargs)


def test_kv_cache_keeps_key_documents():
    lengths = (5, 9, 6)
    L = sum(lengths)
    docs = doc_ids(lengths)[None]
    mask = Mask.block_causal(L, 4, documents=docs)
    cache = KVCache(1, 1, 32, 2, 64, torch.float32)
    _, k, v = packed_inputs(lengths, torch.float32, "cpu")
    k, v = k[:1], v[:1]
    cache.write(0, torch.arange(L)[None], k, v, order=mask.k_order, group=mask.k_group, doc=mask.k_doc)
    assert torch.equal(cache.k_doc[:, :L], docs.int())
    q = torch.randn(1, L, 4, 64)
    out = cache.attend(0, q, mask.q_order, mask.q_group, mask.q_doc)
    expected = dlmfuse.reference.attention(q, k, v, mask=mask)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    no_docs = cache.attend(0, q, mask.q_order, mask.q_group)  # without q_doc: documents are not applied
    assert not torch.allclose(no_docs, expected)


def test_denoiser_lm_forward_with_documents():
    """A packed row through a model gives each document's own logits (RoPE positions restarting
    at each document); through a cache (positions are its slots, so they run on) it gives the
    logits of the same packed call without one."""
    torch.manual_seed(0)
    model = dlmfuse.nn.DenoiserLM(50, 128, 2, 2, 1, 128).eval()
    lengths = (6, 11, 5)
    L = sum(lengths)
    ids = torch.randint(0, 50, (1, L))
    mask = Mask.block_causal(L, 4, documents=doc_ids(lengths))
    with torch.no_grad():
        packed = model(ids, positions=document_positions(doc_ids(lengths), L)[1][0], mask=mask)
        for s in spans(lengths):
            alone = model(ids[:, s], mask=Mask.block_causal(s.stop - s.start, 4))
            torch.testing.assert_close(packed[:, s], alone, rtol=1e-5, atol=1e-5)
        cache = KVCache(2, 1, L, 1, 64, torch.float32)
        cached = model(ids, mask=mask, cache=cache)
        torch.testing.assert_close(cached, model(ids, mask=mask), rtol=1e-5, atol=1e-5)
        assert torch.equal(cache.k_doc, mask.k_doc)
