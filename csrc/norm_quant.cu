// LayerNorm [+ affine] [+ adaLN modulation] fused with the per-token act-quant of its output for up to three
// consumers (reference.norm_quantize; the Triton kernel is qvdit_kernels/triton/norm_quant.py): the producer of a
// DiT block's q/k/v, cross-attention q and fc1 inputs.
//
// A group of W warps holds the row in registers as 16-byte chunks (the layout of act_quant.cu's register kernel,
// chunk c = t + i * 32W): its sum gives the mean, the squares around the mean the variance (two reductions over
// the held row, no second read), then y = (x - mean) * rstd [* w + b] [* (1 + scale) + shift] rounded to x's dtype
// replaces x in the registers and is stored (unless y is null). The codes, row sum and TQE dots are those of that
// rounded y, with the act-quant's own per-element math (row_quant.cuh), so they are quantize_activation(y)'s bit
// for bit. One read of x from HBM, one write of y and one of the codes. With a residual (ops.add_norm_quantize) the held row is
// h = residual + gate * x, stored as the block's new residual stream: the add after an attention output
// projection and the norm after it in one pass.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "qvdit_kernels.h"
#include "row_quant.cuh"

namespace qv {
namespace {

static_assert(kNormQuantMaxRowBytes == kRowMaxBytes, "the kernel's longest row");

__device__ __forceinline__ float4 ld4(const float* p) { return *reinterpret_cast<const float4*>(p); }

// y of one chunk (VEC elements from column col): normalized, [affine,] [modulated,] rounded to T.
template <typename T>
__device__ __forceinline__ uint4 norm_chunk(const uint4& raw, float mean, float rstd, const NormQuantArgs& a,
                                            const float* msc, const float* msh, int col) {
  constexpr int VEC = 16 / sizeof(T);
  const T* e = reinterpret_cast<const T*>(&raw);
  float f[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) f[i] = __fmul_rn(__fsub_rn(to_float(e[i]), mean), rstd);
#pragma unroll
  for (int i = 0; i < VEC; i += 4) {
    if (a.weight) {
      const float4 w = ld4(a.weight + col + i), b = ld4(a.bias + col + i);
      f[i] = __fmaf_rn(f[i], w.x, b.x), f[i + 1] = __fmaf_rn(f[i + 1], w.y, b.y);
      f[i + 2] = __fmaf_rn(f[i + 2], w.z, b.z), f[i + 3] = __fmaf_rn(f[i + 3], w.w, b.w);
    }
    if (msc) {
      const float4 s = ld4(msc + col + i), h = ld4(msh + col + i);
      f[i] = __fmaf_rn(f[i], __fadd_rn(1.0f, s.x), h.x), f[i + 1] = __fmaf_rn(f[i + 1], __fadd_rn(1.0f, s.y), h.y);
      f[i + 2] = __fmaf_rn(f[i + 2], __fadd_rn(1.0f, s.z), h.z), f[i + 3] = __fmaf_rn(f[i + 3], __fadd_rn(1.0f, s.w), h.w);
    }
  }
  return pack_chunk<T>(f);
}

// The norm's input chunk with a residual: h = residual + gate * x per element in float32 (no FMA: torch's
// product, then its sum), rounded to T (reference.epilogue_tail's add).
template <typename T>
__device__ __forceinline__ uint4 residual_chunk(const uint4& xr, const uint4& rr, const float* g) {
  constexpr int VEC = 16 / sizeof(T);
  const T* xe = reinterpret_cast<const T*>(&xr);
  const T* re = reinterpret_cast<const T*>(&rr);
  float f[VEC];
#pragma unroll
  for (int i = 0; i < VEC; i += 4) {
    float gv[4] = {1.0f, 1.0f, 1.0f, 1.0f};
    if (g) {
      const float4 q = ld4(g + i);
      gv[0] = q.x, gv[1] = q.y, gv[2] = q.z, gv[3] = q.w;
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float v = g ? __fmul_rn(to_float(xe[i + j]), gv[j]) : to_float(xe[i + j]);
      f[i + j] = __fadd_rn(to_float(re[i + j]), v);
    }
  }
  return pack_chunk<T>(f);
}

// The compiler must assume r changed here, so it does not keep values derived from it across this point.
template <int NC>
__device__ __forceinline__ void opaque(uint4 (&r)[NC]) {
#pragma unroll
  for (int i = 0; i < NC; ++i) asm volatile("" : "+r"(r[i].x), "+r"(r[i].y), "+r"(r[i].z), "+r"(r[i].w));
}

template <typename T, int W, int NC>
__global__ void __launch_bounds__(kRowThreads) norm_quant_kernel(const NormQuantArgs a) {
  constexpr int VEC = 16 / sizeof(T), G = 32 * W, kRows = kRowThreads / G, J = kNormQuantMaxConsumers;
  __shared__ float sh[4][kRowThreads / 32][4];  // (one buffer per group_reduce)
  const int group = threadIdx.x / G, t = threadIdx.x % G;
  const int m = blockIdx.x * kRows + group;
  const bool live = m < a.m;  // no early return: rows of W > 1 warps meet at __syncthreads
  const int chunks = live ? a.k / VEC : 0;
  const int64_t row = live ? m : 0;
  const T* x = static_cast<const T*>(a.x) + row * a.ldx;

  uint4 raw[NC];
  load_row<T, NC, G>(x, t, chunks, raw);
  if (a.residual) {  // the norm's input is h = residual + gate * x: computed, held in place of x, then stored
    const T* r = static_cast<const T*>(a.residual) + row * a.ld_res;
    const float* g = a.rgate ? a.rgate + (int64_t)(row / a.rg_div) * a.k : nullptr;
#pragma unroll
    for (int i = 0; i < NC; ++i) {
      const int c = t + i * G;
      if (c < chunks)
        raw[i] = residual_chunk<T>(raw[i], *reinterpret_cast<const uint4*>(r + c * VEC), g ? g + c * VEC : nullptr);
    }
    store_row<T, NC, G>(static_cast<T*>(a.h) + row * a.k, t, chunks, raw);  // (after every load of the loop above)
  }
  // mean (the zero padding adds nothing), then the variance around it (padding excluded)
  float acc[1] = {0.0f};
#pragma unroll
  for (int i = 0; i < NC; ++i) {
    const T* e = reinterpret_cast<const T*>(&raw[i]);
#pragma unroll
    for (int j = 0; j < VEC; ++j) acc[0] = __fadd_rn(acc[0], to_float(e[j]));
  }
  group_reduce<W>(acc, AddOp(), sh[0]);
  const float mean = __fdiv_rn(acc[0], (float)a.k);
  opaque(raw);  // (each pass converts the held row again: kept as floats, bf16 rows took ~100 registers)
  acc[0] = 0.0f;
#pragma unroll
  for (int i = 0; i < NC; ++i) {
    if (t + i * G < chunks) {
      const T* e = reinterpret_cast<const T*>(&raw[i]);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float d = __fsub_rn(to_float(e[j]), mean);
        acc[0] = __fmaf_rn(d, d, acc[0]);
      }
    }
  }
  group_reduce<W>(acc, AddOp(), sh[1]);
  opaque(raw);
  const float rstd = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(__fdiv_rn(acc[0], (float)a.k), a.eps)));

  // y, rounded to T: stored, and kept in place of x for its codes
  const int64_t mrow = a.mod_scale ? (int64_t)(row / a.mod_rows) * a.k : 0;
  const float* msc = a.mod_scale ? a.mod_scale + mrow : nullptr;
  const float* msh = a.mod_scale ? a.mod_shift + mrow : nullptr;
