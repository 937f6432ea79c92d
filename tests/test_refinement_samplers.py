"""Refinement samplers: ReMDM (remasking) and FastDLLM's token-to-token editing (LLaDA 2.1).

Each is checked step by step against a literal float64 transcription of its published update
rule (ReMDM's ``_ddpm_caching_update``, LLaDA 2.1's joint threshold decoding) on the small
random models of test_samplers, drawing the documented Philox streams; ReMDM's transition
probabilities also by chi-square over many independent rows (fixed seeds, so deterministic). The
cache modes must give the uncached tokens on a one-layer model, and ReMDM's dual cache must feed
exactly the columns that changed since the cache saw them and the ones that need logits.
"""

from __future__ import annotations

import doctest
import math

import pytest
import torch
import torch.nn.functional as F

import dlmfuse
from conftest import DispatchLog
from dlmfuse.generate import generate
from dlmfuse.samplers import FastDLLM, ReMDM
from dlmfuse.samplers.refine import confidence_weights, fed_columns, remask_and_unmask, token_edits
from test_generate import denoiser
from test_samplers import (MASK, TRANSFER, VOCAB, add_gumbel_noise, column_uniforms, model, prompts, run,  # noqa: F401
                           soft_model, token_noise)

#: Remasking strong enough that a short run remasks often (the published eta suit 1024 steps).
SCHEDULES = {
    "cap": dict(schedule="cap", eta=0.5),
    "rescale": dict(schedule="rescale", eta=0.6),
    "conf": dict(schedule="conf"),
    "loop": dict(schedule="loop", eta=0.3, t_on=0.7, t_off=0.2, alpha_on=0.6),
}


# -------------------------------------------------------------------- ReMDM, as published
def remdm_q_xs(options, z, p_x0, t, dt, conf=None):
    """float64 q(z_s | z_t) ``[B, G, V]`` of ReMDM's ``_ddpm_caching_update`` for the log-linear
    schedule (move_chance = t), transcribed line by line; p_x0 already SUBS-parameterised."""
    schedule, eta = options["schedule"], options.get("eta")
    move_chance_t, move_chance_s = t, t - dt
    copy_flag = (z != MASK)[..., None]
    if schedule == "loop":
        t_on, t_off, alpha_on = options["t_on"], options["t_off"], options["alpha_on"]
        if t > t_on:
            move_chance_t = 1 - (1 - t) * alpha_on / (1 - t_on)
            move_chance_s = 1 - (1 - t + dt) * alpha_on / (1 - t_on)
        elif t <= t_off:
            move_chance_t = t * (1 - alpha_on) / t_off
            move_chance_s = (t - dt) * (1 - alpha_on) / t_off
        if t > t_on or t <= t_off:  # MDLM: decoded columns are copied
            q_xs = p_x0 * (move_chance_t - move_chance_s)
            q_xs[..., MASK] = move_chance_s
            q_xs = q_xs / q_xs.sum(-1, keepdim=True)
            return torch.where(copy_flag, p_x0, q_xs)
        sigma = eta
        q_xs = p_x0 * (1 - sigma)
        q_xs[..., MASK] = sigma
        q_xs_2 = p_x0 * ((alpha_on - (1 - sigma) * alpha_on) / (1 - alpha_on))
        q_xs_2[..., MASK] = (1 - alpha_on - alpha_on * sigma) / (1 - alpha_on)
        return torch.where(copy_flag, q_xs, q_xs_2)
    alpha_t, alpha_s = 1 - move_chance_t, 1 - move_chance_s
    if schedule == "cap":
        sigma = min(eta, (1 - alpha_s) / alpha_t) if alpha_t > 0 else eta
    else:
        sigma_max = min(1, (1 - alpha_s) / alpha_t) if alpha_t > 0 else 1
        sigma = eta * sigma_max if schedule == "rescale" else None
    if schedule == "conf":
        eta_conf = conf.softmax(dim=-1)
        eta_conf[z == MASK] = 0
        sigma = (eta_conf * sigma_max)[..., None]
    q_xs = p_x0 * (1 - sigma)
    q_xs[..., MASK] = sigma if schedule != "conf" else sigma[..., 0]
    q_xs_2 = p_x0 * ((alpha_s - (1 - sigma) * alpha_t) / (1 - alpha_t))
    q_xs_2[..., MASK] = (1 - alpha_s - sigma * alpha_t) / (1 - alpha_t) if schedule != "conf" else \
        ((1 - alpha_s - sigma * alpha_t) / (1 - alpha_t))[..., 0]
    return torch.where(copy_flag, q_xs, q_xs_2)


