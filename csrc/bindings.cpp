// torch bindings of the CUDA kernels: TORCH_LIBRARY schemas, CUDA implementations and Meta (fake)
// implementations, so the ops trace under torch.compile. The only file with torch headers; the kernels
// behind qvdit_kernels.h compile with plain nvcc (csrc/compile_check.sh).
//
//   torch.ops.qvdit.cuda_act_quant(x, bits, alpha, gate, frame_id, want_rowsum, activation=0)
//     -> (xq, scale, u, rowsum); activation 1: the codes of gelu_tanh(x) (FFN fc1 -> GELU -> fc2)
//       u is [M] when alpha is given, else [0]; rowsum is [M] when want_rowsum, else [0].
//   torch.ops.qvdit.cuda_act_quant_inplace(x!, bits, alpha, gate, frame_id, activation=0) -> (scale, u, rowsum)
//       the same with the codes written over x's own rows (x.view(int8)[:, :K] afterwards): no code buffer.
//   torch.ops.qvdit.cuda_norm_quant(x, bits, eps, weight, bias, scale, shift, mod_rows, alphas, gates, frame_id,
//                                   residual, residual_gate, write_y)
//     -> (y ([0, K] unless write_y), xq, scale, u [J, M] ([0, M] without alphas), rowsum, h ([0, K] without a
//       residual)): reference.norm_quantize_backend for rows norm_quant.cu holds (16-byte aligned, K a multiple of
//       16 / element size, at most kNormQuantMaxRowBytes; else an error).
//   torch.ops.qvdit.cuda_qgemm(xq, x_scale, w_packed, w_bits, w_scale, w_zero, bias, u, beta, x_rowsum,
//                              out_dtype, path, activation, residual, residual_gate) -> [M, N]
//       activation 0 none / 1 gelu_tanh, residual [M, N] (out dtype), residual_gate f32 [G, N]: the epilogue
//       tail (reference.epilogue_tail). fuse_tail: in the warp-specialized kernel's epilogue (an error on any
//       other path); else, on every path, one pass over the output in place after the kernel (epilogue_tail.cu),
//       so the tail costs no second [M, N] buffer.
//   torch.ops.qvdit.cuda_epilogue_tail(y, activation, residual, residual_gate) -> [M, N]: that tail pass alone,
//       into a new tensor (a direct probe of the kernel for tests).
//   torch.ops.qvdit.cuda_qlinear_over(x!, bits, alpha, gate, frame_id, input_activation, w_packed, w_bits, w_scale,
//                                     w_zero, bias, beta, path, activation, residual!, residual_gate) -> ()
//       act-quant + GEMM + tail with the codes over x, y in x's spare row bytes and the result over residual.
//       path 0 = the fastest kernel here (W3/W4: warp-specialized wgmma; W8: wgmma; mma.sync without sm_90a),
//       1 = mma.sync, 2 = wgmma (gemm_sm90.cu), 3 = warp-specialized wgmma for W3/W4 (gemm_sm90_ws.cu; W8
//       takes gemm_sm90.cu); 2 and 3 are an error where sm_90a is absent.
// Arguments are validated by qvdit_kernels.ops before they get here; the checks below guard direct calls.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <optional>

#include "qvdit_kernels.h"

namespace {

using at::Tensor;
using OptT = std::optional<Tensor>;

constexpr int64_t round_up(int64_t v, int64_t a) { return (v + a - 1) / a * a; }

void check_cuda(const Tensor& t, const char* name, const Tensor& like) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.device() == like.device(), name, " is on ", t.device(), ", expected ", like.device());
}

void check_vec(const Tensor& t, const char* name, int64_t len, const Tensor& like) {
  check_cuda(t, name, like);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == len, name, " must have shape [", len, "], got ", t.sizes());
}

// A float vector as contiguous float32 (bias, beta, alpha and gate may come in any float dtype).
Tensor f32(const Tensor& t) { return t.to(at::kFloat).contiguous(); }

bool aligned16(const Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "qvdit CUDA ", what, " failed: ", cudaGetErrorString(err));
}

// Checks x, bits and activation as both act-quant ops take them (the error names the argument).
void check_act_quant_args(const Tensor& x, int64_t bits, int64_t activation) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2, "x must be a 2-D CUDA tensor, got ", x.sizes(), " on ", x.device());
  TORCH_CHECK(bits == 6 || bits == 8, "bits must be 6 or 8, got ", bits);
  TORCH_CHECK(activation == 0 || activation == 1, "activation must be 0 (none) or 1 (gelu_tanh), got ", activation);
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf, "x must be float32, bfloat16 or float16");
}

