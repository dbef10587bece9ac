"""Per-token activation quantization in one Triton kernel (SPEC 1.1-1.2): scale, int8 codes `q - z`,
the TQE term `u[m] = gate[frame_id[m]] * sx[m] * (xq[m, :] . alpha)` and `rowsum(xq)[m]`.

One program handles BLOCK_M rows (or, PERSISTENT, strides over blocks of rows), on one of two paths the
tuner chooses between per K (`candidates`):
- one pass (K <= MAX_ONE_PASS_K): the row is read once and held in registers as up to four power-of-two
  "pieces" P0 > P1 > P2 > P3 (K = 1536 is 1024 + 512, K = 8960 is 8192 + 512 + 256), so no lane is spent on
  padding to the next power of two; every piece is loaded before the first reduction, so the loads are
  all in flight at once;
- two passes over P0-wide chunks (statistics, then codes); the second pass reads mostly from L2.

Bit-exact with `reference.quantize_activation` in the codes, scales and row sums, with little work per
element (the pass must run at memory speed):
- `t = RN(x / s)`: IEEE division, but per element only `q0 = x*r; e = fma(-q0, s, x); t = fma(e, r, q0)`
  with `r = RN(1/s)` once per row (Markstein's correction: exactly the IEEE quotient; the interpreter,
  whose fma is not fused, divides with `div_rn` instead; tests check the formula on the host exactly).
- round half to even, clamp, zero point and the int8 code all in the float32 "magic" domain
  `y = t + 1.5*2^23` (exact integers there): the code is `bits(y) - bits(magic + z)`, so no
  float->int conversion per element; its low byte is the int8 code, its sum the row sum.
- a row holding inf/NaN is found by NaN-propagating min/max (no extra per-element test); it gets scale
  NaN and zero codes, as in the reference.
- the TQE dot `xq . alpha` runs in float32 (one FMA per element; products of exact codes, summed in the
  reduction's order), so `u` is within K * 2^-23 * gate * s * sum|xq * alpha| of the reference's float64
  value (the tests check that bound); rowsum and dot share one reduction.
"""
import torch
import triton
import triton.language as tl

from .activations import gelu_tanh
from .tune import persistent_grid

MAX_ONE_PASS_K = 16384  # longest row held in registers
MAX_PIECES = 4
MIN_PIECE = 64  # K is rounded up to a multiple of this before it is split into pieces


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
def _merge_stats(hi, lo, x, BITS: tl.constexpr, INTERPRET: tl.constexpr):
    h, lw = _tile_stats(x, BITS, INTERPRET)
    return _max_nan(hi, h), _min_nan(lo, lw)


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
def _load(xrow, rmask, K, OFF, W: tl.constexpr, EVICT: tl.constexpr, GELU: tl.constexpr):
    """One piece (or chunk) [BLOCK_M, W] of the rows, columns OFF.., as float32 (0 outside the row).
    EVICT: L2 policy; the two-pass path keeps its first read in L2 for the second ("evict_last").
    GELU: gelu_tanh(x) rounded to x's dtype, the values the block's GELU would have written (gelu(0) = 0)."""
    cols = OFF + tl.arange(0, W)
    x = tl.load(xrow + cols[None, :], mask=rmask[:, None] & (cols[None, :] < K), other=0.0, eviction_policy=EVICT)
    if GELU:
        return gelu_tanh(x.to(tl.float32)).to(x.dtype).to(tl.float32)
    return x.to(tl.float32)


