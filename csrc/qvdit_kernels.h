// Host API of the CUDA kernels (launchers in act_quant.cu, norm_quant.cu, epilogue_tail.cu, gemm_sm80.cu, gemm_sm90.cu,
// gemm_sm90_ws.cu). Raw device pointers and a stream only: bindings.cpp (the one file with torch headers)
// validates and allocates.
#pragma once
#include <cuda_runtime_api.h>
#include <stdint.h>

#include "qvdit_math.h"  // (GemmArgs; includes qvdit_layout.h)

namespace qv {

// Per-token activation quantization of x [m, k] (row stride ldx elements; x_kind 0 fp32, 1 bf16, 2 fp16)
// into codes xq [m, k] (row stride ldq), scale [m], and optionally u [m] (alpha/gate/frame_id given;
// gate or frame_id may be null) and rowsum [m]. alpha and gate are fp32; frame_id int32 or int64
// (fid_is_64). Rows with a non-finite value get scale NaN and zero codes, as in reference.py.
struct ActQuantArgs {
  const void* x;
  int x_kind;
  int64_t ldx;
  int m, k, bits;
  const float* alpha;  // [k] or null (then no u)
  const float* gate;   // [g] or null (ones)
  int num_gates;
  const void* frame_id;  // [m] or null (gate[0] everywhere)
  bool fid_is_64;
  int8_t* xq;
  int64_t ldq;
  float* scale;
  float* u;         // null when alpha is null
  int32_t* rowsum;  // may be null
  int activation;   // 0 none, 1 gelu_tanh: quantize gelu(x) rounded to x's dtype (qvdit_math.h::tail_gelu)
  // xq overlays x (row m's codes in the first k bytes of row m's own storage): only the register kernel runs, which
  // holds a whole row before any of its codes is written; act_quant returns cudaErrorNotSupported when the row
  // does not fit it (then nothing is written)
  bool inplace;
};
// The longest row (bytes, in whole 16-byte chunks, 16-byte aligned) the register kernel holds, so the longest
// an in-place act-quant takes (row_quant.cuh kRowMaxBytes: 8 warps x 32 lanes x 16 chunks; qvdit_kernels/cuda.py
// INPLACE_MAX_ROW_BYTES, checked equal by tests/test_cuda_build.py).
constexpr int kActQuantInplaceMaxRowBytes = 8 * 32 * 16 * 16;
cudaError_t act_quant(const ActQuantArgs& a, cudaStream_t stream);

// LayerNorm [+ affine] [+ adaLN modulation] of x [m, k] fused with the per-token quantization of its output for nj
// consumers (reference.norm_quantize): y [m, k] (x's dtype, contiguous) = (LN(x) [* weight + bias]) [* (1 +
// mod_scale[m / mod_rows]) + mod_shift[m / mod_rows]] rounded, the codes xq [m, k] (contiguous), scale [m] and
// rowsum [m] of that y, and u [nj, m] = dot(codes, alpha[j]) * scale [* gate[j, frame_id[m]]]. Every float array
// is fp32 and contiguous (weight/bias [k], mod_* [R, k], alpha [nj, k], gate [nj, num_gates]); frame_id int32.
// Rows with a non-finite value get scale NaN and zero codes. With a residual (ops.add_norm_quantize) the norm's
// input is h = residual + rgate[m / rg_div] * x (gate null: residual + x), in float32 rounded to x's dtype
// (reference.epilogue_tail's add), written to h [m, k] (contiguous). y null: y is not written (only its codes).
// Only rows norm_quant_supported takes: unit column stride, 16-byte aligned rows and fp32 arrays, k a multiple of
// 16 / sizeof(element), at most kNormQuantMaxRowBytes; else norm_quant returns cudaErrorNotSupported and writes
// nothing.
struct NormQuantArgs {
  const void* x;
  int x_kind;  // 0 fp32, 1 bf16, 2 fp16
  int64_t ldx;
  int m, k, bits;
  float eps;
  const float* weight;  // [k] or null (with bias)
  const float* bias;
  const float* mod_scale;  // [R, k] or null (with mod_shift)
  const float* mod_shift;
  int mod_rows;
  int nj;               // TQE consumers, 0..3
  const float* alpha;   // [nj, k]
  const float* gate;    // [nj, num_gates] or null (ones)
  int num_gates;
  const int32_t* frame_id;  // [m] or null (frame 0)
  const void* residual;     // [m, k] (x's dtype, row stride ld_res) or null
  int64_t ld_res;
  const float* rgate;       // [m / rg_div, k] or null (no gate)
  int rg_div;
  void* h;                  // [m, k] with a residual
  void* y;                  // or null: not written
  int8_t* xq;
  float* scale;
  float* u;  // [nj, m]
  int32_t* rowsum;
};
constexpr int kNormQuantMaxRowBytes = 8 * 32 * 16 * 16;  // (the same register kernels' row: kRowMaxBytes)
constexpr int kNormQuantMaxConsumers = 3;
bool norm_quant_supported(const NormQuantArgs& a);
cudaError_t norm_quant(const NormQuantArgs& a, cudaStream_t stream);

// rowsum[m] = sum_k xq[m, k] (int32), for a qgemm called without x_rowsum.
cudaError_t rowsum_s8(const int8_t* xq, int64_t ldq, int m, int k, int32_t* rowsum, cudaStream_t stream);

// The epilogue tail after a GEMM whose kernel did not fuse it (reference.epilogue_tail), in one pass:
// out = residual + gate * act(y) with y [m, n] (row stride ldy) and e.out in the out dtype e.out_kind (0-2),
// e.activation / e.residual / e.ld_res / e.rgate / e.gate_div as the fused tail reads them; out may be y.
cudaError_t epilogue_tail(const void* y, int64_t ldy, const Epi& e, cudaStream_t stream);

// GEMM paths (GemmArgs in qvdit_math.h). bits in {3, 4, 8}.
cudaError_t qgemm_sm80(const GemmArgs& g, int bits, cudaStream_t stream);
cudaError_t qgemm_sm90(const GemmArgs& g, int bits, cudaStream_t stream);
int qgemm_sm80_smem_bytes(int bits);
int qgemm_sm90_smem_bytes(int bits);
// True when the current device is sm_90 and the binary holds the sm_90a (wgmma) code of gemm_sm90.cu.
bool qgemm_sm90_available();
// The warp-specialized sm_90a kernel of gemm_sm90_ws.cu (W3/W4; TMA loads, weights in wgmma registers).
// Supported for W3/W4 with 16-byte aligned operands and row strides and a driver that encodes tensor
// maps; qgemm_sm90_ws returns cudaErrorNotSupported otherwise (the caller then takes gemm_sm90.cu).
bool qgemm_sm90_ws_supported(const GemmArgs& g, int bits);
cudaError_t qgemm_sm90_ws(const GemmArgs& g, int bits, cudaStream_t stream);
// Its tile height for N output features and K input features (128 or 256 weight rows; QVDIT_WS_ROWS
// overrides), and its tile mode (ws_layout.h: 128-row tiles kWsCoop128, or kWsDefer128 with QVDIT_WS_DEFER=1,
// or kWsPingPong with QVDIT_WS_PINGPONG=1; 256-row tiles kWsCoop256; with an epilogue tail a 128-row
// cooperative mode).
int qgemm_sm90_ws_rows(int n, int k);
int qgemm_sm90_ws_mode(int n, int k, bool tail);

}  // namespace qv
