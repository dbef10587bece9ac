"""Public ops (SPEC 1.3): argument checks, then dispatch to a backend (`backends.py`).

Notation: M tokens (rows of the activation), K input features, N output features.
Every op takes `backend=` in {"auto", "torch", "triton", "cuda"}; "torch" is the reference.
Bad input raises TypeError (wrong type or dtype) or ValueError (wrong shape, device, bits),
naming the argument. No check here reads device memory (no host sync), except in the offline
weight ops, which validate codes once at quantization time.
"""
from __future__ import annotations

import torch

from . import auto, backends, reference
from .backends import register
from .formats import get_format

W_BITS = (3, 4, 8)
A_BITS = (6, 8)
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.int32)
MAX_K = 65536  # keeps |acc| < 2^31 for every supported width (127 * 255 * 65536 < 2^31)

for _op, _fn in (
    ("quantize_weight", reference.quantize_weight),
    ("pack_weight", reference.pack_weight),
    ("unpack_weight", reference.unpack_weight),
    ("quantize_activation", reference.quantize_activation),
    ("qgemm", backends.fuses_tail(reference.qgemm)),
    ("norm_quantize", reference.norm_quantize_backend),
):
    register(_op, "torch")(_fn)


# ----------------------------------------------------------------------------- argument checks
def check_bits(name: str, bits, allowed) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise TypeError(f"{name} must be an int, got {type(bits).__name__}")
    if bits not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {bits}")
    return bits


def check_tensor(name: str, t, dtypes=None, shape=None, device=None, optional=False):
    """Type, dtype, shape (tuple; None entries match anything) and device of one argument."""
    if t is None:
        if optional:
            return None
        raise TypeError(f"{name} must be a torch.Tensor, got None")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")
    if shape is not None:
        if t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
            want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
            raise ValueError(f"{name} must have shape {want}, got {list(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} (all tensors of one call on one device)")
    return t


def _check_tqe(m, k, device, alpha, gate, frame_id):
    check_tensor("alpha", alpha, FLOAT_DTYPES, (k,), device, optional=True)
    check_tensor("gate", gate, FLOAT_DTYPES, (None,), device, optional=True)
    check_tensor("frame_id", frame_id, (torch.int32, torch.int64), (m,), device, optional=True)
    if gate is not None and gate.numel() == 0:
        raise ValueError("gate must have at least one entry")
    if (gate is not None or frame_id is not None) and alpha is None:
        raise ValueError("gate/frame_id given without alpha: the TQE term needs alpha")


def _check_weight_args(k, dev, w_packed, w_bits, w_scale, w_zero, bias, beta, out_dtype, fmt_name):
    """Checks shared by qgemm and the fused qlinear: the weight side and the output dtype."""
    check_bits("w_bits", w_bits, W_BITS)
    if k < 1 or k > MAX_K:
        raise ValueError(f"the activation must have 1 <= K <= {MAX_K} columns, got K={k}")
    _, n = _weight_dims(w_packed, w_bits, k, fmt_name)
    check_tensor("w_packed", w_packed, None, None, dev)
    check_tensor("w_scale", w_scale, (torch.float32,), (n,), dev)
    check_tensor("w_zero", w_zero, (torch.float32,), (n,), dev)
    check_tensor("bias", bias, FLOAT_DTYPES, (n,), dev, optional=True)
    check_tensor("beta", beta, FLOAT_DTYPES, (n,), dev, optional=True)
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"out_dtype must be one of {OUT_DTYPES}, got {out_dtype}")


def _weight_dims(w_packed, w_bits, k, fmt_name):
    fmt = get_format(w_bits, fmt_name)
    check_tensor("w_packed", w_packed, (fmt.packed_dtype,), (None, fmt.row_bytes(k)))
    return fmt, w_packed.shape[0]


# ----------------------------------------------------------------------------- ops
def quantize_weight(w: torch.Tensor, bits: int, backend: str = "auto"):
    """Per-output-channel min-max RTN of a weight [N, K] (SPEC 1.1).

    Returns (q [N, K] uint8 codes in [0, 2^bits) (int8 in [-127, 127] for 8 bits),
    scale f32 [N], zero f32 [N] (integer valued; 0 for 8 bits)).
    """
    check_bits("bits", bits, W_BITS)
    check_tensor("w", w, FLOAT_DTYPES, (None, None))
    if w.shape[0] < 1 or w.shape[1] < 1:
        raise ValueError(f"w must have N >= 1 and K >= 1, got shape {list(w.shape)}")
    if w.shape[1] > MAX_K:
        raise ValueError(f"w has K={w.shape[1]} > {MAX_K}: the int32 accumulator could overflow")
    return backends.resolve("quantize_weight", backend, w.device)(w, bits)


