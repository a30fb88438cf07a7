"""Per-step exit decisions (Miao et al.; docs/papers.md, "The early-exit engine"), with one of two policies:

* batch (the paper's): the batch leaves at the first exit layer where every sequence is confident,
  else at the last layer; one request that may not exit keeps the whole batch at full depth;
* sequence (``exit_mode="sequence"``): each sequence leaves at its own first exit layer where it is
  confident; the runner compacts the batch and the plan its per-row state (thresholds, minimum
  layers, previous hidden state, and the criterion's own via its ``select_rows(rows)`` hook). A row's
  decision depends on that row only.

A criterion with a cheap prefilter (softmax response's vocabulary shortlist, the heads' gates) is
asked for its estimate first; its exact (expensive) check runs only on rows the estimate lets through
(batch policy: only when it lets every row through), and a row leaves only if the exact check agrees.
So a prefilter can only remove exits, never add one.
"""

from __future__ import annotations

import math

import torch

from exitwise.engine.config import ExitConfig
from exitwise.engine.kv_fill import KVFill
from exitwise.engine.sequence import Sequence
from exitwise.errors import ExitwiseError
from exitwise.exits.base import ExitCriterion, Readout


def default_exit_layers(num_layers: int, min_layer: int | None = None, every: int = 2) -> list[int]:
    """Every ``every``-th hidden-state index from ``min_layer`` (default L/2) up to L-1."""
    start = num_layers // 2 if min_layer is None else min_layer
    return list(range(max(1, start), num_layers, max(1, every)))


