"""Train the testbed video DiT with flow matching, in resumable chunks.

    python -m qvdit.testbed.train --workdir .work/testbed --time-budget 400 --export .work/export/testbed_wan

One call trains until its time budget (or --max-steps) is spent, saves the resumable state in `--workdir`
(fp32 weights, fp32 EMA, AdamW moments in bf16 so each file stays under 16 MiB, and a json with the step
count), then evaluates the EMA weights rounded to fp16 (exactly what ships): it picks the CFG scale on a
selection set and measures motion accuracy with the trajectory checker on `--eval-clips` other clips.
`--export` writes the shipped form (fp16 safetensors + json with configs, data seed and FP accuracy);
its json says `"status": "shipped"` only when the accuracy reaches `--ship-threshold`.

Determinism: step s draws its clips from seed (data_seed, s) and its noise/timesteps from (seed, s), so a
resumed run sees the same data stream as an uninterrupted one. (Restored bf16 moments make the resumed
optimizer close to, not bit-identical with, an uninterrupted one.)
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .checker import motion_accuracy
from .data import DataConfig, all_labels, batch, eval_labels
from .model import WAN_CONFIG, build_model, load_testbed, rounded_copy, save_testbed
from .sampler import sample

SEED_STRIDE = 1_000_003


def _save_tensors(path: Path, tensors: dict, meta: dict | None = None):
    from safetensors.torch import save_file

    tmp = path.with_suffix(".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, os.fspath(tmp),
              metadata={k: str(v) for k, v in (meta or {}).items()})
    os.replace(tmp, path)


def save_state(workdir: Path, model, ema, opt, step: int, elapsed: float, args: dict) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    names = {id(p): n for n, p in model.named_parameters()}
    moments = {}
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p)
            if st:
                moments[names[id(p)] + ".exp_avg"] = st["exp_avg"].to(torch.bfloat16)
                moments[names[id(p)] + ".exp_avg_sq"] = st["exp_avg_sq"].to(torch.bfloat16)
                adam_step = int(st["step"])
    _save_tensors(workdir / "model.safetensors", model.state_dict())
    _save_tensors(workdir / "ema.safetensors", ema.state_dict())
    if moments:
        _save_tensors(workdir / "opt.safetensors", moments, {"adam_step": adam_step})
    (workdir / "state.json").write_text(json.dumps({"step": step, "elapsed_s": elapsed, "args": args}, indent=1))


def load_state(workdir: Path, model, ema, opt, device) -> tuple[int, float]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    rec = json.loads((workdir / "state.json").read_text())
    model.load_state_dict(load_file(os.fspath(workdir / "model.safetensors"), device=str(device)))
    ema.load_state_dict(load_file(os.fspath(workdir / "ema.safetensors"), device=str(device)))
    opt_path = workdir / "opt.safetensors"
    if opt_path.is_file():
        with safe_open(os.fspath(opt_path), framework="pt") as f:
            adam_step = float(f.metadata()["adam_step"])
        moments = load_file(os.fspath(opt_path), device=str(device))
        for n, p in model.named_parameters():
            if n + ".exp_avg" in moments:
                opt.state[p] = {"step": torch.tensor(adam_step), "exp_avg": moments[n + ".exp_avg"].float(),
                                "exp_avg_sq": moments[n + ".exp_avg_sq"].float()}
    return rec["step"], rec["elapsed_s"]


def flow_matching_loss(model, clips, labels, step_seed: int, p_uncond: float, autocast_dtype):
    """Rectified flow: x_t = (1-t) x0 + t eps, target eps - x0, t ~ U(0,1); labels dropped to null w.p. p_uncond."""
    dev = clips.device
    gen = torch.Generator(device=dev).manual_seed(step_seed)
    b = clips.shape[0]
    t = torch.rand(b, generator=gen, device=dev)
    eps = torch.randn(clips.shape, generator=gen, device=dev)
    drop = torch.rand(b, generator=gen, device=dev) < p_uncond
    labels = torch.where(drop[:, None], model.labels.null_labels(b, dev), labels)
    tt = t.view(b, 1, 1, 1, 1)
    xt = (1 - tt) * clips + tt * eps
    with torch.autocast(dev.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        pred = model(xt, t, labels)
    return F.mse_loss(pred.float(), eps - clips)


@torch.no_grad()
def generate(model, labels: torch.Tensor, seed: int, steps: int = 20, cfg: float = 3.0, batch_size: int = 256,
             autocast_dtype=None, transformer=None) -> torch.Tensor:
    """Clips for `labels` from noise seeded by `seed` (CPU generator, so any device gives the same noise).
    `transformer` replaces model.transformer (e.g. a quantized copy) when given."""
    dev = next(model.parameters()).device
    d = model.data
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(labels.shape[0], 3, d.frames, d.size, d.size, generator=gen).to(dev)
    labels = labels.to(dev)
    cond = model.cond(labels)
    uncond = model.uncond(labels.shape[0], dev)
    return sample(transformer if transformer is not None else model.transformer, cond, uncond, noise, steps=steps,
                  cfg=cfg, autocast_dtype=autocast_dtype, batch_size=batch_size)


def testbed_items(model, meta: dict, clips: int, device) -> dict:
    """Calibration items of the testbed: its sampler's steps on `clips` labels (every combination in turn)
    from noise of seed data_seed + 4 (never the evaluation noise)."""
    from ..calibration import collect_items

    d = model.data
    labels = all_labels().repeat((clips + 31) // 32, 1)[:clips].to(device)
    gen = torch.Generator().manual_seed(meta["data_seed"] + 4)
    noise = torch.randn(clips, 3, d.frames, d.size, d.size, generator=gen).to(device)
    with torch.no_grad():
        cond, uncond = model.cond(labels), model.uncond(clips, device)
    return collect_items(model.transformer, cond, uncond, noise, steps=meta["sampler"]["steps"], cfg=meta["sampler"]["cfg"])


def evaluate(model, clips: int, seed: int, steps: int, cfg: float, batch_size: int = 256) -> tuple[dict, torch.Tensor]:
    labels = eval_labels(clips)
    videos = generate(model, labels, seed, steps, cfg, batch_size)
    res = motion_accuracy(videos, labels)
    res.update({"seed": seed, "steps": steps, "cfg": cfg})
    return res, videos


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default=".work/testbed", help="resumable state (git-ignored)")
    p.add_argument("--time-budget", type=float, default=400.0, help="seconds of training in this call")
    p.add_argument("--max-steps", type=int, default=10**9)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--p-uncond", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-seed", type=int, default=1234)
    p.add_argument("--init-from", default=None, help="start from shipped/exported weights (fresh optimizer)")
    p.add_argument("--no-resume", action="store_true")
    p.add_argument("--eval-clips", type=int, default=256)
    p.add_argument("--select-clips", type=int, default=128)
    p.add_argument("--eval-steps", type=int, default=20)
    p.add_argument("--cfgs", default="2,3,5", help="CFG scales tried on the selection set")
    p.add_argument("--export", default=None, help="write the shipped form here (path without suffix)")
    p.add_argument("--ship-threshold", type=float, default=0.9)
    p.add_argument("--out-dir", default=None, help="write eval.json and samples.gif here")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-autocast", action="store_true", help="train in fp32 (default: bf16 autocast on CUDA)")
    p.add_argument("--tiny", action="store_true", help="a tiny model and clips (CPU smoke test)")
    p.add_argument("--log-every", type=int, default=100)
    args = p.parse_args(argv)

    dev = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    data = DataConfig(frames=4, size=16) if args.tiny else DataConfig()
    wan = dict(WAN_CONFIG, num_layers=1, num_attention_heads=2, attention_head_dim=16, ffn_dim=64,
               text_dim=16) if args.tiny else None
    model = build_model(args.seed, wan, data).to(dev).train()
    if args.init_from:
        init, _ = load_testbed(args.init_from, dev)
        model.load_state_dict(init.state_dict())
    ema = rounded_copy(model, torch.float32).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01)
    workdir = Path(args.workdir)
    step, elapsed = 0, 0.0
    if not args.no_resume and (workdir / "state.json").is_file():
        step, elapsed = load_state(workdir, model, ema, opt, dev)
        print(f"resumed {workdir} at step {step} ({elapsed:.0f} s trained before)", flush=True)
    autocast = None if (args.no_autocast or dev.type != "cuda") else torch.bfloat16
    params, ema_params = list(model.parameters()), list(ema.parameters())
    start, clips_seen, losses = time.perf_counter(), 0, []
    start_step = step
    while step < args.max_steps and time.perf_counter() - start < args.time_budget:
        lr = args.lr * min(1.0, (step + 1) / args.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        clips, labels = batch(args.batch, args.data_seed * SEED_STRIDE + step, data, dev)
        loss = flow_matching_loss(model, clips, labels, args.seed * SEED_STRIDE + step, args.p_uncond, autocast)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - decay)
        step += 1
        clips_seen += args.batch
        losses.append(loss.detach())
        if step % args.log_every == 0:
            now = time.perf_counter()
            mean_loss = float(torch.stack(losses).mean())
            losses = []
            print(f"step {step} loss {mean_loss:.4f} lr {lr:.2e} {clips_seen / (now - start):.0f} clips/s "
                  f"({now - start:.0f} s)", flush=True)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    train_s = time.perf_counter() - start
    elapsed += train_s
    rate = clips_seen / max(train_s, 1e-9)
    save_state(workdir, model, ema, opt, step, elapsed, vars(args))
    print(f"trained {step - start_step} steps in {train_s:.0f} s ({rate:.0f} clips/s); total {step} steps, "
          f"{elapsed:.0f} s; state in {workdir}", flush=True)

    # evaluate exactly what ships: the EMA weights rounded to fp16, sampled in fp32
    shipped = rounded_copy(ema, torch.float16).eval()
    t0 = time.perf_counter()
    selection = {}
    for cfg in [float(c) for c in args.cfgs.split(",")]:
        res, _ = evaluate(shipped, args.select_clips, seed=args.data_seed + 1, steps=args.eval_steps, cfg=cfg)
        selection[cfg] = res["accuracy"]
        print(f"selection set ({args.select_clips} clips) cfg {cfg}: motion accuracy {res['accuracy']:.3f}", flush=True)
    best_cfg = max(selection, key=lambda c: (selection[c], -c))
    res, videos = evaluate(shipped, args.eval_clips, seed=args.data_seed + 2, steps=args.eval_steps, cfg=best_cfg)
    print(f"FP eval ({res['clips']} clips, cfg {best_cfg}, {args.eval_steps} steps): motion accuracy "
          f"{res['accuracy']:.3f} per motion {res['per_motion']} colour {res['colour_accuracy']:.3f} "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    shipped_ok = res["accuracy"] >= args.ship_threshold
    record = {
        "status": "shipped" if shipped_ok else "not_shipped",
        "data_seed": args.data_seed, "seed": args.seed,
        "train": {"steps": step, "train_seconds": round(elapsed, 1), "batch": args.batch, "lr": args.lr,
                  "warmup": args.warmup, "ema": args.ema, "p_uncond": args.p_uncond, "optimizer": "AdamW(0.9,0.99,wd 0.01)",
                  "objective": "rectified flow, t~U(0,1), target eps-x0", "autocast": str(autocast),
                  "clips_per_s_last_chunk": round(rate, 1), "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"},
        "sampler": {"steps": args.eval_steps, "cfg": best_cfg, "shift": 1.0},
        "fp_eval": res, "cfg_selection": {str(k): v for k, v in selection.items()},
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    if args.export:
        path = save_testbed(shipped, args.export, record, torch.float16)
        print(f"exported {path} ({record['status']})", flush=True)
    if args.out_dir:
        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval.json").write_text(json.dumps(record, indent=1))
        from .metrics import write_gif

        write_gif(out / "samples.gif", [videos[:32]], scale=3)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
