"""The readout interface: how a RAEE exit at layer l turns the last prompt token's hidden state into
a distribution over the task's classes.

The exit table records, per training example, the layers where *this* readout was right, and the
exit answers with the same readout, so the choice is made once, at build time, and stored in the
database (``readout/`` and the manifest's ``readout`` entry). A readout that is fitted on the
training split (``probe``) reports its training-split probabilities out of fold, so that the exit
table never records a layer as right because the readout memorised that very example.

Kinds (one file each):

* ``lm`` (``lm.py``, the paper's): the model's final norm and output head restricted to the
  label-word rows, at every layer 0..L.
* ``probe`` (``probe.py``, beyond the paper): a multinomial logistic-regression probe per layer on the
  normalised last-token state and the mean of the prompt's own tokens, fitted on the training split
  in the build pass; ``probe-last`` on the last-token state alone.
* ``heads:PATH`` (``heads.py``): exitwise's self-supervised exit heads (trained on unlabelled text,
  never on the task) restricted to the label-word rows, at the heads' layers, plus the model's own
  readout at the last layer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from exitwise.errors import DataError

READOUTS = ("lm", "probe", "probe-last", "heads:PATH")


class Readout(Protocol):
    kind: str
    # None: the readout reads the last prompt token's state (B, D); an int: the prompt position where
    # its own tokens begin, and it reads [that state ; the mean of those tokens] (B, 2D)
    # (layerwise.summary). Recorded by a readout fitted on such states, so every pass reads alike.
    pool_from: int | None

    @property
    def layers(self) -> list[int]:
        """Hidden-state indices (ascending, always ending at L) at which this readout exists."""

    def probs(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """(B, D) last-token hidden states (or (B, 2D), see ``pool_from``) at ``layer`` -> (B, C)
        float32 class probabilities."""

    def describe(self) -> dict:
        """The manifest entry (JSON-ready); ``load_readout`` rebuilds the readout from it."""

    def save(self, directory: Path) -> None:
        """Write whatever files the readout needs into ``directory`` (may write nothing)."""


@torch.inference_mode()
def all_layer_probs(readout: Readout, states: torch.Tensor, num_classes: int) -> np.ndarray:
    """(N, L+1, D) states -> (N, L+1, C) probabilities; uniform at layers without a readout."""
    n, depth = states.shape[:2]
    out = np.full((n, depth, num_classes), 1.0 / num_classes, dtype=np.float32)
    for layer in readout.layers:
        out[:, layer] = readout.probs(layer, states[:, layer]).cpu().numpy()
    return out


def layer_mask(readout: Readout, num_layers: int) -> np.ndarray:
    """(L+1,) bool: the layers at which ``readout`` exists."""
    mask = np.zeros(num_layers + 1, dtype=bool)
    mask[readout.layers] = True
    return mask


def pools(spec: str) -> bool:
    """Whether the readout ``spec`` names reads the pooled states (``layerwise.summary``)."""
    return spec == "probe"


def pool_start(specs: list[str], task, tokenizer) -> int | None:
    """Where the task's prompts' own tokens begin if a readout of ``specs`` pools (None: none pools):
    the ``pool_from`` of the all-layer pass those readouts are fitted on."""
    return len(task.prefix_ids(tokenizer)) if any(pools(s) for s in specs) else None


def fit_readout(spec: str, backbone, label_ids: list[int], states: torch.Tensor, labels: np.ndarray,
                seed: int = 0, pool_from: int | None = None) -> tuple[Readout, np.ndarray]:
    """Make the readout named by ``spec`` for a training split; returns it and the split's (N, L+1, C)
    probabilities (out of fold for fitted readouts). ``states``: (N, L+1, D) last-token states, or
    (N, L+1, 2D) with the means of the prompts' own tokens from position ``pool_from`` on (a readout
    that does not pool reads the first D)."""
    from exitwise.raee.readouts.heads import HeadsReadout
    from exitwise.raee.readouts.lm import LMReadout
    from exitwise.raee.readouts.probe import ProbeReadout

    num_classes = len(label_ids)
    if pools(spec):
        if pool_from is None or states.shape[-1] != 2 * backbone.hidden_size:
            raise ValueError(f"readout {spec!r} reads pooled states (N, L+1, {2 * backbone.hidden_size}) and "
                             f"their start; got {tuple(states.shape)}, pool_from {pool_from}")
        return ProbeReadout.fit(states, labels, num_classes, seed=seed, pool_from=pool_from)
    last = states[..., :backbone.hidden_size]
    if spec == "lm":
        readout = LMReadout(backbone, label_ids)
        return readout, all_layer_probs(readout, last, num_classes)
    if spec == "probe-last":
        return ProbeReadout.fit(last, labels, num_classes, seed=seed)
    if spec.startswith("heads:"):
        readout = HeadsReadout.from_file(spec.removeprefix("heads:"), backbone, label_ids)
        return readout, all_layer_probs(readout, last, num_classes)
    raise DataError(f"unknown readout {spec!r}; choose one of {', '.join(READOUTS)}")


def load_readout(entry: dict, directory: Path, backbone, label_ids: list[int]) -> Readout:
    """The readout a database's manifest entry describes, with its files from ``directory``."""
    from exitwise.raee.readouts.heads import HeadsReadout
    from exitwise.raee.readouts.lm import LMReadout
    from exitwise.raee.readouts.probe import ProbeReadout

    kind = entry.get("kind") if isinstance(entry, dict) else None
    if kind == "lm":
        return LMReadout(backbone, label_ids)
    if kind == "probe":
        pool_from = entry.get("pool_from")  # absent from databases built before the pooled probe
        if pool_from is not None and (not isinstance(pool_from, int) or isinstance(pool_from, bool) or pool_from < 0):
            raise DataError(f"{directory}: manifest field 'readout.pool_from' must be a non-negative integer, "
                            f"got {pool_from!r}")
        return ProbeReadout.load(directory, len(label_ids), backbone, pool_from)
    if kind == "heads":
        return HeadsReadout.load(directory, backbone, label_ids)
    raise DataError(f"{directory}: unknown readout kind {kind!r} in the database manifest")
