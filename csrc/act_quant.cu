// Per-token activation quantization in one CTA per row (SPEC 1.1-1.2): pass 1 reduces the row's
// max/min (max |x| for 8 bits) and a non-finite flag; pass 2 (the row again, now from cache) writes
// the int8 codes q - z and reduces rowsum and the TQE dot sum_k xq*alpha (float64, exact products).
// Fixed thread->element mapping and reduction tree: results are deterministic.
// The scalar math (row_qparams, act_code) is shared with the host emulator (qvdit_layout.h).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>

#include "qvdit_kernels.h"

namespace qv {
namespace {

constexpr int kAqThreads = 256;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

// VEC consecutive elements of a row (one 16-byte load when VEC > 1).
template <typename T, int VEC>
__device__ __forceinline__ void load_vec(const T* p, float (&v)[VEC]) {
  if (VEC == 1) {
    v[0] = to_float(p[0]);
  } else {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < VEC; ++i) v[i] = to_float(e[i]);
  }
}

template <typename V, class Op>
__device__ __forceinline__ V block_reduce(V v, Op op, V* sh) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int warp = threadIdx.x / 32;
  if (threadIdx.x % 32 == 0) sh[warp] = v;
  __syncthreads();
  V r = sh[0];
#pragma unroll
  for (int w = 1; w < kAqThreads / 32; ++w) r = op(r, sh[w]);  // every thread, same order
  __syncthreads();  // sh is reused by the next reduction
  return r;
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kAqThreads) act_quant_kernel(const ActQuantArgs a) {
  __shared__ float shf[kAqThreads / 32];
  __shared__ int shi[kAqThreads / 32];
  __shared__ double shd[kAqThreads / 32];
  const int m = blockIdx.x;
  const T* x = static_cast<const T*>(a.x) + (int64_t)m * a.ldx;
  int8_t* xq = a.xq + (int64_t)m * a.ldq;
  const int chunks = a.k / VEC;  // the launcher guarantees k % VEC == 0

  float rmax = 0.0f, rmin = 0.0f, amax = 0.0f;  // max(row, 0), min(row, 0), max |row|
  int bad = 0;
  for (int c = threadIdx.x; c < chunks; c += kAqThreads) {
    float v[VEC];
    load_vec<T, VEC>(x + c * VEC, v);
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      bad |= !isfinite(v[i]);
      rmax = fmaxf(rmax, v[i]);
      rmin = fminf(rmin, v[i]);
      amax = fmaxf(amax, fabsf(v[i]));
    }
  }
  auto fmax_op = [](float p, float q) { return fmaxf(p, q); };
  auto fmin_op = [](float p, float q) { return fminf(p, q); };
  auto or_op = [](int p, int q) { return p | q; };
  auto add_i = [](int p, int q) { return p + q; };
  auto add_d = [](double p, double q) { return p + q; };
  bad = block_reduce(bad, or_op, shi);
  RowQ q;
  if (a.bits == 8) {
    q = row_qparams(8, 0.0f, 0.0f, block_reduce(amax, fmax_op, shf));
  } else {
    const float hi = block_reduce(rmax, fmax_op, shf);
    q = row_qparams(a.bits, hi, block_reduce(rmin, fmin_op, shf), 0.0f);
  }

  int rowsum = 0;
  double dot = 0.0;
  for (int c = threadIdx.x; c < chunks; c += kAqThreads) {
    float v[VEC];
    load_vec<T, VEC>(x + c * VEC, v);
    uint32_t packed[VEC >= 4 ? VEC / 4 : 1] = {};
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const int code = bad ? 0 : act_code(v[i], q);
      rowsum += code;
      if (a.alpha) dot += (double)code * (double)a.alpha[c * VEC + i];  // exact product in float64
      if (VEC >= 4) packed[i / 4] |= (uint32_t)(uint8_t)(int8_t)code << (8 * (i % 4));
      else xq[c * VEC + i] = (int8_t)code;
    }
    if (VEC == 4) *reinterpret_cast<uint32_t*>(xq + c * VEC) = packed[0];
    if (VEC == 8) *reinterpret_cast<uint2*>(xq + c * VEC) = make_uint2(packed[0], packed[VEC >= 8 ? 1 : 0]);
  }
  rowsum = block_reduce(rowsum, add_i, shi);
  if (a.alpha) dot = block_reduce(dot, add_d, shd);
  if (threadIdx.x == 0) {
    const float scale = bad ? __int_as_float(0x7fc00000) : q.scale;  // NaN marks a non-finite row
    a.scale[m] = scale;
    if (a.rowsum) a.rowsum[m] = rowsum;
    if (a.alpha) {
      double g = 1.0;
      if (a.gate) {
        int64_t f = 0;
        if (a.frame_id) f = a.fid_is_64 ? static_cast<const int64_t*>(a.frame_id)[m] : static_cast<const int32_t*>(a.frame_id)[m];
        g = (f >= 0 && f < a.num_gates) ? (double)a.gate[f] : __longlong_as_double(0x7ff8000000000000LL);  // bad id: NaN
      }
      a.u[m] = (float)(dot * (double)scale * g);  // reference.py: float64, rounded once
    }
  }
}

template <typename T>
cudaError_t launch_typed(const ActQuantArgs& a, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vec_ok = a.k % kVec == 0 && reinterpret_cast<uintptr_t>(a.x) % 16 == 0 &&
                      (a.ldx * (int64_t)sizeof(T)) % 16 == 0 && reinterpret_cast<uintptr_t>(a.xq) % kVec == 0 &&
                      a.ldq % kVec == 0;
  if (vec_ok)
    act_quant_kernel<T, kVec><<<a.m, kAqThreads, 0, stream>>>(a);
  else
    act_quant_kernel<T, 1><<<a.m, kAqThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

__global__ void rowsum_kernel(const int8_t* xq, int64_t ldq, int m, int k, int32_t* out) {
  const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (row >= m) return;
  const int8_t* p = xq + (int64_t)row * ldq;
  int s = 0;
  for (int i = lane; i < k; i += 32) s += p[i];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  if (lane == 0) out[row] = s;
}

}  // namespace

cudaError_t act_quant(const ActQuantArgs& a, cudaStream_t stream) {
  if (a.m == 0) return cudaSuccess;
  switch (a.x_kind) {
    case 0: return launch_typed<float>(a, stream);
    case 1: return launch_typed<__nv_bfloat16>(a, stream);
    case 2: return launch_typed<__half>(a, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t rowsum_s8(const int8_t* xq, int64_t ldq, int m, int k, int32_t* rowsum, cudaStream_t stream) {
  if (m == 0) return cudaSuccess;
  rowsum_kernel<<<(m + 7) / 8, 256, 0, stream>>>(xq, ldq, m, k, rowsum);
  return cudaGetLastError();
}

}  // namespace qv
