"""End to end: one transformer forward of video-DiT configs with random weights, bf16 vs W4A8 vs W3A6 (TQE on),
eager and compiled, side by side in one process (issue 6, SPEC 4).

    python benchmarks/bench_e2e.py                                   # Wan2.1-1.3B and 14B, 480x832x81, batch 1
    python benchmarks/bench_e2e.py --models wan1.3b --modes eager --deadline 120
    python benchmarks/bench_e2e.py --tiny                            # CPU smoke run of the same code path

Per (model, setting, mode): latency of one forward (median of --reps timed calls after a warm-up, CUDA events),
peak GPU memory of that forward (weights included) and the weights alone, and, eager only, a profile of one
forward: device time in attention (the SDPA op), in the transformer-block linears (bf16 GEMMs or our act-quant +
packed GEMM, each wrapped in a record_function range) and in the rest (`--profile-compiled`: compiled forwards too,
by kernel family). `--memory-trace`: the blocks live at the peak, by allocating frame (what a peak difference is). Each setting is built fresh from the same
seed (the previous model freed first), so the memory figures are the quantized model's alone. The quantized
output is compared with the bf16 output on the same input (relative L2 error: random weights, a sanity check).
"Compiled" is diffusers' regional compile (`compile_repeated_blocks(fullgraph=True)`: one graph per block
class, reused by every block); its warm-up time (compilation) is recorded.

Writes benchmarks/results/e2e_<tag>.json (device, versions, date, command), e2e_<tag>.png and e2e_<tag>.md.
Models are built in bf16 throughout (the pipelines keep norms and time embeddings in fp32; negligible here).
CogVideoX-5B runs without image_rotary_emb (the pipeline computes RoPE outside the model; same FLOPs).
"""
from __future__ import annotations

import argparse
import gc
import json
import linecache
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import REPO, environment  # noqa: E402

import qvdit  # noqa: E402
from qvdit_kernels import backends  # noqa: E402

