"""The family's Hopper kernel (plan mma=sm90 with tile_m=128: TMA loads, a producer warp and two
consumer warpgroups, attention_fwd_warp_specialized.cuh), forced through the override on an sm_90
GPU against the float64 reference. The family's matrix (test_attention_family.py, plan "sm90_128")
runs it under labels, documents, kv_lens and biases too; the planner's refusals are tested there on
every machine.

Shapes cover what its TMA bounds must get right: query and key lengths that are not multiples of
its 128-row / 128-key tiles (zeros past the end, the missing keys hidden), fewer keys than one
tile, many trips around the ring of K / V stages, GQA by head index and packed (where packing saves
CTAs), and q, k, v as strided views; split-KV (forced: its splits are unmeasured) with empty splits.
"""

from __future__ import annotations

import pytest
import torch

import dlmfuse
from dlmfuse import Mask, _C
from dlmfuse.attention import cuda_plan_override, last_cuda_plan

from conftest import check_attention, check_beyond_float32

PLAN = "mma=sm90,tile_m=128"
LOWP = [torch.bfloat16, torch.float16]


@pytest.fixture
def warp_specialized(monkeypatch):
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the warp-specialized kernel needs an sm_90 GPU")
    monkeypatch.setenv("DLMFUSE_CUDA_KERNELS", "1")
    with cuda_plan_override(PLAN):
        yield


def _inputs(B, Lq, Lk, Hq, Hkv, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Lq, Hq, D, generator=g)
    k, v = (torch.randn(B, Lk, Hkv, D, generator=g) for _ in range(2))
    return tuple(t.to("cuda", dtype) for t in (q, k, v))


def _plan_that_runs(q, k, splits=1, bias=None) -> str:
    """The kernel packs GQA groups that divide 64 where packing saves CTAs (and no bias comes)."""
    (_, q_len, q_heads, _), kv_heads = q.shape, k.shape[2]
    packs = (bias is None and q_heads > kv_heads and 64 % (q_heads // kv_heads) == 0
             and _C.attention_packs_gqa(q_heads, kv_heads, q_len, 128))
    return f"{PLAN},walk=tiles,splits={splits},pack_gqa={int(packs)}"


def _run(q, k, v, **kwargs):
    out, lse = dlmfuse.attention(q, k, v, return_lse=True, **kwargs)
    torch.cuda.synchronize()
    assert last_cuda_plan() == _plan_that_runs(q, k, bias=kwargs.get("bias"))
    check_attention(out, q, k, v, lse=lse, **kwargs)
    return out, lse


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", LOWP, ids=["bf16", "fp16"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("shape", [
    (1, 1, 1, 1, 1),          # one query, one key: a tile of zeros but one row and one key
    (2, 200, 200, 4, 2),      # ragged query and key tiles, GQA 2
    (1, 128, 1500, 2, 2),     # 12 key tiles: several trips around the 2-3 stage ring
    (1, 300, 77, 8, 1),       # fewer keys than one tile, GQA 8
    (3, 1024, 640, 2, 2),     # whole tiles only
], ids=["one", "ragged_gqa2", "ring", "short_keys_gqa8", "whole_tiles"])
def test_dense_matches_the_reference(warp_specialized, dtype, head_dim, shape):
    B, Lq, Lk, Hq, Hkv = shape
    q, k, v = _inputs(B, Lq, Lk, Hq, Hkv, head_dim, dtype)
    _run(q, k, v)
    _run(q, k, v, scale=0.3)


@pytest.mark.cuda
@pytest.mark.parametrize("head_dim", [64, 128])
def test_strided_views_and_a_second_run_give_the_same_bits(warp_specialized, head_dim):
    """q, k, v as views of one packed [B, L, 3, H, D] projection (row stride 3 H D) and k / v as a
    [B, H, L, D] tensor transposed: the tensor maps take the strides as they are."""
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(2, 333, 3, 4, head_dim, generator=g).to("cuda", torch.bfloat16)
    q, k, v = qkv.unbind(2)
    assert not q.is_contiguous()
    out, _ = _run(q, k, v)
    again, _ = _run(q, k, v)
    assert torch.equal(out, again)
    k_heads_first = k.transpose(1, 2).contiguous().transpose(1, 2)
    assert k_heads_first.stride(1) == head_dim
    torch.testing.assert_close(_run(q, k_heads_first, v)[0], out, rtol=0, atol=0)


@pytest.mark.cuda
def test_no_keys_give_empty_rows(warp_specialized):
    q, k, v = _inputs(2, 70, 0, 2, 1, 128, torch.bfloat16)
    out, lse = _run(q, k, v)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()


@pytest.mark.cuda
@pytest.mark.parametrize("head_dim", [64, 128])
def test_keys_past_kv_lens_are_never_used(warp_specialized, head_dim):
    """Keys that kv_lens hides but memory holds come with the last tile: NaN there must not reach the
    output (their scores are hidden, their V rows zeroed before the P V product). Lengths on and off
    the 128-key tiles, and an empty row."""
    q, k, v = _inputs(4, 200, 384, 2, 2, head_dim, torch.bfloat16, seed=2)
    kv_lens = torch.tensor([150, 256, 0, 1], dtype=torch.int32, device="cuda")
    poisoned_k, poisoned_v = k.clone(), v.clone()
    for b, n in enumerate(kv_lens.tolist()):
        poisoned_k[b, n:], poisoned_v[b, n:] = float("nan"), float("nan")
    out, lse = dlmfuse.attention(q, poisoned_k, poisoned_v, kv_lens=kv_lens, return_lse=True)
    torch.cuda.synchronize()
    assert last_cuda_plan() == _plan_that_runs(q, k)
    check_attention(out, q, k, v, lse=lse, kv_lens=kv_lens)
    masked = Mask.block_causal(384, 32).gather_queries(torch.arange(184, 384)).to("cuda")
    out, lse = dlmfuse.attention(q, poisoned_k, poisoned_v, mask=masked, kv_lens=kv_lens, return_lse=True)
    check_attention(out, q, k, v, lse=lse, mask=masked, kv_lens=kv_lens)