def subs_p_x0(logits, z):
    """MDLM's SUBS: the mask never predicted; a decoded column is its own token with probability 1."""
    logits = logits.to(torch.float64).clone()
    logits[..., MASK] = -math.inf
    return torch.where((z != MASK)[..., None], F.one_hot(z, VOCAB).double(), logits.softmax(-1))


def test_remdm_matches_published_update_step_by_step(model):
    prompt, steps, gen, seed = prompts(2), 16, 10, 3
    for name, options in SCHEDULES.items():
        out, per_step, state = run(ReMDM(steps, gen, mask_token_id=MASK, **options), model, prompt, seed=seed)
        x = torch.cat([prompt, torch.full((2, gen), MASK)], dim=1)
        plen, width = prompt.shape[1], x.shape[1]
        conf = torch.full((2, gen), -math.inf, dtype=torch.float64)  # -psi; -inf = masked
        remasks = 0
        for i in range(steps):
            z = x[:, plen:]
            p_x0 = subs_p_x0(model(x)[:, plen:], z)
            q = remdm_q_xs(options, z, p_x0, (steps - i) / steps, 1 / steps, conf)
            u = column_uniforms(2, width, seed, i, TRANSFER)[:, plen:]
            remask = (z != MASK) & (u < q[..., MASK])
            unmask = (z == MASK) & (u < 1 - q[..., MASK])
            noise = token_noise(torch.cat([torch.zeros_like(x[:, :plen], dtype=torch.bool), unmask], 1), seed, i)
            noise = noise[:, plen:]
            drawn = (q[..., :MASK].log() - torch.log(-torch.log(noise[..., :MASK]))).argmax(-1)
            assert torch.equal(per_step[i][:, plen:], remask | unmask), (name, i)
            conf = torch.where(unmask, -p_x0.gather(-1, drawn[..., None])[..., 0], conf).masked_fill(remask, -math.inf)
            x[:, plen:] = torch.where(remask, MASK, torch.where(unmask, drawn, z))
            remasks += int(remask.sum())
        assert torch.equal(out, x) and not (out == MASK).any(), name
        assert remasks >= 3, f"{name}: the run must exercise remasking ({remasks} remasks)"


# ------------------------------------------------------------ ReMDM, frequencies (chi-square)
def chi_square_p_value(counts, probabilities):
    """Pearson's test: P(chi2 >= statistic) with len - 1 degrees of freedom (impossible categories
    never seen are dropped; those with an expected count below 5 are pooled into the last one)."""
    counts = torch.as_tensor(counts, dtype=torch.float64)
    expected = torch.as_tensor(probabilities, dtype=torch.float64) * counts.sum()
    possible = (expected > 0) | (counts > 0)
    counts, expected = counts[possible], expected[possible]
    small = expected < 5
    if small.any():
        counts = torch.cat([counts[~small], counts[small].sum().reshape(1)])
        expected = torch.cat([expected[~small], expected[small].sum().reshape(1)])
    statistic = ((counts - expected) ** 2 / expected).sum()
    return float(torch.special.gammaincc(torch.tensor((len(counts) - 1) / 2.0, dtype=torch.float64), statistic / 2))


@pytest.mark.parametrize("name, step", [("cap", 5), ("rescale", 5), ("conf", 4), ("loop", 6)])
def test_remdm_transition_frequencies(name, step):
    """One step from a fixed state in 3000 rows (independent Philox rows): how often each decoded
    column is remasked and each masked column takes each token, against the published q(z_s)."""
    rows, steps = 3000, 10
    state_tokens = torch.tensor([[3, 7, MASK, 5, MASK, 2]])  # generated columns after a 2-token prompt
    sampler = ReMDM(steps, 6, mask_token_id=MASK, **SCHEDULES[name])
    logits = torch.full((6, VOCAB), -4.0)
    logits[:, :4] = torch.tensor([1.0, 0.5, 0.0, -0.5])
    x = torch.cat([torch.zeros(1, 2, dtype=torch.long), state_tokens], dim=1).repeat(rows, 1)
    state = sampler.start(x, 2, seed=11)
    psi = torch.tensor([0.9, 0.3, 1.0, 0.6, 1.0, 0.5], dtype=torch.float64)
    state.extra["psi"][:, 2:] = psi
    state.step = step
    sampler.step(state, lambda cols: logits[cols - 2])
    z = state_tokens[0]
    conf = torch.where(z == MASK, -math.inf, -psi)[None]
    q = remdm_q_xs(SCHEDULES[name], state_tokens, subs_p_x0(logits[None], state_tokens), (steps - step) / steps,
                   1 / steps, conf)[0]
    for col in range(6):
        after = state.x[:, 2 + col]
        if z[col] != MASK:
            counts, probabilities = [int((after == z[col]).sum()), int((after == MASK).sum())], \
                [1 - float(q[col, MASK]), float(q[col, MASK])]
        else:
            counts = [int((after == v).sum()) for v in range(VOCAB)]
            probabilities = q[col].tolist()
        assert sum(counts) == rows
        assert chi_square_p_value(counts, probabilities) > 1e-3, (name, col, counts, probabilities)


