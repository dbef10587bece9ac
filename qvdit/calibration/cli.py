"""`qvdit calibrate`: Q-VDiT calibration of a model folder into a quantized checkpoint (`save_quantized`).

    qvdit calibrate --out w3a6.safetensors                                  # the shipped testbed model
    qvdit calibrate ./my-wan-transformer --items items.safetensors --out my-w3a6.safetensors --device cuda

MODEL is the testbed (default: the one in qvdit/assets; or a path written by `python -m qvdit.testbed.train
--export`), whose calibration items are produced here by its own sampler, or a diffusers model folder
(config.json + weights, as `qvdit quantize` takes), for which `--items` gives the cached items: a
safetensors file with x (x_t [N,C,F,H,W]), t (the model's timestep values [N]), ehs (encoder hidden states
[N,L,D]) and optionally y (FP outputs; computed when absent). The result reloads with
`qvdit.load_quantized(model, OUT)` on the same full-precision architecture. Resumable with --checkpoint.
"""
from __future__ import annotations

import os
import time

import torch

from ..cli import CLIError
from ..cli_quantize import resolve_model_folder


def _is_testbed(path: str | None) -> bool:
    if path is None:
        return True
    from ..testbed.model import _paths

    return _paths(path)[1].is_file()


def load_items(path: str) -> dict:
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise CLIError(f"--items {path!r} is not a file")
    items = load_file(path)
    missing = [k for k in ("x", "t", "ehs") if k not in items]
    if missing:
        raise CLIError(f"--items {path!r} lacks {missing} (needs x, t, ehs and optionally y)")
    return items


def calibrate_folder(model_path, out, *, items_path=None, subfolder=None, w_bits=3, a_bits=6, recipe="full",
                     iters=300, batch_size=8, gamma=100.0, seed=0, checkpoint=None, resume=True, device="cpu",
                     clips=32, progress=True) -> dict:
    from .. import QuantConfig, save_quantized
    from .calibrate import RECIPES, calibrate

    if recipe not in RECIPES:
        raise CLIError(f"--recipe must be one of {sorted(RECIPES)}, got {recipe!r}")
    if os.path.isdir(out):
        raise CLIError(f"--out {out!r} is a folder; give a .safetensors file path")
    try:
        config = QuantConfig(w_bits=w_bits, a_bits=a_bits, seed=seed)
    except (TypeError, ValueError) as exc:
        raise CLIError(str(exc)) from None
    dev = torch.device(device)
    if _is_testbed(model_path):
        from ..testbed.model import load_testbed

        tb, meta = load_testbed(model_path, dev)
        transformer = tb.transformer
        from ..testbed.train import testbed_items

        items = load_items(items_path) if items_path else testbed_items(tb, meta, clips, dev)
        source = f"testbed {model_path or 'qvdit/assets/testbed_wan'}"
    else:
        if not items_path:
            raise CLIError("a diffusers model folder needs --items (cached x, t, ehs of its sampler)")
        folder, cls, _ = resolve_model_folder(model_path, subfolder)
        transformer = cls.from_pretrained(folder, torch_dtype=torch.float32).to(dev).eval()
        items = load_items(items_path)
        source = folder
    print(f"calibrating {type(transformer).__name__} from {source}: {config.name}, recipe {recipe}, "
          f"{items['x'].shape[0]} items, {iters} iterations x {batch_size}, on {dev}")
    t0 = time.perf_counter()
    q = calibrate(transformer, items, config, recipe, iters=iters, batch_size=batch_size, gamma=gamma, seed=seed,
                  checkpoint=checkpoint, resume=resume, progress=progress)
    seconds = time.perf_counter() - t0
    save_quantized(q, out)
    hist = q._qvdit_calibration["history"]
    summary = {"source": source, "setting": config.name, "recipe": recipe, "items": int(items["x"].shape[0]),
               "iters": iters, "seconds": round(seconds, 1), "out": out,
               "first_mse": hist[0][0] if hist else None, "final_mse": hist[-1][0] if hist else None}
    msg = f"; train MSE vs FP {hist[0][0]:.4g} -> {hist[-1][0]:.4g}" if hist else ""
    print(f"calibrated in {seconds:.1f} s{msg}; wrote {out} (reload: qvdit.load_quantized(model, {out!r}))")
    return summary


def _run(args) -> None:
    calibrate_folder(args.model, args.out, items_path=args.items, subfolder=args.subfolder, w_bits=args.w_bits,
                     a_bits=args.a_bits, recipe=args.recipe, iters=args.iters, batch_size=args.batch_size,
                     gamma=args.gamma, seed=args.seed, checkpoint=args.checkpoint, resume=not args.no_resume,
                     device=args.device, clips=args.clips, progress=not args.quiet)


def add_parser(sub) -> None:
    p = sub.add_parser("calibrate", help="Q-VDiT calibration (TQE + gates + TMD) of a model into a quantized checkpoint",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", default=None, help="testbed path or diffusers model folder (default: shipped testbed)")
    p.add_argument("--out", required=True, help="quantized checkpoint to write (.safetensors)")
    p.add_argument("--items", default=None, help="cached calibration items (safetensors: x, t, ehs[, y])")
    p.add_argument("--subfolder", default=None, help="model subfolder of a pipeline folder (default: transformer)")
    p.add_argument("--w-bits", type=int, default=3)
    p.add_argument("--a-bits", type=int, default=6)
    p.add_argument("--recipe", default="full", help="rtn, bias_corr, tqe, tqe_gates, tqe_tmd, full, full_nolora")
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--gamma", type=float, default=100.0, help="TMD weight")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clips", type=int, default=32, help="testbed: clips whose sampler steps are the items")
    p.add_argument("--checkpoint", default=None, help="resumable state (written every 100 iterations)")
    p.add_argument("--no-resume", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)
