"""LayerNorm + adaLN modulation + per-token activation quantization in one Triton kernel: the producer
of a DiT block's linear inputs (issue 6, item 5), for `ops.norm_quantize` / `reference.norm_quantize`.

One program per row, the row in one register tile (BLOCK_K = next power of two >= K): mean and variance
(two-level sums), y = (x - mean) * rstd [* w + b] [* (1 + scale) + shift], rounded to the input dtype and
stored (other readers of the block's normalized input still get it), then the codes of that rounded y
exactly as `act_quant.py` computes them (same helpers), the row sum and one TQE dot per consumer.
Compared with the unfused path this saves the elementwise chain of the norm and modulation (five
float32 passes in eager diffusers) and one act-quant read of y per consumer (three for q, k, v).
"""
import torch
import triton
import triton.language as tl

from .act_quant import _codes, _row_params, _tile_stats

MAX_K = 16384  # longest row held in one register tile


@triton.jit
def norm_quant_kernel(
    x_ptr, y_ptr, xq_ptr, s_ptr, u_ptr, rs_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, alpha_ptr, gate_ptr, fid_ptr,
    M, K, G, eps, mod_rows, stride_xm,
    BITS: tl.constexpr, HAS_AFFINE: tl.constexpr, HAS_MOD: tl.constexpr, J: tl.constexpr,
    HAS_GATE: tl.constexpr, HAS_FID: tl.constexpr, BLOCK_K: tl.constexpr, INTERPRET: tl.constexpr,
):
    row = tl.program_id(0)
    rows = row + tl.arange(0, 1)  # a one-row tile, so the act-quant helpers apply unchanged
    cols = tl.arange(0, BLOCK_K)
    kmask = cols[None, :] < K
    x = tl.load(x_ptr + row.to(tl.int64) * stride_xm + cols[None, :], mask=kmask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / K
    d = tl.where(kmask, x - mean[:, None], 0.0)
    rstd = tl.math.div_rn(tl.full(mean.shape, 1.0, tl.float32), tl.math.sqrt_rn(tl.sum(d * d, axis=1) / K + eps))
    y = d * rstd[:, None]
    if HAS_AFFINE:
        y = y * tl.load(w_ptr + cols, mask=cols < K, other=0.0)[None, :] + \
            tl.load(b_ptr + cols, mask=cols < K, other=0.0)[None, :]
    if HAS_MOD:
        mrow = (row // mod_rows).to(tl.int64) * K
        sc = tl.load(scale_ptr + mrow + cols, mask=cols < K, other=0.0)[None, :]
        sh = tl.load(shift_ptr + mrow + cols, mask=cols < K, other=0.0)[None, :]
        y = y * (1.0 + sc) + sh
    yr = y.to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + row.to(tl.int64) * K + cols[None, :], yr, mask=kmask)
    yq = tl.where(kmask, yr.to(tl.float32), 0.0)  # the stored y: its codes are quantize_activation(y)'s
    hi, lo = _tile_stats(yq, BITS, INTERPRET)
    s, r, z, good = _row_params(hi, lo, BITS)
    xq_i, xq_f = _codes(yq, s, r, z, good, BITS, INTERPRET)
    tl.store(xq_ptr + row.to(tl.int64) * K + cols[None, :], xq_i.to(tl.int8), mask=kmask)
    s = tl.where(good, s, float("nan"))
    tl.store(s_ptr + rows, s)
    tl.store(rs_ptr + rows, tl.sum(xq_i, axis=1))
    if HAS_FID:
        fid = tl.load(fid_ptr + rows)
    else:
        fid = tl.zeros([1], tl.int32)
    for j in tl.static_range(J):  # one TQE term per consumer of y
        a = tl.load(alpha_ptr + j * K + cols, mask=cols < K, other=0.0)
        u = tl.sum(xq_f * a[None, :], axis=1) * s
        if HAS_GATE:
            u = u * tl.load(gate_ptr + j * G + fid)
        tl.store(u_ptr + j * M + rows, u)


def norm_quant(x, bits, eps, weight, bias, scale, shift, mod_rows, alphas, gates, frame_id, interpret):
    """Launch: x [M, K] -> (y [M, K] x.dtype, xq int8, scale f32 [M], u f32 [J, M] | None, rowsum int32 [M])."""
    m, k = x.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    dev = x.device
    y = torch.empty((m, k), dtype=x.dtype, device=dev)
    xq = torch.empty((m, k), dtype=torch.int8, device=dev)
    sx = torch.empty(m, dtype=torch.float32, device=dev)
    rs = torch.empty(m, dtype=torch.int32, device=dev)
    j = 0 if alphas is None else alphas.shape[0]
    u = torch.empty((j, m), dtype=torch.float32, device=dev) if j else None
    if m == 0:
        return y, xq, sx, u, rs
    f32 = lambda t: None if t is None else t.to(torch.float32).contiguous()  # noqa: E731
    if frame_id is not None and frame_id.dtype != torch.int32:
        frame_id = frame_id.to(torch.int32)
    bk = max(16, triton.next_power_of_2(k))
    warps = 1 if interpret else max(1, min(16, bk // 1024))  # ~32 values per thread
    norm_quant_kernel[(m,)](
        x, y, xq, sx, u, rs, f32(weight), f32(bias), f32(scale), f32(shift), f32(alphas), f32(gates), frame_id,
        m, k, 0 if gates is None else gates.shape[1], float(eps), mod_rows, x.stride(0),
        BITS=bits, HAS_AFFINE=weight is not None, HAS_MOD=scale is not None, J=j, HAS_GATE=gates is not None,
        HAS_FID=frame_id is not None, BLOCK_K=bk, INTERPRET=interpret, num_warps=warps,
    )
    return y, xq, sx, u, rs
