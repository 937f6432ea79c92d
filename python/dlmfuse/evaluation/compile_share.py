"""When a completion counts as code: the quality measure of ``python -m dlmfuse eval``.

A prompt is the beginning of a held-out function (see :mod:`.prompts`); the model writes a
fixed number of tokens after it. The completion is first cut at its first END_OF_TEXT token
(what follows belongs to another file). It is **accepted** when, for at least one of

1. the whole completion,
2. its complete lines: the completion up to and including its last newline,

the text holds code (a token other than comments, newlines and indentation: a completion of
comments or blank lines after a prompt that already compiles would pass for free) and
``compile(prompt + text, "<completion>", "exec")`` succeeds (Python's own parser: syntax,
indentation, ``return`` outside a function, ...). A fixed-length completion usually ends inside a
line, hence 2; a completion that stops at a clean point without a newline is taken whole, hence 1.
Nothing else is tried: a completion whose last complete line opens a block (``if x:``) with no body
after it is rejected. The **compile share** of a run is the fraction of its completions accepted.
"""

from __future__ import annotations

import io
import tokenize
import warnings
from typing import Sequence

from ..codelm.tokenizer import END_OF_TEXT

__all__ = ["compiles", "has_code", "complete_lines", "accepted", "compile_share"]

# What compile() raises for source it refuses (null bytes: ValueError; deep nesting: RecursionError
# or MemoryError; huge literals: OverflowError).
_REFUSALS = (SyntaxError, ValueError, OverflowError, RecursionError, MemoryError)


def compiles(source: str) -> bool:
    """``compile(source, "<completion>", "exec")`` succeeds (warnings silenced, no inherited
    future flags)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            compile(source, "<completion>", "exec", dont_inherit=True)
        except _REFUSALS:
            return False
    return True


_NOT_CODE = frozenset({tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                       tokenize.ENDMARKER})


def has_code(text: str) -> bool:
    """``text`` holds a token other than comments, newlines and indentation (text that does not
    tokenize, an unclosed string say, counts as code: compile() judges it)."""
    try:
        return any(t.type not in _NOT_CODE for t in tokenize.generate_tokens(io.StringIO(text).readline))
    except (tokenize.TokenError, SyntaxError):
        return True


def complete_lines(text: str) -> str:
    """``text`` up to and including its last newline ("" when it has none)."""
    return text[:text.rfind("\n") + 1]


def accepted(prompt: str, completion: str) -> bool:
    """The acceptance rule of the module docstring."""
    completion = completion.split(END_OF_TEXT, 1)[0]
    return any(has_code(text) and compiles(prompt + text) for text in (completion, complete_lines(completion)))


def compile_share(prompts: Sequence[str], completions: Sequence[str]) -> float:
    """The fraction of (prompt, completion) pairs accepted."""
    if len(prompts) != len(completions) or not prompts:
        raise ValueError(f"compile_share: need as many completions as prompts (at least one), got "
                         f"{len(completions)} and {len(prompts)}")
    return sum(accepted(p, c) for p, c in zip(prompts, completions)) / len(prompts)
