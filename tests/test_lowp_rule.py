"""The bf16 / fp16 tolerance rule (conftest.lowp_attention_bound) separates fp32 accumulation from
low-precision accumulation: a flash-attention simulation that keeps its running output in fp32
meets it on every shape, the same simulation with the running output rounded to bf16 / fp16 after
each key tile fails it, and so does a kernel whose P V product runs on unrounded P but whose
output is rounded twice."""

import pytest
import torch

import dlmfuse

from conftest import lowp_attention_bound

TILE = 64
SHAPES = [(1, 17, 97, 2, 64), (2, 64, 130, 2, 64), (1, 33, 1025, 1, 128), (1, 8, 513, 4, 32)]  # B, Lq, Lk, H, D


def _inputs(shape, dtype, seed=0):
    B, Lq, Lk, H, D = shape
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, L, H, D, generator=g).to(dtype) for L in (Lq, Lk, Lk)]


def flash_simulation(q, k, v, accumulate_in: torch.dtype):
    """Online softmax over key tiles with fp32 scores and P; the running output is kept in
    `accumulate_in` between tiles (float32: what the kernels do)."""
    scale = q.shape[-1] ** -0.5
    qf, kf, vf = (t.float().transpose(1, 2) for t in (q, k, v))  # [B, H, L, D]
    row_max = torch.full(qf.shape[:-1] + (1,), float("-inf"))
    row_sum = torch.zeros_like(row_max)
    o = torch.zeros_like(qf).to(accumulate_in)
    for k0 in range(0, kf.shape[2], TILE):
        s = torch.matmul(qf, kf[:, :, k0:k0 + TILE].transpose(-1, -2)) * scale
        new_max = torch.maximum(row_max, s.amax(-1, keepdim=True))
        alpha, p = torch.exp(row_max - new_max), torch.exp(s - new_max)
        row_sum = row_sum * alpha + p.sum(-1, keepdim=True)
        o = (o.float() * alpha + torch.matmul(p, vf[:, :, k0:k0 + TILE])).to(accumulate_in)
        row_max = new_max
    return (o.float() / row_sum).to(q.dtype).transpose(1, 2)


def violations(out, q, k, v) -> int:
    ref = dlmfuse.reference.attention(q, k, v, out_dtype=torch.float64)
    bound = lowp_attention_bound(q, k, v, ref, rounded_p=False)
    return int(((out.double() - ref).abs() > bound).sum())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_fp32_accumulation_meets_the_rule_and_low_precision_accumulation_fails_it(dtype):
    failed_shapes = 0
    for shape in SHAPES:
        q, k, v = _inputs(shape, dtype)
        assert violations(flash_simulation(q, k, v, torch.float32), q, k, v) == 0, shape
        assert violations(dlmfuse.attention(q, k, v), q, k, v) == 0, shape
        failed_shapes += violations(flash_simulation(q, k, v, dtype), q, k, v) > 0
    # Every shape with two or more key tiles rounds the running output more than once.
    assert failed_shapes == len(SHAPES), f"low-precision accumulation passed {len(SHAPES) - failed_shapes} shapes"


def test_a_second_output_rounding_fails_the_rule():
    """Rounding o32 to bf16 and again after a rescale (e.g. an epilogue through a bf16 buffer) is a
    second rounding the rule does not allow."""
    q, k, v = _inputs(SHAPES[1], torch.bfloat16)
    once = flash_simulation(q, k, v, torch.float32)
    twice = ((once.float() * 1.1).to(torch.bfloat16).float() / 1.1).to(torch.bfloat16)
    assert violations(once, q, k, v) == 0 and violations(twice, q, k, v) > 0
