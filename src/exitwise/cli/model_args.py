"""The flags every command that runs a model shares, ``--model``, ``--dtype`` and ``--device``, with the
defaults of :class:`~exitwise.models.spec.ModelSpec`, and the ModelSpec they name."""

from __future__ import annotations

import argparse

from exitwise.models.loading import BUNDLED
from exitwise.models.quantize import WEIGHT_DTYPES
from exitwise.models.spec import DEFAULT_DEVICE, DEFAULT_DTYPE, DEFAULT_MODEL, ModelSpec

MODEL_HELP = f"a bundled model ({', '.join(BUNDLED)}), a model directory, a .gguf file or a Hugging Face hub id"
DTYPES = ("auto", *WEIGHT_DTYPES)


def add_model_args(p: argparse.ArgumentParser | argparse._ArgumentGroup, default: str | None = DEFAULT_MODEL, *,
                   required: bool = False, default_help: str | None = None, dtype: str | None = DEFAULT_DTYPE,
                   device: str = DEFAULT_DEVICE, dtypes: tuple[str, ...] = DTYPES) -> None:
    """``--model`` (``default``; None with ``default_help`` saying where it comes from, e.g. an artefact;
    or ``required``), then :func:`add_weight_args`."""
    model_help = MODEL_HELP if required else f"{MODEL_HELP} (default: {default_help or default})"
    p.add_argument("--model", default=None if required else default, required=required, help=model_help)
    add_weight_args(p, dtype=dtype, device=device, dtypes=dtypes)


def add_weight_args(p: argparse.ArgumentParser | argparse._ArgumentGroup, *, dtype: str | None = DEFAULT_DTYPE,
                    device: str = DEFAULT_DEVICE, dtypes: tuple[str, ...] = DTYPES) -> None:
    """``--dtype`` and ``--device``. ``dtype`` / ``device``: a benchmark's own defaults, where its recorded
    figures were made with others (``dtype=None``: no ``--dtype``, for a benchmark that sweeps dtypes);
    ``dtypes``: the choices, where a command takes fewer."""
    if dtype is not None:
        p.add_argument("--dtype", default=dtype, choices=dtypes,
                       help="matmul weights of the layers and the output head: auto (int4 where it holds the "
                            "weights exactly, i.e. weights from 4-bit GGUF blocks, else float32), float32, "
                            "bfloat16, int8 (weight-only, per channel, bfloat16 activations) or int4 (per 32 "
                            f"columns; heads int8) (default: {dtype})")
    p.add_argument("--device", default=device, help=f"torch device, e.g. cpu or cuda (default: {device})")


def model_spec(args: argparse.Namespace, name: str | None = None) -> ModelSpec:
    """The ModelSpec of the model flags (``name``: the model when ``--model`` was left to an artefact)."""
    return ModelSpec(name or args.model, dtype=args.dtype, device=args.device)
