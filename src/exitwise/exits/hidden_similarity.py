"""Hidden-state saturation (CALM): cosine similarity of the hidden states at consecutive exit layers.

Cost: two dot products per token (negligible). Undefined at the first exit layer (no previous state),
where it returns -1 so the batch never exits there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from exitwise.exits.base import ExitCriterion, Readout


class HiddenSimilarity(ExitCriterion):
    name = "hidden_similarity"

    def confidence(self, hidden: torch.Tensor, prev_hidden: torch.Tensor | None, layer: int,
                   readout: Readout) -> torch.Tensor:
        if prev_hidden is None:
            return torch.full(hidden.shape[:1], -1.0, device=hidden.device)
        return F.cosine_similarity(hidden.float(), prev_hidden.float(), dim=-1)  # (B,)
