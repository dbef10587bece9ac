"""CUDA-backend-only tests (csrc/, qvdit_kernels/cuda.py), GPU only: both GEMM kernels (wgmma sm90 and
mma.sync sm80) at real shapes against exact integer math, the two paths against each other, NaN-prefilled
outputs, odd strides and alignments, the ops under opcheck / torch.compile / CUDA graphs, and a small run
for compute-sanitizer (see docs/DEVELOPING.md "CUDA backend").

Skipped where the extension is not built or there is no GPU (CI: tests/test_cuda_build.py covers the
sources there). The shared assertions for every backend live in test_gemm.py and test_act_quant.py.
"""
import pytest
import torch

import qvdit_kernels as qk
from qvdit_kernels import reference as ref

from conftest import KERNEL_BACKENDS, assert_tail_within, assert_within_spec, capture_cuda_graph, gen, run_isolated
from test_gemm import make_problem

pytestmark = pytest.mark.skipif("cuda" not in KERNEL_BACKENDS, reason="needs a GPU and the built CUDA extension")
DEV = torch.device("cuda")
# sm90ws: the warp-specialized kernel (W3/W4; W8 takes sm90); sm90ws_pp: the same in ping-pong tile mode
# (QVDIT_WS_PINGPONG=1, which applies to its 128-row tiles); sm90ws_defer: 128-row tiles with the deferred
# epilogue (QVDIT_WS_DEFER=1)
PATHS = ["sm80", "sm90", "sm90ws", "sm90ws_pp", "sm90ws_defer"]


def set_path(monkeypatch, name):
    """Select one GEMM kernel through the environment (read per call)."""
    monkeypatch.setenv("QVDIT_CUDA_GEMM_PATH", "sm90ws" if name.startswith("sm90ws") else name)
    monkeypatch.setenv("QVDIT_WS_PINGPONG", "1" if name == "sm90ws_pp" else "0")
    monkeypatch.setenv("QVDIT_WS_DEFER", "1" if name == "sm90ws_defer" else "0")


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    """Run a test on one GEMM kernel (QVDIT_CUDA_GEMM_PATH); sm90 only where the GPU and build have it."""
    from qvdit_kernels import _C

    if request.param.startswith("sm90") and not _C.sm90_available():
        pytest.skip("wgmma path needs an sm_90 GPU and an sm_90a build")
    set_path(monkeypatch, request.param)
    return request.param


def problem(m, k, n, w_bits, a_bits, seed):
    """test_gemm.make_problem's data (bias and TQE on) on the GPU, with the weight codes."""
    args, qw = make_problem(m, k, n, w_bits, a_bits, seed)
    return {key: (v.to(DEV) if isinstance(v, torch.Tensor) else v) for key, v in args.items()}, qw.to(DEV)


def exact_acc(xq, qw, zw):
    """xq @ (qw - zw)^T in float64 on the GPU: exact, every partial sum is an integer below 2^53."""
    return xq.double() @ (qw.double() - zw.double()[:, None]).T


REAL_KN = [(1152, 3456), (4608, 1152), (1536, 8960), (8960, 1536), (5120, 13824), (13824, 5120)]


def available_paths():
    from qvdit_kernels import _C

    return PATHS if _C.sm90_available() else ["sm80"]


