// qgemm on Hopper (sm_90a), warp-specialized, W3/W4 weights unpacked into wgmma's register operand.
//
// The CTA computes C^T = W X^T in tiles of 128 or 256 weight rows x 128 tokens (ws_layout.h,
// "warp-specialized sm90 path", tile modes): warps 0-7 are two consumer warpgroups, warpgroup 2 the producer (its registers go to the
// consumers through setmaxnreg: 240 per consumer thread, room for the accumulators, two groups of weight
// fragments and the epilogue).
//   producer (one thread): for every step of every tile this CTA owns, wait until ring slot s is empty,
//     then TMA-load the activation tile (two SW128 boxes of 128 tokens x 128 codes) and the packed weight
//     rows into it; the slot's `full` mbarrier completes when all bytes have landed.
//   consumers: issue the async wgmmas of step t (A = the weight fragments in registers, B = the slot's
//     activation tile), then wait for step t-1's wgmmas only (wgmma.wait_group 1), release t-1's slot to
//     the producer, and unpack step t+1's fragments from its packed bytes while step t's MMAs run.
// So the tensor cores always have the next step queued (what Triton 3.6 cannot do with int32
// accumulators: it waits for every int8 wgmma), loads run ahead across tiles (persistent CTAs, one per
// SM), and no CTA-wide barrier is in the mainloop. The epilogue computes the other kernels' values
// (qvdit_math.h::epilogue_value) through a shared-memory staging buffer (epilogue_staged), plus
// reference.epilogue_tail (GELU, gated residual add), which only this kernel fuses (its 128-row cooperative modes).
// W8 stays on gemm_sm90.cu.
#include <cuda.h>  // CUtensorMap
#include <cudaTypedefs.h>

#include <cstdlib>
#include <cstring>

#include "qvdit_kernels.cuh"
#include "qvdit_kernels.h"
#include "wgmma.cuh"
#include "ws_epilogue.cuh"


