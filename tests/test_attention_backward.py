"""The fused attention backward (CPU C++ kernel) against autograd through the float64 reference.

Shapes span several 64-row query tiles and 64-key tiles (and key ranges split across tasks with
one (batch, KV head)), with every mask family, documents, bias broadcasts with -inf entries,
kv_lens with an empty batch, GQA / MQA, sparse query rows, gradients through lse, every dtype and
the tile widths of odd head dims. A tiny DenoiserLM learns a synthetic task under BD3-LM's
training mask, and a training step compiles with torch.compile(fullgraph=True).
"""

import importlib

import pytest
import torch

import dlmfuse
from dlmfuse import Mask

from conftest import DTYPE_IDS

attention_module = importlib.import_module("dlmfuse.attention")  # `dlmfuse.attention` is the function

# Per dtype: the gradients' tolerance relative to their largest magnitude. fp32 accumulates in
# fp32 (1e-4 covers recomputing P from the saved lse); bf16 / fp16 round q, k, v, dO and every
# gradient to the dtype, so two units in the last place of the largest gradient.
GRAD_RTOL = {torch.float32: 1e-4, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


def random_inputs(B, Lq, Lk, Hq, Hkv, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Lq, Hq, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Lk, Hkv, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, Lk, Hkv, D, generator=g, dtype=torch.float64)
    grad_out = torch.randn(B, Lq, Hq, D, generator=g, dtype=torch.float64)
    grad_lse = torch.randn(B, Hq, Lq, generator=g, dtype=torch.float64)
    return q, k, v, grad_out, grad_lse


def gradients(fn, tensors, dtype, grad_out, grad_lse, **kwargs):
    """d(q, k, v[, bias]) of <out, grad_out> + <finite lse, grad_lse> with fn's inputs in dtype."""
    leaves = [t.detach().to(dtype).requires_grad_(True) for t in tensors]
    bias = leaves[3] if len(leaves) > 3 else None
    out, lse = fn(*leaves[:3], bias=bias, return_lse=True, **kwargs)
    lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    torch.autograd.backward((out, lse), (grad_out.to(out.dtype), grad_lse.to(lse.dtype)))
    return [leaf.grad for leaf in leaves]


def check_gradients(tensors, grad_out, grad_lse, dtype=torch.float32, **kwargs):
    # The reference sees the same rounded inputs, so only the kernel's arithmetic is compared.
    rounded = [t.to(dtype).double() for t in tensors]
    expected = gradients(dlmfuse.reference.attention, rounded, torch.float64, grad_out.to(dtype).double(),
                         grad_lse, compute_dtype=torch.float64, **kwargs)
    got = gradients(dlmfuse.attention, tensors, dtype, grad_out, grad_lse, **kwargs)
    for name, a, e in zip(("dq", "dk", "dv", "dbias"), got, expected):
        assert a is not None and a.dtype == dtype and a.shape == e.shape, (name, a)
        assert torch.isfinite(a).all(), f"{name}: non-finite gradient"
        scale = max(float(e.abs().max()), 1e-12)
        tol = GRAD_RTOL[dtype]
        torch.testing.assert_close(a.double(), e, rtol=tol, atol=tol * scale, msg=lambda m: f"{name}: {m}")


def random_labels(B, Lq, Lk, seed, docs=False):
    g = torch.Generator().manual_seed(seed)
    labels = [torch.randint(0, 6, (B, n), generator=g) for n in (Lq, Lq, Lk, Lk)]
    if docs:
        labels += [torch.randint(0, 2, (B, Lq), generator=g), torch.randint(0, 2, (B, Lk), generator=g)]
    return Mask(*labels)


SHAPES = [  # B, Lq, Lk, Hq, Hkv, D
    (2, 130, 130, 2, 2, 64),
    (1, 97, 257, 4, 1, 32),
    (2, 1, 200, 4, 2, 128),
    (1, 65, 70, 2, 1, 96),
]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("mask_kind", ["none", "labels", "documents"])
def test_gradients_match_the_reference(shape, mask_kind):
    B, Lq, Lk, Hq, Hkv, D = shape
    q, k, v, grad_out, grad_lse = random_inputs(*shape)
    mask = None if mask_kind == "none" else random_labels(B, Lq, Lk, seed=1, docs=mask_kind == "documents")
    check_gradients((q, k, v), grad_out, grad_lse, mask=mask)


FAMILIES = {
    "causal": lambda L: Mask.causal(L),
    "block_causal": lambda L: Mask.block_causal(L, 16, prefix_len=20),
    "prefix_lm": lambda L: Mask.prefix_lm(L, 33),
    "block_diagonal": lambda L: Mask.block_diagonal(L, 24),
    "eso_A": lambda L: Mask.eso(torch.randperm(L, generator=torch.Generator().manual_seed(2))[None],
                                torch.arange(L)[None] % 3 == 0, "A"),
    "eso_B": lambda L: Mask.eso(torch.randperm(L, generator=torch.Generator().manual_seed(3))[None],
                                torch.arange(L)[None] % 3 == 0, "B"),
    "packed_block_causal": lambda L: Mask.block_causal(L, 8, documents=torch.arange(L) * 3 // L),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_for_each_mask_family(family):
    L = 150
    q, k, v, grad_out, grad_lse = random_inputs(2, L, L, 4, 2, 64, seed=4)
    check_gradients((q, k, v), grad_out, grad_lse, mask=FAMILIES[family](L))


@pytest.mark.parametrize("documents", [False, True], ids=["plain", "packed"])
def test_gradients_bd3_training_mask(documents):
    L = 96
    mask = Mask.bd3_train(L, 16, documents=torch.arange(L) * 2 // L if documents else None)
    q, k, v, grad_out, grad_lse = random_inputs(1, 2 * L, 2 * L, 2, 2, 64, seed=5)
    check_gradients((q, k, v), grad_out, grad_lse, mask=mask)


BIAS_SHAPES = [(1, 2, 1, 140), (2, 1, 75, 140), (140,), (2, 2, 75, 140)]


@pytest.mark.parametrize("bias_shape", BIAS_SHAPES, ids=str)
def test_bias_gradient_is_summed_over_its_broadcast_dims(bias_shape):
    q, k, v, grad_out, grad_lse = random_inputs(2, 75, 140, 2, 1, 64, seed=6)
    g = torch.Generator().manual_seed(7)
    bias = torch.randn(bias_shape, generator=g, dtype=torch.float64)
    bias = bias.masked_fill(torch.rand(bias_shape, generator=g) < 0.1, float("-inf"))
    check_gradients((q, k, v, bias), grad_out, grad_lse, mask=Mask.causal(140).gather_queries(torch.arange(65, 140)))


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_broadcast_bias_gradient_is_rounded_once(backend, monkeypatch):
    """A bf16 bias broadcast over batch and heads (fp32 q, k, v): its gradient, a sum of 32 dS per
    element, is summed in float32 and rounded to bf16 once (each element within one rounding of the
    float64 sum), not rounded per dS and then summed (a quarter of the elements were off by more)."""
    monkeypatch.setenv("DLMFUSE_BACKEND", backend)
    q, k, v, grad_out, _ = random_inputs(8, 64, 64, 4, 4, 64, seed=15)
    bias = torch.randn(1, 1, 64, 64, generator=torch.Generator().manual_seed(16), dtype=torch.float64)
    leaves = [t.float().requires_grad_(True) for t in (q, k, v)] + [bias.bfloat16().requires_grad_(True)]
    dlmfuse.attention(*leaves[:3], bias=leaves[3]).backward(grad_out.float())
    rounded = [t.detach().double().requires_grad_(True) for t in leaves]
    dlmfuse.reference.attention(*rounded[:3], bias=rounded[3], compute_dtype=torch.float64).backward(grad_out)
    got, want = leaves[3].grad.double(), rounded[3].grad
    assert leaves[3].grad.dtype == torch.bfloat16 and got.shape == want.shape
    beyond = (got - want).abs() > 2.0**-8 * want.abs() + 1e-6 * want.abs().max()
    assert not beyond.any(), f"{int(beyond.sum())} of {beyond.numel()} elements beyond one bf16 rounding"


# Budgets (bytes of float32 dS per part) for B = 3, Hq = 4 over Hkv = 2, Lq = 50, Lk = 90: all
# batches, one batch, one KV group, 7 rows of a group, one row.
PART_BUDGETS = {"batches": 4 * 4 * 50 * 90 * 2, "one_batch": 4 * 4 * 50 * 90, "one_group": 4 * 2 * 50 * 90,
                "rows": 4 * 2 * 7 * 90, "one_row": 1}


@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("budget", PART_BUDGETS)
@pytest.mark.parametrize("bias_shape", [(1, 4, 50, 90), (3, 1, 1, 90), (3, 4, 50, 90), (1, 1, 50, 1)], ids=str)
def test_bias_gradients_in_parts_of_bounded_size(bias_shape, budget, backend, monkeypatch):
    """Where the float32 dS of a bias gradient would exceed BIAS_GRAD_PART_BYTES, the backward runs on
    parts of the call (batches, KV-head groups, query rows) no larger than it and adds them up: the
    gradients stay the reference's, under GQA, per-batch labels with documents, kv_lens and a bias
    broadcast along any dims, and no part's dS passes the budget (one row at least)."""
    monkeypatch.setenv("DLMFUSE_BACKEND", backend)
    B, Lq, Lk, Hq, Hkv = 3, 50, 90, 4, 2
    monkeypatch.setattr("dlmfuse._attention_backward_parts.BIAS_GRAD_PART_BYTES", PART_BUDGETS[budget])
    parts, whole = [], attention_module._backward_float32

    def recorded(grad_out, grad_lse, q, k, *rest):
        parts.append(4 * q.shape[0] * q.shape[2] * q.shape[1] * k.shape[1])
        return whole(grad_out, grad_lse, q, k, *rest)

    monkeypatch.setattr(attention_module, "_backward_float32", recorded)
    q, k, v, grad_out, grad_lse = random_inputs(B, Lq, Lk, Hq, Hkv, 64, seed=17)
    bias = torch.randn(bias_shape, generator=torch.Generator().manual_seed(18), dtype=torch.float64)
    kwargs = dict(mask=random_labels(B, Lq, Lk, seed=19, docs=True), kv_lens=torch.tensor([90, 0, 33]))
    check_gradients((q, k, v, bias), grad_out, grad_lse, **kwargs)
    one_row = 4 * (Hq // Hkv) * Lk
    assert parts and all(size <= max(PART_BUDGETS[budget], one_row) for size in parts), parts
    assert len(parts) == {"batches": 2, "one_batch": 3, "one_group": 6, "rows": 48, "one_row": 300}[budget]


@pytest.mark.parametrize("batch", [1, 3])
def test_bias_gradients_in_parts_with_batch_one_labels_and_kv_lens(batch, monkeypatch):
    """Labels of batch 1 broadcast to every part's batches, and a batch-1 call's kv_lens reaches
    every part (NaN past it must stay unread)."""
    monkeypatch.setattr("dlmfuse._attention_backward_parts.BIAS_GRAD_PART_BYTES", 4 * 2 * 7 * 60)
    q, k, v, grad_out, grad_lse = random_inputs(batch, 30, 60, 4, 2, 64, seed=20)
    kv_lens = torch.tensor([41, 0, 60][:batch])
    k[0, 41:], v[0, 41:] = float("nan"), float("nan")
    bias = torch.randn(1, 4, 30, 60, generator=torch.Generator().manual_seed(21), dtype=torch.float64)
    mask = Mask.block_causal(60, 8, documents=torch.arange(60) // 25).gather_queries(torch.arange(30, 60))
    assert mask.batch == 1
    check_gradients((q, k, v, bias), grad_out, grad_lse, mask=mask, kv_lens=kv_lens)


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_kv_lens_and_empty_rows_give_zero_gradients(backend, monkeypatch):
    """Keys past kv_lens are never read, NaN there included (an uninitialised cache)."""
    monkeypatch.setenv("DLMFUSE_BACKEND", backend)
    q, k, v, grad_out, grad_lse = random_inputs(3, 70, 140, 2, 2, 64, seed=8)
    kv_lens = torch.tensor([0, 65, 140], dtype=torch.int32)
    k[0], v[0], k[1, 65:], v[1, 65:] = float("nan"), float("nan"), float("nan"), float("nan")
    check_gradients((q, k, v), grad_out, grad_lse, kv_lens=kv_lens)
    got = gradients(dlmfuse.attention, (q, k, v), torch.float32, grad_out, grad_lse, kv_lens=kv_lens)
    assert not got[0][0].any() and not got[1][0].any() and not got[2][0].any(), "a batch with no keys has zero grads"
    assert not got[1][1, 65:].any() and not got[2][1, 65:].any(), "keys past kv_lens get zero grads"


def test_sparse_query_rows():
    L = 200
    clean = torch.rand(2, L, generator=torch.Generator().manual_seed(9)) < 0.5
    rows = torch.stack([(~c).nonzero()[:40, 0] for c in clean])
    mask = Mask.clean_and_self(clean).gather_queries(rows)
    q, k, v, grad_out, grad_lse = random_inputs(2, 40, L, 4, 1, 64, seed=10)
    check_gradients((q, k, v), grad_out, grad_lse, mask=mask)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=DTYPE_IDS.get)
def test_low_precision_gradients(dtype):
    q, k, v, grad_out, grad_lse = random_inputs(1, 130, 130, 2, 1, 64, seed=11)
    check_gradients((q, k, v), grad_out, grad_lse, dtype=dtype, mask=Mask.block_causal(130, 32))


def test_one_kv_head_splits_its_key_range_and_stays_deterministic():
    """B = Hkv = 1 leaves one (batch, KV head): the key range is split into tasks whose dQ slices
    are added; the result must repeat bit for bit, whatever the thread count."""
    q, k, v, grad_out, grad_lse = random_inputs(1, 70, 600, 2, 1, 64, seed=12)
    before = dlmfuse.num_threads()
    try:
        runs = []
        for threads in (1, dlmfuse._C.max_threads(), dlmfuse._C.max_threads()):
            dlmfuse.set_num_threads(threads)
            runs.append(gradients(dlmfuse.attention, (q, k, v), torch.float32, grad_out, grad_lse))
    finally:
        dlmfuse.set_num_threads(before)
    for run in runs[1:]:
        for a, b in zip(run, runs[0]):
            assert torch.equal(a, b), "the gradients depend on the thread count or differ between runs"
    check_gradients((q, k, v), grad_out, grad_lse)


def test_opcheck_attention_backward():
    q, k, v, grad_out, grad_lse = (t.float() for t in random_inputs(2, 9, 21, 4, 2, 64, seed=13))
    mask = random_labels(2, 9, 21, seed=14, docs=True)
    bias = torch.randn(2, 4, 9, 21)
    out, lse = dlmfuse.attention(q, k, v, mask=mask, bias=bias, return_lse=True)
    args = (grad_out, grad_lse, q, k, v, *mask.labels(), bias, torch.tensor([21, 15], dtype=torch.int32), out, lse,
            0.2, True)
    torch.library.opcheck(torch.ops.dlmfuse.attention_backward.default, args)


# ------------------------------------------------------------------------------------- training
def bd3_batch(model_len, block, vocab, mask_id, g, batch=8):
    """A synthetic BD3-LM batch: x_0 counts up from a random start (mod vocab - 1), x_t masks a
    random share of each block; input [x_t ; x_0], targets the x_0 tokens at x_t's masked slots."""
    start = torch.randint(0, vocab - 1, (batch, 1), generator=g)
    x0 = (start + torch.arange(model_len)) % (vocab - 1)
    masked = torch.rand(batch, model_len, generator=g) < torch.rand(batch, model_len // block, 1, generator=g).repeat_interleave(block, 1).view(batch, model_len)
    xt = torch.where(masked, torch.full_like(x0, mask_id), x0)
    return torch.cat([xt, x0], 1), x0, masked


def test_denoiser_learns_under_the_bd3_training_mask():
    torch.manual_seed(0)
    L, block, vocab = 32, 8, 17
    model = dlmfuse.nn.DenoiserLM(vocab, 64, 2, 2, 1, 128)
    mask = Mask.bd3_train(L, block)
    positions = torch.arange(L).repeat(2)  # x_t and x_0 share positions
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(50):
        ids, x0, masked = bd3_batch(L, block, vocab, vocab - 1, g)
        logits = model(ids, positions=positions, mask=mask)[:, :L]
        loss = torch.nn.functional.cross_entropy(logits[masked], x0[masked])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.5 * first, f"loss {first:.3f} -> {last:.3f}"


@pytest.mark.slow
def test_training_step_compiles_fullgraph():
    L = 64
    mask = Mask.bd3_train(L // 2, 8)
    q, k, v, grad_out, _ = (t.float() for t in random_inputs(1, L, L, 2, 1, 64, seed=15))

    def loss(q, k, v):
        return (dlmfuse.attention(q, k, v, mask=mask) * grad_out).sum()

    def grads(fn):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        fn(*leaves).backward()
        return [t.grad for t in leaves]

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True, dynamic=False)  # no C++ compiler needed
    for a, b in zip(grads(compiled), grads(loss)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
