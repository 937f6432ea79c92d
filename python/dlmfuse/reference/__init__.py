"""Pure-PyTorch ground truth for dlmfuse's ops (float64 where it matters).

Built from the contract in DESIGN.md, independently of the C++/CUDA kernels; tests compare the
kernels against these functions, and ``DLMFUSE_BACKEND=reference`` routes the public ops here.
"""

from .attention import attention, merge_attention, visibility

__all__ = ["attention", "merge_attention", "visibility"]