namespace qv {
namespace {

// Tile height (weight rows) of the ws kernel: 256 (MB = 2) from this K on when N is a multiple of 256,
// else 128; QVDIT_WS_ROWS=128|256 forces one (read per call). Measured on the H200 with both heights per
// shape (BENCHMARKS.md, CUDA backend): 256 rows won at K >= 3072 by 2-19% (half the activation traffic
// from L2), 128 rows at K <= 1536 (per-tile cost, more tiles to balance) and at N = 1152 (a half-empty
// last 256-row tile).
constexpr int kWsRows256MinK = 2048;

struct WsArgs {
  CUtensorMap act;  // activation codes [m, ka] int8, box 128 codes x 128 rows, 128-byte swizzle
  CUtensorMap wgt;  // packed weights [n, ldw] bytes, box kRowBytes x 128 rows
  GemmArgs g;
  int steps;        // ws_steps(ka)
};

#ifdef QV_SM90A
// ---------------------------------------------------------------- mbarrier, TMA and wgmma wrappers (PTX)
__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// Spin until the phase of parity `parity` has completed.
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT;\n"
      "}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const CUtensorMap* map, uint32_t bar, int c0, int c1) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4}], [%2];\n" ::"r"(
          dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(c0), "r"(c1)
      : "memory");
}
// Fragments of one MMA group, 8 (m-block, k32 slice) pairs = 8 wgmmas. MB = 1: all 8 slices of a step;
// MB = 2: half h of a step (slices 4h..4h+3) for both m-blocks, f[4 mb + j] = slice 4h + j of m-block mb.
// row0 = the thread's first weight row in the step buffer for m-block 0 (m-block 1 is 64 rows further).
template <int BITS, int MB>
__device__ __forceinline__ void build_group(uint32_t p_slot, bool tail, int h, int row0, int q, uint32_t (&f)[8][4]) {
  auto ld = [p_slot](uint32_t off) { return lds32(p_slot + off); };
  if (MB == 1) {
    if (BITS == 3 && tail)
      ws_weight_frags<BITS, true>(ld, row0, q, f);
    else
      ws_weight_frags<BITS, false>(ld, row0, q, f);
  } else {
    QV_UNROLL
    for (int mb = 0; mb < 2; ++mb) {
      if (BITS == 3 && tail)
        ws_weight_frags_half<BITS, true>(ld, row0 + 64 * mb, q, h, f, 4 * mb);
      else
        ws_weight_frags_half<BITS, false>(ld, row0 + 64 * mb, q, h, f, 4 * mb);
    }
  }
}

// One MMA group of a consumer warpgroup (group gi = step gi / MB, half gi % MB): its 8 MMAs from
// fragments fc, `beside()` while they run (kWsDefer128: a piece of the previous tile's epilogue), then retire
// group gi-1 (release its step's slot if that was the step's last group) and unpack group gi+1 into fn (the
// registers group gi-1 read), waiting for its slot first if it starts a step.
template <int BITS, int MODE, class Beside, int MB = WsPlan<BITS, MODE>::MB>
__device__ __forceinline__ void consumer_group(const WsArgs& w, uint32_t sbase, int it0, int gi, bool leader,
                                               int row0, int q, uint32_t (&acc)[MB][64], uint32_t (&fc)[8][4],
                                               uint32_t (&fn)[8][4], const Beside& beside) {
  using Plan = WsPlan<BITS, MODE>;
  constexpr int S = Plan::kStages;
  const int t = gi / MB, h = gi % MB, s = ws_slot(it0 + t, S);
  QV_UNROLL
  for (int mb = 0; mb < MB; ++mb) fence_regs<64>(acc[mb]);
  fence_regs<32>(&fc[0][0]);
  wgmma_fence();
  QV_UNROLL
  for (int i = 0; i < 8; ++i) {  // (a W3 tail step's slices 4..7 hold zero codes)
    const int mb = MB == 1 ? 0 : i / 4, kk = MB == 1 ? i : 4 * h + i % 4;
    wgmma_rs_m64n128k32(acc[mb], fc[i], sw128_desc(wgmma_b_addr(sbase + Plan::a(s), kk)));
  }
  wgmma_commit();
  QV_UNROLL
  for (int mb = 0; mb < MB; ++mb) fence_regs<64>(acc[mb]);
  beside();
  wgmma_wait<1>();  // group gi-1 has retired: its fragment registers (fn) are free
  fence_regs<32>(&fn[0][0]);
  if (h == 0 && t > 0 && leader) mbar_arrive(sbase + Plan::empty(ws_slot(it0 + t - 1, S)));  // step t-1 done
  const int g1 = gi + 1, t1 = g1 / MB, h1 = g1 % MB;
  if (t1 < w.steps) {
    if (h1 == 0) mbar_wait(sbase + Plan::full(ws_slot(it0 + t1, S)), ws_full_parity(it0 + t1, S));
    build_group<BITS, MB>(sbase + Plan::p(ws_slot(it0 + t1, S)), w.g.tail && t1 == w.steps - 1, h1, row0, q, fn);
  }
}

#endif  // QV_SM90A

template <int BITS, int MODE>
__global__ void __launch_bounds__(kWsThreads, 1) qgemm_sm90_ws_kernel(const __grid_constant__ WsArgs w) {
#ifdef QV_SM90A
  using Plan = WsPlan<BITS, MODE>;
  constexpr int MB = Plan::MB;
  constexpr int S = Plan::kStages;
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  const uint32_t sbase = aligned_smem_base(smem_raw);
  const GemmArgs& g = w.g;
  const int tiles = g.tiles_m * g.tiles_n;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  if (threadIdx.x == 0) {
    for (int s = 0; s < S; ++s) {
      mbar_init(sbase + Plan::full(s), 1);               // the producer's arrive (+ the TMA bytes)
      mbar_init(sbase + Plan::empty(s), Plan::kSlotConsumers);  // one arrive per warpgroup that reads it
    }
    mbar_init(sbase + Plan::turn(0), 1);  // (ping-pong) the other warpgroup's leader, once per tile
    mbar_init(sbase + Plan::turn(1), 1);
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();

  if (warp >= kWsConsumers / 32) {  // producer warpgroup: one thread issues every load
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kWsProducerRegs));
    if (warp == kWsConsumers / 32 && lane == 0) {
      asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(&w.act)) : "memory");
      asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(&w.wgt)) : "memory");
      int it = 0;
      for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
        int tm, tn;
        tile_coords(tile, g.tiles_m, g.tiles_n, tm, tn);
        for (int t = 0; t < w.steps; ++t, ++it) {
          const int s = ws_slot(it, S);
          mbar_wait(sbase + Plan::empty(s), ws_empty_parity(it, S));  // the first round passes at once
          const uint32_t full = sbase + Plan::full(s);
          mbar_expect_tx(full, Plan::kSlotBytes);
          tma_load_2d(sbase + Plan::a(s), &w.act, full, t * kWsKS, tm * kBM);
          tma_load_2d(sbase + Plan::a(s) + kBM * 128, &w.act, full, t * kWsKS + 128, tm * kBM);
          tma_load_2d(sbase + Plan::p(s), &w.wgt, full, t * WsFmt<BITS>::kRowBytes, tn * Plan::kRows);
        }
      }
    }
    return;
  }

  // consumers: warpgroup wg computes weight rows wg_row0(wg) .. + 64 MB - 1 of its tiles
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kWsConsumerRegs));
  const int tid = threadIdx.x, q = lane % 4;
  const int wg = tid / 128, row0 = Plan::wg_row0(wg) + ((tid / 32) % 4) * 16 + lane / 4;
  const int ptid = Plan::kPingPong ? tid % 128 : tid;  // this thread's index among the tile's consumers
  const bool leader = tid % 128 == 0;
  const int groups = w.steps * MB;
  uint32_t acc[MB][64], f0[8][4], f1[8][4];
  const Epi& e = g.epi;
  // (only in the 128-row cooperative modes, which the host takes for a tail; never with int32 outputs, which the
  // bindings refuse with a tail: the exact accumulator is stored)
  const bool tail = Plan::kTail && e.out_kind != 3 && (e.activation || e.residual);
  const int lr = row0 - Plan::wg_row0(wg), wtid = tid % 128, c = 2 * q;  // (row, thread index) in the warpgroup
  // kWsDefer128: the tile whose accumulators wait in the slabs (its first output row and column, operand buffer;
  // dm0 < 0: none), and its epilogue passes between the MMA groups of the next tile
  int dm0 = -1, dn0 = 0, dpb = 0;
  const auto deferred = [&](int q0, int q1) {
    if (Plan::kDeferred && dm0 >= 0) epilogue_passes_for<Plan>(e, tail, sbase, dpb, wg, dm0, dn0, wtid, q0, q1);
  };
  int ntile = 0;  // tiles of this CTA so far (both warpgroups')
  for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x, ++ntile) {
    if (!ws_owns(Plan::kPingPong, ntile, wg)) continue;  // the other warpgroup's tile
    const int it0 = ntile * w.steps;                     // the ring's step counter at this tile's first step
    if (Plan::kPingPong && ntile > 0)  // the other warpgroup has passed all waits of tile ntile - 1
      mbar_wait(sbase + Plan::turn(wg), ws_turn_parity(ntile));
    int tm, tn;
    tile_coords(tile, g.tiles_m, g.tiles_n, tm, tn);
    QV_UNROLL
    for (int mb = 0; mb < MB; ++mb)
      QV_UNROLL
      for (int i = 0; i < 64; ++i) acc[mb][i] = 0;
    QV_UNROLL
    for (int i = 0; i < 32; ++i) (&f1[0][0])[i] = 0;  // (so the last tile's fragments are dead in its epilogue)
    // this tile's epilogue-operand buffer (read only after the barrier below): two per tile owner
    const int pb = Plan::kPingPong ? 2 * wg + ((ntile >> 1) & 1) : (ntile & 1);
    const Params params = load_params<Plan>(g.epi, tm * kBM, tn * Plan::kRows, ptid);
    if (Plan::kTail && g.epi.residual) prefetch_residual<Plan>(g.epi, tm * kBM, tn * Plan::kRows, ptid);
    mbar_wait(sbase + Plan::full(ws_slot(it0, S)), ws_full_parity(it0, S));
    build_group<BITS, MB>(sbase + Plan::p(ws_slot(it0, S)), g.tail && w.steps == 1, 0, row0, q, f0);
    for (int gi = 0; gi < groups; gi += 2) {
      consumer_group<BITS, MODE>(w, sbase, it0, gi, leader, row0, q, acc, f0, f1,
                                 [&] { deferred(ws_defer_pass(gi, groups), ws_defer_pass(gi + 1, groups)); });
      if (gi == 0) store_params<Plan>(params, sbase, pb, ptid);  // (its loads waited under group 0's MMAs)
      if (gi + 1 < groups)
        consumer_group<BITS, MODE>(w, sbase, it0, gi + 1, leader, row0, q, acc, f1, f0,
                                   [&] { deferred(ws_defer_pass(gi + 1, groups), ws_defer_pass(gi + 2, groups)); });
    }
    // Ping-pong: every wait of this tile has passed (the last one came with the last group's fragments), so
    // the other warpgroup may start its tile now: its first MMAs queue behind this tile's last ones, and the
    // tensor cores see no gap between the two (arriving after the wait below left the pipe empty while the
    // other warpgroup woke up and unpacked its first group).
    if (Plan::kPingPong && leader) mbar_arrive(sbase + Plan::turn(1 - wg));
    wgmma_wait<0>();
    QV_UNROLL
    for (int mb = 0; mb < MB; ++mb) fence_regs<64>(acc[mb]);
    fence_regs<32>(&f0[0][0]);
    fence_regs<32>(&f1[0][0]);
    if (leader) mbar_arrive(sbase + Plan::empty(ws_slot(it0 + w.steps - 1, S)));
    if (Plan::kDeferred) {
      // This warpgroup's passes over its slabs (the tile before's epilogue) are done, so the slabs take this
      // tile's accumulators; then both warpgroups meet: the slabs are visible to the readers of the warpgroup,
      // this tile's operands (stored by warpgroup 0) to both, and every pass over operand buffer pb ^ 1 is done
      // (the next tile stores its operands there).
      ws_warpgroup_sync(wg);
      stage_all<Plan>(sbase, wg, lr, c, acc);
      asm volatile("bar.sync 1, %0;\n" ::"n"(kWsConsumers) : "memory");
      dm0 = tm * kBM, dn0 = tn * Plan::kRows, dpb = pb;
      continue;
    }
    // Every consumer of the tile has staged its operands, and has finished the epilogue of its tile before
    // this one, which read the buffer that its next tile's store_params overwrites. (Named barrier 1 for
    // both warpgroups, 1 + wg for one.)
    if (!Plan::kPingPong)
      asm volatile("bar.sync 1, %0;\n" ::"n"(kWsConsumers) : "memory");
    else if (wg == 0)  // (constant barrier ids: a register id makes ptxas reserve all 16)
      asm volatile("bar.sync 1, 128;\n" ::: "memory");
    else
      asm volatile("bar.sync 2, 128;\n" ::: "memory");

    const int m0 = tm * kBM, n0 = tn * Plan::kRows;
    const EpiRegs er = epi_regs(e);  // (per tile: kept out of the mainloop's registers)
    for_out_kind<Plan>(e.out_kind, tail, [&](auto out, auto t) {
      epilogue_staged<decltype(out)::value, decltype(t)::value, Plan>(er, sbase, pb, wg, m0, n0, lr, c, wtid, acc);
    });
  }
  deferred(0, kWsDeferPasses);  // (kWsDefer128) the last tile's epilogue, whole
