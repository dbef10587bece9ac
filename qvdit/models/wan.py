"""Wan 2.1 (`WanTransformer3DModel`): frame-major video tokens, text only in cross-attention k/v.

Input `hidden_states (B, C, F, H, W)`, patch (p_t, p_h, p_w): tokens (b, f', h', w') with
F' = F / p_t, H' = H / p_h, W' = W / p_w; frame(m) = (m mod F'H'W') // (H'W').
Quantized by default: `blocks.*` linears (attn1 q/k/v/o, attn2 q/k/v/o, ffn); the condition
embedder (time/text embeddings, adaLN projection) and `proj_out` stay in full precision.
Cross-attention k/v (text tokens, and the I2V image tokens of `add_k_proj`/`add_v_proj`) get no gate.
"""
from __future__ import annotations

from ..frames import FrameLayout
from .base import ModelAdapter, block_linear_filter, input_tensor, register_adapter


class WanAdapter(ModelAdapter):
    name = "wan"
    class_names = ("WanTransformer3DModel",)
    text_row_suffixes = ("attn2.to_k", "attn2.to_v", "attn2.to_kv", "attn2.add_k_proj", "attn2.add_v_proj")
    default_filter = block_linear_filter(r"blocks\.\d+\.")

    def layouts(self, model, args, kwargs):
        x = input_tensor(args, kwargs, ndim=5, layout="(B, C, F, H, W)")
        b, _, f, h, w = x.shape
        pt, ph, pw = model.config.patch_size
        # Conv3d with stride = kernel = patch: floor division, as the patch embedding itself does
        return {"video": FrameLayout(num_frames=f // pt, tokens_per_frame=(h // ph) * (w // pw), batch=b)}


register_adapter(WanAdapter())
