"""End-to-end generation benchmark: workload E1 of docs/benchmarks.md.

Tokens/s of :func:`dlmfuse.generate` against a LLaDA-style reference loop on the same model, the
same prompts and the same settings, in the same run. The rows of one workload:

* ``dlmfuse``: ``generate(model, prompt, LLaDA(steps, gen, block), cache="none")``, the exact
  mode (full recompute every step, logits only for the block's masked rows);
* ``llada-loop``: :func:`llada_loop`, LLaDA's published ``generate`` loop (the peer; its
  ``max |diff|`` is the largest token id difference from the exact mode: 0 = identical);
* ``dlmfuse.prefix`` / ``dlmfuse.dual``: the same LLaDA sampler (same number of steps) with
  Fast-dLLM's prefix / dual KV cache;
* ``dlmfuse.dual+threshold``: Fast-dLLM threshold decoding (``FastDLLM(gen, block,
  threshold=THRESHOLD)``) with the dual cache: as many steps as the confidences allow.

Every dlmfuse row (the exact mode and each cache mode) is a line of the report with its ratio to
the loop (``best_peer_ratio``: the speedup, with its spread). Every row's ``stats`` (printed
below the table): ``steps`` (of the last timed call), ``tokens_per_s`` (B * gen / median
seconds), ``ms_per_step`` and ``same_tokens_vs_exact`` (the fraction of generated tokens equal to
the exact mode's; 1.0 is expected for the loop, the cache modes and threshold decoding may
differ: they are approximations, and on a random model they differ a lot).

Models (random weights, drawn on the device in the benchmark dtype; nothing large touches the
CPU): on CUDA the LLaDA-8B shape (32 layers, hidden 4096, 32 heads and kv heads, MLP 12288, vocab
126464, bf16) with prompt 512, gen 256, block 32, B in {1, 8}; on CPU a small model (4 layers,
hidden 256, 4 heads, 2 kv heads, head_dim 64, MLP 688, vocab 4096, fp32) with prompt 64, gen 64,
block 16, B in {1, 4}. ``steps = gen`` (one token per step and row for the LLaDA rows).

LM head: random LLaMA weights (std 0.02) give logits of std ~0.02 * sqrt(hidden), nearly
uniform over the vocabulary, so no token would ever reach Fast-dLLM's 0.9 threshold. The head
is redrawn with std ``LOGIT_STD / sqrt(hidden)`` (the final RMSNorm gives unit-RMS hidden
states, so every logit has std ~LOGIT_STD); every row uses the same model. Even so a random
model decides how many tokens pass the threshold per step, which is why ``steps`` is reported.

A CUDA workload whose model or reference loop would not fit in the free GPU memory is not run:
its rows record the reason (``SkippedRow``) instead.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import asdict, dataclass
from typing import Optional

import torch

import dlmfuse
from dlmfuse.nn import DenoiserLM
from dlmfuse.samplers import FastDLLM, LLaDA
from dlmfuse.samplers.llada import LLADA_MASK_TOKEN_ID

from .common import DLMFUSE, Case, Impl, Timing, Workload

FAMILY = "generate"
LOOP = "llada-loop"
PEERS = (LOOP,)
PREFIX, DUAL, DUAL_THRESHOLD = "dlmfuse.prefix", "dlmfuse.dual", "dlmfuse.dual+threshold"
ROWS = ((DLMFUSE, DLMFUSE), (LOOP, "peer"), (PREFIX, DLMFUSE), (DUAL, DLMFUSE),
        (DUAL_THRESHOLD, DLMFUSE))  # (implementation, kind), in the order they run
SEED = 0
THRESHOLD = 0.9
LOGIT_STD = 24.0  # std of every logit after the LM head is redrawn (see the module docstring)
# Warm-up/rounds per (device type, quick): one call generates a whole sequence (CPU: ~0.1-2 s;
# CUDA LLaDA-8B: seconds at B=1, up to about a minute for the reference loop at B=8). The CPU
# gets the 3 rounds a spread needs (stats.MIN_ROUNDS); a CUDA quick run's single round has no
# spread (its verdict says so; --repeats 3 buys one at three times the minutes).
TIMINGS = {("cpu", True): Timing(warmup=0, repeats=3), ("cpu", False): Timing(warmup=1, repeats=5),
           ("cuda", True): Timing(warmup=0, repeats=1), ("cuda", False): Timing(warmup=1, repeats=3)}
# float64 [B, L, V] tensors alive at once at the reference loop's peak (the upcast logits, the
# uniforms, -log of them, the noise, exp(logits) / noise, the softmax), plus the model's logits.
LOOP_FLOAT64_TENSORS = 6
GPU_HEADROOM_BYTES = 2 << 30  # activations, allocator slack and the CUDA context's growth


@dataclass(frozen=True)
class GenSpec:
    """One E1 workload: a random DenoiserLM, ``B`` prompts of ``prompt`` tokens, ``gen`` tokens
    generated in blocks of ``block`` with ``steps`` LLaDA steps."""

    id: str = "E1"
    B: int = 1
    prompt: int = 64
    gen: int = 64
    block: int = 16
    steps: int = 64
    vocab: int = 4096
    hidden: int = 256
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    mlp: int = 688
    dtype: str = "float32"
    mask_token_id: int = 4095
    threshold: float = THRESHOLD
    logit_std: float = LOGIT_STD

    @property
    def desc(self) -> str:
        steps = "" if self.steps == self.gen else f" steps={self.steps}"
        return (f"generate B={self.B} P={self.prompt} gen={self.gen} block={self.block}{steps} "
                f"{self.layers}x{self.hidden} V={self.vocab} {self.dtype}")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def parameter_count(self) -> int:
        attention = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        block = attention + 3 * self.hidden * self.mlp + 2 * self.hidden
        return 2 * self.vocab * self.hidden + self.layers * block + self.hidden


# E1 on CUDA: the LLaDA-8B shape, prompt 512, gen 256, block 32, steps = gen.
LLADA_8B = dict(vocab=126464, hidden=4096, layers=32, heads=32, kv_heads=32, mlp=12288,
                dtype="bfloat16", mask_token_id=LLADA_MASK_TOKEN_ID)
GPU_SETTINGS = dict(prompt=512, gen=256, block=32, steps=256)
GPU_BATCHES = (1, 8)
CPU_BATCHES = (1, 4)  # the small model of GenSpec's defaults


def workload(spec: GenSpec, timing: Optional[Timing] = None) -> Workload:
    """A benchmark row for ``spec`` (``timing`` None: the run's); allocated only when it runs."""
    if spec.gen % spec.block or spec.steps % (spec.gen // spec.block):
        raise ValueError(f"generate bench: gen ({spec.gen}) must be a multiple of block ({spec.block}) "
                         f"and steps ({spec.steps}) of the number of blocks")
    if not 0 <= spec.mask_token_id < spec.vocab:
        raise ValueError(f"generate bench: mask_token_id must lie in [0, vocab={spec.vocab}), "
                         f"got {spec.mask_token_id}")
    return Workload(id=spec.id, desc=spec.desc, family=FAMILY, params=asdict(spec),
                    setup=functools.partial(_setup, spec), timing=timing)


def batches(device: torch.device) -> tuple:
    """E1's batch sizes: DLMFUSE_E1_BATCHES (e.g. "8", "1,8") when set, so that a device run can
    spend its minutes on one row, else B = 1, 8 on CUDA and 1, 4 on CPU."""
    override = os.environ.get("DLMFUSE_E1_BATCHES", "")
    if not override:
        return GPU_BATCHES if device.type == "cuda" else CPU_BATCHES
    parts = [part.strip() for part in override.split(",")]
    if not all(part.isdigit() and int(part) > 0 for part in parts):
        raise ValueError(f"generate bench: DLMFUSE_E1_BATCHES must be positive integers separated by "
                         f"commas, got {override!r}")
    return tuple(int(part) for part in parts)


def workloads(device: torch.device, quick: bool) -> list[Workload]:
    """E1 at the LLaDA-8B shape on CUDA (B = 1, 8), the small model on CPU (B = 1, 4); quick
    only lowers the repeats (each call is a whole generation)."""
    timing = TIMINGS[("cuda" if device.type == "cuda" else "cpu", quick)]
    shape = dict(**GPU_SETTINGS, **LLADA_8B) if device.type == "cuda" else {}  # CPU: GenSpec's defaults
    return [workload(GenSpec(B=b, **shape), timing) for b in batches(device)]


# ------------------------------------------------------------------------------ reference loop

def _num_transfer_tokens(mask_index: torch.Tensor, steps: int) -> torch.Tensor:
    """LLaDA's ``get_num_transfer_tokens``: int64 ``[B, steps]``, M // steps plus one in the
    first M % steps steps (M = masked columns of the block, per row)."""
    mask_num = mask_index.sum(dim=1, keepdim=True)
    base = mask_num // steps
    remainder = mask_num % steps
    num_transfer_tokens = torch.zeros(mask_num.size(0), steps, device=mask_index.device,
                                      dtype=torch.int64) + base
    for i in range(mask_num.size(0)):
        num_transfer_tokens[i, :remainder[i]] += 1
    return num_transfer_tokens


@torch.no_grad()
def llada_loop(model, prompt: torch.Tensor, *, steps: int, gen_length: int, block_length: int,
               mask_id: int, temperature: float = 0.0,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """LLaDA's published ``generate`` loop (github.com/ML-GSAI/LLaDA, low-confidence remasking,
    no CFG), written independently of :func:`dlmfuse.generate`: int64 ``[B, P + gen_length]``.

    Every step runs the whole sequence through ``model(x)`` and takes logits for every position,
    casts them to float64 for Gumbel-max (``argmax(exp(l) / (-log u) ** T)``, u uniform float64),
    takes the confidence from a float64 softmax, and picks each row's ``k_i`` most confident
    masked columns before the block's end with ``torch.topk`` in a Python loop (``k_i`` from the
    linear schedule of the semi-autoregressive block). The float64 Gumbel path runs at every
    temperature, as in the E1 anchor (LLaDA's code skips it at T = 0); at T = 0 the noise is
    exactly 1, so the tokens are greedy.
    """
    batch, prompt_len = prompt.shape
    x = torch.full((batch, prompt_len + gen_length), mask_id, dtype=torch.long, device=prompt.device)
    x[:, :prompt_len] = prompt.clone()
    num_blocks = gen_length // block_length
    steps = steps // num_blocks
    for num_block in range(num_blocks):
        end = prompt_len + (num_block + 1) * block_length
        block_mask_index = x[:, end - block_length:end] == mask_id
        num_transfer_tokens = _num_transfer_tokens(block_mask_index, steps)
        for i in range(steps):
            mask_index = x == mask_id
            logits = model(x).to(torch.float64)
            noise = torch.rand(logits.shape, dtype=torch.float64, device=logits.device,
                               generator=generator)
            gumbel_noise = (-torch.log(noise)) ** temperature
            x0 = torch.argmax(logits.exp() / gumbel_noise, dim=-1)
            p = torch.softmax(logits, dim=-1)
            x0_p = torch.squeeze(torch.gather(p, dim=-1, index=torch.unsqueeze(x0, -1)), -1)
            x0_p[:, end:] = -math.inf
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, -math.inf)
            transfer_index = torch.zeros_like(x0, dtype=torch.bool)
            for j in range(confidence.shape[0]):
                _, select_index = torch.topk(confidence[j], k=int(num_transfer_tokens[j, i]))
                transfer_index[j, select_index] = True
            x[transfer_index] = x0[transfer_index]
    return x


# ----------------------------------------------------------------------------------- workload

class SkippedRow(RuntimeError):
    """A row that is not run (e.g. it would not fit in GPU memory); the message says why."""


def build_model(spec: GenSpec, device: torch.device) -> DenoiserLM:
    """The random DenoiserLM of ``spec``, drawn directly on ``device`` in ``spec.dtype`` (seeded,
    the global RNG untouched), LM head redrawn with std ``logit_std / sqrt(hidden)``."""
    dtype = getattr(torch, spec.dtype)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
        torch.manual_seed(SEED)
        model = DenoiserLM(spec.vocab, spec.hidden, spec.layers, spec.heads, spec.kv_heads, spec.mlp,
                           dtype=dtype, device=device)
        model.lm_head.weight.normal_(0.0, spec.logit_std / math.sqrt(spec.hidden))
    return model.eval().requires_grad_(False)


def random_prompt(spec: GenSpec, device: torch.device) -> torch.Tensor:
    """E1's prompts: ``[B, prompt]`` token ids below the mask token, seeded."""
    return torch.randint(0, spec.mask_token_id, (spec.B, spec.prompt),
                         generator=torch.Generator().manual_seed(SEED)).to(device)


@torch.no_grad()
def first_block_logits(model, spec: GenSpec, prompt: torch.Tensor) -> tuple:
    """The first step's logits of the first block, ``[B, block, vocab]`` twice: from the full
    forward (the reference loop: every row, then the block's) and from ``logits_for`` (exact mode:
    the last layer runs the block's query rows only; every earlier layer runs the same shapes).
    Where they differ, exact mode's tokens can part from the loop's (bf16 rounding)."""
    x = torch.full((spec.B, spec.prompt + spec.gen), spec.mask_token_id, dtype=torch.long, device=prompt.device)
    x[:, :spec.prompt] = prompt
    rows = torch.arange(spec.prompt, spec.prompt + spec.block, device=x.device).expand(spec.B, -1)
    return model(x)[:, spec.prompt:spec.prompt + spec.block], model(x, logits_for=rows)


def loop_peak_bytes(spec: GenSpec) -> int:
    """GPU memory the reference loop's logits and float64 sampling take at their peak."""
    dtype = getattr(torch, spec.dtype)
    elements = spec.B * (spec.prompt + spec.gen) * spec.vocab
    return elements * (dtype.itemsize + LOOP_FLOAT64_TENSORS * torch.float64.itemsize)


def memory_refusal(need_bytes: int, free_bytes: int, what: str) -> Optional[str]:
    """None when ``need_bytes`` (plus headroom) fits in ``free_bytes``, else the reason."""
    if need_bytes + GPU_HEADROOM_BYTES <= free_bytes:
        return None
    return (f"skipped: {what} needs ~{need_bytes / 2**30:.1f} GiB of GPU memory (+ "
            f"{GPU_HEADROOM_BYTES / 2**30:.0f} GiB headroom), {free_bytes / 2**30:.1f} GiB free")


def _free_gpu_bytes(device: torch.device) -> int:
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def _refusing(reason: str):
    def prepare():
        raise SkippedRow(reason)
    return prepare


def _setup(spec: GenSpec, device: torch.device) -> Case:
    """Build the model and prompts of ``spec`` on ``device`` and list the implementations."""
    if device.type == "cuda":
        model_bytes = spec.parameter_count() * getattr(torch, spec.dtype).itemsize
        reason = memory_refusal(model_bytes, _free_gpu_bytes(device), f"the {spec.dtype} model")
        if reason is not None:
            return Case(impls=[Impl(name, _refusing(reason), kind=kind) for name, kind in ROWS])
    model = build_model(spec, device)
    prompt = random_prompt(spec, device)
    mask = spec.mask_token_id
    outputs: dict[str, torch.Tensor] = {}  # the last output of every implementation
    steps: dict[str, int] = {}             # the steps of that call

    def run_generate(name: str, sampler, cache: str):
        def callback(step, _total, _tokens):
            steps[name] = step

        def call():
            outputs[name] = dlmfuse.generate(model, prompt, sampler, cache=cache, seed=SEED,
                                             callback=callback)
            return outputs[name]
        return lambda: call

    def run_loop():
        if device.type == "cuda":
            reason = memory_refusal(loop_peak_bytes(spec), _free_gpu_bytes(device),
                                    "the reference loop's float64 sampling")
            if reason is not None:
                raise SkippedRow(reason)
        generator = torch.Generator(device=device).manual_seed(SEED)
        steps[LOOP] = spec.steps

        def call():
            outputs[LOOP] = llada_loop(model, prompt, steps=spec.steps, gen_length=spec.gen,
                                       block_length=spec.block, mask_id=mask, generator=generator)
            return outputs[LOOP]
        return call

    def llada():
        return LLaDA(spec.steps, spec.gen, spec.block, mask_token_id=mask)

    def generated(out: torch.Tensor) -> torch.Tensor:
        return out[:, spec.prompt:]

    def first_step_probe() -> dict:
        """Where exact mode's tokens can part from the loop's (first_block_logits)."""
        every_row, only_rows = (logits.float() for logits in first_block_logits(model, spec, prompt))
        return {"first_step_logits_max_diff": (every_row - only_rows).abs().max().item(),
                "first_step_argmax_agree": (every_row.argmax(-1) == only_rows.argmax(-1)).double().mean().item()}

    def stats(seconds: dict) -> dict:
        tokens = spec.B * spec.gen
        exact = outputs.get(DLMFUSE)
        result = {}
        for name, s in seconds.items():
            row = {"steps": steps[name], "tokens_per_s": tokens / s,
                   "ms_per_step": s * 1e3 / steps[name]}
            if name != DLMFUSE and exact is not None:
                same = generated(outputs[name]) == generated(exact)
                row["same_tokens_vs_exact"] = same.double().mean().item()
            if name == DLMFUSE and LOOP in seconds:
                row.update(first_step_probe())
            result[name] = row
        return result

    threshold = FastDLLM(spec.gen, spec.block, threshold=spec.threshold, mask_token_id=mask)
    prepares = {DLMFUSE: run_generate(DLMFUSE, llada(), "none"), LOOP: run_loop,
                PREFIX: run_generate(PREFIX, llada(), "prefix"), DUAL: run_generate(DUAL, llada(), "dual"),
                DUAL_THRESHOLD: run_generate(DUAL_THRESHOLD, threshold, "dual")}
    # Tokens are compared with the exact mode's by the harness for the loop only (max |diff|);
    # the cache modes' agreement is a stat (they are approximations).
    impls = [Impl(name, prepares[name], to_common=generated if name in (DLMFUSE, LOOP) else None, kind=kind)
             for name, kind in ROWS]
    return Case(impls=impls, stats=stats)
