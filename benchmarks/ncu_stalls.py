"""Where a kernel's warps wait, from Nsight Compute's source page: the SASS instructions with the most stall
samples, the samples summed per opcode, and the code's regions (mainloop, epilogue, producer) with the
instructions each executes per output element.

The ws kernel's small-K tiles cost ~2.2 us more than their MMAs at K = 1536 and neither hiding the epilogue nor
halving the L2 traffic recovered it (BENCHMARKS.md, run ws9); this view named the cause: the epilogue executed
18.9 instructions per output, as many as the whole K = 1536 mainloop (run ws10). `csrc/gpu_check.sh ncu_src`
collects it:

    ncu --kernel-name regex:qgemm_sm90_ws -c 1 --set full -o rep python3 benchmarks/bench_cuda.py --profile wan1.3b_fc1
    ncu -i rep.ncu-rep --page source --csv --print-source sass > sass.csv
    python benchmarks/ncu_stalls.py sass.csv [--top 40] [--outputs M*N]

The CSV's column names vary between Nsight Compute versions: the instruction is the column named "Source", the
samples the first column whose name starts with "Warp Stall Sampling (All"; other numeric columns whose names
mention "stall" are summed per opcode too when present. The regions (--outputs) need the "Instructions Executed"
column (Nsight Compute 2025.3 names it so).
"""
from __future__ import annotations

import argparse
import csv
import sys
from collections import defaultdict


def number(text: str) -> float:
    try:
        return float(text.replace(",", "").strip() or 0)
    except ValueError:
        return 0.0


def read(path: str) -> tuple[list[dict], str, str]:
    """Rows of the source page CSV, the instruction column and the all-samples column."""
    with open(path, newline="") as f:
        lines = [ln for ln in f if ln.strip()]
    start = next((i for i, ln in enumerate(lines) if '"Source"' in ln or ln.startswith("Source")), None)
    if start is None:
        raise SystemExit(f"{path}: no 'Source' column; is it `ncu --page source --csv --print-source sass` output?")
    rows = list(csv.DictReader(lines[start:]))
    cols = list(rows[0]) if rows else []
    samples = next((c for c in cols if c.startswith("Warp Stall Sampling (All")), None)
    if samples is None:
        raise SystemExit(f"{path}: no 'Warp Stall Sampling (All Samples)' column (collect with --set full); "
                         f"columns: {cols}")
    return rows, "Source", samples


def opcode(sass: str) -> str:
    """The opcode of a SASS line ("@P0 BRA ..." -> "BRA", "WARPGROUP.DEPBAR.LE gsb0, 0x1" -> "WARPGROUP.DEPBAR.LE")."""
    parts = sass.replace(";", " ").split()
    parts = [p for p in parts if not p.startswith("@")]
    return parts[0] if parts else "?"


# A region's name by what its code does (the first that matches).
REGION_KINDS = (("mainloop", ("IGMMA", "HGMMA")), ("epilogue", ("STG",)), ("producer", ("UTMALDG",)))


def regions(rows: list[dict], executed: str, gap: int = 30) -> list[tuple[int, int]]:
    """Contiguous stretches of executed code: [first, last] row indices, split where `gap` or more rows in a row
    never ran (the other instantiations and cold paths the compiler lays out between the hot ones)."""
    hot = [i for i, r in enumerate(rows) if number(r[executed]) > 0]
    out: list[tuple[int, int]] = []
    for i in hot:
        if out and i - out[-1][1] <= gap:
            out[-1] = (out[-1][0], i)
        else:
            out.append((i, i))
    return out


def print_regions(rows: list[dict], samples: str, total: float, outputs: float) -> None:
    executed = "Instructions Executed"
    if executed not in rows[0]:
        print(f"\n(no '{executed}' column: no regions)")
        return
    print(f"\nregions (executed instructions per output element: warp instructions x 32 / {outputs:.0f}):")
    for a, b in regions(rows, executed):
        seg = rows[a:b + 1]
        per_op = defaultdict(float)
        for r in seg:
            per_op[opcode(r["Source"])] += number(r[executed])
        n = sum(per_op.values())
        kind = next((k for k, marks in REGION_KINDS if any(o.startswith(marks) for o in per_op if per_op[o] > 0)), "-")
        ops = ", ".join(f"{o} {32 * v / outputs:.2f}" for o, v in sorted(per_op.items(), key=lambda kv: -kv[1])[:8])
        share = 100 * sum(number(r[samples]) for r in seg) / total
        print(f"  {a:6d}-{b:<6d} {kind:9s} {32 * n / outputs:6.2f} per output, {share:5.1f}% of samples: {ops}")


def product(text: str) -> float:
    """'32760*8960' (or one number) as a number, for --outputs."""
    try:
        value = 1.0
        for part in text.split("*"):
            value *= float(part)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or a product like 32760*8960, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
    return value


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("csv", help="ncu --page source --csv --print-source sass output")
    ap.add_argument("--top", type=int, default=40, help="instructions to list (default 40)")
    ap.add_argument("--outputs", type=product, default=None,
                    help="output elements of the profiled launch (M*N, e.g. 32760*8960): adds the regions' "
                         "instructions per output")
    args = ap.parse_args(argv)
    rows, src, samples = read(args.csv)
    total = sum(number(r[samples]) for r in rows) or 1.0
    reasons = [c for c in rows[0] if "stall" in c.lower() and c != samples and not c.startswith("Warp Stall Sampling")]
    print(f"{len(rows)} instructions, {total:.0f} stall samples ({samples})\n")
    print("per opcode (share of samples):")
    per_op = defaultdict(float)
    for r in rows:
        per_op[opcode(r[src])] += number(r[samples])
    for op, n in sorted(per_op.items(), key=lambda kv: -kv[1])[:20]:
        print(f"  {100 * n / total:5.1f}%  {op}")
    print(f"\ntop {args.top} instructions:")
    ranked = sorted(range(len(rows)), key=lambda i: -number(rows[i][samples]))[: args.top]
    for i in sorted(ranked):  # in program order: neighbours read together
        r = rows[i]
        why = ", ".join(f"{c}={number(r[c]):.0f}" for c in reasons if number(r[c]) > 0.05 * number(r[samples]))
        print(f"  {i:6d} {100 * number(r[samples]) / total:5.1f}%  {r[src].strip()[:90]}" + (f"  [{why}]" if why else ""))
    if args.outputs:
        print_regions(rows, samples, total, args.outputs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
