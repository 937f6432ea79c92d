"""The corpus of the tiny code model: the Python standard library's own source files, which every
machine with Python has offline.

Files: every ``*.py`` under ``sysconfig.get_paths()["stdlib"]``, in sorted order of their
relative paths, except the test suites, ``site-packages``, the generated codec tables
(``encodings``), the pydoc topic dump (``pydoc_data``) and the build's ``_sysconfigdata*`` module;
files that are not valid UTF-8 are dropped. The split into training and held-out files depends
only on each file's relative path (:func:`is_held_out`), so a file is on the same side for every
Python version that has it; which files exist, and their text, do vary with the Python version
(the model's metadata records the version and a digest of the files it was trained on).
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from typing import List, Optional, Sequence, Tuple

import torch

__all__ = ["stdlib_root", "stdlib_files", "is_held_out", "split_files", "read_texts", "files_digest",
           "evenly_spaced_windows", "HELD_OUT_EVERY"]

#: Directories left out: test suites, installed packages, generated tables and dumps.
EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "encodings",
                           "pydoc_data", "__pycache__", "lib-dynload"})
EXCLUDED_PREFIXES = ("_sysconfigdata",)
#: About one file in HELD_OUT_EVERY is held out (by a hash of its path).
HELD_OUT_EVERY = 20


def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def stdlib_files(root: Optional[str] = None) -> List[str]:
    """Relative paths (``/``-separated) of the corpus files under ``root`` (default: this Python's
    standard library), sorted."""
    root = stdlib_root() if root is None else root
    if not os.path.isdir(root):
        raise ValueError(f"stdlib_files: root {root!r} is not a directory")
    found = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in EXCLUDED_DIRS and not d.startswith("config-")]
        for name in names:
            if name.endswith(".py") and not name.startswith(EXCLUDED_PREFIXES):
                found.append(os.path.relpath(os.path.join(folder, name), root).replace(os.sep, "/"))
    return sorted(found)


def is_held_out(relative_path: str) -> bool:
    """True for about 1 in HELD_OUT_EVERY paths: the first 8 hex digits of the path's SHA-256,
    as an integer, are divisible by HELD_OUT_EVERY."""
    return int(hashlib.sha256(relative_path.encode("utf-8")).hexdigest()[:8], 16) % HELD_OUT_EVERY == 0


def split_files(files: Sequence[str]) -> Tuple[List[str], List[str]]:
    """(training files, held-out files), each in the order given."""
    return [f for f in files if not is_held_out(f)], [f for f in files if is_held_out(f)]


def read_texts(files: Sequence[str], root: Optional[str] = None) -> List[Tuple[str, str]]:
    """(path, text) of each file that decodes as UTF-8, in the order given."""
    root = stdlib_root() if root is None else root
    texts = []
    for name in files:
        with open(os.path.join(root, name), "rb") as f:
            data = f.read()
        try:
            texts.append((name, data.decode("utf-8")))
        except UnicodeDecodeError:
            continue
    return texts


def files_digest(texts: Sequence[Tuple[str, str]]) -> str:
    """SHA-256 over the paths and texts: two corpora with the same digest are the same."""
    digest = hashlib.sha256()
    for name, text in texts:
        digest.update(name.encode("utf-8") + b"\0" + text.encode("utf-8") + b"\0")
    return digest.hexdigest()


def evenly_spaced_windows(ids: torch.Tensor, length: int, count: int) -> torch.Tensor:
    """int64 ``[count, length]``: windows of ``ids`` (a 1-D token stream) starting at ``count``
    evenly spaced offsets from the first token to the last full window."""
    ids = torch.as_tensor(ids, dtype=torch.int64).reshape(-1)
    if ids.numel() < length:
        raise ValueError(f"evenly_spaced_windows: the stream has {ids.numel()} tokens, fewer than length={length}")
    if count < 1:
        raise ValueError(f"evenly_spaced_windows: count must be >= 1, got {count}")
    last = ids.numel() - length
    starts = [(i * last) // max(count - 1, 1) for i in range(count)]
    return torch.stack([ids[s:s + length] for s in starts])
