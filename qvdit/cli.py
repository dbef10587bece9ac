"""The `qvdit` command line (also `python -m qvdit`).

Each subcommand lives in its own module that defines `add_parser(subparsers)`; list it in SUBCOMMANDS.
Modules are imported lazily only to build the parser, so heavy imports belong inside the handlers.
"""
from __future__ import annotations

import argparse
import importlib
import sys

class CLIError(Exception):
    """A wrong argument or folder: `main` prints it as one line ("qvdit CMD: error: ...") and exits with 2."""


SUBCOMMANDS = [
    "qvdit.demo",
    "qvdit.cli_quantize",
    "qvdit.cli_bench",
    "qvdit.calibration.cli",
]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qvdit", description="Low-bit (W3/W4 x A6/A8) video DiT runtime implementing Q-VDiT.")
    sub = p.add_subparsers(dest="command", required=True)
    for mod in SUBCOMMANDS:
        importlib.import_module(mod).add_parser(sub)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except CLIError as exc:
        print(f"qvdit {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
