"""The CUDA backend's sources without a GPU: the nvcc compile check of csrc/ (sm_90a and sm_80), and the
host emulator (csrc/host/emulate.cpp) that runs the kernels' index, copy, unpack, fragment and epilogue
math (csrc/qvdit_layout.h, ws_layout.h, qvdit_math.h) against the Python packer and the reference, bit for bit.

On a GPU with the extension built, tests/test_gemm.py and tests/test_act_quant.py run backend "cuda".
"""
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import qvdit_kernels as qk
from qvdit_kernels import reference

from conftest import gen, random_act_codes, random_codes, random_weight_qparams

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
NVCC = os.environ.get("QVDIT_NVCC") or shutil.which("nvcc")
CXX = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


@pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH")
def test_compile_check_sm90a_and_sm80():
    """Every csrc/*.cu compiles with plain nvcc (no torch headers) for sm_90a and sm_80, warnings as errors."""
    env = dict(os.environ, QVDIT_NVCC=NVCC)
    res = subprocess.run(["bash", str(CSRC / "compile_check.sh")], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH")
def test_compile_check_fails_loudly(tmp_path):
    """A source that does not compile makes the script exit non-zero and print nvcc's error."""
    shutil.copy(CSRC / "compile_check.sh", tmp_path)
    (tmp_path / "broken.cu").write_text("__global__ void k() { undeclared_name(); }\n")
    env = dict(os.environ, QVDIT_NVCC=NVCC, QVDIT_CHECK_CACHE="off")
    res = subprocess.run(["bash", str(tmp_path / "compile_check.sh")], capture_output=True, text=True, env=env)
    assert res.returncode != 0 and "broken.cu FAILED" in res.stderr and "undeclared_name" in res.stderr


def _cuda_include() -> Path | None:
    """The CUDA toolkit's include folder (beside the nvcc that compile_check uses)."""
    cands = [os.environ.get("CUDA_HOME", "/usr/local/cuda"), "/usr/local/cuda"]
    if NVCC:
        real = Path(subprocess.run(["bash", "-c", f"command -v {NVCC}"], capture_output=True, text=True).stdout.strip())
        cands.insert(0, str(real.resolve().parents[1]))
    cands += sorted(str(p) for p in Path("/usr/local").glob("cuda-*"))
    for c in cands:
        if (Path(c) / "include" / "cuda_runtime_api.h").exists():
            return Path(c) / "include"
    return None


@pytest.mark.skipif(CXX is None, reason="no host C++ compiler")
def test_bindings_parse_with_the_torch_headers(tmp_path):
    """csrc/bindings.cpp (the one file with torch headers, built only where torch has CUDA) parses and type-checks
    against this torch's headers, so a broken binding shows before a GPU build. A CPU torch ships the c10/cuda
    headers but not the build-generated cuda_cmake_macros.h, which gets an empty stand-in here."""
    import sysconfig

    from torch.utils import cpp_extension

    cuda_inc = _cuda_include()
    if cuda_inc is None:
        pytest.skip("no CUDA toolkit headers (cuda_runtime_api.h) found")
    (tmp_path / "c10" / "cuda" / "impl").mkdir(parents=True)
    (tmp_path / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").write_text("#pragma once\n")
    incs = [*cpp_extension.include_paths(), sysconfig.get_paths()["include"], str(tmp_path), str(cuda_inc), str(CSRC)]
    # (C++20: torch's own standard, which the extension build takes: setup.py passes no -std for cxx)
    res = subprocess.run([CXX, "-std=c++20", "-fsyntax-only", "-DTORCH_EXTENSION_NAME=_C",
                          *[f"-I{i}" for i in incs], str(CSRC / "bindings.cpp")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-4000:]


def test_cuda_module_import_error_is_clear():
    """Without the built extension, importing qvdit_kernels.cuda fails with the one clear ImportError."""
    try:
        import qvdit_kernels._C  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="CUDA extension qvdit_kernels._C is not built"):
            import qvdit_kernels.cuda  # noqa: F401
    else:
        pytest.skip("the extension is built here")


def test_kernel_sources_have_no_torch_headers():
    for src in [*CSRC.glob("*.cu"), *CSRC.glob("*.cuh"), *CSRC.glob("*.h")]:
        text = src.read_text()
        assert "#include <torch" not in text and "#include <ATen" not in text and "#include <c10" not in text, src


def test_inplace_row_limit_written_once_per_language():
    """The in-place act-quant's longest row: qvdit_kernels.cuda.INPLACE_MAX_ROW_BYTES (which picks the in-place
    path) equals the header's kActQuantInplaceMaxRowBytes (which the binding checks and act_quant.cu asserts); the
    same for the norm-quant kernel's row and consumer limits (norm_quant_ok; norm_quant.cu).
    Read from the sources: the Python module imports only where the extension is built."""
    import re

    value = lambda expr: eval(expr, {"__builtins__": {}})  # noqa: E731  (digits and '*' only, matched below)
    for cname, pyname in (("kActQuantInplaceMaxRowBytes", "INPLACE_MAX_ROW_BYTES"),
                          ("kNormQuantMaxRowBytes", "NORM_QUANT_MAX_ROW_BYTES"),
                          ("kNormQuantMaxConsumers", "NORM_QUANT_MAX_CONSUMERS")):
        header = re.search(cname + r" = ([0-9* ]+);", (CSRC / "qvdit_kernels.h").read_text())
        py = re.search("^" + pyname + r" = ([0-9* ]+)$", (ROOT / "qvdit_kernels" / "cuda.py").read_text(), re.M)
        assert header and py, cname
        assert value(header.group(1)) == value(py.group(1)) == (3 if "Consumers" in cname else 65536), cname


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    if CXX is None:
        pytest.skip("no host C++ compiler")
    exe = tmp_path_factory.mktemp("emu") / "emulate"
    res = subprocess.run([CXX, "-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(exe),
                          str(CSRC / "host" / "emulate.cpp")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return exe


def _write(d: Path, **arrays):
    for name, t in arrays.items():
        t.contiguous().numpy().tofile(d / f"{name}.bin")


def _read(d: Path, name: str, dtype, shape):
    return torch.from_numpy(np.fromfile(d / f"{name}.bin", dtype=dtype).reshape(shape))


# M, K, N: one tile, edge tiles in both M and N, K tails of every kind (W3 128-code tail tile when
# roundup(K, 128) is an odd multiple of 128; W8 K not a multiple of 16), tiny shapes.
GEMM_SHAPES = [(1, 1, 1), (37, 200, 75), (130, 384, 129), (16, 1152, 40), (8, 256, 136), (5, 33, 9)]


@pytest.mark.parametrize("w_bits", [3, 4, 8])
@pytest.mark.parametrize("m,k,n", GEMM_SHAPES)
def test_emulated_gemm_paths_bit_exact(emulator, tmp_path, w_bits, m, k, n):
    """Every GEMM data path (mma.sync, wgmma, and for W3/W4 the warp-specialized wgmma with register
    weight fragments in each tile mode: 128- and 256-row cooperative, ping-pong, deferred epilogue) gives the exact int32
    accumulator, and the epilogue function gives the reference float32 epilogue bit for bit (same
    operations in the same order)."""
    g = gen(m * 7 + k * 3 + n + w_bits)
    qw = random_codes(n, k, w_bits, g)
    sw, zw = random_weight_qparams(n, w_bits, g)
    xq = random_act_codes(m, k, 8 if w_bits == 8 else 6, g)
    sx = torch.exp(torch.empty(m).uniform_(-7, 2.3, generator=g))
    bias, u, beta = torch.randn(n, generator=g), torch.randn(m, generator=g), torch.randn(n, generator=g)
    packed = qk.pack_weight(qw, w_bits)
    _write(tmp_path, xq=xq, w=packed, sx=sx, sw=sw, zw=zw, bias=bias, u=u, beta=beta)
    res = subprocess.run([str(emulator), "gemm", str(w_bits), str(m), str(k), str(n), str(tmp_path)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    want = xq.long() @ (qw.long() - zw.long()[:, None]).T
    for path in ("acc80", "acc90") + (("accws1", "accws2", "accws3", "accws4") if w_bits != 8 else ()):
        got = _read(tmp_path, path, np.int32, (m, n))
        assert torch.equal(got.long(), want), f"{path}: {(got.long() != want).sum().item()} of {m * n} wrong"
    y = _read(tmp_path, "y90", np.float32, (m, n))
    ref = reference.epilogue(want.int(), sx, sw, bias, u, beta, torch.float32)
    assert torch.equal(y, ref)


@pytest.mark.parametrize("mode", [1, 2, 3, 4])  # kWsCoop128, kWsCoop256, kWsPingPong, kWsDefer128 (ws_layout.h)
def test_ws_ring_protocol(emulator, mode):
    """The warp-specialized kernel's producer/consumer barrier protocol (its slot, parity and turn formulas from
    ws_layout.h) in random interleavings against modelled mbarriers: every wait passes only on its own fill,
    no slot is refilled under MMAs still reading it, nothing deadlocks. (Without the ping-pong turn barrier
    this fails at 6 steps per tile.)"""
    stages = 3 if mode in (2, 4) else 4
    for steps in (1, 2, 3, 5, 6, 9):
        for tiles in (1, 4, 7):
            res = subprocess.run([str(emulator), "ring", str(mode), str(steps), str(tiles), str(stages), "25"],
                                 capture_output=True, text=True)
            assert res.returncode == 0, res.stderr


def _act_input(m, k, seed):
    g = gen(seed)
    x = torch.randn(m, k, generator=g) * torch.exp(torch.randn(m, 1, generator=g))
    x[1, k // 2] = 1e4  # outlier
    x[2] = 0.0  # all-zero row
    x[3, 5] = float("inf")  # non-finite row
    x[4, :8] = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, 3.5, 4.5, -2.5]) * 0.25  # ties
    x[4, 8] = 127 * 0.25
    return x


@pytest.mark.parametrize("path", ["actq", "actq_magic"])
@pytest.mark.parametrize("bits", [6, 8])
def test_emulated_act_quant_math(emulator, tmp_path, bits, path):
    """The kernels' per-row math gives the reference codes, scales and row sums exactly, NaN scale and zero codes
    on a non-finite row: row_qparams with act_code (the one-CTA-per-row kernel: float32 IEEE division, round half
    to even) and with act_code_magic (the register kernel: Markstein quotient, magic-domain rounding and clamp)."""
    m, k = 9, 77 if path == "actq" else 4099
    x = _act_input(m, k, bits)
    alpha = torch.randn(k, generator=gen(1))
    gate = torch.tensor([0.5, 1.5, 1.0])
    fid = (torch.arange(m) % 3).int()
    _write(tmp_path, x=x, alpha=alpha, gate=gate, fid=fid)
    res = subprocess.run([str(emulator), path, str(bits), str(m), str(k), "3", str(tmp_path)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    xq, scale, u, rowsum = reference.quantize_activation(x, bits, alpha, gate, fid, want_rowsum=True)
    assert torch.equal(_read(tmp_path, "xq", np.int8, (m, k)), xq)
    got_scale = _read(tmp_path, "scale", np.float32, (m,))
    assert torch.equal(torch.isnan(got_scale), torch.isnan(scale))
    assert torch.equal(got_scale[~torch.isnan(scale)], scale[~torch.isnan(scale)])
    assert torch.equal(_read(tmp_path, "rowsum", np.int32, (m,)), rowsum)
    got_u = _read(tmp_path, "u", np.float32, (m,))
    ok = ~torch.isnan(u)
    assert torch.equal(torch.isnan(got_u), ~ok)
    assert torch.allclose(got_u[ok].double(), u[ok].double(), rtol=2**-22, atol=0)


def test_ncu_stalls_reads_the_source_page(tmp_path, capsys):
    """benchmarks/ncu_stalls.py (gpu_check.sh ncu_src) on a synthetic source-page CSV: shares per opcode and the top
    instructions; a CSV without stall samples is refused with a message that says what to collect."""
    from benchmarks import ncu_stalls

    page = tmp_path / "sass.csv"
    page.write_text('"Address","Source","Warp Stall Sampling (All Samples)","stall_long_sb"\n'
                    '"0x0","@P0 BRA 0x120","10","0"\n"0x10","WARPGROUP.DEPBAR.LE gsb0, 0x1 ;","30","0"\n'
                    '"0x20","LDS R4, [R2+0x10] ;","60","50"\n')
    assert ncu_stalls.main([str(page), "--top", "2"]) == 0
    out = capsys.readouterr().out
    assert "60.0%  LDS" in out and "30.0%  WARPGROUP.DEPBAR.LE" in out and "[stall_long_sb=50]" in out
    assert "BRA 0x120" not in out.split("top 2 instructions:")[1]  # (10 samples: not in the top 2)
    page.write_text('"Address","Source"\n"0x0","NOP ;"\n')
    with pytest.raises(SystemExit, match="collect with --set full"):
        ncu_stalls.main([str(page)])


def test_ncu_stalls_regions_per_output(tmp_path, capsys):
    """--outputs: the executed code in stretches split by unexecuted gaps, named by what they run (IGMMA:
    mainloop, STG: epilogue, UTMALDG: producer), with warp instructions x 32 / outputs per region."""
    from benchmarks import ncu_stalls

    head = '"Address","Source","Warp Stall Sampling (All Samples)","Instructions Executed"\n'
    hot = ['"IGMMA.64x128x32.S8.S8 R24, R128, gdesc[UR4], R24 ;","30","10"', '"LOP3.LUT R1, R2, 0x7, RZ ;","10","30"']
    cold = ['"NOP ;","0","0"'] * 40  # (another instantiation: never ran)
    epi = ['"FMUL R3, R4, R5 ;","20","40"', '"STG.E.64 [R6], R8 ;","40","20"']
    lines = [f'"0x{i:x}",{r}' for i, r in enumerate(hot + cold + epi)]
    (tmp_path / "s.csv").write_text(head + "\n".join(lines) + "\n")
    assert ncu_stalls.main([str(tmp_path / "s.csv"), "--outputs", "8*40"]) == 0
    out = capsys.readouterr().out.split("regions")[1]
    assert "mainloop    4.00 per output,  40.0% of samples" in out  # (10 + 30) x 32 / 320
    assert "epilogue    6.00 per output,  60.0% of samples" in out and "FMUL 4.00" in out
    with pytest.raises(SystemExit):
        ncu_stalls.main([str(tmp_path / "s.csv"), "--outputs", "0"])


@pytest.mark.skipif(CXX is None, reason="no host C++ compiler")
def test_setup_detects_a_statically_linked_cxx_runtime(monkeypatch):
    """setup.py's probe: a linker that copies libstdc++ into shared objects (the H200 image's; its extension crashed on
    the first error message it formatted) is found, so the build links the shared libstdc++ instead; a normal one is
    left alone. The probe runs the compiler for real."""
    import runpy

    import setuptools

    monkeypatch.setattr(setuptools, "setup", lambda **kw: None)
    monkeypatch.setenv("QVDIT_BUILD_EXT", "0")
    ns = runpy.run_path(str(ROOT / "setup.py"))
    assert ns["_static_cxx_runtime"]([CXX], ["-shared"]) is False
    if ns["_probe_link"]([CXX], ["-shared", "-static-libstdc++"]) is None:
        pytest.skip("this toolchain has no PIC static libstdc++ to copy in (the case the probe exists for)")
    assert ns["_static_cxx_runtime"]([CXX], ["-shared", "-static-libstdc++"]) is True
    # the flags the build adds put the shared runtime back even where the driver would copy the static one in
    assert ns["_static_cxx_runtime"]([CXX], ["-shared", "-static-libstdc++", *ns["SHARED_CXX_RUNTIME"]]) is False
