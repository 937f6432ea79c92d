"""dlmfuse.distributed: tensor parallelism of a DenoiserLM and vocabulary-parallel sampling, run
in local process groups (gloo on the loopback interface, one thread per rank) spawned here.

Each multi-rank test runs a function of tests/distributed_ranks.py on every rank of a pool that
the module shares (2 ranks; one test with 4), and asserts here on what the ranks return. A rank
that raises fails the test with its traceback; a rank that hangs fails it at the run's timeout
(the pool ends every rank either way). NCCL cannot be tested on this CPU-only CI.
"""

from __future__ import annotations

import math
import time

import pytest
import torch

import dlmfuse
import distributed_ranks as ranks_fn
from dlmfuse.distributed import RankPool
from dlmfuse.reference.sampling import gumbel_uniforms, softmax_stats, uniforms_at
from dlmfuse.sampling import CONFIDENCE_KINDS, sample_rows

START_SECONDS = 120.0  # start-up of a pool (imports torch in every rank) on a busy 2-core machine
RUN_SECONDS = 240.0    # one function on every rank
CONFIDENCE_RTOL = 2e-6  # float64 merge of the shards against the kernel's own accumulation, in float32


@pytest.fixture(scope="module")
def ranks():
    """``ranks(world, fn, *args)``: fn on every rank of a shared pool (restarted after a failure)."""
    pools: dict = {}

    def run(world: int, fn, *args, timeout: float = RUN_SECONDS):
        if world not in pools or pools[world].closed:
            pools[world] = RankPool(world, threads=1, timeout=START_SECONDS)
        return pools[world].run(fn, *args, timeout=timeout)

    yield run
    for pool in pools.values():
        pool.close()


# --------------------------------------------------------------------- the kernel, in-process
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_shard_draws_the_noise_of_its_columns(dtype, temperature):
    """sample_rows with column_offset picks, within the shard, the argmax of the whole row's
    float64 scores (the Philox noise of the global columns)."""
    rows, vocab, seed, offset = 6, 1000, 7, 2**40 + 1
    logits = (torch.randn(rows, vocab, generator=torch.Generator().manual_seed(0)) * 2).to(dtype)
    noise = -torch.log(-torch.log(gumbel_uniforms(rows, vocab, seed, offset))) if temperature else 0.0
    score = logits.double() / (temperature or 1.0) + noise
    for start, end in [(0, 1000), (2, 515), (500, 1000), (998, 1000), (64, 65)]:
        tokens, _ = sample_rows(logits[:, start:end], temperature, 0, 1.0, None, seed, offset, None, None, 0, False,
                                column_offset=start)
        assert torch.equal(tokens, score[:, start:end].argmax(dim=1)), (start, end)


def test_column_offset_must_be_even_and_within_the_counter():
    logits = torch.randn(2, 10)
    for bad in (1, 2**33):
        with pytest.raises(ValueError, match=f"column_offset must be even .* got {bad}"):
            sample_rows(logits, 1.0, 0, 1.0, None, 0, 0, None, None, 0, False, column_offset=bad)


