"""Pieces the benchmarks share: the data directory, fixed or seeded prompts, a decode step ready to time,
and the model and engine flags of ``exitwise generate`` / ``serve`` for benchmarks that take engine
settings (the others take the model flags, ``exitwise.cli.model_args.add_model_args``)."""

from __future__ import annotations

import argparse
import os
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("EXITWISE_DATA", ROOT.parent / "shared" / "data"))


def test_prompts(tok, n: int, length: int) -> list[list[int]]:
    """n prompts of exactly ``length`` tokens: the first WikiText test paragraphs that are long enough,
    in file order (the inputs the earlier benchmark figures were measured on; new benchmarks sample)."""
    return sampled_prompts(tok, n, length, seed=None)


def sampled_prompts(tok, n: int, length: int, seed: int | None, path: Path | None = None) -> list[list[int]]:
    """n prompts of exactly ``length`` tokens from paragraphs (> 400 characters, headings skipped) of
    ``path`` (default: the WikiText test file) drawn with ``random.Random(seed)``: a sample of the whole
    file rather than its first articles (``seed=None``: file order)."""
    path = path or DATA / "text" / "test.txt"
    paras = [ln.strip() for ln in Path(path).read_text(encoding="utf-8").splitlines()
             if len(ln.strip()) > 400 and not ln.strip().startswith("=")]
    if seed is not None:
        random.Random(seed).shuffle(paras)
    out = []
    for p in paras:
        ids = tok(p)["input_ids"]
        if len(ids) >= length:
            out.append(ids[:length])
        if len(out) == n:
            return out
    raise SystemExit(f"only {len(out)} paragraphs of {path} have {length} tokens")


def code_sample(tokenizer, path: Path, tokens: int, seed: int) -> list[int]:
    """``tokens`` consecutive tokens from a seeded random line offset of ``path``."""
    lines = path.read_text().splitlines(keepends=True)
    start = random.Random(seed).randrange(len(lines) // 2)
    ids = tokenizer("".join(lines[start:start + tokens]), add_special_tokens=False).input_ids
    if len(ids) < tokens:
        raise ValueError(f"{path}: fewer than {tokens} tokens after line {start}")
    return ids[:tokens]


def decode_setup(eng, batch: int, prompt_len: int = 128):
    """(seqs, step context, embedded last tokens (B, D)) of one prepared decode step on an idle engine."""
    from exitwise.analysis.costs import prepare_decode_step

    return prepare_decode_step(eng, batch, prompt_len)


def add_engine_flags(ap: argparse.ArgumentParser, dtype: str | None = None, **defaults) -> None:
    """The model and engine flags of ``exitwise generate`` / ``serve``, with the benchmark's own
    ``dtype`` and ``defaults`` where its published figures were measured with other settings."""
    from exitwise.cli.engine_args import add_engine_args
    from exitwise.cli.model_args import add_model_args

    add_model_args(ap, **({} if dtype is None else {"dtype": dtype}))
    add_engine_args(ap)
    ap.set_defaults(**defaults)


def engine_config(args: argparse.Namespace):
    """The EngineConfig the model and engine flags ask for, as the commands build it (its ``model`` is
    the flags' ModelSpec)."""
    from exitwise.cli.engine_args import engine_config as from_flags

    return from_flags(args)
