"""The default draft source: per cycle, a context (lookup) draft for the rows whose context has a
match; else, when the engine has a draft adapter, an adapter draft for the batch; else, when it has
an exit criterion, an early-exit draft for the batch; else none (a plain decode step). Each part
pauses the sequences whose drafts stop paying (:class:`Payoff`), so speculation
on a workload where nothing matches costs about what plain decoding costs."""

from __future__ import annotations

from collections.abc import Callable

from exitwise.engine.drafts.adapter import AdapterDraft
from exitwise.engine.drafts.base import Draft, DraftFeedback, DraftSource
from exitwise.engine.drafts.exit import ExitDraft
from exitwise.engine.drafts.lookup import LookupDraft
from exitwise.engine.sequence import Sequence


class AutoDraft(DraftSource):
    name = "auto"

    def __init__(self, lookup: LookupDraft, exit: ExitDraft | None = None, adapter: AdapterDraft | None = None):
        self.lookup, self.exit, self.adapter = lookup, exit, adapter

    def propose(self, seqs: list[Sequence], limits: list[int],
                grow: Callable[[list[Sequence]], bool]) -> Draft:
        draft = self.lookup.propose(seqs, limits, grow)
        if draft.num_drafted:
            return draft
        if self.adapter is not None:
            return self.adapter.propose(seqs, limits, grow)
        if self.exit is not None:
            return self.exit.propose(seqs, limits, grow)
        return draft

    def observe(self, seqs: list[Sequence], draft: Draft, feedback: list[DraftFeedback]) -> None:
        for source in (self.lookup, self.adapter, self.exit):
            if source is not None and draft.source == source.name:
                source.observe(seqs, draft, feedback)
