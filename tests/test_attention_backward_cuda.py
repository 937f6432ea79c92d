"""The fused CUDA attention backward (csrc/cuda/attention/attention_bwd.cu; unverified until a GPU run,
so these tests enable it with DLMFUSE_CUDA_KERNELS=1) against autograd through the float64 reference.

bf16 / fp16 gradients round P and dS to the input dtype for their MMAs (as the forward rounds P),
so the bound is on the relative Frobenius error of each gradient, an order of magnitude below what
any indexing or masking mistake gives. A monkeypatched composite proves the fused kernel ran.
DLMFUSE_CUDA_KERNELS=1 also runs the forward through the planned family (unverified too): a
forward bug shows here as well, so read these failures after tests/test_attention_family.py's.
"""

import sys

import pytest
import torch

import dlmfuse
from dlmfuse import Mask

from test_attention_backward import gradients, random_inputs

pytestmark = pytest.mark.cuda

attention_module = sys.modules["dlmfuse.attention"]
REL_ERROR = {torch.bfloat16: 3e-2, torch.float16: 5e-3}


@pytest.fixture(autouse=True)
def fused_backward(monkeypatch):
    monkeypatch.setenv("DLMFUSE_CUDA_KERNELS", "1")

    def composite_called(*args, **kwargs):
        raise AssertionError("the PyTorch composite ran instead of the fused CUDA backward")

    monkeypatch.setattr(attention_module, "attention_backward", composite_called)


def check(tensors, dtype, mask=None, kv_lens=None, seed=0):
    B, Lq, Hq, D = tensors[0].shape
    g = torch.Generator().manual_seed(seed + 1)
    grad_out = torch.randn(B, Lq, Hq, D, generator=g, dtype=torch.float64)
    grad_lse = torch.randn(B, Hq, Lq, generator=g, dtype=torch.float64)
    rounded = [t.to(dtype).double() for t in tensors]
    expected = gradients(dlmfuse.reference.attention, rounded, torch.float64, grad_out.to(dtype).double(), grad_lse,
                         compute_dtype=torch.float64, mask=mask, kv_lens=kv_lens)
    cuda = lambda t: None if t is None else t.to("cuda")  # noqa: E731
    got = gradients(dlmfuse.attention, [t.cuda() for t in tensors], dtype, grad_out.cuda(), grad_lse.cuda(),
                    mask=cuda(mask), kv_lens=cuda(kv_lens))
    again = gradients(dlmfuse.attention, [t.cuda() for t in tensors], dtype, grad_out.cuda(), grad_lse.cuda(),
                      mask=cuda(mask), kv_lens=cuda(kv_lens))
    for name, a, b, e in zip(("dq", "dk", "dv", "dbias"), got, again, expected):
        assert a.dtype == dtype and a.shape == e.shape and torch.isfinite(a).all(), name
        assert torch.equal(a, b), f"{name}: two runs differ (the kernel has no atomics)"
        error = float((a.double().cpu() - e).norm() / max(float(e.norm()), 1e-30))
        assert error <= REL_ERROR[dtype], f"{name}: relative error {error:.2e}"


def labels_of(name, L):
    if name == "block_causal":
        return Mask.block_causal(L, 16, prefix_len=5)
    if name == "eso":
        g = torch.Generator().manual_seed(3)
        clean = torch.rand(1, L, generator=g) < 0.5
        rank = torch.randperm(L, generator=g)[None]
        return Mask.eso(rank, clean, "B")
    if name == "documents":
        docs = torch.repeat_interleave(torch.arange(3), torch.tensor([L // 2, 7, L - L // 2 - 7]))
        return Mask.block_causal(L, 8, documents=docs)
    return None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("mask", ["none", "block_causal", "eso", "documents"])
def test_gradients_match_the_reference(mask, head_dim, dtype):
    q, k, v, _, _ = random_inputs(2, 150, 150, 4, 2, head_dim, seed=1)
    check([q, k, v], dtype, mask=labels_of(mask, 150))


def test_bd3_training_mask_and_mqa():
    q, k, v, _, _ = random_inputs(1, 192, 192, 4, 1, 64, seed=2)
    check([q, k, v], torch.bfloat16, mask=Mask.bd3_train(96, 16))


@pytest.mark.parametrize("bias_shape", [(1, 4, 70, 130), (2, 1, 70, 130), (1, 1, 1, 130)])
def test_bias_gradients(bias_shape):
    q, k, v, _, _ = random_inputs(2, 70, 130, 4, 4, 64, seed=4)
    bias = torch.randn(bias_shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    check([q, k, v, bias], torch.bfloat16, mask=Mask.block_causal(130, 32).gather_queries(torch.arange(60, 130)))


def test_kv_lens_sparse_rows_and_empty_rows():
    q, k, v, _, _ = random_inputs(2, 40, 300, 8, 2, 128, seed=6)
    clean = torch.rand(1, 300, generator=torch.Generator().manual_seed(7)) < 0.4
    rows = torch.randperm(300, generator=torch.Generator().manual_seed(8))[:40]
    kv_lens = torch.tensor([0, 211], dtype=torch.int32)  # batch 0: every row empty, zero gradients
    check([q, k, v], torch.bfloat16, mask=Mask.clean_and_self(clean).gather_queries(rows), kv_lens=kv_lens)


def test_strided_qkv_views_and_per_batch_labels():
    """q, k, v as views of one packed [B, L, 3, H, D] CUDA buffer (row strides of 3 H D elements, as
    a fused QKV projection gives them) and labels of batch 2 (not broadcast)."""
    g = torch.Generator().manual_seed(9)
    qkv64 = torch.randn(2, 130, 3, 4, 64, generator=g, dtype=torch.float64)
    grad_out = torch.randn(2, 130, 4, 64, generator=g, dtype=torch.float64)
    order = torch.randint(0, 5, (2, 130), generator=g)
    group = torch.randint(0, 3, (2, 130), generator=g)
    mask = Mask(order, group, order, group)
    qkv = qkv64.to("cuda", torch.bfloat16).requires_grad_(True)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    assert q.stride(1) == 3 * 4 * 64 and not q.is_contiguous()
    out = dlmfuse.attention(q, k, v, mask=mask.to("cuda"))
    out.backward(grad_out.to("cuda", torch.bfloat16))
    ref = qkv64.to(torch.bfloat16).double().requires_grad_(True)
    expected = dlmfuse.reference.attention(ref[:, :, 0], ref[:, :, 1], ref[:, :, 2], mask=mask,
                                           compute_dtype=torch.float64)
    expected.backward(grad_out.to(torch.bfloat16).double())
    for i, name in enumerate(("dq", "dk", "dv")):
        got, want = qkv.grad[:, :, i].double().cpu(), ref.grad[:, :, i]
        error = float((got - want).norm() / want.norm())
        assert error <= REL_ERROR[torch.bfloat16], f"{name}: relative error {error:.2e}"


def test_reference_backend_overrides_the_fused_backward(monkeypatch):
    monkeypatch.setenv("DLMFUSE_BACKEND", "reference")
    q, k, v = (torch.randn(1, 64, 2, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    with pytest.raises(AssertionError, match="the PyTorch composite ran"):
        dlmfuse.attention(q, k, v).sum().backward()
