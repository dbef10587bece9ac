"""Q-VDiT calibration: TMD and Eq. 9 against hand-computed cases, fake quant against the reference math,
gradients, a short calibration that lowers the loss, resume == uninterrupted, deployment, the CLI."""
import copy
import math

import pytest
import torch
from torch import nn

import qvdit_kernels as qk
from qvdit import QuantConfig, load_quantized, quantize_
from qvdit.calibration import calibrate, collect_items, deploy_, eq9_gate, tmd_loss
from qvdit.calibration.calibrate import RECIPES, prepare
from qvdit.calibration.fakequant import FakeQuantLinear, fake_quant_act, fake_quant_weight
from qvdit.calibration.tqe_init import eq9_gates, frame_stats
from qvdit.config import LayerQuant
from qvdit_kernels.reference import quantize_activation, quantize_rows, rowwise_qparams

TINY = dict(patch_size=(1, 4, 4), num_attention_heads=2, attention_head_dim=16, in_channels=3, out_channels=3,
            text_dim=16, freq_dim=32, ffn_dim=64, num_layers=1, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=32)


def tiny_model(seed=0):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(**TINY).eval()


@pytest.fixture(scope="module")
def tiny_items():
    model = tiny_model()
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn(3, 3, 4, 16, 16, generator=gen)
    cond, uncond = torch.randn(3, 3, 16, generator=gen), torch.zeros(3, 3, 16)
    return model, collect_items(model, cond, uncond, noise, steps=3, cfg=2.0)


# ----------------------------------------------------------------------------- TMD
def test_tmd_hand_computed():
    # frames (on dim 2) of the FP output: e0, e1 -> T = I; quantized: e0, e0 -> T = all ones
    fp = torch.zeros(1, 2, 2, 1, 1)
    fp[0, 0, 0], fp[0, 1, 1] = 1.0, 1.0
    q = torch.zeros(1, 2, 2, 1, 1)
    q[0, 0, 0], q[0, 0, 1] = 1.0, 1.0
    p = math.e / (math.e + 1)  # softmax([1, 0])[0]; every row of D_fp is (p, 1-p) up to order, D_q = (1/2, 1/2)
    kl = p * math.log(p / 0.5) + (1 - p) * math.log((1 - p) / 0.5)
    assert tmd_loss(q, fp).item() == pytest.approx(kl, rel=1e-6)
    assert tmd_loss(fp, fp).item() == pytest.approx(0.0, abs=1e-7)
    assert tmd_loss(fp, q).item() > 0  # not symmetric in general, but positive here too


def test_tmd_uses_the_frame_axis():
    gen = torch.Generator().manual_seed(0)
    fp = torch.randn(2, 3, 4, 5, 5, generator=gen)
    q = fp.clone()
    q[:, :, 1] = q[:, :, 2]  # frames 1 and 2 become alike: the frame-similarity structure changes
    assert tmd_loss(q, fp).item() > 1e-4
    # permuting the frames of both changes nothing; a per-pixel scale of all frames alike changes nothing
    perm = torch.tensor([3, 1, 0, 2])
    assert tmd_loss(q[:, :, perm], fp[:, :, perm]).item() == pytest.approx(tmd_loss(q, fp).item(), rel=1e-5)
    assert tmd_loss(fp * 3.0, fp).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="same shape"):
        tmd_loss(q[:, :, :3], fp)


# ----------------------------------------------------------------------------- Eq. 9
def test_eq9_hand_computed():
    # 8-bit symmetric: row (127, 0) quantizes exactly (scale 1); row (127, 0.4) loses its 0.4
    x = torch.tensor([[127.0, 0.0], [127.0, 0.4]])
    fid = torch.tensor([0, 1])
    rho = [1.0, 127.0 / math.sqrt(127.0**2 + 0.4**2)]
    eta = [math.exp(1 - r) for r in rho]
    eta = [e / sum(eta) for e in eta]
    omega = [127.0 / 254.4, 127.4 / 254.4]
    expected = [eta[i] / omega[i] for i in range(2)]
    got = eq9_gate(x, fid, 2, bits=8)
    assert got.tolist() == pytest.approx(expected, rel=1e-6)


def test_eq9_alike_frames_give_ones_and_text_rows_are_ignored():
    gen = torch.Generator().manual_seed(0)
    block = torch.randn(5, 16, generator=gen)
    x = torch.cat([block] * 4 + [100 * torch.randn(3, 16, generator=gen)])  # 4 identical frames + 3 "text" rows
    fid = torch.cat([torch.full((5,), f) for f in range(4)] + [torch.full((3,), 4)])
    m = eq9_gate(x, fid, 4, bits=6)
    assert torch.allclose(m, torch.ones(4), atol=1e-6)
    # a frame with more quantization error relative to its magnitude gets a larger gate; mean stays near 1
    x2 = x.clone()
    x2[5:10] += 0.5 * torch.randn(5, 16, generator=gen) * torch.tensor([40.0] + [1.0] * 15)
    m2 = eq9_gates(frame_stats(x2, fid, 4, 6))
    assert m2.shape == (4,) and abs(float(m2.mean()) - 1) < 0.3


