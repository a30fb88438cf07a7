"""The default draft source: per cycle, a context (lookup) draft for the rows whose context has a
match; else, when the engine has a draft adapter, an adapter draft for the batch; else, when it has
an exit criterion, an early-exit draft for the batch; else none (a plain decode step). Each part
pauses the sequences whose drafts stop paying (:class:`Payoff`), so speculation
on a workload where nothing matches costs about what plain decoding costs."""

from __future__ import annotations

from collections.abc import Callable

from exitwise.engine.drafts.adapter import AdapterDraft
from exitwise.engine.drafts.base import Draft, DraftFeedback, DraftSource, Payoff
from exitwise.engine.drafts.exit import ExitDraft
from exitwise.engine.drafts.lookup import LookupDraft
from exitwise.engine.sequence import Sequence


class AutoDraft(DraftSource):
    name = "auto"

    def __init__(self, lookup: LookupDraft, exit: ExitDraft | None = None, adapter: AdapterDraft | None = None):
        self.lookup, self.exit, self.adapter = lookup, exit, adapter
        self.exit_payoff = Payoff(key="payoff_exit")
        self.adapter_payoff = Payoff(key="payoff_adapter")

    def propose(self, seqs: list[Sequence], limits: list[int],
                grow: Callable[[list[Sequence]], bool]) -> Draft:
        draft = self.lookup.propose(seqs, limits, grow)
        if draft.num_drafted:
            return draft
        if self.adapter is not None:  # the batch drafts together: every row must want it
            if any(self.adapter_payoff.paused(s) for s in seqs):
                return Draft.empty(len(seqs), self.name)
            return self.adapter.propose(seqs, limits, grow)
        if self.exit is None:
            return draft
        # the exit draft runs the batch together: every row must want it
        if any(self.exit_payoff.paused(s) for s in seqs):
            return Draft.empty(len(seqs), self.name)
        return self.exit.propose(seqs, limits, grow)

    def observe(self, seqs: list[Sequence], draft: Draft, feedback: list[DraftFeedback]) -> None:
        if draft.source == self.lookup.name:
            self.lookup.observe(seqs, draft, feedback)
        elif draft.source == "exit":
            for s, fb in zip(seqs, feedback, strict=True):
                self.exit_payoff.update(s, fb)
        elif draft.source == "adapter":
            for s, fb in zip(seqs, feedback, strict=True):
                # a row the adapter drafted nothing for still paid its shallow step and readout: a loss,
                # counted as one rejected draft (else a model whose adapter is never sure never pauses)
                self.adapter_payoff.update(s, fb if fb.drafted else DraftFeedback(1, 0, fb.batch))
