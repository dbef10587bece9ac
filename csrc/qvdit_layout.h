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

}  // namespace qv
