"""The pure-PyTorch reference of every op (`backend="torch"`). Runs anywhere; imports no Triton, no CUDA.

Written for clarity, not speed. Every fast kernel is tested against these functions: integer results
bit for bit, floating-point results within the bounds of SPEC 1.4. Arguments are assumed validated
(by `qvdit_kernels.ops`); nothing here checks shapes.

Math (SPEC 1.1-1.2), per row r of a matrix (weight: output channel; activation: token):

    b <= 7 (asymmetric):  s = max((max(r,0) - min(r,0)) / (2^b - 1), EPS),  z = round(-min(r,0) / s)
                          q = clamp(round(x / s) + z, 0, 2^b - 1)            x^ = s (q - z)
    b == 8 (symmetric):   s = max(max|r| / 127, EPS),  q = clamp(round(x / s), -127, 127),  z = 0

All of it in float32 with IEEE division and round-half-to-even (`torch.round`); EPS = 1e-8 as
float32. A row holding a non-finite value gets scale NaN and all-zero codes (so only its own
output row turns NaN; documented in the README). Activations are returned as `xq = q - z` (int8).

GEMM (exact integer identity, then a float32 epilogue):

    acc[m,n] = sum_k xq[m,k] * (qw[n,k] - zw[n])
    y[m,n]   = acc[m,n] * sx[m] * sw[n] + bias[n] + u[m] * beta[n]
    u[m]     = gate[frame_id[m]] * (x^[m,:] . alpha),   x^ = sx[m] * xq[m,:]
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .formats import get_format

EPS = 1e-8  # lower clamp of every scale (applied in float32)


# ----------------------------------------------------------------------------- quantizer math
def rowwise_qparams(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max scale and zero point of every row (last dim) of `x`, in float32 (SPEC 1.1)."""
    x = x.float()
    # Divide by a 0-dim tensor on x's device, not a Python number: CUDA turns division by a host scalar
    # into multiplication by its reciprocal, which is 1 ulp off IEEE division and moves codes at ties.
    if bits == 8:
        scale = (x.abs().amax(dim=-1) / torch.full((), 127.0, device=x.device)).clamp(min=EPS)
        return scale, torch.zeros_like(scale)
    qmax = float(2**bits - 1)
    hi = x.amax(dim=-1).clamp(min=0.0)
    lo = x.amin(dim=-1).clamp(max=0.0)
    scale = ((hi - lo) / torch.full((), qmax, device=x.device)).clamp(min=EPS)
    zero = torch.round(-lo / scale).clamp(0.0, qmax)
    return scale, zero


