"""Step samplers against independent implementations of their published algorithms.

Each reference below is written from the paper / published code (LLaDA's ``generate``, Fast-dLLM's
``get_transfer_index``, Dream's ``_sample``, MDLM's ancestral update, Eso-LM's
``generate_samples``) with plain torch ops on full-sequence logits, and draws its randomness from
the documented Philox streams (dlmfuse.samplers.base) via dlmfuse.reference.sampling.gumbel_uniforms,
so the same seed must give identical tokens. The model is a tiny deterministic bidirectional
stand-in with DenoiserLM's forward signature (positions, mask, logits_for).
"""

from __future__ import annotations

import doctest
import importlib
import math

import pytest
import torch
import torch.nn.functional as F

import dlmfuse
from dlmfuse.generate import generate
from dlmfuse.reference.sampling import gumbel_uniforms
from dlmfuse.samplers import Dream, EsoLM, FastDLLM, LLaDA, MDLM, transfer_schedule

VOCAB = 32
MASK = VOCAB - 1
STREAMS = 4  # offset = STREAMS * (step + 1) + stream
TOKENS, CONFIDENCE, TRANSFER, ORDER = 0, 1, 2, 3


# ---------------------------------------------------------------------------------- the model
class ToyDenoiser(torch.nn.Module):
    """Embedding + position embedding, one bidirectional attention layer (honours Mask labels and
    positions), a tanh MLP and an LM head. Records every call's (batch, fed rows, logits_for)."""

    def __init__(self, vocab: int = VOCAB, hidden: int = 16, max_len: int = 64, seed: int = 0, head_scale: float = 1.5):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = torch.nn.Parameter(torch.randn(vocab, hidden, generator=g))
        self.pos = torch.nn.Parameter(torch.randn(max_len, hidden, generator=g) * 0.5)
        self.wq, self.wk, self.wv, self.w1 = (torch.nn.Parameter(torch.randn(hidden, hidden, generator=g) / hidden**0.5)
                                              for _ in range(4))
        self.head = torch.nn.Parameter(torch.randn(hidden, vocab, generator=g) * head_scale)
        self.calls = []

    def forward(self, input_ids, positions=None, mask=None, cache=None, logits_for=None):
        assert cache is None
        batch, length = input_ids.shape
        pos = torch.arange(length).expand(batch, length) if positions is None else positions.expand(batch, length)
        h = self.emb[input_ids] + self.pos[pos]
        scores = (h @ self.wq) @ (h @ self.wk).transpose(1, 2) / h.shape[-1] ** 0.5
        if mask is not None:
            scores = scores.masked_fill(~mask.to_dense().expand(batch, -1, -1), -math.inf)
        attn = torch.nan_to_num(torch.softmax(scores, dim=-1))
        h = h + attn @ (h @ self.wv)
        h = h + torch.tanh(h @ self.w1)
        logits = h @ self.head
        self.calls.append(dict(batch=batch, length=length, logits_for=None if logits_for is None else logits_for.clone(),
                               mask=mask, ids=input_ids.clone()))
        if logits_for is not None:
            logits = logits.gather(1, logits_for[..., None].expand(-1, -1, logits.shape[-1]))
        return logits


@pytest.fixture
def model():
    """Peaked: many proposals have p within 1e-7 of 1 (LLaDA's float64 confidences must order them)."""
    return ToyDenoiser()


@pytest.fixture
def soft_model():
    """Less peaked, for samplers whose confidences are float32 (Dream): no float32 ties."""
    return ToyDenoiser(head_scale=0.4)


def prompts(batch: int = 2, length: int = 5, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, MASK, (batch, length), generator=torch.Generator().manual_seed(seed))


