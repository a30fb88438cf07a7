"""The paper's readout: the model's own final norm and head, restricted to the label-word rows."""

from __future__ import annotations

from pathlib import Path

import torch


class LMReadout:
    kind = "lm"
    pool_from = None  # reads the last token's state

    def __init__(self, backbone, label_ids: list[int]):
        self.backbone = backbone
        self.rows = torch.tensor(list(label_ids), dtype=torch.long)

    @property
    def layers(self) -> list[int]:
        return list(range(self.backbone.num_layers + 1))

    def probs(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        return self.backbone.readout(hidden, self.rows).float().softmax(-1)

    def describe(self) -> dict:
        return {"kind": self.kind}

    def save(self, directory: Path) -> None:
        pass
