"""The diffusers quantizer (quant_method "qvdit"): from_pretrained with QVDiTConfig, PipelineQuantizationConfig,
save_pretrained and reload, on tiny random models saved to a temp dir (nothing is downloaded).

Outputs are compared bit for bit after `realign`: diffusers loads tensors into storage whose alignment differs
from a fresh allocation, and CPU BLAS then takes other code paths for the full-precision linears (measured:
5.96e-08 apart on identical weights). Cloning every tensor gives both models the same layout.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import qvdit
from qvdit import CheckpointError, QLinear, QuantConfig, quantize_
from qvdit.diffusers_quantizer import QVDiTConfig

from test_adapters import tiny_cogvideox, tiny_latte, tiny_wan

WEIGHTS = "diffusion_pytorch_model.safetensors"


def realign(model):
    for mod in model.modules():
        for k, v in list(mod._parameters.items()):
            if v is not None:
                mod._parameters[k] = nn.Parameter(v.detach().clone(), requires_grad=v.requires_grad)
        for k, v in list(mod._buffers.items()):
            if v is not None:
                mod._buffers[k] = v.clone()
    return model


def wan_inputs():
    g = torch.Generator().manual_seed(5)
    return dict(hidden_states=torch.randn(1, 4, 3, 8, 6, generator=g), timestep=torch.tensor([10]),
                encoder_hidden_states=torch.randn(1, 5, 16, generator=g))


MODELS = {  # builder, inputs
    "wan": (tiny_wan, wan_inputs),
    "cogvideox": (tiny_cogvideox, lambda: dict(hidden_states=torch.randn(1, 2, 4, 8, 8, generator=torch.Generator().manual_seed(6)),
                                               encoder_hidden_states=torch.randn(1, 7, 16, generator=torch.Generator().manual_seed(7)),
                                               timestep=torch.tensor([3]))),
    "latte": (tiny_latte, lambda: dict(hidden_states=torch.randn(1, 4, 3, 8, 8, generator=torch.Generator().manual_seed(8)),
                                       encoder_hidden_states=torch.randn(1, 5, 16, generator=torch.Generator().manual_seed(9)),
                                       timestep=torch.tensor([3]))),
}


def run(model, inputs):
    with torch.no_grad():
        return realign(model)(**inputs, return_dict=False)[0]


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> folder holding the full-precision tiny model of each family."""
    out = {}
    for name, (build, _) in MODELS.items():
        path = tmp_path_factory.mktemp(name)
        build().save_pretrained(path)
        out[name] = str(path)
    return out


