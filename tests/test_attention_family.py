"""The planned CUDA attention family: its planner (C++, tested here on every machine) and its kernels
(CUDA tests, run on a GPU with DLMFUSE_CUDA_KERNELS=1 while the family is unverified).

The planner tests pin the automatic choice per workload family (the same-run H200 measurements in
csrc/plan/attention_planner.cpp) and the override's rules: a forced field either runs or is a
ValueError naming why, never a silent substitute. The CUDA tests force every plan the planner can
choose through the override and compare with the float64 reference, documents included.
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch

import dlmfuse
from dlmfuse import Mask, _C, _cuda_attention
from dlmfuse.attention import cuda_attention_override, cuda_plan_override, last_cuda_plan

from conftest import check_attention, check_beyond_float32, cuda_graph_of, downward_overflow_inputs, overflow_inputs

H200 = dict(sm_count=132, cc_major=9, cc_minor=0, max_shared_bytes=232448)
A100 = dict(sm_count=108, cc_major=8, cc_minor=0, max_shared_bytes=166912)
L40 = dict(sm_count=142, cc_major=8, cc_minor=9, max_shared_bytes=101376)


def plan(batch=1, q_len=4096, k_len=4096, q_heads=32, kv_heads=32, head_dim=128, half=True, aligned=True,
         labels=False, bias=False, device=H200, forced="", broadcast=False, sm90a_code=True, bias_tma=True):
    return _C.plan_attention(batch, q_len, k_len, q_heads, kv_heads, head_dim, half, aligned, labels, bias,
                             device["sm_count"], device["cc_major"], device["cc_minor"],
                             _C.parse_attention_override(forced), device["max_shared_bytes"], broadcast, sm90a_code,
                             bias_tma)


def fields(p) -> tuple:
    return p.mma, p.tile_m, p.walk, p.splits, p.pack_gqa


# ------------------------------------------------------------------------------------- the override
@pytest.mark.parametrize("text", ["", "auto", "  auto ", "tile_m=128", "mma=sm80, walk=gather ,splits=3",
                                  "mma=simt", "pack_gqa=1,tile_m=64", "splits=16"])
def test_override_parses(text):
    assert _C.parse_attention_override(text).text == text


@pytest.mark.parametrize("text, message", [
    ("tile_m=96", 'tile_m must be one of 64, 128, got "96"'),
    ("mma=sm100", "mma must be one of simt, sm80, sm90"),
    ("walk=gathered", "walk must be one of tiles, gather"),
    ("splits=0", r"splits must be an integer in \[1, 16\]"),
    ("splits=17", r"splits must be an integer in \[1, 16\]"),
    ("splits=-1", "splits must be an integer"),
    ("splits=3x", "splits must be an integer"),
    ("pack_gqa=yes", "pack_gqa must be one of 0, 1"),
    ("tiles=64", 'unknown key "tiles"'),
    ("tile_m=64,tile_m=128", "tile_m is given twice"),
    ("next", "expected comma-separated key=value items"),
    ("tile_m=64,,splits=2", "expected comma-separated key=value items"),
])
def test_override_rejects_bad_text(text, message):
    with pytest.raises(ValueError, match=message) as info:
        _C.parse_attention_override(text)
    assert "DLMFUSE_CUDA_ATTENTION" in str(info.value)


def test_override_from_the_environment(monkeypatch):
    monkeypatch.setenv("DLMFUSE_CUDA_ATTENTION", "walk=gather,splits=2")
    assert cuda_attention_override() == "walk=gather,splits=2"
    monkeypatch.setenv("DLMFUSE_CUDA_ATTENTION", "double_buffer")  # a kernel name of the verified set
    with pytest.raises(ValueError, match="key=value overrides"):
        cuda_attention_override()
    monkeypatch.setenv("DLMFUSE_CUDA_ATTENTION", "splits=99")
    with pytest.raises(ValueError, match="splits must be an integer"):
        cuda_attention_override()


def test_override_context_manager_restores(monkeypatch):
    monkeypatch.setenv("DLMFUSE_CUDA_ATTENTION", "tile_m=64")
    with cuda_plan_override("mma=sm80,splits=2"):
        assert os.environ["DLMFUSE_CUDA_ATTENTION"] == "mma=sm80,splits=2"
    assert os.environ["DLMFUSE_CUDA_ATTENTION"] == "tile_m=64"
    monkeypatch.delenv("DLMFUSE_CUDA_ATTENTION")
    with pytest.raises(ValueError, match="unknown key"):
        with cuda_plan_override("rows=3"):
            pass
    assert "DLMFUSE_CUDA_ATTENTION" not in os.environ
    with cuda_plan_override("splits=4"):
        pass
    assert "DLMFUSE_CUDA_ATTENTION" not in os.environ


# ------------------------------------------------------------------------- automatic plans per family
def test_dense_long_rows_take_128_row_tiles_on_sm90_and_64_elsewhere():  # A1
    assert fields(plan()) == ("sm80", 128, "tiles", 1, False)
    assert fields(plan(q_len=2048, k_len=2048)) == ("sm80", 128, "tiles", 1, False)
    assert fields(plan(device=A100)) == ("sm80", 64, "tiles", 1, False)


def test_block_causal_walks_whole_tiles():  # A2: as many queries as keys, labels
    assert fields(plan(labels=True)) == ("sm80", 128, "tiles", 1, False)


def test_bias_takes_wgmma_on_sm90_and_never_packs():  # A3
    assert fields(plan(bias=True)) == ("sm90", 64, "tiles", 1, False)
    assert fields(plan(bias=True, device=A100)) == ("sm80", 64, "tiles", 1, False)
    assert not plan(bias=True, q_len=16, kv_heads=8).pack_gqa


@pytest.mark.parametrize("n, mma", [(32, "sm80"), (128, "sm90"), (512, "sm90")])
def test_mask_only_steps_gather_keys(n, mma):  # A4: n sparse query rows against 4096 keys
    p = plan(q_len=n, labels=True)
    assert (p.mma, p.tile_m, p.walk) == (mma, 64, "gather")
    assert (plan(q_len=n, labels=True, device=A100).mma, plan(q_len=n, labels=True, device=A100).walk) == ("sm80", "gather")
    assert plan(q_len=2049, labels=True).walk == "tiles"  # more than half as many queries as keys


def test_grouped_heads_pack_when_it_saves_ctas():  # A4g: GQA with few query rows
    p = plan(q_len=16, q_heads=32, kv_heads=8, labels=True)
    assert p.pack_gqa and p.tile_m == 64
    assert p.pack_gqa == _C.attention_packs_gqa(32, 8, 16, 64)
    assert not plan(q_len=4096, q_heads=32, kv_heads=8).pack_gqa  # long rows: as many CTAs either way


def test_grouped_heads_stay_unpacked_where_the_packed_grid_would_not_fit():
    # 2,100,001 rows x 4 heads per KV head: packing would save 2 CTAs of 262,504, but its 131,251
    # query tiles pass CUDA's 65,535 cap on the grid's y axis; unpacked, the tensor cores still run it.
    assert _C.attention_packs_gqa(8, 2, 2_100_001, 64)
    assert fields(plan(q_len=2_100_001, k_len=64, q_heads=8, kv_heads=2, device=A100)) == ("sm80", 64, "tiles", 1, False)


def test_split_kv_for_few_ctas():
    p = plan(q_len=64, k_len=16384, q_heads=8, kv_heads=8)
    assert p.splits == _C.attention_num_splits(1, 8, 64, 16384, 128, 132, 64, 0) and 1 < p.splits <= 16
    assert plan().splits == 1  # 1024 CTAs already fill the GPU


@pytest.mark.parametrize("call", [dict(half=False), dict(head_dim=96), dict(aligned=False), dict(head_dim=32, half=False)])
def test_calls_tensor_cores_cannot_take_run_on_cuda_cores(call):
    assert fields(plan(**call)) == ("simt", 64, "tiles", 1, False)


def test_grid_beyond_cuda_limits_falls_back_or_is_refused():
    too_many_heads = dict(batch=1, q_len=64, k_len=64, q_heads=70000, kv_heads=70000)
    assert plan(**too_many_heads).mma == "simt"
    with pytest.raises(ValueError, match="grid would exceed"):
        plan(**too_many_heads, forced="mma=sm80")


# ---------------------------------------------------------------------------------- forced plans
@pytest.mark.parametrize("forced, call, message", [
    ("walk=gather", dict(), "walk=gather needs labels and no bias; this call has no labels"),
    ("walk=gather", dict(labels=True, bias=True), "this call has a bias"),
    ("mma=sm90", dict(device=A100), "mma=sm90 needs an sm_90 GPU"),
    ("mma=sm80", dict(half=False), "needs bf16 / fp16"),
    ("mma=sm80", dict(aligned=False), "unaligned rows"),
    ("pack_gqa=1", dict(q_heads=8, kv_heads=8), "pack_gqa=1 needs no bias and grouped heads"),
    ("pack_gqa=1", dict(q_heads=32, kv_heads=8, bias=True), "pack_gqa=1 needs no bias"),
    ("tile_m=128,walk=gather", dict(labels=True), "tile_m=128 runs with walk=tiles and pack_gqa=0 only"),
    ("tile_m=128,pack_gqa=1", dict(q_heads=32, kv_heads=8), "tile_m=128 runs with walk=tiles and pack_gqa=0 only"),
    ("tile_m=128,mma=sm90", dict(device=A100), "mma=sm90 needs an sm_90 GPU"),
    ("tile_m=128,mma=sm90,walk=gather", dict(), "walk=gather needs labels and no bias; this call has no labels"),
    ("tile_m=128,mma=sm90,walk=gather", dict(labels=True, bias=True), "walk=gather needs labels and no bias; this call "
                                                                      "has a bias"),
    ("tile_m=128,mma=sm90,pack_gqa=1", dict(q_heads=24, kv_heads=8), "q_heads / kv_heads dividing 64 .* q_heads 24"),
    ("tile_m=128,mma=sm90,pack_gqa=1", dict(q_heads=32, kv_heads=8, bias=True), "needs no bias .* this call has a bias"),
    ("tile_m=128,mma=sm90,pack_gqa=1", dict(q_heads=8, kv_heads=8), "dividing 64 .* q_heads 8, kv_heads 8"),
    ("tile_m=128,mma=sm90", dict(k_len=2**31), "or k_len 2\\^31 keys"),
    ("tile_m=128,mma=sm90", dict(half=False), "needs bf16 / fp16"),
    ("tile_m=128,mma=sm90", dict(aligned=False), "unaligned rows"),
    ("mma=simt,splits=2", dict(), "mma=simt has its own tiles"),
    ("mma=simt,tile_m=128", dict(), "mma=simt has its own tiles"),
    ("splits=2", dict(half=False), "mma=simt has its own tiles"),
])
def test_forced_fields_the_call_cannot_take_are_refused(forced, call, message):
    with pytest.raises(ValueError, match=message) as info:
        plan(forced=forced, **call)
    assert f'DLMFUSE_CUDA_ATTENTION="{forced}" cannot run this call' in str(info.value)


def test_128_row_tiles_must_fit_the_gpus_shared_memory():
    """At head_dim 128 a 128-row CTA needs ~100 KB of shared memory: more than the 99 KB of an L40 or
    an RTX card (sm_86 / sm_89), so forcing it there is refused; head_dim 64 fits."""
    with pytest.raises(ValueError, match="needs .* bytes of shared memory per block, this GPU has 101376"):
        plan(device=L40, forced="tile_m=128")
    assert plan(device=L40, forced="tile_m=128", head_dim=64).tile_m == 128
    assert plan(device=A100, forced="tile_m=128").tile_m == 128
    assert fields(plan(device=L40))[:3] == ("sm80", 64, "tiles")


def test_the_warp_specialized_kernel_is_forced_only():
    """mma=sm90 with tile_m=128 is the TMA / warp-specialized kernel: never an automatic plan (it has
    not run on a GPU), one split unless forced (its splits are unmeasured), labels, documents,
    kv_lens, a bias and any GQA grouping (packed where that saves CTAs), the gathered walk where the
    64-row plans would gather, and its own shared-memory need (Q, 3 stages of K / V at head_dim 64,
    2 at 128, and the stages' key labels)."""
    for call in (dict(), dict(q_len=1, k_len=1), dict(q_len=300, k_len=77, q_heads=24, kv_heads=8, head_dim=64),
                 dict(batch=3, q_len=65535 * 128, k_len=64), dict(labels=True),
                 dict(q_len=2049, labels=True), dict(bias=True), dict(bias=True, labels=True, head_dim=64)):
        assert fields(plan(forced="mma=sm90,tile_m=128", **call)) == ("sm90", 128, "tiles", 1, False), call
    assert _C.attention_fwd_tma_bytes(64) == (128 + 2 * 3 * 128) * 64 * 2 + 1024
    assert _C.attention_fwd_tma_bytes(128) == (128 + 2 * 2 * 128) * 128 * 2 + 1024
    # A bias that a TMA map can load adds its ring of [128][128] 16-bit tiles: 3 stages at 64, 1 at 128.
    assert _C.attention_fwd_tma_bytes(64, bias=True) == _C.attention_fwd_tma_bytes(64) + 3 * 128 * 128 * 2
    assert _C.attention_fwd_tma_bytes(128, bias=True) == _C.attention_fwd_tma_bytes(128) + 128 * 128 * 2
    for head_dim in (64, 128):  # both fit an H100 / H200 (227 KB), with the static part
        assert _C.attention_fwd_tma_bytes(head_dim, bias=True) + 5120 <= H200["max_shared_bytes"]
    no_room = dict(H200, max_shared_bytes=_C.attention_fwd_tma_bytes(128) + 4096)
    with pytest.raises(ValueError, match="needs 2[0-9]{5} bytes"):
        plan(device=no_room, bias=True, forced="mma=sm90,tile_m=128")
    # A bias read row by row (fp32, unaligned rows) needs no ring.
    assert plan(device=no_room, bias=True, bias_tma=False, forced="mma=sm90,tile_m=128").tile_m == 128
    small = dict(H200, max_shared_bytes=_C.attention_fwd_tma_bytes(128))
    with pytest.raises(ValueError, match="tile_m=128 at head_dim 128 needs 16[0-9]{4} bytes"):
        plan(device=small, forced="mma=sm90,tile_m=128")
    assert plan(device=small, forced="mma=sm90,tile_m=128", head_dim=64).tile_m == 128
    with pytest.raises(ValueError, match="the grid would exceed"):
        plan(q_len=65536 * 128, forced="mma=sm90,tile_m=128")
    assert fields(plan(q_len=64, q_heads=1, kv_heads=1, forced="mma=sm90,tile_m=128,splits=16")) == (
        "sm90", 128, "tiles", 16, False)
    with pytest.raises(ValueError, match="the grid would exceed .* splits 16"):
        plan(batch=4096, forced="mma=sm90,tile_m=128,splits=16")
    for call in itertools.product((1, 64, 300, 4096), (64, 4096), (8, 32), (8, 2), (64, 128), (False, True),
                                  (False, True)):
        p = plan(**dict(zip(("q_len", "k_len", "q_heads", "kv_heads", "head_dim", "labels", "bias"), call)))
        assert (p.mma, p.tile_m) != ("sm90", 128), call


def test_the_warp_specialized_kernel_packs_gqa_groups_that_divide_its_tma_boxes():
    """Packed rows of one KV head come in as TMA boxes of 64 / G queries x G heads: groups of 2-64
    heads that divide 64 pack where that saves CTAs (as the 64-row kernels decide it, at 128 rows),
    others run by head index; forcing pack_gqa=1 on them is refused by name."""
    ws = "mma=sm90,tile_m=128"
    assert fields(plan(q_len=300, k_len=77, q_heads=32, kv_heads=8, forced=ws)) == ("sm90", 128, "tiles", 1, True)
    assert _C.attention_packs_gqa(32, 8, 300, 128)
    assert not plan(q_len=4096, q_heads=32, kv_heads=8, forced=ws).pack_gqa  # as many CTAs either way
    assert plan(q_len=4096, q_heads=32, kv_heads=8, forced=ws + ",pack_gqa=1").pack_gqa
    for q_heads, packs in ((16, True), (64, True), (8 * 64, True), (24, False), (8 * 3, False), (8 * 128, False)):
        p = plan(q_len=16, k_len=4096, q_heads=q_heads, kv_heads=8, forced=ws)
        assert p.pack_gqa is packs, (q_heads, str(p))
    assert not plan(q_len=16, q_heads=32, kv_heads=8, bias=True, forced=ws).pack_gqa
    with pytest.raises(ValueError, match="the grid would exceed"):  # 2^23 packed rows of 4 heads: 262,144 tiles
        plan(q_len=2**21 * 4, k_len=64, q_heads=8, kv_heads=2, forced=ws + ",pack_gqa=1")


def test_the_warp_specialized_kernel_gathers_keys_of_mask_only_steps():
    """With labels, no bias and at most half as many queries as keys (a mask-only step), the
    warp-specialized kernel takes the gathered walk as the 64-row plans do; forcing it elsewhere is
    refused by name; the walk's state adds to its static shared memory."""
    ws = "mma=sm90,tile_m=128"
    for n in (32, 128, 512, 2048):
        assert fields(plan(q_len=n, labels=True, forced=ws))[:3] == ("sm90", 128, "gather"), n
    assert plan(q_len=2049, labels=True, forced=ws).walk == "tiles"
    assert plan(q_len=32, labels=True, bias=True, forced=ws).walk == "tiles"
    assert plan(q_len=32, labels=True, forced=ws + ",walk=tiles").walk == "tiles"
    assert fields(plan(q_len=4096, labels=True, forced=ws + ",walk=gather")) == ("sm90", 128, "gather", 1, False)
    assert fields(plan(q_len=16, q_heads=32, kv_heads=8, labels=True, forced=ws)) == ("sm90", 128, "gather", 1, True)
    assert plan(q_len=32, labels=True, forced="tile_m=128").walk == "tiles"  # mma.sync 128-row tiles never gather
    need = _C.attention_fwd_tma_bytes(128) + 6656  # Q, K / V stages; labels, barriers and the walk
    assert plan(q_len=32, labels=True, forced=ws, device=dict(H200, max_shared_bytes=need)).walk == "gather"
    with pytest.raises(ValueError, match=f"needs {need} bytes"):
        plan(q_len=32, labels=True, forced=ws, device=dict(H200, max_shared_bytes=need - 1))


def test_the_warp_specialized_kernel_refuses_expanded_tensors():
    """TMA maps document no stride 0: a q / k / v expanded along an axis (a prompt's K / V shared by
    the batch) cannot take mma=sm90,tile_m=128, while the automatic plans take it as any other."""
    with pytest.raises(ValueError, match="stride-0"):
        plan(forced="mma=sm90,tile_m=128", broadcast=True)
    assert fields(plan(broadcast=True)) == fields(plan())
    assert fields(plan(forced="mma=sm90,tile_m=64", broadcast=True))[:2] == ("sm90", 64)


def test_builds_without_sm90a_code_never_plan_wgmma():
    """A build whose architectures hold no sm_90a code (CUDAARCHS=90, or native on an H100) has no
    wgmma, setmaxnreg or TMA there: its kernels' sm90 instances would trap and take the CUDA context
    with them, so on an H100 the planner keeps to mma.sync and refuses mma=sm90 by name."""
    assert _C.archs_have_sm90a("80;90a-real") and _C.archs_have_sm90a("90a") and _C.archs_have_sm90a("80,90a-virtual")
    assert not any(_C.archs_have_sm90a(a) for a in ("80;90-real", "90", "native", "all", "", "80;89"))
    for call in (dict(bias=True), dict(q_len=128, labels=True), dict(), dict(q_len=16, q_heads=32, kv_heads=8)):
        assert plan(sm90a_code=False, **call).mma == "sm80", call
    assert plan(bias=True).mma == "sm90" and fields(plan(sm90a_code=False))[:2] == ("sm80", 128)
    for forced in ("mma=sm90", "mma=sm90,tile_m=128"):
        with pytest.raises(ValueError, match="sm_90a machine code"):
            plan(sm90a_code=False, forced=forced)


def test_forced_fields_win_and_the_others_adapt():
    # A mask-only step would gather with wgmma; 128-row tiles force the whole-tile mma.sync walk.
    assert fields(plan(q_len=128, labels=True, forced="tile_m=128"))[:3] == ("sm80", 128, "tiles")
    assert fields(plan(q_len=128, labels=True))[:3] == ("sm90", 64, "gather")
    assert fields(plan(labels=True, forced="walk=gather,splits=3")) == ("sm90", 64, "gather", 3, False)
    assert fields(plan(labels=True, forced="walk=gather", device=A100))[:3] == ("sm80", 64, "gather")
    assert fields(plan(forced="mma=simt")) == ("simt", 64, "tiles", 1, False)
    assert plan(q_len=16, q_heads=32, kv_heads=8, forced="pack_gqa=0").pack_gqa is False
    assert plan(q_heads=32, kv_heads=8, forced="pack_gqa=1").tile_m == 64


CALLS = [dict(zip(("q_len", "k_len", "q_heads", "kv_heads", "head_dim", "labels", "bias"), c)) for c in itertools.product(
    (1, 64, 300, 4096), (64, 4096), (8, 32), (8, 2), (64, 128), (False, True), (False, True))]
FORCED = ["", "mma=simt", "mma=sm80", "mma=sm90", "tile_m=64", "tile_m=128", "walk=tiles", "walk=gather", "splits=1",
          "splits=5", "pack_gqa=0", "pack_gqa=1", "mma=sm80,tile_m=128,splits=2", "mma=sm90,walk=gather,pack_gqa=1",
          "mma=sm90,tile_m=128"]


@pytest.mark.parametrize("device", [H200, A100, L40], ids=["sm90", "sm80", "sm89"])
def test_every_plan_keeps_its_forced_fields_and_replays_from_its_description(device):
    """Over a grid of calls x overrides: a plan is made or refused with a reason, a made plan keeps
    every forced field, and the plan's own description, given back as an override, gives it again
    (a bench row's plan can be rerun as it is)."""
    made = refused = 0
    for call, forced in itertools.product(CALLS, FORCED):
        try:
            p = plan(device=device, forced=forced, **call)
        except ValueError as e:
            assert "cannot run this call" in str(e)
            refused += 1
            continue
        made += 1
        for item in filter(None, forced.split(",")):
            key, value = item.split("=")
            assert str(int(getattr(p, key)) if key == "pack_gqa" else getattr(p, key)) == value, (call, forced, str(p))
        assert fields(plan(device=device, forced=str(p), **call)) == fields(p), (call, forced)
    assert made > 1000 and refused > 100  # both branches ran


# ----------------------------------------------------------------------------------- CUDA kernels
def _family_plans():
    """Every plan the planner can choose, as overrides: (name, text, needs sm90, needs labels)."""
    return [
        ("simt", "mma=simt", False, False),
        ("sm80_64", "mma=sm80,tile_m=64,walk=tiles,pack_gqa=0", False, False),
        ("sm80_128", "mma=sm80,tile_m=128", False, False),
        ("sm80_gather", "mma=sm80,walk=gather", False, True),
        ("sm90", "mma=sm90,walk=tiles", True, False),
        ("sm90_gather", "mma=sm90,walk=gather", True, True),
        ("sm90_128", "mma=sm90,tile_m=128", True, False),  # the warp-specialized TMA kernel
        ("sm90_128_splits", "mma=sm90,tile_m=128,splits=3", True, False),
        ("sm90_128_packed", "mma=sm90,tile_m=128,pack_gqa=1", True, False),  # q_heads / kv_heads must divide 64
        ("sm90_128_gather", "mma=sm90,tile_m=128,walk=gather", True, True),
        ("sm80_splits", "mma=sm80,tile_m=64,splits=3", False, False),
        ("sm80_128_splits", "mma=sm80,tile_m=128,splits=2", False, False),
        ("gather_splits", "walk=gather,splits=3", False, True),
        ("packed_gqa", "tile_m=64,pack_gqa=1", False, False),
        ("auto", "", False, False),
    ]


PLAN_IDS = [name for name, *_ in _family_plans()]
# Plans that take a bias (GQA packing takes none).
BIAS_PLAN_IDS = [name for name, text, _, labels in _family_plans() if not labels and "pack_gqa=1" not in text]


@pytest.fixture
def family(monkeypatch, request):
    """Runs the test under the planned family (DLMFUSE_CUDA_KERNELS=1) with one forced plan."""
    name, text, needs_sm90, needs_labels = next(p for p in _family_plans() if p[0] == request.param)
    if needs_sm90 and torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("mma=sm90 plans need an sm_90 GPU")
    monkeypatch.setenv("DLMFUSE_CUDA_KERNELS", "1")
    with cuda_plan_override(text):
        yield text, needs_labels


def _inputs(B, Lq, Lk, Hq, Hkv, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Lq, Hq, D, generator=g)
    k, v = (torch.randn(B, Lk, Hkv, D, generator=g) for _ in range(2))
    return (t.to("cuda", dtype) for t in (q, k, v))


def _attend(text, q, k, v, **kwargs):
    """Runs the family and checks that the plan that ran kept the forced fields: (out, lse)."""
    _cuda_attention._last_cuda_plan = None  # a call that bypassed the family must not pass on an old plan
    try:
        out, lse = dlmfuse.attention(q, k, v, return_lse=True, **kwargs)
    except ValueError as e:  # 128-row tiles at head_dim 128 on 99 KB GPUs: the planner's refusal
        if "bytes of shared memory per block" in str(e):
            pytest.skip(str(e))
        raise
    torch.cuda.synchronize()
    ran = last_cuda_plan()
    assert ran is not None
    for item in filter(None, text.split(",")):
        assert item in ran.split(","), (text, ran)
    return out, lse


def _run(text, q, k, v, **kwargs):
    """_attend, then the result against the float64 reference."""
    out, lse = _attend(text, q, k, v, **kwargs)
    check_attention(out, q, k, v, lse=lse, **kwargs)
    return out, lse


LOWP = [torch.bfloat16, torch.float16]


@pytest.mark.cuda
@pytest.mark.parametrize("family", PLAN_IDS, indirect=True)
@pytest.mark.parametrize("dtype", LOWP, ids=["bf16", "fp16"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_dense_and_block_causal(family, dtype, head_dim):
    text, needs_labels = family
    q, k, v = _inputs(2, 200, 200, 4, 2, head_dim, dtype)
    if not needs_labels:
        _run(text, q, k, v)
    _run(text, q, k, v, mask=Mask.block_causal(200, 16, prefix_len=7).to("cuda"))
    _run(text, q, k, v, mask=Mask.bd3_train(100, 8).to("cuda"))


@pytest.mark.cuda
@pytest.mark.parametrize("family", PLAN_IDS, indirect=True)
def test_mask_only_rows_kv_lens_and_empty_rows(family):
    text, _ = family
    q, k, v = _inputs(2, 512, 512, 8, 2, 128, torch.bfloat16, seed=1)
    g = torch.Generator().manual_seed(2)
    clean = torch.rand(1, 512, generator=g) < 0.4
    rows = torch.randperm(512, generator=g)[:40].sort().values
    mask = Mask.clean_and_self(clean).gather_queries(rows).to("cuda")
    _run(text, q[:, rows.cuda()], k, v, mask=mask)
    kv_lens = torch.tensor([0, 300], dtype=torch.int32, device="cuda")  # batch 0: every row empty
    _run(text, q, k, v, mask=Mask.block_causal(512, 64).to("cuda"), kv_lens=kv_lens)


@pytest.mark.cuda
@pytest.mark.parametrize("family", BIAS_PLAN_IDS, indirect=True)
@pytest.mark.parametrize("bias_dtype", [torch.bfloat16, torch.float32], ids=["bf16_bias", "fp32_bias"])
def test_bias_broadcasts(family, bias_dtype):
    text, _ = family
    q, k, v = _inputs(2, 130, 260, 4, 4, 64, torch.bfloat16, seed=3)
    g = torch.Generator().manual_seed(4)
    for shape in [(1, 4, 130, 260), (2, 1, 130, 260), (1, 1, 1, 260)]:
        bias = torch.randn(shape, generator=g).to("cuda", bias_dtype)
        _run(text, q, k, v, bias=bias)
        _run(text, q, k, v, bias=bias, mask=Mask.block_causal(260, 32).gather_queries(torch.arange(130)).to("cuda"))


@pytest.mark.cuda
@pytest.mark.parametrize("family", ["sm90_128_packed", "packed_gqa"], indirect=True)
@pytest.mark.parametrize("group", [2, 4, 8, 16])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_gqa_packing_across_tile_edges(family, group, head_dim):
    """Packed rows (query-major: query r // G of head r % G) against the float64 reference, with the
    last tile holding at most 64 packed rows (131 queries: the warp-specialized kernel's consumer 1
    then loads none) or more (180); with labels, kv_lens and split-KV; q a strided view too."""
    text, _ = family
    kv_heads = 2
    for q_len in (131, 180):  # the last 128-row tile: 6-48 packed rows at 131, 32-104 at 180
        q, k, v = _inputs(2, q_len, 333, kv_heads * group, kv_heads, head_dim, torch.bfloat16, seed=12)
        wide_q = torch.zeros(2, q_len, kv_heads * group, head_dim + 64, device="cuda", dtype=q.dtype)
        wide_q[..., :head_dim] = q
        q_view = wide_q[..., :head_dim]  # heads (head_dim + 64) apart
        mask = Mask.block_causal(333, 32).gather_queries(torch.arange(333 - q_len, 333)).to("cuda")
        kv_lens = torch.tensor([333, 190], dtype=torch.int32, device="cuda")
        for qq in (q, q_view):
            _run(text, qq, k, v)
            _run(text, qq, k, v, mask=mask, kv_lens=kv_lens)
        with cuda_plan_override(text + ",splits=2"):
            _run(text + ",splits=2", q, k, v, mask=mask)


@pytest.mark.cuda
@pytest.mark.parametrize("family", ["sm80_gather", "sm90_gather", "sm90_128_gather", "gather_splits"], indirect=True)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_gathered_walks_read_only_the_keys_rows_see(family, head_dim):
    """A mask-only step over 3000 keys (three gathering rounds of 1024 keys): keys clean for every
    row (gathered into FULL tiles) or the self key of one row (PARTIAL tiles); every other key is
    NaN in K and V and must never be read. kv_lens ends inside a round; split-KV too."""
    text, _ = family
    B, Lk, n = 2, 3000, 200
    g = torch.Generator().manual_seed(16)
    clean = torch.rand(B, Lk, generator=g) < 0.5
    rows = torch.stack([torch.randperm(Lk, generator=g)[:n].sort().values for _ in range(B)])
    mask = Mask.clean_and_self(clean).gather_queries(rows).to("cuda")
    q, k, v = _inputs(B, n, Lk, 4, 2, head_dim, torch.bfloat16, seed=17)
    seen = clean.clone()
    seen.scatter_(1, rows, True)
    hidden = ~seen.cuda()
    poisoned_k, poisoned_v = k.clone(), v.clone()
    poisoned_k[hidden], poisoned_v[hidden] = float("nan"), float("nan")
    kv_lens = torch.tensor([Lk, 2222], dtype=torch.int32, device="cuda")
    for kwargs in (dict(mask=mask), dict(mask=mask, kv_lens=kv_lens)):
        out, lse = _attend(text, q, poisoned_k, poisoned_v, **kwargs)
        check_attention(out, q, k, v, lse=lse, **kwargs)
    with cuda_plan_override(text + ",splits=3" if "splits" not in text else text):
        out, lse = _attend(text, q, poisoned_k, poisoned_v, mask=mask)
        check_attention(out, q, k, v, lse=lse, mask=mask)


def _bias_layouts(B, H, Lq, Lk, dtype, seed):
    """Biases of every layout the warp-specialized kernel tells apart: TMA tiles (q's dtype, rows on
    16-byte boundaries; stride-0 axes read at coordinate 0, a row-broadcast one as one row) and
    row loads (fp32, another 16-bit type, an odd row stride). Some keys are -inf, never a whole row."""
    g = torch.Generator().manual_seed(seed)
    wide = torch.randn(B, H, Lq, Lk + 8, generator=g)
    wide[..., 3::17] = float("-inf")
    other = torch.float16 if dtype == torch.bfloat16 else torch.bfloat16
    return {
        "tiles": wide[..., :Lk].contiguous().to("cuda", dtype),
        "tiles, strided view": wide.to("cuda", dtype)[..., :Lk],  # row stride Lk + 8
        "tiles, per head": wide[:1, :, :, :Lk].to("cuda", dtype),  # [1, H, Lq, Lk]: batch stride 0
        "tiles, one row per batch": wide[:, :1, :1, :Lk].to("cuda", dtype),  # [B, 1, 1, Lk]
        "rows, fp32": wide[..., :Lk].contiguous().to("cuda"),
        "rows, other 16-bit type": wide[..., :Lk].contiguous().to("cuda", other),
        "rows, odd row stride": torch.randn(B, H, Lq, Lk + 1, generator=g).to("cuda", dtype)[..., :Lk],
    }


@pytest.mark.cuda
@pytest.mark.parametrize("family", ["sm90_128", "sm90_128_splits"], indirect=True)
@pytest.mark.parametrize("dtype", LOWP, ids=["bf16", "fp16"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_warp_specialized_kernel_bias_tiles_and_rows(family, dtype, head_dim):
    """The Hopper kernel's two bias paths against the float64 reference: 300 query rows (the last
    tile has 44, so consumer 1 loads and reads no bias), 520 keys (the last key tile has 8: one
    64-key box), kv_lens ending inside a tile, and labels under which key tile 1 is SKIP while
    tiles 0, 2, 3 and 4 are issued (the bias ring counts issued tiles, not key tiles)."""
    text, _ = family
    B, Lq, Lk, H = 2, 300, 520, 4
    q, k, v = _inputs(B, Lq, Lk, H, 2, head_dim, dtype, seed=5)
    clean = torch.ones(1, Lk, dtype=torch.bool)
    clean[:, 128:256] = False  # visible only to themselves, and no query row is one of them
    rows = torch.cat([torch.arange(0, 128), torch.arange(256, 428)])
    mask = Mask.clean_and_self(clean).gather_queries(rows).to("cuda")
    kv_lens = torch.tensor([Lk, 397], dtype=torch.int32, device="cuda")
    for name, bias in _bias_layouts(B, H, Lq, Lk, dtype, seed=6).items():
        for kwargs in (dict(), dict(mask=mask), dict(kv_lens=kv_lens)):
            try:
                _run(text, q, k, v, bias=bias, **kwargs)
            except AssertionError as e:
                raise AssertionError(f"bias {name}, {list(kwargs)}: {e}") from e


@pytest.mark.cuda
@pytest.mark.parametrize("family", PLAN_IDS, indirect=True)
def test_scores_beyond_float32_are_recomputed_in_float64(family):
    """Rows whose q.k exceed float32 (the float32 softmax breaks, or sees only -inf scores) leave
    lse -inf, or NaN after a split-KV merge; the rescue kernel that follows every plan recomputes
    them in float64. float32 inputs on the CUDA-core plan too."""
    text, needs_labels = family
    for dtype in [torch.bfloat16] + ([torch.float32] if text == "mma=simt" else []):
        q, k, v = overflow_inputs(dtype, "cuda")
        q = torch.cat([q, q], dim=2)  # 4 query heads over 2 KV heads: the packed-GQA plan applies
        for mask in [Mask.causal(70).to("cuda")] + ([] if needs_labels else [None]):
            kwargs = {} if mask is None else {"mask": mask}
            out, lse = _attend(text, q, k, v, **kwargs)
            check_beyond_float32(out, lse, q, k, v, **kwargs)
        q, k, v = downward_overflow_inputs(dtype, "cuda")
        q = torch.cat([q, q], dim=2)
        mask = Mask.bidirectional(9).to("cuda") if needs_labels else None  # every key visible
        out, lse = _attend(text, q, k, v, mask=mask)
        check_beyond_float32(out, lse, q, k, v, mask=mask)
        assert torch.equal(out[0, 2, 0], v[0, 4, 0]) and torch.equal(out[0, 2, 1], v[0, 4, 0])


@pytest.mark.cuda
@pytest.mark.parametrize("family", ["simt"], indirect=True)
def test_merge_is_exact_across_partials_whose_scores_overflowed(family):
    """Partials of rows beyond float32 (lse +inf where one half holds the dominating key) merge to
    the whole row's attention on CUDA as on the CPU (tests/test_extremes.py)."""
    text, _ = family
    q, k, v = overflow_inputs(torch.float32, "cuda")
    full_out, full_lse = _attend(text, q, k, v)
    for cut in (7, 35):  # the dominating keys in the first or the second part
        out, lse = dlmfuse.merge_attention(*_attend(text, q, k[:, :cut], v[:, :cut]),
                                           *_attend(text, q, k[:, cut:], v[:, cut:]))
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, full_out, rtol=1e-5, atol=1e-5)
        assert torch.equal(torch.isposinf(lse), torch.isposinf(full_lse))


@pytest.mark.cuda
@pytest.mark.parametrize("family", PLAN_IDS, indirect=True)
def test_rows_without_keys_and_rows_with_nan_after_the_rescue(family):
    """The rescue scans rows whose lse is -inf: one that sees no key among 70 stays 0 with lse -inf;
    a NaN in q stays a NaN row with a NaN lse (as in the reference); the other rows are untouched."""
    text, _ = family
    q, k, v = _inputs(1, 70, 70, 4, 2, 64, torch.bfloat16, seed=8)
    keys = torch.arange(70, dtype=torch.int32)[None]
    q_order, q_group = keys + 1, keys.clone()  # causal, each query its own group
    q_order[0, 5], q_group[0, 5] = 0, -1  # query 5 sees no key
    mask = Mask(q_order, q_group, keys, keys).to("cuda")
    clean, clean_lse = _run(text, q, k, v, mask=mask)
    assert torch.equal(clean[0, 5], torch.zeros_like(clean[0, 5])) and torch.isneginf(clean_lse[0, :, 5]).all()
    poisoned = q.clone()
    poisoned[0, 9, 1, 3] = float("nan")
    out, lse = _attend(text, poisoned, k, v, mask=mask)
    assert out[0, 9, 1].isnan().all() and lse[0, 1, 9].isnan()
    others = torch.ones_like(lse, dtype=torch.bool)
    others[0, 1, 9] = False
    assert torch.equal(lse[others], clean_lse[others]) and torch.equal(out.transpose(1, 2)[others], clean.transpose(1, 2)[others])


@pytest.mark.cuda
@pytest.mark.parametrize("family", BIAS_PLAN_IDS, indirect=True)
def test_a_nan_key_under_a_minus_inf_bias_poisons_its_rows(family):
    """A -inf bias does not hide a NaN key (NaN + -inf is NaN in the reference and on the CPU): the
    rows that meet it are NaN after the rescue too, not the finite rows of the other keys."""
    text, _ = family
    q, k, v = _inputs(1, 40, 70, 2, 2, 64, torch.bfloat16, seed=9)
    k[0, 20, 0] = float("nan")
    bias = torch.zeros(1, 2, 40, 70, device="cuda", dtype=torch.bfloat16)
    bias[..., 20] = float("-inf")
    out, lse = _attend(text, q, k, v, bias=bias)
    ref_out, _ = dlmfuse.reference.attention(q, k, v, bias=bias, return_lse=True, out_dtype=torch.float64)
    assert ref_out[:, :, 0].isnan().all() and out[:, :, 0].isnan().all() and lse[:, 0].isnan().all()
    assert torch.isfinite(out[:, :, 1]).all()


def _doc_ids(lengths):
    return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))


@pytest.mark.cuda
@pytest.mark.parametrize("family", PLAN_IDS, indirect=True)
@pytest.mark.parametrize("lengths", [(37, 5, 90, 1, 64), (64, 128, 64), (130, 7, 7, 200)], ids=str)
@pytest.mark.parametrize("inner", ["block_causal", "bd3_train", "eso"])
def test_packed_documents_equal_each_document_alone(family, lengths, inner):
    text, _ = family
    L, docs = sum(lengths), _doc_ids(lengths)
    if inner == "block_causal":
        packed = Mask.block_causal(L, 16, documents=docs)
        singles = [Mask.block_causal(n, 16) for n in lengths]
        rows = [torch.arange(a, a + n) for a, n in zip(torch.tensor([0, *lengths]).cumsum(0).tolist(), lengths)]
    elif inner == "bd3_train":
        packed = Mask.bd3_train(L, 8, documents=docs)
        singles = [Mask.bd3_train(n, 8) for n in lengths]
        starts = torch.tensor([0, *lengths]).cumsum(0).tolist()
        rows = [torch.cat([torch.arange(a, a + n), torch.arange(L + a, L + a + n)]) for a, n in zip(starts, lengths)]
        L = 2 * L
    else:
        g = torch.Generator().manual_seed(5)
        parts = []
        for n in lengths:
            clean = torch.rand(1, n, generator=g) < 0.5
            key = torch.rand(1, n, generator=g) + (~clean).float()
            rank = torch.empty(1, n, dtype=torch.int64).scatter_(1, key.argsort(1), torch.arange(n)[None])
            parts.append((rank, clean))
        rank, clean = (torch.cat([p[i] for p in parts], 1) for i in (0, 1))
        packed = Mask.eso(rank, clean, "A", documents=docs)
        singles = [Mask.eso(r, c, "A") for r, c in parts]
        rows = [torch.arange(a, a + n) for a, n in zip(torch.tensor([0, *lengths]).cumsum(0).tolist(), lengths)]
    q, k, v = _inputs(2, L, L, 4, 2, 64, torch.bfloat16, seed=6)
    out, lse = _run(text, q, k, v, mask=packed.to("cuda"))
    for r, single in zip(rows, singles):
        r = r.cuda()
        alone, alone_lse = dlmfuse.attention(q[:, r], k[:, r], v[:, r], mask=single.to("cuda"), return_lse=True)
        torch.testing.assert_close(out[:, r].double(), alone.double(), rtol=2.0**-7, atol=2.0**-7)
        torch.testing.assert_close(lse[:, :, r], alone_lse, rtol=1e-4, atol=1e-4)


@pytest.mark.cuda
@pytest.mark.parametrize("family", ["auto", "sm80_gather", "simt", "sm90_128", "sm90_128_gather"], indirect=True)
def test_other_documents_tiles_are_never_read(family):
    """NaN keys and values in every other document must not reach a document's rows: the family skips
    the tile pairs of two documents (and the gathered walk their keys) instead of weighting them 0.
    Documents start on multiples of 128 rows, so that no query tile (64 or 128 rows) spans two."""
    text, _ = family
    lengths = (128, 256, 128, 128)
    L, docs = sum(lengths), _doc_ids(lengths)
    mask = Mask.block_causal(L, 16, documents=docs).to("cuda")
    q, k, v = _inputs(1, L, L, 2, 2, 64, torch.bfloat16, seed=7)
    start = 0
    for n in lengths:
        s = slice(start, start + n)
        start += n
        poisoned_k, poisoned_v = torch.full_like(k, float("nan")), torch.full_like(v, float("nan"))
        poisoned_k[:, s], poisoned_v[:, s] = k[:, s], v[:, s]
        out = dlmfuse.attention(q, poisoned_k, poisoned_v, mask=mask)
        assert torch.isfinite(out[:, s]).all(), (text, s)


def test_build_info_reports_the_override(monkeypatch):
    monkeypatch.delenv("DLMFUSE_CUDA_ATTENTION", raising=False)
    assert dlmfuse.build_info()["cuda_attention_override"] is None
    family = dlmfuse._ext._cuda_kernel_enabled("attention_family")
    monkeypatch.setenv("DLMFUSE_CUDA_ATTENTION", "tile_m=128,splits=3")
    report = dlmfuse.build_info()["cuda_attention_override"]
    assert report["text"] == "tile_m=128,splits=3"
    assert (report["error"] is None) == family  # key=value items are the planned family's syntax only
    monkeypatch.setenv("DLMFUSE_CUDA_ATTENTION", "wide")
    report = dlmfuse.build_info()["cuda_attention_override"]
    assert (report["error"] is None) != family and report["read_by"] == ("planned family" if family else "verified kernels")


# The verified kernels' names as plan fields (double_buffer differs from next only in code paths the
# family no longer has).
_KERNEL_AS_PLAN = {"double_buffer": ("sm80", 64, "tiles"), "next": ("sm80", 64, "tiles"), "wide": ("sm80", 128, "tiles"),
                   "sm90": ("sm90", 64, "tiles"), "gather": ("sm80", 64, "gather"), "sm90_gather": ("sm90", 64, "gather")}


@pytest.mark.parametrize("device", [H200, A100], ids=["sm90", "sm80"])
def test_automatic_plans_restate_the_verified_auto(device):
    """Over a grid of calls, the planner's automatic plan is the kernel the verified `auto` picks
    (auto_cuda_kernel), with the split count and GQA packing the verified path computes for it: the
    family changes the code, not the choices measured on the H200. One deliberate difference: where
    auto picks double_buffer (GPUs other than sm_90, never measured), the family packs GQA heads as
    `next` does, since packing cuts the K/V reads on any GPU."""
    from dlmfuse._cuda_attention import _CUDA_KERNEL_ARGS, auto_cuda_kernel

    sm90 = device["cc_major"] == 9
    for q_len, k_len, q_heads, kv_heads, head_dim, labels, bias in itertools.product(
            (1, 16, 32, 33, 64, 65, 300, 2048, 4096), (64, 1000, 4096), (8, 28, 32), (1, 4, 8), (64, 128),
            (False, True), (False, True)):
        if q_heads % kv_heads:
            continue
        kernel = auto_cuda_kernel(q_len, k_len, labels, bias, sm90)
        args = _CUDA_KERNEL_ARGS["next" if kernel == "double_buffer" else kernel]
        rows_per_cta = 4 * args.rows_per_warp
        packs = args.pack_gqa and not bias and _C.attention_packs_gqa(q_heads, kv_heads, q_len, rows_per_cta)
        splits = _C.attention_num_splits(1, q_heads, q_len, k_len, head_dim, device["sm_count"],
                                         rows_per_cta=rows_per_cta, kv_heads=kv_heads if args.pack_gqa and not bias else 0)
        p = plan(q_len=q_len, k_len=k_len, q_heads=q_heads, kv_heads=kv_heads, head_dim=head_dim, labels=labels,
                 bias=bias, device=device)
        assert fields(p) == (*_KERNEL_AS_PLAN[kernel], splits, packs), (q_len, k_len, q_heads, kv_heads, labels, bias,
                                                                        kernel, str(p))


@pytest.mark.cuda
@pytest.mark.parametrize("family", ["auto", "sm80_splits", "gather_splits", "simt", "sm90_128", "sm90_128_splits",
                                    "sm90_128_packed"], indirect=True)
def test_cuda_graph_capture_and_replay_with_documents(family):
    """The family inside a CUDA graph: the split workspace is allocated during capture, and replays
    with new values in q, the labels and the documents recompute with them."""
    L = 192
    q, k, v = _inputs(2, L, L, 4, 2, 64, torch.bfloat16, seed=10)
    docs = _doc_ids((70, 50, 72))
    mask = Mask.block_causal(L, 16, documents=docs).to("cuda")
    kv_lens = torch.tensor([L, 150], dtype=torch.int32, device="cuda")

    def step():
        return dlmfuse.attention(q, k, v, mask=mask, kv_lens=kv_lens, return_lse=True)

    graph, (out, lse) = cuda_graph_of(step)
    for trial, lengths in enumerate([(100, 92), (10, 150, 32)]):
        q.copy_(torch.randn(q.shape, generator=torch.Generator().manual_seed(trial)).to(q))
        new = Mask.block_causal(L, 16, documents=_doc_ids(lengths)).to("cuda")
        for name in ("q_order", "q_group", "k_order", "k_group", "q_doc", "k_doc"):
            getattr(mask, name).copy_(getattr(new, name))
        graph.replay()
        torch.cuda.synchronize()
        check_attention(out, q, k, v, lse=lse, mask=new, kv_lens=kv_lens)


@pytest.mark.cuda
@pytest.mark.parametrize("family", ["auto", "sm80_gather"], indirect=True)
def test_torch_compile_fullgraph_runs_the_family(family):
    L = 160
    q, k, v = _inputs(2, L, L, 4, 2, 64, torch.bfloat16, seed=11)
    mask = Mask.bd3_train(L // 2, 16, documents=_doc_ids((50, 30))).to("cuda")

    def fn(q, k, v, mask):
        return dlmfuse.attention(q, k, v, mask=mask, return_lse=True)

    got = torch.compile(fn, backend="aot_eager", fullgraph=True, dynamic=False)(q, k, v, mask)
    expected = fn(q, k, v, mask)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    check_attention(got[0], q, k, v, lse=got[1], mask=mask)