WAN = dict(patch_size=(1, 2, 2), attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096,
           freq_dim=256, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
MODELS = {  # published configs (diffusers conversion scripts); inputs at the pipelines' default resolution
    "wan1.3b": dict(cls="WanTransformer3DModel", config=dict(WAN, num_attention_heads=12, ffn_dim=8960, num_layers=30),
                    frames=81, height=480, width=832, text=512),
    "wan14b": dict(cls="WanTransformer3DModel", config=dict(WAN, num_attention_heads=40, ffn_dim=13824, num_layers=40),
                   frames=81, height=480, width=832, text=512),
    "cogvideox5b": dict(cls="CogVideoXTransformer3DModel",
                        config=dict(num_attention_heads=48, attention_head_dim=64, in_channels=16, out_channels=16,
                                    time_embed_dim=512, text_embed_dim=4096, num_layers=42, sample_width=90,
                                    sample_height=60, sample_frames=49, patch_size=2, max_text_seq_length=226,
                                    use_rotary_positional_embeddings=True),
                        frames=49, height=480, width=720, text=226),
    "tiny": dict(cls="WanTransformer3DModel", config=None, frames=5, height=32, width=32, text=8),  # qvdit.demo's
}
SETTINGS = {"bf16": None, "w4a8": (4, 8), "w3a6": (3, 6)}
VAE = (4, 8)  # temporal, spatial compression of the Wan/CogVideoX VAEs
TARGETS = {"wan14b": 1.15, "wan1.3b": 1.08}  # SPEC 4: whole forward vs bf16


def model_config(name: str) -> dict:
    spec = MODELS[name]
    if spec["config"] is None:
        from qvdit.demo import TINY_WAN

        return dict(TINY_WAN, text_dim=32)
    return spec["config"]


def build(name: str, device, dtype, seed: int = 0):
    import diffusers

    torch.manual_seed(seed)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters born in bf16: a 14B model never exists in fp32
    try:
        with torch.device(device):
            model = getattr(diffusers, MODELS[name]["cls"])(**model_config(name))
    finally:
        torch.set_default_dtype(prev)
    return model.eval().requires_grad_(False)


def make_inputs(name: str, model, device, dtype, args) -> dict:
    spec, cfg = MODELS[name], model.config
    frames, height, width = (args.frames or spec["frames"], args.height or spec["height"], args.width or spec["width"])
    f, h, w = (frames - 1) // VAE[0] + 1, height // VAE[1], width // VAE[1]
    g = torch.Generator(device="cpu").manual_seed(1)
    text_dim = cfg.text_dim if hasattr(cfg, "text_dim") else cfg.text_embed_dim
    text = torch.randn(1, spec["text"], text_dim, generator=g).to(device, dtype)
    layout = (1, f, cfg.in_channels, h, w) if spec["cls"].startswith("CogVideoX") else (1, cfg.in_channels, f, h, w)
    x = torch.randn(*layout, generator=g).to(device, dtype)
    kw = dict(hidden_states=x, encoder_hidden_states=text, timestep=torch.tensor([500], device=device))
    return kw, dict(frames=frames, height=height, width=width, latent=[f, h, w])


def compile_blocks(model, backend: str) -> None:
    """diffusers' regional compile (`compile_repeated_blocks(fullgraph=True)`), also for classes that name no
    repeated block (CogVideoX in diffusers 0.42: `_repeated_blocks` is empty and the call raises): there the class of
    the model's block list is named on the instance."""
    if not getattr(model, "_repeated_blocks", None):
        blocks = getattr(model, "transformer_blocks", None) or getattr(model, "blocks", None)
        if not isinstance(blocks, torch.nn.ModuleList) or len(blocks) == 0:
            raise ValueError(f"{type(model).__name__}: no _repeated_blocks and no transformer_blocks/blocks list to "
                             "compile")
        model._repeated_blocks = sorted({type(b).__name__ for b in blocks})
    model.compile_repeated_blocks(fullgraph=True, backend=backend)


def block_linears(model) -> dict:
    adapter = qvdit.models.find_adapter(model)
    return {n: m for n, m in model.named_modules()
            if isinstance(m, qvdit.QLinear) or (adapter is not None and adapter.default_filter(n, m))}


def weights_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_forward(fn, reps: int, device) -> list[float]:
    """Wall times (ms) of `reps` calls: CUDA events on a GPU, the host clock on CPU."""
    out = []
    for _ in range(reps):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            out.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e3)
    return out


ATTENTION_KERNELS = ("sdpa", "flash", "fmha", "attention")  # cuDNN, FlashAttention, mem-efficient SDPA kernels


GEMM_KERNELS = ("qgemm", "gemm", "nvjet", "xmma", "cutlass")  # ours, and cuBLAS's kernel families on Hopper


