"""Automatic trajectory checker: does the clip show one object moving the way its label says?

Per frame: an object weight map from brightness (the background is black and every palette colour has a
channel at full intensity), its mass and weighted centroid. Over the frames that show the object: the
least-squares velocity of the centroid. The clip's motion is the dominant axis and sign of that velocity,
accepted only when the object is present in most frames, moves at least `min_speed` px/frame and moves
mostly along one axis. The palette colour nearest to the object's mean colour is reported too.

On ground-truth clips this scores 100% (tested on every label and 512 random clips); static, reversed or
diagonal clips are rejected.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .data import COLOURS, MOTION_VECTORS


@dataclass(frozen=True)
class CheckerConfig:
    threshold: float = 0.3     # brightness in [0,1] below which a pixel is background
    min_mass: float = 6.0      # pixels of object a frame needs to count as showing it
    min_present: float = 0.75  # fraction of frames that must show the object
    min_speed: float = 0.4     # px/frame along the dominant axis
    min_dominance: float = 2.0 # |dominant velocity| / |other velocity|


def object_weights(clips: torch.Tensor, threshold: float) -> torch.Tensor:
    """[B, 3, F, H, W] in [-1,1] -> per-pixel object weight [B, F, H, W] in [0, 1]."""
    bright = (clips.float().amax(dim=1) + 1) / 2
    return ((bright - threshold) / (1 - threshold)).clamp(0, 1)


def centroids(clips: torch.Tensor, threshold: float = CheckerConfig.threshold) -> tuple[torch.Tensor, torch.Tensor]:
    """(centre [B, F, 2] as (x, y), mass [B, F]) of the object in every frame (centre NaN where mass is 0)."""
    w = object_weights(clips, threshold)
    h, wd = w.shape[-2:]
    ys = torch.arange(h, dtype=torch.float32, device=w.device)
    xs = torch.arange(wd, dtype=torch.float32, device=w.device)
    mass = w.sum(dim=(-2, -1))
    cx = (w * xs).sum(dim=(-2, -1)) / mass
    cy = (w * ys[:, None]).sum(dim=(-2, -1)) / mass
    return torch.stack((cx, cy), -1), mass


def _fit_velocity(centre: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Least-squares slope of centre over frame index using only valid frames: [B, 2]."""
    f = torch.arange(centre.shape[1], dtype=torch.float32, device=centre.device)[None, :].expand(valid.shape)
    v = valid.float()
    n = v.sum(1).clamp(min=1)
    fm = (f * v).sum(1) / n
    c = torch.nan_to_num(centre)
    cm = (c * v[..., None]).sum(1) / n[:, None]
    df = (f - fm[:, None]) * v
    var = (df * df).sum(1).clamp(min=1e-6)
    return (df[..., None] * (c - cm[:, None, :])).sum(1) / var[:, None]


def check_clips(clips: torch.Tensor, motions: torch.Tensor | None = None, cfg: CheckerConfig = CheckerConfig()) -> dict:
    """Judge every clip. Returns tensors over the batch:
    motion (int64, -1 when no clear motion), velocity [B,2], centre [B,F,2], mass [B,F], present (fraction),
    colour (palette index) and, when `motions` (label motion indices) is given, correct (bool) and accuracy.
    """
    if clips.dim() != 5 or clips.shape[1] != 3:
        raise ValueError(f"clips must be [B, 3, F, H, W], got {list(clips.shape)}")
    centre, mass = centroids(clips, cfg.threshold)
    valid = mass >= cfg.min_mass
    present = valid.float().mean(1)
    vel = _fit_velocity(centre, valid)
    dirs = torch.tensor(MOTION_VECTORS, device=vel.device)  # [4, 2]
    along = vel @ dirs.T  # projection on each direction [B, 4]
    best = along.argmax(1)
    speed = along.gather(1, best[:, None])[:, 0]
    other = (vel - speed[:, None] * dirs[best]).norm(dim=1)
    ok = (present >= cfg.min_present) & (speed >= cfg.min_speed) & (speed >= cfg.min_dominance * other)
    motion = torch.where(ok, best, torch.full_like(best, -1))
    # mean colour of the object's pixels -> nearest palette colour
    w = object_weights(clips, cfg.threshold)[:, None]  # [B,1,F,H,W]
    rgb = ((clips.float() + 1) / 2 * w).sum(dim=(2, 3, 4)) / w.sum(dim=(2, 3, 4)).clamp(min=1e-6)
    palette = torch.tensor(list(COLOURS.values()), device=rgb.device)
    colour = torch.cdist(rgb, palette).argmin(1)
    out = {"motion": motion, "velocity": vel, "centre": centre, "mass": mass, "present": present, "colour": colour}
    if motions is not None:
        out["correct"] = motion == motions.to(motion.device)
        out["accuracy"] = float(out["correct"].float().mean())
    return out


def motion_accuracy(clips: torch.Tensor, labels: torch.Tensor) -> dict:
    """Overall and per-direction motion accuracy of clips against their labels [B, 3]."""
    from .data import MOTIONS

    res = check_clips(clips, labels[:, 2])
    correct = res["correct"].cpu()
    per = {}
    for i, name in enumerate(MOTIONS):
        sel = labels[:, 2].cpu() == i
        per[name] = float(correct[sel].float().mean()) if bool(sel.any()) else float("nan")
    colour_ok = (res["colour"].cpu() == labels[:, 1].cpu()).float().mean()
    return {"accuracy": res["accuracy"], "per_motion": per, "colour_accuracy": float(colour_ok),
            "no_motion": float((res["motion"] < 0).float().mean()), "clips": int(labels.shape[0])}
