// Per-row helpers of the kernels that quantize activation rows held in registers (act_quant.cu's register kernel,
// norm_quant.cu): warp and row-group reductions, the statistics of a row's 16-byte chunks, and one chunk's codes,
// row sum and TQE dots. A thread holds chunks of VEC = 16 / sizeof(T) elements as raw 16-byte words; the math per
// element is qvdit_math.h's (act_code_magic: the codes of the Triton kernels and the host emulator).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "qvdit_kernels.cuh"

namespace qv {

// Launch shapes of the register kernels (act_quant.cu's act_quant_regs_kernel, norm_quant.cu): a CTA of kRowThreads
// threads holds kRowThreads / (32 W) rows of W warps, each thread at most NC 16-byte chunks of its row.
constexpr int kRowThreads = 256, kRowMaxWarps = 8;
constexpr int kRowMaxBytes = kRowMaxWarps * 32 * 16 * 16;  // the longest row: 8 warps x 32 lanes x 16 chunks

// The shape for m rows of `chunks` 16-byte chunks: the fewest warps per row (1, 2, 4, 8) that hold it in 8 chunks per
// thread (6 where 6 hold it), else 8 warps of 16. (Few chunks keep the registers down: the act-quant at 44-64
// registers and the 6-chunk norm-quant at 64 run 4 CTAs per SM; the 16-chunk shapes at 104+ left 2, and wan's
// 8960-wide GELU rows used 9 of a thread's 16 chunks.) launch(W, NC, grid), W and NC as std::integral_constant;
// false (nothing launched): a row longer than kRowMaxBytes.
template <class Launch>
bool launch_row_shape(int m, int chunks, const Launch& launch) {
  const auto go = [&](auto w, auto nc) {
    constexpr int rows = kRowThreads / (32 * decltype(w)::value);  // rows per CTA
    launch(w, nc, (m + rows - 1) / rows);
    return true;
  };
  using Six = std::integral_constant<int, 6>;
  using Eight = std::integral_constant<int, 8>;
  // (6 chunks where they hold the row: wan's K = 1536 rows are 192 bf16 chunks, 6 per lane of one warp, and 8
  // would leave 2 per thread unused but allocated, ~12 registers)
  const auto fit = [&](auto w) {
    return chunks <= 32 * decltype(w)::value * 6 ? go(w, Six{}) : go(w, Eight{});
  };
  if (chunks <= 32 * 8) return fit(std::integral_constant<int, 1>{});
  if (chunks <= 64 * 8) return fit(std::integral_constant<int, 2>{});
  if (chunks <= 128 * 8) return fit(std::integral_constant<int, 4>{});
  if (chunks <= 256 * 8) return fit(Eight{});
  if (chunks <= 32 * kRowMaxWarps * 16)
    return go(std::integral_constant<int, kRowMaxWarps>{}, std::integral_constant<int, 16>{});
  return false;
}

// A warp's reduction (butterfly: every lane ends with the same value, in the same order).
template <typename V, class Op>
__device__ __forceinline__ V warp_reduce(V v, Op op) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
struct MaxOp {
  __device__ float operator()(float p, float q) const { return fmaxf(p, q); }
};
struct MinOp {
  __device__ float operator()(float p, float q) const { return fminf(p, q); }
};
struct OrOp {
  __device__ int operator()(int p, int q) const { return p | q; }
};
struct AddOp {
  template <typename V>
  __device__ V operator()(V p, V q) const { return p + q; }
};

// N values reduced over the W warps of a row group (the group of warp w: warps W (w / W) ..; every thread of the
// group gets the results, combined in the same order everywhere). sh: [warps per CTA][4] floats of this call's own:
// W > 1 waits at one __syncthreads (every thread of the CTA must call it), and with no second barrier after the
// reads, a later reduction must not write the same buffer (a kernel takes one per reduction; each CTA reduces its
// rows once).
template <int W, int N, class Op>
__device__ __forceinline__ void group_reduce(float (&v)[N], Op op, float (*sh)[4]) {
  static_assert(N <= 4, "group_reduce: at most 4 values");
#pragma unroll
  for (int i = 0; i < N; ++i) v[i] = warp_reduce(v[i], op);
  if (W == 1) return;
  const int warp = threadIdx.x / 32, w0 = warp / W * W;
  if (threadIdx.x % 32 == 0)
#pragma unroll
    for (int i = 0; i < N; ++i) sh[warp][i] = v[i];
  __syncthreads();
#pragma unroll
  for (int i = 0; i < N; ++i) {
    v[i] = sh[w0][i];
#pragma unroll
    for (int w = 1; w < W; ++w) v[i] = op(v[i], sh[w0 + w][i]);
  }
}

// Two floats rounded to a 16-bit T (nearest even) as one 32-bit word, low half first: one paired conversion.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  if constexpr (std::is_same<T, __half>::value) {
    const __half2 p = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&p);
  } else {
    const __nv_bfloat162 p = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&p);
  }
}

