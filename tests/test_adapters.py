"""Frame-id adapters (SPEC 2.3) on tiny random diffusers models: Wan, CogVideoX (1.0 and 1.5), Latte, generic.

The check that matters: plant a signal in one latent frame of one sample, run the quantized model, and compare the
rows of the first linears' inputs that changed (before any attention mixes tokens across frames) with the frame ids
those linears were given. Every other quantized linear must get the published ids of its row kind (or none).
"""
import warnings

import pytest
import torch
from torch import nn

import qvdit
from qvdit import FrameLayout, QLinear, QuantConfig, quantize_
from qvdit.models import find_adapter

FRAME, SAMPLE = 1, 1  # the latent frame and the batch sample that get the planted signal


def tiny_wan(num_layers=1):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                 out_channels=4, text_dim=16, freq_dim=32, ffn_dim=64, num_layers=num_layers,
                                 rope_max_seq_len=32).eval()


def tiny_cogvideox(patch_size_t=None):
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(0)
    return CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=16,
        text_embed_dim=16, num_layers=1, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
        patch_size_t=patch_size_t, max_text_seq_length=7,
        use_rotary_positional_embeddings=patch_size_t is not None).eval()  # 1.5 (patch_size_t) uses RoPE


def tiny_latte(frames=3):
    from diffusers import LatteTransformer3DModel

    torch.manual_seed(0)
    return LatteTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                   num_layers=1, cross_attention_dim=32, sample_size=8, patch_size=2,
                                   norm_type="ada_norm_single", caption_channels=16, video_length=frames,
                                   activation_fn="gelu-approximate", num_embeds_ada_norm=1000).eval()


def run_recorded(model, kwargs, monkeypatch):
    """Forward `model` once; returns name -> (input rows [M, K], frame ids the linear was given)."""
    seen = {}
    orig = QLinear.forward

    def spy(self, x, *args, **kw):
        rows = x.numel() // self.in_features
        seen[self.name] = (x.detach().reshape(rows, -1).clone(), self.tqe_inputs(rows, x.device)[3])
        return orig(self, x, *args, **kw)

    monkeypatch.setattr(QLinear, "forward", spy)
    with torch.no_grad():
        model(**kwargs, return_dict=False)
    monkeypatch.setattr(QLinear, "forward", orig)
    assert not model._qvdit_frames.active  # the post-hook cleared the forward's ids
    return seen


def planted(model, kwargs, frame_dim, monkeypatch):
    """Records of a forward on `kwargs` and on the same input with latent `FRAME` of sample `SAMPLE` changed."""
    base = run_recorded(model, kwargs, monkeypatch)
    x = kwargs["hidden_states"].clone()
    x.select(0, SAMPLE).select(frame_dim - 1, FRAME).add_(3.0)
    return base, run_recorded(model, dict(kwargs, hidden_states=x), monkeypatch)


def changed_rows(a, b):
    return (a - b).abs().amax(dim=1) > 1e-4


def check_plant(base, hit, name, token_frame, batch):
    """Rows of `name`'s input that changed == rows of sample SAMPLE whose published id is `token_frame`."""
    ids = base[name][1]
    assert ids is not None and ids.dtype == torch.int32
    rows = ids.numel()
    sample = torch.arange(rows) // (rows // batch)
    want = (ids.long() == token_frame) & (sample == SAMPLE)
    got = changed_rows(base[name][0], hit[name][0])
    assert want.any() and torch.equal(got, want), f"{name}: changed rows do not match frame {token_frame}"


def check_all_ids(model, seen, layouts):
    """Every quantized linear ran, with the ids of its row kind's layout (None for text rows)."""
    for name, q in qvdit.qlinears(model).items():
        assert name in seen, f"{name} did not run"
        ids = seen[name][1]
        if q.row_kind == "none":
            assert ids is None, name
        else:
            assert torch.equal(ids, layouts[q.row_kind].frame_ids()), name


