"""Loader of the optional compiled CUDA extension `qvdit_kernels._C` (built from csrc/ by setup.py).

Importing this module registers the extension's kernels in the backend registry (`backend="cuda"`).
It raises ImportError with a clear message when the extension is not built; `backends.py` turns that
into "backend='cuda' is not available: ..." only when someone asks for the CUDA backend.

Ops (schemas in csrc/bindings.cpp, with Meta kernels so they trace under torch.compile):
`torch.ops.qvdit.cuda_act_quant` (and `cuda_act_quant_inplace`, its codes over its input),
`torch.ops.qvdit.cuda_norm_quant` (LayerNorm + modulation + act-quant for up to three consumers),
`torch.ops.qvdit.cuda_qgemm` (with a DiT block's GELU/residual tail, fused in the kernel or one pass after it) and
`torch.ops.qvdit.cuda_epilogue_tail` (that pass alone, for tests). The GEMM has three kernels: the warp-specialized
wgmma kernel for W3/W4 (sm_90a, csrc/gemm_sm90_ws.cu: TMA producer warp, weights unpacked into wgmma's register
operand), wgmma with both operands in shared memory (sm_90a, csrc/gemm_sm90.cu; W8) and mma.sync (sm_80+,
csrc/gemm_sm80.cu); QVDIT_CUDA_GEMM_PATH=auto|sm80|sm90|sm90ws picks one (auto: sm90ws for W3/W4 and sm90 for W8
where the GPU and the build have them, else sm80).
"""
from __future__ import annotations

import os

import torch

try:
    from . import _C  # (the compiled extension; registers torch.ops.qvdit.*)
except ImportError as exc:  # not built: CPU torch, no toolkit, or QVDIT_BUILD_EXT=0
    raise ImportError(
        "the CUDA extension qvdit_kernels._C is not built (it needs a CUDA torch and a CUDA toolkit at "
        "install time: pip install -e . --no-build-isolation with QVDIT_BUILD_EXT unset)"
    ) from exc

from .backends import act_quant_results, fuses_tail, norm_quant_results, register, require_default_format

GEMM_PATHS = {"auto": 0, "sm80": 1, "sm90": 2, "sm90ws": 3}


def gemm_path() -> int:
    """The GEMM kernel QVDIT_CUDA_GEMM_PATH asks for (read per call, so tests can switch it)."""
    name = os.environ.get("QVDIT_CUDA_GEMM_PATH", "auto")
    if name not in GEMM_PATHS:
        raise ValueError(f"QVDIT_CUDA_GEMM_PATH must be one of {sorted(GEMM_PATHS)}, got {name!r}")
    return GEMM_PATHS[name]


ACTIVATIONS = {None: 0, "gelu_tanh": 1}


@register("quantize_activation", "cuda")
def quantize_activation(x, bits, alpha=None, gate=None, frame_id=None, want_rowsum=False, activation=None):
    out = torch.ops.qvdit.cuda_act_quant(x, bits, alpha, gate, frame_id, want_rowsum, ACTIVATIONS[activation])
    return act_quant_results(*out, alpha, want_rowsum)


@torch.compiler.assume_constant_result  # a fixed property of the GPU and build: traced as a constant
def ws_takes(w_bits: int, path: int) -> bool:
    """Whether cuda_qgemm with these w_bits and path (GEMM_PATHS) runs the warp-specialized kernel."""
    return bool(_C.ws_takes(w_bits, path))


def fused_tail_enabled() -> bool:
    """QVDIT_CUDA_FUSED_TAIL=1: run the epilogue tail inside the warp-specialized kernel. Opt-in because it is
    slower than the default, the tail as one pass after the kernel, in place (csrc/epilogue_tail.cu): on the
    H200 the fused GELU / gated residual ran 0.74-0.97x / 0.65-1.04x of its speed (run ws7, W3A6 and W4A8,
    benchmarks/results/cuda_h200_ws7_{fused_tail,tails}.json). Correct (test_ws_epilogue_tail)."""
    return os.environ.get("QVDIT_CUDA_FUSED_TAIL", "0") == "1"


