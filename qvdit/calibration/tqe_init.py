"""Eq. 9 of Q-VDiT: initial per-frame TQE gates M from the activation quantization error of each frame.

    rho_i = cos(vec X_{F_i}, vec Q(X)_{F_i})                 similarity of frame i's tokens before/after quantization
    eta_i = exp(1 - rho_i) / sum_v exp(1 - rho_v)            softmax over frames of the dissimilarity
    omega_i = sum_{tau in F_i} |X_tau|_1 / sum_tau |X_tau|_1  frame i's share of the activation magnitude
    M_i = eta_i / omega_i

Both eta and omega sum to 1, so M_i is about 1 when the frames are alike; a frame whose tokens lose more
to quantization, relative to its share of the signal, gets a larger gate. `F_i` is the set of rows with
frame id i (over the whole batch); rows of other ids (text tokens) are ignored and the text entry of the
gate stays 1. Q is the deployed per-token quantizer (`fake_quant_act`, the reference math).
"""
from __future__ import annotations

import torch

from .fakequant import FakeQuantLinear, fake_quant_act


def frame_stats(x: torch.Tensor, frame_id: torch.Tensor, num_frames: int, bits: int) -> torch.Tensor:
    """Sums over each frame's rows: [num_frames, 4] = (x.xq, |x|^2, |xq|^2, L1 of x)."""
    x = x.detach().float()
    xq = fake_quant_act(x, bits).detach()
    per_row = torch.stack(((x * xq).sum(1), (x * x).sum(1), (xq * xq).sum(1), x.abs().sum(1)), 1)  # [M, 4]
    fid = frame_id.long()
    keep = fid < num_frames
    out = torch.zeros(num_frames, 4, dtype=torch.float64, device=x.device)
    out.index_add_(0, fid[keep], per_row[keep].double())
    return out


def run_with_hooks(run_batches, hooks) -> None:
    """Run the model forward with the given hook handles installed, and remove them however it ends."""
    try:
        run_batches()
    finally:
        for h in hooks:
            h.remove()


def eq9_gates(stats: torch.Tensor) -> torch.Tensor:
    """M [num_frames] from accumulated `frame_stats` (float32)."""
    dot, xx, qq, l1 = stats.unbind(1)
    rho = dot / (xx.sqrt() * qq.sqrt()).clamp(min=1e-30)
    eta = torch.softmax(1 - rho, dim=0)
    omega = l1 / l1.sum().clamp(min=1e-30)
    return (eta / omega.clamp(min=1e-30)).float()


def eq9_gate(x: torch.Tensor, frame_id: torch.Tensor, num_frames: int, bits: int) -> torch.Tensor:
    """Eq. 9 gates of one activation matrix x [M, K] whose rows have `frame_id` [M]."""
    return eq9_gates(frame_stats(x, frame_id, num_frames, bits))


@torch.no_grad()
def init_gates(model: torch.nn.Module, run_batches, num_frames: int) -> dict[str, torch.Tensor]:
    """Set the video-frame entries of every gated FakeQuantLinear's gate by Eq. 9 on the inputs it sees
    while `run_batches()` runs the model forward (one or more batches; statistics are summed).
    Returns name -> gates. Layers without a gate (text rows) or without frame ids are left at 1."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, FakeQuantLinear) and m.tqe}
    stats: dict[str, torch.Tensor] = {}

    def make_hook(name, layer):
        def hook(module, args):
            x = args[0].reshape(-1, layer.in_features)
            _, _, gate, frame_id = layer.tqe_inputs(x.shape[0], x.device)
            if gate is None or frame_id is None:
                return
            if gate.shape[0] != num_frames + 1:
                raise ValueError(f"{name}: the batch has {gate.shape[0] - 1} frames but the gate was sized for {num_frames}")
            s = frame_stats(x, frame_id, num_frames, layer.a_bits)
            stats[name] = stats[name] + s if name in stats else s
        return hook

    run_with_hooks(run_batches, [layer.register_forward_pre_hook(make_hook(name, layer)) for name, layer in layers.items()])
    gates = {}
    for name, s in stats.items():
        m = eq9_gates(s)
        layers[name].gate.data[:num_frames] = m.to(layers[name].gate.device)
        gates[name] = m
    return gates
