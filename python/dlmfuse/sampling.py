"""dlmfuse.sample_tokens: fused token sampling for diffusion LMs (docs/ops.md).

One pass over the vocabulary per row (top-k / top-p add a selection step, never a sort of V):
greedy or Gumbel-max sampling with counter-based Philox noise keyed by (seed, offset, row,
column), so the same seed gives the same tokens on every device, plus the confidence a
remasking policy needs (prob, margin, neg_entropy, logit).
"""

from __future__ import annotations

import math
import numbers
import sys
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import _C, reference
from ._checks import can_read_values, expect_tensor, needs_dispatcher
from ._ext import _C_cuda, dlpack, use_reference

_OP = "sample_tokens"
#: Confidence kinds, in the order of the extension's codes (one source of truth: the extension).
CONFIDENCE_KINDS: Tuple[str, ...] = tuple(_C.CONFIDENCE_KINDS)
_LOGITS_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_MAX_SEED = 2**63 - 1


def sample_tokens(
    logits: Tensor,
    *,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    seed: Union[int, Tensor, None] = None,
    offset: Union[int, Tensor] = 0,
    confidence: str = "prob",
    suppress_tokens: Union[Tensor, Sequence[int], None] = None,
    tempered_confidence: bool = False,
) -> Tuple[Tensor, Tensor]:
    """Pick one token per row of ``logits [..., V]`` and report its confidence.

    Args:
        logits: float32 / bfloat16 / float16 / float64, last dim contiguous.
        temperature: 0 = greedy (argmax, first index on ties); > 0 = Gumbel-max sampling from
            softmax(logits / temperature), with float64-accurate noise (LLaDA's float64 path
            gives the same tokens for the same uniforms).
        top_k: keep the k largest logits (ties at the k-th value kept).
        top_p: keep the smallest set of most probable tokens (by softmax(logits / T), T = 1 when
            greedy) whose mass is >= top_p (ties at the boundary kept). With top_k too, a token
            must pass both.
        seed, offset: Philox key and counter offset (ints in [0, 2**63), or one-element int
            tensors: on the logits' CUDA device they are read by the kernel, so a captured CUDA
            graph can be replayed with new noise); seed None draws one from torch's default
            generator. Advance `offset` between steps for fresh noise.
        confidence: "prob" (probability of the chosen token), "margin" (top-1 minus top-2
            probability), "neg_entropy" (sum p log p), or "logit" (raw logit of the token).
            Probabilities are those of softmax(logits) over the kept tokens (after
            suppress_tokens / top_k / top_p), untempered as in LLaDA and Fast-dLLM;
            tempered_confidence=True uses softmax(logits / T) instead, as Dream does.
        suppress_tokens: token ids never emitted (int tensor [n] or a sequence of ints).

    Logits split over ranks by vocabulary (a DTensor with placement ``Shard(-1)`` on a 1-D mesh,
    what a :func:`dlmfuse.distributed.tensor_parallel` model returns) are sampled without
    gathering them: every rank of the mesh calls this and gets the tokens (global ids) and
    confidences of the whole rows (:func:`dlmfuse.distributed.sample_tokens`; ``seed`` is then
    required when sampling).

    Returns:
        ``(tokens, confidence)``: int64 and float32 tensors of shape ``logits.shape[:-1]``.
        A row in which no token can be emitted (all suppressed or -inf) raises ValueError on the
        CPU; the CUDA kernel (no host sync) returns token -1 and confidence -inf for it. Logits
        must otherwise be finite: a +inf logit (e.g. an fp16 LM head that overflowed) is chosen,
        but the row's probability-based confidence is NaN (checking would cost a pass over V).

    Example::

        >>> import torch, dlmfuse
        >>> logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 0.0]])
        >>> tokens, conf = dlmfuse.sample_tokens(logits)                  # greedy
        >>> tokens.tolist()
        [1, 0]
        >>> t1, _ = dlmfuse.sample_tokens(logits, temperature=1.0, seed=7)
        >>> t2, _ = dlmfuse.sample_tokens(logits, temperature=1.0, seed=7)
        >>> torch.equal(t1, t2)
        True
    """
    if _is_dtensor(logits):  # tensor-parallel logits: sampled where they lie (dlmfuse.distributed)
        from .distributed.sampling import sample_dtensor
        return sample_dtensor(logits, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, offset=offset,
                              confidence=confidence, suppress_tokens=suppress_tokens,
                              tempered_confidence=tempered_confidence)
    expect_tensor(_OP, "logits", logits)
    if logits.dtype not in _LOGITS_DTYPES:
        raise TypeError(f"{_OP}: logits must be a float tensor (float32, bfloat16, float16, float64), got {logits.dtype}")
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"{_OP}: logits must have shape [..., V] with V >= 1, got {list(logits.shape)}")
    if logits.stride(-1) != 1 and logits.shape[-1] > 1:
        raise ValueError(f"{_OP}: logits must have a contiguous last dimension, got strides {logits.stride()}")
    temperature = _temperature_value(temperature)
    top_k_code = _top_k_code(top_k, logits.shape[-1])
    top_p_value = _top_p_value(top_p)
    if confidence not in CONFIDENCE_KINDS:
        raise ValueError(f"{_OP}: confidence must be one of {list(CONFIDENCE_KINDS)}, got {confidence!r}")
    seed_value, seed_tensor = _counter("seed", torch.randint(0, _MAX_SEED, ()).item() if seed is None else seed, logits)
    offset_value, offset_tensor = _counter("offset", offset, logits)
    suppressed = _suppressed_mask(suppress_tokens, logits.shape[-1], logits.device)

    args = (logits, temperature, top_k_code, top_p_value, suppressed, seed_value, offset_value,
            seed_tensor, offset_tensor, CONFIDENCE_KINDS.index(confidence), bool(tempered_confidence))
    if needs_dispatcher(logits, suppressed, seed_tensor, offset_tensor):
        return torch.ops.dlmfuse.sample_tokens(*args)
    return _sample_impl(*args)