# ------------------------------------------------------------- LLaDA 2.1 token editing
def joint_threshold_reference(model, prompt, gen_length, block_length, threshold, edit_threshold, max_post_steps,
                              temperature=0.0, seed=0):
    """LLaDA 2.1's joint threshold decoding per row (M2T unmasking, T2T edits of the block's decoded
    tokens when a different proposal's probability exceeds edit_threshold, editing-only steps once
    the block holds no mask) with Fast-dLLM's M2T rule (>= threshold, at least the best); float64
    full-softmax probabilities; the proposal is never the mask token."""
    batch, plen = prompt.shape
    x = torch.cat([prompt, torch.full((batch, gen_length), MASK)], dim=1)
    step = edits = 0
    for nb in range(gen_length // block_length):
        start, end = plen + nb * block_length, plen + (nb + 1) * block_length
        post_steps, finished = [0] * batch, [False] * batch
        while True:
            for b in range(batch):
                if not finished[b] and not (x[b, start:end] == MASK).any():
                    post_steps[b] += 1
                    finished[b] = post_steps[b] > max_post_steps
            if all(finished):
                break
            masked = x == MASK
            asked = torch.zeros_like(masked)
            for b in range(batch):
                if not finished[b]:
                    asked[b, :end] = masked[b, :end]
                    asked[b, start:end] = True
            logits = model(x).double()
            noise = token_noise(asked, seed, step)
            proposal = add_gumbel_noise(logits.masked_fill(torch.arange(VOCAB) == MASK, -math.inf), temperature, noise)
            tokens = proposal.argmax(-1)
            p = F.softmax(logits, -1).gather(-1, tokens[..., None])[..., 0]
            before = x.clone()
            for b in range(batch):
                if finished[b]:
                    continue
                mask_index = masked[b].clone()
                mask_index[end:] = False
                transfer = torch.zeros_like(mask_index)
                if mask_index.any():
                    values, order = torch.topk(torch.where(mask_index, p[b], -math.inf), k=int(mask_index.sum()))
                    transfer[order[[0] + [m for m in range(1, len(values)) if values[m] >= threshold]]] = True
                edit = torch.zeros_like(mask_index)
                block = slice(start, end)
                edit[block] = ~masked[b, block] & (p[b, block] > edit_threshold) & (tokens[b, block] != before[b, block])
                if not (masked[b, block]).any() and not edit.any():
                    finished[b] = True
                x[b, transfer | edit] = tokens[b, transfer | edit]
                edits += int(edit.sum())
            step += 1
    return x, step, edits


@pytest.mark.parametrize("options", [dict(threshold=0.3, edit_threshold=0.2, max_post_steps=16),
                                     dict(threshold=0.9, edit_threshold=0.5, max_post_steps=2),
                                     dict(threshold=0.5, edit_threshold=0.3, max_post_steps=4, temperature=1.0)])
def test_token_editing_matches_llada21_step_by_step(soft_model, options):
    prompt, seed = prompts(3), 5
    sampler = FastDLLM(16, 8, mask_token_id=MASK, **options)
    out, per_step, state = run(sampler, soft_model, prompt, seed=seed)
    reference = dict(options, temperature=options.get("temperature", 0.0))
    ref, ref_steps, edits = joint_threshold_reference(soft_model, prompt, 16, 8, seed=seed, **reference)
    assert torch.equal(out, ref)
    assert len(per_step) == ref_steps == state.network_calls <= state.total_steps
    assert edits >= 2, f"the run must exercise editing ({edits} edits)"


def test_token_editing_is_bounded_by_max_post_steps():
    """A model that always prefers the token it did not write last time: every editing-only step
    edits, so each block runs exactly max_post_steps of them after the step that filled it."""
    calls = []

    def forward(rows):
        calls.append(rows)
        logits = torch.zeros(*rows.shape, VOCAB)
        logits[..., 1 + len(calls) % 2] = 9.0
        return logits

    for max_post_steps in (0, 3):
        calls.clear()
        sampler = FastDLLM(8, 4, threshold=0.5, edit_threshold=0.5, max_post_steps=max_post_steps, mask_token_id=MASK)
        state = sampler.start(torch.cat([prompts(2, 3), torch.full((2, 8), MASK)], dim=1), 3)
        while not state.done:
            sampler.step(state, forward)
        assert state.step == len(calls) == 2 * (1 + max_post_steps)
        assert state.total_steps == 8 + 2 * max_post_steps  # the bound: masks + editing-only steps


def test_a_block_ends_at_the_first_editing_only_step_that_changes_nothing():
    """A model sure of the token already written: the step after the fill finds nothing to edit
    (its proposal equals the token) and ends the block, long before max_post_steps."""
    def forward(rows):
        logits = torch.zeros(*rows.shape, VOCAB)
        logits[..., 7] = 9.0
        return logits

    sampler = FastDLLM(8, 4, threshold=0.5, edit_threshold=0.5, max_post_steps=5, mask_token_id=MASK)
    state = sampler.start(torch.cat([prompts(2, 3), torch.full((2, 8), MASK)], dim=1), 3)
    while not state.done:
        sampler.step(state, forward)
    assert state.step == state.network_calls == 2 * 2 and bool((state.x[:, 3:] == 7).all())


def test_token_editing_rows_match_each_row_alone(soft_model):
    """Rows finish their editing at different steps; a batch computes what each row computes alone."""
    sampler = FastDLLM(16, 8, threshold=0.3, edit_threshold=0.2, mask_token_id=MASK)
    batch_prompts = prompts(3)
    together, _, _ = run(sampler, soft_model, batch_prompts)
    for b in range(3):
        alone, _, _ = run(sampler, soft_model, batch_prompts[b:b + 1])
        assert torch.equal(together[b], alone[0]), b


# ----------------------------------------------------------------------------- cache modes
@pytest.mark.parametrize("cache", ["prefix", "dual"])
@pytest.mark.parametrize("name", [*SCHEDULES, "editing"])
def test_cache_is_exact_for_a_one_layer_model(cache, name):
    model = denoiser(num_layers=1)
    if name == "editing":
        sampler = FastDLLM(16, 8, threshold=0.3, edit_threshold=0.2, max_post_steps=3, mask_token_id=MASK)
    else:
        sampler = ReMDM(16, 12, mask_token_id=MASK, **SCHEDULES[name])
    prompt, attention_mask = prompts(2, 5), torch.tensor([[1] * 5, [0, 0, 1, 1, 1]])
    exact = generate(model, prompt, sampler, attention_mask=attention_mask, seed=2)
    assert torch.equal(generate(model, prompt, sampler, cache=cache, attention_mask=attention_mask, seed=2), exact)


def test_remdm_dual_cache_feeds_exactly_the_changed_and_requested_columns():
    """After the first (full) call, each call feeds the columns whose token changed since the
    previous call (unmasked or remasked) and the columns it needs logits for, nothing else."""
    inner, snapshots, calls = denoiser(num_layers=2), [], []

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.config = inner, inner.config

        def forward(self, input_ids, **kwargs):
            calls.append(dict(step=len(snapshots) - 1, length=input_ids.shape[1], positions=kwargs["positions"][0],
                              rows=kwargs["logits_for"][0]))
            return self.inner(input_ids, **kwargs)

    prompt = prompts(1, 4)
    snapshots.append(torch.cat([prompt, torch.full((1, 12), MASK)], dim=1))
    generate(Recorder(), prompt, ReMDM(16, 12, mask_token_id=MASK, schedule="cap", eta=0.5), cache="dual", seed=1,
             callback=lambda step, total, tokens: snapshots.append(tokens.clone()))
    assert calls[0]["length"] == 16
    remasked = 0
    for previous, call in zip(calls, calls[1:]):
        seen, now = snapshots[previous["step"]][0], snapshots[call["step"]][0]
        changed = set((seen != now).nonzero().flatten().tolist())
        requested = set(call["positions"][call["rows"]].tolist())
        assert set(call["positions"].tolist()) == changed | requested and call["length"] < 16
        remasked += int(((seen != MASK) & (now == MASK)).sum())
    assert remasked > 0, "the run must refresh remasked rows"


# ------------------------------------------------------------------------ device-side ops
def test_decisions_read_nothing_on_the_host_and_trace_whole():
    """The remask / edit decisions make no host read (no aten._local_scalar_dense: no sync on
    CUDA) and no data-dependent branch (torch.compile(fullgraph=True) traces them whole)."""
    def decide(x, psi, u, tokens, confidence, editable):
        masked, generated = x == MASK, x >= 0
        decoded = generated & ~masked
        remask, unmask = remask_and_unmask(masked, decoded, u, confidence_weights(psi, decoded) * 0.5, 0.25)
        edits = token_edits(tokens, confidence, x, editable, 0.4)
        return remask, unmask, edits, fed_columns(remask | unmask, generated, 3)

    g = torch.Generator().manual_seed(0)
    x = torch.where(torch.rand(2, 9, generator=g) < 0.4, MASK, torch.randint(0, MASK, (2, 9), generator=g))
    args = (x, torch.rand(2, 9, generator=g, dtype=torch.float64), torch.rand(2, 9, generator=g, dtype=torch.float64),
            torch.randint(0, MASK, (2, 9), generator=g), torch.rand(2, 9, generator=g, dtype=torch.float64),
            torch.rand(2, 9, generator=g) < 0.5)
    with DispatchLog() as log:
        eager = decide(*args)
    assert str(torch.ops.aten._local_scalar_dense.default) not in log.ops
    compiled = torch.compile(decide, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(*args), eager):
        assert torch.equal(got, want)


def test_fed_columns_are_distinct_with_the_fed_ones_first():
    fed = torch.tensor([[False, True, False, False, True], [False, False, False, True, False]])
    fillers = torch.tensor([[False, True, True, True, True]]).expand(2, -1)
    assert fed_columns(fed, fillers, 3).tolist() == [[1, 4, 2], [3, 1, 2]]


# ----------------------------------------------------------------------------- arguments
@pytest.mark.parametrize("make, error, text", [
    (lambda: ReMDM(8, 8, mask_token_id=MASK, schedule="ddpm"), ValueError, "'ddpm'"),
    (lambda: ReMDM(8, 8, mask_token_id=MASK, eta=1.5), ValueError, "1.5"),
    (lambda: ReMDM(8, 8, mask_token_id=MASK, schedule="conf", eta=0.1), ValueError, "eta=0.1"),
    (lambda: ReMDM(8, 8, mask_token_id=MASK, t_on=0.5), ValueError, "t_on"),
    (lambda: ReMDM(8, 8, mask_token_id=MASK, schedule="loop", t_on=0.1, t_off=0.3), ValueError, "t_off=0.3"),
    (lambda: ReMDM(8, 8, mask_token_id=MASK, schedule="loop", eta=0.5), ValueError, "eta=0.5"),
    (lambda: ReMDM(8, 8, mask_token_id=MASK, schedule="loop", t_off=0.1), ValueError, "steps=8"),
    (lambda: ReMDM(8, 8, mask_token_id=MASK, temperature=-1), ValueError, "-1"),
    (lambda: FastDLLM(8, 4, threshold=0.9, edit_threshold=1.5, mask_token_id=MASK), ValueError, "1.5"),
    (lambda: FastDLLM(8, 4, threshold=0.9, edit_threshold=0.5, max_post_steps=-1, mask_token_id=MASK),
     ValueError, "-1"),
    (lambda: FastDLLM(8, 4, threshold=0.9, edit_threshold=0.5, remasking="random", mask_token_id=MASK),
     ValueError, "'random'"),
])
def test_bad_arguments_name_the_value(make, error, text):
    with pytest.raises(error, match=text.replace(".", r"\.")):
        make()


def test_published_defaults_and_docstring():
    assert ReMDM(8, 8, mask_token_id=MASK).eta == 0.008
    loop = ReMDM(1024, 8, mask_token_id=MASK, schedule="loop")
    assert (loop.eta, loop.t_on, loop.t_off, loop.alpha_on) == (0.02, 0.55, 0.05, 0.9)
    assert FastDLLM(8, 4, threshold=0.9, edit_threshold=0.5, mask_token_id=MASK).max_post_steps == 16
    result = doctest.testmod(dlmfuse.samplers.remdm, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
