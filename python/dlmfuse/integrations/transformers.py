"""``attn_implementation="dlmfuse"`` for transformers models.

    >>> import dlmfuse.integrations.transformers as dlmfuse_hf
    >>> dlmfuse_hf.register()                                    # doctest: +SKIP
    >>> model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="dlmfuse")  # doctest: +SKIP

:func:`register` adds :func:`attention_forward` to transformers' ``AttentionInterface`` and, for
mask creation, the mask builder transformers uses for "sdpa" to its ``AttentionMaskInterface``: a
model therefore hands this backend exactly the masks it hands SDPA, and the backend honours them
as SDPA does:

- no mask: causal (top-left aligned, like SDPA's ``is_causal``) when the module is causal and
  more than one query is given, else bidirectional; the causal case becomes labels.
- a bool 4D mask (True = attend) ``[B or 1, 1, Lq, Lk]``: recognised as "causal + key padding"
  (the form transformers builds for padded batches, with or without a cache) or "bidirectional +
  key padding" (encoders, and diffusion LMs such as LLaDA and Dream) and turned into labels;
  anything else (custom masks) becomes an additive bias ``0 / -inf``, broadcast over heads with
  stride 0.
- a float 4D mask: an additive bias, as given, except that finite values below -1e38 (e.g.
  ``torch.finfo(float32).min``, which transformers uses) are raised to -1e38: in the kernels'
  log2 units they overflow to -inf, so every row masked that way everywhere (each padded query)
  would be recomputed in float64 to give SDPA's mean of the values (the verified CUDA kernels
  would give 0); -1e38 gives that mean in float32.
- ``position_bias`` (T5-family relative positions): added to the scores, beside the mask, as
  SDPA does.

Under ``torch.compile`` bool masks are not analysed (the analysis reads the mask's values) and
become the additive bias.

transformers is imported only inside :func:`register`; importing this module or dlmfuse never
imports it.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from ..attention import attention
from ..mask import INT32_MAX, Mask

__all__ = ["NAME", "register", "attention_forward"]

NAME = "dlmfuse"
_OP = "dlmfuse attention (transformers)"
# Keyword arguments that change the attention and that this backend does not implement: a model
# passing them gets a ValueError, never silently different attention. ("indices" / "block_indices":
# the top-k key sets of sparse-attention models, which fold them into the mask only for "eager" /
# "sdpa" and expect other backends to apply them.)
_UNSUPPORTED_KWARGS = ("softcap", "s_aux", "sinks", "indices", "block_indices")
# Finite additive-mask values are kept above this (see the module docstring).
_MASK_FLOOR = -1e38


def register(name: str = NAME) -> None:
    """Registers the attention function (and SDPA's mask builder) under ``name`` so that
    ``from_pretrained(..., attn_implementation=name)`` and ``model.set_attn_implementation(name)``
    work. Idempotent."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    except ImportError as err:
        raise ImportError("dlmfuse.integrations.transformers.register() needs transformers with "
                          "AttentionInterface and AttentionMaskInterface (transformers >= 4.53)") from err
    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def attention_forward(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                      attention_mask: Optional[Tensor], scaling: Optional[float] = None, dropout: float = 0.0,
                      is_causal: Optional[bool] = None, **kwargs) -> Tuple[Tensor, None]:
    """transformers attention function: query ``[B, Hq, Lq, D]``, key/value ``[B, Hkv, Lk, D]``
    (GQA read natively, never repeated) -> ``(out [B, Lq, Hq, D], None)``.

    ``attention_mask``: None, a bool 4D mask (True = attend) or an additive float 4D mask,
    broadcastable to ``[B, Hq, Lq, Lk]``. ``position_bias`` (T5) is added to the scores. Other
    keyword arguments of transformers (position ids, sliding_window, which the mask already
    encodes, ...) are ignored; softcap, attention sinks and sparse top-k ``indices`` are
    unsupported (ValueError), as is dropout > 0; ``output_attentions`` gives no weights (a
    warning, as with SDPA).
    """
    if dropout:
        raise ValueError(f"{_OP}: dropout={dropout} unsupported (use model.eval() or attention_dropout=0)")
    for name in _UNSUPPORTED_KWARGS:
        if kwargs.get(name) is not None:
            raise ValueError(f"{_OP}: {name} unsupported")
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)  # [B, L, H, D] views
    q_len, k_len = q.shape[1], k.shape[1]
    mask, bias = None, None
    if attention_mask is None:
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        if causal and q_len > 1:
            mask = _causal_labels(q_len, k_len, 0, None, q.device)
    elif attention_mask.dtype == torch.bool:
        mask = _labels_of_bool_mask(attention_mask, q_len, k_len)
        if mask is None:
            bias = torch.zeros((), dtype=q.dtype, device=q.device).masked_fill(~attention_mask, float("-inf"))
    else:
        bias = _floored_mask(attention_mask)
    position_bias = kwargs.get("position_bias")
    if position_bias is not None:  # labels still hide what the mask hides
        bias = position_bias if bias is None else bias + position_bias
    if kwargs.get("output_attentions") and not _warned[0]:
        _warned[0] = True
        warnings.warn(f"{_OP}: output_attentions=True gives no attention weights (the kernel never forms "
                      "them); use attn_implementation='eager' for them", UserWarning, stacklevel=2)
    out = attention(q, k, v, mask=mask, bias=bias, scale=scaling)
    return out, None


