"""Fast-dLLM's prefix cache and dual cache, token for token, on a model deep enough for stale K/V
to show (issue 21, item 3).

``dlmfuse.generate(..., cache="prefix" | "dual")`` is compared with an independent transcription
of Fast-dLLM's ``generate_with_prefix_cache`` / ``generate_with_dual_cache`` (NVlabs/Fast-dLLM,
``llada/generate.py``), written here from the algorithm with plain PyTorch on the model's own
modules (embedding, blocks' projections / norms / MLP, final norm, LM head), a RoPE of its own,
per-layer K/V tensors kept in Python lists and ``dlmfuse.reference.attention``; nothing of
``dlmfuse.generate`` or ``dlmfuse.KVCache`` is used. Per block of the generation:

- the block's first step runs the whole sequence; every layer's K/V are kept (the cache refresh)
  and its logits decide the step;
- prefix cache: every later step runs the block and everything after it, its queries attending
  to the cached prefix (K/V of the columns before the block, as of the block's first step) and to
  the fresh K/V of the rows it runs;
- dual cache: every later step runs only the block; its fresh K/V replace the block's slots of
  the cache, and its queries attend to the cached prefix, the block and the cached suffix (the
  suffix's K/V also as of the block's first step).

Each step decodes greedily: the proposal is the argmax, its confidence the float64 softmax
probability; the candidates are the masked columns of the current block; either every candidate
with confidence >= threshold (always the best one; Fast-dLLM's threshold rule) or LLaDA's fixed
per-step counts (``threshold=None`` in Fast-dLLM's functions).

The model has three layers (with one layer K/V depend on the token and position alone, and the
cache modes are exact); its LM head never prefers the mask token (that row of the head is zero),
so Fast-dLLM's loop and dlmfuse's samplers propose the same tokens. Every decision of the
transcription is checked to be far from float noise (argmax gaps, the confidences at the
selection boundary), so exact token equality is a fair demand of the float32 kernels.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import dlmfuse
from dlmfuse.generate import generate
from dlmfuse.samplers import FastDLLM, LLaDA

from conftest import assert_fp32_close

VOCAB = 48
MASK = VOCAB - 1
PROMPT_LEN = 6
GEN_LENGTH = 24
BLOCK_LENGTH = 8
BATCH = 3
THRESHOLD = 0.3
#: Smallest margin a transcribed decision may have: the hand-run logits differ from the kernels'
#: by up to ~4e-5 on these models (float32, logits up to ~9), so a gap of 2e-4 cannot close.
DECISION_MARGIN = 2e-4
#: Model seeds whose decisions all keep that margin (the prompt seed is one more).
SEEDS = (4, 21)


def denoiser(seed: int) -> dlmfuse.nn.DenoiserLM:
    """Three layers, GQA (2 query heads, 1 kv head), random weights; the mask token's logit is
    always exactly 0, below the best of 47 others (the transcription asserts it every step)."""
    torch.manual_seed(seed)
    model = dlmfuse.nn.DenoiserLM(vocab_size=VOCAB, hidden_size=64, num_layers=3, num_heads=2, num_kv_heads=1,
                                  intermediate_size=96, head_dim=64, init_std=0.3)
    with torch.no_grad():
        model.lm_head.weight[MASK] = 0.0
    return model.eval()


def prompts(seed: int) -> torch.Tensor:
    return torch.randint(0, MASK, (BATCH, PROMPT_LEN), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------- the model, run by hand
def rotate(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """LLaMA RoPE (rotate_half) of ``x [B, n, H, D]`` at absolute ``positions [n]``."""
    dim = x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    angles = positions.float()[:, None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)[None, :, None, :]
    half = dim // 2
    return x * angles.cos() + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * angles.sin()


class LayerKV:
    """K (after RoPE) and V ``[B, L, Hkv, D]`` of every layer, as a cache holds them."""

    def __init__(self):
        self.k, self.v = [], []


def run_rows(model, ids: torch.Tensor, first: int, keys_for) -> torch.Tensor:
    """Logits ``[B, n, V]`` of the tokens ``ids [B, n]`` at columns ``first .. first + n - 1``.

    ``keys_for(layer, k, v)`` gets the fed rows' fresh K (after RoPE) and V and returns the keys
    and values their queries attend to (all visible, as in a bidirectional LLaDA model).
    """
    batch, n = ids.shape
    positions = torch.arange(first, first + n)
    theta = model.config.rope_theta
    hidden = model.embed_tokens(ids)
    for index, block in enumerate(model.layers):
        attn = block.self_attn
        x = block.input_layernorm(hidden)
        q = rotate(attn.q_proj(x).view(batch, n, attn.num_heads, attn.head_dim), positions, theta)
        k = rotate(attn.k_proj(x).view(batch, n, attn.num_kv_heads, attn.head_dim), positions, theta)
        v = attn.v_proj(x).view(batch, n, attn.num_kv_heads, attn.head_dim)
        keys, values = keys_for(index, k, v)
        out = dlmfuse.reference.attention(q, keys, values)
        hidden = hidden + attn.o_proj(out.reshape(batch, n, attn.num_heads * attn.head_dim))
        hidden = hidden + block.mlp(block.post_attention_layernorm(hidden))
    return model.lm_head(model.norm(hidden))


def full_pass(model, x: torch.Tensor, kv: LayerKV) -> torch.Tensor:
    """The whole sequence, every layer's K/V stored in ``kv`` (the refresh at a block's start)."""
    kv.k, kv.v = [], []

    def keep(layer, k, v):
        kv.k.append(k)
        kv.v.append(v)
        return k, v

    return run_rows(model, x, 0, keep)


def prefix_step(model, x: torch.Tensor, kv: LayerKV, start: int) -> torch.Tensor:
    """PrefixCache: columns ``start ..`` run again against the prefix's cached K/V."""
    def prefix_and_fresh(layer, k, v):
        return torch.cat([kv.k[layer][:, :start], k], dim=1), torch.cat([kv.v[layer][:, :start], v], dim=1)

    return run_rows(model, x[:, start:], start, prefix_and_fresh)