@triton.jit
def _codes(x, s, r, z, good, BITS: tl.constexpr, INTERPRET: tl.constexpr):
    """Codes of a tile: clamp(RN(x / s) + z, 0, qmax) - z (8 bits: +-127) -> (as int32, as float32)."""
    if INTERPRET:
        t = tl.math.div_rn(x, s[:, None])  # the interpreter's fma rounds twice: divide directly
    else:
        q0 = x * r[:, None]
        e = tl.fma(-q0, s[:, None], x)  # exact remainder
        t = tl.fma(e, r[:, None], q0)  # = RN(x / s) (Markstein)
    y = t + 12582912.0  # round half to even: y = MAGIC + rint(t), exact
    if BITS == 8:
        y = tl.minimum(tl.maximum(y, 12582912.0 - 127.0), 12582912.0 + 127.0)
        base = tl.full(z.shape, 12582912.0, tl.float32)
    else:
        qmax: tl.constexpr = (1 << BITS) - 1
        y = tl.minimum(tl.maximum(y + z[:, None], 12582912.0), 12582912.0 + qmax)
        base = 12582912.0 + z  # per row: MAGIC + z, exact
    y = tl.where(good[:, None], y, base[:, None])  # non-finite row: all codes 0
    xq_i = y.to(tl.int32, bitcast=True) - base.to(tl.int32, bitcast=True)[:, None]
    return xq_i, y - base[:, None]  # y - base: the exact code as float32


@triton.jit
def _quantize_store(x, qrow, alpha_ptr, rmask, K, OFF, s, r, z, good, W: tl.constexpr, BITS: tl.constexpr,
                    HAS_TQE: tl.constexpr, WANT_RS: tl.constexpr, INTERPRET: tl.constexpr):
    """Codes of one piece, stored as int8 -> (row sums int32, alpha dots float32) of the piece."""
    cols = OFF + tl.arange(0, W)
    mask = rmask[:, None] & (cols[None, :] < K)
    xq_i, xq_f = _codes(x, s, r, z, good, BITS, INTERPRET)
    tl.store(qrow + cols[None, :], xq_i.to(tl.int8), mask=mask)
    if HAS_TQE:
        a = tl.load(alpha_ptr + cols, mask=cols < K, other=0.0)
        prod = xq_f * a[None, :]
    else:
        prod = tl.zeros(x.shape, tl.float32)
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
    WANT_RS: tl.constexpr, BLOCK_M: tl.constexpr, P0: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr,
    P3: tl.constexpr, ONE_PASS: tl.constexpr, INTERPRET: tl.constexpr, PERSISTENT: tl.constexpr = False,
    GELU: tl.constexpr = False,
):
    """One block of BLOCK_M rows per program, or (PERSISTENT) a fixed grid of programs striding over the
    row blocks: fewer rows in flight at once, so a two-pass program's second read still finds its rows
    in L2 at large K."""
    if PERSISTENT:
        rb = tl.program_id(0)
        while rb < tl.cdiv(M, BLOCK_M):
            _row_block(rb, x_ptr, xq_ptr, s_ptr, u_ptr, rs_ptr, alpha_ptr, gate_ptr, fid_ptr, M, K, stride_xm,
                       stride_qm, BITS, HAS_TQE, HAS_GATE, HAS_FID, WANT_RS, BLOCK_M, P0, P1, P2, P3, ONE_PASS,
                       INTERPRET, GELU)
            rb += tl.num_programs(0)
    else:
        _row_block(tl.program_id(0), x_ptr, xq_ptr, s_ptr, u_ptr, rs_ptr, alpha_ptr, gate_ptr, fid_ptr, M, K,
                   stride_xm, stride_qm, BITS, HAS_TQE, HAS_GATE, HAS_FID, WANT_RS, BLOCK_M, P0, P1, P2, P3,
                   ONE_PASS, INTERPRET, GELU)


