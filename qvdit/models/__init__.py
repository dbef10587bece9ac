"""Model adapters: per diffusers family, which linears `quantize_` takes by default, which rows each
linear sees (its row kind, see `qvdit.frames`), and a forward pre-hook that publishes the frame layout
of every forward. `find_adapter(model)` picks the adapter by class name (diffusers is never imported
here, so `import qvdit` stays light).
"""
from __future__ import annotations

from .base import ModelAdapter, find_adapter, register_adapter
from . import cogvideox, latte, wan  # noqa: F401  (each registers its adapter)

__all__ = ["ModelAdapter", "find_adapter", "register_adapter"]