// VEC floats rounded to T, as one 16-byte chunk.
template <typename T>
__device__ __forceinline__ uint4 pack_chunk(const float (&f)[16 / sizeof(T)]) {
  if constexpr (sizeof(T) == 4)
    return make_uint4(__float_as_uint(f[0]), __float_as_uint(f[1]), __float_as_uint(f[2]), __float_as_uint(f[3]));
  else
    return make_uint4(pack2<T>(f[0], f[1]), pack2<T>(f[2], f[3]), pack2<T>(f[4], f[5]), pack2<T>(f[6], f[7]));
}

// One thread's part of a row's statistics: max(row, 0) and min(row, 0) (8 bits: max |row| in hi, lo 0) of its NC
// chunks (padding chunks are zero), and whether one of its values is inf or NaN (the return value).
template <typename T, int NC>
__device__ __forceinline__ bool chunk_stats(const uint4 (&raw)[NC], bool sym8, float& hi, float& lo) {
  if constexpr (sizeof(T) == 2) {  // two elements per max/min, on the raw words (exact; NaN propagates)
    using T2 = typename std::conditional<std::is_same<T, __half>::value, __half2, __nv_bfloat162>::type;
    T2 h2, l2;
    *reinterpret_cast<uint32_t*>(&h2) = 0u;
    *reinterpret_cast<uint32_t*>(&l2) = 0u;
#pragma unroll
    for (int i = 0; i < NC; ++i) {
      const T2* e2 = reinterpret_cast<const T2*>(&raw[i]);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        if (sym8) {
          h2 = __hmax2_nan(h2, __habs2(e2[j]));
        } else {
          h2 = __hmax2_nan(h2, e2[j]);
          l2 = __hmin2_nan(l2, e2[j]);
        }
      }
    }
    const float h0 = __low2float(h2), h1 = __high2float(h2), l0 = __low2float(l2), l1 = __high2float(l2);
    hi = fmaxf(h0, h1);
    lo = fminf(l0, l1);
    return !isfinite(h0) || !isfinite(h1) || !isfinite(l0) || !isfinite(l1);  // +-inf and NaN reach hi or lo
  } else {  // float32: fma(v, 0, nan) turns any inf/NaN into NaN
    float nan = 0.0f;
    hi = lo = 0.0f;
#pragma unroll
    for (int i = 0; i < NC; ++i) {
      const float* e = reinterpret_cast<const float*>(&raw[i]);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        nan = __fmaf_rn(e[j], 0.0f, nan);
        if (sym8) {
          hi = fmaxf(hi, fabsf(e[j]));
        } else {
          hi = fmaxf(hi, e[j]);
          lo = fminf(lo, e[j]);
        }
      }
    }
    return isnan(nan);
  }
}

