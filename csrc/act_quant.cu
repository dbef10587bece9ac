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

#include "qvdit_kernels.h"
#include "row_quant.cuh"

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

static_assert(kActQuantInplaceMaxRowBytes == kRowMaxBytes, "the register kernel's longest row");

// W warps per row, each thread holding up to NC 16-byte chunks (row_quant.cuh's quad layout); GELU: the held row
// goes through gelu_rounded once all its loads are issued.
template <typename T, int W, int NC, bool GELU, bool SPLIT>
__global__ void __launch_bounds__(kRowThreads) act_quant_regs_kernel(const ActQuantArgs a) {
  constexpr int G = 32 * W, kRows = kRowThreads / G;
  __shared__ float sh[2][kRowThreads / 32][4];  // (one buffer per group_reduce)
  const int group = threadIdx.x / G, t = threadIdx.x % G;
  const int m = blockIdx.x * kRows + group;
  const bool live = m < a.m;  // no early return: rows of W > 1 warps meet at __syncthreads
  const int quads = live ? a.k / 4 : 0;  // (the row's quads of 4 elements; none past the end)
  const T* x = static_cast<const T*>(a.x) + (int64_t)(live ? m : 0) * a.ldx;

  uint4 raw[NC];
  load_row<T, NC, G, SPLIT>(x, t, quads, raw);
  if (GELU) {  // (only the row's chunks: the padding is zero and gelu(0) = 0)
#pragma unroll
    for (int i = 0; i < NC; ++i)
      if (quad_index<T, G, SPLIT>(t, i, 0) < quads) raw[i] = gelu_chunk<T>(raw[i]);
  }
  float hi, lo;
  const bool bad_here = chunk_stats<T, NC>(raw, a.bits == 8, hi, lo);
  float st[3] = {hi, -lo, bad_here ? 1.0f : 0.0f};  // all three by max
  group_reduce<W>(st, MaxOp(), sh[0]);
  const bool bad = st[2] != 0.0f;
  hi = st[0];
  lo = bad ? 0.0f : -st[1];
  const RowQ q = a.bits == 8 ? row_qparams(8, 0.0f, 0.0f, hi) : row_qparams(a.bits, hi, lo, 0.0f);
  const RowQMagic qm = row_qmagic(q);

  int8_t* xq = a.xq + (int64_t)(live ? m : 0) * a.ldq;
  if (W == 1) __syncwarp();  // (in place: every lane has read its part of the row before any lane writes codes)
  int rowsum = 0;
  float dot[1] = {0.0f};
  const float* const alpha[1] = {a.alpha};
  row_codes<T, 1, NC, G, SPLIT>(raw, qm, bad, a.alpha ? 1 : 0, alpha, t, quads, xq, rowsum, dot);
  float sums[2] = {(float)rowsum, dot[0]};  // (|rowsum| <= 127 K < 2^24: every partial sum exact in float)
  group_reduce<W>(sums, AddOp(), sh[1]);
  if (live && t == 0) write_row(a, m, bad, q.scale, (int)sums[0], sums[1]);
}

// The fast path's launch (row_quant.cuh, launch_row_shape); false: the row is too long for it.
template <typename T, bool GELU>
bool launch_regs(const ActQuantArgs& a, int chunks, cudaStream_t stream) {
  return launch_row_shape(a.m, chunks, [&](auto w, auto nc, int grid) {
    constexpr int W = decltype(w)::value, NC = decltype(nc)::value;
    if (split_rows<T, W>(a.k))  // (float32 always: no other instantiation)
      act_quant_regs_kernel<T, W, NC, GELU, true><<<grid, kRowThreads, 0, stream>>>(a);
    else
      act_quant_regs_kernel<T, W, NC, GELU, sizeof(T) == 4><<<grid, kRowThreads, 0, stream>>>(a);
  });
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
