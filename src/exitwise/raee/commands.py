"""``exitwise raee ...`` and ``exitwise classify`` (filled in as RAEE lands)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    raee = sub.add_parser("raee", help="retrieval-augmented early exiting (build / eval)")
    raee.add_subparsers(dest="raee_command", required=True, metavar="ACTION")
