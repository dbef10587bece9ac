// The epilogue of the warp-specialized GEMM (gemm_sm90_ws.cu), and the shared-memory accessors it shares with
// the mainloop. Per tile: the epilogue operands staged in shared memory under the first MMAs (load_params,
// store_params), then the accumulators through a per-warpgroup staging buffer (epilogue_staged) into
// row-contiguous stores, with the optional tail (reference.epilogue_tail). Device code for sm_90a only.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include <type_traits>

#include "qvdit_math.h"
#include "ws_layout.h"
#include "wgmma.cuh"  // (QV_SM90A)

namespace qv {
#ifdef QV_SM90A

__device__ __forceinline__ uint32_t lds32(uint32_t addr) {
  uint32_t v;
  asm volatile("ld.shared.b32 %0, [%1];\n" : "=r"(v) : "r"(addr) : "memory");
  return v;
}
__device__ __forceinline__ void sts32(uint32_t addr, uint32_t v) {
  asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(addr), "r"(v) : "memory");
}

// Epilogue operands of one tile, in two halves so that their global-load latency hides under the tile's
// first MMAs: load_params (consumer thread tid: token tid's record {sx, rowsum, u, residual-gate row} if
// tid < 128, weight row tid's sw, zw, bias, beta if tid < the tile's rows; indices past M or N clamped, those
// outputs are never stored), then store_params into shared-memory buffer `pb` (WsPlan::tokens, row_array).
struct Params {
  uint32_t tok[4], row[4];
};
template <class Plan>
__device__ __forceinline__ Params load_params(const Epi& e, int m0, int n0, int tid) {
  Params p = {};
  if (tid < kBM) {
    const int m = min(m0 + tid, e.m - 1);
    p.tok[0] = __float_as_uint(e.sx[m]);
    p.tok[1] = (uint32_t)e.rowsum[m];
    p.tok[2] = __float_as_uint(e.u ? e.u[m] : 0.f);
    p.tok[3] = (uint32_t)(e.rgate ? m / e.gate_div : 0);
  }
  if (tid < Plan::kRows) {
    const int n = min(n0 + tid, e.n - 1);
    p.row[0] = __float_as_uint(e.sw[n]);
    p.row[1] = (uint32_t)(int32_t)e.zw[n];  // (integer valued, SPEC 1.1: exact)
    p.row[2] = __float_as_uint(e.bias ? e.bias[n] : 0.f);
    p.row[3] = __float_as_uint(e.u ? e.beta[n] : 0.f);
  }
  return p;
}
// (tail with a residual) The tile's residual block into L2 while its mainloop runs, so that the epilogue's
// residual loads wait on L2, not on DRAM: one 128-byte line per consumer thread and pass.
template <class Plan>
__device__ __forceinline__ void prefetch_residual(const Epi& e, int m0, int n0, int tid) {
  const int el = e.out_kind == 2 ? 4 : 2, lines = Plan::kRows * el / 128;  // lines per token row of the tile
  for (int i = tid; i < kBM * lines; i += kWsConsumers) {
    const int m = m0 + i / lines, n = n0 + (i % lines) * (128 / el);
    if (m < e.m && n < e.n)
      asm volatile("prefetch.global.L2 [%0];\n" ::"l"(static_cast<const char*>(e.residual) +
                                                       ((size_t)m * e.ld_res + n) * el));
  }
}
__device__ __forceinline__ void sts128(uint32_t addr, const uint32_t (&v)[4]) {
  asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(v[0]), "r"(v[1]), "r"(v[2]), "r"(v[3])
               : "memory");
}
template <class Plan>
__device__ __forceinline__ void store_params(const Params& p, uint32_t sbase, int pb, int tid) {
  if (tid < kBM) sts128(sbase + Plan::tokens(pb) + 16 * tid, p.tok);
  if (tid < Plan::kRows)
    QV_UNROLL
    for (int a = 0; a < 4; ++a) sts32(sbase + Plan::row_array(pb, a) + 4 * tid, p.row[a]);
}