def _gemm(xq, x_scale, w_packed, w_bits, w_scale, w_zero, bias, u, beta, x_rowsum, out_dtype, activation, residual,
          residual_gate):
    """cuda_qgemm with the epilogue tail in the kernel where the warp-specialized kernel runs (it alone fuses it)
    and `fused_tail_enabled()`; else the op applies it after the kernel, in place over its own output, in one
    pass (csrc/epilogue_tail.cu)."""
    path = gemm_path()
    fuse = fused_tail_enabled() and ws_takes(w_bits, path)
    return torch.ops.qvdit.cuda_qgemm(xq, x_scale, w_packed, w_bits, w_scale, w_zero, bias, u, beta, x_rowsum,
                                      out_dtype, path, ACTIVATIONS[activation], residual, residual_gate, fuse)


@register("qgemm", "cuda")
@fuses_tail
def qgemm(xq, x_scale, w_packed, w_bits, w_scale, w_zero, bias=None, u=None, beta=None, x_rowsum=None,
          out_dtype=torch.bfloat16, format=None, activation=None, residual=None, residual_gate=None):
    require_default_format("cuda", w_bits, format)
    return _gemm(xq, x_scale, w_packed, w_bits, w_scale, w_zero, bias, u, beta, x_rowsum, out_dtype, activation,
                 residual, residual_gate)


# Rows the in-place act-quant holds in registers (csrc/qvdit_kernels.h kActQuantInplaceMaxRowBytes: row_quant.cuh's
# register kernels, 8 warps x 32 lanes x 16 chunks of 16 bytes; tests/test_cuda_build.py checks the two are equal),
# aligned as its 16-byte loads need.
INPLACE_MAX_ROW_BYTES = 8 * 32 * 16 * 16


def _rows_in_registers(x2: torch.Tensor, max_row_bytes: int) -> bool:
    """Whether a register kernel (csrc/row_quant.cuh) can hold x2 [M, K]'s rows: unit column stride, 16-byte aligned
    rows of whole 16-byte chunks, at most max_row_bytes. (While tracing there is no address to check: the ops
    themselves refuse a misaligned base with an error that says why.)"""
    el = x2.element_size()
    ok = (x2.dim() == 2 and x2.stride(1) == 1 and (x2.stride(0) * el) % 16 == 0 and (x2.shape[1] * el) % 16 == 0
          and x2.shape[1] * el <= max_row_bytes)
    return ok and (torch.compiler.is_compiling() or x2.data_ptr() % 16 == 0)


def inplace_ok(x2: torch.Tensor) -> bool:
    """Whether cuda_act_quant_inplace can overwrite x2 [M, K] with its codes, and saves the code buffer by it: rows
    the register kernel holds (`_rows_in_registers`) that do not overlap, and K a multiple of 16 (else the GEMM
    copies the codes into rows padded to 16 anyway)."""
    return (x2.dim() == 2 and x2.stride(0) >= x2.shape[1] and x2.shape[1] % 16 == 0
            and _rows_in_registers(x2, INPLACE_MAX_ROW_BYTES))


def over_ok(x2: torch.Tensor, n: int, out_dtype: torch.dtype, residual) -> bool:
    """Whether cuda_qlinear_over can run a linear of x2 [M, K] to N = n outputs with a residual tail: codes in place
    (`inplace_ok`), x2 contiguous with room in each row for the K code bytes and the n outputs in x2's dtype, the
    output that dtype and a contiguous residual of it. (The op runs the tail as a pass after the kernel whatever
    QVDIT_CUDA_FUSED_TAIL says: the pass writes the residual, which the kernel's fused tail could not.)"""
    el = x2.element_size()
    return (residual is not None and out_dtype == x2.dtype and residual.dtype == x2.dtype
            and residual.is_contiguous() and x2.is_contiguous() and (el - 1) * x2.shape[1] >= n * el
            and inplace_ok(x2))


