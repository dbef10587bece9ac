"""Backend "triton": fused activation quantization (+TQE u, row sums) and the packed W3/W4/W8 x int8 GEMM
with the TQE epilogue, registered as torch.library custom ops (`library.py`).

Imported lazily by `qvdit_kernels.backends`; importing it queries no device and works on CPU (the kernels
then run under TRITON_INTERPRET=1). Files: `act_quant.py`, `gemm.py`, `norm_quant.py` (LayerNorm + modulation + act-quant), `unpack.py` (asm and pure-Triton
unpack), `tune.py` + `configs/*.json` (launch configs per GPU), `library.py` (custom ops, registration).
"""
from . import library  # noqa: F401  (registers the ops)
