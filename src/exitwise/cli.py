"""The ``exitwise`` command line.

Each area of the library owns its sub-commands in a small ``commands.py`` that exposes
``register(subparsers)``; this file only assembles them. Handlers import heavy modules lazily so
that ``exitwise --help`` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from exitwise.errors import ExitwiseError

# Modules that contribute sub-commands; each has register(subparsers) -> None.
COMMAND_MODULES = [
    "exitwise.raee.commands",
    "exitwise.engine.commands",
    "exitwise.server.commands",
    "exitwise.heads.commands",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="exitwise", description="Early-exit inference for language models.")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice; 1 is faster on a busy machine)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    try:
        return int(args.handler(args) or 0)
    except (ExitwiseError, FileNotFoundError, ValueError) as exc:
        # Expected user errors get one clear line, not a traceback.
        print(f"exitwise: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
