"""Pieces the benchmarks share: the data directory, fixed prompts, a decode step ready to time."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("EXITWISE_DATA", ROOT.parent / "shared" / "data"))


def test_prompts(tok, n: int, length: int) -> list[list[int]]:
    """n prompts of exactly ``length`` tokens: the first WikiText test paragraphs (> 400 characters,
    headings skipped) that are long enough, in file order."""
    paras = [ln.strip() for ln in (DATA / "text" / "test.txt").read_text().splitlines()
             if len(ln.strip()) > 400 and not ln.strip().startswith("=")]
    out = []
    for p in paras:
        ids = tok(p)["input_ids"]
        if len(ids) >= length:
            out.append(ids[:length])
        if len(out) == n:
            return out
    raise SystemExit(f"only {len(out)} test paragraphs have {length} tokens")


def decode_setup(eng, batch: int, prompt_len: int = 128):
    """Prefill ``batch`` synthetic requests on an idle engine and prepare one decode step as the
    scheduler would: returns (seqs, step context, embedded last tokens (B, D))."""
    from exitwise.engine import SamplingParams

    for i in range(batch):
        eng.add_request(list(range(1000 + i, 1000 + prompt_len + i)), SamplingParams(max_tokens=512, ignore_eos=True))
    eng.step()  # prefill
    seqs = list(eng.scheduler.running)
    for s in seqs:
        eng.blocks.append_slot(s)  # the scheduler does this before a real decode step
    r = eng.runner
    return seqs, r.decode_context(seqs), r.model.embed_tokens([s.last_token for s in seqs])
