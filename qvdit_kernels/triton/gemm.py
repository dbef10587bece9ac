"""Packed W3/W4/W8 x int8-activation GEMM on int8 tensor cores, with the whole float epilogue fused:

    out[m, n] = sx[m] * sw[n] * (acc_raw[m, n] - zw[n] * rowsum[m]) + bias[n] + u[m] * beta[n]

then, when asked for, what the block does next (reference.epilogue_tail): `out = residual + gate[m // gdiv] *
gelu_tanh(out)`, each step rounded to the out dtype as the unfused block rounds it.

`acc_raw = xq . qw` runs over the unsigned codes straight from the packed layout (formats.py); the
weight zero point enters only in the epilogue (QServe style), as does the TQE term. With
OUT_INT32 the kernel stores the zero-corrected int32 `acc` instead (SPEC 1.1).

Design (shared/notes/h100_lowbit_gemm_facts.md): the tile computes C^T = W X^T, so the dequantized
weights are the register (left) wgmma operand; a tile is BLOCK_N weight rows x BLOCK_M tokens; every
`tl.dot` is K=128 wide (W3: two per 256-code tile, plus one for a 128-code tail tile); programs run
in grouped order (GROUP_N weight-row tiles share each activation tile, for L2 reuse).
"""
import torch
import triton
import triton.language as tl

from .activations import gelu_tanh
from .tune import persistent_grid
from .unpack import unpack_w3_full, unpack_w3_tail, unpack_w4


