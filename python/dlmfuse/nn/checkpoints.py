"""Local checkpoints: DenoiserLM.from_pretrained / save_pretrained.

A checkpoint is a directory with ``config.json`` and safetensors weights: ``model.safetensors``, or
shards listed by ``model.safetensors.index.json``. Four formats load:

- **LLaDA** (LLaDA-8B Base / Instruct / 1.5; OLMo-derived): config fields ``d_model``, ``n_heads``,
  ``n_kv_heads``, ``n_layers``, ``mlp_hidden_size``, ``vocab_size``, ``embedding_size``,
  ``rope_theta``, ``weight_tying``, ``rms_norm_eps``; weights ``model.transformer.wte``,
  ``model.transformer.blocks.N.{q_proj, k_proj, v_proj, attn_out, ff_proj, up_proj, ff_out,
  attn_norm, ff_norm}``, ``model.transformer.ln_f``, ``model.transformer.ff_out`` (the LM head).
  The MLP is ``ff_out(silu(ff_proj(x)) * up_proj(x))``: ff_proj is the gate.
- **Dream** (Dream-7B: Qwen2-shaped, ``model_type`` "Dream"), **Llama** and **Qwen2**: transformers'
  configs and names (``model.layers.N.self_attn.q_proj``, ...; see :mod:`dlmfuse.nn.loading`).

Weights stream tensor by tensor from the files (``safetensors.safe_open``) into a model whose
parameters were allocated once without initialisation: no second full copy in memory. A vocabulary
padded past ``vocab_size`` (LLaDA's ``embedding_size``) keeps the checkpoint's width, so logits
have ``embedding_size`` columns. ``save_pretrained`` writes transformers' Llama (or Qwen2, with
q/k/v biases) format, which every one of these loaders reads back.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import torch
from torch import Tensor

from .loading import _get, denoiser_kwargs_from_hf_config, hf_to_denoiser_key

__all__ = ["load_pretrained", "save_pretrained", "checkpoint_format", "llada_to_denoiser_key"]

_OP = "DenoiserLM.from_pretrained"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_HF_FORMATS = {"llama": "llama", "qwen2": "qwen2", "dream": "dream"}
# LLaDA config fields that select features DenoiserLM does not implement, with the value it needs.
_LLADA_UNSUPPORTED = {"alibi": False, "attention_layer_norm": False, "clip_qkv": None, "scale_logits": False,
                      "input_emb_norm": False, "rope_scaling": None, "multi_query_attention": None}


def _require_safetensors():
    try:
        import safetensors  # noqa: F401
        from safetensors.torch import safe_open, save_file
    except ImportError:  # pragma: no cover - safetensors is a dependency
        raise ImportError("DenoiserLM checkpoints need the safetensors package: pip install safetensors") from None
    return safe_open, save_file


def checkpoint_format(config: Dict[str, Any]) -> str:
    """"llada", "dream", "llama" or "qwen2"; ValueError naming the architecture otherwise."""
    model_type = str(config.get("model_type", "")).lower()
    if "d_model" in config or model_type == "llada":
        return "llada"
    if model_type in _HF_FORMATS:
        return _HF_FORMATS[model_type]
    architectures = config.get("architectures")
    raise ValueError(f"{_OP}: unsupported architecture (model_type={config.get('model_type')!r}, "
                     f"architectures={architectures!r}); supported: LLaDA, Dream, Llama, Qwen2")


def _llada_kwargs(config: Dict[str, Any]) -> Dict[str, Any]:
    for name, needed in _LLADA_UNSUPPORTED.items():
        value = config.get(name, needed)
        if value != needed and not (needed is None and value in (False, None)):
            raise ValueError(f"{_OP}: LLaDA config {name}={value!r} unsupported (DenoiserLM needs {needed!r})")
    if not config.get("rope", True):
        raise ValueError(f"{_OP}: LLaDA config rope=False unsupported (DenoiserLM uses rotary embeddings)")
    # (activation_type "swiglu" would split ff_proj in halves, which is not LLaDA's llama block)
    for name, allowed in (("layer_norm_type", ("rms",)), ("activation_type", ("silu",)),
                          ("block_type", ("llama",))):
        value = config.get(name, allowed[0])
        if value not in allowed:
            raise ValueError(f"{_OP}: LLaDA config {name}={value!r} unsupported (supported: {', '.join(allowed)})")
    d_model, heads = int(_get(config, "d_model")), int(_get(config, "n_heads"))
    vocab = int(_get(config, "vocab_size"))
    width = int(config.get("embedding_size") or vocab)
    if width < vocab:
        raise ValueError(f"{_OP}: LLaDA config embedding_size={width} is below vocab_size={vocab}")
    include_bias = bool(config.get("include_bias", False))
    mlp_hidden = config.get("mlp_hidden_size") or int(config.get("mlp_ratio", 4)) * d_model
    return dict(
        vocab_size=width,
        hidden_size=d_model,
        num_layers=int(_get(config, "n_layers")),
        num_heads=heads,
        num_kv_heads=int(config.get("n_kv_heads") or heads),
        intermediate_size=int(mlp_hidden),
        rope_theta=float(config.get("rope_theta", 10000.0)),
        head_dim=d_model // heads,
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-5)),
        attention_bias=include_bias or bool(config.get("include_qkv_bias", False)),
        attention_out_bias=include_bias,
        mlp_bias=include_bias,
        tie_word_embeddings=bool(config.get("weight_tying", False)),
        pad_token_id=None,  # LLaDA's embedding has no padding_idx
    )


_LLADA_BLOCK = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
                "attn_out": "self_attn.o_proj", "ff_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
                "ff_out": "mlp.down_proj", "attn_norm": "input_layernorm", "ff_norm": "post_attention_layernorm"}
_LLADA_BLOCK_KEY = re.compile(r"(?:model\.)?transformer\.blocks\.(\d+)\.(\w+)\.(weight|bias)")
_LLADA_TOP = {"transformer.wte.weight": "embed_tokens.weight", "transformer.ln_f.weight": "norm.weight",
              "transformer.ff_out.weight": "lm_head.weight"}


def llada_to_denoiser_key(key: str) -> Optional[str]:
    """The DenoiserLM parameter name of a LLaDA weight name (None for names outside the model)."""
    match = _LLADA_BLOCK_KEY.fullmatch(key)
    if match:
        layer, module, kind = match.groups()
        return f"layers.{layer}.{_LLADA_BLOCK[module]}.{kind}" if module in _LLADA_BLOCK else None
    return _LLADA_TOP.get(key[len("model."):] if key.startswith("model.") else key)


def _read_json(path: str, what: str) -> Dict[str, Any]:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{_OP}: {os.path.dirname(path) or '.'} has no {what} ({os.path.basename(path)})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{_OP}: {path} is not valid JSON ({e})") from None


def _weight_files(path: str) -> list:
    """The safetensors files of a checkpoint directory, in shard order."""
    single, index = os.path.join(path, WEIGHTS_NAME), os.path.join(path, INDEX_NAME)
    if os.path.exists(index):
        weight_map = _read_json(index, "shard index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{_OP}: {index} has no weight_map")
        files = [os.path.join(path, name) for name in dict.fromkeys(weight_map.values())]
        outside = [f for f in files if os.path.dirname(os.path.realpath(f)) != os.path.realpath(path)]
        if outside:
            raise ValueError(f"{_OP}: {index} names files outside the checkpoint directory: {outside[:3]}")
        return files
    if os.path.exists(single):
        return [single]
    raise ValueError(f"{_OP}: {path} has neither {WEIGHTS_NAME} nor {INDEX_NAME}")


def _tensors(files: list) -> Iterator[Tuple[str, Tensor]]:
    """Every (name, tensor) of the files, one tensor in memory at a time."""
    safe_open, _ = _require_safetensors()
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


def _stored_dtype(config: Dict[str, Any], files: list) -> torch.dtype:
    """The config's torch_dtype, else the dtype of the first stored tensor (read from its header)."""
    named = getattr(torch, str(config.get("torch_dtype") or config.get("dtype") or ""), None)
    if isinstance(named, torch.dtype):
        if not named.is_floating_point:
            raise ValueError(f"{_OP}: config torch_dtype {named} is not a float dtype; pass dtype=")
        return named
    safe_open, _ = _require_safetensors()
    with safe_open(files[0], framework="pt") as f:
        for name in f.keys():
            stored = f.get_slice(name).get_dtype()
            if stored in _SAFETENSORS_DTYPES:
                return _SAFETENSORS_DTYPES[stored]
            raise ValueError(f"{_OP}: {files[0]} stores {name!r} as {stored}, not a float dtype")
    raise ValueError(f"{_OP}: {files[0]} holds no tensor")


