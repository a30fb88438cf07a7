"""Context drafts (prompt lookup decoding): the n-gram that ends the sequence is looked up earlier in
its prompt and output, and the tokens that followed it there are proposed. No model work at all.

The index is incremental and per sequence (``Sequence.draft_state``): for each n-gram length it maps
an n-gram to the end of its latest occurrence that has a continuation, and each cycle adds only the
positions committed since the last one, so a lookup costs O(max_ngram) dictionary operations per new
token however long the context is. The longest n-gram that matches wins (fewer false matches); the
latest occurrence wins among equals (nearby text repeats most, as in code). A continuation that runs
into the end of the context goes on with itself: a loop of period p repeats with period p.

How many of the found tokens to propose is decided per draft by :class:`MatchOdds`: how far back the
context agrees with the earlier occurrence (its *match length*) says how likely each token is to be
kept, and a token is proposed only while the chance that it and all before it are kept exceeds what
its verified row costs (:meth:`Payoff.row_cost`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from exitwise.engine.drafts.base import Draft, DraftFeedback, DraftSource, Payoff
from exitwise.engine.sequence import Sequence


@dataclass
class MatchOdds:
    """The chance that a lookup draft's i-th token is kept given the ones before it were, by match
    length m (how many tokens before the continuation agree with the context's end, capped at
    ``len(first)``): a prior, updated by each sequence's own outcomes.

    The prior was measured on the engine's greedy int4 output of SmolLM2-135M-Instruct (40 code and
    30 WikiText prompts from the valid splits, 96 tokens each; benchmarks/lookup_odds.py refits it,
    and its committed fit agrees within 0.02): the first token is kept 33% of the time after a 1-token
    match and 98% after 12 or more; later tokens ~85% (~96% after a long match).
    ``weight`` is the prior's worth in observations: a sequence whose drafts fail at some match
    length stops drafting there after a few tries, one whose drafts hold drafts longer.
    """

    first: tuple[float, ...] = (0.33, 0.51, 0.68, 0.71, 0.76, 0.89, 0.87, 0.88, 0.89, 0.91, 0.93, 0.976)
    later: float = 0.85
    later_long: float = 0.96
    weight: float = 4.0

    @property
    def cap(self) -> int:
        return len(self.first)

    def chance(self, seen: dict, m: int, i: int) -> float:
        """P(token i kept | tokens before it kept) at match length m, after this sequence's ``seen``."""
        prior = self.first[m - 1] if i == 0 else (self.later_long if m == self.cap else self.later)
        reached, kept = seen.get((m, i), (0, 0))
        return (prior * self.weight + kept) / (self.weight + reached)

    def length(self, seen: dict, m: int, limit: int, row_cost: Callable[[int], float]) -> tuple[int, float]:
        """(k, expected gain): propose tokens while the chance that all so far are kept exceeds what the
        i-th verified row costs (``row_cost(i)``, in tokens); the gain is the expected kept tokens less
        the rows' cost."""
        p, k, gain = 1.0, 0, 0.0
        for i in range(limit):
            p *= self.chance(seen, m, i)
            if p <= row_cost(i + 1):
                break
            k, gain = i + 1, gain + p - row_cost(i + 1)
        return k, gain
    @staticmethod
    def observe(seen: dict, m: int, drafted: int, accepted: int) -> None:
        """Count the positions the draft reached (each before its first rejection) and kept."""
        for i in range(min(drafted, accepted + 1)):
            reached, kept = seen.get((m, i), (0, 0))
            seen[(m, i)] = (reached + 1, kept + (i < accepted))


class LookupDraft(DraftSource):
    name = "lookup"

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1, payoff: Payoff | None = None,
                 odds: MatchOdds | None = None):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"lookup n-gram sizes need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.payoff = payoff or Payoff(key="payoff_lookup")  # the verification costs the odds are weighed against
        self.odds = odds or MatchOdds()

    def _state(self, seq: Sequence) -> dict:
        """The sequence's n-gram index, brought up to its committed tokens (all but drafts)."""
        st = seq.draft_state.get("lookup")
        if st is None:
            st = seq.draft_state["lookup"] = {"done": 0, "maps": [{} for _ in range(self.max_ngram + 1)],
                                              "seen": {}, "match": 0}
        ids, maps = seq.token_ids, st["maps"]
        # an n-gram ending at index e (inclusive) is indexed once e + 1 < len: it has a continuation
        for e in range(st["done"], len(ids) - 1):
            for n in range(self.min_ngram, self.max_ngram + 1):
                if e + 1 >= n:
                    maps[n][tuple(ids[e + 1 - n:e + 1])] = e
        st["done"] = max(st["done"], len(ids) - 1)
        return st

    def match(self, seq: Sequence) -> tuple[int, int]:
        """(e, m): the end of the latest earlier occurrence of the longest matching suffix n-gram and
        the match length there (capped at the odds' cap); (-1, 0) when nothing matches."""
        maps, ids = self._state(seq)["maps"], seq.token_ids
        for n in range(min(self.max_ngram, len(ids)), self.min_ngram - 1, -1):
            e = maps[n].get(tuple(ids[len(ids) - n:]))
            if e is not None:
                m = n
                while m < self.odds.cap and e - m >= 0 and ids[e - m] == ids[len(ids) - 1 - m]:
                    m += 1
                return e, m
        return -1, 0

    @staticmethod
    def follow(ids: list[int], e: int, n: int) -> list[int]:
        """The n tokens after index e; past the context's end the continuation continues itself."""
        out: list[int] = []
        for j in range(e + 1, e + 1 + n):
            out.append(ids[j] if j < len(ids) else out[j - len(ids)])
        return out

    def lookup(self, seq: Sequence, limit: int) -> list[int]:
        """Up to ``limit`` tokens that followed the match, whatever their odds (empty: no match)."""
        e, _ = self.match(seq)
        return self.follow(seq.token_ids, e, limit) if e >= 0 else []

    def propose(self, seqs: list[Sequence], limits: list[int],
                grow: Callable[[list[Sequence]], bool]) -> Draft:
        def cost(i: int) -> float:
            return self.payoff.row_cost(len(seqs), i)

        tokens, gain = [], 0.0
        for s, lim in zip(seqs, limits, strict=True):
            e, m = self.match(s) if lim > 0 and self.allows(s) else (-1, 0)
            k = 0
            if e >= 0:
                st = s.draft_state["lookup"]
                st["match"] = m
                k, g = self.odds.length(st["seen"], m, lim, cost)
                gain += g
            tokens.append(self.follow(s.token_ids, e, k))
        # every row of the batch pays the pass's overhead once one row drafts
        if not any(tokens) or gain <= self.payoff.overhead_at(len(seqs)) * len(seqs):
            return Draft.empty(len(seqs), self.name)
        return Draft(tokens, [len(t) + 1 for t in tokens], source=self.name)

    def observe(self, seqs: list[Sequence], draft: Draft, feedback: list[DraftFeedback]) -> None:
        for s, fb in zip(seqs, feedback, strict=True):
            if fb.drafted:
                st = s.draft_state["lookup"]
                self.odds.observe(st["seen"], st["match"], fb.drafted, fb.accepted)
