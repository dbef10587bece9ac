"""Paired, full-reference video quality metrics: a quantized model's clips against the full-precision
model's clips generated from the same noise (as serving work reports them), one value per clip.

- psnr (dB) and ssim: per frame with torchmetrics (data range [0,1]), averaged over the clip's frames;
  mse: over the whole clip in [-1, 1] units.
- tdiff_mae: mean |(Q[t+1] - Q[t]) - (FP[t+1] - FP[t])|, the error of the frame-to-frame change.
- flow_epe: mean end-point error (px) between OpenCV DIS optical flows of Q and FP, consecutive frames
  (the paired "delta flow"); warp_err: each clip's own warping error (|V[t] - warp(V[t+1])|, flow t->t+1);
  flicker: mean |V[t+1] - V[t]| of each clip (both reported for Q, and the paired |Q - FP| difference).
- traj_err (px): the checker's object centroid of Q vs FP per frame, frames where only one of the two
  shows the object count `MISSING_PX`; motion_ok: the checker's motion matches the label.
VMAF is not computed: at 32x32 it leaves its 0-100 range. LPIPS/FVD need downloaded backbones.

torchmetrics and OpenCV are imported here only (the `eval` extra).
"""
from __future__ import annotations

import numpy as np
import torch

from .checker import check_clips

MISSING_PX = 8.0  # trajectory error of a frame where one clip shows the object and the other does not
FLOW_UPSCALE = 2  # DIS needs a few pixels of texture around each 8x8 patch: run it on 2x upscaled frames


def _unit(v: torch.Tensor) -> torch.Tensor:
    return ((v.float() + 1) / 2).clamp(0, 1)


def _frames(v: torch.Tensor) -> torch.Tensor:
    """[B,3,F,H,W] -> [B*F,3,H,W] in [0,1]."""
    b, c, f, h, w = v.shape
    return _unit(v).permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)


