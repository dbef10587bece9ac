"""Packed weight formats: one class per layout, registered by name, one default per bit width.

Every format stores the weight codes of an `nn.Linear` weight `[N, K]` (N = out_features,
K = in_features) as a 2-D tensor `[N, row_bytes(K)]`, one packed row per output channel, so a
GEMM tile of BLOCK_N rows reads contiguous bytes per row. K is padded with code 0 to
`kpad(K) = roundup(K, 128)`; the padding codes meet zero activations in the kernel (the
activation pad is zero), so their value never matters, but they are always written as 0 so that
the packed bytes, golden tests and checkpoint hashes are deterministic.

Exactly `bits` bits per weight are stored (SPEC 2.2): `row_bytes(K) = kpad(K) * bits / 8`.
The layouts are the ones that measured fastest for an int8 tensor-core mainloop on the H100
(`shared/notes/h100_lowbit_gemm_facts.md`): each splits into whole K tiles with masks and
shifts only, so a kernel unpacks 4 codes per 32-bit operation and never interleaves.

Registry: `FORMATS[name]`, `DEFAULT_FORMAT[bits]`, `get_format(bits, name=None)`.
"""
from __future__ import annotations

import torch

__all__ = ["PackedFormat", "W3Planes", "W4SplitHalves", "W8Plain", "FORMATS", "DEFAULT_FORMAT", "get_format", "kpad"]

K_ALIGN = 128  # every format pads K to a multiple of this


