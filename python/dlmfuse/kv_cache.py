"""Partial KV-cache updates for diffusion LMs (docs/ops.md): dlmfuse.kv_scatter_ and
dlmfuse.KVCache.

Diffusion decoders rewrite cache rows at scattered positions every step (Fast-dLLM DualCache,
dKV-Cache, Eso-LM); kv_scatter_ does K and V in one pass, in place, without copies of the cache.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import _C, reference
from ._ext import ATTENTION_MAX_HEAD_DIM, ORDER_INFINITY, _C_cuda
from .attention import _attention
from .mask import INT32_MAX, INT32_MIN, Mask
from ._checks import (FLOAT_DTYPES, as_signed_int, can_read_values, expect_last_dim_contiguous, expect_ndim, expect_positive_int,
                      expect_same_device, expect_tensor, needs_dispatcher)
from ._ext import dlpack, use_reference
from ._memory import may_share_memory

_OP = "kv_scatter_"


def kv_scatter_(k_cache: Tensor, v_cache: Tensor, k_new: Tensor, v_new: Tensor, positions: Tensor, *, validate: bool = True) -> None:
    """In place: ``k_cache[b, positions[b, i]] = k_new[b, i]`` and the same for v; nothing else
    changes. Returns None.

    Args:
        k_cache, v_cache: ``[B, Lmax, Hkv, D]`` (any strides with a contiguous last dim, e.g. a
            view of a larger buffer); written in place, never copied. They may be views of one
            buffer as long as no element belongs to both (``kv[:, :, 0]`` and ``kv[:, :, 1]`` of a
            packed ``[B, Lmax, 2, Hkv, D]`` cache); ValueError when they share one.
        k_new, v_new: ``[B, n, Hkv, D]`` with the caches' dtype.
        positions: int32 or int64 ``[B, n]``.
        validate: True (default) raises ValueError for positions outside [0, Lmax) (negatives
            included) or repeated within a row, before anything is written; this reads the
            positions on the host. False does no host read or sync (CUDA-graph capture):
            out-of-range rows are skipped, never written out of bounds, and a position repeated
            within a row gets the last of its new rows, whole (never a mix of two rows).

    Not differentiable: under grad mode, new rows that require grad raise RuntimeError (write
    under torch.no_grad(), or pass detached rows); the caches' version counters move, as with
    torch's in-place ops, so a backward through an attention that read them before raises.

    Example::

        >>> import torch, dlmfuse
        >>> k_cache, v_cache = torch.zeros(2, 16, 4, 64), torch.zeros(2, 16, 4, 64)
        >>> k_new, v_new = torch.randn(2, 3, 4, 64), torch.randn(2, 3, 4, 64)
        >>> pos = torch.tensor([[0, 5, 9], [1, 2, 15]])
        >>> dlmfuse.kv_scatter_(k_cache, v_cache, k_new, v_new, pos)
        >>> torch.equal(k_cache[1, 15], k_new[1, 2])
        True
    """
    _check_scatter_args(k_cache, v_cache, k_new, v_new, positions)
    if needs_dispatcher(k_cache, v_cache, k_new, v_new, positions):
        torch.ops.dlmfuse.kv_scatter_(k_cache, v_cache, k_new, v_new, positions, validate)
        return
    # The kernels write memory behind autograd's back: refuse what autograd cannot follow, read
    # new rows that alias the cache before any write, and bump the version counters so that a
    # backward through an attention that read the old cache fails instead of using the new rows.
    _check_autograd(k_cache, v_cache, k_new, v_new)
    k_new, v_new = (new.clone() if may_share_memory(new, k_cache) or may_share_memory(new, v_cache) else new
                    for new in (k_new, v_new))
    _kv_scatter_impl(k_cache, v_cache, k_new, v_new, positions, validate)
    torch.autograd.graph.increment_version(k_cache)
    torch.autograd.graph.increment_version(v_cache)


def _check_autograd(k_cache, v_cache, k_new, v_new) -> None:
    """RuntimeError for what an in-place, non-differentiable write cannot do under grad mode."""
    if not torch.is_grad_enabled():
        return
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if cache.requires_grad and cache.is_leaf:  # as torch's in-place ops
            raise RuntimeError(f"{_OP}: {name} is a leaf tensor that requires grad; an in-place write "
                               "into it is not allowed (write under torch.no_grad(), or detach the cache)")
    for name, new in (("k_new", k_new), ("v_new", v_new)):
        if new.requires_grad:  # the write would cut the graph silently
            raise RuntimeError(f"{_OP}: {name} requires grad, but the cache write is not differentiable; run "
                               "it under torch.no_grad() / torch.inference_mode() (e.g. a model's forward with "
                               "cache=), or pass new.detach() to write values only")


def _check_scatter_args(k_cache, v_cache, k_new, v_new, positions) -> None:
    named = (("k_cache", k_cache), ("v_cache", v_cache), ("k_new", k_new), ("v_new", v_new))
    for name, t in named:
        expect_tensor(_OP, name, t)
        expect_ndim(_OP, name, t, 4, "[B, L, Hkv, D]")
        expect_same_device(_OP, name, t, "k_cache", k_cache)
        if t.dtype != k_cache.dtype:
            raise TypeError(f"{_OP}: {name} must have the dtype of k_cache ({k_cache.dtype}), got {t.dtype}")
        expect_last_dim_contiguous(_OP, name, t)
    B, Lmax, H, D = k_cache.shape
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"{_OP}: v_cache must have the shape of k_cache {list(k_cache.shape)}, got {list(v_cache.shape)}")
    n = k_new.shape[1]
    for name, t in (("k_new", k_new), ("v_new", v_new)):
        if tuple(t.shape) != (B, n, H, D):
            raise ValueError(f"{_OP}: {name} must have shape [B={B}, n, Hkv={H}, D={D}] matching the cache and k_new, got {list(t.shape)}")
    if not torch.compiler.is_compiling():  # memory layout: real tensors only (tracing has fakes)
        for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
            if torch._debug_has_internal_overlap(cache) == 1:  # e.g. an expand()ed view: rows share memory
                raise ValueError(f"{_OP}: {name} has elements that share memory (strides {cache.stride()} for "
                                 f"shape {list(cache.shape)}); writes would land in several places")
        if may_share_memory(k_cache, v_cache):
            raise ValueError(f"{_OP}: k_cache and v_cache share memory (an element of one is an element of the "
                             f"other); pass two caches without a common element (disjoint views of one buffer, "
                             f"e.g. kv[:, :, 0] and kv[:, :, 1] of a packed [B, L, 2, H, D] cache, are fine)")
    expect_tensor(_OP, "positions", positions)
    if positions.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{_OP}: positions must be int32 or int64, got {positions.dtype}")
    expect_same_device(_OP, "positions", positions, "k_cache", k_cache)
    if tuple(positions.shape) != (B, n):
        raise ValueError(f"{_OP}: positions must have shape [B={B}, n={n}], got {list(positions.shape)}")


def _kv_scatter_impl(k_cache, v_cache, k_new, v_new, positions, validate: bool) -> None:
    if use_reference("kv_scatter_", k_cache.device):
        reference.kv_scatter_(k_cache, v_cache, k_new, v_new, positions, validate=validate and can_read_values(positions))
        return
    if k_cache.is_cuda:
        validated = validate and can_read_values(positions)
        if validated:  # one small device-to-host copy
            _C.kv_scatter_validate(*dlpack(positions.cpu()), k_cache.shape[1])
        stream = torch.cuda.current_stream(k_cache.device).cuda_stream
        _C_cuda.kv_scatter(*dlpack(k_cache, v_cache, k_new.detach(), v_new.detach(), positions), validated, stream)
        return
    _C.kv_scatter(*dlpack(k_cache, v_cache, k_new.detach(), v_new.detach(), positions), validate)


@torch.library.custom_op("dlmfuse::kv_scatter_", mutates_args=("k_cache", "v_cache"))
def _kv_scatter_op(k_cache: Tensor, v_cache: Tensor, k_new: Tensor, v_new: Tensor, positions: Tensor, validate: bool) -> None:
    _kv_scatter_impl(k_cache, v_cache, k_new, v_new, positions, validate)


@_kv_scatter_op.register_fake
def _(k_cache, v_cache, k_new, v_new, positions, validate):
    return None


class CacheView(NamedTuple):
    """One layer of a KVCache, in the form dlmfuse.attention takes."""

    k: Tensor  # [B, Lmax, Hkv, D]
    v: Tensor  # [B, Lmax, Hkv, D]
    k_order: Tensor  # int32 [B, Lmax]
    k_group: Tensor  # int32 [B, Lmax]
    kv_lens: Tensor  # int32 [B]


#: Group label of cache slots never written: no query may use it, so such slots stay invisible.
UNWRITTEN_GROUP = INT32_MIN


class KVCache:
    """Per-layer K/V cache with key labels (order, group) and lengths, for diffusion decoding.

    K and V of all layers live in one buffer each (``[num_layers, B, Lmax, Hkv, D]``). Slots are
    written at any positions, in any order, with :meth:`write`; the key labels of a slot say who
    may attend to it (docs/visibility.md). Slots never written carry order ``ORDER_INFINITY`` and
    group :data:`UNWRITTEN_GROUP`, so they are invisible to every query; ``lengths[b]`` is one
    past the largest written position and becomes ``kv_lens``.

    Example (prompt cached as clean keys, then a block of 4 masked queries attends to it)::

        >>> import torch, dlmfuse
        >>> cache = dlmfuse.KVCache(num_layers=2, batch=1, max_len=64, num_kv_heads=2,
        ...                         head_dim=64, dtype=torch.float32, device="cpu")
        >>> pos = torch.arange(8)[None]                       # prompt positions 0..7
        >>> k = v = torch.randn(1, 8, 2, 64)
        >>> cache.write(0, pos, k, v, order=torch.zeros(1, 8, dtype=torch.int32),
        ...             group=torch.zeros(1, 8, dtype=torch.int32))
        >>> q = torch.randn(1, 4, 2, 64)
        >>> q_labels = torch.ones(1, 4, dtype=torch.int32)    # order 1: sees order-0 keys
        >>> out = cache.attend(0, q, q_order=q_labels, q_group=q_labels)
        >>> out.shape, int(cache.lengths[0])
        (torch.Size([1, 4, 2, 64]), 8)
    """

    def __init__(self, num_layers: int, batch: int, max_len: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.bfloat16, device=None):
        for name, value in (("num_layers", num_layers), ("batch", batch), ("max_len", max_len),
                            ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            expect_positive_int("KVCache", name, value)
            if value > INT32_MAX:  # positions and labels are int32
                raise ValueError(f"KVCache: {name} must be at most {INT32_MAX}, got {value}")
        if dtype not in FLOAT_DTYPES:  # what dlmfuse.attention reads
            raise TypeError(f"KVCache: dtype must be torch.float32, torch.bfloat16 or torch.float16, got {dtype!r}")
        if head_dim > ATTENTION_MAX_HEAD_DIM:
            raise ValueError(f"KVCache: head_dim must be at most {ATTENTION_MAX_HEAD_DIM} (dlmfuse.attention), "
                             f"got {head_dim}")
        device = torch.device("cpu" if device is None else device)
        shape = (num_layers, batch, max_len, num_kv_heads, head_dim)
        self.num_layers, self.batch, self.max_len = num_layers, batch, max_len
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        # One spare column at index max_len absorbs label writes of out-of-range positions
        # (validate=False) so they never land on a real slot; views hide it.
        self._order = torch.empty((batch, max_len + 1), dtype=torch.int32, device=device)
        self._group = torch.empty((batch, max_len + 1), dtype=torch.int32, device=device)
        self._doc = torch.empty((batch, max_len + 1), dtype=torch.int32, device=device)
        self.lengths = torch.empty((batch,), dtype=torch.int32, device=device)
        self.reset()

    @property
    def k_order(self) -> Tensor:
        """int32 [B, Lmax] order labels of the cached keys (a strided view)."""
        return self._order[:, : self.max_len]

    @property
    def k_group(self) -> Tensor:
        """int32 [B, Lmax] group labels of the cached keys (a strided view)."""
        return self._group[:, : self.max_len]

    @property
    def k_doc(self) -> Tensor:
        """int32 [B, Lmax] document labels of the cached keys (packed sequences; 0 unless written)."""
        return self._doc[:, : self.max_len]

    @property
    def nbytes(self) -> int:
        """Memory footprint in bytes (K, V, labels and lengths)."""
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self._order, self._group, self._doc, self.lengths))

    def reset(self) -> None:
        """Forget every slot (labels and lengths; K/V bits are left as they are, invisible)."""
        self._order.fill_(ORDER_INFINITY)
        self._group.fill_(UNWRITTEN_GROUP)
        self._doc.zero_()
        self.lengths.zero_()

    def write(self, layer: int, positions: Tensor, k: Tensor, v: Tensor, order: Optional[Tensor] = None,
              group: Optional[Tensor] = None, *, doc: Optional[Tensor] = None, validate: bool = True,
              update_lengths: bool = True) -> None:
        """Write ``k, v [B, n, Hkv, D]`` of `layer` at ``positions [B, n]`` (int32/int64) with
        :func:`kv_scatter_`; set the key labels of those slots when `order` / `group` / `doc` (the
        document, for packed sequences) are given (int ``[B, n]``, or ``[1, n]`` / scalars
        broadcast; labels are shared by all layers, so passing them on one layer's write is
        enough); grow ``lengths``. No host sync when
        ``validate=False``. ``update_lengths=False`` leaves ``lengths`` alone: for the later
        layers of a model that writes the same positions on every layer (a few launches less
        per layer)."""
        self._check_layer("write", layer)
        expect_tensor("KVCache.write", "positions", positions)
        labels = [(store, self._checked_labels(name, value, positions))
                  for name, value, store in (("order", order, self._order), ("group", group, self._group),
                                             ("doc", doc, self._doc))
                  if value is not None]  # checked before anything is written
        kv_scatter_(self.k[layer], self.v[layer], k, v, positions, validate=validate)
        if not labels and not update_lengths:
            return
        pos = positions.to(torch.int64)
        in_range = (pos >= 0) & (pos < self.max_len)
        slot = torch.where(in_range, pos, torch.full_like(pos, self.max_len))
        if labels and not validate:  # a repeated position takes the labels of its last row, as K/V do
            rows = torch.arange(pos.shape[1], device=pos.device).expand_as(pos)
            last = torch.full_like(self._order, -1, dtype=torch.int64).scatter_reduce(1, slot, rows, reduce="amax")
            slot = torch.where(last.gather(1, slot) == rows, slot, torch.full_like(slot, self.max_len))
        for store, values in labels:
            store.scatter_(1, slot, values)
        if update_lengths and pos.shape[1] > 0:
            written_end = torch.where(in_range, pos + 1, torch.zeros_like(pos)).amax(dim=1)
            torch.maximum(self.lengths, written_end.to(torch.int32), out=self.lengths)

    def _checked_labels(self, name: str, labels, positions: Tensor) -> Tensor:
        """Labels as int32 broadcast to the positions' shape; errors name the received value."""
        if not isinstance(labels, (Tensor, numbers.Integral)) or isinstance(labels, bool):
            raise TypeError(f"KVCache.write: {name} must be an integer tensor or an int, got {type(labels).__name__}")
        if isinstance(labels, numbers.Integral) and not INT32_MIN <= labels <= INT32_MAX:
            raise ValueError(f"KVCache.write: {name} values must fit in int32, got {labels}")
        labels = torch.as_tensor(labels, device=self._order.device)
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise TypeError(f"KVCache.write: {name} must be an integer tensor, got {labels.dtype}")
        labels = as_signed_int(labels)
        try:
            labels = labels.expand(positions.shape)
        except RuntimeError:
            raise ValueError(f"KVCache.write: {name} of shape {list(labels.shape)} does not broadcast to "
                             f"positions' shape {list(positions.shape)}") from None
        if labels.dtype != torch.int32 and can_read_values(labels) and labels.numel():
            low, high = int(labels.min()), int(labels.max())
            if low < -(2**31) or high > 2**31 - 1:
                raise ValueError(f"KVCache.write: {name} values must fit in int32, got range [{low}, {high}]")
        return labels.to(torch.int32)

    def _check_layer(self, method: str, layer) -> None:
        # Negative indices are refused too: cache.view(-1) silently meaning the last layer hides bugs.
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.num_layers:
            raise ValueError(f"KVCache.{method}: layer must be an int in [0, {self.num_layers}), got {layer!r}")

    def view(self, layer: int) -> CacheView:
        """K, V, key labels and kv_lens of one layer, ready for dlmfuse.attention."""
        self._check_layer("view", layer)
        return CacheView(self.k[layer], self.v[layer], self.k_order, self.k_group, self.lengths)

    def mask(self, q_order: Tensor, q_group: Tensor, q_doc: Optional[Tensor] = None) -> Mask:
        """A Mask of the given query labels ``[B or 1, Lq]`` against the cached keys; with
        ``q_doc``, restricted to the queries' documents (packed sequences)."""
        if q_doc is None:
            return Mask(q_order, q_group, self.k_order, self.k_group)
        return Mask(q_order, q_group, self.k_order, self.k_group, q_doc, self.k_doc)

    def attend(self, layer: int, q: Tensor, q_order: Tensor, q_group: Tensor, q_doc: Optional[Tensor] = None,
               **kwargs):
        """``dlmfuse.attention(q, K, V, mask=self.mask(q_order, q_group, q_doc), kv_lens=self.lengths)``
        for one layer; other keyword arguments (bias, scale, return_lse) pass through. The
        lengths' values are not read back (no host sync)."""
        self._check_layer("attend", layer)
        view = self.view(layer)
        # lengths stay in [0, max_len] (write() only raises them to an in-range position + 1), so
        # their values are not read back: that would be a host sync per layer on CUDA.
        return _attention(q, view.k, view.v, mask=self.mask(q_order, q_group, q_doc), kv_lens=view.kv_lens,
                          check_kv_lens_values=False, **kwargs)

    def __repr__(self) -> str:
        L, B, Lmax, H, D = self.k.shape
        return (f"KVCache(layers={L}, batch={B}, max_len={Lmax}, kv_heads={H}, head_dim={D}, "
                f"dtype={self.k.dtype}, device={self.k.device}, {self.nbytes / 2**20:.1f} MiB)")
