"""The FFN activation as the Triton kernels compute it (gemm.py's epilogue tail, act_quant.py's GELU prologue)."""
import triton
import triton.language as tl


@triton.jit
def gelu_tanh(y):
    """gelu_tanh of float32 y in torch's formula, x * sigmoid(2 z) == 0.5 x (1 + tanh z), z = sqrt(2/pi) (x +
    0.044715 x^3): an exp and a division per element (tanh costs more); the caller rounds to the model's dtype."""
    inner = 0.7978845608028654 * (y + 0.044715 * (y * y * y))
    return y / (1.0 + tl.exp(-2.0 * inner))
