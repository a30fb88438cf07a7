"""The flag every command that runs a model shares: ``--dtype``, the matmul weights' precision."""

from __future__ import annotations

import argparse

from exitwise.models.quantize import WEIGHT_DTYPES

DEFAULT_DTYPE = "float32"


def add_dtype_arg(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    p.add_argument("--dtype", default=DEFAULT_DTYPE, choices=WEIGHT_DTYPES,
                   help=f"matmul weights of the layers and the output head: {', '.join(WEIGHT_DTYPES)} (int8: "
                        f"weight-only, per channel, bfloat16 activations; default: {DEFAULT_DTYPE})")
