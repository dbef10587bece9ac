"""qvdit_kernels: quantized tensor ops for low-bit video DiTs (knows nothing of models).

Public ops (SPEC 1.3), each with `backend=` in {"auto", "torch", "triton", "cuda"}:
`quantize_weight`, `pack_weight`, `unpack_weight`, `quantize_activation`, `qgemm`, `qlinear`; the fused producers
`norm_quantize` and `add_norm_quantize` (a block's [residual add +] norm + modulation + act-quant).
The "torch" backend is the pure-PyTorch reference (`qvdit_kernels.reference`).
Packing formats: `qvdit_kernels.formats`. Backend registry: `qvdit_kernels.backends`.
"""
from .backends import BACKENDS, BackendUnavailableError
from .formats import DEFAULT_FORMAT, FORMATS, get_format
from .ops import (
    A_BITS,
    W_BITS,
    add_norm_quantize,
    norm_quantize,
    pack_weight,
    qgemm,
    qlinear,
    quantize_activation,
    quantize_activation_rowsum,
    quantize_weight,
    unpack_weight,
)

__all__ = [
    "BACKENDS", "BackendUnavailableError", "DEFAULT_FORMAT", "FORMATS", "get_format", "A_BITS", "W_BITS",
    "add_norm_quantize", "norm_quantize", "pack_weight", "qgemm", "qlinear", "quantize_activation",
    "quantize_activation_rowsum", "quantize_weight", "unpack_weight",
]
