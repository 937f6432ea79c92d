"""dlmfuse.generate: the denoising loop around a step sampler (docs/ops.md, docs/generation.md).

The loop appends ``sampler.gen_length`` mask tokens to the prompts and calls ``sampler.step``
until the sampler is done. Every network call asks the model only for the rows the step uses
(``logits_for``); ragged prompts are left padded and their pad tokens are hidden from every query
through the key labels (``Mask``), with positions counted from each row's first real token, so a
padded row computes what it would compute alone.

Cache modes (``cache=``):

- ``"none"``: exact. Every call recomputes the whole sequence: the reference semantics of each
  published sampler (LLaDA's ``generate`` token for token under greedy decoding).
- ``"prefix"`` (Fast-dLLM PrefixCache): the first call of each block runs the whole sequence and
  stores every K/V in a :class:`dlmfuse.KVCache`; later calls of the block recompute only the
  block and what follows it, attending to the cached prefix.
- ``"dual"`` (Fast-dLLM DualCache): as prefix, but later calls recompute only the current block;
  the suffix K/V come from the block's first call too. On CUDA the block's forward is captured
  once as a CUDA graph and replayed (``cuda_graphs=True``, the default): a block of 32 rows is
  too little work to hide the launches of an eager 32-layer forward, so an eager B=1 step is
  bound by the host, not the GPU.

A step that asks for a column outside the recomputed window (a mask token in the prompt, or a
column the model refilled with the mask token) refreshes the cache first. Dream, MDLM and ReMDM
treat the whole generation as one block, so only the prompt is cached. For Eso-LM variant B,
``cache="prefix"`` is Eso-LM's exact KV cache (see :mod:`dlmfuse.samplers.eso`); ReMDM's
``cache="dual"`` feeds only the columns whose tokens changed since the cache saw them and those
that need logits (see :mod:`dlmfuse.samplers.remdm`).

The cache modes need a model with dlmfuse's cache protocol (:class:`dlmfuse.nn.DenoiserLM`:
``forward(input_ids, positions, mask, cache, logits_for)`` and ``new_cache(batch, max_len)``, or
``config.num_layers``, ``num_kv_heads``, ``head_dim``).

Tensor parallelism: on a model sharded by :func:`dlmfuse.distributed.tensor_parallel` every rank
runs this loop with the same arguments; the logits stay split over the vocabulary and the
samplers pick tokens from the shards (:func:`dlmfuse.distributed.sample_tokens`), so every rank
writes the same tokens: the unsharded model's.
"""

from __future__ import annotations

import numbers
import warnings
from typing import Callable, Optional

import torch
from torch import Tensor

from .kv_cache import KVCache
from .mask import INT32_MAX, INT32_MIN, Mask
from .samplers.base import Sampler, SamplerState, _check_seed

__all__ = ["generate", "CACHE_MODES"]

_OP = "generate"
CACHE_MODES = ("none", "prefix", "dual")


