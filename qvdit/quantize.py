"""`quantize_(model, config, filter_fn=None)`: swap selected `nn.Linear` modules for `QLinear`, in place.

Selection: `filter_fn(module, name) -> bool` when given (torchao's convention), otherwise the model
adapter's default on a known diffusers video transformer (its block linears), otherwise every
`nn.Linear`. `config.skip` patterns are then kept in full precision. Loud: a selected module that
cannot be quantized raises with its name; nothing is skipped silently. The caller's weight tensors
are never modified (the new modules hold new packed tensors).
"""
from __future__ import annotations

import warnings

from torch import nn
from tqdm.auto import tqdm

from .config import QuantConfig
from .frames import FrameState
from .models import find_adapter
from .qlinear import QLinear


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def select_linears(model: nn.Module, config: QuantConfig, filter_fn=None, *,
                   allow_meta: bool = False) -> list[tuple[str, nn.Linear]]:
    """The (name, module) pairs quantize_ would replace, checked: raises on anything it cannot take.

    `allow_meta`: accept meta weights (the diffusers quantizer selects on the empty model before loading)."""
    adapter = find_adapter(model)
    chosen = []
    for name, module in model.named_modules():
        if not name or isinstance(module, QLinear):
            continue
        if filter_fn is not None:
            selected = bool(filter_fn(module, name))
        elif adapter is not None:
            selected = adapter.default_filter(name, module)
        else:
            selected = isinstance(module, nn.Linear)
        selected = selected or (isinstance(module, nn.Linear) and config.includes(name))
        if not selected or config.skips(name):
            continue
        if not isinstance(module, nn.Linear):
            raise TypeError(f"{name}: selected for quantization but is a {type(module).__name__}, not an nn.Linear")
        parent, _ = _parent(model, name)
        if isinstance(parent, nn.MultiheadAttention):
            raise TypeError(f"{name}: nn.MultiheadAttention reads this projection's weight directly; it cannot be swapped")
        if module.weight.is_meta and not allow_meta:
            raise ValueError(f"{name}: weight is on the meta device; load real weights before quantizing")
        if not module.weight.dtype.is_floating_point:
            raise TypeError(f"{name}: weight dtype {module.weight.dtype} is not floating point")
        chosen.append((name, module))
    return chosen


def attach_frames(model: nn.Module, qlinears: list[QLinear]) -> FrameState:
    """Share the model's FrameState with its QLinears and install the adapter's hooks (if known)."""
    state = getattr(model, "_qvdit_frames", None)
    if state is None:
        state = FrameState()
        model._qvdit_frames = state
    for q in qlinears:
        q._frames = state
    adapter = find_adapter(model)
    if adapter is not None:
        adapter.install(model, state)
    return state


def quantize_(model: nn.Module, config: QuantConfig, filter_fn=None, *, show_progress: bool | None = None) -> nn.Module:
    """Replace the selected linears of `model` by QLinear (RTN weights, TQE at init), in place; returns model."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a QuantConfig, got {type(config).__name__}")
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError("filter_fn must be callable as filter_fn(module, name) -> bool")
    if isinstance(model, nn.Linear):
        raise ValueError("quantize_ replaces submodules in place; for a bare nn.Linear use QLinear.from_linear")
    adapter = find_adapter(model)
    chosen = select_linears(model, config, filter_fn)
    if not chosen:
        raise ValueError("quantize_ selected no nn.Linear in this model (check filter_fn and config.skip)")
    if adapter is None and any(config.for_module(n).tqe for n, _ in chosen):
        warnings.warn(
            f"{type(model).__name__} has no qvdit frame adapter: TQE gates are per frame, and every token of this "
            "model will use frame 0's gate", stacklevel=2)
    new = []
    for name, module in tqdm(chosen, desc=f"quantize {config.name}", disable=show_progress is False or
                             (show_progress is None and len(chosen) < 64), leave=False):
        row_kind = adapter.row_kind(name) if adapter is not None else "video"
        q = QLinear.from_linear(module, config, name=name, row_kind=row_kind)
        parent, child = _parent(model, name)
        setattr(parent, child, q)
        new.append(q)
    attach_frames(model, new)
    model._qvdit_config = config
    return model


def qlinears(model: nn.Module) -> dict[str, QLinear]:
    """name -> QLinear of every quantized linear of `model`."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QLinear)}


def weight_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes the QLinears store, bytes the same linears would take in bf16 incl. bias)."""
    q_bytes = bf16 = 0
    for m in qlinears(model).values():
        q_bytes += m.nbytes()
        bf16 += 2 * (m.in_features * m.out_features + (m.out_features if m.bias is not None else 0))
    return q_bytes, bf16
