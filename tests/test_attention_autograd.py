"""Gradients of dlmfuse.attention (q, k, v, bias, and through lse) against autograd through the
float64 reference on float64 copies of the same inputs."""

import pytest
import torch

import dlmfuse
from dlmfuse import Mask

GRAD_RTOL = 1e-4


def leaves(*tensors, dtype=torch.float32):
    return [t.detach().to(dtype).requires_grad_(True) for t in tensors]


def make(batch, q_len, k_len, q_heads, kv_heads, head_dim=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, q_len, q_heads, head_dim, generator=g),
            torch.randn(batch, k_len, kv_heads, head_dim, generator=g),
            torch.randn(batch, k_len, kv_heads, head_dim, generator=g))


def assert_grad_close(actual, expected, name, rtol=GRAD_RTOL):
    assert actual is not None, f"{name}: no gradient"
    assert actual.shape == expected.shape, f"{name}: shape {list(actual.shape)} != {list(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite gradient"
    scale = max(float(expected.abs().max()), 1e-12)
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=rtol * scale,
                               msg=lambda m: f"{name}: {m}")


def loss_of(out, lse, weights_out, weights_lse):
    """A generic scalar: random projections of out and of the finite part of lse."""
    loss = (out.double() * weights_out).sum()
    if weights_lse is not None:
        finite = torch.isfinite(lse)
        loss = loss + (torch.where(finite, lse.double(), 0.0) * weights_lse).sum()
    return loss


def compare_grads(q, k, v, *, bias=None, through_lse=False, rtol=GRAD_RTOL, dtype=torch.float32, **kwargs):
    """Backward of dlmfuse.attention (inputs in `dtype`) vs the float64 reference; returns the
    kernel's grads {name: grad}."""
    names = ["q", "k", "v"] + (["bias"] if bias is not None else [])
    tensors = [q, k, v] + ([bias] if bias is not None else [])
    mine = leaves(*tensors, dtype=dtype)
    ref = leaves(*tensors, dtype=torch.float64)
    g = torch.Generator().manual_seed(123)
    weights_out = torch.randn(q.shape, generator=g, dtype=torch.float64)
    lse_shape = (q.shape[0], q.shape[2], q.shape[1])
    weights_lse = torch.randn(lse_shape, generator=g, dtype=torch.float64) if through_lse else None

    def run(fn, ts, **extra):
        qq, kk, vv = ts[:3]
        b = ts[3] if bias is not None else None
        out, lse = fn(qq, kk, vv, bias=b, return_lse=True, **kwargs, **extra)
        loss_of(out, lse, weights_out, weights_lse).backward()

    run(dlmfuse.attention, mine)
    run(dlmfuse.reference.attention, ref, compute_dtype=torch.float64)
    grads = {}
    for name, a, r in zip(names, mine, ref):
        assert a.grad is not None and a.grad.dtype == dtype, f"{name}: grad {a.grad}"
        assert_grad_close(a.grad, r.grad, f"d{name}", rtol=rtol)
        grads[name] = a.grad
    return grads


