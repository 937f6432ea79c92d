"""Completion prompts: the first lines of functions in held-out files.

For each function (``def`` or ``async def``, nested ones and methods included) with at least two
body statements, the second one starting on a later line than the first one ends:

- the **prompt** is the source from the ``def`` line (decorators left out) up to the second body
  statement, ending with that statement's indentation: the signature, the first statement (often
  the docstring) and any comments or blank lines after it;
- the **reference** continuation is the rest of the function.

Both are dedented by the ``def`` line's indentation, so that a method compiles on its own;
functions that do not compile so (a nested function's ``nonlocal``) are skipped. The
prompt ends right after a newline and its indentation, where the tokenizer always cuts a chunk,
so its ids are a prefix of the whole function's ids and the model continues it as it would in a
file. Prompts longer than ``max_prompt_tokens`` are skipped. Functions are taken round-robin over
the files (every file's first function, then every file's second, ...) until ``count``, files
and functions in their given and source order: the same prompts for the same files.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from typing import List, Sequence, Tuple

from .compile_share import compiles

__all__ = ["Prompt", "function_prompts"]


@dataclass(frozen=True)
class Prompt:
    source: str                 # "path:line name"
    text: str                   # the prompt, dedented
    ids: Tuple[int, ...]
    reference: str              # the rest of the function, dedented


def _dedent(lines: Sequence[str], indent: str) -> str:
    """Remove ``indent`` from the start of every line that has it (continuation lines of a string
    indented less stay as they are)."""
    return "".join(line[len(indent):] if line.startswith(indent) else line for line in lines)


_LINE = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+$")


def _candidates(path: str, text: str) -> List[Tuple[str, str, str]]:
    """(source, prompt text, reference text) of every qualifying function of one file."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return []
    lines = _LINE.findall(text)  # the line breaks ast counts (str.splitlines also breaks at \x0c, ...)
    found = []
    functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    for node in sorted(functions, key=lambda n: n.lineno):
        if len(node.body) < 2 or node.body[1].lineno <= node.body[0].end_lineno:
            continue
        second = node.body[1]
        second_line = min([second.lineno] + [d.lineno for d in getattr(second, "decorator_list", [])])
        indent = lines[node.lineno - 1][:node.col_offset]
        start_line = lines[second_line - 1]
        statement_indent = start_line[:len(start_line) - len(start_line.lstrip(" \t"))]
        if indent.strip() or len(statement_indent) <= len(indent):
            continue
        prompt_lines = lines[node.lineno - 1:second_line - 1] + [statement_indent]
        rest = [start_line[len(statement_indent):]] + lines[second_line:node.end_lineno]
        prompt, reference = _dedent(prompt_lines, indent), _dedent(rest, indent)
        if compiles(prompt + reference):
            found.append((f"{path}:{node.lineno} {node.name}", prompt, reference))
    return found


def function_prompts(texts: Sequence[Tuple[str, str]], tokenizer, count: int,
                     max_prompt_tokens: int = 96) -> List[Prompt]:
    """Up to ``count`` prompts from ``texts`` ((path, source) pairs), as the module docstring
    describes; ``tokenizer`` has ``encode(text) -> ids``."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"function_prompts: count must be a positive int, got {count!r}")
    per_file = [_candidates(path, text) for path, text in texts]
    prompts: List[Prompt] = []
    depth = 0
    while len(prompts) < count and any(depth < len(c) for c in per_file):
        for candidates in per_file:
            if depth >= len(candidates) or len(prompts) == count:
                continue
            source, text, reference = candidates[depth]
            ids = tokenizer.encode(text)
            if len(ids) <= max_prompt_tokens:
                prompts.append(Prompt(source, text, tuple(ids), reference))
        depth += 1
    return prompts
