"""dlmfuse: compiled kernels for masked diffusion language models.

Public API (documented in docs/: docs/ops.md, docs/visibility.md):
    dlmfuse.Mask                       visibility labels and the mask families of the field
    dlmfuse.attention(q, k, v, ...)    label-mask attention with bias, kv_lens, GQA, lse
    dlmfuse.merge_attention(...)       exact merge of two partial attentions
    dlmfuse.kv_scatter_(...)           in-place K/V cache writes at scattered positions
    dlmfuse.KVCache                    per-layer K/V cache with key labels and lengths
    dlmfuse.sample_tokens(logits, ...) fused greedy / Gumbel sampling with confidence
    dlmfuse.select_unmask(conf, cand)  which masked positions to unmask this step (k / threshold / factor)
    dlmfuse.nn                         DenoiserAttention / DenoiserBlock / DenoiserLM layers
    dlmfuse.codelm                     the shipped tiny code model: tokenizer, corpus, diffusion loss
    dlmfuse.samplers                   LLaDA, FastDLLM, Dream, MDLM, EsoLM, ReMDM step samplers
    dlmfuse.generate(model, prompt, s) the denoising loop (cache="none" | "prefix" | "dual")
    dlmfuse.distributed                tensor parallelism on torch.distributed (imported on first use)
    dlmfuse.integrations.transformers  attn_implementation="dlmfuse" for transformers models
    dlmfuse.reference                  pure-PyTorch ground truth for every op
    dlmfuse.build_info()               what this build contains
    dlmfuse.set_num_threads(n)         threads of the CPU kernels (bounded by the hardware)
"""

from ._ext import ORDER_INFINITY, __version__, build_info, num_threads, set_num_threads
from .mask import Mask
from .attention import attention, merge_attention
from .kv_cache import KVCache, kv_scatter_
from .sampling import sample_tokens
from .unmask import select_unmask
from .generate import generate
from . import codelm, integrations, nn, reference, samplers


def __getattr__(name: str):
    # dlmfuse.distributed imports torch.distributed's tensor-parallel API (~1 s): only when used.
    if name == "distributed":
        import importlib
        return importlib.import_module(".distributed", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Mask", "attention", "merge_attention", "kv_scatter_", "KVCache", "sample_tokens", "select_unmask", "reference", "nn", "codelm", "samplers", "generate", "distributed", "integrations", "build_info", "num_threads", "set_num_threads", "ORDER_INFINITY", "__version__"]
