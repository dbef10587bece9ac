"""Straight-through fake quantization for calibration, on the reference quantizer math.

Forward values come from `qvdit_kernels.reference` (`rowwise_qparams`, `quantize_rows`), so the codes a
calibrated layer trains with are exactly the codes `deploy.py` packs and the kernels run; only the
backward pass is the straight-through estimator. The exactness trick: `ref + (ste - ste.detach())` has the
value of `ref` bit for bit (the bracket is exactly 0) and the gradient of `ste`.

FakeQuantLinear (trainable, one per quantized linear; SPEC 1.2 / method notes 2-4):

    W_in = W + B A                                  rank-r pre-quantization LoRA (B = 0 at init), merged at deployment
    W^   = s (clamp(round(W_in / s) + z, 0, 2^b-1) - z)   learned step size s = s0 exp(l) (LSQ gradient through l),
                                                    zero point z frozen; l = 0 at init, so s = s0 exactly
    X^   = per-token dynamic min-max fake quant of X  (straight-through; no learned parameters)
    Y    = X^ W^T + bias + g[frame] (X^ . alpha) beta   TQE (beta = 0 at init, gates per frame + 1 text entry)

8-bit codes are symmetric (z = 0, [-127, 127]) as in the reference.
"""
from __future__ import annotations

import math
import zlib

import torch
from torch import nn

from qvdit.config import LayerQuant
from qvdit.qlinear import QLinear
from qvdit_kernels.reference import frame_gate, quantize_rows, rowwise_qparams


def code_range(bits: int) -> tuple[float, float]:
    return (-127.0, 127.0) if bits == 8 else (0.0, float(2**bits - 1))


def fake_quant_act(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-row (token) dynamic quantize-dequantize of x [M, K], value exactly s * (q - z) of the reference;
    gradient: identity (min-max never clips, so the STE needs no mask)."""
    with torch.no_grad():
        scale, zero = rowwise_qparams(x, bits)
        q = quantize_rows(x, scale, zero, bits)
        xh = scale[:, None] * (q - zero[:, None])
    xf = x.float()
    return xh + (xf - xf.detach())


def fake_quant_weight(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """W^ = s (q - z) with q = quantize_rows(w, s, z) exactly; LSQ gradients to w and s (zero is frozen)."""
    lo, hi = code_range(bits)
    with torch.no_grad():
        ref = scale[:, None] * (quantize_rows(w, scale, zero, bits) - zero[:, None])
    v = w.float() / scale[:, None]
    q = torch.clamp(v + (torch.round(v) - v).detach() + zero[:, None], lo, hi)
    ste = scale[:, None] * (q - zero[:, None])
    return ref + (ste - ste.detach())


def search_weight_qparams(w: torch.Tensor, bits: int, ratios=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per output row, the clip ratio r (official code's grid, plus 1.0) whose min-max params of r*W give
    the least squared error of quantizing W; returns (scale, zero) like `rowwise_qparams`."""
    w = w.detach().float()
    ratios = torch.arange(0.5, 1.0001, 0.02).tolist() if ratios is None else ratios
    best_err = torch.full((w.shape[0],), float("inf"), device=w.device)
    best_s, best_z = rowwise_qparams(w, bits)
    for r in ratios:
        s, z = rowwise_qparams(w * r, bits)
        err = ((s[:, None] * (quantize_rows(w, s, z, bits) - z[:, None]) - w) ** 2).sum(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s, best_z = torch.where(better, s, best_s), torch.where(better, z, best_z)
    return best_s, best_z


def _layer_generator(seed: int, name: str, salt: str) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32((name + salt).encode())) % 2**63)


