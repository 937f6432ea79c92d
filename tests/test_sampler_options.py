"""Every sampler option has a value test (issue 21, item 4): each option changes the tokens or the
selection exactly as its published algorithm says, computed here independently of the sampler.

- FastDLLM ``threshold``: the rule is ``confidence >= threshold``, checked at exact equality (a
  probability of exactly 1/2 against threshold 0.5) and at threshold 1.0 with saturated
  confidences (probability exactly 1.0); ``temperature > 0``: the tokens are
  ``dlmfuse.sample_tokens`` of the step's logits with the documented seed / offset.
- LLaDA ``remasking="random"``: the k columns with the largest CONFIDENCE-stream uniforms;
  ``cfg_scale``: the logits are ``un + (w + 1)(cond - un)``, the unconditional pass with the
  prompt replaced by mask tokens.
- Dream ``eps``: the time grid ``linspace(1, eps, steps + 1)`` decides every step's count (and
  ``origin``'s unmasking probability) as in Dream's ``_sample``; ``alg_temp``: the unmasked
  columns are drawn by ``softmax(confidence / alg_temp)`` (exactly: Gumbel-top-k with the
  CONFIDENCE stream; in distribution: a chi-square test of the first pick).
- MDLM: the number of columns unmasked per step over a whole generation follows the log-linear
  schedule (chi-square, fixed seed).

Samplers are driven directly (``start`` / ``step``) with a forward that returns a fixed table of
logits, so every expected value is a short computation on known numbers. Random streams follow
dlmfuse.samplers.base: offset ``4 * (step + 1) + stream``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import dlmfuse
from dlmfuse.generate import generate
from dlmfuse.reference.sampling import gumbel_uniforms
from dlmfuse.samplers import Dream, FastDLLM, LLaDA, MDLM

from conftest import assert_fp32_close

VOCAB = 16
MASK = VOCAB - 1
STREAMS = 4
TOKENS, CONFIDENCE, TRANSFER = 0, 1, 2
#: Far below any other logit: exp(FAR - 0) is exactly 0 in float64, so a probability built from
#: logits 0 and FAR is an exact fraction.
FAR = -1000.0
#: Chi-square critical values at p = 0.001 (the seeds are fixed: each test is deterministic).
CHI2_999 = {7: 24.322}


# ---------------------------------------------------------------------------------- helpers
def offset(step: int, stream: int) -> int:
    return STREAMS * (step + 1) + stream


class TableForward:
    """``forward(rows) -> table[b, rows[b, i]]``: the logits of a model that ignores its input."""

    def __init__(self, table: torch.Tensor):
        self.table = table  # [B, L, V] float32

    def __call__(self, rows: torch.Tensor, mask=None) -> torch.Tensor:
        return self.table.gather(1, rows[..., None].expand(-1, -1, self.table.shape[-1]))


def random_table(batch: int, length: int, scale: float, seed: int) -> torch.Tensor:
    """Random logits ``[B, L, V]``; the mask token's logit is far below (never proposed)."""
    table = torch.randn(batch, length, VOCAB, generator=torch.Generator().manual_seed(seed)) * scale
    table[..., MASK] = -30.0
    return table


def fresh_state(sampler, batch: int, prompt_len: int, seed: int = 0):
    """The sampler's state for random prompts followed by its gen_length mask tokens."""
    prompt = torch.randint(0, MASK, (batch, prompt_len), generator=torch.Generator().manual_seed(seed + 100))
    x = torch.cat([prompt, torch.full((batch, sampler.gen_length), MASK)], dim=1)
    return sampler.start(x, prompt_len, seed=seed)


def exact_column(token: int, *, tied_with_mask: bool = False, runner_up=None) -> torch.Tensor:
    """One column of logits: ``token`` at 0, the rest at FAR; the mask token tied with it makes its
    probability exactly 1/2 (FastDLLM never proposes the mask, but counts it in the softmax);
    ``runner_up = (id, logit)`` lowers it below 1/2."""
    column = torch.full((VOCAB,), FAR)
    column[token] = 0.0
    if tied_with_mask:
        column[MASK] = 0.0
    if runner_up is not None:
        column[runner_up[0]] = runner_up[1]
    return column


def probability(column: torch.Tensor, token: int) -> float:
    return float(F.softmax(column.double(), dim=-1)[token])


