// The epilogue tail of a DiT block after a GEMM that did not fuse it (reference.epilogue_tail): one pass over
// the linear's output y, out = residual + gate[m / gate_div] * gelu_tanh(y), instead of the 4-7 torch kernels
// (float32 temporaries, the gate row gather) that the reference's formula takes in eager mode. Each thread
// handles one 16-byte piece of a row (8 bf16/fp16 or 4 float32 values) when the rows allow it, else one value.
// The float ops are the warp-specialized kernel's fused tail's (qvdit_math.h::tail_gelu, tail_residual).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "qvdit_kernels.cuh"
#include "qvdit_kernels.h"

namespace qv {
namespace {

constexpr int kTailThreads = 256;

// VEC values of a row at p (one 16-byte access when VEC > 1)
template <typename T, int VEC>
struct alignas(16) Piece {  // (16-byte aligned: it is read and written as one uint4)
  T v[VEC];
};
template <typename T, int VEC>
__device__ __forceinline__ Piece<T, VEC> load_piece(const T* p) {
  Piece<T, VEC> r;
  if (VEC == 1) r.v[0] = p[0];
  else *reinterpret_cast<uint4*>(r.v) = *reinterpret_cast<const uint4*>(p);
  return r;
}
template <typename T, int VEC>
__device__ __forceinline__ void store_piece(T* p, const Piece<T, VEC>& r) {
  if (VEC == 1) p[0] = r.v[0];
  else *reinterpret_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(r.v);
}

// grid (m, column blocks): row blockIdx.x, pieces blockIdx.y * kTailThreads + threadIdx.x of VEC values
template <typename T, int VEC>
__global__ void __launch_bounds__(kTailThreads) epilogue_tail_kernel(const T* y, int64_t ldy, const Epi e) {
  const int m = blockIdx.x;
  const int n0 = (blockIdx.y * kTailThreads + threadIdx.x) * VEC;
  if (n0 >= e.n) return;
  const Piece<T, VEC> in = load_piece<T, VEC>(y + (int64_t)m * ldy + n0);
  Piece<T, VEC> res, out;
  if (e.residual) res = load_piece<T, VEC>(static_cast<const T*>(e.residual) + (int64_t)m * e.ld_res + n0);
  const float* gate = e.rgate ? e.rgate + (int64_t)(m / e.gate_div) * e.n + n0 : nullptr;
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    float v = to_float(in.v[i]);
    if (e.activation == 1) v = gelu_rounded<T>(v);
    if (e.residual) v = tail_residual(to_float(res.v[i]), v, gate != nullptr, gate ? gate[i] : 0.0f);
    out.v[i] = from_float<T>(v);
  }
  store_piece<T, VEC>(static_cast<T*>(e.out) + (int64_t)m * e.n + n0, out);
}

template <typename T>
cudaError_t launch_tail(const void* y, int64_t ldy, const Epi& e, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const auto al = [](const void* p, int64_t ld) {
    return reinterpret_cast<uintptr_t>(p) % 16 == 0 && (ld * (int64_t)sizeof(T)) % 16 == 0;
  };
  const bool vec = e.n % kVec == 0 && al(y, ldy) && al(e.out, e.n) &&
                   (!e.residual || al(e.residual, e.ld_res));
  const int per_block = kTailThreads * (vec ? kVec : 1);
  const dim3 grid(e.m, (e.n + per_block - 1) / per_block);
  if (vec)
    epilogue_tail_kernel<T, kVec><<<grid, kTailThreads, 0, stream>>>(static_cast<const T*>(y), ldy, e);
  else
    epilogue_tail_kernel<T, 1><<<grid, kTailThreads, 0, stream>>>(static_cast<const T*>(y), ldy, e);
  return cudaGetLastError();
}

}  // namespace

cudaError_t epilogue_tail(const void* y, int64_t ldy, const Epi& e, cudaStream_t stream) {
  if (e.m == 0 || e.n == 0) return cudaSuccess;
  switch (e.out_kind) {
    case 0: return launch_tail<__nv_bfloat16>(y, ldy, e, stream);
    case 1: return launch_tail<__half>(y, ldy, e, stream);
    case 2: return launch_tail<float>(y, ldy, e, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace qv
