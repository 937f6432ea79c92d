"""Integrations with other libraries. Each submodule imports its library only when used:
``dlmfuse.integrations.transformers.register()`` adds ``attn_implementation="dlmfuse"``.

The submodules are loaded on first attribute access (PEP 562), so ``import dlmfuse`` never imports
transformers, yet ``dlmfuse.integrations.transformers`` works without an explicit import.
"""

import importlib

_SUBMODULES = ("transformers",)


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_SUBMODULES))
