"""Per-token activation quantization in one Triton kernel (SPEC 1.1-1.2): scale, int8 codes `q - z`,
the TQE term `u[m] = gate[frame_id[m]] * sx[m] * (xq[m, :] . alpha)` and `rowsum(xq)[m]`.

One program handles BLOCK_M rows. When a whole row fits one register tile (ONE_PASS) it is read from
memory once; otherwise two passes over K chunks (the second mostly from L2).

Bit-exact with `reference.quantize_activation` at memory speed, so the per-element work is kept small:
- `t = RN(x / s)`: IEEE division, but per element only `q0 = x*r; e = fma(-q0, s, x); t = fma(e, r, q0)`
  with `r = RN(1/s)` once per row (Markstein's correction: exactly the IEEE quotient; the interpreter,
  whose fma is not fused, divides with `div_rn` instead; tests check the formula on the host exactly).
- round half to even, clamp, zero point and the int8 code all in the float32 "magic" domain
  `y = t + 1.5*2^23` (exact integers there): the code is `bits(y) - bits(magic + z)`, so no
  float->int conversion per element; its low byte is the int8 code, its sum the row sum.
- a row holding inf/NaN is found by NaN-propagating min/max (no extra per-element test); it gets scale
  NaN and zero codes, as in the reference.
- the TQE dot runs in float64 over the exact codes (alpha arrives as float64), as in the reference,
  and is rounded once; rowsum and dot share one reduction.
"""
import torch
import triton
import triton.language as tl

MAX_ONE_PASS_K = 16384  # longest row held in registers in one tile
MAGIC = 12582912.0  # 1.5 * 2^23: v + MAGIC rounds v half to even, exactly, for |v| < 2^22
MAGIC_BITS = 0x4B400000  # its bit pattern; bits(MAGIC + n) = MAGIC_BITS + n for integer |n| < 2^22


@triton.jit
def _max_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _min_nan(a, b):
    return tl.minimum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _minmax_combine(a_hi, a_lo, b_hi, b_lo):
    return _max_nan(a_hi, b_hi), _min_nan(a_lo, b_lo)


@triton.jit
def _sum2_combine(a0, a1, b0, b1):
    return a0 + b0, a1 + b1


@triton.jit
def _tile_stats(x, BITS: tl.constexpr, INTERPRET: tl.constexpr):
    """(hi, lo) per row: max|x| (8 bits) or max/min; NaN and inf propagate (padding lanes hold 0)."""
    if BITS == 8:
        x = tl.abs(x)
    if INTERPRET:
        # the interpreter runs custom combines element by element in Python, and its max ignores NaN
        bad = tl.max(tl.where(tl.abs(x) < float("inf"), 0, 1), axis=1)
        return tl.where(bad > 0, float("nan"), tl.max(x, axis=1)), tl.min(x, axis=1)
    return tl.reduce((x, x), 1, _minmax_combine)


@triton.jit
def _row_params(hi, lo, BITS: tl.constexpr):
    """Per row: scale s (NaN for a non-finite row), its reciprocal r = RN(1/s), zero z (float), good."""
    good = (tl.abs(hi) < float("inf")) & (tl.abs(lo) < float("inf"))
    if BITS == 8:
        s = tl.maximum(tl.math.div_rn(hi, tl.full(hi.shape, 127.0, tl.float32)), 1e-8)
        z = tl.zeros_like(s)
    else:
        qmax: tl.constexpr = (1 << BITS) - 1
        h = tl.maximum(hi, 0.0)
        lw = tl.minimum(lo, 0.0)
        s = tl.maximum(tl.math.div_rn(h - lw, tl.full(h.shape, qmax, tl.float32)), 1e-8)
        z = tl.minimum(tl.maximum((tl.math.div_rn(-lw, s) + 12582912.0) - 12582912.0, 0.0), qmax)
    s = tl.where(good, s, 1.0)
    z = tl.where(good, z, 0.0)
    r = tl.math.div_rn(tl.full(s.shape, 1.0, tl.float32), s)
    return s, r, z, good


