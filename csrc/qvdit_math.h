// The float and integer math of the kernels' epilogues and of activation quantization, on loaded values: tile
// order, the launch arguments (Epi, GemmArgs), the zero correction, epilogue_value, the act-quant row parameters
// and codes, the DiT tail (GELU, gated residual). Shared with the host emulator, which checks it bit for bit
// against reference.py; plain C++17 off nvcc.
#pragma once
#include "qvdit_layout.h"

namespace qv {

// ---------------------------------------------------------------- epilogue
// Tile order: groups of kGroupM activation-row tiles walk the weight-row tiles together, so a weight
// tile is read by consecutive CTAs (L2 reuse).
constexpr int kGroupM = 8;
QV_HD void tile_coords(int pid, int tiles_m, int tiles_n, int& tm, int& tn) {
  const int per_group = kGroupM * tiles_n, group = pid / per_group, first_m = group * kGroupM;
  const int rows = (tiles_m - first_m) < kGroupM ? (tiles_m - first_m) : kGroupM;
  tm = first_m + (pid % per_group) % rows;
  tn = (pid % per_group) / rows;
}

// Epilogue operands (device pointers; optional ones null). y = acc * sx[m] * sw[n] + bias[n] + u[m] * beta[n]
// with acc = acc_raw - zw[n] * rowsum[m], in the order of reference.py (no contraction), float32.
struct Epi {
  const float* sx;
  const float* sw;
  const float* zw;
  const int32_t* rowsum;
  const float* bias;
  const float* u;
  const float* beta;
  void* out;
  int out_kind;  // 0 bf16, 1 fp16, 2 fp32, 3 int32 (zero-corrected acc)
  int m, n;
  // Optional tail (reference.epilogue_tail; only gemm_sm90_ws.cu applies it): out = residual + gate * act(y)
  int activation;        // 0 none, 1 gelu_tanh
  const void* residual;  // [m, n] in the out dtype, row stride ld_res; null = none
  int64_t ld_res;
  const float* rgate;    // [g, n] float32, row m takes gate row m / gate_div; null = none
  int gate_div;
  // Row stride of out in elements; 0 means n (contiguous). Larger when the GEMM writes into the spare bytes of
  // another buffer's rows (the FFN's fc2 into fc1's output rows: ops.qlinear(overwrite_residual=)).
  int64_t ld_out;
};
QV_HD int64_t out_stride(const Epi& e) { return e.ld_out ? e.ld_out : e.n; }

// Arguments of one GEMM launch (device pointers). The activation buffer has ka columns (K rounded up
// to 16, zero padded by the host), the W8 buffer kw; steps = mainloop steps, the last one a W3
// 128-code tail tile when `tail`.
struct GemmArgs {
  const int8_t* a;  // activation codes [m, ka], row stride lda
  int64_t lda;
  int ka;
  const uint8_t* w;  // packed weights [n, ldw bytes]
  int64_t ldw;
  int kw;
  int steps;
  bool tail;
  int tiles_m, tiles_n;
  Epi epi;  // also holds m, n
};

// acc = acc_raw - zw * rowsum in wrapping 32-bit arithmetic: the exact result fits int32 (ops.MAX_K),
// an intermediate may not. zw is integer valued (SPEC 1.1), so the conversion is exact.
QV_HD int32_t zero_corrected(int32_t acc_raw, int32_t zw, int32_t rowsum) {
  return (int32_t)((uint32_t)acc_raw - (uint32_t)zw * (uint32_t)rowsum);
}
QV_HD int32_t zero_corrected(int32_t acc_raw, float zw, int32_t rowsum) {
  return zero_corrected(acc_raw, (int32_t)zw, rowsum);
}

// Separate IEEE multiply and add (never fused), as the reference computes them.
#ifdef __CUDA_ARCH__
#define QV_FMUL(a, b) __fmul_rn((a), (b))
#define QV_FADD(a, b) __fadd_rn((a), (b))
#else
#define QV_FMUL(a, b) ((a) * (b))
#define QV_FADD(a, b) ((a) + (b))
#endif

// ---------------------------------------------------------------- activation quantization (SPEC 1.1)
#ifdef __CUDA_ARCH__
#define QV_FDIV(a, b) __fdiv_rn((a), (b))
#define QV_FSUB(a, b) __fsub_rn((a), (b))
#else
#define QV_FDIV(a, b) ((a) / (b))
#define QV_FSUB(a, b) ((a) - (b))
#endif

// Row parameters from the row's max and min (b <= 7) or max |x| (b = 8), in float32 exactly as
// reference.py computes them (IEEE division, round half to even, EPS = 1e-8f).
struct RowQ {
  float scale, zero, qmax;
  bool sym;
};
QV_HD float clampf(float v, float lo, float hi) { return v < lo ? lo : (v > hi ? hi : v); }
QV_HD RowQ row_qparams(int bits, float rmax, float rmin, float amax) {
  RowQ r;
  r.sym = bits == 8;
  if (r.sym) {
    const float s = QV_FDIV(amax, 127.0f);
    r.scale = s > 1e-8f ? s : 1e-8f;
    r.zero = 0.0f;
    r.qmax = 127.0f;
    return r;
  }
  r.qmax = (float)((1 << bits) - 1);
  const float hi = rmax > 0.0f ? rmax : 0.0f, lo = rmin < 0.0f ? rmin : 0.0f;
  const float s = QV_FDIV(QV_FSUB(hi, lo), r.qmax);
  r.scale = s > 1e-8f ? s : 1e-8f;
  r.zero = clampf(rintf(QV_FDIV(-lo, r.scale)), 0.0f, r.qmax);
  return r;
}
// The activation code q - z of x (an int8 value).
QV_HD int act_code(float x, const RowQ& r) {
  const float q = rintf(QV_FDIV(x, r.scale));
  if (r.sym) return (int)clampf(q, -127.0f, 127.0f);
  return (int)(clampf(q + r.zero, 0.0f, r.qmax) - r.zero);
}

// The fast path's per-element math (act_quant_regs_kernel, the Triton kernel's): the quotient RN(x / s) as
// q0 = x*r, e = fma(-q0, s, x), fma(e, r, q0) with r = RN(1/s) (Markstein's correction: exactly IEEE's quotient),
// then round half to even and clamp in the "magic" domain y = t + 1.5*2^23, where y is magic + the code (exact
// integers there): the code is bits(y) - bits(magic), its low byte the int8 code, y - magic its float value.
constexpr float kActMagic = 12582912.0f;
struct RowQMagic {
  float scale, r, ylo, yhi;  // r = RN(1/scale); y is kept in [magic - z, magic - z + qmax] (8 bits: +-127)
};
QV_HD RowQMagic row_qmagic(const RowQ& q) {
#ifdef __CUDA_ARCH__
  const float r = __frcp_rn(q.scale);
#else
  const float r = 1.0f / q.scale;
#endif
  return {q.scale, r, q.sym ? kActMagic - 127.0f : kActMagic - q.zero,
          q.sym ? kActMagic + 127.0f : kActMagic - q.zero + q.qmax};
}
QV_HD float act_code_magic(float x, const RowQMagic& p) {
#ifdef __CUDA_ARCH__
  const float q0 = __fmul_rn(x, p.r);
  const float t = __fmaf_rn(__fmaf_rn(-q0, p.scale, x), p.r, q0);
#else
  const float q0 = x * p.r;
  const float t = fmaf(fmaf(-q0, p.scale, x), p.r, q0);  // C99 fmaf: one rounding, as on the device
#endif
  const float y = QV_FADD(t, kActMagic);
  return fminf(fmaxf(y, p.ylo), p.yhi);
}

// The epilogue's float ops on loaded operands, in reference.py's order: acc * sx * sw (+ bias) (+ u * beta).
// epilogue_value reads the operands from global memory; the ws kernel (ws_epilogue.cuh) from shared memory.
QV_HD float epilogue_ops(int32_t acc, float sx, float sw, bool has_bias, float bias, bool has_u, float u,
                         float beta) {
  float y = QV_FMUL(QV_FMUL((float)acc, sx), sw);
  if (has_bias) y = QV_FADD(y, bias);
  if (has_u) y = QV_FADD(y, QV_FMUL(u, beta));
  return y;
}
// gelu_tanh in torch's own form, 0.5 x (1 + tanh z): for float32 outputs, where the fast form's few ulp would show.
QV_HD float gelu_tanh_torch(float y) {
  const float inner = 0.7978845608028654f * (y + 0.044715f * (y * y * y));
  return 0.5f * y * (1.0f + tanhf(inner));
}
// gelu_tanh as the fused tails compute it (the Triton kernel's form): x / (1 + exp(-2 z)) == 0.5 x (1 + tanh z),
// z = sqrt(2/pi) (x + 0.044715 x^3), with the constants folded: exp(-2 z) = 2^(x (k1 + k2 x^2)), k1 = -2 sqrt(2/pi)
// log2(e), k2 = 0.044715 k1 (three float ops before the exp where the unfolded form takes six: fc2's act-quant
// runs it per element). On the device the hardware exp2 and the fast division (where tanhf costs ~20 instructions
// and IEEE division a slow-path call); exp overflow gives x / inf = -0, torch's value.
QV_HD float gelu_tanh_exp(float y) {
  constexpr float k1 = (float)(-2.0 * 0.7978845608028654 * 1.4426950408889634);
  constexpr float k2 = (float)(-2.0 * 0.7978845608028654 * 1.4426950408889634 * 0.044715);
  const float a = y * fmaf(k2, y * y, k1);
#ifdef __CUDA_ARCH__
  float e;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(e) : "f"(a));
  return __fdividef(y, 1.0f + e);
#else
  return y / (1.0f + exp2f(a));
#endif
}
// The epilogue tail's two steps on one output, as every CUDA tail computes them (ws_epilogue.cuh fused,
// epilogue_tail.cu after the kernel). GELU: float32 outputs in torch's tanh form (the fast form's few float32
// ulp would show there), 16-bit outputs in the fast exp form (far below their rounding); the caller rounds.
QV_HD float tail_gelu(float y, bool float32_out) { return float32_out ? gelu_tanh_torch(y) : gelu_tanh_exp(y); }
// residual + gate * y (without a gate, residual + y), rounded per step as reference.epilogue_tail computes it.
QV_HD float tail_residual(float res, float y, bool gated, float gate) {
  return QV_FADD(res, gated ? QV_FMUL(y, gate) : y);
}
QV_HD float epilogue_value(int32_t acc, int m, int n, const Epi& e) {
  return epilogue_ops(acc, e.sx[m], e.sw[n], e.bias != nullptr, e.bias ? e.bias[n] : 0.f, e.u != nullptr,
                      e.u ? e.u[m] : 0.f, e.u ? e.beta[n] : 0.f);
}

}  // namespace qv
