// LayerNorm [+ affine] [+ adaLN modulation] fused with the per-token act-quant of its output for up to three
// consumers (reference.norm_quantize; the Triton kernel is qvdit_kernels/triton/norm_quant.py): the producer of a
// DiT block's q/k/v, cross-attention q and fc1 inputs.
//
// A group of W warps holds the row in registers as 16-byte chunks (the layout of act_quant.cu's register kernel,
// row_quant.cuh's quads): its sum gives the mean, the squares around the mean the variance (two reductions over
// the held row, no second read), then y = (x - mean) * rstd [* w + b] [* (1 + scale) + shift] rounded to x's dtype
// replaces x in the registers and is stored (unless y is null). The codes, row sum and TQE dots are those of that
// rounded y, with the act-quant's own per-element math (row_quant.cuh), so they are quantize_activation(y)'s bit
// for bit. One read of x from HBM, one write of y and one of the codes. With a residual (ops.add_norm_quantize)
// the held row is h = residual + gate * x, stored as the block's new residual stream: the add after an attention
// output projection and the norm after it in one pass.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "qvdit_kernels.h"
#include "row_quant.cuh"

namespace qv {
namespace {

static_assert(kNormQuantMaxRowBytes == kRowMaxBytes, "the kernel's longest row");

__device__ __forceinline__ float4 ld4(const float* p) { return *reinterpret_cast<const float4*>(p); }

// y of one chunk inside the row (its quads at quad indices q0 + h * quad_step, row_quant.cuh): normalized,
// [affine,] [modulated,] rounded to T. (Chunks past the row are not passed: they stay zero for the statistics.)
template <typename T, int G, bool SPLIT>
__device__ __forceinline__ uint4 norm_chunk(const uint4& raw, float mean, float rstd, const NormQuantArgs& a,
                                            const float* msc, const float* msh, int q0) {
  constexpr int VEC = 16 / sizeof(T);
  const T* e = reinterpret_cast<const T*>(&raw);
  float f[VEC];
#pragma unroll
  for (int h = 0; h < VEC / 4; ++h) {
    const int q = q0 + h * quad_step<G, SPLIT>(), col = 4 * q;
    float* v = f + 4 * h;
#pragma unroll
    for (int i = 0; i < 4; ++i) v[i] = __fmul_rn(__fsub_rn(to_float(e[4 * h + i]), mean), rstd);
    if (a.weight) {
      const float4 w = ld4(a.weight + col), b = ld4(a.bias + col);
      v[0] = __fmaf_rn(v[0], w.x, b.x), v[1] = __fmaf_rn(v[1], w.y, b.y);
      v[2] = __fmaf_rn(v[2], w.z, b.z), v[3] = __fmaf_rn(v[3], w.w, b.w);
    }
    if (msc) {
      const float4 sc = ld4(msc + col), sh = ld4(msh + col);
      v[0] = __fmaf_rn(v[0], __fadd_rn(1.0f, sc.x), sh.x), v[1] = __fmaf_rn(v[1], __fadd_rn(1.0f, sc.y), sh.y);
      v[2] = __fmaf_rn(v[2], __fadd_rn(1.0f, sc.z), sh.z), v[3] = __fmaf_rn(v[3], __fadd_rn(1.0f, sc.w), sh.w);
    }
  }
  return pack_chunk<T>(f);
}

// The norm's input chunk with a residual: h = residual + gate * x per element in float32 (no FMA: torch's
// product, then its sum), rounded to T (reference.epilogue_tail's add); res: the residual row, g: the gate row or
// null. A chunk inside the row (quads as norm_chunk's).
template <typename T, int G, bool SPLIT>
__device__ __forceinline__ uint4 residual_chunk(const uint4& xr, const T* res, const float* g, int q0) {
  constexpr int VEC = 16 / sizeof(T);
  uint4 rr;
  if constexpr (kHalves<T> == 1 || !SPLIT) {  // (a whole 16-byte chunk)
    rr = *reinterpret_cast<const uint4*>(res + 4 * q0);
  } else {
    const uint2 lo = *reinterpret_cast<const uint2*>(res + 4 * q0);
    const uint2 hi = *reinterpret_cast<const uint2*>(res + 4 * (q0 + quad_step<G, SPLIT>()));
    rr = make_uint4(lo.x, lo.y, hi.x, hi.y);
  }
  const T* xe = reinterpret_cast<const T*>(&xr);
  const T* re = reinterpret_cast<const T*>(&rr);
  float f[VEC];
#pragma unroll
  for (int h = 0; h < VEC / 4; ++h) {
    const int q = q0 + h * quad_step<G, SPLIT>();
    float gv[4] = {1.0f, 1.0f, 1.0f, 1.0f};
    if (g) {
      const float4 v = ld4(g + 4 * q);
      gv[0] = v.x, gv[1] = v.y, gv[2] = v.z, gv[3] = v.w;
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int i = 4 * h + j;
      const float v = g ? __fmul_rn(to_float(xe[i]), gv[j]) : to_float(xe[i]);
      f[i] = __fadd_rn(to_float(re[i]), v);
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

template <typename T, int W, int NC, bool SPLIT>
__global__ void __launch_bounds__(kRowThreads) norm_quant_kernel(const NormQuantArgs a) {
  constexpr int VEC = 16 / sizeof(T), G = 32 * W, kRows = kRowThreads / G, J = kNormQuantMaxConsumers;
  __shared__ float sh[4][kRowThreads / 32][4];  // (one buffer per group_reduce)
  const int group = threadIdx.x / G, t = threadIdx.x % G;
  const int m = blockIdx.x * kRows + group;
  const bool live = m < a.m;  // no early return: rows of W > 1 warps meet at __syncthreads
  const int quads = live ? a.k / 4 : 0;  // (the row's quads of 4 elements, row_quant.cuh's layout; none past the end)
  const int64_t row = live ? m : 0;
  const T* x = static_cast<const T*>(a.x) + row * a.ldx;

  uint4 raw[NC];
  load_row<T, NC, G, SPLIT>(x, t, quads, raw);
  if (a.residual) {  // the norm's input is h = residual + gate * x: computed, held in place of x, then stored
    const T* r = static_cast<const T*>(a.residual) + row * a.ld_res;
    const float* g = a.rgate ? a.rgate + (int64_t)(row / a.rg_div) * a.k : nullptr;
#pragma unroll
    for (int i = 0; i < NC; ++i) {
      const int q0 = quad_index<T, G, SPLIT>(t, i, 0);
      if (q0 < quads) raw[i] = residual_chunk<T, G, SPLIT>(raw[i], r, g, q0);
    }
    // (after every load of the loop above)
    store_row<T, NC, G, SPLIT>(static_cast<T*>(a.h) + row * a.k, t, quads, raw);
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
    // (the check inside the quad loop, though it does not depend on h: hoisted out of it, ptxas gives the 2- and
    // 4-warp 6-chunk kernels of uneven 16-bit rows 73 registers instead of 64)
    const T* e = reinterpret_cast<const T*>(&raw[i]);
#pragma unroll
    for (int h = 0; h < VEC / 4; ++h) {
      if (quad_index<T, G, SPLIT>(t, i, 0) < quads) {
#pragma unroll
        for (int j = 4 * h; j < 4 * h + 4; ++j) {
          const float d = __fsub_rn(to_float(e[j]), mean);
          acc[0] = __fmaf_rn(d, d, acc[0]);
        }
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
    const int q0 = quad_index<T, G, SPLIT>(t, i, 0);
    if (q0 < quads) raw[i] = norm_chunk<T, G, SPLIT>(raw[i], mean, rstd, a, msc, msh, q0);
  }
  if (a.y) store_row<T, NC, G, SPLIT>(static_cast<T*>(a.y) + row * a.k, t, quads, raw);  // (after the loop's loads)

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
  row_codes<T, J, NC, G, SPLIT>(raw, qm, bad, a.nj, alpha, t, quads, xq, rowsum, dot);
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
    constexpr int W = decltype(w)::value, NC = decltype(nc)::value;
    if (split_rows<T, W>(a.k))  // (float32 always: no other instantiation)
      norm_quant_kernel<T, W, NC, true><<<grid, kRowThreads, 0, stream>>>(a);
    else
      norm_quant_kernel<T, W, NC, sizeof(T) == 4><<<grid, kRowThreads, 0, stream>>>(a);
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