#pragma unroll
  for (int i = 0; i < NC; ++i) {
    const int c = t + i * G;
    if (c < chunks) raw[i] = norm_chunk<T>(raw[i], mean, rstd, a, msc, msh, c * VEC);
  }
  if (a.y) store_row<T, NC, G>(static_cast<T*>(a.y) + row * a.k, t, chunks, raw);  // (after the loop's loads)

  float hi, lo;
  const bool bad_here = chunk_stats<T, NC>(raw, a.bits == 8, hi, lo);
  float st[3] = {hi, -lo, bad_here ? 1.0f : 0.0f};  // all three by max
  group_reduce<W>(st, MaxOp(), sh[2]);
  const bool bad = st[2] != 0.0f;
  const RowQ q = a.bits == 8 ? row_qparams(8, 0.0f, 0.0f, st[0]) : row_qparams(a.bits, st[0], -st[1], 0.0f);
  const RowQMagic qm = row_qmagic(q);

  int8_t* xq = a.xq + row * a.k;
  int rowsum = 0;
  float dot[J] = {0.0f, 0.0f, 0.0f};
  const float* const alpha[J] = {a.alpha, a.alpha + a.k, a.alpha + 2 * a.k};  // (read only for j < nj)
  row_codes<T, J, NC, G>(raw, qm, bad, a.nj, alpha, t, chunks, xq, rowsum, dot);
  float sums[4] = {(float)rowsum, dot[0], dot[1], dot[2]};  // (|rowsum| <= 127 K < 2^24: exact in float)
  group_reduce<W>(sums, AddOp(), sh[3]);
  if (live && t == 0) {
    const float scale = bad ? __int_as_float(0x7fc00000) : q.scale;
    a.scale[m] = scale;
    a.rowsum[m] = (int)sums[0];
    const int fid = a.frame_id ? a.frame_id[m] : 0;
#pragma unroll
    for (int j = 0; j < J; ++j) {
      if (j < a.nj) {
        float u = __fmul_rn(sums[1 + j], scale);
        if (a.gate)  // (a frame id outside the gate table: NaN, as act_quant gives)
          u = __fmul_rn(u, fid >= 0 && fid < a.num_gates ? a.gate[j * a.num_gates + fid] : __int_as_float(0x7fc00000));
        a.u[(int64_t)j * a.m + m] = u;
      }
    }
  }
}

