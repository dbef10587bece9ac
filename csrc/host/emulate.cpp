// Host emulator of the CUDA kernels' data paths (no GPU): runs the index, copy-plan, unpack, fragment
// and epilogue functions of csrc/qvdit_layout.h, ws_layout.h and qvdit_math.h exactly as the kernels call them, and emulates the
// hardware pieces (cp.async, TMA boxes, ldmatrix, mma.sync m16n8k32, wgmma descriptors, register
// operands and accumulators) from their PTX ISA definitions. tests/test_cuda_build.py builds it with the host C++ compiler and checks
// its results against the Python packer and reference bit for bit. What it cannot see: races,
// barriers and pipeline timing (compute-sanitizer racecheck on the GPU covers those).
//
//   emulate gemm BITS M K N DIR  reads DIR/{xq,w,sx,sw,zw,bias,u,beta}.bin, writes DIR/{acc80,acc90}.bin
//                                (int32 zero-corrected accumulators; W3/W4 also accws{1,2,3}.bin, the
//                                warp-specialized path in each tile mode, its outputs through the staged
//                                epilogue's buffer: every word written once, read once, bank-conflict-free
//                                stores) and DIR/y90.bin (float32 epilogue)
//   emulate actq BITS M K G DIR  reads DIR/{x,alpha,gate,fid}.bin (float32, fid int32), writes
//                                DIR/{xq,scale,u,rowsum}.bin (the codes as the one-CTA-per-row kernel computes
//                                them; actq_magic: as the register kernel does, qvdit_math.h::act_code_magic)
//   emulate ring MODE STEPS TILES STAGES SEEDS
//                                the ws ring's barrier protocol in random interleavings (exit 1 on a wrong
//                                fill or a deadlock, with a message)
#include <climits>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "../qvdit_layout.h"
#include "../qvdit_math.h"
#include "../ws_layout.h"
#include "emu_actq.h"
#include "emu_io.h"
#include "emu_ring.h"

using namespace qv;
using namespace qv::emu;

