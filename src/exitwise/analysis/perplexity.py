"""Perplexity of token ids under the engine's own forward pass: teacher forced, full depth, no exits.

It measures the engine as built (its fused layers, its output head and its ``weight_dtype``: float32,
bfloat16 or int8 weight-only), not the Hugging Face model the engine was made from, so a dtype's
quality cost is read off the same numbers that decode.

Windows follow Hugging Face's strided-perplexity recipe: a window of ``window`` tokens starts every
``stride`` tokens, each runs as its own sequence (positions from 0), and each scores only the tokens
that no earlier window scored, every one of them predicted from the tokens before it in that window.
The default stride is ``window``: non-overlapping windows, where the first token of each window has
no context and is not scored. A smaller stride gives every scored token past the first window at least
``window - stride`` tokens of context, at ``window / stride`` times the compute.

Each window is prefilled on a scratch sequence whose KV blocks come from the engine's free pool and go
back to it afterwards (running requests keep theirs), so the engine serves as before once it returns.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from exitwise.engine.llm import LLM, LLMEngine
from exitwise.engine.sampling import SamplingParams
from exitwise.engine.sequence import Sequence

# Rows of logits per head call: 128 x 49,152 float32 logits is 25 MB, where a 512-token window at
# once would be 100 MB (and its log-softmax as much again).
HEAD_CHUNK = 128


@dataclass
class PerplexityResult:
    perplexity: float  # exp(nll)
    nll: float  # mean negative log-likelihood per scored token, in nats
    tokens: int  # tokens scored
    windows: int  # forward passes run
    # the argmax next token at every scored position (keep_predictions=True): teacher-forced top-1
    # agreement between two engines is the share of equal entries
    predictions: list[int] | None = None


def top1_agreement(a: PerplexityResult, b: PerplexityResult) -> float:
    """Share of positions where two runs over the same tokens predict the same next token."""
    if a.predictions is None or b.predictions is None or len(a.predictions) != len(b.predictions):
        raise ValueError("top1_agreement needs two results with predictions over the same tokens "
                         "(perplexity(..., keep_predictions=True))")
    return sum(x == y for x, y in zip(a.predictions, b.predictions, strict=True)) / len(a.predictions)


def score_windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) of each window over ``n`` tokens: window [begin, end)
    scores positions [first, end); every position in 1..n-1 is scored at most once."""
    spans = []
    prev_end = 0
    for begin in range(0, n, stride):
        end = min(begin + window, n)
        first = max(prev_end, begin + 1)  # the window's first token has nothing to be predicted from
        if first < end:
            spans.append((begin, end, first))
        prev_end = end
        if end == n:
            break
    return spans


def perplexity(llm: LLMEngine | LLM, token_ids: list[int], window: int = 512,
               stride: int | None = None, keep_predictions: bool = False) -> PerplexityResult:
    """Perplexity of ``token_ids`` under ``llm``'s forward pass (an :class:`LLMEngine`, or the
    engine of an :class:`LLM`), in windows of ``window`` tokens every ``stride`` (default
    ``window``: non-overlapping). Raises ValueError naming a bad argument."""
    engine = llm.engine if isinstance(llm, LLM) else llm
    ids = list(token_ids)
    stride = window if stride is None else stride
    if isinstance(window, bool) or not isinstance(window, int) or window < 2:
        raise ValueError(f"window must be an integer >= 2 (a token and the one it predicts), got {window!r}")
    if window > engine.context:
        raise ValueError(f"window={window} exceeds the engine's context of {engine.context} tokens")
    if isinstance(stride, bool) or not isinstance(stride, int) or not 1 <= stride <= window:
        raise ValueError(f"stride must be an integer in [1, window={window}], got {stride!r}")
    if len(ids) < 2:
        raise ValueError(f"token_ids needs at least 2 tokens to score one, got {len(ids)}")
    vocab = engine.runner.model.embed.shape[0]
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"token_ids {bad[:5]} are outside the vocabulary of {vocab}")

    spans = score_windows(len(ids), window, stride)
    total, scored = 0.0, 0
    predictions: list[int] | None = [] if keep_predictions else None
    for begin, end, first in spans:
        h = _hidden_states(engine, ids[begin:end])  # (end - begin, D)
        # the hidden state at position p - 1 predicts the token at p
        targets = torch.tensor(ids[first:end], device=h.device)
        rows = h[first - 1 - begin:end - 1 - begin]
        with torch.inference_mode():
            for a in range(0, rows.shape[0], HEAD_CHUNK):
                logits = engine.runner.logits(rows[a:a + HEAD_CHUNK]).float()
                total += F.cross_entropy(logits, targets[a:a + HEAD_CHUNK], reduction="sum").item()
                if predictions is not None:
                    predictions += logits.argmax(-1).tolist()
        scored += end - first
    nll = total / scored
    return PerplexityResult(perplexity=math.exp(nll), nll=nll, tokens=scored, windows=len(spans),
                            predictions=predictions)


def _hidden_states(engine: LLMEngine, ids: list[int]) -> torch.Tensor:
    """Final hidden states (N, D) of ``ids`` as one sequence, prefilled on scratch KV blocks."""
    blocks = engine.blocks
    need = blocks.blocks_needed(len(ids))
    if need > blocks.num_free:
        raise RuntimeError(f"a {len(ids)}-token window needs {need} KV blocks; {blocks.num_free} are free "
                           "(running requests hold the rest): use a smaller window or wait")
    seq = Sequence("perplexity-scratch", ids, SamplingParams(max_tokens=1))
    # No prefix caching for the scratch sequence: a hit would skip positions whose hidden states are
    # needed, and blocks that no request owns should not be offered to requests as a cached prefix.
    caching = blocks.enable_prefix_caching
    blocks.enable_prefix_caching = False
    try:
        blocks.allocate(seq)
    finally:
        blocks.enable_prefix_caching = caching
    try:
        return engine.runner.hidden_states([seq])
    finally:
        blocks.release(seq)


def text_tokens(tokenizer, path: str | Path, max_tokens: int | None = None, seed: int = 0) -> list[int]:
    """Token ids of the text file ``path`` (no special tokens added): all of it when ``max_tokens`` is
    None (or the file is no longer), else a contiguous span of ``max_tokens`` tokens at a start drawn
    with ``random.Random(seed)``, so a sample is not always the file's first article.

    The whole file is tokenised and the span cut from its ids, so a span's tokens are exactly those of
    the full text (cutting the text first would re-tokenise its edges). WikiText's markup (`` @-@ ``,
    ``<unk>``) is scored as it stands: perplexities compare across runs on the same file only."""
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)
                                   or max_tokens < 2):
        raise ValueError(f"max_tokens must be None or an integer >= 2, got {max_tokens!r}")
    text = Path(path).read_text(encoding="utf-8")
    # verbose=False: a whole file is far past the tokenizer's model_max_length, which is what we want
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    if max_tokens is None or max_tokens >= len(ids):
        return list(ids)
    start = random.Random(seed).randrange(len(ids) - max_tokens + 1)
    return list(ids[start:start + max_tokens])
