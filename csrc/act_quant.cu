// Per-token activation quantization (SPEC 1.1-1.2): scale, int8 codes q - z, the TQE term u and the row sum.
// Two kernels:
// - act_quant_regs_kernel (the fast path: 16-byte aligned rows of K <= 32 * 8 warps * 16 chunks * VEC): a
//   group of W warps per row holds the whole row in registers (every load issued before the first
//   reduction), reduces max/min inside the warps (and across the W warps through shared memory), then
//   writes the codes from registers. Per element it does what the Triton kernel does
//   (qvdit_math.h::act_code_magic, also run by the host emulator: Markstein quotient, round and clamp in
//   the float "magic" domain, where the low byte of bits(y) is the int8 code); the TQE dot in float32, so
//   u is within reference.u_within_bound of the float64 value.
// - act_quant_kernel (any other row: unaligned, odd K, very long K): one CTA per row, two passes over
//   the row (statistics, then codes), the scalar math of the host emulator (qvdit_math.h), float64 dot.
// Both use a fixed thread->element mapping and reduction order: results are deterministic. With a.activation = 1
// both quantize gelu_tanh(x) rounded to x's dtype (gelu_rounded), the FFN's GELU applied as the row is loaded, so
// fc1's output goes to fc2's codes in one pass without the GELU's output ever being written.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>

#include <type_traits>

#include "qvdit_kernels.cuh"
#include "qvdit_kernels.h"

namespace qv {
namespace {

constexpr int kAqThreads = 256;

// VEC consecutive elements of a row (one 16-byte load when VEC > 1), through the GELU when `gelu`.
template <typename T, int VEC>
__device__ __forceinline__ void load_vec(const T* p, float (&v)[VEC], bool gelu) {
  if (VEC == 1) {
    v[0] = to_float(p[0]);
  } else {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < VEC; ++i) v[i] = to_float(e[i]);
  }
  if (gelu) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) v[i] = gelu_rounded<T>(v[i]);
  }
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

template <typename V, class Op>
__device__ __forceinline__ V block_reduce(V v, Op op, V* sh) {
  v = warp_reduce(v, op);
  const int warp = threadIdx.x / 32;
  if (threadIdx.x % 32 == 0) sh[warp] = v;
  __syncthreads();
  V r = sh[0];
#pragma unroll
  for (int w = 1; w < kAqThreads / 32; ++w) r = op(r, sh[w]);  // every thread, same order
  __syncthreads();  // sh is reused by the next reduction
  return r;
}

// A row's results: its scale (NaN for a non-finite row), row sum and u = gate[frame_id[m]] * scale * dot
// (a bad frame id gives NaN), the product in float64 and rounded once, as reference.py computes it.
__device__ __forceinline__ void write_row(const ActQuantArgs& a, int m, bool bad, float qscale, int rowsum,
                                          double dot) {
  const float scale = bad ? __int_as_float(0x7fc00000) : qscale;
  a.scale[m] = scale;
  if (a.rowsum) a.rowsum[m] = rowsum;
  if (!a.alpha) return;
  double g = 1.0;
  if (a.gate) {
    int64_t f = 0;
    if (a.frame_id)
      f = a.fid_is_64 ? static_cast<const int64_t*>(a.frame_id)[m] : static_cast<const int32_t*>(a.frame_id)[m];
    g = (f >= 0 && f < a.num_gates) ? (double)a.gate[f] : __longlong_as_double(0x7ff8000000000000LL);
  }
  a.u[m] = (float)(dot * (double)scale * g);
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
    load_vec<T, VEC>(x + c * VEC, v, a.activation == 1);
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      bad |= !isfinite(v[i]);
      rmax = fmaxf(rmax, v[i]);
      rmin = fminf(rmin, v[i]);
      amax = fmaxf(amax, fabsf(v[i]));
    }
  }
  bad = block_reduce(bad, OrOp(), shi);
  RowQ q;
  if (a.bits == 8) {
    q = row_qparams(8, 0.0f, 0.0f, block_reduce(amax, MaxOp(), shf));
  } else {
    const float hi = block_reduce(rmax, MaxOp(), shf);
    q = row_qparams(a.bits, hi, block_reduce(rmin, MinOp(), shf), 0.0f);
  }

  int rowsum = 0;
  double dot = 0.0;
  for (int c = threadIdx.x; c < chunks; c += kAqThreads) {
    float v[VEC];
    load_vec<T, VEC>(x + c * VEC, v, a.activation == 1);
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
  rowsum = block_reduce(rowsum, AddOp(), shi);
  if (a.alpha) dot = block_reduce(dot, AddOp(), shd);
  if (threadIdx.x == 0) write_row(a, m, bad, q.scale, rowsum, dot);
}