namespace {

// ------------------------------------------------------------------ problem set-up (as bindings.cpp does)
struct Problem {
  int bits, m, k, n;
  std::vector<int8_t> a;   // [m, ka] zero padded
  std::vector<uint8_t> w;  // packed [n, ldw]
  std::vector<int32_t> rowsum;
  std::vector<float> sx, sw, zw, bias, u, beta;
  GemmArgs g{};
};

void setup(Problem& p, const std::string& dir) {
  int ka = 0;
  gemm_geometry(p.bits, p.k, p.g.steps, p.g.tail, ka);
  const int kp = (p.k + 127) / 128 * 128;
  const int row_bytes = p.bits == 8 ? p.k : kp * p.bits / 8;
  const auto xq = read_file<int8_t>(dir + "/xq.bin", (size_t)p.m * p.k);
  const auto wp = read_file<uint8_t>(dir + "/w.bin", (size_t)p.n * row_bytes);
  p.a.assign((size_t)p.m * ka, 0);
  p.rowsum.assign(p.m, 0);
  for (int r = 0; r < p.m; ++r)
    for (int c = 0; c < p.k; ++c) {
      p.a[(size_t)r * ka + c] = xq[(size_t)r * p.k + c];
      p.rowsum[r] += xq[(size_t)r * p.k + c];
    }
  const int ldw = p.bits == 8 ? ka : row_bytes;
  p.w.assign((size_t)p.n * ldw, 0);
  for (int r = 0; r < p.n; ++r) std::memcpy(&p.w[(size_t)r * ldw], &wp[(size_t)r * row_bytes], row_bytes);
  p.sx = read_file<float>(dir + "/sx.bin", p.m);
  p.u = read_file<float>(dir + "/u.bin", p.m);
  p.sw = read_file<float>(dir + "/sw.bin", p.n);
  p.zw = read_file<float>(dir + "/zw.bin", p.n);
  p.bias = read_file<float>(dir + "/bias.bin", p.n);
  p.beta = read_file<float>(dir + "/beta.bin", p.n);
  GemmArgs& g = p.g;
  g.a = p.a.data();
  g.lda = ka;
  g.ka = ka;
  g.w = p.w.data();
  g.ldw = ldw;
  g.kw = p.bits == 8 ? ka : 0;
  g.tiles_m = (p.m + kBM - 1) / kBM;
  g.tiles_n = (p.n + kBN - 1) / kBN;
  g.epi = Epi{p.sx.data(), p.sw.data(), p.zw.data(), p.rowsum.data(), p.bias.data(), p.u.data(), p.beta.data(),
              nullptr, 2, p.m, p.n, 0, nullptr, 0, nullptr, 1, 0};  // no epilogue tail; contiguous out
}

// ------------------------------------------------------------------ one mainloop step's copies and unpack
// The per-thread loops of qvdit_kernels.cuh::load_step, with cp.async as a 16-byte copy or zero fill.
template <int BITS>
void load_step(const GemmArgs& g, std::vector<uint8_t>& sm, uint32_t a_dst, uint32_t p_dst, int t, bool tail, int m0,
               int n0) {
  auto copy = [&](const Chunk& c, const uint8_t* base, uint32_t dst) {
    expect(dst % 16 == 0 && dst + 16 <= sm.size(), "cp.async destination misaligned or out of bounds");
    if (c.valid) {
      expect(c.src % 16 == 0, "cp.async source misaligned");
      std::memcpy(&sm[dst], base + c.src, 16);
    } else {
      std::memset(&sm[dst], 0, 16);
    }
  };
  for (int tid = 0; tid < kThreads; ++tid) {
    for (int i = 0; i < a_chunks<BITS>() / kThreads; ++i) {
      const Chunk c = a_chunk<BITS>(tid + i * kThreads, t, m0, g.epi.m, g.ka, g.lda);
      copy(c, reinterpret_cast<const uint8_t*>(g.a), a_dst + c.dst);
    }
    for (int ci = tid; ci < w_chunks<BITS>(tail); ci += kThreads) {
      const Chunk c = w_chunk<BITS>(ci, t, tail, n0, g.epi.n, g.kw, g.ldw);
      copy(c, g.w, p_dst + c.dst);
    }
  }
}

template <int BITS, bool TAIL>
void unpack_t(std::vector<uint8_t>& sm, uint32_t p_src, uint32_t u_dst) {
  auto ld = [&](uint32_t off) {
    Vec16 v;
    expect((p_src + off) % 16 == 0, "unpack load misaligned");
    for (int w = 0; w < 4; ++w) v.w[w] = load32(sm, p_src + off + 4 * w);
    return v;
  };
  auto st = [&](uint32_t off, const Vec16& v) {
    expect((u_dst + off) % 16 == 0 && u_dst + off + 16 <= sm.size(), "unpack store misaligned or out of bounds");
    std::memcpy(&sm[u_dst + off], v.w, 16);
  };
  for (int unit = 0; unit < unpack_units<BITS, TAIL>(); ++unit) unpack_unit<BITS, TAIL>(unit, ld, st);
}
template <int BITS>
void unpack(std::vector<uint8_t>& sm, uint32_t p_src, uint32_t u_dst, bool tail) {
  if (BITS == 3 && tail)
    unpack_t<BITS, true>(sm, p_src, u_dst);
  else
    unpack_t<BITS, false>(sm, p_src, u_dst);
}

// ------------------------------------------------------------------ PTX semantics
// ldmatrix.m8n8.x4.b16: matrix j's row i comes from the address given by lane 8j + i; thread T gets,
// in register j, the 4 bytes at column 4 (T % 4) of row T / 4 of matrix j.
void ldmatrix_x4(const std::vector<uint8_t>& sm, const uint32_t (&addr)[32], uint32_t (&regs)[32][4]) {
  for (int l = 0; l < 32; ++l) expect(addr[l] % 16 == 0, "ldmatrix row address not 16-byte aligned");
  for (int tr = 0; tr < 32; ++tr)
    for (int j = 0; j < 4; ++j) regs[tr][j] = load32(sm, addr[8 * j + tr / 4] + 4 * (tr % 4));
}

int8_t byte_of(uint32_t r, int b) { return (int8_t)((r >> (8 * b)) & 0xFF); }

// mma.sync.m16n8k32.row.col.s32.s8.s8.s32 (PTX ISA "Matrix fragments for mma.m16n8k32"): thread T,
// group g = T / 4, t = T % 4. A register r holds row g + 8 (r % 2), columns 4t + 16 (r / 2) + 0..3;
// B register r holds column g, rows 4t + 16 r + 0..3; C/D element i is row g + 8 (i / 2), column 2t + i % 2.
void mma_16832(const uint32_t (&a)[32][4], const uint32_t (&b0)[32], const uint32_t (&b1)[32], int32_t (*acc)[4]) {
  int A[16][32], B[32][8];
  for (int tr = 0; tr < 32; ++tr) {
    const int g = tr / 4, t = tr % 4;
    for (int r = 0; r < 4; ++r)
      for (int b = 0; b < 4; ++b) A[g + 8 * (r % 2)][4 * t + 16 * (r / 2) + b] = byte_of(a[tr][r], b);
    for (int b = 0; b < 4; ++b) {
      B[4 * t + b][g] = byte_of(b0[tr], b);
      B[4 * t + 16 + b][g] = byte_of(b1[tr], b);
    }
  }
  for (int tr = 0; tr < 32; ++tr) {
    const int g = tr / 4, t = tr % 4;
    for (int i = 0; i < 4; ++i) {
      const int row = g + 8 * (i / 2), col = 2 * t + i % 2;
      int32_t s = 0;
      for (int kk = 0; kk < 32; ++kk) s += A[row][kk] * B[kk][col];
      acc[tr][i] += s;
    }
  }
}

// Element (r, c) (c in bytes) of a K-major operand seen through a wgmma shared-memory descriptor with
// 128-byte swizzle: canonical layout ((8, m), (T, 2k)) : ((8T, SBO), (1, T)), then the address XOR
// of bits [4,7) with bits [7,10).
int8_t desc_read(const std::vector<uint8_t>& sm, uint64_t desc, int r, int c) {
  expect((desc >> 62) == 1, "descriptor layout type is not 128-byte swizzle");
  expect(((desc >> 49) & 7) == 0, "descriptor base offset is not 0");
  const uint32_t start = (uint32_t)(desc & 0x3FFF) << 4, sbo = (uint32_t)((desc >> 32) & 0x3FFF) << 4;
  expect(sbo == 1024, "stride byte offset is not 1024");
  uint32_t addr = start + (uint32_t)(r / 8) * sbo + (uint32_t)(r % 8) * 128 + (uint32_t)c;
  addr ^= ((addr >> 7) & 7) << 4;
  expect(addr < sm.size(), "wgmma read out of bounds");
  return (int8_t)sm[addr];
}

// ------------------------------------------------------------------ the two CTA data paths
template <int BITS>
void cta_sm80(const Problem& p, int tm, int tn, std::vector<int32_t>& out, std::vector<int>& hits) {
  using Plan = PlanSm80<BITS>;
  const GemmArgs& g = p.g;
  std::vector<uint8_t> sm(Plan::kBytes, 0xA5);  // garbage: a read of an unwritten byte shows
  std::vector<int32_t> acc(kThreads * 64, 0);   // [tid][mi][nj][i]
  const int m0 = tm * kBM, n0 = tn * kBN;
  for (int t = 0; t < g.steps; ++t) {
    const int slot = t & 1;
    const bool tail = g.tail && t == g.steps - 1;
    load_step<BITS>(g, sm, Plan::a(slot), Plan::p(slot), t, tail, m0, n0);
    uint32_t b_base = Plan::p(slot);
    if (BITS != 8) {
      unpack<BITS>(sm, Plan::p(slot), Plan::u(0), tail);
      b_base = Plan::u(0);
    }
    for (int kk = 0; kk < Fmt<BITS>::KS / 32 && !(tail && kk >= 4); ++kk) {
      for (int warp = 0; warp < 8; ++warp) {
        uint32_t af[4][32][4], bf[2][32][4], addr[32];
        for (int mi = 0; mi < 4; ++mi) {
          for (int l = 0; l < 32; ++l) addr[l] = Plan::a(slot) + ldsm_a_offset(l, sm80_a_row0(warp, mi), kk * 32);
          ldmatrix_x4(sm, addr, af[mi]);
        }
        for (int nb = 0; nb < 2; ++nb) {
          for (int l = 0; l < 32; ++l) addr[l] = b_base + ldsm_b_offset(l, sm80_b_row0(warp, nb), kk * 32);
          ldmatrix_x4(sm, addr, bf[nb]);
        }
        for (int mi = 0; mi < 4; ++mi)
          for (int nj = 0; nj < 4; ++nj) {
            uint32_t b0[32], b1[32];
            int32_t frag[32][4];
            for (int l = 0; l < 32; ++l) {
              b0[l] = bf[nj / 2][l][sm80_b_reg(nj, 0)];
              b1[l] = bf[nj / 2][l][sm80_b_reg(nj, 1)];
              for (int i = 0; i < 4; ++i) frag[l][i] = acc[((warp * 32 + l) * 16 + mi * 4 + nj) * 4 + i];
            }
            mma_16832(af[mi], b0, b1, frag);
            for (int l = 0; l < 32; ++l)
              for (int i = 0; i < 4; ++i) acc[((warp * 32 + l) * 16 + mi * 4 + nj) * 4 + i] = frag[l][i];
          }
      }
    }
  }
  for (int tid = 0; tid < kThreads; ++tid)
    for (int mi = 0; mi < 4; ++mi)
      for (int nj = 0; nj < 4; ++nj)
        for (int i = 0; i < 4; ++i) {
          int row, col;
          sm80_acc_coord(tid, mi, nj, i, row, col);
          row += m0;
          col += n0;
          if (row >= p.m || col >= p.n) continue;
          const size_t idx = (size_t)row * p.n + col;
          out[idx] = zero_corrected(acc[((tid * 16) + mi * 4 + nj) * 4 + i], p.zw[col], p.rowsum[row]);
          ++hits[idx];
        }
}

template <int BITS>
void cta_sm90(const Problem& p, int tm, int tn, std::vector<int32_t>& out, std::vector<int>& hits) {
  using Plan = PlanSm90<BITS>;
  constexpr int S = Plan::kStages;
  const GemmArgs& g = p.g;
  std::vector<uint8_t> sm(Plan::kBytes, 0x5A);
  std::vector<int32_t> acc(kThreads * 64, 0);  // [tid][i]
  const int m0 = tm * kBM, n0 = tn * kBN;
  for (int t = 0; t < g.steps; ++t) {
    const bool tail = g.tail && t == g.steps - 1;
    load_step<BITS>(g, sm, Plan::a(t % S), Plan::p(t % S), t, tail, m0, n0);
    uint32_t b_tile = Plan::p(t % S);
    if (BITS != 8) {
      unpack<BITS>(sm, Plan::p(t % S), Plan::u(t & 1), tail);
      b_tile = Plan::u(t & 1);
    }
    for (int kk = 0; kk < Fmt<BITS>::KS / 32 && !(tail && kk >= 4); ++kk) {
      const uint64_t db = sw128_desc(wgmma_b_addr(b_tile, kk));
      for (int wg = 0; wg < 2; ++wg) {
        const uint64_t da = sw128_desc(wgmma_a_addr(Plan::a(t % S), wg, kk));
        // wgmma m64n128k32: D[64][128] = A[64][32] * B[128][32]^T; thread T of the warpgroup holds
        // D[16 (T / 32) + (T % 32) / 4 + 8 ((i / 2) % 2)][8 (i / 4) + 2 (T % 4) + i % 2] in register i.
        static int A[64][32], B[128][32];
        for (int r = 0; r < 64; ++r)
          for (int x = 0; x < 32; ++x) A[r][x] = desc_read(sm, da, r, x);
        for (int r = 0; r < 128; ++r)
          for (int x = 0; x < 32; ++x) B[r][x] = desc_read(sm, db, r, x);
        for (int tr = 0; tr < 128; ++tr) {
          const int w = tr / 32, g4 = (tr % 32) / 4, t4 = tr % 4;
          for (int i = 0; i < 64; ++i) {
            const int r = 16 * w + g4 + 8 * ((i / 2) % 2), c = 8 * (i / 4) + 2 * t4 + i % 2;
            int32_t s = 0;
            for (int x = 0; x < 32; ++x) s += A[r][x] * B[c][x];
            acc[(wg * 128 + tr) * 64 + i] += s;
          }
        }
      }
    }
  }
  for (int tid = 0; tid < kThreads; ++tid)
    for (int i = 0; i < 64; ++i) {
      int row, col;
      wgmma_acc_coord(tid, i, row, col);
      row += m0;
      col += n0;
      if (row >= p.m || col >= p.n) continue;
      const size_t idx = (size_t)row * p.n + col;
      out[idx] = zero_corrected(acc[tid * 64 + i], p.zw[col], p.rowsum[row]);
      ++hits[idx];
    }
}

// The warp-specialized sm90 path (gemm_sm90_ws.cu) as one persistent CTA of a grid of `grid` CTAs in tile
// mode MODE: TMA boxes into the ring slot of the global step counter, each MMA group's fragments as the
// kernel builds them (ws_weight_frags, or two ws_weight_frags_half for MB = 2) for each warpgroup that
// computes the tile (both, or in ping-pong mode the tile's owner, rows from 0), wgmma with A from
// registers (PTX "register fragment for A": thread T, register r holds row 16 (T / 32) + (T % 32) / 4 +
// 8 (r % 2), codes 4 (T % 4) + 16 (r / 2) + 0..3 of the k32 slice) and B through its SW128 descriptor.
template <int BITS, int MODE>
void cta_ws(const Problem& p, int cta, int grid, std::vector<int32_t>& out, std::vector<int>& hits) {
  using Plan = WsPlan<BITS, MODE>;
  constexpr int MB = Plan::MB, kWgs = Plan::kPingPong ? 1 : 2;  // warpgroups computing one tile
  constexpr int RB = WsFmt<BITS>::kRowBytes;
  const GemmArgs& g = p.g;
  const int steps = ws_steps(g.ka), tiles_n = (g.epi.n + Plan::kRows - 1) / Plan::kRows;
  const int tiles = g.tiles_m * tiles_n;
  std::vector<uint8_t> sm(Plan::kBytes, 0x3C);
  int it = 0;
  for (int tile = cta; tile < tiles; tile += grid) {
    int tm, tn;
    tile_coords(tile, g.tiles_m, tiles_n, tm, tn);
    const int m0 = tm * kBM, n0 = tn * Plan::kRows;
    std::vector<int32_t> acc(kWgs * 128 * MB * 64, 0);  // [tid][mb][i]
    for (int t = 0; t < steps; ++t, ++it) {
      const int s = it % Plan::kStages;
      // TMA: activation boxes (128 rows x 128 codes, 128-byte swizzle), weight box (kRows rows x RB bytes);
      // a box element past the tensor's extent is zero
      for (int r = 0; r < kBM; ++r)
        for (int c = 0; c < kWsKS; ++c) {
          const int64_t row = m0 + r, col = (int64_t)t * kWsKS + c;
          const bool in = row < g.epi.m && col < g.ka;
          sm[Plan::a(s) + sw128_offset(r, c, kBM)] = in ? (uint8_t)g.a[row * g.lda + col] : 0;
        }
      for (int r = 0; r < Plan::kRows; ++r)
        for (int c = 0; c < RB; ++c) {
          const int64_t row = n0 + r, col = (int64_t)t * RB + c;
          const bool in = row < g.epi.n && col < g.ldw;
          sm[Plan::p(s) + ws_p_offset<BITS>(r, c)] = in ? g.w[row * g.ldw + col] : 0;
        }
      const bool tail = g.tail && t == steps - 1;
      auto ld = [&](uint32_t off) {
        expect(off % 4 == 0 && off + 4 <= (uint32_t)Plan::kPBytes, "fragment load misaligned or out of the slot");
        return load32(sm, Plan::p(s) + off);
      };
      for (int h = 0; h < MB; ++h)  // MMA groups of the step
        for (int wg = 0; wg < kWgs; ++wg) {
          static uint32_t frag[128][8][4];  // [thread][group slot i][register]
          for (int tr = 0; tr < 128; ++tr) {
            const int lane = tr % 32, row0 = Plan::wg_row0(wg) + (tr / 32) * 16 + lane / 4;
            if (MB == 1) {
              if (BITS == 3 && tail)
                ws_weight_frags<BITS, true>(ld, row0, lane % 4, frag[tr]);
              else
                ws_weight_frags<BITS, false>(ld, row0, lane % 4, frag[tr]);
            } else {
              for (int mb = 0; mb < 2; ++mb) {
                if (BITS == 3 && tail)
                  ws_weight_frags_half<BITS, true>(ld, row0 + 64 * mb, lane % 4, h, frag[tr], 4 * mb);
                else
                  ws_weight_frags_half<BITS, false>(ld, row0 + 64 * mb, lane % 4, h, frag[tr], 4 * mb);
              }
            }
          }
          for (int i = 0; i < 8; ++i) {
            const int mb = MB == 1 ? 0 : i / 4, kk = MB == 1 ? i : 4 * h + i % 4;
            static int A[64][32], B[128][32];
            for (int tr = 0; tr < 128; ++tr)
              for (int r = 0; r < 4; ++r)
                for (int b = 0; b < 4; ++b)
                  A[16 * (tr / 32) + (tr % 32) / 4 + 8 * (r % 2)][4 * (tr % 4) + 16 * (r / 2) + b] =
                      byte_of(frag[tr][i][r], b);
            const uint64_t db = sw128_desc(wgmma_b_addr(Plan::a(s), kk));
            for (int r = 0; r < 128; ++r)
              for (int x = 0; x < 32; ++x) B[r][x] = desc_read(sm, db, r, x);
            for (int tr = 0; tr < 128; ++tr) {
              const int w = tr / 32, g4 = (tr % 32) / 4, t4 = tr % 4;
              for (int e = 0; e < 64; ++e) {
                const int r = 16 * w + g4 + 8 * ((e / 2) % 2), c = 8 * (e / 4) + 2 * t4 + e % 2;
                int32_t sum = 0;
                for (int x = 0; x < 32; ++x) sum += A[r][x] * B[c][x];
                acc[((wg * 128 + tr) * MB + mb) * 64 + e] += sum;
              }
            }
          }
        }
    }
    // the staged epilogue (ws_epilogue.cuh), per warpgroup and chunk: the writers' accumulators into the
    // staging buffer, then the readers' 4-output groups out of it (transposed: accumulator rows are weight rows).
    // kWsDefer128: all 4 chunks into their slabs first, then the passes in the order the next tile's MMA groups
    // run them (ws_defer_pass), each exactly once.
    std::vector<int> order;  // the reading passes over one set of slabs: q -> (slab q / 4, token pass q % 4)
    if (Plan::kDeferred) {
      const int groups = steps * MB;
      for (int gi = 0; gi < groups; ++gi)
        for (int q = ws_defer_pass(gi, groups); q < ws_defer_pass(gi + 1, groups); ++q) order.push_back(q);
      expect((int)order.size() == kWsDeferPasses, "deferred epilogue: the groups do not run every pass once");
      for (int q = 0; q < kWsDeferPasses; ++q) expect(order[q] == q, "deferred epilogue: passes out of order");
    } else {
      order = {0, 1, 2, 3};
    }
    for (int wg = 0; wg < kWgs; ++wg)
      for (int k0 = 0; k0 < 4 * MB; k0 += Plan::kSlabs) {
        std::vector<std::vector<int64_t>> slabs(Plan::kSlabs, std::vector<int64_t>(kWsStageTokens * kWsStageLd,
                                                                                   INT64_MIN));  // (never written)
        for (int k = k0; k < k0 + Plan::kSlabs; ++k) {  // the writers: chunk k into slab k - k0
          const int mb = k / 4, ch = k % 4;
          std::vector<int64_t>& buf = slabs[k - k0];
          for (int w = 0; w < 4; ++w)
            for (int i = 16 * ch; i < 16 * ch + 16; ++i) {  // one store instruction of warp w
              uint32_t banks = 0;
              for (int lane = 0; lane < 32; ++lane) {
                const int tid = wg * 128 + 32 * w + lane, lr = 16 * w + lane / 4, c = 2 * (lane % 4);
                const int word = ws_stage_word(ws_stage_token(i, c), ws_stage_row(i, lr));
                expect(word >= 0 && word < kWsStageTokens * kWsStageLd && buf[word] == INT64_MIN,
                       "staged epilogue: a staging word written twice or out of the buffer");
                buf[word] = acc[(tid * MB + mb) * 64 + i];
                banks |= 1u << (word % 32);
              }
              expect(banks == 0xffffffffu, "staged epilogue: a warp's staging store hits a bank twice");
            }
        }
        for (int q : order) {  // the readers: token pass q % 4 over slab q / 4
          const int k = k0 + q / 4, mb = k / 4, ch = k % 4, pass = q % 4;
          std::vector<int64_t>& buf = slabs[q / 4];
          for (int wtid = 0; wtid < 128; ++wtid)
            for (int a = 0; a < 4; ++a) {
              const int tok = ws_read_token(wtid, pass), row = ws_read_col(wtid) + a;
              expect(tok >= 0 && tok < kWsStageTokens && row >= 0 && row < 64,
                     "staged epilogue: a reader's (token, row) is outside the chunk");
              const int64_t v = buf[ws_stage_word(tok, row)];
              expect(v != INT64_MIN, "staged epilogue: a reader takes a word no writer staged");
              expect(v != INT64_MAX, "staged epilogue: a staged word is read twice");
              buf[ws_stage_word(tok, row)] = INT64_MAX;
              const int n = n0 + Plan::wg_row0(wg) + 64 * mb + row, m = m0 + 32 * ch + tok;
              if (m >= p.m || n >= p.n) continue;
              const size_t idx = (size_t)m * p.n + n;
              out[idx] = zero_corrected((int32_t)v, p.zw[n], p.rowsum[m]);
              ++hits[idx];
            }
        }
        for (const auto& buf : slabs)
          for (int tok = 0; tok < kWsStageTokens; ++tok)
            for (int row = 0; row < 64; ++row)
              expect(buf[ws_stage_word(tok, row)] == INT64_MAX, "staged epilogue: a staged word is never read");
      }
  }
}

template <int BITS>
void run_gemm(Problem& p, const std::string& dir) {
  setup(p, dir);
  const size_t mn = (size_t)p.m * p.n;
  std::vector<int32_t> acc80(mn, 0), acc90(mn, 0);
  std::vector<int> hits80(mn, 0), hits90(mn, 0), tiles((size_t)p.g.tiles_m * p.g.tiles_n, 0);
  for (int pid = 0; pid < p.g.tiles_m * p.g.tiles_n; ++pid) {
    int tm, tn;
    tile_coords(pid, p.g.tiles_m, p.g.tiles_n, tm, tn);
    expect(tm >= 0 && tm < p.g.tiles_m && tn >= 0 && tn < p.g.tiles_n, "tile_coords out of range");
    ++tiles[(size_t)tm * p.g.tiles_n + tn];
    cta_sm80<BITS>(p, tm, tn, acc80, hits80);
    cta_sm90<BITS>(p, tm, tn, acc90, hits90);
  }
  for (int h : tiles) expect(h == 1, "tile_coords does not visit every tile exactly once");
  for (size_t i = 0; i < mn; ++i) expect(hits80[i] == 1 && hits90[i] == 1, "an output is not written exactly once");
  if constexpr (BITS != 8) {  // the ws path (every tile mode) as a persistent grid of 3 CTAs
    for (int mode : {kWsCoop128, kWsCoop256, kWsPingPong, kWsDefer128}) {
      std::vector<int32_t> accws(mn, 0);
      std::vector<int> hitsws(mn, 0);
      for (int cta = 0; cta < 3; ++cta) {
        if (mode == kWsCoop128)
          cta_ws<BITS, kWsCoop128>(p, cta, 3, accws, hitsws);
        else if (mode == kWsCoop256)
          cta_ws<BITS, kWsCoop256>(p, cta, 3, accws, hitsws);
        else if (mode == kWsDefer128)
          cta_ws<BITS, kWsDefer128>(p, cta, 3, accws, hitsws);
        else
          cta_ws<BITS, kWsPingPong>(p, cta, 3, accws, hitsws);
      }
      for (size_t i = 0; i < mn; ++i) expect(hitsws[i] == 1, "ws path: an output is not written exactly once");
      write_file(dir + "/accws" + std::to_string(mode) + ".bin", accws);
    }
  }
  std::vector<float> y(mn);
  for (int r = 0; r < p.m; ++r)
    for (int c = 0; c < p.n; ++c) y[(size_t)r * p.n + c] = epilogue_value(acc90[(size_t)r * p.n + c], r, c, p.g.epi);
  write_file(dir + "/acc80.bin", acc80);
  write_file(dir + "/acc90.bin", acc90);
  write_file(dir + "/y90.bin", y);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 7 && std::string(argv[1]) == "ring") {  // emulate ring MODE STEPS TILES STAGES SEEDS
    int fails = 0;
    for (int seed = 0; seed < std::atoi(argv[6]); ++seed)
      fails += run_ring(std::atoi(argv[2]), std::atoi(argv[3]), std::atoi(argv[4]), std::atoi(argv[5]), (unsigned)seed);
    return fails ? 1 : 0;
  }
  if (argc != 7) fail("usage: emulate gemm BITS M K N DIR | emulate actq[_magic] BITS M K G DIR | "
                      "emulate ring MODE STEPS TILES STAGES SEEDS");
  const std::string cmd = argv[1], dir = argv[6];
  const int bits = std::atoi(argv[2]), m = std::atoi(argv[3]), k = std::atoi(argv[4]), x = std::atoi(argv[5]);
  if (cmd == "actq" || cmd == "actq_magic") {
    expect(bits == 6 || bits == 8, "actq bits must be 6 or 8");
    run_actq(bits, m, k, x, dir, cmd == "actq_magic");
    return 0;
  }
  expect(cmd == "gemm", "unknown command " + cmd);
  Problem p;
  p.bits = bits;
  p.m = m;
  p.k = k;
  p.n = x;
  if (bits == 3)
    run_gemm<3>(p, dir);
  else if (bits == 4)
    run_gemm<4>(p, dir);
  else if (bits == 8)
    run_gemm<8>(p, dir);
  else
    fail("gemm bits must be 3, 4 or 8");
  return 0;
}
