"""qvdit: Q-VDiT quantization for video diffusion transformers, on real low-bit kernels.

    import qvdit
    qvdit.quantize_(model, qvdit.QuantConfig(w_bits=3, a_bits=6))   # in place, torchao style
    qvdit.save_quantized(model, "w3a6.safetensors")
    qvdit.load_quantized(fresh_model, "w3a6.safetensors")

Ops on tensors live in `qvdit_kernels`; this package is the model layer.
"""
from .checkpoint import CheckpointError, load_quantized, save_quantized
from .config import LayerQuant, QuantConfig
from .frames import FrameLayout, FrameState, publish, resample_gate
from .qlinear import QLinear
from .quantize import qlinears, quantize_, weight_bytes
from .calibration import calibrate  # noqa: E402  (after quantize: it builds on it)

__version__ = "0.1.0"

from . import _diffusers_hook  # noqa: E402

_diffusers_hook.install()  # quant_method "qvdit" in diffusers' registry, without importing diffusers here


def __getattr__(name):  # QVDiTConfig imports diffusers: only on first use
    if name == "QVDiTConfig":
        from .diffusers_quantizer import QVDiTConfig

        return QVDiTConfig
    raise AttributeError(f"module 'qvdit' has no attribute {name!r}")

__all__ = [
    "CheckpointError", "FrameLayout", "FrameState", "LayerQuant", "QLinear", "QuantConfig", "calibrate", "load_quantized",
    "publish", "qlinears", "quantize_", "resample_gate", "save_quantized", "weight_bytes", "__version__",
]
