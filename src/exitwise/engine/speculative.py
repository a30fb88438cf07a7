"""Speculative decoding: a draft source proposes tokens, one full-depth pass verifies them all, and
every emitted token is the full model's -- bit for bit under greedy decoding, and in distribution
under sampling.

One *cycle* replaces a decode step for the batch:

1. **Draft.** The engine's :class:`~exitwise.engine.drafts.DraftSource` proposes up to ``max_draft``
   tokens per sequence (context n-grams, early-exit steps, ...) -- see ``engine/drafts/``.
2. **Verify.** One multi-token pass runs each sequence's fed positions (its last committed token and
   its drafts) through the layers the draft did not already run exactly, writing their K/V. Rows may
   feed different numbers of positions; a batch where nothing was drafted takes a plain decode step.
3. **Accept.** Greedy rows keep the longest prefix of drafts equal to the full model's argmax, plus
   the full model's token after it (the correction, or a bonus when every draft matched). Sampled
   rows use the speculative-sampling rule with a deterministic draft (q one-hot at the drafted token):
   draft d at a position where the model's distribution (after temperature, top-k, top-p) is p is
   kept with probability p(d); on rejection the token is drawn from p with d removed, renormalised;
   after a fully accepted draft a bonus token is drawn from the next p. The emitted tokens then follow
   the model's distribution exactly (Leviathan et al. 2023, Chen et al. 2023); a seeded request is
   reproducible run to run, though not the same draws as without speculation.
   Rejected positions are rolled back: token ids truncated, surplus blocks returned; their stale K/V
   sits beyond the sequence length, is never attended to and is overwritten when the position is fed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from exitwise.engine.drafts import Draft, DraftFeedback, DraftSource
from exitwise.engine.kv_cache import BlockManager
from exitwise.engine.sampling import Sampler
from exitwise.engine.sequence import Sequence


@dataclass
class SourceStats:
    passes: int = 0  # verification passes of this source's drafts
    drafted: int = 0  # draft tokens proposed, summed over sequences
    accepted: int = 0  # draft tokens the full model kept
    tokens: int = 0  # tokens emitted by those passes (accepted + corrections + bonus)
    rows: int = 0  # sequence rows in those passes

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else float("nan")

    @property
    def tokens_per_pass(self) -> float:
        """Tokens emitted per sequence per verification pass (1.0: the pass gained nothing)."""
        return self.tokens / self.rows if self.rows else float("nan")

    def as_dict(self) -> dict:
        return {**{k: getattr(self, k) for k in self.__dataclass_fields__}, "acceptance": self.acceptance,
                "tokens_per_pass": self.tokens_per_pass}


@dataclass
class SpecStats:
    cycles: int = 0  # draft-verify cycles (each replaces >= 1 decode step)
    verify_passes: int = 0  # cycles that needed a verification pass
    plain_steps: int = 0  # cycles with nothing to verify (no draft, or the source's own full-depth step)
    drafted: int = 0  # draft tokens proposed, summed over sequences
    accepted: int = 0  # draft tokens the full model agreed with
    tokens: int = 0  # tokens emitted by cycles (accepted + corrections + bonus + exact)
    rows_verified: int = 0  # sequence rows in verification passes (tokens / rows_verified: per pass)
    draft_layers: int = 0  # decoder layers run while drafting (per batch row)
    verify_layers: int = 0  # decoder layers run by verification passes (per batch row, once per pass)
    sources: dict[str, SourceStats] = field(default_factory=dict)

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else float("nan")

    @property
    def wasted(self) -> int:
        """Draft tokens computed and thrown away."""
        return self.drafted - self.accepted

    def source(self, name: str) -> SourceStats:
        return self.sources.setdefault(name, SourceStats())

    def as_dict(self) -> dict:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "sources"}
        out.update(acceptance=self.acceptance, wasted=self.wasted,
                   sources={k: v.as_dict() for k, v in self.sources.items()})
        return out


class SpeculativeDecoder:
    def __init__(self, runner, source: DraftSource, blocks: BlockManager, sampler: Sampler, plan=None,
                 max_draft: int = 6):
        self.runner = runner  # max_draft >= 1 is checked where it is configured (EngineConfig)
        self.plan = plan  # the engine's exit plan, if any: its criterion observes the verified logits
        self.source = source
        self.blocks = blocks
        self.sampler = sampler
        self.max_draft = max_draft
        self.stats = SpecStats()

    def _grow(self, seqs: list[Sequence]) -> bool:
        """A slot for each sequence's next fed position, all or none (drafting never pre-empts)."""
        bs = self.blocks.block_size
        need = sum(len(s) > len(s.block_table) * bs for s in seqs)
        if need > self.blocks.num_free:
            return False
        for s in seqs:
            self.blocks.append_slot(s)
        return True

    def _reserve(self, seqs: list[Sequence], draft: Draft) -> None:
        """Slots for every fed position of a draft whose source did not allocate them; a row whose
        positions find no free block loses its draft (its committed position has a slot already)."""
        for b, s in enumerate(seqs):
            if not self.blocks.grow_to(s, len(s) - 1 + draft.fed[b]):
                draft.tokens[b], draft.fed[b] = [], 1

    def step(self, seqs: list[Sequence], budgets: list[int]) -> list[list[int]]:
        """One cycle; returns the new tokens of each sequence (at least one each).

        ``budgets[b]``: the most tokens sequence b may still emit (its drafts are capped one below).
        On return every sequence's token ids
        are as on entry (the caller appends the returned tokens) and its blocks cover exactly the
        positions up to its new last token.
        """
        base = [len(s) for s in seqs]  # each sequence feeds position base - 1 first
        limits = [max(0, min(self.max_draft, b - 1)) for b in budgets]
        self.stats.cycles += 1
        try:
            draft = self.source.propose(seqs, limits, self._grow)
            self.stats.draft_layers += draft.layers_run
            for s, n in zip(seqs, base, strict=True):
                del s.token_ids[n:]
            if draft.logits is not None:  # the source ran a plain full-depth step
                self.stats.plain_steps += 1
                return self._plain(seqs, draft.logits)
            if not draft.num_drafted and draft.inputs is None:
                self.stats.plain_steps += 1
                logits, _ = self.runner.decode(seqs)
                if self.plan is not None:
                    self.plan.observe(seqs, logits)
                return self._plain(seqs, logits)
            if draft.inputs is None:
                self._reserve(seqs, draft)
            return self._verify(seqs, base, draft)
        finally:
            for s, n in zip(seqs, base, strict=True):
                del s.token_ids[n:]

    def _plain(self, seqs: list[Sequence], logits: torch.Tensor) -> list[list[int]]:
        tokens = self.sampler(logits, [s.request_id for s in seqs], [s.params for s in seqs])
        bad = next((t for t in tokens if isinstance(t, Exception)), None)
        if bad is not None:
            raise bad  # the engine re-runs the batch request by request, isolating the failure
        self.stats.tokens += len(seqs)
        return [[t] for t in tokens]

    def _verify(self, seqs: list[Sequence], base: list[int], draft: Draft) -> list[list[int]]:
        runner = self.runner
        spans = [(p - 1, p - 1 + n) for p, n in zip(base, draft.fed, strict=True)]
        x = draft.inputs
        if x is None:
            x = runner.model.embed_tokens([t for s, toks, n in zip(seqs, draft.tokens, draft.fed, strict=True)
                                           for t in ([s.last_token] + toks)[:n]])  # (sum fed, D)
        logits = runner.verify(seqs, x, draft.start, spans)  # (sum fed, V)
        self.stats.verify_passes += 1
        self.stats.rows_verified += len(seqs)
        self.stats.verify_layers += runner.num_layers - draft.start
        out, feedback, last = [], [], []
        offset = 0
        for s, toks, n in zip(seqs, draft.tokens, draft.fed, strict=True):
            new, a = self.sampler.accept(logits[offset:offset + n], toks, s.request_id, s.params)
            out.append(new)
            feedback.append(DraftFeedback(len(toks), a, len(seqs)))
            last.append(offset + min(a, n - 1))
            offset += n
        st = self.stats.source(draft.source)
        st.passes += 1
        for fb, new in zip(feedback, out, strict=True):
            self.stats.drafted += fb.drafted
            self.stats.accepted += fb.accepted
            self.stats.tokens += len(new)
            st.drafted += fb.drafted
            st.accepted += fb.accepted
            st.tokens += len(new)
        st.rows += len(seqs)
        for s, p, new in zip(seqs, base, out, strict=True):
            self.blocks.truncate(s, p + len(new) - 1)  # K/V is valid for every token but the last
        self.source.observe(seqs, draft, feedback)
        if self.plan is not None:
            self.plan.observe(seqs, logits[torch.tensor(last, device=logits.device)])
        return out
