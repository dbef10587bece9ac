"""`norm_quantize`: LayerNorm + modulation fused with the act-quant of its output for J consumers (issue 6
item 5). Kernel: qvdit_kernels/triton/norm_quant.py; reference: reference.norm_quantize (F.layer_norm, then
quantize_activation). The kernel's y may differ from torch's LayerNorm by float rounding, so: y within one
ulp of the output dtype, and the codes, scales and row sums bit-exact against quantize_activation of the
kernel's own y; u within reference.tqe_u_bound per consumer."""
import pytest
import torch

import qvdit_kernels as qk
from qvdit_kernels import reference as ref

from conftest import DEVICE, KERNEL_BACKENDS, backends_for, device_for, gen, run_isolated, ulp


def _problem(m, k, batch, per_token, affine, seed, dtype=torch.bfloat16):
    g = gen(seed)
    x = (torch.randn(m * batch, k, generator=g) * 3 + torch.randn(1, k, generator=g)).to(dtype)
    x[1, 5] = 40.0  # an outlier
    kw = dict(eps=1e-6)
    if affine:
        kw.update(weight=torch.rand(k, generator=g) + 0.5, bias=torch.randn(k, generator=g) * 0.1)
    rows = m * batch if per_token else batch
    kw.update(scale=torch.randn(rows, k, generator=g) * 0.2, shift=torch.randn(rows, k, generator=g) * 0.2,
              mod_rows=1 if per_token else m)
    alphas = torch.randn(3, k, generator=g) / k**0.5
    gates = torch.rand(3, 4, generator=g) + 0.5
    fid = (torch.arange(m * batch) * 4 // (m * batch)).int()
    return x, kw, alphas, gates, fid


@pytest.mark.parametrize("backend", backends_for("norm_quantize"))
@pytest.mark.parametrize("bits", [6, 8])
@pytest.mark.parametrize("m,k,batch,per_token,affine", [(37, 200, 1, False, False), (20, 96, 2, False, True),
                                                        (9, 333, 2, True, False)])
def test_norm_quantize_matches_reference(backend, bits, m, k, batch, per_token, affine):
    x, kw, alphas, gates, fid = _problem(m, k, batch, per_token, affine, seed=bits + k)
    dev = device_for(backend)
    t = lambda v: v.to(dev) if isinstance(v, torch.Tensor) else v  # noqa: E731
    y, xq, sx, u, rs = (None if v is None else v.cpu() for v in qk.norm_quantize(
        t(x), bits, **{n: t(v) for n, v in kw.items()}, alphas=t(alphas), gates=t(gates), frame_id=t(fid),
        backend=backend))
    y_ref = ref.layer_norm_modulate(x, **kw)
    assert y.dtype == x.dtype and ((y.float() - y_ref.float()).abs() <= ulp(y_ref)).all()
    q2, s2, _, r2 = ref.quantize_activation(y, bits, want_rowsum=True)  # the codes of the kernel's own y
    assert torch.equal(xq, q2) and torch.equal(sx, s2) and torch.equal(rs, r2)
    assert u.shape == (3, x.shape[0])
    for j in range(3):
        assert ref.u_within_bound(u[j], xq, sx, alphas[j], gates[j], fid), j
    assert not ref.u_within_bound(u[0] * (1 + 1e-3), xq, sx, alphas[0], gates[0], fid)


@pytest.mark.parametrize("backend", backends_for("norm_quantize"))
def test_norm_quantize_plain_and_nonfinite(backend):
    """No affine, no modulation, no TQE: y = LN(x); a row holding inf gets scale NaN and zero codes."""
    x = torch.randn(6, 64, generator=gen(3))
    x[2, 7] = float("inf")
    dev = device_for(backend)
    y, xq, sx, u, rs = (None if v is None else v.cpu() for v in qk.norm_quantize(x.to(dev), 8, 1e-5,
                                                                                 backend=backend))
    assert u is None
    ok = [0, 1, 3, 4, 5]
    assert torch.allclose(y[ok], torch.nn.functional.layer_norm(x[ok], (64,), eps=1e-5), rtol=1e-5, atol=1e-5)
    assert torch.isnan(sx[2]) and (xq[2] == 0).all() and rs[2] == 0
    q2, s2, _, r2 = ref.quantize_activation(y[ok], 8, want_rowsum=True)
    assert torch.equal(xq[ok], q2) and torch.equal(sx[ok], s2) and torch.equal(rs[ok], r2)


@pytest.mark.parametrize("backend", backends_for("norm_quantize"))
@pytest.mark.parametrize("gate_rows", [None, 2, 40])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_add_norm_quantize_matches_reference(backend, gate_rows, dtype):
    """add_norm_quantize: h = the block's (gated) residual add bit for bit (reference.epilogue_tail: no FMA), then
    norm_quantize(h): y within one ulp, the codes those of the kernel's own y, u in bound; write_y=False gives the
    same codes and no y. gate_rows: per batch (2 rows for 40 tokens) or per token."""
    m, k = 40, 200
    x, kw, alphas, gates, fid = _problem(20, k, 2, False, True, seed=k + (gate_rows or 0), dtype=dtype)
    g = gen(11)
    out = (torch.randn(m, k, generator=g) * 2).to(dtype)  # an attention output
    rgate = None if gate_rows is None else torch.rand(gate_rows, k, generator=g) * 2 - 0.5
    dev = device_for(backend)
    t = lambda v: v.to(dev) if isinstance(v, torch.Tensor) else v  # noqa: E731
    args = (t(out), t(x), 6, kw["eps"], t(kw["weight"]), t(kw["bias"]), t(kw["scale"]), t(kw["shift"]),
            kw["mod_rows"], t(alphas), t(gates), t(fid))
    h, y, xq, sx, u, rs = (None if v is None else v.cpu() for v in qk.add_norm_quantize(
        *args, residual_gate=t(rgate), backend=backend))
    h_ref = ref.epilogue_tail(out, None, x, rgate)
    assert h.dtype == dtype and torch.equal(h, h_ref), "h: the residual add"
    y_ref = ref.layer_norm_modulate(h_ref, **kw)
    assert ((y.float() - y_ref.float()).abs() <= ulp(y_ref) + 2.0**-22).all()
    q2, s2, _, r2 = ref.quantize_activation(y, 6, want_rowsum=True)
    assert torch.equal(xq, q2) and torch.equal(sx, s2) and torch.equal(rs, r2)
    for j in range(3):
        assert ref.u_within_bound(u[j], xq, sx, alphas[j], gates[j], fid), j
    h2, y2, xq2, sx2, u2, rs2 = qk.add_norm_quantize(*args, residual_gate=t(rgate), write_y=False, backend=backend)
    assert y2 is None and torch.equal(h2.cpu(), h) and torch.equal(xq2.cpu(), xq) and torch.equal(sx2.cpu(), sx)
    assert torch.equal(rs2.cpu(), rs) and torch.equal(u2.cpu(), u)


@pytest.mark.parametrize("backend", backends_for("norm_quantize"))
def test_norm_quantize_write_y_false_gives_the_same_codes(backend):
    x, kw, alphas, gates, fid = _problem(9, 333, 2, True, False, seed=5)
    dev = device_for(backend)
    t = lambda v: v.to(dev) if isinstance(v, torch.Tensor) else v  # noqa: E731
    full = qk.norm_quantize(t(x), 8, **{n: t(v) for n, v in kw.items()}, alphas=t(alphas), backend=backend)
    part = qk.norm_quantize(t(x), 8, **{n: t(v) for n, v in kw.items()}, alphas=t(alphas), write_y=False,
                            backend=backend)
    assert part[0] is None and full[0] is not None
    assert all(torch.equal(a, b) for a, b in zip(full[1:], part[1:]))


def test_add_norm_quantize_errors():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="residual must have shape"):
        qk.add_norm_quantize(x, torch.randn(4, 7), 8, 1e-6)
    with pytest.raises(TypeError, match="residual must have dtype"):
        qk.add_norm_quantize(x, torch.randn(4, 8, dtype=torch.bfloat16), 8, 1e-6)
    with pytest.raises(ValueError, match="residual_gate has 3 rows"):
        qk.add_norm_quantize(x, x, 8, 1e-6, residual_gate=torch.ones(3, 8))
    with pytest.raises(TypeError, match="residual_gate must have dtype"):
        qk.add_norm_quantize(x, x, 8, 1e-6, residual_gate=torch.ones(2, 8, dtype=torch.float64))
    with pytest.raises(TypeError, match="write_y must be a bool"):
        qk.norm_quantize(x, 8, 1e-6, write_y=1)


