"""A tiny masked-diffusion code model: the real model dlmfuse's samplers and ``python -m dlmfuse
eval`` run on (docs/evaluation.md).

    tiny_code_model()      the shipped model (DenoiserLM), its tokenizer and metadata
    CodeTokenizer          byte-level BPE for Python source (pure Python; trained with tokenizers)
    corpus                 the standard library's source files and their fixed train / held-out split
    objective              the masked-diffusion loss (t ~ U(0, 1), CE on masked tokens weighted 1/t),
                           the held-out likelihood bound and the unigram baseline

``scripts/train_tiny_dlm.py`` trains it from these pieces.
"""

from . import corpus, objective
from .pretrained import TINY_CODE_DIR, TinyCodeModel, tiny_code_model
from .tokenizer import CodeTokenizer, train_bpe

__all__ = ["tiny_code_model", "TinyCodeModel", "TINY_CODE_DIR", "CodeTokenizer", "train_bpe", "corpus",
           "objective"]
