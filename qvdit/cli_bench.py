"""`qvdit bench NAME [ARGS...]`: run a benchmark script of the source checkout (benchmarks/bench_NAME.py).

    qvdit bench e2e --models wan1.3b          # benchmarks/bench_e2e.py --models wan1.3b
    qvdit bench linear --only wan13b_qkv      # benchmarks/bench_linear.py ...
    qvdit bench list

The scripts live in the repository (nothing in the package imports benchmarks/), so this runs them as
`python benchmarks/<script>.py ARGS...` from the checkout the package was imported from.
"""
from __future__ import annotations

import os
import subprocess
import sys

import qvdit

BENCH_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(qvdit.__file__))), "benchmarks")


def scripts(bench_dir: str = BENCH_DIR) -> dict[str, str]:
    """name -> path of each runnable benchmark (bench_NAME.py, and quality.py as "quality")."""
    if not os.path.isdir(bench_dir):
        return {}
    found = {}
    for f in sorted(os.listdir(bench_dir)):
        if f.endswith(".py") and (f.startswith("bench_") or f == "quality.py"):
            found[f[len("bench_"):-3] if f.startswith("bench_") else f[:-3]] = os.path.join(bench_dir, f)
    return found


def _run(args) -> int:
    found = scripts(args.bench_dir)
    if not found:
        print(f"qvdit bench: error: no benchmark scripts in {args.bench_dir!r} (they ship with the source checkout, "
              "not with an installed wheel)", file=sys.stderr)
        return 2
    if args.name == "list":
        for name, path in found.items():
            print(f"{name:<12}{path}")
        return 0
    if args.name not in found:
        print(f"qvdit bench: error: unknown benchmark {args.name!r} (available: {', '.join(found)}, list)",
              file=sys.stderr)
        return 2
    rest = args.args[1:] if args.args[:1] == ["--"] else args.args
    return subprocess.call([sys.executable, found[args.name], *rest], cwd=os.path.dirname(args.bench_dir))


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="run a benchmark script (benchmarks/bench_NAME.py); `qvdit bench list`",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("name", help="benchmark name (e2e, linear, quality, ...) or 'list'")
    p.add_argument("args", nargs="...", help="arguments passed to the script")
    p.add_argument("--bench-dir", default=BENCH_DIR, help=f"folder of the scripts (default {BENCH_DIR})")
    p.set_defaults(func=_run)
