"""Wan 2.1 (`WanTransformer3DModel`): frame-major video tokens, text only in cross-attention k/v.

Input `hidden_states (B, C, F, H, W)`, patch (p_t, p_h, p_w): tokens (b, f', h', w') with
F' = F / p_t, H' = H / p_h, W' = W / p_w; frame(m) = (m mod F'H'W') // (H'W').
Quantized by default: `blocks.*` linears (attn1 q/k/v/o, attn2 q/k/v/o, ffn); the condition
embedder (time/text embeddings, adaLN projection) and `proj_out` stay in full precision.
"""
from __future__ import annotations

import re

from torch import nn

from ..frames import FrameLayout
from .base import ModelAdapter, input_tensor, register_adapter

_BLOCK_LINEAR = re.compile(r"^blocks\.\d+\.")


class WanAdapter(ModelAdapter):
    name = "wan"
    class_names = ("WanTransformer3DModel",)
    text_row_suffixes = ("attn2.to_k", "attn2.to_v", "attn2.to_kv", "attn2.add_k_proj", "attn2.add_v_proj")

    def default_filter(self, name: str, module: nn.Module) -> bool:
        return isinstance(module, nn.Linear) and bool(_BLOCK_LINEAR.match(name))

    def layouts(self, model, args, kwargs):
        x = input_tensor(args, kwargs)
        if x.dim() != 5:
            raise ValueError(f"Wan expects hidden_states (B, C, F, H, W), got shape {list(x.shape)}")
        b, _, f, h, w = x.shape
        pt, ph, pw = model.config.patch_size
        return {"video": FrameLayout(num_frames=f // pt, tokens_per_frame=(h // ph) * (w // pw), batch=b)}


register_adapter(WanAdapter())
