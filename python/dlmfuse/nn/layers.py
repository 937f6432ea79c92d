"""LLaMA-shaped denoiser layers on dlmfuse's ops: RMSNorm, rotary embedding with per-row positions,
label-mask attention (GQA, KV-cache aware, sparse query rows), SwiGLU MLP and the pre-norm block.

Layout is ``[B, L, H, D]`` throughout (docs/ops.md, "Conventions"); K/V are never repeated for GQA, the
attention kernel reads kv head ``h // (Hq // Hkv)`` natively. Parameter names follow transformers'
Llama / Qwen2 modules (``q_proj``, ``input_layernorm``, ``mlp.gate_proj``, ...), so a transformers
state dict maps onto these layers by dropping its ``model.`` prefix (see :mod:`dlmfuse.nn.loading`).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..attention import attention
from ..kv_cache import KVCache
from ..mask import INT32_MAX, Mask

__all__ = ["RMSNorm", "RotaryEmbedding", "apply_rotary", "DenoiserAttention", "DenoiserMLP", "DenoiserBlock"]

Rope = Tuple[Tensor, Tensor]  # (cos, sin), each [B or 1, L, 1, D]


def gather_rows(t: Tensor, rows: Tensor) -> Tensor:
    """``t[b, rows[b, i]]``: t ``[B or 1, L, ...]``, rows int64 ``[B, n]`` -> ``[B, n, ...]``."""
    batch, n = rows.shape
    t = t.expand(batch, *t.shape[1:])
    index = rows.view(batch, n, *([1] * (t.dim() - 2))).expand(batch, n, *t.shape[2:])
    return torch.gather(t, 1, index)


class RMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x^2) + eps)``, the statistics in float32 (as transformers' Llama)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, *, dtype=None, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype, device=device))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # F.rms_norm on the float32 copy: transformers' formula (x * rsqrt(mean(x^2) + eps)) in one
        # call instead of five, which matters where launches bound the step (small cached steps).
        h = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * h.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class RotaryEmbedding(nn.Module):
    """Rotary position embedding, LLaMA convention (``rotate_half``, frequencies
    ``theta ** (-2i / D)``), for any per-row positions.

    The frequencies are recomputed in float32 on every call (D/2 values) rather than stored, so
    casting the model to bf16 never degrades them.
    """

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RotaryEmbedding: head_dim must be even, got {head_dim}")
        self.head_dim, self.theta = head_dim, float(theta)

    def forward(self, positions: Tensor, dtype: torch.dtype) -> Rope:
        """positions: int ``[B, L]`` -> (cos, sin), each ``[B, L, 1, head_dim]`` in ``dtype``."""
        exponent = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=positions.device) / self.head_dim
        inv_freq = 1.0 / (self.theta ** exponent)
        freqs = positions[..., None].float() * inv_freq
        angles = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, theta={self.theta}"


def apply_rotary(x: Tensor, rope: Rope) -> Tensor:
    """Rotates ``x [B, L, H, D]`` by ``rope = (cos, sin)`` ``[B or 1, L, 1, D]``, in x's dtype (under
    autocast the projections are bf16 while cos / sin keep the embeddings' fp32: q and k must stay
    in v's dtype for the attention)."""
    cos, sin = rope
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


def default_positions(batch: int, length: int, device) -> Tensor:
    """``arange(length)`` for every row, int64 ``[batch, length]`` (a broadcast view)."""
    return torch.arange(length, dtype=torch.int64, device=device)[None].expand(batch, length)


def cache_mask(length: int, device) -> Mask:
    """The labels of ``mask=None`` with a cache: the fed rows are written with order 0, group 0 and
    their queries (order INT32_MAX, group 0) see every written slot whose order is below INT32_MAX
    (all of them unless a caller wrote INT32_MAX orders, e.g. BD3-LM x_t keys)."""
    zeros = torch.zeros((1, length), dtype=torch.int32, device=device)
    return Mask(torch.full_like(zeros, INT32_MAX), zeros, zeros, zeros)


def _gather_queries(mask: Optional[Mask], rows: Optional[Tensor]) -> Optional[Mask]:
    """The mask with only the query rows ``rows`` (unchecked: the model checks logits_for)."""
    if mask is None or rows is None:
        return mask
    q_doc = None if mask.q_doc is None else gather_rows(mask.q_doc, rows)
    return Mask(gather_rows(mask.q_order, rows), gather_rows(mask.q_group, rows), mask.k_order, mask.k_group,
                q_doc, mask.k_doc)


