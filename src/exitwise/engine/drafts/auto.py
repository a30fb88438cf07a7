"""The default draft source: per cycle, a context (lookup) draft for the rows whose context has a
match; else, when the engine has an exit criterion, an early-exit draft for the batch; else none (a
plain decode step). Each part pauses the sequences whose drafts stop paying (:class:`Payoff`), so
speculation on a workload where nothing matches costs about what plain decoding costs."""

from __future__ import annotations

from collections.abc import Callable

from exitwise.engine.drafts.base import Draft, DraftFeedback, DraftSource, Payoff
from exitwise.engine.drafts.exit import ExitDraft
from exitwise.engine.drafts.lookup import LookupDraft
from exitwise.engine.sequence import Sequence


class AutoDraft(DraftSource):
    name = "auto"

    def __init__(self, lookup: LookupDraft, exit: ExitDraft | None = None):
        self.lookup, self.exit = lookup, exit
        self.exit_payoff = Payoff(key="payoff_exit")

    def propose(self, seqs: list[Sequence], limits: list[int],
                grow: Callable[[list[Sequence]], bool]) -> Draft:
        draft = self.lookup.propose(seqs, limits, grow)
        if draft.num_drafted or self.exit is None:
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