// The row layouts of the register kernels. A row of K elements is read in quads of 4 (8 bytes of a 16-bit T; of
// float32, a quad is a whole 16-byte chunk). Thread t of a row's G threads holds chunks i < NC of kHalves<T> =
// VEC / 4 quads each, h < kHalves (columns 4q .. 4q + 3; quads q >= K / 4 are zeros):
// - SPLIT (the row a whole number of chunk rows: K a multiple of 4 kHalves G; float32: always):
//   q = (i * kHalves + h) * G + t. Consecutive lanes hold consecutive quads, so each per-column float vector (TQE
//   alpha, modulation, affine) is read as float4s at consecutive 16-byte addresses. (Eight consecutive 16-bit
//   elements per lane read those vectors 32 bytes apart per lane: every 16-byte load touched twice the cache lines
//   it used, and the norm-quant ran with its L1 at 85% of throughput, ncu run nq5.)
// - else: whole 16-byte chunks c = i * G + t, q = c * kHalves + h. (The split layout needs a bounds check per
//   half on these rows: 58-70 registers in the act-quant where this layout takes 44-64, and 7-16% slower at
//   K = 8960, BENCHMARKS run ab19.)
// In both, the two halves of a chunk are inside the row or outside it together, so one compare per chunk serves.
template <typename T>
constexpr int kHalves = 16 / sizeof(T) / 4;
template <typename T, int G, bool SPLIT>
__device__ __forceinline__ int quad_index(int t, int i, int h) {
  return SPLIT ? (i * kHalves<T> + h) * G + t : (i * G + t) * kHalves<T> + h;
}
// Whether rows of k elements take the SPLIT layout, with W warps (G = 32 W threads) per row.
template <typename T, int W>
__host__ __device__ constexpr bool split_rows(int k) { return sizeof(T) == 4 || (k / 4) % (kHalves<T> * 32 * W) == 0; }
// quad_index(t, i, h + 1) - quad_index(t, i, h)
template <int G, bool SPLIT>
__device__ __forceinline__ constexpr int quad_step() { return SPLIT ? G : 1; }

// The codes of chunk `raw`, a chunk inside the row (its quads at quad indices q0 + h * quad_step, h < kHalves<T>,
// the row layouts above), returned as VEC bytes (uint2, quad h in word h; 4 bytes: .x), their sum added to
// rowsum, and for each of the nj <= J TQE consumers dot[j] += code * alpha[j][col] (alpha[j]: that consumer's [K]
// row, 16-byte aligned). bad: the row holds inf/NaN, every code is 0. The caller stores the codes (store_codes)
// after its loop over the chunks: a store through int8_t* may alias anything, so alpha loads could not move above
// it. (BENCHMARKS run nq4: no change measured either way; the order costs nothing.)
template <typename T, int J, int G, bool SPLIT>
__device__ __forceinline__ uint2 chunk_codes(const uint4& raw, const RowQMagic& qm, bool bad, int nj,
                                             const float* const (&alpha)[J], int q0, int& rowsum, float (&dot)[J]) {
  constexpr int VEC = 16 / sizeof(T), H = VEC / 4;
  const T* e = reinterpret_cast<const T*>(&raw);
  float y[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) y[i] = bad ? kActMagic : act_code_magic(to_float(e[i]), qm);
  if (nj > 0) {
    float code[VEC];  // y - magic: the code, exact; once for every consumer (ptxas recomputed it per consumer, run nq5)
#pragma unroll
    for (int i = 0; i < VEC; ++i) code[i] = __fsub_rn(y[i], kActMagic);
#pragma unroll
    for (int h = 0; h < H; ++h) {
      const int q = q0 + h * quad_step<G, SPLIT>();
#pragma unroll
      for (int j = 0; j < J; ++j) {
        if (j < nj) {
          const float4 f = *reinterpret_cast<const float4*>(alpha[j] + 4 * q);
          dot[j] = __fmaf_rn(code[4 * h], f.x, dot[j]);
          dot[j] = __fmaf_rn(code[4 * h + 1], f.y, dot[j]);
          dot[j] = __fmaf_rn(code[4 * h + 2], f.z, dot[j]);
          dot[j] = __fmaf_rn(code[4 * h + 3], f.w, dot[j]);
        }
      }
    }
  }
  // bits(y): its low byte is the int8 code (y = magic + code, magic's low byte zero); four per word, summed by dp4a
  uint32_t packed[H];
#pragma unroll
  for (int h = 0; h < H; ++h) {
    packed[h] = __byte_perm(__byte_perm(__float_as_uint(y[4 * h]), __float_as_uint(y[4 * h + 1]), 0x0040),
                            __byte_perm(__float_as_uint(y[4 * h + 2]), __float_as_uint(y[4 * h + 3]), 0x0040), 0x5410);
    rowsum = __dp4a((int)packed[h], 0x01010101, rowsum);
  }
  return make_uint2(packed[0], packed[H - 1]);
}