// (norm_quant_supported has taken only rows launch_row_shape holds)
template <typename T>
cudaError_t launch_typed(const NormQuantArgs& a, cudaStream_t stream) {
  launch_row_shape(a.m, a.k / (16 / (int)sizeof(T)), [&](auto w, auto nc, int grid) {
    norm_quant_kernel<T, decltype(w)::value, decltype(nc)::value><<<grid, kRowThreads, 0, stream>>>(a);
  });
  return cudaGetLastError();
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

bool norm_quant_supported(const NormQuantArgs& a) {
  if (a.x_kind < 0 || a.x_kind > 2 || a.k < 1 || a.nj < 0 || a.nj > kNormQuantMaxConsumers || a.mod_rows < 1)
    return false;
  const int el = a.x_kind == 0 ? 4 : 2;
  const bool arrays = aligned16(a.weight) && aligned16(a.bias) && aligned16(a.mod_scale) && aligned16(a.mod_shift) &&
                      aligned16(a.alpha);  // (null is aligned)
  const bool residual = a.residual == nullptr
                            ? a.rgate == nullptr
                            : aligned16(a.residual) && (a.ld_res * el) % 16 == 0 && a.h != nullptr && aligned16(a.h) &&
                                  aligned16(a.rgate) && (a.rgate == nullptr || a.rg_div >= 1);
  return a.k % (16 / el) == 0 && (int64_t)a.k * el <= kNormQuantMaxRowBytes && aligned16(a.x) &&
         (a.ldx * el) % 16 == 0 && aligned16(a.y) && reinterpret_cast<uintptr_t>(a.xq) % 8 == 0 && arrays && residual &&
         (a.weight == nullptr) == (a.bias == nullptr) && (a.mod_scale == nullptr) == (a.mod_shift == nullptr) &&
         (a.nj == 0 || (a.alpha != nullptr && a.u != nullptr));
}

cudaError_t norm_quant(const NormQuantArgs& a, cudaStream_t stream) {
  if (!norm_quant_supported(a)) return cudaErrorNotSupported;
  if (a.m == 0) return cudaSuccess;
  switch (a.x_kind) {
    case 0: return launch_typed<float>(a, stream);
    case 1: return launch_typed<__nv_bfloat16>(a, stream);
    default: return launch_typed<__half>(a, stream);
  }
}

}  // namespace qv
