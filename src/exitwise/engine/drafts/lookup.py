"""Context drafts (prompt lookup decoding): the n-gram that ends the sequence is looked up earlier in
its prompt and output, and the tokens that followed it there are proposed. No model work at all.

The index is incremental and per sequence (``Sequence.draft_state``): for each n-gram length it maps
an n-gram to the end of its latest occurrence that has a continuation, and each cycle adds only the
positions committed since the last one, so a lookup costs O(max_ngram) dictionary operations per new
token however long the context is. The longest n-gram that matches wins (fewer false matches); the
latest occurrence wins among equals (nearby text repeats most, as in code).
"""

from __future__ import annotations

from collections.abc import Callable

from exitwise.engine.drafts.base import Draft, DraftFeedback, DraftSource, Payoff
from exitwise.engine.sequence import Sequence


class LookupDraft(DraftSource):
    name = "lookup"

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1, payoff: Payoff | None = None):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"lookup n-gram sizes need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.payoff = payoff or Payoff(key="payoff_lookup")

    def _index(self, seq: Sequence) -> dict:
        """The sequence's n-gram index, brought up to its committed tokens (all but drafts)."""
        st = seq.draft_state.get("lookup")
        if st is None:
            st = seq.draft_state["lookup"] = {"done": 0, "maps": [{} for _ in range(self.max_ngram + 1)]}
        ids, maps = seq.token_ids, st["maps"]
        # an n-gram ending at index e (inclusive) is indexed once e + 1 < len: it has a continuation
        for e in range(st["done"], len(ids) - 1):
            for n in range(self.min_ngram, self.max_ngram + 1):
                if e + 1 >= n:
                    maps[n][tuple(ids[e + 1 - n:e + 1])] = e
        st["done"] = max(st["done"], len(ids) - 1)
        return maps

    def lookup(self, seq: Sequence, limit: int) -> list[int]:
        """Up to ``limit`` tokens that followed the latest earlier occurrence of the longest matching
        suffix n-gram of ``seq`` (empty: no match)."""
        if limit <= 0:
            return []
        maps, ids = self._index(seq), seq.token_ids
        for n in range(min(self.max_ngram, len(ids)), self.min_ngram - 1, -1):
            e = maps[n].get(tuple(ids[len(ids) - n:]))
            if e is not None:
                return ids[e + 1:e + 1 + limit]
        return []

    def propose(self, seqs: list[Sequence], limits: list[int],
                grow: Callable[[list[Sequence]], bool]) -> Draft:
        tokens = [self.lookup(s, lim) if lim > 0 and self.allows(s) and not self.payoff.paused(s) else []
                  for s, lim in zip(seqs, limits, strict=True)]
        if any(tokens) and not self.payoff.batch_pays(seqs, tokens):
            return Draft.empty(len(seqs), self.name)
        return Draft(tokens, [len(t) + 1 for t in tokens], source=self.name)

    def observe(self, seqs: list[Sequence], draft: Draft, feedback: list[DraftFeedback]) -> None:
        for s, fb in zip(seqs, feedback, strict=True):
            self.payoff.update(s, fb)