@torch.no_grad()
def generate(model: Callable[..., Tensor], prompt_ids: Tensor, sampler: Sampler, *, cache: str = "none",
             seed: int = 0, attention_mask: Optional[Tensor] = None, prompt_lens: Optional[Tensor] = None,
             callback: Optional[Callable[[int, int, Tensor], None]] = None, progress: bool = False,
             cuda_graphs: bool = True) -> Tensor:
    """Generate ``sampler.gen_length`` tokens after each prompt.

    Args:
        model: ``model(input_ids, logits_for=rows) -> logits [B, n, V]`` (a
            :class:`dlmfuse.nn.DenoiserLM` or any module with that forward; ``positions=`` and
            ``mask=`` keywords are passed only for ragged prompts or samplers with their own
            attention mask, ``cache=`` only in the cache modes).
        prompt_ids: int64 ``[B, P]`` prompts, left padded when ragged.
        sampler: a :mod:`dlmfuse.samplers` policy (LLaDA, FastDLLM, Dream, MDLM, EsoLM, ReMDM).
        cache: ``"none"`` (exact), ``"prefix"`` or ``"dual"`` (see the module docstring).
        seed: Philox key of every random draw (same seed, same tokens; see dlmfuse.samplers.base).
        attention_mask: optional ``[B, P]`` (bool or 0/1 ints): 1 for real prompt tokens, 0 for
            left padding.
        prompt_lens: optional int ``[B]`` (or a list): the number of real tokens at the end of
            each row (an alternative to attention_mask).
        callback: called after every step as ``callback(step, total_steps, tokens)`` with the
            number of steps done, the sampler's step count (an upper bound for FastDLLM) and the
            current tokens ``[B, P + gen_length]`` (a live view: copy it to keep it; padding
            that holds the mask token id shows another id until generate returns).
        progress: show a tqdm bar (only when tqdm is installed; a bool).
        cuda_graphs: with ``cache="dual"`` on CUDA, run the cached block steps as one CUDA graph
            (captured at the first cached step, replayed for every block, since the block's shape
            does not change). The graph computes the logits of every block row and the step keeps
            the rows it asked for. False: eager calls (for debugging, or a model whose forward
            cannot be captured). A model sharded by :func:`dlmfuse.distributed.tensor_parallel`
            always runs eagerly.

    Returns:
        int64 ``[B, P + gen_length]``: the prompts followed by the generated tokens.

    Example::

        >>> import torch, dlmfuse
        >>> _ = torch.manual_seed(0)
        >>> model = dlmfuse.nn.DenoiserLM(vocab_size=64, hidden_size=64, num_layers=1, num_heads=1,
        ...                               num_kv_heads=1, intermediate_size=128)
        >>> sampler = dlmfuse.samplers.LLaDA(steps=8, gen_length=8, block_length=4, mask_token_id=63)
        >>> prompt = torch.randint(0, 63, (2, 5))
        >>> out = dlmfuse.generate(model, prompt, sampler)
        >>> out.shape, torch.equal(out[:, :5], prompt)
        (torch.Size([2, 13]), True)
    """
    prompt_ids = _check_prompt(prompt_ids)
    if not isinstance(sampler, Sampler):
        raise TypeError(f"{_OP}: sampler must be a dlmfuse.samplers sampler (LLaDA, FastDLLM, Dream, MDLM, EsoLM, ReMDM), "
                        f"got {type(sampler).__name__}")
    if cache not in CACHE_MODES:
        raise ValueError(f"{_OP}: cache must be one of {list(CACHE_MODES)}, got {cache!r}")
    if cache != "none" and cache not in sampler.cache_modes:
        raise ValueError(f"{_OP}: cache={cache!r} does not apply to {sampler!r} (its modes: "
                         f"{['none', *sampler.cache_modes]})")
    _check_vocab(model, prompt_ids, sampler)
    seed = _check_seed(seed)
    if callback is not None and not callable(callback):
        raise TypeError(f"{_OP}: callback must be callable, got {type(callback).__name__}")
    for name, flag in (("cuda_graphs", cuda_graphs), ("progress", progress)):
        if not isinstance(flag, bool):
            raise TypeError(f"{_OP}: {name} must be a bool, got {type(flag).__name__}")

    batch, prompt_len = prompt_ids.shape
    device = prompt_ids.device
    valid_prompt = _prompt_validity(prompt_ids, attention_mask, prompt_lens)
    if sampler.shift_logits and prompt_len > 0 and not bool(valid_prompt[:, -1].all()):
        raise ValueError(f"{_OP}: {type(sampler).__name__} predicts each token from the previous column "
                         "(shift_logits), so every row needs at least one prompt token")
    if sampler.shift_logits and prompt_len == 0:
        raise ValueError(f"{_OP}: {type(sampler).__name__} uses shift_logits and needs a prompt of length >= 1")

    gen = torch.full((batch, sampler.gen_length), sampler.mask_token_id, dtype=torch.int64, device=device)
    # Padding never changes, but a pad id equal to the mask token would make the samplers take the
    # pad columns for masked content: they hold another id while sampling (their keys are hidden
    # and their rows never requested, so which one does not matter) and get theirs back at the end.
    stand_in = 1 if sampler.mask_token_id == 0 else 0
    pads_as_mask = ~valid_prompt & (prompt_ids == sampler.mask_token_id)
    x = torch.cat([torch.where(pads_as_mask, stand_in, prompt_ids), gen], dim=1)
    valid = torch.cat([valid_prompt, torch.ones_like(gen, dtype=torch.bool)], dim=1)
    state = sampler.start(x, prompt_len, seed=seed)
    runner = _Runner(model, sampler, state, valid, prompt_len, cache, cuda_graphs=cuda_graphs)

    bar = _progress_bar(state.total_steps) if progress else None
    try:
        while not state.done:
            sampler.step(state, runner.forward)
            if callback is not None:
                callback(state.step, state.total_steps, state.x)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            if state.done:  # FastDLLM's total_steps is an upper bound: end the bar where it ended
                bar.total = state.step
                bar.refresh()
            bar.close()
    state.x[:, :prompt_len] = torch.where(pads_as_mask, prompt_ids, state.x[:, :prompt_len])
    return state.x


