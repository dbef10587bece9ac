"""Producer fusion (issue 6, item 5): the LayerNorm + adaLN modulation in front of a block's quantized
linears runs as one kernel that also quantizes its output (`qvdit_kernels.norm_quantize`), and each
consuming QLinear (q, k and v share one pass) receives its codes, scale, row sums and TQE term directly.

Eager mode only: under torch.compile the block runs its original forward (inductor fuses the norm chain
itself, and our separate act-quant op stays a graph node). `QVDIT_FUSE_PRODUCERS=0` turns it off (for A/B
benchmarks). The fused result equals the unfused one bit for bit on the reference backend (same torch
ops for y); on Triton y may differ from torch's LayerNorm by one ulp of bf16 in rare elements.
"""
from __future__ import annotations

import os

import torch
from torch import nn

import qvdit_kernels as qk
from qvdit_kernels import backends

from ..qlinear import QLinear


def enabled() -> bool:
    return os.environ.get("QVDIT_FUSE_PRODUCERS", "1") != "0" and not torch.compiler.is_compiling()


def can_feed(norm: nn.Module, consumers: list, x: torch.Tensor) -> bool:
    """A LayerNorm whose output goes only to QLinears of one activation width, TQE setting and backend,
    with a norm_quantize kernel for that backend on x's device (or the reference backend itself)."""
    if not isinstance(norm, nn.LayerNorm) or not consumers or not all(isinstance(q, QLinear) for q in consumers):
        return False
    q0 = consumers[0]
    if any((q.a_bits, q.tqe, q.backend, q.in_features) != (q0.a_bits, q0.tqe, q0.backend, q0.in_features)
           for q in consumers) or norm.normalized_shape != (q0.in_features,):
        return False
    return q0.backend == "torch" or backends.resolve("norm_quantize", q0.backend, x.device, fallback=False) is not None


def _plain(norm, x, scale, shift):
    y = norm(x.float())
    return (y if scale is None else y * (1 + scale) + shift).type_as(x)


def feed(norm: nn.Module, x: torch.Tensor, consumers: list, scale=None, shift=None) -> torch.Tensor:
    """(norm(x.float()) [* (1 + scale) + shift]).type_as(x), x [B, S, C]; scale/shift [B, 1, C] or [B, S, C].

    Fused (when `enabled()` and `can_feed`): one norm_quantize pass, and each consumer is left the codes for
    its next call on the returned tensor. Otherwise the same expression as diffusers' Wan block."""
    if not (enabled() and can_feed(norm, consumers, x)):
        return _plain(norm, x, scale, shift)
    b, s, c = x.shape
    x2 = x.reshape(b * s, c)
    mod_rows, sc, sh = 1, None, None
    if scale is not None:
        mod_rows = s if scale.shape[1] == 1 else 1
        sc, sh = scale.reshape(-1, c), shift.reshape(-1, c)
    alphas = gates = frame_id = None
    if consumers[0].tqe:
        tqe = [q.tqe_inputs(b * s, x.device) for q in consumers]
        alphas = torch.stack([t[0] for t in tqe])
        frame_id = tqe[0][3]
        if all(t[2] is not None for t in tqe) and len({t[2].shape for t in tqe}) == 1:
            gates = torch.stack([t[2] for t in tqe])
        elif any(t[2] is not None for t in tqe):  # mixed gating: not what a norm's consumers look like
            return _plain(norm, x, scale, shift)
    y, xq, sx, u, rs = qk.norm_quantize(x2, consumers[0].a_bits, norm.eps, norm.weight, norm.bias, sc, sh, mod_rows,
                                        alphas, gates, frame_id, backend=consumers[0].backend)
    y = y.view(b, s, c)
    for j, q in enumerate(consumers):
        q._prequant = (y, xq, sx, rs, None if u is None else u[j])
    return y
