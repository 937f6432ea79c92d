"""The tiny code model shipped with dlmfuse: a masked-diffusion LM trained by
``scripts/train_tiny_dlm.py`` on the Python standard library (see :mod:`dlmfuse.codelm`).

Its folder (:data:`TINY_CODE_DIR`, inside the package, so it ships in the wheel) holds
``config.json`` + ``model.safetensors`` (:meth:`DenoiserLM.save_pretrained`'s Llama format, so
``DenoiserLM.from_pretrained`` reads it), ``tokenizer.json`` (:class:`CodeTokenizer`) and
``metadata.json``: the mask token id, the training settings and losses, the corpus it saw;
``unigram_counts.json``: how often each token occurs in the training stream (the baseline of
``python -m dlmfuse eval``).
"""

from __future__ import annotations

import hashlib
import json
import pathlib
from typing import TYPE_CHECKING, Any, Dict, NamedTuple, Optional

import torch

from .tokenizer import CodeTokenizer

if TYPE_CHECKING:
    from ..nn.model import DenoiserLM

__all__ = ["TINY_CODE_DIR", "METADATA_NAME", "TOKENIZER_NAME", "UNIGRAM_COUNTS_NAME", "TinyCodeModel", "tiny_code_model"]

TINY_CODE_DIR = pathlib.Path(__file__).resolve().parent.parent / "data" / "tiny_code_dlm"
METADATA_NAME = "metadata.json"
TOKENIZER_NAME = "tokenizer.json"
UNIGRAM_COUNTS_NAME = "unigram_counts.json"


class TinyCodeModel(NamedTuple):
    """What :func:`tiny_code_model` returns."""

    model: "DenoiserLM"        # eval mode
    tokenizer: CodeTokenizer   # encode(text) -> ids, decode(ids) -> text, mask_token_id
    info: Dict[str, Any]       # metadata.json (training, losses, corpus) + "unigram_counts"


def tiny_code_model(*, dtype: torch.dtype = torch.float32, device=None,
                    path: Optional[pathlib.Path] = None) -> TinyCodeModel:
    """The shipped tiny masked-diffusion code model, its tokenizer and its metadata.

    Args:
        dtype: of the parameters (stored in bfloat16; float32 by default, for CPU speed and
            accuracy).
        device: where the parameters live (default CPU).
        path: another folder written by ``scripts/train_tiny_dlm.py`` (default the shipped one).

    Example::

        >>> import torch, dlmfuse
        >>> model, tok, info = dlmfuse.nn.tiny_code_model()
        >>> prompt = torch.tensor([tok.encode("def add(a, b):\\n    ")])
        >>> sampler = dlmfuse.samplers.FastDLLM(16, 16, threshold=0.9, mask_token_id=tok.mask_token_id)
        >>> out = dlmfuse.generate(model, prompt, sampler)
        >>> text = tok.decode(out[0].tolist())        # the prompt and 16 generated tokens
    """
    folder = pathlib.Path(TINY_CODE_DIR if path is None else path)
    metadata_path = folder / METADATA_NAME
    if not metadata_path.is_file():
        raise ValueError(f"tiny_code_model: {folder} has no {METADATA_NAME} (write one with "
                         "scripts/train_tiny_dlm.py --out FOLDER)")
    info = json.loads(metadata_path.read_text())
    info["unigram_counts"] = json.loads((folder / UNIGRAM_COUNTS_NAME).read_text())
    tokenizer = CodeTokenizer.from_file(folder / TOKENIZER_NAME)
    if tokenizer.mask_token_id != info["mask_token_id"]:
        raise ValueError(f"tiny_code_model: {folder}: the tokenizer's mask id {tokenizer.mask_token_id} differs "
                         f"from metadata's {info['mask_token_id']}")
    digest = info.get("tokenizer_sha256")
    if digest is not None and hashlib.sha256((folder / TOKENIZER_NAME).read_bytes()).hexdigest() != digest:
        raise ValueError(f"tiny_code_model: {folder}: {TOKENIZER_NAME} is not the tokenizer the model was trained with")
    from ..nn.model import DenoiserLM  # here: dlmfuse.nn re-exports this loader

    model = DenoiserLM.from_pretrained(folder, dtype=dtype, device=device)
    if model.config.vocab_size != tokenizer.vocab_size:
        raise ValueError(f"tiny_code_model: {folder}: the model has {model.config.vocab_size} token rows, the "
                         f"tokenizer {tokenizer.vocab_size} tokens")
    return TinyCodeModel(model, tokenizer, info)
