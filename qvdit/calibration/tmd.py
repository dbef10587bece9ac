"""Temporal Maintenance Distillation (Q-VDiT eqs. 13-14), SPEC section 3.

For a model output S [B, C, F, H, W] (frames on `frame_dim`), each frame is flattened to a vector:
    T_ij = cos(S_{F_i}, S_{F_j})          inter-frame similarity (diagonal included)
    D_i  = softmax_j(T_i1 .. T_iF)         (temperature 1)
    TMD  = mean over (b, i) of KL(D_i^FP || D_i^Q) = sum_j D^FP_ij (log D^FP_ij - log D^Q_ij)

It is zero when the quantized output equals the full-precision one and needs no labels. The calibration
loss is MSE(S^Q, S^FP) + gamma * TMD with gamma = 100. (The official code uses kl_div(reduction='mean'),
which also divides by F; SPEC's "averaged over frames" is followed here, so gamma weighs it F times more.)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def frame_similarity(out: torch.Tensor, frame_dim: int = 2) -> torch.Tensor:
    """Cosine-similarity Gram matrix of the frames: [B, F, F] (float32)."""
    if out.dim() < 3:
        raise ValueError(f"out must have a batch, a frame axis and features, got shape {list(out.shape)}")
    s = out.float().movedim(frame_dim, 1).flatten(2)  # [B, F, rest]
    s = F.normalize(s, dim=-1, eps=1e-12)
    return s @ s.transpose(1, 2)


def tmd_loss(out_q: torch.Tensor, out_fp: torch.Tensor, frame_dim: int = 2) -> torch.Tensor:
    """KL(D_fp || D_q) averaged over batch and frames (a scalar)."""
    if out_q.shape != out_fp.shape:
        raise ValueError(f"out_q and out_fp must have the same shape, got {list(out_q.shape)} and {list(out_fp.shape)}")
    log_q = torch.log_softmax(frame_similarity(out_q, frame_dim), dim=-1)
    log_p = torch.log_softmax(frame_similarity(out_fp, frame_dim).detach(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()