class FakeQuantLinear(nn.Module):
    """A trainable stand-in for QLinear during calibration (see the module docstring)."""

    tqe_inputs = QLinear.tqe_inputs  # the same gate / frame-id lookup as the deployed layer

    def __init__(self, linear: nn.Linear, layer: LayerQuant, *, name: str = "", row_kind: str = "video",
                 num_frames: int = 1, lora_rank: int = 0, weight_init: str = "minmax", seed: int = 0,
                 act_quant: bool = True):
        super().__init__()
        if weight_init not in ("minmax", "mse"):
            raise ValueError(f"weight_init must be 'minmax' or 'mse', got {weight_init!r}")
        w = linear.weight.detach().float()
        n, k = w.shape
        self.in_features, self.out_features = k, n
        self.w_bits, self.a_bits, self.tqe = layer.w_bits, layer.a_bits, layer.tqe
        self.name, self.row_kind, self.act_quant = name, row_kind, act_quant
        self._frames = None
        self.register_buffer("weight", w.clone())
        self.register_buffer("bias", linear.bias.detach().float().clone() if linear.bias is not None else None)
        self.bias_dtype = linear.bias.dtype if linear.bias is not None else torch.float32
        s, z = rowwise_qparams(w, self.w_bits) if weight_init == "minmax" else search_weight_qparams(w, self.w_bits)
        # the step size is learned in log space: one learning rate suits W3 and W8 steps alike
        self.register_buffer("w_scale0", s.clone())
        self.w_log_scale = nn.Parameter(torch.zeros_like(s), requires_grad=False)
        self.register_buffer("w_zero", z.clone())
        self.register_buffer("bias_corr", torch.zeros(n, device=w.device))
        if lora_rank > 0:  # LoRA init: A Kaiming-uniform(a=sqrt(5)) = U(+-1/sqrt(K)), B = 0
            a = (torch.rand(lora_rank, k, generator=_layer_generator(seed, name, "lora"), dtype=torch.float64) * 2 - 1)
            self.lora_A = nn.Parameter((a / math.sqrt(k)).float().to(w.device), requires_grad=False)
            self.lora_B = nn.Parameter(torch.zeros(n, lora_rank, device=w.device), requires_grad=False)
        else:
            self.lora_A = self.lora_B = None
        if self.tqe:
            ref = QLinear(k, n, linear.bias is not None, w_bits=self.w_bits, a_bits=self.a_bits, tqe=True,
                          backend="torch", num_gates=num_frames + 1, name=name)
            ref.reset_tqe(seed)  # the same alpha init as QLinear.from_linear
            self.alpha = nn.Parameter(ref.alpha.detach().clone().to(w.device), requires_grad=False)
            self.beta = nn.Parameter(torch.zeros(n, device=w.device), requires_grad=False)
            self.gate = nn.Parameter(torch.ones(num_frames + 1, device=w.device), requires_grad=False)
        else:
            self.alpha = self.beta = self.gate = None

    def merged_weight(self) -> torch.Tensor:
        """W + B A (what gets quantized); the plain weight when LoRA is off."""
        if self.lora_A is None:
            return self.weight
        return self.weight + self.lora_B @ self.lora_A

    def scale(self) -> torch.Tensor:
        """The weight step size s per output row (what deployment stores as w_scale)."""
        return self.w_scale0 * torch.exp(self.w_log_scale)

    def quant_weight(self) -> torch.Tensor:
        return fake_quant_weight(self.merged_weight(), self.scale(), self.w_zero, self.w_bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{self.name or 'FakeQuantLinear'}: input has {x.shape[-1]} features, expected {self.in_features}")
        x2 = x.reshape(-1, self.in_features)
        xh = fake_quant_act(x2, self.a_bits) if self.act_quant else x2.float()
        y = xh @ self.quant_weight().T
        if self.bias is not None:
            y = y + (self.bias + self.bias_corr)
        elif bool(self.bias_corr.any()):
            y = y + self.bias_corr
        if self.tqe:
            alpha, beta, gate, frame_id = self.tqe_inputs(x2.shape[0], x.device)
            u = xh @ alpha
            g = frame_gate(x2.shape[0], gate, frame_id)
            if g is not None:
                u = u * g
            y = y + u[:, None] * beta[None, :]
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        lora = self.lora_A.shape[0] if self.lora_A is not None else 0
        return (f"in_features={self.in_features}, out_features={self.out_features}, W{self.w_bits}A{self.a_bits}, "
                f"tqe={self.tqe}, lora_rank={lora}, row_kind={self.row_kind}, act_quant={self.act_quant}")