def test_the_cpu_kernel_gives_minus_one_for_an_empty_row_and_the_op_raises():
    logits = torch.randn(3, 8)
    logits[1] = -math.inf
    tokens, conf = sample_rows(logits, 1.0, 0, 1.0, None, 0, 0, None, None, CONFIDENCE_KINDS.index("prob"), False)
    assert tokens[1] == -1 and conf[1] == -math.inf and bool((tokens[[0, 2]] >= 0).all())
    with pytest.raises(ValueError, match="row 1 has no token that can be emitted"):
        dlmfuse.sample_tokens(logits, temperature=1.0, seed=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_the_kernel_reports_the_softmax_statistics_of_the_kept_tokens(dtype):
    """stats = (max c, sum exp(c - max), sum exp(c - max)(c - max), second c) over the kept tokens,
    as reference.softmax_stats defines them, for every filter and both confidence scores; a row
    with nothing kept gives (-inf, 0, 0, -inf)."""
    logits = (torch.randn(5, 300, generator=torch.Generator().manual_seed(1)) * 3).to(dtype)
    logits[2] = -math.inf
    logits[3, 5:] = -math.inf
    rtol = 1e-14 if dtype == torch.float64 else 2e-6  # the fp32 pass accumulates exp in float32 blocks
    for temperature, top_k, top_p, tempered in [(0.0, 0, 1.0, False), (0.7, 10, 1.0, True), (1.3, 0, 0.6, True),
                                                (1e-31, 0, 1.0, True)]:
        stats = torch.empty(5, 4, dtype=torch.float64)
        sample_rows(logits, temperature, top_k, top_p, torch.tensor([1, 0] * 150, dtype=torch.uint8), 1, 2, None, None,
                    0, tempered, stats=stats)
        expected = softmax_stats(logits, temperature=temperature, top_k=top_k or None,
                                 top_p=None if top_p >= 1 else top_p, suppress_tokens=torch.arange(0, 300, 2),
                                 tempered_confidence=tempered)
        assert stats[2].tolist() == [-math.inf, 0.0, 0.0, -math.inf]
        torch.testing.assert_close(stats, expected, rtol=rtol, atol=0.0)


def test_uniforms_at_reads_the_layout_at_any_row_and_column():
    u = gumbel_uniforms(4, 33, 5, 2**35 + 9)
    rows, cols = torch.tensor([[0], [3], [2]]), torch.tensor([[0, 31, 32], [7, 8, 1], [2, 2, 30]])
    assert torch.equal(uniforms_at(rows, cols, 5, 2**35 + 9), u[rows, cols])
    assert torch.equal(gumbel_uniforms(4, 9, 5, 3, first_column=24), gumbel_uniforms(4, 33, 5, 3)[:, 24:])


# ------------------------------------------------------------------------------- the layers
def test_ranks_run_gloo_with_one_thread(ranks):
    assert ranks(2, ranks_fn.threads) == [(1, 1, "gloo")] * 2


def test_every_rank_holds_only_its_share_of_the_parameters(ranks):
    results = ranks(2, ranks_fn.parameter_layout)
    split_rows = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "embed_tokens", "lm_head")
    split_columns = ("o_proj", "down_proj")
    for rank, (layout, record, cache_heads) in enumerate(results):
        assert record == dict(rank=rank, world_size=2, num_heads=2, num_kv_heads=1, kv_replicas=1,
                              vocab_offset=48 * rank, vocab_per_rank=48)
        assert cache_heads == 1  # 2 KV heads over 2 ranks
        assert "lm_head.weight" in layout or "embed_tokens.weight" in layout
        for name, (whole, local, placement) in layout.items():
            if any(part in name for part in split_rows) and name.endswith("weight"):
                assert placement == "Shard(0)" and local == (whole[0] // 2, *whole[1:]), name
            elif any(part in name for part in split_columns):
                assert placement == "Shard(1)" and local == (whole[0], whole[1] // 2), name
            else:  # norms
                assert "norm" in name and placement == "plain" and local == whole, name


def test_fewer_kv_heads_than_ranks_replicates_each_kv_head(ranks):
    for rank, (layout, record, cache_heads) in enumerate(ranks(2, ranks_fn.parameter_layout, 1)):
        assert record["kv_replicas"] == 2 and record["num_kv_heads"] == 1 and cache_heads == 1
        whole, local, placement = layout["layers.0.self_attn.k_proj.weight"]
        assert placement == "plain" and local == (16, 64)  # one head of 16, the copy the rank's queries read
        assert layout["layers.0.self_attn.q_proj.weight"][1] == (32, 64)


@pytest.mark.parametrize("kv_heads, tied, bias", [(2, False, False), (1, True, True)],
                         ids=["gqa-split", "kv-replicated-tied-biases"])
def test_forward_equals_the_unsharded_model(ranks, kv_heads, tied, bias):
    for rank, (before, after, local, vocab_offset) in enumerate(ranks(2, ranks_fn.forward_pairs, kv_heads, tied, bias)):
        for whole, sharded in zip(before, after):  # full sequence, logits_for rows, KV cache
            torch.testing.assert_close(sharded, whole, rtol=1e-5, atol=1e-5)
        assert vocab_offset == 48 * rank and local.shape == (2, 9, 48)  # each rank holds its vocabulary slice
        torch.testing.assert_close(local, before[0][..., vocab_offset:vocab_offset + 48], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("uneven", [False, True], ids=["even", "uneven-odd-offset"])
def test_split_sampling_equals_sampling_the_whole_rows(ranks, uneven):
    """Every option set (greedy / sampled, top-k wider than a shard, multi-round top-p, every
    confidence, suppressed ids at a shard's edge): the same tokens, confidences to float32
    rounding, identical on every rank."""
    results = ranks(2, ranks_fn.sampling_pairs, 3001, uneven)
    bounds = results[0][0]
    assert (bounds[1] % 2 == 1) == uneven
    for rank_results in zip(*(r[1] for r in results)):
        (options, whole, split), (_, _, split_other) = rank_results
        assert torch.equal(split[0], whole[0]), options
        torch.testing.assert_close(split[1], whole[1], rtol=CONFIDENCE_RTOL, atol=1e-7, msg=str(options))
        assert torch.equal(split[0], split_other[0]) and torch.equal(split[1], split_other[1]), options


def test_model_logits_are_sampled_where_they_lie(ranks):
    """dlmfuse.sample_tokens on the sharded model's DTensor logits: what sampling them gathered
    gives (and the unsharded model's tokens), with one all-gather of STATS_PER_ROW float64 per
    row; LLaDA's float64 confidence agrees to 1e-12."""
    results = ranks(2, ranks_fn.sampled_dtensor_and_bytes)
    for unsharded, expected, got, (p_whole, p_split), p_direct, sent, calls, rows in results:
        assert torch.equal(got[0], expected[0]) and torch.equal(got[0], unsharded)
        torch.testing.assert_close(got[1], expected[1], rtol=CONFIDENCE_RTOL, atol=1e-7)
        torch.testing.assert_close(p_split, p_whole, rtol=1e-12, atol=0.0)
        assert torch.equal(p_direct, p_split)
        assert calls == 1 and sent == rows * dlmfuse.distributed.STATS_PER_ROW * 8  # (world - 1) = 1 block


# ----------------------------------------------------------------------------------- generate
def _assert_same_tokens(results):
    pairs_by_rank = [pairs for pairs, _, _ in results]
    for key in pairs_by_rank[0]:
        for pairs in pairs_by_rank:
            unsharded, sharded = pairs[key]
            assert torch.equal(sharded, unsharded), key
        assert torch.equal(pairs_by_rank[0][key][1], pairs_by_rank[-1][key][1]), key


def test_generate_on_a_sharded_model_returns_the_unsharded_tokens(ranks):
    """Every sampler (greedy and sampled, CFG, top-k / top-p), cache none / prefix / dual."""
    results = ranks(2, ranks_fn.generate_pairs)
    assert {cache for name, cache in results[0][0]} == {"none", "prefix", "dual"}
    _assert_same_tokens(results)


def test_generate_with_replicated_kv_heads(ranks):
    _assert_same_tokens(ranks(2, ranks_fn.generate_pairs, 1, ("llada-sampled", "fastdllm")))


def test_four_ranks(ranks):
    """4 ranks: 2 KV heads replicated on 2 ranks each, vocabulary in 4 slices of 24."""
    layout, record, cache_heads = ranks(4, ranks_fn.parameter_layout)[3]
    assert record["kv_replicas"] == 2 and record["vocab_offset"] == 72 and cache_heads == 1
    assert layout["lm_head.weight"][1] == (24, 64)
    _assert_same_tokens(ranks(4, ranks_fn.generate_pairs, 2, ("fastdllm", "dream-top-p-k")))


def test_a_rank_that_does_not_finish_times_out(ranks):
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"rank\(s\) \[0\] of 4 did not finish sleep_on_rank_zero within 2 s"):
        ranks(4, ranks_fn.sleep_on_rank_zero, 600.0, timeout=2.0)  # the last use of the 4-rank pool
    assert time.monotonic() - start < 30


# ------------------------------------------------------------------------------------- errors
def test_refused_models_and_meshes_name_the_numbers(ranks):
    errors = ranks(2, ranks_fn.sharding_errors)[0]
    expected = {
        "kv_heads": ("ValueError", "num_kv_heads=3 must divide, or be divisible by, the mesh size 2"),
        "query_heads": ("ValueError", "num_heads=3 is not divisible by the mesh size 2"),
        "vocab": ("ValueError", "vocab_size=21 is not divisible by the mesh size 2"),
        "mlp": ("ValueError", "intermediate_size=21 is not divisible by the mesh size 2"),
        "mesh_2d": ("ValueError", "mesh must be 1-D (one tensor-parallel dimension), got shape (1, 2)"),
        "not_a_mesh": ("TypeError", "mesh must be a torch.distributed.device_mesh.DeviceMesh, got str"),
        "not_a_denoiser": ("TypeError", "model must be a dlmfuse.nn.DenoiserLM, got Linear"),
        "twice": ("ValueError", "the model is already sharded"),
        "no_seed": ("ValueError", "seed is required when temperature > 0"),
    }
    for case, (kind, text) in expected.items():
        assert errors[case] is not None, f"{case}: nothing was raised"
        assert errors[case][0] == kind and text in errors[case][1], (case, errors[case])


def test_a_failing_rank_reports_its_traceback_instead_of_hanging_the_others(ranks):
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"rank 1 of 2 failed in fail_on_last_rank") as info:
        ranks(2, ranks_fn.fail_on_last_rank)
    assert "ArithmeticError: rank-side failure for the test" in str(info.value)
    assert "distributed_ranks.py" in str(info.value)  # the rank's own traceback
    assert time.monotonic() - start < 30  # rank 0, blocked in all_reduce, was ended
