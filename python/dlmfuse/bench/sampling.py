"""Token sampling benchmarks: workload S1 of docs/benchmarks.md on CUDA; on CPU the shape
``[8, 32, 32000]`` in fp32 and bf16.

The S1 workload times ``dlmfuse.sample_tokens(logits, temperature=1.0, seed=SEED,
confidence="prob")`` against, in the same run:

* ``llada-fp64``: LLaDA's float64 Gumbel path as in its ``generate``: ``x = logits.to(float64)``,
  ``noise = torch.rand_like(x, dtype=float64)``, ``g = (-log noise) ** T``,
  ``token = argmax(exp(x) / g)``, confidence ``softmax(x).gather(token)``.
* ``dlmfuse.greedy``: ``dlmfuse.sample_tokens(logits)`` (temperature 0), a second dlmfuse row,
  compared with ``torch-greedy`` only.
* ``torch-greedy``: ``softmax(logits.float()).max(-1)`` (confidence, token), the cheapest greedy
  step users write.
* ``floor.amax``: ``logits.amax(-1)``, the read-once floor (a floor, not a peer: the report
  gives dlmfuse's "% of floor"). It reads every logit once and writes one value per row, which is
  exactly the memory traffic of a one-pass sampler (a copy would also write the logits back,
  twice the traffic, and would not be a floor of this op).

A second workload, for information, samples with ``top_k=50, top_p=0.9`` against
``dream-topk-topp``: Dream's ``sample_tokens`` (``logits / T``, ``top_p_logits`` by a full sort
and cumsum, ``top_k_logits``, softmax, ``Categorical(probs).sample()``, confidence = probability
of the token); both keep the tokens that pass both filters.

The ``dlmfuse`` row (temperature 1) is compared with the LLaDA path and with torch greedy (the
cheapest step a user could write instead); ``dlmfuse.greedy`` with torch greedy.

Correctness, in the run; each output is ``(token, confidence)`` stacked as floats, so
``max |diff|`` below 1 means every token agrees and the value is the largest confidence
difference. A peer is compared with the dlmfuse row listed before it (the harness takes the
latest dlmfuse row as the reference):

* ``llada-fp64`` vs ``dlmfuse``: sampled tokens depend on the noise, so the timed output is not
  compared; instead LLaDA's formula is re-run (untimed) on dlmfuse's own Philox uniforms
  (``dlmfuse.reference.sampling.gumbel_uniforms``) for the first ``CHECK_ROWS`` rows, which must
  give dlmfuse's tokens (sample_tokens' contract: accuracy at least that of the float64 path).
* ``torch-greedy`` vs ``dlmfuse.greedy``: every row, tokens exact (ties go to the first index in
  both; bf16 logits do tie).
* ``floor.amax`` and ``dream-topk-topp``: nothing to compare (a reduction; another RNG).

GB/s counts one read of the logits.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from typing import Optional

import torch

import dlmfuse
from dlmfuse.reference.sampling import gumbel_uniforms

from .common import DLMFUSE, KIND_FLOOR, Case, Impl, Workload

FAMILY = "sampling"
PEERS = ("llada-fp64", "torch-greedy", "floor.amax", "dream-topk-topp")
SEED = 0
CHECK_ROWS = 8  # rows re-sampled untimed with dlmfuse's uniforms (the float64 Philox is slow)


@dataclass(frozen=True)
class SampleSpec:
    """Logits ``[B, L, V]`` sampled at ``temperature`` with optional top-k / top-p filters."""

    id: str
    B: int = 8
    L: int = 32
    V: int = 32000
    dtype: str = "float32"
    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None

    @property
    def desc(self) -> str:
        filters = "".join(f" {name}={value}" for name, value in
                          (("top_k", self.top_k), ("top_p", self.top_p)) if value is not None)
        return f"sample [{self.B}, {self.L}, {self.V}] {self.dtype} T={self.temperature:g}{filters}"

    @property
    def filtered(self) -> bool:
        return self.top_k is not None or self.top_p is not None


def workload(spec: SampleSpec) -> Workload:
    """A benchmark row for ``spec``; its inputs are allocated only when it runs."""
    if not spec.temperature > 0:
        raise ValueError(f"sampling bench: temperature must be > 0 (the greedy rows are added "
                         f"to every workload), got {spec.temperature}")
    return Workload(id=spec.id, desc=spec.desc, family=FAMILY, params=asdict(spec),
                    setup=functools.partial(_setup, spec))


def workloads(device: torch.device, quick: bool) -> list[Workload]:
    """S1 on CUDA; on CPU ``[8, 32, 32000]`` fp32 and bf16. Each with a
    top_k=50 / top_p=0.9 row for information. Every shape is cheap enough for ``quick``."""
    if device.type == "cuda":
        shapes = [dict(V=126464, dtype="bfloat16")]  # S1: LLaDA-8B's vocabulary
    else:
        shapes = [dict(V=32000, dtype="float32"), dict(V=32000, dtype="bfloat16")]
    specs = [SampleSpec("S1", **shape) for shape in shapes]
    specs += [SampleSpec("S1", top_k=50, top_p=0.9, **shapes[0])]
    return [workload(spec) for spec in specs]


def _pair(tokens: torch.Tensor, confidence: torch.Tensor) -> torch.Tensor:
    """(token, confidence) of every row as one float tensor ``[2, rows]`` (tokens < 2^24: exact)."""
    return torch.stack((tokens.reshape(-1).double(), confidence.reshape(-1).double()))


def _llada_pick(x: torch.Tensor, noise: torch.Tensor, temperature: float):
    """LLaDA's float64 Gumbel-max on float64 logits ``x`` and uniforms ``noise``: (token, prob)."""
    gumbel = (-torch.log(noise)) ** temperature
    tokens = torch.argmax(x.exp() / gumbel, dim=-1)
    confidence = torch.softmax(x, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return tokens, confidence


def _setup(spec: SampleSpec, device: torch.device) -> Case:
    """Allocate the logits of ``spec`` on ``device`` and list the implementations to time."""
    gen = torch.Generator(device=device).manual_seed(SEED)
    logits = torch.randn(spec.B, spec.L, spec.V, generator=gen, device=device,
                         dtype=getattr(torch, spec.dtype))
    T = spec.temperature
    floor = Impl("floor.amax", lambda: lambda: logits.amax(dim=-1), kind=KIND_FLOOR, graph=True)
    bytes_read = logits.numel() * logits.element_size()
    if spec.filtered:
        impls = [Impl(DLMFUSE, lambda: lambda: dlmfuse.sample_tokens(
                     logits, temperature=T, top_k=spec.top_k, top_p=spec.top_p, seed=SEED),
                     kind=DLMFUSE, graph=True),
                 Impl("dream-topk-topp", lambda: functools.partial(
                     _dream_sample, logits, T, spec.top_k, spec.top_p)),
                 floor]
        return Case(impls=impls, bytes_read=bytes_read)

    def dlmfuse_sampled(out):
        tokens, confidence = out
        return _pair(tokens.reshape(-1)[:CHECK_ROWS], confidence.reshape(-1)[:CHECK_ROWS])

    def llada_call():
        x = logits.to(torch.float64)
        return _llada_pick(x, torch.rand_like(x, dtype=torch.float64), T)

    def llada_same_noise(_out):
        rows = logits.reshape(-1, spec.V)[:CHECK_ROWS]
        uniforms = gumbel_uniforms(rows.shape[0], spec.V, SEED).to(device)
        return _pair(*_llada_pick(rows.to(torch.float64), uniforms, T))

    def torch_greedy():
        confidence, tokens = torch.softmax(logits.float(), dim=-1).max(dim=-1)
        return tokens, confidence

    impls = [Impl(DLMFUSE, lambda: lambda: dlmfuse.sample_tokens(
                 logits, temperature=T, seed=SEED, confidence="prob"),
                 to_common=dlmfuse_sampled, kind=DLMFUSE, graph=True),
             Impl("llada-fp64", lambda: llada_call, to_common=llada_same_noise),
             Impl("dlmfuse.greedy", lambda: lambda: dlmfuse.sample_tokens(logits),
                  to_common=lambda out: _pair(*out), kind=DLMFUSE, graph=True, peers=("torch-greedy",)),
             Impl("torch-greedy", lambda: torch_greedy, to_common=lambda out: _pair(*out), graph=True),
             floor]
    return Case(impls=impls, bytes_read=bytes_read)


def _dream_sample(logits: torch.Tensor, temperature: float, top_k: Optional[int],
                  top_p: Optional[float]):
    """Dream's ``sample_tokens`` (temperature > 0, no margin/entropy): (token, confidence)."""
    x = logits.float() / temperature
    if top_p is not None and top_p < 1:
        sorted_logits, sorted_indices = torch.sort(x, descending=True)
        cumulative = torch.cumsum(torch.softmax(sorted_logits, dim=-1), dim=-1)
        remove = cumulative > top_p
        remove[..., 1:] = remove[..., :-1].clone()
        remove[..., 0] = False
        mask = torch.zeros_like(x, dtype=torch.bool).scatter_(-1, sorted_indices, remove)
        x = x.masked_fill(mask, torch.finfo(x.dtype).min)
    if top_k is not None:
        kth = torch.topk(x, min(top_k, x.shape[-1]))[0][..., -1, None]
        x = x.masked_fill(x < kth, torch.finfo(x.dtype).min)
    probs = torch.softmax(x, dim=-1)
    tokens = torch.distributions.Categorical(probs=probs).sample()
    return tokens, probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