def test_norm_quantize_errors():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="bits must be one of"):
        qk.norm_quantize(x, 4, 1e-6)
    with pytest.raises(ValueError, match="weight and bias"):
        qk.norm_quantize(x, 8, 1e-6, weight=torch.ones(8))
    with pytest.raises(ValueError, match="scale and shift"):
        qk.norm_quantize(x, 8, 1e-6, scale=torch.ones(1, 8))
    with pytest.raises(ValueError, match="scale must have shape"):
        qk.norm_quantize(x, 8, 1e-6, scale=torch.ones(1, 7), shift=torch.ones(1, 7))
    with pytest.raises(ValueError, match="must cover 4 rows"):
        qk.norm_quantize(x, 8, 1e-6, scale=torch.ones(1, 8), shift=torch.ones(1, 8), mod_rows=2)
    with pytest.raises(ValueError, match="mod_rows must be"):
        qk.norm_quantize(x, 8, 1e-6, scale=torch.ones(1, 8), shift=torch.ones(1, 8), mod_rows=0)
    with pytest.raises(ValueError, match="gates given without alphas"):
        qk.norm_quantize(x, 8, 1e-6, gates=torch.ones(1, 2))
    with pytest.raises(ValueError, match="alphas must have shape"):
        qk.norm_quantize(x, 8, 1e-6, alphas=torch.ones(2, 7))