def psnr_ssim(q: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-clip mean over frames of PSNR (dB, capped at 100) and SSIM."""
    from torchmetrics.functional.image import peak_signal_noise_ratio as psnr_fn
    from torchmetrics.functional.image import structural_similarity_index_measure as ssim_fn

    b, f = q.shape[0], q.shape[2]
    fq, fr = _frames(q), _frames(ref)
    psnr = psnr_fn(fq, fr, data_range=1.0, reduction="none", dim=(1, 2, 3)).clamp(max=100.0)  # identical frames: inf
    ssim = ssim_fn(fq, fr, data_range=1.0, reduction="none")
    return psnr.view(b, f).mean(1), ssim.view(b, f).mean(1)


def _gray_u8(frame: np.ndarray) -> np.ndarray:
    import cv2

    g = (frame.mean(0) * 255).round().astype(np.uint8)
    return cv2.resize(g, None, fx=FLOW_UPSCALE, fy=FLOW_UPSCALE, interpolation=cv2.INTER_CUBIC)


def dis_flows(v: torch.Tensor) -> np.ndarray:
    """DIS optical flow between consecutive frames: [B, F-1, H, W, 2] in native pixels."""
    import cv2

    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_FAST)
    x = _unit(v).cpu().numpy()  # B,3,F,H,W
    b, _, f, h, w = x.shape
    out = np.zeros((b, f - 1, h, w, 2), np.float32)
    for i in range(b):
        grays = [_gray_u8(x[i, :, t]) for t in range(f)]
        for t in range(f - 1):
            flow = dis.calc(grays[t], grays[t + 1], None)
            out[i, t] = cv2.resize(flow, (w, h), interpolation=cv2.INTER_AREA) / FLOW_UPSCALE
    return out


def warp_error(v: torch.Tensor, flows: np.ndarray) -> np.ndarray:
    """Per clip: mean |V[t] - V[t+1](p + flow(p))| over frames and pixels (backward warp with cv2.remap)."""
    import cv2

    x = _unit(v).cpu().numpy()
    b, _, f, h, w = x.shape
    gy, gx = np.mgrid[0:h, 0:w].astype(np.float32)
    err = np.zeros(b, np.float64)
    for i in range(b):
        for t in range(f - 1):
            fl = flows[i, t]
            nxt = np.ascontiguousarray(x[i, :, t + 1].transpose(1, 2, 0))
            warped = cv2.remap(nxt, gx + fl[..., 0], gy + fl[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
            err[i] += np.abs(warped - x[i, :, t].transpose(1, 2, 0)).mean()
        err[i] /= f - 1
    return err


def flicker(v: torch.Tensor) -> torch.Tensor:
    """Per clip: mean |V[t+1] - V[t]| in [0,1] units."""
    u = _unit(v)
    return (u[:, :, 1:] - u[:, :, :-1]).abs().flatten(1).mean(1)


def trajectory_error(q: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, dict, dict]:
    """Per clip mean centroid distance (px) of Q vs FP; also returns both checker results."""
    rq, rr = check_clips(q), check_clips(ref)
    from .checker import CheckerConfig

    m = CheckerConfig.min_mass
    pq, pr = rq["mass"] >= m, rr["mass"] >= m
    d = (torch.nan_to_num(rq["centre"]) - torch.nan_to_num(rr["centre"])).norm(dim=-1)
    d = torch.where(pq & pr, d, torch.where(pq ^ pr, torch.full_like(d, MISSING_PX), torch.zeros_like(d)))
    return d.mean(1), rq, rr


def paired_metrics(q: torch.Tensor, ref: torch.Tensor, labels: torch.Tensor | None = None,
                   ref_flows: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Every per-clip metric of clips `q` against `ref` (same noise), as numpy arrays [B]."""
    q, ref = q.detach().float().cpu(), ref.detach().float().cpu()
    if q.shape != ref.shape:
        raise ValueError(f"q and ref must have the same shape, got {list(q.shape)} and {list(ref.shape)}")
    psnr, ssim = psnr_ssim(q, ref)
    mse = ((q - ref) ** 2).flatten(1).mean(1)
    dq, dr = q[:, :, 1:] - q[:, :, :-1], ref[:, :, 1:] - ref[:, :, :-1]
    tdiff = (dq - dr).abs().flatten(1).mean(1)
    fq = dis_flows(q)
    fr = dis_flows(ref) if ref_flows is None else ref_flows
    epe = np.linalg.norm(fq - fr, axis=-1).reshape(q.shape[0], -1).mean(1)
    wq, wr = warp_error(q, fq), warp_error(ref, fr)
    flq, flr = flicker(q), flicker(ref)
    traj, rq, _ = trajectory_error(q, ref)
    out = {
        "mse": mse.numpy(), "psnr": psnr.numpy(), "ssim": ssim.numpy(), "one_minus_ssim": (1 - ssim).numpy(),
        "tdiff_mae": tdiff.numpy(), "flow_epe": epe, "warp_err": wq, "warp_err_diff": np.abs(wq - wr),
        "flicker": flq.numpy(), "flicker_diff": (flq - flr).abs().numpy(), "traj_err": traj.numpy(),
    }
    if labels is not None:
        out["motion_ok"] = (rq["motion"] == labels[:, 2].cpu()).float().numpy()
    return out


def paired_stats(x: np.ndarray, base: np.ndarray, higher_is_better: bool) -> dict:
    """Mean delta of x - base per clip, its standard error, and the fraction of clips where x is better."""
    d = np.asarray(x, np.float64) - np.asarray(base, np.float64)
    better = d > 0 if higher_is_better else d < 0
    n = d.size
    return {"mean_delta": float(d.mean()), "sem": float(d.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan"),
            "frac_improved": float(better.mean()), "frac_tied": float((d == 0).mean()), "n": int(n)}


def to_uint8(v: torch.Tensor, scale: int = 1, gap: int = 2) -> np.ndarray:
    """[B,3,F,H,W] in [-1,1] -> uint8 [F, H*scale, B*(W*scale+gap)-gap, 3] (clips side by side, grey gaps)."""
    u = (_unit(v) * 255).round().to(torch.uint8)
    if scale > 1:
        u = u.repeat_interleave(scale, -1).repeat_interleave(scale, -2)
    b, c, f, h, w = u.shape
    u = torch.cat([u, torch.full((b, c, f, h, gap), 128, dtype=torch.uint8)], -1)  # separator after each clip
    return u.permute(2, 3, 0, 4, 1).reshape(f, h, b * (w + gap), c)[:, :, : b * (w + gap) - gap].numpy()


def write_gif(path, rows: list[torch.Tensor], scale: int = 2, fps: int = 4, gap: int = 2) -> None:
    """Animated GIF: each entry of `rows` is a row of clips [B,3,F,H,W] (e.g. FP above, quantized below)."""
    import imageio.v2 as imageio

    strips = [to_uint8(r.detach().cpu(), scale) for r in rows]
    width = max(s.shape[2] for s in strips)
    frames = []
    for t in range(strips[0].shape[0]):
        parts = []
        for s in strips:
            pad = np.full((s.shape[1], width, 3), 255, np.uint8)
            pad[:, : s.shape[2]] = s[t]
            parts += [pad, np.full((gap, width, 3), 255, np.uint8)]
        frames.append(np.concatenate(parts[:-1], 0))
    imageio.mimsave(str(path), frames, duration=1000 / fps, loop=0)
