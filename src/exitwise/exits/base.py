"""The exit-criterion interface and the lazily computed readout it may use."""

from __future__ import annotations

import importlib
from collections.abc import Callable

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


class ExitCriterion:
    """Confidence that the token read out at ``layer`` is final. Higher is more confident.

    A criterion overrides :meth:`confidence`, and the hooks it needs; the defaults do nothing.
    """

    name: str = "criterion"
    #: True when :meth:`prefilter` gives a cheap estimate; the exact ``confidence`` then runs only on
    #: rows whose estimate passes (a prefilter can only remove exits)
    has_prefilter: bool = False

    def confidence(self, hidden: torch.Tensor, prev_hidden: torch.Tensor | None, layer: int,
                   readout: Readout) -> torch.Tensor:
        """hidden (B, D) at hidden-state index ``layer``; prev_hidden (B, D) at the previous exit layer
        (None at the first); returns (B,) confidences compared with each request's threshold."""
        raise NotImplementedError

    def use_weight_dtype(self, dtype: str, rescore: int = 0) -> None:
        """The engine's weight dtype: a criterion with its own large matmuls (exit heads) runs them in it
        too, so that an exit check costs the same bytes per row as a layer."""

    def begin(self, head, seqs) -> None:
        """Once per decode step, before the first exit layer; ``head`` is the model's
        :class:`~exitwise.models.llama.OutputHead` (final norm and output head)."""

    def prefilter(self, hidden: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        """(B,) cheap estimate of ``confidence`` at an exit layer (only with ``has_prefilter``)."""
        raise NotImplementedError(f"{self.name} has no prefilter")

    def observe(self, seqs, logits: torch.Tensor) -> None:
        """After every step: the logits the tokens were sampled from."""

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` of this step's per-row state. The engine's exit_mode="sequence" compacts
        the batch, so a criterion with a prefilter (per-row step state) must override this."""

    @property
    def compacts_rows(self) -> bool:
        """Whether exit_mode="sequence" may compact this criterion's step state."""
        return not self.has_prefilter or type(self).select_rows is not ExitCriterion.select_rows

    def check_params(self, params) -> None:
        """At add_request: raise ValueError for settings this criterion cannot honour."""
        if getattr(params, "exit_alpha", None) is not None:
            raise ValueError(f"exit_alpha applies to the heads exit criterion, not {self.name!r}")


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
