"""What a draft source is: the part of speculative decoding that proposes tokens.

:class:`~exitwise.engine.speculative.SpeculativeDecoder` owns verification, acceptance and rollback;
a source only says which tokens to try. One cycle asks the source for a :class:`Draft`: per sequence
a few proposed tokens, and where the verification pass starts (layer 0 from the embeddings, or a
deeper layer whose inputs the source already computed exactly, as an early-exit draft does).
A new source is one file: subclass :class:`DraftSource`, register it in :data:`DRAFT_SOURCES`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from exitwise.engine.sequence import Sequence

# a request's `draft` setting (SamplingParams.draft): None follows the engine, "none" never drafts
NO_DRAFT = "none"


@dataclass
class Draft:
    """One cycle's proposal for a batch of B sequences.

    ``tokens[b]``: the drafted tokens of sequence b (may be empty). The verification pass feeds
    ``fed[b]`` consecutive positions of b from its last committed token on: that token and the first
    ``fed[b] - 1`` drafts (``fed[b] == len(tokens[b]) + 1`` unless the source stopped before feeding
    its last draft). It runs layers ``start``..L-1 from ``inputs`` ((sum fed, D), sequence-major: the
    exact inputs to layer ``start`` the source computed), or from the fed tokens' embeddings when
    ``inputs`` is None (``start`` is then 0). A source that ran an ordinary full-depth step instead of
    drafting returns its ``logits`` (B, V) and no tokens.
    """

    tokens: list[list[int]]
    fed: list[int]
    start: int = 0
    inputs: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    source: str = ""
    layers_run: int = 0  # decoder layers the source ran per row while drafting (its cost)

    @classmethod
    def empty(cls, batch: int, source: str = "") -> Draft:
        """Nothing to propose: the decoder runs a plain decode step."""
        return cls([[] for _ in range(batch)], [1] * batch, source=source)

    @property
    def num_drafted(self) -> int:
        return sum(len(t) for t in self.tokens)


@dataclass
class DraftFeedback:
    """What verification made of one row's draft (``accepted`` <= ``drafted``) in a batch of ``batch``."""

    drafted: int
    accepted: int
    batch: int = 1


class DraftSource:
    """Proposes tokens for a batch; see :class:`Draft`.

    ``propose(seqs, limits, grow)``: at most ``limits[b]`` tokens for sequence b (0: none). A source
    that runs the model appends its drafts to ``seq.token_ids`` as it feeds them and calls
    ``grow(seqs)`` (False: no KV block is free, stop) before feeding a new position; the decoder
    restores the token ids afterwards. ``observe`` hears how each row's draft fared, so a source can
    stop drafting where it does not pay.
    """

    name = ""

    def propose(self, seqs: list[Sequence], limits: list[int],
                grow: Callable[[list[Sequence]], bool]) -> Draft:
        raise NotImplementedError

    def observe(self, seqs: list[Sequence], draft: Draft, feedback: list[DraftFeedback]) -> None:
        """Per-row outcome of ``draft`` (default: nothing to learn)."""

    def allows(self, seq: Sequence) -> bool:
        """Whether ``seq``'s own ``draft`` setting lets this source draft for it."""
        asked = seq.params.draft
        return asked is None or asked in ("auto", self.name)


