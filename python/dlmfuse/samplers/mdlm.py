"""MDLM ancestral sampling (Sahoo et al. 2024, github.com/kuleshov-group/mdlm) with the log-linear
schedule ``alpha_t = 1 - t``.

``steps`` steps from t = 1 to t = 0 on the uniform grid ``t_i = 1 - i / steps``. From t to
s = t - 1/steps, each masked column is unmasked with probability
``(alpha_s - alpha_t) / (1 - alpha_t)`` (= 1 at the last step, so nothing stays masked) and then
takes a token sampled from the model's distribution with the mask token's probability removed
(MDLM's SUBS parameterisation). The posterior ``q(x_s | x_t, x_0)`` of MDLM is sampled in that
order: the unmasking coins first (stream TRANSFER), then tokens only for the columns that unmask.

Network calls: a step whose coins unmask nothing makes none. MDLM caches the logits and skips
the call when x did not change since the last one; here every call is followed by a change (it
is made only for columns that unmask), so no logits could ever be reused: the number of calls is
at most MDLM's.

Every mask token of the sequence is a masked column, mask tokens inside the prompt included (as
in MDLM, which has no prompt). Left padding never is (see dlmfuse.generate).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from ..sampling import sample_tokens
from .base import (TOKENS, TRANSFER, Forward, Sampler, SamplerState, check_float, check_int, check_token_ids,
                   compact, optional_top_k, optional_top_p, scatter_tokens)

__all__ = ["MDLM"]


def log_linear_alpha(t: float) -> float:
    """``alpha_t = 1 - t``: the probability that a token is clean at time t."""
    return 1.0 - t


class MDLM(Sampler):
    """MDLM ancestral sampler; see the module docstring.

    Args:
        steps: grid steps T (a step that unmasks nothing costs no network call).
        gen_length: generated tokens.
        mask_token_id: the mask id (required: model specific).
        temperature: 1 = sample from the model (default); 0 = greedy; other values temper.
        top_p, top_k: nucleus / top-k filtering of the model's distribution.
        suppress_tokens: further ids never emitted (the mask id never is).

    Example::

        >>> import dlmfuse
        >>> s = dlmfuse.samplers.MDLM(steps=4, gen_length=8, mask_token_id=63)
        >>> [round(s.unmask_probability(i), 4) for i in range(4)]
        [0.25, 0.3333, 0.5, 1.0]
    """

    def __init__(self, steps: int, gen_length: int, *, mask_token_id: int, temperature: float = 1.0,
                 top_p: Optional[float] = None, top_k: Optional[int] = None,
                 suppress_tokens: Optional[Sequence[int]] = None):
        self.steps = check_int("MDLM", "steps", steps)
        self.gen_length = check_int("MDLM", "gen_length", gen_length)
        self.mask_token_id = check_int("MDLM", "mask_token_id", mask_token_id, minimum=0)
        self.temperature = check_float("MDLM", "temperature", temperature)
        self.top_p = optional_top_p("MDLM", top_p)
        self.top_k = optional_top_k("MDLM", top_k)
        extra = check_token_ids("MDLM", "suppress_tokens", suppress_tokens) or ()
        self.suppress_tokens = tuple(sorted({self.mask_token_id, *extra}))

    def __repr__(self) -> str:
        return (f"MDLM(steps={self.steps}, gen_length={self.gen_length}, mask_token_id={self.mask_token_id}, "
                f"temperature={self.temperature})")

    def unmask_probability(self, i: int) -> float:
        """``(alpha_s - alpha_t) / (1 - alpha_t)`` of step i (t = 1 - i/T, s = 1 - (i+1)/T)."""
        t, s = 1.0 - i / self.steps, 1.0 - (i + 1) / self.steps
        alpha_t, alpha_s = log_linear_alpha(t), log_linear_alpha(s)
        return (alpha_s - alpha_t) / (1.0 - alpha_t)

    def _init(self, state: SamplerState) -> None:
        state.total_steps = self.steps

    def step(self, state: SamplerState, forward: Forward) -> Tensor:
        """One ancestral step: returns bool ``[B, L]``, the columns unmasked."""
        if state.done:
            raise RuntimeError("MDLM.step: generation already finished")
        masked = state.x == self.mask_token_id
        unmask = masked & (state.uniforms(TRANSFER) < self.unmask_probability(state.step))
        slots, valid, n = compact(unmask)
        written = torch.zeros_like(state.x, dtype=torch.bool)
        if n > 0:
            rows = torch.where(valid, slots, torch.full_like(slots, state.gen_start))
            logits = self._call(state, forward, rows)
            tokens, _ = sample_tokens(logits, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                                      seed=state.seed, offset=state.offset(TOKENS),
                                      suppress_tokens=self.suppress_tokens)
            written = scatter_tokens(state.x, 0, slots, valid, tokens)
        self._finish_step(state)
        return written
