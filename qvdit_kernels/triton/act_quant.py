"""Per-token activation quantization in one Triton kernel (SPEC 1.1-1.2): scale, int8 codes `q - z`,
the TQE term `u[m] = gate[frame_id[m]] * sx[m] * (xq[m, :] . alpha)` and `rowsum(xq)[m]`.

One program handles BLOCK_M rows. When a whole row fits one register tile (BLOCK_K >= K) the row is
read from memory once; longer rows (K > MAX_ONE_PASS_K) take two passes over K chunks, the second
mostly from L2. The codes equal `reference.quantize_activation` bit for bit: float32 IEEE division
(`div_rn`; Triton's plain `/` is approximate) and round-half-to-even through the float32
magic-number trick (exact for |v| < 2^22; here |v| <= 127), which also runs in the interpreter,
where libdevice.rint does not exist. A row holding inf/NaN gets scale NaN and zero codes, as in the
reference. The TQE dot runs in float64 over the exact codes, as in the reference, and is rounded once.
"""
import torch
import triton
import triton.language as tl

EPS = 1e-8
MAX_ONE_PASS_K = 16384  # longest row held in registers in one tile (16 warps x 32 lanes x 32 values)
RINT_MAGIC = 12582912.0  # 1.5 * 2^23: v + M - M rounds v half to even for |v| < 2^22


@triton.jit
def _rint(v):
    return (v + 12582912.0) - 12582912.0


@triton.jit
def _row_stats(x, BITS: tl.constexpr):
    """(scale, zero) per row of a float32 tile; padding lanes hold 0, which changes no min/max."""
    if BITS == 8:
        amax = tl.max(tl.abs(x), axis=1)
        s = tl.maximum(tl.math.div_rn(amax, tl.full(amax.shape, 127.0, tl.float32)), 1e-8)
        z = tl.zeros_like(s)
    else:
        qmax: tl.constexpr = (1 << BITS) - 1
        hi = tl.maximum(tl.max(x, axis=1), 0.0)
        lo = tl.minimum(tl.min(x, axis=1), 0.0)
        s = tl.maximum(tl.math.div_rn(hi - lo, tl.full(hi.shape, qmax, tl.float32)), 1e-8)
        z = tl.minimum(tl.maximum(_rint(tl.math.div_rn(-lo, s)), 0.0), qmax)
    return s, z


@triton.jit
def _codes(x, s, z, BITS: tl.constexpr):
    """xq = clamp(rint(x / s) + z, 0, qmax) - z (or clamp(rint(x / s), -127, 127) for 8 bits), float32."""
    v = _rint(tl.math.div_rn(x, s[:, None]))
    if BITS == 8:
        return tl.minimum(tl.maximum(v, -127.0), 127.0)
    qmax: tl.constexpr = (1 << BITS) - 1
    return tl.minimum(tl.maximum(v + z[:, None], 0.0), qmax) - z[:, None]


@triton.jit
def _stats_step(xrow, k0, cols, rmask, K, st1, st2, bad, BITS: tl.constexpr):
    kk = k0 + cols
    x = tl.load(xrow + kk[None, :], mask=rmask[:, None] & (kk[None, :] < K), other=0.0).to(tl.float32)
    bad = tl.maximum(bad, tl.max(tl.where(tl.abs(x) < float("inf"), 0, 1), axis=1))
    if BITS == 8:
        st1 = tl.maximum(st1, tl.max(tl.abs(x), axis=1))
    else:
        st1 = tl.maximum(st1, tl.max(x, axis=1))
        st2 = tl.minimum(st2, tl.min(x, axis=1))
    return st1, st2, bad


@triton.jit
def _codes_step(xrow, qrow, alpha_ptr, k0, cols, rmask, K, s, z, bad, rsum, dot,
                BITS: tl.constexpr, HAS_TQE: tl.constexpr, WANT_RS: tl.constexpr):
    kk = k0 + cols
    mask = rmask[:, None] & (kk[None, :] < K)
    x = tl.load(xrow + kk[None, :], mask=mask, other=0.0).to(tl.float32)
    q = tl.where((bad[:, None] == 0) & mask, _codes(x, s, z, BITS), 0.0)
    tl.store(qrow + kk[None, :], q.to(tl.int8), mask=mask)
    if WANT_RS:
        rsum += tl.sum(q.to(tl.int32), axis=1)
    if HAS_TQE:
        a = tl.load(alpha_ptr + kk, mask=kk < K, other=0.0).to(tl.float64)
        dot += tl.sum(q.to(tl.float64) * a[None, :], axis=1)
    return rsum, dot


