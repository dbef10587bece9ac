"""The adapter interface and registry."""
from __future__ import annotations

import re

import torch
from torch import nn

from ..frames import FrameLayout, FrameState

_ADAPTERS: list["ModelAdapter"] = []


class ModelAdapter:
    """One model family. Subclasses set `name` and `class_names` and implement `layouts`."""

    name = "base"
    class_names: tuple[str, ...] = ()
    #: suffixes of linear names whose rows are text tokens (cross-attention k/v): no gate
    text_row_suffixes: tuple[str, ...] = ()

    def matches(self, model: nn.Module) -> bool:
        return any(cls.__name__ in self.class_names for cls in type(model).__mro__)

    def default_filter(self, name: str, module: nn.Module) -> bool:
        """Which linears quantize_ takes by default (block linears only)."""
        raise NotImplementedError

    def row_kind(self, name: str) -> str:
        return "none" if name.endswith(self.text_row_suffixes) else "video"

    def layouts(self, model: nn.Module, args: tuple, kwargs: dict) -> dict[str, FrameLayout]:
        """Frame layouts of one forward, from the top-level forward's arguments (host ints only)."""
        raise NotImplementedError

    def install(self, model: nn.Module, state: FrameState) -> None:
        """Hooks that publish the layouts before the forward and clear them after it (once per model).

        The hooks read `module._qvdit_frames` at call time (`state` is that object when quantize_ installs them),
        so a deep copy of a quantized model publishes into its own state, not the original's.
        """
        if getattr(model, "_qvdit_hooks", None):
            return
        if getattr(model, "_qvdit_frames", None) is not state:
            raise ValueError("install(model, state): state must be model._qvdit_frames")
        model._qvdit_hooks = (
            model.register_forward_pre_hook(self._publish_hook, with_kwargs=True),
            model.register_forward_hook(_clear_hook, with_kwargs=True),
        )

    def _publish_hook(self, module, args, kwargs):
        layouts = self.layouts(module, args, kwargs)
        state = module._qvdit_frames
        state.publish(layouts)
        # Build the id tensors here, outside any compiled block: inside, each QLinear only reads them, so a
        # compiled block neither traces their construction nor sees the cache change between blocks.
        device = input_tensor(args, kwargs).device
        for kind, layout in layouts.items():
            state.lookup(kind, layout.rows, device)


def _clear_hook(module, args, kwargs, output):
    module._qvdit_frames.clear()


def register_adapter(adapter: ModelAdapter) -> ModelAdapter:
    _ADAPTERS.append(adapter)
    return adapter


def find_adapter(model: nn.Module) -> ModelAdapter | None:
    for adapter in _ADAPTERS:
        if adapter.matches(model):
            return adapter
    return None


def input_tensor(args: tuple, kwargs: dict, name: str = "hidden_states", position: int = 0, ndim: int | None = None,
                 layout: str = ""):
    """The named input of a forward call, passed by keyword or positionally (at `position`), checked to be a
    tensor of `ndim` dimensions (`layout` names them in the error)."""
    x = kwargs[name] if name in kwargs else (args[position] if len(args) > position else None)
    if x is None:
        raise ValueError(f"cannot find the model input {name!r} to derive the frame layout")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"model input {name!r} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"model input {name!r} must be {layout or f'{ndim}-D'}, got shape {list(x.shape)}")
    return x


def block_linear_filter(pattern: str):
    """default_filter for adapters whose quantized linears are the nn.Linear modules whose names match `pattern`
    (a regex anchored at the start of the module name)."""
    regex = re.compile(pattern)

    def default_filter(self, name: str, module: nn.Module) -> bool:
        return isinstance(module, nn.Linear) and bool(regex.match(name))

    return default_filter