@triton.jit
def _tile_ids(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_N: tl.constexpr):
    """Grouped order: consecutive tiles walk GROUP_N weight tiles down one token-tile column band."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_N * num_m
    group = pid // per_group
    first_n = group * GROUP_N
    size = tl.minimum(num_n - first_n, GROUP_N)
    pid_n = first_n + (pid % per_group) % size
    pid_m = (pid % per_group) // size
    return pid_m, pid_n


@triton.jit
def _load_x(x_rows, k0, K, BK: tl.constexpr, EVEN_K: tl.constexpr):
    """Activation slice [BLOCK_M, BK] at column k0 (zero past K)."""
    kk = k0 + tl.arange(0, BK)
    if EVEN_K:
        return tl.load(x_rows + kk[None, :])
    return tl.load(x_rows + kk[None, :], mask=kk[None, :] < K, other=0)


@triton.jit
def _mainloop_step(acc, x_rows, w_rows, t, K, W_BITS: tl.constexpr, EVEN_K: tl.constexpr, USE_ASM: tl.constexpr):
    """K step t: W4 one 128-code tile (64 bytes/row), W3 one 256-code tile (96 bytes/row, two dots),
    W8 128 plain int8 codes; every dot is [BLOCK_N, 128] x [128, BLOCK_M]."""
    if W_BITS == 4:
        j = tl.arange(0, 64)
        w = unpack_w4(tl.load(w_rows + t * 64 + j[None, :]), USE_ASM)
        x = _load_x(x_rows, t * 128, K, 128, EVEN_K)
        acc = tl.dot(w, tl.trans(x), acc, out_dtype=tl.int32)
    elif W_BITS == 3:
        j = tl.arange(0, 32)
        base = w_rows + t * 96 + j[None, :]  # planes A | B | C of 32 lanes
        w0, w1 = unpack_w3_full(tl.load(base), tl.load(base + 32), tl.load(base + 64), USE_ASM)
        x0 = _load_x(x_rows, t * 256, K, 128, EVEN_K)
        x1 = _load_x(x_rows, t * 256 + 128, K, 128, EVEN_K)
        acc = tl.dot(w0, tl.trans(x0), acc, out_dtype=tl.int32)
        acc = tl.dot(w1, tl.trans(x1), acc, out_dtype=tl.int32)
    else:
        kk = t * 128 + tl.arange(0, 128)
        if EVEN_K:
            w = tl.load(w_rows + kk[None, :])
        else:
            w = tl.load(w_rows + kk[None, :], mask=kk[None, :] < K, other=0)
        x = _load_x(x_rows, t * 128, K, 128, EVEN_K)
        acc = tl.dot(w, tl.trans(x), acc, out_dtype=tl.int32)
    return acc


@triton.jit
def _tile(tile_id, x_ptr, w_ptr, sx_ptr, sw_ptr, zw_ptr, rs_ptr, bias_ptr, u_ptr, beta_ptr, out_ptr,
          res_ptr, rgate_ptr, M, N, K, W3_FULL, stride_xm, stride_wn, stride_om, stride_rm, gate_div,
          W_BITS: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_TQE: tl.constexpr,
          OUT_INT32: tl.constexpr, EVEN_K: tl.constexpr, W3_TAIL: tl.constexpr,
          USE_ASM: tl.constexpr, INTERPRET: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
          GROUP_N: tl.constexpr, GELU: tl.constexpr, HAS_RES: tl.constexpr, HAS_RGATE: tl.constexpr):
    """One output tile: the K loop, then the epilogue."""
    pid_m, pid_n = _tile_ids(tile_id, M, N, BLOCK_M, BLOCK_N, GROUP_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = (offs_m % M).to(tl.int64)  # wrapped rows: loads need no mask, stores are masked
    rn = (offs_n % N).to(tl.int64)
    x_rows = x_ptr + rm[:, None] * stride_xm
    w_rows = w_ptr + rn[:, None] * stride_wn
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.int32)
    if W_BITS == 3:
        n_steps = W3_FULL  # whole 256-code tiles; the 128-code tail tile follows the loop
    else:
        n_steps = tl.cdiv(K, 128)
    if not INTERPRET:
        for t in range(0, n_steps):
            acc = _mainloop_step(acc, x_rows, w_rows, t, K, W_BITS, EVEN_K, USE_ASM)
    else:
        # the interpreter (with numpy >= 2.3) cannot take a run-time bound in range(): same steps, while loop
        t = 0
        while t < n_steps:
            acc = _mainloop_step(acc, x_rows, w_rows, t, K, W_BITS, EVEN_K, USE_ASM)
            t += 1
    if W3_TAIL:
        # 48 bytes of the 128-code tail tile: planes of 16 lanes
        jt = tl.arange(0, 16)
        base = w_rows + W3_FULL * 96 + jt[None, :]
        w = unpack_w3_tail(tl.load(base), tl.load(base + 16), tl.load(base + 32), USE_ASM)
        x = _load_x(x_rows, W3_FULL * 256, K, 128, False)
        acc = tl.dot(w, tl.trans(x), acc, out_dtype=tl.int32)

    # ---- epilogue, on the [BLOCK_N, BLOCK_M] tile
    if HAS_ZERO:
        zw = tl.load(zw_ptr + rn).to(tl.int32)
        rs = tl.load(rs_ptr + rm)
        acc = acc - zw[:, None] * rs[None, :]  # exact: |zw * rowsum| <= 15 * 127 * K < 2^31
    out_ptrs = out_ptr + offs_m.to(tl.int64)[None, :] * stride_om + offs_n[:, None]
    mask = (offs_m[None, :] < M) & (offs_n[:, None] < N)
    if OUT_INT32:
        tl.store(out_ptrs, acc, mask=mask)
    else:
        sx = tl.load(sx_ptr + rm)
        sw = tl.load(sw_ptr + rn)
        y = acc.to(tl.float32) * sx[None, :] * sw[:, None]  # the reference's order: (acc * sx) * sw
        if HAS_BIAS:
            y = y + tl.load(bias_ptr + rn).to(tl.float32)[:, None]
        if HAS_TQE:
            y = y + tl.load(u_ptr + rm)[None, :] * tl.load(beta_ptr + rn).to(tl.float32)[:, None]
        y = _tail(y, res_ptr, rgate_ptr, offs_m, rm, rn, stride_rm, gate_div, N, mask, out_ptr.dtype.element_ty,
                  GELU, HAS_RES, HAS_RGATE)
        tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _tail(y, res_ptr, rgate_ptr, offs_m, rm, rn, stride_rm, gate_div, N, mask, OUT: tl.constexpr,
          GELU: tl.constexpr, HAS_RES: tl.constexpr, HAS_RGATE: tl.constexpr):
    """reference.epilogue_tail on the [BLOCK_N, BLOCK_M] tile: y rounded to OUT (the linear's output as the
    block sees it), gelu_tanh in float32 (torch's formula; x * sigmoid(2 z) == 0.5 x (1 + tanh z)) rounded to
    OUT, then residual + gate * y in float32."""
    if GELU or HAS_RES:
        y = y.to(OUT).to(tl.float32)
    if GELU:
        y = gelu_tanh(y).to(OUT).to(tl.float32)
    if HAS_RES:
        r = tl.load(res_ptr + offs_m.to(tl.int64)[None, :] * stride_rm + rn[:, None], mask=mask, other=0.0)
        if HAS_RGATE:
            grow = (rm // gate_div).to(tl.int64)  # int64: a per-token gate has M x N entries (> 2^31 possible)
            y = y * tl.load(rgate_ptr + grow[None, :] * N + rn[:, None])
        y = r.to(tl.float32) + y
    return y


@triton.jit
def qgemm_kernel(
    x_ptr, w_ptr, sx_ptr, sw_ptr, zw_ptr, rs_ptr, bias_ptr, u_ptr, beta_ptr, out_ptr, res_ptr, rgate_ptr,
    M, N, K, W3_FULL, stride_xm, stride_wn, stride_om, stride_rm, gate_div,
    W_BITS: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_TQE: tl.constexpr,
    OUT_INT32: tl.constexpr, EVEN_K: tl.constexpr, W3_TAIL: tl.constexpr,
    USE_ASM: tl.constexpr, INTERPRET: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    GROUP_N: tl.constexpr, GELU: tl.constexpr = False, HAS_RES: tl.constexpr = False,
    HAS_RGATE: tl.constexpr = False, PERSISTENT: tl.constexpr = False,
):
    """One tile per program, or (PERSISTENT) a fixed grid of programs striding over the tiles, the tile
    loop flattened with the K loop (meant to issue the next tile's loads during this tile's epilogue; on
    the H100 it gained <= 2% on a few W3 shapes, see configs/h100.json)."""
    if PERSISTENT:
        num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
        if not INTERPRET:
            for tile_id in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0), flatten=True):
                _tile(tile_id, x_ptr, w_ptr, sx_ptr, sw_ptr, zw_ptr, rs_ptr, bias_ptr, u_ptr, beta_ptr, out_ptr,
                      res_ptr, rgate_ptr, M, N, K, W3_FULL, stride_xm, stride_wn, stride_om, stride_rm, gate_div,
                      W_BITS, HAS_ZERO, HAS_BIAS, HAS_TQE, OUT_INT32, EVEN_K, W3_TAIL, USE_ASM, INTERPRET,
                      BLOCK_M, BLOCK_N, GROUP_N, GELU, HAS_RES, HAS_RGATE)
        else:  # the interpreter: a while loop (no run-time bound in range())
            tile_id = tl.program_id(0)
            while tile_id < num_tiles:
                _tile(tile_id, x_ptr, w_ptr, sx_ptr, sw_ptr, zw_ptr, rs_ptr, bias_ptr, u_ptr, beta_ptr, out_ptr,
                      res_ptr, rgate_ptr, M, N, K, W3_FULL, stride_xm, stride_wn, stride_om, stride_rm, gate_div,
                      W_BITS, HAS_ZERO, HAS_BIAS, HAS_TQE, OUT_INT32, EVEN_K, W3_TAIL, USE_ASM, INTERPRET,
                      BLOCK_M, BLOCK_N, GROUP_N, GELU, HAS_RES, HAS_RGATE)
                tile_id += tl.num_programs(0)
    else:
        _tile(tl.program_id(0), x_ptr, w_ptr, sx_ptr, sw_ptr, zw_ptr, rs_ptr, bias_ptr, u_ptr, beta_ptr, out_ptr,
              res_ptr, rgate_ptr, M, N, K, W3_FULL, stride_xm, stride_wn, stride_om, stride_rm, gate_div,
              W_BITS, HAS_ZERO, HAS_BIAS, HAS_TQE, OUT_INT32, EVEN_K, W3_TAIL, USE_ASM, INTERPRET,
              BLOCK_M, BLOCK_N, GROUP_N, GELU, HAS_RES, HAS_RGATE)


def launch(xq, x_scale, w_packed, w_bits, w_scale, w_zero, bias, u, beta, rowsum, out, config, interpret,
           use_asm=None, gelu=False, residual=None, residual_gate=None):
    """Run one config (dict of BLOCK_M, BLOCK_N, GROUP_N, num_warps, num_stages[, PERSISTENT = programs
    per SM]) into `out` [M, N]; `gelu`, `residual` [M, N] and `residual_gate` [G, N]: the epilogue tail.

    `use_asm` defaults to "not interpret"; False on a GPU runs the pure-Triton unpack (tests compare them).
    """
    use_asm = not interpret if use_asm is None else use_asm
    if use_asm and interpret:
        raise ValueError("use_asm=True needs a GPU: the Triton interpreter cannot run inline asm")
    m, k = xq.shape
    n = w_packed.shape[0]
    w3_full = -(-k // 128) // 2  # W3: whole 256-code tiles; kpad(K) odd multiple of 128 adds a tail tile
    tail = w_bits == 3 and -(-k // 128) % 2 == 1
    even_k = k % 128 == 0
    cfg = dict(config)
    tiles = triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"])
    per_sm = cfg.pop("PERSISTENT", 0)  # persistent configs: this many programs per SM
    grid = (persistent_grid(tiles, per_sm, xq.device, interpret),)
    gate_div = m // residual_gate.shape[0] if residual_gate is not None else 1
    qgemm_kernel[grid](
        xq, w_packed, x_scale, w_scale, w_zero, rowsum, bias, u, beta, out, residual, residual_gate,
        m, n, k, w3_full, xq.stride(0), w_packed.stride(0), out.stride(0),
        residual.stride(0) if residual is not None else 0, gate_div,
        W_BITS=w_bits, HAS_ZERO=w_bits != 8, HAS_BIAS=bias is not None, HAS_TQE=u is not None,
        OUT_INT32=out.dtype == torch.int32, EVEN_K=even_k, W3_TAIL=tail, USE_ASM=use_asm,
        INTERPRET=interpret, GELU=gelu, HAS_RES=residual is not None, HAS_RGATE=residual_gate is not None,
        PERSISTENT=bool(per_sm), **cfg,
    )
    return out
