"""LayerNorm + adaLN modulation + per-token activation quantization in one Triton kernel: the producer
of a DiT block's linear inputs (issue 6, item 5), for `ops.norm_quantize` / `reference.norm_quantize`.

One program per row: mean and variance (two-level sums), y = (x - mean) * rstd [* w + b] [* (1 + scale) +
shift], rounded to the input dtype and stored (other readers of the block's normalized input still get it),
then the codes of that rounded y exactly as `act_quant.py` computes them (same helpers), the row sum and one
TQE dot per consumer. Two kernels, which the tuner chooses between per K: the row in one register tile
(`norm_quant_kernel`), or CHUNK-wide steps with per-lane accumulators (`norm_quant_chunked_kernel`).
Compared with the unfused path this saves the elementwise chain of the norm and modulation (five
float32 passes in eager diffusers) and one act-quant read of y per consumer (three for q, k, v).
"""
import torch
import triton
import triton.language as tl

from .act_quant import _codes, _merge_stats, _row_params, _tile_stats

MAX_K = 16384  # longest row held in one register tile


@triton.jit
def _norm_y(x, cols, K, mean, rstd, w_ptr, b_ptr, sc_ptr, sh_ptr, mrow, HAS_AFFINE: tl.constexpr,
            HAS_MOD: tl.constexpr):
    """y = (x - mean) * rstd [* w + b] [* (1 + scale) + shift] of a [1, W] tile at columns `cols` (0 past K);
    the row's modulation starts at element `mrow` of scale / shift."""
    inside = cols < K
    y = tl.where(inside[None, :], x - mean[:, None], 0.0) * rstd[:, None]
    if HAS_AFFINE:
        y = y * tl.load(w_ptr + cols, mask=inside, other=0.0)[None, :] + tl.load(b_ptr + cols, mask=inside, other=0.0)[None, :]
    if HAS_MOD:
        y = y * (1.0 + tl.load(sc_ptr + mrow + cols, mask=inside, other=0.0)[None, :]) + \
            tl.load(sh_ptr + mrow + cols, mask=inside, other=0.0)[None, :]
    return y