_warned = [False]  # the output_attentions warning, once per process


def _causal_labels(q_len: int, k_len: int, offset: int, key_valid: Optional[Tensor], device) -> Mask:
    """Query i sees key j iff ``j <= i + offset`` and ``key_valid[b, j]`` (order = group = position;
    invalid keys get order INT32_MAX and group -1, which no query uses since offset >= 0)."""
    q_pos = (torch.arange(q_len, dtype=torch.int32, device=device) + offset)[None]
    k_pos = torch.arange(k_len, dtype=torch.int32, device=device)[None]
    if key_valid is None:
        return Mask(q_pos, q_pos, k_pos, k_pos)
    k_order = torch.where(key_valid, k_pos, INT32_MAX).to(torch.int32)
    k_group = torch.where(key_valid, k_pos, -1).to(torch.int32)
    return Mask(q_pos, q_pos, k_order, k_group)


def _key_padding_labels(q_len: int, key_valid: Tensor) -> Mask:
    """Every query sees exactly the valid keys: queries order 1; valid keys order 0, padding keys
    order INT32_MAX; groups never equal (queries 0, keys -1)."""
    batch = key_valid.shape[0]
    q_order = torch.ones((batch, q_len), dtype=torch.int32, device=key_valid.device)
    k_order = torch.where(key_valid, 0, INT32_MAX).to(torch.int32)
    return Mask(q_order, torch.zeros_like(q_order), k_order, torch.full_like(k_order, -1))


# Every layer of a forward gets one of a few mask tensors (one per layer type: Gemma-style models
# alternate sliding-window and full masks), so what is derived from a mask is computed once per
# forward: per use, the last few masks seen and their results (weak reference, version, result).
_MEMO_ENTRIES = 4
_bool_analyses: list = []
_float_floors: list = []


def _memoised(memo: list, mask: Tensor, compute: Callable[[Tensor], object]):
    """``compute(mask)``, reused while ``mask`` is one of the last few, unmodified tensors seen."""
    try:
        current = mask._version
    except RuntimeError:  # inference tensors have no version counter: no memo
        return compute(mask)
    for ref, version, result in memo:
        if ref() is mask and version == current:
            return result
    result = compute(mask)
    memo.insert(0, (weakref.ref(mask), current, result))
    del memo[_MEMO_ENTRIES:]
    return result


def _labels_of_bool_mask(mask: Tensor, q_len: int, k_len: int) -> Optional[Mask]:
    """:func:`_recognise_causal_padding`, memoised; None (the bias path) while compiling, where
    the mask's values cannot be read."""
    if torch.compiler.is_compiling():
        return None
    return _memoised(_bool_analyses, mask, lambda m: _recognise_causal_padding(m, q_len, k_len))


def _floored_mask(mask: Tensor) -> Tensor:
    """The float mask with finite values below _MASK_FLOOR raised to it (-inf stays), memoised."""
    def floor(m: Tensor) -> Tensor:
        return torch.where(m.isneginf(), m, m.clamp(min=_MASK_FLOOR))
    if torch.compiler.is_compiling():
        return floor(mask)
    return _memoised(_float_floors, mask, floor)


def _recognise_causal_padding(mask: Tensor, q_len: int, k_len: int) -> Optional[Mask]:
    """Labels equivalent to a bool mask ``[B, 1, Lq, Lk]`` of the form "causal (diagonal offset
    Lk - Lq as with a dynamic cache, or 0 as with a static one) and key padding", or
    "bidirectional and key padding", else None. Costs a few passes over the bool mask (with a
    host sync)."""
    if mask.dim() != 4 or mask.shape[1] != 1 or tuple(mask.shape[2:]) != (q_len, k_len):
        return None
    dense = mask[:, 0]
    key_valid = dense.any(dim=1)  # [B, Lk]: a valid key is seen by the last query row
    if torch.equal(key_valid[:, None, :].expand_as(dense), dense):
        return _key_padding_labels(q_len, key_valid)
    q_idx = torch.arange(q_len, device=mask.device)[:, None]
    k_idx = torch.arange(k_len, device=mask.device)[None, :]
    for offset in dict.fromkeys((k_len - q_len, 0)):
        if offset < 0:
            continue
        expected = (k_idx <= q_idx + offset)[None] & key_valid[:, None, :]
        if torch.equal(expected, dense):
            return _causal_labels(q_len, k_len, offset, key_valid, mask.device)
    return None
