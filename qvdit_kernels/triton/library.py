"""The Triton kernels as `torch.library` custom ops (schema + fake impls, so `torch.compile(fullgraph=True)`
and CUDA graphs see one opaque op each) and their registration as backend "triton" (docs/DEVELOPING.md).

Ops: `qvdit::triton_act_quant`, `qvdit::triton_qgemm`, `qvdit::triton_qlinear` (act-quant + GEMM),
`qvdit::triton_norm_quant` (LayerNorm + modulation + act-quant for J consumers).
Custom ops cannot return None: absent results (u without alpha, rowsum when not asked for) come back as
empty tensors and the backend functions turn them into None. CPU tensors reach these ops only under
`TRITON_INTERPRET=1` (backends.availability), where the kernels run in the Triton interpreter.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

from ..backends import act_quant_results, fuses_tail, norm_quant_results, register, require_default_format
from . import act_quant as _aq
from . import gemm as _gemm
from . import norm_quant as _nq
from . import tune


def _interpret(t: Tensor) -> bool:
    return t.device.type != "cuda"


_PLAIN = (Tensor, torch.nn.Parameter)  # not FakeTensor, FunctionalTensor or other subclasses


def _eager(*args) -> bool:
    """Whether to call a kernel's implementation directly instead of through its custom op: in plain eager use
    (not traced by torch.compile/export or a dispatch mode, every tensor argument a plain Tensor, none needing
    grad while grad mode is on). The custom op's Python dispatch (autograd wrapper, redispatch, dynamo guard)
    costs ~0.1 ms of host time per call, more than the act-quant kernel of a 16k x 1152 activation runs; tracing
    needs the op (its fake impl) and autograd its error on backward, so they keep it."""
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:  # make_fx, FakeTensorMode, ...
        return False
    grad = torch.is_grad_enabled()  # (under no_grad a Parameter's requires_grad records nothing)
    return all(type(a) in _PLAIN and not (grad and a.requires_grad) for a in args if isinstance(a, Tensor))


def _call(op, impl, *args):
    """impl(*args) where `_eager` holds for every tensor argument, else the custom op `op` (same arguments)."""
    return impl(*args) if _eager(*args) else op(*args)


def _on(t: Tensor):
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _vec(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.contiguous()


def _aq_tuner(x: Tensor):
    """Picks the act-quant launch config per (GPU, K, M bucket); None in the interpreter."""
    if _interpret(x):
        return None
    gpu = tune._gpu_key(x.device)
    key = (gpu, x.shape[1], tune.m_bucket(x.shape[0]))
    return lambda cands, run: tune.pick("act_quant", key, cands, run, x.device)


def _rows(t: Tensor) -> Tensor:
    """Row-major with unit column stride (what the kernels index)."""
    return t if t.stride(-1) == 1 else t.contiguous()


# ----------------------------------------------------------------------------- act-quant
def _act_quant_impl(x: Tensor, bits: int, alpha: Optional[Tensor], gate: Optional[Tensor], frame_id: Optional[Tensor],
                    want_rowsum: bool, activation: str = "") -> tuple[Tensor, Tensor, Tensor, Tensor]:
    with _on(x):
        xq, s, u, rs = _aq.act_quant(_rows(x), bits, _vec(alpha), _vec(gate), _vec(frame_id), want_rowsum,
                                     interpret=_interpret(x), tuner=_aq_tuner(x), gelu=activation == "gelu_tanh")
    m = x.shape[0]
    u = u if u is not None else x.new_empty(0, dtype=torch.float32)
    rs = rs if rs is not None else x.new_empty(0, dtype=torch.int32)
    return xq, s, u, rs if m or want_rowsum else rs


act_quant_op = torch.library.custom_op("qvdit::triton_act_quant", _act_quant_impl, mutates_args=())


@act_quant_op.register_fake
def _(x, bits, alpha, gate, frame_id, want_rowsum, activation=""):
    m, k = x.shape
    return (x.new_empty((m, k), dtype=torch.int8), x.new_empty(m, dtype=torch.float32),
            x.new_empty(m if alpha is not None else 0, dtype=torch.float32),
            x.new_empty(m if want_rowsum else 0, dtype=torch.int32))


# ----------------------------------------------------------------------------- GEMM
def _gemm_run(xq, x_scale, w_packed, w_bits, w_scale, w_zero, bias, u, beta, x_rowsum, out_dtype, activation,
              residual, residual_gate):
    m, k = xq.shape
    n = w_packed.shape[0]
    out = torch.empty((m, n), dtype=out_dtype, device=xq.device)
    if m == 0 or n == 0:
        return out
    xq, w_packed = _rows(xq), _rows(w_packed)
    x_scale, w_scale, w_zero, bias, u, beta = map(_vec, (x_scale, w_scale, w_zero, bias, u, beta))
    if w_bits != 8 and x_rowsum is None:
        x_rowsum = xq.sum(dim=1, dtype=torch.int32)
    x_rowsum, residual_gate = _vec(x_rowsum), _vec(residual_gate)
    residual = None if residual is None else _rows(residual)
    interp = _interpret(xq)

    def run(cfg):
        return _gemm.launch(xq, x_scale, w_packed, w_bits, w_scale, w_zero, bias, u, beta, x_rowsum, out, cfg, interp,
                            gelu=activation == "gelu_tanh", residual=residual, residual_gate=residual_gate)

    if interp:
        cfg = tune.INTERPRET_QGEMM
    else:
        gpu = tune._gpu_key(xq.device)
        cands = tune.qgemm_configs(w_bits, m, gpu)
        cfg = tune.pick("qgemm", (gpu, w_bits, tune.m_bucket(m), n, k), cands, run, xq.device)
    with _on(xq):
        return run(cfg)


def _qgemm_impl(xq: Tensor, x_scale: Tensor, w_packed: Tensor, w_bits: int, w_scale: Tensor, w_zero: Tensor,
                bias: Optional[Tensor], u: Optional[Tensor], beta: Optional[Tensor], x_rowsum: Optional[Tensor],
                out_dtype: torch.dtype, activation: str, residual: Optional[Tensor],
                residual_gate: Optional[Tensor]) -> Tensor:
    return _gemm_run(xq, x_scale, w_packed, w_bits, w_scale, w_zero, bias, u, beta, x_rowsum, out_dtype, activation,
                     residual, residual_gate)


qgemm_op = torch.library.custom_op("qvdit::triton_qgemm", _qgemm_impl, mutates_args=())


@qgemm_op.register_fake
def _(xq, x_scale, w_packed, w_bits, w_scale, w_zero, bias, u, beta, x_rowsum, out_dtype, activation, residual,
      residual_gate):
    return xq.new_empty((xq.shape[0], w_packed.shape[0]), dtype=out_dtype)


# ----------------------------------------------------------------------------- fused linear
def _qlinear_impl(x: Tensor, w_packed: Tensor, w_bits: int, w_scale: Tensor, w_zero: Tensor, a_bits: int,
                  bias: Optional[Tensor], alpha: Optional[Tensor], beta: Optional[Tensor], gate: Optional[Tensor],
                  frame_id: Optional[Tensor], out_dtype: torch.dtype, activation: str, residual: Optional[Tensor],
                  residual_gate: Optional[Tensor], input_activation: str = "") -> Tensor:
    tqe = alpha is not None and beta is not None
    with _on(x):
        xq, sx, u, rs = _aq.act_quant(_rows(x), a_bits, _vec(alpha) if tqe else None, _vec(gate) if tqe else None,
                                      _vec(frame_id) if tqe else None, want_rowsum=w_bits != 8,
                                      interpret=_interpret(x), tuner=_aq_tuner(x),
                                      gelu=input_activation == "gelu_tanh")
    return _gemm_run(xq, sx, w_packed, w_bits, w_scale, w_zero, bias, u, beta if tqe else None, rs, out_dtype,
                     activation, residual, residual_gate)


qlinear_op = torch.library.custom_op("qvdit::triton_qlinear", _qlinear_impl, mutates_args=())


@qlinear_op.register_fake
def _(x, w_packed, w_bits, w_scale, w_zero, a_bits, bias, alpha, beta, gate, frame_id, out_dtype, activation,
      residual, residual_gate, input_activation=""):
    return x.new_empty((x.shape[0], w_packed.shape[0]), dtype=out_dtype)


# ----------------------------------------------------------------------------- backend "triton"
@register("quantize_activation", "triton")
def quantize_activation(x, bits, alpha=None, gate=None, frame_id=None, want_rowsum=False, activation=None):
    out = _call(torch.ops.qvdit.triton_act_quant, _act_quant_impl, x, bits, alpha, gate, frame_id, want_rowsum,
                activation or "")
    return act_quant_results(*out, alpha, want_rowsum)


@register("qgemm", "triton")
@fuses_tail
def qgemm(xq, x_scale, w_packed, w_bits, w_scale, w_zero, bias=None, u=None, beta=None, x_rowsum=None,
          out_dtype=torch.bfloat16, format=None, activation=None, residual=None, residual_gate=None):
    require_default_format("triton", w_bits, format)
    return _call(torch.ops.qvdit.triton_qgemm, _qgemm_impl, xq, x_scale, w_packed, w_bits, w_scale, w_zero, bias, u,
                 beta, x_rowsum, out_dtype, activation or "", residual, residual_gate)


@register("qlinear", "triton")
@fuses_tail
def qlinear(x2, w_packed, w_bits, w_scale, w_zero, a_bits, bias, alpha, beta, gate, frame_id, out_dtype, format,
            activation=None, residual=None, residual_gate=None, input_activation=None, overwrite_input=False,
            overwrite_residual=False):
    """(overwrite_input / overwrite_residual: allowed, not done: the codes and the output get buffers of their own.)"""
    require_default_format("triton", w_bits, format)
    return _call(torch.ops.qvdit.triton_qlinear, _qlinear_impl, x2, w_packed, w_bits, w_scale, w_zero, a_bits, bias,
                 alpha, beta, gate, frame_id, out_dtype, activation or "", residual, residual_gate,
                 input_activation or "")


# ----------------------------------------------------------------------------- norm + act-quant (fused producer)
def _norm_quant_impl(x: Tensor, bits: int, eps: float, weight: Optional[Tensor], bias: Optional[Tensor],
                     scale: Optional[Tensor], shift: Optional[Tensor], mod_rows: int, alphas: Optional[Tensor],
                     gates: Optional[Tensor], frame_id: Optional[Tensor], residual: Optional[Tensor] = None,
                     residual_gate: Optional[Tensor] = None, write_y: bool = True
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    tuner = None
    if not _interpret(x):
        key = (tune._gpu_key(x.device), x.shape[1], tune.m_bucket(x.shape[0]), 0 if alphas is None else alphas.shape[0])
        # (one config with and without y: the same codes either way; the residual moves 2 more bytes per element)
        key += (("residual",),) if residual is not None else ()
        tuner = lambda cands, run: tune.pick("norm_quant", key, cands, run, x.device)  # noqa: E731
    with _on(x):
        y, xq, sx, u, rs, h = _nq.norm_quant(_rows(x), bits, eps, weight, bias, scale, shift, mod_rows, alphas, gates,
                                             frame_id, interpret=_interpret(x), tuner=tuner, residual=residual,
                                             residual_gate=residual_gate, write_y=write_y)
    return (y, xq, sx, u if u is not None else x.new_empty((0, x.shape[0]), dtype=torch.float32), rs,
            h if h is not None else x.new_empty((0, x.shape[1])))


norm_quant_op = torch.library.custom_op("qvdit::triton_norm_quant", _norm_quant_impl, mutates_args=())


@norm_quant_op.register_fake
def _(x, bits, eps, weight, bias, scale, shift, mod_rows, alphas, gates, frame_id, residual=None, residual_gate=None,
      write_y=True):
    m, k = x.shape
    return (x.new_empty((m if write_y else 0, k)), x.new_empty((m, k), dtype=torch.int8),
            x.new_empty(m, dtype=torch.float32),
            x.new_empty((alphas.shape[0] if alphas is not None else 0, m), dtype=torch.float32),
            x.new_empty(m, dtype=torch.int32), x.new_empty((m if residual is not None else 0, k)))


@register("norm_quantize", "triton")
def norm_quantize(x, bits, eps, weight, bias, scale, shift, mod_rows, alphas, gates, frame_id, residual=None,
                  residual_gate=None, write_y=True):
    """-> (y | None, xq, scale, u | None, rowsum, h | None): reference.norm_quantize_backend's contract."""
    out = _call(torch.ops.qvdit.triton_norm_quant, _norm_quant_impl, x, bits, float(eps), weight, bias, scale, shift,
                mod_rows, alphas, gates, frame_id, residual, residual_gate, write_y)
    return norm_quant_results(*out, alphas, residual, write_y)
