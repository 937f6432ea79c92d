"""Tensor parallelism: a DenoiserLM sharded over N ranks generates the unsharded model's tokens.

    torchrun --nproc-per-node 2 examples/tensor_parallel.py   # N GPUs (NCCL) or N CPU processes (gloo)
    python examples/tensor_parallel.py                        # 2 local CPU ranks started by the script

Every rank builds the same model, shards it with dlmfuse.distributed.tensor_parallel (heads, MLP
and vocabulary split across ranks), and runs the same generate call: the logits stay split over
the vocabulary, each rank samples its slice, and one small all-gather per step gives every rank
the same tokens. The script checks them against the unsharded model (fp32; in bf16 the split
sums round differently, and a near-tie may flip a token).
"""

import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

import dlmfuse

MASK_ID = 1023


def main() -> str:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if not dist.is_initialized():  # under torchrun; python examples/... starts its ranks initialised
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    torch.manual_seed(0)  # the same model on every rank (tensor_parallel takes mesh rank 0's weights anyway)
    model = dlmfuse.nn.DenoiserLM(vocab_size=1024, hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=2,
                                  intermediate_size=512, init_std=0.3).to(device)
    prompt = torch.randint(0, MASK_ID, (2, 12), device=device)
    sampler = dlmfuse.samplers.FastDLLM(gen_length=32, block_length=8, threshold=0.5, temperature=1.0,
                                        mask_token_id=MASK_ID)
    unsharded = dlmfuse.generate(model, prompt, sampler, cache="dual", seed=0)

    mesh = init_device_mesh(device, (dist.get_world_size(),))
    dlmfuse.distributed.tensor_parallel(model, mesh)
    tokens = dlmfuse.generate(model, prompt, sampler, cache="dual", seed=0)
    assert torch.equal(tokens, unsharded), "the sharded model generated other tokens"
    shard = model.sharding
    return (f"rank {shard.rank}/{shard.world_size}: {shard.num_heads} query heads, {shard.num_kv_heads} KV head(s), "
            f"vocabulary [{shard.vocab_offset}, {shard.vocab_offset + shard.vocab_per_rank}); "
            f"tokens equal the unsharded model's")


if __name__ == "__main__":
    if "RANK" in os.environ:  # started by torchrun
        print(main())
        dist.destroy_process_group()
    else:
        for line in dlmfuse.distributed.run_local(main, 2):
            print(line)