@triton.jit
def _codes(x, s, r, z, good, BITS: tl.constexpr, INTERPRET: tl.constexpr):
    """-> (xq as int32, xq as float32) of a tile: clamp(RN(x / s) rounded + z, 0, qmax) - z (8 bits: +-127)."""
    if INTERPRET:
        t = tl.math.div_rn(x, s[:, None])  # the interpreter's fma rounds twice: divide directly
    else:
        q0 = x * r[:, None]
        e = tl.fma(-q0, s[:, None], x)  # exact remainder
        t = tl.fma(e, r[:, None], q0)  # = RN(x / s) (Markstein)
    y = t + 12582912.0  # round half to even: y = MAGIC + rint(t), exact
    if BITS == 8:
        y = tl.minimum(tl.maximum(y, 12582912.0 - 127.0), 12582912.0 + 127.0)
        off = tl.zeros_like(z)
    else:
        qmax: tl.constexpr = (1 << BITS) - 1
        y = tl.minimum(tl.maximum(y + z[:, None], 12582912.0), 12582912.0 + qmax)
        off = z
    base = 12582912.0 + off  # per row: MAGIC + z, exact
    y = tl.where(good[:, None], y, base[:, None])  # non-finite row: all codes 0
    xq_i = y.to(tl.int32, bitcast=True) - base.to(tl.int32, bitcast=True)[:, None]
    return xq_i, y - base[:, None]


@triton.jit
def _store_and_sums(qrow, cols, mask, xq_i, xq_f, alpha_ptr, K, HAS_TQE: tl.constexpr, WANT_RS: tl.constexpr,
                    INTERPRET: tl.constexpr):
    """Store the int8 codes of a tile; -> (row sums int32, alpha dots float64) of the tile."""
    tl.store(qrow + cols[None, :], xq_i.to(tl.int8), mask=mask)
    if HAS_TQE:
        a = tl.load(alpha_ptr + cols, mask=cols < K, other=0.0)  # float64
        prod = xq_f.to(tl.float64) * a[None, :]
    else:
        prod = tl.zeros(xq_f.shape, tl.float64)
    if WANT_RS and not INTERPRET:
        rsum, dot = tl.reduce((xq_i, prod), 1, _sum2_combine)  # one reduction pass for both
    elif WANT_RS:
        rsum = tl.sum(xq_i, axis=1)
        dot = tl.sum(prod, axis=1)
    else:
        rsum = tl.zeros([xq_i.shape[0]], tl.int32)
        dot = tl.sum(prod, axis=1)
    return rsum, dot


