"""Denoiser layers built on dlmfuse's ops (docs/ops.md).

    RMSNorm, RotaryEmbedding, apply_rotary   norm and RoPE with per-row positions (LLaMA convention)
    DenoiserAttention                        QKV + RoPE, GQA, label masks, KV cache, sparse query rows
    DenoiserMLP, DenoiserBlock               SwiGLU and the pre-norm block
    DenoiserLM                               embeddings, blocks, final norm, LM head; logits_for rows
    load_hf_state_dict                       transformers Llama / Qwen2 weights into a DenoiserLM
    tiny_code_model                          the shipped tiny code model (dlmfuse.codelm), tokenizer, metadata
"""

from .layers import DenoiserAttention, DenoiserBlock, DenoiserMLP, RMSNorm, RotaryEmbedding, apply_rotary
from .model import DenoiserLM
from .loading import denoiser_kwargs_from_hf_config, hf_to_denoiser_key, load_hf_state_dict
from ..codelm.pretrained import tiny_code_model

__all__ = ["RMSNorm", "RotaryEmbedding", "apply_rotary", "DenoiserAttention", "DenoiserMLP", "DenoiserBlock",
           "DenoiserLM", "load_hf_state_dict", "denoiser_kwargs_from_hf_config", "hf_to_denoiser_key",
           "tiny_code_model"]
