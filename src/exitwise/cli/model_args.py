"""The flag every command that runs a model shares: ``--dtype``, the matmul weights' precision."""

from __future__ import annotations

import argparse

from exitwise.models.quantize import WEIGHT_DTYPES

# auto: int4 where int4 holds the model's layer weights exactly (the bundled SmolLM2's layers are 4-bit
# GGUF blocks), else float32 (exitwise.models.quantize.auto_dtype)
DEFAULT_DTYPE = "auto"


def add_dtype_arg(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    p.add_argument("--dtype", default=DEFAULT_DTYPE, choices=("auto", *WEIGHT_DTYPES),
                   help="matmul weights of the layers and the output head: auto (default: int4 where it holds the "
                        "weights exactly, i.e. weights from 4-bit GGUF blocks, else float32), float32, bfloat16, int8 "
                        "(weight-only, per channel, bfloat16 activations) or int4 (per 32 columns; heads int8)")
