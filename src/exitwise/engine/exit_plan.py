"""Per-step exit decisions (Miao et al. §3.2): the batch leaves at the first exit layer where every
sequence is confident, else at the last layer.

A criterion with a cheap prefilter (softmax response's vocabulary shortlist, the heads' gates) is asked for its estimate
first; its exact (expensive) check runs only when the estimate says the whole batch may exit, and the
batch exits only if the exact check agrees. So a prefilter can only remove exits, never add one."""

from __future__ import annotations

import math

import torch

from exitwise.engine.kv_fill import KVFill
from exitwise.engine.sequence import Sequence
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
        self._prev: torch.Tensor | None = None
        self._active = False
        self._prefilter = False

    def check_params(self, params) -> None:
        """Reject, at add_request, per-request settings the criterion cannot honour (heads: an alpha
        they were not calibrated for; other criteria: any alpha)."""
        check = getattr(self.criterion, "check_params", None)
        if check is not None:
            check(params)
        elif getattr(params, "exit_alpha", None) is not None:
            raise ValueError(f"exit_alpha applies to the heads exit criterion, not {self.criterion.name!r}")

    def begin(self, seqs: list[Sequence], runner=None) -> None:
        thr = [self.threshold if s.params.exit_threshold is None else s.params.exit_threshold for s in seqs]
        mins = [self.min_layer if s.params.exit_min_layer is None else s.params.exit_min_layer for s in seqs]
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
        conf = self.criterion.confidence(hidden, prev, layer, readout)  # (B,)
        return readout if bool((conf >= self._thresholds).all()) else None
