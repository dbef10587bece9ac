"""Deployment of a calibrated fake-quant model: every FakeQuantLinear becomes a QLinear with packed codes.

    codes   = quantize_rows(W + B A, s, z, bits)     the LoRA merged before quantization (free at inference)
    w_scale = s (learned), w_zero = z, bias = bias + bias_corr, alpha / beta / gate copied

`quantize_rows` is the reference quantizer the fake-quant forward used, with the same s and z, so the
deployed integer weights are exactly the ones calibration trained with. `save_quantized` then writes the
model as usual.
"""
from __future__ import annotations

import torch
from torch import nn

import qvdit_kernels as qk
from qvdit.config import QuantConfig
from qvdit.qlinear import QLinear
from qvdit.quantize import _parent, attach_frames
from qvdit_kernels.reference import quantize_rows

from .fakequant import FakeQuantLinear


@torch.no_grad()
def to_qlinear(fake: FakeQuantLinear, backend: str = "auto") -> QLinear:
    """The deployed QLinear of one calibrated FakeQuantLinear."""
    s, z = fake.scale().detach().float(), fake.w_zero.float()
    codes = quantize_rows(fake.merged_weight().detach(), s, z, fake.w_bits)
    codes = codes.to(torch.int8 if fake.w_bits == 8 else torch.uint8)
    has_bias = fake.bias is not None or bool(fake.bias_corr.any())
    dev = fake.weight.device
    q = QLinear(fake.in_features, fake.out_features, has_bias, w_bits=fake.w_bits, a_bits=fake.a_bits, tqe=fake.tqe,
                backend=backend, row_kind=fake.row_kind, num_gates=fake.gate.numel() if fake.tqe else 2,
                bias_dtype=fake.bias_dtype, device=dev, name=fake.name)
    q.w_packed.copy_(qk.pack_weight(codes, fake.w_bits))
    q.w_scale.copy_(s)
    q.w_zero.copy_(z)
    if has_bias:
        base = fake.bias if fake.bias is not None else torch.zeros_like(fake.bias_corr)
        q.bias.copy_((base + fake.bias_corr).to(q.bias.dtype))
    if fake.tqe:
        q.alpha.copy_(fake.alpha)
        q.beta.copy_(fake.beta)
        q.gate.copy_(fake.gate)
    return q


def deploy_(model: nn.Module, config: QuantConfig, backend: str | None = None) -> nn.Module:
    """Replace every FakeQuantLinear of `model` by its QLinear, in place; returns `model` (ready for
    `save_quantized`)."""
    backend = config.backend if backend is None else backend
    new = []
    for name, module in list(model.named_modules()):
        if isinstance(module, FakeQuantLinear):
            q = to_qlinear(module, backend)
            parent, child = _parent(model, name)
            setattr(parent, child, q)
            new.append(q)
    if not new:
        raise ValueError("deploy_ found no FakeQuantLinear in the model")
    attach_frames(model, new)
    model._qvdit_config = config
    return model
