"""The ``exitwise`` command line.

One module per command group in this package, each exposing ``register(subparsers)``; this file
only assembles them. Handlers parse flags into typed library calls (no library function takes an
argparse namespace) and import heavy modules lazily so that ``exitwise --help`` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings

from exitwise.cli.argtypes import positive_int, threads_arg
from exitwise.errors import ExitwiseError

__all__ = ["build_parser", "command_group", "main", "positive_int"]

# Modules that contribute sub-commands; each has register(subparsers) -> None.
COMMAND_MODULES = [
    "exitwise.cli.raee",
    "exitwise.cli.generate",
    "exitwise.cli.serve",
    "exitwise.cli.profile",
    "exitwise.cli.heads",
    "exitwise.cli.finetune",
]


THREADS_HELP = "torch CPU threads (default: torch's choice; 1 is faster on a busy machine)"


class Parser(argparse.ArgumentParser):
    """argparse with its errors on one line, as every other user error: ``exitwise serve: error:
    argument --port: must be in 0..65535, got 99999 (see exitwise serve --help)``, exit code 2. The
    sub-command parsers are of this class too (argparse makes them with the parent's class)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def command_group(sub: argparse._SubParsersAction, name: str, help: str) -> argparse._SubParsersAction:
    """A command with actions (``exitwise NAME ACTION``): its parser's sub-parsers."""
    return sub.add_parser(name, help=help).add_subparsers(dest=f"{name}_action", required=True, metavar="ACTION")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="exitwise", description="Early-exit inference for language models.")
    parser.add_argument("--threads", type=threads_arg, default=None, help=THREADS_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    for p in _subcommand_parsers(parser):
        _add_threads(p)
    return parser


def _subcommand_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """Every parser below ``parser`` (``raee``, ``raee build``, ...), each once."""
    found: dict[int, argparse.ArgumentParser] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                if id(child) not in found:
                    found[id(child)] = child
                    found.update((id(p), p) for p in _subcommand_parsers(child))
    return list(found.values())


def _add_threads(p: argparse.ArgumentParser) -> None:
    """``--threads`` after the sub-command too (``exitwise serve --threads 1``), as users type it.

    Added here, not by each command module, so that every command has it. SUPPRESS: a sub-command that
    is not given it leaves the value from before the sub-command in place instead of resetting it."""
    if "--threads" not in p._option_string_actions:  # a command with its own --threads keeps it
        p.add_argument("--threads", type=threads_arg, default=argparse.SUPPRESS, help=THREADS_HELP)


_format_warning = warnings.formatwarning


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """exitwise's own warnings (a rebuilt cache, a dtype that does not run here) as one line, like its
    errors; others keep Python's format, which says where they come from."""
    if f"{os.sep}exitwise{os.sep}" in str(filename):
        return f"exitwise: warning: {' '.join(str(message).split())}\n"
    return _format_warning(message, category, filename, lineno, line)


def main(argv: list[str] | None = None) -> int:
    warnings.formatwarning = _one_line_warning
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # a flag error (2, printed on one line by Parser.error) or --help (0)
        return exc.code if isinstance(exc.code, int) else 2
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    try:
        return int(args.handler(args) or 0)
    except (ExitwiseError, OSError, ValueError) as exc:
        # Expected user errors (bad input, files, environment) get one clear line, not a traceback;
        # messages from libraries (faiss, YAML) can span lines, which are joined.
        print(f"exitwise: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
