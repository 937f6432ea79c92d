"""Loops that process their input a bounded chunk at a time, run with several chunks.

Real calls have several chunks only at sizes no test can afford (a 2048 x 2048 attention with 32
heads, LLaDA's 126k vocabulary), so each test shrinks the module's chunk budget to force 3-5
chunks, with a last chunk that is partial, and compares with a computation that has no chunks.
"""

import pytest
import torch

import dlmfuse
from dlmfuse import _attention_backward
from dlmfuse.samplers import llada


def test_token_probability_over_several_chunks(monkeypatch):
    g = torch.Generator().manual_seed(0)
    rows, vocab = 11, 37
    logits = torch.randn(rows, vocab, generator=g) * 4
    tokens = torch.randint(0, vocab, (rows,), generator=g)
    suppress = [3, 30]
    expected = torch.softmax(logits.double().index_fill(1, torch.tensor(suppress), float("-inf")), dim=-1)
    expected = expected.gather(1, tokens[:, None])[:, 0]
    monkeypatch.setattr(llada, "_FLOAT64_CHUNK_ELEMENTS", 3 * vocab)  # chunks of 3 rows: 3+3+3+2
    got = llada.token_probability(logits, tokens, suppress)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)
    # [B, n] rows keep their shape across the chunking
    got_2d = llada.token_probability(logits[:10].view(2, 5, vocab), tokens[:10].view(2, 5), suppress)
    torch.testing.assert_close(got_2d, expected[:10].view(2, 5), rtol=1e-12, atol=0)


@pytest.mark.parametrize("with_mask", [True, False], ids=["labels", "kv_lens_only"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["plain", "bias"])
def test_composite_attention_backward_over_several_query_chunks(monkeypatch, with_bias, with_mask):
    """The PyTorch backward (CUDA's, until a fused one exists) accumulates dK / dV over query
    chunks: every chunk must add, none overwrite; two query heads share each KV head (their rows
    stacked against it). Called directly, as the CPU runs the C++ one."""
    g = torch.Generator().manual_seed(1)
    B, Lq, Lk, Hq, Hkv, D = 2, 13, 9, 4, 2, 16
    q = torch.randn(B, Lq, Hq, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Lk, Hkv, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, Lk, Hkv, D, generator=g, dtype=torch.float64)
    bias = torch.randn(1, Hq, Lq, Lk, generator=g, dtype=torch.float64) if with_bias else None
    mask = dlmfuse.Mask(torch.randint(0, 4, (B, Lq), generator=g), torch.randint(0, 3, (B, Lq), generator=g),
                        torch.randint(0, 4, (B, Lk), generator=g), torch.randint(0, 3, (B, Lk), generator=g),
                        torch.randint(0, 2, (B, Lq), generator=g), torch.randint(0, 2, (B, Lk), generator=g))
    mask = mask if with_mask else None  # kv_lens alone: one visibility row for every query
    grad_out = torch.randn(B, Lq, Hq, D, generator=g, dtype=torch.float64)
    grad_lse = torch.randn(B, Hq, Lq, generator=g, dtype=torch.float64)
    kv_lens = torch.tensor([Lk, 6], dtype=torch.int32)

    leaves = [t.clone().requires_grad_(True) for t in (q, k, v) + ((bias,) if with_bias else ())]
    out, lse = dlmfuse.reference.attention(*leaves[:3], mask=mask, bias=leaves[3] if with_bias else None,
                                           kv_lens=kv_lens, return_lse=True, out_dtype=torch.float64)
    torch.autograd.backward((out, lse), (grad_out, grad_lse))
    expected = [t.grad for t in leaves]

    monkeypatch.setattr(_attention_backward, "_CHUNK_ELEMENTS", B * Hq * Lk * 3)  # 3 query rows per chunk: 5 chunks
    full_bias = None if bias is None else bias.expand(B, Hq, Lq, Lk)
    labels = mask.labels() if with_mask else (None,) * 6
    got = _attention_backward.attention_backward(grad_out, grad_lse, q, k, v, labels, full_bias, kv_lens,
                                                 out.detach(), lse.detach().float(), D**-0.5, with_bias)
    for name, a, e in zip(("dq", "dk", "dv", "dbias"), got, expected):  # no bias: stops after dv
        if name == "dbias":
            a = a.sum(dim=0, keepdim=True)  # the gradient of the [B, ...] broadcast of a [1, ...] bias
        torch.testing.assert_close(a.double(), e, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
