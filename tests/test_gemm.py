"""`qgemm` / `qlinear` (W3/W4/W8 x int8 activations) on every backend that runs here: bit-exact int32
accumulators against int64 math, SPEC 1.4 epilogue bounds, a one-hot probe, fuzzing and bad input.
Kernels: qvdit_kernels/triton/gemm.py (triton). Benchmark: benchmarks/bench_linear.py."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qvdit_kernels as qk

from conftest import (KERNEL_BACKENDS, assert_tail_within, assert_within_spec, device_for, gen, random_act_codes,
                      random_codes, random_weight_qparams)

SHAPES = [(1, 1, 1), (1, 200, 75), (37, 200, 75), (37, 129, 130), (64, 256, 64), (33, 1152, 40), (16, 384, 17)]


def make_problem(m, k, n, w_bits, a_bits, seed, tqe=True, bias=True):
    g = gen(seed)
    qw = random_codes(n, k, w_bits, g)
    sw, zw = random_weight_qparams(n, w_bits, g)
    xq = random_act_codes(m, k, a_bits, g)
    sx = torch.exp(torch.empty(m).uniform_(-7, 2.3, generator=g))
    return dict(
        xq=xq, x_scale=sx, w_packed=qk.pack_weight(qw, w_bits), w_bits=w_bits, w_scale=sw, w_zero=zw,
        bias=torch.randn(n, generator=g) if bias else None,
        u=torch.randn(m, generator=g) if tqe else None, beta=torch.randn(n, generator=g) if tqe else None,
    ), qw


def run_qgemm(backend, args, out_dtype, **kw):
    dev = device_for(backend)
    a = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    return qk.qgemm(**a, out_dtype=out_dtype, backend=backend, **kw).cpu()


def int64_acc(xq, qw, zw):
    return xq.long() @ (qw.long() - zw.long()[:, None]).T


def float64_epilogue(acc, a):
    y = acc.double() * a["x_scale"].double()[:, None] * a["w_scale"].double()[None, :]
    if a["bias"] is not None:
        y = y + a["bias"].double()
    if a["u"] is not None:
        y = y + a["u"].double()[:, None] * a["beta"].double()[None, :]
    return y


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("w_bits", [3, 4, 8])
def test_acc_beyond_2_24_exact(backend, w_bits):
    """Extreme codes at K = 32768: |acc| > 2^24, where a float accumulator would round (at K = 13824 the W3
    maximum 127 * 7 * 9216 stays below 2^24). Fast backends only on a GPU (too slow for the interpreter)."""
    dev = device_for(backend)
    if backend != "torch" and dev.type != "cuda":
        pytest.skip("K = 32768 needs a GPU for the fast kernels")
    m, n, k = 64 if dev.type == "cpu" else 256, 64 if dev.type == "cpu" else 256, 32768
    xq = torch.full((m, k), 127, dtype=torch.int8)
    xq[1::2] = -127
    top = 2**w_bits - 1 if w_bits < 8 else 127
    qw = torch.full((n, k), top, dtype=torch.uint8 if w_bits < 8 else torch.int8)
    qw[:, ::3] = 0 if w_bits < 8 else -127
    args = dict(xq=xq, x_scale=torch.ones(m), w_packed=qk.pack_weight(qw, w_bits), w_bits=w_bits,
                w_scale=torch.ones(n), w_zero=torch.zeros(n))
    want = int64_acc(xq, qw, args["w_zero"])
    assert want.abs().max() > 2**24
    assert torch.equal(run_qgemm(backend, args, torch.int32).long(), want)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("w_bits,a_bits", [(3, 6), (4, 8), (3, 8), (4, 6), (8, 8)])
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_int32_acc_bit_exact(backend, w_bits, a_bits, m, k, n):
    args, qw = make_problem(m, k, n, w_bits, a_bits, seed=m + k + n)
    acc = run_qgemm(backend, args, torch.int32)
    assert acc.dtype == torch.int32 and acc.shape == (m, n)
    assert torch.equal(acc.long(), int64_acc(args["xq"], qw, args["w_zero"]))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("w_bits,a_bits", [(3, 6), (4, 8), (8, 8)])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("m,k,n", [(37, 200, 75), (33, 1152, 40)])
def test_epilogue_within_spec(backend, w_bits, a_bits, out_dtype, m, k, n):
    args, qw = make_problem(m, k, n, w_bits, a_bits, seed=5)
    if out_dtype == torch.float16:  # keep |y| inside the fp16 range
        args["x_scale"] = args["x_scale"].clamp(max=1e-2)
    y = run_qgemm(backend, args, out_dtype)
    assert y.dtype == out_dtype
    ref = float64_epilogue(int64_acc(args["xq"], qw, args["w_zero"]), args)
    assert_within_spec(y, ref.to(out_dtype).double() if out_dtype != torch.float32 else ref)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("w_bits", [3, 4, 8])
@pytest.mark.parametrize("k", [128, 200, 384])
def test_one_hot_probe_returns_dequantized_weight(backend, w_bits, k):
    """xq = eye(K), unit token scales, no bias/TQE: y[k, n] = sw[n] * (qw[n, k] - zw[n]) exactly."""
    n = 48
    g = gen(k)
    qw = random_codes(n, k, w_bits, g)
    sw, zw = random_weight_qparams(n, w_bits, g)
    args = dict(xq=torch.eye(k, dtype=torch.int8), x_scale=torch.ones(k), w_packed=qk.pack_weight(qw, w_bits),
                w_bits=w_bits, w_scale=sw, w_zero=zw)
    y = run_qgemm(backend, args, torch.float32)
    deq = sw[:, None] * (qw.float() - zw[:, None])
    assert torch.equal(y, deq.T)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_tqe_off_and_no_bias(backend):
    args, qw = make_problem(37, 200, 75, 4, 8, seed=9, tqe=False, bias=False)
    y = run_qgemm(backend, args, torch.float32)
    ref = float64_epilogue(int64_acc(args["xq"], qw, args["w_zero"]), args)
    assert_within_spec(y, ref)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_given_rowsum_is_used_consistently(backend):
    args, qw = make_problem(37, 200, 75, 3, 6, seed=10)
    rowsum = args["xq"].long().sum(1).int()
    a = run_qgemm(backend, args, torch.int32)
    b = run_qgemm(backend, dict(args, x_rowsum=rowsum), torch.int32)
    assert torch.equal(a, b)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_deterministic(backend):
    args, _ = make_problem(37, 384, 75, 3, 6, seed=11)
    assert torch.equal(run_qgemm(backend, args, torch.bfloat16), run_qgemm(backend, args, torch.bfloat16))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("w_bits,a_bits", [(3, 6), (4, 8), (8, 8)])
def test_qlinear_equals_composition(backend, w_bits, a_bits):
    """qlinear(x) = qgemm(quantize_activation(x)) on the reference, within SPEC bounds."""
    g = gen(12)
    m, k, n = 37, 200, 75
    x = torch.randn(m, k, generator=g)
    x[3, 5] = 1e4  # an outlier row
    w = torch.randn(n, k, generator=g)
    q, sw, zw = qk.quantize_weight(w, w_bits)
    packed = qk.pack_weight(q, w_bits)
    alpha, beta, bias = torch.randn(k, generator=g), torch.randn(n, generator=g), torch.randn(n, generator=g)
    gate, fid = torch.tensor([0.5, 1.5, 1.0]), (torch.arange(m) % 3).int()
    xq, sx, u = qk.quantize_activation(x, a_bits, alpha=alpha, gate=gate, frame_id=fid, backend="torch")
    ref = qk.qgemm(xq, sx, packed, w_bits, sw, zw, bias=bias, u=u, beta=beta, out_dtype=torch.float32, backend="torch")
    dev = device_for(backend)
    t = lambda v: v.to(dev)  # noqa: E731
    y = qk.qlinear(t(x), t(packed), w_bits, t(sw), t(zw), a_bits, bias=t(bias), alpha=t(alpha), beta=t(beta),
                   gate=t(gate), frame_id=t(fid), backend=backend).cpu()
    assert y.dtype == torch.float32
    assert_within_spec(y, ref)
    y3 = qk.qlinear(t(x).view(1, m, k), t(packed), w_bits, t(sw), t(zw), a_bits, backend=backend)
    assert y3.shape == (1, m, n)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("w_bits,a_bits", [(3, 6), (4, 8), (8, 8)])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("tail", ["gelu", "residual", "gated", "gelu+per_token_gate"])
def test_epilogue_tail(backend, w_bits, a_bits, out_dtype, tail):
    """activation / residual / residual_gate in the epilogue = the block's own ops on the plain GEMM output
    (reference.epilogue_tail applied to this backend's qgemm without them), within two ulp of the out dtype
    (GELU's exp form against torch's tanh and float32 contraction move roundings; the Triton interpreter
    truncates float casts) plus the gate times one ulp of the activation; rows wrap the tiles (M = 37)."""
    m, n = 37, 75
    args, _ = make_problem(m, 200, n, w_bits, a_bits, seed=21)
    args["x_scale"] = args["x_scale"].clamp(max=1e-2)  # |y| well inside fp16
    g = gen(22)
    gelu = tail.startswith("gelu")
    residual = (torch.randn(m, n, generator=g) * 4).to(out_dtype) if tail != "gelu" else None
    gate = {"gated": torch.rand(1, n, generator=g) * 2 - 0.5, "gelu+per_token_gate": torch.randn(m, n, generator=g)}
    gate = gate.get(tail)
    plain = run_qgemm(backend, args, out_dtype)
    dev = device_for(backend)
    got = run_qgemm(backend, args, out_dtype, activation="gelu_tanh" if gelu else None,
                    residual=None if residual is None else residual.to(dev), residual_gate=None if gate is None else gate.to(dev))
    assert got.dtype == out_dtype and torch.isfinite(got).all()
    assert_tail_within(got, plain, "gelu_tanh" if gelu else None, residual, gate, tail)
    assert torch.equal(got, run_qgemm(backend, args, out_dtype, activation="gelu_tanh" if gelu else None,
                                      residual=None if residual is None else residual.to(dev),
                                      residual_gate=None if gate is None else gate.to(dev)))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("w_bits,a_bits", [(3, 6), (4, 8), (8, 8)])
def test_qlinear_input_activation(backend, w_bits, a_bits):
    """qlinear(input_activation="gelu_tanh") is the GEMM of quantize_activation(activation="gelu_tanh")'s codes, bit
    for bit on every backend (one act-quant, one GEMM); on the reference it is qlinear of the block's GELU output."""
    m, k, n = 37, 200, 75
    g = gen(24)
    x = (torch.randn(m, k, generator=g) * 2).bfloat16()
    q, sw, zw = qk.quantize_weight(torch.randn(n, k, generator=g), w_bits)
    packed = qk.pack_weight(q, w_bits)
    alpha, beta = torch.randn(k, generator=g) / k**0.5, torch.randn(n, generator=g) * 0.1
    dev = device_for(backend)
    t = lambda v: v.to(dev)  # noqa: E731
    lin = dict(w_packed=t(packed), w_bits=w_bits, w_scale=t(sw), w_zero=t(zw), a_bits=a_bits, alpha=t(alpha),
               beta=t(beta), backend=backend)
    got = qk.qlinear(t(x), **lin, input_activation="gelu_tanh").cpu()
    xq, sx, u, rs = qk.quantize_activation_rowsum(t(x), a_bits, t(alpha), backend=backend, activation="gelu_tanh")
    want = qk.qgemm(xq, sx, t(packed), w_bits, t(sw), t(zw), u=u, beta=t(beta), x_rowsum=rs, backend=backend).cpu()
    assert torch.equal(got, want)
    if backend == "torch":
        assert torch.equal(got, qk.qlinear(torch.nn.functional.gelu(x, approximate="tanh"), **lin))
    with pytest.raises(ValueError, match="input_activation must be None or one of"):
        qk.qlinear(t(x), **lin, input_activation="relu")
    # overwrite_input: x may be written over (the CUDA backend puts the codes there), the output is the same
    assert torch.equal(qk.qlinear(t(x).clone(), **lin, input_activation="gelu_tanh", overwrite_input=True).cpu(), got)


def test_epilogue_tail_rounds_like_the_block():
    """The reference tail is what a diffusers block computes after its linear, op for op (bf16)."""
    g = gen(23)
    y, r, gate = torch.randn(8, 16, generator=g).bfloat16(), torch.randn(8, 16, generator=g).bfloat16(), torch.rand(2, 16, generator=g)
    assert torch.equal(qk.reference.epilogue_tail(y, "gelu_tanh"), torch.nn.functional.gelu(y, approximate="tanh"))
    assert torch.equal(qk.reference.epilogue_tail(y, None, r), r + y)
    want = (r.float().view(2, 4, 16) + y.view(2, 4, 16) * gate[:, None, :]).type_as(r).view(8, 16)  # Wan's gated add
    assert torch.equal(qk.reference.epilogue_tail(y, None, r, gate), want)


@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 300), k=st.integers(1, 300), n=st.integers(1, 300), wa=st.sampled_from([(3, 6), (4, 8), (3, 8), (4, 6), (8, 8)]),
       seed=st.integers(0, 2**16), outliers=st.booleans())
