"""SM clock and board power under load (issue 7's "SM clock under the power cap"): cuBLAS bf16 `F.linear` and the
W3A6 / W4A8 GEMMs (pre-quantized input, TQE on) each run back to back for a few seconds while `nvidia-smi` samples
the SM clock, the board power and the clock-event reasons, and the loop's own time per call (the time the clock
belongs to); beside them, the do_bench median of the same call (short bursts with an L2 flush between calls).

Why: the GEMM ratios against bf16 compare two kernels at whatever clock each one leaves the chip at. ncu locks the
clock (1.32-1.43 GHz in our profiles), so its cycle counts do not say what the unprofiled kernels run at. This
script does: a kernel that draws the board to its power limit runs at a lower clock than one that does not, and
the time ratio carries that. Per row it also gives the tile cycles (loop time x clock / tiles per SM) that the
kernel spends at the clock it really ran at. nvidia-smi samples the GPU torch calls cuda:0 (by its UUID).

    python benchmarks/bench_clocks.py [--only NAME ...] [--variants W3A6,W4A8] [--seconds 2] [--backend auto]
        [--tag TAG]

Writes benchmarks/results/clocks_<tag>.{json,md} (device, versions, date, command).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.bench_linear import BIG_M, Problem  # noqa: E402
from benchmarks.common import REPO, bench_ms, environment, load_shapes  # noqa: E402

FIELDS = ("clocks.sm", "power.draw", "temperature.gpu", "clocks_event_reasons.active")
OLD_REASONS = "clocks_throttle_reasons.active"  # (the same bits under the name older drivers know)
# clock-event reason bits (nvidia-smi -q names them); the ones that lower the clock under load
REASONS = {0x1: "gpu_idle", 0x4: "sw_power_cap", 0x8: "hw_slowdown", 0x20: "sw_thermal", 0x40: "hw_thermal",
           0x80: "hw_power_brake"}


def parse_sample(line: str, fields=FIELDS) -> dict | None:
    """One line of `nvidia-smi --query-gpu=<fields> --format=csv,noheader,nounits` -> {field: number}, or None for
    a line that is not a sample (a header, an error, '[N/A]')."""
    parts = [p.strip() for p in line.split(",")]
    if len(parts) != len(fields):
        return None
    out = {}
    for f, p in zip(fields, parts):
        try:
            out[f] = int(p, 16) if p.lower().startswith("0x") else float(p)
        except ValueError:
            return None
    return out


def reason_names(mask: int) -> list[str]:
    return [name for bit, name in REASONS.items() if mask & bit]


def summarize(samples: list[dict]) -> dict:
    """Medians of the sampled clock, power and temperature, and the share of samples each clock-event reason was
    active in (samples: parse_sample dicts)."""
    if not samples:
        return {"samples": 0}
    med = lambda f: statistics.median(s[f] for s in samples) if all(f in s for s in samples) else None  # noqa: E731
    out = {"samples": len(samples), "sm_clock_mhz": med("clocks.sm"), "power_w": med("power.draw"),
           "temperature_c": med("temperature.gpu")}
    key = next((f for f in (FIELDS[3], OLD_REASONS) if all(f in s for s in samples)), None)
    if key:
        share = {}
        for s in samples:
            for name in reason_names(int(s[key])):
                share[name] = share.get(name, 0) + 1
        out["reasons_share"] = {k: round(v / len(samples), 3) for k, v in sorted(share.items())}
    return out


class Sampler:
    """`nvidia-smi -lms PERIOD` in the background; samples() -> those that arrived between mark() and stop().

    cmd: the sampling command (tests pass a stand-in); fields: what each of its lines holds, in order."""

    def __init__(self, period_ms: int = 50, cmd: list[str] | None = None, fields=FIELDS, gpu: str | None = None):
        self.fields = fields
        self.cmd = cmd or smi(fields, gpu) + ["-lms", str(period_ms)]
        self._lines: list[tuple[float, str]] = []
        self._t0 = None
        self._proc = None
        self._thread = None

    def __enter__(self):
        self._proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        return self

    def _read(self):
        for line in self._proc.stdout:
            self._lines.append((time.perf_counter(), line))

    def mark(self):
        """Samples from now on count (after the warm-up)."""
        self._t0 = time.perf_counter()

    def __exit__(self, *exc):
        t1 = time.perf_counter()
        self._proc.terminate()
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(timeout=5)
        self._thread.join(timeout=5)
        self._proc.stdout.close()
        t0 = self._t0 if self._t0 is not None else float("-inf")
        self.window = [s for t, line in self._lines if t0 <= t <= t1
                       for s in [parse_sample(line, self.fields)] if s is not None]
        return False


def smi(fields, gpu: str | None = None) -> list[str]:
    """The nvidia-smi query of `fields` (one CSV line per sample), of GPU `gpu` (a UUID) or of every GPU."""
    return ["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits"] + (
        ["-i", gpu] if gpu else [])


def torch_gpu() -> str | None:
    """nvidia-smi's id of the GPU torch calls cuda:0 (its UUID; CUDA_VISIBLE_DEVICES reorders indices)."""
    uuid = getattr(torch.cuda.get_device_properties(0), "uuid", None)
    if uuid is None:
        return None
    uuid = str(uuid)
    return uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"


