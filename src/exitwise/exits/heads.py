"""Calibrated early-exit heads as an engine exit criterion (Valade v2, METHODS.md §2.6).

confidence = tau_l(alpha) - H_l, the calibrated entropy threshold of the head at layer ``l`` minus
that head's entropy, so the engine's one threshold is **0** for every layer: a token is confident
exactly when its head fires (entropy <= tau_l). Layers without a head, or whose head never fires at
this alpha, return -inf. The head's logits are handed to the engine's :class:`Readout`, so an exiting
token gets the head's prediction, as in the paper, not the plain final-norm readout.

Cost per check: one full-vocabulary head (V x D, the size of the output head, about three SmolLM2
decoder layers at batch 1) for every head layer reached. Measuring that against a decoder layer and
a cheaper gate are still to do (issue 4 §3).

Use: ``LLM(model, exit=HeadsCriterion.load(path, backbone, alpha=0.95), exit_threshold=0.0)``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from exitwise.exits.base import Readout
from exitwise.heads.model import ExitHeads, entropy


class HeadsCriterion:
    name = "heads"

    def __init__(self, heads: ExitHeads, alpha: float, mode: str = "max_coverage"):
        self.heads = heads
        self.alpha = alpha
        self.mode = mode
        self.layers = list(heads.layers)  # the engine's default exit layers
        self.tau = dict(zip(heads.layers, heads.thresholds(alpha, mode), strict=True))

    @classmethod
    def load(cls, path: str | Path, backbone, alpha: float, mode: str = "max_coverage") -> HeadsCriterion:
        return cls(ExitHeads.load(path, backbone), alpha, mode)

    @torch.inference_mode()
    def confidence(self, hidden: torch.Tensor, prev_hidden: torch.Tensor | None, layer: int,
                   readout: Readout) -> torch.Tensor:
        tau = self.tau.get(layer, float("-inf"))
        if tau == float("-inf"):  # no head here, or it never fires at this alpha: skip its cost
            return torch.full((hidden.shape[0],), float("-inf"), device=hidden.device)
        logits = self.heads.logits(self.heads.index[layer], hidden)  # (B, V)
        readout.provide(logits.to(hidden.dtype))
        return tau - entropy(logits)  # (B,), >= 0 where the head fires