// The launch's epilogue values, read from the kernel parameters into registers once per tile (kWsDefer128: once
// per call of epilogue_passes, a few per tile). (Read through
// `const Epi&` they were loaded again for every token: the shared-memory accessors' "memory" clobbers order
// them; Nsight Compute counted 3 parameter loads and 2 null-pointer compares per 4 outputs, BENCHMARKS run ws10.)
struct EpiRegs {
  void* out;
  const void* residual;
  const float* rgate;
  int64_t ld_res;
  int ld_out;  // out's row stride in elements (Epi::ld_out)
  int m, n, activation;
  bool bias, u;
};
__device__ __forceinline__ EpiRegs epi_regs(const Epi& e) {
  return {e.out, e.residual, e.rgate, e.ld_res, (int)out_stride(e), e.m, e.n, e.activation,
          e.bias != nullptr, e.u != nullptr};
}

// The one instantiation of an epilogue for this launch's out dtype and tail choice: f(out kind, tail) with both
// as compile-time constants (std::integral_constant).
template <class Plan, class F>
__device__ __forceinline__ void for_out_kind(int out_kind, bool tail, const F& f) {
  using T = std::integral_constant<bool, Plan::kTail>;
  using NoTail = std::false_type;
  switch (out_kind + (tail ? 4 : 0)) {
    case 0: f(std::integral_constant<int, 0>{}, NoTail{}); break;
    case 1: f(std::integral_constant<int, 1>{}, NoTail{}); break;
    case 2: f(std::integral_constant<int, 2>{}, NoTail{}); break;
    case 3: f(std::integral_constant<int, 3>{}, NoTail{}); break;
    case 4: f(std::integral_constant<int, 0>{}, T{}); break;
    case 5: f(std::integral_constant<int, 1>{}, T{}); break;
    default: f(std::integral_constant<int, 2>{}, T{}); break;
  }
}

// y as the out dtype holds it (the block sees the linear's output rounded), back in float32.
template <int OUT>
__device__ __forceinline__ float round_to_out(float y) {
  if (OUT == 0) return __bfloat162float(__float2bfloat16_rn(y));
  if (OUT == 1) return __half2float(__float2half_rn(y));
  return y;
}

// reference.epilogue_tail's activation on one output: y rounded to the out dtype, gelu_tanh in float32
// (qvdit_math.h::tail_gelu), rounded again.
template <int OUT, bool TAIL>
__device__ __forceinline__ float tail_activation(int activation, float y) {
  if (!TAIL) return y;
  y = round_to_out<OUT>(y);
  if (activation == 1) y = round_to_out<OUT>(tail_gelu(y, OUT == 2));
  return y;
}

// ---------------------------------------------------------------- the staged epilogue (default)
// One consumer warpgroup's barrier (named barriers 3 and 4: 1 and 2 are the tile barriers above).
__device__ __forceinline__ void ws_warpgroup_sync(int wg) {
  if (wg == 0)  // (constant barrier ids: a register id makes ptxas reserve all 16)
    asm volatile("bar.sync 3, 128;\n" ::: "memory");
  else
    asm volatile("bar.sync 4, 128;\n" ::: "memory");
}

// A tile's epilogue in chunks of 32 tokens x one m64 block (64 weight rows) per warpgroup, through its
// staging buffer (WsPlan::stage):
//   stage_chunk: the warpgroup writes the chunk's raw accumulators into the buffer, [token][row] (thread
//     (warp w, lane l) holds rows 16 (w % 4) + l / 4 (+ 8) and tokens 2 (l % 4) + 8 jb (+ 1));
//   epilogue_rows: reads them back along rows, thread t of the warpgroup taking 4 consecutive weight rows
//     (outputs n..n+3) of token t / 16 + 8 p, p = 0..3: the zero correction, epilogue_ops (the float ops of
//     every kernel), the optional tail (reference.epilogue_tail), one 8- or 16-byte store; 16 threads cover one
//     token's 64 outputs, contiguous in memory.
// Why not straight from the accumulator registers (the kernel's first epilogue): its stores left in 4-byte
// pieces, 16 bytes per token row and warp, and its residual loads likewise; here every global access is 8-16
// bytes and row-contiguous. Measured against it on the H200 (BENCHMARKS.md, run ws6): the GEMM 1.08x faster at
// the median, 1.12-1.22x at K <= 1536; the fused tail 1.6-2x faster. The index math is ws_layout.h's
// ws_stage_* / ws_read_* (the host emulator runs it).
__device__ __forceinline__ void lds128(uint32_t addr, uint32_t (&v)[4]) {
  asm volatile("ld.shared.v4.b32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v[0]), "=r"(v[1]), "=r"(v[2]), "=r"(v[3])
               : "r"(addr)
               : "memory");
}
__device__ __forceinline__ void lds128f(uint32_t addr, float (&v)[4]) {
  uint32_t u[4];
  lds128(addr, u);
  QV_UNROLL
  for (int i = 0; i < 4; ++i) v[i] = __uint_as_float(u[i]);
}