def pack_weight(q: torch.Tensor, bits: int, format: str | None = None, backend: str = "auto") -> torch.Tensor:
    """Codes [N, K] -> packed [N, row_bytes(K)] in the default format of `bits` (or `format`)."""
    check_bits("bits", bits, W_BITS)
    get_format(bits, format)
    check_tensor("q", q, None, (None, None))
    return backends.resolve("pack_weight", backend, q.device)(q, bits, format)


def unpack_weight(packed: torch.Tensor, bits: int, k: int, format: str | None = None, backend: str = "auto"):
    """Exact inverse of `pack_weight`: packed [N, row_bytes(k)] -> codes [N, k]."""
    check_bits("bits", bits, W_BITS)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    _weight_dims(packed, bits, k, format)
    return backends.resolve("unpack_weight", backend, packed.device)(packed, bits, k, format)


def _check_activation(name: str, activation) -> None:
    if activation is not None and activation not in reference.ACTIVATIONS:
        raise ValueError(f"{name} must be None or one of {reference.ACTIVATIONS}, got {activation!r}")


def _quantize_activation_checked(x, bits, alpha, gate, frame_id, backend, want_rowsum, activation=None):
    check_bits("bits", bits, A_BITS)
    _check_activation("activation", activation)
    check_tensor("x", x, FLOAT_DTYPES, (None, None))
    m, k = x.shape
    if k < 1:
        raise ValueError(f"x must have K >= 1 columns, got shape {list(x.shape)}")
    _check_tqe(m, k, x.device, alpha, gate, frame_id)
    fn = backends.resolve("quantize_activation", backend, x.device)
    return fn(x, bits, alpha, gate, frame_id, want_rowsum, activation=activation)


def quantize_activation(x, bits, alpha=None, gate=None, frame_id=None, backend="auto", activation=None):
    """Per-token dynamic quantization of x [M, K] (float32, bfloat16 or float16).

    Returns exactly three results: (xq int8 [M, K] (codes q - z), scale f32 [M], u f32 [M] or None).
    `u[m] = gate[frame_id[m]] * (x^[m, :] . alpha)` is the TQE term; it is None when alpha is None.
    gate None means all ones; frame_id None means every row uses gate[0].
    activation ("gelu_tanh"): quantize `reference.activate(x, activation)` (rounded to x's dtype) in the same pass,
    the op that produced the linear's input (FFN fc1 -> GELU -> fc2), so that output is never written.
    """
    return _quantize_activation_checked(x, bits, alpha, gate, frame_id, backend, False, activation)


def quantize_activation_rowsum(x, bits, alpha=None, gate=None, frame_id=None, backend="auto", activation=None):
    """Fused variant for the GEMM: (xq, scale, u, rowsum int32 [M]) in one pass over x."""
    return _quantize_activation_checked(x, bits, alpha, gate, frame_id, backend, True, activation)


def norm_quantize(x, bits, eps, weight=None, bias=None, scale=None, shift=None, mod_rows=1, alphas=None,
                  gates=None, frame_id=None, *, write_y=True, backend="auto"):
    """LayerNorm [+ affine] [+ adaLN modulation] of x [M, K] fused with the per-token quantization of its output
    for J consumers: -> (y [M, K] x.dtype, xq int8 [M, K], scale f32 [M], u f32 [J, M] | None, rowsum int32 [M]).

    y = (LN(x) [* weight + bias]) [* (1 + scale[m // mod_rows]) + shift[m // mod_rows]] rounded to x.dtype;
    xq, scale and rowsum are `quantize_activation_rowsum(y, bits)`'s; u[j] is the TQE term of alphas[j] ([J, K])
    with gates[j] ([J, G]; None = ones) and frame_id. weight/bias [K]; scale/shift [R, K] with R * mod_rows >= M.
    write_y=False: y is neither written nor returned (None), for callers that only need its codes (the kernel
    then moves 3 bytes per element, not 5).
    """
    m, k = _check_norm_quantize(x, bits, weight, bias, scale, shift, mod_rows, alphas, gates, frame_id, write_y)
    fn = backends.resolve("norm_quantize", backend, x.device)
    return fn(x, bits, eps, weight, bias, scale, shift, mod_rows, alphas, gates, frame_id, None, None, write_y)[:5]


