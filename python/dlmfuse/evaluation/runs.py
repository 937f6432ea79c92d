"""The measurements of ``python -m dlmfuse eval``: which samplers run, how a run is timed and
counted, and the model-level likelihood row.

Every sampler decodes greedily (temperature 0) so that the rows differ by their unmasking rule
and cache mode only; the random parts (MDLM's and ReMDM's unmasking coins, Eso-LM's order) come
from the generate seed. Each prompt is generated alone (batch 1), as a user would: a batched
Fast-dLLM step lasts until every row of the batch has finished its block, which would understate
the tokens per forward pass of a single sequence.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence

import torch

from ..codelm.corpus import evenly_spaced_windows
from ..codelm.objective import elbo_nll, unigram_log_probs, unigram_nll
from ..generate import generate
from ..samplers import MDLM, Dream, EsoLM, FastDLLM, LLaDA, ReMDM, Sampler
from .compile_share import accepted
from .prompts import Prompt

__all__ = ["SamplerSpec", "SAMPLERS", "CallCounter", "run_sampler", "likelihood_row", "reference_row"]


@dataclass(frozen=True)
class SamplerSpec:
    key: str                                       # the name --only takes
    label: str                                     # the table's name
    build: Callable[[int, int, int], Sampler]      # (gen_length, block_length, mask_token_id) -> sampler


def _llada_steps(gen: int, block: int, per_step: int) -> int:
    """LLaDA steps that unmask ``per_step`` tokens per step in each block (at least one step per block)."""
    return (gen // block) * max(1, block // per_step)


SAMPLERS = (
    SamplerSpec("llada", "LLaDA low-confidence, 1 token/step",
                lambda g, b, m: LLaDA(_llada_steps(g, b, 1), g, b, mask_token_id=m)),
    SamplerSpec("llada-4", "LLaDA low-confidence, 4 tokens/step",
                lambda g, b, m: LLaDA(_llada_steps(g, b, 4), g, b, mask_token_id=m)),
    SamplerSpec("fastdllm-0.9", "Fast-dLLM threshold 0.9", lambda g, b, m: FastDLLM(g, b, threshold=0.9, mask_token_id=m)),
    SamplerSpec("fastdllm-0.7", "Fast-dLLM threshold 0.7", lambda g, b, m: FastDLLM(g, b, threshold=0.7, mask_token_id=m)),
    # Lower thresholds: the rest of the speed / quality curve (a small model is rarely confident).
    SamplerSpec("fastdllm-0.5", "Fast-dLLM threshold 0.5", lambda g, b, m: FastDLLM(g, b, threshold=0.5, mask_token_id=m)),
    SamplerSpec("fastdllm-0.3", "Fast-dLLM threshold 0.3", lambda g, b, m: FastDLLM(g, b, threshold=0.3, mask_token_id=m)),
    SamplerSpec("fastdllm-0.1", "Fast-dLLM threshold 0.1", lambda g, b, m: FastDLLM(g, b, threshold=0.1, mask_token_id=m)),
    SamplerSpec("fastdllm-factor", "Fast-dLLM factor 1.0", lambda g, b, m: FastDLLM(g, b, factor=1.0, mask_token_id=m)),
    SamplerSpec("fastdllm-edit", "Fast-dLLM threshold 0.7 + editing 0.9",
                lambda g, b, m: FastDLLM(g, b, threshold=0.7, edit_threshold=0.9, mask_token_id=m)),
    SamplerSpec("dream-entropy", "Dream entropy",
                lambda g, b, m: Dream(g, g, alg="entropy", shift_logits=False, mask_token_id=m)),
    SamplerSpec("mdlm", "MDLM ancestral", lambda g, b, m: MDLM(g, g, temperature=0.0, mask_token_id=m)),
    SamplerSpec("remdm", "ReMDM cap", lambda g, b, m: ReMDM(g, g, temperature=0.0, mask_token_id=m)),
    SamplerSpec("eso-a", "Eso-LM A, alpha_0 0.5",
                lambda g, b, m: EsoLM(g // 2, g, alpha_0=0.5, variant="A", temperature=0.0, mask_token_id=m)),
    SamplerSpec("eso-b", "Eso-LM B, alpha_0 0.5",
                lambda g, b, m: EsoLM(g // 2, g, alpha_0=0.5, variant="B", temperature=0.0, mask_token_id=m)),
)


class CallCounter(torch.nn.Module):
    """Wraps a model and counts its forward calls (one per forward pass of generate, full or
    cached); keeps ``config`` so that generate's cache modes and checks see the model's."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.config = getattr(model, "config", None)
        self.calls = 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.model(*args, **kwargs)

    def new_cache(self, batch: int, max_len: int):
        """The wrapped model's cache (a tensor-parallel rank's share of the KV heads, say)."""
        if callable(getattr(self.model, "new_cache", None)):
            return self.model.new_cache(batch, max_len)
        raise AttributeError(f"{type(self.model).__name__} has no new_cache")


