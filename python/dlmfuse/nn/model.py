"""DenoiserLM: a LLaMA/LLaDA-shaped bidirectional denoiser whose forward takes positions, a label
mask, a KV cache and the rows that need logits (docs/ops.md)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Optional

import torch
from torch import Tensor, nn

from .._checks import can_read_values, expect_positive_int
from ..kv_cache import KVCache
from ..mask import Mask
from .layers import DenoiserBlock, RMSNorm, RotaryEmbedding, cache_mask, default_positions

__all__ = ["DenoiserLM"]

_OP = "DenoiserLM"


def _expect_int_tensor(name: str, value, layout: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{_OP}: {name} must be a torch.Tensor {layout}, got {type(value).__name__}")
    if value.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{_OP}: {name} must be int64 (or int32) {layout}, got {value.dtype}")
    return value


class DenoiserLM(nn.Module):
    """Embeddings, ``num_layers`` :class:`DenoiserBlock` s, final RMSNorm and LM head; no causal mask.

    Example::

        >>> import torch, dlmfuse
        >>> model = dlmfuse.nn.DenoiserLM(vocab_size=97, hidden_size=128, num_layers=2, num_heads=4,
        ...                               num_kv_heads=2, intermediate_size=256, head_dim=64)
        >>> ids = torch.randint(0, 97, (2, 10))
        >>> model(ids).shape                                  # bidirectional
        torch.Size([2, 10, 97])
        >>> model(ids, logits_for=torch.tensor([[9, 3], [0, 1]])).shape
        torch.Size([2, 2, 97])

    Args:
        vocab_size, hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size: the
            LLaMA shape (``num_heads % num_kv_heads == 0``).
        rope_theta: RoPE base.
        head_dim: default ``hidden_size // num_heads``; dlmfuse.attention supports 64 and 128.
        rms_norm_eps: epsilon of every RMSNorm.
        attention_bias: bias on q/k/v (Qwen2, Dream); attention_out_bias: bias on o_proj;
            mlp_bias: bias on the MLP projections.
        tie_word_embeddings: the LM head shares the embedding matrix.
        init_std: weights are drawn from N(0, init_std) (transformers' ``initializer_range``),
            norms start at 1, biases at 0.
        pad_token_id: the embedding's ``padding_idx`` (its row starts at 0 and gets no gradient,
            as in transformers' Llama / Qwen2); None: none.
        dtype, device: of the parameters.

    No dropout anywhere: transformers' ``attention_dropout`` is not applied in training.
    """

    def __init__(self, vocab_size: int, hidden_size: int, num_layers: int, num_heads: int, num_kv_heads: int,
                 intermediate_size: int, rope_theta: float = 10000.0, *, head_dim: Optional[int] = None,
                 rms_norm_eps: float = 1e-6, attention_bias: bool = False, attention_out_bias: bool = False,
                 mlp_bias: bool = False, tie_word_embeddings: bool = False, init_std: float = 0.02,
                 pad_token_id: Optional[int] = None, dtype=None, device=None):
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("hidden_size", hidden_size), ("num_layers", num_layers),
                            ("num_heads", num_heads), ("num_kv_heads", num_kv_heads),
                            ("intermediate_size", intermediate_size)):
            expect_positive_int(_OP, name, value)
        head_dim = expect_positive_int(_OP, "head_dim", head_dim) if head_dim is not None else hidden_size // num_heads
        if pad_token_id is not None and (isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int)
                                         or not 0 <= pad_token_id < vocab_size):
            raise ValueError(f"{_OP}: pad_token_id must be None or an int in [0, vocab_size={vocab_size}), "
                             f"got {pad_token_id!r}")
        self.config = SimpleNamespace(vocab_size=vocab_size, hidden_size=hidden_size, num_layers=num_layers,
                           num_heads=num_heads, num_kv_heads=num_kv_heads, intermediate_size=intermediate_size,
                           rope_theta=float(rope_theta), head_dim=head_dim, rms_norm_eps=rms_norm_eps,
                           attention_bias=attention_bias, attention_out_bias=attention_out_bias,
                           mlp_bias=mlp_bias, tie_word_embeddings=tie_word_embeddings, pad_token_id=pad_token_id)
        kw = dict(dtype=dtype, device=device)
        self.embed_tokens = nn.Embedding(vocab_size, hidden_size, padding_idx=pad_token_id, **kw)
        self.layers = nn.ModuleList(
            DenoiserBlock(hidden_size, num_heads, num_kv_heads, intermediate_size, head_dim, rope_theta=rope_theta,
                          rms_norm_eps=rms_norm_eps, attention_bias=attention_bias,
                          attention_out_bias=attention_out_bias, mlp_bias=mlp_bias, layer_idx=i, **kw)
            for i in range(num_layers))
        self.norm = RMSNorm(hidden_size, rms_norm_eps, **kw)
        self.lm_head = nn.Linear(hidden_size, vocab_size, bias=False, **kw)
        self.rotary = RotaryEmbedding(head_dim, rope_theta)
        self.reset_parameters(init_std)
        if tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @torch.no_grad()
    def reset_parameters(self, init_std: float = 0.02) -> None:
        """Weights ~ N(0, init_std), norm weights 1, biases 0."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, init_std)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
                if getattr(module, "padding_idx", None) is not None:
                    module.weight[module.padding_idx].zero_()
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)

    # ------------------------------------------------------------------------------------ loading
    @classmethod
    def from_hf_config(cls, config, **kwargs) -> "DenoiserLM":
        """A randomly initialised model shaped like a transformers Llama / Qwen2 config (object or
        dict); kwargs (dtype, device, init_std) go to the constructor. See dlmfuse.nn.loading."""
        from .loading import denoiser_kwargs_from_hf_config
        return cls(**{**denoiser_kwargs_from_hf_config(config), **kwargs})  # kwargs win (e.g. init_std)

    @classmethod
    def from_pretrained(cls, path, dtype: Optional[torch.dtype] = None, device=None) -> "DenoiserLM":
        """A model from a local checkpoint directory: ``config.json`` and safetensors weights (one
        ``model.safetensors``, or shards with ``model.safetensors.index.json``) in LLaDA's, Dream's,
        Llama's or Qwen2's format (see :mod:`dlmfuse.nn.checkpoints`).

        ``dtype``: of the parameters (default: the checkpoint's ``torch_dtype``, else its stored
        dtype); ``device``: where they live (default CPU). Weights stream from the files one tensor
        at a time into parameters allocated once. Unknown architectures, unsupported features
        (ALiBi, RoPE scaling, QK norms, ...) and weights that do not match the config raise
        ValueError naming them. Returns the model in eval mode.

        Example::

            >>> import tempfile, torch, dlmfuse
            >>> model = dlmfuse.nn.DenoiserLM(97, 128, 2, 4, 2, 256, head_dim=64)
            >>> with tempfile.TemporaryDirectory() as path:
            ...     model.save_pretrained(path)
            ...     loaded = dlmfuse.nn.DenoiserLM.from_pretrained(path)
            >>> ids = torch.randint(0, 97, (1, 8))
            >>> torch.equal(loaded(ids), model.eval()(ids))
            True
        """
        from .checkpoints import load_pretrained
        return load_pretrained(cls, path, dtype=dtype, device=device)

    def save_pretrained(self, path, max_shard_bytes: int = 4 << 30) -> None:
        """Writes ``config.json`` and safetensors weights to the directory ``path`` in transformers'
        Llama format (Qwen2's when only q/k/v have biases), sharded with an index past
        ``max_shard_bytes``; :meth:`from_pretrained` reads it back exactly."""
        from .checkpoints import save_pretrained
        save_pretrained(self, path, max_shard_bytes=max_shard_bytes)

    @classmethod
    def from_hf_state_dict(cls, state_dict, config, **kwargs) -> "DenoiserLM":
        """``from_hf_config(config, **kwargs)`` then :func:`dlmfuse.nn.load_hf_state_dict`."""
        from .loading import load_hf_state_dict
        model = cls.from_hf_config(config, **kwargs)
        load_hf_state_dict(model, state_dict)
        return model

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        """An empty :class:`dlmfuse.KVCache` for this model's forward: its layers, head_dim, the
        parameters' dtype and device, and the KV heads this process computes (all of them, or a
        rank's share after :func:`dlmfuse.distributed.tensor_parallel`)."""
        weight = self.layers[0].self_attn.q_proj.weight
        local = weight.to_local() if hasattr(weight, "to_local") else weight  # a DTensor when sharded
        return KVCache(len(self.layers), batch, max_len, self.layers[0].self_attn.num_kv_heads, self.config.head_dim,
                       dtype=local.dtype, device=local.device)

    # ------------------------------------------------------------------------------------ forward
    def forward(self, input_ids: Tensor, positions: Optional[Tensor] = None, mask: Optional[Mask] = None,
                cache: Optional[KVCache] = None, logits_for: Optional[Tensor] = None) -> Tensor:
        """Logits of the fed rows (or of ``logits_for`` rows only).

        Args:
            input_ids: int64 ``[B, L]``: the tokens fed in this call (the whole sequence, or with
                a cache any subset of it, e.g. the current block).
            positions: int64 ``[B, L]`` (or ``[1, L]`` / ``[L]``, broadcast): the absolute
                position of each fed token: its RoPE angle and, with a cache, its cache slot
                (unique per row, in ``[0, cache.max_len)``). Default ``arange(L)``.
            mask: :class:`dlmfuse.Mask` over the fed rows: q labels and k labels both of length L
                (batch 1 or B). None: bidirectional.
            cache: a :class:`dlmfuse.KVCache` (``num_layers`` layers, batch B, the model's
                kv_heads, head_dim and dtype). Every layer writes the K/V of the fed rows at
                ``positions`` (first layer: positions range-checked, labels written; labels are
                shared by all layers); the mask's k labels become the labels of those slots
                (mask None: order 0, group 0). The fed rows then attend to the whole cache (slots
                written now and earlier, ``kv_lens = cache.lengths``) under the mask's q labels
                (mask None: order INT32_MAX, group 0, so every written slot with order below
                INT32_MAX is visible). The cache is updated in place: a refresh feeds every
                position; a prefix-cache step feeds the block and everything after it; a
                Fast-dLLM dual-cache step feeds only the current block (its slots are
                overwritten, the other slots keep the K/V of the last refresh).
            logits_for: int64 ``[B, n]`` indices into the L fed rows: only these rows get logits
                (the last block computes its queries, MLP and the LM head for them only).

        Returns:
            logits ``[B, L, vocab]`` (``[B, n, vocab]`` with logits_for) in the parameters' dtype.
        """
        batch, length = self._check_forward_args(input_ids, positions, mask, cache, logits_for)
        device = input_ids.device
        positions = default_positions(batch, length, device) if positions is None else positions.reshape(-1, length)
        if logits_for is not None:
            logits_for = logits_for.long()
        if cache is not None and mask is None:
            mask = cache_mask(length, device)  # built once for all layers
        hidden = self.embed_tokens(input_ids)
        rope = self.rotary(positions, hidden.dtype)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            hidden = layer(hidden, positions, mask=mask, cache=cache, rope=rope, write_labels=i == 0,
                           query_rows=logits_for if i == last else None)
        return self.lm_head(self.norm(hidden))

    def _check_forward_args(self, input_ids, positions, mask, cache, logits_for):
        _expect_int_tensor("input_ids", input_ids, "[B, L]")
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"{_OP}: input_ids must have shape [B, L] with L >= 1, got {list(input_ids.shape)}")
        batch, length = input_ids.shape
        device = self.embed_tokens.weight.device
        if input_ids.device != device:
            raise TypeError(f"{_OP}: input_ids is on {input_ids.device} but the model is on {device}")
        if positions is not None:
            _expect_int_tensor("positions", positions, "[B, L]")
            if positions.device != device:
                raise TypeError(f"{_OP}: positions is on {positions.device} but the model is on {device}")
            if positions.shape not in ((batch, length), (1, length), (length,)):
                raise ValueError(f"{_OP}: positions must have shape [B={batch}, L={length}] (or [1, L] / [L]), "
                                 f"got {list(positions.shape)}")
        if mask is not None:
            if not isinstance(mask, Mask):
                raise TypeError(f"{_OP}: mask must be a dlmfuse.Mask or None, got {type(mask).__name__}")
            if mask.q_len != length or mask.k_len != length or mask.batch not in (1, batch):
                raise ValueError(f"{_OP}: mask must have q and k labels for the L={length} fed rows with batch 1 or "
                                 f"B={batch}, got {mask}")
        if cache is not None:
            if not isinstance(cache, KVCache):
                raise TypeError(f"{_OP}: cache must be a dlmfuse.KVCache or None, got {type(cache).__name__}")
            if cache.num_layers != len(self.layers):
                raise ValueError(f"{_OP}: cache has {cache.num_layers} layers but the model has {len(self.layers)}")
        rows_bad = None
        if logits_for is not None:
            _expect_int_tensor("logits_for", logits_for, "[B, n]")
            if logits_for.dim() != 2 or logits_for.shape[0] != batch:
                raise ValueError(f"{_OP}: logits_for must have shape [B={batch}, n], got {list(logits_for.shape)}")
            if logits_for.device != device:
                raise TypeError(f"{_OP}: logits_for is on {logits_for.device} but the model is on {device}")
            if can_read_values(logits_for):
                rows_bad = ((logits_for < 0) | (logits_for >= length)).any()
        # Token ids past the vocabulary: checked where that adds no host read (always on the CPU; on
        # CUDA, where such an id would be a device-side assert, only beside logits_for's read).
        vocab = self.config.vocab_size
        ids_bad = None
        if can_read_values(input_ids) and (not input_ids.is_cuda or rows_bad is not None):
            ids_bad = ((input_ids < 0) | (input_ids >= vocab)).any()
        checks = [bad for bad in (rows_bad, ids_bad) if bad is not None]
        if checks and bool(torch.stack(checks).any()):  # one host read (a device sync on CUDA)
            if ids_bad is not None and bool(ids_bad):
                low, high = int(input_ids.min()), int(input_ids.max())
                raise ValueError(f"{_OP}: input_ids must be token ids in [0, vocab_size={vocab}), got range [{low}, {high}]")
            low, high = int(logits_for.min()), int(logits_for.max())
            raise ValueError(f"{_OP}: logits_for values must lie in [0, L={length}), got range [{low}, {high}]")
        return batch, length

    def extra_repr(self) -> str:
        c = self.config
        return (f"vocab={c.vocab_size}, hidden={c.hidden_size}, layers={c.num_layers}, "
                f"heads={c.num_heads}/{c.num_kv_heads}, head_dim={c.head_dim}, rope_theta={c.rope_theta}")