def add_norm_quantize(x, residual, bits, eps, weight=None, bias=None, scale=None, shift=None, mod_rows=1,
                      alphas=None, gates=None, frame_id=None, *, residual_gate=None, write_y=True, backend="auto"):
    """A DiT block's gated residual add fused in front of `norm_quantize`:
    -> (h [M, K] x.dtype, y | None, xq, scale, u | None, rowsum).

    h = (residual.float() + x.float() * residual_gate[m // (M // G)]).to(x.dtype) (without a gate: residual + x),
    as `reference.epilogue_tail` writes the add after an attention output projection; the rest is
    norm_quantize(h, ...). x and residual [M, K], one float dtype; residual_gate f32 [G, K], G dividing M.
    One pass: reads x and residual, writes h and the codes (and y unless write_y=False)."""
    m, k = _check_norm_quantize(x, bits, weight, bias, scale, shift, mod_rows, alphas, gates, frame_id, write_y)
    check_tensor("residual", residual, (x.dtype,), (m, k), x.device)
    _check_residual_gate(m, k, x.device, residual_gate)
    fn = backends.resolve("norm_quantize", backend, x.device)
    y, xq, sx, u, rs, h = fn(x, bits, eps, weight, bias, scale, shift, mod_rows, alphas, gates, frame_id, residual,
                             residual_gate, write_y)
    return h, y, xq, sx, u, rs


def _check_norm_quantize(x, bits, weight, bias, scale, shift, mod_rows, alphas, gates, frame_id, write_y):
    check_bits("bits", bits, A_BITS)
    check_tensor("x", x, FLOAT_DTYPES, (None, None))
    m, k = x.shape
    if not isinstance(write_y, bool):
        raise TypeError(f"write_y must be a bool, got {type(write_y).__name__}")
    if (weight is None) != (bias is None):
        raise ValueError("weight and bias must be given together (the norm's affine)")
    if (scale is None) != (shift is None):
        raise ValueError("scale and shift must be given together (the adaLN modulation)")
    check_tensor("weight", weight, FLOAT_DTYPES, (k,), x.device, optional=True)
    check_tensor("bias", bias, FLOAT_DTYPES, (k,), x.device, optional=True)
    if isinstance(mod_rows, bool) or not isinstance(mod_rows, int) or mod_rows < 1:
        raise ValueError(f"mod_rows must be a positive int, got {mod_rows!r}")
    check_tensor("scale", scale, FLOAT_DTYPES, (None, k), x.device, optional=True)
    check_tensor("shift", shift, FLOAT_DTYPES, None if scale is None else tuple(scale.shape), x.device, optional=True)
    if scale is not None and scale.shape[0] * mod_rows < m:
        raise ValueError(f"scale has {scale.shape[0]} rows; with mod_rows={mod_rows} it must cover {m} rows of x")
    check_tensor("alphas", alphas, FLOAT_DTYPES, (None, k), x.device, optional=True)
    if gates is not None:
        if alphas is None:
            raise ValueError("gates given without alphas: the TQE terms need alphas")
        check_tensor("gates", gates, FLOAT_DTYPES, (alphas.shape[0], None), x.device)
    if frame_id is not None:
        check_tensor("frame_id", frame_id, (torch.int32, torch.int64), (m,), x.device)
    return m, k


def _check_tail(m, n, device, out_dtype, activation, residual, residual_gate):
    """The optional epilogue tail (`reference.epilogue_tail`): activation, residual [M, N], residual_gate [G, N]."""
    _check_activation("activation", activation)
    if residual_gate is not None and residual is None:
        raise ValueError("residual_gate given without residual: the gate scales the linear's output added to it")
    if (activation is not None or residual is not None) and out_dtype == torch.int32:
        raise ValueError("activation/residual need a float out_dtype (they follow the float epilogue), got int32")
    check_tensor("residual", residual, (out_dtype,), (m, n), device, optional=True)
    if residual is not None and residual.stride(-1) != 1:
        raise ValueError("residual must have unit stride along N (a row-major [M, N] view)")
    _check_residual_gate(m, n, device, residual_gate)


