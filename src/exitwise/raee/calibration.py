"""Training-free improvements to RAEE's exit space (beyond the paper; all off by default).

On small models most intermediate layers read out one label word for almost every input (their
label-word prior dwarfs the evidence). Such a layer is "correct" for every example of its favourite
class, so the exit table fills with layers that carry no information and RAEE degenerates into a
nearest-neighbour vote. Two fixes that use only statistics of the training split already in the
database:

* ``calibrate``: divide each layer's label-word probabilities by their mean over the training split
  (contextual calibration, per layer), which removes the layer's prior towards one class;
* ``tolerance``: allow only layers whose (calibrated) training accuracy is within ``tolerance`` of
  the last layer's, so an exit is never taken at a layer that is worse on average. The last layer is
  always allowed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from exitwise.raee.predictor import ExitTable


@dataclass(frozen=True)
class ExitSpace:
    calibrate: bool = False
    tolerance: float | None = None  # None = every layer may be an exit (the paper)

    def describe(self) -> dict:
        return {"calibrate": self.calibrate, "tolerance": self.tolerance}


def layer_log_bias(layer_probs: np.ndarray) -> np.ndarray:
    """(L+1, C) log of the mean label-word distribution per layer over the training split."""
    return np.log(layer_probs.astype(np.float64).mean(0) + 1e-12).astype(np.float32)


def corrected_probs(layer_probs: np.ndarray, log_bias: np.ndarray) -> np.ndarray:
    """(N, L+1, C) probabilities after dividing out each layer's prior and renormalising."""
    logits = np.log(layer_probs.astype(np.float64) + 1e-12) - log_bias
    logits -= logits.max(-1, keepdims=True)
    p = np.exp(logits)
    return (p / p.sum(-1, keepdims=True)).astype(np.float32)


def allowed_layers(probs: np.ndarray, labels: np.ndarray, tolerance: float | None) -> np.ndarray:
    """(L+1,) bool: layers whose training accuracy is at least the last layer's minus ``tolerance``."""
    num = probs.shape[1]
    if tolerance is None:
        return np.ones(num, dtype=bool)
    acc = (probs.argmax(-1) == labels[:, None]).mean(0)
    allowed = acc >= acc[-1] - tolerance
    allowed[-1] = True
    return allowed


def exit_space(layer_probs: np.ndarray, labels: np.ndarray, space: ExitSpace, readout_layers: np.ndarray | None = None
               ) -> tuple[ExitTable, np.ndarray | None, np.ndarray]:
    """The exit table for ``space``, the per-layer log bias to apply at readout (or None), and the
    allowed-layer mask (never a layer where the readout does not exist: ``readout_layers``, (L+1,) bool)."""
    log_bias = layer_log_bias(layer_probs) if space.calibrate else None
    probs = corrected_probs(layer_probs, log_bias) if log_bias is not None else layer_probs
    allowed = allowed_layers(probs, labels, space.tolerance)
    if readout_layers is not None:
        allowed &= readout_layers
    preds = probs.argmax(-1)
    # A disallowed layer never counts as correct, so it never enters the table.
    correct_preds = np.where(allowed[None, :], preds, -1)
    return ExitTable.from_readouts(correct_preds, probs.max(-1), labels), log_bias, allowed