// Chunk (mb, ch) of this thread's accumulators (m-block mb, tokens 32 ch .. 32 ch + 31) into the staging
// buffer; lr = the thread's first row in the m-block, c = its first token column.
template <int MB>
__device__ __forceinline__ void stage_chunk(uint32_t stage, int mb, int ch, int lr, int c,
                                            const uint32_t (&acc)[MB][64]) {
  QV_UNROLL
  for (int jj = 0; jj < 4; ++jj)
    QV_UNROLL
    for (int h = 0; h < 2; ++h)
      QV_UNROLL
      for (int j = 0; j < 2; ++j) {
        const int i = 4 * (4 * ch + jj) + 2 * h + j;
        sts32(stage + 4 * ws_stage_word(ws_stage_token(i, c), ws_stage_row(i, lr)), acc[mb][i]);
      }
}

// 4 consecutive values of row-major tensor p (element type: OUT's, or float32 for OUT = 2) from element i on
// as float32: one 8/16-byte load when vec, else `valid` scalar loads (the rest 0).
template <int OUT>
__device__ __forceinline__ void ld4(const void* p, size_t i, bool vec, int valid, float (&v)[4]) {
  uint32_t b[4] = {0, 0, 0, 0};  // the raw elements
  if (OUT == 2) {
    const uint32_t* f = static_cast<const uint32_t*>(p) + i;
    if (vec) {
      const uint4 q = *reinterpret_cast<const uint4*>(f);
      b[0] = q.x, b[1] = q.y, b[2] = q.z, b[3] = q.w;
    } else {
      for (int a = 0; a < valid && a < 4; ++a) b[a] = f[a];
    }
  } else {
    const uint16_t* h = static_cast<const uint16_t*>(p) + i;
    if (vec) {
      const uint2 q = *reinterpret_cast<const uint2*>(h);
      b[0] = q.x & 0xffffu, b[1] = q.x >> 16, b[2] = q.y & 0xffffu, b[3] = q.y >> 16;
    } else {
      for (int a = 0; a < valid && a < 4; ++a) b[a] = h[a];
    }
  }
  QV_UNROLL
  for (int a = 0; a < 4; ++a)
    v[a] = OUT == 2 ? __uint_as_float(b[a])
         : OUT == 0 ? __uint_as_float(b[a] << 16)
                    : __half2float(__ushort_as_half((unsigned short)b[a]));
}

// Stores 4 outputs (row-major out, element i on): y rounded to the out dtype, or cv for int32 outputs.
template <int OUT>
__device__ __forceinline__ void st4(void* p, size_t i, bool vec, int valid, const float (&y)[4],
                                    const int32_t (&cv)[4]) {
  uint32_t b[4];  // the raw elements
  QV_UNROLL
  for (int a = 0; a < 4; ++a)
    b[a] = OUT == 3   ? (uint32_t)cv[a]
         : OUT == 2 ? __float_as_uint(y[a])
         : OUT == 1 ? (uint32_t)__half_as_ushort(__float2half_rn(y[a]))
                    : (uint32_t)__bfloat16_as_ushort(__float2bfloat16_rn(y[a]));
  if (OUT >= 2) {  // float32 / int32: 16 bytes
    uint32_t* d = static_cast<uint32_t*>(p) + i;
    if (vec)
      *reinterpret_cast<uint4*>(d) = make_uint4(b[0], b[1], b[2], b[3]);
    else
      for (int a = 0; a < valid && a < 4; ++a) d[a] = b[a];
  } else {  // 16-bit: 8 bytes
    uint16_t* d = static_cast<uint16_t*>(p) + i;
    if (vec)
      *reinterpret_cast<uint2*>(d) = make_uint2(b[0] | (b[1] << 16), b[2] | (b[3] << 16));
    else
      for (int a = 0; a < valid && a < 4; ++a) d[a] = (uint16_t)b[a];
  }
}