def quantize_rows(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes q of every row, in float32 (integer valued): uint range for b <= 7, [-127, 127] for 8 bits."""
    x = x.float()
    if bits == 8:
        return torch.round(x / scale[..., None]).clamp(-127.0, 127.0)
    return (torch.round(x / scale[..., None]) + zero[..., None]).clamp(0.0, float(2**bits - 1))


def _nonfinite_rows(x: torch.Tensor) -> torch.Tensor:
    return ~torch.isfinite(x).all(dim=-1)


# ----------------------------------------------------------------------------- ops
def quantize_weight(w: torch.Tensor, bits: int):
    """RTN per output channel: -> (q [N,K] uint8 (int8 for 8 bits), scale f32 [N], zero f32 [N])."""
    scale, zero = rowwise_qparams(w, bits)
    q = quantize_rows(w, scale, zero, bits)
    bad = _nonfinite_rows(w)
    if bool(bad.any()):
        scale = torch.where(bad, torch.full_like(scale, float("nan")), scale)
        zero = torch.where(bad, torch.zeros_like(zero), zero)
        q = torch.where(bad[:, None], torch.zeros_like(q), q)
    return q.to(torch.int8 if bits == 8 else torch.uint8), scale, zero


def pack_weight(q: torch.Tensor, bits: int, format: str | None = None) -> torch.Tensor:
    return get_format(bits, format).pack(q)


def unpack_weight(packed: torch.Tensor, bits: int, k: int, format: str | None = None) -> torch.Tensor:
    return get_format(bits, format).unpack(packed, k)


def frame_gate(m: int, gate, frame_id) -> torch.Tensor | None:
    """Per-row gate g[m] = gate[frame_id[m]] (gate[0] for all rows when frame_id is None)."""
    if gate is None:
        return None
    gate = gate.float()
    if frame_id is None:
        return gate[0].expand(m)
    return gate[frame_id.long()]


def quantize_activation(x, bits, alpha=None, gate=None, frame_id=None, want_rowsum=False, activation=None):
    """Per-token dynamic quantization of x [M, K] -> (xq int8, scale f32 [M], u f32 [M] | None[, rowsum int32 [M]]).

    `u` (the TQE term) is computed in float64 from the exact integer codes and rounded once to float32;
    fast kernels sum in float32 and meet `tqe_u_bound`. `activation` ("gelu_tanh"): quantize `activate(x)`
    instead, the op that produced the linear's input (FFN fc1 -> GELU -> fc2), rounded to x's dtype as the
    block rounds it.
    """
    x = activate(x, activation)
    scale, zero = rowwise_qparams(x, bits)
    q = quantize_rows(x, scale, zero, bits) - zero[:, None]
    bad = _nonfinite_rows(x)
    if bool(bad.any()):
        scale = torch.where(bad, torch.full_like(scale, float("nan")), scale)
        q = torch.where(bad[:, None], torch.zeros_like(q), q)
    xq = q.to(torch.int8)
    u = None
    if alpha is not None:
        dot = xq.double() @ alpha.double()  # sum_k xq[m,k] alpha[k]
        u = dot * scale.double()
        g = frame_gate(x.shape[0], gate, frame_id)
        if g is not None:
            u = u * g.double()
        u = u.float()
    if want_rowsum:
        return xq, scale, u, act_rowsum(xq)
    return xq, scale, u


def tqe_u_bound(xq, scale, alpha, gate=None, frame_id=None) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (u in float64, tolerance) that a fast kernel's float32 `u` must meet: |u - u64| <= tolerance.

    Kernels may sum `xq . alpha` in float32 in any order (exact products, K - 1 roundings, plus a few
    for the scale, gate and final rounding), so the bound is (K + 4) * 2^-23 * |g| * s * sum|xq * alpha|.
    Rows with a non-finite scale have u NaN in every backend.
    """
    terms = xq.double() * alpha.double()
    g = frame_gate(xq.shape[0], gate, frame_id)
    g = torch.ones(xq.shape[0], dtype=torch.float64, device=xq.device) if g is None else g.double()
    s = scale.double()
    u64 = g * s * terms.sum(dim=1)
    tol = (xq.shape[1] + 4) * 2.0**-23 * (g * s).abs() * terms.abs().sum(dim=1) + 2.0**-126
    return u64, tol


def u_within_bound(u, xq, scale, alpha, gate=None, frame_id=None) -> bool:
    """True when a kernel's `u` meets `tqe_u_bound` on every row (NaN exactly where the scale is NaN)."""
    u64, tol = tqe_u_bound(xq, scale, alpha, gate, frame_id)
    bad = torch.isnan(scale)
    if not torch.equal(torch.isnan(u), bad):
        return False
    return bool(((u.double() - u64).abs()[~bad] <= tol[~bad]).all())


def layer_norm_modulate(x, eps, weight=None, bias=None, scale=None, shift=None, mod_rows=1):
    """y = (LN(x) [* weight + bias]) [* (1 + scale[r]) + shift[r]] in float32, rounded to x's dtype, where
    r = row // mod_rows (the norm + adaLN modulation in front of a DiT block's linears, as diffusers' Wan
    block computes it; scale/shift [R, K] float32)."""
    k = x.shape[-1]
    y = torch.nn.functional.layer_norm(x.float(), (k,), None if weight is None else weight.float(),
                                       None if bias is None else bias.float(), eps)
    if scale is not None:
        idx = torch.arange(x.shape[0], device=x.device) // mod_rows
        y = y * (1 + scale.float()[idx]) + shift.float()[idx]
    return y.to(x.dtype)


def norm_quantize(x, bits, eps, weight=None, bias=None, scale=None, shift=None, mod_rows=1, alphas=None,
                  gates=None, frame_id=None):
    """The norm + modulation of `layer_norm_modulate` fused with the per-token quantization of its output,
    for J consumers of that output (e.g. q, k and v): -> (y, xq, scale, u [J, M] float32 | None, rowsum).

    The codes are `quantize_activation(y)`'s; u[j] uses alphas[j] ([J, K]) and gates[j] ([J, G], None = ones).
    """
    y = layer_norm_modulate(x, eps, weight, bias, scale, shift, mod_rows)
    xq, sx, _, rs = quantize_activation(y, bits, want_rowsum=True)
    u = None
    if alphas is not None:  # each consumer's u exactly as its own act-quant of y defines it
        u = torch.stack([quantize_activation(y, bits, alphas[j], None if gates is None else gates[j], frame_id)[2]
                         for j in range(alphas.shape[0])])
    return y, xq, sx, u, rs


def norm_quantize_backend(x, bits, eps, weight, bias, scale, shift, mod_rows, alphas, gates, frame_id, residual,
                          residual_gate, write_y):
    """The "torch" backend of ops.norm_quantize / ops.add_norm_quantize, in the signature every backend has:
    -> (y | None (not write_y), xq, scale, u | None, rowsum, h | None (no residual))."""
    h = None if residual is None else epilogue_tail(x, None, residual, residual_gate)
    y, xq, sx, u, rs = norm_quantize(x if h is None else h, bits, eps, weight, bias, scale, shift, mod_rows, alphas,
                                     gates, frame_id)
    return (y if write_y else None), xq, sx, u, rs, h


def act_rowsum(xq: torch.Tensor) -> torch.Tensor:
    """rowsum(xq)[m] = sum_k xq[m,k] as int32 (what the epilogue needs for the weight zero point)."""
    return xq.to(torch.int64).sum(dim=1).to(torch.int32)


def gemm_acc(xq: torch.Tensor, qw: torch.Tensor, zw: torch.Tensor) -> torch.Tensor:
    """acc = xq @ (qw - zw)^T exactly, as int32 [M, N].

    The sum runs in float64 for speed: every product and partial sum is an integer of magnitude
    < 127 * 255 * K < 2^53, so float64 is exact here (ops.qgemm bounds K).
    """
    w = qw.double() - zw.double()[:, None]
    acc = xq.double() @ w.T
    return acc.to(torch.int64).to(torch.int32)


def epilogue(acc, x_scale, w_scale, bias=None, u=None, beta=None, out_dtype=torch.bfloat16):
    """y = acc * sx[m] * sw[n] + bias[n] + u[m] * beta[n], in float32, cast once to out_dtype."""
    y = acc.float() * x_scale.float()[:, None] * w_scale.float()[None, :]
    if bias is not None:
        y = y + bias.float()[None, :]
    if u is not None and beta is not None:
        y = y + u.float()[:, None] * beta.float()[None, :]
    return y.to(out_dtype)


ACTIVATIONS = ("gelu_tanh",)


def activate(y, activation=None):
    """The activation of a block's FFN as diffusers computes it on a tensor of the model's dtype:
    `F.gelu(y, approximate="tanh")` (float32 inside, rounded to y's dtype); y itself for None."""
    return y if activation is None else F.gelu(y, approximate="tanh")


def epilogue_tail(y, activation=None, residual=None, residual_gate=None):
    """What a DiT block does right after a linear, applied to the linear's output y [M, N] (in its out dtype),
    written as the unfused block computes it (Wan, CogVideoX, Latte in diffusers):

        h = gelu_tanh(y)                                        activation="gelu_tanh" (FFN fc1 -> GELU)
        out = (residual.float() + h.float() * gate[m // (M // G)]).to(y.dtype)   residual_gate [G, N] float32
        out = (residual.float() + h.float()).to(y.dtype)        residual without a gate (= residual + h)
    """
    y = activate(y, activation)
    if residual is None:
        return y
    h = y.float()
    if residual_gate is not None:
        rows = torch.arange(y.shape[0], device=y.device) // (y.shape[0] // residual_gate.shape[0])
        h = h * residual_gate[rows]
    return (residual.float() + h).to(y.dtype)


def qgemm(xq, x_scale, w_packed, w_bits, w_scale, w_zero, bias=None, u=None, beta=None, x_rowsum=None,
          out_dtype=torch.bfloat16, format=None, activation=None, residual=None, residual_gate=None):
    """SPEC 1.3 `qgemm`: int32 `acc` when out_dtype is torch.int32, else the epilogue in out_dtype, then
    `epilogue_tail` (activation, gated residual) when asked for.

    `x_rowsum` is accepted for signature parity; the reference does not need it.
    """
    k = xq.shape[1]
    qw = unpack_weight(w_packed, w_bits, k, format)
    acc = gemm_acc(xq, qw, w_zero)
    if out_dtype == torch.int32:
        return acc
    return epilogue_tail(epilogue(acc, x_scale, w_scale, bias, u, beta, out_dtype), activation, residual, residual_gate)


def dequantize_weight(w_packed, w_bits, k, w_scale, w_zero, format=None) -> torch.Tensor:
    """W^ = sw[n] * (qw[n,k] - zw[n]) in float32 [N, K]."""
    qw = unpack_weight(w_packed, w_bits, k, format).float()
    return w_scale.float()[:, None] * (qw - w_zero.float()[:, None])