def padded_candidate_rows(candidates: torch.Tensor, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row the candidate columns in ascending order, padded with ``pad`` to the batch's
    largest count (the rows a step requests, see dlmfuse.samplers.base): (rows, valid)."""
    lists = [row.nonzero().flatten().tolist() for row in candidates]
    n = max(len(cols) for cols in lists)
    rows = torch.tensor([cols + [pad] * (n - len(cols)) for cols in lists])
    valid = torch.tensor([[True] * len(cols) + [False] * (n - len(cols)) for cols in lists])
    return rows, valid


def chi_square(observed, expected) -> float:
    return sum((o - e) ** 2 / e for o, e in zip(observed, expected))


# ------------------------------------------------------------------------- FastDLLM threshold
def run_to_end(sampler, state, forward) -> list:
    """The columns written by every step (as lists of (row, column))."""
    written = []
    while not state.done:
        written.append(sampler.step(state, forward).nonzero().tolist())
    return written


def test_fast_dllm_threshold_takes_a_confidence_equal_to_it():
    """Fast-dLLM keeps a candidate unless ``confidence < threshold``: exactly 1/2 passes 0.5."""
    below = dict(tied_with_mask=True, runner_up=(9, -1.0))  # 1 / (2 + e^-1) < 1/2
    a_bit_below = dict(tied_with_mask=True, runner_up=(9, -2.0))  # 1 / (2 + e^-2): between the two
    columns = [
        [exact_column(1), exact_column(2, tied_with_mask=True), exact_column(3, tied_with_mask=True),
         exact_column(4, **below)],
        [exact_column(5, **below), exact_column(6, tied_with_mask=True), exact_column(1, **a_bit_below),
         exact_column(2, tied_with_mask=True)],
    ]
    assert probability(columns[0][1], 2) == 0.5 and probability(columns[0][0], 1) == 1.0
    assert probability(columns[1][0], 5) < probability(columns[1][2], 1) < 0.5
    prompt_len = 2
    table = torch.zeros(2, prompt_len + 4, VOCAB)
    table[:, prompt_len:] = torch.stack([torch.stack(row) for row in columns])
    sampler = FastDLLM(4, 4, threshold=0.5, mask_token_id=MASK)
    state = fresh_state(sampler, 2, prompt_len)
    written = run_to_end(sampler, state, TableForward(table))
    # Step 1: row 0 the certain column and both halves; row 1 both halves (the first is the
    # top-1, the second passes by equality). Then one below-threshold column per step.
    assert written == [[[0, 2], [0, 3], [0, 4], [1, 3], [1, 5]], [[0, 5], [1, 4]], [[1, 2]]]
    assert state.x[:, prompt_len:].tolist() == [[1, 2, 3, 4], [5, 6, 1, 2]]


def test_fast_dllm_threshold_one_takes_every_saturated_confidence():
    """Threshold 1.0: every column whose probability is exactly 1.0 goes in one step; one whose
    probability is 1 - 1e-13 waits for a step of its own."""
    prompt_len = 3
    near_one = exact_column(8, runner_up=(9, -30.0))
    assert probability(exact_column(7), 7) == 1.0 and probability(near_one, 8) < 1.0
    table = torch.zeros(2, prompt_len + 4, VOCAB)
    table[0, prompt_len:] = torch.stack([exact_column(7), near_one, exact_column(5), exact_column(6)])
    table[1, prompt_len:] = torch.stack([near_one, exact_column(4), exact_column(3), near_one])
    sampler = FastDLLM(4, 4, threshold=1.0, mask_token_id=MASK)
    state = fresh_state(sampler, 2, prompt_len)
    written = run_to_end(sampler, state, TableForward(table))
    assert written == [[[0, 3], [0, 5], [0, 6], [1, 4], [1, 5]], [[0, 4], [1, 3]], [[1, 6]]]
    assert state.x[:, prompt_len:].tolist() == [[7, 8, 5, 6], [8, 4, 3, 8]]


def test_fast_dllm_temperature_samples_with_the_documented_stream():
    """temperature > 0: the proposals are ``sample_tokens(logits, temperature, seed, offset 4(s+1))``
    over the step's requested rows; the confidence stays the untempered float64 probability."""
    batch, prompt_len, temperature, threshold, seed = 2, 3, 0.9, 0.35, 5
    sampler = FastDLLM(8, 4, threshold=threshold, temperature=temperature, mask_token_id=MASK)
    state = fresh_state(sampler, batch, prompt_len, seed=seed)
    table = random_table(batch, prompt_len + 8, 2.0, seed=1)
    forward = TableForward(table)
    step, differs_from_greedy = 0, False
    while not state.done:
        expected = state.x.clone()
        candidates = expected[:, :state.block[1]] == MASK
        rows, valid = padded_candidate_rows(candidates, pad=state.block[0])
        logits = forward(rows)
        tokens, _ = dlmfuse.sample_tokens(logits, temperature=temperature, seed=seed, offset=offset(step, TOKENS),
                                          suppress_tokens=[MASK])
        confidence = F.softmax(logits.double(), dim=-1).gather(-1, tokens[..., None]).squeeze(-1)
        assert bool(((confidence - threshold).abs() > 1e-6).all())  # no decision at float noise
        for b in range(batch):
            ranked = sorted((-float(confidence[b, i]), int(rows[b, i]), int(tokens[b, i]))
                            for i in range(rows.shape[1]) if valid[b, i])
            for rank, (minus_conf, column, token) in enumerate(ranked):
                if rank == 0 or -minus_conf >= threshold:
                    expected[b, column] = token
        differs_from_greedy |= bool((tokens != logits.argmax(-1))[valid].any())
        sampler.step(state, forward)
        assert torch.equal(state.x, expected), f"step {step}"
        step += 1
    assert differs_from_greedy  # the temperature changed at least one proposal


# -------------------------------------------------------------------------------- LLaDA options
def test_llada_random_remasking_takes_the_largest_uniforms():
    """remasking="random": per step the schedule's k candidates with the largest uniforms of
    stream CONFIDENCE (Philox row b, column = the column of x) take their greedy token."""
    batch, prompt_len, seed, steps, gen_length, block_length = 2, 3, 7, 6, 12, 6
    sampler = LLaDA(steps, gen_length, block_length, remasking="random", mask_token_id=MASK)
    state = fresh_state(sampler, batch, prompt_len, seed=seed)
    table = random_table(batch, prompt_len + gen_length, 2.0, seed=2)
    greedy, probabilities = table.argmax(-1), F.softmax(table.double(), dim=-1).amax(-1)
    per_block = steps // (gen_length // block_length)
    differs_from_low_confidence = False
    for step in range(steps):
        block_end = prompt_len + (step // per_block + 1) * block_length
        k = block_length // per_block  # 2 per step: the block's 6 masks over its 3 steps
        expected = state.x.clone()
        candidates = expected[:, :block_end] == MASK
        uniforms = gumbel_uniforms(batch, expected.shape[1], seed, offset(step, CONFIDENCE))[:, :block_end]
        by_uniform = uniforms.masked_fill(~candidates, -1.0).topk(k, dim=1).indices
        by_probability = probabilities[:, :block_end].masked_fill(~candidates, -1.0).topk(k, dim=1).indices
        differs_from_low_confidence |= set(by_uniform.flatten().tolist()) != set(by_probability.flatten().tolist())
        expected.scatter_(1, by_uniform, greedy.gather(1, by_uniform))
        sampler.step(state, TableForward(table))
        assert torch.equal(state.x, expected), f"step {step}"
    assert state.done and differs_from_low_confidence


class GuidanceProbe(torch.nn.Module):
    """A model whose logits are ``BASE + DELTA`` when the prompt is visible (first column not
    masked) and ``BASE`` when CFG's unconditional pass masks it, for every row; so the guided
    logits are ``BASE + (w + 1) DELTA``, whose argmax is token 1, 2, 3 for w + 1 = 1, 2, 3."""

    BASE = torch.zeros(VOCAB).index_put_((torch.tensor([1, 2, 3]),), torch.tensor([3.0, 0.0, -12.0]))
    DELTA = torch.zeros(VOCAB).index_put_((torch.tensor([1, 2, 3]),), torch.tensor([0.0, 1.8, 6.0]))

    def forward(self, input_ids, logits_for=None, **kwargs):
        batch, length = input_ids.shape
        n = length if logits_for is None else logits_for.shape[1]
        prompt_visible = (input_ids[:, 0] != MASK).float()[:, None, None]
        return (self.BASE + prompt_visible * self.DELTA).expand(batch, n, VOCAB)


@pytest.mark.parametrize("cfg_scale, token", [(0.0, 1), (1.0, 2), (2.0, 3)])
def test_llada_cfg_weight_is_w_plus_one(cfg_scale, token):
    assert int((GuidanceProbe.BASE + (cfg_scale + 1) * GuidanceProbe.DELTA).argmax()) == token
    sampler = LLaDA(4, 8, 4, cfg_scale=cfg_scale, mask_token_id=MASK)
    prompt = torch.tensor([[4, 5, 6], [7, 8, 9]])
    out = generate(GuidanceProbe(), prompt, sampler)
    assert out[:, 3:].eq(token).all(), out.tolist()


class RecordingLLaDA(LLaDA):
    """LLaDA that keeps, per network call, the tokens before the step, the rows and the logits it got."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen = []

    def _call(self, state, forward, rows, mask=None):
        logits = super()._call(state, forward, rows, mask)
        self.seen.append((state.x.clone(), rows.clone(), logits.clone()))
        return logits


@torch.no_grad()
def test_llada_cfg_logits_are_the_guidance_formula():
    """Every step's logits are ``un + (w + 1)(cond - un)``: cond from the tokens, un from the
    tokens with the prompt replaced by mask tokens (generated columns kept)."""
    torch.manual_seed(0)
    model = dlmfuse.nn.DenoiserLM(vocab_size=VOCAB, hidden_size=64, num_layers=2, num_heads=1, num_kv_heads=1,
                                  intermediate_size=96, init_std=0.3).eval()
    w, prompt_len = 1.5, 4
    prompt = torch.randint(0, MASK, (2, prompt_len), generator=torch.Generator().manual_seed(3))
    sampler = RecordingLLaDA(8, 8, 4, cfg_scale=w, mask_token_id=MASK)
    generate(model, prompt, sampler)
    assert len(sampler.seen) == 8
    for x, rows, logits in sampler.seen:
        unconditional = x.clone()
        unconditional[:, :prompt_len] = MASK
        cond, un = model(x, logits_for=rows), model(unconditional, logits_for=rows)
        assert_fp32_close(logits, un + (w + 1) * (cond - un), "guided logits")


# ------------------------------------------------------------------------------- Dream options
def dream_counts(steps: int, eps: float, masked: int) -> list:
    """Dream's ``_sample`` counts for one row of ``masked`` mask tokens: float32 time grid,
    ``int(M * (1 - s / t))``, everything left at the last step."""
    timesteps = torch.linspace(1, eps, steps + 1)
    counts = []
    for i in range(steps):
        remaining = torch.tensor(float(masked - sum(counts)))
        t, s = timesteps[i], timesteps[i + 1]
        counts.append(int(remaining * (1 - s / t)) if i < steps - 1 else int(remaining))
    return counts


def test_dream_eps_sets_the_schedule():
    steps, gen_length, eps = 4, 16, 0.3
    expected = dream_counts(steps, eps, gen_length)
    assert expected == [2, 2, 3, 9] and dream_counts(steps, 1e-3, gen_length) == [3, 4, 4, 5]
    sampler = Dream(steps, gen_length, alg="maskgit_plus", eps=eps, mask_token_id=MASK)
    state = fresh_state(sampler, 2, 2)
    forward = TableForward(random_table(2, 2 + gen_length, 1.0, seed=3))
    written = [sampler.step(state, forward).sum(dim=1).tolist() for _ in range(steps)]
    assert written == [[k, k] for k in expected]


def test_dream_eps_sets_origins_unmasking_probability():
    """alg="origin": column j of row b unmasks at step i when its TRANSFER uniform is below
    ``1 - t_{i+1} / t_i`` on the eps grid (1 at the last step)."""
    steps, gen_length, eps, seed, prompt_len = 5, 24, 0.4, 11, 2
    sampler = Dream(steps, gen_length, alg="origin", eps=eps, mask_token_id=MASK)
    state = fresh_state(sampler, 2, prompt_len, seed=seed)
    table = random_table(2, prompt_len + gen_length, 1.0, seed=4)
    timesteps = torch.linspace(1, eps, steps + 1)
    for i in range(steps):
        fraction = float(1 - timesteps[i + 1] / timesteps[i]) if i < steps - 1 else 1.0
        uniforms = gumbel_uniforms(2, prompt_len + gen_length, seed, offset(i, TRANSFER))
        expected = (state.x == MASK) & (uniforms < fraction)
        assert torch.equal(sampler.step(state, TableForward(table)), expected), f"step {i}"
    assert not (state.x == MASK).any()


def test_dream_alg_temp_draws_by_gumbel_top_k():
    """alg_temp > 0: the k columns with the largest ``confidence / alg_temp + Gumbel(u)``, u of
    stream CONFIDENCE at (row, column); the confidence is the float32 probability of the greedy
    token predicted by the previous column's logits."""
    batch, prompt_len, gen_length, steps, alg_temp, seed = 2, 2, 10, 4, 0.05, 6
    sampler = Dream(steps, gen_length, alg="maskgit_plus", alg_temp=alg_temp, mask_token_id=MASK)
    state = fresh_state(sampler, batch, prompt_len, seed=seed)
    table = random_table(batch, prompt_len + gen_length, 1.0, seed=5)
    shifted = torch.cat([table[:, :1], table[:, :-1]], dim=1)  # column j is predicted by row j - 1
    greedy = shifted.argmax(-1)
    confidence = F.softmax(shifted, dim=-1).amax(-1).double()
    differs_from_top_k = False
    for i, k in enumerate(dream_counts(steps, 1e-3, gen_length)):
        masked = state.x == MASK
        gumbel = -torch.log(-torch.log(gumbel_uniforms(batch, masked.shape[1], seed, offset(i, CONFIDENCE))))
        key = (confidence / alg_temp + gumbel).masked_fill(~masked, -math.inf)
        ranked = key.sort(dim=1, descending=True)
        if k < int(masked.sum(dim=1).min()):
            assert float((ranked.values[:, k - 1] - ranked.values[:, k]).min()) > 1e-4  # not at float noise
        chosen = ranked.indices[:, :k]
        by_confidence = confidence.masked_fill(~masked, -1.0).topk(k, dim=1).indices
        differs_from_top_k |= set(chosen.flatten().tolist()) != set(by_confidence.flatten().tolist())
        expected = state.x.clone().scatter_(1, chosen, greedy.gather(1, chosen))
        sampler.step(state, TableForward(table))
        assert torch.equal(state.x, expected), f"step {i}"
    assert differs_from_top_k


def test_dream_alg_temp_first_pick_follows_the_softmax():
    """One unmasked column per row out of 8: over 4000 rows (independent Philox rows), column j
    is picked with probability ``softmax(confidence / alg_temp)_j``, as Dream's
    ``torch.multinomial(softmax(confidence / alg_temp))``."""
    rows, alg_temp, seed = 4000, 0.25, 1
    # Column j's greedy token has probability p_j = e^a / (e^a + V - 1) with a from a_j.
    top_logits = torch.tensor([0.5, 1.5, 2.0, 2.5, 3.0, 3.3, 3.6, 4.0])
    one_row = torch.zeros(len(top_logits) + 1, VOCAB)
    one_row[torch.arange(8), 3] = top_logits  # model row j predicts column j + 1
    one_row[:, MASK] = -30.0  # never proposed; keeps its (tiny) mass in the softmax
    p = F.softmax(one_row[:8].double(), dim=-1)[:, 3]
    expected = F.softmax(p / alg_temp, dim=0) * rows
    assert float(expected.min()) > 50  # enough per cell for the chi-square approximation
    sampler = Dream(4, 8, alg="maskgit_plus", alg_temp=alg_temp, mask_token_id=MASK)
    assert dream_counts(4, 1e-3, 8)[0] == 1
    state = fresh_state(sampler, rows, 1, seed=seed)
    written = sampler.step(state, TableForward(one_row.expand(rows, -1, -1)))
    assert written.sum(dim=1).eq(1).all()
    observed = written[:, 1:].sum(dim=0).tolist()
    assert chi_square(observed, expected.tolist()) < CHI2_999[7], (observed, expected.round().tolist())


# ---------------------------------------------------------------------------------------- MDLM
def test_mdlm_unmasks_per_step_as_the_log_linear_schedule():
    """Over a whole generation, each column unmasks at step i with probability
    ``prod_{j<i} (1 - p_j) p_i``, ``p_i = (alpha_s - alpha_t) / (1 - alpha_t)``, alpha_t = 1 - t
    (1/T for every step); the counts of 4096 columns over 8 steps pass a chi-square test."""
    batch, gen_length, steps, seed = 64, 64, 8, 2
    sampler = MDLM(steps, gen_length, mask_token_id=MASK)
    state = fresh_state(sampler, batch, 1, seed=seed)

    def zero_logits(rows, mask=None):
        return torch.zeros(*rows.shape, VOCAB)

    observed = [int(sampler.step(state, zero_logits).sum()) for _ in range(steps)]
    assert state.done and not (state.x == MASK).any()
    expected, still_masked = [], 1.0
    for i in range(steps):
        t, s = 1 - i / steps, 1 - (i + 1) / steps
        alpha_t, alpha_s = 1 - t, 1 - s
        p = (alpha_s - alpha_t) / (1 - alpha_t)
        expected.append(batch * gen_length * still_masked * p)
        still_masked *= 1 - p
    assert abs(still_masked) < 1e-12 and all(abs(e - batch * gen_length / steps) < 1e-6 for e in expected)
    assert chi_square(observed, expected) < CHI2_999[7], observed
