"""Property-based fuzzing of the gradients of attention and merge_attention with hypothesis: the
cases of tests/test_fuzz_attention.py (its strategies and builders; fuzz_support.py's budget, so
DLMFUSE_FUZZ_EXAMPLES / DLMFUSE_FUZZ_SEED apply here too), valid ones only, and their gradients
against autograd through the float64 reference, on both CPU backwards (the fused C++ kernel and
the PyTorch composite)."""

from __future__ import annotations

import math
import os
from unittest import mock

import torch
from hypothesis import assume, given, strategies as st

import dlmfuse

from test_attention_backward import GRAD_RTOL
from fuzz_support import assert_untouched, fuzz, generator, no_hang, randn, snapshot, with_layout
from test_fuzz_attention import (assert_nan_at_same_places, attention_cases, build_attention, merge_cases, random_lse,
                                 realized_mask)

# Backwards (DLMFUSE_BACKEND): the fused C++ kernel (native) and the PyTorch composite (reference).
GRADIENT_BACKENDS = ("native", "reference")


@st.composite
def gradient_cases(draw):
    """A valid attention case (every shape, layout, mask, bias broadcast and kv_lens of
    attention_cases) with scores of ordinary size, and the backward to run."""
    case = draw(attention_cases())
    case.update(defect=None, scale=draw(st.none() | st.floats(-2, 2)), backend=draw(st.sampled_from(GRADIENT_BACKENDS)))
    return case


def attention_gradients(fn, tensors, grad_out, grad_lse, kwargs):
    """(d(q, k, v[, bias]) of <out, grad_out> + <finite lse, grad_lse>, out); the leaves keep the
    drawn strides (a stride-0 dim included), so the backward sees the layouts the forward did."""
    leaves = [t.detach().requires_grad_(True) for t in tensors]
    call_kwargs = dict(kwargs, bias=leaves[3] if len(leaves) > 3 else None, return_lse=True)
    out, lse = fn(*leaves[:3], **call_kwargs)
    lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    torch.autograd.backward((out, lse), (grad_out.to(out.dtype), grad_lse.to(lse.dtype)))
    return [torch.zeros_like(leaf) if leaf.grad is None else leaf.grad for leaf in leaves], out.detach()


@fuzz(600)
@given(case=gradient_cases())
def test_attention_gradients(case):
    """Gradients equal autograd through the float64 reference. The backward takes delta =
    rowsum(dO * O) from the output the forward returned (rounded to q's dtype, as FlashAttention's
    does); delta enters dS exactly as -grad_lse does, so the reference runs with grad_lse shifted by
    rowsum(dO * (O - O_float64)) and only the backward's own arithmetic is compared."""
    (q, k, v), kwargs, problems = build_attention(case)
    assume(not problems)  # a choice the contract leaves open (labels of batch 0 beside batch 1)
    kwargs = {name: kwargs[name] for name in ("mask", "bias", "kv_lens", "scale") if name in kwargs}
    kwargs["mask"] = realized_mask(kwargs.get("mask"))
    if kwargs.get("kv_lens") is not None:
        kwargs["kv_lens"] = kwargs["kv_lens"].to(torch.int64)
        for t in (k, v):  # keys past kv_lens are never read: NaN there must reach no gradient
            if 0 not in t.stride()[:2]:  # (rows of a stride-0 layout are shared with read ones)
                for b, n in enumerate(kwargs["kv_lens"].tolist()):
                    t[b, n:] = math.nan
    bias = kwargs.pop("bias", None)
    tensors = [q, k, v] + ([bias] if bias is not None else [])
    gen = generator(case["seed"] + 1)
    B, Lq, Hq, D = q.shape
    grad_out = randn((B, Lq, Hq, D), gen, q.dtype).double()
    grad_lse = randn((B, Hq, Lq), gen, torch.float64)
    inputs = snapshot(tensors)
    with no_hang(), mock.patch.dict(os.environ, {"DLMFUSE_BACKEND": case["backend"]}):
        got, out = attention_gradients(dlmfuse.attention, tensors, grad_out, grad_lse, kwargs)
    assert_untouched(inputs)
    tensors64 = [t.double() for t in tensors]
    ref_out = dlmfuse.reference.attention(*tensors64[:3], bias=bias if bias is None else tensors64[3],
                                          out_dtype=torch.float64, **kwargs)
    rounding = (grad_out * (out.double() - ref_out)).sum(-1).transpose(1, 2)  # [B, Hq, Lq]
    expected, _ = attention_gradients(dlmfuse.reference.attention, tensors64, grad_out, grad_lse - rounding,
                                      dict(kwargs, compute_dtype=torch.float64))
    for name, a, e, like in zip(("dq", "dk", "dv", "dbias"), got, expected, tensors):
        assert a.dtype == like.dtype and a.shape == like.shape, (name, a.dtype, a.shape)
        assert torch.isfinite(a).all(), f"{name}: non-finite gradient"
        tol = max(GRAD_RTOL[q.dtype], GRAD_RTOL[like.dtype])  # computed in q's precision, stored in like's
        scale = max(float(e.abs().max()), 1e-12) if e.numel() else 1.0
        subnormal = torch.finfo(like.dtype).tiny * torch.finfo(like.dtype).eps  # fp16's spacing near 0: 6e-8
        torch.testing.assert_close(a.double(), e, rtol=tol, atol=tol * scale + subnormal, msg=lambda m: f"{name}: {m}")


