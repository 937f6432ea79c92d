"""LLaDA's sampler (Nie et al. 2025, ``generate`` of github.com/ML-GSAI/LLaDA): semi-autoregressive
blocks, a linear transfer schedule, low-confidence or random remasking, classifier-free guidance.

Per block of ``block_length`` columns (left to right) and per step i of the ``steps //
num_blocks`` steps of that block:

1. logits of the block's still-masked columns (CFG: ``un + (cfg_scale + 1) * (cond - un)``, the
   unconditional pass with the prompt replaced by mask tokens; done by :func:`dlmfuse.generate`);
2. a token per masked column: greedy at temperature 0, else Gumbel-max from
   ``softmax(logits / temperature)`` (:func:`dlmfuse.sample_tokens`, stream TOKENS);
3. confidence: ``low_confidence`` = the softmax probability of that token (untempered, float64
   as LLaDA), ``random`` = a uniform (stream CONFIDENCE); columns after the block never compete;
4. the ``k_i`` most confident masked columns take their token, with the schedule
   ``k_i = M // s + (1 if i < M % s else 0)`` (M = masked columns of the block at its start, per
   row; s = steps per block).

As in LLaDA's loop, the candidates are all masked columns before the block's end (normally just
the block's; also mask tokens of the prompt), and the mask token itself may be proposed (the
column then stays masked). Steps whose ``k_i`` is 0 in every row make no network call (they
change nothing in LLaDA either).
``suppress_tokens`` (e.g. LLaDA's EOS 126081 and EoT 126348) are never emitted and are left out
of the confidence softmax, which is what LLaDA's ``logits_eos_inf`` does for EOS. LLaDA's
``confidence_eos_eot_inf`` is not reproduced: it sets those logits to -inf after the argmax, so
there EoT can still be emitted, with confidence 0 (filled last), and the EOS half has no effect.
Exact ties between confidences go to the lower column (dlmfuse.select_unmask); LLaDA's
``torch.topk`` breaks exact ties in an unspecified order, so on an exact tie (e.g. two columns
with probability 1.0) the two may pick different columns.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from ..sampling import _is_dtensor, sample_tokens
from ..unmask import select_unmask
from .base import (CONFIDENCE, TOKENS, Forward, Sampler, SamplerState, check_choice, check_float, check_int,
                   check_token_ids, compact, scatter_tokens)

__all__ = ["LLaDA", "transfer_schedule", "LLADA_MASK_TOKEN_ID"]

#: LLaDA-8B's [MASK] id (the default of its published generate).
LLADA_MASK_TOKEN_ID = 126336
REMASKING = ("low_confidence", "random")
#: Rows of float64 logits materialised at a time by token_probability (~64 MiB).
_FLOAT64_CHUNK_ELEMENTS = 1 << 23


def transfer_schedule(mask_count: Tensor, steps: int) -> Tensor:
    """LLaDA's linear schedule: int64 ``[B, steps]``, row b = ``M_b // steps`` plus one in the
    first ``M_b % steps`` steps (``mask_count`` = M, int ``[B]``)."""
    count = mask_count.to(torch.int64).reshape(-1, 1)
    extra = torch.arange(steps, device=count.device).unsqueeze(0) < count % steps
    return count // steps + extra.to(torch.int64)


class LLaDA(Sampler):
    """LLaDA's published sampler; see the module docstring.

    ``steps``, ``gen_length`` and ``block_length`` may be given by position; every later option
    is keyword-only (``LLaDA(32, 32, 8, 999)`` is a TypeError, not a temperature of 999).

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

    def __init__(self, steps: int, gen_length: int, block_length: int, *, temperature: float = 0.0,
                 remasking: str = "low_confidence", cfg_scale: float = 0.0,
                 mask_token_id: int = LLADA_MASK_TOKEN_ID, suppress_tokens: Optional[Sequence[int]] = None):
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
        count = (state.x[:, start:start + self.block_length] == self.mask_token_id).sum(dim=1)
        schedule = transfer_schedule(count, self.steps_per_block)
        # One host read per block tells which steps transfer nothing (and need no network call).
        state.extra.update(block_index=index, block_step=0, schedule=schedule,
                           idle=[not any(column) for column in schedule.t().tolist()])

    def candidates(self, state: SamplerState) -> Tensor:
        """bool ``[B, block_end]``: the masked columns before the end of the current block (LLaDA
        gives every later column -inf confidence; earlier columns are masked only if the prompt
        holds mask tokens or the model proposed the mask token)."""
        return state.x[:, :state.block[1]] == self.mask_token_id

    def step(self, state: SamplerState, forward: Forward) -> Tensor:
        """One LLaDA step: returns bool ``[B, L]``, the columns written."""
        if state.done:
            raise RuntimeError(f"{type(self).__name__}.step: generation already finished")
        ext = state.extra
        i = ext["block_step"]
        written = torch.zeros_like(state.x, dtype=torch.bool)
        if not ext["idle"][i]:
            slots, valid, n = compact(self.candidates(state))
            if n > 0:
                tokens, confidence = self._propose(state, forward, slots, valid)
                take = select_unmask(confidence, valid, k=ext["schedule"][:, i])
                written = scatter_tokens(state.x, 0, slots, take, tokens)
        ext["block_step"] = i + 1
        self._finish_step(state)
        if not state.done and ext["block_step"] == self.steps_per_block:
            self._begin_block(state, ext["block_index"] + 1)
        return written

    # --------------------------------------------------------------------------------- helpers
    def _proposal_suppress(self) -> Optional[Sequence[int]]:
        """Token ids never proposed (LLaDA: only suppress_tokens; the mask token may be proposed)."""
        return self.suppress_tokens

    def _propose(self, state: SamplerState, forward: Forward, slots: Tensor, valid: Tensor):
        """Tokens and confidences ``[B, n]`` for the columns ``slots`` (padded slots get -inf
        confidence and ask for the block's first row)."""
        rows = torch.where(valid, slots, torch.full_like(slots, state.block[0]))
        logits = self._call(state, forward, rows)
        tokens, _ = sample_tokens(logits, temperature=self.temperature, seed=state.seed,
                                  offset=state.offset(TOKENS), suppress_tokens=self._proposal_suppress())
        if self.remasking == "random":
            confidence = state.uniforms(CONFIDENCE).gather(1, rows)
        else:
            confidence = token_probability(logits, tokens, self.suppress_tokens)
        return tokens, confidence.masked_fill(~valid, float("-inf"))


