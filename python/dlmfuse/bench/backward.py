"""Training benchmarks: attention forward + backward under BD3-LM's training mask on
``[x_t ; x_0]`` (C2 on CPU, A5 on CUDA), against SDPA with the dense boolean mask and FlexAttention
(compiled; it has no CPU backward, so on CPU that row records the reason), in the same run.

dlmfuse's time is the forward plus the gradients of q, k and v for a fixed upstream gradient;
FLOPs count 3.5x the forward's (the backward's five matrix products against the forward's two).
"""

from __future__ import annotations

import dataclasses

import torch

from .attention import PEERS, AttnSpec, workload as attention_workload
from .common import Workload

FAMILY = "backward"
__all__ = ["FAMILY", "PEERS", "workloads"]


def workloads(device: torch.device, quick: bool) -> list[Workload]:
    """C2 (CPU: L=512, 2L=1024, block 16, H=8, D=64, fp32) or A5 (CUDA: L=1024, LLaDA's H=32,
    D=128, bf16), forward + backward, and the same forward alone (the backward's cost is their
    difference); ``quick`` changes nothing."""
    if device.type == "cuda":
        spec = AttnSpec("A5", "bd3_train", L=1024, block=16, train=True, H=32, D=128, dtype="bfloat16")
    else:
        spec = AttnSpec("C2", "bd3_train", L=512, block=16, train=True)
    return [dataclasses.replace(attention_workload(s), family=FAMILY)
            for s in (spec, dataclasses.replace(spec, train=False))]