@pytest.mark.parametrize("q_heads, kv_heads", [(2, 2), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_grads_dense(q_heads, kv_heads, head_dim):
    q, k, v = make(2, 13, 29, q_heads, kv_heads, head_dim)
    compare_grads(q, k, v)


def test_grads_block_causal_through_lse():
    q, k, v = make(2, 37, 37, 4, 2)
    compare_grads(q, k, v, mask=Mask.block_causal(37, 8, prefix_len=5), through_lse=True)


def test_grads_custom_scale_and_per_batch_labels():
    q, k, v = make(2, 20, 20, 2, 1)
    m1, m2 = Mask.causal(20), Mask.block_diagonal(20, 6)
    mask = Mask(*(torch.cat([getattr(m1, n), getattr(m2, n)]) for n in ("q_order", "q_group", "k_order", "k_group")))
    compare_grads(q, k, v, mask=mask, scale=0.3, through_lse=True)


def test_grads_sparse_queries_clean_and_self():
    B, L, H = 2, 41, 4
    g = torch.Generator().manual_seed(1)
    is_clean = torch.rand(B, L, generator=g) < 0.5
    index = torch.stack([torch.randperm(L, generator=g)[:9] for _ in range(B)])
    mask = Mask.clean_and_self(is_clean).gather_queries(index)
    q, k, v = make(B, 9, L, H, 2, seed=2)
    compare_grads(q, k, v, mask=mask, through_lse=True)


@pytest.mark.parametrize("bias_shape", [(4, 1, 23), (2, 4, 11, 23), (23,)], ids=["Hq1Lk", "full", "Lk"])
def test_grads_bias(bias_shape):
    q, k, v = make(2, 11, 23, 4, 2)
    bias = torch.randn(bias_shape, generator=torch.Generator().manual_seed(5))
    grads = compare_grads(q, k, v, bias=bias, through_lse=True)
    assert grads["bias"].shape == bias.shape


def test_grads_bias_with_neg_inf_entries():
    q, k, v = make(1, 9, 16, 2, 2)
    bias = torch.randn(1, 2, 9, 16, generator=torch.Generator().manual_seed(6))
    bias[..., :5] = float("-inf")
    bias[0, 0, 3] = float("-inf")  # a row hidden entirely
    grads = compare_grads(q, k, v, bias=bias)
    assert torch.equal(grads["bias"][..., :5], torch.zeros_like(grads["bias"][..., :5]))
    assert torch.equal(grads["q"][0, 3, 0], torch.zeros_like(grads["q"][0, 3, 0]))


def test_grads_kv_lens_with_empty_batch():
    B, Lq, Lk = 3, 10, 24
    q, k, v = make(B, Lq, Lk, 4, 2)
    kv_lens = torch.tensor([24, 0, 9], dtype=torch.int32)
    grads = compare_grads(q, k, v, kv_lens=kv_lens, through_lse=True)
    zeros = lambda t: torch.equal(t, torch.zeros_like(t))  # noqa: E731
    assert zeros(grads["q"][1]), "a batch with kv_lens 0 has no gradient w.r.t. q"
    assert zeros(grads["k"][1]) and zeros(grads["v"][1])
    assert zeros(grads["k"][2, 9:]) and zeros(grads["v"][2, 9:]), "hidden keys get no gradient"


def test_grads_empty_rows_from_labels():
    B, Lq, Lk = 2, 12, 18
    q, k, v = make(B, Lq, Lk, 2, 2)
    q_group = torch.randint(0, 3, (B, Lq), dtype=torch.int32, generator=torch.Generator().manual_seed(3))
    q_group[:, ::4] = 77  # no key has group 77 and no key is earlier: empty rows
    k_group = torch.randint(0, 3, (B, Lk), dtype=torch.int32, generator=torch.Generator().manual_seed(4))
    mask = Mask(torch.zeros(B, Lq, dtype=torch.int32), q_group, torch.zeros(B, Lk, dtype=torch.int32), k_group)
    grads = compare_grads(q, k, v, mask=mask, through_lse=True)
    assert torch.equal(grads["q"][:, ::4], torch.zeros_like(grads["q"][:, ::4]))


def test_grad_only_for_some_inputs():
    q, k, v = make(1, 7, 9, 2, 2)
    v = v.requires_grad_(True)
    out = dlmfuse.attention(q, k, v)
    out.sum().backward()
    assert q.grad is None and k.grad is None
    v64 = v.detach().double().requires_grad_(True)
    dlmfuse.reference.attention(q.double(), k.double(), v64).sum().backward()
    assert_grad_close(v.grad, v64.grad, "dv")


def test_grads_flow_to_packed_qkv():
    B, L, H, D = 2, 15, 2, 64
    packed = torch.randn(B, L, 3, H, D, requires_grad=True)
    out = dlmfuse.attention(*packed.unbind(2), mask=Mask.causal(L))
    out.square().sum().backward()
    packed64 = packed.detach().double().requires_grad_(True)
    dlmfuse.reference.attention(*packed64.unbind(2), mask=Mask.causal(L)).square().sum().backward()
    assert_grad_close(packed.grad, packed64.grad, "dpacked")


def test_grads_bf16_inputs():
    q, k, v = make(1, 16, 40, 4, 2)
    q, k, v = (t.bfloat16().float() for t in (q, k, v))  # exactly representable in bf16
    # Gradients in bf16 are rounded once more; compare at bf16 resolution.
    mask = Mask.causal(40).gather_queries(torch.arange(24, 40))
    compare_grads(q, k, v, mask=mask, dtype=torch.bfloat16, rtol=2 ** -6)


def test_double_backward_is_not_silently_wrong():
    """The backward is not differentiable itself; asking for create_graph must not give garbage:
    either it works (matching the reference) or it raises."""
    q, k, v = leaves(*make(1, 5, 6, 2, 2))
    out = dlmfuse.attention(q, k, v)
    (dq,) = torch.autograd.grad(out.sum(), q, create_graph=True)
    try:
        (ddq,) = torch.autograd.grad(dq.square().sum(), q, allow_unused=True)
    except RuntimeError:
        return
    q64, k64, v64 = leaves(q, k, v, dtype=torch.float64)
    (dq64,) = torch.autograd.grad(dlmfuse.reference.attention(q64, k64, v64).sum(), q64, create_graph=True)
    (ddq64,) = torch.autograd.grad(dq64.square().sum(), q64)
    assert ddq is not None, "double backward returned no gradient instead of raising"
    assert_grad_close(ddq, ddq64, "ddq", rtol=1e-3)
