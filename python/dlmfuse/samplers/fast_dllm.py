"""Fast-dLLM parallel decoding (Wu et al. 2025, github.com/NVlabs/Fast-dLLM ``llada/generate.py``):
LLaDA's semi-autoregressive blocks, but the number of columns unmasked per step is decided by the
model's confidence instead of a fixed schedule; a block takes as many steps as it needs.

Per step, among the masked columns before the block's end (LLaDA's candidates; confidence = the
probability of the proposed token, as LLaDA):

- threshold rule: every column with ``confidence >= threshold`` (Fast-dLLM's
  ``get_transfer_index`` drops those below it), and always the most confident one;
- factor rule: with the confidences sorted ``c(1) >= c(2) >= ...``, the longest prefix with
  ``c(m) >= 1 - factor / (m + 1)`` (``dlmfuse.select_unmask(factor=...)``; m = 1 always). Fast-dLLM's
  ``get_transfer_index_dynamic`` differs in one corner: when only the last candidate fails the
  test it still takes all of them; here that candidate stays masked, as the rule says.

A block ends when none of its columns is masked. Fast-dLLM's code may propose the mask token
itself (the column then stays masked, and under greedy decoding the loop can run forever); here
the proposal is the most likely other token, while the confidence is still its probability under
the full softmax, as Fast-dLLM computes it. For a model that does not predict the mask token
(every trained one) this is Fast-dLLM exactly; every step unmasks at least one column per row.

Token-to-token editing (``edit_threshold=``; LLaDA 2.1, Bie et al. 2026, "LLaDA2.1: Speeding Up
Text Diffusion via Token Editing", its joint threshold decoding): every step also proposes a token
for each already decoded column of the current block, and a column whose proposal differs from its
token and has confidence ``> edit_threshold`` takes the proposal, alongside the mask-to-token
unmasking above. Once a row's block holds no mask, the block keeps stepping for that row (editing
only) until a step edits nothing or ``max_post_steps`` such steps have run; the block ends when
every row is done. The confidence of an edit is that of unmasking (the float64 probability of the
proposal under the full softmax); LLaDA 2.1's code compares the tempered probability, which is the
same at temperature 0 (its published setting). Only the current block is edited: earlier blocks
and the prompt are final, as in LLaDA 2.1.

The KV-cache variants (prefix / dual cache) are modes of :func:`dlmfuse.generate`. Edits stay
inside the current block, which every cached step recomputes, so editing works in every mode.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from ..unmask import select_unmask
from .base import Forward, SamplerState, check_float, check_int, compact, scatter_tokens
from .llada import LLADA_MASK_TOKEN_ID, LLaDA
from .refine import token_edits

#: LLaDA 2.1's default bound on the editing-only steps after a block is filled.
MAX_POST_STEPS = 16

__all__ = ["FastDLLM"]


class FastDLLM(LLaDA):
    """Fast-dLLM confidence-aware parallel decoding; give exactly one of `threshold`, `factor`.

    Args:
        gen_length, block_length: as :class:`LLaDA` (gen_length a multiple of block_length).
        threshold: unmask every masked column of the block with confidence >= threshold (at
            least the best one per step); e.g. 0.9.
        factor: Fast-dLLM's factor rule (factor > 0); e.g. 1.0.
        temperature, remasking, cfg_scale, mask_token_id, suppress_tokens: as :class:`LLaDA`.
        edit_threshold: LLaDA 2.1's token-to-token editing (see the module docstring): a decoded
            column of the block takes a different proposal whose confidence exceeds it, in
            [0, 1]; None (default) = no editing. Needs ``remasking="low_confidence"``.
        max_post_steps: with editing, the most editing-only steps per block once it holds no
            mask (LLaDA 2.1's default 16; 0 = edit only alongside unmasking).

    A generation takes between ``num_blocks`` and ``gen_length`` steps (plus up to
    ``max_post_steps`` editing-only steps per block with editing); ``state.total_steps`` is that
    upper bound.

    Example::

        >>> import dlmfuse
        >>> dlmfuse.samplers.FastDLLM(gen_length=64, block_length=32, threshold=0.9, mask_token_id=63)
        FastDLLM(gen_length=64, block_length=32, threshold=0.9, factor=None, temperature=0.0, remasking='low_confidence')
    """

    def __init__(self, gen_length: int, block_length: int, *, threshold: Optional[float] = None,
                 factor: Optional[float] = None, temperature: float = 0.0, remasking: str = "low_confidence",
                 cfg_scale: float = 0.0, mask_token_id: int = LLADA_MASK_TOKEN_ID,
                 suppress_tokens: Optional[Sequence[int]] = None, edit_threshold: Optional[float] = None,
                 max_post_steps: int = MAX_POST_STEPS):
        # steps = gen_length satisfies LLaDA's checks; the per-block schedule is not used.
        super().__init__(gen_length, gen_length, block_length, temperature=temperature, remasking=remasking,
                         cfg_scale=cfg_scale, mask_token_id=mask_token_id, suppress_tokens=suppress_tokens)
        if (threshold is None) == (factor is None):
            raise ValueError(f"FastDLLM: give exactly one of threshold, factor; got threshold={threshold!r}, "
                             f"factor={factor!r}")
        # Confidences are probabilities: above 1 the rule would take only the best column per step.
        self.threshold = None if threshold is None else check_float("FastDLLM", "threshold", threshold,
                                                                    minimum=-math.inf, maximum=1.0)
        self.factor = None if factor is None else check_float("FastDLLM", "factor", factor, inclusive=False)
        self.edit_threshold = None if edit_threshold is None else check_float("FastDLLM", "edit_threshold",
                                                                              edit_threshold, maximum=1.0)
        self.max_post_steps = check_int("FastDLLM", "max_post_steps", max_post_steps, minimum=0)
        if self.edit_threshold is not None and self.remasking != "low_confidence":
            raise ValueError(f"FastDLLM: edit_threshold compares the model's probability, which "
                             f"remasking={self.remasking!r} does not compute; use remasking='low_confidence'")

    def __repr__(self) -> str:
        return (f"FastDLLM(gen_length={self.gen_length}, block_length={self.block_length}, "
                f"threshold={self.threshold}, factor={self.factor}, temperature={self.temperature}, "
                f"remasking={self.remasking!r}{self._edit_repr()})")

    def _edit_repr(self) -> str:
        if self.edit_threshold is None:
            return ""
        return f", edit_threshold={self.edit_threshold}, max_post_steps={self.max_post_steps}"

    def _init(self, state: SamplerState) -> None:
        # An upper bound: every step unmasks at least one column of every row that has candidates
        # (with editing, each block adds at most max_post_steps editing-only steps).
        state.total_steps = int((state.x == self.mask_token_id).sum(dim=1).max())
        if self.edit_threshold is not None:
            state.total_steps += self.num_blocks * self.max_post_steps
        self._begin_block(state, 0)
        self._advance(state)

    def _proposal_suppress(self) -> Sequence[int]:
        """The mask token is never proposed (so every step makes progress); see the module docstring."""
        return tuple(sorted({self.mask_token_id, *(self.suppress_tokens or ())}))

    def _begin_block(self, state: SamplerState, index: int) -> None:
        start = state.gen_start + index * self.block_length
        state.block = (start, start + self.block_length)
        state.extra["block_index"] = index
        if self.edit_threshold is not None:  # per row: editing-only steps taken, block done
            batch, device = state.x.shape[0], state.x.device
            state.extra.update(post_steps=torch.zeros(batch, dtype=torch.int64, device=device),
                               finished=torch.zeros(batch, dtype=torch.bool, device=device))

    def step(self, state: SamplerState, forward: Forward) -> Tensor:
        """One Fast-dLLM step: returns bool ``[B, L]``, the columns unmasked (or edited)."""
        if state.done:
            raise RuntimeError("FastDLLM.step: generation already finished")
        if self.edit_threshold is not None:
            written = self._edit_step(state, forward)
        else:
            slots, valid, _ = compact(self.candidates(state))  # the current block has a masked column
            tokens, confidence = self._propose(state, forward, slots, valid)
            written = scatter_tokens(state.x, 0, slots, self._unmask(confidence, valid), tokens)
        state.step += 1
        self._advance(state)
        return written

    def _unmask(self, confidence: Tensor, candidates: Tensor) -> Tensor:
        if self.threshold is not None:
            # select_unmask keeps confidence > t; the largest double below the threshold turns that
            # into Fast-dLLM's confidence >= threshold, exactly.
            return select_unmask(confidence, candidates, threshold=math.nextafter(self.threshold, -math.inf))
        return select_unmask(confidence, candidates, factor=self.factor)

    def _edit_step(self, state: SamplerState, forward: Forward) -> Tensor:
        """Mask-to-token unmasking and token-to-token edits from one call: the candidates and the
        decoded columns of the block, in rows whose block is not done."""
        ext, x = state.extra, state.x
        length = x.shape[1]
        cols = torch.arange(length, device=x.device)
        active = ~ext["finished"][:, None]
        masked = x == self.mask_token_id
        candidates = masked & (cols < state.block[1]) & active
        editable = ~masked & (cols >= state.block[0]) & (cols < state.block[1]) & active
        slots, valid, _ = compact(candidates | editable)  # some row is active (else the block ended)
        tokens, confidence = self._propose(state, forward, slots, valid)
        safe = slots.clamp(max=length - 1)  # padded slots point past the row
        is_candidate = valid & candidates.gather(1, safe)
        take = self._unmask(confidence.masked_fill(~is_candidate, -math.inf), is_candidate)
        edit = token_edits(tokens, confidence, x.gather(1, safe), valid & editable.gather(1, safe),
                           self.edit_threshold)
        # LLaDA 2.1: a step on a block without masks that edits nothing ends the block for the row.
        ext["finished"] |= ext["post"] & ~edit.any(dim=1)
        return scatter_tokens(x, 0, slots, take | edit, tokens)

    def _enter_edit_step(self, state: SamplerState) -> None:
        """LLaDA 2.1's bookkeeping before a step: a row whose block holds no mask counts an
        editing-only step, and is done once it has taken more than max_post_steps of them."""
        ext = state.extra
        has_mask = (state.x[:, state.block[0]:state.block[1]] == self.mask_token_id).any(dim=1)
        post = ~has_mask & ~ext["finished"]
        ext["post_steps"] += post.to(torch.int64)
        ext["finished"] |= post & (ext["post_steps"] > self.max_post_steps)
        ext["post"] = post & ~ext["finished"]

    def _advance(self, state: SamplerState) -> None:
        """Moves past blocks that are done in every row (one host read): no masked column left,
        and with editing, no edit left to make."""
        while not state.done:
            if self.edit_threshold is not None:
                self._enter_edit_step(state)
                block_done = bool(state.extra["finished"].all())
            else:
                block_done = not bool((state.x[:, state.block[0]:state.block[1]] == self.mask_token_id).any())
            if not block_done:
                return
            if state.extra["block_index"] + 1 == self.num_blocks:
                state.done = True
            else:
                self._begin_block(state, state.extra["block_index"] + 1)