class _Runner:
    """Turns ``forward(rows, mask)`` requests of a sampler into model calls: padding labels,
    positions, classifier-free guidance and the KV-cache modes."""

    def __init__(self, model, sampler: Sampler, state: SamplerState, valid: Tensor, prompt_len: int, cache: str,
                 *, cuda_graphs: bool = True):
        self.model, self.sampler, self.state, self.cache_mode = model, sampler, state, cache
        # The dual cache's block steps on CUDA: one graph, captured at the first cached step (not
        # for a tensor-parallel model: capturing its collectives has not been verified).
        self.graphs = (cuda_graphs and cache == "dual" and _graphs_supported(valid.device)
                       and getattr(model, "sharding", None) is None)
        self.window_graph: Optional[_WindowGraph] = None
        batch, length = valid.shape
        self.padded = not bool(valid.all())
        device = valid.device
        if self.padded:
            # Real tokens count from 0 in each row (as alone); pads take the positions after the
            # row's last token, so every position (also a cache slot) is unique in its row.
            after_last = valid.sum(dim=1, keepdim=True) + (~valid).cumsum(dim=1) - 1
            self.positions = torch.where(valid, valid.cumsum(dim=1) - 1, after_last)
        else:
            self.positions = torch.arange(length, device=device).expand(batch, length)
        # Pad keys: order INT32_MAX (after every query) and a group no query uses.
        self.pad_k_order = torch.where(valid, 0, INT32_MAX).to(torch.int32)
        self.pad_k_group = torch.where(valid, 0, INT32_MIN).to(torch.int32)
        # The columns CFG's unconditional pass masks: LLaDA's prompt_index (x != mask_id, taken once
        # at the start), so a mask token inside the prompt, once filled, stays in that pass.
        self.prompt_cols = torch.zeros_like(valid)
        self.prompt_cols[:, :prompt_len] = valid[:, :prompt_len] & (state.x[:, :prompt_len] != sampler.mask_token_id)
        self.guided = sampler.cfg_scale > 0
        self.kv: Optional[KVCache] = None
        self.cached_block = None

    # -------------------------------------------------------------------------------- inputs
    def _ids(self) -> Tensor:
        x = self.state.x
        if not self.guided:
            return x
        unconditional = torch.where(self.prompt_cols, self.sampler.mask_token_id, x)
        return torch.cat([x, unconditional], dim=0)

    def _twice(self, t: Tensor) -> Tensor:
        return torch.cat([t, t], dim=0) if self.guided else t

    def _full_mask(self, mask: Optional[Mask]) -> Optional[Mask]:
        """The sampler's mask (or bidirectional) with the pad keys hidden; None when neither."""
        if mask is None and not self.padded:
            return None
        batch, length = self.state.x.shape
        if mask is None:
            zeros = torch.zeros((1, length), dtype=torch.int32, device=self.state.x.device)
            mask = Mask(zeros, zeros, zeros, zeros)
        if self.padded:
            k_order = torch.where(self.pad_k_order == 0, mask.k_order.expand(batch, -1), self.pad_k_order)
            k_group = torch.where(self.pad_k_group == 0, mask.k_group.expand(batch, -1), self.pad_k_group)
            mask = Mask(mask.q_order, mask.q_group, k_order, k_group)
        if self.guided:
            mask = Mask(*(self._twice(t.expand(batch, -1)) for t in (mask.q_order, mask.q_group, mask.k_order,
                                                                       mask.k_group)))
        return mask

    # ------------------------------------------------------------------------------- forward
    def forward(self, rows: Tensor, mask: Optional[Mask] = None) -> Tensor:
        """Logits ``[B, n, V]`` of ``rows`` (int64 ``[B, n]`` columns) for the current tokens."""
        if self.cache_mode == "none":
            logits = self._call(self._ids(), self._twice(rows), mask=self._full_mask(mask),
                                positions=self._twice(self.positions) if self.padded else None)
        elif self.cache_mode in self.sampler.incremental_modes:
            logits = self._incremental(rows, mask)
        else:
            logits = self._cached(rows)
        if not self.guided:
            return logits
        cond, uncond = logits.chunk(2, dim=0)
        return uncond + (self.sampler.cfg_scale + 1) * (cond - uncond)

    def _call(self, ids: Tensor, rows: Tensor, **kwargs) -> Tensor:
        kwargs = {name: value for name, value in kwargs.items() if value is not None}
        logits = self.model(ids, logits_for=rows, **kwargs)
        if not isinstance(logits, Tensor) or logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(rows.shape):
            got = list(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise ValueError(f"{_OP}: the model must return logits [B, n, V] for the n rows of logits_for "
                             f"{list(rows.shape)}, got {got} (see dlmfuse.nn.DenoiserLM's forward)")
        return logits

    def _refresh(self, ids: Tensor, rows: Tensor, mask: Optional[Mask]) -> Tensor:
        """The whole sequence through the model, every K/V stored in a fresh cache."""
        if self.kv is None:
            self.kv = _new_cache(self.model, ids.shape[0], ids.shape[1], self.cache_mode)
        self.kv.reset()
        return self._call(ids, self._twice(rows), mask=mask, positions=self._twice(self.positions), cache=self.kv)

    def _cached(self, rows: Tensor) -> Tensor:
        """Fast-dLLM prefix / dual cache over ``state.block``."""
        ids = self._ids()
        block = self.state.block
        start = block[0] - (1 if self.sampler.shift_logits else 0)
        end = block[1] if self.cache_mode == "dual" else ids.shape[1]
        # Refresh at a new block, or when a step asks for a column outside the recomputed window
        # (a masked prompt column, or one the model refilled with the mask token).
        # (One host read for the window test, not two: each is a device sync on CUDA.)
        if self.kv is None or block != self.cached_block or bool(((rows < start) | (rows >= end)).any()):
            self.cached_block = block
            return self._refresh(ids, rows, self._full_mask(None))
        window_ids, window_positions = ids[:, start:end], self._twice(self.positions[:, start:end])
        window_rows = self._twice(rows) - start
        if self.graphs and (self.window_graph is None or not self.window_graph.fits(window_ids)):
            try:
                self.window_graph = _WindowGraph(self.model, self.kv, window_ids, window_positions)
            except RuntimeError as error:  # e.g. a model whose forward syncs or allocates on the host
                warnings.warn(f"{_OP}: the dual-cache step could not be captured as a CUDA graph ({error}); "
                              "running it eagerly (pass cuda_graphs=False to skip the attempt)", RuntimeWarning,
                              stacklevel=4)
                self.graphs, self.window_graph = False, None
        if self.graphs:
            logits = self.window_graph(window_ids, window_positions)
            return torch.gather(logits, 1, window_rows[:, :, None].expand(-1, -1, logits.shape[2]))
        return self._call(window_ids, window_rows, positions=window_positions, cache=self.kv)

    def _incremental(self, rows: Tensor, mask: Optional[Mask]) -> Tensor:
        """Eso-LM B's prefix cache, ReMDM's dual cache: a full pass fills the cache, later steps
        feed only the columns the sampler names (their K/V and key labels written at those rows,
        their queries under the sampler's labels)."""
        ids, full = self._ids(), self._full_mask(mask)
        columns = self.sampler.incremental_columns(self.state)
        if self.kv is None or columns is None:
            return self._refresh(ids, rows, full)
        if full is None:
            zeros = torch.zeros((1, ids.shape[1]), dtype=torch.int32, device=ids.device)
            full = Mask(zeros, zeros, zeros, zeros)
        fed_columns = self._twice(columns)
        fed = Mask(*(labels.expand(ids.shape[0], -1).gather(1, fed_columns)
                     for labels in (full.q_order, full.q_group, full.k_order, full.k_group)))
        # Each requested row's index among the fed columns.
        within = (fed_columns[:, :, None] == self._twice(rows)[:, None, :]).to(torch.int64).argmax(dim=1)
        return self._call(ids.gather(1, fed_columns), within, mask=fed,
                          positions=self._twice(self.positions.gather(1, columns)), cache=self.kv)


class _WindowGraph:
    """``model(ids, positions=positions, cache=kv)`` of a fixed-shape window (the dual cache's
    block) as one CUDA graph, with the logits of every window row.

    Each call copies the window's ids and positions into the graph's input buffers and replays
    it; the logits it returns live in the graph's output buffer until the next call. The K/V
    cache is captured by address (refreshes write into the same tensors). The warm-up call
    before the capture (lazy cuBLAS / allocator set-up must not happen inside it) and the
    capture itself write the window's K/V for the current tokens, which is what the step's own
    call writes, so they change nothing.
    """

    def __init__(self, model, kv: KVCache, ids: Tensor, positions: Tensor):
        self.ids, self.positions = ids.clone(), positions.clone()
        caller = torch.cuda.current_stream(ids.device)
        side = torch.cuda.Stream(device=ids.device)
        side.wait_stream(caller)
        with torch.cuda.stream(side):
            model(self.ids, positions=self.positions, cache=kv)
        caller.wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = model(self.ids, positions=self.positions, cache=kv)

    def fits(self, ids: Tensor) -> bool:
        return ids.shape == self.ids.shape

    def __call__(self, ids: Tensor, positions: Tensor) -> Tensor:
        self.ids.copy_(ids)
        self.positions.copy_(positions)
        self.graph.replay()
        return self.logits


def _graphs_supported(device: torch.device) -> bool:
    return device.type == "cuda"


def _new_cache(model, batch: int, length: int, mode: str) -> KVCache:
    if callable(getattr(model, "new_cache", None)):  # DenoiserLM: its own KV heads, or its rank's share
        return model.new_cache(batch, length)
    config = getattr(model, "config", None)
    needed = ("num_layers", "num_kv_heads", "head_dim")
    if config is None or not all(hasattr(config, name) for name in needed):
        raise TypeError(f"{_OP}: cache={mode!r} needs a model with dlmfuse's KV-cache protocol "
                        f"(dlmfuse.nn.DenoiserLM: config.num_layers / num_kv_heads / head_dim and a cache= "
                        f"forward argument); got {type(model).__name__}")
    parameter = next(model.parameters())
    return KVCache(config.num_layers, batch, length, config.num_kv_heads, config.head_dim,
                   dtype=parameter.dtype, device=parameter.device)


def _progress_bar(total: int):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="dlmfuse.generate", unit="step")


