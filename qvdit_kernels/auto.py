"""backend="auto" for the GEMM: which backend runs a shape, from a small table measured per GPU.

`configs/auto.json` holds, per GPU, rules of the form "W3/W4 weights with K >= min_k -> backend", covering
GEMMs with an epilogue tail (activation/residual) only when the rule says `"tails": true`: the shapes where a
backend measured faster than the default order (Triton first); `benchmarks/bench_cuda.py --suggest-auto`
derives them from a run. A GPU without an entry, a shape no rule covers, or a rule whose backend is not
available here (the CUDA extension not built) keeps the default order in `backends.resolve`. `ops.qlinear`
runs the routed backend's act-quant too (the CUDA act-quant ran 1.0-2.2x Triton's speed at A6 on the 12
bench shapes, run ws7).
"""
from __future__ import annotations

import json
import os
from functools import lru_cache

import torch

TABLE = os.path.join(os.path.dirname(__file__), "configs", "auto.json")


@lru_cache(maxsize=None)
def _rules(device_name: str) -> tuple:
    with open(TABLE) as fh:
        table = json.load(fh)
    name = device_name.lower()
    for key, entry in table.items():
        if not key.startswith("_") and key in name:
            return tuple(entry.get("qgemm", ()))
    return ()


@lru_cache(maxsize=None)
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


@torch.compiler.assume_constant_result  # a table lookup on fixed facts: traced as a constant, never a graph break
def gemm_backend(device: torch.device, w_bits: int, k: int, has_tail: bool, device_name: str | None = None):
    """The backend the table names for this GEMM on `device`, or None (then the default order applies).
    `device_name` overrides the name read from the device (tests)."""
    if device.type != "cuda" and device_name is None:
        return None
    if device_name is None:
        device_name = _device_name(device.index if device.index is not None else torch.cuda.current_device())
    for rule in _rules(device_name):
        if w_bits in rule["w_bits"] and k >= rule["min_k"] and (rule.get("tails", False) or not has_tail):
            return rule["backend"]
    return None
