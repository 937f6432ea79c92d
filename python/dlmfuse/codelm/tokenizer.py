"""A byte-level BPE tokenizer for Python source, readable without any tokenizer package.

Training uses the ``tokenizers`` package (:func:`train_bpe`, deterministic; ``pip install
dlmfuse[train]``); the file it writes (``tokenizer.json``) is read back here by
:class:`CodeTokenizer`, whose encoder is plain Python and gives the ids ``tokenizers`` gives
(tests/test_eval.py checks it on held-out code). So the shipped model needs no extra package.

Encoding, as ``tokenizers`` does it with the pre-tokenizer :func:`train_bpe` sets up:

1. the text is cut into chunks by :data:`CHUNK_PATTERN` (every character lands in one chunk):
   an identifier or a number with at most one leading space, a newline with the indentation that
   follows it, a run of other characters (punctuation, non-ASCII) with at most one leading space,
   a run of spaces / tabs. The pattern uses only ASCII classes, which Python's ``re`` and the
   Oniguruma engine of ``tokenizers`` read the same way;
2. each chunk's UTF-8 bytes become GPT-2's printable stand-in characters (:func:`byte_symbols`);
3. BPE merges are applied within the chunk, lowest rank first, until none applies.

The special tokens' names inside a text are encoded as plain text here (``tokenizers`` maps them
to the special ids): text never holds a mask token by accident.

Chunks never cross a newline + indentation boundary, so text cut right after an indentation
(an evaluation prompt) encodes to the prefix of the whole text's ids.
"""

from __future__ import annotations

import functools
import json
import os
import re
from typing import Dict, Iterable, List, Sequence, Tuple

__all__ = ["CodeTokenizer", "train_bpe", "CHUNK_PATTERN", "END_OF_TEXT", "MASK", "byte_symbols"]

#: Pre-tokenizer pattern (see the module docstring); shared by training and encoding.
CHUNK_PATTERN = r" ?[A-Za-z_][A-Za-z_0-9]*| ?[0-9]+|\r?\n[ \t]*| ?[^A-Za-z_0-9 \t\n]+|[ \t]+"
#: Separates files in the training stream (the model learns where a file ends).
END_OF_TEXT = "<|endoftext|>"
#: The diffusion mask token.
MASK = "<|mask|>"
SPECIAL_TOKENS = (END_OF_TEXT, MASK)


@functools.lru_cache(maxsize=1)
def byte_symbols() -> Tuple[str, ...]:
    """GPT-2's byte -> printable character table (``tokenizers``' ByteLevel alphabet): printable
    Latin-1 bytes stand for themselves, the others map to U+0100 upwards in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return tuple(table[b] for b in range(256))


class CodeTokenizer:
    """Byte-level BPE over :data:`CHUNK_PATTERN` chunks, loaded from a ``tokenizer.json`` written
    by ``tokenizers`` (:func:`train_bpe`).

    Example::

        >>> import dlmfuse
        >>> tok = dlmfuse.codelm.CodeTokenizer.from_file(dlmfuse.codelm.TINY_CODE_DIR / "tokenizer.json")
        >>> ids = tok.encode("def f(x):\\n    return x\\n")
        >>> tok.decode(ids)
        'def f(x):\\n    return x\\n'
    """

    def __init__(self, vocab: Dict[str, int], merges: Sequence[Tuple[str, str]]):
        self.vocab = dict(vocab)
        self.id_to_token = {i: t for t, i in self.vocab.items()}
        if len(self.id_to_token) != len(self.vocab):
            raise ValueError("CodeTokenizer: vocab maps two tokens to one id")
        self.ranks = {tuple(pair): rank for rank, pair in enumerate(merges)}
        missing = [name for name in SPECIAL_TOKENS if name not in self.vocab]
        if missing:
            raise ValueError(f"CodeTokenizer: vocab lacks the special tokens {missing}")
        self.special_ids = {self.vocab[name] for name in SPECIAL_TOKENS}
        self._chunks = re.compile(CHUNK_PATTERN)
        self._byte_of = {symbol: byte for byte, symbol in enumerate(byte_symbols())}
        self._cache: Dict[str, Tuple[int, ...]] = {}

    @classmethod
    def from_file(cls, path) -> "CodeTokenizer":
        """Reads a ``tokenizers`` BPE ``tokenizer.json`` (merges as "a b" strings or [a, b] pairs)."""
        with open(os.fspath(path), encoding="utf-8") as f:
            data = json.load(f)
        model = data.get("model", {})
        if model.get("type") != "BPE":
            raise ValueError(f"CodeTokenizer.from_file: {path} holds a {model.get('type')!r} model, not BPE")
        vocab = dict(model["vocab"])
        for added in data.get("added_tokens", []):
            vocab[added["content"]] = added["id"]
        merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        return cls(vocab, merges)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def mask_token_id(self) -> int:
        return self.vocab[MASK]

    @property
    def end_of_text_id(self) -> int:
        return self.vocab[END_OF_TEXT]

    def encode(self, text: str) -> List[int]:
        """Token ids of ``text`` (special token names in the text are encoded as plain text)."""
        if not isinstance(text, str):
            raise TypeError(f"CodeTokenizer.encode: text must be a str, got {type(text).__name__}")
        ids: List[int] = []
        for match in self._chunks.finditer(text):
            ids.extend(self._encode_chunk(match.group()))
        return ids

    def encode_files(self, texts: Iterable[str]) -> List[int]:
        """The ids of each text followed by END_OF_TEXT: the training and held-out streams."""
        ids: List[int] = []
        for text in texts:
            ids.extend(self.encode(text))
            ids.append(self.end_of_text_id)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """The text of ``ids``; special tokens appear as their names, bytes that are not valid
        UTF-8 (a token sequence cut inside a character) as U+FFFD."""
        out, pending = [], bytearray()
        for i in ids:
            token = self.id_to_token.get(int(i))
            if token is None:
                raise ValueError(f"CodeTokenizer.decode: id {int(i)} is outside the vocabulary "
                                 f"[0, {self.vocab_size})")
            if int(i) in self.special_ids:
                out.append(pending.decode("utf-8", errors="replace"))
                pending = bytearray()
                out.append(token)
            else:
                pending.extend(self._byte_of[symbol] for symbol in token)
        out.append(pending.decode("utf-8", errors="replace"))
        return "".join(out)

    def _encode_chunk(self, chunk: str) -> Tuple[int, ...]:
        cached = self._cache.get(chunk)
        if cached is not None:
            return cached
        symbols = byte_symbols()
        parts = [symbols[b] for b in chunk.encode("utf-8")]
        while len(parts) > 1:
            # The adjacent pair whose merge was learned first; all its occurrences merge at once.
            rank, pair = min(((self.ranks.get(p, _NO_MERGE), p) for p in zip(parts, parts[1:])))
            if rank == _NO_MERGE:
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == pair:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        ids = tuple(self.vocab[p] for p in parts)
        self._cache[chunk] = ids
        return ids


_NO_MERGE = float("inf")


def train_bpe(texts: Sequence[str], vocab_size: int):
    """A ``tokenizers.Tokenizer`` (byte-level BPE over :data:`CHUNK_PATTERN` chunks, special
    tokens END_OF_TEXT = id 0 and MASK = id 1) trained on ``texts``; deterministic for the same
    texts and ``tokenizers`` version. Needs ``pip install tokenizers`` (``dlmfuse[train]``)."""
    try:
        from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    except ImportError:
        raise ImportError("train_bpe needs the tokenizers package: pip install tokenizers "
                          "(or dlmfuse[train])") from None
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CHUNK_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer
