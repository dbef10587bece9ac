// Index math of the warp-specialized sm90 path (gemm_sm90_ws.cu, ws_epilogue.cuh): tile modes, the TMA ring's
// slots and parities, packed-row offsets and the register-fragment builders, the staged epilogue's indices.
// Shared with the host emulator (csrc/host/emulate.cpp) like qvdit_layout.h, and plain C++17 off nvcc.
#pragma once
#include "qvdit_layout.h"

namespace qv {

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
//               while the other's MMAs do (for small K, where the per-tile epilogue is a large share);
//   kWsDefer128: kWsCoop128 with the epilogue deferred: at the end of its mainloop a warpgroup only stages
//               its accumulators (all 4 chunks, one slab each) and starts the next tile; the epilogue of the
//               staged tile runs in pieces between the next tile's MMA groups, while they execute
//               (ws_defer_pass). Both warpgroups keep feeding the tensor cores; the epilogue's ALU work fills
//               their idle issue slots instead of leaving the tensor cores idle between tiles. Opt-in
//               (QVDIT_WS_DEFER=1): measured 0.77-0.95x as fast as kWsCoop128 (BENCHMARKS run ws9; its ring has one
//               slot fewer). Like ping-pong, hiding the epilogue did not shorten a small-K tile.
constexpr int kWsCoop128 = 1, kWsCoop256 = 2, kWsPingPong = 3, kWsDefer128 = 4;

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
// kWsDefer128: the staged tile's epilogue is 16 passes per warpgroup (pass q = chunk q / 4, token pass q % 4);
// MMA group gi of the next tile (of `groups`) is followed by passes ws_defer_pass(gi, groups) ..
// ws_defer_pass(gi + 1, groups) - 1, so every pass runs once and the work spreads evenly over the mainloop.
constexpr int kWsDeferPasses = 16;
QV_HD int ws_defer_pass(int gi, int groups) { return gi >= groups ? kWsDeferPasses : kWsDeferPasses * gi / groups; }

template <int BITS, int MODE>
struct WsPlan {
  static constexpr int MB = MODE == kWsCoop128 || MODE == kWsDefer128 ? 1 : 2;  // m64 blocks per consumer warpgroup
  static constexpr bool kPingPong = MODE == kWsPingPong;
  static constexpr bool kDeferred = MODE == kWsDefer128;
  static constexpr int kRows = MODE == kWsCoop256 ? 256 : 128;  // weight rows per tile
  // Whether the kernel can fuse reference.epilogue_tail (GELU, gated residual add): the 128-row cooperative
  // modes. (The 256-row tail ran 1.4-1.9x slower than the 128-row one, BENCHMARKS run ws7, and its registers
  // are short: it was removed.)
  static constexpr bool kTail = MODE == kWsCoop128 || MODE == kWsDefer128;
  static constexpr int kSlotConsumers = kPingPong ? 1 : 2;       // warpgroups that read (and release) a slot
  // (a 256-row slot is 56-64 KB; the deferred mode's slabs take the fourth 128-row slot's room)
  static constexpr int kStages = kRows == 256 || kDeferred ? 3 : kWsStages;
  static constexpr int kABytes = kBM * kWsKS;                    // two SW128 blocks of [128 tokens][128 B]
  static constexpr int kPBytes = kRows * WsFmt<BITS>::kRowBytes;  // [weight rows][row bytes]
  static constexpr int kSlotBytes = kABytes + kPBytes;
  // full[s], empty[s], and (ping-pong) turn[2]: 8-byte mbarriers
  static constexpr int kBarBytes = 2 * kStages * 8 + 16;
  // The epilogue's operands of one tile, staged by its consumers while the tile's MMAs run (two buffers per
  // tile owner, alternating per tile): per token one 16-byte record {sx, rowsum, u, residual-gate row (m /
  // gate_div: one division per token, not per output)}, so a token's operands are one shared load; per weight
  // row sw, zw (as int32: converted once, not per output), bias, beta, four arrays of 4 bytes.
  static constexpr int kParamBytes = kBM * 16 + kRows * 16;
  static constexpr int kParamBufs = kPingPong ? 4 : 2;
  // Each consumer warpgroup's epilogue staging buffer (ws_epilogue.cuh; index math: ws_stage_word below): one
  // chunk (slab) at a time, or (kDeferred) all 4 chunks of its tile, which wait there for the next mainloop.
  static constexpr int kStageBytes = kWsStageTokens * kWsStageLd * 4;
  static constexpr int kSlabs = kDeferred ? 4 : 1;
  static constexpr int kBytes =
      kStages * kSlotBytes + kBarBytes + kParamBufs * kParamBytes + 2 * kSlabs * kStageBytes;
  static constexpr int kAllocBytes = kBytes + 1024;
  QV_HD static uint32_t a(int slot) { return (uint32_t)(slot * kSlotBytes); }
  QV_HD static uint32_t p(int slot) { return (uint32_t)(slot * kSlotBytes + kABytes); }
  QV_HD static uint32_t full(int slot) { return (uint32_t)(kStages * kSlotBytes + 8 * slot); }
  QV_HD static uint32_t empty(int slot) { return (uint32_t)(kStages * kSlotBytes + 8 * (kStages + slot)); }
  // Ping-pong: warpgroup wg may wait on its next tile's slots once turn[wg] says the other warpgroup has
  // passed every wait of its tile before (else a slot's barrier can still be a phase behind, and a parity
  // wait for this warpgroup's fill would pass on the other's unfinished one).
  QV_HD static uint32_t turn(int wg) { return (uint32_t)(kStages * kSlotBytes + 8 * (2 * kStages + wg)); }
  // operand buffer b: the token records [kBM][4 words], then the weight-row arrays [kRows] sw, zw, bias, beta
  // (row_array 0-3)
  QV_HD static uint32_t tokens(int b) { return (uint32_t)(kStages * kSlotBytes + kBarBytes + b * kParamBytes); }
  QV_HD static uint32_t row_array(int b, int array) { return tokens(b) + (uint32_t)(kBM * 16 + array * kRows * 4); }
  // warpgroup wg's staging slab for chunk ch (the one buffer unless kDeferred)
  QV_HD static uint32_t stage(int wg, int ch = 0) {
    return (uint32_t)(kStages * kSlotBytes + kBarBytes + kParamBufs * kParamBytes +
                      (wg * kSlabs + (kDeferred ? ch : 0)) * kStageBytes);
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

}  // namespace qv