#else
  __trap();  // built without an sm_90a target; the host launcher refuses before getting here
#endif
}

// ---------------------------------------------------------------- host: tensor maps and launch
PFN_cuTensorMapEncodeTiled_v12000 encode_fn() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult res;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &res) != cudaSuccess ||
        res != cudaDriverEntryPointSuccess)
      p = nullptr;
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(p);
  }();
  return fn;
}

// A 2-D byte tensor [rows, cols] (row stride ld bytes) with a box of box_cols x box_rows.
bool encode_2d(CUtensorMap* map, const void* base, int64_t rows, int64_t cols, int64_t ld, int box_cols, int box_rows,
               bool swizzle128) {
  auto fn = encode_fn();
  if (!fn) return false;
  const cuuint64_t dims[2] = {(cuuint64_t)cols, (cuuint64_t)rows};
  const cuuint64_t strides[1] = {(cuuint64_t)ld};
  const cuuint32_t box[2] = {(cuuint32_t)box_cols, (cuuint32_t)box_rows};
  const cuuint32_t estr[2] = {1, 1};
  return fn(map, CU_TENSOR_MAP_DATA_TYPE_UINT8, 2, const_cast<void*>(base), dims, strides, box, estr,
            CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle128 ? CU_TENSOR_MAP_SWIZZLE_128B : CU_TENSOR_MAP_SWIZZLE_NONE,
            CU_TENSOR_MAP_L2_PROMOTION_L2_128B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

template <int BITS, int MODE>
cudaError_t launch_ws(const GemmArgs& g, cudaStream_t stream) {
  using Plan = WsPlan<BITS, MODE>;
  WsArgs w;
  std::memset(&w, 0, sizeof(w));
  w.g = g;
  w.g.tiles_n = (g.epi.n + Plan::kRows - 1) / Plan::kRows;
  w.steps = ws_steps(g.ka);
  if (!encode_2d(&w.act, g.a, g.epi.m, g.ka, g.lda, 128, kBM, true) ||
      !encode_2d(&w.wgt, g.w, g.epi.n, g.ldw, g.ldw, WsFmt<BITS>::kRowBytes, Plan::kRows, WsFmt<BITS>::kSwizzled))
    return cudaErrorInvalidValue;
  auto kernel = qgemm_sm90_ws_kernel<BITS, MODE>;
  const cudaError_t attr = allow_smem(reinterpret_cast<const void*>(kernel), Plan::kAllocBytes);
  if (attr != cudaSuccess) return attr;
  int dev = 0, sms = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  const int tiles = w.g.tiles_m * w.g.tiles_n;
  const int per_cta = Plan::kPingPong ? 2 : 1;  // (ping-pong: at least two tiles per CTA, one per warpgroup)
  const int grid = (tiles + per_cta - 1) / per_cta;
  kernel<<<grid < sms ? grid : sms, kWsThreads, Plan::kAllocBytes, stream>>>(w);
  return cudaGetLastError();
}

}  // namespace

bool qgemm_sm90_ws_supported(const GemmArgs& g, int bits) {
  const auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  return (bits == 3 || bits == 4) && aligned(g.a) && aligned(g.w) && g.lda % 16 == 0 && g.ldw % 16 == 0 &&
         encode_fn() != nullptr;
}

int qgemm_sm90_ws_rows(int n, int k) {
  const char* env = std::getenv("QVDIT_WS_ROWS");  // 128 or 256 forces a tile height (benchmarks, tests)
  if (env && std::atoi(env) == 128) return 128;
  if (env && std::atoi(env) == 256) return 256;
  return k >= kWsRows256MinK && n % 256 == 0 ? 256 : 128;
}

int qgemm_sm90_ws_mode(int n, int k, bool tail) {
  // 1: 128-row tiles with the deferred epilogue (opt-in: 0.77-0.95x as fast as kWsCoop128 on the H200, BENCHMARKS
  // run ws9)
  const char* defer = std::getenv("QVDIT_WS_DEFER");
  const int coop128 = defer && std::atoi(defer) == 1 ? kWsDefer128 : kWsCoop128;
  if (tail) return coop128;  // (the modes with WsPlan::kTail)
  const char* pp = std::getenv("QVDIT_WS_PINGPONG");  // 1: ping-pong for 128-row tiles (opt-in: slower, run ws5)
  if (qgemm_sm90_ws_rows(n, k) == 256) return kWsCoop256;
  return pp && std::atoi(pp) == 1 ? kWsPingPong : coop128;
}

cudaError_t qgemm_sm90_ws(const GemmArgs& g, int bits, cudaStream_t stream) {
  if (!qgemm_sm90_ws_supported(g, bits)) return cudaErrorNotSupported;
  switch (qgemm_sm90_ws_mode(g.epi.n, g.ka, g.epi.activation != 0 || g.epi.residual != nullptr)) {
    case kWsCoop256: return bits == 3 ? launch_ws<3, kWsCoop256>(g, stream) : launch_ws<4, kWsCoop256>(g, stream);
    case kWsPingPong: return bits == 3 ? launch_ws<3, kWsPingPong>(g, stream) : launch_ws<4, kWsPingPong>(g, stream);
    case kWsDefer128: return bits == 3 ? launch_ws<3, kWsDefer128>(g, stream) : launch_ws<4, kWsDefer128>(g, stream);
    default: return bits == 3 ? launch_ws<3, kWsCoop128>(g, stream) : launch_ws<4, kWsCoop128>(g, stream);
  }
}

}  // namespace qv