@register("qlinear", "cuda")
@fuses_tail
def qlinear(x2, w_packed, w_bits, w_scale, w_zero, a_bits, bias, alpha, beta, gate, frame_id, out_dtype, format,
            activation=None, residual=None, residual_gate=None, input_activation=None, overwrite_input=False,
            overwrite_residual=False):
    """act-quant (codes, scale, TQE u and the row sums in one pass; of the GELU of x2 with input_activation) then
    the GEMM; TQE on when alpha/beta given. overwrite_input (x2 is dead after this call): the codes go over x2's
    own rows where `inplace_ok(x2)`, so no [M, K] code buffer is allocated beside it. With overwrite_residual too
    (the residual is dead as well) and `over_ok`: one op (`cuda_qlinear_over`) puts the GEMM's output into the
    bytes of x2's rows the codes leave free and the tail's result over the residual, which it returns."""
    require_default_format("cuda", w_bits, format)
    if overwrite_input and overwrite_residual and over_ok(x2, w_packed.shape[0], out_dtype, residual):
        torch.ops.qvdit.cuda_qlinear_over(x2, a_bits, alpha, gate, frame_id, ACTIVATIONS[input_activation], w_packed,
                                          w_bits, w_scale, w_zero, bias, beta, gemm_path(), ACTIVATIONS[activation],
                                          residual, residual_gate)
        return residual
    if overwrite_input and inplace_ok(x2):
        sx, u, rowsum = torch.ops.qvdit.cuda_act_quant_inplace(x2, a_bits, alpha, gate, frame_id,
                                                               ACTIVATIONS[input_activation])
        xq = x2.view(torch.int8)[:, :x2.shape[1]]  # row m's codes: the first K bytes of row m
    else:
        xq, sx, u, rowsum = torch.ops.qvdit.cuda_act_quant(x2, a_bits, alpha, gate, frame_id, True,
                                                           ACTIVATIONS[input_activation])
    if alpha is None:
        u = None
    return _gemm(xq, sx, w_packed, w_bits, w_scale, w_zero, bias, u, beta, rowsum, out_dtype, activation, residual,
                 residual_gate)


# Rows the norm-quant kernel holds in registers (csrc/qvdit_kernels.h kNormQuantMaxRowBytes, checked equal by
# tests/test_cuda_build.py), with the alignment its 16-byte loads need.
NORM_QUANT_MAX_ROW_BYTES = 8 * 32 * 16 * 16
NORM_QUANT_MAX_CONSUMERS = 3


def norm_quant_ok(x2: torch.Tensor, consumers: int = 0) -> bool:
    """Whether cuda_norm_quant takes x2 [M, K]: rows the register kernel holds (`_rows_in_registers`), K > 0, and at
    most three TQE consumers."""
    return (consumers <= NORM_QUANT_MAX_CONSUMERS and x2.dim() == 2 and x2.shape[1] > 0
            and _rows_in_registers(x2, NORM_QUANT_MAX_ROW_BYTES))


@register("norm_quantize", "cuda")
def norm_quantize(x, bits, eps, weight, bias, scale, shift, mod_rows, alphas, gates, frame_id, residual=None,
                  residual_gate=None, write_y=True):
    """One pass of csrc/norm_quant.cu (reference.norm_quantize_backend's contract); rows it cannot hold
    (norm_quant_ok, for x and the residual) go to Triton's kernel, which computes the same."""
    if not (norm_quant_ok(x, 0 if alphas is None else alphas.shape[0])
            and (residual is None or norm_quant_ok(residual))):
        from .backends import BackendUnavailableError, resolve

        fn = resolve("norm_quantize", "triton", x.device, fallback=False)
        if fn is None:
            raise BackendUnavailableError(
                f"norm_quantize on CUDA: rows of {x.shape[1]} {x.dtype} elements (row stride {x.stride(0)}"
                f"{'' if residual is None else f', residual row stride {residual.stride(0)}'}) need Triton's kernel, "
                "which is not available")
        return fn(x, bits, eps, weight, bias, scale, shift, mod_rows, alphas, gates, frame_id, residual, residual_gate,
                  write_y)
    out = torch.ops.qvdit.cuda_norm_quant(x, bits, float(eps), weight, bias, scale, shift, mod_rows, alphas, gates,
                                          frame_id, residual, residual_gate, write_y)
    return norm_quant_results(*out, alphas, residual, write_y)
