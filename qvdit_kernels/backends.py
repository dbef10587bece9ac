"""Backend registry: which implementation of an op runs for `backend=` in {"auto", "torch", "triton", "cuda"}.

- "torch": the pure-PyTorch reference (`reference.py`), always available.
- "triton": kernels registered by `qvdit_kernels.triton` (imported lazily, on first use), for CUDA
  tensors, or for CPU tensors under `TRITON_INTERPRET=1` (how CI tests them).
- "cuda": kernels of the compiled extension `qvdit_kernels._C`, loaded by `qvdit_kernels.cuda`.
- "auto": for CUDA tensors the first available backend implementing the op, in the order triton, cuda,
  except for GEMM shapes that `auto.py`'s measured per-GPU table gives to another backend (ops.py asks it);
  otherwise "torch".

An op with no kernel in a named backend that is *offline* (weight quantization, packing) runs its
reference; any other op raises `BackendUnavailableError` naming the backend and the reason.
Nothing here touches a device at import time.
"""
from __future__ import annotations

import importlib
import os
from typing import Callable

import torch

BACKENDS = ("auto", "torch", "triton", "cuda")
OFFLINE_OPS = frozenset({"quantize_weight", "pack_weight", "unpack_weight"})

_IMPLS: dict[tuple[str, str], Callable] = {}
_LOADED: dict[str, tuple[bool, str]] = {}  # backend -> (importable, reason if not)
_MODULES = {"triton": "qvdit_kernels.triton", "cuda": "qvdit_kernels.cuda"}


class BackendUnavailableError(RuntimeError):
    """A named backend cannot run this op here (not installed, no GPU, no kernel for the op)."""


def register(op: str, backend: str):
    """Decorator: `@register("qgemm", "triton")` makes the function the op's implementation in that backend."""
    if backend not in ("torch", "triton", "cuda"):
        raise ValueError(f"backend must be 'torch', 'triton' or 'cuda', got {backend!r}")

    def deco(fn):
        _IMPLS[(op, backend)] = fn
        return fn

    return deco


def fuses_tail(fn):
    """Marks a "qgemm"/"qlinear" implementation that takes activation=, residual=, residual_gate= and applies
    them in its own epilogue; ops.py applies the tail after any other implementation."""
    fn.fuses_tail = True
    return fn


def _load(backend: str) -> tuple[bool, str]:
    """Import the module that registers a backend's kernels, once; remember why it failed."""
    if backend not in _LOADED:
        try:
            importlib.import_module(_MODULES[backend])
            _LOADED[backend] = (True, "")
        except Exception as exc:  # ImportError, missing extension, broken toolchain: all mean "unavailable"
            _LOADED[backend] = (False, f"{type(exc).__name__}: {exc}")
    return _LOADED[backend]


def interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def availability(backend: str, device: torch.device) -> tuple[bool, str]:
    """(can run, reason if not) for a backend on tensors of `device`."""
    if backend == "torch":
        return True, ""
    ok, why = _load(backend)
    if not ok:
        return False, why
    if backend == "triton":
        if device.type == "cuda" or interpret_mode():
            return True, ""
        return False, f"Triton kernels need CUDA tensors (got {device.type}) or TRITON_INTERPRET=1"
    if device.type != "cuda":
        return False, f"CUDA kernels need CUDA tensors (got {device.type})"
    return True, ""


# ops whose kernels "auto" tries CUDA first, and the GPU generations (major compute capability) where it does: the
# norm + act-quant producer wherever the default build has machine code (sm_80, which also runs on 8.x, and sm_90a;
# setup.py's targets, no PTX: elsewhere CUDA would fail with no kernel image); the act-quant where it was measured
# faster (H200: 1.27-1.31x Triton's, 1.74-1.79x with the GELU; BENCHMARKS run nq2).
AUTO_ORDER = {"norm_quantize": ("cuda", "triton"), "quantize_activation": ("cuda", "triton")}
AUTO_CUDA_ARCHS = {"norm_quantize": (8, 9), "quantize_activation": (9,)}


def _cuda_arch_built(device: torch.device, op: str = "norm_quantize") -> bool:
    """Whether "auto" may take CUDA's kernel of `op` first on this GPU (AUTO_CUDA_ARCHS)."""
    return torch.cuda.get_device_capability(device)[0] in AUTO_CUDA_ARCHS.get(op, (8, 9))


def auto_name(op: str, device: torch.device) -> str:
    """The backend "auto" runs `op` with on `device` (before auto.py's per-shape GEMM table, which ops.py applies)."""
    if device.type == "cuda":
        # Triton first, except for AUTO_ORDER's ops: the GEMM shapes where the CUDA kernel wins are routed by
        # ops.py from auto.py's table before they get here; the act-quant and the norm + act-quant producer take
        # CUDA's kernels where AUTO_CUDA_ARCHS says (BENCHMARKS "norm-quant" has them side by side).
        for name in AUTO_ORDER.get(op, ("triton", "cuda")):
            if name == "cuda" and op in AUTO_ORDER and not _cuda_arch_built(device, op):
                continue
            if availability(name, device)[0] and (op, name) in _IMPLS:
                return name
    return "torch"


def resolve(op: str, backend: str, device: torch.device, fallback: bool = True) -> Callable | None:
    """The implementation of `op` to run for `backend` on tensors of `device`.

    With `fallback=False`, returns None instead of the reference when the chosen backend has no
    kernel for `op` (used for optional fused ops such as "qlinear").
    """
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    ref = _IMPLS.get((op, "torch")) if fallback else None
    if backend == "torch":
        return ref
    if backend == "auto":
        name = auto_name(op, device)
        return ref if name == "torch" else _IMPLS[(op, name)]
    ok, why = availability(backend, device)
    if (op, backend) in _IMPLS and ok:
        return _IMPLS[(op, backend)]
    if op in OFFLINE_OPS or not fallback:
        return ref  # offline ops run their reference; optional fused ops are composed by the caller
    if not ok:
        raise BackendUnavailableError(f"backend={backend!r} is not available for {op}: {why}")
    raise BackendUnavailableError(f"backend={backend!r} has no kernel for {op}")


# ----------------------------------------------------------------------------- helpers for kernel backends
def require_default_format(backend: str, w_bits: int, format) -> None:
    """Fast kernels read only the default packed format of each width (formats.DEFAULT_FORMAT)."""
    from .formats import DEFAULT_FORMAT

    if format is not None and format != DEFAULT_FORMAT[w_bits]:
        raise ValueError(f"backend={backend!r} reads only the default {w_bits}-bit format "
                         f"{DEFAULT_FORMAT[w_bits]!r}, got format={format!r}")


def act_quant_results(xq, scale, u, rowsum, alpha, want_rowsum):
    """A kernel's 4 outputs as the op returns them: u None without alpha, rowsum only when asked for."""
    u = u if alpha is not None else None
    return (xq, scale, u, rowsum) if want_rowsum else (xq, scale, u)


def norm_quant_results(y, xq, scale, u, rowsum, h, alphas, residual, write_y):
    """A norm-quant kernel's 6 outputs (custom ops cannot return None) as the backends return them: y None without
    write_y, u None without alphas, h None without a residual (reference.norm_quantize_backend's contract)."""
    return (y if write_y else None), xq, scale, (u if alphas is not None else None), rowsum, \
        (h if residual is not None else None)


def implemented(op: str) -> list[str]:
    """Backends that currently have an implementation of `op` registered (after loading what loads)."""
    for b in _MODULES:
        _load(b)
    return [b for b in ("torch", "triton", "cuda") if (op, b) in _IMPLS]