def test_wan_plant_and_ids(monkeypatch):
    model = quantize_(tiny_wan(), QuantConfig(w_bits=4, a_bits=8))
    assert find_adapter(model).name == "wan"
    kw = dict(hidden_states=torch.randn(2, 4, 3, 8, 6), timestep=torch.tensor([10, 20]),
              encoder_hidden_states=torch.randn(2, 5, 16))
    base, hit = planted(model, kw, frame_dim=2, monkeypatch=monkeypatch)
    for name in ("blocks.0.attn1.to_q", "blocks.0.attn1.to_k", "blocks.0.attn1.to_v"):
        check_plant(base, hit, name, FRAME, batch=2)
    check_all_ids(model, base, {"video": FrameLayout(num_frames=3, tokens_per_frame=12, batch=2)})
    assert base["blocks.0.attn2.to_k"][0].shape[0] == 2 * 5  # cross-attention k/v: text rows


@pytest.mark.parametrize("patch_size_t", [None, 2], ids=["cogvideox1.0", "cogvideox1.5"])
def test_cogvideox_text_prefix_plant_and_ids(patch_size_t, monkeypatch):
    model = quantize_(tiny_cogvideox(patch_size_t), QuantConfig(w_bits=4, a_bits=8))
    names = set(qvdit.qlinears(model))
    assert names == {f"transformer_blocks.0.{n}" for n in
                     ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ff.net.0.proj", "ff.net.2")}
    # 1.0's sincos position table needs max_text_seq_length text tokens; 1.5 (RoPE) takes any length: 5, not 7,
    # shows the length comes from encoder_hidden_states
    text_len = 7 if patch_size_t is None else 5
    frames = 4
    kw = dict(hidden_states=torch.randn(2, frames, 4, 8, 8), encoder_hidden_states=torch.randn(2, text_len, 16),
              timestep=torch.tensor([3, 7]))
    base, hit = planted(model, kw, frame_dim=1, monkeypatch=monkeypatch)
    pt = patch_size_t or 1
    layout = FrameLayout(num_frames=frames // pt, tokens_per_frame=16, batch=2, text_len=text_len,
                         text_position="prefix")
    ids = base["transformer_blocks.0.attn1.to_q"][1]
    assert ids[:text_len].tolist() == [frames // pt] * text_len  # text prefix: its own (last) id
    for name in ("transformer_blocks.0.attn1.to_q", "transformer_blocks.0.attn1.to_k"):
        check_plant(base, hit, name, FRAME // pt, batch=2)
    check_all_ids(model, base, {"video": layout})


def test_latte_spatial_and_temporal_plant_and_ids(monkeypatch):
    model = quantize_(tiny_latte(frames=3), QuantConfig(w_bits=4, a_bits=8))
    kinds = {n: q.row_kind for n, q in qvdit.qlinears(model).items()}
    assert kinds["transformer_blocks.0.attn1.to_q"] == "spatial"
    assert kinds["transformer_blocks.0.attn2.to_k"] == "none" and kinds["transformer_blocks.0.attn2.to_q"] == "spatial"
    assert kinds["temporal_transformer_blocks.0.ff.net.2"] == "temporal"
    assert not any(n.startswith(("adaln_single", "caption_projection", "proj_out")) for n in kinds)
    kw = dict(hidden_states=torch.randn(2, 4, 3, 8, 8), encoder_hidden_states=torch.randn(2, 5, 16),
              timestep=torch.tensor([3, 7]))
    base, hit = planted(model, kw, frame_dim=2, monkeypatch=monkeypatch)
    # spatial block 0 sees (B*F, S) rows; the temporal block after it sees (B*S, F) rows, and spatial attention
    # mixed tokens only inside a frame, so exactly frame FRAME's rows changed there too (in frame-minor order)
    check_plant(base, hit, "transformer_blocks.0.attn1.to_q", FRAME, batch=2)
    check_plant(base, hit, "temporal_transformer_blocks.0.attn1.to_q", FRAME, batch=2)
    ids_t = base["temporal_transformer_blocks.0.attn1.to_q"][1]
    assert ids_t[:6].tolist() == [0, 1, 2, 0, 1, 2]
    check_all_ids(model, base, {"spatial": FrameLayout(num_frames=3, tokens_per_frame=16, batch=2),
                                "temporal": FrameLayout(num_frames=3, tokens_per_frame=16, batch=2,
                                                        order="frame_minor")})
    assert base["transformer_blocks.0.attn2.to_k"][0].shape[0] == 2 * 3 * 5  # caption tokens repeated per frame


def test_gates_follow_the_published_frames(monkeypatch):
    """A calibrated per-frame gate changes exactly the rows of its frame (end to end through the adapter)."""
    model = quantize_(tiny_wan(), QuantConfig(w_bits=8, a_bits=8))
    q = model.get_submodule("blocks.0.attn1.to_q")
    kw = dict(hidden_states=torch.randn(1, 4, 3, 8, 6), timestep=torch.tensor([10]),
              encoder_hidden_states=torch.randn(1, 5, 16))
    with torch.no_grad():
        q.beta.normal_()  # beta = 0 at init would make the gate invisible
        q.gate = nn.Parameter(torch.ones(4), requires_grad=False)  # calibrated for 3 frames + the text entry
    outs = {}
    orig = QLinear.forward

    def keep(self, x, *args, **kw):
        y = orig(self, x, *args, **kw)
        if self is q:
            outs[len(outs)] = y.detach().reshape(-1, y.shape[-1]).clone()
        return y

    monkeypatch.setattr(QLinear, "forward", keep)
    with torch.no_grad():
        model(**kw, return_dict=False)
        q.gate[FRAME] = 3.0
        model(**kw, return_dict=False)
    diff = changed_rows(outs[0], outs[1])
    want = FrameLayout(num_frames=3, tokens_per_frame=12).frame_ids() == FRAME
    assert torch.equal(diff, want)


def test_adapter_errors_and_subclasses():
    from diffusers import WanTransformer3DModel

    class Wrapped(WanTransformer3DModel):  # e.g. xDiT's runner subclasses the diffusers transformer
        pass

    assert find_adapter(Wrapped.__new__(Wrapped)).name == "wan"
    model = quantize_(tiny_wan(), QuantConfig(w_bits=4, a_bits=8))
    with pytest.raises(ValueError, match=r"hidden_states' must be \(B, C, F, H, W\)"):
        model(hidden_states=torch.randn(2, 4, 8, 6), timestep=torch.tensor([1, 2]),
              encoder_hidden_states=torch.randn(2, 5, 16))
    cog = quantize_(tiny_cogvideox(), QuantConfig(w_bits=4, a_bits=8))
    with pytest.raises(ValueError, match="encoder_hidden_states' must be"):
        cog(hidden_states=torch.randn(1, 2, 4, 8, 8), encoder_hidden_states=torch.randn(5, 16),
            timestep=torch.tensor([3]))


def test_generic_fallback_warns_and_uses_frame_zero():
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))
    assert find_adapter(model) is None
    with pytest.warns(UserWarning, match="no qvdit frame adapter.*frame 0's gate"):
        quantize_(model, QuantConfig(w_bits=4, a_bits=8))
    assert all(q.row_kind == "video" for q in qvdit.qlinears(model).values())
    assert model[0].tqe_inputs(6, "cpu")[3] is None  # no ids: the kernel uses gate[0] for every row
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # TQE off: nothing per frame to warn about
        quantize_(nn.Sequential(nn.Linear(16, 8)), QuantConfig(w_bits=4, a_bits=8, tqe=False))


def test_deepcopy_of_a_quantized_model_publishes_into_its_own_state(monkeypatch):
    """The hooks find the FrameState through the module they run on, so a copy's QLinears get their ids."""
    import copy

    model = quantize_(tiny_wan(), QuantConfig(w_bits=4, a_bits=8))
    with torch.no_grad():
        for q in qvdit.qlinears(model).values():
            q.beta.normal_()
            q.gate = nn.Parameter(torch.tensor([0.5, 2.0, 1.0, 1.0]), requires_grad=False)  # 3 frames + text
    twin = copy.deepcopy(model)
    kw = dict(hidden_states=torch.randn(1, 4, 3, 8, 6), timestep=torch.tensor([10]),
              encoder_hidden_states=torch.randn(1, 5, 16))
    seen = run_recorded(twin, kw, monkeypatch)
    assert seen["blocks.0.attn1.to_q"][1] is not None
    with torch.no_grad():
        assert torch.equal(twin(**kw, return_dict=False)[0], model(**kw, return_dict=False)[0])
