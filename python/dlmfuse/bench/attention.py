"""Attention benchmarks (docs/benchmarks.md): A1-A4, A4g and A6 on CUDA, C1, C3 and CPU-sized A1/A2/A4
on CPU (the training rows A5 / C2 are the ``backward`` family, built from the same specs).

Every workload times ``dlmfuse.attention`` against, in the same run:

* ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` in its preferred layout
  ``[B, H, L, D]``, given the dense boolean mask ``mask.to_dense()`` broadcast over heads (or the
  bias as a float ``attn_mask``); on CUDA also each backend forced through ``sdpa_kernel``
  (``sdpa-flash``, ``sdpa-efficient``, ``sdpa-cudnn``); a backend that refuses the inputs is
  recorded with its reason.
* ``flex``: FlexAttention compiled with ``torch.compile``, the BlockMask built beforehand from a
  ``mask_mod`` that reads the same label tensors (a bias becomes a ``score_mod``; packed documents
  ``and_masks(document, labels)``, FlexAttention's document masking);
  ``flex.create_block_mask`` times building that BlockMask alone, the cost Flex pays on every
  denoising step whose mask changed (compiled on CUDA; eager on CPU, where compiling it would
  cost another cold inductor compile).

FLOPs: ``tflops_dense`` counts ``4*B*H*Lq*Lk*D`` (every pair), ``tflops_visible`` only the visible
pairs ("effective TFLOP/s"). The sparse-query rows (A4) also report GB/s of
the K and V read, the floor of their cost. Training rows (A5, ``train=True``) time the forward and
the gradients of q, k and v for a fixed upstream gradient, and count FLOPs as 3.5x the forward's
(the backward's five matrix products against the forward's two).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

import dlmfuse

from .._ext import _cuda_kernel_enabled, use_reference
from ..attention import (cuda_attention_kernel, cuda_attention_override, cuda_kernel_args, cuda_kernel_for,
                         cuda_num_splits, last_cuda_plan)
from .common import DLMFUSE, Case, Impl, Workload

FAMILY = "attention"
PEERS = ("sdpa", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "flex", "flex.create_block_mask")
SEED = 0
PATTERNS = ("dense", "bias", "block_causal", "sparse", "bd3_train", "packed")
TRAIN_FLOPS_FACTOR = 3.5  # forward + backward against the forward alone (2 + 5 matrix products)


@dataclass(frozen=True)
class AttnSpec:
    """Shape of one attention workload.

    ``pattern``: "dense" (no mask), "bias" (dense plus an additive ``[1, H, L, L]`` bias),
    "block_causal" (``Mask.block_causal(L, block, prefix_len=prompt)``) or "sparse" (``n`` masked
    query rows per sequence against all ``L`` keys, half of them clean: ``Mask.clean_and_self`` on
    a random ``is_clean``, then ``gather_queries``) or "bd3_train" (BD3-LM training on
    ``[x_t ; x_0]``: ``Mask.bd3_train(L, block)``, 2L queries and keys) or "packed" (``docs``
    documents of ``L / docs`` tokens packed into one row of ``L``, block-causal ``block`` inside
    each: ``Mask.block_causal(L, block, documents=...)``). ``L`` is the key length,
    and the query length, except for "sparse" and "bd3_train". ``Hkv``: key/value heads (0: ``H``;
    fewer: grouped-query attention, peers given ``enable_gqa=True``). ``train``: time forward and
    backward (the gradients of q, k and v).
    """

    id: str
    pattern: str
    L: int
    B: int = 1
    H: int = 8
    D: int = 64
    dtype: str = "float32"
    block: int = 32
    prompt: int = 0
    n: int = 0
    Hkv: int = 0
    train: bool = False
    docs: int = 0

    @property
    def kv_heads(self) -> int:
        return self.Hkv or self.H

    @property
    def desc(self) -> str:
        heads = f" H={self.H}/{self.Hkv}" if self.kv_heads != self.H else ""
        return self._pattern_desc + heads + (" fwd+bwd" if self.train else "")

    @property
    def q_len(self) -> int:
        return {"sparse": self.n, "bd3_train": 2 * self.L}.get(self.pattern, self.L)

    @property
    def k_len(self) -> int:
        return 2 * self.L if self.pattern == "bd3_train" else self.L

    @property
    def _pattern_desc(self) -> str:
        if self.pattern == "dense":
            return f"dense L={self.L}"
        if self.pattern == "bias":
            return f"dense+bias L={self.L}"
        if self.pattern == "block_causal":
            prompt = f" prompt={self.prompt}" if self.prompt else ""
            return f"block-causal {self.block}{prompt} L={self.L}"
        if self.pattern == "bd3_train":
            return f"BD3 [x_t ; x_0] L={self.L} (2L={2 * self.L}) block {self.block}"
        if self.pattern == "packed":
            return f"{self.docs} documents x {self.L // self.docs} packed, block-causal {self.block} in each"
        return f"sparse n={self.n} Lk={self.L} B={self.B}"


def workload(spec: AttnSpec) -> Workload:
    """A benchmark row for ``spec``; its inputs are allocated only when it runs."""
    if spec.pattern not in PATTERNS:
        raise ValueError(f"attention bench: pattern must be one of {PATTERNS}, got {spec.pattern!r}")
    if spec.Hkv < 0 or spec.H % spec.kv_heads != 0:
        raise ValueError(f"attention bench: Hkv must divide H={spec.H} (0: Hkv = H), got {spec.Hkv}")
    if spec.pattern == "packed" and not (spec.docs > 0 and spec.L % spec.docs == 0):
        raise ValueError(f"attention bench: packed needs docs > 0 dividing L={spec.L}, got {spec.docs}")
    if spec.pattern == "sparse" and not 0 < spec.n <= spec.L - spec.L // 2:
        raise ValueError(f"attention bench: sparse n must be in [1, {spec.L - spec.L // 2}] "
                         f"(the masked half of L={spec.L}), got {spec.n}")
    params = asdict(spec)
    return Workload(id=spec.id, desc=spec.desc, family=FAMILY, params=params,
                    setup=functools.partial(_setup, spec, params))


def workloads(device: torch.device, quick: bool) -> list[Workload]:
    """The attention workloads of docs/benchmarks.md that fit ``device``; ``quick`` drops the largest
    CPU shape."""
    if device.type == "cuda":
        llada = dict(H=32, D=128, dtype="bfloat16")  # LLaDA-8B attention shape
        specs = [AttnSpec("A1", "dense", L=2048, **llada),
                 AttnSpec("A1", "dense", L=4096, **llada),
                 AttnSpec("A2", "block_causal", L=2048, block=32, prompt=512, **llada),
                 AttnSpec("A3", "bias", L=2048, **llada)]
        specs += [AttnSpec("A4", "sparse", L=2048, B=8, n=n, **llada) for n in (32, 128, 512)]
        # A4g: A4 with Dream-7B's grouped heads (28 query heads over 4 KV heads),
        # where packing the 7 query heads of a KV head into shared CTAs reads each K/V tile once.
        specs += [AttnSpec("A4g", "sparse", L=2048, B=8, n=n, H=28, Hkv=4, D=128, dtype="bfloat16")
                  for n in (32, 128)]
        specs.append(AttnSpec("A6", "packed", L=4 * 4096, docs=4, block=32, **llada))
    else:
        specs = [AttnSpec("C1", "block_causal", L=1024, block=32),
                 AttnSpec("C3", "packed", L=1024, docs=4, block=32),
                 AttnSpec("A1", "dense", L=1024),
                 AttnSpec("A2", "block_causal", L=1024, block=32, prompt=256)]
        specs += [AttnSpec("A4", "sparse", L=1024, B=2, n=n) for n in ((32,) if quick else (32, 128))]
    return [workload(spec) for spec in specs]


def _setup(spec: AttnSpec, params: dict, device: torch.device) -> Case:
    """Allocate the inputs of ``spec`` on ``device`` and list the implementations to time; on
    CUDA, record in ``params`` (the rows' copy) the split-KV count dlmfuse uses."""
    gen = torch.Generator(device=device).manual_seed(SEED)
    dtype = getattr(torch, spec.dtype)
    Lq, Lk = spec.q_len, spec.k_len

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=dtype)

    q = randn(spec.B, Lq, spec.H, spec.D)
    k, v = randn(spec.B, Lk, spec.kv_heads, spec.D), randn(spec.B, Lk, spec.kv_heads, spec.D)
    family = device.type == "cuda" and _cuda_kernel_enabled("attention_family")
    if device.type == "cuda" and not family:  # None: the reference runs (no native CUDA attention enabled)
        has_bias, has_labels = spec.pattern == "bias", spec.pattern not in ("dense", "bias")
        kernel = None if use_reference("attention", device) else cuda_kernel_for(q, k, has_labels, has_bias)
        params["num_splits"] = (None if kernel is None
                                else cuda_num_splits(q, k, cuda_kernel_args(kernel), has_bias=has_bias))
        params["cuda_attention"] = cuda_attention_kernel()  # DLMFUSE_CUDA_ATTENTION (A/B runs)
        params["cuda_kernel"] = kernel  # what runs: auto's pick, or the one DLMFUSE_CUDA_ATTENTION names
    mask = bias = None
    if spec.pattern == "bias":
        bias = randn(1, spec.H, spec.L, spec.L)
    elif spec.pattern == "block_causal":
        mask = dlmfuse.Mask.block_causal(spec.L, spec.block, prefix_len=spec.prompt, device=device)
    elif spec.pattern == "sparse":
        mask = _sparse_mask(spec, gen, device)
    elif spec.pattern == "bd3_train":
        mask = dlmfuse.Mask.bd3_train(spec.L, spec.block, device=device)
    elif spec.pattern == "packed":
        documents = torch.arange(spec.L, device=device) // (spec.L // spec.docs)
        mask = dlmfuse.Mask.block_causal(spec.L, spec.block, device=device, documents=documents)

    # Visible (query, key) pairs summed over the batch: the work a mask-aware kernel must do.
    if mask is None:
        visible = spec.B * Lq * Lk
    else:
        visible = int(mask.to_dense().expand(spec.B, Lq, Lk).sum())
    kv_bytes = 2 * spec.B * Lk * spec.kv_heads * spec.D * q.element_size()
    if spec.pattern == "sparse":
        # GB/s counts every K/V row (A4's measure). Kernels that gather keys (the CPU
        # kernel, CUDA's gather kernels) read only the rows some query sees: about this fraction.
        params["visible_kv_fraction"] = round(float(mask.to_dense().any(dim=1).float().mean()), 4)

    if family:  # the planned family: one call tells the plan that the timed calls run (None: not the family)
        dlmfuse.attention(q, k, v, mask=mask, bias=bias)  # (each family call resets the plan first)
        params["cuda_attention"] = cuda_attention_override()
        params["cuda_kernel"] = "family"
        params["cuda_plan"] = last_cuda_plan()

    heads_first = [x.transpose(1, 2).contiguous() for x in (q, k, v)]  # peers' layout [B, H, L, D]
    if spec.train:  # leaves whose gradients each implementation computes
        q, k, v, *heads_first = (x.requires_grad_(True) for x in (q, k, v, *heads_first))
    impls = [Impl(DLMFUSE, lambda: lambda: dlmfuse.attention(q, k, v, mask=mask, bias=bias),
                  to_common=lambda out: out, kind=DLMFUSE)]
    gqa = spec.kv_heads != spec.H
    impls += _sdpa_impls(heads_first, _sdpa_mask(spec, mask, bias, Lq), device, gqa)
    impls += _flex_impls(heads_first, mask, bias, device, gqa)
    flops = 4.0 * spec.H * spec.D * (TRAIN_FLOPS_FACTOR if spec.train else 1.0)
    if spec.train:
        grad_out = randn(spec.B, Lq, spec.H, spec.D)
        impls = [_with_backward(impl, (q, k, v) if impl.kind == DLMFUSE else tuple(heads_first),
                                grad_out if impl.kind == DLMFUSE else grad_out.transpose(1, 2))
                 if impl.kind != "overhead" else impl for impl in impls]
    return Case(impls=impls,
                flops_dense=flops * spec.B * Lq * Lk,
                flops_visible=flops * visible,
                bytes_read=kv_bytes if spec.pattern == "sparse" else None)


