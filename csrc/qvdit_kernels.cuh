// Device helpers shared by the kernels: element conversions, PTX wrappers (cp.async, ldmatrix, mma.sync, shared
// loads/stores), the global->shared step loader, the unpack pass and the epilogue store. The index
// and unpack math itself is in qvdit_layout.h, ws_layout.h and qvdit_math.h (host-testable). No torch headers here.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <mutex>
#include <set>
#include <utility>

#include "qvdit_math.h"

namespace qv {

// float32 <-> the element types of activations and outputs (round to nearest even)
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

// gelu_tanh of an element of type T as the block has it: computed in float32 (qvdit_math.h::tail_gelu), rounded to T.
template <typename T>
__device__ __forceinline__ float gelu_rounded(float v) { return to_float(from_float<T>(tail_gelu(v, sizeof(T) == 4))); }

__device__ __forceinline__ uint32_t smem_u32(const void* p) { return (uint32_t)__cvta_generic_to_shared(p); }

// 16-byte global->shared copy; src_size 0 zero-fills the destination (rows/columns past the edge).
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ Vec16 lds128(uint32_t addr) {
  Vec16 v;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.w[0]), "=r"(v.w[1]), "=r"(v.w[2]), "=r"(v.w[3])
               : "r"(addr)
               : "memory");
  return v;
}
__device__ __forceinline__ void sts128(uint32_t addr, const Vec16& v) {
  asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(v.w[0]), "r"(v.w[1]), "r"(v.w[2]),
               "r"(v.w[3])
               : "memory");
}

__device__ __forceinline__ void ldsm_x4(uint32_t addr, uint32_t (&r)[4]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}

// d += a (16x32 s8, row) * b (32x8 s8, col), int32 accumulate.
__device__ __forceinline__ void mma_s8_16832(int32_t (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Dynamic shared memory base rounded up to 1024 bytes (the SW128 swizzle is on absolute address bits).
__device__ __forceinline__ uint32_t aligned_smem_base(const void* raw) { return (smem_u32(raw) + 1023u) & ~1023u; }

// Raise a kernel's dynamic shared-memory limit once per device (host side; not during graph capture).
inline cudaError_t allow_smem(const void* kernel, int bytes) {
  static std::mutex mu;
  static std::set<std::pair<const void*, int>> done;  // (kernel, device)
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  std::lock_guard<std::mutex> lock(mu);
  if (done.count({kernel, dev})) return cudaSuccess;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (err == cudaSuccess) done.insert({kernel, dev});
  return err;
}

// Issue the cp.async copies of step t into ring slot `slot` (A at a_off, packed W at p_off).
template <int BITS>
__device__ __forceinline__ void load_step(const GemmArgs& g, uint32_t a_dst, uint32_t p_dst, int t, bool tail,
                                          int m0, int n0) {
  QV_UNROLL
  for (int i = 0; i < a_chunks<BITS>() / kThreads; ++i) {
    const Chunk c = a_chunk<BITS>(threadIdx.x + i * kThreads, t, m0, g.epi.m, g.ka, g.lda);
    cp_async16(a_dst + c.dst, c.valid ? g.a + c.src : g.a, c.valid);
  }
  const int nw = w_chunks<BITS>(tail);
  for (int ci = threadIdx.x; ci < nw; ci += kThreads) {
    const Chunk c = w_chunk<BITS>(ci, t, tail, n0, g.epi.n, g.kw, g.ldw);
    cp_async16(p_dst + c.dst, c.valid ? g.w + c.src : g.w, c.valid);
  }
}

// Unpack the packed weights of one step (P at p_src) into whole int8 code chunks (U at u_dst).
template <int BITS, bool TAIL>
__device__ __forceinline__ void unpack_step_t(uint32_t p_src, uint32_t u_dst) {
  auto ld = [p_src](uint32_t off) { return lds128(p_src + off); };
  auto st = [u_dst](uint32_t off, const Vec16& v) { sts128(u_dst + off, v); };
  constexpr int units = unpack_units<BITS, TAIL>();
  QV_UNROLL
  for (int i = 0; i < (units + kThreads - 1) / kThreads; ++i) {
    const int unit = threadIdx.x + i * kThreads;
    if (units % kThreads == 0 || unit < units) unpack_unit<BITS, TAIL>(unit, ld, st);
  }
}
template <int BITS>
__device__ __forceinline__ void unpack_step(uint32_t p_src, uint32_t u_dst, bool tail) {
  if (BITS == 3 && tail)
    unpack_step_t<BITS, true>(p_src, u_dst);
  else
    unpack_step_t<BITS, false>(p_src, u_dst);
}

// Two adjacent outputs: one 2-element store when aligned, else one or two scalar stores.
template <typename T, typename T2, class Cvt, class Cvt2>
__device__ __forceinline__ void store2(void* base, size_t idx, bool two, float y0, float y1, Cvt cvt, Cvt2 cvt2) {
  T* o = static_cast<T*>(base) + idx;
  if (two && idx % 2 == 0) {
    *reinterpret_cast<T2*>(o) = cvt2(y0, y1);
  } else {
    o[0] = cvt(y0);
    if (two) o[1] = cvt(y1);
  }
}

// Store outputs (row, col) and (row, col + 1) from two raw accumulators (col is even).
__device__ __forceinline__ void store_pair(const Epi& e, int row, int col, int32_t r0, int32_t r1) {
  if (row >= e.m || col >= e.n) return;
  const bool two = col + 1 < e.n;
  const int32_t rs = e.rowsum[row];
  const int32_t c0 = zero_corrected(r0, e.zw[col], rs);
  const int32_t c1 = two ? zero_corrected(r1, e.zw[col + 1], rs) : 0;
  const size_t idx = (size_t)row * out_stride(e) + col;
  if (e.out_kind == 3) {
    int32_t* o = static_cast<int32_t*>(e.out) + idx;
    if (two && idx % 2 == 0) {
      *reinterpret_cast<int2*>(o) = make_int2(c0, c1);
    } else {
      o[0] = c0;
      if (two) o[1] = c1;
    }
    return;
  }
  const float y0 = epilogue_value(c0, row, col, e);
  const float y1 = two ? epilogue_value(c1, row, col + 1, e) : 0.f;
  if (e.out_kind == 2)
    store2<float, float2>(e.out, idx, two, y0, y1, [](float v) { return v; },
                          [](float a, float b) { return make_float2(a, b); });
  else if (e.out_kind == 0)
    store2<__nv_bfloat16, __nv_bfloat162>(e.out, idx, two, y0, y1, [](float v) { return __float2bfloat16_rn(v); },
                                          [](float a, float b) { return __floats2bfloat162_rn(a, b); });
  else
    store2<__half, __half2>(e.out, idx, two, y0, y1, [](float v) { return __float2half_rn(v); },
                            [](float a, float b) { return __floats2half2_rn(a, b); });
}

// Launch one GEMM kernel instantiation with its dynamic shared memory (one CTA per output tile).
template <class Kernel>
cudaError_t launch_gemm(Kernel kernel, int smem_bytes, const GemmArgs& g, cudaStream_t stream) {
  const cudaError_t attr = allow_smem(reinterpret_cast<const void*>(kernel), smem_bytes);
  if (attr != cudaSuccess) return attr;
  kernel<<<g.tiles_m * g.tiles_n, kThreads, smem_bytes, stream>>>(g);
  return cudaGetLastError();
}

}  // namespace qv
