"""Dream's sampler (Ye et al. 2025, ``DreamGenerationMixin._sample`` of github.com/DreamLM/Dream).

Times ``t_i`` on ``torch.linspace(1, eps, steps + 1)`` (float32, as Dream); at step i (t = t_i,
s = t_{i+1}) with M_b masked columns in row b (every mask token of the row, as Dream; the model
may propose the mask token, which leaves the column masked):

- ``origin``: each masked column is unmasked with probability ``1 - s / t`` (1 at the last step)
  and takes a token sampled from the model (stream TRANSFER decides; columns that stay masked
  need no logits, and a step that unmasks nothing makes no network call);
- ``maskgit_plus`` / ``topk_margin`` / ``entropy``: every masked column proposes a token with a
  confidence (probability / top-1 minus top-2 probability / negative entropy), and the
  ``int(M_b * (1 - s / t))`` most confident are unmasked (all at the last step; float32 math as
  Dream; Dream counts with the batch's mean M, the same number unless rows hold different
  numbers of masks, e.g. mask tokens in a prompt); a step where that is 0 in every row makes no
  network call (Dream's loop calls the model anyway). With ``alg_temp > 0`` they are instead
  drawn without replacement with probabilities
  ``softmax(confidence / alg_temp)`` (Gumbel-top-k with stream CONFIDENCE: the same distribution
  as Dream's ``torch.multinomial``).

Tokens: greedy at temperature 0, else sampled from ``softmax(logits / temperature)`` after top_p
and top_k filtering; confidences use the tempered, filtered distribution as Dream does
(:func:`dlmfuse.sample_tokens` with ``tempered_confidence=True``). ``shift_logits`` (Dream's
convention, default on): column i is predicted by the logits of column i - 1.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from ..sampling import sample_tokens
from ..unmask import select_unmask
from .base import (CONFIDENCE, TOKENS, TRANSFER, Forward, Sampler, SamplerState, check_choice, check_float,
                   check_int, check_token_ids, compact, optional_top_k, optional_top_p, scatter_tokens)

__all__ = ["Dream", "DREAM_MASK_TOKEN_ID"]

#: Dream-v0-7B's mask id.
DREAM_MASK_TOKEN_ID = 151666
ALGORITHMS = ("origin", "maskgit_plus", "topk_margin", "entropy")
_CONFIDENCE_KIND = {"maskgit_plus": "prob", "topk_margin": "margin", "entropy": "neg_entropy"}


class Dream(Sampler):
    """Dream's published sampler; see the module docstring.

    Args:
        steps: denoising steps (Dream's ``steps``).
        gen_length: generated tokens (Dream's ``max_new_tokens``).
        mask_token_id: the mask id (default Dream-v0's 151666).
        alg: ``"origin"``, ``"maskgit_plus"``, ``"topk_margin"`` or ``"entropy"``.
        alg_temp: > 0 draws the unmasked columns by ``softmax(confidence / alg_temp)`` (None or
            0: the top ones).
        eps: the last time of the grid (Dream's default 1e-3).
        temperature, top_p, top_k: token sampling (temperature 0 = greedy).
        shift_logits: predict column i from the logits of column i - 1 (Dream's models do).
        suppress_tokens: token ids never emitted.

    Example::

        >>> import dlmfuse
        >>> dlmfuse.samplers.Dream(steps=16, gen_length=32, alg="entropy", mask_token_id=63)
        Dream(steps=16, gen_length=32, alg='entropy', alg_temp=0.0, eps=0.001, temperature=0.0, shift_logits=True)
    """

    def __init__(self, steps: int, gen_length: int, *, mask_token_id: int = DREAM_MASK_TOKEN_ID,
                 alg: str = "origin", alg_temp: Optional[float] = None, eps: float = 1e-3,
                 temperature: float = 0.0, top_p: Optional[float] = None, top_k: Optional[int] = None,
                 shift_logits: bool = True, suppress_tokens: Optional[Sequence[int]] = None):
        self.steps = check_int("Dream", "steps", steps)
        self.gen_length = check_int("Dream", "gen_length", gen_length)
        self.mask_token_id = check_int("Dream", "mask_token_id", mask_token_id, minimum=0)
        self.alg = check_choice("Dream", "alg", alg, ALGORITHMS)
        self.alg_temp = 0.0 if alg_temp is None else check_float("Dream", "alg_temp", alg_temp)
        self.eps = check_float("Dream", "eps", eps, inclusive=False, maximum=1.0)
        self.temperature = check_float("Dream", "temperature", temperature)
        self.top_p = optional_top_p("Dream", top_p)
        self.top_k = optional_top_k("Dream", top_k)
        if not isinstance(shift_logits, bool):
            raise TypeError(f"Dream: shift_logits must be a bool, got {type(shift_logits).__name__}")
        self.shift_logits = shift_logits
        self.suppress_tokens = check_token_ids("Dream", "suppress_tokens", suppress_tokens)
        self.timesteps = torch.linspace(1, self.eps, self.steps + 1)  # float32, as Dream

    def __repr__(self) -> str:
        return (f"Dream(steps={self.steps}, gen_length={self.gen_length}, alg={self.alg!r}, "
                f"alg_temp={self.alg_temp}, eps={self.eps}, temperature={self.temperature}, "
                f"shift_logits={self.shift_logits})")

    def _init(self, state: SamplerState) -> None:
        state.total_steps = self.steps

    def transfer_fraction(self, i: int) -> Tensor:
        """float32 ``1 - s / t`` of step i (1 at the last step), computed as Dream does."""
        if i == self.steps - 1:
            return torch.tensor(1.0)
        t, s = self.timesteps[i], self.timesteps[i + 1]
        return 1 - s / t

    def step(self, state: SamplerState, forward: Forward) -> Tensor:
        """One Dream step: returns bool ``[B, L]``, the columns unmasked."""
        if state.done:
            raise RuntimeError("Dream.step: generation already finished")
        masked = state.x == self.mask_token_id  # [B, L]
        fraction = self.transfer_fraction(state.step)
        written = torch.zeros_like(state.x, dtype=torch.bool)
        if self.alg == "origin":
            chosen = masked & (state.uniforms(TRANSFER) < fraction.item())
            slots, valid, n = compact(chosen)
            if n > 0:
                tokens, _ = self._propose(state, forward, slots, valid, "prob")
                written = scatter_tokens(state.x, 0, slots, valid, tokens)
        else:
            count = masked.sum(dim=1)
            if state.step == self.steps - 1:
                k = count
            else:
                k = (count.to(torch.float32) * fraction.to(count.device)).floor().to(torch.int64)
            slots, valid, n = compact(masked)
            # A step that unmasks nothing in any row (k = 0: e.g. the first steps when steps is
            # close to gen_length) makes no network call; the random streams are per step.
            if n > 0 and bool((k > 0).any()):
                tokens, confidence = self._propose(state, forward, slots, valid, _CONFIDENCE_KIND[self.alg])
                key = confidence.to(torch.float64)
                if self.alg_temp > 0:
                    gumbel = -torch.log(-torch.log(state.uniforms(CONFIDENCE)))
                    key = key / self.alg_temp + gumbel.gather(1, slots.clamp(max=gumbel.shape[1] - 1))
                take = select_unmask(key.masked_fill(~valid, float("-inf")), valid, k=k)
                written = scatter_tokens(state.x, 0, slots, take, tokens)
        self._finish_step(state)
        return written

    def _propose(self, state: SamplerState, forward: Forward, slots: Tensor, valid: Tensor, kind: str):
        rows = torch.where(valid, slots, torch.full_like(slots, state.gen_start))
        logits = self._call(state, forward, rows)
        return sample_tokens(logits, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                             seed=state.seed, offset=state.offset(TOKENS), confidence=kind,
                             suppress_tokens=self.suppress_tokens, tempered_confidence=True)