# ----------------------------------------------------------------------------- fake quant == reference math
@pytest.mark.parametrize("bits", [6, 8])
def test_fake_quant_act_is_the_reference_dequantized(bits):
    x = torch.randn(37, 200, generator=torch.Generator().manual_seed(bits)) * 3
    xq, scale, _ = quantize_activation(x, bits)
    assert torch.equal(fake_quant_act(x, bits), scale[:, None] * xq.float())
    xr = x.clone().requires_grad_(True)
    fake_quant_act(xr, bits).sum().backward()
    assert torch.equal(xr.grad, torch.ones_like(x))  # straight through


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_fake_quant_weight_exact_and_lsq_gradients(bits):
    w = torch.randn(24, 40, generator=torch.Generator().manual_seed(bits)) * 0.05
    s, z = rowwise_qparams(w, bits)
    s = (s * 0.8).requires_grad_(True)  # a learned step that clips the row extremes
    wr = w.clone().requires_grad_(True)
    wh = fake_quant_weight(wr, s, z, bits)
    assert torch.equal(wh.detach(), s.detach()[:, None] * (quantize_rows(w, s.detach(), z, bits) - z[:, None]))
    wh.sum().backward()
    v = w / s.detach()[:, None] + z[:, None]
    lo, hi = (-127, 127) if bits == 8 else (0, 2**bits - 1)
    inside = (torch.round(v) >= lo) & (torch.round(v) <= hi) & (v >= lo) & (v <= hi)
    assert torch.equal(wr.grad[inside], torch.ones_like(wr.grad[inside]))
    assert s.grad is not None and bool(torch.isfinite(s.grad).all()) and bool((s.grad != 0).any())


def test_fake_linear_matches_deployed_qlinear():
    lin = nn.Linear(48, 20)
    fake = FakeQuantLinear(lin, LayerQuant(3, 6, True), name="l", num_frames=2, lora_rank=4, weight_init="mse")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        fake.lora_B.normal_(0, 0.01, generator=gen)
        fake.w_log_scale.normal_(0, 0.05, generator=gen)
        fake.beta.normal_(0, 0.1, generator=gen)
    from qvdit.calibration import to_qlinear

    q = to_qlinear(fake, backend="torch")
    assert torch.equal(q.dequantized_weight(), fake.quant_weight().detach())  # the same integer weights
    x = torch.randn(33, 48, generator=gen)
    with torch.no_grad():
        assert torch.allclose(q(x), fake(x), atol=1e-5, rtol=1e-5)


def test_rtn_recipe_deploys_to_quantize_(tiny_items):
    model, items = tiny_items
    a = calibrate(model, items, QuantConfig(w_bits=4, a_bits=8, backend="torch"), "rtn", progress=False)
    b = quantize_(copy.deepcopy(model), QuantConfig(w_bits=4, a_bits=8, backend="torch", tqe=False))
    sa, sb = a.state_dict(), b.state_dict()
    packed = [k for k in sa if k.endswith("w_packed")]
    assert packed and all(torch.equal(sa[k], sb[k]) for k in packed)
    assert all(torch.equal(sa[k.replace("w_packed", "w_scale")], sb[k.replace("w_packed", "w_scale")]) for k in packed)


# ----------------------------------------------------------------------------- gradients
def test_gradients_reach_alpha_beta_gates_scales_lora(tiny_items):
    model, items = tiny_items
    q = copy.deepcopy(model)
    fakes = prepare(q, QuantConfig(w_bits=3, a_bits=6), RECIPES["full"], num_frames=4)
    for f in fakes.values():
        for p in (f.alpha, f.beta, f.gate, f.w_log_scale, f.lora_A, f.lora_B):
            p.requires_grad_(True)
        with torch.no_grad():  # beta = 0 and B = 0 at init would zero alpha's and A's gradients
            f.beta.normal_(0, 0.01)
            f.lora_B.normal_(0, 0.01)
    out = q(hidden_states=items["x"][:2], timestep=items["t"][:2], encoder_hidden_states=items["ehs"][:2],
            return_dict=False)[0]
    (((out - items["y"][:2]) ** 2).mean() + 100 * tmd_loss(out, items["y"][:2])).backward()
    for name, f in fakes.items():
        for pname in ("alpha", "beta", "w_log_scale", "lora_A", "lora_B"):
            g = getattr(f, pname).grad
            assert g is not None and bool(g.abs().sum() > 0), f"{name}.{pname} has no gradient"
        if f.row_kind == "none":  # cross-attention k/v: text rows, no gate
            assert f.gate.grad is None or not bool(f.gate.grad.any())
        else:
            assert bool(f.gate.grad[:4].abs().sum() > 0) and not bool(f.gate.grad[4:].any()), name


