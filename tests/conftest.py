"""Shared test helpers: which kernel backends can run here, and seeded random data that covers every code."""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest
import torch

from qvdit_kernels import backends


def kernel_backends() -> list[str]:
    """Backends to parametrize kernel tests over: the reference plus every fast backend that runs here.

    Triton runs on CPU under TRITON_INTERPRET=1 (how CI tests it); CUDA needs a GPU and the extension.
    """
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    found = ["torch"]
    for name in ("triton", "cuda"):
        if backends.availability(name, device)[0]:
            found.append(name)
    return found


KERNEL_BACKENDS = kernel_backends()
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def backends_for(op: str) -> list[str]:
    """KERNEL_BACKENDS that implement `op`."""
    return [b for b in KERNEL_BACKENDS if b in backends.implemented(op)]


def device_for(backend: str) -> torch.device:
    return torch.device("cpu") if backend == "torch" and os.environ.get("QVDIT_TEST_REF_ON_GPU") != "1" else DEVICE


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_codes(n: int, k: int, bits: int, g: torch.Generator) -> torch.Tensor:
    """Weight codes covering the full range: uint8 in [0, 2^bits) (int8 in [-127, 127] for 8 bits)."""
    if bits == 8:
        return torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int64).to(torch.int8)
    return torch.randint(0, 2**bits, (n, k), generator=g, dtype=torch.int64).to(torch.uint8)


def random_act_codes(m: int, k: int, bits: int, g: torch.Generator) -> torch.Tensor:
    """Activation codes xq = q - z as int8: [-127, 127] for 8 bits, any q - z of a 6-bit code otherwise."""
    lim = 127 if bits == 8 else 2**bits - 1
    return torch.randint(-lim, lim + 1, (m, k), generator=g, dtype=torch.int64).to(torch.int8)


def random_weight_qparams(n: int, bits: int, g: torch.Generator):
    scale = torch.exp(torch.empty(n).uniform_(-7, 2.3, generator=g))  # 1e-3 .. 1e1
    zero = torch.zeros(n) if bits == 8 else torch.randint(0, 2**bits, (n,), generator=g).float()
    return scale, zero


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """One bf16 ulp at |x| (float32 tensor)."""
    ax = x.abs().clamp(min=torch.finfo(torch.float32).tiny)
    return torch.exp2(torch.floor(torch.log2(ax)) - 7)


def ulp(y: torch.Tensor) -> torch.Tensor:
    """One unit in the last place of each element of y in its own dtype (floored at 2^-14 in magnitude)."""
    bits = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}[y.dtype]
    a = y.float().abs().clamp(min=2.0**-14)
    return torch.exp2(torch.floor(torch.log2(a)) - bits)


def assert_within_spec(out: torch.Tensor, ref: torch.Tensor):
    """SPEC 1.4: |out - ref| <= 2 ulp(bf16) of the reference value + 1e-6 (ref in float32 or better)."""
    out, ref = out.float().cpu(), ref.float().cpu()
    assert torch.isfinite(out).all(), "non-finite output"
    bound = 2 * bf16_ulp(ref) + 1e-6
    err = (out - ref).abs()
    worst = (err / bound).max().item() if err.numel() else 0.0
    assert (err <= bound).all(), f"max error is {worst:.2f}x the SPEC 1.4 bound"


def assert_tail_within(got: torch.Tensor, plain: torch.Tensor, activation, residual, gate, what: str = ""):
    """A fused epilogue tail against reference.epilogue_tail applied to the same kernel's plain output: within two
    ulp of the out dtype (GELU's exp form against torch's tanh and float32 contraction move roundings) plus, with
    GELU, the gate times one ulp of the activation."""
    from qvdit_kernels import reference

    want = reference.epilogue_tail(plain, activation, residual, gate)
    h = reference.epilogue_tail(plain, activation) if activation else plain
    rows = None if gate is None else gate.repeat_interleave(h.shape[0] // gate.shape[0], 0)  # row m: m // (M // G)
    gelu_term = (ulp(h) * (1 if rows is None else rows.abs())) if activation else 0
    bound = 2 * ulp(want) + gelu_term + 1e-6
    err = (got.float() - want.float()).abs()
    assert (err <= bound).all(), f"{what}: max error {(err / bound).max():.2f}x the bound"


def capture_cuda_graph(fn):
    """Warm `fn` up on a side stream, then capture one call into a CUDA graph: -> (graph, captured output).

    The tests then change the captured input in place, replay, and compare with an eager call.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


# The C++ runtime libraries the child has loaded, printed to stderr first. (BENCHMARKS run ws11: a libstdc++ copied
# statically into the extension crashed on the first error message it formatted; setup.py now links the shared one.)
_LOADED_RUNTIMES = """
import sys
libs = sorted({ln.split()[-1] for ln in open('/proc/self/maps') if 'libstdc++' in ln or 'libgcc_s' in ln})
print('loaded:', *libs, file=sys.stderr)
"""


def run_isolated(code: str) -> subprocess.CompletedProcess:
    """`code` in a fresh Python with the extension loaded: a crash fails the calling test, not the whole run."""
    return subprocess.run([sys.executable, "-c", "import torch\nimport qvdit_kernels.cuda\n" + _LOADED_RUNTIMES + code],
                          capture_output=True, text=True, timeout=300, cwd=pathlib.Path(__file__).parent.parent)
