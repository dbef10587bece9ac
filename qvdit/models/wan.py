"""Wan 2.1 (`WanTransformer3DModel`): frame-major video tokens, text only in cross-attention k/v.

Input `hidden_states (B, C, F, H, W)`, patch (p_t, p_h, p_w): tokens (b, f', h', w') with
F' = F / p_t, H' = H / p_h, W' = W / p_w; frame(m) = (m mod F'H'W') // (H'W').
Quantized by default: `blocks.*` linears (attn1 q/k/v/o, attn2 q/k/v/o, ffn); the condition
embedder (time/text embeddings, adaLN projection) and `proj_out` stay in full precision.
Cross-attention k/v (text tokens, and the I2V image tokens of `add_k_proj`/`add_v_proj`) get no gate.
"""
from __future__ import annotations

import functools
import types

import torch

from ..frames import FrameLayout
from . import fused
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

    def install(self, model, state) -> None:
        """The frame hooks, and each block's forward replaced by `wan_block_forward` (fused producers)."""
        super().install(model, state)
        for block in getattr(model, "blocks", []):
            if type(block).__name__ == "WanTransformerBlock" and fused.forward_replaceable(block):
                block.forward = types.MethodType(_fusing_forward(type(block).forward), block)


@functools.lru_cache(maxsize=None)
def _fusing_forward(original):
    """The block's forward: `wan_block_forward`, or `original` (diffusers' own) with QVDIT_FUSE_PRODUCERS=0.
    One function per block class, so compiled blocks share one graph."""
    def forward(self, hidden_states, encoder_hidden_states, temb, rotary_emb):
        if not fused.enabled():
            return original(self, hidden_states, encoder_hidden_states, temb, rotary_emb)
        return wan_block_forward(self, hidden_states, encoder_hidden_states, temb, rotary_emb)
    return forward


def _qkv(attn) -> list:
    return [attn.to_qkv] if getattr(attn, "fused_projections", False) else [attn.to_q, attn.to_k, attn.to_v]


def wan_block_forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb: torch.Tensor,
                      rotary_emb: torch.Tensor) -> torch.Tensor:
    """diffusers 0.42 `WanTransformerBlock.forward` with its three norm sites (norm1 + modulation -> q/k/v,
    norm2 -> cross-attention q, norm3 + modulation -> FFN in) run by `fused.feed` (the norm, the modulation
    and the act-quant of the consumers in one pass; y not written where only those consumers read it), the FFN's
    GELU in fc1's epilogue or fc2's act-quant pass, and the three residual adds in the epilogues of the output
    projections and fc2 or, after the attentions, in the next norm's pass (`fused.attention_then_feed`,
    `fused.ffn_into`). tests/test_fused_producers.py checks it against the original bit for bit on the reference
    backend."""
    if temb.ndim == 4:  # (B, S, 6, C): per-token modulation (Wan 2.2 TI2V)
        mods = [t.squeeze(2) for t in (self.scale_shift_table.unsqueeze(0) + temb.float()).chunk(6, dim=2)]
    else:  # (B, 6, C)
        mods = list((self.scale_shift_table + temb.float()).chunk(6, dim=1))
    shift_msa, scale_msa, gate_msa, c_shift_msa, c_scale_msa, c_gate_msa = mods

    # 1. Self-attention (y of each norm written only where a consumer outside the linears may read it)
    norm_hidden_states = fused.feed(self.norm1, hidden_states, _qkv(self.attn1), scale_msa, shift_msa,
                                    codes_only=fused.projections_only(self.attn1))
    # (h.float() + attn1(..) * gate).type_as(h), then 2.'s norm2 (an Identity without cross_attn_norm): the add in
    # o-proj's epilogue, or in norm2's pass where o-proj would run it as a pass of its own
    hidden_states, norm_hidden_states = fused.attention_then_feed(
        self.attn1, lambda: self.attn1(norm_hidden_states, None, None, rotary_emb), hidden_states, gate_msa,
        self.norm2, [self.attn2.to_q], codes_only=fused.projections_only(self.attn2))

    # 2. Cross-attention, then 3.'s norm3 + modulation
    ffn_in = getattr(self.ffn.net[0], "proj", None)  # the GELU module's projection
    hidden_states, norm_hidden_states = fused.attention_then_feed(
        self.attn2, lambda: self.attn2(norm_hidden_states, encoder_hidden_states, None, None), hidden_states, None,
        self.norm3, [ffn_in], c_scale_msa, c_shift_msa, codes_only=fused.ffn_codes_only(self.ffn))

    # 3. Feed-forward
    # (hidden_states is this forward's own: the result may go over it)
    return fused.ffn_into(self.ffn, norm_hidden_states, hidden_states, c_gate_msa, residual_dead=True)


register_adapter(WanAdapter())