def query(fields, gpu: str | None = None) -> dict | None:
    """One nvidia-smi sample of `fields` (parse_sample), or None: no nvidia-smi, an error, or a field it does not
    know."""
    try:
        r = subprocess.run(smi(fields, gpu), capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return parse_sample(r.stdout.splitlines()[0], fields) if r.returncode == 0 and r.stdout else None


def working_fields(gpu: str | None = None) -> tuple[str, ...] | None:
    """FIELDS, or with the reasons' older name, or without them, whichever this driver's nvidia-smi answers; None:
    none answers."""
    return next((f for f in (FIELDS, FIELDS[:3] + (OLD_REASONS,), FIELDS[:3]) if query(f, gpu)), None)


def board(gpu: str | None = None) -> dict:
    """The power limit and the clocks the board allows (one nvidia-smi query)."""
    s = query(("power.limit", "clocks.max.sm", "clocks.max.mem"), gpu)
    return {"power_limit_w": s["power.limit"], "max_sm_clock_mhz": s["clocks.max.sm"],
            "max_mem_clock_mhz": s["clocks.max.mem"]} if s else {}


def under_load(fn, seconds: float, fields, gpu: str | None = None, warmup: float = 0.5) -> dict:
    """fn() back to back for warmup + seconds: the samples of the last `seconds`, and that stretch's time per call
    (loop_ms: the time the sampled clock belongs to)."""
    with Sampler(fields=fields, gpu=gpu) as smp:
        t_end = time.perf_counter() + warmup
        while time.perf_counter() < t_end:
            for _ in range(10):
                fn()
            torch.cuda.synchronize()
        smp.mark()
        t0, calls = time.perf_counter(), 0
        while time.perf_counter() < t0 + seconds:
            for _ in range(10):
                fn()
            calls += 10
            torch.cuda.synchronize()
        loop_ms = (time.perf_counter() - t0) * 1e3 / calls
    return {"loop_ms": loop_ms, **summarize(smp.window)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default=None)
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--variants", default="W3A6,W4A8")
    ap.add_argument("--backend", default="cuda", help="qvdit backend of the quantized GEMMs (default cuda)")
    ap.add_argument("--seconds", type=float, default=2.0, help="sampled seconds of load per row (after 0.5 s)")
    ap.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results"))
    ap.add_argument("--tag", default=None)
    args = ap.parse_args(argv)
    if args.seconds <= 0:
        ap.error(f"--seconds must be positive, got {args.seconds}")
    variants = []
    for v in args.variants.split(","):
        if not re.fullmatch(r"W[348]A[68]", v):
            ap.error(f"--variants: {v!r} is not one of W3A6, W3A8, W4A6, W4A8, W8A6, W8A8")
        variants.append((int(v[1]), int(v[3])))
    if not torch.cuda.is_available():
        sys.exit("bench_clocks.py needs a CUDA GPU")
    gpu = torch_gpu()
    fields = working_fields(gpu)
    if fields is None:
        sys.exit("bench_clocks.py needs nvidia-smi (none answered)")
    import qvdit_kernels as qk

    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = True  # cuBLAS default
    env = environment()
    env.update(board(gpu), sampled_fields=list(fields), backend=args.backend, sampled_gpu=gpu)
    sms = env.get("sm_count") or torch.cuda.get_device_properties(0).multi_processor_count
    shapes = {k: v for k, v in load_shapes(args.shapes).items() if v[0] >= BIG_M and (not args.only or k in args.only)}
    rows: list[dict] = []
    tag = args.tag or env["date"][:10]
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"clocks_{tag}")
    for name, (m, k, n) in shapes.items():
        p = Problem(m, k, n)
        calls = [("cuBLAS bf16", lambda: F.linear(p.x, p.w, p.bias))]
        for wb, ab in variants:
            q, sw, zw = qk.quantize_weight(p.w, wb)
            wp = qk.pack_weight(q, wb)
            xq, sx, u, rs = qk.quantize_activation_rowsum(p.x, ab, alpha=p.alpha, backend=args.backend)
            calls.append((f"W{wb}A{ab} {args.backend}",
                          lambda xq=xq, sx=sx, wp=wp, wb=wb, sw=sw, zw=zw, u=u, rs=rs: qk.qgemm(
                              xq, sx, wp, wb, sw, zw, p.bias, u, p.beta, rs, backend=args.backend)))
        for label, fn in calls:
            ms = bench_ms(fn)
            row = {"shape": name, "m": m, "k": k, "n": n, "kernel": label, "ms": ms,
                   **under_load(fn, args.seconds, fields, gpu)}
            if row.get("sm_clock_mhz"):
                # cycles per 128 x 128 output tile per SM at the sampled clock (the ws kernel's tile), over the
                # sampled loop's own time
                tiles = -(-m // 128) * -(-n // 128)
                row["cycles_per_tile"] = round(row["loop_ms"] * 1e-3 * row["sm_clock_mhz"] * 1e6 * sms / tiles)
            rows.append(row)
            print(f"{name:<16}{label:<16}{ms * 1e3:9.1f} us (loop {row['loop_ms'] * 1e3:.1f})  "
                  f"{row.get('sm_clock_mhz')} MHz  {row.get('power_w')} W  "
                  f"{row.get('reasons_share', '')}", flush=True)
        del p, calls
        torch.cuda.empty_cache()
        with open(stem + ".json", "w") as fh:  # after every shape: a cut-off run keeps what it measured
            json.dump({"env": env, "rows": rows}, fh, indent=1, default=str)
    md = markdown(rows, env)
    with open(stem + ".md", "w") as fh:
        fh.write(md + "\n")
    print(md)


def markdown(rows: list[dict], env: dict) -> str:
    lines = [f"{env.get('device')} (power limit {env.get('power_limit_w')} W, max SM clock "
             f"{env.get('max_sm_clock_mhz')} MHz), {env['date']}", "",
             "| shape (M, K, N) | kernel | us (do_bench) | us (sampled loop) | SM clock MHz | power W |"
             " clock-event reasons (share of samples) | cycles per 128x128 tile |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        reasons = ", ".join(f"{k} {v:.0%}" for k, v in r.get("reasons_share", {}).items()) or "-"
        loop = f"{r['loop_ms'] * 1e3:.1f}" if "loop_ms" in r else "-"
        lines.append(f"| {r['shape']} ({r['m']}, {r['k']}, {r['n']}) | {r['kernel']} | {r['ms'] * 1e3:.1f} | {loop} | "
                     f"{r.get('sm_clock_mhz')} | {r.get('power_w')} | {reasons} | {r.get('cycles_per_tile', '-')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