def _check_residual_gate(m, n, device, residual_gate):
    """residual_gate f32 [G, N] (optional), G dividing the M rows: row m takes gate row m // (M // G)."""
    check_tensor("residual_gate", residual_gate, (torch.float32,), (None, n), device, optional=True)
    if residual_gate is not None and (residual_gate.shape[0] < 1 or m % residual_gate.shape[0]):
        raise ValueError(f"residual_gate has {residual_gate.shape[0]} rows; they must divide the M={m} rows "
                         "(row m takes gate row m // (M // G))")


def _has_tail(activation, residual) -> bool:
    return activation is not None or residual is not None


def _run_gemm(fn, args, activation, residual, residual_gate, **kw):
    """A backend's GEMM (`kw`: its other keywords) with the tail fused when the backend fuses it
    (`backends.fuses_tail`), else after it."""
    if not _has_tail(activation, residual):
        return fn(*args, **kw)
    if getattr(fn, "fuses_tail", False):
        return fn(*args, activation=activation, residual=residual, residual_gate=residual_gate, **kw)
    return reference.epilogue_tail(fn(*args, **kw), activation, residual, residual_gate)


def _auto_gemm_backend(backend, device, w_bits, k, tail) -> str:
    """backend="auto": the GEMM backend the measured table (`auto.py`) names for this shape when it can run
    here, else "auto" (the default order)."""
    if backend != "auto":
        return backend
    name = auto.gemm_backend(device, w_bits, k, tail)
    if name is None or backends.resolve("qgemm", name, device, fallback=False) is None:  # not runnable here
        return "auto"
    if name == "cuda":  # the table means the warp-specialized kernel: not an extension built without sm_90a
        from . import cuda

        if not cuda.ws_takes(w_bits, 0):
            return "auto"
    return name


def tail_as_own_pass(backend, device, w_bits: int, k: int) -> bool:
    """Whether a GEMM of this layer (`backend`, w_bits, K) with an epilogue tail runs the tail as a pass of its own
    after the kernel, i.e. routes to the CUDA backend without QVDIT_CUDA_FUSED_TAIL=1 (Triton fuses the tail into
    its GEMM's epilogue; the reference runs torch ops). models/fused.py then moves the FFN's GELU into fc2's
    act-quant instead (`qlinear(input_activation=)`)."""
    name = _auto_gemm_backend(backend, device, w_bits, k, True)
    if name == "auto":
        name = backends.auto_name("qgemm", device)
    if name != "cuda":
        return False
    from . import cuda

    return not cuda.fused_tail_enabled()


def qgemm(xq, x_scale, w_packed, w_bits, w_scale, w_zero, bias=None, u=None, beta=None, x_rowsum=None,
          out_dtype=torch.bfloat16, backend="auto", format=None, activation=None, residual=None, residual_gate=None):
    """y = (xq @ (qw - zw)^T) * sx[m] * sw[n] + bias[n] + u[m] * beta[n]  ->  [M, N] in out_dtype.

    xq int8 [M, K]; x_scale f32 [M]; w_packed [N, row_bytes(K)] (format of w_bits);
    w_scale, w_zero f32 [N]; bias [N] (any float dtype); u f32 [M] with beta [N] (both or neither);
    x_rowsum int32 [M] (optional: computed when needed and not given).
    out_dtype torch.int32 returns the exact zero-corrected accumulator before the epilogue.
    activation ("gelu_tanh"), residual [M, N] (out_dtype) and residual_gate f32 [G, N]: what the block does
    next, in the same epilogue (`reference.epilogue_tail`): out = residual + gate * act(y).
    """
    check_tensor("xq", xq, (torch.int8,), (None, None))
    m, k = xq.shape
    check_tensor("x_scale", x_scale, (torch.float32,), (m,), xq.device)
    check_tensor("u", u, (torch.float32,), (m,), xq.device, optional=True)
    check_tensor("x_rowsum", x_rowsum, (torch.int32,), (m,), xq.device, optional=True)
    if (u is None) != (beta is None):
        raise ValueError("u and beta must be given together (the TQE term is u[m] * beta[n])")
    _check_weight_args(k, xq.device, w_packed, w_bits, w_scale, w_zero, bias, beta, out_dtype, format)
    _check_tail(m, w_packed.shape[0], xq.device, out_dtype, activation, residual, residual_gate)
    backend = _auto_gemm_backend(backend, xq.device, w_bits, k, _has_tail(activation, residual))
    fn = backends.resolve("qgemm", backend, xq.device)
    return _run_gemm(fn, (xq, x_scale, w_packed, w_bits, w_scale, w_zero, bias, u, beta, x_rowsum, out_dtype, format),
                     activation, residual, residual_gate)


