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

#include <map>

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define QV_SM90A 1
#endif

namespace qv {
namespace {

#ifdef QV_SM90A
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_wait0() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }

// Keep the compiler from moving accumulator reads/writes across the async MMA.
__device__ __forceinline__ void fence_operands(int32_t (&d)[64]) {
  QV_UNROLL
  for (int i = 0; i < 64; ++i) asm volatile("" : "+r"(d[i])::"memory");
}

// d += A (64 x 32, desc a) * B^T (128 x 32, desc b), s8 inputs, s32 accumulators.
__device__ __forceinline__ void wgmma_m64n128k32(int32_t (&d)[64], uint64_t a, uint64_t b) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, 1, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k32.s32.s8.s8 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
      "%64, %65, p;\n"
      "}\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]), "+r"(d[7]),
        "+r"(d[8]), "+r"(d[9]), "+r"(d[10]), "+r"(d[11]), "+r"(d[12]), "+r"(d[13]), "+r"(d[14]), "+r"(d[15]),
        "+r"(d[16]), "+r"(d[17]), "+r"(d[18]), "+r"(d[19]), "+r"(d[20]), "+r"(d[21]), "+r"(d[22]), "+r"(d[23]),
        "+r"(d[24]), "+r"(d[25]), "+r"(d[26]), "+r"(d[27]), "+r"(d[28]), "+r"(d[29]), "+r"(d[30]), "+r"(d[31]),
        "+r"(d[32]), "+r"(d[33]), "+r"(d[34]), "+r"(d[35]), "+r"(d[36]), "+r"(d[37]), "+r"(d[38]), "+r"(d[39]),
        "+r"(d[40]), "+r"(d[41]), "+r"(d[42]), "+r"(d[43]), "+r"(d[44]), "+r"(d[45]), "+r"(d[46]), "+r"(d[47]),
        "+r"(d[48]), "+r"(d[49]), "+r"(d[50]), "+r"(d[51]), "+r"(d[52]), "+r"(d[53]), "+r"(d[54]), "+r"(d[55]),
        "+r"(d[56]), "+r"(d[57]), "+r"(d[58]), "+r"(d[59]), "+r"(d[60]), "+r"(d[61]), "+r"(d[62]), "+r"(d[63])
      : "l"(a), "l"(b)
      : "memory");
}

template <int BITS>
__device__ __forceinline__ void issue_step(int32_t (&acc)[64], uint32_t a_tile, uint32_t b_tile, int wg, bool tail) {
  constexpr int KS = Fmt<BITS>::KS;
  fence_operands(acc);
  wgmma_fence();
  QV_UNROLL
  for (int kk = 0; kk < KS / 32; ++kk) {
    if (tail && kk >= 4) break;  // a W3 tail tile has 128 codes
    wgmma_m64n128k32(acc, sw128_desc(wgmma_a_addr(a_tile, wg, kk)), sw128_desc(wgmma_b_addr(b_tile, kk)));
  }
  wgmma_commit();
  fence_operands(acc);
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
    wgmma_wait0();
    fence_operands(acc);
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