def kpad(k: int) -> int:
    """K rounded up to the 128-code tile every packed format is built from."""
    return -(-k // K_ALIGN) * K_ALIGN


class PackedFormat:
    """Base class. Subclasses set `name`, `bits`, `code_dtype` and implement `_pack`/`_unpack`."""

    name: str = ""
    bits: int = 0
    code_dtype: torch.dtype = torch.uint8  # dtype of the unpacked codes
    packed_dtype: torch.dtype = torch.uint8

    @classmethod
    def row_bytes(cls, k: int) -> int:
        """Bytes of one packed row for K input features (the whole row, padding included)."""
        return kpad(k) * cls.bits // 8

    @classmethod
    def nbytes(cls, n: int, k: int) -> int:
        return n * cls.row_bytes(k)

    @classmethod
    def pack(cls, q: torch.Tensor) -> torch.Tensor:
        """Codes `[N, K]` (uint8 in [0, 2^bits), or int8 for 8 bits) -> packed `[N, row_bytes(K)]`."""
        if not isinstance(q, torch.Tensor):
            raise TypeError(f"q must be a torch.Tensor, got {type(q).__name__}")
        if q.dtype != cls.code_dtype:
            raise TypeError(f"q must have dtype {cls.code_dtype} for {cls.name}, got {q.dtype}")
        if q.dim() != 2:
            raise ValueError(f"q must be 2-D [N, K], got shape {tuple(q.shape)}")
        if cls.code_dtype == torch.uint8 and q.numel() and int(q.max()) >= (1 << cls.bits):
            raise ValueError(f"q holds a code >= 2^{cls.bits} = {1 << cls.bits}; not a {cls.bits}-bit code")
        return cls._pack(q.contiguous())

    @classmethod
    def unpack(cls, packed: torch.Tensor, k: int) -> torch.Tensor:
        """Packed `[N, row_bytes(k)]` -> codes `[N, k]` (exact inverse of `pack`)."""
        if not isinstance(packed, torch.Tensor):
            raise TypeError(f"packed must be a torch.Tensor, got {type(packed).__name__}")
        if packed.dtype != cls.packed_dtype:
            raise TypeError(f"packed must have dtype {cls.packed_dtype} for {cls.name}, got {packed.dtype}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        if packed.dim() != 2 or packed.shape[1] != cls.row_bytes(k):
            raise ValueError(
                f"packed must have shape [N, {cls.row_bytes(k)}] for {cls.name} with k={k}, got {tuple(packed.shape)}"
            )
        return cls._unpack(packed.contiguous(), k)

    @classmethod
    def _pad(cls, q: torch.Tensor) -> torch.Tensor:
        n, k = q.shape
        if kpad(k) == k:
            return q
        out = torch.zeros(n, kpad(k), dtype=q.dtype, device=q.device)
        out[:, :k] = q
        return out


class W8Plain(PackedFormat):
    """8-bit weights: plain signed int8 `[N, K]`, symmetric codes in [-127, 127]; packing is the identity.

    No K padding (SPEC 1.1: "stored as plain signed int8 [N, K]"); kernels mask the K tail.
    """

    name = "w8_plain"
    bits = 8
    code_dtype = torch.int8
    packed_dtype = torch.int8

    @classmethod
    def row_bytes(cls, k: int) -> int:
        return k

    @classmethod
    def _pack(cls, q):
        return q.clone()

    @classmethod
    def _unpack(cls, packed, k):
        return packed.clone()


class W4SplitHalves(PackedFormat):
    """4-bit codes, "split halves": each 128-code K tile is 64 bytes; byte j holds codes j and j + 64.

    Row n, tile t (codes k = 128 t .. 128 t + 127), byte j in 0..63 at offset 64 t + j::

        bit     7   6   5   4   3   2   1   0
              +---------------+---------------+
        byte j| code[128t+64+j] | code[128t+j]  |
              +---------------+---------------+
                 high nibble      low nibble

    A kernel loads the 64 bytes of a tile as `[BLOCK_N, 64]` and gets two whole K=64 halves with
    `p & 0x0F0F0F0F` and `(p >> 4) & 0x0F0F0F0F` (3 ops per 8 codes on 32-bit words), then joins
    them along K: no nibble interleave to undo.
    """

    name = "w4_split"
    bits = 4

    @classmethod
    def _pack(cls, q):
        q = cls._pad(q)
        n, kp = q.shape
        # (n, tiles, half, j) => low = half 0, high = half 1
        t = q.view(n, kp // 128, 2, 64)
        packed = t[:, :, 0, :] | (t[:, :, 1, :] << 4)
        return packed.reshape(n, kp // 2).contiguous()

    @classmethod
    def _unpack(cls, packed, k):
        n, rb = packed.shape
        t = packed.view(n, rb // 64, 64)
        codes = torch.stack((t & 0x0F, t >> 4), dim=2)  # (n, tiles, half, j)
        return codes.reshape(n, rb * 2)[:, :k].contiguous()


class W3Planes(PackedFormat):
    """3-bit codes in three byte planes A, B, C per K tile; exactly 3 bits per weight, no padding words.

    The padded row (kpad(K) codes) is cut into full tiles of T = 256 codes and, when kpad(K) is an
    odd multiple of 128 (e.g. K = 1152 in Latte), one final tail tile of T = 128 codes. A tile is cut
    into 8 pieces of L = T / 8 lanes (L = 32, tail L = 16): piece i holds codes k = base + L*i + j,
    j = 0..L-1. Lane j of the tile owns the 8 codes c0..c7 (one per piece, ci = code[base + L*i + j])
    and stores them in byte j of each of the planes A, B, C::

                   bit  7        6        5  4  3     2  1  0
                      +--------+--------+---------+---------+
        A[j] =        | c6 b1  | c6 b0  |   c1    |   c0    |     c0 | c1<<3 | (c6 & 3)<<6
                      +--------+--------+---------+---------+
        B[j] =        | c7 b0  | c6 b2  |   c3    |   c2    |     c2 | c3<<3 | (c6 >> 2)<<6 | (c7 & 1)<<7
                      +--------+--------+---------+---------+
        C[j] =        | c7 b2  | c7 b1  |   c5    |   c4    |     c4 | c5<<3 | (c7 >> 1)<<6
                      +--------+--------+---------+---------+

    Tile bytes in the row: [A (L bytes) | B (L bytes) | C (L bytes)], i.e. 96 bytes per full tile and
    48 per tail tile; tiles follow each other in K order. Row bytes = kpad(K) * 3 / 8.

    Unpack on 32-bit words (4 lanes at a time, 17 ops per 32 codes):
    `c0 = A & 0x07070707`, `c1 = (A >> 3) & 0x07070707` (likewise c2, c3 from B and c4, c5 from C),
    `c6 = ((A >> 6) & 0x03030303) | ((B >> 4) & 0x04040404)`,
    `c7 = ((B >> 7) & 0x01010101) | ((C >> 5) & 0x06060606)`; the 8 pieces join along K into
    whole operands.
    """

    name = "w3_planes"
    bits = 3

    @staticmethod
    def _tiles(kp: int) -> list[tuple[int, int]]:
        """[(code offset, tile size T)] of the padded row, in K order."""
        full = kp // 256 * 256
        tiles = [(s, 256) for s in range(0, full, 256)]
        if kp - full:
            tiles.append((full, 128))
        return tiles

    @classmethod
    def _pack_part(cls, q: torch.Tensor, tile: int) -> torch.Tensor:
        n, width = q.shape
        lanes = tile // 8
        c = q.view(n, width // tile, 8, lanes)  # (n, tiles, piece i, lane j)
        c0, c1, c2, c3, c4, c5, c6, c7 = c.unbind(2)
        a = c0 | (c1 << 3) | ((c6 & 3) << 6)
        b = c2 | (c3 << 3) | ((c6 >> 2) << 6) | ((c7 & 1) << 7)
        cc = c4 | (c5 << 3) | ((c7 >> 1) << 6)
        return torch.stack((a, b, cc), dim=2).reshape(n, width * 3 // 8)  # (n, tiles, plane, lane)

    @classmethod
    def _unpack_part(cls, p: torch.Tensor, tile: int) -> torch.Tensor:
        n, nbytes = p.shape
        lanes = tile // 8
        planes = p.view(n, nbytes // (3 * lanes), 3, lanes)
        a, b, c = planes.unbind(2)
        codes = (
            a & 7, (a >> 3) & 7, b & 7, (b >> 3) & 7, c & 7, (c >> 3) & 7,
            ((a >> 6) & 3) | ((b >> 4) & 4),
            ((b >> 7) & 1) | ((c >> 5) & 6),
        )
        return torch.stack(codes, dim=2).reshape(n, nbytes * 8 // 3)  # (n, tiles, piece, lane)

    @classmethod
    def _pack(cls, q):
        q = cls._pad(q)
        n, kp = q.shape
        full = kp // 256 * 256
        parts = [cls._pack_part(q[:, :full].contiguous(), 256)] if full else []
        if kp - full:
            parts.append(cls._pack_part(q[:, full:].contiguous(), 128))
        return torch.cat(parts, dim=1).contiguous()

    @classmethod
    def _unpack(cls, packed, k):
        kp = kpad(k)
        full = kp // 256 * 256
        parts = [cls._unpack_part(packed[:, : full * 3 // 8].contiguous(), 256)] if full else []
        if kp - full:
            parts.append(cls._unpack_part(packed[:, full * 3 // 8 :].contiguous(), 128))
        return torch.cat(parts, dim=1)[:, :k].contiguous()


FORMATS: dict[str, type[PackedFormat]] = {f.name: f for f in (W3Planes, W4SplitHalves, W8Plain)}
DEFAULT_FORMAT: dict[int, str] = {3: W3Planes.name, 4: W4SplitHalves.name, 8: W8Plain.name}


def get_format(bits: int, name: str | None = None) -> type[PackedFormat]:
    """The format class for `bits` (its default, or `name`, which must match `bits`)."""
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise TypeError(f"bits must be an int, got {type(bits).__name__}")
    if bits not in DEFAULT_FORMAT:
        raise ValueError(f"bits must be one of {sorted(DEFAULT_FORMAT)} for weights, got {bits}")
    if name is None:
        return FORMATS[DEFAULT_FORMAT[bits]]
    if name not in FORMATS:
        raise ValueError(f"format must be one of {sorted(FORMATS)}, got {name!r}")
    fmt = FORMATS[name]
    if fmt.bits != bits:
        raise ValueError(f"format {name!r} stores {fmt.bits}-bit codes, not bits={bits}")
    return fmt