@triton.jit
def act_quant_kernel(
    x_ptr, xq_ptr, s_ptr, u_ptr, rs_ptr, alpha_ptr, gate_ptr, fid_ptr,
    M, K, stride_xm, stride_qm,
    BITS: tl.constexpr, HAS_TQE: tl.constexpr, HAS_GATE: tl.constexpr, HAS_FID: tl.constexpr,
    WANT_RS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, ONE_PASS: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    xrow = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
    qrow = xq_ptr + rows.to(tl.int64)[:, None] * stride_qm
    cols = tl.arange(0, BLOCK_K)
    if ONE_PASS:
        mask = rmask[:, None] & (cols[None, :] < K)
        x = tl.load(xrow + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        bad = tl.max(tl.where(tl.abs(x) < float("inf"), 0, 1), axis=1)  # NaN compares false
        s, z = _row_stats(x, BITS)
        q = tl.where(bad[:, None] == 0, _codes(x, s, z, BITS), 0.0)
        tl.store(qrow + cols[None, :], q.to(tl.int8), mask=mask)
        if WANT_RS:
            rsum = tl.sum(q.to(tl.int32), axis=1)
        if HAS_TQE:
            a = tl.load(alpha_ptr + cols, mask=cols < K, other=0.0).to(tl.float64)
            dot = tl.sum(q.to(tl.float64) * a[None, :], axis=1)
    else:
        # pass 1: row statistics over K chunks (st1 = max or max|x|, st2 = min)
        st1 = tl.zeros([BLOCK_M], tl.float32)
        st2 = tl.zeros([BLOCK_M], tl.float32)
        bad = tl.zeros([BLOCK_M], tl.int32)
        if not INTERPRET:
            for k0 in range(0, K, BLOCK_K):
                st1, st2, bad = _stats_step(xrow, k0, cols, rmask, K, st1, st2, bad, BITS)
        else:  # the interpreter (numpy >= 2.3) cannot take a run-time bound in range()
            k0 = 0
            while k0 < K:
                st1, st2, bad = _stats_step(xrow, k0, cols, rmask, K, st1, st2, bad, BITS)
                k0 += BLOCK_K
        if BITS == 8:
            s = tl.maximum(tl.math.div_rn(st1, tl.full(st1.shape, 127.0, tl.float32)), 1e-8)
            z = tl.zeros_like(s)
        else:
            qmax: tl.constexpr = (1 << BITS) - 1
            s = tl.maximum(tl.math.div_rn(st1 - st2, tl.full(st1.shape, qmax, tl.float32)), 1e-8)
            z = tl.minimum(tl.maximum(_rint(tl.math.div_rn(-st2, s)), 0.0), qmax)
        # pass 2: codes, row sums, alpha dot
        rsum = tl.zeros([BLOCK_M], tl.int32)
        dot = tl.zeros([BLOCK_M], tl.float64)
        if not INTERPRET:
            for k0 in range(0, K, BLOCK_K):
                rsum, dot = _codes_step(xrow, qrow, alpha_ptr, k0, cols, rmask, K, s, z, bad, rsum, dot,
                                        BITS, HAS_TQE, WANT_RS)
        else:
            k0 = 0
            while k0 < K:
                rsum, dot = _codes_step(xrow, qrow, alpha_ptr, k0, cols, rmask, K, s, z, bad, rsum, dot,
                                        BITS, HAS_TQE, WANT_RS)
                k0 += BLOCK_K
    s = tl.where(bad == 0, s, float("nan"))
    tl.store(s_ptr + rows, s, mask=rmask)
    if WANT_RS:
        tl.store(rs_ptr + rows, rsum, mask=rmask)
    if HAS_TQE:
        u = dot * s.to(tl.float64)
        if HAS_GATE:
            if HAS_FID:
                fid = tl.load(fid_ptr + rows, mask=rmask, other=0)
            else:
                fid = tl.zeros([BLOCK_M], tl.int32)
            u = u * tl.load(gate_ptr + fid, mask=rmask, other=0.0).to(tl.float64)
        tl.store(u_ptr + rows, u.to(tl.float32), mask=rmask)


def launch_params(m: int, k: int, interpret: bool) -> dict:
    """Tile and warp count: ~32 values per thread, enough rows per program to fill it."""
    if interpret:  # small tiles keep the CPU interpreter fast
        bk = triton.next_power_of_2(k) if k <= 256 else 128
        return dict(BLOCK_M=4, BLOCK_K=bk, ONE_PASS=bk >= k, num_warps=1)
    if k <= MAX_ONE_PASS_K:
        bk = triton.next_power_of_2(k)
        bm = max(1, min(16, 4096 // bk))
        return dict(BLOCK_M=bm, BLOCK_K=bk, ONE_PASS=True, num_warps=max(4, min(16, bm * bk // 512)))
    return dict(BLOCK_M=1, BLOCK_K=4096, ONE_PASS=False, num_warps=8)


def act_quant(x, bits, alpha=None, gate=None, frame_id=None, want_rowsum=True, interpret=False, params=None):
    """Launch the kernel: x [M, K] (f32/bf16/f16, last dim contiguous) -> (xq, scale, u | None, rowsum | None)."""
    m, k = x.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    dev = x.device
    xq = torch.empty((m, k), dtype=torch.int8, device=dev)
    scale = torch.empty(m, dtype=torch.float32, device=dev)
    u = torch.empty(m, dtype=torch.float32, device=dev) if alpha is not None else None
    rs = torch.empty(m, dtype=torch.int32, device=dev) if want_rowsum else None
    if m == 0:
        return xq, scale, u, rs
    if frame_id is not None and frame_id.dtype != torch.int32:
        frame_id = frame_id.to(torch.int32)
    p = dict(params or launch_params(m, k, interpret))
    grid = (triton.cdiv(m, p["BLOCK_M"]),)
    act_quant_kernel[grid](
        x, xq, scale, u, rs, alpha.contiguous() if alpha is not None else None, gate, frame_id,
        m, k, x.stride(0), xq.stride(0),
        BITS=bits, HAS_TQE=alpha is not None, HAS_GATE=gate is not None, HAS_FID=frame_id is not None,
        WANT_RS=want_rowsum, INTERPRET=interpret, **p,
    )
    return xq, scale, u, rs