@triton.jit
def _row_block(
    rb, x_ptr, xq_ptr, s_ptr, u_ptr, rs_ptr, alpha_ptr, gate_ptr, fid_ptr,
    M, K, stride_xm, stride_qm,
    BITS: tl.constexpr, HAS_TQE: tl.constexpr, HAS_GATE: tl.constexpr, HAS_FID: tl.constexpr,
    WANT_RS: tl.constexpr, BLOCK_M: tl.constexpr, P0: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr,
    P3: tl.constexpr, ONE_PASS: tl.constexpr, INTERPRET: tl.constexpr, GELU: tl.constexpr,
):
    rows = rb * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    xrow = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
    qrow = xq_ptr + rows.to(tl.int64)[:, None] * stride_qm
    if ONE_PASS:  # the row is the pieces P0..P3 (0 = absent), all loaded before any reduction
        x0 = _load(xrow, rmask, K, 0, P0, "evict_first", GELU)
        if P1 > 0:
            x1 = _load(xrow, rmask, K, P0, P1, "evict_first", GELU)
        if P2 > 0:
            x2 = _load(xrow, rmask, K, P0 + P1, P2, "evict_first", GELU)
        if P3 > 0:
            x3 = _load(xrow, rmask, K, P0 + P1 + P2, P3, "evict_first", GELU)
        hi, lo = _tile_stats(x0, BITS, INTERPRET)
        if P1 > 0:
            hi, lo = _merge_stats(hi, lo, x1, BITS, INTERPRET)
        if P2 > 0:
            hi, lo = _merge_stats(hi, lo, x2, BITS, INTERPRET)
        if P3 > 0:
            hi, lo = _merge_stats(hi, lo, x3, BITS, INTERPRET)
        s, r, z, good = _row_params(hi, lo, BITS)
        rsum, dot = _quantize_store(x0, qrow, alpha_ptr, rmask, K, 0, s, r, z, good, P0, BITS, HAS_TQE, WANT_RS,
                                    INTERPRET)
        if P1 > 0:
            rs, d = _quantize_store(x1, qrow, alpha_ptr, rmask, K, P0, s, r, z, good, P1, BITS, HAS_TQE, WANT_RS,
                                    INTERPRET)
            rsum, dot = rsum + rs, dot + d
        if P2 > 0:
            rs, d = _quantize_store(x2, qrow, alpha_ptr, rmask, K, P0 + P1, s, r, z, good, P2, BITS, HAS_TQE,
                                    WANT_RS, INTERPRET)
            rsum, dot = rsum + rs, dot + d
        if P3 > 0:
            rs, d = _quantize_store(x3, qrow, alpha_ptr, rmask, K, P0 + P1 + P2, s, r, z, good, P3, BITS, HAS_TQE,
                                    WANT_RS, INTERPRET)
            rsum, dot = rsum + rs, dot + d
    else:  # two passes over P0-wide chunks: statistics, then codes (the chunks mostly come from L2)
        hi = tl.zeros([BLOCK_M], tl.float32)
        lo = tl.zeros([BLOCK_M], tl.float32)
        k0 = 0
        while k0 < K:  # a while loop: the interpreter (numpy >= 2.3) cannot take a run-time bound in range()
            hi, lo = _merge_stats(hi, lo, _load(xrow, rmask, K, k0, P0, "evict_last", GELU), BITS, INTERPRET)
            k0 += P0
        s, r, z, good = _row_params(hi, lo, BITS)
        rsum = tl.zeros([BLOCK_M], tl.int32)
        dot = tl.zeros([BLOCK_M], tl.float32)
        k0 = 0
        while k0 < K:
            xc = _load(xrow, rmask, K, k0, P0, "evict_first", GELU)
            rs, d = _quantize_store(xc, qrow, alpha_ptr, rmask, K, k0, s, r, z, good, P0, BITS, HAS_TQE, WANT_RS,
                                    INTERPRET)
            rsum, dot = rsum + rs, dot + d
            k0 += P0
    s = tl.where(good, s, float("nan"))
    tl.store(s_ptr + rows, s, mask=rmask)
    if WANT_RS:
        tl.store(rs_ptr + rows, rsum, mask=rmask)
    if HAS_TQE:
        u = dot * s
        if HAS_GATE:
            if HAS_FID:
                fid = tl.load(fid_ptr + rows, mask=rmask, other=0)
            else:
                fid = tl.zeros([BLOCK_M], tl.int32)
            u = u * tl.load(gate_ptr + fid, mask=rmask, other=0.0).to(tl.float32)
        tl.store(u_ptr + rows, u, mask=rmask)


