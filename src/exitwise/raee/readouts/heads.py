"""Self-supervised exit heads as a RAEE readout: the heads of ``exitwise heads train`` (fitted on
unlabelled text to agree with the model's own next-token distribution, never on the task),
restricted to the label-word rows, at the heads' layers; the model's own readout at layer L.

The heads' files are copied into the database (``readout/heads.*``), so the database stays usable
and checksummed when the original heads are moved or retrained.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from exitwise.errors import DataError
from exitwise.heads.model import ExitHeads, paths
from exitwise.raee.readouts.lm import LMReadout

STEM = "heads"


class HeadsReadout:
    kind = "heads"
    pool_from = None  # reads the last token's state

    def __init__(self, heads: ExitHeads, backbone, label_ids: list[int], source: str):
        self.heads = heads
        self.final = LMReadout(backbone, label_ids)
        self.rows = torch.tensor(list(label_ids), dtype=torch.long)
        self.num_layers = backbone.num_layers
        self.source = source
        self._files = paths(source)

    @classmethod
    def from_file(cls, path: str | Path, backbone, label_ids: list[int]) -> HeadsReadout:
        weights, manifest = paths(path)
        if not manifest.is_file():
            raise DataError(f"readout heads:{path}: {manifest} not found (train heads with `exitwise heads train`)")
        return cls(ExitHeads.load(path, backbone), backbone, label_ids, str(path))

    @classmethod
    def load(cls, directory: Path, backbone, label_ids: list[int]) -> HeadsReadout:
        stem = Path(directory) / "readout" / STEM
        for f in paths(stem):
            if not f.is_file():
                raise DataError(f"{f} not found: the database's heads readout is missing")
        return cls(ExitHeads.load(stem, backbone), backbone, label_ids, str(stem))

    @property
    def layers(self) -> list[int]:
        return [*self.heads.layers, self.num_layers]

    @torch.inference_mode()
    def probs(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        if layer == self.num_layers:
            return self.final.probs(layer, hidden)
        k = self.heads.index.get(layer)
        if k is None:
            raise ValueError(f"no exit head at layer {layer} (heads at {self.heads.layers})")
        return self.heads.row_logits(k, hidden, self.rows).float().softmax(-1)

    def describe(self) -> dict:
        return {"kind": self.kind, "file": f"readout/{STEM}.safetensors", "source": self.source,
                "heads_kind": self.heads.kind, "heads_layers": self.heads.layers}

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        for src, dst in zip(self._files, paths(directory / STEM), strict=True):
            if src.resolve() != dst.resolve():
                shutil.copyfile(src, dst)
