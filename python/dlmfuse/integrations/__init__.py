"""Integrations with other libraries. Each submodule imports its library only when used:
``dlmfuse.integrations.transformers.register()`` adds ``attn_implementation="dlmfuse"``."""
