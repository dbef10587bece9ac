"""QLinear: an `nn.Linear` replacement holding packed low-bit weights and the TQE parameters.

Forward = `qvdit_kernels.qlinear`: per-token activation quantization (computing the TQE term
u[m] = gate[frame(m)] * (x^[m] . alpha) in the same pass), then the packed-weight int8 GEMM whose
epilogue adds bias and u[m] * beta[n].

State (all in `state_dict`):
    w_packed  [N, row_bytes(K)]  packed codes (format of w_bits, `qvdit_kernels.formats`)
    w_scale   f32 [N], w_zero f32 [N]   per-output-channel scale and zero point
    bias      [N] (the original dtype) or absent
    alpha f32 [K], beta f32 [N], gate f32 [G + 1]   TQE (present when tqe=True); beta = 0 at init,
              so an uncalibrated layer computes plain RTN; gate = ones (G calibrated frames + text).
"""
from __future__ import annotations

import math
import zlib

import torch
from torch import nn

import qvdit_kernels as qk
from qvdit_kernels.formats import get_format

from .config import LayerQuant, QuantConfig
from .frames import resample_gate

ROW_KINDS_NO_GATE = ("none",)


class QLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, w_bits: int = 4,
                 a_bits: int = 8, tqe: bool = True, backend: str = "auto", row_kind: str = "video",
                 num_gates: int = 2, bias_dtype: torch.dtype = torch.float32, device=None, name: str = ""):
        super().__init__()
        QuantConfig(w_bits=w_bits, a_bits=a_bits, tqe=tqe, backend=backend)  # validates the settings
        if in_features < 1 or out_features < 1:
            raise ValueError(f"in_features and out_features must be >= 1, got {in_features}, {out_features}")
        if num_gates < 2:
            raise ValueError(f"num_gates must be >= 2 (frames + the text entry), got {num_gates}")
        fmt = get_format(w_bits)
        self.in_features, self.out_features = in_features, out_features
        self.w_bits, self.a_bits, self.tqe, self.backend = w_bits, a_bits, tqe, backend
        self.format = fmt.name
        self.row_kind = row_kind
        self.name = name
        self._frames = None  # FrameState shared with the model (set by quantize_)
        # (source, xq, scale, rowsum, u, written) left by a fused producer (models/fused.py) for this layer's next
        # call on `source`, consumed by that call (set and consumed within one block's forward, also when compiled);
        # written False: source is a stand-in for a y the norm did not write (fused.feed(codes_only=True))
        self._prequant = None
        # (residual [M, N], gate rows [G, N] | None) left by models/fused.py around an attention call, for this
        # output projection's next call with M rows: out = residual + gate * linear
        self._residual = None
        f32 = dict(dtype=torch.float32, device=device)
        self.register_buffer("w_packed", torch.zeros(out_features, fmt.row_bytes(in_features), dtype=fmt.packed_dtype, device=device))
        self.register_buffer("w_scale", torch.ones(out_features, **f32))
        self.register_buffer("w_zero", torch.zeros(out_features, **f32))
        self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype, device=device) if bias else None)
        if tqe:
            # requires_grad off: inference by default; calibration turns these on
            self.alpha = nn.Parameter(torch.zeros(in_features, **f32), requires_grad=False)
            self.beta = nn.Parameter(torch.zeros(out_features, **f32), requires_grad=False)
            self.gate = nn.Parameter(torch.ones(num_gates, **f32), requires_grad=False)
        else:
            self.alpha = self.beta = self.gate = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_linear(cls, linear: nn.Linear, config: QuantConfig | LayerQuant | None = None, *, name: str = "",
                    row_kind: str = "video", backend: str | None = None, seed: int = 0) -> "QLinear":
        """Quantize `linear` (RTN, per output channel) into a new QLinear; `linear` is not modified."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{name or 'linear'}: expected nn.Linear, got {type(linear).__name__}")
        w = linear.weight
        if w.is_meta:
            raise ValueError(f"{name or 'linear'}: weight is on the meta device; load real weights before quantizing")
        if not w.dtype.is_floating_point:
            raise TypeError(f"{name or 'linear'}: weight must be floating point, got {w.dtype}")
        if config is None:
            config = QuantConfig()
        if isinstance(config, QuantConfig):
            backend = config.backend if backend is None else backend
            seed = config.seed
            layer = config.for_module(name)
        elif isinstance(config, LayerQuant):
            layer = config
        else:
            raise TypeError(f"config must be a QuantConfig or LayerQuant, got {type(config).__name__}")
        bias = linear.bias
        q = cls(linear.in_features, linear.out_features, bias is not None, w_bits=layer.w_bits,
                a_bits=layer.a_bits, tqe=layer.tqe, backend=backend or "auto", row_kind=row_kind,
                bias_dtype=bias.dtype if bias is not None else torch.float32, device=w.device, name=name)
        with torch.no_grad():
            codes, scale, zero = qk.quantize_weight(w.detach(), layer.w_bits)
            q.w_packed.copy_(qk.pack_weight(codes, layer.w_bits))
            q.w_scale.copy_(scale)
            q.w_zero.copy_(zero)
            if bias is not None:
                q.bias.copy_(bias.detach())
            if layer.tqe:
                q.reset_tqe(seed)
        return q

    def reset_tqe(self, seed: int = 0) -> None:
        """alpha ~ Kaiming-uniform (bound 1/sqrt(K), as LoRA's down projection), beta = 0, gate = 1.

        Deterministic per layer: the generator is seeded from `seed` and the layer's name.
        """
        gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(self.name.encode())) % 2**63)
        bound = 1.0 / math.sqrt(self.in_features)
        alpha = (torch.rand(self.in_features, generator=gen, dtype=torch.float64) * 2 - 1) * bound
        with torch.no_grad():
            self.alpha.copy_(alpha.float())
            self.beta.zero_()
            self.gate.fill_(1.0)

    # ------------------------------------------------------------------ forward
    def tqe_inputs(self, rows: int, device):
        """(alpha, beta, gate, frame_id) for the kernel; all None when TQE is off."""
        if not self.tqe:
            return None, None, None, None
        if self.row_kind in ROW_KINDS_NO_GATE:
            return self.alpha, self.beta, None, None
        gate, frame_id = self.gate, None
        if self._frames is not None:
            frame_id, num_frames = self._frames.lookup(self.row_kind, rows, device, self)  # self, not self.name: see lookup
            if frame_id is not None:
                gate = resample_gate(self.gate, num_frames)
        return self.alpha, self.beta, gate, frame_id

    def forward(self, x: torch.Tensor, activation: str | None = None, residual: torch.Tensor | None = None,
                residual_gate: torch.Tensor | None = None, input_activation: str | None = None,
                overwrite_input: bool = False, overwrite_residual: bool = False) -> torch.Tensor:
        """y = linear(x); with `activation` ("gelu_tanh") and/or `residual` [..., N] (x.dtype) and `residual_gate`
        (f32 [G, N], row m of the M rows uses gate row m // (M // G)): residual + gate * act(y), fused into the
        GEMM's epilogue (`qvdit_kernels.qgemm`). `input_activation` ("gelu_tanh"): y = linear(act(x)), the
        activation applied in the act-quant pass (`qvdit_kernels.qlinear`), so act(x) is never written.
        `overwrite_input`: x is dead after this call, and the act-quant may write its codes over it
        (`qvdit_kernels.qlinear`; the CUDA backend does): no code buffer beside x. `overwrite_residual`: residual is
        dead too, and the result may be written over it (and returned as a view of it; `qvdit_kernels.qlinear`)."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{self.name or 'QLinear'}: input has {x.shape[-1]} features, expected {self.in_features}")
        rows = x.numel() // self.in_features
        if self._residual is not None and residual is None:
            pending = self._residual
            if pending[0].shape == (rows, self.out_features) and pending[0].dtype == x.dtype:
                self._residual = None  # consumed (models/fused.py checks)
                residual, residual_gate = pending
        if residual is not None:
            residual = residual.reshape(*x.shape[:-1], self.out_features)
        tail = dict(activation=activation, residual=residual, residual_gate=residual_gate)
        if self._prequant is not None:  # a fused norm + act-quant produced x (models/fused.py)
            pre, self._prequant = self._prequant, None
            if pre[0] is x and input_activation is None:
                return self._forward_prequantized(x, *pre[1:5], **tail)
            if not pre[5]:  # (x may be the NaN stand-in of a y the norm did not write)
                raise RuntimeError(f"{self.name or 'QLinear'}: a fused norm left this layer its codes without writing "
                                   "its output, and the layer was called on another tensor (or with "
                                   "input_activation); set QVDIT_CODES_ONLY=0 for this model")
        alpha, beta, gate, frame_id = self.tqe_inputs(rows, x.device)
        return qk.qlinear(x, self.w_packed, self.w_bits, self.w_scale, self.w_zero, self.a_bits, bias=self.bias,
                          alpha=alpha, beta=beta, gate=gate, frame_id=frame_id, backend=self.backend,
                          input_activation=input_activation, overwrite_input=overwrite_input,
                          overwrite_residual=overwrite_residual, **tail)

    def _forward_prequantized(self, x, xq, x_scale, rowsum, u, activation=None, residual=None, residual_gate=None):
        """The GEMM on codes a fused producer computed for x (same codes as this layer's own act-quant of x)."""
        beta = self.beta if u is not None else None
        if residual is not None:
            residual = residual.reshape(-1, self.out_features)
        y = qk.qgemm(xq, x_scale, self.w_packed, self.w_bits, self.w_scale, self.w_zero, bias=self.bias, u=u,
                     beta=beta, x_rowsum=rowsum if self.w_bits != 8 else None, out_dtype=x.dtype,
                     backend=self.backend, activation=activation, residual=residual, residual_gate=residual_gate)
        return y.reshape(*x.shape[:-1], self.out_features)

    # ------------------------------------------------------------------ inspection
    def layer_quant(self) -> LayerQuant:
        return LayerQuant(self.w_bits, self.a_bits, self.tqe)

    def dequantized_weight(self) -> torch.Tensor:
        """W^ = sw * (q - zw) as float32 [N, K]."""
        q = qk.unpack_weight(self.w_packed, self.w_bits, self.in_features).float()
        return self.w_scale[:, None] * (q - self.w_zero[:, None])

    def nbytes(self) -> int:
        """Bytes of everything this layer stores (packed weight, scales, zeros, bias, TQE)."""
        return sum(t.numel() * t.element_size() for t in list(self.buffers()) + list(self.parameters()))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"W{self.w_bits}A{self.a_bits}, tqe={self.tqe}, format={self.format}, row_kind={self.row_kind}, "
                f"backend={self.backend}")
