"""Register-level unpack of packed weight tiles into int8 tensor-core operands (formats.py layouts).

Two paths compute the same codes:
- `USE_ASM=True` (GPU): one `tl.inline_asm_elementwise(pack=4)` per code piece, so each PTX
  instruction works on a 32-bit register holding 4 packed bytes (plain Triton ops on uint8 tensors
  compile to per-byte work; the study measured +15-28% from this).
- `USE_ASM=False` (`TRITON_INTERPRET=1`, which cannot run inline asm): the same formulas on uint8
  tensors. `tests/test_triton_kernels.py` emulates the asm strings on the host and checks both
  against `formats.py`.

Pieces are joined along K with join + permute + reshape, which compiles to register renaming, so a
whole 128-code K slice becomes one wide `tl.dot` operand.
"""
import triton
import triton.language as tl

# PTX of each piece, on 32-bit registers of 4 packed bytes: $0 = output, $1.. = inputs.
# The masks keep every byte's result inside its own byte, so 4 codes come out per instruction chain.
ASM_LO4 = tl.constexpr("and.b32 $0, $1, 0x0F0F0F0F;")  # W4 low nibble (codes j) / W3 c0, c2, c4 use ASM_LO3
ASM_HI4 = tl.constexpr("shr.u32 $0, $1, 4; and.b32 $0, $0, 0x0F0F0F0F;")  # W4 high nibble (codes j + 64)
ASM_LO3 = tl.constexpr("and.b32 $0, $1, 0x07070707;")  # W3: bits 0-2 of a plane byte (c0 of A, c2 of B, c4 of C)
ASM_MID3 = tl.constexpr("shr.u32 $0, $1, 3; and.b32 $0, $0, 0x07070707;")  # W3: bits 3-5 (c1, c3, c5)
# W3 c6 = A bits 6-7 | B bit 6 << 2;  c7 = B bit 7 | C bits 6-7 << 1  ($1, $2 = the two planes)
ASM_C6 = tl.constexpr(
    "{ .reg .b32 t0, t1; shr.u32 t0, $1, 6; and.b32 t0, t0, 0x03030303; "
    "shr.u32 t1, $2, 4; and.b32 t1, t1, 0x04040404; or.b32 $0, t0, t1; }"
)
ASM_C7 = tl.constexpr(
    "{ .reg .b32 t0, t1; shr.u32 t0, $1, 7; and.b32 t0, t0, 0x01010101; "
    "shr.u32 t1, $2, 5; and.b32 t1, t1, 0x06060606; or.b32 $0, t0, t1; }"
)


@triton.jit
def _asm1(p, ASM: tl.constexpr):
    return tl.inline_asm_elementwise(ASM, "=r,r", [p], dtype=tl.int8, is_pure=True, pack=4)


@triton.jit
def _asm2(p, q, ASM: tl.constexpr):
    return tl.inline_asm_elementwise(ASM, "=r,r,r", [p, q], dtype=tl.int8, is_pure=True, pack=4)


@triton.jit
def cat_k(a, b):
    """[R, L] ++ [R, L] -> [R, 2L] along K (a first): join + permute + reshape, no data movement."""
    R: tl.constexpr = a.shape[0]
    L: tl.constexpr = a.shape[1]
    return tl.reshape(tl.permute(tl.join(a, b), (0, 2, 1)), (R, 2 * L))


@triton.jit
def unpack_w4(p, USE_ASM: tl.constexpr):
    """W4 split halves: bytes [R, 64] of one 128-code tile -> int8 codes [R, 128] (k = j and j + 64)."""
    if USE_ASM:
        lo = _asm1(p, ASM_LO4)
        hi = _asm1(p, ASM_HI4)
    else:
        lo = (p & 0x0F).to(tl.int8)
        hi = ((p >> 4) & 0x0F).to(tl.int8)
    return cat_k(lo, hi)


@triton.jit
def unpack_w3_pieces(a, b, c, USE_ASM: tl.constexpr):
    """W3 planes A, B, C (uint8 [R, L] each) -> the 8 code pieces c0..c7 (int8 [R, L]; piece i = k in [iL, iL+L))."""
    if USE_ASM:
        c0 = _asm1(a, ASM_LO3)
        c1 = _asm1(a, ASM_MID3)
        c2 = _asm1(b, ASM_LO3)
        c3 = _asm1(b, ASM_MID3)
        c4 = _asm1(c, ASM_LO3)
        c5 = _asm1(c, ASM_MID3)
        c6 = _asm2(a, b, ASM_C6)
        c7 = _asm2(b, c, ASM_C7)
    else:
        c0 = (a & 7).to(tl.int8)
        c1 = ((a >> 3) & 7).to(tl.int8)
        c2 = (b & 7).to(tl.int8)
        c3 = ((b >> 3) & 7).to(tl.int8)
        c4 = (c & 7).to(tl.int8)
        c5 = ((c >> 3) & 7).to(tl.int8)
        c6 = (((a >> 6) & 3) | ((b >> 4) & 4)).to(tl.int8)
        c7 = (((b >> 7) & 1) | ((c >> 5) & 6)).to(tl.int8)
    return c0, c1, c2, c3, c4, c5, c6, c7


@triton.jit
def unpack_w3_full(a, b, c, USE_ASM: tl.constexpr):
    """One 256-code W3 tile (planes [R, 32]) -> two int8 operands [R, 128]: k 0..127 and 128..255."""
    c0, c1, c2, c3, c4, c5, c6, c7 = unpack_w3_pieces(a, b, c, USE_ASM)
    return cat_k(cat_k(c0, c1), cat_k(c2, c3)), cat_k(cat_k(c4, c5), cat_k(c6, c7))


@triton.jit
def unpack_w3_tail(a, b, c, USE_ASM: tl.constexpr):
    """The 128-code W3 tail tile (planes [R, 16]) -> one int8 operand [R, 128]."""
    c0, c1, c2, c3, c4, c5, c6, c7 = unpack_w3_pieces(a, b, c, USE_ASM)
    return cat_k(cat_k(cat_k(c0, c1), cat_k(c2, c3)), cat_k(cat_k(c4, c5), cat_k(c6, c7)))