def gpu_problem(m, k, n, w_bits, a_bits, seed):
    """Like problem() but generated and packed on the GPU (real shapes are too big for the CPU)."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    lim = 127 if a_bits == 8 else 63
    xq = torch.randint(-lim, lim + 1, (m, k), generator=g, device=DEV, dtype=torch.int8)
    lo, hi = (0, 2**w_bits) if w_bits < 8 else (-127, 128)
    qw = torch.randint(lo, hi, (n, k), generator=g, device=DEV).to(torch.uint8 if w_bits < 8 else torch.int8)
    zw = torch.randint(0, 2**w_bits, (n,), generator=g, device=DEV).float() if w_bits < 8 else torch.zeros(n, device=DEV)
    a = dict(xq=xq, x_scale=torch.rand(m, generator=g, device=DEV) * 1e-2 + 1e-4, w_packed=qk.pack_weight(qw, w_bits),
             w_bits=w_bits, w_scale=torch.rand(n, generator=g, device=DEV) * 1e-2 + 1e-4, w_zero=zw,
             bias=torch.randn(n, generator=g, device=DEV), u=torch.randn(m, generator=g, device=DEV),
             beta=torch.randn(n, generator=g, device=DEV))
    return a, qw


@pytest.mark.parametrize("w_bits,a_bits", [(3, 6), (4, 8), (3, 8), (4, 6), (8, 8)])
def test_real_shapes_bit_exact(w_bits, a_bits, monkeypatch):
    """Real (K, N) at M = 1000 (7.8 row tiles), both kernels: exact int32 acc, bf16 within SPEC, repeat
    calls identical, the two kernels' bf16 outputs identical."""
    m = 1000
    for k, n in REAL_KN:
        a, qw = gpu_problem(m, k, n, w_bits, a_bits, seed=k + n)
        want = exact_acc(a["xq"], qw, a["w_zero"])
        yref = ref.epilogue(want.to(torch.int32), a["x_scale"], a["w_scale"], a["bias"], a["u"], a["beta"],
                            torch.float32).to(torch.bfloat16).double()
        ys = []
        for p in available_paths():
            set_path(monkeypatch, p)
            acc = qk.qgemm(**a, out_dtype=torch.int32, backend="cuda")
            assert torch.equal(acc.double(), want), (p, k, n)
            y = qk.qgemm(**a, out_dtype=torch.bfloat16, backend="cuda")
            assert_within_spec(y, yref)
            assert torch.equal(y, qk.qgemm(**a, out_dtype=torch.bfloat16, backend="cuda"))
            ys.append(y)
        assert all(torch.equal(ys[0], y) for y in ys[1:])


@pytest.mark.parametrize("w_bits", [3, 4, 8])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.int32])
def test_nan_prefilled_outputs(path, w_bits, out_dtype):
    """The output (> 1 MB, so from the allocator's large pool) lands in memory just filled with 0xFF bytes
    (NaN as float, -1 as int32): every element must be written."""
    m, k, n = 1500, 1152, 387
    a, qw = problem(m, k, n, w_bits, 8, seed=3)
    a["x_scale"] = a["x_scale"].clamp(max=1e-2)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()  # the 0xFF block below is then the only cached large block
    junk = torch.full((64 << 20,), 0xFF, dtype=torch.uint8, device=DEV)
    del junk
    out = qk.qgemm(**a, out_dtype=out_dtype, backend="cuda")
    want = exact_acc(a["xq"], qw, a["w_zero"])
    if out_dtype == torch.int32:
        assert torch.equal(out.double(), want)
    else:
        yref = ref.epilogue(want.to(torch.int32), a["x_scale"], a["w_scale"], a["bias"], a["u"], a["beta"],
                            torch.float32)
        assert_within_spec(out, yref.to(out_dtype).double() if out_dtype != torch.float32 else yref)


def test_path_selection(monkeypatch):
    """On an sm_90 GPU the build has the wgmma kernels and "auto" uses them; a bad path name is an error."""
    from qvdit_kernels import _C

    assert _C.sm90_available() == (torch.cuda.get_device_capability() == (9, 0))
    monkeypatch.setenv("QVDIT_CUDA_GEMM_PATH", "cutlass")
    a, _ = problem(4, 128, 8, 4, 8, seed=0)
    with pytest.raises(ValueError, match="QVDIT_CUDA_GEMM_PATH"):
        qk.qgemm(**a, backend="cuda")


@pytest.mark.parametrize("w_bits", [3, 4, 8])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_paths_agree_bitwise(w_bits, out_dtype, monkeypatch):
    """The kernels share the epilogue: identical outputs, not just within bounds."""
    if len(available_paths()) < 2:
        pytest.skip("needs the wgmma path")
    a, _ = problem(517, 1408, 391, w_bits, 6, seed=4)
    a["x_scale"] = a["x_scale"].clamp(max=1e-2)
    outs = []
    for p in PATHS:
        set_path(monkeypatch, p)
        outs.append(qk.qgemm(**a, out_dtype=out_dtype, backend="cuda"))
    assert all(torch.equal(outs[0], o) for o in outs[1:])


