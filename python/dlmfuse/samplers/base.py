"""What every step sampler shares: the state of one generation, the step interface, the random
streams, argument checks and the compaction of selected positions into logits rows.

A sampler is a policy: ``start`` builds a :class:`SamplerState` for a sequence ``x`` whose
columns ``[gen_start, gen_start + gen_length)`` hold mask tokens; each ``step(state, forward)``
asks ``forward(rows, mask)`` for the logits of the rows it needs (``rows`` int64 ``[B, n]``
absolute columns of ``x``; no call at all when nothing needs a token) and writes the chosen
tokens into ``state.x``. :func:`dlmfuse.generate` is one loop over ``step``; a caller may drive
``step`` itself with any ``forward``.

Randomness (reproducible, device independent): every draw is keyed by the generate seed and a
Philox4x32-10 counter offset, the layout of :func:`dlmfuse.sample_tokens`. Step ``s`` (0-based,
counting every step of the generation, including steps that make no network call) uses offset
``NUM_STREAMS * (s + 1) + stream`` for each of the streams below; draws made once before the
first step use ``stream`` itself (step ``s = -1``).

- ``TOKENS``: the Gumbel noise of ``sample_tokens`` over the step's logits ``[B, n, V]``:
  Philox row ``b * n + i`` is the i-th requested column of batch row b (columns are requested in
  ascending order, padded to the batch's largest count ``n``; Eso-LM requests its chunk in
  generation order).
- ``CONFIDENCE``, ``TRANSFER``: uniforms ``u[b, j]`` in (0, 1), float64, Philox row b and column
  j = the column of x (so they do not depend on which columns are requested). CONFIDENCE: LLaDA's
  random remasking, Dream's alg_temp Gumbel noise. TRANSFER: per-column unmasking coins (Dream
  origin, MDLM); Eso-LM's binomial count of grid step j reads row 0, columns ``[0, remaining)``.
- ``ORDER``: Eso-LM's generation order, ``u[b, j]`` for generated column ``gen_start + j``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..mask import Mask
from ..reference.sampling import gumbel_uniforms

__all__ = ["Sampler", "SamplerState", "Forward", "TOKENS", "CONFIDENCE", "TRANSFER", "ORDER", "NUM_STREAMS",
           "philox_uniforms"]

#: Random streams (offset = NUM_STREAMS * (step + 1) + stream; see the module docstring).
TOKENS, CONFIDENCE, TRANSFER, ORDER = 0, 1, 2, 3
NUM_STREAMS = 4
_MAX_SEED = 2**63 - 1

#: ``forward(rows [B, n] int64, mask=None) -> logits [B, n, V]`` for the current ``state.x``.
Forward = Callable[..., Tensor]


def philox_uniforms(rows: int, cols: int, seed: int, offset: int, device) -> Tensor:
    """float64 ``[rows, cols]`` uniforms in (0, 1) of dlmfuse's Philox layout (row, column, seed,
    offset): the same numbers ``sample_tokens`` turns into Gumbel noise."""
    return gumbel_uniforms(rows, cols, seed, offset).to(device)


@dataclass
class SamplerState:
    """One generation in progress (built by ``Sampler.start``; ``x`` is updated in place).

    Attributes:
        x: int64 ``[B, L]`` tokens; masked columns hold ``mask_token_id``.
        gen_start: first generated column (all rows: prompts are left padded).
        seed: the Philox key of every draw.
        step: steps taken so far.
        total_steps: the number of steps (an upper bound for samplers that stop early).
        block: ``(start, end)`` columns of the current block (the whole generation for samplers
            without blocks); KV-cache modes refresh their cache when it changes.
        done: no step is left.
        network_calls: how many times ``forward`` was called.
    """

    x: Tensor
    gen_start: int
    seed: int
    total_steps: int
    block: Tuple[int, int]
    step: int = 0
    done: bool = False
    network_calls: int = 0
    extra: dict = field(default_factory=dict)

    def offset(self, stream: int) -> int:
        """The Philox offset of `stream` at the current step."""
        return NUM_STREAMS * (self.step + 1) + stream

    def uniforms(self, stream: int, *, step: Optional[int] = None, rows: Optional[int] = None,
                 cols: Optional[int] = None) -> Tensor:
        """float64 ``[B, L]`` uniforms of `stream` at the current step (or `step`; -1 for the draws
        made before the first step); ``rows`` / ``cols`` take fewer rows / columns."""
        s = self.step if step is None else step
        return philox_uniforms(self.x.shape[0] if rows is None else rows, self.x.shape[1] if cols is None else cols,
                               self.seed, NUM_STREAMS * (s + 1) + stream, self.x.device)


class Sampler:
    """Base class of the step samplers (see the module docstring for the protocol).

    Attributes used by :func:`dlmfuse.generate`: ``cfg_scale`` (classifier-free guidance weight,
    0 = off), ``shift_logits`` (token i is predicted by the logits of row i - 1, Dream's
    convention), ``cache_modes`` (the KV-cache modes that apply besides "none"; by default
    Fast-dLLM's "prefix" / "dual" over ``state.block``) and ``incremental_modes`` (the modes in
    which the cache is instead fed :meth:`incremental_columns`).
    """

    gen_length: int
    mask_token_id: int
    cfg_scale: float = 0.0
    shift_logits: bool = False
    cache_modes: Tuple[str, ...] = ("prefix", "dual")
    incremental_modes: Tuple[str, ...] = ()

    def incremental_columns(self, state: SamplerState) -> Optional[Tensor]:
        """For samplers with an incremental KV cache (Eso-LM B, ReMDM's "dual"): the columns
        whose K/V this step must (re)compute, int64 ``[B, m]`` (distinct within a row, the
        requested rows among them), or None when the step needs a full pass. Block samplers
        return None (their caches are windows of ``state.block``)."""
        return None

    def start(self, x: Tensor, gen_start: int, *, seed: int = 0) -> SamplerState:
        """A new state for ``x`` (int64 ``[B, gen_start + gen_length]``, generated columns masked)."""
        _check_sequence(type(self).__name__, x, gen_start, self.gen_length)
        state = SamplerState(x=x, gen_start=gen_start, seed=_check_seed(seed), total_steps=0,
                             block=(gen_start, gen_start + self.gen_length))
        self._init(state)
        return state

    def _init(self, state: SamplerState) -> None:
        raise NotImplementedError

    def step(self, state: SamplerState, forward: Forward) -> Tensor:
        """One denoising step: returns bool ``[B, L]``, the columns written by this step (unmasked,
        unless the model proposed the mask token itself, which LLaDA and Dream allow)."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------- helpers
    def _rows_for_model(self, rows: Tensor) -> Tensor:
        """Columns whose logits predict ``rows`` (``rows - 1`` with shift_logits, row 0 itself)."""
        return (rows - 1).clamp(min=0) if self.shift_logits else rows

    def _call(self, state: SamplerState, forward: Forward, rows: Tensor, mask: Optional[Mask] = None) -> Tensor:
        state.network_calls += 1
        model_rows = self._rows_for_model(rows)
        return forward(model_rows) if mask is None else forward(model_rows, mask)

    def _finish_step(self, state: SamplerState) -> None:
        state.step += 1
        if state.step >= state.total_steps:
            state.done = True


# ------------------------------------------------------------------------------------ compaction
def compact(selected: Tensor) -> Tuple[Tensor, Tensor, int]:
    """Per row, the indices of the True entries of ``selected [B, W]`` in ascending order, padded
    to n = the largest count (one host read) with the scratch index W.

    Returns ``(slots [B, n] int64, valid [B, n] bool, n)``.
    """
    width = selected.shape[1]
    n = int(selected.sum(dim=1).max()) if selected.numel() else 0
    cols = torch.arange(width, device=selected.device).expand_as(selected)
    key = torch.where(selected, cols, torch.full_like(cols, width))
    slots = key.sort(dim=1).values[:, :n]
    return slots, slots < width, n


def scatter_tokens(x: Tensor, start: int, slots: Tensor, take: Tensor, tokens: Tensor) -> Tensor:
    """Writes ``tokens [B, n]`` where ``take`` into ``x[:, start + slots]`` (in place); returns the
    bool ``[B, L]`` of written columns. Padded slots (scratch index) are never written."""
    batch, length = x.shape
    cols = torch.where(take, slots + start, torch.full_like(slots, length))  # not taken: scratch column
    written = torch.zeros(batch, length + 1, dtype=torch.bool, device=x.device)
    written.scatter_(1, cols, torch.ones_like(take))
    values = torch.zeros(batch, length + 1, dtype=x.dtype, device=x.device)
    values.scatter_(1, cols, tokens.to(x.dtype))
    written, values = written[:, :length], values[:, :length]
    x.copy_(torch.where(written, values, x))
    return written


# ---------------------------------------------------------------------------------- arg checks
def _check_sequence(name: str, x, gen_start, gen_length: int) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}.start: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype != torch.int64:
        raise TypeError(f"{name}.start: x must be int64, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"{name}.start: x must have shape [B, L], got {list(x.shape)}")
    if isinstance(gen_start, bool) or not isinstance(gen_start, int) or gen_start < 0:
        raise ValueError(f"{name}.start: gen_start must be an int >= 0, got {gen_start!r}")
    if x.shape[1] != gen_start + gen_length:
        raise ValueError(f"{name}.start: x has {x.shape[1]} columns but gen_start + gen_length = "
                         f"{gen_start} + {gen_length} = {gen_start + gen_length}")


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int, got {type(seed).__name__} {seed!r}")
    if not 0 <= seed <= _MAX_SEED:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    return int(seed)


def check_int(owner: str, name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{owner}: {name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{owner}: {name} must be >= {minimum}, got {value}")
    return int(value)


def check_float(owner: str, name: str, value, *, minimum: float = 0.0, inclusive: bool = True,
                maximum: Optional[float] = None) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{owner}: {name} must be a float, got {type(value).__name__} {value!r}")
    value = float(value)
    low_ok = value >= minimum if inclusive else value > minimum
    if not math.isfinite(value) or not low_ok or (maximum is not None and value > maximum):
        bound = f"{'>=' if inclusive else '>'} {minimum}" + ("" if maximum is None else f" and <= {maximum}")
        raise ValueError(f"{owner}: {name} must be finite and {bound}, got {value}")
    return value


def check_choice(owner: str, name: str, value, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{owner}: {name} must be one of {list(choices)}, got {value!r}")
    return value


def check_token_ids(owner: str, name: str, ids) -> Optional[Tuple[int, ...]]:
    """None or a tuple of ints >= 0 (a sequence, an int tensor, or one int)."""
    if ids is None:
        return None
    if isinstance(ids, Tensor):
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise TypeError(f"{owner}: {name} must hold integer token ids, got a {ids.dtype} tensor")
        ids = ids.reshape(-1).tolist()
    elif isinstance(ids, numbers.Integral) and not isinstance(ids, bool):
        ids = [ids]
    out = []
    for value in ids:
        out.append(check_int(owner, f"{name} entry", value, minimum=0))
    return tuple(out)


def optional_top_k(owner: str, top_k) -> Optional[int]:
    return None if top_k is None else check_int(owner, "top_k", top_k)


def optional_top_p(owner: str, top_p) -> Optional[float]:
    if top_p is None:
        return None
    return check_float(owner, "top_p", top_p, minimum=0.0, inclusive=False, maximum=1.0)
