"""Frame ids of token rows (SPEC 2.3): published once per forward, read by every QLinear of a model.

A model adapter (`qvdit.models`) derives the latent grid (F', H'W', text length) from the top-level
forward's input and calls `FrameState.publish` before the blocks run. Each QLinear asks the state for
the ids of its row kind; the id tensor is built once per forward per (kind, device) and shared by all
layers, so there is no per-layer host work beyond a dict lookup, and never a device sync: validation
happens at publish time, on the host integers the ids are built from.

Row kinds (which rows a linear sees):
- "video": the model's token sequence, rows ordered (batch, [text], frame, token-in-frame);
- other names (e.g. Latte's "spatial"/"temporal"): whatever layout the adapter publishes for them;
- "none": rows that are not video tokens (cross-attention k/v over text): no gate.

Ids: frame f of the F' published frames gets id f; text tokens get id F' (the last gate entry).
A layer's gate holds G calibrated frames + 1 text entry; `resample_gate` maps it to F' + 1 entries
(linear interpolation over normalised time) when F' != G.

The state lives on the model instance (`model._qvdit_frames`), so two models in one process never
see each other's ids.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

TEXT_POSITIONS = ("none", "prefix", "suffix")
ORDERS = ("frame_major", "frame_minor")


def _positive_int(name, value, allow_zero=False):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < (0 if allow_zero else 1):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '>= 1'}, got {value}")


@dataclass(frozen=True)
class FrameLayout:
    """How the rows of a linear's input map to latent frames, for one forward.

    num_frames: F' latent frames (after temporal patching).
    tokens_per_frame: S = H' * W' tokens per frame.
    batch: samples in the batch (rows repeat per sample).
    text_len: T text tokens per sample joined to the video tokens (CogVideoX: prefix; Hunyuan: suffix).
    text_position: "none", "prefix" or "suffix".
    order: "frame_major": rows (b, f, s) (Wan, CogVideoX, Latte spatial blocks (B*F, S));
           "frame_minor": rows (b, s, f) (Latte temporal blocks (B*S, F)).
    """

    num_frames: int
    tokens_per_frame: int
    batch: int = 1
    text_len: int = 0
    text_position: str = "none"
    order: str = "frame_major"

    def __post_init__(self):
        _positive_int("num_frames", self.num_frames)
        _positive_int("tokens_per_frame", self.tokens_per_frame)
        _positive_int("batch", self.batch)
        _positive_int("text_len", self.text_len, allow_zero=True)
        if self.text_position not in TEXT_POSITIONS:
            raise ValueError(f"text_position must be one of {TEXT_POSITIONS}, got {self.text_position!r}")
        if self.order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {self.order!r}")
        if (self.text_len > 0) != (self.text_position != "none"):
            raise ValueError("text_len > 0 needs text_position 'prefix' or 'suffix' (and 'none' needs text_len 0)")
        if self.text_len and self.order != "frame_major":
            raise ValueError("text tokens are only supported with order='frame_major'")

    @property
    def seq_len(self) -> int:
        return self.num_frames * self.tokens_per_frame + self.text_len

    @property
    def rows(self) -> int:
        return self.batch * self.seq_len

    def frame_ids(self, device=None) -> torch.Tensor:
        """int32 [rows]: the frame id of every row (text rows: num_frames)."""
        f, s, t = self.num_frames, self.tokens_per_frame, self.text_len
        pos = torch.arange(self.seq_len, device=device)
        if self.order == "frame_minor":
            ids = pos % f
        elif self.text_position == "prefix":
            ids = torch.where(pos < t, torch.full_like(pos, f), (pos - t).clamp(min=0) // s)
        else:  # suffix or none: video tokens first
            ids = torch.where(pos < f * s, pos // s, torch.full_like(pos, f))
        return ids.to(torch.int32).repeat(self.batch)


class FrameState:
    """Per-model publication of frame layouts for the forward in flight."""

    def __init__(self):
        self._layouts: dict[str, FrameLayout] = {}
        self._ids: dict[tuple[str, torch.device], torch.Tensor] = {}

    @property
    def active(self) -> bool:
        return bool(self._layouts)

    def publish(self, layouts: dict[str, FrameLayout]) -> None:
        """Make `layouts` (row kind -> FrameLayout) current; replaces any earlier publication."""
        if not isinstance(layouts, dict) or not layouts:
            raise TypeError("layouts must be a non-empty dict of row kind -> FrameLayout")
        for kind, layout in layouts.items():
            if not isinstance(kind, str) or kind == "none":
                raise ValueError(f"row kind must be a str other than 'none', got {kind!r}")
            if not isinstance(layout, FrameLayout):
                raise TypeError(f"layouts[{kind!r}] must be a FrameLayout, got {type(layout).__name__}")
        self._layouts = dict(layouts)
        self._ids = {}

    def clear(self) -> None:
        self._layouts = {}
        self._ids = {}

    def layout(self, kind: str) -> FrameLayout | None:
        return self._layouts.get(kind)

    def lookup(self, kind: str, rows: int, device, caller=None):
        """(frame_id int32 [rows], num_frames) for a linear of row kind `kind`, or (None, None) when
        nothing is published (generic models: every row uses gate[0]).

        `caller`: the calling module, or a name, for error messages only. A module (not its name) is passed so
        that a compiled block does not specialize, i.e. recompile, on each layer's name string."""
        if not self._layouts:
            return None, None
        layout = self._layouts.get(kind)
        if layout is None:
            raise ValueError(
                f"{_caller_name(caller)}: row kind {kind!r} has no published frame layout (published: {sorted(self._layouts)})"
            )
        if rows != layout.rows:
            raise ValueError(
                f"{_caller_name(caller)}: input has {rows} rows but the published {kind!r} layout has {layout.rows} "
                f"(batch {layout.batch} x ({layout.num_frames} frames x {layout.tokens_per_frame} tokens + "
                f"{layout.text_len} text))"
            )
        key = (kind, torch.device(device))
        ids = self._ids.get(key)
        if ids is None:
            ids = self._ids[key] = layout.frame_ids(device)
        return ids, layout.num_frames


def _caller_name(caller) -> str:
    return (getattr(caller, "name", caller) if caller is not None else None) or "?"


def resample_gate(gate: torch.Tensor, num_frames: int) -> torch.Tensor:
    """Gate [G + 1] (G calibrated frames + text entry) -> [num_frames + 1], over normalised time.

    Identity when num_frames == G. Differentiable (calibration may train through it).
    """
    g = gate.shape[0] - 1
    if num_frames == g:
        return gate
    video = gate[:g].view(1, 1, g)
    video = F.interpolate(video, size=num_frames, mode="linear", align_corners=False).view(num_frames)
    return torch.cat((video, gate[g:]))


def frame_state(model: torch.nn.Module) -> FrameState:
    """The FrameState of a quantized model (created by `quantize_`)."""
    state = getattr(model, "_qvdit_frames", None)
    if state is None:
        raise ValueError("model has no qvdit frame state: call qvdit.quantize_(model, config) first")
    return state


def publish(model: torch.nn.Module, layouts: dict[str, FrameLayout]) -> None:
    """Publish frame layouts for the next forward of `model` (what adapters call in a pre-hook)."""
    frame_state(model).publish(layouts)