@triton.jit
def act_quant_kernel(
    x_ptr, xq_ptr, s_ptr, u_ptr, rs_ptr, alpha_ptr, gate_ptr, fid_ptr,
    M, K, stride_xm, stride_qm,
    BITS: tl.constexpr, HAS_TQE: tl.constexpr, HAS_GATE: tl.constexpr, HAS_FID: tl.constexpr,
    WANT_RS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, ONE_PASS: tl.constexpr,
    INTERPRET: tl.constexpr, LOOP_STAGES: tl.constexpr = 1,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    xrow = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
    qrow = xq_ptr + rows.to(tl.int64)[:, None] * stride_qm
    cols = tl.arange(0, BLOCK_K)
    if ONE_PASS:
        mask = rmask[:, None] & (cols[None, :] < K)
        x = tl.load(xrow + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        hi, lo = _tile_stats(x, BITS, INTERPRET)
        s, r, z, good = _row_params(hi, lo, BITS)
        xq_i, xq_f = _codes(x, s, r, z, good, BITS, INTERPRET)
        rsum, dot = _store_and_sums(qrow, cols, mask, xq_i, xq_f, alpha_ptr, K, HAS_TQE, WANT_RS, INTERPRET)
    else:
        hi = tl.zeros([BLOCK_M], tl.float32)
        lo = tl.zeros([BLOCK_M], tl.float32)
        if not INTERPRET:  # LOOP_STAGES > 1: Triton keeps the next chunks' loads in flight
            for k0 in tl.range(0, K, BLOCK_K, num_stages=LOOP_STAGES):
                hi, lo = _stats_step(xrow, k0, cols, rmask, K, hi, lo, BITS, INTERPRET)
        else:  # the interpreter (numpy >= 2.3) cannot take a run-time bound in range()
            k0 = 0
            while k0 < K:
                hi, lo = _stats_step(xrow, k0, cols, rmask, K, hi, lo, BITS, INTERPRET)
                k0 += BLOCK_K
        s, r, z, good = _row_params(hi, lo, BITS)
        rsum = tl.zeros([BLOCK_M], tl.int32)
        dot = tl.zeros([BLOCK_M], tl.float64)
        if not INTERPRET:
            for k0 in tl.range(0, K, BLOCK_K, num_stages=LOOP_STAGES):
                rsum, dot = _codes_step(xrow, qrow, alpha_ptr, k0, cols, rmask, K, s, r, z, good, rsum, dot,
                                        BITS, HAS_TQE, WANT_RS, INTERPRET)
        else:
            k0 = 0
            while k0 < K:
                rsum, dot = _codes_step(xrow, qrow, alpha_ptr, k0, cols, rmask, K, s, r, z, good, rsum, dot,
                                        BITS, HAS_TQE, WANT_RS, INTERPRET)
                k0 += BLOCK_K
    s = tl.where(good, s, float("nan"))
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


@triton.jit
def _stats_step(xrow, k0, cols, rmask, K, hi, lo, BITS: tl.constexpr, INTERPRET: tl.constexpr):
    kk = k0 + cols
    x = tl.load(xrow + kk[None, :], mask=rmask[:, None] & (kk[None, :] < K), other=0.0).to(tl.float32)
    h, lw = _tile_stats(x, BITS, INTERPRET)
    return _max_nan(hi, h), _min_nan(lo, lw)


@triton.jit
def _codes_step(xrow, qrow, alpha_ptr, k0, cols, rmask, K, s, r, z, good, rsum, dot,
                BITS: tl.constexpr, HAS_TQE: tl.constexpr, WANT_RS: tl.constexpr, INTERPRET: tl.constexpr):
    kk = k0 + cols
    mask = rmask[:, None] & (kk[None, :] < K)
    x = tl.load(xrow + kk[None, :], mask=mask, other=0.0).to(tl.float32)
    xq_i, xq_f = _codes(x, s, r, z, good, BITS, INTERPRET)
    rs, d = _store_and_sums(qrow, kk, mask, xq_i, xq_f, alpha_ptr, K, HAS_TQE, WANT_RS, INTERPRET)
    return rsum + rs, dot + d


def candidates(k: int) -> list[dict]:
    """Launch parameters the tuner times for rows of K: one tile per row block (8 or 16 values per
    thread, 8 or 16 warps; 32 for K > 8192), or two passes over 1024/2048-wide chunks (K > chunk)."""
    out = []
    if k <= MAX_ONE_PASS_K:
        bk = triton.next_power_of_2(k)
        for per_thread in (8, 16):
            for warps in (8, 16):
                bm = per_thread * 32 * warps // bk
                if 1 <= bm <= 16 and bm * bk == per_thread * 32 * warps:
                    out.append(dict(BLOCK_M=bm, BLOCK_K=bk, ONE_PASS=True, num_warps=warps))
        if bk == MAX_ONE_PASS_K:  # the longest rows in one tile need 32 values per thread
            out.append(dict(BLOCK_M=1, BLOCK_K=bk, ONE_PASS=True, num_warps=16))
    # LOOP_STAGES=3 (cp.async-pipelined chunk loads) was never faster on the H100 (2% to 2.2x slower, 2026-11-25)
    for chunk, bm in ((1024, 1), (1024, 2), (2048, 1)):  # <= 16 values per thread (4 x 2048 spills)
        if chunk < k:
            out.append(dict(BLOCK_M=bm, BLOCK_K=chunk, ONE_PASS=False, num_warps=4))
    return out or [default_params(k, False)]


def default_params(k: int, interpret: bool) -> dict:
    """Without tuning: small tiles in the interpreter; on a GPU ~16 values per thread."""
    if interpret:  # small tiles keep the CPU interpreter fast; longer rows take the two-pass path
        bk = triton.next_power_of_2(k) if k <= 256 else 128
        return dict(BLOCK_M=4, BLOCK_K=bk, ONE_PASS=bk >= k, num_warps=1)
    if k <= MAX_ONE_PASS_K:
        bk = triton.next_power_of_2(k)
        bm = max(1, min(16, 4096 // bk))
        return dict(BLOCK_M=bm, BLOCK_K=bk, ONE_PASS=True, num_warps=max(4, min(16, bm * bk // 512)))
    return dict(BLOCK_M=2, BLOCK_K=2048, ONE_PASS=False, num_warps=4)


def act_quant(x, bits, alpha=None, gate=None, frame_id=None, want_rowsum=True, interpret=False, params=None,
              tuner=None):
    """Launch: x [M, K] (f32/bf16/f16, unit column stride) -> (xq, scale, u | None, rowsum | None).

    `params` forces one launch config; else `tuner(candidates, run)` picks one (default_params without).
    """
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
    alpha64 = alpha.to(torch.float64).contiguous() if alpha is not None else None

    def run(p):
        p = dict(p)
        act_quant_kernel[(triton.cdiv(m, p["BLOCK_M"]),)](
            x, xq, scale, u, rs, alpha64, gate, frame_id, m, k, x.stride(0), xq.stride(0),
            BITS=bits, HAS_TQE=alpha is not None, HAS_GATE=gate is not None, HAS_FID=frame_id is not None,
            WANT_RS=want_rowsum, INTERPRET=interpret, **p,
        )

    if params is None:
        params = tuner(candidates(k), run) if (tuner is not None and not interpret) else default_params(k, interpret)
    run(params)
    return xq, scale, u, rs
