"""Triton-only tests (qvdit_kernels/triton): the asm unpack formulas (emulated on the host) and the pure-Triton
unpack against formats.py, every config of the tune table on a small shape, NaN-prefilled outputs, the grouped
tile order, the custom ops (opcheck, torch.compile fullgraph), and GPU-only checks at real shapes.

CPU: runs under TRITON_INTERPRET=1 (how CI runs it). GPU: the same tests plus the `requires_gpu` ones.
The shared assertions for every backend live in test_gemm.py and test_act_quant.py.
"""
import json
import os
from fractions import Fraction

import numpy as np
import pytest
import torch

import qvdit_kernels as qk
from qvdit_kernels import reference as ref
from qvdit_kernels.formats import W3Planes, W4SplitHalves

from conftest import (DEVICE, KERNEL_BACKENDS, assert_within_spec, capture_cuda_graph, gen, random_act_codes,
                      random_codes, random_weight_qparams, requires_gpu)

needs_triton = pytest.mark.skipif("triton" not in KERNEL_BACKENDS,
                                  reason="Triton kernels need a GPU or TRITON_INTERPRET=1")
if "triton" in KERNEL_BACKENDS:
    import triton
    import triton.language as tl

    from qvdit_kernels.triton import act_quant as aq
    from qvdit_kernels.triton import gemm, tune, unpack

    INTERPRET = DEVICE.type != "cuda"

    @triton.jit
    def _unpack_probe(p_ptr, out_ptr, BITS: tl.constexpr, TAIL: tl.constexpr, R: tl.constexpr,
                      USE_ASM: tl.constexpr):
        """One packed tile per row -> its codes: W4 64 bytes -> 128; W3 96 -> 256; W3 tail 48 -> 128."""
        r = tl.arange(0, R)[:, None]
        if BITS == 4:
            w = unpack.unpack_w4(tl.load(p_ptr + r * 64 + tl.arange(0, 64)[None, :]), USE_ASM)
            tl.store(out_ptr + r * 128 + tl.arange(0, 128)[None, :], w)
        elif TAIL:
            base = p_ptr + r * 48 + tl.arange(0, 16)[None, :]
            w = unpack.unpack_w3_tail(tl.load(base), tl.load(base + 16), tl.load(base + 32), USE_ASM)
            tl.store(out_ptr + r * 128 + tl.arange(0, 128)[None, :], w)
        else:
            base = p_ptr + r * 96 + tl.arange(0, 32)[None, :]
            w0, w1 = unpack.unpack_w3_full(tl.load(base), tl.load(base + 32), tl.load(base + 64), USE_ASM)
            cols = tl.arange(0, 128)[None, :]
            tl.store(out_ptr + r * 256 + cols, w0)
            tl.store(out_ptr + r * 256 + 128 + cols, w1)

    @triton.jit
    def _tile_order_probe(out_ptr, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_N: tl.constexpr):
        pid_m, pid_n = gemm._tile_ids(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_N)
        tl.store(out_ptr + 2 * tl.program_id(0), pid_m)
        tl.store(out_ptr + 2 * tl.program_id(0) + 1, pid_n)


# ----------------------------------------------------------------------------- asm formulas on the host
def emulate_ptx(asm: str, *words: np.ndarray) -> np.ndarray:
    """Run the PTX subset the unpack strings use (and/or/shr on .b32/.u32, .reg declarations) on uint32 arrays."""
    regs = {f"${i + 1}": w.astype(np.uint32) for i, w in enumerate(words)}
    for stmt in asm.strip().strip("{}").split(";"):
        stmt = stmt.strip()
        if not stmt or stmt.startswith(".reg"):
            continue
        op, rest = stmt.split(None, 1)
        dst, a, b = (t.strip() for t in rest.split(","))
        va, vb = regs[a], regs[b] if b in regs else np.uint32(int(b, 0))
        if op == "and.b32":
            regs[dst] = va & vb
        elif op == "or.b32":
            regs[dst] = va | vb
        elif op == "shr.u32":
            regs[dst] = va >> vb
        else:
            raise AssertionError(f"emulator does not know PTX op {op!r}: extend it with the new asm")
    return regs["$0"]