def qlinear(x, w_packed, w_bits, w_scale, w_zero, a_bits, bias=None, alpha=None, beta=None, gate=None,
            frame_id=None, out_dtype=None, backend="auto", format=None, activation=None, residual=None,
            residual_gate=None, input_activation=None, overwrite_input=False, overwrite_residual=False):
    """Quantized linear: act-quant of x [..., K] then `qgemm`; returns [..., N] (x.dtype unless out_dtype).

    TQE is on when alpha and beta are given (u is then computed in the act-quant pass).
    activation / residual ([..., N]) / residual_gate ([G, N]): the epilogue tail of `qgemm`.
    input_activation ("gelu_tanh"): the linear of `reference.activate(x, input_activation)`, the activation
    applied inside the act-quant pass (FFN fc2 taking fc1's output before its GELU).
    overwrite_input: the caller gives up x (nothing reads it afterwards), so a backend may write the activation
    codes over it instead of into a buffer of their own (the CUDA backend does, `cuda.inplace_ok`); x's values
    are then undefined. The output is the same either way.
    overwrite_residual: the caller gives up residual too, so a backend may write the output over it and return
    (a view of) residual itself. With overwrite_input, the CUDA backend does where x's rows have room for the
    output beside the codes (`cuda.over_ok`; the FFN's fc2 on fc1's output): then the linear allocates no [M, K]
    or [M, N] buffer at all.
    """
    check_tensor("x", x, FLOAT_DTYPES)
    _check_activation("input_activation", input_activation)
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (the K features)")
    lead, k = x.shape[:-1], x.shape[-1]
    if (alpha is None) != (beta is None):
        raise ValueError("alpha and beta must be given together (TQE needs both)")
    out_dtype = x.dtype if out_dtype is None else out_dtype
    x2 = x.reshape(-1, k)
    res2 = None
    if residual is not None:
        check_tensor("residual", residual, None, (*lead, None))
        res2 = residual.reshape(x2.shape[0], residual.shape[-1])
    # the backend the table routes this GEMM to (backend="auto") runs its act-quant too: one backend's qlinear
    gemm_backend = _auto_gemm_backend(backend, x.device, w_bits, k, _has_tail(activation, residual))
    fused = backends.resolve("qlinear", gemm_backend, x.device, fallback=False)
    if fused is not None:
        check_bits("a_bits", a_bits, A_BITS)
        _check_tqe(x2.shape[0], k, x.device, alpha, gate, frame_id)
        _check_weight_args(k, x.device, w_packed, w_bits, w_scale, w_zero, bias, beta, out_dtype, format)
        _check_tail(x2.shape[0], w_packed.shape[0], x.device, out_dtype, activation, res2, residual_gate)
        y = _run_gemm(fused, (x2, w_packed, w_bits, w_scale, w_zero, a_bits, bias, alpha, beta, gate, frame_id,
                              out_dtype, format), activation, res2, residual_gate, input_activation=input_activation,
                      overwrite_input=overwrite_input, overwrite_residual=overwrite_residual)
    else:
        need_rowsum = w_bits != 8
        res = _quantize_activation_checked(x2, a_bits, alpha, gate, frame_id, backend, need_rowsum, input_activation)
        xq, sx, u = res[:3]
        rowsum = res[3] if need_rowsum else None
        y = qgemm(xq, sx, w_packed, w_bits, w_scale, w_zero, bias, u, beta, rowsum, out_dtype, gemm_backend, format,
                  activation, res2, residual_gate)
    return y.reshape(*lead, y.shape[-1])
