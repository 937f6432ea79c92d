"""Pure-PyTorch ground truth for dlmfuse's ops (float64 where it matters).

Built from the contract (docs/visibility.md, docs/ops.md), independently of the C++/CUDA kernels; tests compare the
kernels against these functions, and ``DLMFUSE_BACKEND=reference`` routes the public ops here.
"""

from .attention import attention, merge_attention, visibility
from .kv_cache import kv_scatter_
from .unmask import select_unmask
from .sampling import philox4x32_10, sample_tokens

__all__ = ["attention", "merge_attention", "visibility", "kv_scatter_", "select_unmask", "sample_tokens", "philox4x32_10"]
