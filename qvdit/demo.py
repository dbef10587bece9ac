"""`qvdit demo`: the shipped testbed video DiT, full precision vs quantized, generating video on the CPU.

Loads the small Wan video DiT that ships in `qvdit/assets/` (trained on procedural clips: a coloured
square or disc moving right/left/down/up; 8 frames of 32x32), quantizes a copy of its transformer with
the shipped Q-VDiT W3A6 calibration (plain RTN W3A6 when no calibration ships, and as a comparison row),
generates one clip per direction from the same noise with both, and writes a GIF with the rows FP,
Q-VDiT and RTN. Prints, per model: bytes of the quantized linears, PSNR / SSIM against the FP clips
(torchmetrics, when installed), whether the object moves the way the prompt says (the trajectory
checker), and the time per sampling step.

`--random` runs the older random-weights check instead (a tiny random Wan, one forward, relative error
at W8A8 / W4A8 / W3A6); `TINY_WAN` is its config (benchmarks/bench_e2e.py's "tiny" case uses it).
"""
from __future__ import annotations

import copy
import time
from pathlib import Path

import torch

TINY_WAN = dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32, in_channels=4, out_channels=4,
                text_dim=32, freq_dim=64, ffn_dim=512, num_layers=4, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", rope_max_seq_len=64)

# one clip per direction: (shape, colour, motion) = red square right, blue disc left, yellow square down, green disc up
DEMO_LABELS = ((0, 0, 0), (1, 2, 1), (0, 3, 2), (1, 1, 3))


