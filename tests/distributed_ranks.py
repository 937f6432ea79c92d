"""What each rank runs in tests/test_distributed.py (module-level functions: a RankPool pickles
them by name). Each builds what it needs, runs it unsharded and sharded, and returns plain
tensors and numbers; the assertions are made in the test process."""

from __future__ import annotations

import itertools
import math
import time

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

import dlmfuse
from dlmfuse.distributed import count_sent_bytes, sample_tokens as shard_sample_tokens, tensor_parallel
from dlmfuse.distributed import token_probability as shard_token_probability
from dlmfuse.samplers import Dream, EsoLM, FastDLLM, LLaDA, MDLM
from dlmfuse.samplers.llada import token_probability

VOCAB, MASK = 96, 95


def mesh():
    return init_device_mesh("cpu", (dist.get_world_size(),))


def model(num_kv_heads: int = 2, *, tied: bool = False, bias: bool = False, seed: int = 0) -> dlmfuse.nn.DenoiserLM:
    """A small GQA denoiser; init_std 0.3 gives peaked logits (random LLaMA weights give nearly
    uniform ones, on which every confidence ties to float32 rounding)."""
    torch.manual_seed(seed)
    return dlmfuse.nn.DenoiserLM(VOCAB, 64, 2, 4, num_kv_heads, 128, head_dim=16, init_std=0.3,
                                 tie_word_embeddings=tied, attention_bias=bias, mlp_bias=bias)


# ------------------------------------------------------------------------------- the layers
def parameter_layout(num_kv_heads: int = 2):
    """Every parameter's (global shape, local shape, placement) after sharding, the Sharding
    record and the KV cache's head count."""
    m = tensor_parallel(model(num_kv_heads), mesh())
    layout = {}
    for name, p in m.named_parameters():
        if hasattr(p, "to_local"):
            placement = p.placements[0]
            kind = f"Shard({placement.dim})" if placement.is_shard() else type(placement).__name__
            layout[name] = (tuple(p.shape), tuple(p.to_local().shape), kind)
        else:
            layout[name] = (tuple(p.shape), tuple(p.shape), "plain")
    s = m.sharding
    record = dict(rank=s.rank, world_size=s.world_size, num_heads=s.num_heads, num_kv_heads=s.num_kv_heads,
                  kv_replicas=s.kv_replicas, vocab_offset=s.vocab_offset, vocab_per_rank=s.vocab_per_rank)
    return layout, record, m.new_cache(2, 8).k.shape[3]


@torch.no_grad()
def forward_pairs(num_kv_heads: int = 2, tied: bool = False, bias: bool = False):
    """(unsharded, sharded) logits: full sequence, logits_for rows, with a KV cache; plus this
    rank's local slice of the full-sequence logits and its vocabulary offset."""
    m = model(num_kv_heads, tied=tied, bias=bias)
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    rows = torch.tensor([[1, 3], [0, 8]])
    calls = [lambda: m(ids), lambda: m(ids, logits_for=rows),
             lambda: m(ids, cache=m.new_cache(2, 9), positions=torch.arange(9))]
    before = [call() for call in calls]
    tensor_parallel(m, mesh())
    after = [call() for call in calls]
    local = after[0].to_local()
    return before, [a.full_tensor() for a in after], local, m.sharding.vocab_offset


# ----------------------------------------------------------------------------------- sampling
SAMPLING_GRID = list(itertools.product(
    (0.0, 0.7), (None, 5, 2000), (None, 0.4, 0.95), ("prob", "margin", "neg_entropy", "logit"), (False, True),
    (None, (3, 4, 1500))))