def _is_dtensor(t) -> bool:
    """A torch.distributed DTensor (checked without importing torch.distributed: a DTensor
    exists only once its module is loaded)."""
    dtensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    return dtensor is not None and isinstance(t, dtensor)


def _temperature_value(temperature) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):  # numpy scalars too
        raise TypeError(f"{_OP}: temperature must be a float, got {type(temperature).__name__}")
    try:
        finite = math.isfinite(temperature)
    except OverflowError:  # an int beyond float64
        finite = False
    if not finite or temperature < 0:
        raise ValueError(f"{_OP}: temperature must be finite and >= 0, got {temperature}")
    return float(temperature)


def _top_k_code(top_k, vocab: int) -> int:
    """0 (no filter) or k; a k of V or more keeps every token, whatever its size."""
    if top_k is None:
        return 0
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral):
        raise TypeError(f"{_OP}: top_k must be an int or None, got {type(top_k).__name__}")
    if top_k < 1:
        raise ValueError(f"{_OP}: top_k must be >= 1 (or None), got {top_k}")
    return min(int(top_k), vocab)


def _top_p_value(top_p) -> float:
    if top_p is None:
        return 1.0
    if isinstance(top_p, bool) or not isinstance(top_p, numbers.Real):
        raise TypeError(f"{_OP}: top_p must be a float or None, got {type(top_p).__name__}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"{_OP}: top_p must be in (0, 1], got {top_p}")
    return float(top_p)


def _counter(name: str, value, logits: Tensor) -> Tuple[int, Optional[Tensor]]:
    """(int value, device tensor or None). A one-element int tensor on the logits' CUDA device is
    kept as a tensor (read by the kernel: no host sync, CUDA-graph friendly); others become ints."""
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
            raise TypeError(f"{_OP}: {name} tensor must hold one integer, got {value.dtype} of shape {list(value.shape)}")
        if value.is_cuda and value.device == logits.device:
            return 0, value.reshape(1).to(torch.int64)
        value = int(value.item())
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{_OP}: {name} must be an int (or a one-element int tensor), got {type(value).__name__}")
    if not 0 <= value <= _MAX_SEED:
        raise ValueError(f"{_OP}: {name} must be in [0, 2**63), got {value}")
    return int(value), None


def _suppressed_mask(suppress_tokens, vocab: int, device) -> Optional[Tensor]:
    if suppress_tokens is None:
        return None
    try:
        ids = torch.as_tensor(suppress_tokens, device=device)
    except (OverflowError, RuntimeError, TypeError, ValueError) as e:  # e.g. an id beyond int64
        raise ValueError(f"{_OP}: suppress_tokens must be token ids in [0, V={vocab}), got {suppress_tokens!r} "
                         f"({e})") from None
    if ids.numel() == 0 and not isinstance(suppress_tokens, torch.Tensor):
        ids = ids.to(torch.int64)  # torch.as_tensor([]) is float32
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"{_OP}: suppress_tokens must hold integer token ids, got {ids.dtype}")
    ids = ids.reshape(-1).to(torch.int64)
    outside = (ids < 0) | (ids >= vocab)
    if ids.numel() and can_read_values(ids) and bool(outside.any()):  # one host read (a sync on CUDA)
        bad = ids[outside].tolist()
        raise ValueError(f"{_OP}: suppress_tokens must lie in [0, V={vocab}), got {bad}")
    mask = torch.zeros(vocab, dtype=torch.uint8, device=device)
    mask[ids] = 1
    return mask