def test_import_qvdit_stays_light_and_registers_lazily():
    code = ("import sys, qvdit; assert 'diffusers' not in sys.modules, 'import qvdit imported diffusers'\n"
            "from diffusers.quantizers.auto import AUTO_QUANTIZER_MAPPING as Q, AUTO_QUANTIZATION_CONFIG_MAPPING as C\n"
            "from qvdit.diffusers_quantizer import QVDiTConfig, QVDiTQuantizer\n"
            "assert Q['qvdit'] is QVDiTQuantizer and C['qvdit'] is QVDiTConfig and qvdit.QVDiTConfig is QVDiTConfig\n"
            "print('ok')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


@pytest.mark.parametrize("family", list(MODELS))
def test_from_pretrained_save_reload_bit_identical(family, saved, tmp_path):
    from diffusers import CogVideoXTransformer3DModel, LatteTransformer3DModel, WanTransformer3DModel

    cls = {"wan": WanTransformer3DModel, "cogvideox": CogVideoXTransformer3DModel, "latte": LatteTransformer3DModel}[family]
    inputs = MODELS[family][1]()
    cfg = QVDiTConfig(w_bits=3, a_bits=6)
    model = cls.from_pretrained(saved[family], quantization_config=cfg)
    # the same as quantize_ on the full-precision model: same selection, same codes, same TQE init
    want = quantize_(cls.from_pretrained(saved[family]), QuantConfig(w_bits=3, a_bits=6))
    assert set(qvdit.qlinears(model)) == set(qvdit.qlinears(want)) != set()
    assert_same_state(model, want)
    y = run(model, inputs)
    assert torch.equal(y, run(want, inputs))

    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"] == cfg.to_dict()
    with safe_open(str(tmp_path / WEIGHTS), framework="pt") as f:
        assert f.metadata()["qvdit_format_version"] == "1"
    again = cls.from_pretrained(tmp_path)  # no quantization_config argument: read from config.json
    assert isinstance(again.hf_quantizer.quantization_config, QVDiTConfig)
    assert_same_state(again, model)
    assert torch.equal(run(again, inputs), y)


def test_reload_keeps_quantized_tensors_exact_under_torch_dtype(saved, tmp_path):
    """torch_dtype=bf16 casts the full-precision modules only: scales, zeros, TQE stay float32; a calibrated gate
    of any length (frames + 1) survives."""
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel.from_pretrained(saved["wan"], quantization_config=QVDiTConfig(w_bits=4, a_bits=8))
    q = model.get_submodule("blocks.0.attn1.to_v")
    with torch.no_grad():
        q.beta.normal_(generator=torch.Generator().manual_seed(1))
        q.gate = nn.Parameter(torch.tensor([0.5, 1.5, 2.0, 1.0]), requires_grad=False)  # 3 calibrated frames + text
    model.save_pretrained(tmp_path)
    again = WanTransformer3DModel.from_pretrained(tmp_path)
    assert_same_state(again, model)
    inputs = wan_inputs()
    assert torch.equal(run(again, inputs), run(model, inputs))
    b16 = WanTransformer3DModel.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    q16 = b16.get_submodule("blocks.0.attn1.to_v")
    for name in ("w_packed", "w_scale", "w_zero", "alpha", "beta", "gate", "bias"):
        assert torch.equal(getattr(q16, name), getattr(q, name)), name
        assert getattr(q16, name).dtype == getattr(q, name).dtype, name
    assert b16.proj_out.weight.dtype == torch.bfloat16  # the full-precision parts follow torch_dtype
    with torch.no_grad():
        out = b16(**{k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in inputs.items()},
                  return_dict=False)[0]
    assert torch.isfinite(out).all()


def test_quantize_on_load_in_bf16_matches_quantize_(saved):
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel.from_pretrained(saved["wan"], quantization_config=QVDiTConfig(w_bits=4, a_bits=8),
                                                  torch_dtype=torch.bfloat16)
    want = quantize_(WanTransformer3DModel.from_pretrained(saved["wan"], torch_dtype=torch.bfloat16),
                     QuantConfig(w_bits=4, a_bits=8))
    assert_same_state(model, want)
    assert model.get_submodule("blocks.0.ffn.net.2").bias.dtype == torch.bfloat16


def test_skip_include_overrides_through_the_config(saved):
    from diffusers import WanTransformer3DModel

    cfg = QVDiTConfig(w_bits=4, a_bits=8, include=["proj_out"], skip=["blocks.0.ffn.*"],
                      overrides={"*.attn2.*": {"w_bits": 8, "a_bits": 8, "tqe": False}})
    model = WanTransformer3DModel.from_pretrained(saved["wan"], quantization_config=cfg)
    assert isinstance(model.proj_out, QLinear)
    assert type(model.get_submodule("blocks.0.ffn.net.2")) is nn.Linear
    a2 = model.get_submodule("blocks.0.attn2.to_q")
    assert (a2.w_bits, a2.a_bits, a2.tqe) == (8, 8, False)
    assert model.get_submodule("blocks.0.attn1.to_q").w_bits == 4
    assert QVDiTConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_pipeline_quantization_config(saved, tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline
    from diffusers.quantizers import PipelineQuantizationConfig

    WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=FlowMatchEulerDiscreteScheduler(),
                transformer=tiny_wan()).save_pretrained(tmp_path)
    pipe = WanPipeline.from_pretrained(
        tmp_path, tokenizer=None, text_encoder=None, vae=None,
        quantization_config=PipelineQuantizationConfig(quant_mapping={"transformer": QVDiTConfig(w_bits=3, a_bits=6)}))
    layers = qvdit.qlinears(pipe.transformer)
    assert layers and all((q.w_bits, q.a_bits) == (3, 6) for q in layers.values())


def test_config_and_checkpoint_errors(saved, tmp_path):
    from diffusers import WanTransformer3DModel

    with pytest.raises(ValueError, match="w_bits must be one of"):
        QVDiTConfig(w_bits=5)
    with pytest.raises(TypeError, match=r"unexpected arguments \['group_size'\]"):
        QVDiTConfig(group_size=128)
    with pytest.raises(ValueError, match="selected no nn.Linear"):
        WanTransformer3DModel.from_pretrained(saved["wan"], quantization_config=QVDiTConfig(skip=["*"]))

    WanTransformer3DModel.from_pretrained(saved["wan"], quantization_config=QVDiTConfig()).save_pretrained(tmp_path)
    weights = str(tmp_path / WEIGHTS)
    config_path = tmp_path / "config.json"
    good = config_path.read_text()
    config = json.loads(good)
    config["quantization_config"]["tqe"] = False  # the file has TQE tensors the config does not build
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="config.json does not match the weights"):
        WanTransformer3DModel.from_pretrained(tmp_path)
    config_path.write_text(good)
    with safe_open(weights, framework="pt") as f:
        meta = f.metadata()
    save_file(load_file(weights), weights, metadata=dict(meta, qvdit_format_version="0"))
    with pytest.raises(CheckpointError, match="format version '0' is not supported"):
        WanTransformer3DModel.from_pretrained(tmp_path)
