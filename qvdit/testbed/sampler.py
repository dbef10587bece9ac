"""Flow-matching (rectified flow) Euler sampler with classifier-free guidance, the Wan recipe.

Convention: x_t = (1 - t) x0 + t eps, the model predicts v = eps - x0 at Wan timestep 1000 t, and the
sampler integrates dx/dt = v from t = 1 (noise) to t = 0. `shift` is Wan's flow shift
(t' = shift t / (1 + (shift - 1) t)); 1 keeps the grid uniform (right for these small clips).

`record(x_t, t, encoder_hidden_states, v)` is called at every step with each CFG branch as its own item
(cond then uncond, as the official code's cfg_split): this is how calibration items are cached.
"""
from __future__ import annotations

import contextlib

import torch


def timesteps(steps: int, shift: float = 1.0) -> torch.Tensor:
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return (shift * t / (1 + (shift - 1) * t)).float()


def velocity(transformer, x: torch.Tensor, t: float, ehs: torch.Tensor, autocast_dtype=None) -> torch.Tensor:
    """One transformer call: x [B,C,F,H,W] at scalar t in [0,1] -> velocity in float32."""
    ts = torch.full((x.shape[0],), float(t) * 1000.0, device=x.device)
    ctx = torch.autocast(x.device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    with ctx:
        return transformer(hidden_states=x, timestep=ts, encoder_hidden_states=ehs, return_dict=False)[0].float()


@torch.no_grad()
def sample(transformer, cond: torch.Tensor, uncond: torch.Tensor | None, noise: torch.Tensor, steps: int = 20,
           cfg: float = 3.0, shift: float = 1.0, autocast_dtype=None, record=None, batch_size: int | None = None,
           progress: bool = False) -> torch.Tensor:
    """Generate x0 from `noise` [B,C,F,H,W]; `cond` / `uncond` are encoder_hidden_states [B,L,D] (uncond
    may be None when cfg == 1). Processes `batch_size` clips at a time (all at once when None)."""
    if cfg != 1.0 and uncond is None:
        raise ValueError("uncond is required when cfg != 1")
    n = noise.shape[0]
    bs = n if batch_size is None else batch_size
    outs = []
    ts = timesteps(steps, shift)
    from tqdm.auto import tqdm

    bar = tqdm(total=steps * ((n + bs - 1) // bs), desc="sample", disable=not progress, leave=False)
    for lo in range(0, n, bs):
        x = noise[lo:lo + bs].float()
        c = cond[lo:lo + bs]
        u = uncond[lo:lo + bs] if uncond is not None else None
        for i in range(steps):
            t, t_next = float(ts[i]), float(ts[i + 1])
            if cfg == 1.0:
                v = velocity(transformer, x, t, c, autocast_dtype)
                if record is not None:
                    record(x, t, c, v)
            else:
                both = velocity(transformer, torch.cat([x, x]), t, torch.cat([c, u]), autocast_dtype)
                vc, vu = both.chunk(2)
                if record is not None:
                    record(x, t, c, vc)
                    record(x, t, u, vu)
                v = vu + cfg * (vc - vu)
            x = x + (t_next - t) * v
            bar.update(1)
        outs.append(x)
    bar.close()
    return torch.cat(outs)
