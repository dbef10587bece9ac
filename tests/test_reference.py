"""Weight quantization (reference RTN, SPEC 1.1) against independent float64 math and exact constructions."""
import pytest
import torch

import qvdit_kernels as qk

from conftest import gen


def independent_weight_quant(w: torch.Tensor, bits: int):
    """SPEC 1.1 written again, in float64 (an independent check of the float32 reference)."""
    w = w.double()
    if bits == 8:
        s = (w.abs().amax(1) / 127).clamp(min=1e-8)
        return torch.round(w / s[:, None]).clamp(-127, 127), s, torch.zeros_like(s)
    qmax = 2**bits - 1
    hi, lo = w.amax(1).clamp(min=0), w.amin(1).clamp(max=0)
    s = ((hi - lo) / qmax).clamp(min=1e-8)
    z = torch.round(-lo / s)
    return (torch.round(w / s[:, None]) + z[:, None]).clamp(0, qmax), s, z


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_exact_construction_recovers_codes(bits):
    """x = s (q - z) with s a power of two and rows that hit both code ends: RTN returns q, s, z exactly."""
    g = gen(bits)
    n, k = 16, 97
    qmax = 2**bits - 1
    if bits == 8:
        q = torch.randint(-127, 128, (n, k), generator=g)
        q[:, 0] = 127
        z = torch.zeros(n)
    else:
        q = torch.randint(0, qmax + 1, (n, k), generator=g)
        q[:, 0], q[:, 1] = 0, qmax
        z = torch.randint(0, qmax + 1, (n,), generator=g).float()
    s = torch.exp2(torch.randint(-12, 4, (n,), generator=g).float())
    w = s[:, None] * (q.float() - z[:, None])
    codes, scale, zero = qk.quantize_weight(w, bits)
    assert torch.equal(scale, s) and torch.equal(zero, z)
    assert torch.equal(codes.long(), q)
    assert codes.dtype == (torch.int8 if bits == 8 else torch.uint8)


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_matches_independent_float64(bits):
    """On random data the float32 reference equals float64 math except within 1e-4 of a rounding tie (there by 1)."""
    w = torch.randn(64, 300, generator=gen(7)) * torch.exp(torch.randn(64, 1, generator=gen(8)))
    codes, scale, zero = qk.quantize_weight(w, bits)
    q64, s64, z64 = independent_weight_quant(w, bits)
    assert torch.allclose(scale.double(), s64, rtol=1e-6, atol=0)
    assert torch.equal(zero.double(), z64)
    diff = (codes.double() - q64).abs()
    frac = (w.double() / s64[:, None]).frac().abs()
    near_tie = (frac - 0.5).abs() < 1e-4
    assert (diff[~near_tie] == 0).all() and (diff <= 1).all()
    assert codes.double().min() >= (-127 if bits == 8 else 0) and codes.double().max() <= (127 if bits == 8 else 2**bits - 1)


def test_round_half_to_even_at_ties():
    """x / s exactly k + 0.5 rounds to the even neighbour (torch.round semantics), for 4 and 8 bits."""
    # 8 bit: max |x| = 127 s with s = 1/4: x = 2.5 s -> 2, 3.5 s -> 4, -2.5 s -> -2
    s = 0.25
    w = torch.tensor([[127 * s, 2.5 * s, 3.5 * s, -2.5 * s, -0.5 * s, 0.5 * s]])
    codes, scale, _ = qk.quantize_weight(w, 8)
    assert scale.item() == s
    assert codes[0].tolist() == [127, 2, 4, -2, 0, 0]
    # 4 bit: min 0, max 15 s (s = 1/8, z = 0): x = 4.5 s -> 4, 5.5 s -> 6
    s = 0.125
    w = torch.tensor([[0.0, 15 * s, 4.5 * s, 5.5 * s, 14.5 * s]])
    codes, scale, zero = qk.quantize_weight(w, 4)
    assert scale.item() == s and zero.item() == 0
    assert codes[0].tolist() == [0, 15, 4, 6, 14]


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_zero_is_exact(bits):
    w = torch.randn(8, 50, generator=gen(3))
    w[:, ::7] = 0.0
    codes, scale, zero = qk.quantize_weight(w, bits)
    deq = scale[:, None] * (codes.float() - zero[:, None])
    assert (deq[:, ::7] == 0).all()


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_all_zero_rows(bits):
    w = torch.randn(4, 33, generator=gen(4))
    w[2] = 0
    codes, scale, zero = qk.quantize_weight(w, bits)
    assert torch.isfinite(scale).all()
    assert scale[2].item() == pytest.approx(1e-8)
    deq = scale[:, None] * (codes.float() - zero[:, None])
    assert (deq[2] == 0).all()


@pytest.mark.parametrize("bits", [3, 4])
def test_one_signed_rows(bits):
    """All-positive and all-negative rows: zero is still inside the range (z = 0 or z = 2^b - 1)."""
    w = torch.rand(2, 40, generator=gen(5)) + 0.5
    w[1] = -w[1]
    codes, scale, zero = qk.quantize_weight(w, bits)
    assert zero.tolist() == [0.0, float(2**bits - 1)]
    deq = scale[:, None] * (codes.float() - zero[:, None])
    assert (deq - w).abs().max() <= scale.max() / 2 + 1e-6


def test_nonfinite_row_spoils_only_itself():
    w = torch.randn(3, 20, generator=gen(6))
    w[1, 4] = float("nan")
    codes, scale, zero = qk.quantize_weight(w, 4)
    assert torch.isnan(scale[1]) and (codes[1] == 0).all()
    ref_codes, ref_scale, _ = qk.quantize_weight(w[[0, 2]], 4)
    assert torch.equal(codes[[0, 2]], ref_codes) and torch.equal(scale[[0, 2]], ref_scale)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_equal_upcast(dtype):
    w = torch.randn(16, 64, generator=gen(9)).to(dtype)
    for bits in (3, 4, 8):
        a, b = qk.quantize_weight(w, bits), qk.quantize_weight(w.float(), bits)
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_weight_quant_errors():
    w = torch.randn(4, 8)
    for bits in (2, 5, 6, 7, 16):
        with pytest.raises(ValueError, match="bits must be one of"):
            qk.quantize_weight(w, bits)
    with pytest.raises(TypeError, match="bits must be an int"):
        qk.quantize_weight(w, 4.0)
    with pytest.raises(TypeError, match="bits must be an int"):
        qk.quantize_weight(w, True)
    with pytest.raises(TypeError, match="w must have dtype"):
        qk.quantize_weight(w.long(), 4)
    with pytest.raises(ValueError, match="w must have shape"):
        qk.quantize_weight(w[0], 4)
    with pytest.raises(TypeError, match="w must be a torch.Tensor"):
        qk.quantize_weight([[1.0]], 4)
    with pytest.raises(ValueError, match="backend must be one of"):
        qk.quantize_weight(w, 4, backend="cutlass")
