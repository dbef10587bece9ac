"""`qvdit demo`: quantize a small diffusers Wan video DiT and compare against full precision on CPU.

Builds a tiny `WanTransformer3DModel` (random init, seeded), quantizes copies to W8A8, W4A8 and W3A6
(TQE on, uncalibrated: beta = 0, so this is RTN), runs one forward on a small video latent, and
prints: bytes of the quantized linears vs the same linears in bf16, relative output error vs the
fp32 model, and time per forward. A bf16 copy of the model gives the noise floor.
"""
from __future__ import annotations

import copy
import time

import torch

TINY_WAN = dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32, in_channels=4, out_channels=4,
                text_dim=32, freq_dim=64, ffn_dim=512, num_layers=4, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", rope_max_seq_len=64)


def tiny_wan(seed: int = 0):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(**TINY_WAN).eval()


def _forward(model, inputs, dtype=torch.float32):
    x, t, e = inputs
    with torch.no_grad():
        return model(hidden_states=x.to(dtype), timestep=t, encoder_hidden_states=e.to(dtype), return_dict=False)[0].float()


def _timed(model, inputs, dtype=torch.float32, repeats=3):
    _forward(model, inputs, dtype)  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        y = _forward(model, inputs, dtype)
    return y, (time.perf_counter() - t0) / repeats * 1e3


def run_demo(settings=((8, 8), (4, 8), (3, 6)), frames: int = 5, size: int = 16, seed: int = 0, backend: str = "auto"):
    """Returns the table rows (and prints them)."""
    from diffusers.utils import logging as dlogging

    from . import QuantConfig, quantize_, weight_bytes

    dlogging.set_verbosity_error()  # the bf16 noise-floor copy is cast with .to() on purpose
    model = tiny_wan(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    inputs = (torch.randn(1, TINY_WAN["in_channels"], frames, size, size, generator=gen), torch.tensor([500]),
              torch.randn(1, 8, TINY_WAN["text_dim"], generator=gen))
    ref, ref_ms = _timed(model, inputs)
    rel = lambda y: float((y - ref).norm() / ref.norm())  # noqa: E731
    rows = [("fp32", None, None, 0.0, ref_ms)]
    y16, ms16 = _timed(copy.deepcopy(model).to(torch.bfloat16), inputs, torch.bfloat16)
    rows.append(("bf16 (noise floor)", None, None, rel(y16), ms16))
    for w_bits, a_bits in settings:
        qmodel = quantize_(copy.deepcopy(model), QuantConfig(w_bits=w_bits, a_bits=a_bits, backend=backend))
        y, ms = _timed(qmodel, inputs)
        qb, bf = weight_bytes(qmodel)
        rows.append((f"W{w_bits}A{a_bits} (RTN, TQE on)", qb, bf, rel(y), ms))
    tokens = frames * (size // 2) ** 2
    print(f"tiny Wan DiT: {TINY_WAN['num_layers']} blocks, hidden {TINY_WAN['num_attention_heads'] * TINY_WAN['attention_head_dim']}, "
          f"latent 1x{TINY_WAN['in_channels']}x{frames}x{size}x{size} ({tokens} tokens), CPU, backend={backend}")
    print(f"{'setting':<24}{'linear bytes':>14}{'vs bf16':>9}{'rel. error vs fp32':>20}{'ms/forward':>12}")
    for name, qb, bf, err, ms in rows:
        b = f"{qb:>14,}{qb / bf:>8.3f}x" if qb else f"{'-':>14}{'-':>9}"
        print(f"{name:<24}{b}{err:>20.4f}{ms:>12.1f}")
    return rows


def add_parser(sub) -> None:
    d = sub.add_parser("demo", help="quantize a small Wan video DiT on CPU and compare with full precision")
    d.add_argument("--frames", type=int, default=5, help="latent frames (default 5)")
    d.add_argument("--size", type=int, default=16, help="latent height and width (default 16)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--backend", default="auto", choices=("auto", "torch", "triton", "cuda"))
    d.set_defaults(func=lambda a: run_demo(frames=a.frames, size=a.size, seed=a.seed, backend=a.backend) and 0)