// A thread's 4 weight rows' epilogue operands (tile rows r .. r + 3, from buffer pb).
struct RowOps {
  float sw[4], bias[4], beta[4];
  int32_t zw[4];
};
template <class Plan>
__device__ __forceinline__ void load_row_ops(uint32_t sbase, int pb, int r, RowOps& o) {
  uint32_t zw[4];
  lds128f(sbase + Plan::row_array(pb, 0) + 4 * r, o.sw);
  lds128(sbase + Plan::row_array(pb, 1) + 4 * r, zw);
  lds128f(sbase + Plan::row_array(pb, 2) + 4 * r, o.bias);
  lds128f(sbase + Plan::row_array(pb, 3) + 4 * r, o.beta);
  QV_UNROLL
  for (int a = 0; a < 4; ++a) o.zw[a] = (int32_t)zw[a];
}

// Whether a thread's 4 outputs from column n on (valid of them in range) take 8/16-byte accesses: whole 4-output
// groups (n is a multiple of 4) in rows that start 4-element aligned.
template <int OUT, bool TAIL>
__device__ __forceinline__ bool epilogue_vec(const EpiRegs& e, int valid) {
  constexpr int kEl = OUT >= 2 ? 4 : 2;  // bytes per output
  const auto al = [](const void* p, int64_t ld, int bytes) {
    return reinterpret_cast<uintptr_t>(p) % (4 * bytes) == 0 && (ld * bytes) % (4 * bytes) == 0;
  };
  return valid >= 4 && al(e.out, e.ld_out, kEl) && (!TAIL || !e.residual || al(e.residual, e.ld_res, kEl)) &&
         (!TAIL || !e.rgate || al(e.rgate, e.n, 4));
}

// (TAIL with a residual) the residual and gate values of token m's outputs n .. n + 3 (tt: the token in the tile).
template <int OUT, bool TAIL, class Plan>
__device__ __forceinline__ void tail_loads(const EpiRegs& e, uint32_t sbase, int pb, int tt, int m, int n, bool vec,
                                           int valid, float (&res)[4], float (&gate)[4]) {
  if (!(TAIL && e.residual)) return;
  ld4<OUT>(e.residual, (size_t)m * e.ld_res + n, vec, valid, res);
  if (e.rgate) {
    const int grow = (int)lds32(sbase + Plan::tokens(pb) + 16 * tt + 12);  // (the record's gate row)
    ld4<2>(e.rgate, (size_t)grow * e.n + n, vec, valid, gate);
  }
}

// One token's 4 outputs: token tl of the staged chunk at `stage` (tt in the tile, m in the output), rows col ..
// col + 3 of the chunk (outputs n .. n + 3): the zero correction, epilogue_ops (the float ops of every kernel),
// the optional tail (reference.epilogue_tail), one 8- or 16-byte store.
template <int OUT, bool TAIL, class Plan>
__device__ __forceinline__ void epilogue_token(const EpiRegs& e, uint32_t sbase, uint32_t stage, int pb,
                                               const RowOps& r, int tl, int tt, int m, int n, int col, bool vec,
                                               int valid, const float (&res)[4], const float (&gate)[4]) {
  uint32_t raw[4], tok[4];
  lds128(stage + 4 * ws_stage_word(tl, col), raw);
  lds128(sbase + Plan::tokens(pb) + 16 * tt, tok);  // {sx, rowsum, u, gate row}
  const float sx = __uint_as_float(tok[0]), um = __uint_as_float(tok[2]);
  const int32_t rs = (int32_t)tok[1];
  float y[4];
  int32_t cv[4];
  QV_UNROLL
  for (int a = 0; a < 4; ++a) {
    cv[a] = zero_corrected((int32_t)raw[a], r.zw[a], rs);
    float v = epilogue_ops(cv[a], sx, r.sw[a], e.bias, r.bias[a], e.u, um, r.beta[a]);
    v = tail_activation<OUT, TAIL>(e.activation, v);
    if (TAIL && e.residual) v = tail_residual(res[a], v, e.rgate != nullptr, gate[a]);
    y[a] = v;
  }
  st4<OUT>(e.out, (size_t)m * e.ld_out + n, vec, valid, y, cv);
}

