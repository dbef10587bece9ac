"""Helpers shared by the benchmark scripts: environment record, shapes file, timing, SPEC 1.4 checks.

Nothing in the package imports this (SPEC 2.1: nothing imports benchmarks/).
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# ../shared beside the checkout (CI, developers); .work/ inside it where a copy travels (the GPU machine)
SHAPES_CANDIDATES = [os.path.join(REPO, "..", "shared", "bench_shapes.json"),
                     os.path.join(REPO, "shared", "bench_shapes.json"),
                     os.path.join(REPO, ".work", "bench_shapes.json")]


def load_shapes(path: str | None = None) -> dict[str, tuple[int, int, int]]:
    """name -> (M, K, N) from bench_shapes.json."""
    for p in ([path] if path else SHAPES_CANDIDATES):
        if p and os.path.exists(p):
            with open(p) as fh:
                return {k: tuple(v) for k, v in json.load(fh)["shapes"].items()}
    raise FileNotFoundError(f"bench_shapes.json not found (tried {[path] if path else SHAPES_CANDIDATES})")


def _version(mod: str) -> str | None:
    try:
        return __import__(mod).__version__
    except Exception:
        return None


def _git(*args) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout
    except Exception:
        return None


def environment() -> dict:
    """Device, versions, date, command: recorded with every result file. Also whether the tree differs from the
    commit (git_dirty: changed tracked files, or new files git does not ignore; the commit alone does not name the
    code then: on the GPU machine the copy keeps the session's first commit) and the QVDIT_* variables that pick
    kernels and modes."""
    commit, status = _git("rev-parse", "--short", "HEAD"), _git("status", "--porcelain", "--untracked-files=normal")
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "triton": _version("triton"), "torchao": _version("torchao"), "gemlite": _version("gemlite"),
        "git_commit": (commit or "").strip() or None,
        "git_dirty": None if status is None else bool(status.strip()),
        "qvdit_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("QVDIT_")},
    }
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(device=p.name, sm_count=p.multi_processor_count, capability=f"{p.major}.{p.minor}",
                   memory_gib=round(p.total_memory / 2**30, 1))
    return env


def bench_ms(fn, graph: bool = False, rep: int = 100, device: str = "cuda") -> float:
    """Median time of fn() in ms (triton.testing.do_bench; the CUDA-graph variant for launch-bound sizes).

    device "cpu" (a smoke run of a script under TRITON_INTERPRET=1) times a few calls with a host clock.
    """
    if device == "cpu":
        import time

        ts = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
        return sorted(ts)[1]
    from triton.testing import do_bench, do_bench_cudagraph

    if graph:
        return float(do_bench_cudagraph(fn, rep=rep, return_mode="median"))
    return float(do_bench(fn, warmup=25, rep=rep, return_mode="median"))


def copy_bandwidth_gbs(nbytes: int = 2**30, device: str = "cuda") -> float:
    """Device-to-device copy, bytes read + written per second (the memory-speed yardstick)."""
    a = torch.empty(nbytes, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    ms = bench_ms(lambda: b.copy_(a), device=device)
    return 2 * nbytes / ms / 1e6


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    ax = x.abs().clamp(min=torch.finfo(torch.float32).tiny)
    return torch.exp2(torch.floor(torch.log2(ax)) - 7)


def spec_violation(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Worst |out - ref| / (2 ulp_bf16(ref) + 1e-6) (SPEC 1.4; <= 1 passes; inf if out is not finite)."""
    out, ref = out.float(), ref.float()
    if not torch.isfinite(out).all():
        return float("inf")
    return float(((out - ref).abs() / (2 * bf16_ulp(ref) + 1e-6)).max())


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| (Frobenius), for peers whose quantization differs from ours."""
    out, ref = out.float(), ref.float()
    return float((out - ref).norm() / ref.norm().clamp(min=1e-30))


def bar_chart(shapes: list[str], series: list[tuple[str, list[float]]], ylabel: str, path: str) -> None:
    """Grouped bars, one group per shape and one bar per series (label, values), with the 1.0 line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(14, 5))
    width = 0.8 / max(len(series), 1)
    for i, (label, vals) in enumerate(series):
        ax.bar([j + i * width for j in range(len(shapes))], vals, width, label=label)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))], shapes, rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

