"""Draft sources for speculative decoding, behind one interface (:class:`DraftSource`)."""

from __future__ import annotations

from collections.abc import Callable

from exitwise.engine.drafts.auto import AutoDraft
from exitwise.engine.drafts.base import NO_DRAFT, Draft, DraftFeedback, DraftSource, Payoff
from exitwise.engine.drafts.exit import ExitDraft
from exitwise.engine.drafts.lookup import LookupDraft
from exitwise.engine.sequence import Sequence

# the names EngineConfig.draft, `--draft` and a request's `draft` field take
DRAFT_SOURCES = ("auto", "lookup", "exit")


def make_draft_source(name: str, runner, plan, is_stop: Callable[[Sequence, int], bool]) -> DraftSource:
    """The source ``name`` over the engine's runner and exit plan (None: the engine has no criterion;
    ``auto`` then drafts from the context only)."""
    if name == "lookup":
        return LookupDraft()
    if name == "exit":
        return ExitDraft(runner, plan, is_stop)
    if name == "auto":
        return AutoDraft(LookupDraft(), ExitDraft(runner, plan, is_stop) if plan is not None else None)
    raise ValueError(f"draft source {name!r} is unknown; choose one of {', '.join(DRAFT_SOURCES)}")


__all__ = ["DRAFT_SOURCES", "NO_DRAFT", "AutoDraft", "Draft", "DraftFeedback", "DraftSource", "ExitDraft",
           "LookupDraft", "Payoff", "make_draft_source"]
