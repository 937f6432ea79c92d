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

The KV-cache variants (prefix / dual cache) are modes of :func:`dlmfuse.generate`.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

from torch import Tensor

from ..unmask import select_unmask
from .base import Forward, SamplerState, check_float, compact, scatter_tokens
from .llada import LLADA_MASK_TOKEN_ID, LLaDA

__all__ = ["FastDLLM"]


class FastDLLM(LLaDA):
    """Fast-dLLM confidence-aware parallel decoding; give exactly one of `threshold`, `factor`.

    Args:
        gen_length, block_length: as :class:`LLaDA` (gen_length a multiple of block_length).
        threshold: unmask every masked column of the block with confidence >= threshold (at
            least the best one per step); e.g. 0.9.
        factor: Fast-dLLM's factor rule (factor > 0); e.g. 1.0.
        temperature, remasking, cfg_scale, mask_token_id, suppress_tokens: as :class:`LLaDA`.

    A generation takes between ``num_blocks`` and ``gen_length`` steps; ``state.total_steps``
    is that upper bound (the number of mask tokens in the sequence).

    Example::

        >>> import dlmfuse
        >>> dlmfuse.samplers.FastDLLM(gen_length=64, block_length=32, threshold=0.9, mask_token_id=63)
        FastDLLM(gen_length=64, block_length=32, threshold=0.9, factor=None, temperature=0.0, remasking='low_confidence')
    """

    def __init__(self, gen_length: int, block_length: int, *, threshold: Optional[float] = None,
                 factor: Optional[float] = None, temperature: float = 0.0, remasking: str = "low_confidence",
                 cfg_scale: float = 0.0, mask_token_id: int = LLADA_MASK_TOKEN_ID,
                 suppress_tokens: Optional[Sequence[int]] = None):
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

    def __repr__(self) -> str:
        return (f"FastDLLM(gen_length={self.gen_length}, block_length={self.block_length}, "
                f"threshold={self.threshold}, factor={self.factor}, temperature={self.temperature}, "
                f"remasking={self.remasking!r})")

    def _init(self, state: SamplerState) -> None:
        # An upper bound: every step unmasks at least one column of every row that has candidates.
        state.total_steps = int((state.x == self.mask_token_id).sum(dim=1).max())
        self._begin_block(state, 0)
        self._advance(state)

    def _proposal_suppress(self) -> Sequence[int]:
        """The mask token is never proposed (so every step makes progress); see the module docstring."""
        return tuple(sorted({self.mask_token_id, *(self.suppress_tokens or ())}))

    def _begin_block(self, state: SamplerState, index: int) -> None:
        start = state.gen_start + index * self.block_length
        state.block = (start, start + self.block_length)
        state.extra["block_index"] = index

    def step(self, state: SamplerState, forward: Forward) -> Tensor:
        """One Fast-dLLM step: returns bool ``[B, L]``, the columns unmasked."""
        if state.done:
            raise RuntimeError("FastDLLM.step: generation already finished")
        slots, valid, _ = compact(self.candidates(state))  # the current block has a masked column
        tokens, confidence = self._propose(state, forward, slots, valid)
        if self.threshold is not None:
            # select_unmask keeps confidence > t; the largest double below the threshold turns that
            # into Fast-dLLM's confidence >= threshold, exactly.
            take = select_unmask(confidence, valid, threshold=math.nextafter(self.threshold, -math.inf))
        else:
            take = select_unmask(confidence, valid, factor=self.factor)
        written = scatter_tokens(state.x, 0, slots, take, tokens)
        state.step += 1
        self._advance(state)
        return written

    def _advance(self, state: SamplerState) -> None:
        """Moves past blocks in which no row has a masked column left (one host read)."""
        while not state.done and not bool((state.x[:, state.block[0]:state.block[1]] == self.mask_token_id).any()):
            if state.extra["block_index"] + 1 == self.num_blocks:
                state.done = True
            else:
                self._begin_block(state, state.extra["block_index"] + 1)
