"""CUDA backend rows (issue 7): backend "cuda" (warp-specialized wgmma sm90ws, wgmma sm90 and mma.sync sm80
kernels) beside backend
"triton" and cuBLAS bf16 `F.linear`, side by side in one process, on the M >= 8192 shapes of
bench_shapes.json. For each weight/activation variant: the GEMM alone (pre-quantized input, TQE on) and
the full linear (bf16 in -> bf16 out, act-quant and TQE included), plus the act-quant pass alone and the
norm + modulation + act-quant producer (norm_quant rows).
Every kernel is validated before it is timed (int32 accumulator bit-exact and epilogue within SPEC 1.4
on sampled rows); a failing one is recorded, not timed. Also writes the per-shape table of the faster
backend ("auto_table") that backend="auto" is to read.

    python benchmarks/bench_cuda.py [--shapes PATH] [--only NAME ...] [--variants W3A6,W4A8] [--tag TAG]
    python benchmarks/bench_cuda.py --kernels triton,"cuda sm90ws"    # a subset of the kernels
    python benchmarks/bench_cuda.py --tails ...                     # + the GEMM with each epilogue tail
    (Triton fuses the tail; CUDA with QVDIT_CUDA_FUSED_TAIL=1, else in one pass after the kernel: env.cuda_fused_tail)
    python benchmarks/bench_cuda.py --profile SHAPE --variants W3A6   # a few sm90ws GEMM calls, for ncu
    python benchmarks/bench_cuda.py --plot RUN.json[:LABEL] ... --tag NAME   # figure of saved runs (CPU)
    python benchmarks/bench_cuda.py --suggest-auto RUN.json [--floor 0.95]  # configs/auto.json rules it supports

Writes benchmarks/results/cuda_<tag>.json (device, versions, date, command) and a markdown table.
Problem set-up, timing and validation helpers are bench_linear.py's and common.py's.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.bench_linear import BIG_M, Problem, record  # noqa: E402
from benchmarks.common import REPO, bar_chart, bench_ms, environment, load_shapes, rel_err, spec_violation  # noqa: E402

import qvdit_kernels as qk  # noqa: E402
from qvdit_kernels import reference as ref  # noqa: E402

# (label, backend, QVDIT_CUDA_GEMM_PATH)
KERNELS = [("triton", "triton", None), ("cuda sm90ws", "cuda", "sm90ws"), ("cuda sm90", "cuda", "sm90"),
           ("cuda sm80", "cuda", "sm80")]
CUDA_LABELS = [k[0] for k in KERNELS if k[1] == "cuda"]
TARGETS = {"cuda_over_triton_median": 1.15, "cuda_over_triton_min": 1.0, "w3a6_gemm_over_bf16_median": 1.8}


def set_path(path):
    if path is None:
        os.environ.pop("QVDIT_CUDA_GEMM_PATH", None)
    else:
        os.environ["QVDIT_CUDA_GEMM_PATH"] = path


def kernels_here(only=None):
    """KERNELS this GPU and build can run (wgmma paths need sm_90a), optionally only the labels in `only`."""
    from qvdit_kernels import _C

    return [k for k in KERNELS if (k[2] is None or not k[2].startswith("sm90") or _C.sm90_available())
            and (not only or k[0] in only)]


def tail_problems(p):
    """The two epilogue tails of a DiT block on this shape: mode -> (qgemm keywords, reference of a [rows] slice)."""
    g = torch.Generator(device=p.x.device).manual_seed(1)
    res = torch.randn(p.m, p.n, device=p.x.device, generator=g).to(torch.bfloat16)
    gate = torch.rand(1, p.n, device=p.x.device, generator=g) + 0.5  # one adaLN gate row (batch 1)
    return {"gemm+gelu": (dict(activation="gelu_tanh"), lambda y: ref.epilogue_tail(y, "gelu_tanh")),
            "gemm+res": (dict(residual=res, residual_gate=gate),
                         lambda y: ref.epilogue_tail(y, None, res[p.rows], gate))}


def run_variant(p, wb, ab, shape, t_bf16, rows, do_aq, kernels, tails=False):
    q, sw, zw = qk.quantize_weight(p.w, wb)
    wp = qk.pack_weight(q, wb)
    name = f"W{wb}A{ab}"
    aq_kw = dict(alpha=p.alpha, gate=p.gate, frame_id=p.fid)
    idx = p.rows
    rq, rsx, ru, rrs = ref.quantize_activation(p.x[idx], ab, p.alpha, p.gate, p.fid[idx], want_rowsum=True)
    ref_y = ref.qgemm(rq, rsx, wp, wb, sw, zw, p.bias, ru, p.beta, out_dtype=torch.float32).to(torch.bfloat16)
    ref_acc = ref.qgemm(rq, rsx, wp, wb, sw, zw, out_dtype=torch.int32)
    aq_done = set()
    for label, backend, path in kernels:
        set_path(path)
        try:
            xq, sx, u, rs = qk.quantize_activation_rowsum(p.x, ab, backend=backend, **aq_kw)
            aq_ok = bool(torch.equal(xq[idx], rq) and torch.equal(sx[idx], rsx) and torch.equal(rs[idx], rrs)
                         and ref.u_within_bound(u[idx], rq, rsx, p.alpha, p.gate, p.fid[idx]))
            acc = qk.qgemm(xq, sx, wp, wb, sw, zw, x_rowsum=rs, out_dtype=torch.int32, backend=backend)
            acc_ok = bool(torch.equal(acc[idx], ref_acc))
            del acc
            fns = {
                "gemm": lambda: qk.qgemm(xq, sx, wp, wb, sw, zw, p.bias, u, p.beta, rs, backend=backend),
                "full": lambda: qk.qlinear(p.x, wp, wb, sw, zw, ab, bias=p.bias, beta=p.beta, backend=backend,
                                           **aq_kw),
            }
            checks = {mode: lambda out: spec_violation(out, ref_y) for mode in fns}
            for mode, (kw, tail_ref) in (tail_problems(p) if tails else {}).items():
                # the reference rounds y to bf16 before GELU/residual, a fused kernel rounds once: a relative
                # bound (3%, a sanity check; the tests hold the exact bounds) instead of SPEC 1.4's ulp bound
                fns[mode] = functools.partial(qk.qgemm, xq, sx, wp, wb, sw, zw, p.bias, u, p.beta, rs,
                                              backend=backend, **kw)
                checks[mode] = lambda out, tail_ref=tail_ref: rel_err(out, tail_ref(ref_y)) / 3e-2
            for mode, fn in fns.items():
                viol = checks[mode](fn()[idx])
                ok = viol <= 1 and aq_ok and acc_ok
                ms = bench_ms(fn) if ok else None
                record(rows, p, shape, f"{label} {name} +TQE", mode, ms, t_bf16, variant=name, kernel=label,
                       valid=dict(spec_ratio=viol, act_quant_exact=aq_ok, acc_exact=acc_ok), ok=ok)
            if do_aq and backend not in aq_done:  # one act-quant row per backend (the GEMM path is irrelevant)
                aq_done.add(backend)
                ms = bench_ms(lambda: qk.quantize_activation_rowsum(p.x, ab, backend=backend, **aq_kw))
                nbytes = p.m * p.k * (p.x.element_size() + 1) + p.m * 12
                record(rows, p, shape, f"{label} act_quant A{ab} +TQE", "act_quant", ms, None, variant=f"A{ab}",
                       kernel=label, gbs=nbytes / ms / 1e6, ok=aq_ok)
                # the same pass quantizing the GELU of x (FFN fc1's output into fc2: activation="gelu_tanh"); a
                # kernel's GELU may round an element one ulp from torch's, so codes are checked to within one
                gq = qk.quantize_activation_rowsum(p.x, ab, backend=backend, activation="gelu_tanh", **aq_kw)[0][idx]
                gref = ref.quantize_activation(ref.activate(p.x[idx], "gelu_tanh"), ab)[0]
                g_ok = bool((gq.int() - gref.int()).abs().max() <= 1)
                ms = bench_ms(lambda: qk.quantize_activation_rowsum(p.x, ab, backend=backend, activation="gelu_tanh",
                                                                    **aq_kw)) if g_ok else None
                record(rows, p, shape, f"{label} act_quant+gelu A{ab} +TQE", "act_quant+gelu", ms, None,
                       variant=f"A{ab}", kernel=label, gbs=nbytes / ms / 1e6 if ms else None, ok=g_ok)
                norm_quant_row(p, ab, shape, label, backend, rows)
        except Exception:
            traceback.print_exc(limit=4)
            rows.append(dict(shape=shape, M=p.m, K=p.k, N=p.n, method=f"{label} {name} +TQE", mode="-", ms=None,
                             kernel=label, variant=name, error=traceback.format_exc(limit=4)))
        finally:
            set_path(None)


def norm_quant_row(p, ab, shape, label, backend, rows):
    """The norm + adaLN modulation + act-quant producer (ops.norm_quantize) on x: per-batch modulation, TQE for
    three consumers on a shape named *qkv* (q, k, v), else one (fc1, cross-q). Validated (codes, scales and row sums
    those of quantize_activation of its own y on sampled rows) before it is timed."""
    j = 3 if "qkv" in shape else 1
    g = torch.Generator(device=p.x.device).manual_seed(2)
    kw = dict(scale=torch.randn(1, p.k, device=p.x.device, generator=g) * 0.1,
              shift=torch.randn(1, p.k, device=p.x.device, generator=g) * 0.1, mod_rows=p.m,
              alphas=p.alpha.expand(j, -1).contiguous(), gates=p.gate.expand(j, -1).contiguous(), frame_id=p.fid)
    y, xq, sx, u, rs = qk.norm_quantize(p.x, ab, 1e-6, backend=backend, **kw)
    q2, s2, _, r2 = ref.quantize_activation(y[p.rows], ab, want_rowsum=True)
    ok = bool(torch.equal(xq[p.rows], q2) and torch.equal(sx[p.rows], s2) and torch.equal(rs[p.rows], r2))
    full = (xq, sx, u, rs)  # (the codes-only pass below must give these)
    del y, xq
    ms = bench_ms(lambda: qk.norm_quantize(p.x, ab, 1e-6, backend=backend, **kw)) if ok else None
    nbytes = p.m * p.k * (2 * p.x.element_size() + 1) + p.m * (8 + 4 * j)  # x in, y and codes out, per-row values
    record(rows, p, shape, f"{label} norm_quant A{ab} x{j}", "norm_quant", ms, None, variant=f"A{ab}", kernel=label,
           gbs=nbytes / ms / 1e6 if ms else None, ok=ok)
    # codes only (write_y=False: the fused Wan block's norms), and with the gated residual add in front
    # (add_norm_quantize after an attention output projection); their codes must be the full pass's on the same rows
    part = qk.norm_quantize(p.x, ab, 1e-6, backend=backend, write_y=False, **kw)
    ok = ok and part[0] is None and all(torch.equal(a, b) for a, b in zip(full, part[1:]))
    ms = bench_ms(lambda: qk.norm_quantize(p.x, ab, 1e-6, backend=backend, write_y=False, **kw)) if ok else None
    nbytes = p.m * p.k * (p.x.element_size() + 1) + p.m * (8 + 4 * j)
    record(rows, p, shape, f"{label} norm_quant codes A{ab} x{j}", "norm_quant codes", ms, None, variant=f"A{ab}",
           kernel=label, gbs=nbytes / ms / 1e6 if ms else None, ok=ok)
    out = p.x.flip(0)  # (an attention output: any [M, K] of x's dtype)
    rgate = torch.rand(1, p.k, device=p.x.device, generator=g)
    # (validated with y written: h the reference's add bit for bit, the codes those of the pass's own y; another
    # launch's y, e.g. norm_quantize(h), may differ by an ulp: Triton's add runs without FMA contraction)
    h, y, xq, sx, _, rs = qk.add_norm_quantize(out, p.x, ab, 1e-6, residual_gate=rgate, backend=backend, **kw)
    q2, s2, _, r2 = ref.quantize_activation(y[p.rows], ab, want_rowsum=True)
    ok = ok and bool(torch.equal(h[p.rows], ref.epilogue_tail(out[p.rows], None, p.x[p.rows], rgate))
                     and torch.equal(xq[p.rows], q2) and torch.equal(sx[p.rows], s2) and torch.equal(rs[p.rows], r2))
    del full, part, h, y, xq
    ms = bench_ms(lambda: qk.add_norm_quantize(out, p.x, ab, 1e-6, residual_gate=rgate, write_y=False,
                                               backend=backend, **kw)) if ok else None
    nbytes = p.m * p.k * (3 * p.x.element_size() + 1) + p.m * (8 + 4 * j)  # out and residual in, h and codes out
    record(rows, p, shape, f"{label} add_norm_quant codes A{ab} x{j}", "add_norm_quant codes", ms, None,
           variant=f"A{ab}", kernel=label, gbs=nbytes / ms / 1e6 if ms else None, ok=ok)


def summarize(rows):
    """Medians over the M >= 8192 shapes: ratio to bf16 per (method, mode), cuda over triton per variant."""
    big = [r for r in rows if r["M"] >= BIG_M and r.get("ms")]
    out = {"ratio_bf16": {}, "cuda_over_triton": {}, "auto_table": {}}
    for key in sorted({(r["method"], r["mode"]) for r in big if r.get("ratio_bf16")}):
        rs = [r["ratio_bf16"] for r in big if (r["method"], r["mode"]) == key and r.get("ratio_bf16")]
        out["ratio_bf16"][f"{key[0]} | {key[1]}"] = dict(median=statistics.median(rs), min=min(rs), n=len(rs))
    for label in CUDA_LABELS:
        for v in sorted({r["variant"] for r in big if r.get("kernel") == label}):
            for mode in ("gemm", "full", "act_quant", "act_quant+gelu", "norm_quant", "norm_quant codes",
                         "add_norm_quant codes", "gemm+gelu", "gemm+res"):
                tri = {r["shape"]: r["ms"] for r in big if r.get("kernel") == "triton" and r["variant"] == v
                       and r["mode"] == mode}
                cu = {r["shape"]: r["ms"] for r in big if r.get("kernel") == label and r["variant"] == v
                      and r["mode"] == mode}
                ratios = {s: tri[s] / cu[s] for s in cu if s in tri}
                if ratios:
                    out["cuda_over_triton"][f"{label} {v} {mode}"] = dict(
                        median=statistics.median(ratios.values()), min=min(ratios.values()),
                        slowest_shape=min(ratios, key=ratios.get), per_shape=ratios)
    for r in big:  # fastest backend per (variant, mode, K, N): what backend="auto" should pick
        key = f"{r.get('variant')} {r['mode']} K={r['K']} N={r['N']}"
        best = out["auto_table"].get(key)
        if r.get("kernel") and (best is None or r["ms"] < best["ms"]):
            out["auto_table"][key] = dict(kernel=r["kernel"], ms=r["ms"])
    return out


def suggest_rules(rows, kernel="cuda sm90ws", floor=0.95):
    """configs/auto.json rules from one run: per weight width, `kernel` takes the GEMMs with K >= min_k, where
    min_k is one above the largest K at which its GEMM ran below `floor` x Triton's speed (1 when it never did),
    provided its median over those shapes is >= 1x; "tails": true when its tailed GEMMs (gemm+gelu, gemm+res,
    as this run ran them) also stay >= floor there with each median >= 1x. -> (rules, evidence per variant)."""
    over_triton = summarize(rows)["cuda_over_triton"]
    k_of = {r["shape"]: r["K"] for r in rows}

    def ratios(variant, mode):  # Triton time over `kernel` time, per (shape, K)
        per_shape = over_triton.get(f"{kernel} {variant} {mode}", {}).get("per_shape", {})
        return {(s, k_of[s]): x for s, x in per_shape.items()}

    rules, evidence = [], {}
    variants = {r.get("variant") for r in rows if r.get("kernel") == kernel}
    for v in sorted(v for v in variants if str(v).startswith("W")):
        g = ratios(v, "gemm")
        if not g:
            continue
        slow = [k for (_, k), x in g.items() if x < floor]
        min_k = max(slow) + 1 if slow else 1
        kept = [x for (_, k), x in g.items() if k >= min_k]
        ev = dict(min_k=min_k, gemm_ratios={f"{s} K={k}": round(x, 3) for (s, k), x in g.items()})
        evidence[v] = ev
        if not kept or statistics.median(kept) < 1.0:
            ev["verdict"] = "no rule: not faster at the median where it is never below the floor"
            continue
        rule = {"w_bits": [int(v[1])], "min_k": min_k, "backend": kernel.split()[0]}
        tails = {mode: [x for (_, k), x in ratios(v, mode).items() if k >= min_k] for mode in ("gemm+gelu", "gemm+res")}
        ev["tail_ratios"] = {m: [round(x, 3) for x in xs] for m, xs in tails.items()}
        if all(xs and min(xs) >= floor and statistics.median(xs) >= 1.0 for xs in tails.values()):
            rule["tails"] = True
        rules.append(rule)
        ev["verdict"] = rule
    return rules, evidence


def markdown(rows, summary, env):
    big = [r for r in rows if r["M"] >= BIG_M]
    shapes = list(dict.fromkeys(r["shape"] for r in big))
    cols = [(f"{k} {v}", mode) for v in sorted({r["variant"] for r in big if r.get("variant")} - {"A6", "A8"})
            for mode in ("gemm", "full") for k in env.get("kernels", [k[0] for k in KERNELS])]

    def cell(shape, label, mode):
        r = next((r for r in big if r["shape"] == shape and r["method"] == f"{label} +TQE" and r["mode"] == mode), None)
        return f"{r['ratio_bf16']:.2f}x" if r and r.get("ratio_bf16") else ("fail" if r else "-")

    lines = [f"Device: {env.get('device')}, torch {env['torch']}, triton {env['triton']}; {env['date']}. "
             "Speed-up over cuBLAS bf16 F.linear in the same process (TQE on).", "",
             "| shape (M, K, N) | " + " | ".join(f"{c} {m}" for c, m in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for s in shapes:
        r0 = next(r for r in big if r["shape"] == s)
        lines.append(f"| {s} ({r0['M']}, {r0['K']}, {r0['N']}) | " + " | ".join(cell(s, c, m) for c, m in cols) + " |")
    lines += ["", "CUDA over Triton (time ratio, > 1 is faster):", ""]
    for key, v in summary["cuda_over_triton"].items():
        lines.append(f"- {key}: median {v['median']:.3f}x, min {v['min']:.3f}x ({v['slowest_shape']})")
    return "\n".join(lines)


def plot(runs, path):
    """GEMM-alone speed-up over cuBLAS bf16 per shape, Triton and each CUDA kernel, from one or more result
    JSONs: runs = [(json dict, label suffix)] (e.g. the same kernel at two tile heights)."""
    series, shapes = [], []
    for result, suffix in runs:
        big = [r for r in result["rows"] if r["M"] >= BIG_M and r.get("ratio_bf16") and r["mode"] == "gemm"]
        shapes = shapes or list(dict.fromkeys(r["shape"] for r in big))
        for method in dict.fromkeys(r["method"] for r in big):
            vals = {r["shape"]: r["ratio_bf16"] for r in big if r["method"] == method}
            series.append((f"{method}{suffix}", [vals.get(s, 0) for s in shapes]))
    bar_chart(shapes, series, "GEMM speed-up over cuBLAS bf16", path)


def profile(shape, wb, ab, shapes, path="sm90ws"):
    """A few calls of each CUDA kernel on one shape, for ncu: the GEMM (--kernel-name regex:qgemm_sm90), the act-quant
    (regex:act_quant) and the codes-only norm-quant with per-batch modulation and three consumers (regex:norm_quant)."""
    m, k, n = shapes[shape]
    p = Problem(m, k, n)
    q, sw, zw = qk.quantize_weight(p.w, wb)
    wp = qk.pack_weight(q, wb)
    xq, sx, u, rs = qk.quantize_activation_rowsum(p.x, ab, alpha=p.alpha, backend="cuda")
    set_path(path)
    for _ in range(3):
        qk.qgemm(xq, sx, wp, wb, sw, zw, p.bias, u, p.beta, rs, backend="cuda")
    mod = torch.randn(2, p.k, device=p.x.device) * 0.1
    for _ in range(3):
        qk.norm_quantize(p.x, ab, 1e-6, scale=mod[:1], shift=mod[1:], mod_rows=p.m, alphas=p.alpha.expand(3, -1),
                         gates=p.gate.expand(3, -1), frame_id=p.fid, write_y=False, backend="cuda")
    torch.cuda.synchronize()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default=None)
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--variants", default="W3A6,W4A8")
    ap.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results"))
    ap.add_argument("--tag", default=None)
    ap.add_argument("--profile", default=None, metavar="SHAPE")
    ap.add_argument("--kernels", default=None,
                    help="comma list of kernel labels to run (default all: " + ", ".join(k[0] for k in KERNELS) + ")")
    ap.add_argument("--tails", action="store_true",
                    help="also time the GEMM with each epilogue tail (GELU; residual + gate * y): fused by Triton, "
                         "by CUDA only with QVDIT_CUDA_FUSED_TAIL=1 (recorded in env.cuda_fused_tail)")
    ap.add_argument("--suggest-auto", default=None, metavar="JSON",
                    help="print the configs/auto.json rules a saved run supports (suggest_rules; no GPU needed)")
    ap.add_argument("--floor", type=float, default=0.95,
                    help="--suggest-auto: the slowest a routed shape may run against Triton (default 0.95)")
    ap.add_argument("--plot", nargs="+", default=None, metavar="JSON[:SUFFIX]",
                    help="only draw the GEMM figure of saved result JSONs (no GPU needed) into --out/<tag>.png")
    args = ap.parse_args(argv)
    if args.suggest_auto:
        with open(args.suggest_auto) as fh:
            rules, evidence = suggest_rules(json.load(fh)["rows"], floor=args.floor)
        print(json.dumps({"evidence": evidence, "qgemm": rules}, indent=1))
        return
    if args.plot:
        runs = []
        for item in args.plot:
            fname, _, suffix = item.partition(":")
            with open(fname) as fh:
                runs.append((json.load(fh), f" {suffix}" if suffix else ""))
        plot(runs, os.path.join(args.out, f"{args.tag or 'cuda_plot'}.png"))
        return
    if not torch.cuda.is_available():
        sys.exit("bench_cuda.py needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = True  # cuBLAS default
    shapes = load_shapes(args.shapes)
    variants = [(int(v[1]), int(v[3])) for v in args.variants.split(",")]
    if args.profile:
        profile(args.profile, *variants[0], shapes)
        return
    env = environment()
    from qvdit_kernels import _C
    from qvdit_kernels import cuda as qk_cuda

    env["cuda_sm90_available"] = bool(_C.sm90_available())
    env["cuda_fused_tail"] = qk_cuda.fused_tail_enabled()  # CUDA tail rows: in the kernel, or after it
    tag = args.tag or env["date"][:10]
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"cuda_{tag}")
    todo = {k: v for k, v in shapes.items() if v[0] >= BIG_M and (not args.only or k in args.only)}
    kernels = kernels_here(args.kernels.split(",") if args.kernels else None)
    env["kernels"] = [k[0] for k in kernels]
    rows: list[dict] = []
    result = dict(env=env, targets=TARGETS, rows=rows)
    for name, (m, k, n) in todo.items():
        t0 = time.time()
        print(f"{name}: M={m} K={k} N={n}", flush=True)
        p = Problem(m, k, n)
        fn = lambda: F.linear(p.x, p.w, p.bias)  # noqa: E731
        t_bf16 = bench_ms(fn)
        record(rows, p, name, "cuBLAS bf16", "full", t_bf16, t_bf16, ok=True)
        seen_ab = set()
        for wb, ab in variants:
            run_variant(p, wb, ab, name, t_bf16, rows, do_aq=ab not in seen_ab, kernels=kernels, tails=args.tails)
            seen_ab.add(ab)
        del p
        torch.cuda.empty_cache()
        print(f"  ({time.time() - t0:.1f} s)", flush=True)
        with open(stem + ".json", "w") as fh:  # after every shape: a cut-off run keeps what it measured
            json.dump(result, fh, indent=1, default=str)
    result["summary"] = summarize(rows)
    result["summary"]["auto_rules"] = suggest_rules(rows)[0]  # what configs/auto.json could say for this GPU
    with open(stem + ".json", "w") as fh:
        json.dump(result, fh, indent=1, default=str)
    md = markdown(rows, result["summary"], env)
    with open(stem + ".md", "w") as fh:
        fh.write(md + "\n")
    plot([(result, "")], stem + ".png")
    print(md)


if __name__ == "__main__":
    main()