def token_probability(logits: Tensor, tokens: Tensor, suppress_tokens: Optional[Sequence[int]] = None) -> Tensor:
    """float64 ``softmax(logits)[token]`` per row (suppressed ids left out), as LLaDA computes it.

    The remasking order compares these probabilities; confident tokens have p within 1e-7 of 1,
    where float32 (sample_tokens' confidence) would round many of them to the same value and tie.
    Evaluated as ``1 / sum_j exp(l_j - l_token)`` in float64, a bounded number of rows at a time.
    """
    if _is_dtensor(logits):  # split over ranks by vocabulary (tensor parallelism)
        from ..distributed.sampling import vocab_shard, token_probability as sharded_probability
        local, vocab_offset, vocab_size, group = vocab_shard(logits)
        if group is not None:
            return sharded_probability(local, tokens, suppress_tokens, vocab_offset=vocab_offset,
                                       vocab_size=vocab_size, group=group)
        logits = local
    vocab = logits.shape[-1]
    flat, chosen = logits.reshape(-1, vocab), tokens.reshape(-1, 1)
    out = torch.empty(flat.shape[0], dtype=torch.float64, device=logits.device)
    chunk = max(1, _FLOAT64_CHUNK_ELEMENTS // vocab)
    for first in range(0, flat.shape[0], chunk):
        rows = flat[first:first + chunk].to(torch.float64)
        if suppress_tokens:
            rows[:, list(suppress_tokens)] = float("-inf")
        out[first:first + chunk] = 1.0 / torch.exp(rows - rows.gather(1, chosen[first:first + chunk])).sum(dim=1)
    return out.reshape(tokens.shape)