@torch.no_grad()
def load_pretrained(cls, path: str, dtype: Optional[torch.dtype] = None, device=None):
    """See DenoiserLM.from_pretrained."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{_OP}: path must be a directory path, got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"{_OP}: {path!r} is not a directory")
    config = _read_json(os.path.join(path, CONFIG_NAME), "config")
    fmt = checkpoint_format(config)
    kwargs = _llada_kwargs(config) if fmt == "llada" else denoiser_kwargs_from_hf_config(config)
    kwargs.pop("init_std", None)
    to_name: Callable[[str], Optional[str]] = llada_to_denoiser_key if fmt == "llada" else hf_to_denoiser_key
    files = _weight_files(path)
    dtype = dtype if dtype is not None else _stored_dtype(config, files)
    device = torch.device("cpu" if device is None else device)

    model = cls(**kwargs, dtype=dtype, device="meta")  # shapes only: nothing allocated or initialised
    model.to_empty(device=device)
    if model.config.tie_word_embeddings:  # to_empty made two parameters out of the tied one
        model.lm_head.weight = model.embed_tokens.weight
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded, unexpected = {}, []
    for key, tensor in _tensors(files):
        if key.endswith("rotary_emb.inv_freq"):
            continue
        name = to_name(key)
        if name not in params:
            unexpected.append(key)
            continue
        if name in loaded:
            raise ValueError(f"{_OP}: {key!r} and {loaded[name]!r} both map to parameter {name!r}")
        if tuple(tensor.shape) != tuple(params[name].shape):
            raise ValueError(f"{_OP}: {key!r} has shape {list(tensor.shape)} but parameter {name!r} expects "
                             f"{list(params[name].shape)} (config {os.path.join(path, CONFIG_NAME)})")
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            loaded[name] = key  # tied: checked against the embedding below
            tied_head = tensor
            continue
        params[name].copy_(tensor)
        loaded[name] = key
    tied = model.config.tie_word_embeddings
    missing = sorted(set(params) - set(loaded) - ({"lm_head.weight"} if tied else set()))
    if missing or unexpected:
        parts = ([f"missing parameters {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}"] if missing else [])
        parts += [f"unexpected weights {', '.join(sorted(unexpected)[:8])}{' ...' if len(unexpected) > 8 else ''}"] if unexpected else []
        raise ValueError(f"{_OP}: the weights in {path} do not match its {fmt} config: " + "; ".join(parts))
    if tied and "lm_head.weight" in loaded and not torch.equal(tied_head.to(device, dtype), model.embed_tokens.weight):
        raise ValueError(f"{_OP}: the config ties the LM head to the embedding but {loaded['lm_head.weight']!r} differs")
    model.checkpoint_format = fmt
    return model.eval()


def _hf_config(model) -> Dict[str, Any]:
    c = model.config
    # Qwen2: biases on q/k/v only. Llama: attention_bias covers q/k/v and o_proj alike; mlp_bias apart.
    qwen2 = c.attention_bias and not c.attention_out_bias and not c.mlp_bias
    if not qwen2 and c.attention_bias != c.attention_out_bias:
        raise ValueError("save_pretrained: these biases have no transformers format (attention_bias="
                         f"{c.attention_bias}, attention_out_bias={c.attention_out_bias}, mlp_bias={c.mlp_bias})")
    config = {
        "architectures": ["Qwen2ForCausalLM" if qwen2 else "LlamaForCausalLM"],
        "model_type": "qwen2" if qwen2 else "llama",
        "vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads, "num_key_value_heads": c.num_kv_heads,
        "intermediate_size": c.intermediate_size, "head_dim": c.head_dim, "rope_theta": c.rope_theta,
        "rms_norm_eps": c.rms_norm_eps, "tie_word_embeddings": c.tie_word_embeddings, "hidden_act": "silu",
        "mlp_bias": c.mlp_bias, "pad_token_id": c.pad_token_id,
        "torch_dtype": str(model.embed_tokens.weight.dtype).replace("torch.", ""),
    }
    if not qwen2:
        config["attention_bias"] = bool(c.attention_bias)
    return config


def save_pretrained(model, path: str, max_shard_bytes: int = 4 << 30) -> None:
    """See DenoiserLM.save_pretrained."""
    _, save_file = _require_safetensors()
    if not isinstance(max_shard_bytes, int) or isinstance(max_shard_bytes, bool) or max_shard_bytes <= 0:
        raise ValueError(f"save_pretrained: max_shard_bytes must be a positive int, got {max_shard_bytes!r}")
    os.makedirs(path, exist_ok=True)
    config = _hf_config(model)
    tensors = {("lm_head.weight" if name == "lm_head.weight" else "model." + name): param.detach().contiguous().cpu()
               for name, param in model.named_parameters()}  # tied: the head is not listed twice
    shards, current, size = [], {}, 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensor
        size += nbytes
    shards.append(current)
    for stale in os.listdir(path):  # an earlier save's weights, shards included
        if stale in (WEIGHTS_NAME, INDEX_NAME) or re.fullmatch(r"model-\d+-of-\d+\.safetensors", stale):
            os.remove(os.path.join(path, stale))
    if len(shards) == 1:
        save_file(shards[0], os.path.join(path, WEIGHTS_NAME), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(path, name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        with open(os.path.join(path, INDEX_NAME), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2)
