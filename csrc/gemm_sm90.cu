// qgemm on Hopper wgmma (sm_90a): s8 x s8 -> s32, both operands K-major in shared memory (SW128).
//
// CTA 128 x 128 x 256 threads = 2 warpgroups, each computing 64 activation rows x 128 weight rows with
// wgmma.m64n128k32 (64 int32 accumulators per thread). Mainloop step t (KS codes of K):
//   wait for A(t) and P(t+1) -> barrier -> issue cp.async for step t+S-1 -> issue the async wgmmas of
//   step t (A(t), U(t&1)) -> unpack P(t+1) into U((t+1)&1) while they run -> wait for the wgmmas.
// So the unpack ALU work overlaps the tensor cores (what Triton 3.6 cannot do with int32
// accumulators). A first version: no warp specialization, no TMA; both are the next steps.
// Shared memory written by ordinary stores and cp.async is fenced into the async proxy before wgmma.
#include "qvdit_kernels.cuh"
#include "qvdit_kernels.h"
#include "wgmma.cuh"

#include <map>


namespace qv {
namespace {

#ifdef QV_SM90A
template <int BITS>
__device__ __forceinline__ void issue_step(int32_t (&acc)[64], uint32_t a_tile, uint32_t b_tile, int wg, bool tail) {
  constexpr int KS = Fmt<BITS>::KS;
  fence_regs<64>(acc);
  wgmma_fence();
  QV_UNROLL
  for (int kk = 0; kk < KS / 32; ++kk) {
    if (tail && kk >= 4) break;  // a W3 tail tile has 128 codes
    wgmma_ss_m64n128k32(acc, sw128_desc(wgmma_a_addr(a_tile, wg, kk)), sw128_desc(wgmma_b_addr(b_tile, kk)));
  }
  wgmma_commit();
  fence_regs<64>(acc);
}
#endif  // QV_SM90A

template <int BITS>
__global__ void __launch_bounds__(kThreads, Fmt<BITS>::kCtas) qgemm_sm90_kernel(const GemmArgs g) {
#ifdef QV_SM90A
  using Plan = PlanSm90<BITS>;
  constexpr int S = Plan::kStages;
  constexpr bool kUnpack = BITS != 8;
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  const uint32_t sbase = aligned_smem_base(smem_raw);
  int tm, tn;
  tile_coords(blockIdx.x, g.tiles_m, g.tiles_n, tm, tn);
  const int m0 = tm * kBM, n0 = tn * kBN;
  const int wg = threadIdx.x / 128;
  const int steps = g.steps;
  auto is_tail = [&](int t) { return g.tail && t == steps - 1; };

  int32_t acc[64];
  QV_UNROLL
  for (int i = 0; i < 64; ++i) acc[i] = 0;

  // Prologue: steps 0..S-2 in flight (one commit group per step, empty past the end).
  QV_UNROLL
  for (int s = 0; s < S - 1; ++s) {
    if (s < steps) load_step<BITS>(g, sbase + Plan::a(s), sbase + Plan::p(s), s, is_tail(s), m0, n0);
    cp_async_commit();
  }
  if (kUnpack) {
    cp_async_wait<S - 2>();
    __syncthreads();
    unpack_step<BITS>(sbase + Plan::p(0), sbase + Plan::u(0), is_tail(0));
  }

  for (int t = 0; t < steps; ++t) {
    // W3/W4 need A(t) and P(t+1) here (S-3 groups may stay pending); W8 only step t (S-2).
    if (kUnpack)
      cp_async_wait<S - 3>();
    else
      cp_async_wait<S - 2>();
    fence_proxy_async();  // cp.async and unpack stores -> visible to wgmma (async proxy)
    __syncthreads();
    const int next = t + S - 1;
    if (next < steps) load_step<BITS>(g, sbase + Plan::a(next % S), sbase + Plan::p(next % S), next, is_tail(next), m0, n0);
    cp_async_commit();
    const uint32_t b_tile = kUnpack ? sbase + Plan::u(t & 1) : sbase + Plan::p(t % S);
    issue_step<BITS>(acc, sbase + Plan::a(t % S), b_tile, wg, is_tail(t));
    if (kUnpack && t + 1 < steps) unpack_step<BITS>(sbase + Plan::p((t + 1) % S), sbase + Plan::u((t + 1) & 1), is_tail(t + 1));
    wgmma_wait<0>();
    fence_regs<64>(acc);
  }

  QV_UNROLL
  for (int i = 0; i < 64; i += 2) {
    int row, col;
    wgmma_acc_coord(threadIdx.x, i, row, col);
    store_pair(g.epi, m0 + row, n0 + col, acc[i], acc[i + 1]);
  }
#else
  __trap();  // built without an sm_90a target; the host launcher refuses before getting here
#endif
}

}  // namespace

int qgemm_sm90_smem_bytes(int bits) {
  return bits == 3 ? PlanSm90<3>::kAllocBytes : bits == 4 ? PlanSm90<4>::kAllocBytes : PlanSm90<8>::kAllocBytes;
}

bool qgemm_sm90_available() {
  static std::mutex mu;
  static std::map<int, bool> known;  // per device
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return false;
  std::lock_guard<std::mutex> lock(mu);
  auto it = known.find(dev);
  if (it != known.end()) return it->second;
  int major = 0, minor = 0;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev);
  cudaFuncAttributes fa;
  const bool ok = major == 9 && minor == 0 && cudaFuncGetAttributes(&fa, qgemm_sm90_kernel<4>) == cudaSuccess &&
                  fa.binaryVersion == 90;  // the sm_90a cubin, not PTX or an sm_80 cubin
  known[dev] = ok;
  return ok;
}

cudaError_t qgemm_sm90(const GemmArgs& g, int bits, cudaStream_t stream) {
  switch (bits) {
    case 3: return launch_gemm(qgemm_sm90_kernel<3>, PlanSm90<3>::kAllocBytes, g, stream);
    case 4: return launch_gemm(qgemm_sm90_kernel<4>, PlanSm90<4>::kAllocBytes, g, stream);
    case 8: return launch_gemm(qgemm_sm90_kernel<8>, PlanSm90<8>::kAllocBytes, g, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace qv
