"""ReMDM: remasking sampling for masked diffusion models (Wang, Schiff, Sahoo and Kuleshov 2025,
"Remasking Discrete Diffusion Models with Inference-Time Scaling"; github.com/kuleshov-group/remdm,
``_ddpm_caching_update``).

MDLM's ancestral sampler (:mod:`dlmfuse.samplers.mdlm`) freezes a token once it is written.
ReMDM's backward process returns each decoded token to the mask with probability sigma_t at every
step and unmasks masked tokens a little faster, so that MDLM's marginals are kept:

    decoded, z_t = x:  q(z_s) = (1 - sigma_t) x + sigma_t m
    masked,  z_t = m:  q(z_s) = (alpha_s - (1 - sigma_t) alpha_t) / (1 - alpha_t) x_theta
                              + (1 - alpha_s - sigma_t alpha_t) / (1 - alpha_t) m

x_theta is the model's distribution with the mask token removed (MDLM's SUBS), and sigma_t must
not exceed ``sigma_max = min(1, (1 - alpha_s) / alpha_t)`` (1 where alpha_t = 0). The schedules,
with ReMDM's log-linear ``alpha_t = 1 - t`` on the grid ``t_i = 1 - i / steps``, ``s = t - 1/steps``:

- ``"cap"``: ``sigma_t = min(eta, (1 - alpha_s) / alpha_t)`` (eta when alpha_t = 0);
- ``"rescale"``: ``sigma_t = eta * sigma_max``;
- ``"conf"``: per column ``sigma_t = w * sigma_max``, w = softmax over the row's decoded columns of
  ``-psi``, psi = the probability the token had when it was last unmasked (the least confident
  tokens are remasked first); masked columns have sigma 0, so they unmask as in MDLM;
- ``"loop"``: three phases in t. For ``t > t_on``, MDLM with ``alpha_t = (1 - t) alpha_on /
  (1 - t_on)`` (alpha_on is reached at t_on); for ``t_off < t <= t_on``, alpha stays alpha_on and
  sigma = eta: decoded tokens are remasked with probability eta and masked ones unmasked with
  ``eta alpha_on / (1 - alpha_on)``, so the share of decoded tokens stays alpha_on while they are
  revised; for ``t <= t_off``, MDLM with ``alpha_t = 1 - t (1 - alpha_on) / t_off``.

One step: a uniform per column (stream TRANSFER) decides the mask-or-token part of ``q(z_s)``: a
decoded column is remasked when ``u < sigma_t``, a masked one unmasked when ``u <
1 - q(m)``; the columns that unmask then take tokens sampled from the model (stream TOKENS, mask
token excluded), asked for those rows only. A step that unmasks nothing makes no network call.
The remasks are applied after the call: the model sees z_t.

Against the reference code: the grid ends at t = 0, so the last step (sigma_max = 0 there)
unmasks every column left, as dlmfuse's MDLM (their grid stops at t = 1e-5 and a final argmax
pass fills what is left); psi is kept in float32 (their code rounds it to bfloat16); only the
generated columns are sampled or remasked (a mask token in the prompt stays); the model is called
only for the columns that unmask, which samples the same distribution.

Cache modes: ``"prefix"`` treats the generation as one block, as MDLM (each call recomputes the
whole generation and reads the prompt from the cache). ``"dual"`` feeds each call only the
columns whose token changed since the cache last stored them (unmasked or remasked by earlier
steps) plus the columns that need logits; their K/V are rewritten at exactly those rows through
the model's cache write (:func:`dlmfuse.kv_scatter_`) and every other row is read from the cache.
Both are exact for a one-layer model; deeper layers' K/V of unchanged columns go stale as in any
DualCache.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..sampling import sample_tokens
from .base import (TOKENS, TRANSFER, Forward, Sampler, SamplerState, check_choice, check_float, check_int,
                   check_token_ids, compact, optional_top_k, optional_top_p, scatter_tokens)
from .refine import confidence_weights, fed_columns, remask_and_unmask

__all__ = ["ReMDM", "SCHEDULES"]

SCHEDULES = ("cap", "rescale", "conf", "loop")
#: eta of the published OpenWebText runs (scripts/remdm-*.sh of the reference code, 1024 steps).
PUBLISHED_ETA = {"cap": 0.008, "rescale": 0.015, "loop": 0.02}
#: t_on, t_off, alpha_on of the published ReMDM-loop run.
PUBLISHED_LOOP = (0.55, 0.05, 0.9)


class ReMDM(Sampler):
    """ReMDM's remasking sampler; see the module docstring.

    Args:
        steps: grid steps T (a step that unmasks nothing costs no network call).
        gen_length: generated tokens.
        mask_token_id: the mask id (required: model specific).
        schedule: ``"cap"`` (default), ``"rescale"``, ``"conf"`` or ``"loop"``.
        eta: the remasking strength of cap / rescale / loop, in [0, 1] (None: the published
            value, 0.008 / 0.015 / 0.02). ``"conf"`` takes none.
        t_on, t_off, alpha_on: the loop's phases, ``0 < t_off < t_on < 1``, ``0 < alpha_on < 1``
            (None: the published 0.55, 0.05, 0.9); only for ``"loop"``.
        temperature: 1 = sample from the model (default), 0 = greedy, others temper.
        top_p, top_k, suppress_tokens: as :class:`MDLM` (the mask id is never emitted).

    Example::

        >>> import dlmfuse
        >>> s = dlmfuse.samplers.ReMDM(4, 8, mask_token_id=63, schedule="rescale", eta=0.5)
        >>> [tuple(round(v, 4) for v in s.rates(i)) for i in range(4)]   # (sigma, unmask probability)
        [(0.5, 0.25), (0.5, 0.5), (0.25, 0.75), (0.0, 1.0)]
    """

    cache_modes = ("prefix", "dual")
    incremental_modes = ("dual",)

    def __init__(self, steps: int, gen_length: int, *, mask_token_id: int, schedule: str = "cap",
                 eta: Optional[float] = None, t_on: Optional[float] = None, t_off: Optional[float] = None,
                 alpha_on: Optional[float] = None, temperature: float = 1.0, top_p: Optional[float] = None,
                 top_k: Optional[int] = None, suppress_tokens: Optional[Sequence[int]] = None):
        self.steps = check_int("ReMDM", "steps", steps)
        self.gen_length = check_int("ReMDM", "gen_length", gen_length)
        self.mask_token_id = check_int("ReMDM", "mask_token_id", mask_token_id, minimum=0)
        self.schedule = check_choice("ReMDM", "schedule", schedule, SCHEDULES)
        if schedule == "conf":
            if eta is not None:
                raise ValueError(f"ReMDM: schedule='conf' takes no eta (its sigma is softmax(-confidence) * "
                                 f"sigma_max), got eta={eta!r}")
            self.eta = None
        else:
            self.eta = check_float("ReMDM", "eta", PUBLISHED_ETA[schedule] if eta is None else eta, maximum=1.0)
        self.t_on, self.t_off, self.alpha_on = self._loop_phases(t_on, t_off, alpha_on)
        self.temperature = check_float("ReMDM", "temperature", temperature)
        self.top_p = optional_top_p("ReMDM", top_p)
        self.top_k = optional_top_k("ReMDM", top_k)
        extra = check_token_ids("ReMDM", "suppress_tokens", suppress_tokens) or ()
        self.suppress_tokens = tuple(sorted({self.mask_token_id, *extra}))

    def _loop_phases(self, t_on, t_off, alpha_on):
        given = {name: value for name, value in (("t_on", t_on), ("t_off", t_off), ("alpha_on", alpha_on))
                 if value is not None}
        if self.schedule != "loop":
            if given:
                raise ValueError(f"ReMDM: {', '.join(given)} only apply to schedule='loop', got schedule="
                                 f"{self.schedule!r} with {given}")
            return None, None, None
        defaults = dict(zip(("t_on", "t_off", "alpha_on"), PUBLISHED_LOOP), **given)
        t_on = check_float("ReMDM", "t_on", defaults["t_on"], inclusive=False, maximum=1.0)
        t_off = check_float("ReMDM", "t_off", defaults["t_off"], inclusive=False)
        alpha_on = check_float("ReMDM", "alpha_on", defaults["alpha_on"], inclusive=False)
        if not (t_off < t_on < 1.0 and alpha_on < 1.0):
            raise ValueError(f"ReMDM: the loop needs 0 < t_off < t_on < 1 and 0 < alpha_on < 1, got t_on={t_on}, "
                             f"t_off={t_off}, alpha_on={alpha_on}")
        if self.eta * alpha_on > 1.0 - alpha_on:
            raise ValueError(f"ReMDM: the loop unmasks with probability eta * alpha_on / (1 - alpha_on), which must "
                             f"be <= 1; got eta={self.eta}, alpha_on={alpha_on}")
        if self.steps * t_off < 1.0:  # the last step (t = 1/steps) must fall in the final MDLM phase
            raise ValueError(f"ReMDM: the loop needs steps >= 1 / t_off so that its last step unmasks every column; "
                             f"got steps={self.steps}, t_off={t_off}")
        return t_on, t_off, alpha_on

    def __repr__(self) -> str:
        loop = (f", t_on={self.t_on}, t_off={self.t_off}, alpha_on={self.alpha_on}" if self.schedule == "loop" else "")
        return (f"ReMDM(steps={self.steps}, gen_length={self.gen_length}, mask_token_id={self.mask_token_id}, "
                f"schedule={self.schedule!r}, eta={self.eta}{loop}, temperature={self.temperature})")

    # ------------------------------------------------------------------------------- schedule
    def alphas(self, i: int) -> Tuple[float, float, bool]:
        """``(alpha_t, alpha_s, looping)`` of step i (t = 1 - i/T, s = t - 1/T); looping: the loop
        phase of ``"loop"`` (alpha held at alpha_on)."""
        t, s = (self.steps - i) / self.steps, (self.steps - i - 1) / self.steps
        if self.schedule != "loop":
            return 1.0 - t, 1.0 - s, False
        if t > self.t_on:  # alpha rises to alpha_on at t_on; s may lie past t_on, as in the reference
            return ((1.0 - t) * self.alpha_on / (1.0 - self.t_on), (1.0 - s) * self.alpha_on / (1.0 - self.t_on),
                    False)
        if t <= self.t_off:
            return 1.0 - t * (1.0 - self.alpha_on) / self.t_off, 1.0 - s * (1.0 - self.alpha_on) / self.t_off, False
        return self.alpha_on, self.alpha_on, True

    def rates(self, i: int) -> Tuple[float, float]:
        """``(sigma, unmask probability)`` of step i: decoded columns are remasked with
        probability sigma (for ``"conf"``, sigma_max, which each column's weight scales), masked
        columns unmask with the given probability."""
        alpha_t, alpha_s, looping = self.alphas(i)
        if self.schedule == "loop":
            sigma = self.eta if looping else 0.0
        else:
            ratio = (1.0 - alpha_s) / alpha_t if alpha_t > 0 else None
            sigma_max = 1.0 if ratio is None else min(1.0, ratio)
            if self.schedule == "cap":
                sigma = self.eta if ratio is None else min(self.eta, ratio)
            elif self.schedule == "rescale":
                sigma = self.eta * sigma_max
            else:
                sigma = sigma_max
        sigma_masked = 0.0 if self.schedule == "conf" else sigma  # conf: masked columns have sigma 0
        return sigma, (alpha_s - (1.0 - sigma_masked) * alpha_t) / (1.0 - alpha_t)

    # ------------------------------------------------------------------------------- protocol
    def _init(self, state: SamplerState) -> None:
        state.total_steps = self.steps
        generated = torch.zeros_like(state.x, dtype=torch.bool)
        generated[:, state.gen_start:] = True
        # psi starts at +inf (weight 0) as in the reference: only tokens this sampler wrote are
        # remasked by "conf". stale / requested: the dual cache's bookkeeping.
        state.extra.update(generated=generated, psi=torch.full(state.x.shape, float("inf"), dtype=torch.float64,
                                                                device=state.x.device),
                           stale=torch.zeros_like(generated), requested=torch.zeros_like(generated))

    def step(self, state: SamplerState, forward: Forward) -> Tensor:
        """One ReMDM step: returns bool ``[B, L]``, the columns whose token changed (unmasked or
        remasked)."""
        if state.done:
            raise RuntimeError("ReMDM.step: generation already finished")
        ext, x = state.extra, state.x
        sigma, unmask_probability = self.rates(state.step)
        masked = ext["generated"] & (x == self.mask_token_id)
        decoded = ext["generated"] & ~masked
        remask_probability = confidence_weights(ext["psi"], decoded) * sigma if self.schedule == "conf" else sigma
        remask, unmask = remask_and_unmask(masked, decoded, state.uniforms(TRANSFER), remask_probability,
                                           unmask_probability)
        slots, valid, n = compact(unmask)
        written = torch.zeros_like(masked)
        if n > 0:
            ext["requested"] = unmask
            logits = self._call(state, forward, torch.where(valid, slots, torch.full_like(slots, state.gen_start)))
            tokens, probability = sample_tokens(logits, temperature=self.temperature, top_k=self.top_k,
                                                top_p=self.top_p, seed=state.seed, offset=state.offset(TOKENS),
                                                suppress_tokens=self.suppress_tokens)
            written = scatter_tokens(x, 0, slots, valid, tokens)
            ext["psi"] = _scatter_psi(ext["psi"], slots, valid, probability)
        x.masked_fill_(remask, self.mask_token_id)  # after the call: the model saw z_t
        ext["stale"] |= written | remask
        self._finish_step(state)
        return written | remask

    def incremental_columns(self, state: SamplerState) -> Optional[Tensor]:
        """Dual cache: the columns changed since the cache stored them and those this call needs
        logits for, padded with other generated columns to the batch's largest count."""
        ext = state.extra
        fed = ext["stale"] | ext["requested"]
        count = int(fed.sum(dim=1).max())  # one host read, as compact
        ext["stale"] = torch.zeros_like(fed)  # every stale column is fed now
        return fed_columns(fed, ext["generated"], count)


def _scatter_psi(psi: Tensor, slots: Tensor, valid: Tensor, probability: Tensor) -> Tensor:
    """psi with the probabilities of the newly written columns (padded slots go to a scratch column)."""
    batch, length = psi.shape
    cols = torch.where(valid, slots, torch.full_like(slots, length))
    wide = torch.cat([psi, psi.new_zeros(batch, 1)], dim=1)
    return wide.scatter_(1, cols, probability.to(psi.dtype))[:, :length]