@pytest.mark.parametrize("w_bits", [3, 4, 8])
def test_odd_strides_and_alignment(path, w_bits):
    """Activation and weights as misaligned views (K not a multiple of 16, storage offset 1): same result."""
    m, k, n = 70, 200, 90
    a, qw = problem(m, k, n, w_bits, 8, seed=5)
    big = torch.zeros(m * k + 1, dtype=torch.int8, device=DEV)
    big[1:].copy_(a["xq"].reshape(-1))
    wbig = torch.zeros(a["w_packed"].numel() + 1, dtype=a["w_packed"].dtype, device=DEV)
    wbig[1:].copy_(a["w_packed"].reshape(-1))
    views = dict(a, xq=big[1:].view(m, k), w_packed=wbig[1:].view(a["w_packed"].shape))
    acc = qk.qgemm(**views, out_dtype=torch.int32, backend="cuda")
    assert torch.equal(acc.double(), exact_acc(a["xq"], qw, a["w_zero"]))


@pytest.mark.parametrize("k", [1, 77, 1152, 2048, 3072, 4096, 5120, 8192, 8960, 13824, 20480, 65536])
@pytest.mark.parametrize("bits", [6, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_act_quant_real_k_bit_exact(k, bits, dtype):
    """Codes, scales and row sums equal the reference bit for bit, u within reference.u_within_bound, on every
    path: rows held in registers by 1, 2, 4 or 8 warps of 6 chunks (bf16 K = 1152, 3072, 5120, 8960) or 8 (K = 2048,
    4096, 8192, 13824) or 8 warps of 16 (K = 20480), the one-CTA-per-row
    kernel (K = 65536; a strided view of odd row length takes its scalar loads), non-finite rows included."""
    m = 300 if k <= 20000 else 40
    x = (torch.randn(m, k, device=DEV) * torch.exp(torch.randn(m, 1, device=DEV))).to(dtype)
    if k > 11:
        x[3, 11] = 3e3
        x[7, k // 2] = float("inf")  # spoils row 7 only (in the last warp of a multi-warp row too)
        x[9, k - 2] = float("nan")
    x[5] = 0
    alpha = torch.randn(k, device=DEV) / k**0.5
    gate, fid = torch.tensor([0.5, 1.5, 1.0], device=DEV), (torch.arange(m, device=DEV) % 3).int()
    for xin in (x, x[:, : max(k - 1, 1)]):
        kk = xin.shape[1]
        got = qk.quantize_activation_rowsum(xin, bits, alpha=alpha[:kk], gate=gate, frame_id=fid, backend="cuda")
        want = ref.quantize_activation(xin, bits, alpha[:kk], gate, fid, want_rowsum=True)
        assert torch.equal(got[0], want[0]), "codes"
        assert torch.equal(got[1].isnan(), want[1].isnan()) and torch.equal(got[1].nan_to_num(), want[1].nan_to_num())
        assert torch.equal(got[3], want[3]), "row sums"
        assert ref.u_within_bound(got[2], got[0], got[1], alpha[:kk], gate, fid)


@pytest.mark.parametrize("k", [77, 1152, 5120, 13824, 65536])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_act_quant_gelu_prologue_equals_the_tail_pass(k, dtype):
    """activation="gelu_tanh" quantizes exactly the values the CUDA tail pass writes for GELU (both gelu_rounded):
    codes, scales and row sums equal act-quant of cuda_epilogue_tail(x) bit for bit (u within its bound), on the register kernels
    (1-8 warps per row) and the one-CTA-per-row kernel (K = 65536; odd K through a strided view)."""
    m = 300 if k <= 20000 else 40
    x = ((torch.randn(m, k, device=DEV) * 3) * torch.exp(torch.randn(m, 1, device=DEV))).to(dtype)
    x[2, :3] = torch.tensor([-30.0, 0.0, float("inf")])  # exp overflow (gelu -0), zero, a spoiled row
    alpha = torch.randn(k, device=DEV) / k**0.5
    for xin in (x, x[:, : k - 1]):
        kk = xin.shape[1]
        h = torch.ops.qvdit.cuda_epilogue_tail(xin.contiguous(), 1, None, None)
        got = qk.quantize_activation_rowsum(xin, 6, alpha=alpha[:kk], backend="cuda", activation="gelu_tanh")
        want = qk.quantize_activation_rowsum(h, 6, alpha=alpha[:kk], backend="cuda")
        assert torch.equal(got[0], want[0]) and torch.equal(got[3], want[3])
        assert torch.equal(got[1].nan_to_num(), want[1].nan_to_num()) and torch.equal(got[1].isnan(), want[1].isnan())
        assert ref.u_within_bound(got[2], got[0], got[1], alpha[:kk])  # (h is contiguous: maybe another kernel's dot)


def test_tail_as_own_pass(monkeypatch):
    """backend="cuda" runs a GEMM's tail as a pass after the kernel unless QVDIT_CUDA_FUSED_TAIL=1."""
    assert qk.ops.tail_as_own_pass("cuda", DEV, 3, 1536)
    monkeypatch.setenv("QVDIT_CUDA_FUSED_TAIL", "1")
    assert not qk.ops.tail_as_own_pass("cuda", DEV, 3, 1536)


def test_bad_frame_id_gives_nan_u_not_a_crash():
    x = torch.randn(4, 64, device=DEV)
    fid = torch.tensor([0, 1, 5, -1], dtype=torch.int32, device=DEV)
    _, _, u = qk.quantize_activation(x, 8, alpha=torch.randn(64, device=DEV), gate=torch.ones(2, device=DEV),
                                     frame_id=fid, backend="cuda")
    assert torch.isfinite(u[:2]).all() and torch.isnan(u[2:]).all()


def test_opcheck_ops():
    a, _ = problem(5, 130, 12, 3, 6, seed=7)
    args = (a["xq"], a["x_scale"], a["w_packed"], 3, a["w_scale"], a["w_zero"], a["bias"], a["u"], a["beta"], None,
            torch.bfloat16, 0)
    torch.library.opcheck(torch.ops.qvdit.cuda_qgemm.default, args)
    x = torch.randn(5, 130, generator=gen(2)).to(DEV)
    alpha, gate, fid = torch.randn(130).to(DEV), torch.ones(2).to(DEV), torch.zeros(5, dtype=torch.int32).to(DEV)
    torch.library.opcheck(torch.ops.qvdit.cuda_act_quant.default, (x, 6, alpha, gate, fid, True))
    torch.library.opcheck(torch.ops.qvdit.cuda_act_quant.default, (x, 8, None, None, None, False))
    torch.library.opcheck(torch.ops.qvdit.cuda_act_quant.default, (x, 6, alpha, gate, fid, True, 1))  # GELU of x
    x128 = torch.randn(5, 128, generator=gen(3)).to(DEV)  # (in place: 16-byte rows)
    torch.library.opcheck(torch.ops.qvdit.cuda_act_quant_inplace.default, (x128, 6, alpha[:128], gate, fid, 1))
    y, res = torch.randn(6, 16, device=DEV).bfloat16(), torch.randn(6, 16, device=DEV).bfloat16()
    torch.library.opcheck(torch.ops.qvdit.cuda_epilogue_tail.default, (y, 1, res, torch.rand(2, 16, device=DEV)))
    b, _ = problem(8, 128, 48, 3, 6, seed=9)  # (x's bf16 rows of 256 bytes hold 128 code bytes and 48 outputs)
    xb, rb = torch.randn(5, 128, generator=gen(5)).to(DEV, torch.bfloat16), torch.randn(5, 48, device=DEV).bfloat16()
    torch.library.opcheck(torch.ops.qvdit.cuda_qlinear_over.default,
                          (xb, 6, alpha[:128], gate, fid, 1, b["w_packed"], 3, b["w_scale"], b["w_zero"], b["bias"],
                           b["beta"], 0, 0, rb, torch.rand(1, 48, device=DEV)))


def test_torch_compile_fullgraph_qlinear():
    a, _ = problem(5, 130, 12, 4, 8, seed=8)
    x = torch.randn(2, 5, 130, generator=gen(3)).to(DEV)
    alpha = torch.randn(130, generator=gen(4)).to(DEV)

    def f(x):
        return qk.qlinear(x, a["w_packed"], 4, a["w_scale"], a["w_zero"], 8, bias=a["bias"], alpha=alpha,
                          beta=a["beta"], backend="cuda")

    torch._dynamo.reset()
    assert torch.equal(torch.compile(f, fullgraph=True)(x), f(x))


def test_cuda_graph_replay_equals_eager():
    a, _ = problem(300, 1152, 256, 3, 6, seed=9)
    x = torch.randn(300, 1152, generator=gen(5)).to(DEV)
    alpha, gate = torch.randn(1152).to(DEV), torch.tensor([0.5, 1.5], device=DEV)
    fid = (torch.arange(300, device=DEV) % 2).int()

    def f():
        return qk.qlinear(x, a["w_packed"], 3, a["w_scale"], a["w_zero"], 6, bias=a["bias"], alpha=alpha,
                          beta=a["beta"], gate=gate, frame_id=fid, out_dtype=torch.bfloat16, backend="cuda")

    eager = f()
    graph, out = capture_cuda_graph(f)
    x.normal_()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, f()) and not torch.equal(out, eager)


@pytest.mark.parametrize("defer", ["0", "1"])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("tail", ["gelu", "residual", "gated", "gelu+per_token_gate"])
def test_ws_epilogue_tail(monkeypatch, defer, out_dtype, tail):
    """The warp-specialized kernel's fused tail (GELU, residual + gate * y) on the 8/16-byte stores (N a multiple
    of 4; test_gemm.py's shared tail test has N odd): equal to reference.epilogue_tail on the same kernel's plain
    output within test_gemm's bound, a residual with a row stride != N; both tail modes (128-row cooperative, and
    deferred: QVDIT_WS_DEFER=1). M = 300: the last tile's tokens past M take the checked path, the others the
    unchecked one."""
    from qvdit_kernels import _C

    if not _C.sm90_available():
        pytest.skip("the warp-specialized kernel needs an sm_90 GPU and an sm_90a build")
    monkeypatch.setenv("QVDIT_CUDA_GEMM_PATH", "sm90ws")
    monkeypatch.setenv("QVDIT_WS_DEFER", defer)
    monkeypatch.setenv("QVDIT_CUDA_FUSED_TAIL", "1")  # opt-in (cuda.fused_tail_enabled)
    m, k, n = 300, 2304, 640
    a, _ = gpu_problem(m, k, n, 3, 6, seed=31)
    a["x_scale"] = a["x_scale"].clamp(max=1e-3)
    g = torch.Generator(device=DEV).manual_seed(32)
    gelu = tail.startswith("gelu")
    residual = None
    if tail != "gelu":
        residual = (torch.randn(m, n + 8, generator=g, device=DEV) * 4).to(out_dtype)[:, :n]  # row stride n + 8
    gate = {"gated": torch.rand(1, n, generator=g, device=DEV) * 2 - 0.5,
            "gelu+per_token_gate": torch.randn(m, n, generator=g, device=DEV)}.get(tail)
    act = "gelu_tanh" if gelu else None
    plain = qk.qgemm(**a, out_dtype=out_dtype, backend="cuda")
    got = qk.qgemm(**a, out_dtype=out_dtype, backend="cuda", activation=act, residual=residual, residual_gate=gate)
    assert_tail_within(got, plain, act, residual, gate, tail)


@pytest.mark.parametrize("n", [640, 77])  # 16-byte pieces; one value per thread (N odd)
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("tail", ["gelu", "residual", "gated", "gelu+per_token_gate"])
def test_epilogue_tail_after_the_gemm(n, out_dtype, tail):
    """cuda_epilogue_tail, the one-pass tail after a GEMM that did not fuse it: within test_gemm's bound of
    reference.epilogue_tail, with a residual of row stride != N, a gate per frame and per token; y with a row
    stride too (it is made unit-stride, not misread)."""
    m = 300
    g = torch.Generator(device=DEV).manual_seed(41)
    y = (torch.randn(m, n + 3, generator=g, device=DEV) * 3).to(out_dtype)[:, :n]
    residual = None
    if tail != "gelu":
        residual = (torch.randn(m, n + 8, generator=g, device=DEV) * 4).to(out_dtype)[:, :n]
    gate = {"gated": torch.rand(3, n, generator=g, device=DEV) * 2 - 0.5,
            "gelu+per_token_gate": torch.randn(m, n, generator=g, device=DEV)}.get(tail)
    act = "gelu_tanh" if tail.startswith("gelu") else None
    got = torch.ops.qvdit.cuda_epilogue_tail(y, 1 if act else 0, residual, gate)
    assert got.dtype == out_dtype and got.shape == (m, n)
    assert_tail_within(got, y, act, residual, gate, f"{tail} {out_dtype} n={n}")


def test_tail_after_the_kernel_needs_no_second_output_buffer():
    """Without fusion the tail pass runs in place over qgemm's own output: a call with GELU + gated residual peaks
    no higher than the plain call (a second [M, N] buffer would add 8 MiB here; run 7 found 0.84 GiB per fc1)."""
    m = n = 2048
    a, _ = gpu_problem(m, 256, n, 3, 6, seed=5)
    res, gate = torch.randn(m, n, device=DEV).bfloat16(), torch.rand(1, n, device=DEV)

    def peak(**kw):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        qk.qgemm(**a, out_dtype=torch.bfloat16, backend="cuda", **kw)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    plain = peak()
    assert peak(activation="gelu_tanh", residual=res, residual_gate=gate) <= plain + 64 * 1024


def test_sanitizer_smoke(path, monkeypatch):
    """Small shapes through every kernel (W3 tail tile, ragged M/N/K, every output dtype, the epilogue tail with a
    residual and gate): the run that compute-sanitizer memcheck / racecheck / synccheck watch
    (docs/DEVELOPING.md). Also checked here for exactness."""
    monkeypatch.setenv("QVDIT_CUDA_FUSED_TAIL", "1")  # the ws kernel's fused tail too (residual/gate loads, prefetch)
    for w_bits, (m, k, n) in [(3, (37, 384, 75)), (4, (130, 200, 129)), (8, (9, 77, 140)), (3, (1, 1, 1))]:
        a, qw = problem(m, k, n, w_bits, 8, seed=m + n)
        want = exact_acc(a["xq"], qw, a["w_zero"])
        assert torch.equal(qk.qgemm(**a, out_dtype=torch.int32, backend="cuda").double(), want)
        for dt in (torch.bfloat16, torch.float16, torch.float32):
            a_dt = dict(a, x_scale=a["x_scale"].clamp(max=1e-2))
            plain = qk.qgemm(**a_dt, out_dtype=dt, backend="cuda")
            res, gate = torch.randn(m, n, device=DEV).to(dt), torch.rand(1, n, device=DEV)
            got = qk.qgemm(**a_dt, out_dtype=dt, backend="cuda", activation="gelu_tanh", residual=res,
                           residual_gate=gate)
            assert_tail_within(got, plain, "gelu_tanh", res, gate, f"{path} W{w_bits} {dt}")
        x = torch.randn(m, k, device=DEV)
        qk.quantize_activation_rowsum(x, 6, alpha=torch.randn(k, device=DEV), backend="cuda")
        qk.quantize_activation_rowsum(x.bfloat16(), 6, backend="cuda", activation="gelu_tanh")  # the GELU prologue
    if path.startswith("sm90ws"):  # several tiles per CTA (persistent loop; ping-pong: the turn barriers, both ways)
        for w_bits in (3, 4):
            a, qw = problem(4100, 520, 1280, w_bits, 6, seed=w_bits)
            want = exact_acc(a["xq"], qw, a["w_zero"])
            assert torch.equal(qk.qgemm(**a, out_dtype=torch.int32, backend="cuda").double(), want)
    for dt, n in ((torch.bfloat16, 64), (torch.float16, 77)):  # the one-pass tail after a GEMM (16-byte, scalar)
        y, res = torch.randn(9, n, device=DEV).to(dt), torch.randn(9, n, device=DEV).to(dt)
        torch.ops.qvdit.cuda_epilogue_tail(y, 1, res, torch.rand(3, n, device=DEV))
    for dt, k in ((torch.bfloat16, 5120), (torch.float32, 5120)):  # act-quant rows of 2 and 4 warps (shared memory)
        for act in (None, "gelu_tanh"):
            qk.quantize_activation_rowsum(torch.randn(5, k, device=DEV).to(dt), 6, alpha=torch.randn(k, device=DEV),
                                          backend="cuda", activation=act)
    torch.cuda.synchronize()


@pytest.mark.parametrize("dt,k,act", [(torch.float16, 1536, 0), (torch.bfloat16, 4096, 1), (torch.bfloat16, 5120, 0),
                                      (torch.float32, 5120, 0), (torch.bfloat16, 8960, 1), (torch.bfloat16, 13824, 1),
                                      (torch.bfloat16, 32768, 0)])
def test_act_quant_inplace_equals_the_copy(dt, k, act):
    """cuda_act_quant_inplace writes cuda_act_quant's codes over x's own rows (row m's codes: the first K bytes of
    row m) and returns the same scale, u and row sums; rows of every register-kernel width (1-8 warps), with a
    padded row stride too."""
    for cols in (k, k + 64):  # (a view with a longer row stride)
        base = (torch.randn(37, cols, device=DEV) * 3).to(dt)
        x = base[:, :k]
        alpha = torch.randn(k, device=DEV)
        want = torch.ops.qvdit.cuda_act_quant(x, 6, alpha, None, None, True, act)
        y = base.clone()[:, :k]
        got = torch.ops.qvdit.cuda_act_quant_inplace(y, 6, alpha, None, None, act)
        assert torch.equal(y.view(torch.int8)[:, :k], want[0])
        for g, w in zip(got, want[1:]):
            assert torch.equal(g, w)


@pytest.mark.parametrize("call,match", [
    ("torch.ops.qvdit.cuda_act_quant(torch.randn(4, 64, device='cuda'), 5, None, None, None, True, 0)",
     "bits must be 6 or 8"),
    ("torch.ops.qvdit.cuda_act_quant_inplace(torch.randn(4, 64, device='cuda'), 5, None, None, None, 0)",
     "bits must be 6 or 8"),
    ("torch.ops.qvdit.cuda_act_quant_inplace(torch.randn(64, device='cuda').expand(4, 64), 6, None, None, None, 0)",
     "rows that do not overlap"),
])
def test_binding_errors_reach_python(call, match):
    """A failed check in the binding is a RuntimeError that names the argument. (On the H200 every one crashed the
    process while formatting its message, from a static libstdc++ inside the extension: BENCHMARKS run ws11.)"""
    res = run_isolated(f"try:\n    {call}\nexcept RuntimeError as e:\n    print('RuntimeError:', e)\n")
    assert res.returncode == 0 and "RuntimeError:" in res.stdout and match in res.stdout, \
        (res.returncode, res.stdout[-2000:], res.stderr[-3000:])


def test_act_quant_inplace_refuses_rows_it_cannot_hold():
    """Rows past the register kernel (64 KB) or not in whole 16-byte chunks: an error that says why, x untouched
    (in its own process, as test_binding_errors_reach_python)."""
    res = run_isolated("""
for shape in ((4, 40000), (4, 1001)):
    x = torch.randn(*shape, device='cuda').bfloat16()
    y = x.clone()
    try:
        torch.ops.qvdit.cuda_act_quant_inplace(y, 6, None, None, None, 0)
    except RuntimeError as e:
        print('refused' if 'cuda_act_quant_inplace: x must have 16-byte aligned rows' in str(e) else e)
    print('untouched' if torch.equal(x, y) else 'CHANGED')
""")
    assert res.returncode == 0 and res.stdout.split() == ["refused", "untouched"] * 2, (res.stdout, res.stderr[-3000:])


def test_inplace_ok_takes_only_rows_that_save_the_buffer():
    """qlinear(overwrite_input=True) goes in place only where the op can hold the row and the GEMM reads the codes
    where they are (K a multiple of 16: else the GEMM's padded copy would be made anyway)."""
    from qvdit_kernels.cuda import inplace_ok

    x = torch.empty(4, 4096, device=DEV, dtype=torch.bfloat16)
    assert inplace_ok(x) and inplace_ok(x[:, :1024]) and inplace_ok(x.float()[:, :2048])
    assert not inplace_ok(x[:, :24])  # K = 24: padded by the GEMM
    assert not inplace_ok(x[:, 4:1028])  # a base 8 bytes into the row: not 16-byte aligned
    assert not inplace_ok(torch.empty(4, 40000, device=DEV, dtype=torch.bfloat16))  # past the register kernel
    assert not inplace_ok(torch.empty(1024, 4, device=DEV, dtype=torch.bfloat16).t())  # column stride != 1


@pytest.mark.parametrize("w_bits", [3, 4])
def test_qlinear_overwrite_input_same_output_without_a_code_buffer(path, w_bits):
    """qlinear(overwrite_input=True) gives the output of the copying call bit for bit (the GEMM reads the codes from
    inside x's rows: a row stride of 2K bytes) and allocates no [M, K] code buffer: its peak is lower by about the
    codes' M x K bytes."""
    m, k, n = 2048, 8960, 640
    g = torch.Generator().manual_seed(w_bits)
    x = (torch.randn(m, k, generator=g) * 2).to(DEV, torch.bfloat16)
    a, qw = problem(8, k, n, w_bits, 6, seed=w_bits)
    kw = dict(w_packed=a["w_packed"], w_bits=w_bits, w_scale=a["w_scale"], w_zero=a["w_zero"], a_bits=6,
              bias=a["bias"], alpha=torch.randn(k, device=DEV), beta=a["beta"], backend="cuda",
              input_activation="gelu_tanh")
    want = qk.qlinear(x, **kw)
    peaks = []
    for overwrite in (False, True):
        x2 = x.clone()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        got = qk.qlinear(x2, overwrite_input=overwrite, **kw)
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - start)
        assert torch.equal(got, want)
        assert torch.equal(x2, x) != overwrite  # overwritten only when allowed
    assert peaks[1] <= peaks[0] - 0.9 * m * k, peaks


@pytest.mark.parametrize("w_bits", [3, 4])
@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float32])
def test_qlinear_over_writes_the_output_over_the_residual(path, w_bits, dt):
    """qlinear(overwrite_input=True, overwrite_residual=True) with a residual tail (cuda_qlinear_over: the GEMM's
    output in the bytes of x's rows the codes leave free, the tail over the residual) gives the copying call's result
    bit for bit, in the residual's own memory, and allocates neither the [M, K] codes nor the [M, N] output: its peak
    is below overwrite_input's alone by about the output's bytes. Where x's rows have no room for the output (N > K
    (el - 1) / el) it falls back to overwrite_input's call and leaves the residual as it was."""
    from qvdit_kernels.cuda import over_ok

    g = torch.Generator().manual_seed(w_bits)
    # (512, 8960, 1536): Wan2.1-1.3B fc2's N and K, the warp-specialized kernel's 256-row mode
    for m, k, n in ((2048, 8960, 640), (512, 8960, 1536), (300, 256, 224)):
        x = (torch.randn(m, k, generator=g) * 2).to(DEV, dt)
        res = torch.randn(m, n, generator=g).to(DEV, dt)
        gate = torch.rand(2, n, generator=g).to(DEV)  # (per half of the rows, as a batch of two)
        a, _ = problem(8, k, n, w_bits, 6, seed=w_bits)
        kw = dict(w_packed=a["w_packed"], w_bits=w_bits, w_scale=a["w_scale"], w_zero=a["w_zero"], a_bits=6,
                  bias=a["bias"], alpha=torch.randn(k, device=DEV), beta=a["beta"], backend="cuda",
                  input_activation="gelu_tanh", residual_gate=gate)
        room = over_ok(x, n, dt, res)
        assert room == ((x.element_size() - 1) * k >= n * x.element_size())
        want = qk.qlinear(x, residual=res, **kw)
        assert_tail_within(want, qk.qlinear(x, **{**kw, "residual_gate": None}), None, res, gate)
        peaks = {}
        for mode in ("input", "both"):
            x2, r2 = x.clone(), res.clone()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start = torch.cuda.memory_allocated()
            got = qk.qlinear(x2, residual=r2, overwrite_input=True, overwrite_residual=mode == "both", **kw)
            torch.cuda.synchronize()
            peaks[mode] = torch.cuda.max_memory_allocated() - start
            assert torch.equal(got, want)
            over = mode == "both" and room
            assert (got.data_ptr() == r2.data_ptr()) == over and torch.equal(r2, res) != over
        if room:
            assert peaks["both"] <= peaks["input"] - 0.9 * m * n * x.element_size(), peaks


@pytest.mark.parametrize("n,gate_rows,match", [
    (224, 1, "cuda_qlinear_over: x must be contiguous"),  # rows without room for the codes and 224 outputs
    (96, 3, "residual_gate must be float32"),  # room, but a gate of 3 rows for 4 tokens
])
def test_qlinear_over_refuses_before_writing(n, gate_rows, match):
    """cuda_qlinear_over called directly with arguments it cannot take: an error that says why, raised before the
    codes overwrite x (every check runs before the act-quant)."""
    a, _ = problem(8, 256, n, 3, 6, seed=3)
    x, r = torch.randn(4, 256, device=DEV, dtype=torch.bfloat16), torch.randn(4, n, device=DEV).bfloat16()
    x0, r0 = x.clone(), r.clone()
    with pytest.raises(RuntimeError, match=match):
        torch.ops.qvdit.cuda_qlinear_over(x, 6, None, None, None, 0, a["w_packed"], 3, a["w_scale"], a["w_zero"],
                                          None, None, 0, 0, r, torch.rand(gate_rows, n, device=DEV))
    assert torch.equal(x, x0) and torch.equal(r, r0)
