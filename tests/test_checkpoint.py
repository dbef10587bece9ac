"""save_quantized / load_quantized (qvdit/checkpoint.py): bit-identical round trips and loud failures."""
import json
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import qvdit
from qvdit import CheckpointError, QLinear, QuantConfig, load_quantized, quantize_, save_quantized


def mlp(seed=0, device=None):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 96, device=device), nn.GELU(), nn.Linear(96, 24, device=device))


@pytest.fixture
def saved(tmp_path):
    model = mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_(model, QuantConfig(w_bits=3, a_bits=6, overrides={"2": {"w_bits": 8, "a_bits": 8}}))
    with torch.no_grad():  # make TQE matter, as after calibration
        model[0].beta.normal_()
        model[2].beta.normal_()
    path = tmp_path / "m.safetensors"
    save_quantized(model, path)
    return model, path


def test_round_trip_is_bit_identical(saved):
    model, path = saved
    x = torch.randn(10, 64)
    fresh = load_quantized(mlp(seed=123), path)  # different random init
    assert isinstance(fresh[0], QLinear) and fresh[2].w_bits == 8
    assert torch.equal(fresh(x), model(x))
    assert fresh._qvdit_config == model._qvdit_config


def test_meta_init_model_loads(saved):
    model, path = saved
    fresh = load_quantized(mlp(device="meta"), path)
    x = torch.randn(4, 64)
    assert torch.equal(fresh(x), model(x))


def test_loading_into_an_already_quantized_model(saved):
    model, path = saved
    target = mlp(seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_(target, QuantConfig(w_bits=3, a_bits=6, overrides={"2": {"w_bits": 8, "a_bits": 8}}))
    x = torch.randn(4, 64)
    assert torch.equal(load_quantized(target, path)(x), model(x))


def test_truncated_file(saved, tmp_path):
    _, path = saved
    data = path.read_bytes()
    bad = tmp_path / "trunc.safetensors"
    bad.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        load_quantized(mlp(), bad)


def test_flipped_byte_in_data(saved, tmp_path):
    _, path = saved
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x10
    bad = tmp_path / "flip.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="content hash mismatch"):
        load_quantized(mlp(), bad)


def test_flipped_byte_in_header(saved, tmp_path):
    _, path = saved
    data = bytearray(path.read_bytes())
    data[12] ^= 0xFF  # inside the JSON header
    bad = tmp_path / "hdr.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        load_quantized(mlp(), bad)


def _rewrite(path, out, **meta_changes):
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta.update(meta_changes)
    save_file(tensors, str(out), metadata=meta)


def test_wrong_version(saved, tmp_path):
    _, path = saved
    _rewrite(path, tmp_path / "v.safetensors", qvdit_format_version="99")
    with pytest.raises(CheckpointError, match="format version '99' is not supported"):
        load_quantized(mlp(), tmp_path / "v.safetensors")


def test_not_a_qvdit_file(tmp_path):
    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(CheckpointError, match="not a qvdit checkpoint"):
        load_quantized(mlp(), tmp_path / "plain.safetensors")


def test_config_mismatch(saved):
    _, path = saved
    with pytest.raises(CheckpointError, match=r"config mismatch: .*fields differ: \['w_bits'"):
        load_quantized(mlp(), path, config=QuantConfig(w_bits=4, a_bits=6, overrides={"2": {"w_bits": 8, "a_bits": 8}}))


def test_architecture_mismatch(saved):
    _, path = saved
    wrong = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 25))
    with pytest.raises(CheckpointError, match="'2' is not a Linear\\(96, 24\\)"):
        load_quantized(wrong, path)
    with pytest.raises(CheckpointError, match="has no module '2'"):
        load_quantized(nn.Sequential(nn.Linear(64, 96)), path)


def test_stored_metadata(saved):
    _, path = saved
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    layers = json.loads(meta["qvdit_layers"])
    assert layers["0"]["w_bits"] == 3 and layers["2"]["w_bits"] == 8 and layers["0"]["format"] == "w3_planes"
    assert QuantConfig.from_json(meta["qvdit_config"]).w_bits == 3
    assert len(meta["qvdit_content_sha256"]) == 64


def test_save_errors(tmp_path):
    with pytest.raises(ValueError, match="has no QLinear"):
        save_quantized(mlp(), tmp_path / "x.safetensors")
    with pytest.raises(FileNotFoundError, match="is not a file"):
        load_quantized(mlp(), tmp_path / "missing.safetensors")


def test_wan_round_trip(tmp_path):
    from diffusers import WanTransformer3DModel

    cfg = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
               text_dim=16, freq_dim=32, ffn_dim=64, num_layers=1, rope_max_seq_len=32)
    torch.manual_seed(0)
    model = quantize_(WanTransformer3DModel(**cfg).eval(), QuantConfig(w_bits=3, a_bits=6))
    save_quantized(model, tmp_path / "wan.safetensors")
    torch.manual_seed(1)
    fresh = load_quantized(WanTransformer3DModel(**cfg).eval(), tmp_path / "wan.safetensors")
    inputs = dict(hidden_states=torch.randn(1, 4, 2, 8, 8), timestep=torch.tensor([3]),
                  encoder_hidden_states=torch.randn(1, 5, 16), return_dict=False)
    with torch.no_grad():
        assert torch.equal(fresh(**inputs)[0], model(**inputs)[0])
    assert fresh._qvdit_frames is not None and len(qvdit.qlinears(fresh)) == len(qvdit.qlinears(model))
