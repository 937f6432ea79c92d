"""Step samplers for masked diffusion LMs: the published algorithms as small policies over
dlmfuse's ops (:func:`dlmfuse.sample_tokens`, :func:`dlmfuse.select_unmask`, :class:`dlmfuse.Mask`).

    LLaDA      semi-autoregressive blocks, linear transfer schedule, low_confidence / random
               remasking, classifier-free guidance, EOS / EoT suppression
    FastDLLM   Fast-dLLM parallel decoding: confidence threshold or factor rule; LLaDA 2.1's
               token-to-token editing of decoded tokens (edit_threshold)
    Dream      origin / maskgit_plus / topk_margin / entropy, alg_temp, shifted logits
    MDLM       ancestral sampling, log-linear schedule, no network call for empty steps
    EsoLM      Eso-LM two-phase sampling (diffusion, then sequential), variants A and B
    ReMDM      MDLM with remasking of decoded tokens: cap / rescale / conf / loop schedules

Shape arguments may be given by position (LLaDA: ``steps, gen_length, block_length``; FastDLLM:
``gen_length, block_length``; Dream, MDLM, EsoLM, ReMDM: ``steps, gen_length``); every option after them
is keyword-only, so a misplaced value raises TypeError instead of landing in another option.

Each sampler has ``start(x, gen_start, seed=...) -> SamplerState`` and ``step(state, forward)``
(see :mod:`dlmfuse.samplers.base` for the protocol and the random streams);
:func:`dlmfuse.generate` runs the loop.

Example::

    >>> import torch, dlmfuse
    >>> sampler = dlmfuse.samplers.LLaDA(steps=4, gen_length=4, block_length=4, mask_token_id=9)
    >>> x = torch.tensor([[1, 2, 9, 9, 9, 9]])
    >>> state = sampler.start(x, gen_start=2)
    >>> def forward(rows):                 # a stand-in "model": always prefers token 5
    ...     logits = torch.zeros(*rows.shape, 10)
    ...     logits[..., 5] = 1.0
    ...     return logits
    >>> while not state.done:
    ...     _ = sampler.step(state, forward)
    >>> state.x.tolist()
    [[1, 2, 5, 5, 5, 5]]
"""

from .base import Sampler, SamplerState
from .llada import LLaDA, transfer_schedule
from .fast_dllm import FastDLLM
from .dream import Dream
from .mdlm import MDLM
from .eso import EsoLM
from .remdm import ReMDM

__all__ = ["Sampler", "SamplerState", "LLaDA", "FastDLLM", "Dream", "MDLM", "EsoLM", "ReMDM", "transfer_schedule"]