def profile_shares(model, call, device, wrap_linears: bool = True) -> dict:
    """Device time (CPU time on CPU) of one forward split into attention, block linears and the rest.
    `wrap_linears=False` (compiled blocks: a wrapper would retrace them) leaves block_linears_ms None and
    reports the kernel families only (attention, GEMMs, act-quant)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    wrapped = []
    for m in (block_linears(model).values() if wrap_linears else ()):
        def fwd(x, *args, _orig=m.forward, **kw):
            with record_function("e2e::block_linear"):
                return _orig(x, *args, **kw)
        m.forward = fwd  # instance attribute: removed below
        wrapped.append(m)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    try:
        with profile(activities=acts) as prof:
            call()
            sync(device)
    finally:
        for m in wrapped:
            del m.forward
    # GPU side: every kernel is one device event (no attribution to CPU ops, which double counted the
    # cuDNN attention kernels of the bf16 runs); attention = the SDPA kernels by name, block linears = the
    # GPU spans of the e2e::block_linear annotations. On CPU: the ops' own CPU times.
    kernels: dict[str, float] = {}  # name -> ms
    lin = 0.0  # ms
    if device.type == "cuda":
        for e in prof.events():
            if e.device_type != torch.autograd.DeviceType.CUDA:
                continue
            ms = e.time_range.elapsed_us() / 1e3
            if e.name == "e2e::block_linear":
                lin += ms
            else:
                kernels[e.name[:90]] = kernels.get(e.name[:90], 0.0) + ms
        attn = sum(ms for k, ms in kernels.items() if any(p in k.lower() for p in ATTENTION_KERNELS))
    else:
        cpu_events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CPU]
        for e in cpu_events:
            kernels[e.name[:90]] = kernels.get(e.name[:90], 0.0) + e.self_cpu_time_total / 1e3
        attn = sum(e.cpu_time_total for e in cpu_events if e.name == "aten::scaled_dot_product_attention") / 1e3
        lin = sum(e.cpu_time_total for e in cpu_events if e.name == "e2e::block_linear") / 1e3
    total = sum(kernels.values())
    top = {k: round(v, 3) for k, v in sorted(kernels.items(), key=lambda kv: -kv[1])[:12]}
    # the separate act-quant pass (what fusing it into the producing op, issue 6 item 5, would remove)
    act_quant = sum(ms for k, ms in kernels.items() if "act_quant" in k)
    qgemm = sum(ms for k, ms in kernels.items() if "qgemm" in k)
    gemm = sum(ms for k, ms in kernels.items() if any(p in k.lower() for p in GEMM_KERNELS))
    lin = lin if wrap_linears else None
    return {"total_ms": total, "attention_ms": attn, "block_linears_ms": lin,
            "act_quant_kernels_ms": act_quant, "qgemm_kernels_ms": qgemm, "gemm_kernels_ms": gemm,
            "other_ms": total - attn - (lin or 0.0), "attention_share": attn / total if total else None,
            "block_linears_share": lin / total if total and lin is not None else None, "top_kernels_ms": top}


def peak_live_set(events: list[dict], baseline: int = 0, top: int = 12) -> dict:
    """From an allocator trace (`torch.cuda.memory._snapshot()["device_traces"][i]`): the bytes live at the
    highest point (`baseline` = bytes allocated before the trace began) and the largest blocks live then, each
    with the frame that allocated it. What explains a peak-memory difference between two settings."""
    live: dict[int, tuple[int, str]] = {}
    cur = best = baseline
    best_live: dict[int, tuple[int, str]] = {}
    for e in events:
        act = e.get("action")
        if act == "alloc":
            live[e["addr"]] = (e["size"], _frame(e.get("frames") or []))
            cur += e["size"]
            if cur > best:
                best, best_live = cur, dict(live)
        elif act == "free_completed" and e["addr"] in live:
            cur -= live.pop(e["addr"])[0]
    blocks = sorted(best_live.values(), key=lambda b: -b[0])
    by_frame: dict[str, list[int]] = {}
    for size, where in blocks:
        by_frame.setdefault(where, []).append(size)
    rows = sorted(by_frame.items(), key=lambda kv: -sum(kv[1]))[:top]
    return {"peak_bytes": best, "baseline_bytes": baseline, "live_blocks": len(best_live),
            "top": [{"bytes": sum(v), "count": len(v), "largest": max(v), "where": k} for k, v in rows]}


def _frame(frames: list[dict]) -> str:
    """The innermost frame of our code, diffusers' or inductor's generated code (else the innermost one). A frame
    in inductor's generated code also gets its source line, which names the op or buffer (the file's name alone
    is a hash)."""
    keep = ("qvdit", "diffusers", "torchinductor", "benchmarks")
    for f in frames:
        name = f.get("filename", "")
        if any(k in name for k in keep) and "/torch/" not in name:
            label = f"{'/'.join(name.split('/')[-2:])}:{f.get('line')} {f.get('name')}"
            src = linecache.getline(name, f.get("line") or 0).strip() if "torchinductor" in name else ""
            return f"{label}: {src[:100]}" if src else label
    return f"{frames[0].get('filename', '?').split('/')[-1]}:{frames[0].get('line')} {frames[0].get('name')}" \
        if frames else "?"


def trace_peak(call) -> dict:
    """peak_live_set over one forward, with the allocator's history recorded (python stacks)."""
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")
    try:
        call()
        torch.cuda.synchronize()
        snap = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    dev = torch.cuda.current_device()
    return peak_live_set(snap["device_traces"][dev], baseline)