// The act-quant launch of both ops on x (unit column stride): codes into xq (row stride ldq bytes), the row scale,
// TQE u (alpha given) and row sums (want_rowsum) into new tensors, returned. inplace: xq overlays x
// (ActQuantArgs::inplace); act_quant then refuses, writing nothing, a row its register kernel cannot hold, and
// that refusal is the error below (one place decides: act_quant.cu's launch_typed).
std::tuple<Tensor, Tensor, Tensor> act_quant_launch(const Tensor& x, int64_t bits, const OptT& alpha,
                                                    const OptT& gate, const OptT& frame_id, bool want_rowsum,
                                                    int64_t activation, int8_t* xq, int64_t ldq, bool inplace) {
  const int64_t m = x.size(0), k = x.size(1);
  const auto st = x.scalar_type();
  auto opts = x.options();
  Tensor scale = at::empty({m}, opts.dtype(at::kFloat));
  Tensor u = at::empty({alpha ? m : 0}, opts.dtype(at::kFloat));
  Tensor rowsum = at::empty({want_rowsum ? m : 0}, opts.dtype(at::kInt));
  Tensor alpha32, gate32, fid;
  qv::ActQuantArgs a{};
  if (alpha) {
    check_vec(*alpha, "alpha", k, x);
    alpha32 = f32(*alpha);
    if (reinterpret_cast<uintptr_t>(alpha32.data_ptr()) % 16 != 0) alpha32 = alpha32.clone();  // (16-byte loads)
    a.alpha = alpha32.data_ptr<float>();
    if (gate) {
      check_cuda(*gate, "gate", x);
      TORCH_CHECK(gate->dim() == 1 && gate->numel() > 0, "gate must be a non-empty 1-D tensor");
      gate32 = f32(*gate);
      a.gate = gate32.data_ptr<float>();
      a.num_gates = (int)gate32.numel();
    }
    if (frame_id && gate) {
      check_vec(*frame_id, "frame_id", m, x);
      TORCH_CHECK(frame_id->scalar_type() == at::kInt || frame_id->scalar_type() == at::kLong,
                  "frame_id must be int32 or int64");
      fid = frame_id->contiguous();
      a.frame_id = fid.data_ptr();
      a.fid_is_64 = fid.scalar_type() == at::kLong;
    }
    a.u = u.data_ptr<float>();
  }
  a.x = x.data_ptr();
  a.x_kind = st == at::kFloat ? 0 : (st == at::kBFloat16 ? 1 : 2);
  a.ldx = x.stride(0);
  a.m = (int)m;
  a.k = (int)k;
  a.bits = (int)bits;
  a.activation = (int)activation;
  a.xq = xq;
  a.ldq = ldq;
  a.inplace = inplace;
  a.scale = scale.data_ptr<float>();
  a.rowsum = want_rowsum ? rowsum.data_ptr<int32_t>() : nullptr;
  const cudaError_t err = qv::act_quant(a, c10::cuda::getCurrentCUDAStream());
  const int64_t el = x.element_size();
  TORCH_CHECK(!(inplace && err == cudaErrorNotSupported), "cuda_act_quant_inplace: x must have 16-byte aligned rows ",
              "of at most ", qv::kActQuantInplaceMaxRowBytes / el, " elements, a multiple of ", 16 / el,
              " (a row is held in registers before its codes overwrite it), got ", x.sizes(), " with row stride ",
              x.stride(0));
  check_launch(err, "act_quant");
  return {scale, u, rowsum};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> act_quant_cuda(const Tensor& x_in, int64_t bits, const OptT& alpha,
                                                          const OptT& gate, const OptT& frame_id, bool want_rowsum,
                                                          int64_t activation) {
  check_act_quant_args(x_in, bits, activation);
  c10::cuda::CUDAGuard guard(x_in.device());
  const Tensor x = x_in.stride(1) == 1 ? x_in : x_in.contiguous();
  Tensor xq = at::empty({x.size(0), x.size(1)}, x.options().dtype(at::kChar));
  auto [scale, u, rowsum] = act_quant_launch(x, bits, alpha, gate, frame_id, want_rowsum, activation,
                                             xq.data_ptr<int8_t>(), x.size(1), false);
  return {xq, scale, u, rowsum};
}

// The act-quant of x with its codes written over x itself: row m's K codes in the first K bytes of row m's storage
// (x.view(int8)[:, :K] afterwards, row stride x.stride(0) * x.element_size() bytes), so no [M, K] code buffer
// exists beside x (the FFN's fc2, whose input is dead after its act-quant). Returns scale, u, row sums.
std::tuple<Tensor, Tensor, Tensor> act_quant_inplace_cuda(Tensor& x, int64_t bits, const OptT& alpha,
                                                          const OptT& gate, const OptT& frame_id, int64_t activation) {
  check_act_quant_args(x, bits, activation);
  TORCH_CHECK(x.stride(1) == 1 && x.stride(0) >= x.size(1), "cuda_act_quant_inplace: x must have unit column stride "
              "and rows that do not overlap, got strides ", x.strides(), " for sizes ", x.sizes());
  c10::cuda::CUDAGuard guard(x.device());
  return act_quant_launch(x, bits, alpha, gate, frame_id, true, activation, static_cast<int8_t*>(x.data_ptr()),
                          x.stride(0) * (int64_t)x.element_size(), true);
}

// A float array as contiguous float32 with a 16-byte aligned base (the kernels' 16-byte loads).
Tensor f32_aligned(const Tensor& t) {
  Tensor r = f32(t);
  return aligned16(r) ? r : r.clone();
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> norm_quant_cuda(
    const Tensor& x_in, int64_t bits, double eps, const OptT& weight, const OptT& bias, const OptT& scale,
    const OptT& shift, int64_t mod_rows, const OptT& alphas, const OptT& gates, const OptT& frame_id,
    const OptT& residual_in, const OptT& residual_gate, bool write_y) {
  check_act_quant_args(x_in, bits, 0);
  TORCH_CHECK(weight.has_value() == bias.has_value(), "weight and bias must be given together");
  TORCH_CHECK(scale.has_value() == shift.has_value(), "scale and shift must be given together");
  TORCH_CHECK(mod_rows >= 1, "mod_rows must be positive, got ", mod_rows);
  c10::cuda::CUDAGuard guard(x_in.device());
  const Tensor x = x_in.stride(1) == 1 ? x_in : x_in.contiguous();
  const int64_t m = x.size(0), k = x.size(1);
  qv::NormQuantArgs a{};
  Tensor w32, b32, sc32, sh32, al32, g32, fid;
  if (weight) {
    check_vec(*weight, "weight", k, x);
    check_vec(*bias, "bias", k, x);
    w32 = f32_aligned(*weight), b32 = f32_aligned(*bias);
    a.weight = w32.data_ptr<float>(), a.bias = b32.data_ptr<float>();
  }
  if (scale) {
    check_cuda(*scale, "scale", x);
    check_cuda(*shift, "shift", x);
    TORCH_CHECK(scale->dim() == 2 && scale->size(1) == k && shift->sizes() == scale->sizes() &&
                    scale->size(0) * mod_rows >= m,
                "scale and shift must have shape [R, ", k, "] with R * mod_rows >= ", m, ", got ", scale->sizes(),
                " and ", shift->sizes());
    sc32 = f32_aligned(*scale), sh32 = f32_aligned(*shift);
    a.mod_scale = sc32.data_ptr<float>(), a.mod_shift = sh32.data_ptr<float>();
  }
  a.mod_rows = (int)mod_rows;
  const int64_t nj = alphas ? alphas->size(0) : 0;
  if (alphas) {
    check_cuda(*alphas, "alphas", x);
    TORCH_CHECK(alphas->dim() == 2 && alphas->size(1) == k && nj <= qv::kNormQuantMaxConsumers,
                "alphas must have shape [J <= ", qv::kNormQuantMaxConsumers, ", ", k, "], got ", alphas->sizes());
    al32 = f32_aligned(*alphas);
    a.alpha = al32.data_ptr<float>();
    if (gates) {
      check_cuda(*gates, "gates", x);
      TORCH_CHECK(gates->dim() == 2 && gates->size(0) == nj && gates->size(1) > 0, "gates must have shape [", nj,
                  ", G], got ", gates->sizes());
      g32 = f32(*gates);
      a.gate = g32.data_ptr<float>(), a.num_gates = (int)g32.size(1);
    }
    if (frame_id) {
      check_vec(*frame_id, "frame_id", m, x);
      TORCH_CHECK(frame_id->scalar_type() == at::kInt || frame_id->scalar_type() == at::kLong,
                  "frame_id must be int32 or int64");
      fid = frame_id->to(at::kInt).contiguous();
      a.frame_id = fid.data_ptr<int32_t>();
    }
  }
  Tensor res, rg32;
  if (residual_in) {
    check_cuda(*residual_in, "residual", x);
    TORCH_CHECK(residual_in->sizes() == x.sizes() && residual_in->scalar_type() == x.scalar_type(),
                "residual must have x's shape and dtype ", x.sizes(), ", got ", residual_in->sizes(), " ",
                residual_in->scalar_type());
    res = residual_in->stride(1) == 1 ? *residual_in : residual_in->contiguous();
    TORCH_CHECK(aligned16(res) && (res.stride(0) * res.element_size()) % 16 == 0,
                "cuda_norm_quant: residual must have 16-byte aligned rows (base and row stride), got row stride ",
                res.stride(0), " (qvdit_kernels.cuda.norm_quant_ok says which rows it takes)");
    a.residual = res.data_ptr(), a.ld_res = res.stride(0);
    if (residual_gate) {
      check_cuda(*residual_gate, "residual_gate", x);
      TORCH_CHECK(residual_gate->dim() == 2 && residual_gate->size(1) == k && residual_gate->size(0) >= 1 &&
                      m % residual_gate->size(0) == 0,
                  "residual_gate must have shape [G, ", k, "] with G dividing ", m, ", got ", residual_gate->sizes());
      rg32 = f32_aligned(*residual_gate);
      a.rgate = rg32.data_ptr<float>(), a.rg_div = (int)(m / residual_gate->size(0));
    }
  } else {
    TORCH_CHECK(!residual_gate, "residual_gate given without residual");
  }
  auto opts = x.options();
  Tensor y = at::empty({write_y ? m : 0, k}, opts), xq = at::empty({m, k}, opts.dtype(at::kChar));
  Tensor sx = at::empty({m}, opts.dtype(at::kFloat)), u = at::empty({nj, m}, opts.dtype(at::kFloat));
  Tensor rowsum = at::empty({m}, opts.dtype(at::kInt)), h = at::empty({residual_in ? m : 0, k}, opts);
  if (m == 0) return {y, xq, sx, u, rowsum, h};  // (no rows: nothing to launch, and u has no storage to check)
  const auto st = x.scalar_type();
  a.x = x.data_ptr();
  a.x_kind = st == at::kFloat ? 0 : (st == at::kBFloat16 ? 1 : 2);
  a.ldx = x.stride(0);
  a.m = (int)m, a.k = (int)k, a.bits = (int)bits, a.eps = (float)eps, a.nj = (int)nj;
  a.y = write_y ? y.data_ptr() : nullptr, a.h = residual_in ? h.data_ptr() : nullptr;
  a.xq = xq.data_ptr<int8_t>(), a.scale = sx.data_ptr<float>(), a.u = u.data_ptr<float>();
  a.rowsum = rowsum.data_ptr<int32_t>();
  const int64_t el = x.element_size();
  TORCH_CHECK(qv::norm_quant_supported(a), "cuda_norm_quant: x must have 16-byte aligned rows of at most ",
              qv::kNormQuantMaxRowBytes / el, " elements, a multiple of ", 16 / el, " (a row is held in registers), got ",
              x.sizes(), " with row stride ", x.stride(0), " (qvdit_kernels.cuda.norm_quant_ok says which rows it takes)");
  check_launch(qv::norm_quant(a, c10::cuda::getCurrentCUDAStream()), "norm_quant");
  return {y, xq, sx, u, rowsum, h};
}

// Activation (or W8 weight) codes with a row length that is a multiple of 16 and a 16-byte aligned base and
// row stride, as the loaders need; a zero-padded copy otherwise (odd K only). (Rows may be strided: the codes
// cuda_act_quant_inplace leaves inside its input's rows.)
Tensor padded_rows(const Tensor& t, int64_t cols) {
  if (t.size(1) == cols && t.stride(1) == 1 && t.stride(0) % 16 == 0 && aligned16(t)) return t;
  Tensor p = at::zeros({t.size(0), cols}, t.options());
  p.narrow(1, 0, t.size(1)).copy_(t);
  return p;
}

// The epilogue tail's fields of e (m, n set): activation, residual (made unit-stride into res) and its gate
// (made contiguous into rgate); res and rgate keep the memory alive for the launch.
void set_tail(qv::Epi& e, int64_t activation, const OptT& residual, const OptT& residual_gate, at::ScalarType out_dtype,
              const Tensor& like, Tensor& res, Tensor& rgate) {
  TORCH_CHECK(activation == 0 || activation == 1, "activation must be 0 (none) or 1 (gelu_tanh), got ", activation);
  TORCH_CHECK(residual || !residual_gate, "residual_gate given without residual");
  e.activation = (int)activation;
  if (!residual) return;
  check_cuda(*residual, "residual", like);
  TORCH_CHECK(residual->dim() == 2 && residual->size(0) == e.m && residual->size(1) == e.n &&
                  residual->scalar_type() == out_dtype,
              "residual must be [M, N] in out_dtype, got ", residual->sizes(), " ", residual->scalar_type());
  res = residual->stride(1) == 1 ? *residual : residual->contiguous();
  e.residual = res.data_ptr();
  e.ld_res = res.stride(0);
  if (residual_gate) {
    check_cuda(*residual_gate, "residual_gate", like);
    TORCH_CHECK(residual_gate->dim() == 2 && residual_gate->size(1) == e.n && residual_gate->size(0) >= 1 &&
                    e.m % residual_gate->size(0) == 0 && residual_gate->scalar_type() == at::kFloat,
                "residual_gate must be float32 [G, N] with G dividing M, got ", residual_gate->sizes());
    rgate = residual_gate->contiguous();
    e.rgate = rgate.data_ptr<float>();
    e.gate_div = (int)(e.m / rgate.size(0));
  }
}

// The weight-side operands of a GEMM with K = k (shapes, dtypes, device) and the kernel path: checked before
// anything is written (cuda_qlinear_over overwrites its input before the GEMM runs).
void check_weight_operands(const Tensor& like, int64_t k, const Tensor& w, int64_t w_bits, const Tensor& w_scale,
                           const Tensor& w_zero, const OptT& bias, const OptT& beta, int64_t path) {
  TORCH_CHECK(w_bits == 3 || w_bits == 4 || w_bits == 8, "w_bits must be 3, 4 or 8, got ", w_bits);
  TORCH_CHECK(path >= 0 && path <= 3, "path must be 0 (auto), 1 (sm80), 2 (sm90) or 3 (sm90ws), got ", path);
  TORCH_CHECK((path != 2 && path != 3) || qv::qgemm_sm90_available(), "qgemm path ", path,
              " (sm90 wgmma) needs an sm_90 GPU and an extension built for sm_90a");
  const int64_t n = w.size(0), row_bytes = w_bits == 8 ? k : round_up(k, 128) * w_bits / 8;
  check_cuda(w, "w_packed", like);
  TORCH_CHECK(w.dim() == 2 && w.size(1) == row_bytes, "w_packed must have shape [N, ", row_bytes, "] for w_bits=",
              w_bits, " and K=", k, ", got ", w.sizes());
  TORCH_CHECK(w.scalar_type() == (w_bits == 8 ? at::kChar : at::kByte), "w_packed has the wrong dtype for w_bits=",
              w_bits);
  check_vec(w_scale, "w_scale", n, like);
  check_vec(w_zero, "w_zero", n, like);
  TORCH_CHECK(w_scale.scalar_type() == at::kFloat && w_zero.scalar_type() == at::kFloat,
              "w_scale and w_zero must be float32");
  if (bias) check_vec(*bias, "bias", n, like);
  if (beta) check_vec(*beta, "beta", n, like);
}

// cuda_qgemm; with `into` ([M, N] of out_dtype, any 16-byte aligned row stride): y goes there instead of a new
// tensor, and the tail (required) goes over the residual (contiguous), which is returned (cuda_qlinear_over).
Tensor qgemm_impl(const Tensor& xq_in, const Tensor& x_scale, const Tensor& w_in, int64_t w_bits,
                  const Tensor& w_scale, const Tensor& w_zero, const OptT& bias, const OptT& u, const OptT& beta,
                  const OptT& x_rowsum, at::ScalarType out_dtype, int64_t path, int64_t activation,
                  const OptT& residual, const OptT& residual_gate, bool fuse_tail, const Tensor* into) {
  TORCH_CHECK(xq_in.is_cuda() && xq_in.dim() == 2 && xq_in.scalar_type() == at::kChar,
              "xq must be a 2-D int8 CUDA tensor");
  c10::cuda::CUDAGuard guard(xq_in.device());
  const int64_t m = xq_in.size(0), k = xq_in.size(1), n = w_in.size(0);
  check_weight_operands(xq_in, k, w_in, w_bits, w_scale, w_zero, bias, beta, path);
  check_vec(x_scale, "x_scale", m, xq_in);
  TORCH_CHECK(x_scale.scalar_type() == at::kFloat, "x_scale must be float32");
  TORCH_CHECK(u.has_value() == beta.has_value(), "u and beta must be given together");
  int out_kind = 0;
  switch (out_dtype) {
    case at::kBFloat16: out_kind = 0; break;
    case at::kHalf: out_kind = 1; break;
    case at::kFloat: out_kind = 2; break;
    case at::kInt: out_kind = 3; break;
    default: TORCH_CHECK(false, "out_dtype must be bfloat16, float16, float32 or int32, got ", out_dtype);
  }
  Tensor out = into ? *into : at::empty({m, n}, xq_in.options().dtype(out_dtype));
  if (into) {
    // (its caller, cuda_qlinear_over, has checked the residual, contiguous included, before writing anything)
    TORCH_CHECK(residual && !fuse_tail && out_kind != 3, "qgemm into a given buffer: the residual tail goes over the "
                "residual, after the kernel");
    check_cuda(out, "out", xq_in);
    TORCH_CHECK(out.dim() == 2 && out.size(0) == m && out.size(1) == n && out.scalar_type() == out_dtype &&
                    out.stride(1) == 1 && out.stride(0) >= n && (out.stride(0) * out.element_size()) % 16 == 0 &&
                    aligned16(out),
                "out must be [M, N] of out_dtype with 16-byte aligned rows that do not overlap, got ", out.sizes(), " ",
                out.scalar_type(), " with strides ", out.strides());
  }
  if (m == 0 || n == 0) return into ? *residual : out;
  auto stream = c10::cuda::getCurrentCUDAStream();

  qv::GemmArgs g{};
  int ka = 0;
  qv::gemm_geometry((int)w_bits, (int)k, g.steps, g.tail, ka);
  const Tensor a = padded_rows(xq_in, ka);
  const Tensor w = w_bits == 8 ? padded_rows(w_in, ka) : (w_in.is_contiguous() && aligned16(w_in) ? w_in : w_in.clone());
  Tensor rowsum;
  if (x_rowsum) {
    check_vec(*x_rowsum, "x_rowsum", m, xq_in);
    TORCH_CHECK(x_rowsum->scalar_type() == at::kInt, "x_rowsum must be int32");
    rowsum = x_rowsum->contiguous();
  } else {
    rowsum = at::empty({m}, xq_in.options().dtype(at::kInt));
    check_launch(qv::rowsum_s8(a.data_ptr<int8_t>(), a.stride(0), (int)m, (int)ka, rowsum.data_ptr<int32_t>(), stream),
                 "rowsum");
  }
  const Tensor sx = x_scale.contiguous(), sw = w_scale.contiguous(), zw = w_zero.contiguous();
  Tensor bias32, u32, beta32;
  if (bias) {
    bias32 = f32(*bias);
    g.epi.bias = bias32.data_ptr<float>();
  }
  if (u) {
    check_vec(*u, "u", m, xq_in);
    u32 = f32(*u);
    beta32 = f32(*beta);
    g.epi.u = u32.data_ptr<float>();
    g.epi.beta = beta32.data_ptr<float>();
  }
  g.a = a.data_ptr<int8_t>();
  g.lda = a.stride(0);
  g.ka = ka;
  g.w = static_cast<const uint8_t*>(w.data_ptr());
  g.ldw = w.stride(0);  // (padded_rows keeps a strided W8 weight as it is)
  g.kw = w_bits == 8 ? ka : 0;
  g.tiles_m = (int)((m + qv::kBM - 1) / qv::kBM);
  g.tiles_n = (int)((n + qv::kBN - 1) / qv::kBN);
  g.epi.sx = sx.data_ptr<float>();
  g.epi.sw = sw.data_ptr<float>();
  g.epi.zw = zw.data_ptr<float>();
  g.epi.rowsum = rowsum.data_ptr<int32_t>();
  g.epi.out = out.data_ptr();
  g.epi.ld_out = out.stride(0);
  g.epi.out_kind = out_kind;
  g.epi.m = (int)m;
  g.epi.n = (int)n;
  const bool tail = activation != 0 || residual.has_value();
  TORCH_CHECK(!tail || out_kind != 3, "activation/residual need a float out_dtype");

  const bool sm90 = qv::qgemm_sm90_available();
  const bool ws = (path == 3 || (path == 0 && sm90)) && qv::qgemm_sm90_ws_supported(g, (int)w_bits);
  const bool tail_in_kernel = tail && fuse_tail;
  TORCH_CHECK(ws || !tail_in_kernel, "fuse_tail: the epilogue tail (activation/residual) is fused by the "
              "warp-specialized kernel only (W3/W4 on sm_90a, path auto or sm90ws); this call takes another path");
  qv::Epi te{};  // the tail's fields for the pass after the kernel; the kernel's own epilogue when it fuses them
  te.m = (int)m;
  te.n = (int)n;
  Tensor res, rgate;
  set_tail(tail_in_kernel ? g.epi : te, activation, residual, residual_gate, out_dtype, xq_in, res, rgate);
  if (ws) {
    check_launch(qv::qgemm_sm90_ws(g, (int)w_bits, stream), "qgemm (sm90 warp-specialized)");
  } else if (path == 2 || path == 3 || (path == 0 && sm90)) {
    check_launch(qv::qgemm_sm90(g, (int)w_bits, stream), "qgemm (sm90)");
  } else {
    int dev = xq_in.get_device(), major = 0, smem = 0;
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
    cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
    TORCH_CHECK(major >= 8, "backend='cuda' needs compute capability >= 8.0 (int8 mma.sync), got ", major);
    TORCH_CHECK(smem >= qv::qgemm_sm80_smem_bytes((int)w_bits), "qgemm W", w_bits, " (mma.sync path) needs ",
                qv::qgemm_sm80_smem_bytes((int)w_bits), " bytes of shared memory per block; this GPU has ", smem);
    check_launch(qv::qgemm_sm80(g, (int)w_bits, stream), "qgemm (sm80)");
  }
  if (tail && !tail_in_kernel) {  // in place: each thread reads its piece of out (or the residual), then overwrites it
    te.out = into ? res.data_ptr() : out.data_ptr();
    te.out_kind = out_kind;
    check_launch(qv::epilogue_tail(out.data_ptr(), out.stride(0), te, stream), "epilogue_tail");
  }
  return into ? *residual : out;
}

Tensor qgemm_cuda(const Tensor& xq, const Tensor& x_scale, const Tensor& w, int64_t w_bits, const Tensor& w_scale,
                  const Tensor& w_zero, const OptT& bias, const OptT& u, const OptT& beta, const OptT& x_rowsum,
                  at::ScalarType out_dtype, int64_t path, int64_t activation, const OptT& residual,
                  const OptT& residual_gate, bool fuse_tail) {
  return qgemm_impl(xq, x_scale, w, w_bits, w_scale, w_zero, bias, u, beta, x_rowsum, out_dtype, path, activation,
                    residual, residual_gate, fuse_tail, nullptr);
}

// The spare bytes of x's rows [M, K] after the K code bytes cuda_act_quant_inplace leaves there, as [M, n] of x's
// dtype: where cuda_qlinear_over puts the GEMM's output. Undefined (an error) where they do not hold n values.
Tensor spare_rows(const Tensor& x, int64_t n) {
  const int64_t k = x.size(1), el = x.element_size();
  TORCH_CHECK(x.is_contiguous() && k % 16 == 0 && aligned16(x) && (el - 1) * k >= n * el,
              "cuda_qlinear_over: x must be contiguous with K a multiple of 16 and rows that hold the K code bytes "
              "and N output values, got ", x.sizes(), " ", x.scalar_type(), " with strides ", x.strides(),
              " for N = ", n);
  return x.view(at::kChar).narrow(1, k, n * el).view(x.scalar_type());
}

// The FFN's second linear over buffers its caller gives up (qvdit_kernels.ops.qlinear with overwrite_input and
// overwrite_residual): the codes over x's rows (as cuda_act_quant_inplace), the GEMM's output y into the bytes of
// those rows the codes leave free (`spare_rows`), and the tail residual + gate * act(y) over the residual. So no
// [M, K] code buffer and no [M, N] output buffer: with fc1's output as x, fc2's output costs no memory.
void qlinear_over_cuda(Tensor& x, int64_t bits, const OptT& alpha, const OptT& gate, const OptT& frame_id,
                       int64_t input_activation, const Tensor& w, int64_t w_bits, const Tensor& w_scale,
                       const Tensor& w_zero, const OptT& bias, const OptT& beta, int64_t path, int64_t activation,
                       Tensor& residual, const OptT& residual_gate) {
  check_act_quant_args(x, bits, input_activation);
  TORCH_CHECK(alpha.has_value() == beta.has_value(), "alpha and beta must be given together");
  TORCH_CHECK(residual.is_contiguous(), "residual must be contiguous to take the output in place, got strides ",
              residual.strides());
  c10::cuda::CUDAGuard guard(x.device());
  // every check that can fail runs before the codes overwrite x
  Tensor y = spare_rows(x, w.size(0));
  check_weight_operands(x, x.size(1), w, w_bits, w_scale, w_zero, bias, beta, path);
  qv::Epi probe{};  // (set_tail's checks of the residual [M, N] in x's dtype, its gate and the activation)
  probe.m = (int)x.size(0), probe.n = (int)w.size(0);
  Tensor res, rgate;
  set_tail(probe, activation, residual, residual_gate, x.scalar_type(), x, res, rgate);
  auto [sx, u, rowsum] = act_quant_inplace_cuda(x, bits, alpha, gate, frame_id, input_activation);
  const Tensor xq = x.view(at::kChar).narrow(1, 0, x.size(1));
  qgemm_impl(xq, sx, w, w_bits, w_scale, w_zero, bias, alpha ? OptT(u) : OptT(), beta, rowsum,
             x.scalar_type(), path, activation, residual, residual_gate, false, &y);
}

Tensor epilogue_tail_cuda(const Tensor& y_in, int64_t activation, const OptT& residual, const OptT& residual_gate) {
  TORCH_CHECK(y_in.is_cuda() && y_in.dim() == 2, "y must be a 2-D CUDA tensor, got ", y_in.sizes());
  const auto st = y_in.scalar_type();
  const int out_kind = st == at::kBFloat16 ? 0 : st == at::kHalf ? 1 : st == at::kFloat ? 2 : -1;
  TORCH_CHECK(out_kind >= 0, "y must be bfloat16, float16 or float32, got ", st);
  c10::cuda::CUDAGuard guard(y_in.device());
  const Tensor y = y_in.stride(1) == 1 ? y_in : y_in.contiguous();
  Tensor out = at::empty(y.sizes(), y.options());
  qv::Epi e{};
  e.out = out.data_ptr();
  e.out_kind = out_kind;
  e.m = (int)y.size(0);
  e.n = (int)y.size(1);
  Tensor res, rgate;
  set_tail(e, activation, residual, residual_gate, st, y, res, rgate);
  check_launch(qv::epilogue_tail(y.data_ptr(), y.stride(0), e, c10::cuda::getCurrentCUDAStream()), "epilogue_tail");
  return out;
}

// ---------------------------------------------------------------- Meta (fake) implementations: shapes only
std::tuple<Tensor, Tensor, Tensor, Tensor> act_quant_meta(const Tensor& x, int64_t, const OptT& alpha, const OptT&,
                                                          const OptT&, bool want_rowsum, int64_t) {
  const auto m = x.sym_size(0), k = x.sym_size(1);
  auto opts = x.options();
  return {at::empty_symint({m, k}, opts.dtype(at::kChar)), at::empty_symint({m}, opts.dtype(at::kFloat)),
          at::empty_symint({alpha ? m : c10::SymInt(0)}, opts.dtype(at::kFloat)),
          at::empty_symint({want_rowsum ? m : c10::SymInt(0)}, opts.dtype(at::kInt))};
}

std::tuple<Tensor, Tensor, Tensor> act_quant_inplace_meta(Tensor& x, int64_t, const OptT& alpha, const OptT&,
                                                          const OptT&, int64_t) {
  const auto m = x.sym_size(0);
  auto opts = x.options();
  return {at::empty_symint({m}, opts.dtype(at::kFloat)),
          at::empty_symint({alpha ? m : c10::SymInt(0)}, opts.dtype(at::kFloat)), at::empty_symint({m}, opts.dtype(at::kInt))};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> norm_quant_meta(
    const Tensor& x, int64_t, double, const OptT&, const OptT&, const OptT&, const OptT&, int64_t, const OptT& alphas,
    const OptT&, const OptT&, const OptT& residual, const OptT&, bool write_y) {
  const auto m = x.sym_size(0), k = x.sym_size(1);
  const c10::SymInt none(0);
  auto opts = x.options();
  return {at::empty_symint({write_y ? m : none, k}, opts), at::empty_symint({m, k}, opts.dtype(at::kChar)),
          at::empty_symint({m}, opts.dtype(at::kFloat)),
          at::empty_symint({alphas ? alphas->sym_size(0) : none, m}, opts.dtype(at::kFloat)),
          at::empty_symint({m}, opts.dtype(at::kInt)), at::empty_symint({residual ? m : none, k}, opts)};
}

Tensor qgemm_meta(const Tensor& xq, const Tensor&, const Tensor& w, int64_t, const Tensor&, const Tensor&, const OptT&,
                  const OptT&, const OptT&, const OptT&, at::ScalarType out_dtype, int64_t, int64_t, const OptT&,
                  const OptT&, bool) {
  return at::empty_symint({xq.sym_size(0), w.sym_size(0)}, xq.options().dtype(out_dtype));
}

void qlinear_over_meta(Tensor&, int64_t, const OptT&, const OptT&, const OptT&, int64_t, const Tensor&, int64_t,
                       const Tensor&, const Tensor&, const OptT&, const OptT&, int64_t, int64_t, Tensor&,
                       const OptT&) {}  // (it returns nothing: its results are its two mutated inputs)

Tensor epilogue_tail_meta(const Tensor& y, int64_t, const OptT&, const OptT&) {
  return at::empty_symint(y.sym_sizes(), y.options());  // contiguous, as the CUDA kernel returns it
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(qvdit, m) {  // a fragment: the Triton ops (triton/library.py) share the namespace
  m.def("cuda_act_quant(Tensor x, int bits, Tensor? alpha, Tensor? gate, Tensor? frame_id, bool want_rowsum,"
        " int activation=0) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("cuda_act_quant_inplace(Tensor(a!) x, int bits, Tensor? alpha, Tensor? gate, Tensor? frame_id,"
        " int activation=0) -> (Tensor, Tensor, Tensor)");
  m.def("cuda_norm_quant(Tensor x, int bits, float eps, Tensor? weight, Tensor? bias, Tensor? scale, Tensor? shift,"
        " int mod_rows, Tensor? alphas, Tensor? gates, Tensor? frame_id, Tensor? residual=None,"
        " Tensor? residual_gate=None, bool write_y=True) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("cuda_qgemm(Tensor xq, Tensor x_scale, Tensor w_packed, int w_bits, Tensor w_scale, Tensor w_zero,"
        " Tensor? bias, Tensor? u, Tensor? beta, Tensor? x_rowsum, ScalarType out_dtype, int path,"
        " int activation=0, Tensor? residual=None, Tensor? residual_gate=None, bool fuse_tail=False) -> Tensor");
  m.def("cuda_epilogue_tail(Tensor y, int activation, Tensor? residual, Tensor? residual_gate) -> Tensor");
  m.def("cuda_qlinear_over(Tensor(a!) x, int bits, Tensor? alpha, Tensor? gate, Tensor? frame_id,"
        " int input_activation, Tensor w_packed, int w_bits, Tensor w_scale, Tensor w_zero, Tensor? bias,"
        " Tensor? beta, int path, int activation, Tensor(b!) residual, Tensor? residual_gate) -> ()");
}

TORCH_LIBRARY_IMPL(qvdit, CUDA, m) {
  m.impl("cuda_act_quant", &act_quant_cuda);
  m.impl("cuda_act_quant_inplace", &act_quant_inplace_cuda);
  m.impl("cuda_norm_quant", &norm_quant_cuda);
  m.impl("cuda_qgemm", &qgemm_cuda);
  m.impl("cuda_epilogue_tail", &epilogue_tail_cuda);
  m.impl("cuda_qlinear_over", &qlinear_over_cuda);
}

TORCH_LIBRARY_IMPL(qvdit, Meta, m) {
  m.impl("cuda_act_quant", &act_quant_meta);
  m.impl("cuda_act_quant_inplace", &act_quant_inplace_meta);
  m.impl("cuda_norm_quant", &norm_quant_meta);
  m.impl("cuda_qgemm", &qgemm_meta);
  m.impl("cuda_epilogue_tail", &epilogue_tail_meta);
  m.impl("cuda_qlinear_over", &qlinear_over_meta);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "qvdit CUDA kernels; the ops are torch.ops.qvdit.cuda_act_quant and torch.ops.qvdit.cuda_qgemm";
  m.def("ws_takes", [](int64_t w_bits, int64_t path) {
    qv::GemmArgs aligned{};  // the binding pads and aligns the operands it passes: only bits and the driver matter
    return (path == 0 || path == 3) && qv::qgemm_sm90_available() && qv::qgemm_sm90_ws_supported(aligned, (int)w_bits);
  }, "True when cuda_qgemm with these w_bits and path runs the warp-specialized kernel (which fuses the tail)");
  m.def("sm90_available", &qv::qgemm_sm90_available,
        "True when the current GPU is sm_90 and the extension holds the sm_90a wgmma kernels");
}
