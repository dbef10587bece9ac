// Index and unpack math shared by the CUDA kernels and the host emulator (csrc/host/emulate.cpp).
//
// Plain C++17 when not compiled by nvcc (QV_HD is then `inline`), so tests/test_cuda_build.py can build
// the emulator with the host compiler alone and check every formula here against the Python packer
// (qvdit_kernels/formats.py) and the reference GEMM without a GPU. No CUDA intrinsics in this file.
//
// Tile geometry (both GEMM paths): a CTA of 256 threads computes a kBM x kBN = 128 x 128 tile of
// y = X W^T. One mainloop step consumes KS codes of K: 256 for W3 (one 256-code tile of the W3 planes
// format, or its 128-code tail tile), 128 for W4 (one split-halves tile) and W8.
//
// Shared-memory operand layout ("SW128 K-major", the canonical layout of wgmma with 128-byte swizzle,
// also read conflict-free by ldmatrix): an operand tile of `rows` rows x KS int8 codes is stored as
// KS/128 blocks of [rows][128 bytes]; inside a block, row r starts at 128*r and its 16-byte chunk c
// sits at chunk position c ^ (r % 8). Blocks start on 1024-byte boundaries, so the XOR equals the
// hardware swizzle of address bits [4,7) with bits [7,10).
#pragma once
#include <math.h>
#include <stdint.h>

#ifdef __CUDACC__
#define QV_HD __host__ __device__ __forceinline__
#define QV_UNROLL _Pragma("unroll")
#else
#define QV_HD inline
#define QV_UNROLL
#endif