def run(sampler, model, prompt, seed: int = 0):
    """Drive the sampler directly with model(x, logits_for=rows); returns (x, unmasked per step)."""
    x = torch.cat([prompt, torch.full((prompt.shape[0], sampler.gen_length), sampler.mask_token_id)], dim=1)
    state = sampler.start(x, prompt.shape[1], seed=seed)

    def forward(rows, mask=None):
        return model(state.x, logits_for=rows) if mask is None else model(state.x, mask=mask, logits_for=rows)

    per_step = []
    while not state.done:
        per_step.append(sampler.step(state, forward))
    return state.x, per_step, state


# ----------------------------------------------------------------------- documented randomness
def offset(step: int, stream: int) -> int:
    return STREAMS * (step + 1) + stream


def token_noise(selected: torch.Tensor, seed: int, step: int) -> torch.Tensor:
    """float64 [B, L, V] uniforms for Gumbel-max: the i-th selected column (ascending) of row b
    reads Philox row b * n + i (n = the largest count), offset of stream TOKENS; 0.5 elsewhere."""
    batch, length = selected.shape
    n = int(selected.sum(1).max())
    noise = torch.full((batch, length, VOCAB), 0.5, dtype=torch.float64)
    if n == 0:
        return noise
    u = gumbel_uniforms(batch * n, VOCAB, seed, offset(step, TOKENS))
    for b in range(batch):
        for i, col in enumerate(selected[b].nonzero().flatten().tolist()):
            noise[b, col] = u[b * n + i]
    return noise


def column_uniforms(batch: int, length: int, seed: int, step: int, stream: int) -> torch.Tensor:
    """float64 [B, L]: the uniform of `stream` for row b, column j of x."""
    return gumbel_uniforms(batch, length, seed, offset(step, stream))


def add_gumbel_noise(logits, temperature, noise):
    """LLaDA's float64 Gumbel trick with given uniforms."""
    if temperature == 0:
        return logits
    logits = logits.to(torch.float64)
    return logits.exp() / (-torch.log(noise)) ** temperature


# ----------------------------------------------------------------------------------- LLaDA
def get_num_transfer_tokens(mask_index, steps):
    """LLaDA's schedule, as published (a Python loop over rows)."""
    mask_num = mask_index.sum(dim=1, keepdim=True)
    base, remainder = mask_num // steps, mask_num % steps
    num = torch.zeros(mask_num.size(0), steps, dtype=torch.int64) + base
    for i in range(mask_num.size(0)):
        num[i, :remainder[i]] += 1
    return num


def llada_reference(model, prompt, steps, gen_length, block_length, temperature=0.0, cfg_scale=0.0,
                    remasking="low_confidence", mask_id=MASK, seed=0, suppress=None):
    """A literal transcription of LLaDA's published ``generate`` (full-sequence logits every step)."""
    batch, plen = prompt.shape
    x = torch.full((batch, plen + gen_length), mask_id, dtype=torch.long)
    x[:, :plen] = prompt.clone()
    prompt_index = x != mask_id
    num_blocks = gen_length // block_length
    steps = steps // num_blocks
    global_step = 0
    for num_block in range(num_blocks):
        start, end = plen + num_block * block_length, plen + (num_block + 1) * block_length
        block_mask_index = x[:, start:end] == mask_id
        num_transfer_tokens = get_num_transfer_tokens(block_mask_index, steps)
        for i in range(steps):
            mask_index = x == mask_id
            if cfg_scale > 0.0:
                un_x = x.clone()
                un_x[prompt_index] = mask_id
                logits = model(torch.cat([x, un_x], dim=0))
                logits, un_logits = torch.chunk(logits, 2, dim=0)
                logits = un_logits + (cfg_scale + 1) * (logits - un_logits)
            else:
                logits = model(x)
            if suppress:
                logits[:, :, list(suppress)] = -torch.inf
            before_end = torch.zeros_like(mask_index)
            before_end[:, :end] = True
            noise = token_noise(mask_index & before_end, seed, global_step)
            x0 = torch.argmax(add_gumbel_noise(logits, temperature, noise), dim=-1)
            if remasking == "low_confidence":
                p = F.softmax(logits.to(torch.float64), dim=-1)
                x0_p = torch.gather(p, dim=-1, index=x0.unsqueeze(-1)).squeeze(-1)
            else:
                x0_p = column_uniforms(batch, x.shape[1], seed, global_step, CONFIDENCE)
            x0_p[:, end:] = -math.inf
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, -math.inf)
            transfer_index = torch.zeros_like(x0, dtype=torch.bool)
            for j in range(confidence.shape[0]):
                _, select_index = torch.topk(confidence[j], k=int(num_transfer_tokens[j, i]))
                transfer_index[j, select_index] = True
            x[transfer_index] = x0[transfer_index]
            global_step += 1
    return x


