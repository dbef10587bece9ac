"""Compile every Triton kernel to cubin for one GPU architecture on a machine without a GPU (tests/test_triton_compile.py
runs this in a child process, without TRITON_INTERPRET). Triton's driver is replaced by a stub that names the target,
and JITFunction.run is made to compile only (warmup), so the real launchers (`act_quant.act_quant`, `gemm.launch`,
`norm_quant.norm_quant`) specialize their arguments exactly as on a GPU (None pointers, alignment, constexprs).

    python tests/triton_compile_child.py 90      # prints one line per failing launch; exit status 1 if any
"""
import itertools
import sys

import torch
from triton.backends.compiler import GPUTarget
from triton.runtime import driver, jit


class _StubDriver:
    """What JITFunction.run asks the driver for, for a target this machine need not have."""

    def __init__(self, arch: int):
        self.arch = arch

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", self.arch, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")


def main(arch: int) -> int:
    driver.set_active(_StubDriver(arch))
    real_run = jit.JITFunction.run
    jit.JITFunction.run = lambda self, *a, grid, warmup, **kw: real_run(self, *a, grid=grid, warmup=True, **kw)
    from qvdit_kernels.triton import act_quant as aq, gemm, norm_quant as nq, tune

    torch.cuda.current_device = lambda: 0  # (persistent grids ask the GPU for its SM count)
    tune._sm_count = lambda index: 132
    failed, count = [], 0

    def attempt(what, fn):
        nonlocal count
        count += 1
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 (every failure is reported)
            failed.append(f"{what}: {type(exc).__name__}: {str(exc)[-500:]}")

    g = torch.Generator().manual_seed(0)
    bf = torch.bfloat16
    # act-quant: every candidate at a one-pass width, the first two of a two-pass one, and each option on the first
    for k, ncand in ((1536, None), (40000, 2)):
        x = torch.randn(64, k, generator=g).to(bf)
        alpha, gate, fid = torch.randn(k, generator=g), torch.ones(4), torch.zeros(64, dtype=torch.int32)
        for i, p in enumerate(aq.candidates(k)[:ncand]):
            attempt(f"act_quant K={k} {p}", lambda: aq.act_quant(x, 6, alpha, gate, fid, True, params=p))
            if i or k != 1536:
                continue
            for bits, tqe, gelu in itertools.product((6, 8), (False, True), (False, True)):
                a = (alpha, gate, fid) if tqe else (None, None, None)
                attempt(f"act_quant K={k} bits={bits} tqe={tqe} gelu={gelu}",
                        lambda: aq.act_quant(x, bits, *a, not gelu, params=p, gelu=gelu))
    # GEMM: the first two configs of each width, then the epilogue options on the first
    m, k, n = 256, 1536, 512
    xq = torch.randint(-32, 31, (m, k), generator=g, dtype=torch.int8)
    sx, rs, u = torch.rand(m), torch.zeros(m, dtype=torch.int32), torch.rand(m)
    options = [(bf, True, "", False), (torch.int32, False, "", True), (bf, True, "gelu", True),
               (bf, True, "gated", True), (torch.float32, False, "residual", True), (torch.float16, True, "", True)]
    for w_bits in (3, 4, 8):
        wp = torch.zeros(n, {3: (k + 127) // 128 * 48, 4: k // 2, 8: k}[w_bits],
                         dtype=torch.uint8 if w_bits != 8 else torch.int8)
        sw, zw, bias, beta = torch.rand(n), torch.zeros(n), torch.rand(n), torch.rand(n)
        for i, cfg in enumerate(tune.qgemm_configs(w_bits)[:2]):
            out = torch.empty(m, n, dtype=bf)
            attempt(f"qgemm W{w_bits} {cfg}", lambda: gemm.launch(xq, sx, wp, w_bits, sw, zw, bias, u, beta, rs, out,
                                                                  cfg, False))
            if i:
                continue
            for dt, tqe, tail, asm in options:
                out = torch.empty(m, n, dtype=dt)
                res = torch.zeros(m, n, dtype=dt) if tail in ("residual", "gated") else None
                rg = torch.ones(2, n) if tail == "gated" else None
                attempt(f"qgemm W{w_bits} out={dt} tqe={tqe} tail={tail} asm={asm}",
                        lambda: gemm.launch(xq, sx, wp, w_bits, sw, zw, None if tqe else bias, u if tqe else None,
                                            beta if tqe else None, rs if w_bits != 8 else None, out, cfg, False,
                                            use_asm=asm, gelu=tail == "gelu", residual=res, residual_gate=rg))
    # norm + act-quant: both kernels, with and without the residual and y, all operands or none (None pointers)
    k = 1536
    x = torch.randn(64, k, generator=g).to(bf)
    for p in nq.candidates(k, 3)[:2]:
        for res, write_y, full in itertools.product((False, "gated", "plain"), (False, True), (False, True)):
            if not full and (res == "gated" or not write_y):
                continue
            kw = dict(residual=x if res else None, residual_gate=torch.ones(2, k) if res == "gated" else None,
                      write_y=write_y)
            w = (torch.ones(k), torch.zeros(k)) if full else (None, None)
            sc = (torch.zeros(2, k), torch.zeros(2, k), 32) if full else (None, None, 1)
            t = (torch.randn(3, k), torch.ones(3, 4), torch.zeros(64, dtype=torch.int32)) if full else (None,) * 3
            attempt(f"norm_quant K={k} {p} res={res} write_y={write_y} operands={full}",
                    lambda: nq.norm_quant(x, 6, 1e-6, *w, *sc, *t, interpret=False, params=p, **kw))
    print(f"sm_{arch}: {count - len(failed)} of {count} launches compiled")
    print("\n".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1])))
