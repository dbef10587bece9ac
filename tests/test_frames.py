"""Frame ids of token rows (SPEC 2.3): FrameLayout, FrameState publication, gate resampling, the Wan adapter."""
import pytest
import torch
from torch import nn

import qvdit
import qvdit_kernels as qk
from qvdit import FrameLayout, FrameState, QLinear, QuantConfig, quantize_, resample_gate


def test_frame_major_ids():
    ids = FrameLayout(num_frames=3, tokens_per_frame=4, batch=2).frame_ids()
    assert ids.dtype == torch.int32
    assert ids.tolist() == [0] * 4 + [1] * 4 + [2] * 4 + [0] * 4 + [1] * 4 + [2] * 4


def test_text_prefix_and_suffix_get_their_own_id():
    pre = FrameLayout(num_frames=2, tokens_per_frame=3, batch=1, text_len=2, text_position="prefix").frame_ids()
    assert pre.tolist() == [2, 2, 0, 0, 0, 1, 1, 1]
    suf = FrameLayout(num_frames=2, tokens_per_frame=3, batch=2, text_len=1, text_position="suffix").frame_ids()
    assert suf.tolist() == [0, 0, 0, 1, 1, 1, 2] * 2


def test_frame_minor_ids():
    """Latte temporal blocks: rows (b, s, f), frame = m mod F."""
    ids = FrameLayout(num_frames=3, tokens_per_frame=2, batch=2, order="frame_minor").frame_ids()
    assert ids.tolist() == [0, 1, 2] * 4


def test_layout_validation():
    with pytest.raises(ValueError, match="num_frames must be >= 1"):
        FrameLayout(num_frames=0, tokens_per_frame=4)
    with pytest.raises(TypeError, match="tokens_per_frame must be an int"):
        FrameLayout(num_frames=2, tokens_per_frame=4.0)
    with pytest.raises(ValueError, match="text_len > 0 needs"):
        FrameLayout(num_frames=2, tokens_per_frame=4, text_len=3)
    with pytest.raises(ValueError, match="text_position must be"):
        FrameLayout(num_frames=2, tokens_per_frame=4, text_len=3, text_position="middle")
    with pytest.raises(ValueError, match="order must be"):
        FrameLayout(num_frames=2, tokens_per_frame=4, order="random")


def test_state_publish_lookup_and_errors():
    s = FrameState()
    assert s.lookup("video", 12, "cpu") == (None, None)  # nothing published: generic fallback
    s.publish({"video": FrameLayout(num_frames=3, tokens_per_frame=4)})
    ids, nf = s.lookup("video", 12, "cpu")
    assert nf == 3 and ids.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert s.lookup("video", 12, "cpu")[0] is ids  # built once per forward, shared by every layer
    with pytest.raises(ValueError, match="blocks.0.q: input has 13 rows but the published 'video' layout has 12"):
        s.lookup("video", 13, "cpu", "blocks.0.q")
    with pytest.raises(ValueError, match="row kind 'temporal' has no published frame layout"):
        s.lookup("temporal", 12, "cpu")
    with pytest.raises(TypeError, match="must be a FrameLayout"):
        s.publish({"video": (3, 4)})
    with pytest.raises(ValueError, match="other than 'none'"):
        s.publish({"none": FrameLayout(num_frames=1, tokens_per_frame=1)})
    s.clear()
    assert not s.active


def test_resample_gate():
    g = torch.tensor([1.0, 2.0, 3.0, 7.0])  # 3 calibrated frames + text entry
    assert resample_gate(g, 3) is g
    r = resample_gate(g, 6)
    assert r.shape == (7,) and r[-1].item() == 7.0
    assert r[0].item() == pytest.approx(1.0) and r[5].item() == pytest.approx(3.0)
    assert torch.all(r[1:6] >= r[:5])  # monotone like the calibrated gate
    assert resample_gate(torch.tensor([2.0, 5.0]), 4).tolist() == [2.0, 2.0, 2.0, 2.0, 5.0]


def test_qlinear_applies_its_gate_per_frame():
    """With frames published, u[m] uses gate[frame(m)]: matches qvdit_kernels ops fed the same ids."""
    lin = nn.Linear(32, 16)
    q = QLinear.from_linear(lin, QuantConfig(w_bits=4, a_bits=8), name="l")
    with torch.no_grad():
        q.beta.normal_()
        q.gate = nn.Parameter(torch.tensor([0.5, 2.0, 1.0]), requires_grad=False)  # 2 calibrated frames + text
    state = FrameState()
    q._frames = state
    state.publish({"video": FrameLayout(num_frames=2, tokens_per_frame=3, batch=2)})
    x = torch.randn(2, 6, 32)
    fid = torch.tensor([0, 0, 0, 1, 1, 1] * 2, dtype=torch.int32)
    want = qk.qlinear(x, q.w_packed, 4, q.w_scale, q.w_zero, 8, bias=q.bias, alpha=q.alpha, beta=q.beta,
                      gate=q.gate, frame_id=fid)
    assert torch.equal(q(x), want)
    state.clear()  # nothing published: every row uses gate[0]
    want0 = qk.qlinear(x, q.w_packed, 4, q.w_scale, q.w_zero, 8, bias=q.bias, alpha=q.alpha, beta=q.beta, gate=q.gate)
    assert torch.equal(q(x), want0) and not torch.equal(want0, want)


def tiny_wan():
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                 out_channels=4, text_dim=16, freq_dim=32, ffn_dim=64, num_layers=1,
                                 rope_max_seq_len=32).eval()


def test_wan_adapter_publishes_frames(monkeypatch):
    model = quantize_(tiny_wan(), QuantConfig(w_bits=4, a_bits=8))
    names = set(qvdit.qlinears(model))
    assert "blocks.0.attn1.to_q" in names and "blocks.0.ffn.net.2" in names
    assert "proj_out" not in names and not any(n.startswith("condition_embedder") for n in names)
    assert model.get_submodule("blocks.0.attn2.to_k").row_kind == "none"
    seen = {}
    orig = QLinear.tqe_inputs

    def spy(self, rows, device):
        out = orig(self, rows, device)
        seen[self.name] = out[3]
        return out

    monkeypatch.setattr(QLinear, "tqe_inputs", spy)
    x = torch.randn(2, 4, 3, 8, 6)  # B=2, F=3, H'=4, W'=3 -> 12 tokens per frame
    with torch.no_grad():
        model(hidden_states=x, timestep=torch.tensor([10, 20]), encoder_hidden_states=torch.randn(2, 5, 16))
    want = FrameLayout(num_frames=3, tokens_per_frame=12, batch=2).frame_ids()
    assert torch.equal(seen["blocks.0.attn1.to_q"], want) and torch.equal(seen["blocks.0.ffn.net.2"], want)
    assert seen["blocks.0.attn2.to_k"] is None  # text rows: no gate
    assert not model._qvdit_frames.active  # cleared after the forward


def test_two_models_do_not_share_frame_state():
    a = quantize_(tiny_wan(), QuantConfig())
    b = quantize_(tiny_wan(), QuantConfig())
    assert a._qvdit_frames is not b._qvdit_frames
    a._qvdit_frames.publish({"video": FrameLayout(num_frames=1, tokens_per_frame=1)})
    assert not b._qvdit_frames.active
