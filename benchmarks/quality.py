"""Quality study: Q-VDiT calibration recipes vs RTN on the shipped testbed video DiT, paired against the
full-precision model's clips from the same noise.

    python benchmarks/quality.py --device cuda                       # shipped model, the full study
    python benchmarks/quality.py --model .work/export/testbed_wan --clips 256 --iters 300

For every setting (default W3A6, W4A6, W3A8, W4A8, W8A8): calibrate on cached sampler items (their own
labels and noise, never the evaluation noise), deploy to packed QLinear (reference backend, so the numbers
are those of the deployed integer model), sample the evaluation clips from the same noise as the fp32
model, and compute the paired per-clip metrics of `qvdit.testbed.metrics`. The ablation setting runs every
recipe; the others RTN and the full recipe. The fp32-vs-bf16 noise floor is measured the same way.
Writes `quality_<setting>.json` (per-clip arrays + summaries + paired statistics against RTN and against
bias correction), `quality_summary.json`, `quality.png` and one side-by-side GIF per setting
(rows: FP, RTN, full recipe) under --out. Also reports the model's weight kurtosis and activation
outlier ratios.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from qvdit import QuantConfig, save_quantized  # noqa: E402
from qvdit.calibration import calibrate  # noqa: E402
from qvdit.testbed.data import eval_labels  # noqa: E402
from qvdit.testbed.metrics import dis_flows, paired_metrics, paired_stats, write_gif  # noqa: E402
from qvdit.testbed.model import load_testbed  # noqa: E402
from qvdit.testbed.train import generate, testbed_items  # noqa: E402

ABLATION = ("rtn", "bias_corr", "tqe", "tqe_gates", "tqe_tmd", "full_nolora", "full")
HIGHER_IS_BETTER = {"psnr": True, "ssim": True, "motion_ok": True}
SUMMARY_KEYS = ("mse", "psnr", "ssim", "one_minus_ssim", "tdiff_mae", "flow_epe", "warp_err", "warp_err_diff",
                "flicker_diff", "traj_err", "motion_ok")


def summarize(m: dict) -> dict:
    return {k: float(np.mean(m[k])) for k in SUMMARY_KEYS if k in m}


def paired(m: dict, base: dict) -> dict:
    return {k: paired_stats(m[k], base[k], HIGHER_IS_BETTER.get(k, False)) for k in SUMMARY_KEYS
            if k in m and k != "motion_ok"}


@torch.no_grad()
def model_statistics(model, items, n: int = 16) -> dict:
    """Weight kurtosis of the block linears and activation outlier ratios of their inputs (FP model)."""
    tr = model.transformer
    lin = {name: mod for name, mod in tr.named_modules() if isinstance(mod, torch.nn.Linear) and name.startswith("blocks.")}
    kurt = []
    for mod in lin.values():
        w = mod.weight.double().flatten()
        z = (w - w.mean()) / w.std()
        kurt.append(float((z ** 4).mean()))
    tok, ch = [], []

    def hook(module, args):
        x = args[0].reshape(-1, args[0].shape[-1]).float()
        tok.append(float((x.abs().amax(1) / x.pow(2).mean(1).sqrt().clamp(min=1e-12)).mean()))
        c = x.abs().amax(0)
        ch.append(float(c.max() / c.median().clamp(min=1e-12)))

    hooks = [m.register_forward_pre_hook(hook) for m in lin.values()]
    dev = next(tr.parameters()).device
    tr(hidden_states=items["x"][:n].to(dev), timestep=items["t"][:n].to(dev),
       encoder_hidden_states=items["ehs"][:n].to(dev), return_dict=False)
    for h in hooks:
        h.remove()
    return {"weight_kurtosis": {"mean": float(np.mean(kurt)), "min": float(np.min(kurt)), "max": float(np.max(kurt))},
            "act_token_max_over_rms": {"mean": float(np.mean(tok)), "max": float(np.max(tok))},
            "act_channel_max_over_median": {"mean": float(np.mean(ch)), "max": float(np.max(ch))},
            "layers": len(lin)}


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("psnr", "PSNR vs FP (dB) ↑"), ("one_minus_ssim", "1 - SSIM ↓"), ("tdiff_mae", "temporal-diff MAE ↓"),
               ("flow_epe", "DIS flow EPE vs FP (px) ↓")]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4))
    settings = [s for s in summary["settings"]]
    recipes = list(ABLATION)
    width = 0.8 / len(recipes)
    for ax, (key, title) in zip(axes, metrics):
        for j, r in enumerate(recipes):
            xs, ys = [], []
            for i, s in enumerate(settings):
                res = summary["settings"][s]["recipes"].get(r)
                if res is not None:
                    xs.append(i + (j - len(recipes) / 2) * width)
                    ys.append(res["mean"][key])
            if xs:
                ax.bar(xs, ys, width, label=r)
        floor = summary["noise_floor_bf16"]["mean"][key]
        ax.axhline(floor, color="k", ls="--", lw=1, label="bf16 floor")
        ax.set_xticks(range(len(settings)), settings)
        ax.set_title(title)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="testbed path (default: the shipped qvdit/assets model)")
    p.add_argument("--settings", default="W3A6,W4A6,W3A8,W4A8,W8A8")
    p.add_argument("--ablation", default="W3A6", help="setting that runs every recipe")
    p.add_argument("--recipes", default=",".join(ABLATION), help="recipes of the ablation setting")
    p.add_argument("--clips", type=int, default=256, help="evaluation clips (>= 240 for the study)")
    p.add_argument("--calib-clips", type=int, default=32, help="clips whose sampler steps are the calibration items")
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gif-clips", type=int, default=8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--save-calibrated", default=None, help="write the full-recipe model of this setting (e.g. W3A6)")
    p.add_argument("--deadline", type=float, default=None, help="unix time after which no new setting starts")
    p.add_argument("--progress", action="store_true")
    args = p.parse_args(argv)

    t_start = time.time()
    dev = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference must be fp32
    torch.backends.cudnn.allow_tf32 = False
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, meta = load_testbed(args.model, dev)
    steps, cfg = meta["sampler"]["steps"], meta["sampler"]["cfg"]
    eval_seed, calib_seed = meta["data_seed"] + 3, meta["data_seed"] + 4
    labels = eval_labels(args.clips)
    env = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
           "torch": torch.__version__, "python": platform.python_version(),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "command": "python benchmarks/quality.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    common = {"env": env, "model": {k: meta.get(k) for k in ("status", "data_seed", "train", "sampler", "fp_eval", "parameters")},
              "eval": {"clips": args.clips, "seed": eval_seed, "steps": steps, "cfg": cfg},
              "calibration": {"clips": args.calib_clips, "seed": calib_seed, "iters": args.iters,
                              "batch_size": args.batch_size, "items": "every sampler step, both CFG branches"}}

    t0 = time.time()
    ref = generate(model, labels, eval_seed, steps, cfg).cpu()
    ref_bf16 = generate(model, labels, eval_seed, steps, cfg, autocast_dtype=torch.bfloat16 if dev.type == "cuda" else None).cpu() \
        if dev.type == "cuda" else None
    ref_flows = dis_flows(ref)
    from qvdit.testbed.checker import motion_accuracy

    fp_motion = motion_accuracy(ref, labels)
    print(f"FP32 reference: {args.clips} clips in {time.time() - t0:.1f} s; motion accuracy {fp_motion['accuracy']:.3f}", flush=True)
    floor = None
    if ref_bf16 is not None:
        m = paired_metrics(ref_bf16, ref, labels, ref_flows)
        floor = {"mean": summarize(m)}
    else:  # CPU has no bf16 autocast worth measuring; floor = fp32 vs itself
        floor = {"mean": summarize(paired_metrics(ref, ref, labels, ref_flows)), "note": "cpu run: fp32 vs fp32"}

    items = testbed_items(model, meta, args.calib_clips, dev)
    print(f"calibration items: {items['x'].shape[0]} ({time.time() - t0:.1f} s)", flush=True)
    stats = model_statistics(model, items)

    summary = {**common, "fp_motion": fp_motion, "noise_floor_bf16": floor, "model_statistics": stats, "settings": {}}
    skipped = []
    for setting in args.settings.split(","):
        if args.deadline is not None and time.time() > args.deadline:
            skipped.append(setting)
            continue
        w_bits, a_bits = int(setting[1]), int(setting[3])
        recipes = args.recipes.split(",") if setting == args.ablation else ["rtn", "full"]
        per_clip, res = {}, {}
        videos = {}
        for recipe in recipes:
            ts = time.time()
            config = QuantConfig(w_bits=w_bits, a_bits=a_bits, backend="torch", seed=args.seed)
            q = calibrate(model.transformer, items, config, recipe, iters=args.iters, batch_size=args.batch_size,
                          seed=args.seed, progress=args.progress)
            calib_s = time.time() - ts
            v = generate(model, labels, eval_seed, steps, cfg, transformer=q).cpu()
            m = paired_metrics(v, ref, labels, ref_flows)
            hist = q._qvdit_calibration["history"]
            res[recipe] = {"mean": summarize(m), "calib_seconds": round(calib_s, 1),
                           "final_train_mse": hist[-1][0] if hist else None, "final_train_tmd": hist[-1][1] if hist else None}
            per_clip[recipe] = m
            videos[recipe] = v[: args.gif_clips]
            if recipe == "full" and args.save_calibrated == setting:
                save_quantized(q, out / f"testbed_wan_{setting.lower()}.safetensors")
            print(f"{setting} {recipe:<12} PSNR {res[recipe]['mean']['psnr']:6.2f}  1-SSIM {res[recipe]['mean']['one_minus_ssim']:.4f}"
                  f"  tdiff {res[recipe]['mean']['tdiff_mae']:.4f}  flowEPE {res[recipe]['mean']['flow_epe']:.3f}"
                  f"  traj {res[recipe]['mean']['traj_err']:.2f}  motion {res[recipe]['mean']['motion_ok']:.3f}"
                  f"  ({calib_s:.0f} s calib, {time.time() - ts:.0f} s total)", flush=True)
            del q
        for recipe in recipes:
            if recipe != "rtn" and "rtn" in per_clip:
                res[recipe]["paired_vs_rtn"] = paired(per_clip[recipe], per_clip["rtn"])
            if recipe.startswith(("tqe", "full")) and "bias_corr" in per_clip:
                res[recipe]["paired_vs_bias_corr"] = paired(per_clip[recipe], per_clip["bias_corr"])
        summary["settings"][setting] = {"recipes": res}
        record = {**common, "setting": setting, "noise_floor_bf16": floor, "fp_motion": fp_motion, "recipes": res,
                  "per_clip": {r: {k: np.asarray(v).round(6).tolist() for k, v in m.items()} for r, m in per_clip.items()}}
        (out / f"quality_{setting.lower()}.json").write_text(json.dumps(record))
        rows = [ref[: args.gif_clips]] + [videos[r] for r in ("rtn", "full") if r in videos]
        write_gif(out / f"quality_{setting.lower()}.gif", rows, scale=3)
    summary["skipped_settings"] = skipped
    summary["seconds"] = round(time.time() - t_start, 1)
    (out / "quality_summary.json").write_text(json.dumps(summary, indent=1))
    if summary["settings"]:
        plot(summary, out / "quality.png")
    print(f"done in {summary['seconds']} s; skipped: {skipped or 'none'}; results in {out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
