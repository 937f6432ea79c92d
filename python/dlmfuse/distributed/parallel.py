"""dlmfuse.distributed.tensor_parallel: Megatron-style tensor parallelism of a DenoiserLM with
torch.distributed's tensor-parallel API.

On a 1-D DeviceMesh of N ranks (the plan ``parallelize_module`` applies):

- ``embed_tokens``: RowwiseParallel, vocabulary-parallel (each rank holds V / N rows; the
  lookups of the other rows are masked and the embeddings all-reduced);
- attention ``q_proj``, ``k_proj``, ``v_proj``: ColwiseParallel (each rank computes its Hq / N
  query heads and Hkv / N KV heads, so its KV cache holds only those); ``o_proj``:
  RowwiseParallel (one all-reduce);
- MLP ``gate_proj``, ``up_proj``: ColwiseParallel; ``down_proj``: RowwiseParallel (one all-reduce);
- ``lm_head``: ColwiseParallel with a Shard(-1) output kept as a DTensor: the logits stay split
  over the vocabulary, each rank holding its V / N columns, and :func:`dlmfuse.sample_tokens`
  samples them without gathering (dlmfuse.distributed.sampling);
- norms: replicated.

GQA with fewer KV heads than ranks (N % Hkv == 0, e.g. 8 KV heads on 16 ranks) is a layout the
plan cannot express (a KV head on several ranks): each rank then keeps a copy of the one KV head
its query heads read (head ``rank // (N / Hkv)``), as plain parameters; no collective is needed.
Every parameter comes from mesh rank 0 (``distribute_tensor``'s rule; the replicated ones are
broadcast), so ranks that initialised their copies differently still agree.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from ..nn import DenoiserLM

__all__ = ["tensor_parallel", "Sharding"]

_OP = "tensor_parallel"


@dataclass(frozen=True)
class Sharding:
    """What a rank of a :func:`tensor_parallel` model holds (``model.sharding``).

    Attributes:
        mesh: the 1-D DeviceMesh; ``rank`` (in the mesh) and ``world_size`` its size.
        num_heads, num_kv_heads: query and KV heads this rank computes (its KV cache's heads).
        kv_replicas: ranks holding each KV head (1: KV heads split; > 1: replicated).
        vocab_offset, vocab_per_rank: this rank's columns of the logits (and rows of the
            embedding): ``[vocab_offset, vocab_offset + vocab_per_rank)``.
        intermediate_per_rank: this rank's MLP columns.
    """

    mesh: DeviceMesh
    rank: int
    world_size: int
    num_heads: int
    num_kv_heads: int
    kv_replicas: int
    vocab_offset: int
    vocab_per_rank: int
    intermediate_per_rank: int


def tensor_parallel(model: DenoiserLM, mesh: DeviceMesh) -> DenoiserLM:
    """Shards ``model`` in place over the 1-D ``mesh`` and returns it (see the module docstring).

    Every rank of the mesh calls this with a model of the same shape (its values are taken from
    mesh rank 0). Afterwards ``model(...)`` keeps its signature and returns the logits as a
    DTensor ``[B, L, V]`` sharded over the vocabulary (``.to_local()``: this rank's
    ``[B, L, V / N]``; ``.full_tensor()`` gathers them); ``dlmfuse.generate`` and
    ``dlmfuse.sample_tokens`` take it as it is. ``model.sharding`` (:class:`Sharding`) says what
    this rank holds; ``model.new_cache`` builds a KV cache of this rank's KV heads.

    Raises:
        TypeError: ``model`` is not a DenoiserLM or ``mesh`` not a DeviceMesh.
        ValueError: a mesh that is not 1-D, a model already sharded or on another device type,
            or heads / KV heads / vocabulary / MLP width not divisible by the mesh size (the
            message names the numbers).

    Example (every rank, e.g. under ``torchrun --nproc-per-node 2``)::

        mesh = torch.distributed.device_mesh.init_device_mesh("cuda", (2,))
        model = dlmfuse.distributed.tensor_parallel(model.to("cuda"), mesh)
        out = dlmfuse.generate(model, prompt, sampler, cache="dual", seed=0)
    """
    layout = _check(model, mesh)
    world, rank = layout.world_size, layout.rank
    plan: dict = {"embed_tokens": RowwiseParallel(input_layouts=Replicate()),
                  "lm_head": ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)}
    for i in range(len(model.layers)):
        prefix = f"layers.{i}."
        plan[prefix + "self_attn.q_proj"] = ColwiseParallel()
        if layout.kv_replicas == 1:
            plan[prefix + "self_attn.k_proj"] = ColwiseParallel()
            plan[prefix + "self_attn.v_proj"] = ColwiseParallel()
        plan[prefix + "self_attn.o_proj"] = RowwiseParallel()
        plan[prefix + "mlp.gate_proj"] = ColwiseParallel()
        plan[prefix + "mlp.up_proj"] = ColwiseParallel()
        plan[prefix + "mlp.down_proj"] = RowwiseParallel()
    tied = model.lm_head.weight is model.embed_tokens.weight
    group = mesh.get_group()
    source = dist.get_global_rank(group, 0)
    with torch.no_grad():
        # What the plan leaves replicated (norms, and KV projections when KV heads are
        # replicated) is taken from mesh rank 0 as well.
        sharded = {f"{name}.weight" for name in plan} | {f"{name}.bias" for name in plan}
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if name not in sharded:
                dist.broadcast(tensor.data, src=source, group=group)
        parallelize_module(model, mesh, plan)
        if tied:  # both are Shard(0) over the vocabulary: one parameter again
            model.lm_head.weight = model.embed_tokens.weight
        for layer in model.layers:
            attention = layer.self_attn
            if layout.kv_replicas > 1:
                _keep_kv_head(attention, rank // layout.kv_replicas)
            attention.num_heads, attention.num_kv_heads = layout.num_heads, layout.num_kv_heads
    model.sharding = layout
    return model


def _keep_kv_head(attention: nn.Module, head: int) -> None:
    """k_proj / v_proj reduced to the rows of KV head ``head`` (plain parameters)."""
    rows = slice(head * attention.head_dim, (head + 1) * attention.head_dim)
    for projection in (attention.k_proj, attention.v_proj):
        projection.weight = nn.Parameter(projection.weight[rows].clone(),
                                         requires_grad=projection.weight.requires_grad)
        if projection.bias is not None:
            projection.bias = nn.Parameter(projection.bias[rows].clone(), requires_grad=projection.bias.requires_grad)
        projection.out_features = attention.head_dim


def _check(model, mesh) -> Sharding:
    if not isinstance(model, DenoiserLM):
        raise TypeError(f"{_OP}: model must be a dlmfuse.nn.DenoiserLM, got {type(model).__name__}")
    if not isinstance(mesh, DeviceMesh):
        raise TypeError(f"{_OP}: mesh must be a torch.distributed.device_mesh.DeviceMesh, got {type(mesh).__name__}")
    if mesh.ndim != 1:
        raise ValueError(f"{_OP}: mesh must be 1-D (one tensor-parallel dimension), got shape {tuple(mesh.shape)}")
    if getattr(model, "sharding", None) is not None or any(isinstance(p, DTensor) for p in model.parameters()):
        raise ValueError(f"{_OP}: the model is already sharded")
    device_type = model.embed_tokens.weight.device.type
    if device_type != mesh.device_type:
        raise ValueError(f"{_OP}: the model is on {device_type} but the mesh on {mesh.device_type}; move the model "
                         f"first")
    c, world = model.config, mesh.size()
    for name, value in (("num_heads", c.num_heads), ("vocab_size", c.vocab_size),
                        ("intermediate_size", c.intermediate_size)):
        if value % world:
            raise ValueError(f"{_OP}: {name}={value} is not divisible by the mesh size {world}")
    if c.num_kv_heads % world and world % c.num_kv_heads:
        raise ValueError(f"{_OP}: num_kv_heads={c.num_kv_heads} must divide, or be divisible by, the mesh size "
                         f"{world} (KV heads are split, or each replicated on mesh size / num_kv_heads ranks)")
    kv_replicas = max(1, world // c.num_kv_heads)
    rank = mesh.get_local_rank()
    vocab_per_rank = c.vocab_size // world
    return Sharding(mesh=mesh, rank=rank, world_size=world, num_heads=c.num_heads // world,
                    num_kv_heads=max(1, c.num_kv_heads // world), kv_replicas=kv_replicas,
                    vocab_offset=rank * vocab_per_rank, vocab_per_rank=vocab_per_rank,
                    intermediate_per_rank=c.intermediate_size // world)
