"""Per-token activation quantization + TQE term u + row sums (`quantize_activation`), on every backend
that runs here, against independent float64 math. Kernel: qvdit_kernels/triton/act_quant.py (triton)."""
import pytest
import torch

import qvdit_kernels as qk
from qvdit_kernels import reference as ref

from conftest import KERNEL_BACKENDS, device_for, gen, ulp

SHAPES = [(1, 1), (1, 200), (37, 64), (37, 200), (64, 1152)]


def independent_act_quant(x: torch.Tensor, bits: int):
    """SPEC 1.1 for activations in float64: -> (xq = q - z as float64, scale)."""
    x = x.double()
    if bits == 8:
        s = (x.abs().amax(1) / 127).clamp(min=1e-8)
        return torch.round(x / s[:, None]).clamp(-127, 127), s
    qmax = 2**bits - 1
    hi, lo = x.amax(1).clamp(min=0), x.amin(1).clamp(max=0)
    s = ((hi - lo) / qmax).clamp(min=1e-8)
    z = torch.round(-lo / s)
    return (torch.round(x / s[:, None]) + z[:, None]).clamp(0, qmax) - z[:, None], s


def run(backend, x, bits, **kw):
    dev = device_for(backend)
    kw = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    out = qk.quantize_activation_rowsum(x.to(dev), bits, backend=backend, **kw)
    return tuple(t.cpu() if isinstance(t, torch.Tensor) else t for t in out)