// The 4 tokens of this thread in a staged chunk (see epilogue_rows). FULL: every token in range and 4 whole
// outputs each (vec, valid = 4), so no per-token checks (the tiles inside the output, all but the edges).
template <int OUT, bool TAIL, bool LEAN, bool FULL, class Plan>
__device__ __forceinline__ void epilogue_chunk(const EpiRegs& e, uint32_t sbase, uint32_t stage, int pb, int m0,
                                               int n, int r0, int t0, int wtid, int col, bool vec, int valid,
                                               RowOps& r) {
  constexpr int PF = LEAN ? 1 : 4;  // tokens whose tail loads go out together
  if (FULL) vec = true, valid = 4;
  QV_UNROLL
  for (int p0 = 0; p0 < 4; p0 += PF) {
    // (TAIL) the residual and gate values of PF tokens first: out may alias residual, so a later token's
    // loads could not move above an earlier one's stores
    float res[PF][4], gate[PF][4];
    QV_UNROLL
    for (int p = 0; p < PF; ++p) {
      const int tt = t0 + ws_read_token(wtid, p0 + p);
      if (FULL || m0 + tt < e.m) tail_loads<OUT, TAIL, Plan>(e, sbase, pb, tt, m0 + tt, n, vec, valid, res[p], gate[p]);
    }
    QV_UNROLL
    for (int p = 0; p < PF; ++p) {
      const int tl = ws_read_token(wtid, p0 + p), m = m0 + t0 + tl;
      if (!FULL && m >= e.m) continue;
      if (LEAN) load_row_ops<Plan>(sbase, pb, r0, r);
      epilogue_token<OUT, TAIL, Plan>(e, sbase, stage, pb, r, tl, t0 + tl, m, n, col, vec, valid, res[p], gate[p]);
    }
  }
}

// The staged chunk back along rows (see above): rb = the m-block's first row in the tile, t0 = the chunk's
// first token in the tile, wtid = the thread's index in its warpgroup. LEAN (MB = 2: 128 accumulator
// registers stay live through the loop over chunks, within the 168 registers ptxas compiles for: the launch
// bounds' 384 threads; setmaxnreg raises the limit only at run time): the weight-row operands are re-read per
// token; else they are read once, and (TAIL, 128-row modes only) the tail's residual and gate loads of all 4
// tokens go out together (latency hidden once, not 4 times).
template <int OUT, bool TAIL, bool LEAN, class Plan>
__device__ __forceinline__ void epilogue_rows(const EpiRegs& e, uint32_t sbase, uint32_t stage, int pb, int m0,
                                              int n0, int rb, int t0, int wtid) {
  static_assert(!(LEAN && TAIL), "the tail runs only in the 128-row modes (WsPlan::kTail)");
  const int col = ws_read_col(wtid), n = n0 + rb + col, valid = e.n - n;
  if (valid <= 0) return;
  RowOps r;
  if (!LEAN) load_row_ops<Plan>(sbase, pb, rb + col, r);
  const bool vec = epilogue_vec<OUT, TAIL>(e, valid);
  // (no FULL copy where registers are short: it schedules the 4 tokens' loads together, and the 256-row (LEAN)
  // and ping-pong kernels then spill)
  constexpr bool kFullCopy = !LEAN && !Plan::kPingPong;
  if (kFullCopy && vec && m0 + t0 + kWsStageTokens <= e.m)
    epilogue_chunk<OUT, TAIL, LEAN, true, Plan>(e, sbase, stage, pb, m0, n, rb + col, t0, wtid, col, vec, valid, r);
  else
    epilogue_chunk<OUT, TAIL, LEAN, false, Plan>(e, sbase, stage, pb, m0, n, rb + col, t0, wtid, col, vec, valid, r);
}