def _with_backward(impl: Impl, inputs: tuple, grad_out: torch.Tensor) -> Impl:
    """``impl`` timed as forward + backward: its output, then the gradients of ``inputs`` for
    the upstream gradient ``grad_out`` (in the implementation's output layout)."""
    def prepare():
        forward = impl.prepare()

        def step():
            out = forward()
            torch.autograd.grad(out, inputs, grad_out)
            return out.detach()
        return step
    return dataclasses.replace(impl, prepare=prepare)


def _sparse_mask(spec: AttnSpec, gen: torch.Generator, device: torch.device) -> dlmfuse.Mask:
    """Half the positions clean (random), ``n`` random masked positions as the query rows."""
    perm = torch.rand(spec.B, spec.L, generator=gen, device=device).argsort(dim=-1)
    num_clean = spec.L // 2
    is_clean = torch.zeros(spec.B, spec.L, dtype=torch.bool, device=device)
    is_clean.scatter_(1, perm[:, :num_clean], True)
    index = perm[:, num_clean:num_clean + spec.n].sort(dim=-1).values
    return dlmfuse.Mask.clean_and_self(is_clean).gather_queries(index)


def _to_blhd(out: torch.Tensor) -> torch.Tensor:
    """Peer output [B, H, L, D] -> dlmfuse layout [B, L, H, D]."""
    return out.transpose(1, 2)


