"""Linear layers on video-DiT shapes, side by side in one process (issue 4, SPEC 4).

For every shape of bench_shapes.json (the M >= 8192 set) and, with --small-m, the same (K, N) at
M in {1, 16, 256}: cuBLAS bf16 `F.linear`, torchao W8A8 fp8-rowwise and int8 (compiled), gemlite A8W4,
and ours (backend "triton"; --backends adds "cuda" and "auto") for W4A8, W3A6, W3A8, W4A6, W8A8, each with
and without TQE, as a full linear (bf16 in -> bf16 out, act-quant included) and as the GEMM alone
(pre-quantized input), plus the act-quant pass alone (GB/s against a device copy). Every result is
validated against the reference (ours bit-exact / within SPEC 1.4 on sampled rows; peers by relative error)
before it is timed.
A peer that cannot be imported is skipped and recorded as such.

    python benchmarks/bench_linear.py [--shapes PATH] [--only NAME ...] [--small-m] [--peers torchao,gemlite]
    python benchmarks/bench_linear.py --backends triton,cuda,auto --graph    # + the CUDA backend and auto routing

Writes benchmarks/results/linear_<tag>.json (device, versions, date, command), a plot and a markdown
table (the "Linear layers" section of BENCHMARKS.md is copied from it).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import (REPO, bar_chart, bench_ms, copy_bandwidth_gbs, environment, load_shapes,  # noqa: E402
                               rel_err, spec_violation)

import qvdit_kernels as qk  # noqa: E402
from qvdit_kernels import reference as ref  # noqa: E402

VARIANTS = [(4, 8), (3, 6), (3, 8), (4, 6), (8, 8)]
DEV = "cuda"  # "cpu" only for --smoke (TRITON_INTERPRET=1)
BIG_M = 8192  # the shapes the targets are medians over
FRAMES = 21  # latent frames of an 81-frame clip: per-frame TQE gates
TARGETS = {"gemm": {"W3A6": 1.6, "W4A8": 1.8}, "full": {"W3A6": 1.35, "W4A8": 1.45}, "gemm_min": 1.4}


def sample_rows(m: int, dev) -> torch.Tensor:
    if m <= 512:
        return torch.arange(m, device=dev)
    g = torch.Generator(device="cpu").manual_seed(m)
    mid = torch.randperm(m - 256, generator=g)[:256] + 128
    return torch.cat([torch.arange(128), mid, torch.arange(m - 128, m)]).unique().to(dev)


class Problem:
    """One shape's data: bf16 x, W, bias; TQE alpha/beta/gate/frame ids."""

    def __init__(self, m, k, n, seed=0):
        g = torch.Generator(device=DEV).manual_seed(seed)
        self.m, self.k, self.n = m, k, n
        scale = torch.exp(torch.randn(m, 1, device=DEV, generator=g) * 0.5)
        self.x = (torch.randn(m, k, device=DEV, generator=g) * scale).to(torch.bfloat16)
        self.w = (torch.randn(n, k, device=DEV, generator=g) * k**-0.5).to(torch.bfloat16)
        self.bias = (torch.randn(n, device=DEV, generator=g) * 0.1).to(torch.bfloat16)
        self.alpha = torch.randn(k, device=DEV, generator=g) * k**-0.5 * 0.1
        self.beta = torch.randn(n, device=DEV, generator=g) * 0.1
        self.gate = torch.rand(FRAMES + 1, device=DEV, generator=g) + 0.5
        self.fid = (torch.arange(m, device=DEV) * FRAMES // max(m, 1)).to(torch.int32)
        self.rows = sample_rows(m, DEV)
        self.ref32 = F.linear(self.x[self.rows].float(), self.w.float(), self.bias.float())

    @property
    def flops(self):
        return 2.0 * self.m * self.k * self.n


def record(rows, prob, shape, method, mode, ms, t_bf16, **extra):
    r = dict(shape=shape, M=prob.m, K=prob.k, N=prob.n, method=method, mode=mode, ms=ms,
             tops=prob.flops / ms / 1e9 if ms else None, ratio_bf16=(t_bf16 / ms) if (ms and t_bf16) else None)
    r.update(extra)
    rows.append(r)
    tag = f"{r['ratio_bf16']:.2f}x" if r["ratio_bf16"] else "-"
    print(f"  {method:<22} {mode:<9} {ms if ms else float('nan'):8.4f} ms  {r['tops'] or 0:7.1f} TOPS  {tag}"
          + (f"  {extra['gbs']:.0f} GB/s" if extra.get("gbs") else ""), flush=True)
    return r


# ----------------------------------------------------------------------------- ours
def label(backend: str) -> str:
    """Method prefix of our rows: "ours" for the Triton backend (the issue-4 tables), "ours[cuda]" etc. else."""
    return "ours" if backend == "triton" else f"ours[{backend}]"


def ours(prob, wb, ab, rows, shape, t_bf16, graph, modes, backend="triton"):
    p = prob
    q, sw, zw = qk.quantize_weight(p.w, wb)
    wp = qk.pack_weight(q, wb)
    name = f"W{wb}A{ab}"
    aq_kw = dict(alpha=p.alpha, gate=p.gate, frame_id=p.fid)
    tqe_kw = dict(aq_kw, beta=p.beta)
    wbytes = wp.numel() * wp.element_size() + 4 * (sw.numel() + zw.numel() + p.alpha.numel() + p.beta.numel()
                                                    + p.gate.numel())
    wratio = wbytes / (2 * p.n * p.k)
    idx = p.rows
    # reference on the sampled rows (each row's quantization depends only on that row); the act-quant
    # reference runs on the CPU: PyTorch's CUDA division by a Python scalar is a reciprocal multiply
    cpu = [t.cpu() for t in (p.x[idx], p.alpha, p.gate, p.fid[idx])]
    rq, rs_, ru, rrs = (t.to(DEV) for t in ref.quantize_activation(cpu[0], ab, *cpu[1:], want_rowsum=True))
    ref_tqe = ref.qgemm(rq, rs_, wp, wb, sw, zw, p.bias, ru, p.beta, out_dtype=torch.float32)
    ref_plain = ref.qgemm(rq, rs_, wp, wb, sw, zw, p.bias, out_dtype=torch.float32)
    ref_acc = ref.qgemm(rq, rs_, wp, wb, sw, zw, out_dtype=torch.int32)

    qk.qlinear(p.x, wp, wb, sw, zw, ab, bias=p.bias, backend=backend, **tqe_kw)  # tunes with bf16 output
    xq, sx, u, rsum = qk.quantize_activation_rowsum(p.x, ab, backend=backend, **aq_kw)
    aq_ok = bool(torch.equal(xq[idx], rq) and torch.equal(sx[idx], rs_) and torch.equal(rsum[idx], rrs)
                 and ref.u_within_bound(u[idx], rq, rs_, p.alpha, p.gate, p.fid[idx]))
    acc = qk.qgemm(xq, sx, wp, wb, sw, zw, x_rowsum=rsum, out_dtype=torch.int32, backend=backend)
    acc_ok = bool(torch.equal(acc[idx], ref_acc))
    del acc
    common = dict(weight_bytes=wbytes, weight_ratio_bf16=wratio)
    fns = {
        ("full", True): lambda: qk.qlinear(p.x, wp, wb, sw, zw, ab, bias=p.bias, backend=backend, **tqe_kw),
        ("full", False): lambda: qk.qlinear(p.x, wp, wb, sw, zw, ab, bias=p.bias, backend=backend),
        ("gemm", True): lambda: qk.qgemm(xq, sx, wp, wb, sw, zw, p.bias, u, p.beta, rsum, backend=backend),
        ("gemm", False): lambda: qk.qgemm(xq, sx, wp, wb, sw, zw, p.bias, x_rowsum=rsum, backend=backend),
    }
    for (mode, tqe), fn in fns.items():
        if mode not in modes:
            continue
        out = fn()
        viol = spec_violation(out[idx], (ref_tqe if tqe else ref_plain).to(torch.bfloat16))
        valid = dict(spec_ratio=viol, act_quant_exact=aq_ok, acc_exact=acc_ok)
        ok = viol <= 1 and aq_ok and acc_ok
        ms = bench_ms(fn, graph=graph, device=DEV) if ok else None
        record(rows, p, shape, f"{label(backend)} {name}" + (" +TQE" if tqe else ""), mode, ms, t_bf16, variant=name,
               tqe=tqe, backend=backend,
               valid=valid, ok=ok, **common)
    if "act_quant" in modes:
        # a CUDA-graph replay: the kernel's own time (GB/s), without the Python launch path
        ms = bench_ms(lambda: qk.quantize_activation_rowsum(p.x, ab, backend=backend, **aq_kw), graph=DEV == "cuda",
                      device=DEV)
        nbytes = p.m * p.k * (p.x.element_size() + 1) + p.m * 12
        aq_label = ("act_quant" if backend == "triton" else f"act_quant[{backend}]") + f" A{ab} +TQE"
        record(rows, p, shape, aq_label, "act_quant", ms, None, variant=f"A{ab}", tqe=True, backend=backend,
               gbs=nbytes / ms / 1e6, ok=aq_ok, valid=dict(act_quant_exact=aq_ok))


# ----------------------------------------------------------------------------- peers
def peer_torchao(kind, prob):
    from torchao.quantization import (Float8DynamicActivationFloat8WeightConfig, Int8DynamicActivationInt8WeightConfig,
                                      PerRow, quantize_)

    lin = torch.nn.Linear(prob.k, prob.n, bias=True, device=DEV, dtype=torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(prob.w)
        lin.bias.copy_(prob.bias)
    cfg = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()) if kind == "fp8" else \
        Int8DynamicActivationInt8WeightConfig()
    quantize_(lin, cfg)
    return torch.compile(lin)


def peer_gemlite(prob):
    from gemlite.helper import A8W4_HQQ_INT_dynamic

    q, sw, zw = qk.quantize_weight(prob.w, 4)  # the same per-channel RTN as ours: W = s (q - z)
    return A8W4_HQQ_INT_dynamic(device=f"{DEV}:0", dtype=torch.bfloat16).from_weights(
        q, sw[:, None].to(torch.bfloat16), zw[:, None].to(torch.bfloat16), bias=prob.bias)


PEERS = {
    "torchao W8A8 fp8-rowwise": (lambda p: peer_torchao("fp8", p), 0.08),
    "torchao W8A8 int8": (lambda p: peer_torchao("int8", p), 0.08),
    "gemlite A8W4": (peer_gemlite, 0.15),
}


def run_peers(prob, names, rows, shape, t_bf16, skipped, graph):
    for name in names:
        if name in skipped:
            continue
        make, tol = PEERS[name]
        t0 = time.time()
        try:
            fn = make(prob)
            with torch.no_grad():
                out = fn(prob.x)
                err = rel_err(out[prob.rows], prob.ref32)
                setup = time.time() - t0
                ms = bench_ms(lambda: fn(prob.x), graph=graph, device=DEV) if err <= tol else None
            record(rows, prob, shape, name, "full", ms, t_bf16, valid=dict(rel_err=err, tol=tol), ok=err <= tol,
                   setup_s=setup)
        except Exception as exc:  # not importable, or fails on this GPU: skip the peer from here on
            skipped[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            print(f"  {name}: skipped ({skipped[name]})", flush=True)
            traceback.print_exc(limit=3)


# ----------------------------------------------------------------------------- act-quant launch sweep
def aq_sweep(shapes, copy_gbs):
    """Time act-quant launch parameters per K (one-pass tile vs two-pass chunks, rows per program, warps)."""
    from qvdit_kernels.triton import act_quant as aq

    out = []
    for k, m in sorted({(k, m) for m, k, _ in shapes.values()}):
        x = torch.randn(m, k, device=DEV).to(torch.bfloat16)
        alpha = torch.randn(k, device=DEV)
        rq, rs_, _, rrs = ref.quantize_activation(x[:256].cpu(), 6, want_rowsum=True)
        rq, rrs = rq.to(DEV), rrs.to(DEV)
        cands = aq.candidates(k) + [aq.two_pass(bm, c, w) for c in (256, 512, 1024) for bm in (1, 2, 8)
                                    for w in (2, 4) if c < k]
        for prm in cands:
            try:
                got = aq.act_quant(x, 6, alpha, None, None, True, params=prm)
                ok = bool(torch.equal(got[0][:256], rq) and torch.equal(got[3][:256], rrs))
                ms = bench_ms(lambda: aq.act_quant(x, 6, alpha, None, None, True, params=prm), rep=50, device=DEV)
                gbs = m * k * 3 / ms / 1e6
                out.append(dict(K=k, M=m, params=prm, ms=ms, gbs=gbs, copy_frac=gbs / copy_gbs, ok=ok))
                print(f"  aq K={k} {prm}: {gbs:.0f} GB/s ({gbs / copy_gbs:.0%}) ok={ok}", flush=True)
            except Exception as exc:
                out.append(dict(K=k, M=m, params=prm, error=f"{type(exc).__name__}: {str(exc)[:200]}"))
        del x
    return out


def profile(shape, wb, ab, shapes):
    """A few Triton GEMM and act-quant calls on one shape, for ncu (QVDIT_TRITON_TUNE=0 runs the table's first
    config, the usual pick): ncu --kernel-name regex:'qgemm|act_quant' --launch-skip 2 -c 2 ..."""
    m, k, n = shapes[shape]
    p = Problem(m, k, n)
    q, sw, zw = qk.quantize_weight(p.w, wb)
    wp = qk.pack_weight(q, wb)
    for _ in range(3):
        xq, sx, u, rs = qk.quantize_activation_rowsum(p.x, ab, alpha=p.alpha, gate=p.gate, frame_id=p.fid,
                                                      backend="triton")
        qk.qgemm(xq, sx, wp, wb, sw, zw, p.bias, u, p.beta, rs, backend="triton")
    torch.cuda.synchronize()


# ----------------------------------------------------------------------------- summary
def summarize(rows):
    big = [r for r in rows if r["M"] >= BIG_M and r.get("ms")]
    out = {}
    for key in sorted({(r["method"], r["mode"]) for r in big}):
        rs = [r for r in big if (r["method"], r["mode"]) == key and r.get("ratio_bf16")]
        if not rs:
            continue
        lo = min(rs, key=lambda r: r["ratio_bf16"])
        out[f"{key[0]} | {key[1]}"] = dict(median_ratio_bf16=statistics.median(r["ratio_bf16"] for r in rs),
                                           min_ratio_bf16=lo["ratio_bf16"], slowest_shape=lo["shape"], n=len(rs))
    tqe = {}
    for b in dict.fromkeys(r.get("backend", "triton") for r in big if r.get("variant")):
        mine = [r for r in big if r.get("backend", "triton") == b]
        for v in (f"W{a}A{b_}" for a, b_ in VARIANTS):
            for mode in ("full", "gemm"):
                on = {r["shape"]: r["ms"] for r in mine if r.get("variant") == v and r["mode"] == mode and r.get("tqe")}
                off = {r["shape"]: r["ms"] for r in mine if r.get("variant") == v and r["mode"] == mode and
                       r.get("tqe") is False}
                common = [s for s in on if s in off]
                if common:
                    tqe[f"{v} {mode}" + ("" if b == "triton" else f" [{b}]")] = statistics.median(
                        on[s] / off[s] - 1 for s in common)
    aq = [r for r in big if r["mode"] == "act_quant" and r.get("backend", "triton") == "triton"]
    return dict(medians=out, tqe_overhead_median=tqe,
                act_quant_gbs_min=min((r["gbs"] for r in aq), default=None),
                act_quant_gbs_median=statistics.median([r["gbs"] for r in aq]) if aq else None)


def markdown(rows, summary, env, copy_gbs):
    big = [r for r in rows if r["M"] >= BIG_M and "@M" not in r["shape"]]
    shapes = list(dict.fromkeys(r["shape"] for r in big))

    def get(shape, method, mode, field="ratio_bf16"):
        for r in big:
            if r["shape"] == shape and r["method"] == method and r["mode"] == mode and r.get(field) is not None:
                return r[field]
        return None

    def f(v, fmt="{:.2f}x"):
        return fmt.format(v) if v is not None else "-"

    cols = [("W3A6 GEMM", "ours W3A6 +TQE", "gemm"), ("W4A8 GEMM", "ours W4A8 +TQE", "gemm"),
            ("W3A6 full", "ours W3A6 +TQE", "full"), ("W4A8 full", "ours W4A8 +TQE", "full"),
            ("W3A8 full", "ours W3A8 +TQE", "full"), ("W4A6 full", "ours W4A6 +TQE", "full"),
            ("W8A8 full", "ours W8A8 +TQE", "full"), ("fp8-rowwise", "torchao W8A8 fp8-rowwise", "full"),
            ("int8 (ao)", "torchao W8A8 int8", "full"), ("gemlite A8W4", "gemlite A8W4", "full")]
    for b in dict.fromkeys(r["backend"] for r in big if r.get("backend", "triton") != "triton"):
        cols += [(f"{v} {mode} [{b}]", f"{label(b)} {v} +TQE", mode) for v in ("W3A6", "W4A8")
                 for mode in ("gemm", "full")]
    lines = [f"Device: {env.get('device')}, torch {env['torch']}, triton {env['triton']}, torchao {env['torchao']}, "
             f"gemlite {env['gemlite']}; {env['date']}; copy bandwidth {copy_gbs:.0f} GB/s. Ratios are speed-ups "
             "over cuBLAS bf16 `F.linear` measured in the same process (higher is better); ours with TQE on.", "",
             "| shape (M, K, N) | bf16 TFLOPS | " + " | ".join(c[0] for c in cols) + " | act-quant GB/s (A6) |",
             "|---" * (len(cols) + 3) + "|"]
    for s in shapes:
        r0 = next(r for r in big if r["shape"] == s)
        aq = get(s, "act_quant A6 +TQE", "act_quant", "gbs")
        lines.append(f"| {s} ({r0['M']}, {r0['K']}, {r0['N']}) | {f(get(s, 'cuBLAS bf16', 'full', 'tops'), '{:.0f}')} | "
                     + " | ".join(f(get(s, c[1], c[2])) for c in cols)
                     + f" | {f(aq, '{:.0f}')} ({f(aq / copy_gbs * 100 if aq else None, '{:.0f}')}%) |")
    med = summary["medians"]
    lines.append("| **median** | | " + " | ".join(f(med.get(f"{c[1]} | {c[2]}", {}).get("median_ratio_bf16"))
                                                 for c in cols) + " | |")
    small = [r for r in rows if r["M"] < BIG_M and r.get("ms")]
    if small:
        vs = [f"ours W{a}A{b} +TQE" for a, b in VARIANTS]
        lines += ["", "Small M (full linear with TQE, CUDA-graph timing; no target): speed-up over bf16, bf16 in us.", "",
                  "| shape | bf16 us | " + " | ".join(v[5:] for v in vs) + " |", "|---" * (len(vs) + 2) + "|"]
        for s in dict.fromkeys(r["shape"] for r in small):
            b = next((r["ms"] for r in small if r["shape"] == s and r["method"] == "cuBLAS bf16"), None)
            cells = [next((r["ratio_bf16"] for r in small if r["shape"] == s and r["method"] == v), None) for v in vs]
            lines.append(f"| {s} | {f(b * 1e3 if b else None, '{:.1f}')} | " + " | ".join(f(c) for c in cells) + " |")
    return "\n".join(lines)


def plot(rows, path):
    big = [r for r in rows if r["M"] >= BIG_M and r.get("ratio_bf16")]
    shapes = list(dict.fromkeys(r["shape"] for r in big))
    series = [("ours W3A6 +TQE", "gemm"), ("ours W4A8 +TQE", "gemm"), ("ours W3A6 +TQE", "full"),
              ("ours W4A8 +TQE", "full"), ("torchao W8A8 fp8-rowwise", "full"), ("gemlite A8W4", "full")]
    bars = [(f"{m} ({mode})", [next((r["ratio_bf16"] for r in big if r["shape"] == s and r["method"] == m
                                     and r["mode"] == mode), 0) for s in shapes]) for m, mode in series]
    bar_chart(shapes, bars, "speed-up over cuBLAS bf16", path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default=None, help="bench_shapes.json (default: ../shared beside the repo)")
    ap.add_argument("--only", nargs="*", default=None, help="shape names to run")
    ap.add_argument("--variants", default="W4A8,W3A6,W3A8,W4A6,W8A8")
    ap.add_argument("--modes", default="full,gemm,act_quant")
    ap.add_argument("--small-m", action="store_true", help="also M in {1, 16, 256} (full linear, CUDA-graph timing)")
    ap.add_argument("--backends", default="triton",
                    help="comma list of our backends to time: triton, cuda, auto (the CUDA rows need the built "
                         "extension; auto = the per-GPU routing of qvdit_kernels/auto.py). The table's main "
                         "columns, act-quant GB/s and small-M rows are Triton's; others get W3A6/W4A8 columns")
    ap.add_argument("--peers", default="torchao,gemlite", help="comma list of torchao, gemlite (empty: none)")
    ap.add_argument("--peer-shapes", default=None,
                    help="name:peer1+peer2,... shapes that run peers (default: every shape runs every peer)")
    ap.add_argument("--small-shapes", default=None, help="comma list of shapes whose (K, N) also run small M")
    ap.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results"))
    ap.add_argument("--tag", default=None)
    ap.add_argument("--graph", action="store_true",
                    help="time bf16 and ours as CUDA-graph replays (device time only, no Python launch overhead)")
    ap.add_argument("--aq-sweep", action="store_true", help="also time act-quant launch parameters per K")
    ap.add_argument("--deadline-s", type=float, default=None,
                    help="start no new shape after this many seconds (the summary is still written)")
    ap.add_argument("--profile", default=None, metavar="SHAPE", help="a few calls of ours on SHAPE (for ncu)")
    ap.add_argument("--smoke", action="store_true", help="CPU dry run of the script (TRITON_INTERPRET=1, tiny shapes)")
    args = ap.parse_args(argv)
    global DEV, BIG_M
    if args.smoke:
        DEV, BIG_M = "cpu", 1
    elif not torch.cuda.is_available():
        sys.exit("bench_linear.py needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = True  # cuBLAS default
    if args.profile:
        wb, ab = next(v for v in VARIANTS if f"W{v[0]}A{v[1]}" == args.variants.split(",")[0])
        profile(args.profile, wb, ab, load_shapes(args.shapes))
        return
    env = environment()
    tag = args.tag or env["date"][:10]
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"linear_{tag}")
    copy_gbs = copy_bandwidth_gbs(2**24 if args.smoke else 2**30, device=DEV)
    print(f"{env.get('device')}: copy {copy_gbs:.0f} GB/s", flush=True)
    shapes = load_shapes(args.shapes)
    if args.smoke:
        shapes = {k: (40, 256 if i % 2 else 384, 48) for i, k in enumerate(list(shapes)[:2])}
    if args.only:
        shapes = {k: v for k, v in shapes.items() if k in args.only}
    variants = [v for v in VARIANTS if f"W{v[0]}A{v[1]}" in args.variants.split(",")]
    modes = args.modes.split(",")
    peer_names = [n for n in PEERS if n.split()[0] in args.peers.split(",")]
    skipped: dict[str, str] = {}
    rows: list[dict] = []
    todo = [(name, m, k, n, False) for name, (m, k, n) in shapes.items()]
    if args.small_m:
        small_names = args.small_shapes.split(",") if args.small_shapes else list(shapes)
        todo += [(f"{name}@M{m}", m, k, n, True) for name, (_, k, n) in shapes.items() if name in small_names
                 for m in (1, 16, 256)]
    peer_plan = None
    if args.peer_shapes:  # e.g. "wan1.3b_fc1:fp8+int8+gemlite,wan14b_fc1:fp8"
        peer_plan = {item.split(":")[0]: item.split(":")[1].split("+") for item in args.peer_shapes.split(",")}
    short = {"fp8": "torchao W8A8 fp8-rowwise", "int8": "torchao W8A8 int8", "gemlite": "gemlite A8W4"}
    result = dict(env=env, copy_gbs=copy_gbs, targets=TARGETS, rows=rows, skipped_peers=skipped,
                  peer_plan=peer_plan or "every shape")
    if args.aq_sweep:
        result["act_quant_sweep"] = aq_sweep(shapes, copy_gbs)
    t_start = time.time()
    for name, m, k, n, small in todo:
        t0 = time.time()
        if args.deadline_s and t0 - t_start > args.deadline_s:
            print(f"{name}: not run (deadline of {args.deadline_s:.0f} s reached)", flush=True)
            result.setdefault("not_run", []).append(name)
            continue
        print(f"{name}: M={m} K={k} N={n}", flush=True)
        try:
            prob = Problem(m, k, n)
            fn = lambda: F.linear(prob.x, prob.w, prob.bias)  # noqa: E731
            err = rel_err(fn()[prob.rows], prob.ref32)
            t_bf16 = bench_ms(fn, graph=small or args.graph, device=DEV)
            record(rows, prob, name, "cuBLAS bf16", "full", t_bf16, t_bf16, valid=dict(rel_err=err), ok=err < 0.02)
            seen_ab = set()
            for wb, ab in variants:  # the act-quant pass is timed once per activation width
                ms_ = ["full"] if small else [md for md in modes if md != "act_quant" or ab not in seen_ab]
                seen_ab.add(ab)
                for backend in args.backends.split(","):
                    try:  # one backend failing (e.g. cuda without the built extension) leaves the others
                        ours(prob, wb, ab, rows, name, t_bf16, small or args.graph, ms_, backend)
                    except Exception:
                        traceback.print_exc(limit=4)
                        rows.append(dict(shape=name, M=m, K=k, N=n, method=f"{label(backend)} W{wb}A{ab}", mode="-",
                                         ms=None, backend=backend, error=traceback.format_exc(limit=4)))
            if not small:
                names = peer_names if peer_plan is None else \
                    [n_ for n_ in peer_names if n_ in [short[p_] for p_ in peer_plan.get(name, [])]]
                run_peers(prob, names, rows, name, t_bf16, skipped, small)
            del prob
        except Exception:
            traceback.print_exc()
            rows.append(dict(shape=name, M=m, K=k, N=n, method="(shape failed)", mode="-", ms=None,
                             error=traceback.format_exc(limit=5)))
        if DEV == "cuda":
            torch.cuda.empty_cache()
        print(f"  ({time.time() - t0:.1f} s)", flush=True)
        with open(stem + ".json", "w") as fh:  # after every shape: a cut-off run keeps what it measured
            json.dump(result, fh, indent=1, default=str)
    from qvdit_kernels.triton import tune

    result["summary"] = summarize(rows)
    result["tuned"] = tune.tuned_choices()
    with open(stem + ".json", "w") as fh:
        json.dump(result, fh, indent=1, default=str)
    md = markdown(rows, result["summary"], env, copy_gbs)
    with open(stem + ".md", "w") as fh:
        fh.write(md + "\n")
    try:
        plot(rows, stem + ".png")
    except Exception:
        traceback.print_exc()
    print(md)
    print(json.dumps(result["summary"], indent=1))
    if skipped:
        print("skipped peers:", json.dumps(skipped, indent=1))


if __name__ == "__main__":
    main()