def outlier_input(m, k, seed):
    x = torch.randn(m, k, generator=gen(seed)) * torch.exp(torch.randn(m, 1, generator=gen(seed + 1)))
    if m > 2:
        x[1, k // 2] = 1e4  # a "massive activation"
        x[2, 0] = -1e4
    return x


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("bits", [6, 8])
@pytest.mark.parametrize("m,k", SHAPES)
def test_codes_scale_rowsum_match_independent(backend, bits, m, k):
    x = outlier_input(m, k, m * 1000 + k)
    xq, scale, u, rowsum = run(backend, x, bits)
    ref_q, ref_s = independent_act_quant(x, bits)
    assert xq.dtype == torch.int8 and scale.dtype == torch.float32 and rowsum.dtype == torch.int32
    assert u is None
    assert torch.allclose(scale.double(), ref_s, rtol=1e-6, atol=0)
    frac = (x.double() / ref_s[:, None]).frac().abs()
    near_tie = (frac - 0.5).abs() < 1e-4
    diff = (xq.double() - ref_q).abs()
    assert (diff[~near_tie] == 0).all() and (diff <= 1).all()
    assert torch.equal(rowsum, xq.long().sum(1).int())


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("bits", [6, 8])
def test_exact_construction(backend, bits):
    """x = s (q - z) with power-of-two s and both code ends present: the codes come back exactly."""
    g = gen(bits)
    m, k = 9, 77
    if bits == 8:
        xq = torch.randint(-127, 128, (m, k), generator=g)
        xq[:, 3] = -127
        s = torch.exp2(torch.randint(-10, 5, (m,), generator=g).float())
    else:
        q = torch.randint(0, 64, (m, k), generator=g)
        q[:, 0], q[:, 1] = 0, 63
        z = torch.randint(0, 64, (m,), generator=g)
        xq = q - z[:, None]
        s = torch.exp2(torch.randint(-10, 5, (m,), generator=g).float())
    x = s[:, None] * xq.float()
    got_q, got_s, _, got_rs = run(backend, x, bits)
    assert torch.equal(got_s, s)
    assert torch.equal(got_q.long(), xq)
    assert torch.equal(got_rs.long(), xq.sum(1))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_ties_round_half_to_even(backend):
    s = 0.25  # 8 bit: max |x| = 127 s
    x = torch.tensor([[127 * s, 2.5 * s, 3.5 * s, -2.5 * s, -0.5 * s, 0.5 * s, 126.5 * s]])
    xq, scale, _, _ = run(backend, x, 8)
    assert scale.item() == s and xq[0].tolist() == [127, 2, 4, -2, 0, 0, 126]
    s = 0.125  # 6 bit, min 0 so z = 0
    x = torch.tensor([[0.0, 63 * s, 4.5 * s, 5.5 * s, 62.5 * s]])
    xq, scale, _, _ = run(backend, x, 6)
    assert scale.item() == s and xq[0].tolist() == [0, 63, 4, 6, 62]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("bits", [6, 8])
def test_zero_rows_and_exact_zero(backend, bits):
    x = torch.randn(5, 40, generator=gen(2))
    x[1] = 0.0
    x[:, 7] = 0.0
    alpha = torch.randn(40, generator=gen(3))
    xq, scale, u, rowsum = run(backend, x, bits, alpha=alpha)
    assert torch.isfinite(scale).all() and torch.isfinite(u).all()
    assert (xq[1] == 0).all() and u[1].item() == 0.0 and rowsum[1].item() == 0
    assert (xq[:, 7] == 0).all()  # zero is exact: q - z = 0


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_nonfinite_row_spoils_only_itself(backend):
    x = torch.randn(4, 30, generator=gen(4))
    x[2, 5] = float("inf")
    xq, scale, _, _ = run(backend, x, 6)
    assert torch.isnan(scale[2]) and (xq[2] == 0).all()
    keep = [0, 1, 3]
    ref_q, ref_s, _, _ = run("torch", x[keep], 6)
    assert torch.equal(xq[keep], ref_q) and torch.equal(scale[keep], ref_s)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("bits", [6, 8])
@pytest.mark.parametrize("m,k", [(37, 200), (64, 1152)])
def test_tqe_u_per_frame(backend, bits, m, k):
    """u[m] = gate[frame_id[m]] * sx[m] * (xq[m] . alpha), against float64, with a different gate per frame."""
    x = outlier_input(m, k, 11)
    alpha = torch.randn(k, generator=gen(12)) / k**0.5
    gate = torch.linspace(0.5, 2.0, 6)
    frame_id = (torch.arange(m) // 7 % 6).int()
    xq, scale, u, _ = run(backend, x, bits, alpha=alpha, gate=gate, frame_id=frame_id)
    assert ref.u_within_bound(u, xq, scale, alpha, gate, frame_id)
    # frame_id None: every row uses gate[0]; gate None: ones
    _, _, u0, _ = run(backend, x, bits, alpha=alpha, gate=gate)
    _, _, u1, _ = run(backend, x, bits, alpha=alpha)
    assert ref.u_within_bound(u0, xq, scale, alpha, gate[:1])
    assert ref.u_within_bound(u1, xq, scale, alpha)
    assert not ref.u_within_bound(u1 * (1 + 1e-3), xq, scale, alpha)  # the bound catches a 0.1% error


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_equal_upcast(backend, dtype):
    x = torch.randn(37, 200, generator=gen(13)).to(dtype)
    a = run(backend, x, 6)
    b = run(backend, x.float(), 6)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_deterministic(backend):
    x = outlier_input(37, 200, 14)
    alpha = torch.randn(200, generator=gen(15))
    a, b = run(backend, x, 6, alpha=alpha), run(backend, x, 6, alpha=alpha)
    assert all(torch.equal(p, q) for p, q in zip(a, b))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("bits", [6, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("m,k", [(37, 200), (64, 1152)])
@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # (the interpreter's numpy exp at x = -30: inf, gelu -0)
def test_gelu_prologue_quantizes_the_blocks_gelu(backend, bits, dtype, m, k):
    """activation="gelu_tanh": the codes of h = gelu_tanh(x) as the block has it (rounded to x's dtype). A kernel's
    GELU (the exp form) may round an element one ulp of the dtype away from torch's, which can move the row's scale
    by that much and single codes by one; every code still dequantizes to within the quantization step of h, the
    row sums are the codes' and u meets the TQE bound of the codes and scale it returns."""
    x = (outlier_input(m, k, m + k) * 3).to(dtype)
    x[0, :5] = torch.tensor([-30.0, -10.0, 0.0, 10.0, 30.0])  # the exp's overflow and underflow ends, gelu(0) = 0
    alpha = torch.randn(k, generator=gen(16)) / k**0.5
    gate, fid = torch.linspace(0.5, 2.0, 4), (torch.arange(m) % 4).int()
    xq, s, u, rs = run(backend, x, bits, alpha=alpha, gate=gate, frame_id=fid, activation="gelu_tanh")
    h = ref.activate(x, "gelu_tanh")
    want_q, want_s, _ = ref.quantize_activation(h, bits)
    qmax = 127 if bits == 8 else 63
    tol_s = 2 * ulp(h).amax(1) / qmax + 4 * 2.0**-23 * want_s
    assert ((s - want_s).abs() <= tol_s).all()
    assert ((xq.int() - want_q.int()).abs() <= 1).all()
    step = s[:, None] * (0.5 if bits == 8 else 1.0)  # (6 bits: the zero point's rounding moves the clamp ends)
    assert ((s[:, None] * xq.float() - h.float()).abs() <= step + ulp(h) + 1e-6 * s[:, None]).all()
    assert torch.equal(rs, xq.long().sum(1).int())
    assert ref.u_within_bound(u, xq, s, alpha, gate, fid)
    plain = run(backend, x, bits, alpha=alpha, gate=gate, frame_id=fid)  # without it: x's own codes, not h's
    assert not torch.equal(plain[0], xq)


def test_three_results():
    out = qk.quantize_activation(torch.randn(3, 8), 8)
    assert len(out) == 3 and out[2] is None


def test_act_quant_errors():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="bits must be one of"):
        qk.quantize_activation(x, 4)
    with pytest.raises(TypeError, match="x must have dtype"):
        qk.quantize_activation(x.long(), 8)
    with pytest.raises(ValueError, match="x must have shape"):
        qk.quantize_activation(x[0], 8)
    with pytest.raises(ValueError, match="alpha must have shape"):
        qk.quantize_activation(x, 8, alpha=torch.randn(7))
    with pytest.raises(TypeError, match="frame_id must have dtype"):
        qk.quantize_activation(x, 8, alpha=torch.randn(8), gate=torch.ones(2), frame_id=torch.zeros(4))
    with pytest.raises(ValueError, match="frame_id must have shape"):
        qk.quantize_activation(x, 8, alpha=torch.randn(8), gate=torch.ones(2), frame_id=torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="without alpha"):
        qk.quantize_activation(x, 8, gate=torch.ones(2))
    with pytest.raises(ValueError, match="activation must be None or one of"):
        qk.quantize_activation(x, 8, activation="relu")
    with pytest.raises(ValueError, match="alpha is on meta"):
        qk.quantize_activation(x, 8, alpha=torch.empty(8, device="meta"))