// load_row: the thread's chunks from row x (zeros past the row); store_row: them into row dst (quads in the row).
template <typename T, int NC, int G, bool SPLIT>
__device__ __forceinline__ void load_row(const T* x, int t, int quads, uint4 (&raw)[NC]) {
#pragma unroll
  for (int i = 0; i < NC; ++i) {
    if constexpr (kHalves<T> == 1 || !SPLIT) {  // (a whole 16-byte chunk)
      const int q = quad_index<T, G, SPLIT>(t, i, 0);
      raw[i] = q < quads ? *reinterpret_cast<const uint4*>(x + 4 * q) : make_uint4(0, 0, 0, 0);
    } else {
      const int q0 = quad_index<T, G, SPLIT>(t, i, 0), q1 = quad_index<T, G, SPLIT>(t, i, 1);
      raw[i] = make_uint4(0, 0, 0, 0);
      if (q0 < quads) {
        const uint2 lo = *reinterpret_cast<const uint2*>(x + 4 * q0), hi = *reinterpret_cast<const uint2*>(x + 4 * q1);
        raw[i] = make_uint4(lo.x, lo.y, hi.x, hi.y);
      }
    }
  }
}
template <typename T, int NC, int G, bool SPLIT>
__device__ __forceinline__ void store_row(T* dst, int t, int quads, const uint4 (&raw)[NC]) {
#pragma unroll
  for (int i = 0; i < NC; ++i) {
    if constexpr (kHalves<T> == 1 || !SPLIT) {
      const int q = quad_index<T, G, SPLIT>(t, i, 0);
      if (q < quads) *reinterpret_cast<uint4*>(dst + 4 * q) = raw[i];
    } else {
      const int q0 = quad_index<T, G, SPLIT>(t, i, 0), q1 = quad_index<T, G, SPLIT>(t, i, 1);
      if (q0 < quads) {
        *reinterpret_cast<uint2*>(dst + 4 * q0) = make_uint2(raw[i].x, raw[i].y);
        *reinterpret_cast<uint2*>(dst + 4 * q1) = make_uint2(raw[i].z, raw[i].w);
      }
    }
  }
}

// The codes of a chunk inside the row (chunk_codes: quad h in word h) into row xq.
template <typename T, int G, bool SPLIT>
__device__ __forceinline__ void store_codes(int8_t* xq, int q0, const uint2& codes) {
  if constexpr (kHalves<T> == 1) {
    *reinterpret_cast<uint32_t*>(xq + 4 * q0) = codes.x;
  } else if constexpr (!SPLIT) {  // (the chunk's 8 codes are consecutive)
    *reinterpret_cast<uint2*>(xq + 4 * q0) = codes;
  } else {
    *reinterpret_cast<uint32_t*>(xq + 4 * q0) = codes.x;
    *reinterpret_cast<uint32_t*>(xq + 4 * (q0 + G)) = codes.y;
  }
}

// The held row's codes into row xq (chunk_codes, then every store after every alpha load), its row sum added to
// rowsum and each consumer's TQE dot to dot[j].
template <typename T, int J, int NC, int G, bool SPLIT>
__device__ __forceinline__ void row_codes(const uint4 (&raw)[NC], const RowQMagic& qm, bool bad, int nj,
                                          const float* const (&alpha)[J], int t, int quads, int8_t* xq, int& rowsum,
                                          float (&dot)[J]) {
  uint2 codes[NC];
#pragma unroll
  for (int i = 0; i < NC; ++i) {
    const int q0 = quad_index<T, G, SPLIT>(t, i, 0);
    if (q0 < quads) codes[i] = chunk_codes<T, J, G, SPLIT>(raw[i], qm, bad, nj, alpha, q0, rowsum, dot);
  }
#pragma unroll
  for (int i = 0; i < NC; ++i) {
    const int q0 = quad_index<T, G, SPLIT>(t, i, 0);
    if (q0 < quads) store_codes<T, G, SPLIT>(xq, q0, codes[i]);
  }
}

}  // namespace qv
