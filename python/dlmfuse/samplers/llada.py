"""LLaDA's sampler (Nie et al. 2025, ``generate`` of github.com/ML-GSAI/LLaDA): semi-autoregressive
blocks, a linear transfer schedule, low-confidence or random remasking, classifier-free guidance.

Per block of ``block_length`` columns (left to right) and per step i of the ``steps //
num_blocks`` steps of that block:

1. logits of the block's still-masked columns (CFG: ``un + (cfg_scale + 1) * (cond - un)``, the
   unconditional pass with the prompt replaced by mask tokens; done by :func:`dlmfuse.generate`);
2. a token per masked column: greedy at temperature 0, else Gumbel-max from
   ``softmax(logits / temperature)`` (:func:`dlmfuse.sample_tokens`, stream TOKENS);
3. confidence: ``low_confidence`` = the softmax probability of that token (untempered, as
   LLaDA), ``random`` = a uniform (stream CONFIDENCE); columns outside the block never compete;
4. the ``k_i`` most confident masked columns of the block take their token, with the schedule
   ``k_i = M // s + (1 if i < M % s else 0)`` (M = masked columns of the block at its start, per
   row; s = steps per block).

Steps whose ``k_i`` is 0 in every row make no network call (they change nothing in LLaDA either).
``suppress_tokens`` (e.g. LLaDA's EOS 126081 and EoT 126348) are never emitted and are left out
of the confidence softmax, which is what LLaDA's ``logits_eos_inf`` does for EOS and what its
``confidence_eos_eot_inf`` intends for both.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from ..sampling import sample_tokens
from ..unmask import select_unmask
from .base import (CONFIDENCE, TOKENS, Forward, Sampler, SamplerState, check_choice, check_float, check_int,
                   check_token_ids, compact, scatter_tokens)

__all__ = ["LLaDA", "transfer_schedule", "LLADA_MASK_TOKEN_ID"]

#: LLaDA-8B's [MASK] id (the default of its published generate).
LLADA_MASK_TOKEN_ID = 126336
REMASKING = ("low_confidence", "random")


def transfer_schedule(mask_count: Tensor, steps: int) -> Tensor:
    """LLaDA's linear schedule: int64 ``[B, steps]``, row b = ``M_b // steps`` plus one in the
    first ``M_b % steps`` steps (``mask_count`` = M, int ``[B]``)."""
    count = mask_count.to(torch.int64).reshape(-1, 1)
    extra = torch.arange(steps, device=count.device).unsqueeze(0) < count % steps
    return count // steps + extra.to(torch.int64)


class LLaDA(Sampler):
    """LLaDA's published sampler; see the module docstring.

    Args:
        steps: total denoising steps, a multiple of the number of blocks.
        gen_length: generated tokens, a multiple of ``block_length``.
        block_length: semi-autoregressive block size (``gen_length`` = one block).
        temperature: 0 = greedy; > 0 Gumbel-max sampling.
        remasking: ``"low_confidence"`` or ``"random"``.
        cfg_scale: classifier-free guidance weight w >= 0 (0 = off).
        mask_token_id: the [MASK] id (default LLaDA-8B's 126336).
        suppress_tokens: token ids never emitted (and excluded from the confidence softmax).

    Example::

        >>> import dlmfuse
        >>> s = dlmfuse.samplers.LLaDA(steps=8, gen_length=16, block_length=8, mask_token_id=63)
        >>> s.num_blocks, s.steps_per_block
        (2, 4)
    """

    def __init__(self, steps: int, gen_length: int, block_length: int, temperature: float = 0.0,
                 remasking: str = "low_confidence", cfg_scale: float = 0.0,
                 mask_token_id: int = LLADA_MASK_TOKEN_ID, *, suppress_tokens: Optional[Sequence[int]] = None):
        name = type(self).__name__
        self.steps = check_int(name, "steps", steps)
        self.gen_length = check_int(name, "gen_length", gen_length)
        self.block_length = check_int(name, "block_length", block_length)
        if self.gen_length % self.block_length:
            raise ValueError(f"{name}: gen_length ({gen_length}) must be a multiple of block_length "
                             f"({block_length})")
        self.num_blocks = self.gen_length // self.block_length
        if self.steps % self.num_blocks:
            raise ValueError(f"{name}: steps ({steps}) must be a multiple of the number of blocks "
                             f"(gen_length / block_length = {self.num_blocks})")
        self.steps_per_block = self.steps // self.num_blocks
        self.temperature = check_float(name, "temperature", temperature)
        self.remasking = check_choice(name, "remasking", remasking, REMASKING)
        self.cfg_scale = check_float(name, "cfg_scale", cfg_scale)
        self.mask_token_id = check_int(name, "mask_token_id", mask_token_id, minimum=0)
        self.suppress_tokens = check_token_ids(name, "suppress_tokens", suppress_tokens)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(steps={self.steps}, gen_length={self.gen_length}, "
                f"block_length={self.block_length}, temperature={self.temperature}, remasking={self.remasking!r}, "
                f"cfg_scale={self.cfg_scale}, mask_token_id={self.mask_token_id})")

    # -------------------------------------------------------------------------------- protocol
    def _init(self, state: SamplerState) -> None:
        state.total_steps = self.steps
        self._begin_block(state, 0)

    def _begin_block(self, state: SamplerState, index: int) -> None:
        start = state.gen_start + index * self.block_length
        state.block = (start, start + self.block_length)
        masked = state.x[:, start:start + self.block_length] == self.mask_token_id
        count = masked.sum(dim=1)
        schedule = transfer_schedule(count, self.steps_per_block)
        # One host read per block: afterwards every step's row count is known without a sync
        # (each step transfers exactly min(k, remaining) columns of a row).
        state.extra.update(block_index=index, block_step=0, schedule=schedule,
                           host_schedule=schedule.tolist(), remaining=count.tolist())

    def step(self, state: SamplerState, forward: Forward) -> Tensor:
        """One LLaDA step: returns bool ``[B, L]``, the columns unmasked."""
        if state.done:
            raise RuntimeError(f"{type(self).__name__}.step: generation already finished")
        ext = state.extra
        i, remaining = ext["block_step"], ext["remaining"]
        k_host = [row[i] for row in ext["host_schedule"]]
        written = torch.zeros_like(state.x, dtype=torch.bool)
        if any(min(k, r) > 0 for k, r in zip(k_host, remaining)):
            start, end = state.block
            candidates = state.x[:, start:end] == self.mask_token_id
            slots, valid, _ = compact(candidates, max(remaining))
            tokens, confidence = self._propose(state, forward, slots, valid)
            take = select_unmask(confidence, valid, k=ext["schedule"][:, i])
            written = scatter_tokens(state.x, start, slots, take, tokens)
        ext["remaining"] = [r - min(k, r) for k, r in zip(k_host, remaining)]
        ext["block_step"] = i + 1
        self._finish_step(state)
        if not state.done and ext["block_step"] == self.steps_per_block:
            self._begin_block(state, ext["block_index"] + 1)
        return written

    # --------------------------------------------------------------------------------- helpers
    def _propose(self, state: SamplerState, forward: Forward, slots: Tensor, valid: Tensor):
        """Tokens and confidences ``[B, n]`` for the block columns ``slots`` (padded slots get
        -inf confidence)."""
        start = state.block[0]
        rows = torch.where(valid, slots + start, torch.full_like(slots, start))
        logits = self._call(state, forward, rows)
        tokens, confidence = sample_tokens(logits, temperature=self.temperature, seed=state.seed,
                                           offset=state.offset(TOKENS), confidence="prob",
                                           suppress_tokens=self.suppress_tokens)
        if self.remasking == "random":
            uniforms = state.uniforms(CONFIDENCE)
            column = (rows - state.gen_start).clamp(0, uniforms.shape[1] - 1)
            confidence = uniforms.gather(1, column)
        return tokens, confidence.masked_fill(~valid, float("-inf"))