def run_one(name, setting, mode, args, device, ref_out, log) -> tuple[dict, torch.Tensor | None]:
    dtype = torch.bfloat16
    row = {"model": name, "setting": setting, "mode": mode, "backend": args.backend if setting != "bf16" else "cuBLAS"}
    if setting != "bf16":  # producer fusion (qvdit.models.fused) allowed, eager and compiled (the compiled blocks
        # trace the fused forward), unless turned off; it runs where the backend has a norm_quantize kernel (Triton
        # on a GPU, which also feeds CUDA-backend linears; the reference backend named explicitly). ffn_inplace: fc2
        # writes its codes over fc1's output where fc1 runs on the CUDA kernel
        row["fuse_producers_enabled"] = os.environ.get("QVDIT_FUSE_PRODUCERS", "1") != "0"
        row["ffn_inplace"] = row["fuse_producers_enabled"] and os.environ.get("QVDIT_FFN_INPLACE", "1") != "0"
        row["ffn_over"] = row["ffn_inplace"] and os.environ.get("QVDIT_FFN_OVER", "1") != "0"  # (fused.ffn_over)
    model = build(name, device, dtype)
    kw, shape = make_inputs(name, model, device, dtype, args)
    row.update(shape)
    bits = SETTINGS[setting]
    if bits is not None:
        t0 = time.perf_counter()
        qvdit.quantize_(model, qvdit.QuantConfig(w_bits=bits[0], a_bits=bits[1], tqe=True, backend=args.backend),
                        show_progress=False)
        row["quantize_s"] = round(time.perf_counter() - t0, 2)
        row["linear_bytes"], row["linear_bytes_bf16"] = qvdit.weight_bytes(model)
        row["linear_ratio_vs_bf16"] = row["linear_bytes"] / row["linear_bytes_bf16"]
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    row["weights_bytes"] = weights_bytes(model)
    if mode == "compiled":
        compile_blocks(model, args.compile_backend)

    def call():
        with torch.no_grad():
            return model(**kw, return_dict=False)[0]

    t0 = time.perf_counter()
    out = call()  # warm-up: kernel launch configs, and compilation for mode "compiled"
    sync(device)
    row["warmup_s"] = round(time.perf_counter() - t0, 2)
    if device.type == "cuda":
        del out  # (the warm-up's output: not part of the measured forward)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = call()
        torch.cuda.synchronize()
        row["peak_bytes"] = torch.cuda.max_memory_allocated()
        # what the forward adds to what was allocated before it (inputs and this model's weights, and anything an
        # earlier setting in this process left behind): weights + this is the peak the model itself costs
        row["forward_peak_bytes"] = row["peak_bytes"] - before
        row["model_peak_bytes"] = row["weights_bytes"] + row["forward_peak_bytes"]
        # what the forward leaves allocated besides its output (0 but for the allocator's rounding of the output)
        row["left_behind_bytes"] = torch.cuda.memory_allocated() - before - out.untyped_storage().nbytes()
    times = time_forward(call, args.reps, device)
    row["times_ms"] = [round(t, 3) for t in times]
    row["latency_ms"] = statistics.median(times)
    out = out.float().cpu()
    if ref_out is not None:
        row["rel_err_vs_bf16"] = float((out - ref_out).norm() / ref_out.norm())
    if not args.no_profile and (mode == "eager" or args.profile_compiled):
        try:  # a profiler problem must not cost the latency and memory figures of the run
            row["profile"] = profile_shares(model, call, device, wrap_linears=mode == "eager")
        except Exception as exc:
            row["profile_error"] = f"{type(exc).__name__}: {exc}"
    if args.memory_trace and device.type == "cuda":
        try:
            row["memory_at_peak"] = trace_peak(call)
        except Exception as exc:
            row["memory_trace_error"] = f"{type(exc).__name__}: {exc}"
    log(f"{name:<12}{setting:<6}{mode:<9}{row['latency_ms']:>10.1f} ms  warm-up {row['warmup_s']:.1f} s")
    del model, kw
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row, out


