"""Whether two strided tensors share a byte of memory, decided element by element.

In-place ops must refuse arguments that alias (a write through one would change the other), yet
accept disjoint views of one buffer, such as K and V of a flash-attn style packed cache
``kv[:, :, 0]`` / ``kv[:, :, 1]``, whose memory spans interleave without sharing an element.

Tensor ``t`` covers the bytes ``t.data_ptr() + sum_d i_d * stride_d * itemsize + u`` for
``0 <= i_d < size_d`` and ``0 <= u < itemsize``. Two tensors share a byte iff one such address of
``a`` equals one of ``b``; moving every term to one side (``i -> size - 1 - i`` for ``b``) gives

    sum_k c_k x_k = T,   0 <= x_k <= u_k,   c_k > 0,

a bounded knapsack equation in a handful of variables (two per dimension), solved exactly by a
depth-first search over the coefficients in decreasing order, where each level only tries the x_k
that leave a reachable remainder. Real layouts have nested strides (each stride exceeds the span of
the smaller ones), so each level has one or two candidates; a search that exceeds its work bound
answers "may share", which callers treat as sharing (a refusal or a copy, never a silent alias).
"""

from __future__ import annotations

import torch

_MAX_WORK = 100_000  # search nodes; nested layouts need a few dozen


def _terms(t: torch.Tensor) -> list[tuple[int, int]]:
    """(coefficient in bytes, max index) of every dimension that moves, plus the bytes of one element."""
    es = t.element_size()
    terms = [(stride * es, size - 1) for size, stride in zip(t.shape, t.stride()) if size > 1 and stride != 0]
    if es > 1:
        terms.append((1, es - 1))
    return terms


def _solvable(terms: list[tuple[int, int]], target: int) -> bool | None:
    """Whether sum c_k x_k == target has a solution with 0 <= x_k <= u_k; None when the search
    exceeded its work bound."""
    merged: dict[int, int] = {}
    for c, u in terms:  # equal coefficients act as one variable with the summed range
        merged[c] = merged.get(c, 0) + u
    coeffs = sorted(merged.items(), reverse=True)
    reach = [0] * (len(coeffs) + 1)  # reach[k]: the largest sum of the terms from k on
    for k in range(len(coeffs) - 1, -1, -1):
        reach[k] = reach[k + 1] + coeffs[k][0] * coeffs[k][1]
    work = 0

    def search(k: int, rest: int) -> bool:
        nonlocal work
        work += 1
        if work > _MAX_WORK:
            raise OverflowError
        if k == len(coeffs):
            return rest == 0
        c, u = coeffs[k]
        lo = max(0, -((reach[k + 1] - rest) // c))  # ceil((rest - reach[k+1]) / c)
        hi = min(u, rest // c)
        return any(search(k + 1, rest - x * c) for x in range(hi, lo - 1, -1))

    if target < 0 or target > reach[0]:
        return False
    try:
        return search(0, target)
    except OverflowError:
        return None


def may_share_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when ``a`` and ``b`` share (or, for layouts too irregular to decide, may share) a byte.

    False for tensors without real storage (fake tensors while compiling, meta tensors), where
    functionalization handles aliasing.
    """
    if type(a) is not torch.Tensor or type(b) is not torch.Tensor or a.device.type == "meta":
        return False
    if a.device != b.device or a.numel() == 0 or b.numel() == 0:
        return False
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():  # the common case, cheaply
        return False
    terms_a, terms_b = _terms(a), _terms(b)
    target = b.data_ptr() - a.data_ptr() + sum(c * u for c, u in terms_b)
    return _solvable(terms_a + terms_b, target) is not False