# ---------------------------------------------------------------------------------- arguments
def _check_prompt(prompt_ids) -> Tensor:
    if not isinstance(prompt_ids, Tensor):
        raise TypeError(f"{_OP}: prompt_ids must be a torch.Tensor, got {type(prompt_ids).__name__}")
    if prompt_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{_OP}: prompt_ids must be int64 (or int32), got {prompt_ids.dtype}")
    if prompt_ids.dim() != 2 or prompt_ids.shape[0] == 0:
        raise ValueError(f"{_OP}: prompt_ids must have shape [B, P] with B >= 1, got {list(prompt_ids.shape)}")
    if prompt_ids.numel() and int(prompt_ids.min()) < 0:
        raise ValueError(f"{_OP}: prompt_ids must be token ids >= 0, got {int(prompt_ids.min())}")
    return prompt_ids.to(torch.int64)


def _check_vocab(model, prompt_ids: Tensor, sampler: Sampler) -> None:
    """Token ids past the model's vocabulary (config.vocab_size, where the model has one): a clear
    error here instead of an embedding IndexError, or a device-side assert on CUDA."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if not isinstance(vocab, int):
        return
    if not 0 <= sampler.mask_token_id < vocab:
        raise ValueError(f"{_OP}: the sampler's mask_token_id={sampler.mask_token_id} is outside the model's "
                         f"vocabulary [0, {vocab}); pass the model's mask_token_id= to the sampler")
    if prompt_ids.numel() and int(prompt_ids.max()) >= vocab:
        raise ValueError(f"{_OP}: prompt_ids must be token ids < vocab_size={vocab}, got {int(prompt_ids.max())}")


def _prompt_validity(prompt_ids: Tensor, attention_mask, prompt_lens) -> Tensor:
    """bool ``[B, P]``: True at the real prompt tokens (left padding before them)."""
    batch, prompt_len = prompt_ids.shape
    device = prompt_ids.device
    if attention_mask is not None and prompt_lens is not None:
        raise ValueError(f"{_OP}: give attention_mask or prompt_lens, not both")
    if attention_mask is not None:
        if not isinstance(attention_mask, Tensor):
            raise TypeError(f"{_OP}: attention_mask must be a torch.Tensor, got {type(attention_mask).__name__}")
        if attention_mask.dtype.is_floating_point or attention_mask.dtype.is_complex:
            raise TypeError(f"{_OP}: attention_mask must be bool or integer 0/1, got {attention_mask.dtype}")
        if tuple(attention_mask.shape) != (batch, prompt_len):
            raise ValueError(f"{_OP}: attention_mask must have the prompt's shape {[batch, prompt_len]}, "
                             f"got {list(attention_mask.shape)}")
        mask = attention_mask.to(device)
        if mask.dtype != torch.bool:
            if bool(((mask != 0) & (mask != 1)).any()):
                raise ValueError(f"{_OP}: attention_mask must hold 0 and 1 only, got values "
                                 f"{sorted(set(mask.unique().tolist()))}")
            mask = mask.bool()
        if prompt_len > 1 and bool((mask[:, 1:] < mask[:, :-1]).any()):
            row = int((mask[:, 1:] < mask[:, :-1]).any(dim=1).nonzero()[0])
            raise ValueError(f"{_OP}: attention_mask must be left padding (zeros, then ones) in every row; "
                             f"row {row} is {mask[row].int().tolist()}")
        return mask
    if prompt_lens is not None:
        if isinstance(prompt_lens, Tensor):
            if prompt_lens.dtype.is_floating_point or prompt_lens.dtype == torch.bool:
                raise TypeError(f"{_OP}: prompt_lens must hold integers, got {prompt_lens.dtype}")
            lens = prompt_lens.reshape(-1).tolist()
        else:
            lens = list(prompt_lens)
        if len(lens) != batch or not all(isinstance(n, numbers.Integral) and not isinstance(n, bool) for n in lens):
            raise ValueError(f"{_OP}: prompt_lens must be {batch} ints, got {lens}")
        if any(not 0 <= n <= prompt_len for n in lens):
            raise ValueError(f"{_OP}: prompt_lens must lie in [0, P={prompt_len}], got {lens}")
        lens_t = torch.tensor(lens, device=device).unsqueeze(1)
        return torch.arange(prompt_len, device=device).unsqueeze(0) >= prompt_len - lens_t
    return torch.ones((batch, prompt_len), dtype=torch.bool, device=device)