@pytest.mark.skipif("triton" not in KERNEL_BACKENDS, reason="Triton runs on a GPU or under TRITON_INTERPRET=1")
@pytest.mark.parametrize("k,j", [(600, 3), (1100, 1), (1500, 0)])
def test_every_norm_quant_candidate(k, j):
    """Each launch config the tuner may pick (one tile; CHUNK-wide steps) gives y within one ulp of the
    reference and the exact codes of its own y, u in bound."""
    from qvdit_kernels.backends import interpret_mode
    from qvdit_kernels.triton import norm_quant as nq

    x, kw, alphas, gates, fid = _problem(7, k, 2, False, True, seed=k)
    alphas, gates = (alphas[:j], gates[:j]) if j else (None, None)
    y_ref = ref.layer_norm_modulate(x, **kw)
    dev = DEVICE
    args = [x.to(dev), 6, kw["eps"], kw["weight"].to(dev), kw["bias"].to(dev), kw["scale"].to(dev),
            kw["shift"].to(dev), kw["mod_rows"], None if alphas is None else alphas.to(dev),
            None if gates is None else gates.to(dev), fid.to(dev)]
    cands = nq.candidates(k, j)
    assert any(c["CHUNKED"] for c in cands)
    for prm in cands:
        prm = dict(prm, num_warps=1) if interpret_mode() else prm
        y, xq, sx, u, rs, _ = (None if v is None else v.cpu() for v in nq.norm_quant(
            *args, interpret=interpret_mode(), params=prm))
        assert ((y.float() - y_ref.float()).abs() <= ulp(y_ref)).all(), prm
        q2, s2, _, r2 = ref.quantize_activation(y, 6, want_rowsum=True)
        assert torch.equal(xq, q2) and torch.equal(sx, s2) and torch.equal(rs, r2), prm
        for jj in range(j):
            assert ref.u_within_bound(u[jj], xq, sx, alphas[jj], gates[jj], fid), (prm, jj)
        if k != 600:
            continue
        # add_norm_quantize's input (each kernel, at one K): x as the residual plus a gated output; y not written,
        # the codes the same as those of the norm of the stored h
        out = (torch.randn(x.shape, generator=gen(k)) * 2).to(x.dtype)
        rg = torch.rand(2, k, generator=gen(k + 1))
        # (compared with the same launch writing y, not with a plain launch on h: the add runs without FMA
        # contraction on a GPU, so another launch's y may differ by an ulp)
        got = [[None if v is None else v.cpu() for v in nq.norm_quant(
            out.to(dev), *args[1:], interpret=interpret_mode(), params=prm, residual=x.to(dev),
            residual_gate=rg.to(dev), write_y=w)] for w in (True, False)]
        (y2, xq2, sx2, _, rs2, h), codes_only = got
        assert torch.equal(h, ref.epilogue_tail(out, None, x, rg)), prm
        h_ref = ref.layer_norm_modulate(h, **kw)
        assert ((y2.float() - h_ref.float()).abs() <= ulp(h_ref)).all(), prm
        q2, s2, _, r2 = ref.quantize_activation(y2, 6, want_rowsum=True)
        assert torch.equal(xq2, q2) and torch.equal(sx2, s2) and torch.equal(rs2, r2), prm
        assert codes_only[0].shape == (0, k) and torch.equal(codes_only[5], h), prm
        for a, b in zip(codes_only[1:5], got[0][1:5]):  # codes, scales, u, row sums: the same without y
            assert (a is None and b is None) or torch.equal(a, b), prm


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_opcheck_norm_quant_op(backend):
    """Each kernel's custom op (triton_norm_quant, cuda_norm_quant): schema and fake / Meta impl agree with the
    kernel (what torch.compile traces), with and without modulation and TQE terms."""
    if backend not in KERNEL_BACKENDS:
        pytest.skip("Triton runs on a GPU or under TRITON_INTERPRET=1" if backend == "triton"
                    else "needs a GPU and the built CUDA extension")
    if backend == "triton":
        import qvdit_kernels.triton.library  # noqa: F401  (registers torch.ops.qvdit.triton_norm_quant)
    x, kw, alphas, gates, fid = _problem(9, 96, 2, True, True, seed=3)
    t = lambda v: None if v is None else v.to(DEVICE)  # noqa: E731
    op = getattr(torch.ops.qvdit, f"{backend}_norm_quant").default
    torch.library.opcheck(op, (t(x), 6, 1e-6, t(kw["weight"]), t(kw["bias"]), t(kw["scale"]), t(kw["shift"]),
                               kw["mod_rows"], t(alphas), t(gates), t(fid)))
    torch.library.opcheck(op, (t(x), 8, 1e-5, None, None, None, None, 1, None, None, None))
    r, rg = torch.randn_like(x), torch.rand(2, x.shape[1])  # add_norm_quantize's residual and gate; y not written
    torch.library.opcheck(op, (t(x), 6, 1e-6, t(kw["weight"]), t(kw["bias"]), None, None, 1, t(alphas), None, None,
                               t(r), t(rg), False))
    torch.library.opcheck(op, (t(x), 8, 1e-6, None, None, None, None, 1, None, None, None, t(r), None, True))


