"""Latte (`LatteTransformer3DModel`): spatial and temporal blocks see the same tokens in two row orders.

Input `hidden_states (B, C, F, H, W)`, patch p: S = (H/p)(W/p) tokens per frame.
- spatial blocks `transformer_blocks.i` run on `(B*F, S, C)`: rows (b, f, s), frame = (m mod F*S) // S
  (row kind "spatial", order frame_major);
- temporal blocks `temporal_transformer_blocks.i` run on `(B*S, F, C)`: rows (b, s, f), frame = m mod F
  (row kind "temporal", order frame_minor);
- the spatial cross-attention k/v run on the caption tokens repeated per frame: no gate (row kind "none").
Quantized by default: attn1/attn2/ff linears of both block lists; `adaln_single` (adaLN-single modulation),
`caption_projection`, the patch embedding and `proj_out` stay in full precision.
"""
from __future__ import annotations

from ..frames import FrameLayout
from . import fused
from .base import ModelAdapter, block_linear_filter, input_tensor, register_adapter

_TEMPORAL = "temporal_transformer_blocks."


class LatteAdapter(ModelAdapter):
    name = "latte"
    class_names = ("LatteTransformer3DModel",)
    text_row_suffixes = ("attn2.to_k", "attn2.to_v")
    default_filter = block_linear_filter(r"(transformer_blocks|temporal_transformer_blocks)\.\d+\.(attn1|attn2|ff)\.")

    def row_kind(self, name: str) -> str:
        if name.endswith(self.text_row_suffixes):
            return "none"
        return "temporal" if name.startswith(_TEMPORAL) else "spatial"

    def layouts(self, model, args, kwargs):
        x = input_tensor(args, kwargs, ndim=5, layout="(B, C, F, H, W)")
        b, _, f, h, w = x.shape
        p = model.config.patch_size
        s = (h // p) * (w // p)
        return {"spatial": FrameLayout(num_frames=f, tokens_per_frame=s, batch=b),
                "temporal": FrameLayout(num_frames=f, tokens_per_frame=s, batch=b, order="frame_minor")}


    def install(self, model, state) -> None:
        """The frame hooks, and each block's FFN through `fused.ffn_forward` (fc2's codes over fc1's output)."""
        super().install(model, state)
        fused.install_ffn_forward(model, ("transformer_blocks", "temporal_transformer_blocks"))


register_adapter(LatteAdapter())
