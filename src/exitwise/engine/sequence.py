"""One request as the engine sees it: token ids, status, block table, per-token exit layers."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import Any

from exitwise.engine.sampling import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"    # queued, or pre-empted and waiting to be recomputed
    RUNNING = "running"    # has blocks and takes part in decode steps
    FINISHED = "finished"  # stopped (length, EOS, stop string) or aborted; owns no blocks


@dataclass
class Sequence:
    """Mutable per-request state. ``token_ids`` holds prompt + generated tokens."""

    request_id: str
    token_ids: list[int]
    params: SamplingParams
    num_prompt_tokens: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    # Tokens at the front whose K/V was found in the prefix cache (skipped by prefill).
    num_cached_tokens: int = 0
    # Number of tokens whose K/V is in the cache (all layers). Prefill sets it to len(token_ids);
    # each decode step adds one (the token fed in that step).
    num_computed_tokens: int = 0
    # Hidden-state index each generated token was read out at (L = full depth).
    exit_layers: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "length" | "stop" | "abort"
    stop_text: str | None = None  # the stop string that finished it, if any
    arrival: int = 0  # order of arrival (FCFS among waiting)
    num_preemptions: int = 0
    # Incremental detokenisation state (see LLMEngine._advance).
    text: str = ""
    emitted_text_len: int = 0
    emitted_tokens: int = 0
    metrics: dict = field(default_factory=dict)  # perf_counter stamps: arrival, first_token, ...
    # What an exit criterion keeps per sequence across steps, by the criterion's key (e.g. the
    # shortlist's previous top tokens); survives pre-emption, dropped with the sequence.
    criterion_state: dict[str, Any] = field(default_factory=dict)
    # What a draft source keeps per sequence (the lookup index, pay-off counters); same lifetime.
    draft_state: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.num_prompt_tokens:
            self.num_prompt_tokens = len(self.token_ids)

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def completion_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_completion_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def last_token(self) -> int:
        return self.token_ids[-1]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED


_counter = itertools.count()


def next_arrival() -> int:
    """Monotone arrival stamp (ordering only; no state depends on its absolute value)."""
    return next(_counter)
