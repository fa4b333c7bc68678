"""`inferswarm` — the command-line entry point.

    inferswarm up [--data-dir DIR] [--gateways N] [--workers N] [--json]
"""

from __future__ import annotations

import argparse
import sys

from inferswarm import up
from shared.logging import configure_logging

__all__ = ["main"]


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="inferswarm", description="An AI inference platform on a DHT mesh.")
    commands = root.add_subparsers(dest="command", required=True, metavar="COMMAND")
    up_parser = commands.add_parser("up", help="start the whole stack on this machine")
    up.add_arguments(up_parser)
    up_parser.set_defaults(run=up.up)
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    # stdout is for people and scripts (`--json`); logs go to stderr.
    configure_logging("warning", "console" if sys.stderr.isatty() else "json", service="inferswarm")
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