class DenoiserAttention(nn.Module):
    """Multi-head attention with RoPE, GQA and label masks; optionally through a :class:`dlmfuse.KVCache`.

    Args:
        hidden_size, num_heads, num_kv_heads: ``num_heads % num_kv_heads == 0``.
        head_dim: default ``hidden_size // num_heads``; dlmfuse.attention supports 64 and 128.
        rope_theta: RoPE base.
        attention_bias: bias on q/k/v projections (Qwen2 / Dream); attention_out_bias: on o_proj
            (Llama's ``attention_bias=True`` sets both).
        layer_idx: this layer's index in a KVCache.

    See :meth:`forward` for the positions / mask / cache semantics.
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: Optional[int] = None, *,
                 rope_theta: float = 10000.0, attention_bias: bool = False, attention_out_bias: bool = False,
                 layer_idx: int = 0, dtype=None, device=None):
        super().__init__()
        if num_heads <= 0 or num_kv_heads <= 0 or num_heads % num_kv_heads:
            raise ValueError(f"DenoiserAttention: num_heads ({num_heads}) must be a positive multiple of "
                             f"num_kv_heads ({num_kv_heads})")
        head_dim = head_dim or hidden_size // num_heads
        if head_dim <= 0:
            raise ValueError(f"DenoiserAttention: head_dim must be >= 1, got {head_dim} (hidden_size {hidden_size} // "
                             f"num_heads {num_heads}; pass head_dim=)")
        self.num_heads, self.num_kv_heads, self.head_dim, self.layer_idx = num_heads, num_kv_heads, head_dim, layer_idx
        kw = dict(dtype=dtype, device=device)
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=attention_bias, **kw)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=attention_bias, **kw)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=attention_bias, **kw)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=attention_out_bias, **kw)
        self.rotary = RotaryEmbedding(head_dim, rope_theta)

    def forward(self, x: Tensor, positions: Optional[Tensor] = None, *, mask: Optional[Mask] = None,
                cache: Optional[KVCache] = None, query_rows: Optional[Tensor] = None, rope: Optional[Rope] = None,
                write_labels: bool = True) -> Tensor:
        """Attention of the rows ``x [B, L, hidden]``; returns ``[B, L, hidden]`` (``[B, n, hidden]``
        with query_rows).

        Args:
            positions: int ``[B, L]``: the absolute position of each row (RoPE angle and, with a
                cache, the cache slot). Default ``arange(L)``.
            mask: a :class:`dlmfuse.Mask` over the L rows (q and k labels of length L, batch 1 or
                B); None: bidirectional.
            cache: without it, the rows attend to each other under ``mask``. With it, K/V of the L
                rows are written into ``cache`` (layer ``self.layer_idx``) at ``positions``, their
                key labels set to the mask's k labels (mask None: order 0, group 0), and the
                queries attend to the whole cache under the mask's q labels (mask None: see
                :func:`cache_mask`), with ``kv_lens = cache.lengths``.
            query_rows: int64 ``[B, n]`` indices into the L rows (in ``[0, L)``, checked by the
                caller): Q, attention and o_proj are computed only for these rows (K/V still for
                all L rows).
            rope: precomputed ``RotaryEmbedding(positions)`` (a model computes it once for all layers).
            write_labels: with a cache, also write the key labels, range-check the positions and
                grow the cache's lengths (labels, slots and lengths are shared by all layers of a
                cache, so a model does this on its first layer only; the check reads the
                positions on the host).
        """
        batch, length, _ = x.shape
        if positions is None:
            positions = default_positions(batch, length, x.device)
        elif positions.dim() == 1:  # [L]: the same positions for every row, as DenoiserLM takes them
            positions = positions[None].expand(batch, -1)
        if rope is None:
            rope = self.rotary(positions, x.dtype)
        k = apply_rotary(self.k_proj(x).view(batch, length, self.num_kv_heads, self.head_dim), rope)
        v = self.v_proj(x).view(batch, length, self.num_kv_heads, self.head_dim)
        if query_rows is not None:
            x = gather_rows(x, query_rows)
            rope = (gather_rows(rope[0], query_rows), gather_rows(rope[1], query_rows))
        n = x.shape[1]
        q = apply_rotary(self.q_proj(x).view(batch, n, self.num_heads, self.head_dim), rope)
        if cache is None:
            out = attention(q, k, v, mask=_gather_queries(mask, query_rows))
        else:
            out = self._attend_cache(q, k, v, positions, mask, cache, query_rows, write_labels)
        return self.o_proj(out.reshape(batch, n, self.num_heads * self.head_dim))

    def _attend_cache(self, q, k, v, positions, mask, cache, query_rows, write_labels) -> Tensor:
        batch, length = k.shape[:2]
        self._check_cache(cache, batch, k.dtype)
        mask = _gather_queries(cache_mask(length, q.device) if mask is None else mask, query_rows)
        labels = (mask.k_order, mask.k_group) if write_labels else (None, None)
        # Labels, the range check and lengths are shared by all layers: the first layer does them.
        cache.write(self.layer_idx, positions.expand(batch, length).contiguous(), k, v, *labels,
                    doc=mask.k_doc if write_labels else None, validate=write_labels, update_lengths=write_labels)
        return cache.attend(self.layer_idx, q, mask.q_order, mask.q_group, mask.q_doc)

    def _check_cache(self, cache, batch: int, dtype: torch.dtype) -> None:
        if not isinstance(cache, KVCache):
            raise TypeError(f"DenoiserAttention: cache must be a dlmfuse.KVCache or None, got {type(cache).__name__}")
        layers, cache_batch, _, heads, dim = cache.k.shape
        if (cache_batch, heads, dim) != (batch, self.num_kv_heads, self.head_dim) or self.layer_idx >= layers:
            raise ValueError(
                f"DenoiserAttention: cache has layers={layers}, batch={cache_batch}, kv_heads={heads}, "
                f"head_dim={dim} but layer {self.layer_idx} needs batch={batch}, kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}")
        if cache.k.dtype != dtype:
            raise TypeError(f"DenoiserAttention: cache dtype {cache.k.dtype} differs from the activations' {dtype}")


class DenoiserMLP(nn.Module):
    """SwiGLU: ``down_proj(silu(gate_proj(x)) * up_proj(x))``."""

    def __init__(self, hidden_size: int, intermediate_size: int, *, bias: bool = False, dtype=None, device=None):
        super().__init__()
        kw = dict(bias=bias, dtype=dtype, device=device)
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, **kw)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, **kw)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, **kw)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DenoiserBlock(nn.Module):
    """Pre-norm transformer block: ``h = x + attn(norm(x)); out = h + mlp(norm(h))``.

    Arguments as :class:`DenoiserAttention` plus ``intermediate_size``, ``rms_norm_eps`` and
    ``mlp_bias``; :meth:`forward` takes the arguments of :meth:`DenoiserAttention.forward` and,
    with ``query_rows``, returns only those rows ``[B, n, hidden]``.
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, intermediate_size: int,
                 head_dim: Optional[int] = None, *, rope_theta: float = 10000.0, rms_norm_eps: float = 1e-6,
                 attention_bias: bool = False, attention_out_bias: bool = False, mlp_bias: bool = False,
                 layer_idx: int = 0, dtype=None, device=None):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.input_layernorm = RMSNorm(hidden_size, rms_norm_eps, **kw)
        self.self_attn = DenoiserAttention(hidden_size, num_heads, num_kv_heads, head_dim, rope_theta=rope_theta,
                                           attention_bias=attention_bias, attention_out_bias=attention_out_bias,
                                           layer_idx=layer_idx, **kw)
        self.post_attention_layernorm = RMSNorm(hidden_size, rms_norm_eps, **kw)
        self.mlp = DenoiserMLP(hidden_size, intermediate_size, bias=mlp_bias, **kw)

    def forward(self, x: Tensor, positions: Optional[Tensor] = None, *, mask: Optional[Mask] = None,
                cache: Optional[KVCache] = None, query_rows: Optional[Tensor] = None, rope: Optional[Rope] = None,
                write_labels: bool = True) -> Tensor:
        h = self.self_attn(self.input_layernorm(x), positions, mask=mask, cache=cache, query_rows=query_rows,
                           rope=rope, write_labels=write_labels)
        h = h + (x if query_rows is None else gather_rows(x, query_rows))
        return h + self.mlp(self.post_attention_layernorm(h))
