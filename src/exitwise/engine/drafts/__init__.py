"""Draft sources for speculative decoding, behind one interface (:class:`DraftSource`)."""

from __future__ import annotations

from collections.abc import Callable

from exitwise.engine.drafts.adapter import AdapterDraft
from exitwise.engine.drafts.auto import AutoDraft
from exitwise.engine.drafts.base import NO_DRAFT, Draft, DraftFeedback, DraftSource, Payoff
from exitwise.engine.drafts.exit import ExitDraft
from exitwise.engine.drafts.lookup import LookupDraft
from exitwise.engine.drafts.readout import make_readout
from exitwise.engine.sequence import Sequence

# the names EngineConfig.draft, `--draft` and a request's `draft` field take
DRAFT_SOURCES = ("auto", "lookup", "exit", "adapter")


def make_draft_source(name: str, runner, plan, is_stop: Callable[[Sequence, int], bool], adapter=None,
                      adapter_threshold: float = 0.6, draft_vocab: int = 0) -> DraftSource:
    """The source ``name`` over the engine's runner and exit plan (None: the engine has no criterion)
    and draft adapter (:class:`~exitwise.heads.adapter.Adapter`, None: none). ``auto`` drafts from the
    context, else with the adapter if there is one, else with the exit criterion if there is one.
    ``draft_vocab``: adapter drafts read the ids below it plus the context's (0: the whole head)."""
    if name == "lookup":
        return LookupDraft()
    if name == "exit":
        return ExitDraft(runner, plan, is_stop)
    if name == "adapter":
        if adapter is None:
            raise ValueError("adapter drafts need a trained adapter: pass draft_adapter=PATH (--adapter PATH)")
        return AdapterDraft(runner, adapter, adapter_threshold, is_stop,
                            readout=make_readout(runner, draft_vocab))
    if name == "auto":
        return AutoDraft(LookupDraft(), ExitDraft(runner, plan, is_stop) if plan is not None else None,
                         AdapterDraft(runner, adapter, adapter_threshold, is_stop,
                                         readout=make_readout(runner, draft_vocab)) if adapter is not None else None)
    raise ValueError(f"draft source {name!r} is unknown; choose one of {', '.join(DRAFT_SOURCES)}")


__all__ = ["DRAFT_SOURCES", "NO_DRAFT", "AdapterDraft", "AutoDraft", "Draft", "DraftFeedback", "DraftSource",
           "ExitDraft", "LookupDraft", "Payoff", "make_draft_source"]
