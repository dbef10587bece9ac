"""The adapter interface and registry."""
from __future__ import annotations

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
        """Hooks that publish the layouts before the forward and clear them after it (once per model)."""
        if getattr(model, "_qvdit_hooks", None):
            return

        def pre_hook(module, args, kwargs):
            state.publish(self.layouts(module, args, kwargs))

        def post_hook(module, args, kwargs, output):
            state.clear()

        model._qvdit_hooks = (
            model.register_forward_pre_hook(pre_hook, with_kwargs=True),
            model.register_forward_hook(post_hook, with_kwargs=True),
        )


def register_adapter(adapter: ModelAdapter) -> ModelAdapter:
    _ADAPTERS.append(adapter)
    return adapter


def find_adapter(model: nn.Module) -> ModelAdapter | None:
    for adapter in _ADAPTERS:
        if adapter.matches(model):
            return adapter
    return None


def input_tensor(args: tuple, kwargs: dict, name: str = "hidden_states"):
    """The named input of a forward call, passed by keyword or as the first positional argument."""
    x = kwargs.get(name, args[0] if args else None)
    if x is None:
        raise ValueError(f"cannot find the model input {name!r} to derive the frame layout")
    return x
