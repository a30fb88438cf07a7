"""Softmax response (CALM): confidence = p_top1 - p_top2 of the readout at the exit layer.

Cost: the full output head (V x D; 49152 x 576 for SmolLM2, ~113 MB read, about three decoder layers)
for every check that fails. When the check succeeds the engine reuses the logits for sampling, so the
successful check is free. ``max_prob=True`` gives CALM's max-probability variant (same cost).
"""

from __future__ import annotations

import torch

from exitwise.exits.base import Readout


class SoftmaxResponse:
    name = "softmax"

    def __init__(self, max_prob: bool = False):
        self.max_prob = max_prob

    def confidence(self, hidden: torch.Tensor, prev_hidden: torch.Tensor | None, layer: int,
                   readout: Readout) -> torch.Tensor:
        logits = readout.logits().float()  # (B, V)
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # (B, 1); avoids materialising softmax
        top = torch.topk(logits, 2, dim=-1).values  # (B, 2)
        p = torch.exp(top - lse)
        return p[:, 0] if self.max_prob else p[:, 0] - p[:, 1]