def test_fuzz_reference(m, k, n, wa, seed, outliers):
    """Random shapes, bits and outlier rows through qlinear: int32 exact, epilogue in bounds (reference)."""
    w_bits, a_bits = wa
    g = gen(seed)
    x = torch.randn(m, k, generator=g)
    if outliers:
        x[torch.randint(0, m, (1,), generator=g)] *= 1e4
    w = torch.randn(n, k, generator=g)
    q, sw, zw = qk.quantize_weight(w, w_bits)
    packed = qk.pack_weight(q, w_bits)
    xq, sx, _ = qk.quantize_activation(x, a_bits)
    acc = qk.qgemm(xq, sx, packed, w_bits, sw, zw, out_dtype=torch.int32)
    assert torch.equal(acc.long(), int64_acc(xq, q, zw))
    y = qk.qgemm(xq, sx, packed, w_bits, sw, zw, out_dtype=torch.float32)
    assert_within_spec(y, acc.double() * sx.double()[:, None] * sw.double()[None, :])


def test_qgemm_errors():
    args, _ = make_problem(4, 16, 8, 4, 8, seed=0)
    call = lambda **over: qk.qgemm(**{**args, **over})  # noqa: E731
    with pytest.raises(TypeError, match="xq must have dtype"):
        call(xq=args["xq"].float())
    with pytest.raises(ValueError, match="w_packed must have shape"):
        call(w_packed=args["w_packed"][:, :10])
    with pytest.raises(ValueError, match="w_bits must be one of"):
        call(w_bits=5)
    with pytest.raises(ValueError, match="x_scale must have shape"):
        call(x_scale=torch.ones(3))
    with pytest.raises(TypeError, match="w_scale must have dtype"):
        call(w_scale=args["w_scale"].double())
    with pytest.raises(ValueError, match="u and beta"):
        call(beta=None)
    with pytest.raises(TypeError, match="out_dtype"):
        call(out_dtype=torch.int8)
    with pytest.raises(ValueError, match="bias is on meta"):
        call(bias=torch.empty(8, device="meta"))
    with pytest.raises(TypeError, match="x_rowsum must have dtype"):
        call(x_rowsum=torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="activation must be None or one of"):
        call(activation="relu")
    with pytest.raises(ValueError, match="residual must have shape"):
        call(residual=torch.zeros(4, 7, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="residual must have dtype"):
        call(residual=torch.zeros(4, 8))
    with pytest.raises(ValueError, match="residual_gate given without residual"):
        call(residual_gate=torch.ones(1, 8))
    with pytest.raises(ValueError, match="residual_gate has 3 rows"):
        call(residual=torch.zeros(4, 8, dtype=torch.bfloat16), residual_gate=torch.ones(3, 8))
    with pytest.raises(ValueError, match="need a float out_dtype"):
        call(activation="gelu_tanh", out_dtype=torch.int32)
    with pytest.raises(ValueError, match="alpha and beta"):
        qk.qlinear(torch.randn(4, 16), args["w_packed"], 4, args["w_scale"], args["w_zero"], 8, alpha=torch.randn(16))