class ExitPlan:
    """Engine-wide criterion, exit layers and KV fill; thresholds and minimum depths per request."""

    def __init__(self, criterion: ExitCriterion, exit_layers: list[int], kv_fill: KVFill, num_layers: int,
                 threshold: float = ExitConfig.threshold, min_layer: int = ExitConfig.min_layer):
        if not isinstance(criterion, ExitCriterion):
            raise TypeError(f"an exit criterion must subclass exitwise.exits.base.ExitCriterion, got "
                            f"{type(criterion).__name__}")
        bad = [layer for layer in exit_layers if not 1 <= layer < num_layers]
        if bad:
            raise ValueError(f"exit_layers {bad} out of range 1..{num_layers - 1}")
        self.criterion = criterion
        self.exit_layers = sorted(set(exit_layers))
        self.is_exit = [False] * (num_layers + 1)  # list lookup: the per-layer check costs ~nothing
        for layer in self.exit_layers:
            self.is_exit[layer] = True
        self.kv_fill = kv_fill
        self.num_layers = num_layers
        self.threshold = threshold
        self.min_layer = min_layer
        # step state
        self._thresholds: torch.Tensor | None = None
        self._min_layer = num_layers
        self._mins: torch.Tensor | None = None  # minimum exit layer per remaining row
        self._prev: torch.Tensor | None = None
        self._active = False
        self._per_row = False  # the step's policy: sequence (True) or batch
        self._prefilter = False
        self._head_logits = None  # the model's head, for the criterion's Readout
        self.exact_checks = 0  # exact confidence evaluations (each may cost a full head)

    def check_params(self, params) -> None:
        """Reject, at add_request, per-request settings the criterion cannot honour (heads: an alpha
        they were not calibrated for; other criteria: any alpha)."""
        self.criterion.check_params(params)

    def _settings(self, seqs: list[Sequence]) -> tuple[list[float], list[int]]:
        """Each request's threshold and minimum exit layer (its own, else the engine's)."""
        thr = [self.threshold if s.params.exit_threshold is None else s.params.exit_threshold for s in seqs]
        mins = [self.min_layer if s.params.exit_min_layer is None else s.params.exit_min_layer for s in seqs]
        return thr, mins

    def begin(self, seqs: list[Sequence], head=None, per_sequence: bool = False) -> bool:
        """Start a decode step; False when no row can exit in it (the runner then runs full depth).

        Batch policy: the batch may only leave when every member is allowed to, so one request with
        an infinite threshold means no checks at all, and the minimum layer is the largest. Sequence
        policy: a request with an infinite threshold simply never leaves; the others still may.
        ``head``: the model's :class:`~exitwise.models.llama.OutputHead`, for criteria with a prefilter.
        """
        thr, mins = self._settings(seqs)
        finite = [math.isfinite(t) for t in thr]
        self._per_row = per_sequence
        self._active = any(finite) if per_sequence else all(finite)
        self._prev = None
        if not self._active:
            return False
        self._thresholds = torch.tensor(thr, dtype=torch.float32)
        self._mins = torch.tensor([m if f else self.num_layers + 1 for m, f in zip(mins, finite, strict=True)])
        self._min_layer = int(self._mins.min()) if per_sequence else max(mins)
        self._head_logits = None if head is None else head.logits
        self._prefilter = head is not None and self.criterion.has_prefilter
        if self._prefilter:
            if per_sequence:
                self.check_sequence_mode()
            self.criterion.begin(head, seqs)
        return True

    def observe(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        """The logits the engine sampled this step's tokens from (criteria may keep state per sequence)."""
        self.criterion.observe(seqs, logits)

    def check(self, layer: int, hidden: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None] | None:
        """Called after every layer with hidden (b, D) of the remaining rows at index ``layer``. None if
        no row leaves here, else (indices of the leaving rows, None = all of them; their logits (n, V)
        if the criterion computed them, else None: the runner reads them out from the hidden state)."""
        if not (self._active and self.is_exit[layer]):
            return None
        prev, self._prev = self._prev, hidden
        if layer < self._min_layer:
            return None
        if self._thresholds.device != hidden.device:
            self._thresholds, self._mins = self._thresholds.to(hidden.device), self._mins.to(hidden.device)
        may = self._mins <= layer  # (b,)
        if self._prefilter:
            may = may & (self.criterion.prefilter(hidden, layer) >= self._thresholds)
        if not bool(may.all() if not self._per_row else may.any()):
            return None  # batch policy: some row may not leave, so none does (no faithful check)
        if bool(may.all()):
            cand, h, p, thr = None, hidden, prev, self._thresholds
        else:
            cand = may.nonzero().squeeze(1)
            h, thr = hidden.index_select(0, cand), self._thresholds.index_select(0, cand)
            p = None if prev is None else prev.index_select(0, cand)
        readout = Readout(h, self._head_logits, rows=cand)
        self.exact_checks += 1
        ok = self.criterion.confidence(h, p, layer, readout) >= thr  # (c,)
        if not bool(ok.all() if not self._per_row else ok.any()):
            return None
        logits = readout.logits() if readout.computed else None
        if bool(ok.all()):
            return cand, logits
        sel = ok.nonzero().squeeze(1)
        return (sel if cand is None else cand.index_select(0, sel)), (None if logits is None else
                                                                     logits.index_select(0, sel))

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (indices into the current rows) of the per-row step state."""
        self._thresholds = self._thresholds.index_select(0, rows)
        self._mins = self._mins.index_select(0, rows)
        self._min_layer = int(self._mins.min()) if rows.numel() else self.num_layers + 1
        if self._prev is not None:
            self._prev = self._prev.index_select(0, rows)
        if self._prefilter:
            self.criterion.select_rows(rows)

    def check_sequence_mode(self) -> None:
        """Raise if the criterion keeps per-row step state it cannot compact (sequence mode needs it)."""
        if self.criterion.has_prefilter and not self.criterion.compacts_rows:
            raise ExitwiseError(f"exit criterion {self.criterion.name!r} keeps per-sequence prefilter state "
                                "without a select_rows(rows) hook, so exit_mode='sequence' cannot compact "
                                "the batch; use exit_mode='batch'")