# =================================================================================== merge_attention
def merge_gradient_rules(out_a, lse_a, out_b, lse_b, grad_out, grad_lse):
    """Expected gradients (d out_a, d lse_a, d out_b, d lse_b) in float64 from the merge's rules, and
    the bool [B, H, L] of the rows where autograd through the reference cannot give them: both lse
    -inf (no keys: 0), a NaN lse (NaN), a +inf lse (that side takes the row, or half of it beside
    another +inf), an output holding NaN (a side of weight 0 gets 0 whatever the row holds, where
    autograd multiplies NaN by the weight's zero gradient)."""
    inf = math.inf
    top = torch.maximum(lse_a, lse_b)
    top = torch.where(top == -inf, 0.0, top)
    weights = [torch.exp(part - top) for part in (lse_a, lse_b)]
    overflow = torch.isposinf(top)
    weights = [torch.where(overflow, (part == inf).double(), w) for part, w in zip((lse_a, lse_b), weights)]
    total = weights[0] + weights[1]
    w_a, w_b = (w / torch.where(total > 0, total, 1.0) for w in weights)
    rows = lambda t: t.transpose(1, 2)[..., None]  # noqa: E731 [B, H, L] -> [B, L, H, 1]
    part = lambda o, w: torch.where(rows(w) == 0, 0.0, rows(w) * o.double())  # noqa: E731
    out = part(out_a, w_a) + part(out_b, w_b)
    has_nan = lse_a.isnan() | lse_b.isnan()
    nan_out = (out_a.isnan() | out_b.isnan()).any(-1).transpose(1, 2)
    special = ((lse_a == -inf) & (lse_b == -inf)) | has_nan | overflow | nan_out
    expected = []
    for part_out, w in ((out_a, w_a), (out_b, w_b)):
        along_d = (grad_out * (part_out.double() - out)).sum(-1).transpose(1, 2)
        d_lse = torch.where(w == 0, 0.0, w * (grad_lse + along_d))
        expected += [rows(w) * grad_out, torch.where(has_nan, math.nan, d_lse)]
    return expected, special


@fuzz(600)
@given(case=merge_cases())
def test_merge_attention_gradients(case):
    """Gradients of both partials' out and lse: autograd through the float64 reference merge where
    calculus applies, the merge's rules where an lse is NaN or +inf or both are -inf."""
    c = case
    gen = generator(c["seed"])
    B, L, H, D, dtype = c["B"], c["L"], c["H"], c["D"], c["dtype"]
    outs = []
    for layout in c["out_layouts"]:
        values = randn((B, L, H, D), gen, dtype)
        if c["out_specials"] and values.numel():  # a NaN output: ignored where its weight is 0
            values.view(-1)[int(torch.randint(values.numel(), (), generator=gen))] = math.nan
        outs.append(with_layout(values, layout))
    lses = [with_layout(random_lse((B, H, L), kind, gen), layout)
            for kind, layout in zip(c["lse_kinds"], c["lse_layouts"])]
    grad_out = randn((B, L, H, D), gen, dtype).double()
    grad_lse = randn((B, H, L), gen).double()
    leaves = [t.detach().requires_grad_(True) for t in (outs[0], lses[0], outs[1], lses[1])]
    with no_hang():
        out, lse = dlmfuse.merge_attention(*leaves)
        torch.autograd.backward((out, lse), (grad_out.to(out.dtype), grad_lse.float()))
    exact = [t.detach().double().requires_grad_(True) for t in leaves]
    ref_out, ref_lse = dlmfuse.reference.merge_attention(*exact)
    torch.autograd.backward((ref_out, ref_lse), (grad_out, grad_lse.float()))
    ruled, special = merge_gradient_rules(*(t.detach() for t in exact), grad_out, grad_lse)
    # d lse reads the merged output, rounded to the dtype: sum_d g_out (out_a - out) moves by up to
    # one rounding of out per term.
    unit = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[dtype]
    out_slack = unit * (grad_out * ref_out.detach().double()).abs().nan_to_num(0.0).sum(-1).transpose(1, 2)
    for name, leaf, ref, rule in zip(("d out_a", "d lse_a", "d out_b", "d lse_b"), leaves, exact, ruled):
        assert leaf.grad is not None and leaf.grad.dtype == leaf.dtype, name
        is_lse = rule.dim() == 3
        rows = special if is_lse else special.transpose(1, 2)[..., None].expand(rule.shape)
        got, want = assert_nan_at_same_places(leaf.grad, torch.where(rows, rule, ref.grad), name)
        tol = {torch.float32: 1e-5, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}[dtype]
        bound = tol * (1 + want.abs()) + (out_slack if is_lse else 0.0)
        finite = want.isfinite()
        assert torch.equal(got[~finite], want[~finite]), f"{name}: infinities differ"
        worst = ((got - want).abs() - bound)[finite]
        assert not (worst > 0).any(), f"{name}: {int((worst > 0).sum())} elements beyond the bound, worst by {float(worst.max()):.3g}"
