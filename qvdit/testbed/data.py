"""Procedural video clips: one anti-aliased object (square or disc, one of a few colours) on black,
translating in one of four directions. Generated on the fly from a seed; nothing is stored.

A label is three indices (shape, colour, motion); its prompt reads e.g. "a red square moving right".
The start position is drawn from the same central box for every direction, so the first frame does not
tell where the object goes: only the label does, and temporal consistency is what a model must learn.

Clips are `[B, 3, F, H, W]` in [-1, 1] (background -1), which is also the model's latent (no VAE).
The random parameters are drawn on the CPU from a `torch.Generator` and only the rendering runs on the
target device, so a seed gives the same clips on any device.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

SHAPES = ("square", "disc")
COLOURS = {  # RGB in [0, 1]; saturated so that max(R, G, B) = 1 marks the object
    "red": (1.0, 0.15, 0.1),
    "green": (0.15, 1.0, 0.2),
    "blue": (0.2, 0.45, 1.0),
    "yellow": (1.0, 0.9, 0.1),
}
MOTIONS = ("right", "left", "down", "up")
MOTION_VECTORS = ((1.0, 0.0), (-1.0, 0.0), (0.0, 1.0), (0.0, -1.0))  # (dx, dy) per frame, y grows downward


@dataclass(frozen=True)
class DataConfig:
    """What the clips look like. Sizes are in pixels, speeds in pixels per frame."""

    frames: int = 8
    size: int = 32
    speed: tuple = (1.25, 1.75)
    half_size: tuple = (4.0, 5.5)
    start_box: tuple = (11.0, 21.0)  # the object's first-frame centre is uniform in this box (x and y)

    def __post_init__(self):
        if self.frames < 2 or self.size < 8:
            raise ValueError(f"frames must be >= 2 and size >= 8, got frames={self.frames}, size={self.size}")
        for name in ("speed", "half_size", "start_box"):
            lo, hi = getattr(self, name)
            if not lo <= hi:
                raise ValueError(f"{name} must be (low, high) with low <= high, got {getattr(self, name)}")

    @property
    def num_labels(self) -> tuple[int, int, int]:
        return len(SHAPES), len(COLOURS), len(MOTIONS)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "DataConfig":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def all_labels() -> torch.Tensor:
    """Every (shape, colour, motion) combination, int64 [32, 3]."""
    s, c, m = len(SHAPES), len(COLOURS), len(MOTIONS)
    grid = torch.stack(torch.meshgrid(torch.arange(s), torch.arange(c), torch.arange(m), indexing="ij"), -1)
    return grid.reshape(-1, 3)


def eval_labels(n: int) -> torch.Tensor:
    """n labels cycling through every combination (balanced when n is a multiple of 32)."""
    combos = all_labels()
    return combos[torch.arange(n) % combos.shape[0]]


def label_text(labels: torch.Tensor) -> list[str]:
    colours = list(COLOURS)
    return [f"a {colours[c]} {SHAPES[s]} moving {MOTIONS[m]}" for s, c, m in labels.tolist()]


def random_labels(n: int, generator: torch.Generator) -> torch.Tensor:
    highs = torch.tensor([len(SHAPES), len(COLOURS), len(MOTIONS)])
    return (torch.rand(n, 3, generator=generator) * highs).long().clamp(max=highs - 1)


def draw_params(labels: torch.Tensor, cfg: DataConfig, generator: torch.Generator) -> dict:
    """The random parameters of each clip (CPU): start centre [B,2], speed [B], half size [B]."""
    n = labels.shape[0]
    u = torch.rand(n, 4, generator=generator, dtype=torch.float64)
    lo, hi = cfg.start_box
    start = lo + (hi - lo) * u[:, :2]
    speed = cfg.speed[0] + (cfg.speed[1] - cfg.speed[0]) * u[:, 2]
    half = cfg.half_size[0] + (cfg.half_size[1] - cfg.half_size[0]) * u[:, 3]
    return {"start": start.float(), "speed": speed.float(), "half": half.float()}


def trajectories(labels: torch.Tensor, params: dict, frames: int) -> torch.Tensor:
    """Object centre of every frame, [B, F, 2] as (x, y) in pixel coordinates."""
    vec = torch.tensor(MOTION_VECTORS)[labels[:, 2]] * params["speed"][:, None]
    steps = torch.arange(frames, dtype=torch.float32)
    return params["start"][:, None, :] + steps[None, :, None] * vec[:, None, :]


def render(labels: torch.Tensor, cfg: DataConfig = DataConfig(), generator: torch.Generator | None = None,
           device=None, params: dict | None = None) -> tuple[torch.Tensor, dict]:
    """Clips [B, 3, F, H, W] in [-1, 1] for `labels` (int64 [B, 3]) and the parameters they were drawn from."""
    if labels.dim() != 2 or labels.shape[1] != 3:
        raise ValueError(f"labels must be [B, 3] (shape, colour, motion), got {list(labels.shape)}")
    labels = labels.cpu().long()
    if params is None:
        params = draw_params(labels, cfg, generator if generator is not None else torch.Generator().manual_seed(0))
    centres = trajectories(labels, params, cfg.frames).to(device)  # [B, F, 2]
    half = params["half"].to(device)[:, None, None, None]
    coords = torch.arange(cfg.size, dtype=torch.float32, device=device)
    dx = coords[None, None, None, :] - centres[..., 0, None, None]  # [B, F, 1, W]
    dy = coords[None, None, :, None] - centres[..., 1, None, None]  # [B, F, H, 1]
    # coverage of each pixel (1-pixel linear ramp at the edge: anti-aliasing)
    square = (half + 0.5 - dx.abs()).clamp(0, 1) * (half + 0.5 - dy.abs()).clamp(0, 1)
    disc = (half + 0.5 - torch.sqrt(dx * dx + dy * dy)).clamp(0, 1)
    is_disc = (labels[:, 0] == SHAPES.index("disc")).to(device)[:, None, None, None]
    cover = torch.where(is_disc, disc, square)  # [B, F, H, W]
    colour = torch.tensor(list(COLOURS.values()), device=device)[labels[:, 1].to(device)] * 2 - 1  # [B, 3]
    clips = -1 + cover[:, None] * (colour[:, :, None, None, None] + 1)
    return clips, params


def batch(n: int, seed: int, cfg: DataConfig = DataConfig(), device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """n random (clip, label) pairs from `seed`: the training stream draws batch(n, hash(data_seed, step))."""
    gen = torch.Generator().manual_seed(seed)
    labels = random_labels(n, gen)
    clips, _ = render(labels, cfg, gen, device)
    return clips, labels.to(device)