def split_bounds(vocab: int, world: int, uneven: bool):
    """Column bounds of each rank: even, or uneven with odd offsets (first shard 1/3 + 1 wide)."""
    if not uneven:
        return [vocab * r // world for r in range(world + 1)]
    first = vocab // 3 + 1 if (vocab // 3) % 2 == 0 else vocab // 3
    rest = [first + (vocab - first) * r // (world - 1) for r in range(world)]
    return [0, *rest]


@torch.no_grad()
def sampling_pairs(vocab: int = 3001, uneven: bool = False):
    """For every option set of SAMPLING_GRID: the whole-row call and the split one, on logits
    with -inf entries and whole -inf shards in some rows."""
    rank, world = dist.get_rank(), dist.get_world_size()
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, vocab, generator=gen) * 3
    logits[0, 0, 7] = -math.inf
    logits[1, 2, : vocab // 2] = -math.inf  # rank 0's shard holds nothing for this row
    bounds = split_bounds(vocab, world, uneven)
    lo, hi = bounds[rank], bounds[rank + 1]
    local = logits[..., lo:hi]
    results = []
    for temperature, top_k, top_p, kind, tempered, suppress in SAMPLING_GRID:
        options = dict(temperature=temperature, top_k=top_k, top_p=top_p, seed=11, offset=2**33 + 5,
                       confidence=kind, tempered_confidence=tempered, suppress_tokens=suppress)
        whole = dlmfuse.sample_tokens(logits, **options)
        split = shard_sample_tokens(local, vocab_offset=lo, vocab_size=vocab, **options)
        results.append((options, whole, split))
    return bounds, results


@torch.no_grad()
def sampled_dtensor_and_bytes():
    """dlmfuse.sample_tokens on a model's DTensor logits against the same logits gathered, and
    the unsharded model's tokens; LLaDA's float64 confidence of both; and the bytes one sampling
    step sends from this rank."""
    m = model()
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(2))
    options = dict(temperature=1.0, seed=4, offset=8, confidence="margin", suppress_tokens=[0, 60])
    unsharded_tokens = dlmfuse.sample_tokens(m(ids), **options)[0]
    tensor_parallel(m, mesh())
    split = m(ids)
    gathered = split.full_tensor()
    expected = dlmfuse.sample_tokens(gathered, **options)
    with count_sent_bytes() as sent:
        got = dlmfuse.sample_tokens(split, **options)
    probabilities = (token_probability(gathered, got[0], [0, 60]), token_probability(split, got[0], [0, 60]))
    local = split.to_local()
    direct = shard_token_probability(local, got[0], [0, 60], vocab_offset=m.sharding.vocab_offset,
                                     vocab_size=VOCAB)
    return (unsharded_tokens, expected, got, probabilities, direct, sent.bytes, sent.calls,
            split.shape[0] * split.shape[1])


# ----------------------------------------------------------------------------------- generate
def generate_cases():
    """(name, sampler, cache modes): every sampler, greedy and sampled, top-k / top-p, CFG."""
    return [
        ("llada-greedy", LLaDA(8, 16, 8, mask_token_id=MASK), ("none", "prefix", "dual")),
        ("llada-sampled", LLaDA(8, 16, 8, temperature=1.0, mask_token_id=MASK), ("none", "prefix", "dual")),
        ("llada-cfg", LLaDA(8, 16, 8, temperature=0.5, cfg_scale=1.0, mask_token_id=MASK), ("none",)),
        ("fastdllm", FastDLLM(16, 8, threshold=0.3, temperature=1.0, mask_token_id=MASK), ("none", "dual")),
        ("dream-top-p-k", Dream(8, 16, temperature=0.8, top_p=0.9, top_k=20, alg="entropy", mask_token_id=MASK),
         ("none", "prefix")),
        ("dream-margin", Dream(8, 16, alg="topk_margin", mask_token_id=MASK), ("none",)),
        ("mdlm", MDLM(8, 16, temperature=1.0, mask_token_id=MASK), ("none",)),
        ("esolm", EsoLM(4, 16, variant="B", alpha_0=0.5, mask_token_id=MASK), ("none", "prefix")),
    ]


@torch.no_grad()
def generate_pairs(num_kv_heads: int = 2, cases=None):
    """{(case, cache): (unsharded tokens, sharded tokens)} for the same seed, and the seconds
    each side took."""
    m = model(num_kv_heads)
    prompt = torch.randint(0, MASK, (2, 6), generator=torch.Generator().manual_seed(3))
    selected = [c for c in generate_cases() if cases is None or c[0] in cases]
    start = time.perf_counter()
    before = {(name, cache): dlmfuse.generate(m, prompt, sampler, cache=cache, seed=5)
              for name, sampler, caches in selected for cache in caches}
    unsharded_s = time.perf_counter() - start
    tensor_parallel(m, mesh())
    start = time.perf_counter()
    after = {(name, cache): dlmfuse.generate(m, prompt, sampler, cache=cache, seed=5)
             for name, sampler, caches in selected for cache in caches}
    return {key: (before[key], after[key]) for key in before}, unsharded_s, time.perf_counter() - start


# ------------------------------------------------------------------------------------- errors
def sharding_errors():
    """The message of every refused model / mesh (None when nothing was raised)."""
    world = dist.get_world_size()

    def message(build):
        try:
            build()
        except (TypeError, ValueError) as error:
            return type(error).__name__, str(error)
        return None

    def shaped(**changes):
        shape = dict(vocab_size=VOCAB, hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2,
                     intermediate_size=128, head_dim=16)
        shape.update(changes)
        return lambda: tensor_parallel(dlmfuse.nn.DenoiserLM(**shape), mesh())

    def twice():
        m = tensor_parallel(model(), mesh())
        tensor_parallel(m, mesh())

    return {
        "kv_heads": message(shaped(num_heads=3 * world, num_kv_heads=3)),
        "query_heads": message(shaped(num_heads=world + 1, num_kv_heads=1)),
        "vocab": message(shaped(vocab_size=world * 10 + 1)),
        "mlp": message(shaped(intermediate_size=world * 10 + 1)),
        "mesh_2d": message(lambda: tensor_parallel(model(), init_device_mesh("cpu", (1, world)))),
        "not_a_mesh": message(lambda: tensor_parallel(model(), "cpu")),
        "not_a_denoiser": message(lambda: tensor_parallel(torch.nn.Linear(4, 4), mesh())),
        "twice": message(twice),
        "no_seed": message(lambda: shard_sample_tokens(torch.zeros(2, 3), vocab_offset=0, vocab_size=3 * world,
                                                       temperature=1.0)),
    }


# ---------------------------------------------------------------------------- failure handling
def fail_on_last_rank():
    """The last rank raises; the others wait in a collective that can never complete."""
    if dist.get_rank() == dist.get_world_size() - 1:
        raise ArithmeticError("rank-side failure for the test")
    dist.all_reduce(torch.ones(1))


def sleep_on_rank_zero(seconds: float):
    if dist.get_rank() == 0:
        time.sleep(seconds)
    return dist.get_rank()


def threads():
    return torch.get_num_threads(), dlmfuse.num_threads(), dist.get_backend()
