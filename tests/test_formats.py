"""Packed weight formats (qvdit_kernels/formats.py): exact round trips, byte budgets, golden bytes."""
import pytest
import torch

import qvdit_kernels as qk
from qvdit_kernels.formats import FORMATS, W3Planes, W4SplitHalves, W8Plain, kpad

from conftest import gen, random_codes

KS = [1, 7, 64, 128, 129, 200, 256, 384, 640, 1152]


@pytest.mark.parametrize("name", sorted(FORMATS))
@pytest.mark.parametrize("k", KS)
def test_round_trip_exact(name, k):
    fmt = FORMATS[name]
    q = random_codes(13, k, fmt.bits, gen(k))
    q[0] = 2**fmt.bits - 1 if fmt.bits < 8 else 127  # an all-max row
    q[1] = 0 if fmt.bits < 8 else -127  # an all-min row
    packed = fmt.pack(q)
    assert packed.dtype == fmt.packed_dtype
    assert packed.shape == (13, fmt.row_bytes(k))
    assert torch.equal(fmt.unpack(packed, k), q)


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("k", KS)
def test_bytes_within_spec_budget(bits, k):
    """SPEC 1.3: at most N * roundup(K, 128) * bits / 8 bytes; exactly `bits` bits per (padded) weight."""
    q = random_codes(5, k, bits, gen(1))
    packed = qk.pack_weight(q, bits)
    assert packed.numel() * packed.element_size() <= 5 * kpad(k) * bits // 8
    assert torch.equal(qk.unpack_weight(packed, bits, k), q)


def test_w4_golden_bytes():
    """K=130 (one full tile + a padded tile), code[k] = (7k + 3) mod 16: byte j of tile t = code[128t+j] | code[128t+64+j] << 4."""
    q = torch.tensor([[(7 * i + 3) % 16 for i in range(130)]], dtype=torch.uint8)
    got = W4SplitHalves.pack(q)[0].numpy().tobytes().hex()
    golden = ("33aa1188ff66dd44bb22990077ee55cc" * 4) + "030a" + "00" * 62
    assert got == golden
    # by hand: byte 0 = code 0 (3) | code 64 (451 mod 16 = 3) << 4 = 0x33; tile 1 byte 1 = code 129 = 10
    assert got[:2] == "33" and got[128 * 1 + 2:128 * 1 + 4] == "0a"


def test_w3_golden_bytes():
    """K=384 = one 256-code tile (lanes of 32) + a 128-code tail tile (lanes of 16), code[k] = (5k + 1) mod 8."""
    q = torch.tensor([[(5 * i + 1) % 8 for i in range(384)]], dtype=torch.uint8)
    got = W3Planes.pack(q)[0].numpy().tobytes().hex()
    golden = (
        "49b6db006d92ff24" * 4 + "89769b00ed12ff64" * 4 + "09f65b00ad52ffa4" * 4      # tile 0: A, B, C (32 bytes each)
        + "49b6db006d92ff24" * 2 + "89769b00ed12ff64" * 2 + "09f65b00ad52ffa4" * 2    # tail: A, B, C (16 bytes each)
    )
    assert got == golden
    assert len(got) // 2 == 384 * 3 // 8


def test_w3_one_lane_by_hand():
    """Lane 0 of a 256 tile with codes c0..c7 = 1, 2, 3, 4, 5, 6, 7, 5 (piece i holds k = 32 i)."""
    q = torch.zeros(1, 256, dtype=torch.uint8)
    for i, c in enumerate([1, 2, 3, 4, 5, 6, 7, 5]):
        q[0, 32 * i] = c
    p = W3Planes.pack(q)[0]
    assert p[0].item() == 1 | 2 << 3 | (7 & 3) << 6          # A = 0xD1
    assert p[32].item() == 3 | 4 << 3 | (7 >> 2) << 6 | (5 & 1) << 7  # B = 0xE3
    assert p[64].item() == 5 | 6 << 3 | (5 >> 1) << 6        # C = 0xB5
    assert (p[1:32] == 0).all() and (p[33:64] == 0).all() and (p[65:] == 0).all()


def test_w8_is_identity():
    q = random_codes(3, 5, 8, gen(0))
    assert torch.equal(W8Plain.pack(q), q)


def test_padding_is_zero():
    """Padding codes are written as 0: the packed bytes and checkpoint hashes are deterministic."""
    q = torch.full((2, 1), 7, dtype=torch.uint8)
    p = W3Planes.pack(q)
    assert p.shape == (2, 48)
    assert p[:, 1:16].eq(0).all() and p[:, 17:].eq(0).all()


@pytest.mark.parametrize("bits,bad", [(3, 8), (4, 16)])
def test_pack_rejects_out_of_range_codes(bits, bad):
    q = torch.zeros(2, 10, dtype=torch.uint8)
    q[1, 3] = bad
    with pytest.raises(ValueError, match="code"):
        qk.pack_weight(q, bits)


def test_pack_and_unpack_errors():
    with pytest.raises(TypeError, match="q must have dtype"):
        qk.pack_weight(torch.zeros(2, 2, dtype=torch.int32), 4)
    with pytest.raises(TypeError, match="q must have dtype"):
        qk.pack_weight(torch.zeros(2, 2, dtype=torch.uint8), 8)
    with pytest.raises(ValueError, match="q must have shape"):
        qk.pack_weight(torch.zeros(2, dtype=torch.uint8), 4)
    with pytest.raises(ValueError, match="bits must be one of"):
        qk.pack_weight(torch.zeros(2, 2, dtype=torch.uint8), 2)
    with pytest.raises(ValueError, match="w_packed must have shape"):
        qk.unpack_weight(torch.zeros(2, 10, dtype=torch.uint8), 4, 128)
    with pytest.raises(ValueError, match="k must be a positive int"):
        qk.unpack_weight(torch.zeros(2, 64, dtype=torch.uint8), 4, 0)
    with pytest.raises(ValueError, match="stores 4-bit codes"):
        qk.pack_weight(torch.zeros(2, 2, dtype=torch.uint8), 3, format="w4_split")
