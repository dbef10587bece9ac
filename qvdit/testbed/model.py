"""The testbed model: a small diffusers `WanTransformer3DModel` conditioned on the clip label through its
text input (`encoder_hidden_states`), and the files it ships as.

Label -> three "text" tokens, one learned embedding per slot (shape, colour, motion), each slot with an
extra null entry; the all-null label is the unconditional input for classifier-free guidance. Only the
transformer is quantized; the label embedding is a lookup table that stays in full precision.

Shipped form (`qvdit/assets/`): `<name>.safetensors` (fp16 weights of `TestbedModel`) and `<name>.json`
(Wan config, data config, data seed, training record, sampler settings and the full-precision model's
measured motion accuracy).
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
from torch import nn

from .data import DataConfig

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEFAULT_NAME = "testbed_wan"

# Patch (1,4,4) at 32x32: 64 tokens per frame, 512 per 8-frame clip. 3.75 M parameters, 3.17 M of them
# in the 40 block linears that get quantized.
WAN_CONFIG = dict(patch_size=(1, 4, 4), num_attention_heads=4, attention_head_dim=64, in_channels=3, out_channels=3,
                  text_dim=64, freq_dim=64, ffn_dim=512, num_layers=4, cross_attn_norm=True,
                  qk_norm="rms_norm_across_heads", rope_max_seq_len=32)


class LabelEncoder(nn.Module):
    """(shape, colour, motion) indices [B, 3] -> [B, 3, dim]; index n_k of slot k is its null entry."""

    def __init__(self, sizes: tuple[int, int, int], dim: int):
        super().__init__()
        self.sizes = tuple(int(s) for s in sizes)
        self.tables = nn.ModuleList(nn.Embedding(s + 1, dim) for s in self.sizes)
        for t in self.tables:
            nn.init.normal_(t.weight, std=1.0)

    def null_labels(self, batch: int, device=None) -> torch.Tensor:
        return torch.tensor(self.sizes, device=device).expand(batch, 3)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return torch.stack([t(labels[:, i]) for i, t in enumerate(self.tables)], dim=1)


class TestbedModel(nn.Module):
    """transformer (diffusers Wan) + labels (LabelEncoder)."""

    def __init__(self, wan_config: dict | None = None, data: DataConfig = DataConfig()):
        super().__init__()
        from diffusers import WanTransformer3DModel

        self.wan_config = dict(WAN_CONFIG if wan_config is None else wan_config)
        self.data = data
        self.transformer = WanTransformer3DModel(**self.wan_config)
        self.labels = LabelEncoder(data.num_labels, self.wan_config["text_dim"])

    def cond(self, labels: torch.Tensor) -> torch.Tensor:
        return self.labels(labels)

    def uncond(self, batch: int, device=None) -> torch.Tensor:
        return self.labels(self.labels.null_labels(batch, device))

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Velocity prediction for x_t [B,3,F,H,W] at t in [0,1] [B]; Wan's timestep is 1000 t."""
        return self.transformer(hidden_states=x, timestep=t * 1000, encoder_hidden_states=self.labels(labels),
                                return_dict=False)[0]


def build_model(seed: int = 0, wan_config: dict | None = None, data: DataConfig = DataConfig()) -> TestbedModel:
    torch.manual_seed(seed)
    return TestbedModel(wan_config, data)


def _paths(path) -> tuple[Path, Path]:
    p = Path(ASSETS / DEFAULT_NAME if path is None else path)
    if p.is_dir():
        p = p / DEFAULT_NAME
    p = p.with_suffix("")
    return p.with_suffix(".safetensors"), p.with_suffix(".json")


def save_testbed(model: TestbedModel, path, meta: dict, dtype=torch.float16) -> Path:
    """Write `<path>.safetensors` (weights in `dtype`) and `<path>.json` (meta + configs)."""
    from safetensors.torch import save_file

    st, js = _paths(path)
    st.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to(dtype).contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(tensors, os.fspath(st))
    record = dict(meta)
    record["wan_config"] = {k: list(v) if isinstance(v, tuple) else v for k, v in model.wan_config.items()}
    record["data"] = model.data.to_dict()
    record["weights_dtype"] = str(dtype).replace("torch.", "")
    js.write_text(json.dumps(record, indent=1, sort_keys=True))
    return st


def load_testbed(path=None, device=None) -> tuple[TestbedModel, dict]:
    """(model in float32, eval mode; its json record) from a shipped or exported testbed."""
    from safetensors.torch import load_file

    st, js = _paths(path)
    if not st.is_file() or not js.is_file():
        raise FileNotFoundError(f"no testbed model at {st} (+ {js.name}); train one with `python -m qvdit.testbed.train`")
    meta = json.loads(js.read_text())
    wan = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["wan_config"].items()}
    model = TestbedModel(wan, DataConfig.from_dict(meta["data"]))
    state = {k: v.float() for k, v in load_file(os.fspath(st)).items()}
    model.load_state_dict(state, strict=True)
    return model.eval().to(device), meta


def rounded_copy(model: TestbedModel, dtype=torch.float16) -> TestbedModel:
    """A float32 copy whose saved tensors (the state dict) are rounded to `dtype`: the model exactly as it
    will ship. Non-persistent buffers (Wan's RoPE tables) are rebuilt in fp32 on load, so they stay."""
    out = copy.deepcopy(model).float()
    with torch.no_grad():
        for t in out.state_dict(keep_vars=True).values():
            t.copy_(t.to(dtype).float())
    return out