# ----------------------------------------------------------------------------- the loop
def _eval_loss(model, items):
    with torch.no_grad():
        out = model(hidden_states=items["x"], timestep=items["t"], encoder_hidden_states=items["ehs"], return_dict=False)[0]
    return float(((out - items["y"]) ** 2).mean() + 100 * tmd_loss(out, items["y"]))


def test_short_calibration_lowers_the_loss(tiny_items):
    model, items = tiny_items
    cfg = QuantConfig(w_bits=3, a_bits=6, backend="torch")
    lr = {"tqe": 1e-2, "gate": 1e-2, "lora": 1e-3, "scale": 1e-2}
    before = _eval_loss(calibrate(model, items, cfg, "full", iters=0, progress=False, deploy=False), items)
    q = calibrate(model, items, cfg, "full", iters=12, batch_size=6, lr=lr, progress=False, deploy=False)
    after = _eval_loss(q, items)
    assert after < 0.9 * before, (before, after)
    hist = q._qvdit_calibration["history"]
    assert len(hist) == 12 and all(math.isfinite(m) and math.isfinite(t) for m, t in hist)
    rtn = _eval_loss(calibrate(model, items, cfg, "rtn", progress=False), items)
    assert _eval_loss(deploy_(q, cfg), items) < rtn  # the deployed integer model keeps the gain


def test_resume_equals_uninterrupted(tiny_items, tmp_path):
    model, items = tiny_items
    cfg = QuantConfig(w_bits=3, a_bits=6, backend="torch")
    kw = dict(iters=6, batch_size=4, progress=False, deploy=False, seed=3)
    full = calibrate(model, items, cfg, "full", checkpoint=tmp_path / "a.pt", **kw)
    calibrate(model, items, cfg, "full", checkpoint=tmp_path / "b.pt", stop_after=4, **kw)
    resumed = calibrate(model, items, cfg, "full", checkpoint=tmp_path / "b.pt", **kw)
    sa, sb = full.state_dict(), resumed.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert full._qvdit_calibration["history"] == resumed._qvdit_calibration["history"]
    with pytest.raises(ValueError, match="another recipe"):
        calibrate(model, items, cfg, "tqe", checkpoint=tmp_path / "b.pt", **kw)


def test_bias_correction_zeroes_the_mean_error():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 24))
    x = torch.randn(16, 32) + 2.0  # an offset input: RTN leaves a biased output error
    items = {"x": x, "t": torch.zeros(16), "ehs": torch.zeros(16, 1, 1)}
    fwd = lambda m, x, t, e: m(x)  # noqa: E731
    cfg = QuantConfig(w_bits=3, a_bits=6, backend="torch", tqe=False)
    kw = dict(batch_size=16, init_batches=1, progress=False, forward_fn=fwd)
    err_rtn = (calibrate(model, items, cfg, "rtn", **kw)(x) - model(x)).detach()
    err_bc = (calibrate(model, items, cfg, "bias_corr", **kw)(x) - model(x)).detach()
    assert err_rtn.mean(0).abs().max() > 1e-3
    assert err_bc.mean(0).abs().max() < 1e-4
    assert (err_bc ** 2).mean() < (err_rtn ** 2).mean()


def test_calibrate_argument_errors(tiny_items):
    model, items = tiny_items
    with pytest.raises(ValueError, match="recipe"):
        calibrate(model, items, QuantConfig(), "nope")
    with pytest.raises(ValueError, match="ehs"):
        calibrate(model, {"x": items["x"], "t": items["t"]}, QuantConfig())
    with pytest.raises(TypeError, match="QuantConfig"):
        calibrate(model, items, {"w_bits": 3})


def test_cli_calibrate_testbed(tmp_path):
    from qvdit.cli import main
    from qvdit.testbed.data import DataConfig
    from qvdit.testbed.model import build_model, load_testbed, save_testbed

    wan = dict(TINY, text_dim=16)
    path = tmp_path / "tb"
    save_testbed(build_model(0, wan, DataConfig(frames=4, size=16)), path,
                 {"data_seed": 5, "sampler": {"steps": 2, "cfg": 2.0}, "status": "test"})
    out = tmp_path / "w4a8.safetensors"
    assert main(["calibrate", str(path), "--out", str(out), "--w-bits", "4", "--a-bits", "8", "--iters", "2",
                 "--batch-size", "2", "--clips", "2", "--quiet"]) == 0
    tb, _ = load_testbed(path)
    q = load_quantized(copy.deepcopy(tb.transformer), out)
    x = torch.randn(1, 3, 4, 16, 16)
    with torch.no_grad():
        y = q(hidden_states=x, timestep=torch.tensor([500.0]), encoder_hidden_states=tb.cond(torch.tensor([[0, 1, 2]])),
              return_dict=False)[0]
    assert y.shape == x.shape and bool(torch.isfinite(y).all())
    assert main(["calibrate", str(tmp_path), "--out", str(out)]) == 2  # a folder that is neither