def add_ratios(rows: list[dict]) -> None:
    base = {(r["model"], r["mode"]): r for r in rows if r["setting"] == "bf16" and "latency_ms" in r}
    for r in rows:
        b = base.get((r["model"], r["mode"]))
        if b is None or "latency_ms" not in r:
            continue
        r["speedup_vs_bf16"] = b["latency_ms"] / r["latency_ms"]
        if "peak_bytes" in r and "peak_bytes" in b:
            r["peak_saving_bytes"] = b["peak_bytes"] - r["peak_bytes"]
            r["weight_saving_bytes"] = b["weights_bytes"] - r["weights_bytes"]
        if "model_peak_bytes" in r and "model_peak_bytes" in b:  # (the peak target: this >= weight saving)
            r["model_peak_saving_bytes"] = b["model_peak_bytes"] - r["model_peak_bytes"]
        if "profile" in r and "profile" in b and r["profile"]["block_linears_ms"] and b["profile"]["block_linears_ms"]:
            r["block_linears_speedup_vs_bf16"] = b["profile"]["block_linears_ms"] / r["profile"]["block_linears_ms"]


def markdown(rows: list[dict], env: dict) -> str:
    lines = [f"Device: {env.get('device', 'cpu')}, torch {env['torch']}, triton {env['triton']}, {env['date']}, "
             f"`{env['command']}`", "",
             "| model | setting | mode | latency ms | vs bf16 | peak GiB | weights GiB | linears vs bf16 | "
             "attention share | block linears share | block linears vs bf16 | rel. err vs bf16 | "
             "model peak drop - weight drop (MB) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    gib = lambda b: f"{b / 2**30:.2f}" if b is not None else "-"  # noqa: E731
    fmt = lambda v, f: f.format(v) if v is not None else "-"  # noqa: E731
    for r in rows:
        if "latency_ms" not in r:
            lines.append(f"| {r['model']} | {r['setting']} | {r['mode']} | not run: {r.get('skipped')} |" + " |" * 9)
            continue
        p = r.get("profile", {})
        margin = (r["model_peak_saving_bytes"] - r["weight_saving_bytes"]) / 1e6 \
            if "model_peak_saving_bytes" in r and "weight_saving_bytes" in r else None
        lines.append(
            f"| {r['model']} | {r['setting']} | {r['mode']} | {r['latency_ms']:.1f} | "
            f"{fmt(r.get('speedup_vs_bf16'), '{:.3f}x')} | {gib(r.get('peak_bytes'))} | {gib(r['weights_bytes'])} | "
            f"{fmt(r.get('linear_ratio_vs_bf16'), '{:.3f}x')} | {fmt(p.get('attention_share'), '{:.1%}')} | "
            f"{fmt(p.get('block_linears_share'), '{:.1%}')} | {fmt(r.get('block_linears_speedup_vs_bf16'), '{:.3f}x')} | "
            f"{fmt(r.get('rel_err_vs_bf16'), '{:.4f}')} | {fmt(margin, '{:+.1f}')} |")
    for r in rows:  # --memory-trace: what is live at the peak
        mem = r.get("memory_at_peak")
        if mem:
            lines += ["", f"Live at the peak of {r['model']} {r['setting']} {r['mode']}: {gib(mem['peak_bytes'])} GiB "
                      f"({gib(mem['baseline_bytes'])} GiB before the forward), largest by allocating frame:", ""]
            lines += [f"- {gib(t['bytes'])} GiB in {t['count']} block(s), largest {gib(t['largest'])} GiB: `{t['where']}`"
                      for t in mem["top"][:8]]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if "latency_ms" in r]
    groups = sorted({(r["model"], r["mode"]) for r in done})
    fig, ax = plt.subplots(figsize=(max(4, 2.2 * len(groups)), 3.6))
    width = 0.8 / len(SETTINGS)
    for i, s in enumerate(SETTINGS):
        vals = [next((r["latency_ms"] for r in done if (r["model"], r["mode"], r["setting"]) == (*g, s)), 0)
                for g in groups]
        ax.bar([j + i * width for j in range(len(groups))], vals, width, label=s)
    ax.set_xticks([j + width for j in range(len(groups))], [f"{m}\n{mode}" for m, mode in groups])
    ax.set_ylabel("ms per transformer forward")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="wan1.3b,wan14b", help=f"comma list of {list(MODELS)}")
    p.add_argument("--settings", default="bf16,w4a8,w3a6", help=f"comma list of {list(SETTINGS)}")
    p.add_argument("--modes", default="eager,compiled", help="comma list of eager, compiled")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: the tiny Wan config, small latent")
    p.add_argument("--frames", type=int, default=None, help="video frames (default: the model's pipeline default)")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--reps", type=int, default=5, help="timed forwards after the warm-up (median reported)")
    p.add_argument("--deadline", type=float, default=None, help="seconds; later items are skipped and recorded")
    p.add_argument("--backend", default="auto", help="qvdit kernel backend for the quantized linears")
    p.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor; aot_eager on CPU)")
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--profile-compiled", action="store_true",
                   help="profile compiled forwards too (kernel families only: attention, GEMMs, act-quant)")
    p.add_argument("--memory-trace", action="store_true",
                   help="record the allocator over one forward: the largest blocks live at the peak, by frame")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/e2e_<tag>.json)")
    args = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    models = ["tiny"] if args.tiny else [m.strip() for m in args.models.split(",") if m.strip()]
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for label, vals, allowed in (("--models", models, MODELS), ("--settings", settings, SETTINGS),
                                 ("--modes", modes, ("eager", "compiled"))):
        bad = [v for v in vals if v not in allowed]
        if bad:
            p.error(f"{label}: unknown {bad} (choose from {list(allowed)})")
    if device.type == "cpu":
        args.compile_backend = args.compile_backend or "aot_eager"
        if not args.tiny:
            p.error("no GPU: full-size configs need one (use --tiny for the CPU smoke run)")
        if "compiled" in modes and not backends.availability("triton", device)[0]:
            p.error("compiled mode on CPU needs the Triton kernels (TRITON_INTERPRET=1); the torch reference "
                    "backend is not a compile target")
        if "compiled" in modes:
            args.backend = "triton"
    elif not backends.availability("triton", device)[0]:
        p.error(f"the Triton backend is not available: {backends.availability('triton', device)[1]}")
    args.compile_backend = args.compile_backend or "inductor"
    from diffusers.utils import logging as dlogging

    dlogging.set_verbosity_error()
    tag = "tiny_cpu" if args.tiny else torch.cuda.get_device_name(0).replace(" ", "_").replace("/", "_")
    out_json = args.out or os.path.join(REPO, "benchmarks", "results", f"e2e_{tag}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out_json)), exist_ok=True)
    env = environment()
    start = time.perf_counter()
    rows = []
    # order: every eager setting of a model first (so a deadline cuts compiled runs, not the baseline table)
    items = [(m, s, mode) for m in models for mode in modes for s in settings]
    refs = {}
    for name, setting, mode in items:
        if args.deadline is not None and time.perf_counter() - start > args.deadline:
            rows.append({"model": name, "setting": setting, "mode": mode, "skipped": "deadline"})
            print(f"{name:<12}{setting:<6}{mode:<9}   skipped (deadline {args.deadline:.0f} s)", flush=True)
            continue
        try:
            row, out = run_one(name, setting, mode, args, device, refs.get((name, mode)), lambda s: print(s, flush=True))
            if setting == "bf16":
                refs[(name, mode)] = out
        except torch.cuda.OutOfMemoryError as exc:
            row = {"model": name, "setting": setting, "mode": mode, "skipped": f"out of memory: {str(exc)[:120]}"}
            print(f"{name:<12}{setting:<6}{mode:<9}   out of memory", flush=True)
            gc.collect()
            torch.cuda.empty_cache()
        rows.append(row)
        add_ratios(rows)
        with open(out_json, "w") as fh:  # after every item: a killed run keeps what it measured
            json.dump({"environment": env, "targets_vs_bf16": TARGETS, "results": rows}, fh, indent=1)
    md = markdown(rows, env)
    with open(out_json[:-5] + ".md", "w") as fh:
        fh.write(md)
    plot(rows, out_json[:-5] + ".png")
    print(md)
    print(f"wrote {out_json} (+ .md, .png) in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