# ------------------------------------------------------------------------------------------ SDPA

def _sdpa_mask(spec: AttnSpec, mask, bias, Lq: int):
    """SDPA's attn_mask: the dense bool mask broadcast over heads (a view), or the float bias."""
    if bias is not None:
        return bias
    if mask is None:
        return None
    return mask.to_dense()[:, None].expand(spec.B, spec.H, Lq, spec.k_len)


def _sdpa_impls(heads_first, attn_mask, device: torch.device, gqa: bool = False) -> list[Impl]:
    qh, kh, vh = heads_first
    extra = dict(enable_gqa=True) if gqa else {}  # only when needed: older torch lacks the kwarg

    def prepare(backend=None):
        from torch.nn.attention import sdpa_kernel

        def call():
            with sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
                return F.scaled_dot_product_attention(qh, kh, vh, attn_mask=attn_mask, **extra)
        return call

    impls = [Impl("sdpa", prepare, to_common=_to_blhd)]
    if device.type == "cuda":
        from torch.nn.attention import SDPBackend

        for name, backend in (("sdpa-flash", SDPBackend.FLASH_ATTENTION),
                              ("sdpa-efficient", SDPBackend.EFFICIENT_ATTENTION),
                              ("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION)):
            impls.append(Impl(name, functools.partial(prepare, backend), to_common=_to_blhd))
    return impls


# ------------------------------------------------------------------------------------------ Flex

# Each workload (shapes, mask_mod, score_mod) compiles its own static Flex graph; past dynamo's
# default of 8 graphs per function it would silently fall back to (slow) eager FlexAttention.
FLEX_RECOMPILE_LIMIT = 64


@functools.lru_cache(maxsize=None)
def _compiled(name: str):
    """``torch.compile`` of a FlexAttention function, static shapes, as users compile it (an
    ImportError on a torch without FlexAttention becomes the row's failure reason)."""
    from torch.nn.attention import flex_attention as flex

    config = torch._dynamo.config
    limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, limit, max(getattr(config, limit), FLEX_RECOMPILE_LIMIT))
    return torch.compile(getattr(flex, name), dynamic=False)


def _label_mask_mod(mask: dlmfuse.Mask):
    """A Flex ``mask_mod`` implementing the visibility rule on the mask's own label tensors; with
    documents, ``and_masks`` of a document mask and the label rule (Flex's document masking)."""
    batch = mask.batch
    q_order, q_group, k_order, k_group, q_doc, k_doc = (None if t is None else t.expand(batch, -1).contiguous()
                                                        for t in mask.labels())

    def mask_mod(b, h, q_idx, kv_idx):
        return (k_order[b, kv_idx] < q_order[b, q_idx]) | (k_group[b, kv_idx] == q_group[b, q_idx])
    if q_doc is None:
        return mask_mod, batch
    from torch.nn.attention.flex_attention import and_masks

    def document_mod(b, h, q_idx, kv_idx):
        return q_doc[b, q_idx] == k_doc[b, kv_idx]
    return and_masks(document_mod, mask_mod), batch


def _flex_impls(heads_first, mask, bias, device: torch.device, gqa: bool = False) -> list[Impl]:
    qh, kh, vh = heads_first
    extra = dict(enable_gqa=True) if gqa else {}
    Lq, Lk = qh.shape[2], kh.shape[2]
    score_mod = None
    if bias is not None:
        def score_mod(score, b, h, q_idx, kv_idx):
            return score + bias[0, h, q_idx, kv_idx]
    mask_mod, batch = _label_mask_mod(mask) if mask is not None else (None, 1)

    def build_block_mask(create):
        return create(mask_mod, batch, None, Lq, Lk, device=device)

    def prepare_flex():
        from torch.nn.attention.flex_attention import create_block_mask

        flex = _compiled("flex_attention")
        block_mask = build_block_mask(create_block_mask) if mask_mod is not None else None
        return lambda: flex(qh, kh, vh, score_mod=score_mod, block_mask=block_mask, **extra)

    def prepare_block_mask():
        from torch.nn.attention.flex_attention import create_block_mask

        create = _compiled("create_block_mask") if device.type == "cuda" else create_block_mask
        return lambda: build_block_mask(create)

    impls = [Impl("flex", prepare_flex, to_common=_to_blhd)]
    if mask_mod is not None:
        impls.append(Impl("flex.create_block_mask", prepare_block_mask, kind="overhead"))
    return impls