def _sample_impl(logits, temperature, top_k, top_p, suppressed, seed, offset, seed_tensor, offset_tensor, kind, tempered):
    lead_shape = logits.shape[:-1]
    tokens, conf = sample_rows(logits.detach().reshape(-1, logits.shape[-1]), temperature, top_k, top_p, suppressed,
                               seed, offset, seed_tensor, offset_tensor, kind, tempered)
    if not logits.is_cuda:  # the CUDA kernel has no host sync to raise with: it returns -1
        empty = (tokens < 0).nonzero()
        if empty.numel():
            raise ValueError(f"{_OP}: row {int(empty[0])} has no token that can be emitted "
                             "(every logit is suppressed, -inf or NaN)")
    return tokens.reshape(lead_shape), conf.reshape(lead_shape)


def sample_rows(rows: Tensor, temperature: float, top_k: int, top_p: float, suppressed: Optional[Tensor], seed: int,
                offset: int, seed_tensor: Optional[Tensor], offset_tensor: Optional[Tensor], kind: int,
                tempered: bool, column_offset: int = 0, stats: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """The kernel (or the reference) on checked arguments: ``rows [N, V]`` -> tokens int64 ``[N]``
    (-1 in a row with no token that can be emitted) and confidence float32 ``[N]``. Column i of
    ``rows`` draws the noise of vocabulary column ``i + column_offset`` (even): a vocabulary
    shard samples as its slice of the whole row would; ``stats`` (float64 ``[N, 4]``, filled when
    given) receives the rows' softmax statistics (reference.softmax_stats), from which shards'
    confidences merge (dlmfuse.distributed)."""
    # The CUDA kernel scores in fp32 with float64 re-scoring of the near-best tokens; float64
    # logits and extreme temperatures (whose fp32 scores overflow) take the reference there.
    fp32_safe = rows.dtype != torch.float64 and (temperature == 0.0 or 1e-30 <= temperature <= 1e30)
    cuda_kernel = rows.is_cuda and fp32_safe and not use_reference("sample_tokens", rows.device)
    if not cuda_kernel:  # the CPU kernel and the reference take plain ints
        seed = seed if seed_tensor is None else int(seed_tensor.item())
        offset = offset if offset_tensor is None else int(offset_tensor.item())
    if use_reference("sample_tokens", rows.device) or (rows.is_cuda and not cuda_kernel):
        ids = None if suppressed is None else suppressed.nonzero().reshape(-1)
        uniforms = None
        if temperature > 0 and column_offset:
            uniforms = reference.gumbel_uniforms(rows.shape[0], rows.shape[1], seed, offset, first_column=column_offset)
        filters = dict(temperature=temperature, top_k=top_k or None, top_p=None if top_p >= 1.0 else top_p,
                       suppress_tokens=ids)
        tokens, conf = reference.sample_tokens(rows, seed=seed, offset=offset, confidence=CONFIDENCE_KINDS[kind],
                                               tempered_confidence=tempered, uniforms=uniforms, **filters)
        if stats is not None:
            stats.copy_(reference.softmax_stats(rows, tempered_confidence=tempered, **filters))
        return tokens.to(rows.device), conf.to(rows.device)  # the reference computes on the CPU
    tokens = torch.empty(rows.shape[0], dtype=torch.int64, device=rows.device)
    conf = torch.empty(rows.shape[0], dtype=torch.float32, device=rows.device)
    rows_, suppressed_, tokens_, conf_, stats_ = dlpack(rows, suppressed, tokens, conf, stats)
    if cuda_kernel:
        stream = torch.cuda.current_stream(rows.device).cuda_stream
        _C_cuda.sample_tokens(rows_, temperature, top_k, top_p, suppressed_, seed, offset,
                              *dlpack(seed_tensor, offset_tensor), column_offset, kind, tempered, tokens_, conf_,
                              stats_, stream)
    else:
        _C.sample_tokens(rows_, temperature, top_k, top_p, suppressed_, seed, offset, column_offset, kind, tempered,
                         tokens_, conf_, stats_)
    return tokens, conf


@torch.library.custom_op("dlmfuse::sample_tokens", mutates_args=())
def _sample_tokens_op(logits: Tensor, temperature: float, top_k: int, top_p: float, suppressed: Optional[Tensor],
                      seed: int, offset: int, seed_tensor: Optional[Tensor], offset_tensor: Optional[Tensor],
                      confidence_kind: int, tempered_confidence: bool) -> Tuple[Tensor, Tensor]:
    return _sample_impl(logits, temperature, top_k, top_p, suppressed, seed, offset, seed_tensor, offset_tensor,
                        confidence_kind, tempered_confidence)


@_sample_tokens_op.register_fake
def _(logits, temperature, top_k, top_p, suppressed, seed, offset, seed_tensor, offset_tensor, confidence_kind,
      tempered_confidence):
    shape = logits.shape[:-1]
    return logits.new_empty(shape, dtype=torch.int64), logits.new_empty(shape, dtype=torch.float32)
