"""dlmfuse.generate: exactness against LLaDA's published loop, logits only for the rows a step
uses, ragged prompts, the Fast-dLLM cache modes, callbacks and argument errors.

Models: the deterministic stand-in of test_samplers and a tiny dlmfuse.nn.DenoiserLM.
"""

from __future__ import annotations

import doctest
import importlib

import pytest
import torch

import dlmfuse
from dlmfuse.generate import generate
from dlmfuse.samplers import Dream, EsoLM, FastDLLM, LLaDA, MDLM
from test_samplers import MASK, VOCAB, ToyDenoiser, llada_reference, prompts


def denoiser(num_layers: int = 2, seed: int = 0, device="cpu") -> torch.nn.Module:
    torch.manual_seed(seed)
    return dlmfuse.nn.DenoiserLM(vocab_size=VOCAB, hidden_size=64, num_layers=num_layers, num_heads=1,
                                 num_kv_heads=1, intermediate_size=96, init_std=0.3).to(device)


class Spy(torch.nn.Module):
    """Wraps a model and records (fed length, logits_for, cache given) of every call."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, []
        self.config = getattr(inner, "config", None)

    def forward(self, input_ids, **kwargs):
        rows = kwargs.get("logits_for")
        self.calls.append(dict(length=input_ids.shape[1], rows=None if rows is None else rows.clone(),
                               cached=kwargs.get("cache") is not None, ids=input_ids.clone()))
        return self.inner(input_ids, **kwargs)


MODELS = {"toy": lambda: ToyDenoiser(), "denoiser": lambda: denoiser()}


# --------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("which", list(MODELS))
@pytest.mark.parametrize("cfg_scale", [0.0, 1.0])
def test_greedy_generate_equals_llada_loop(which, cfg_scale):
    model, prompt = MODELS[which](), prompts(2, 6)
    for steps, gen_length, block_length in [(8, 16, 8), (12, 12, 4)]:
        sampler = LLaDA(steps, gen_length, block_length, cfg_scale=cfg_scale, mask_token_id=MASK)
        out = generate(model, prompt, sampler, cache="none")
        ref = llada_reference(model, prompt, steps, gen_length, block_length, cfg_scale=cfg_scale)
        assert out.shape == (2, 6 + gen_length) and out.dtype == torch.int64
        assert torch.equal(out, ref)


@pytest.mark.parametrize("cfg_scale", [0.0, 1.0])
def test_greedy_generate_equals_llada_loop_with_mask_tokens_in_the_prompt(cfg_scale):
    """Mask tokens inside the prompt compete with the block's, as in LLaDA, and CFG's unconditional
    pass keeps them once filled (LLaDA masks only the prompt's non-mask columns)."""
    model, prompt = denoiser(), prompts(2, 10)
    prompt[0, 3] = MASK
    prompt[1, 0] = MASK
    sampler = LLaDA(16, 16, 8, cfg_scale=cfg_scale, mask_token_id=MASK)
    out = generate(model, prompt, sampler, cache="none")
    assert torch.equal(out, llada_reference(model, prompt, 16, 16, 8, cfg_scale=cfg_scale))


def test_logits_only_for_the_rows_a_step_uses():
    model, prompt = Spy(denoiser()), prompts(2, 4)
    generate(model, prompt, LLaDA(8, 16, 8, mask_token_id=MASK))
    assert len(model.calls) == 8
    for i, call in enumerate(model.calls):
        rows, ids = call["rows"], call["ids"]
        block_end = 4 + 8 * (i // 4 + 1)
        assert call["length"] == 20  # exact mode: the whole sequence
        for b in range(2):
            candidates = set((ids[b, :block_end] == MASK).nonzero().flatten().tolist())
            requested = set(rows[b].tolist())
            # every masked column before the block's end, plus at most one padding column (rows
            # are padded to the batch's largest count)
            assert candidates <= requested and len(requested - candidates) <= 1


def test_dream_steps_that_unmask_nothing_make_no_call():
    """With steps close to gen_length some steps' count int(M (1 - s/t)) is 0 in every row: those
    make no network call (each row here has the same M; the model never proposes the mask)."""
    model, prompt = Spy(denoiser()), prompts(2, 4)
    sampler = Dream(8, 8, alg="maskgit_plus", mask_token_id=MASK)
    generate(model, prompt, sampler)
    remaining, steps_with_work = 8, 0
    for i in range(8):
        k = remaining if i == 7 else int(remaining * float(sampler.transfer_fraction(i)))
        steps_with_work += k > 0
        remaining -= k
    assert steps_with_work < 8 and len(model.calls) == steps_with_work


def test_same_seed_same_tokens():
    model, prompt = denoiser(), prompts(2, 4)
    sampler = LLaDA(8, 16, 8, temperature=1.0, mask_token_id=MASK)
    a = generate(model, prompt, sampler, seed=7)
    assert torch.equal(a, generate(model, prompt, sampler, seed=7))
    assert not torch.equal(a, generate(model, prompt, sampler, seed=8))


# ---------------------------------------------------------------------------- ragged prompts
RAGGED_SAMPLERS = {
    "llada": lambda: LLaDA(8, 16, 8, mask_token_id=MASK),
    "llada_cfg": lambda: LLaDA(8, 16, 8, cfg_scale=0.5, mask_token_id=MASK),
    "fast_dllm": lambda: FastDLLM(16, 8, threshold=0.1, mask_token_id=MASK),
    "dream": lambda: Dream(8, 12, alg="maskgit_plus", mask_token_id=MASK),
}


@pytest.mark.parametrize("which", list(MODELS))
@pytest.mark.parametrize("name", list(RAGGED_SAMPLERS))
def test_ragged_prompts_match_each_row_alone(which, name):
    model, sampler = MODELS[which](), RAGGED_SAMPLERS[name]()
    lens = [6, 3, 5]
    rows = [prompts(1, n, seed=10 + i)[0] for i, n in enumerate(lens)]
    padded = torch.zeros(3, 6, dtype=torch.long)
    attention_mask = torch.zeros(3, 6, dtype=torch.long)
    for i, r in enumerate(rows):
        padded[i, 6 - len(r):] = r
        attention_mask[i, 6 - len(r):] = 1
    out = generate(model, padded, sampler, attention_mask=attention_mask)
    assert torch.equal(out, generate(model, padded, sampler, prompt_lens=torch.tensor(lens)))
    assert torch.equal(out[:, :6], padded)
    for i, r in enumerate(rows):
        alone = generate(model, r[None], sampler)
        assert torch.equal(out[i, 6:], alone[0, len(r):]), f"row {i}"
    # Padding that holds the mask token id is padding too: untouched, and no content to fill
    padded_with_mask = torch.where(attention_mask.bool(), padded, MASK)
    with_mask = generate(model, padded_with_mask, sampler, attention_mask=attention_mask)
    assert torch.equal(with_mask[:, :6], padded_with_mask)
    assert torch.equal(with_mask[:, 6:], out[:, 6:])


# ------------------------------------------------------------------------------- cache modes
@pytest.mark.parametrize("cache", ["prefix", "dual"])
@pytest.mark.parametrize("name", ["llada", "llada_cfg", "fast_dllm", "dream"])
def test_cache_is_exact_for_a_one_layer_model(cache, name):
    """With one layer, K/V depend only on each token and position: the cache modes are exact."""
    model, sampler = denoiser(num_layers=1), RAGGED_SAMPLERS[name]()
    prompt = prompts(2, 5)
    attention_mask = torch.tensor([[1] * 5, [0, 0, 1, 1, 1]])
    exact = generate(model, prompt, sampler, attention_mask=attention_mask)
    assert torch.equal(generate(model, prompt, sampler, cache=cache, attention_mask=attention_mask), exact)


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_cache_recomputes_only_the_window(cache):
    model = Spy(denoiser(num_layers=2))
    prompt_len, gen_length, block = 4, 16, 8
    # The mask token suppressed: no column is refilled with it, so no step asks outside the window.
    sampler = LLaDA(8, gen_length, block, mask_token_id=MASK, suppress_tokens=[MASK])
    out = generate(model, prompts(2, prompt_len), sampler, cache=cache)
    assert not (out == MASK).any()
    total = prompt_len + gen_length
    fed = [c["length"] for c in model.calls]
    assert all(c["cached"] for c in model.calls)
    if cache == "prefix":  # block 0: refresh, then block + suffix; block 1: refresh, then block
        assert fed == [total, 16, 16, 16, total, 8, 8, 8]
    else:
        assert fed == [total, 8, 8, 8, total, 8, 8, 8]


# --------------------------------------------------------------------- other samplers / loop
def test_mdlm_and_eso_through_generate():
    model = Spy(denoiser())
    out = generate(model, prompts(2, 4), MDLM(20, 8, mask_token_id=MASK), seed=3)
    assert not (out == MASK).any() and len(model.calls) < 20  # empty steps call nothing
    for variant in ("A", "B"):
        model.calls.clear()
        sampler = EsoLM(6, 8, mask_token_id=MASK, alpha_0=0.5, variant=variant)
        out = generate(model, prompts(2, 4), sampler, seed=3, attention_mask=torch.tensor([[1] * 4, [0, 1, 1, 1]]))
        assert not (out[:, 4:] == MASK).any()
        assert torch.equal(out, generate(model.inner, prompts(2, 4), sampler, seed=3,
                                         attention_mask=torch.tensor([[1] * 4, [0, 1, 1, 1]])))


def test_callback_once_per_step_and_progress_bar():
    seen = []
    sampler = LLaDA(6, 12, 4, mask_token_id=MASK)
    out = generate(ToyDenoiser(), prompts(1, 3), sampler, progress=True,
                   callback=lambda step, total, tokens: seen.append((step, total, int((tokens == MASK).sum()))))
    assert [s[:2] for s in seen] == [(i, 6) for i in range(1, 7)]
    assert [s[2] for s in seen] == [10, 8, 6, 4, 2, 0]
    assert not (out == MASK).any()
    seen.clear()
    generate(ToyDenoiser(), prompts(1, 3), FastDLLM(12, 4, threshold=0.5, mask_token_id=MASK),
             callback=lambda step, total, tokens: seen.append((step, total)))
    assert [s[0] for s in seen] == list(range(1, len(seen) + 1)) and all(s[1] == 12 for s in seen)


def test_progress_bar_ends_at_the_steps_taken(monkeypatch):
    """FastDLLM's step count is an upper bound: the bar ends at the steps actually taken."""
    module = importlib.import_module("dlmfuse.generate")
    bars = []

    class Bar:
        def __init__(self, total):
            self.total, self.n, self.closed = total, 0, False
            bars.append(self)

        def update(self, n):
            self.n += n

        def refresh(self):
            pass

        def close(self):
            self.closed = True

    monkeypatch.setattr(module, "_progress_bar", Bar)
    seen = []
    generate(ToyDenoiser(), prompts(1, 3), FastDLLM(12, 4, threshold=0.5, mask_token_id=MASK), progress=True,
             callback=lambda step, total, tokens: seen.append(step))
    (bar,) = bars
    assert bar.closed and bar.n == len(seen) == bar.total < 12


# ------------------------------------------------------------------------------------ errors
def test_bad_arguments_name_the_value():
    model, prompt, sampler = ToyDenoiser(), prompts(2, 4), LLaDA(4, 8, 4, mask_token_id=MASK)
    cases = [
        (dict(cache="full"), ValueError, "'full'"),
        (dict(seed=-1), ValueError, "-1"),
        (dict(seed=1.5), TypeError, "1.5"),
        (dict(attention_mask=torch.tensor([[1, 1, 0, 1], [1, 1, 1, 1]])), ValueError, r"row 0 is \[1, 1, 0, 1\]"),
        (dict(attention_mask=torch.ones(2, 3)), TypeError, "float32"),
        (dict(attention_mask=torch.ones(2, 3, dtype=torch.long)), ValueError, r"\[2, 3\]"),
        (dict(attention_mask=torch.full((2, 4), 2)), ValueError, "0 and 1"),
        (dict(prompt_lens=[4, 5]), ValueError, r"\[4, 5\]"),
        (dict(prompt_lens=[4, 4], attention_mask=torch.ones(2, 4, dtype=torch.long)), ValueError, "not both"),
        (dict(callback=3), TypeError, "int"),
        (dict(cuda_graphs=1), TypeError, "int"),
        (dict(cache="dual"), TypeError, "ToyDenoiser"),  # no KV-cache protocol
    ]
    for kwargs, error, text in cases:
        with pytest.raises(error, match=text):
            generate(model, prompt, sampler, **kwargs)
    with pytest.raises(TypeError, match="float32"):
        generate(model, prompt.float(), sampler)
    with pytest.raises(TypeError, match="dict"):
        generate(model, prompt, {"steps": 4})
    with pytest.raises(ValueError, match=r"\[4\]"):
        generate(model, prompt[0], sampler)
    with pytest.raises(ValueError, match="EsoLM"):
        generate(model, prompt, EsoLM(4, 8, mask_token_id=MASK), cache="dual")
    with pytest.raises(ValueError, match="prompt token"):
        generate(model, prompt, Dream(4, 8, mask_token_id=MASK), prompt_lens=[4, 0])

    class EveryRow(torch.nn.Module):  # ignores logits_for
        def forward(self, input_ids, logits_for=None, **kwargs):
            return torch.zeros(*input_ids.shape, 7)

    with pytest.raises(ValueError, match=r"must return logits \[B, n, V\] for the n rows of logits_for \[2, 4\], got \[2, 12, 7\]"):
        generate(EveryRow(), prompt, sampler)
    # Ids past the vocabulary of a model with a config (a DenoiserLM): named, before any forward
    lm = denoiser()
    vocab = lm.config.vocab_size
    with pytest.raises(ValueError, match=rf"mask_token_id=126336 is outside the model's vocabulary \[0, {vocab}\)"):
        generate(lm, prompt, LLaDA(4, 8, 4))
    with pytest.raises(ValueError, match=rf"prompt_ids must be token ids < vocab_size={vocab}, got {vocab}"):
        generate(lm, torch.cat([prompt[:, :3], torch.full((2, 1), vocab)], dim=1), sampler)


@pytest.mark.skipif(not callable(dlmfuse.generate), reason="dlmfuse.generate is not exported yet")
def test_docstring_example():
    result = doctest.testmod(importlib.import_module("dlmfuse.generate"), optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


# -------------------------------------------------------------------------------------- CUDA
@pytest.mark.cuda
def test_cuda_generate_equals_llada_loop():
    model, prompt = denoiser(device="cuda"), prompts(2, 6).cuda()
    for cfg_scale in (0.0, 1.0):
        sampler = LLaDA(8, 16, 8, cfg_scale=cfg_scale, mask_token_id=MASK)
        out = generate(model, prompt, sampler)
        assert out.is_cuda
        reference = llada_reference(lambda x: model(x.cuda()).cpu(), prompt.cpu(), 8, 16, 8, cfg_scale=cfg_scale)
        assert torch.equal(out.cpu(), reference)
    for cache in ("prefix", "dual"):
        out = generate(model, prompt, FastDLLM(16, 8, threshold=0.5, mask_token_id=MASK), cache=cache)
        assert not (out == MASK).any()


def test_dual_cache_falls_back_to_eager_steps_when_capture_fails(monkeypatch):
    """A model whose step cannot be captured (here: a capture that raises) runs eagerly, with a
    warning, and gives the eager tokens; capture is tried once per generation."""
    generate_module = importlib.import_module("dlmfuse.generate")  # dlmfuse.generate is the function
    model, prompt = denoiser(num_layers=2), prompts(2, 5)
    eager = generate(model, prompt, LLaDA(8, 16, 8, mask_token_id=MASK), cache="dual", cuda_graphs=False)
    attempts = []

    def failing_capture(*args):
        attempts.append(1)
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(generate_module, "_graphs_supported", lambda device: True)
    monkeypatch.setattr(generate_module, "_WindowGraph", failing_capture)
    with pytest.warns(RuntimeWarning, match="could not be captured.*not permitted"):
        out = generate(model, prompt, LLaDA(8, 16, 8, mask_token_id=MASK), cache="dual")
    assert torch.equal(out, eager) and len(attempts) == 1


@pytest.mark.cuda
@pytest.mark.parametrize("name", list(RAGGED_SAMPLERS))
def test_cuda_dual_cache_graph_matches_eager_steps(name, monkeypatch):
    """The dual cache's block steps as one CUDA graph (captured once, replayed for every later
    block) give the tokens of the eager cached calls, ragged prompts and CFG included. (FastDLLM
    with a high threshold, so that blocks take several steps, some of them from the cache.)"""
    generate_module = importlib.import_module("dlmfuse.generate")  # dlmfuse.generate is the function
    samplers = {**RAGGED_SAMPLERS, "fast_dllm": lambda: FastDLLM(16, 8, threshold=0.9, mask_token_id=MASK)}
    model = Spy(denoiser(num_layers=2, device="cuda"))
    prompt = prompts(2, 5).cuda()
    attention_mask = torch.tensor([[1] * 5, [0, 0, 1, 1, 1]], device="cuda")
    eager = generate(model, prompt, samplers[name](), cache="dual", attention_mask=attention_mask,
                     cuda_graphs=False)
    total = eager.shape[1]
    window_calls = sum(1 for c in model.calls if c["cached"] and c["length"] < total)
    assert window_calls >= 1, "the test needs steps that run from the cache"
    captures, replays = [], []

    class CountingGraph(generate_module._WindowGraph):
        def __init__(self, *args):
            captures.append(1)
            super().__init__(*args)

        def __call__(self, *args):
            replays.append(1)
            return super().__call__(*args)

    monkeypatch.setattr(generate_module, "_WindowGraph", CountingGraph)
    graphed = generate(model, prompt, samplers[name](), cache="dual", attention_mask=attention_mask)
    assert torch.equal(graphed, eager)
    assert len(captures) == 1 and len(replays) == window_calls  # one capture for every block


@pytest.mark.parametrize("alpha_0", [1.0, 0.4])
def test_eso_b_cache_is_exact_and_feeds_two_chunks(alpha_0):
    model = Spy(denoiser(num_layers=2))
    sampler = EsoLM(6, 10, mask_token_id=MASK, alpha_0=alpha_0, variant="B", temperature=0.0)
    attention_mask = torch.tensor([[1] * 4, [0, 0, 1, 1]])
    exact = generate(model.inner, prompts(2, 4), sampler, seed=2, attention_mask=attention_mask)
    out = generate(model, prompts(2, 4), sampler, seed=2, cache="prefix", attention_mask=attention_mask)
    assert torch.equal(out, exact)
    state = sampler.start(torch.cat([prompts(2, 4), torch.full((2, 10), MASK)], 1), 4, seed=2)
    chunks = state.extra["chunks"]
    assert [c["length"] for c in model.calls] == [14] + [a + b for a, b in zip(chunks, chunks[1:])]
    with pytest.raises(ValueError, match="variant='A'"):
        generate(model, prompts(2, 4), EsoLM(6, 10, mask_token_id=MASK, variant="A"), cache="prefix")
