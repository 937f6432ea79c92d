"""Weights from transformers Llama / Qwen2 checkpoints (LLaDA- and Dream-shaped models) into DenoiserLM.

DenoiserLM's parameters carry transformers' names without the ``model.`` prefix, so the mapping is::

    model.embed_tokens.weight                          -> embed_tokens.weight
    model.layers.N.self_attn.{q,k,v,o}_proj.{weight,bias} -> layers.N.self_attn.{q,k,v,o}_proj.*
    model.layers.N.mlp.{gate,up,down}_proj.weight      -> layers.N.mlp.{gate,up,down}_proj.weight
    model.layers.N.{input,post_attention}_layernorm.weight -> the same names
    model.norm.weight                                  -> norm.weight
    lm_head.weight                                     -> lm_head.weight (absent: tied to embed_tokens)

A base-model state dict (no ``model.`` prefix) is accepted as well. Nothing here imports
transformers: a config is any object or dict with the usual attributes.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping

import torch
from torch import Tensor

from .model import DenoiserLM

__all__ = ["denoiser_kwargs_from_hf_config", "load_hf_state_dict", "hf_to_denoiser_key"]

_OP = "load_hf_state_dict"
_PREFIX = "model."
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some older checkpoints saved
# model_type -> (q/k/v bias, o_proj bias); None: read config.attention_bias (Llama)
_ARCHITECTURES = {"llama": None, "qwen2": (True, False), "dream": (True, False)}
_MISSING = object()


def _get(config, name: str, default: Any = _MISSING) -> Any:
    value = config.get(name, default) if isinstance(config, Mapping) else getattr(config, name, default)
    if value is _MISSING:
        raise ValueError(f"DenoiserLM.from_hf_config: config has no {name!r}")
    return value


def _rope_theta(config) -> float:
    """rope_theta from transformers >= 5 (``rope_parameters``) or older (``rope_theta`` /
    ``rope_scaling``) configs; only the default RoPE is supported."""
    params = _get(config, "rope_parameters", None) or {}
    scaling = _get(config, "rope_scaling", None) or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise ValueError(f"DenoiserLM.from_hf_config: rope_type {rope_type!r} unsupported (supported: 'default')")
    return float(params.get("rope_theta", _get(config, "rope_theta", 10000.0)))


def denoiser_kwargs_from_hf_config(config) -> Dict[str, Any]:
    """DenoiserLM constructor arguments from a transformers LlamaConfig / Qwen2Config (or Dream's
    Qwen2-shaped config), given as a config object or a dict. Raises ValueError for settings
    DenoiserLM does not implement (activation other than SiLU, RoPE scaling, sliding window)."""
    model_type = str(_get(config, "model_type", "llama")).lower()
    if model_type not in _ARCHITECTURES:
        raise ValueError(f"DenoiserLM.from_hf_config: model_type {model_type!r} unsupported "
                         f"(supported: {', '.join(sorted(_ARCHITECTURES))})")
    act = _get(config, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"DenoiserLM.from_hf_config: hidden_act {act!r} unsupported (supported: 'silu')")
    _check_full_attention(config)
    biases = _ARCHITECTURES[model_type]
    if biases is None:
        attention_bias = bool(_get(config, "attention_bias", False))
        biases = (attention_bias, attention_bias)
    num_heads = int(_get(config, "num_attention_heads"))
    hidden_size = int(_get(config, "hidden_size"))
    return dict(
        vocab_size=int(_get(config, "vocab_size")),
        hidden_size=hidden_size,
        num_layers=int(_get(config, "num_hidden_layers")),
        num_heads=num_heads,
        num_kv_heads=_num_kv_heads(config, num_heads),
        intermediate_size=int(_get(config, "intermediate_size")),
        rope_theta=_rope_theta(config),
        head_dim=int(_get(config, "head_dim", None) or hidden_size // num_heads),
        rms_norm_eps=float(_get(config, "rms_norm_eps", 1e-6)),
        attention_bias=biases[0],
        attention_out_bias=biases[1],
        mlp_bias=bool(_get(config, "mlp_bias", False)),
        tie_word_embeddings=bool(_get(config, "tie_word_embeddings", False)),
        init_std=float(_get(config, "initializer_range", None) or 0.02),
        pad_token_id=_pad_token_id(config, int(_get(config, "vocab_size"))),
    )


def _check_full_attention(config) -> None:
    """DenoiserLM attends over the whole sequence in every layer: refuse configs where a layer
    slides. transformers >= 4.53 lists each layer's kind in ``layer_types``; older (and dict)
    configs slide the layers from ``max_window_layers`` on when ``use_sliding_window`` is set.
    A Qwen2 config with use_sliding_window=True whose window starts past the last layer has no
    sliding layer and is accepted."""
    layer_types = _get(config, "layer_types", None)
    if layer_types is not None:
        other = sorted({str(kind) for kind in layer_types} - {"full_attention"})
        if other:
            layers = [i for i, kind in enumerate(layer_types) if kind != "full_attention"]
            raise ValueError(f"DenoiserLM.from_hf_config: layer types {other} unsupported (layers {layers}; "
                             f"supported: 'full_attention')")
        return
    if not _get(config, "use_sliding_window", False) or _get(config, "sliding_window", 1) is None:
        return
    num_layers = int(_get(config, "num_hidden_layers"))
    first = int(_get(config, "max_window_layers", 0) or 0)  # the layers before it keep full attention
    if first < num_layers:
        raise ValueError(f"DenoiserLM.from_hf_config: sliding-window attention unsupported (use_sliding_window=True "
                         f"slides layers {max(first, 0)} to {num_layers - 1}, max_window_layers={first})")


def _pad_token_id(config, vocab_size: int):
    """transformers' embedding padding_idx: the config's pad_token_id where it is a vocabulary id."""
    value = _get(config, "pad_token_id", None)
    return int(value) if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < vocab_size else None


def _num_kv_heads(config, num_heads: int) -> int:
    """num_key_value_heads; absent (None) means multi-head attention, as in transformers."""
    value = _get(config, "num_key_value_heads", None)
    if value is None:
        return num_heads
    if int(value) <= 0:
        raise ValueError(f"DenoiserLM.from_hf_config: num_key_value_heads must be positive, got {value}")
    return int(value)


def hf_to_denoiser_key(key: str) -> str:
    """The DenoiserLM parameter name of a transformers Llama / Qwen2 state-dict key."""
    return key[len(_PREFIX):] if key.startswith(_PREFIX) else key


def _is_tied(model: DenoiserLM) -> bool:
    return model.lm_head.weight is model.embed_tokens.weight


def _listed(keys) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:8])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")


@torch.no_grad()
def load_hf_state_dict(model: DenoiserLM, state_dict: Mapping[str, Tensor]) -> DenoiserLM:
    """Copies a transformers Llama / Qwen2 state dict into ``model`` (converting dtype and device)
    and returns it.

    Every parameter of the model must be present exactly once and every key of the state dict must
    map to a parameter (rotary ``inv_freq`` buffers are skipped); otherwise ValueError names the
    missing / unexpected keys, and a shape mismatch names the key and both shapes. Nothing is
    written unless every check passes. With tied embeddings a checkpoint may omit ``lm_head.weight``
    (if present it must equal the embedding matrix). ``state_dict`` may also be the transformers
    model itself (its ``state_dict()`` is read).
    """
    if not isinstance(model, DenoiserLM):
        raise TypeError(f"{_OP}: model must be a dlmfuse.nn.DenoiserLM, got {type(model).__name__}")
    if isinstance(state_dict, torch.nn.Module):
        state_dict = state_dict.state_dict()
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"{_OP}: state_dict must be a mapping of names to tensors (or a transformers model), "
                        f"got {type(state_dict).__name__}")
    if model.embed_tokens.weight.device.type == "meta":  # copy_ into meta parameters does nothing
        raise ValueError(f"{_OP}: the model's parameters are on the meta device; create it on a real device "
                         "(e.g. device='cpu') before loading")
    params = dict(model.named_parameters(remove_duplicate=False))
    tied = _is_tied(model)
    required = set(params) - ({"lm_head.weight"} if tied else set())
    sources: Dict[str, str] = {}
    unexpected = []
    for key in state_dict:
        name = hf_to_denoiser_key(key)
        if key.endswith(_IGNORED_SUFFIXES):
            continue
        if name not in params:
            unexpected.append(key)
        elif name in sources:
            raise ValueError(f"{_OP}: {key!r} and {sources[name]!r} both map to parameter {name!r}")
        else:
            sources[name] = key
    missing = required - set(sources)
    if unexpected or missing:
        parts = []
        if missing:
            parts.append(f"missing keys (DenoiserLM names) {_listed(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_listed(unexpected)}")
        raise ValueError(f"{_OP}: state dict does not match the model: " + "; ".join(parts))
    for name, key in sources.items():
        value, param = state_dict[key], params[name]
        if not isinstance(value, Tensor):
            raise TypeError(f"{_OP}: {key!r} must be a torch.Tensor, got {type(value).__name__}")
        if value.shape != param.shape:
            raise ValueError(f"{_OP}: {key!r} has shape {list(value.shape)} but parameter {name!r} expects "
                             f"{list(param.shape)}")
    if tied and "lm_head.weight" in sources:
        head, embed = state_dict[sources["lm_head.weight"]], state_dict[sources["embed_tokens.weight"]]
        if not torch.equal(head.to(embed.device, embed.dtype), embed):
            raise ValueError(f"{_OP}: the model ties lm_head to embed_tokens but the checkpoint's "
                             f"{sources['lm_head.weight']!r} differs from {sources['embed_tokens.weight']!r}")
        del sources["lm_head.weight"]
    for name, key in sources.items():
        params[name].copy_(state_dict[key])
    return model