// ---------------------------------------------------------------- rows held in registers (fast path)
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

// gelu_rounded of the elements of a 16-byte chunk, as a new chunk built from 32-bit words (a chunk written element
// by element through a T pointer goes to local memory). Each value is rounded to T once, two per conversion: the
// pass is bound by the special-function unit (exp, reciprocal) and the conversions share its rate.
template <typename T>
__device__ __forceinline__ uint4 gelu_chunk(const uint4& in) {
  constexpr int VEC = 16 / sizeof(T);
  const T* e = reinterpret_cast<const T*>(&in);
  uint32_t w[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    if constexpr (VEC == 4)
      w[j] = __float_as_uint(gelu_rounded<T>(to_float(e[j])));
    else
      w[j] = pack2<T>(tail_gelu(to_float(e[2 * j]), false), tail_gelu(to_float(e[2 * j + 1]), false));
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

constexpr int kRegsMaxWarps = 8;        // warps per row (the CTA's 256 threads)
static_assert(kActQuantInplaceMaxRowBytes == kRegsMaxWarps * 32 * 16 * 16, "launch_regs' longest row");

// W warps per row, each thread holding up to NC 16-byte chunks of VEC elements (chunk c = t + i * 32W); GELU:
// the held row goes through gelu_rounded once all its loads are issued.
template <typename T, int W, int NC, bool GELU>
__global__ void __launch_bounds__(kAqThreads) act_quant_regs_kernel(const ActQuantArgs a) {
  constexpr int VEC = 16 / sizeof(T), G = 32 * W, kRows = kAqThreads / G;
  __shared__ float sh_hi[kAqThreads / 32], sh_lo[kAqThreads / 32], sh_dot[kAqThreads / 32];
  __shared__ int sh_rs[kAqThreads / 32];
  const int group = threadIdx.x / G, t = threadIdx.x % G, warp = threadIdx.x / 32;
  const int m = blockIdx.x * kRows + group;
  const bool live = m < a.m;  // no early return: rows of W > 1 warps meet at __syncthreads
  const int chunks = live ? a.k / VEC : 0;
  const T* x = static_cast<const T*>(a.x) + (int64_t)(live ? m : 0) * a.ldx;

  uint4 raw[NC];
#pragma unroll
  for (int i = 0; i < NC; ++i) {
    const int c = t + i * G;
    raw[i] = c < chunks ? *reinterpret_cast<const uint4*>(x + c * VEC) : make_uint4(0, 0, 0, 0);
  }
  if (GELU) {  // (only the row's chunks: the padding is zero and gelu(0) = 0)
#pragma unroll
    for (int i = 0; i < NC; ++i)
      if (t + i * G < chunks) raw[i] = gelu_chunk<T>(raw[i]);
  }
  // statistics: max(row, 0) and min(row, 0) (8 bits: max |row|); fma(v, 0, nan) turns any inf/NaN into NaN
  float hi = 0.0f, lo = 0.0f, nan = 0.0f;
#pragma unroll
  for (int i = 0; i < NC; ++i) {
    const T* e = reinterpret_cast<const T*>(&raw[i]);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float v = to_float(e[j]);
      nan = __fmaf_rn(v, 0.0f, nan);
      if (a.bits == 8) {
        hi = fmaxf(hi, fabsf(v));
      } else {
        hi = fmaxf(hi, v);
        lo = fminf(lo, v);
      }
    }
  }
  hi = warp_reduce(hi, MaxOp());
  lo = warp_reduce(lo, MinOp());
  bool bad = warp_reduce(isnan(nan) ? 1.0f : 0.0f, MaxOp()) != 0.0f;
  if (W > 1) {
    if (threadIdx.x % 32 == 0) {
      sh_hi[warp] = hi;
      sh_lo[warp] = bad ? 1.0f : lo;  // lo <= 0: a positive value flags a bad warp
    }
    __syncthreads();
    hi = sh_hi[group * W];
    lo = sh_lo[group * W];
    bad = lo > 0.0f;
#pragma unroll
    for (int w = 1; w < W; ++w) {
      hi = fmaxf(hi, sh_hi[group * W + w]);
      const float l = sh_lo[group * W + w];
      bad |= l > 0.0f;
      lo = fminf(lo, l);
    }
    if (bad) lo = 0.0f;
  }
  const RowQ q = a.bits == 8 ? row_qparams(8, 0.0f, 0.0f, hi) : row_qparams(a.bits, hi, lo, 0.0f);
  const RowQMagic qm = row_qmagic(q);
  const int magic_bits = __float_as_int(kActMagic);

  int8_t* xq = a.xq + (int64_t)(live ? m : 0) * a.ldq;
  if (W == 1) __syncwarp();  // (in place: every lane has read its part of the row before any lane writes codes)
  int rowsum = 0;
  float dot = 0.0f;
#pragma unroll
  for (int i = 0; i < NC; ++i) {
    const int c = t + i * G;
    if (c < chunks) {
      const T* e = reinterpret_cast<const T*>(&raw[i]);
      float al[VEC];
      if (a.alpha) {
#pragma unroll
        for (int j = 0; j < VEC; j += 4) {
          const float4 f = *reinterpret_cast<const float4*>(a.alpha + c * VEC + j);
          al[j] = f.x; al[j + 1] = f.y; al[j + 2] = f.z; al[j + 3] = f.w;
        }
      }
      uint32_t codes[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float y = bad ? kActMagic : act_code_magic(to_float(e[j]), qm);
        const int code = __float_as_int(y) - magic_bits;
        rowsum += code;
        if (a.alpha) dot = __fmaf_rn(__fsub_rn(y, kActMagic), al[j], dot);  // y - magic: the code, exact
        codes[j] = (uint32_t)code;
      }
      uint32_t packed[VEC / 4];
#pragma unroll
      for (int j = 0; j < VEC / 4; ++j)  // low bytes of four codes
        packed[j] = __byte_perm(__byte_perm(codes[4 * j], codes[4 * j + 1], 0x0040),
                                __byte_perm(codes[4 * j + 2], codes[4 * j + 3], 0x0040), 0x5410);
      if (VEC == 8) *reinterpret_cast<uint2*>(xq + c * VEC) = make_uint2(packed[0], packed[VEC / 4 - 1]);
      else *reinterpret_cast<uint32_t*>(xq + c * VEC) = packed[0];
    }
  }
  rowsum = warp_reduce(rowsum, AddOp());
  dot = warp_reduce(dot, AddOp());
  if (W > 1) {
    if (threadIdx.x % 32 == 0) {
      sh_rs[warp] = rowsum;
      sh_dot[warp] = dot;
    }
    __syncthreads();
    rowsum = sh_rs[group * W];
    dot = sh_dot[group * W];
#pragma unroll
    for (int w = 1; w < W; ++w) {
      rowsum += sh_rs[group * W + w];
      dot = __fadd_rn(dot, sh_dot[group * W + w]);
    }
  }
  if (live && t == 0) write_row(a, m, bad, q.scale, rowsum, dot);
}

// The fast path's launch: one warp per row for rows of up to 32 x 16 chunks (8 chunks per thread when they
// suffice), else the fewest warps (2, 4, 8) that hold the row in 16 chunks per thread; false: too long.
template <typename T, bool GELU>
bool launch_regs(const ActQuantArgs& a, int chunks, cudaStream_t stream) {
  const auto grid = [&](int w) { return (a.m + kAqThreads / (32 * w) - 1) / (kAqThreads / (32 * w)); };
  if (chunks <= 32 * 8)
    act_quant_regs_kernel<T, 1, 8, GELU><<<grid(1), kAqThreads, 0, stream>>>(a);
  else if (chunks <= 32 * 16)
    act_quant_regs_kernel<T, 1, 16, GELU><<<grid(1), kAqThreads, 0, stream>>>(a);
  else if (chunks <= 64 * 16)
    act_quant_regs_kernel<T, 2, 16, GELU><<<grid(2), kAqThreads, 0, stream>>>(a);
  else if (chunks <= 128 * 16)
    act_quant_regs_kernel<T, 4, 16, GELU><<<grid(4), kAqThreads, 0, stream>>>(a);
  else if (chunks <= 32 * kRegsMaxWarps * 16)
    act_quant_regs_kernel<T, kRegsMaxWarps, 16, GELU><<<grid(kRegsMaxWarps), kAqThreads, 0, stream>>>(a);
  else
    return false;
  return true;
}

template <typename T>
cudaError_t launch_typed(const ActQuantArgs& a, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vec_ok = a.k % kVec == 0 && reinterpret_cast<uintptr_t>(a.x) % 16 == 0 &&
                      (a.ldx * (int64_t)sizeof(T)) % 16 == 0 && reinterpret_cast<uintptr_t>(a.xq) % kVec == 0 &&
                      a.ldq % kVec == 0;
  const bool regs_ok = vec_ok && (a.alpha == nullptr || reinterpret_cast<uintptr_t>(a.alpha) % 16 == 0);
  if (regs_ok && (a.activation == 1 ? launch_regs<T, true>(a, a.k / kVec, stream)
                                     : launch_regs<T, false>(a, a.k / kVec, stream)))
    return cudaGetLastError();
  if (a.inplace) return cudaErrorNotSupported;  // (the kernels below read a row again after writing codes)
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