@pytest.mark.parametrize("steps, gen_length, block_length", [(8, 16, 8), (6, 12, 12), (32, 16, 4)])
def test_llada_greedy_matches_published_loop(model, steps, gen_length, block_length):
    prompt = prompts()
    sampler = LLaDA(steps, gen_length, block_length, mask_token_id=MASK)
    out, _, _ = run(sampler, model, prompt)
    assert torch.equal(out, llada_reference(model, prompt, steps, gen_length, block_length))


@pytest.mark.parametrize("temperature, remasking, cfg_scale", [
    (0.0, "low_confidence", 0.7), (1.0, "low_confidence", 0.0), (0.5, "random", 0.0), (0.0, "random", 1.5)])
def test_llada_sampling_matches_published_loop(model, temperature, remasking, cfg_scale):
    prompt = prompts(3)
    kw = dict(temperature=temperature, remasking=remasking, cfg_scale=cfg_scale)
    sampler = LLaDA(8, 16, 8, mask_token_id=MASK, **kw)
    if cfg_scale > 0:  # CFG lives in generate (the unconditional pass masks the prompt)
        out = generate(model, prompt, sampler, seed=11)
    else:
        out, _, _ = run(sampler, model, prompt, seed=11)
    assert torch.equal(out, llada_reference(model, prompt, 8, 16, 8, seed=11, **kw))


def test_llada_mask_tokens_in_the_prompt_are_candidates_as_in_the_published_loop(model):
    prompt = prompts(2, 6)
    prompt[0, 2] = prompt[1, 4] = MASK  # LLaDA fills every masked column before the block's end
    for cfg_scale in (0.0, 0.5):
        sampler = LLaDA(8, 16, 8, cfg_scale=cfg_scale, mask_token_id=MASK)
        out = generate(model, prompt, sampler)
        assert torch.equal(out, llada_reference(model, prompt, 8, 16, 8, cfg_scale=cfg_scale))


def test_llada_suppress_tokens(model):
    prompt = prompts()
    greedy = run(LLaDA(8, 16, 8, mask_token_id=MASK), model, prompt)[0]
    banned = sorted(set(greedy[:, 5:].flatten().tolist()))[:2]  # tokens the model likes
    sampler = LLaDA(8, 16, 8, temperature=0.8, mask_token_id=MASK, suppress_tokens=banned)
    out, _, _ = run(sampler, model, prompt, seed=3)
    assert not torch.isin(out[:, 5:], torch.tensor(banned)).any()
    assert torch.equal(out, llada_reference(model, prompt, 8, 16, 8, temperature=0.8, seed=3, suppress=banned))


