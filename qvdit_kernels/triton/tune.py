"""Launch configs per GPU and a small tuner: candidates from `configs/<gpu>.json`, timed once per key.

Nothing here touches the device at import; the GPU name is read on the first tuned call. Under
`TRITON_INTERPRET=1` one small fixed config is used (the CPU interpreter gains nothing from tuning).
While a CUDA graph is being captured nothing is timed: the bucket's first candidate runs instead,
so warm up (one call per shape) before capturing. `QVDIT_TRITON_TUNE=0` skips timing altogether
(the bucket's first candidate runs; GPU test runs use it to keep compiles few).
"""
from __future__ import annotations

import json
import os
import warnings
from functools import lru_cache

import torch

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs")
DEFAULT_GPU = "h100"  # Hopper table; other GPUs use it until they get their own file
INTERPRET_QGEMM = dict(BLOCK_M=32, BLOCK_N=32, GROUP_N=2, num_warps=4, num_stages=1)
_BEST: dict[tuple, dict] = {}
_TIMES: dict[tuple, list] = {}  # key -> [(config, median ms)] of every candidate timed


def _gpu_key(device: torch.device) -> str:
    """Which table a GPU uses: `QVDIT_TRITON_CONFIGS` (a JSON path, for config sweeps), else by device name."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return os.environ.get("QVDIT_TRITON_CONFIGS") or _gpu_key_by_name(index)


@lru_cache(maxsize=None)
def _gpu_key_by_name(index) -> str:  # cached: this runs on every call, and launches are microseconds
    name = torch.cuda.get_device_name(index).lower()
    for f in sorted(os.listdir(CONFIG_DIR)):
        stem = f[:-5]
        if f.endswith(".json") and stem in name:
            return stem
    return DEFAULT_GPU


def persistent_grid(blocks: int, per_sm: int, device: torch.device, interpret: bool) -> int:
    """Programs to launch: `blocks` (one per block of work), or with per_sm > 0 a persistent grid of per_sm
    programs per SM striding over the blocks (4 "SMs" in the interpreter, so the tests see striding)."""
    if not per_sm:
        return blocks
    sms = 4 if interpret else _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return min(blocks, per_sm * sms)


@lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@lru_cache(maxsize=None)
def load_table(gpu: str) -> dict:
    path = gpu if gpu.endswith(".json") else os.path.join(CONFIG_DIR, f"{gpu}.json")
    with open(path) as fh:
        return json.load(fh)


def qgemm_configs(w_bits: int, m: int | None = None, gpu: str = DEFAULT_GPU) -> list[dict]:
    """Candidate configs for `w_bits` (those whose M range holds m; all of them when m is None)."""
    out = []
    for c in load_table(gpu)["qgemm"][str(w_bits)]:
        if m is None or c["m_min"] <= m <= c["m_max"]:
            out.append({k: v for k, v in c.items() if k not in ("m_min", "m_max")})
    return out


def m_bucket(m: int) -> int:
    """Tuning key for the token count: powers of two up to 32768 (video DiT M varies per call)."""
    b = 1
    while b < m and b < 32768:
        b *= 2
    return b


def pick(op: str, key: tuple, candidates: list[dict], run, device: torch.device) -> dict:
    """The fastest candidate for `key` (timed once with `run(config)`, then cached)."""
    full_key = (op, device.index, *key)
    best = _BEST.get(full_key)
    if best is not None:
        return best
    if len(candidates) == 1 or os.environ.get("QVDIT_TRITON_TUNE", "1") == "0" or \
            torch.cuda.is_current_stream_capturing():
        return candidates[0]
    from triton.testing import do_bench

    times = []
    for c in candidates:
        try:
            times.append(do_bench(lambda: run(c), warmup=5, rep=25, return_mode="median"))
        except Exception as exc:  # out of resources (shared memory), or does not compile here: not a candidate
            if "OutOfResources" in type(exc).__name__ or "out of resource" in str(exc):
                times.append(float("inf"))
            elif "CompilationError" in type(exc).__name__:
                warnings.warn(f"{op}: launch config {c} does not compile on this GPU, skipped: {str(exc)[:200]}")
                times.append(float("inf"))
            else:
                raise
    if min(times) == float("inf"):
        raise RuntimeError(f"{op}: no launch config of {candidates} runs on this GPU")
    best = candidates[min(range(len(candidates)), key=times.__getitem__)]
    _BEST[full_key] = best
    _TIMES[full_key] = list(zip(candidates, times))
    return best


def tuned_choices() -> dict:
    """What the tuner picked so far, and the time of every candidate (for benchmark reports)."""
    return {"/".join(map(str, k)): {"best": v, "candidates_ms": _TIMES.get(k, [])} for k, v in _BEST.items()}