@pytest.mark.cuda
def test_causal_long_rows_skip_tiles(warp_specialized):
    """A causal mask over 2000 keys: the producer skips the tiles past each query tile's last row
    (NaN there must not be read) and the diagonal tiles are PARTIAL."""
    q, k, v = _inputs(1, 2000, 2000, 2, 1, 128, torch.float16, seed=3)
    mask = Mask.causal(2000).to("cuda")
    _run(q, k, v, mask=mask)
    rows = slice(0, 640)  # query tiles 0-4 see keys 0-639 only
    poisoned_k, poisoned_v = k.clone(), v.clone()
    poisoned_k[:, 640:], poisoned_v[:, 640:] = float("nan"), float("nan")
    out = dlmfuse.attention(q, poisoned_k, poisoned_v, mask=mask)
    assert torch.isfinite(out[:, rows]).all()


@pytest.mark.cuda
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("bias_dtype", [torch.bfloat16, torch.float32], ids=["bf16_bias", "fp32_bias"])
def test_bias_broadcasts_and_strides(warp_specialized, head_dim, bias_dtype):
    """A bias of the instance that reads it (A3's [1, H, L, L], broadcasts over batch and rows, a
    transposed view) on ragged tiles, with a causal mask on top."""
    q, k, v = _inputs(2, 200, 300, 4, 2, head_dim, torch.bfloat16, seed=4)
    g = torch.Generator().manual_seed(5)
    for shape in [(1, 4, 200, 300), (2, 1, 1, 300)]:
        _run(q, k, v, bias=torch.randn(shape, generator=g).to("cuda", bias_dtype))
    transposed = torch.randn(1, 4, 300, 200, generator=g).to("cuda", bias_dtype).transpose(2, 3)
    _run(q, k, v, bias=transposed)
    causal = Mask.causal(300).gather_queries(torch.arange(100, 300)).to("cuda")
    _run(q, k, v, bias=torch.randn(1, 4, 200, 300, generator=g).to("cuda", bias_dtype), mask=causal)


@pytest.mark.cuda
@pytest.mark.parametrize("splits", [2, 5, 16])
def test_split_kv_partials_merge_to_the_reference(monkeypatch, splits):
    """Split-KV: each split walks its own run of 128-key tiles (12 tiles here, so 16 splits leave
    some empty) and the merge combines the partials. kv_lens ends inside a split's last tile (NaN
    beyond it), a causal mask leaves the later splits nothing to see for the first rows, a bias, and
    a score beyond float32 in a later split (its partial breaks; the float64 rescue mends the row)."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the warp-specialized kernel needs an sm_90 GPU")
    monkeypatch.setenv("DLMFUSE_CUDA_KERNELS", "1")
    q, k, v = _inputs(2, 300, 1500, 4, 2, 128, torch.bfloat16, seed=6)
    kv_lens = torch.tensor([1500, 700], dtype=torch.int32, device="cuda")
    poisoned_k, poisoned_v = k.clone(), v.clone()
    poisoned_k[1, 700:], poisoned_v[1, 700:] = float("nan"), float("nan")
    causal = Mask.causal(1500).gather_queries(torch.arange(1200, 1500)).to("cuda")
    bias = torch.randn(1, 4, 300, 1500, generator=torch.Generator().manual_seed(7)).to("cuda", torch.bfloat16)
    with cuda_plan_override(f"{PLAN},splits={splits}"):
        for keys, kwargs in (((poisoned_k, poisoned_v), dict(kv_lens=kv_lens)),
                             ((poisoned_k, poisoned_v), dict(kv_lens=kv_lens, mask=causal)),
                             ((k, v), dict(bias=bias))):
            out, lse = dlmfuse.attention(q, *keys, return_lse=True, **kwargs)
            torch.cuda.synchronize()
            assert last_cuda_plan() == _plan_that_runs(q, k, splits, kwargs.get("bias"))
            check_attention(out, q, k, v, lse=lse, **kwargs)
        # A score beyond float32 in a later split: that split's partial breaks (NaN lse), the merge
        # passes the NaN on, and the rescue recomputes the row in float64.
        q_over, k_over = q.clone(), k.clone()
        q_over[0, 5, 0, 0], k_over[0, 1000, 0, 0] = 1e20, 1e20
        out, lse = dlmfuse.attention(q_over, k_over, v, return_lse=True)
        check_beyond_float32(out, lse, q_over, k_over, v)
        assert torch.isposinf(lse[0, 0, 5]) and torch.equal(out[0, 5, 0], v[0, 1000, 0])


@pytest.mark.cuda
def test_expanded_keys_are_refused_by_name(warp_specialized):
    """K and V expanded over the batch (one prompt's cache shared by every sample): stride 0, which
    TMA maps do not document, so the forced plan is a ValueError naming it; unforced, another plan
    runs the call."""
    q, k, v = _inputs(3, 130, 200, 4, 2, 64, torch.bfloat16, seed=9)
    k, v = k[:1].expand(3, -1, -1, -1), v[:1].expand(3, -1, -1, -1)
    with pytest.raises(ValueError, match="stride-0"):
        dlmfuse.attention(q, k, v)
    with cuda_plan_override(""):
        out, lse = dlmfuse.attention(q, k, v, return_lse=True)
    check_attention(out, q, k, v, lse=lse)