@triton.jit
def _round_to(v, DT: tl.constexpr, INTERPRET: tl.constexpr):
    """float32 v rounded to DT, to nearest even. (Triton 3.6's interpreter truncates a cast to bfloat16: there the
    rounding is done on the bits first, so CPU runs give the GPU's values; NaN and inf pass unchanged.)"""
    if INTERPRET and DT == tl.bfloat16:
        b = v.to(tl.uint32, bitcast=True)
        v = ((b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
    return v.to(DT)


@triton.jit
def _load_in(x_ptr, r_ptr, rg_ptr, h_ptr, row, cols, mask, K, stride_xm, stride_rm, rg_div, STORE_H: tl.constexpr,
             HAS_RES: tl.constexpr, HAS_RGATE: tl.constexpr, INTERPRET: tl.constexpr):
    """The norm's input on a [1, W] tile at columns `cols`, in float32: x, or with a residual h = (residual +
    gate[row // rg_div] * x) rounded to x's dtype (reference.epilogue_tail's add; the launch turns off FMA
    contraction, so it is the reference's h bit for bit), stored into h_ptr when STORE_H."""
    x = tl.load(x_ptr + row.to(tl.int64) * stride_xm + cols[None, :], mask=mask, other=0.0)
    v = x.to(tl.float32)
    if HAS_RES:  # (no early return above: Triton compiles the code after a constexpr-guarded return too)
        if HAS_RGATE:
            v = v * tl.load(rg_ptr + (row // rg_div).to(tl.int64) * K + cols[None, :], mask=mask, other=0.0)
        r = tl.load(r_ptr + row.to(tl.int64) * stride_rm + cols[None, :], mask=mask, other=0.0)
        h = _round_to(r.to(tl.float32) + v, x.dtype, INTERPRET)
        if STORE_H:
            tl.store(h_ptr + row.to(tl.int64) * K + cols[None, :], h, mask=mask)
        v = h.to(tl.float32)
    return v


@triton.jit
def _store_row(s_ptr, rs_ptr, fid_ptr, rows, s, good, rsum, HAS_FID: tl.constexpr):
    """Store the row's scale (NaN for a non-finite row) and row sum -> (that scale, the row's frame id)."""
    s = tl.where(good, s, float("nan"))
    tl.store(s_ptr + rows, s)
    tl.store(rs_ptr + rows, rsum)
    if HAS_FID:
        fid = tl.load(fid_ptr + rows)
    else:
        fid = tl.zeros([1], tl.int32)
    return s, fid


@triton.jit
def _store_u(u_ptr, gate_ptr, rows, fid, dot, s, j, M, G, HAS_GATE: tl.constexpr):
    """u[j, row] = dot * s [* gate[j, fid]]: consumer j's TQE term."""
    u = dot * s
    if HAS_GATE:
        u = u * tl.load(gate_ptr + j * G + fid)
    tl.store(u_ptr + j * M + rows, u)


@triton.jit
def norm_quant_kernel(
    x_ptr, y_ptr, xq_ptr, s_ptr, u_ptr, rs_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, alpha_ptr, gate_ptr, fid_ptr,
    r_ptr, rg_ptr, h_ptr, M, K, G, eps, mod_rows, stride_xm, stride_rm, rg_div,
    BITS: tl.constexpr, HAS_AFFINE: tl.constexpr, HAS_MOD: tl.constexpr, J: tl.constexpr,
    HAS_GATE: tl.constexpr, HAS_FID: tl.constexpr, HAS_RES: tl.constexpr, HAS_RGATE: tl.constexpr,
    WRITE_Y: tl.constexpr, BLOCK_K: tl.constexpr, INTERPRET: tl.constexpr,
):
    """One row per program in one [1, BLOCK_K] register tile (BLOCK_K >= K)."""
    row = tl.program_id(0)
    rows = row + tl.arange(0, 1)  # a one-row tile, so the act-quant helpers apply unchanged
    cols = tl.arange(0, BLOCK_K)
    kmask = cols[None, :] < K
    x = _load_in(x_ptr, r_ptr, rg_ptr, h_ptr, row, cols, kmask, K, stride_xm, stride_rm, rg_div, True, HAS_RES,
                 HAS_RGATE, INTERPRET)
    mean = tl.sum(x, axis=1) / K
    d = tl.where(kmask, x - mean[:, None], 0.0)
    rstd = tl.math.div_rn(tl.full(mean.shape, 1.0, tl.float32), tl.math.sqrt_rn(tl.sum(d * d, axis=1) / K + eps))
    mrow = (row // mod_rows).to(tl.int64) * K
    y = _norm_y(x, cols, K, mean, rstd, w_ptr, b_ptr, scale_ptr, shift_ptr, mrow, HAS_AFFINE, HAS_MOD)
    yr = _round_to(y, x_ptr.dtype.element_ty, INTERPRET)
    if WRITE_Y:
        tl.store(y_ptr + row.to(tl.int64) * K + cols[None, :], yr, mask=kmask)
    yq = tl.where(kmask, yr.to(tl.float32), 0.0)  # the stored y: its codes are quantize_activation(y)'s
    hi, lo = _tile_stats(yq, BITS, INTERPRET)
    s, r, z, good = _row_params(hi, lo, BITS)
    xq_i, xq_f = _codes(yq, s, r, z, good, BITS, INTERPRET)
    tl.store(xq_ptr + row.to(tl.int64) * K + cols[None, :], xq_i.to(tl.int8), mask=kmask)
    s, fid = _store_row(s_ptr, rs_ptr, fid_ptr, rows, s, good, tl.sum(xq_i, axis=1), HAS_FID)
    for j in tl.static_range(J):  # one TQE term per consumer of y
        a = tl.load(alpha_ptr + j * K + cols, mask=cols < K, other=0.0)
        _store_u(u_ptr, gate_ptr, rows, fid, tl.sum(xq_f * a[None, :], axis=1), s, j, M, G, HAS_GATE)


@triton.jit
def norm_quant_chunked_kernel(
    x_ptr, y_ptr, xq_ptr, s_ptr, u_ptr, rs_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, alpha_ptr, gate_ptr, fid_ptr,
    r_ptr, rg_ptr, h_ptr, M, K, G, eps, mod_rows, stride_xm, stride_rm, rg_div,
    BITS: tl.constexpr, HAS_AFFINE: tl.constexpr, HAS_MOD: tl.constexpr, J: tl.constexpr,
    HAS_GATE: tl.constexpr, HAS_FID: tl.constexpr, HAS_RES: tl.constexpr, HAS_RGATE: tl.constexpr,
    WRITE_Y: tl.constexpr, CHUNK: tl.constexpr, INTERPRET: tl.constexpr,
):
    """One row per program, in CHUNK-wide steps with per-lane accumulators (one reduction per quantity, within
    the program's few warps): mean, variance, then y (stored, and its min/max), then the codes of y recomputed
    by the same float ops (the launch turns off FMA contraction, so it is the stored y bit for bit), row sum
    and up to three TQE dots. Only the first pass reads HBM; the others find the row in L2. With a residual, each
    pass recomputes h from x and the residual (pass 1 stores it): no pass reads memory another thread wrote."""
    row = tl.program_id(0)
    rows = row + tl.arange(0, 1)
    lanes = tl.arange(0, CHUNK)
    orow = row.to(tl.int64) * K
    mrow = (row // mod_rows).to(tl.int64) * K
    acc = tl.zeros([1, CHUNK], tl.float32)
    k0 = 0
    while k0 < K:  # pass 1: mean (while loops: the interpreter cannot take a run-time bound in range())
        cols = k0 + lanes
        acc += _load_in(x_ptr, r_ptr, rg_ptr, h_ptr, row, cols, cols[None, :] < K, K, stride_xm, stride_rm, rg_div,
                        True, HAS_RES, HAS_RGATE, INTERPRET)
        k0 += CHUNK
    mean = tl.sum(acc, axis=1) / K
    acc = tl.zeros([1, CHUNK], tl.float32)
    k0 = 0
    while k0 < K:  # pass 2: variance, around the mean
        cols = k0 + lanes
        m = cols[None, :] < K
        x = _load_in(x_ptr, r_ptr, rg_ptr, h_ptr, row, cols, m, K, stride_xm, stride_rm, rg_div, False, HAS_RES,
                     HAS_RGATE, INTERPRET)
        d = tl.where(m, x - mean[:, None], 0.0)
        acc += d * d
        k0 += CHUNK
    rstd = tl.math.div_rn(tl.full(mean.shape, 1.0, tl.float32), tl.math.sqrt_rn(tl.sum(acc, axis=1) / K + eps))
    hi = tl.zeros([1], tl.float32)
    lo = tl.zeros([1], tl.float32)
    k0 = 0
    while k0 < K:  # pass 3: y, stored, and its statistics
        cols = k0 + lanes
        m = cols[None, :] < K
        x = _load_in(x_ptr, r_ptr, rg_ptr, h_ptr, row, cols, m, K, stride_xm, stride_rm, rg_div, False, HAS_RES,
                     HAS_RGATE, INTERPRET)
        yr = _round_to(_norm_y(x, cols, K, mean, rstd, w_ptr, b_ptr, scale_ptr, shift_ptr, mrow, HAS_AFFINE,
                               HAS_MOD), x_ptr.dtype.element_ty, INTERPRET)
        if WRITE_Y:
            tl.store(y_ptr + orow + cols[None, :], yr, mask=m)
        hi, lo = _merge_stats(hi, lo, tl.where(m, yr.to(tl.float32), 0.0), BITS, INTERPRET)
        k0 += CHUNK
    s, r, z, good = _row_params(hi, lo, BITS)
    rs_acc = tl.zeros([1, CHUNK], tl.int32)
    d0 = tl.zeros([1, CHUNK], tl.float32)
    d1 = tl.zeros([1, CHUNK], tl.float32)
    d2 = tl.zeros([1, CHUNK], tl.float32)
    k0 = 0
    while k0 < K:  # pass 4: the codes of y (recomputed), row sum, TQE dots
        cols = k0 + lanes
        m = cols[None, :] < K
        x = _load_in(x_ptr, r_ptr, rg_ptr, h_ptr, row, cols, m, K, stride_xm, stride_rm, rg_div, False, HAS_RES,
                     HAS_RGATE, INTERPRET)
        yr = _round_to(_norm_y(x, cols, K, mean, rstd, w_ptr, b_ptr, scale_ptr, shift_ptr, mrow, HAS_AFFINE,
                               HAS_MOD), x_ptr.dtype.element_ty, INTERPRET)
        xq_i, xq_f = _codes(tl.where(m, yr.to(tl.float32), 0.0), s, r, z, good, BITS, INTERPRET)
        tl.store(xq_ptr + orow + cols[None, :], xq_i.to(tl.int8), mask=m)
        rs_acc += xq_i
        if J > 0:
            d0 += xq_f * tl.load(alpha_ptr + cols, mask=cols < K, other=0.0)[None, :]
        if J > 1:
            d1 += xq_f * tl.load(alpha_ptr + K + cols, mask=cols < K, other=0.0)[None, :]
        if J > 2:
            d2 += xq_f * tl.load(alpha_ptr + 2 * K + cols, mask=cols < K, other=0.0)[None, :]
        k0 += CHUNK
    s, fid = _store_row(s_ptr, rs_ptr, fid_ptr, rows, s, good, tl.sum(rs_acc, axis=1), HAS_FID)
    if J > 0:
        _store_u(u_ptr, gate_ptr, rows, fid, tl.sum(d0, axis=1), s, 0, M, G, HAS_GATE)
    if J > 1:
        _store_u(u_ptr, gate_ptr, rows, fid, tl.sum(d1, axis=1), s, 1, M, G, HAS_GATE)
    if J > 2:
        _store_u(u_ptr, gate_ptr, rows, fid, tl.sum(d2, axis=1), s, 2, M, G, HAS_GATE)


def candidates(k: int, j: int) -> list[dict]:
    """Launch configs the tuner times: the whole row in one tile (~32 values per thread; K <= MAX_K), and
    for J <= 3 consumers CHUNK-wide steps on 1-8 warps (4-16 values per thread; on the H100 at K = 5120,
    M = 32760 CHUNK 512 on 4 warps ran 2.6x faster than the one-tile kernel, benchmarks/results/nq_bench_h100.json)."""
    out = []
    if k <= MAX_K:
        bk = max(16, triton.next_power_of_2(k))
        out.append(dict(CHUNKED=False, BLOCK_K=bk, num_warps=max(1, min(16, bk // 1024))))
    if j <= 3:
        out += [dict(CHUNKED=True, CHUNK=c, num_warps=w) for c in (256, 512, 1024, 2048) for w in (1, 2, 4, 8)
                if 4 <= c // (32 * w) <= 16 and (c < k or not out)]
    if not out:
        raise ValueError(f"norm_quantize on Triton: K = {k} > {MAX_K} needs at most 3 consumers (alphas), got {j}")
    lead = dict(CHUNKED=True, CHUNK=512, num_warps=4)  # the H100's pick at K = 1536 and 5120: first, for untuned runs
    return sorted(out, key=lambda c: c != lead)


def norm_quant(x, bits, eps, weight, bias, scale, shift, mod_rows, alphas, gates, frame_id, interpret, params=None,
               tuner=None, residual=None, residual_gate=None, write_y=True):
    """Launch: x [M, K] -> (y [M, K] x.dtype ([0, K] when not write_y), xq int8, scale f32 [M], u f32 [J, M] | None,
    rowsum int32 [M], h [M, K] | None): with `residual` the norm's input is h = residual + residual_gate * x
    (ops.add_norm_quantize).

    `params` forces one launch config; else `tuner(candidates, run)` picks one (the first without a tuner)."""
    m, k = x.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    if residual is not None and residual.stride(1) != 1:
        residual = residual.contiguous()
    dev = x.device
    y = torch.empty((m if write_y else 0, k), dtype=x.dtype, device=dev)
    h = torch.empty((m, k), dtype=x.dtype, device=dev) if residual is not None else None
    xq = torch.empty((m, k), dtype=torch.int8, device=dev)
    sx = torch.empty(m, dtype=torch.float32, device=dev)
    rs = torch.empty(m, dtype=torch.int32, device=dev)
    j = 0 if alphas is None else alphas.shape[0]
    u = torch.empty((j, m), dtype=torch.float32, device=dev) if j else None
    if m == 0:
        return y, xq, sx, u, rs, h
    f32 = lambda t: None if t is None else t.to(torch.float32).contiguous()  # noqa: E731
    w32, b32, sc32, sh32, a32, g32, rg32 = map(f32, (weight, bias, scale, shift, alphas, gates, residual_gate))
    rg_div = m // residual_gate.shape[0] if residual_gate is not None else 1
    if frame_id is not None and frame_id.dtype != torch.int32:
        frame_id = frame_id.to(torch.int32)

    def run(cfg):
        cfg = dict(cfg)
        chunked = cfg.pop("CHUNKED")
        kernel = norm_quant_chunked_kernel if chunked else norm_quant_kernel
        # (pass 3 = pass 4 bit for bit; h = the reference's add, not an FMA)
        exact = chunked or residual_gate is not None
        opts = dict(enable_fp_fusion=False) if exact and not interpret else {}
        kernel[(m,)](
            x, y, xq, sx, u, rs, w32, b32, sc32, sh32, a32, g32, frame_id, residual, rg32, h,
            m, k, 0 if gates is None else gates.shape[1], float(eps), mod_rows, x.stride(0),
            0 if residual is None else residual.stride(0), rg_div,
            BITS=bits, HAS_AFFINE=weight is not None, HAS_MOD=scale is not None, J=j, HAS_GATE=gates is not None,
            HAS_FID=frame_id is not None, HAS_RES=residual is not None, HAS_RGATE=residual_gate is not None,
            WRITE_Y=write_y, INTERPRET=interpret, **cfg, **opts,
        )

    if params is None:
        cands = candidates(k, j)
        params = cands[0] if interpret or tuner is None else tuner(cands, run)
        if interpret:
            params = dict(params, num_warps=1)
    run(params)
    return y, xq, sx, u, rs, h