def _metrics(q: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """Mean PSNR (dB) and SSIM over the clips' frames (torchmetrics, the eval extra)."""
    from .testbed.metrics import psnr_ssim

    psnr, ssim = psnr_ssim(q, ref)
    return float(psnr.mean()), float(ssim.mean())


def run_demo(steps: int | None = None, seed: int = 0, out: str | None = "qvdit_demo.gif", backend: str = "torch",
             calibration: str | None = None, rtn: bool = True) -> list[dict]:
    """Returns one row per model (and prints the table)."""
    check_out(out)
    from diffusers.utils import logging as dlogging

    from . import QuantConfig, load_quantized, quantize_, weight_bytes
    from .testbed.checker import check_clips
    from .testbed.model import ASSETS, load_testbed
    from .testbed.train import generate

    dlogging.set_verbosity_error()
    model, meta = load_testbed()
    steps = steps or meta["sampler"]["steps"]
    cfg = meta["sampler"]["cfg"]
    labels = torch.tensor(DEMO_LABELS)
    calib = Path(calibration) if calibration else ASSETS / "testbed_wan_w3a6.safetensors"

    def timed(transformer):
        t0 = time.perf_counter()
        clips = generate(model, labels, seed, steps, cfg, transformer=transformer)
        return clips, (time.perf_counter() - t0) / steps * 1e3

    ref, ref_ms = timed(None)
    ok = check_clips(ref, labels[:, 2])["correct"]
    rows = [{"name": "fp32 (shipped model)", "clips": ref, "bytes": None, "psnr": None, "ssim": None,
             "motion_ok": int(ok.sum()), "ms": ref_ms}]
    variants = []
    if calib.is_file():
        variants.append(("W3A6 Q-VDiT (shipped calibration)", lambda t: load_quantized(t, calib)))
    if rtn or not calib.is_file():
        variants.append(("W3A6 RTN", lambda t: quantize_(t, QuantConfig(w_bits=3, a_bits=6, backend=backend))))
    for name, make in variants:
        qt = make(copy.deepcopy(model.transformer))
        for m in qt.modules():  # the shipped file names the backend it was calibrated with; run on the one asked for
            if hasattr(m, "backend") and hasattr(m, "w_packed"):
                m.backend = backend
        clips, ms = timed(qt)
        psnr, ssim = _metrics(clips, ref)
        ok = check_clips(clips, labels[:, 2])["correct"]
        rows.append({"name": name, "clips": clips, "bytes": weight_bytes(qt), "psnr": psnr, "ssim": ssim,
                     "motion_ok": int(ok.sum()), "ms": ms})
    d = model.data
    print(f"testbed Wan video DiT ({meta['parameters'] / 1e6:.2f} M parameters, FP motion accuracy "
          f"{meta['fp_eval']['accuracy']:.1%} on {meta['fp_eval']['clips']} clips), {len(labels)} clips of "
          f"{d.frames}x{d.size}x{d.size}, {steps} flow-matching steps, CFG {cfg}, CPU, backend={backend}")
    print(f"{'model':<36}{'linear bytes':>14}{'vs bf16':>9}{'PSNR vs FP':>12}{'SSIM':>8}{'motion ok':>11}{'ms/step':>10}")
    for r in rows:
        b = f"{r['bytes'][0]:>14,}{r['bytes'][0] / r['bytes'][1]:>8.3f}x" if r["bytes"] else f"{'-':>14}{'-':>9}"
        p = f"{r['psnr']:>9.2f} dB" if r["psnr"] is not None else f"{'-':>12}"
        s = f"{r['ssim']:>8.3f}" if r["ssim"] is not None else f"{'-':>8}"
        print(f"{r['name']:<36}{b}{p}{s}{r['motion_ok']:>7}/{len(labels)}{r['ms']:>10.0f}")
    if out:
        from .testbed.metrics import write_gif

        write_gif(out, [r["clips"] for r in rows], scale=4)
        print(f"wrote {out} (rows: {', '.join(r['name'] for r in rows)})")
    return rows


def run_random_demo(settings=((8, 8), (4, 8), (3, 6)), frames: int = 5, size: int = 16, seed: int = 0,
                    backend: str = "auto"):
    """The random-weights check: one forward of a tiny random Wan, relative output error per setting."""
    from diffusers import WanTransformer3DModel
    from diffusers.utils import logging as dlogging

    from . import QuantConfig, quantize_, weight_bytes

    dlogging.set_verbosity_error()
    torch.manual_seed(seed)
    model = WanTransformer3DModel(**TINY_WAN).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    x, t, e = (torch.randn(1, TINY_WAN["in_channels"], frames, size, size, generator=gen), torch.tensor([500]),
               torch.randn(1, 8, TINY_WAN["text_dim"], generator=gen))

    def fwd(m, dtype=torch.float32):
        with torch.no_grad():
            return m(hidden_states=x.to(dtype), timestep=t, encoder_hidden_states=e.to(dtype), return_dict=False)[0].float()

    ref = fwd(model)
    rel = lambda y: float((y - ref).norm() / ref.norm())  # noqa: E731
    rows = [("bf16 (noise floor)", None, None, rel(fwd(copy.deepcopy(model).to(torch.bfloat16), torch.bfloat16)))]
    for w_bits, a_bits in settings:
        q = quantize_(copy.deepcopy(model), QuantConfig(w_bits=w_bits, a_bits=a_bits, backend=backend))
        qb, bf = weight_bytes(q)
        rows.append((f"W{w_bits}A{a_bits} (RTN)", qb, bf, rel(fwd(q))))
    print(f"tiny random Wan DiT, latent 1x{TINY_WAN['in_channels']}x{frames}x{size}x{size}, CPU, backend={backend}")
    print(f"{'setting':<24}{'linear bytes':>14}{'vs bf16':>9}{'rel. error vs fp32':>20}")
    for name, qb, bf, err in rows:
        b = f"{qb:>14,}{qb / bf:>8.3f}x" if qb else f"{'-':>14}{'-':>9}"
        print(f"{name:<24}{b}{err:>20.4f}")
    return rows


def check_out(out: str | None) -> None:
    """The GIF path, checked before the minutes of sampling: a .gif file in an existing folder ('' / None: none)."""
    if not out:
        return
    path = Path(out)
    if path.suffix.lower() != ".gif":
        raise ValueError(f"out must be a .gif path ('' to skip the GIF), got {out!r}")
    if not path.parent.is_dir():
        raise ValueError(f"out: the folder {str(path.parent)!r} does not exist")


def _main(a) -> int:
    from .cli import CLIError

    try:
        check_out(a.out)
    except ValueError as exc:
        raise CLIError(f"--{exc}") from None
    if a.random:
        run_random_demo(seed=a.seed, backend=a.backend)
    else:
        run_demo(steps=a.steps, seed=a.seed, out=a.out or None, backend=a.backend, calibration=a.calibration,
                 rtn=not a.no_rtn)
    return 0


def add_parser(sub) -> None:
    d = sub.add_parser("demo", help="generate video on CPU with the shipped video DiT: full precision vs W3A6")
    d.add_argument("--steps", type=int, default=None, help="sampling steps (default: the shipped sampler's, 20)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--out", default="qvdit_demo.gif", help="GIF path ('' to skip)")
    d.add_argument("--calibration", default=None, help="a save_quantized file (default: the shipped W3A6 one)")
    d.add_argument("--no-rtn", action="store_true", help="skip the RTN comparison row")
    d.add_argument("--backend", default="torch", choices=("auto", "torch", "triton", "cuda"))
    d.add_argument("--random", action="store_true", help="the random-weights check instead (tiny random Wan)")
    d.set_defaults(func=_main)
