"""Tensor parallelism on torch.distributed (docs/distributed.md).

    tensor_parallel(model, mesh)      shard a DenoiserLM in place over a 1-D DeviceMesh (heads, MLP,
                                      vocabulary); model.sharding says what a rank holds
    sample_tokens(local, *, vocab_offset, vocab_size, group, ...)
                                      dlmfuse.sample_tokens of rows split by vocabulary over ranks:
                                      the same tokens, one all-gather of a few numbers per row
    token_probability(local, tokens, ...)
                                      LLaDA's float64 confidence of split rows
    RankPool, run_local               local gloo process groups (tests, benchmarks, trying it on a CPU)
    count_sent_bytes()                bytes the vocabulary-parallel collectives send, for measuring

``dlmfuse.sample_tokens`` and ``dlmfuse.generate`` take a sharded model's DTensor logits as they
are; every rank runs the same loop and gets the unsharded model's tokens.
"""

import torch

try:  # DTensor and the tensor-parallel plans are public from torch 2.5 on
    import torch.distributed.tensor.parallel  # noqa: F401
    from torch.distributed.tensor import DTensor  # noqa: F401
except ImportError as error:  # torch 2.4, or a build without torch.distributed
    raise ImportError(f"dlmfuse.distributed needs torch >= 2.5 with torch.distributed (torch.distributed.tensor), "
                      f"got torch {torch.__version__}: {error}") from error

from .collectives import count_sent_bytes
from .parallel import Sharding, tensor_parallel
from .processes import RankPool, rank_state, run_local
from .sampling import STATS_PER_ROW, sample_tokens, token_probability

__all__ = ["tensor_parallel", "Sharding", "sample_tokens", "token_probability", "STATS_PER_ROW", "RankPool",
           "run_local", "rank_state", "count_sent_bytes"]