def pieces(k: int) -> tuple[int, int, int, int]:
    """Power-of-two widths P0 > P1 > P2 > P3 (0 = absent) that cover roundup(k, MIN_PIECE): the binary
    digits of the rounded K. With more than MAX_PIECES digits, K is rounded up further (adding its lowest
    digit carries) and the tail is masked."""
    kr = max(MIN_PIECE, -(-k // MIN_PIECE) * MIN_PIECE)
    while bin(kr).count("1") > MAX_PIECES:
        kr += kr & -kr
    digits = [1 << b for b in range(kr.bit_length() - 1, -1, -1) if kr >> b & 1]
    return tuple(digits + [0] * (MAX_PIECES - len(digits)))


def one_pass(block_m: int, k: int, num_warps: int) -> dict:
    p = pieces(k)
    return dict(BLOCK_M=block_m, P0=p[0], P1=p[1], P2=p[2], P3=p[3], ONE_PASS=True, num_warps=num_warps)


def two_pass(block_m: int, chunk: int, num_warps: int, per_sm: int = 0) -> dict:
    """Two passes over `chunk`-wide pieces; per_sm > 0: a persistent grid of that many programs per SM."""
    p = dict(BLOCK_M=block_m, P0=chunk, P1=0, P2=0, P3=0, ONE_PASS=False, num_warps=num_warps)
    return dict(p, PERSISTENT=per_sm) if per_sm else p


def candidates(k: int) -> list[dict]:
    """Launch parameters the tuner times for rows of K (the winners of the H100 sweeps in
    benchmarks/results/linear_h100_r2.json): one row per program held in registers at 16-64 values per
    thread on 1-8 warps (few warps: the row reductions stay inside a warp or two), or two passes over
    256-1024-wide chunks (K > chunk)."""
    out = []
    if k <= MAX_ONE_PASS_K:
        width = sum(pieces(k))
        out += [one_pass(1, k, warps) for warps in (1, 2, 4, 8) if 16 <= width / (32 * warps) <= 64]
    for chunk, bm, warps in ((256, 8, 4), (512, 2, 2), (512, 4, 4), (1024, 2, 2), (1024, 2, 4)):
        if chunk < k:
            out.append(two_pass(bm, chunk, warps))
    if k > 4096:  # long rows: a persistent grid keeps the rows in flight within L2 for the second pass
        out += [two_pass(2, 2048, 4, per_sm) for per_sm in (4, 8)]
    return out or [default_params(k, False)]


def default_params(k: int, interpret: bool) -> dict:
    """Without tuning: small tiles in the interpreter; on a GPU about 16 values per thread."""
    if interpret:  # small tiles keep the CPU interpreter fast; longer rows take the two-pass path
        return one_pass(4, k, 1) if k <= 256 else two_pass(4, 128, 1)
    if k <= MAX_ONE_PASS_K:
        width = sum(pieces(k))
        bm = max(1, min(8, 4096 // width))
        return one_pass(bm, k, max(4, min(16, bm * width // 512)))
    return two_pass(2, 1024, 4)


def act_quant(x, bits, alpha=None, gate=None, frame_id=None, want_rowsum=True, interpret=False, params=None,
              tuner=None, gelu=False):
    """Launch: x [M, K] (f32/bf16/f16, unit column stride) -> (xq, scale, u | None, rowsum | None); with `gelu`
    the codes of gelu_tanh(x) rounded to x's dtype (`reference.quantize_activation(activation="gelu_tanh")`).

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
    if alpha is not None and (alpha.dtype != torch.float32 or not alpha.is_contiguous()):
        alpha = alpha.to(torch.float32).contiguous()

    def run(p):
        p = dict(p)
        per_sm = p.pop("PERSISTENT", 0)
        act_quant_kernel[(persistent_grid(triton.cdiv(m, p["BLOCK_M"]), per_sm, dev, interpret),)](
            x, xq, scale, u, rs, alpha, gate, frame_id, m, k, x.stride(0), xq.stride(0),
            BITS=bits, HAS_TQE=alpha is not None, HAS_GATE=gate is not None, HAS_FID=frame_id is not None,
            WANT_RS=want_rowsum, INTERPRET=interpret, PERSISTENT=bool(per_sm), GELU=gelu, **p,
        )

    if params is None:
        params = tuner(candidates(k), run) if (tuner is not None and not interpret) else default_params(k, interpret)
    run(params)
    return xq, scale, u, rs