// kWsDefer128: passes q0 .. q1 - 1 (ws_layout.h, ws_defer_pass) of the tile at (m0, n0) that waits in warpgroup
// wg's slabs, its operands in buffer pb. Called between the next tile's MMA groups: a rolled loop (its code runs
// beside the mainloop's registers), the row operands read once per call.
template <int OUT, bool TAIL, class Plan>
__device__ __forceinline__ void epilogue_passes(const Epi& ep, uint32_t sbase, int pb, int wg, int m0, int n0,
                                                int wtid, int q0, int q1) {
  const EpiRegs e = epi_regs(ep);
  const int col = ws_read_col(wtid), n = n0 + Plan::wg_row0(wg) + col, valid = e.n - n;
  if (valid <= 0 || q0 >= q1) return;
  RowOps r;
  load_row_ops<Plan>(sbase, pb, Plan::wg_row0(wg) + col, r);
  const bool vec = epilogue_vec<OUT, TAIL>(e, valid);
#pragma unroll 1
  for (int q = q0; q < q1; ++q) {
    const int ch = q / 4, tl = ws_read_token(wtid, q % 4), tt = kWsStageTokens * ch + tl, m = m0 + tt;
    if (m >= e.m) break;  // (tt grows with q)
    float res[4], gate[4];
    tail_loads<OUT, TAIL, Plan>(e, sbase, pb, tt, m, n, vec, valid, res, gate);
    epilogue_token<OUT, TAIL, Plan>(e, sbase, sbase + Plan::stage(wg, ch), pb, r, tl, tt, m, n, col, vec, valid, res,
                                    gate);
  }
}

// The deferred passes in this launch's out dtype and tail choice (only that instantiation runs).
template <class Plan>
__device__ __forceinline__ void epilogue_passes_for(const Epi& e, bool tail, uint32_t sbase, int pb, int wg, int m0,
                                                    int n0, int wtid, int q0, int q1) {
  for_out_kind<Plan>(e.out_kind, tail, [&](auto out, auto t) {
    epilogue_passes<decltype(out)::value, decltype(t)::value, Plan>(e, sbase, pb, wg, m0, n0, wtid, q0, q1);
  });
}

// kWsDefer128: this warpgroup's accumulators of the tile into its 4 slabs (no barrier between chunks: each has
// its own slab).
template <class Plan>
__device__ __forceinline__ void stage_all(uint32_t sbase, int wg, int lr, int c, const uint32_t (&acc)[Plan::MB][64]) {
  QV_UNROLL
  for (int ch = 0; ch < 4; ++ch) stage_chunk<Plan::MB>(sbase + Plan::stage(wg, ch), 0, ch, lr, c, acc);
}

// The staged epilogue of one tile for warpgroup wg, one out dtype and tail choice. Unrolled over the chunks:
// the accumulators of a staged chunk are dead, so registers free up as it goes (a rolled loop would keep all
// 64 MB live through it); only the instantiation for this call's out dtype runs.
template <int OUT, bool TAIL, class Plan>
__device__ __forceinline__ void epilogue_staged(const EpiRegs& e, uint32_t sbase, int pb, int wg, int m0, int n0,
                                                int lr, int c, int wtid, const uint32_t (&acc)[Plan::MB][64]) {
  const uint32_t stage = sbase + Plan::stage(wg);
  QV_UNROLL
  for (int k = 0; k < 4 * Plan::MB; ++k) {
    // (k = 0: the barrier before the epilogue ordered the last reads of the buffer, the tile before's)
    if (k > 0) ws_warpgroup_sync(wg);
    stage_chunk<Plan::MB>(stage, k / 4, k % 4, lr, c, acc);
    ws_warpgroup_sync(wg);
    epilogue_rows<OUT, TAIL, Plan::MB == 2, Plan>(e, sbase, stage, pb, m0, n0, Plan::wg_row0(wg) + 64 * (k / 4),
                                                  32 * (k % 4), wtid);
  }
}

#endif  // QV_SM90A
}  // namespace qv
