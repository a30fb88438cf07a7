"""The exit-criterion interface and the lazily computed readout it may use."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch


class Readout:
    """Logits of one hidden state, computed at most once.

    The full output head costs more than three SmolLM2 layers, so criteria that need logits ask for
    them here; when the batch then exits at this layer the engine samples from the same logits instead
    of computing the head again.
    """

    def __init__(self, hidden: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor],
                 rows: torch.Tensor | None = None):
        self.hidden = hidden  # (B, D)
        # Which of the step's current rows ``hidden`` holds (None: all of them, in order). Per-sequence
        # steps check only the rows their prefilter passed; criteria with per-row state index it here.
        self.rows = rows
        self._head = head
        self._logits: torch.Tensor | None = None

    @property
    def computed(self) -> bool:
        return self._logits is not None

    def provide(self, logits: torch.Tensor) -> None:
        """Use ``logits`` (B, V) as this layer's readout: a criterion with its own exit head (early-exit
        heads) makes the engine emit that head's prediction when the batch exits here."""
        self._logits = logits

    def logits(self) -> torch.Tensor:
        """(B, V) final norm + head of ``hidden``."""
        if self._logits is None:
            self._logits = self._head(self.hidden)
        return self._logits


@runtime_checkable
class ExitCriterion(Protocol):
    """Confidence that the token read out at ``layer`` is final. Higher is more confident."""

    name: str

    def confidence(self, hidden: torch.Tensor, prev_hidden: torch.Tensor | None, layer: int,
                   readout: Readout) -> torch.Tensor:
        """hidden (B, D) at hidden-state index ``layer``; prev_hidden (B, D) at the previous exit layer
        (None at the first); returns (B,) confidences compared with each request's threshold."""
        ...


# Optional hooks a criterion may add (see exitwise.exits.softmax_response and .heads):
#   has_prefilter: bool                    -- True enables the three below
#   begin(runner, seqs)                    -- once per decode step, before the first exit layer
#   prefilter(runner, hidden, layer) -> (B,) -- cheap estimate at each exit layer; the exact
#                                             ``confidence`` runs only when the whole batch passes it
#   observe(seqs, logits)                  -- after every step, the logits the tokens came from
#   select_rows(rows)                      -- keep only these rows of the step state (needed with a
#                                             prefilter for the engine's exit_mode="sequence")
#   check_params(params)                   -- at add_request: raise ValueError for settings it
#                                             cannot honour (e.g. an uncalibrated exit_alpha)


# name -> "module:Class"; imported on demand so unused criteria cost nothing.
CRITERIA: dict[str, str] = {
    "softmax": "exitwise.exits.softmax_response:SoftmaxResponse",
    "hidden_similarity": "exitwise.exits.hidden_similarity:HiddenSimilarity",
    "classifier": "exitwise.exits.classifier:ExitClassifier",
    "heads": "exitwise.exits.heads:HeadsCriterion",
}


def make_criterion(name: str, **kwargs) -> ExitCriterion:
    """Build a criterion by name (``classifier`` needs ``path=`` and ``backbone=``; ``heads`` also ``alpha=``)."""
    if name not in CRITERIA:
        raise ValueError(f"exit criterion {name!r} is unknown; choose one of {sorted(CRITERIA)}")
    module, cls = CRITERIA[name].split(":")
    factory = getattr(importlib.import_module(module), cls)
    return factory.load(**kwargs) if hasattr(factory, "load") else factory(**kwargs)