def dual_step(model, x: torch.Tensor, kv: LayerKV, start: int, end: int) -> torch.Tensor:
    """DualCache: only the block runs; its K/V replace the block's slots, prefix and suffix are cached."""
    def replace_block(layer, k, v):
        kv.k[layer][:, start:end] = k
        kv.v[layer][:, start:end] = v
        return kv.k[layer], kv.v[layer]

    return run_rows(model, x[:, start:end], start, replace_block)


# ------------------------------------------------------------------- Fast-dLLM's decoding loop
class Decisions:
    """What the loop did: the tokens after every step, and the smallest margin of every argmax
    and selection it made (how far from float noise)."""

    def __init__(self):
        self.margin = math.inf
        self.history = []
        self.widest = []  # per step, the most columns one row unmasked

    def note(self, gap: float) -> None:
        self.margin = min(self.margin, gap)


def linear_schedule(masked: torch.Tensor, steps: int) -> torch.Tensor:
    """LLaDA's per-step transfer counts ``[B, steps]`` for ``masked [B, n]``."""
    count = masked.sum(dim=1)
    out = torch.zeros(masked.shape[0], steps, dtype=torch.int64) + (count // steps)[:, None]
    for row in range(masked.shape[0]):
        out[row, :int(count[row] % steps)] += 1
    return out


def unmask(x: torch.Tensor, logits: torch.Tensor, first: int, end: int, decisions: Decisions,
           threshold, counts) -> None:
    """One decoding step on the columns ``first ..`` whose ``logits [B, n, V]`` are given:
    candidates are the masked columns before ``end``; threshold rule or ``counts [B]``."""
    window = x[:, first:first + logits.shape[1]]
    top2 = logits.topk(2, dim=-1)
    proposal = top2.indices[..., 0]
    assert not (proposal == MASK).any(), "the model must never prefer the mask token"
    probability = F.softmax(logits.double(), dim=-1).gather(-1, proposal[..., None]).squeeze(-1)
    candidates = window == MASK
    candidates[:, end - first:] = False
    decisions.note(float((top2.values[..., 0] - top2.values[..., 1])[candidates].min()))
    confidence = torch.where(candidates, probability, -math.inf)
    widest = 0
    for row in range(x.shape[0]):
        available = int(candidates[row].sum())
        if available == 0:
            continue
        ranked, order = confidence[row].sort(descending=True)
        if threshold is None:
            take = min(int(counts[row]), available)
            if 0 < take < available:
                decisions.note(float(ranked[take - 1] - ranked[take]))
        else:
            take = 1 + int((ranked[1:available] >= threshold).sum())
            decisions.note(float((ranked[:available] - threshold).abs()[1:].min()) if available > 1 else math.inf)
        chosen = order[:take]
        window[row, chosen] = proposal[row, chosen]
        widest = max(widest, take)
    decisions.widest.append(widest)


def fast_dllm_cached(model, prompt: torch.Tensor, mode: str, *, threshold=None, steps=None):
    """Fast-dLLM's generate_with_prefix_cache / generate_with_dual_cache (mode "prefix" / "dual";
    "none": its generate, a full pass every step), greedy, low_confidence; returns (tokens,
    decisions)."""
    batch = prompt.shape[0]
    x = torch.cat([prompt, torch.full((batch, GEN_LENGTH), MASK)], dim=1)
    num_blocks = GEN_LENGTH // BLOCK_LENGTH
    steps_per_block = None if steps is None else steps // num_blocks
    decisions, kv = Decisions(), LayerKV()
    for block in range(num_blocks):
        start = PROMPT_LEN + block * BLOCK_LENGTH
        end = start + BLOCK_LENGTH
        counts = None if threshold is not None else linear_schedule(x[:, start:end] == MASK, steps_per_block)
        step = 0
        while (x[:, start:end] == MASK).any():
            if step == 0 or mode == "none":
                logits, first = full_pass(model, x, kv), 0
            elif mode == "prefix":
                logits, first = prefix_step(model, x, kv, start), start
            else:
                logits, first = dual_step(model, x, kv, start, end), start
            unmask(x, logits, first, end, decisions, threshold, None if counts is None else counts[:, step])
            decisions.history.append(x.clone())
            step += 1
    return x, decisions


# ----------------------------------------------------------------------------------- tests
@torch.no_grad()
@pytest.mark.parametrize("seed", SEEDS)
def test_transcribed_forward_is_the_model(seed):
    """The hand-run layers compute the model's logits (so a token mismatch below is the cache's)."""
    model, prompt = denoiser(seed), prompts(seed + 1)
    x = torch.cat([prompt, torch.full((BATCH, GEN_LENGTH), MASK)], dim=1)
    assert_fp32_close(full_pass(model, x, LayerKV()), model(x), "logits")


SAMPLERS = {
    "threshold": (lambda: FastDLLM(GEN_LENGTH, BLOCK_LENGTH, threshold=THRESHOLD, mask_token_id=MASK),
                  dict(threshold=THRESHOLD)),
    "fixed_k": (lambda: LLaDA(12, GEN_LENGTH, BLOCK_LENGTH, mask_token_id=MASK), dict(steps=12)),
}


@torch.no_grad()
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
@pytest.mark.parametrize("rule", list(SAMPLERS))
def test_cache_mode_equals_fast_dllm_loop(cache, rule, seed):
    """Token for token and step by step; "none" (every step a full pass, Fast-dLLM's plain
    ``generate``) checks the transcribed decoding rule apart from any cache."""
    model, prompt = denoiser(seed), prompts(seed + 1)
    make_sampler, kwargs = SAMPLERS[rule]
    expected, decisions = fast_dllm_cached(model, prompt, cache, **kwargs)
    assert decisions.margin > DECISION_MARGIN, f"a transcribed decision is within {decisions.margin:.2g} of a tie"
    assert not (expected == MASK).any()
    history = []  # the tokens after every step
    out = generate(model, prompt, make_sampler(), cache=cache,
                   callback=lambda step, total, x: history.append(x.clone()))
    assert torch.equal(out, expected), f"tokens differ at {(out != expected).nonzero().tolist()}"
    # The same columns unmasked in the same order, in as many steps.
    assert len(history) == len(decisions.history)
    for step, (got, want) in enumerate(zip(history, decisions.history)):
        assert torch.equal(got, want), f"step {step}: tokens differ at {(got != want).nonzero().tolist()}"


@torch.no_grad()
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("rule", list(SAMPLERS))
def test_the_approximation_is_exercised(rule, seed):
    """On these models the cache modes give other tokens than the exact loop (else the test above
    could not tell a stale cache from a fresh one), and prefix other tokens than dual (else it
    could not tell the suffix's cached K/V from recomputed ones)."""
    model, prompt = denoiser(seed), prompts(seed + 1)
    make_sampler, _ = SAMPLERS[rule]
    exact, prefix, dual = (generate(model, prompt, make_sampler(), cache=cache) for cache in ("none", "prefix", "dual"))
    assert not torch.equal(prefix, exact) and not torch.equal(dual, exact) and not torch.equal(prefix, dual)


@torch.no_grad()
def test_the_threshold_rule_is_exercised():
    """Some steps unmask several columns of a row at once, others a single one."""
    _, decisions = fast_dllm_cached(denoiser(SEEDS[0]), prompts(SEEDS[0] + 1), "dual", threshold=THRESHOLD)
    assert max(decisions.widest) > 1 and min(decisions.widest) == 1
