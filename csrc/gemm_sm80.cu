// qgemm on mma.sync.m16n8k32 s8 tensor cores (sm_80 and later; on sm_90 the fallback/validation path).
//
// CTA 128 x 128 x 256 threads, 8 warps as 2 (M) x 4 (N), warp tile 64 x 32. Per mainloop step:
// cp.async double buffer (A and packed W of step t+1 land while step t computes), then the CTA unpacks
// the packed weights of step t into one shared int8 buffer U (qvdit_layout.h::unpack_unit), a barrier,
// and ldmatrix + mma.sync over U and A. Unsigned W3/W4 codes (< 16) are valid s8 operands; the zero
// point, scales, bias and TQE term are applied in the epilogue (qvdit_math.h::epilogue_value).
#include "qvdit_kernels.cuh"
#include "qvdit_kernels.h"

namespace qv {
namespace {

template <int BITS>
__device__ __forceinline__ void mma_step(int32_t (&acc)[4][4][4], uint32_t a_base, uint32_t b_base, bool tail,
                                         int warp, int lane) {
  constexpr int KS = Fmt<BITS>::KS;
  QV_UNROLL
  for (int kk = 0; kk < KS / 32; ++kk) {
    if (tail && kk >= 4) break;  // a W3 tail tile has 128 codes
    const int kin = kk * 32;
    uint32_t af[4][4], bf[2][4];
    QV_UNROLL
    for (int mi = 0; mi < 4; ++mi) ldsm_x4(a_base + ldsm_a_offset(lane, sm80_a_row0(warp, mi), kin), af[mi]);
    QV_UNROLL
    for (int nb = 0; nb < 2; ++nb) ldsm_x4(b_base + ldsm_b_offset(lane, sm80_b_row0(warp, nb), kin), bf[nb]);
    QV_UNROLL
    for (int mi = 0; mi < 4; ++mi) {
      QV_UNROLL
      for (int nj = 0; nj < 4; ++nj)
        mma_s8_16832(acc[mi][nj], af[mi], bf[nj / 2][sm80_b_reg(nj, 0)], bf[nj / 2][sm80_b_reg(nj, 1)]);
    }
  }
}

template <int BITS>
__global__ void __launch_bounds__(kThreads, 1) qgemm_sm80_kernel(const GemmArgs g) {
  using Plan = PlanSm80<BITS>;
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  const uint32_t sbase = aligned_smem_base(smem_raw);
  int tm, tn;
  tile_coords(blockIdx.x, g.tiles_m, g.tiles_n, tm, tn);
  const int m0 = tm * kBM, n0 = tn * kBN;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int steps = g.steps;

  int32_t acc[4][4][4];
  QV_UNROLL
  for (int i = 0; i < 4; ++i)
    QV_UNROLL
    for (int j = 0; j < 4; ++j)
      QV_UNROLL
      for (int r = 0; r < 4; ++r) acc[i][j][r] = 0;

  load_step<BITS>(g, sbase + Plan::a(0), sbase + Plan::p(0), 0, g.tail && steps == 1, m0, n0);
  cp_async_commit();
  for (int t = 0; t < steps; ++t) {
    const int slot = t & 1;
    const bool tail = g.tail && t == steps - 1;
    cp_async_wait<0>();
    __syncthreads();  // step t landed for all threads; step t-1 is done with U and the other slot
    if (t + 1 < steps)
      load_step<BITS>(g, sbase + Plan::a(slot ^ 1), sbase + Plan::p(slot ^ 1), t + 1,
                      g.tail && t + 1 == steps - 1, m0, n0);
    cp_async_commit();
    uint32_t b_base = sbase + Plan::p(slot);  // W8: the MMA reads the copied codes directly
    if (BITS != 8) {
      unpack_step<BITS>(sbase + Plan::p(slot), sbase + Plan::u(0), tail);
      __syncthreads();
      b_base = sbase + Plan::u(0);
    }
    mma_step<BITS>(acc, sbase + Plan::a(slot), b_base, tail, warp, lane);
  }

  QV_UNROLL
  for (int mi = 0; mi < 4; ++mi) {
    QV_UNROLL
    for (int nj = 0; nj < 4; ++nj) {
      QV_UNROLL
      for (int i = 0; i < 4; i += 2) {
        int row, col;
        sm80_acc_coord(threadIdx.x, mi, nj, i, row, col);
        store_pair(g.epi, m0 + row, n0 + col, acc[mi][nj][i], acc[mi][nj][i + 1]);
      }
    }
  }
}

}  // namespace

int qgemm_sm80_smem_bytes(int bits) {
  return bits == 3 ? PlanSm80<3>::kAllocBytes : bits == 4 ? PlanSm80<4>::kAllocBytes : PlanSm80<8>::kAllocBytes;
}

cudaError_t qgemm_sm80(const GemmArgs& g, int bits, cudaStream_t stream) {
  switch (bits) {
    case 3: return launch_gemm(qgemm_sm80_kernel<3>, PlanSm80<3>::kAllocBytes, g, stream);
    case 4: return launch_gemm(qgemm_sm80_kernel<4>, PlanSm80<4>::kAllocBytes, g, stream);
    case 8: return launch_gemm(qgemm_sm80_kernel<8>, PlanSm80<8>::kAllocBytes, g, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace qv