@dataclass
class Payoff:
    """When drafting stops paying for a sequence, and when to try again.

    A decode step of B rows costs about ``1 + row_share * B`` units (the weights streamed once, plus
    arithmetic per row), so each row's token costs ``(1 + row_share * B) / B`` of them, and a drafted
    row adds ``row_share``: ``row_cost(B) = row_share * B / (1 + row_share * B)`` tokens' worth (0.25 at
    batch 1, 0.73 at batch 8 with the default). Each further drafted row of a sequence costs
    ``row_growth`` more than the one before (its attention reads the whole context again, and the
    kernel's row tiles fill unevenly), so k drafted rows cost ``rows_cost(B, k)``. A pass that verifies
    k drafts of a row, with an extra ``overhead_at(B)`` per row (dearer in a bigger batch), yields
    accepted + 1 tokens, so it gains ``accepted - overhead_at(B) - rows_cost(B, k)`` tokens over plain
    decoding. A source that runs the model to draft also pays ``draft_cost`` per drafted token and
    ``attempt_cost`` per cycle it tried, drafted or not (in decode steps: the share of a step's weights
    its draft steps stream; :class:`~exitwise.engine.drafts.adapter.AdapterDraft` sets them from its
    layers and readout). The running mean of that gain
    (decay ``decay`` per pass) going negative pauses the sequence's drafts for ``backoff`` cycles,
    doubled at each pause in a row (at most ``max_backoff``): a workload where drafts never pay drafts
    rarely. Deterministic (counts, not clocks), so a seeded
    sampled request draws the same tokens on every run. The defaults are measured costs of this
    engine's verification pass on a CPU (benchmarks/speculate.py reports them as ``verify_cost``).
    """

    # measured on SmolLM2 at int4, one thread, AVX2 (benchmarks/speculate.py's verify_cost.pass): a pass
    # over 1 + k positions costs 0.99 / 1.25 / 1.59 / 2.25 / 4.35 decode steps at k = 0 / 1 / 2 / 4 / 8,
    # close to 1.05 + 0.25 k + 0.06 k (k - 1) / 2 up to k = 6: the k-th drafted row costs 0.25 + 0.06 (k - 1)
    overhead: float = 0.05
    overhead_per_row: float = 0.02  # a batch's pass reads each row's context apart: more per row
    row_share: float = 1 / 3
    row_growth: float = 0.06
    draft_cost: float = 0.0
    attempt_cost: float = 0.0
    decay: float = 0.7
    backoff: int = 4
    max_backoff: int = 64
    key: str = "payoff"

    @classmethod
    def free(cls, **kw) -> Payoff:
        """Drafting at no cost: every token a source finds is proposed and nothing pauses (tests and
        benchmark baselines that must draft whatever the odds)."""
        return cls(overhead=0.0, overhead_per_row=0.0, row_share=0.0, row_growth=0.0, **kw)

    def overhead_at(self, batch: int) -> float:
        """A verification pass's extra cost over a decode step, in tokens per row, at ``batch`` rows."""
        return self.overhead + self.overhead_per_row * (batch - 1)

    def row_cost(self, batch: int, i: int = 1) -> float:
        """What a sequence's i-th drafted row costs, in tokens of a decode step of ``batch`` rows."""
        return self.row_share * batch / (1 + self.row_share * batch) + self.row_growth * (i - 1)

    def rows_cost(self, batch: int, k: int) -> float:
        """What k drafted rows of one sequence cost together."""
        return k * self.row_cost(batch) + self.row_growth * k * (k - 1) / 2

    def paused(self, seq: Sequence) -> bool:
        st = seq.draft_state.get(self.key)
        if st is None or st["pause"] <= 0:
            return False
        st["pause"] -= 1
        return True

    def update(self, seq: Sequence, fb: DraftFeedback) -> None:
        if fb.drafted == 0 and not self.attempt_cost:
            return
        st = seq.draft_state.setdefault(self.key, {"gain": 0.5, "pause": 0, "next_backoff": self.backoff})
        gain = fb.accepted - self.attempt_cost
        if fb.drafted:  # else the cycle's pass verified the row's one token: a decode step's work
            gain -= self.overhead_at(fb.batch) + self.rows_cost(fb.batch, fb.drafted) + self.draft_cost * fb.drafted
        st["gain"] = self.decay * st["gain"] + (1 - self.decay) * gain
        if st["gain"] < 0:
            st["pause"] = st["next_backoff"]
            st["next_backoff"] = min(2 * st["next_backoff"], self.max_backoff)
            st["gain"] = 0.0  # a fresh start after the pause
        elif gain > 0:
            st["next_backoff"] = self.backoff