# ----------------------------------------------------------------------------- the CUDA kernel (csrc/norm_quant.cu)
needs_cuda_ext = pytest.mark.skipif("cuda" not in KERNEL_BACKENDS, reason="needs a GPU and the built CUDA extension")


def _check_against_reference(x, bits, kw, alphas, gates, fid, got):
    """got = norm_quantize's five outputs: y within one ulp (+ 2^-22) of the reference for 16-bit x (float32: within 1e-5
    relative + 1e-5, as test_norm_quantize_plain_and_nonfinite: the mean and variance are summed in another order
    than torch's), codes / scales / row sums those of quantize_activation(y) bit for bit (NaN scales where the row
    is not finite), every u within its bound."""
    y, xq, sx, u, rs = got
    y_ref = ref.layer_norm_modulate(x, **kw)
    finite = torch.isfinite(x.float()).all(dim=1)
    assert y.dtype == x.dtype
    err = (y.float() - y_ref.float()).abs()
    # 16-bit: one ulp, plus 2^-22 where float16's ulp (down to 2^-24 near zero) is finer than the float32 rounding
    # of a y that cancels to near zero; the mean over K = 13824 values summed in another order than torch's moves it
    # by ~1e-7 (torch's own y is 2.1 ulp from the exact one there)
    tol = 1e-5 * (1 + y_ref.float().abs()) if x.dtype == torch.float32 else ulp(y_ref) + 2.0**-22
    assert (err <= tol)[finite].all(), ("y", (err - tol)[finite].max())
    q2, s2, _, r2 = ref.quantize_activation(y, bits, want_rowsum=True)
    assert torch.equal(xq, q2) and torch.equal(rs, r2), "codes / row sums"
    assert torch.equal(sx.isnan(), s2.isnan()) and torch.equal(sx.nan_to_num(), s2.nan_to_num()), "scales"
    assert torch.equal(sx.isnan(), ~finite)
    for j in range(0 if alphas is None else alphas.shape[0]):  # (NaN u on the non-finite rows, as the bound wants)
        assert ref.u_within_bound(u[j], xq, sx, alphas[j], None if gates is None else gates[j], fid), j