def _words(b: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Pack byte lanes 4 at a time into 32-bit words (lane order[i] into byte i % 4 of word i // 4)."""
    b = b[..., order].astype(np.uint32)
    b = b.reshape(*b.shape[:-1], -1, 4)
    return b[..., 0] | b[..., 1] << 8 | b[..., 2] << 16 | b[..., 3] << 24


def _unwords(w: np.ndarray, order: np.ndarray) -> np.ndarray:
    b = np.stack([(w >> s) & 0xFF for s in (0, 8, 16, 24)], axis=-1).reshape(*w.shape[:-1], -1)
    out = np.empty_like(b)
    out[..., order] = b
    return out.astype(np.uint8)


@pytest.mark.parametrize("grouping", ["consecutive", "shuffled"])
def test_asm_formulas_emulated_equal_formats(grouping):
    """Each asm string, run on 4 packed bytes per word, gives formats.py's codes whatever bytes share a word."""
    from qvdit_kernels.triton import unpack as up  # importing it needs no GPU

    g = gen(1)
    rng = np.random.default_rng(1)
    order = np.arange(64) if grouping == "consecutive" else rng.permutation(64)
    q4 = random_codes(8, 128, 4, g)
    p4 = W4SplitHalves.pack(q4).numpy()  # [8, 64]
    lo = _unwords(emulate_ptx(up.ASM_LO4.value, _words(p4, order)), order)
    hi = _unwords(emulate_ptx(up.ASM_HI4.value, _words(p4, order)), order)
    assert np.array_equal(np.concatenate([lo, hi], 1), q4.numpy())
    for k, lanes in ((256, 32), (128, 16)):  # a full tile and a tail tile
        o = order[order < lanes] if grouping == "shuffled" else np.arange(lanes)
        q3 = random_codes(8, k, 3, g)
        q3[0] = 7
        p3 = W3Planes.pack(q3).numpy().reshape(8, 3, lanes)
        a, b, c = (_words(p3[:, i], o) for i in range(3))
        pieces = [emulate_ptx(up.ASM_LO3.value, a), emulate_ptx(up.ASM_MID3.value, a),
                  emulate_ptx(up.ASM_LO3.value, b), emulate_ptx(up.ASM_MID3.value, b),
                  emulate_ptx(up.ASM_LO3.value, c), emulate_ptx(up.ASM_MID3.value, c),
                  emulate_ptx(up.ASM_C6.value, a, b), emulate_ptx(up.ASM_C7.value, b, c)]
        codes = np.concatenate([_unwords(p, o) for p in pieces], 1)
        assert np.array_equal(codes, q3.numpy())


def _rn32(v: Fraction) -> Fraction:
    """A rational rounded to the nearest float32, ties to even (normal range), exactly."""
    if v == 0:
        return v
    a = abs(v)
    e = a.numerator.bit_length() - a.denominator.bit_length()
    while Fraction(2) ** e > a:
        e -= 1
    while Fraction(2) ** (e + 1) <= a:
        e += 1
    step = Fraction(2) ** (e - 23)
    return (1 if v > 0 else -1) * round(a / step) * step  # round() on a Fraction: half to even


def test_division_formula_is_ieee_exact():
    """The GPU act-quant divides as q0 = x*r, e = fma(-q0, s, x), t = fma(e, r, q0) with r = RN(1/s): in exact
    rational arithmetic (one rounding per op, as FFMA does) t = RN(x/s), also at exact ties and next to them."""
    rng = np.random.default_rng(0)
    for i in range(3000):
        if i % 3 == 0:  # exact ties (k + 1/2) s: s with a short significand
            s = float(np.float32(rng.integers(1, 2**14) * 2.0 ** rng.integers(-40, 1)))
            x = float(np.float32((rng.integers(-127, 127) + 0.5) * s))
        else:
            s = float(np.float32(np.exp(rng.uniform(np.log(1e-8), np.log(1e4)))))
            x = np.float32((rng.integers(-127, 127) + (0.5 if i % 3 == 1 else rng.uniform())) * s)
            x = float(np.nextafter(x, np.float32(np.inf if rng.random() < 0.5 else -np.inf)) if i % 2 else x)
        fx, fs = Fraction(x), Fraction(s)
        r = _rn32(1 / fs)
        q0 = _rn32(fx * r)
        t = _rn32(q0 + _rn32(fx - q0 * fs) * r)
        assert t == _rn32(fx / fs), (x, s)


# ----------------------------------------------------------------------------- pure-Triton (and asm) unpack
def _unpack_case(bits, tail, use_asm):
    r = 16
    k = 128 if (bits == 4 or tail) else 256
    q = random_codes(r, k, bits, gen(bits + tail))
    q[0] = 2**bits - 1
    packed = (W4SplitHalves if bits == 4 else W3Planes).pack(q).to(DEVICE)
    out = torch.full((r, k), -1, dtype=torch.int8, device=DEVICE)
    _unpack_probe[(1,)](packed, out, BITS=bits, TAIL=tail, R=r, USE_ASM=use_asm)
    assert torch.equal(out.cpu(), q.to(torch.int8))


@needs_triton
@pytest.mark.parametrize("bits,tail", [(4, False), (3, False), (3, True)])
def test_pure_triton_unpack_equals_formats(bits, tail):
    _unpack_case(bits, tail, use_asm=False)


@requires_gpu
@needs_triton
@pytest.mark.parametrize("bits,tail", [(4, False), (3, False), (3, True)])
def test_asm_unpack_equals_formats_on_gpu(bits, tail):
    _unpack_case(bits, tail, use_asm=True)


# ----------------------------------------------------------------------------- every config, NaN-prefilled outputs
def _problem(m, k, n, w_bits, a_bits, seed):
    g = gen(seed)
    qw = random_codes(n, k, w_bits, g)
    sw, zw = random_weight_qparams(n, w_bits, g)
    xq = random_act_codes(m, k, a_bits, g)
    sx = torch.exp(torch.empty(m).uniform_(-7, 2.3, generator=g))
    bias, u, beta = torch.randn(n, generator=g), torch.randn(m, generator=g), torch.randn(n, generator=g)
    acc = xq.long() @ (qw.long() - zw.long()[:, None]).T
    y = acc.double() * sx.double()[:, None] * sw.double()[None, :] + bias.double() + u.double()[:, None] * beta.double()
    d = [t.to(DEVICE) for t in (xq, sx, qk.pack_weight(qw, w_bits), sw, zw, bias, u, beta)]
    return d, acc, y


def _launch(d, w_bits, out, cfg, **kw):
    xq, sx, wp, sw, zw, bias, u, beta = d
    rs = xq.sum(1, dtype=torch.int32)
    return gemm.launch(xq, sx, wp, w_bits, sw, zw, bias, u, beta, rs, out, cfg, INTERPRET, **kw)


ALL_CONFIGS = [(b, i) for b in (3, 4, 8) for i in range(len(json.load(open(os.path.join(
    os.path.dirname(qk.__file__), "triton", "configs", "h100.json")))["qgemm"][str(b)]))]


@needs_triton
@pytest.mark.parametrize("w_bits,idx", ALL_CONFIGS)
def test_every_config_in_the_table(w_bits, idx):
    """Each tune-table entry (not only the tuner's pick) gives the exact acc and an in-spec epilogue,
    into outputs pre-filled with NaN / a sentinel (an unwritten tile shows)."""
    cfg = tune.qgemm_configs(w_bits)[idx]
    m, k, n = 70, 384, 130  # W3: one 256 tile + the 128 tail; several tiles along N for the small configs
    d, acc, y = _problem(m, k, n, w_bits, 6 if w_bits == 3 else 8, seed=idx)
    out = torch.full((m, n), -(2**31), dtype=torch.int32, device=DEVICE)
    assert torch.equal(_launch(d, w_bits, out, cfg).cpu().long(), acc)
    out = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    assert_within_spec(_launch(d, w_bits, out, cfg), y.to(torch.bfloat16).double())


@needs_triton
@pytest.mark.parametrize("w_bits", [3, 4, 8])
def test_persistent_programs_cover_every_tile(w_bits):
    """PERSISTENT: fewer programs than tiles (each strides over several): every tile written, exact."""
    m, k, n = 37, 384, 75  # 3 x 5 tiles of 16 x 16 over at most 4 (interpreter) or 2 x SMs programs
    d, acc, y = _problem(m, k, n, w_bits, 8, seed=5)
    cfg = dict(BLOCK_M=16, BLOCK_N=16, GROUP_N=2, num_warps=4, num_stages=1, PERSISTENT=1 if INTERPRET else 2)
    if not INTERPRET:  # on a GPU: enough tiles that every program takes several
        m, k, n = 4000, 384, 1200
        d, acc, y = _problem(m, k, n, w_bits, 8, seed=5)
        cfg = dict(BLOCK_M=128, BLOCK_N=128, GROUP_N=4, num_warps=4, num_stages=2, PERSISTENT=2)
    out = torch.full((m, n), -(2**31), dtype=torch.int32, device=DEVICE)
    assert torch.equal(_launch(d, w_bits, out, cfg).cpu().long(), acc)
    out = torch.full((m, n), float("nan"), dtype=torch.float32, device=DEVICE)
    assert_within_spec(_launch(d, w_bits, out, cfg), y)


@needs_triton
@pytest.mark.parametrize("w_bits", [3, 4, 8])
def test_nan_prefilled_fp32_out_ragged(w_bits):
    """Ragged M/N/K against the small interpreter tile: every output element written, within SPEC."""
    m, k, n = 37, 200, 75
    d, acc, y = _problem(m, k, n, w_bits, 8, seed=3)
    out = torch.full((m, n), float("nan"), dtype=torch.float32, device=DEVICE)
    cfg = tune.INTERPRET_QGEMM if INTERPRET else tune.qgemm_configs(w_bits, m)[0]
    assert_within_spec(_launch(d, w_bits, out, cfg), y)


@needs_triton
@pytest.mark.parametrize("m,n,bm,bn,group", [(37, 75, 16, 16, 2), (128, 40, 32, 16, 4), (5, 300, 16, 32, 8),
                                             (300, 7, 32, 16, 3)])
def test_grouped_tile_order_is_a_permutation(m, n, bm, bn, group):
    num_m, num_n = -(-m // bm), -(-n // bn)
    out = torch.full((num_m * num_n, 2), -1, dtype=torch.int32, device=DEVICE)
    _tile_order_probe[(num_m * num_n,)](out, m, n, BLOCK_M=bm, BLOCK_N=bn, GROUP_N=group)
    ids = out.cpu()
    assert sorted(map(tuple, ids.tolist())) == [(i, j) for i in range(num_m) for j in range(num_n)]
    # programs of one group stay inside GROUP_N weight tiles
    for pid in range(num_m * num_n):
        first = pid // (group * num_m) * group
        assert first <= ids[pid, 1] < first + group


@needs_triton
def test_use_asm_rejected_by_interpreter():
    if not INTERPRET:
        pytest.skip("only the interpreter rejects inline asm")
    d, _, _ = _problem(4, 128, 8, 4, 8, seed=0)
    with pytest.raises(ValueError, match="use_asm"):
        _launch(d, 4, torch.empty(4, 8, dtype=torch.int32), tune.INTERPRET_QGEMM, use_asm=True)


# ----------------------------------------------------------------------------- act-quant launch variants
@needs_triton
@pytest.mark.parametrize("bits", [6, 8])
@pytest.mark.parametrize("path", ["one_piece", "three_pieces", "two_pass", "persistent"])
def test_act_quant_paths_equal_reference(bits, path):
    """Every kernel path (row in one tile; row in power-of-two pieces; two passes over K chunks; programs
    striding over row blocks) gives the reference's codes, scales and row sums bit for bit, u in its bound."""
    m, k = 9, 200
    x = torch.randn(m, k, generator=gen(bits)) * 3
    x[2] = 0.0
    x[4, 7] = 1e4
    x[6, 199] = -2e3  # an outlier in the last piece
    alpha, gate, fid = torch.randn(k, generator=gen(1)), torch.tensor([0.5, 2.0]), (torch.arange(m) % 2).int()
    params = {"one_piece": aq.one_pass(4, k, 4),
              "three_pieces": dict(BLOCK_M=4, P0=128, P1=64, P2=8, P3=0, ONE_PASS=True, num_warps=4),
              "two_pass": aq.two_pass(2, 64, 4),
              "persistent": aq.two_pass(1, 64, 4, per_sm=1)}[path]  # 9 row blocks over 4 (GPU: all SMs)
    got = aq.act_quant(x.to(DEVICE), bits, alpha.to(DEVICE), gate.to(DEVICE), fid.to(DEVICE), True,
                       interpret=INTERPRET, params=params)
    xq, s, u, rs = ref.quantize_activation(x, bits, alpha, gate, fid, want_rowsum=True)
    assert torch.equal(got[0].cpu(), xq) and torch.equal(got[1].cpu(), s) and torch.equal(got[3].cpu(), rs)
    assert ref.u_within_bound(got[2].cpu(), xq, s, alpha, gate, fid)


@needs_triton
def test_act_quant_pieces_cover_k():
    """The pieces are distinct powers of two (at most four) that cover K with less than MIN_PIECE padding
    when K has at most four binary digits above MIN_PIECE."""
    for k in [1, 63, 64, 200, 1152, 1536, 3072, 4608, 5120, 8960, 12288, 13824, 15000, 16384]:
        p = [w for w in aq.pieces(k) if w]
        assert len(p) <= aq.MAX_PIECES and len(set(p)) == len(p) and all(w & (w - 1) == 0 for w in p), k
        assert sum(p) >= k and p == sorted(p, reverse=True), k
    assert aq.pieces(1536) == (1024, 512, 0, 0) and aq.pieces(8960) == (8192, 512, 256, 0)
    assert aq.pieces(13824) == (8192, 4096, 1024, 512) and aq.pieces(15000) == (8192, 4096, 2048, 1024)


@needs_triton
@pytest.mark.parametrize("k", [200, 1152, 2100, 5000])
def test_act_quant_every_tuner_candidate(k):
    """Each launch config the tuner may pick for this K gives the reference's codes, scales, sums and u."""
    m = 6
    x = torch.randn(m, k, generator=gen(k)) * 2
    x[1, 3] = float("nan")
    x[2] = 0.0
    alpha = torch.randn(k, generator=gen(1))
    xq, s, u, rs = ref.quantize_activation(x, 8, alpha, want_rowsum=True)
    for prm in aq.candidates(k):
        got = [t.cpu() for t in aq.act_quant(x.to(DEVICE), 8, alpha.to(DEVICE), None, None, True,
                                               interpret=INTERPRET, params=prm)]
        assert torch.equal(got[0], xq) and torch.equal(got[3], rs), prm
        assert torch.equal(got[1].isnan(), s.isnan()) and torch.equal(got[1][~s.isnan()], s[~s.isnan()]), prm
        assert ref.u_within_bound(got[2], xq, s, alpha), prm


# ----------------------------------------------------------------------------- custom ops
def _op_args(m=5, k=130, n=12, w_bits=3, a_bits=6):
    d, _, _ = _problem(m, k, n, w_bits, a_bits, seed=7)
    xq, sx, wp, sw, zw, bias, u, beta = d
    return d, dict(xq=xq, x_scale=sx, w_packed=wp, w_bits=w_bits, w_scale=sw, w_zero=zw, bias=bias, u=u, beta=beta,
                   x_rowsum=None, out_dtype=torch.bfloat16, activation="", residual=None, residual_gate=None)


@needs_triton
def test_opcheck_custom_ops():
    d, a = _op_args()
    torch.library.opcheck(torch.ops.qvdit.triton_qgemm.default, tuple(a.values()))
    x = torch.randn(5, 130, generator=gen(2)).to(DEVICE)
    alpha, gate, fid = torch.randn(130).to(DEVICE), torch.ones(2).to(DEVICE), torch.zeros(5, dtype=torch.int32).to(DEVICE)
    torch.library.opcheck(torch.ops.qvdit.triton_act_quant.default, (x, 6, alpha, gate, fid, True))
    torch.library.opcheck(torch.ops.qvdit.triton_act_quant.default, (x, 8, None, None, None, False))
    torch.library.opcheck(torch.ops.qvdit.triton_act_quant.default, (x, 6, alpha, gate, fid, True, "gelu_tanh"))
    _, _, wp, sw, zw, bias, _, beta = d
    torch.library.opcheck(torch.ops.qvdit.triton_qlinear.default,
                          (x, wp, 3, sw, zw, 6, bias, alpha, beta, gate, fid, torch.float32, "", None, None))
    # the epilogue tail: GELU, then a residual with a per-row-group gate
    res, rgate = torch.randn(5, 12).to(DEVICE), torch.randn(1, 12).to(DEVICE)
    torch.library.opcheck(torch.ops.qvdit.triton_qlinear.default,
                          (x, wp, 3, sw, zw, 6, bias, alpha, beta, gate, fid, torch.float32, "gelu_tanh", res, rgate))
    torch.library.opcheck(torch.ops.qvdit.triton_qlinear.default,  # the GELU of x in the act-quant pass
                          (x, wp, 3, sw, zw, 6, bias, alpha, beta, gate, fid, torch.float32, "", res, rgate, "gelu_tanh"))
    torch.library.opcheck(torch.ops.qvdit.triton_qgemm.default,
                          tuple(dict(a, activation="gelu_tanh", residual=res.bfloat16(), residual_gate=None).values()))


@needs_triton
def test_eager_calls_skip_the_custom_op_dispatch(monkeypatch):
    """Plain eager calls run the kernel implementation directly (the custom op's Python dispatch costs ~0.1 ms
    a call); traced, fake or autograd inputs go through the op. Both give the same results."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    from qvdit_kernels.triton import library

    x = torch.randn(5, 130, generator=gen(2)).to(DEVICE)
    assert library._eager(x, None) and not library._eager(x.clone().requires_grad_())
    p = torch.nn.Parameter(torch.ones(3))
    assert not library._eager(x, p)  # any argument that needs grad: the op (its backward raises)
    with torch.no_grad():
        assert library._eager(x, p)  # a TQE parameter at inference
    with FakeTensorMode() as mode:
        assert not library._eager(mode.from_tensor(x))
    traced = make_fx(lambda t: qk.quantize_activation_rowsum(t, 6, backend="triton")[0])(x)
    assert "triton_act_quant" in str(traced.graph)  # make_fx sees the op, not the kernel's pieces
    seen = []
    real = torch.ops.qvdit.triton_act_quant
    monkeypatch.setattr(torch.ops.qvdit, "triton_act_quant", lambda *a: seen.append(1) or real(*a))
    eager = qk.quantize_activation_rowsum(x, 6, backend="triton")
    assert not seen
    monkeypatch.setattr(library, "_eager", lambda *tensors: False)
    via_op = qk.quantize_activation_rowsum(x, 6, backend="triton")
    assert seen and all(torch.equal(a, b) for a, b in zip(eager, via_op) if a is not None)


@needs_triton
def test_torch_compile_fullgraph_qlinear():
    """qk.qlinear on backend="triton" traces into one graph (no graph break) and matches eager."""
    d, _ = _op_args(w_bits=4)
    _, _, wp, sw, zw, bias, _, beta = d
    x = torch.randn(2, 5, 130, generator=gen(3)).to(DEVICE)
    alpha = torch.randn(130, generator=gen(4)).to(DEVICE)

    def f(x):
        return qk.qlinear(x, wp, 4, sw, zw, 8, bias=bias, alpha=alpha, beta=beta, backend="triton")

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager" if INTERPRET else "inductor")
    assert torch.equal(compiled(x), f(x))


@requires_gpu
@needs_triton
def test_cuda_graph_replay_equals_eager():
    d, _ = _op_args(m=300, k=1152, n=256, w_bits=3)
    _, _, wp, sw, zw, bias, _, beta = d
    x = torch.randn(300, 1152, generator=gen(5)).to(DEVICE)
    alpha, gate = torch.randn(1152).to(DEVICE), torch.tensor([0.5, 1.5], device=DEVICE)
    fid = (torch.arange(300, device=DEVICE) % 2).int()

    def f():
        return qk.qlinear(x, wp, 3, sw, zw, 6, bias=bias, alpha=alpha, beta=beta, gate=gate, frame_id=fid,
                          out_dtype=torch.bfloat16, backend="triton")

    eager = f()  # also tunes before capture
    graph, out = capture_cuda_graph(f)
    x.normal_()  # new input, same buffer: the replay must follow it
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, f())
    assert not torch.equal(out, eager)


# ----------------------------------------------------------------------------- GPU at real shapes
SHAPES_JSON = [os.path.join(os.path.dirname(__file__), "..", "..", "shared", "bench_shapes.json")]


def _real_shapes():
    """bench_shapes.json's (K, N) pairs (M shrunk for tests); a fixed list where the file is not beside the repo."""
    for p in SHAPES_JSON:
        if os.path.exists(p):
            return sorted({(k, n) for _, k, n in json.load(open(p))["shapes"].values()})
    return [(1152, 3456), (1152, 4608), (4608, 1152), (1536, 1536), (1536, 8960), (8960, 1536), (3072, 9216),
            (3072, 12288), (12288, 3072), (5120, 5120), (5120, 13824), (13824, 5120)]


@requires_gpu
@needs_triton
@pytest.mark.parametrize("w_bits,a_bits", [(3, 6), (4, 8), (3, 8), (4, 6), (8, 8)])
def test_gpu_real_shapes_bit_exact(w_bits, a_bits):
    """Every (K, N) of bench_shapes.json at M = 1000: int32 acc bit-exact (float64 GEMM on the GPU is exact
    here), bf16 epilogue within SPEC, the asm and pure-Triton mainloops identical, two calls bit-identical."""
    m = 1000
    for k, n in _real_shapes():
        g = torch.Generator(device=DEVICE).manual_seed(k + n)
        lim = 127 if a_bits == 8 else 63
        xq = torch.randint(-lim, lim + 1, (m, k), generator=g, device=DEVICE, dtype=torch.int8)
        hi = 2**w_bits if w_bits < 8 else 128
        qw = torch.randint(0 if w_bits < 8 else -127, hi, (n, k), generator=g, device=DEVICE)
        qw = qw.to(torch.uint8 if w_bits < 8 else torch.int8)
        zw = torch.randint(0, 2**w_bits, (n,), generator=g, device=DEVICE).float() if w_bits < 8 else \
            torch.zeros(n, device=DEVICE)
        sw = torch.rand(n, generator=g, device=DEVICE) * 1e-2 + 1e-4
        sx = torch.rand(m, generator=g, device=DEVICE) * 1e-2 + 1e-4
        wp = qk.pack_weight(qw.cpu(), w_bits).to(DEVICE)
        acc_ref = xq.double() @ (qw.double() - zw.double()[:, None]).T
        acc = qk.qgemm(xq, sx, wp, w_bits, sw, zw, out_dtype=torch.int32, backend="triton")
        assert torch.equal(acc.double(), acc_ref), (k, n)
        y = qk.qgemm(xq, sx, wp, w_bits, sw, zw, out_dtype=torch.bfloat16, backend="triton")
        assert_within_spec(y, (acc_ref * sx.double()[:, None] * sw.double()[None, :]).to(torch.bfloat16).double())
        assert torch.equal(y, qk.qgemm(xq, sx, wp, w_bits, sw, zw, out_dtype=torch.bfloat16, backend="triton"))
        rs = xq.sum(1, dtype=torch.int32)
        out = torch.empty(m, n, dtype=torch.int32, device=DEVICE)
        cfg = tune.qgemm_configs(w_bits, m)[0]
        gemm.launch(xq, sx, wp, w_bits, sw, zw, None, None, None, rs, out, cfg, False, use_asm=False)
        assert torch.equal(out, acc), (k, n)


@requires_gpu
@needs_triton
@pytest.mark.parametrize("k", [1152, 5120, 8960, 13824, 20000, 65536])
@pytest.mark.parametrize("bits", [6, 8])
def test_gpu_act_quant_real_k_bit_exact(k, bits):
    """Codes, scales and row sums equal the reference bit for bit at real K (and the two-pass K > 16384).

    The reference runs on the CPU: PyTorch's CUDA division by a Python scalar multiplies by the
    reciprocal (one bit less exact), while SPEC 1.1 and the kernel divide per IEEE."""
    m = 300 if k <= 20000 else 40
    x = (torch.randn(m, k, device=DEVICE) * torch.exp(torch.randn(m, 1, device=DEVICE))).to(torch.bfloat16)
    x[3, 11] = 3e3
    x[5] = 0
    alpha = torch.randn(k, device=DEVICE) / k**0.5
    xq, s, u, rs = qk.quantize_activation_rowsum(x, bits, alpha=alpha, backend="triton")
    rq, rsc, ru, rrs = ref.quantize_activation(x.cpu(), bits, alpha.cpu(), want_rowsum=True)
    assert torch.equal(xq.cpu(), rq) and torch.equal(s.cpu(), rsc) and torch.equal(rs.cpu(), rrs)
    assert ref.u_within_bound(u.cpu(), rq, rsc, alpha.cpu())
