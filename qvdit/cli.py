"""The `qvdit` command line (also `python -m qvdit`)."""
from __future__ import annotations

import argparse
import sys


def _demo(args) -> int:
    from .demo import run_demo

    run_demo(frames=args.frames, size=args.size, seed=args.seed, backend=args.backend)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qvdit", description="Low-bit (W3/W4 x A6/A8) video DiT runtime implementing Q-VDiT.")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="quantize a small Wan video DiT on CPU and compare with full precision")
    d.add_argument("--frames", type=int, default=5, help="latent frames (default 5)")
    d.add_argument("--size", type=int, default=16, help="latent height and width (default 16)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--backend", default="auto", choices=("auto", "torch", "triton", "cuda"))
    d.set_defaults(func=_demo)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
