"""Per-step exit decisions (Miao et al. §3.2): the batch leaves at the first exit layer where every
sequence is confident, else at the last layer.

A criterion with a cheap prefilter (softmax response's vocabulary shortlist, the heads' gates) is asked for its estimate
first; its exact (expensive) check runs only when the estimate says the whole batch may exit, and the
batch exits only if the exact check agrees. So a prefilter can only remove exits, never add one.

Per-sequence mode (``begin_rows`` / ``check_rows`` / ``select_rows``, used by
:meth:`~exitwise.engine.runner.ModelRunner.decode_per_sequence`): each sequence leaves at its own first
exit layer where it is confident (prefilter, then faithful check, both per row); the runner compacts
the batch and the plan its per-row state (thresholds, minimum layers, previous hidden state, and the
criterion's own via its ``select_rows(rows)`` hook). A row's decision depends on that row only."""

from __future__ import annotations

import math

import torch

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
                 threshold: float = 0.9, min_layer: int = 1):
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
        self._mins: torch.Tensor | None = None  # per-sequence mode: minimum exit layer per remaining row
        self._prev: torch.Tensor | None = None
        self._active = False
        self._prefilter = False
        self.exact_checks = 0  # batch-level exact confidence evaluations (each may cost a full head)

    def check_params(self, params) -> None:
        """Reject, at add_request, per-request settings the criterion cannot honour (heads: an alpha
        they were not calibrated for; other criteria: any alpha)."""
        check = getattr(self.criterion, "check_params", None)
        if check is not None:
            check(params)
        elif getattr(params, "exit_alpha", None) is not None:
            raise ValueError(f"exit_alpha applies to the heads exit criterion, not {self.criterion.name!r}")

    def _settings(self, seqs: list[Sequence]) -> tuple[list[float], list[int]]:
        """Each request's threshold and minimum exit layer (its own, else the engine's)."""
        thr = [self.threshold if s.params.exit_threshold is None else s.params.exit_threshold for s in seqs]
        mins = [self.min_layer if s.params.exit_min_layer is None else s.params.exit_min_layer for s in seqs]
        return thr, mins

    def begin(self, seqs: list[Sequence], runner=None) -> None:
        thr, mins = self._settings(seqs)
        # One request that may not exit keeps the whole batch at full depth: skip all checks then.
        self._active = all(math.isfinite(t) for t in thr)
        self._min_layer = max(mins)  # the batch may only leave when every member is allowed to
        self._thresholds = torch.tensor(thr, dtype=torch.float32) if self._active else None
        self._prev = None
        self._prefilter = runner is not None and self._active and getattr(self.criterion, "has_prefilter", False)
        if self._prefilter:
            self.criterion.begin(runner, seqs)

    def observe(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        """The logits the engine sampled this step's tokens from (criteria may keep state per sequence)."""
        obs = getattr(self.criterion, "observe", None)
        if obs is not None:
            obs(seqs, logits)

    def check(self, runner, layer: int, hidden: torch.Tensor) -> Readout | None:
        """Called after every layer with hidden (B, D) at index ``layer``; a Readout means exit here."""
        if not (self._active and self.is_exit[layer]):
            return None
        prev, self._prev = self._prev, hidden
        if layer < self._min_layer:
            return None
        if self._thresholds.device != hidden.device:
            self._thresholds = self._thresholds.to(hidden.device)
        if self._prefilter and not bool((self.criterion.prefilter(runner, hidden, layer) >= self._thresholds).all()):
            return None  # cheap estimate says some sequence is not confident: skip the faithful check
        readout = Readout(hidden, runner.logits)
        self.exact_checks += 1
        conf = self.criterion.confidence(hidden, prev, layer, readout)  # (B,)
        return readout if bool((conf >= self._thresholds).all()) else None

    # ---------------------------------------------------------------------------- per sequence
    def check_sequence_mode(self) -> None:
        """Raise if the criterion keeps per-row step state it cannot compact (sequence mode needs it)."""
        if getattr(self.criterion, "has_prefilter", False) and not hasattr(self.criterion, "select_rows"):
            raise ExitwiseError(f"exit criterion {self.criterion.name!r} keeps per-sequence prefilter state "
                                "without a select_rows(rows) hook, so exit_mode='sequence' cannot compact "
                                "the batch; use exit_mode='batch'")

    def begin_rows(self, seqs: list[Sequence], runner=None) -> None:
        """Start a per-sequence step: per-row thresholds and minimum layers (a request with an infinite
        threshold simply never leaves; the others still may)."""
        thr, mins = self._settings(seqs)
        self._active = any(math.isfinite(t) for t in thr)
        self._thresholds = torch.tensor(thr, dtype=torch.float32)
        self._mins = torch.tensor([m if math.isfinite(t) else self.num_layers + 1 for t, m in zip(thr, mins,
                                                                                                  strict=True)])
        self._min_layer = int(self._mins.min())
        self._prev = None
        self._prefilter = runner is not None and self._active and getattr(self.criterion, "has_prefilter", False)
        if self._prefilter:
            self.check_sequence_mode()
            self.criterion.begin(runner, seqs)

    def check_rows(self, runner, layer: int, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """Per-sequence check after the layer giving hidden (b, D) of the remaining rows; None if no row
        leaves here, else (indices of the leaving rows, their logits (n, V) if the criterion computed
        them, else None: the runner reads them out from the hidden state)."""
        if not (self._active and self.is_exit[layer]):
            return None
        prev, self._prev = self._prev, hidden
        if layer < self._min_layer:
            return None
        if self._thresholds.device != hidden.device:
            self._thresholds, self._mins = self._thresholds.to(hidden.device), self._mins.to(hidden.device)
        may = self._mins <= layer
        if self._prefilter:
            may = may & (self.criterion.prefilter(runner, hidden, layer) >= self._thresholds)
        if not bool(may.any()):
            return None
        if bool(may.all()):
            cand, h, p, thr = None, hidden, prev, self._thresholds
        else:
            cand = may.nonzero().squeeze(1)
            h, thr = hidden.index_select(0, cand), self._thresholds.index_select(0, cand)
            p = None if prev is None else prev.index_select(0, cand)
        readout = Readout(h, runner.logits, rows=cand)
        ok = self.criterion.confidence(h, p, layer, readout) >= thr  # (c,)
        if not bool(ok.any()):
            return None
        logits = readout.logits() if readout.computed else None
        if not bool(ok.all()):
            sel = ok.nonzero().squeeze(1)
            logits = None if logits is None else logits.index_select(0, sel)
            leave = sel if cand is None else cand.index_select(0, sel)
        else:
            leave = torch.arange(hidden.shape[0], device=hidden.device) if cand is None else cand
        return leave, logits

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (indices into the current rows) of the per-row step state."""
        self._thresholds = self._thresholds.index_select(0, rows)
        self._mins = self._mins.index_select(0, rows)
        self._min_layer = int(self._mins.min()) if rows.numel() else self.num_layers + 1
        if self._prev is not None:
            self._prev = self._prev.index_select(0, rows)
        if self._prefilter:
            self.criterion.select_rows(rows)