def run_sampler(model, tokenizer, prompts: Sequence[Prompt], spec: SamplerSpec, cache: str, *,
                gen_length: int, block_length: int, seed: int) -> Dict:
    """Generate ``gen_length`` tokens after every prompt (one at a time) with ``spec``'s sampler in
    ``cache`` mode; the row: tokens per forward pass, wall time, compile share, completions."""
    counter = CallCounter(model)
    device = next(model.parameters()).device
    completions: List[str] = []
    elapsed = 0.0

    def run(prompt: Prompt) -> torch.Tensor:
        # No CUDA graphs: a replayed graph would not pass through the counter.
        ids = torch.tensor([prompt.ids], dtype=torch.int64, device=device)
        sampler = spec.build(gen_length, block_length, tokenizer.mask_token_id)
        return generate(counter, ids, sampler, cache=cache, seed=seed, cuda_graphs=False)

    run(prompts[0])  # untimed and uncounted: one-time costs (allocations, first calls) stay out of the row
    counter.calls = 0
    for prompt in prompts:
        start = time.perf_counter()
        out = run(prompt)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed += time.perf_counter() - start
        completions.append(tokenizer.decode(out[0, len(prompt.ids):].tolist()))
    passed = [accepted(p.text, c) for p, c in zip(prompts, completions)]
    generated = gen_length * len(prompts)
    return {"kind": "sampler", "sampler": spec.key, "label": spec.label, "cache": cache,
            "prompts": len(prompts), "gen_length": gen_length, "block_length": block_length, "seed": seed,
            "forward_calls": counter.calls, "tokens_per_forward": generated / counter.calls,
            "wall_s": elapsed, "s_per_completion": elapsed / len(prompts), "tokens_per_s": generated / elapsed,
            "accepted": sum(passed), "compile_share": sum(passed) / len(prompts),
            "completions": completions}


def reference_row(tokenizer, prompts: Sequence[Prompt], gen_length: int) -> Dict:
    """The compile share of the functions' own continuations, cut after ``gen_length`` tokens
    (a shorter function ends complete): how often real code passes the rule."""
    truncated = [tokenizer.decode(tokenizer.encode(p.reference)[:gen_length]) for p in prompts]
    passed = sum(accepted(p.text, c) for p, c in zip(prompts, truncated))
    return {"kind": "reference", "label": f"the functions' own code (<= {gen_length} tokens)", "prompts": len(prompts),
            "gen_length": gen_length, "accepted": passed, "compile_share": passed / len(prompts)}


def bits_per_byte_factor(tokenizer, sequences: torch.Tensor) -> float:
    """What turns nats per token of ``sequences`` into bits per byte of their text (END_OF_TEXT tokens
    count 0 bytes): the one definition of bits per byte for the eval table and the training script."""
    text_ids = [[i for i in row if i != tokenizer.end_of_text_id] for row in sequences.tolist()]
    text_bytes = sum(len(tokenizer.decode(ids).encode("utf-8")) for ids in text_ids)
    return sequences.numel() / math.log(2) / text_bytes


def likelihood_row(model, tokenizer, held_out_stream: torch.Tensor, unigram_counts: Sequence[int], *,
                   seq_len: int, windows: int, ratios: int, seed: int) -> Dict:
    """The model's masked-diffusion NLL bound and the unigram NLL on the same held-out windows, in
    nats per token and in bits per byte of the windows' text (END_OF_TEXT tokens count 0 bytes)."""
    sequences = evenly_spaced_windows(held_out_stream, seq_len, windows)
    model_nll = elbo_nll(model, sequences, tokenizer.mask_token_id, ratios=ratios, seed=seed)
    baseline = unigram_nll(unigram_log_probs(unigram_counts, excluded=[tokenizer.mask_token_id]), sequences)
    bits_per_nat_token = bits_per_byte_factor(tokenizer, sequences)
    return {"kind": "nll", "label": "held-out NLL", "windows": windows, "seq_len": seq_len, "ratios": ratios,
            "seed": seed, "model_nll": model_nll, "unigram_nll": baseline,
            "model_bits_per_byte": model_nll * bits_per_nat_token, "unigram_bits_per_byte": baseline * bits_per_nat_token}