def test_llada_transfer_counts_follow_schedule(model):
    steps, gen_length, block_length = 12, 20, 10  # 6 steps per block of 10: counts 2,2,2,2,1,1
    _, per_step, state = run(LLaDA(steps, gen_length, block_length, mask_token_id=MASK), model, prompts(2))
    counts = torch.stack([w.sum(1) for w in per_step], dim=1)  # [B, steps]
    expected = [block_length // 6 + (1 if i < block_length % 6 else 0) for i in range(6)] * 2
    assert counts.tolist() == [expected, expected]
    assert state.network_calls == steps
    mask_num = torch.tensor([7, 0, 12, 5])
    assert torch.equal(transfer_schedule(mask_num, 5), get_num_transfer_tokens(torch.arange(12) < mask_num[:, None], 5))


def test_llada_skips_the_network_when_no_column_transfers(model):
    # 16 steps for blocks of 4: 12 steps per block transfer nothing and call nothing.
    out, per_step, state = run(LLaDA(32, 8, 4, mask_token_id=MASK), model, prompts())
    assert len(per_step) == 32 and state.network_calls == 8
    assert torch.equal(out, llada_reference(model, prompts(), 32, 8, 4))


def test_llada_requests_only_masked_block_rows(model):
    prompt = prompts()
    run(LLaDA(8, 16, 8, mask_token_id=MASK), model, prompt)
    for call in model.calls:
        rows, ids = call["logits_for"], call["ids"]
        block = (rows.min() - 5) // 8
        assert bool(((rows - 5) // 8 == block).all())  # within one block
        assert bool((ids.gather(1, rows) == MASK).all())  # still masked
    assert [c["logits_for"].shape[1] for c in model.calls] == [8, 6, 4, 2] * 2  # 4 steps per block of 8


# ------------------------------------------------------------------------------- Fast-dLLM
def fast_dllm_reference(model, prompt, gen_length, block_length, threshold=None, factor=None, mask_id=MASK):
    """Fast-dLLM's no-cache generate (greedy, low_confidence): threshold per get_transfer_index; the
    factor rule as the longest prefix with c(m) >= 1 - factor / (m + 1); the proposal is never the
    mask token (its confidence is still the full-softmax probability)."""
    batch, plen = prompt.shape
    x = torch.full((batch, plen + gen_length), mask_id, dtype=torch.long)
    x[:, :plen] = prompt
    steps = 0
    for nb in range(gen_length // block_length):
        start, end = plen + nb * block_length, plen + (nb + 1) * block_length
        while (x[:, start:end] == mask_id).any():
            mask_index = x == mask_id
            mask_index[:, end:] = False
            logits = model(x)
            x0 = logits.masked_fill(torch.arange(VOCAB) == mask_id, -math.inf).argmax(-1)  # never the mask
            x0_p = F.softmax(logits.to(torch.float64), dim=-1).gather(-1, x0[..., None]).squeeze(-1)
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, -math.inf)
            transfer = torch.zeros_like(x0, dtype=torch.bool)
            num = mask_index.sum(1)
            for j in range(batch):
                if num[j] == 0:
                    continue
                values, select = torch.topk(confidence[j], k=int(num[j]))
                if threshold is not None:
                    keep = [0] + [m for m in range(1, int(num[j])) if values[m] >= threshold]
                else:
                    keep = [0]
                    for m in range(1, int(num[j])):
                        if values[m] < 1 - factor / (m + 2):
                            break
                        keep.append(m)
                transfer[j, select[keep]] = True
            x[transfer] = x0[transfer]
            steps += 1
    return x, steps


@pytest.mark.parametrize("rule", [dict(threshold=0.3), dict(threshold=0.05), dict(factor=1.0), dict(factor=3.0)])
def test_fast_dllm_matches_reference(model, rule):
    prompt = prompts(3)
    out, per_step, state = run(FastDLLM(16, 8, mask_token_id=MASK, **rule), model, prompt)
    ref, ref_steps = fast_dllm_reference(model, prompt, 16, 8, **rule)
    assert torch.equal(out, ref)
    assert len(per_step) == ref_steps == state.network_calls
    assert 2 <= ref_steps <= 16


def test_fast_dllm_threshold_invariants(model):
    prompt = prompts(2)
    sampler = FastDLLM(16, 8, threshold=0.2, mask_token_id=MASK)
    x = torch.cat([prompt, torch.full((2, 16), MASK)], dim=1)
    state = sampler.start(x, 5)
    seen = {}

    def forward(rows):
        seen["rows"], seen["logits"] = rows, model(state.x, logits_for=rows)
        return seen["logits"]

    while not state.done:
        before = state.x.clone()
        written = sampler.step(state, forward)
        probs = F.softmax(seen["logits"].double(), -1)
        proposal = probs.masked_fill(torch.arange(VOCAB) == MASK, -1).argmax(-1)  # never the mask token
        conf = probs.gather(-1, proposal[..., None]).squeeze(-1)
        for b in range(2):
            masked = before[b].gather(0, seen["rows"][b]) == MASK
            if not masked.any():
                assert not written[b].any()
                continue
            taken = written[b].gather(0, seen["rows"][b]) & masked
            assert taken.sum() >= 1  # always the top-1
            assert bool((conf[b][masked & ~taken] < 0.2).all())  # every one above the threshold is taken
            assert taken.sum() == 1 or bool((conf[b][taken] >= 0.2).all())


def test_fast_dllm_never_proposes_the_mask_token():
    """A model whose favourite is the mask token: Fast-dLLM's loop would never end; this one does."""
    def forward(rows):
        logits = torch.zeros(*rows.shape, VOCAB)
        logits[..., MASK] = 5.0
        logits[..., 7] = 1.0
        return logits

    sampler = FastDLLM(8, 4, threshold=0.9, mask_token_id=MASK)
    state = sampler.start(torch.cat([prompts(2, 3), torch.full((2, 8), MASK)], dim=1), 3)
    while not state.done:
        sampler.step(state, forward)
    assert state.x[:, 3:].eq(7).all() and state.step == 8  # confidence ~0.02 < 0.9: one per step


# ------------------------------------------------------------------------------------- Dream
def dream_reference(model, prompt, steps, gen_length, alg, alg_temp=0.0, eps=1e-3, temperature=0.0,
                    top_p=None, top_k=None, seed=0, mask_id=MASK):
    """Dream's _sample from the formulas (shifted logits, float32 time grid)."""
    batch, plen = prompt.shape
    x = torch.cat([prompt, torch.full((batch, gen_length), mask_id)], dim=1)
    timesteps = torch.linspace(1, eps, steps + 1)
    for i in range(steps):
        mask_index = x == mask_id
        logits = model(x)
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1).double()
        t, s = timesteps[i], timesteps[i + 1]
        if temperature > 0:
            logits = logits / temperature
        if top_p is not None:
            sorted_logits, idx = logits.sort(-1, descending=True)
            remove = sorted_logits.softmax(-1).cumsum(-1) > top_p
            remove[..., 1:] = remove[..., :-1].clone()
            remove[..., 0] = False
            logits = logits.masked_fill(torch.zeros_like(remove).scatter(-1, idx, remove), -math.inf)
        if top_k is not None:
            logits = logits.masked_fill(logits < logits.topk(top_k)[0][..., -1:], -math.inf)
        probs = logits.softmax(-1)
        if alg == "origin":
            p_transfer = 1 - s / t if i < steps - 1 else 1
            transfer = mask_index & (column_uniforms(batch, x.shape[1], seed, i, TRANSFER) < float(p_transfer))
            noise = token_noise(transfer, seed, i)
            x0 = (logits + (-torch.log(-torch.log(noise))) * (temperature > 0)).argmax(-1)
            x = torch.where(transfer, x0, x)
            continue
        noise = token_noise(mask_index, seed, i)
        x0 = (logits + (-torch.log(-torch.log(noise))) * (temperature > 0)).argmax(-1)
        if alg == "maskgit_plus":
            confidence = probs.gather(-1, x0[..., None]).squeeze(-1)
        elif alg == "topk_margin":
            top2 = probs.topk(2, dim=-1).values
            confidence = top2[..., 0] - top2[..., 1]
        else:
            confidence = torch.xlogy(probs, probs).sum(-1)  # Dream adds 1e-10 inside the log
        num_mask_token = mask_index.sum() / mask_index.shape[0]
        number = int(num_mask_token * (1 - s / t)) if i < steps - 1 else int(num_mask_token)
        # Confidences are float32 (sample_tokens; Dream itself works in the model dtype); equal
        # ones go to the lower column (select_unmask's documented tie rule).
        full_confidence = torch.where(mask_index, confidence.float().double(), -math.inf)
        if alg_temp > 0:  # Gumbel-top-k = sampling without replacement from softmax(conf / alg_temp)
            u = column_uniforms(batch, x.shape[1], seed, i, CONFIDENCE)
            full_confidence = full_confidence / alg_temp - torch.log(-torch.log(u))
        if number > 0:
            transfer_index = full_confidence.sort(dim=1, descending=True, stable=True).indices[:, :number]
            rows = torch.arange(batch)[:, None].expand_as(transfer_index)
            x[rows, transfer_index] = x0[rows, transfer_index]
    return x


@pytest.mark.parametrize("alg", ["origin", "maskgit_plus", "topk_margin", "entropy"])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_dream_matches_reference(soft_model, alg, temperature):
    prompt = prompts(2)
    sampler = Dream(6, 12, mask_token_id=MASK, alg=alg, temperature=temperature)
    out, _, _ = run(sampler, soft_model, prompt, seed=5)
    assert torch.equal(out, dream_reference(soft_model, prompt, 6, 12, alg, temperature=temperature, seed=5))


def test_dream_alg_temp_top_p_top_k(soft_model):
    prompt = prompts(2)
    kw = dict(alg="maskgit_plus", alg_temp=0.3, temperature=0.9, top_p=0.9, top_k=5)
    out, _, _ = run(Dream(5, 10, mask_token_id=MASK, **kw), soft_model, prompt, seed=2)
    assert torch.equal(out, dream_reference(soft_model, prompt, 5, 10, seed=2, **kw))


def test_dream_shift_logits_reads_the_previous_row(soft_model):
    prompt = prompts(1)
    run(Dream(4, 8, mask_token_id=MASK, alg="entropy"), soft_model, prompt)
    first = soft_model.calls[0]["logits_for"]
    assert first.tolist() == [list(range(4, 12))]  # masked columns 5..12 read rows 4..11
    soft_model.calls.clear()
    run(Dream(4, 8, mask_token_id=MASK, alg="entropy", shift_logits=False), soft_model, prompt)
    assert soft_model.calls[0]["logits_for"].tolist() == [list(range(5, 13))]


def test_dream_unmask_counts(soft_model):
    _, per_step, _ = run(Dream(5, 16, mask_token_id=MASK, alg="topk_margin"), soft_model, prompts(2))
    timesteps, masked, expected = torch.linspace(1, 1e-3, 6), 16, []
    for i in range(5):
        k = masked if i == 4 else int(torch.tensor(float(masked)) * (1 - timesteps[i + 1] / timesteps[i]))
        expected.append(k)
        masked -= k
    assert [w.sum(1).tolist() for w in per_step] == [[k, k] for k in expected]


# -------------------------------------------------------------------------------------- MDLM
def test_mdlm_matches_ancestral_formula(model):
    prompt, steps, gen_length, seed = prompts(2), 10, 12, 4
    out, per_step, state = run(MDLM(steps, gen_length, mask_token_id=MASK), model, prompt, seed=seed)
    x = torch.cat([prompt, torch.full((2, gen_length), MASK)], dim=1)
    calls = 0
    for i in range(steps):
        t, s = 1 - i / steps, 1 - (i + 1) / steps
        alpha_t, alpha_s = 1 - t, 1 - s
        p = (alpha_s - alpha_t) / (1 - alpha_t)
        unmask = (x == MASK) & (column_uniforms(2, x.shape[1], seed, i, TRANSFER) < p)
        assert torch.equal(per_step[i], unmask)
        if unmask.any():
            calls += 1
            logits = model(x).double()
            logits[..., MASK] = -math.inf  # SUBS: the mask token is never predicted
            x0 = (logits - torch.log(-torch.log(token_noise(unmask, seed, i)))).argmax(-1)
            x = torch.where(unmask, x0, x)
    assert torch.equal(out, x) and not (out == MASK).any()
    assert state.network_calls == calls < steps  # empty steps called nothing


def test_mdlm_counts_are_binomial():
    """Unmasked counts per step ~ Binomial(masked, p): check mean over many seeds (no model needed)."""
    sampler = MDLM(4, 64, mask_token_id=MASK)
    first_step = []

    def forward(rows):
        return torch.zeros(*rows.shape, VOCAB)

    for seed in range(40):
        x = torch.cat([torch.zeros(1, 1, dtype=torch.long), torch.full((1, 64), MASK)], dim=1)
        state = sampler.start(x, 1, seed=seed)
        first_step.append(int(sampler.step(state, forward).sum()))
    mean, sd = 64 * 0.25, math.sqrt(64 * 0.25 * 0.75 / 40)
    assert abs(sum(first_step) / 40 - mean) < 4 * sd


# ------------------------------------------------------------------------------------ Eso-LM
@pytest.mark.parametrize("variant, alpha_0", [("B", 1.0), ("B", 0.5), ("A", 0.6), ("A", 0.0)])
def test_eso_two_phases_match_reference(model, variant, alpha_0):
    prompt, steps, gen_length, seed = prompts(2, 4), 6, 10, 9
    out, per_step, state = run(EsoLM(steps, gen_length, mask_token_id=MASK, alpha_0=alpha_0, variant=variant),
                               model, prompt, seed=seed)
    # Counts: k_j ~ Binomial(remaining, (a_s - a_t) / (1 - a_t)), a_t = alpha_0 (1 - t), zeros dropped.
    counts, remaining = [], gen_length
    for j in range(steps):
        t = 1 - j / steps
        s = t - 1 / steps
        a_t, a_s = alpha_0 * (1 - t), alpha_0 * (1 - s)
        coins = gumbel_uniforms(1, gen_length, seed, offset(j, TRANSFER))[0, :remaining]
        k = int((coins < (a_s - a_t) / (1 - a_t)).sum())
        if k:
            counts.append(k)
            remaining -= k
    chunks = counts + [1] * remaining
    assert [int(w.sum(1)[0]) for w in per_step] == chunks and all(int(w.sum(1)[1]) == c for w, c in zip(per_step, chunks))
    assert state.network_calls == len(chunks) == len(model.calls)  # zero-count steps skipped
    # Order: a random order of the diffusion tokens, then left to right.
    diffusion = sum(counts)
    perm = gumbel_uniforms(2, gen_length, seed, offset(-1, ORDER)).argsort(1)
    order = torch.cat([perm[:, :diffusion], perm[:, diffusion:].sort(1).values], 1)
    rank = torch.arange(4 + gen_length).repeat(2, 1)
    rank[:, 4:] = 4 + order.argsort(1)
    x = torch.cat([prompt, torch.full((2, gen_length), MASK)], dim=1)
    first = 0
    for c, k in enumerate(chunks):
        cols = 4 + order[:, first:first + k]
        clean = rank < 4 + min(first, diffusion)
        if variant == "B":  # causal in the order
            visible = rank[:, None, :] <= rank[:, :, None]
        else:  # clean bidirectional; masks causal in the order, seeing every clean token
            visible = (clean[:, None, :] & clean[:, :, None]) | (rank[:, None, :] <= rank[:, :, None])
        seen = model.calls[c]["mask"].to_dense().expand(2, -1, -1)
        assert torch.equal(seen, visible)
        logits = model(x, mask=model.calls[c]["mask"]).double()
        logits[..., MASK] = -math.inf
        selected = torch.zeros_like(x, dtype=torch.bool).scatter(1, cols, True)
        # Token noise rows follow the order of the chunk's columns as requested (here: as listed).
        u = gumbel_uniforms(2 * k, VOCAB, seed, offset(c, TOKENS)).view(2, k, VOCAB)
        tokens = (logits.gather(1, cols[..., None].expand(-1, -1, VOCAB)) - torch.log(-torch.log(u))).argmax(-1)
        x = x.scatter(1, cols, tokens)
        assert torch.equal(per_step[c], selected)
        first += k
    assert torch.equal(out, x)


# ------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("make, error, text", [
    (lambda: LLaDA(8, 10, 4, mask_token_id=MASK), ValueError, "10"),
    (lambda: LLaDA(3, 16, 8, mask_token_id=MASK), ValueError, "3"),
    (lambda: LLaDA(8, 16, 8, remasking="top", mask_token_id=MASK), ValueError, "'top'"),
    (lambda: LLaDA(8.0, 16, 8, mask_token_id=MASK), TypeError, "8.0"),
    (lambda: LLaDA(8, 16, 8, temperature=-1.0, mask_token_id=MASK), ValueError, "-1.0"),
    (lambda: LLaDA(8, 16, 8, cfg_scale="2", mask_token_id=MASK), TypeError, "'2'"),
    (lambda: LLaDA(0, 16, 8, mask_token_id=MASK), ValueError, "0"),
    (lambda: LLaDA(8, 16, 8, mask_token_id=-3), ValueError, "-3"),
    (lambda: LLaDA(8, 16, 8, mask_token_id=MASK, suppress_tokens=[1, -2]), ValueError, "-2"),
    (lambda: FastDLLM(16, 8, mask_token_id=MASK), ValueError, "threshold=None"),
    (lambda: FastDLLM(16, 8, threshold=0.9, factor=1.0, mask_token_id=MASK), ValueError, "factor=1.0"),
    (lambda: FastDLLM(16, 8, factor=0.0, mask_token_id=MASK), ValueError, "0.0"),
    (lambda: FastDLLM(16, 8, threshold=1.5, mask_token_id=MASK), ValueError, "<= 1.0, got 1.5"),
    (lambda: Dream(4, 8, alg="greedy", mask_token_id=MASK), ValueError, "'greedy'"),
    (lambda: Dream(4, 8, top_p=1.5, mask_token_id=MASK), ValueError, "1.5"),
    (lambda: Dream(4, 8, top_k=0, mask_token_id=MASK), ValueError, "0"),
    (lambda: Dream(4, 8, shift_logits=1, mask_token_id=MASK), TypeError, "int"),
    (lambda: MDLM(4, 8, mask_token_id=MASK, temperature=float("nan")), ValueError, "nan"),
    (lambda: EsoLM(4, 8, mask_token_id=MASK, alpha_0=1.5), ValueError, "1.5"),
    (lambda: EsoLM(4, 8, mask_token_id=MASK, variant="C"), ValueError, "'C'"),
])
def test_bad_arguments_name_the_value(make, error, text):
    with pytest.raises(error, match=text.replace("(", r"\(").replace(".", r"\.")):
        make()


def test_bad_start_and_finished_step():
    sampler = LLaDA(4, 8, 4, mask_token_id=MASK)
    with pytest.raises(ValueError, match="13"):
        sampler.start(torch.zeros(1, 13, dtype=torch.long), 3)
    with pytest.raises(TypeError, match="float32"):
        sampler.start(torch.zeros(1, 11), 3)
    with pytest.raises(ValueError, match="-1"):
        sampler.start(torch.zeros(1, 8, dtype=torch.long), 0, seed=-1)
    state = sampler.start(torch.full((1, 8), MASK), 0)
    while not state.done:
        sampler.step(state, lambda rows: torch.zeros(*rows.shape, VOCAB))
    with pytest.raises(RuntimeError, match="finished"):
        sampler.step(state, lambda rows: torch.zeros(*rows.shape, VOCAB))


@pytest.mark.parametrize("module", ["samplers", "samplers.llada", "samplers.fast_dllm", "samplers.dream",
                                    "samplers.mdlm", "samplers.eso"])
def test_docstring_examples(module):
    result = doctest.testmod(importlib.import_module(f"dlmfuse.{module}"), optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
