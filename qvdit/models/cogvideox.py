"""CogVideoX (`CogVideoXTransformer3DModel`): text tokens joined as a prefix of every block linear's rows.

Input `hidden_states (B, F, C, H, W)` (frames before channels, unlike Wan/Latte) and
`encoder_hidden_states (B, T, D)`. The patch embedding projects the text and cats [text; video]; the
blocks split them again, but attention q/k/v/o and the FFN run on the joined sequence, so every
quantized linear sees rows (b, [T text tokens; F' x H'W' video tokens]) with F' = F / patch_size_t
(1 when unset: CogVideoX 1.0), H' = H / p, W' = W / p. T is read from `encoder_hidden_states` (226 for
the released models, but any length the caller passes). Text rows get the last gate entry.
Quantized by default: `transformer_blocks.*.attn1` and `.ff` linears; the per-block adaLN modulation
(`norm1.linear`, `norm2.linear`, M = 1 rows), embeddings, `norm_out` and `proj_out` stay in full precision.
"""
from __future__ import annotations

from ..frames import FrameLayout
from . import fused
from .base import ModelAdapter, block_linear_filter, input_tensor, register_adapter


class CogVideoXAdapter(ModelAdapter):
    name = "cogvideox"
    class_names = ("CogVideoXTransformer3DModel",)
    default_filter = block_linear_filter(r"transformer_blocks\.\d+\.(attn1|ff)\.")

    def layouts(self, model, args, kwargs):
        x = input_tensor(args, kwargs, ndim=5, layout="(B, F, C, H, W)")
        text = input_tensor(args, kwargs, "encoder_hidden_states", position=1, ndim=3, layout="(B, T, D)")
        b, f, _, h, w = x.shape
        p, pt = model.config.patch_size, model.config.patch_size_t or 1
        t = text.shape[1]
        return {"video": FrameLayout(num_frames=f // pt, tokens_per_frame=(h // p) * (w // p), batch=b, text_len=t,
                                     text_position="prefix" if t else "none")}


    def install(self, model, state) -> None:
        """The frame hooks, and each block's FFN through `fused.ffn_forward` (fc2's codes over fc1's output)."""
        super().install(model, state)
        fused.install_ffn_forward(model)


register_adapter(CogVideoXAdapter())