@needs_cuda_ext
@pytest.mark.parametrize("k", [8, 1152, 1536, 2048, 3072, 4096, 5120, 8192, 8960, 13824, 20480])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cuda_norm_quant_real_widths(k, dtype):
    """csrc/norm_quant.cu (through backend="cuda") on every launch shape (bf16: 1, 2, 4 or 8 warps of 6 chunks per
    row at K = 1536, 3072, 5120, 8960, of 8 at K = 2048, 4096, 8192, 13824; 8 warps of 16 at K = 20480), with a
    partial last CTA, an outlier, a row of zeros and non-finite rows (scale NaN, zero codes); bits 6 and 8, with and
    without affine, per-batch and per-token modulation, 0-3 TQE consumers."""
    from qvdit_kernels.cuda import norm_quant_ok

    m, batch = 37, 3  # (111 rows: a partial last CTA for 1, 2 and 4 warps per row)
    cases = [(6, True, False, 3), (8, False, True, 1), (6, False, False, 0), (8, True, True, 2)]
    for n, (bits, affine, per_token, j) in enumerate(cases):
        x, kw, alphas, gates, fid = _problem(m, k, batch, per_token, affine, seed=k + n, dtype=dtype)
        x[4] = 0
        if n < 2 and k > 8:  # (both widths of the non-finite path)
            x[7, k // 2] = float("inf")
            x[9, k - 1] = float("nan")
        alphas, gates = (alphas[:j], gates[:j]) if j else (None, None)
        t = lambda v: v.to(DEVICE) if isinstance(v, torch.Tensor) else v  # noqa: E731
        assert norm_quant_ok(t(x), j) == (k * x.element_size() <= 65536)  # (fp32 K = 20480: Triton's kernel)
        mod = {n: t(v) for n, v in kw.items()}
        if n % 2:  # add_norm_quantize: x is the residual, plus an output (gated per batch in case 1)
            out = (torch.randn(x.shape, generator=gen(n)) * 2).to(dtype)
            rg = torch.rand(batch, k, generator=gen(n + 1)) if n == 1 else None
            h, *got = qk.add_norm_quantize(t(out), t(x), bits, **mod, alphas=t(alphas), gates=t(gates),
                                           frame_id=t(fid), residual_gate=t(rg), backend="cuda")
            x = ref.epilogue_tail(out, None, x, rg)
            torch.testing.assert_close(h.cpu(), x, rtol=0, atol=0, equal_nan=True, msg="h: the residual add")
        else:
            got = qk.norm_quantize(t(x), bits, **mod, alphas=t(alphas), gates=t(gates), frame_id=t(fid), backend="cuda")
        got = [None if v is None else v.cpu() for v in got]
        assert (got[3] is None) if j == 0 else got[3].shape == (j, m * batch)
        _check_against_reference(x, bits, kw, alphas, gates, fid, got)


@needs_cuda_ext
def test_cuda_norm_quant_takes_rows_it_can_hold_and_routes_the_rest():
    """norm_quant_ok: aligned rows of whole 16-byte chunks up to 64 KB and <= 3 consumers; backend="cuda" hands any
    other row to Triton's kernel, with the same contract (K = 333, a view 8 bytes into its rows, 4 consumers)."""
    from qvdit_kernels.cuda import norm_quant_ok

    x = torch.randn(8, 1536, device=DEVICE, dtype=torch.bfloat16)
    assert norm_quant_ok(x) and norm_quant_ok(x, 3) and not norm_quant_ok(x, 4)
    assert not norm_quant_ok(x[:, :333]) and not norm_quant_ok(x[:, 4:1028])
    assert not norm_quant_ok(torch.empty(2, 40000, device=DEVICE, dtype=torch.bfloat16))
    assert norm_quant_ok(torch.empty(0, 1536, device=DEVICE, dtype=torch.bfloat16), 3)
    t = lambda v: v.to(DEVICE) if isinstance(v, torch.Tensor) else v  # noqa: E731
    for sl, j in ((slice(0, 333), 3), (slice(4, 1028), 3), (slice(0, 1536), 4)):
        xin, kw, alphas, gates, fid = _problem(9, 1536, 1, False, False, seed=sl.start + j)
        alphas, gates = torch.cat([alphas, alphas[:1]])[:j], torch.cat([gates, gates[:1]])[:j]
        xd = t(xin)[:, sl]  # (sliced on the device: a view into the rows, not an aligned copy)
        assert not norm_quant_ok(xd, j)
        kw = dict(eps=kw["eps"], scale=kw["scale"][:, sl].contiguous(), shift=kw["shift"][:, sl].contiguous(),
                  mod_rows=kw["mod_rows"])
        al = alphas[:, sl].contiguous()
        got = [None if v is None else v.cpu() for v in qk.norm_quantize(
            xd, 6, **{n: t(v) for n, v in kw.items()}, alphas=t(al), gates=t(gates), frame_id=t(fid),
            backend="cuda")]
        _check_against_reference(xin[:, sl], 6, kw, al, gates, fid, got)
    y, xq, sx, u, rs = qk.norm_quantize(x[:0], 6, 1e-6, alphas=t(alphas[:3, :1536]), backend="cuda")  # no rows
    assert y.shape == (0, 1536) and u.shape == (3, 0) and rs.shape == (0,)
    # add_norm_quantize: a residual whose rows the kernel cannot hold (a view 8 bytes into them) goes to Triton too
    wide = torch.randn(8, 1540, device=DEVICE, dtype=torch.bfloat16)
    res = wide[:, 4:]
    assert norm_quant_ok(x) and not norm_quant_ok(res)
    h, y, xq, sx, _, rs = qk.add_norm_quantize(x, res, 8, 1e-6, backend="cuda")
    assert torch.equal(h.cpu(), ref.epilogue_tail(x.cpu(), None, res.cpu()))
    _check_against_reference(h.cpu(), 8, dict(eps=1e-6), None, None, None, (y.cpu(), xq.cpu(), sx.cpu(), None,
                                                                          rs.cpu()))


@needs_cuda_ext
def test_cuda_norm_quant_refuses_a_row_it_cannot_hold():
    """A direct op call with a misaligned row: an error that says what the kernel takes (in a child process: on the
    H200 errors raised in the extension have crashed the process, BENCHMARKS run ws10)."""
    res = run_isolated("""
x = torch.randn(4, 1544, device='cuda').bfloat16()[:, 4:1540]  # (a base 8 bytes into the row)
try:
    torch.ops.qvdit.cuda_norm_quant(x, 6, 1e-6, None, None, None, None, 1, None, None, None)
    print('no error')
except RuntimeError as e:
    print('refused' if 'cuda_norm_quant: x must have 16-byte aligned rows' in str(e) else e)
""")
    assert res.returncode == 0 and res.stdout.split() == ["refused"], (res.returncode, res.stdout, res.stderr[-3000:])
