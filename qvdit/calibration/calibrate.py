"""`calibrate(model, items, config, recipe)`: end-to-end Q-VDiT calibration (SPEC section 3).

A copy of the full-precision `model` gets a `FakeQuantLinear` in place of every linear `quantize_` would
take. It is trained to match the FP model's output on cached (x_t, t, condition) items from the sampler's
timesteps (both CFG branches as separate items), with activation fake quantization on (straight-through):

    loss = MSE(S_q, S_fp) + gamma * TMD(S_q, S_fp)          (gamma = 100, TMD over the true frame axis)

Trained, each with its own AdamW group and a cosine schedule to 0: TQE alpha/beta, the per-layer
per-frame gates (initialised by Eq. 9), the weight step sizes (log space) and the rank-32 pre-quantization
LoRA (merged into the integer weights at deployment). Then `deploy_` writes packed QLinear weights with the
learned scales, so the result runs on the kernels (`save_quantized` stores it).

Recipes (the ablation; every one from this code):
    rtn          min-max RTN, nothing learned (= quantize_)
    bias_corr    RTN + closed-form per-channel bias correction (mean output error per channel)
    tqe          + TQE alpha/beta, gates fixed at 1, MSE only
    tqe_gates    + Eq. 9 gates, trained
    tqe_tmd      + TMD loss
    full         + learned step sizes (clip-search init) + rank-32 LoRA
    full_nolora  full without the LoRA (the rank-1 term alone)

Resumable: a checkpoint (every trainable tensor and buffer of the fake-quant layers, optimizer state,
iteration) is written every `checkpoint_every` iterations; the batch of iteration i is drawn from seed
(seed, i) alone, so a resumed run gives the same result as an uninterrupted one.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from qvdit.config import LayerQuant, QuantConfig
from qvdit.models import find_adapter
from qvdit.quantize import _parent, attach_frames, select_linears

from .deploy import deploy_
from .fakequant import FakeQuantLinear
from .tmd import tmd_loss
from .tqe_init import init_gates, run_with_hooks

SEED_STRIDE = 1_000_003


@dataclass(frozen=True)
class Recipe:
    name: str
    train: bool = True
    tqe: bool = True
    gates: bool = True
    gate_init: str = "eq9"   # "eq9" or "ones"
    tmd: bool = True
    lora_rank: int = 32
    learn_scale: bool = True
    weight_init: str = "mse"  # "mse" (clip-ratio search, official code) or "minmax"
    bias_correction: bool = False


_BASE = dict(tqe=False, gates=False, tmd=False, lora_rank=0, learn_scale=False, weight_init="minmax")
RECIPES = {
    "rtn": Recipe("rtn", train=False, **_BASE),
    "bias_corr": Recipe("bias_corr", train=False, bias_correction=True, **_BASE),
    "tqe": Recipe("tqe", **dict(_BASE, tqe=True)),
    "tqe_gates": Recipe("tqe_gates", **dict(_BASE, tqe=True, gates=True)),
    "tqe_tmd": Recipe("tqe_tmd", **dict(_BASE, tqe=True, gates=True, tmd=True)),
    "full": Recipe("full"),
    "full_nolora": Recipe("full_nolora", lora_rank=0),
}
DEFAULT_LR = {"tqe": 1e-3, "gate": 1e-3, "lora": 2e-4, "scale": 1e-3}


def get_recipe(recipe) -> Recipe:
    if isinstance(recipe, Recipe):
        return recipe
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be a Recipe or one of {sorted(RECIPES)}, got {recipe!r}")
    return RECIPES[recipe]


# ----------------------------------------------------------------------------- items
def wan_forward(model, x, t, ehs):
    """Default forward of a diffusers video transformer on one batch of items."""
    return model(hidden_states=x, timestep=t, encoder_hidden_states=ehs, return_dict=False)[0]


def collect_items(transformer, cond, uncond, noise, steps: int = 20, cfg: float = 3.0, shift: float = 1.0,
                  batch_size: int | None = None) -> dict[str, torch.Tensor]:
    """Run the FP sampler and cache every step's (x_t, Wan timestep, encoder_hidden_states, FP output) for
    both CFG branches. Returns CPU tensors x [N,...], t [N], ehs [N,L,D], y [N,...]."""
    from qvdit.testbed.sampler import sample

    rec = {"x": [], "t": [], "ehs": [], "y": []}

    def record(x, t, ehs, v):
        rec["x"].append(x.detach().cpu())
        rec["t"].append(torch.full((x.shape[0],), t * 1000.0))
        rec["ehs"].append(ehs.detach().cpu())
        rec["y"].append(v.detach().float().cpu())

    sample(transformer, cond, uncond, noise, steps=steps, cfg=cfg, shift=shift, record=record, batch_size=batch_size)
    return {k: torch.cat(v) for k, v in rec.items()}


@torch.no_grad()
def fp_targets(model, items, batch_size: int = 32, forward_fn=wan_forward) -> torch.Tensor:
    dev = _device(model)
    outs = []
    for lo in range(0, items["x"].shape[0], batch_size):
        sl = slice(lo, lo + batch_size)
        outs.append(forward_fn(model, items["x"][sl].to(dev), items["t"][sl].to(dev), items["ehs"][sl].to(dev)).float().cpu())
    return torch.cat(outs)


def _device(model) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _num_frames(model, x: torch.Tensor) -> int:
    adapter = find_adapter(model)
    if adapter is None:
        return 1
    return adapter.layouts(model, (x[:1],), {})["video"].num_frames


# ----------------------------------------------------------------------------- preparation
def prepare(model: nn.Module, config: QuantConfig, recipe: Recipe, num_frames: int, seed: int = 0,
            filter_fn=None) -> dict[str, FakeQuantLinear]:
    """Swap the linears quantize_ would take for FakeQuantLinear, in place; install the frame adapter."""
    adapter = find_adapter(model)
    fakes = {}
    for name, linear in select_linears(model, config, filter_fn):
        lq = config.for_module(name)
        lq = LayerQuant(lq.w_bits, lq.a_bits, lq.tqe and recipe.tqe)
        row_kind = adapter.row_kind(name) if adapter is not None else "video"
        fake = FakeQuantLinear(linear, lq, name=name, row_kind=row_kind, num_frames=num_frames,
                               lora_rank=recipe.lora_rank, weight_init=recipe.weight_init, seed=seed)
        parent, child = _parent(model, name)
        setattr(parent, child, fake)
        fakes[name] = fake
    if not fakes:
        raise ValueError("calibrate selected no nn.Linear in this model (check filter_fn and config.skip)")
    attach_frames(model, list(fakes.values()))
    return fakes


def trainable_groups(fakes: dict[str, FakeQuantLinear], recipe: Recipe, lr: dict) -> list[dict]:
    groups = {"tqe": [], "gate": [], "lora": [], "scale": []}
    for f in fakes.values():
        if f.tqe:
            groups["tqe"] += [f.alpha, f.beta]
            if recipe.gates and f.row_kind != "none":
                groups["gate"].append(f.gate)
        if f.lora_A is not None:
            groups["lora"] += [f.lora_A, f.lora_B]
        if recipe.learn_scale:
            groups["scale"].append(f.w_log_scale)
    out = []
    for key, params in groups.items():
        for p in params:
            p.requires_grad_(True)
        if params:
            out.append({"params": params, "lr": lr[key], "base_lr": lr[key], "name": key,
                        "weight_decay": 0.01 if key in ("tqe", "lora") else 0.0})
    return out


@torch.no_grad()
def bias_correct(model, fakes: dict[str, FakeQuantLinear], run_batches) -> None:
    """bias_corr[n] = mean over the tokens the layer sees of (X W^T + b - layer(X))[:, n], all layers in one pass."""
    sums, counts = {}, {}

    def make_hook(name, f):
        def hook(module, args, output):
            x = args[0].reshape(-1, f.in_features).float()
            y = output.reshape(-1, f.out_features).float()
            err = (x @ f.weight.T + (f.bias if f.bias is not None else 0)) - y
            sums[name] = sums.get(name, 0) + err.double().sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]
        return hook

    for f in fakes.values():
        f.bias_corr.zero_()
    run_with_hooks(run_batches, [f.register_forward_hook(make_hook(name, f)) for name, f in fakes.items()])
    for name, f in fakes.items():
        if name in sums:
            f.bias_corr.copy_((sums[name] / counts[name]).float())


def _fake_state(fakes: dict[str, FakeQuantLinear]) -> dict[str, torch.Tensor]:
    out = {}
    for name, f in fakes.items():
        for k, v in list(f.named_parameters()) + list(f.named_buffers()):
            out[f"{name}.{k}"] = v.detach().clone()
    return out


def _load_fake_state(fakes, state) -> None:
    with torch.no_grad():
        for name, f in fakes.items():
            for k, v in list(f.named_parameters()) + list(f.named_buffers()):
                v.copy_(state[f"{name}.{k}"].to(v.device))


def _batch_index(n_items: int, batch_size: int, seed: int, it: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * SEED_STRIDE + it)
    return torch.randperm(n_items, generator=g)[:batch_size]


# ----------------------------------------------------------------------------- the loop
def calibrate(model: nn.Module, items: dict, config: QuantConfig, recipe="full", *, iters: int = 300,
              batch_size: int = 8, lr: dict | None = None, gamma: float = 100.0, seed: int = 0,
              checkpoint: str | os.PathLike | None = None, resume: bool = True, checkpoint_every: int = 100,
              init_batches: int = 4, deploy: bool = True, progress: bool = True, grad_checkpointing: bool = False,
              filter_fn=None, forward_fn=wan_forward, stop_after: int | None = None) -> nn.Module:
    """Calibrate a quantized copy of the full-precision `model` (left untouched) and return it.

    items: dict with x [N,...] (x_t), t [N] (the model's timestep values), ehs [N,L,D] (encoder hidden
        states) and optionally y [N,...] (FP outputs; computed here when absent). CPU or model device.
    config: QuantConfig (bits, overrides, skip); recipe: a name in RECIPES or a Recipe.
    iters / batch_size: optimisation steps and items per step; lr: per-group learning rates
        (keys tqe, gate, lora, scale; defaults DEFAULT_LR); gamma: TMD weight.
    checkpoint: path of the resumable state (torch.save); resume: continue from it when it exists.
    deploy: return the deployed model (QLinear, packed weights) rather than the fake-quant one.
    stop_after: stop after this many iterations in this call (a chunk), leaving the checkpoint to resume.
    The model's `_qvdit_calibration` holds the recipe, the loss history and the final gates.
    """
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a QuantConfig, got {type(config).__name__}")
    recipe = get_recipe(recipe)
    for key in ("x", "t", "ehs"):
        if key not in items:
            raise ValueError(f"items needs key {key!r} (x_t, timestep, encoder_hidden_states); got {sorted(items)}")
    if iters < 0 or batch_size < 1:
        raise ValueError(f"iters must be >= 0 and batch_size >= 1, got {iters}, {batch_size}")
    lr = dict(DEFAULT_LR, **(lr or {}))
    dev = _device(model)
    n_items = items["x"].shape[0]
    x_all, t_all, e_all = items["x"].to(dev), items["t"].to(dev).float(), items["ehs"].to(dev)
    y_all = (items["y"] if "y" in items else fp_targets(model, items, forward_fn=forward_fn)).to(dev).float()

    qmodel = copy.deepcopy(model).eval().requires_grad_(False)
    num_frames = _num_frames(qmodel, x_all)
    fakes = prepare(qmodel, config, recipe, num_frames, seed, filter_fn)

    def run_batches():
        for b in range(init_batches):
            idx = _batch_index(n_items, batch_size, seed + 7919, b).to(dev)
            forward_fn(qmodel, x_all[idx], t_all[idx], e_all[idx])

    if recipe.bias_correction:
        bias_correct(qmodel, fakes, run_batches)
    if recipe.tqe and recipe.gates and recipe.gate_init == "eq9":
        init_gates(qmodel, run_batches, num_frames)
    history, start = [], 0
    if recipe.train and iters > 0:
        groups = trainable_groups(fakes, recipe, lr)
        opt = torch.optim.AdamW(groups, betas=(0.9, 0.999))
        if checkpoint is not None and resume and os.path.isfile(checkpoint):
            ck = torch.load(checkpoint, map_location=dev, weights_only=False)
            if ck["recipe"] != dataclasses.asdict(recipe) or ck["config"] != config.to_json() or ck["seed"] != seed:
                raise ValueError(f"checkpoint {checkpoint} was written for another recipe/config/seed")
            _load_fake_state(fakes, ck["fake_state"])
            opt.load_state_dict(ck["opt"])
            start, history = ck["iter"], ck["history"]
        if grad_checkpointing and hasattr(qmodel, "enable_gradient_checkpointing"):
            qmodel.enable_gradient_checkpointing()
        end = iters if stop_after is None else min(iters, start + stop_after)
        bar = tqdm(range(start, end), desc=f"calibrate {config.name} {recipe.name}", disable=not progress,
                   initial=start, total=iters, leave=False)
        for it in bar:
            scale = 0.5 * (1 + math.cos(math.pi * it / iters))  # cosine to 0
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * scale
            idx = _batch_index(n_items, batch_size, seed, it).to(dev)
            out = forward_fn(qmodel, x_all[idx], t_all[idx], e_all[idx]).float()
            mse = F.mse_loss(out, y_all[idx])
            tmd = tmd_loss(out, y_all[idx]) if recipe.tmd else torch.zeros((), device=dev)
            loss = mse + gamma * tmd
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            history.append((mse.item(), tmd.item()))
            if progress and it % 10 == 0:
                bar.set_postfix(mse=f"{history[-1][0]:.4g}", tmd=f"{history[-1][1]:.3g}")
            done = it + 1
            if checkpoint is not None and (done % checkpoint_every == 0 or done == end):
                _save_checkpoint(checkpoint, fakes, opt, done, history, recipe, config, seed)
        bar.close()
        for p in qmodel.parameters():
            p.requires_grad_(False)
        if grad_checkpointing and hasattr(qmodel, "disable_gradient_checkpointing"):
            qmodel.disable_gradient_checkpointing()
    info = {"recipe": dataclasses.asdict(recipe), "iters": iters, "batch_size": batch_size, "lr": lr, "gamma": gamma,
            "seed": seed, "history": history, "num_frames": num_frames,
            "gates": {n: f.gate.detach().cpu() for n, f in fakes.items() if f.tqe}}
    out_model = deploy_(qmodel, dataclasses.replace(config, tqe=config.tqe and recipe.tqe)) if deploy else qmodel
    out_model._qvdit_calibration = info
    return out_model


def _save_checkpoint(path, fakes, opt, it, history, recipe, config, seed) -> None:
    tmp = f"{os.fspath(path)}.tmp"
    torch.save({"iter": it, "fake_state": _fake_state(fakes), "opt": opt.state_dict(), "history": history,
                "recipe": dataclasses.asdict(recipe), "config": config.to_json(), "seed": seed}, tmp)
    os.replace(tmp, path)