namespace qv {

constexpr int kThreads = 256;  // 8 warps = 2 warpgroups
constexpr int kBM = 128;       // activation rows (tokens) per CTA
constexpr int kBN = 128;       // weight rows (output features) per CTA

// Per weight width: codes per mainloop step (KS), packed bytes per row per step, pipeline depth.
template <int BITS>
struct Fmt;
// kStages / kCtas: pipeline depth and CTAs per SM of the sm90 kernel (W4/W8 fit two CTAs in the 228 KB of
// an SM, so one CTA's epilogue and barriers overlap the other's MMAs; a W3 step is twice as large).
template <>
struct Fmt<3> {
  static constexpr int KS = 256, kTileBytes = 96, kTailBytes = 48, kStages = 3, kCtas = 1;
};
template <>
struct Fmt<4> {
  static constexpr int KS = 128, kTileBytes = 64, kTailBytes = 64, kStages = 3, kCtas = 2;
};
template <>
struct Fmt<8> {
  static constexpr int KS = 128, kTileBytes = 128, kTailBytes = 128, kStages = 3, kCtas = 2;
};

// Byte offset of code (row, k) inside an SW128 K-major operand tile of `rows` rows.
QV_HD uint32_t sw128_offset(int row, int k, int rows) {
  return (uint32_t)((k >> 7) * rows * 128 + row * 128 + ((((k >> 4) & 7) ^ (row & 7)) << 4) + (k & 15));
}

// Shared-memory plan of one CTA (byte offsets from a 1024-aligned base). Ring slot s (of STAGES) holds
// the activation tile A[s] (SW128, kBM rows) and the packed weight bytes P[s] of one step: dense
// [kBN][kTileBytes] for W3/W4, already SW128 [kBN rows] for W8 (read directly by the MMA). W3/W4 also
// have UBUFS unpacked weight buffers U[b] (SW128, kBN rows); W8 has none.
//   sm90 path: STAGES = Fmt::kStages, UBUFS = 2 (unpack of step t+1 overlaps the async MMA of step t).
//   sm80 path: STAGES = 2, UBUFS = 1 (fits the 163 KB of an A100; W4/W8 also the 99 KB of sm_86/89).
template <int BITS, int STAGES, int UBUFS>
struct SmemPlan {
  static constexpr int KS = Fmt<BITS>::KS;
  static constexpr int kStages = STAGES;
  static constexpr int kABytes = kBM * KS;
  static constexpr int kPBytes = kBN * Fmt<BITS>::kTileBytes;
  static constexpr int kUBytes = BITS == 8 ? 0 : kBN * KS;
  static constexpr int kSlotBytes = kABytes + kPBytes;
  static constexpr int kBytes = STAGES * kSlotBytes + UBUFS * kUBytes;
  static constexpr int kAllocBytes = kBytes + 1024;  // slack to align the dynamic base to 1024
  QV_HD static uint32_t a(int slot) { return (uint32_t)(slot * kSlotBytes); }
  QV_HD static uint32_t p(int slot) { return (uint32_t)(slot * kSlotBytes + kABytes); }
  QV_HD static uint32_t u(int buf) { return (uint32_t)(STAGES * kSlotBytes + buf * kUBytes); }
  static_assert(kABytes % 1024 == 0 && kPBytes % 1024 == 0 && kUBytes % 1024 == 0, "1024-aligned buffers");
  static_assert(kAllocBytes <= 227 * 1024, "shared memory of one CTA");
  static_assert(STAGES != Fmt<BITS>::kStages || Fmt<BITS>::kCtas * (kAllocBytes + 1024) <= 228 * 1024,
                "sm90 plan: kCtas CTAs per SM (1 KB per CTA is reserved by the system)");
};
template <int BITS>
using PlanSm90 = SmemPlan<BITS, Fmt<BITS>::kStages, 2>;
template <int BITS>
using PlanSm80 = SmemPlan<BITS, 2, 1>;

// ---------------------------------------------------------------- global -> shared copy plan (16 B chunks)
// One chunk: source byte offset (from the operand base), destination offset (from the buffer), valid.
struct Chunk {
  int64_t src;
  uint32_t dst;
  bool valid;
};

// Activation chunk `ci` of step t: rows m0.., codes k0 = t*KS ..; zero-filled past M or past ka
// (ka = columns of the activation buffer, a multiple of 16).
template <int BITS>
QV_HD Chunk a_chunk(int ci, int t, int m0, int m, int ka, int64_t lda) {
  constexpr int KS = Fmt<BITS>::KS, kPerRow = KS / 16;
  const int row = ci / kPerRow, k = (ci % kPerRow) * 16, kg = t * KS + k;
  Chunk c;
  c.valid = (m0 + row < m) && (kg < ka);
  c.src = (int64_t)(m0 + row) * lda + kg;
  c.dst = sw128_offset(row, k, kBM);
  return c;
}
template <int BITS>
QV_HD constexpr int a_chunks() {
  return kBM * Fmt<BITS>::KS / 16;
}

// Packed-weight chunk `ci` of step t (rows n0..): W3 full tile 6 chunks/row, W3 tail 3, W4 4, W8 8
// (W8 bounded by kw, the columns of the int8 weight buffer, a multiple of 16).
template <int BITS>
QV_HD Chunk w_chunk(int ci, int t, bool tail, int n0, int n, int kw, int64_t ldw) {
  const int bytes = tail ? Fmt<BITS>::kTailBytes : Fmt<BITS>::kTileBytes;
  const int per_row = bytes / 16, row = ci / per_row, c16 = (ci % per_row) * 16;
  const int64_t col = (int64_t)t * Fmt<BITS>::kTileBytes + c16;  // a W3 tail tile follows the full tiles
  Chunk c;
  c.valid = (n0 + row < n) && (BITS != 8 || col < kw);
  c.src = (int64_t)(n0 + row) * ldw + col;
  c.dst = BITS == 8 ? sw128_offset(row, c16, kBN) : (uint32_t)(row * bytes + c16);  // P dense per tile kind
  return c;
}
template <int BITS>
QV_HD int w_chunks(bool tail) {
  return kBN * (tail ? Fmt<BITS>::kTailBytes : Fmt<BITS>::kTileBytes) / 16;
}

// ---------------------------------------------------------------- unpack (formats.py layouts, 4 codes per op)
// W4 split halves: byte j of a 128-code tile holds code j (low nibble) and code j + 64 (high nibble).
QV_HD uint32_t w4_lo(uint32_t p) { return p & 0x0F0F0F0Fu; }
QV_HD uint32_t w4_hi(uint32_t p) { return (p >> 4) & 0x0F0F0F0Fu; }

// W3 planes: lane bytes a, b, c (4 lanes per word) -> the 8 pieces c0..c7 of those 4 lanes.
QV_HD uint32_t w3_c0(uint32_t plane) { return plane & 0x07070707u; }         // bits 0-2 of each lane byte
QV_HD uint32_t w3_c1(uint32_t plane) { return (plane >> 3) & 0x07070707u; }  // bits 3-5
QV_HD void w3_unpack_word(uint32_t a, uint32_t b, uint32_t c, uint32_t (&out)[8]) {
  out[0] = w3_c0(a);
  out[1] = w3_c1(a);
  out[2] = w3_c0(b);
  out[3] = w3_c1(b);
  out[4] = w3_c0(c);
  out[5] = w3_c1(c);
  out[6] = ((a >> 6) & 0x03030303u) | ((b >> 4) & 0x04040404u);
  out[7] = ((b >> 7) & 0x01010101u) | ((c >> 5) & 0x06060606u);
}

// 16 bytes as four 32-bit words (little endian on host and device).
struct Vec16 {
  uint32_t w[4];
};

// Unpack work of one step, split into units of 16-byte reads: a unit reads packed bytes from P and
// writes whole 16-byte chunks of codes into U (SW128, kBN rows). `ld(off)` / `st(off, v)` access
// shared memory (device) or an emulated buffer (host).
//   W3 full tile: 256 units, unit -> (row = u % 128, half h = u / 128): lanes 16h..16h+15 of planes
//                 A, B, C; piece i (k = 32 i + j) -> chunk at k = 32 i + 16 h.
//   W3 tail tile: 128 units, unit = row: lanes 0..15 (16 per plane); piece i -> chunk at k = 16 i.
//   W4:           512 units, unit -> (row = u % 128, q = u / 128): bytes 16q.. -> chunks k = 16q, 64 + 16q.
template <int BITS, bool TAIL>
QV_HD constexpr int unpack_units() {
  return BITS == 3 ? (TAIL ? kBN : 2 * kBN) : (BITS == 4 ? 4 * kBN : 0);
}

template <int BITS, bool TAIL, class Ld, class St>
QV_HD void unpack_unit(int unit, Ld ld, St st) {
  if (BITS == 4) {
    const int row = unit % kBN, q = unit / kBN;
    const Vec16 p = ld((uint32_t)(row * 64 + 16 * q));
    Vec16 lo, hi;
QV_UNROLL
    for (int w = 0; w < 4; ++w) {
      lo.w[w] = w4_lo(p.w[w]);
      hi.w[w] = w4_hi(p.w[w]);
    }
    st(sw128_offset(row, 16 * q, kBN), lo);
    st(sw128_offset(row, 64 + 16 * q, kBN), hi);
  } else if (BITS == 3) {
    constexpr int kLanes = TAIL ? 16 : 32;
    const int row = TAIL ? unit : unit % kBN, h = TAIL ? 0 : unit / kBN;
    const uint32_t base = (uint32_t)(row * 3 * kLanes + 16 * h);
    const Vec16 a = ld(base), b = ld(base + kLanes), c = ld(base + 2 * kLanes);
    Vec16 piece[8];
QV_UNROLL
    for (int w = 0; w < 4; ++w) {
      uint32_t out[8];
      w3_unpack_word(a.w[w], b.w[w], c.w[w], out);
QV_UNROLL
      for (int i = 0; i < 8; ++i) piece[i].w[w] = out[i];
    }
QV_UNROLL
    for (int i = 0; i < 8; ++i) st(sw128_offset(row, kLanes * i + 16 * h, kBN), piece[i]);
  }
}

// ---------------------------------------------------------------- mma.sync (sm80 path) fragment addresses
// ldmatrix.x4 source row address of `lane` for the A fragment of m16n8k32 (rows r0.., codes k0..k0+31).
QV_HD uint32_t ldsm_a_offset(int lane, int r0, int k0) {
  return sw128_offset(r0 + (lane & 15), k0 + ((lane >> 4) << 4), kBM);
}
// ldmatrix.x4 source row address for the B fragments of two n8 tiles (weight rows n0..n0+15).
QV_HD uint32_t ldsm_b_offset(int lane, int n0, int k0) {
  return sw128_offset(n0 + (lane & 7) + ((lane >> 4) << 3), k0 + (((lane >> 3) & 1) << 4), kBN);
}

// Warp tiling of the sm80 path: 8 warps as 2 (M) x 4 (N), each 64 x 32 = 4 m16 x 4 n8 tiles.
constexpr int kWarpM = 64, kWarpN = 32;
QV_HD int sm80_a_row0(int warp, int mi) { return (warp / 4) * kWarpM + mi * 16; }  // m16 tile mi
QV_HD int sm80_b_row0(int warp, int nb) { return (warp % 4) * kWarpN + nb * 16; }  // n8 tiles 2nb, 2nb+1
// Register of the ldmatrix.x4 result nb = nj / 2 that holds b0 (half 0) or b1 (half 1) of n8 tile nj.
QV_HD int sm80_b_reg(int nj, int half) { return (nj % 2) * 2 + half; }
// Tile coordinates of accumulator i (0..3) of mma tile (mi, nj) held by thread tid (m16n8 C layout).
QV_HD void sm80_acc_coord(int tid, int mi, int nj, int i, int& row, int& col) {
  const int warp = tid / 32, lane = tid % 32;
  row = sm80_a_row0(warp, mi) + lane / 4 + 8 * (i >> 1);
  col = (warp % 4) * kWarpN + nj * 8 + 2 * (lane % 4) + (i & 1);
}

// ---------------------------------------------------------------- wgmma (sm90 path) descriptors
// Shared-memory matrix descriptor, SW128 K-major: start address >> 4 (bits 0-13), leading byte offset
// (unused for this layout, 1 by convention, bits 16-29), stride byte offset 1024 >> 4 between 8-row
// groups (bits 32-45), base offset 0 (1024-aligned blocks), layout type 1 = 128-byte swizzle (bits 62-63).
QV_HD uint64_t sw128_desc(uint32_t smem_addr) {
  return (uint64_t)((smem_addr & 0x3FFFFu) >> 4) | ((uint64_t)1 << 16) | ((uint64_t)(1024 >> 4) << 32) |
         ((uint64_t)1 << 62);
}
// Start addresses of the k32 slice kk of warpgroup wg's 64 A rows and of the 128 B rows in a step.
QV_HD uint32_t wgmma_a_addr(uint32_t a_tile, int wg, int kk) {
  return a_tile + (uint32_t)((kk / 4) * kBM * 128 + wg * 64 * 128 + (kk % 4) * 32);
}
QV_HD uint32_t wgmma_b_addr(uint32_t b_tile, int kk) { return b_tile + (uint32_t)((kk / 4) * kBN * 128 + (kk % 4) * 32); }
// Tile coordinates of accumulator i (0..63) of wgmma m64n128 held by thread tid (2 warpgroups).
QV_HD void wgmma_acc_coord(int tid, int i, int& row, int& col) {
  const int lane = tid % 32;
  row = (tid / 128) * 64 + ((tid / 32) % 4) * 16 + lane / 4 + 8 * ((i >> 1) & 1);
  col = 8 * (i >> 2) + 2 * (lane % 4) + (i & 1);
}

// Mainloop geometry of K: steps of Fmt<bits>::KS codes over kpad(K) = roundup(K, 128); for W3 the last
// step is a 128-code tail tile when kpad(K) is an odd multiple of 128. ka = K rounded up to 16 (the
// activation buffer width, and the W8 buffer width).
QV_HD void gemm_geometry(int bits, int k, int& steps, bool& tail, int& ka) {
  const int kp = (k + 127) / 128 * 128;
  ka = (k + 15) / 16 * 16;
  tail = bits == 3 && kp % 256 != 0;
  steps = bits == 3 ? (kp + 255) / 256 : kp / 128;
}

// ---------------------------------------------------------------- warp-specialized sm90 path (gemm_sm90_ws.cu)
// The product is computed transposed, C^T = W X^T, so the weights are wgmma's A operand and come from
// registers: each consumer thread unpacks its fragment codes straight from the packed bytes (no unpacked
// copy in shared memory), while the activations are the B operand, 128 tokens per tile, in shared memory
// (SW128 K-major, written by TMA). A CTA = 2 consumer warpgroups (64 weight rows each, wgmma m64n128k32)
// + 1 producer warpgroup (one thread issues TMA loads into a ring of kWsStages slots guarded by mbarriers). One step = 256 codes
// of K for W3 (one planes tile, or its 128-code tail) and W4 (two split-halves tiles).
constexpr int kWsKS = 256;
constexpr int kWsStages = 4;
constexpr int kWsConsumers = 256;               // 2 warpgroups
constexpr int kWsThreads = kWsConsumers + 128;  // + the producer warpgroup (warp 8 issues the loads)
// Registers per thread after setmaxnreg: 3 warps per SM sub-partition share its 16K registers, so the
// producer gives its registers to the consumers (24 + 2 x 240 <= 512 per lane).
constexpr int kWsProducerRegs = 24, kWsConsumerRegs = 240;

// Packed bytes of one weight row per step as the TMA box lands in shared memory: W3 a dense 96-byte row
// [A 32 | B 32 | C 32] (a tail tile [A 16 | B 16 | C 16 | 48 zero bytes]: the box runs past the row end and
// TMA fills zeros); W4 two 64-byte tiles in one 128-byte row with the hardware 128-byte swizzle (16-byte
// chunk c of row r at chunk c ^ (r % 8)), so the fragment loads of 8 rows hit 32 different banks. A W4 row
// with an odd tile count ends in a zero half tile, which meets zero activations.
template <int BITS>
struct WsFmt;
template <>
struct WsFmt<3> {
  static constexpr int kRowBytes = 96;
  static constexpr bool kSwizzled = false;
};
template <>
struct WsFmt<4> {
  static constexpr int kRowBytes = 128;
  static constexpr bool kSwizzled = true;
};

// Tile modes of the ws kernel (MODE), each tile 128 tokens wide:
//   kWsCoop128: both consumer warpgroups share a 128-row tile, 64 rows (MB = 1 m64 block) each;
//   kWsCoop256: both share a 256-row tile, 128 rows (MB = 2) each. This halves the activation bytes each MAC
//               pulls from L2 into shared memory (the tile is read once per 256 weight rows, not 128): at
//               128 x 128 an int8 mainloop at full rate needs ~43 B/clk/SM from L2, more than the L2 delivers
//               to all SMs at once;
//   kWsPingPong: each warpgroup owns whole 128-row tiles (MB = 2), taking every other tile of the CTA. The
//               ring's load order alternates the two, and a warpgroup starts a tile only when the other has
//               finished the mainloop of the tile before (WsPlan::turn), so one warpgroup's epilogue runs
//               while the other's MMAs do (for small K, where the per-tile epilogue is a large share).
constexpr int kWsCoop128 = 1, kWsCoop256 = 2, kWsPingPong = 3;

// The staged epilogue (ws_epilogue.cuh) moves a warpgroup's accumulators through a staging buffer in chunks:
// chunk ch of m-block mb = tokens 32 ch .. 32 ch + 31 of the tile x the m-block's 64 weight rows, as
// [token][row] int32 words with a row stride of kWsStageLd words (64 + 4: one warp's writes, 8 rows x 4 tokens
// 2 apart, hit 32 different banks).
//   writer (stage_chunk): accumulator i, 16 ch <= i < 16 ch + 16, of the thread at row lr of its m-block
//     and token column c = 2 (lane % 4) (the wgmma accumulator layout) -> (ws_stage_token, ws_stage_row);
//   reader (epilogue_rows): thread wtid of the warpgroup, pass p = 0..3, takes rows ws_read_col(wtid) ..
//     + 3 of token ws_read_token(wtid, p): 16 threads per token, 4 consecutive outputs each.
constexpr int kWsStageTokens = 32, kWsStageLd = 68;
QV_HD int ws_stage_token(int i, int c) { return 8 * ((i / 4) % 4) + c + i % 2; }
QV_HD int ws_stage_row(int i, int lr) { return lr + 8 * ((i / 2) % 2); }
QV_HD int ws_stage_word(int token, int row) { return token * kWsStageLd + row; }
QV_HD int ws_read_token(int wtid, int p) { return wtid / 16 + 8 * p; }
QV_HD int ws_read_col(int wtid) { return 4 * (wtid % 16); }

template <int BITS, int MODE>
struct WsPlan {
  static constexpr int MB = MODE == kWsCoop128 ? 1 : 2;          // m64 blocks per consumer warpgroup
  static constexpr bool kPingPong = MODE == kWsPingPong;
  static constexpr int kRows = MODE == kWsCoop256 ? 256 : 128;  // weight rows per tile
  // Whether the kernel can fuse reference.epilogue_tail (GELU, gated residual add): the cooperative modes. The
  // host takes the 128-row one for a tail unless QVDIT_WS_TAIL256=1 (qgemm_sm90_ws_mode): the 256-row tail
  // compiles without spills but has not run on a GPU yet.
  static constexpr bool kTail = MODE != kWsPingPong;
  static constexpr int kSlotConsumers = kPingPong ? 1 : 2;       // warpgroups that read (and release) a slot
  static constexpr int kStages = kRows == 256 ? 3 : kWsStages;  // (a 256-row slot is 56-64 KB)
  static constexpr int kABytes = kBM * kWsKS;                    // two SW128 blocks of [128 tokens][128 B]
  static constexpr int kPBytes = kRows * WsFmt<BITS>::kRowBytes;  // [weight rows][row bytes]
  static constexpr int kSlotBytes = kABytes + kPBytes;
  // full[s], empty[s], and (ping-pong) turn[2]: 8-byte mbarriers
  static constexpr int kBarBytes = 2 * kStages * 8 + 16;
  // The epilogue's operands of one tile, staged by its consumers while the tile's MMAs run (two buffers per
  // tile owner, alternating per tile): per token sx, rowsum, u and its residual-gate row (m / gate_div: one
  // division per token, not per output); per weight row sw, zw, bias, beta (4 bytes).
  static constexpr int kTokenArrays = 4;
  static constexpr int kParamBytes = kBM * 4 * kTokenArrays + kRows * 16;
  static constexpr int kParamBufs = kPingPong ? 4 : 2;
  // Each consumer warpgroup's epilogue staging buffer (ws_epilogue.cuh; index math: ws_stage_word below).
  static constexpr int kStageBytes = kWsStageTokens * kWsStageLd * 4;
  static constexpr int kBytes = kStages * kSlotBytes + kBarBytes + kParamBufs * kParamBytes + 2 * kStageBytes;
  static constexpr int kAllocBytes = kBytes + 1024;
  QV_HD static uint32_t a(int slot) { return (uint32_t)(slot * kSlotBytes); }
  QV_HD static uint32_t p(int slot) { return (uint32_t)(slot * kSlotBytes + kABytes); }
  QV_HD static uint32_t full(int slot) { return (uint32_t)(kStages * kSlotBytes + 8 * slot); }
  QV_HD static uint32_t empty(int slot) { return (uint32_t)(kStages * kSlotBytes + 8 * (kStages + slot)); }
  // Ping-pong: warpgroup wg may wait on its next tile's slots once turn[wg] says the other warpgroup has
  // passed every wait of its tile before (else a slot's barrier can still be a phase behind, and a parity
  // wait for this warpgroup's fill would pass on the other's unfinished one).
  QV_HD static uint32_t turn(int wg) { return (uint32_t)(kStages * kSlotBytes + 8 * (2 * kStages + wg)); }
  // operand arrays of buffer b: [kBM] sx, rowsum, u, gate row (arrays 0-3), then [kRows] sw, zw,
  // bias, beta (arrays 4-7)
  QV_HD static uint32_t param(int b, int array) {
    const uint32_t base = (uint32_t)(kStages * kSlotBytes + kBarBytes + b * kParamBytes);
    return array < kTokenArrays ? base + (uint32_t)(array * kBM * 4)
                                : base + (uint32_t)(kTokenArrays * kBM * 4 + (array - kTokenArrays) * kRows * 4);
  }
  QV_HD static uint32_t stage(int wg) {
    return (uint32_t)(kStages * kSlotBytes + kBarBytes + kParamBufs * kParamBytes + wg * kStageBytes);
  }
  // Warpgroup wg's first weight row in the tile (its m-blocks are 64 rows apart).
  QV_HD static int wg_row0(int wg) { return kPingPong ? 0 : wg * 64 * MB; }
  static_assert(kABytes % 1024 == 0 && kPBytes % 1024 == 0, "1024-aligned slots (SW128 and TMA)");
  static_assert(kBarBytes % 16 == 0 && kParamBytes % 16 == 0 && kStageBytes % 16 == 0, "16-byte shared loads");
  static_assert(kAllocBytes <= 227 * 1024, "shared memory of one CTA");
};

// The ring's protocol, shared by the kernel and its host model (emulate.cpp "ring", which plays producer and
// consumers against modelled mbarriers in random orders). Fill `it` (the CTA's it-th step over all its tiles)
// goes to slot it % S; the consumers wait for it on full[slot] with the parity of its round it / S, the
// producer waits on empty[slot] for the round before (the first round passes at once on fresh barriers).
QV_HD int ws_slot(int it, int stages) { return it % stages; }
QV_HD uint32_t ws_full_parity(int it, int stages) { return (uint32_t)((it / stages) & 1); }
QV_HD uint32_t ws_empty_parity(int it, int stages) { return ws_full_parity(it, stages) ^ 1u; }
// Whether warpgroup wg computes the CTA's ntile-th tile (both do in cooperative modes).
QV_HD bool ws_owns(bool pingpong, int ntile, int wg) { return !pingpong || (ntile & 1) == wg; }
// Ping-pong: before its tile ntile >= 1 a warpgroup waits on its turn barrier for the other warpgroup's
// arrive after tile ntile - 1, the ((ntile - 1) / 2)-th arrive on that barrier.
QV_HD uint32_t ws_turn_parity(int ntile) { return (uint32_t)(((ntile - 1) >> 1) & 1); }

// Byte offset of packed byte `col` of weight row `row` in a W3/W4 step buffer.
template <int BITS>
QV_HD uint32_t ws_p_offset(int row, int col) {
  constexpr int RB = WsFmt<BITS>::kRowBytes;
  if (WsFmt<BITS>::kSwizzled) return (uint32_t)(row * RB + ((((col >> 4) & 7) ^ (row & 7)) << 4) + (col & 15));
  return (uint32_t)(row * RB + col);
}

// mainloop steps of the ws path: kpad(K) / 256 rounded up (the last W3 step a 128-code tail tile when
// kpad(K) is an odd multiple of 128, as gemm_geometry says; the last W4 step then half zeros).
QV_HD int ws_steps(int ka) { return ((ka + 127) / 128 * 128 + kWsKS - 1) / kWsKS; }

// The weight A fragments of one step for one consumer thread. wgmma's A operand in registers (m64 x k32,
// 8-bit) gives thread T of the warpgroup, in register r of k32 slice kk, the 4 codes of row
// 16 (T / 32) + (T % 32) / 4 + 8 (r % 2) at k = 32 kk + 16 (r / 2) + 4 (T % 4) + 0..3 (the mma.m16n8k32
// A layout per warp). With the packed layouts that is word q = T % 4 of each 16-byte chunk of the row:
//   W3: lanes j = 4q.. and 16 + 4q.. of planes A, B, C -> pieces 0..7 = slices 0..7 (tail: pieces of 16
//       codes, slice kk = pieces 2kk, 2kk + 1 -> registers 0/1 and 2/3; slices 4..7 get zero codes, so
//       every step issues the same 8 MMAs: a branch around wgmma makes ptxas serialize them all);
//   W4: tile h, byte chunk x of half o: low nibbles -> slice 4h + o, high nibbles -> slice 4h + 2 + o.
// `row0` is the thread's first row in the step buffer (the second is row0 + 8); ld(off) reads 32 bits.
template <int BITS, bool TAIL, class Ld32>
QV_HD void ws_weight_frags(Ld32 ld, int row0, int q, uint32_t (&f)[8][4]) {
QV_UNROLL
  for (int ri = 0; ri < 2; ++ri) {
    const int row = row0 + 8 * ri;
    if (BITS == 4) {
QV_UNROLL
      for (int h = 0; h < 2; ++h)
QV_UNROLL
        for (int o = 0; o < 2; ++o)
QV_UNROLL
          for (int x = 0; x < 2; ++x) {
            const uint32_t p = ld(ws_p_offset<BITS>(row, 64 * h + 32 * o + 16 * x + 4 * q));
            f[4 * h + o][ri + 2 * x] = w4_lo(p);
            f[4 * h + 2 + o][ri + 2 * x] = w4_hi(p);
          }
    } else if (TAIL) {
      uint32_t c[8];
      w3_unpack_word(ld(ws_p_offset<BITS>(row, 4 * q)), ld(ws_p_offset<BITS>(row, 16 + 4 * q)),
                     ld(ws_p_offset<BITS>(row, 32 + 4 * q)), c);
QV_UNROLL
      for (int i = 0; i < 8; ++i) {
        f[i / 2][ri + 2 * (i % 2)] = c[i];
        f[4 + i / 2][ri + 2 * (i % 2)] = 0;  // slices 4..7 past the tail: zero codes (no branch around the MMAs)
      }
    } else {
QV_UNROLL
      for (int x = 0; x < 2; ++x) {
        uint32_t c[8];
        w3_unpack_word(ld(ws_p_offset<BITS>(row, 16 * x + 4 * q)), ld(ws_p_offset<BITS>(row, 32 + 16 * x + 4 * q)),
                       ld(ws_p_offset<BITS>(row, 64 + 16 * x + 4 * q)), c);
QV_UNROLL
        for (int i = 0; i < 8; ++i) f[i][ri + 2 * x] = c[i];
      }
    }
  }
}

// Half a step (k32 slices 4 h .. 4 h + 3) of one m64 block: what an MB = 2 tile unpacks at a time, so
// two m-blocks' fragments (32 registers) fit where one step of one m-block does for MB = 1. f[j0 + j] is
// slice 4 h + j. W3 half 0 needs planes A and B only (codes c0..c3), half 1 all three; a tail tile's 128 codes
// are all in half 0 (half 1 is zero codes); W4 half h is split-halves tile h.
template <int BITS, bool TAIL, class Ld32>
QV_HD void ws_weight_frags_half(Ld32 ld, int row0, int q, int h, uint32_t (&f)[8][4], int j0) {
QV_UNROLL
  for (int ri = 0; ri < 2; ++ri) {
    const int row = row0 + 8 * ri;
    if (BITS == 4) {
QV_UNROLL
      for (int o = 0; o < 2; ++o)
QV_UNROLL
        for (int x = 0; x < 2; ++x) {
          const uint32_t p = ld(ws_p_offset<BITS>(row, 64 * h + 32 * o + 16 * x + 4 * q));
          f[j0 + o][ri + 2 * x] = w4_lo(p);
          f[j0 + 2 + o][ri + 2 * x] = w4_hi(p);
        }
    } else if (TAIL) {
      uint32_t c[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      if (h == 0)
        w3_unpack_word(ld(ws_p_offset<BITS>(row, 4 * q)), ld(ws_p_offset<BITS>(row, 16 + 4 * q)),
                       ld(ws_p_offset<BITS>(row, 32 + 4 * q)), c);
QV_UNROLL
      for (int i = 0; i < 8; ++i) f[j0 + i / 2][ri + 2 * (i % 2)] = c[i];
    } else {
QV_UNROLL
      for (int x = 0; x < 2; ++x) {
        const uint32_t a = ld(ws_p_offset<BITS>(row, 16 * x + 4 * q));
        const uint32_t b = ld(ws_p_offset<BITS>(row, 32 + 16 * x + 4 * q));
        if (h == 0) {
          f[j0][ri + 2 * x] = w3_c0(a);
          f[j0 + 1][ri + 2 * x] = w3_c1(a);
          f[j0 + 2][ri + 2 * x] = w3_c0(b);
          f[j0 + 3][ri + 2 * x] = w3_c1(b);
        } else {
          uint32_t c[8];
          w3_unpack_word(a, b, ld(ws_p_offset<BITS>(row, 64 + 16 * x + 4 * q)), c);
QV_UNROLL
          for (int i = 0; i < 4; ++i) f[j0 + i][ri + 2 * x] = c[4 + i];
        }
      }
    }
  }
}

// ---------------------------------------------------------------- epilogue
// Tile order: groups of kGroupM activation-row tiles walk the weight-row tiles together, so a weight
// tile is read by consecutive CTAs (L2 reuse).
constexpr int kGroupM = 8;
QV_HD void tile_coords(int pid, int tiles_m, int tiles_n, int& tm, int& tn) {
  const int per_group = kGroupM * tiles_n, group = pid / per_group, first_m = group * kGroupM;
  const int rows = (tiles_m - first_m) < kGroupM ? (tiles_m - first_m) : kGroupM;
  tm = first_m + (pid % per_group) % rows;
  tn = (pid % per_group) / rows;
}

// Epilogue operands (device pointers; optional ones null). y = acc * sx[m] * sw[n] + bias[n] + u[m] * beta[n]
// with acc = acc_raw - zw[n] * rowsum[m], in the order of reference.py (no contraction), float32.
struct Epi {
  const float* sx;
  const float* sw;
  const float* zw;
  const int32_t* rowsum;
  const float* bias;
  const float* u;
  const float* beta;
  void* out;
  int out_kind;  // 0 bf16, 1 fp16, 2 fp32, 3 int32 (zero-corrected acc)
  int m, n;
  // Optional tail (reference.epilogue_tail; only gemm_sm90_ws.cu applies it): out = residual + gate * act(y)
  int activation;        // 0 none, 1 gelu_tanh
  const void* residual;  // [m, n] in the out dtype, row stride ld_res; null = none
  int64_t ld_res;
  const float* rgate;    // [g, n] float32, row m takes gate row m / gate_div; null = none
  int gate_div;
};

// Arguments of one GEMM launch (device pointers). The activation buffer has ka columns (K rounded up
// to 16, zero padded by the host), the W8 buffer kw; steps = mainloop steps, the last one a W3
// 128-code tail tile when `tail`.
struct GemmArgs {
  const int8_t* a;  // activation codes [m, ka], row stride lda
  int64_t lda;
  int ka;
  const uint8_t* w;  // packed weights [n, ldw bytes]
  int64_t ldw;
  int kw;
  int steps;
  bool tail;
  int tiles_m, tiles_n;
  Epi epi;  // also holds m, n
};

// acc = acc_raw - zw * rowsum in wrapping 32-bit arithmetic: the exact result fits int32 (ops.MAX_K),
// an intermediate may not. zw is integer valued (SPEC 1.1), so the conversion is exact.
QV_HD int32_t zero_corrected(int32_t acc_raw, float zw, int32_t rowsum) {
  return (int32_t)((uint32_t)acc_raw - (uint32_t)(int32_t)zw * (uint32_t)rowsum);
}

// Separate IEEE multiply and add (never fused), as the reference computes them.
#ifdef __CUDA_ARCH__
#define QV_FMUL(a, b) __fmul_rn((a), (b))
#define QV_FADD(a, b) __fadd_rn((a), (b))
#else
#define QV_FMUL(a, b) ((a) * (b))
#define QV_FADD(a, b) ((a) + (b))
#endif

// ---------------------------------------------------------------- activation quantization (SPEC 1.1)
#ifdef __CUDA_ARCH__
#define QV_FDIV(a, b) __fdiv_rn((a), (b))
#define QV_FSUB(a, b) __fsub_rn((a), (b))
#else
#define QV_FDIV(a, b) ((a) / (b))
#define QV_FSUB(a, b) ((a) - (b))
#endif

// Row parameters from the row's max and min (b <= 7) or max |x| (b = 8), in float32 exactly as
// reference.py computes them (IEEE division, round half to even, EPS = 1e-8f).
struct RowQ {
  float scale, zero, qmax;
  bool sym;
};
QV_HD float clampf(float v, float lo, float hi) { return v < lo ? lo : (v > hi ? hi : v); }
QV_HD RowQ row_qparams(int bits, float rmax, float rmin, float amax) {
  RowQ r;
  r.sym = bits == 8;
  if (r.sym) {
    const float s = QV_FDIV(amax, 127.0f);
    r.scale = s > 1e-8f ? s : 1e-8f;
    r.zero = 0.0f;
    r.qmax = 127.0f;
    return r;
  }
  r.qmax = (float)((1 << bits) - 1);
  const float hi = rmax > 0.0f ? rmax : 0.0f, lo = rmin < 0.0f ? rmin : 0.0f;
  const float s = QV_FDIV(QV_FSUB(hi, lo), r.qmax);
  r.scale = s > 1e-8f ? s : 1e-8f;
  r.zero = clampf(rintf(QV_FDIV(-lo, r.scale)), 0.0f, r.qmax);
  return r;
}
// The activation code q - z of x (an int8 value).
QV_HD int act_code(float x, const RowQ& r) {
  const float q = rintf(QV_FDIV(x, r.scale));
  if (r.sym) return (int)clampf(q, -127.0f, 127.0f);
  return (int)(clampf(q + r.zero, 0.0f, r.qmax) - r.zero);
}

// The fast path's per-element math (act_quant_regs_kernel, the Triton kernel's): the quotient RN(x / s) as
// q0 = x*r, e = fma(-q0, s, x), fma(e, r, q0) with r = RN(1/s) (Markstein's correction: exactly IEEE's quotient),
// then round half to even and clamp in the "magic" domain y = t + 1.5*2^23, where y is magic + the code (exact
// integers there): the code is bits(y) - bits(magic), its low byte the int8 code, y - magic its float value.
constexpr float kActMagic = 12582912.0f;
struct RowQMagic {
  float scale, r, ylo, yhi;  // r = RN(1/scale); y is kept in [magic - z, magic - z + qmax] (8 bits: +-127)
};
QV_HD RowQMagic row_qmagic(const RowQ& q) {
#ifdef __CUDA_ARCH__
  const float r = __frcp_rn(q.scale);
#else
  const float r = 1.0f / q.scale;
#endif
  return {q.scale, r, q.sym ? kActMagic - 127.0f : kActMagic - q.zero,
          q.sym ? kActMagic + 127.0f : kActMagic - q.zero + q.qmax};
}
QV_HD float act_code_magic(float x, const RowQMagic& p) {
#ifdef __CUDA_ARCH__
  const float q0 = __fmul_rn(x, p.r);
  const float t = __fmaf_rn(__fmaf_rn(-q0, p.scale, x), p.r, q0);
#else
  const float q0 = x * p.r;
  const float t = fmaf(fmaf(-q0, p.scale, x), p.r, q0);  // C99 fmaf: one rounding, as on the device
#endif
  const float y = QV_FADD(t, kActMagic);
  return fminf(fmaxf(y, p.ylo), p.yhi);
}

// The epilogue's float ops on loaded operands, in reference.py's order: acc * sx * sw (+ bias) (+ u * beta).
// epilogue_value reads the operands from global memory; the ws kernel (ws_epilogue.cuh) from shared memory.
QV_HD float epilogue_ops(int32_t acc, float sx, float sw, bool has_bias, float bias, bool has_u, float u,
                         float beta) {
  float y = QV_FMUL(QV_FMUL((float)acc, sx), sw);
  if (has_bias) y = QV_FADD(y, bias);
  if (has_u) y = QV_FADD(y, QV_FMUL(u, beta));
  return y;
}
// gelu_tanh in torch's own form, 0.5 x (1 + tanh z): for float32 outputs, where the fast form's few ulp would show.
QV_HD float gelu_tanh_torch(float y) {
  const float inner = 0.7978845608028654f * (y + 0.044715f * (y * y * y));
  return 0.5f * y * (1.0f + tanhf(inner));
}
// gelu_tanh as the fused tails compute it (the Triton kernel's form): x / (1 + exp(-2 z)) == 0.5 x (1 + tanh z),
// z = sqrt(2/pi) (x + 0.044715 x^3); on the device the hardware exp2 and the fast division (a few instructions,
// where tanhf costs ~20 and IEEE division a slow-path call); exp overflow gives x / inf = -0, torch's value.
QV_HD float gelu_tanh_exp(float y) {
  const float inner = 0.7978845608028654f * (y + 0.044715f * (y * y * y));
#ifdef __CUDA_ARCH__
  return __fdividef(y, 1.0f + __expf(-2.0f * inner));
#else
  return y / (1.0f + expf(-2.0f * inner));
#endif
}
// The epilogue tail's two steps on one output, as every CUDA tail computes them (ws_epilogue.cuh fused,
// epilogue_tail.cu after the kernel). GELU: float32 outputs in torch's tanh form (the fast form's few float32
// ulp would show there), 16-bit outputs in the fast exp form (far below their rounding); the caller rounds.
QV_HD float tail_gelu(float y, bool float32_out) { return float32_out ? gelu_tanh_torch(y) : gelu_tanh_exp(y); }
// residual + gate * y (without a gate, residual + y), rounded per step as reference.epilogue_tail computes it.
QV_HD float tail_residual(float res, float y, bool gated, float gate) {
  return QV_FADD(res, gated ? QV_FMUL(y, gate) : y);
}
QV_HD float epilogue_value(int32_t acc, int m, int n, const Epi& e) {
  return epilogue_ops(acc, e.sx[m], e.sw[n], e.bias != nullptr, e.bias ? e.bias[n] : 0.f, e.u != nullptr,
                      e.u ? e.u[m] : 0.f, e.u ? e.beta[n] : 0.f);
}

}  // namespace qv
