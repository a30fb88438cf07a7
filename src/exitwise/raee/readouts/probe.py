"""Per-layer label-word probes (beyond the paper): a readout fitted on the task's training split.

On small models the label-word readout of an intermediate layer predicts one class for almost every
input, although the layer's state already separates the classes (a linear probe on SmolLM2's layer-15
state reaches the full model's SST-2 accuracy). A probe per layer, p_l(y | h) = softmax(W_l f(h) + b_l)
with f(h) = h / rms(h), is a readout, not an exit decider: RAEE still picks the layer from the
neighbours' exit information, and the exit answers with that layer's probe.

Fitting: multinomial logistic regression on standardised features with an L2 penalty (``l2``, on
the mean cross-entropy), full-batch L-BFGS; a C x D map per layer, seconds for the whole model on a
thousand examples. The training split's probabilities that go into the exit table are **out of
fold** (``folds``-fold cross-fitting, seeded): a probe evaluated on the examples it was fitted on is
right on nearly all of them at every layer, and the table would say nothing. The probe kept for
inference is fitted on the whole split. File: ``readout/probe.safetensors`` with ``weight``
(L+1, D, C) and ``bias`` (L+1, C), the standardisation folded in.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from exitwise.errors import DataError

FILE = "probe.safetensors"
EPS = 1e-6
# L2 penalty per feature kind. Twice the features fit the folds more closely: on the pooled states,
# 1.0 gave the smallest gap between RAEE and the best fixed layer in nested cross-validation on the
# eight tasks' training samples, against 0.1 and 0.3 and a per-layer choice (docs/raee.md, "The pooled probe").
L2 = {"last": 0.1, "last+mean": 1.0}


def features(hidden: torch.Tensor, parts: int = 1) -> torch.Tensor:
    """(..., parts * D) -> (..., parts * D) float32, each D-wide part (the last token's state, the
    mean of the prompt's own tokens) RMS-normalised (the final norm without its learned scale)."""
    h = hidden.float().unflatten(-1, (parts, -1))
    return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS)).flatten(-2)


def fit_logistic(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float, max_iter: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D) features, (N,) labels -> weight (D, C), bias (C,) acting on the raw features."""
    mu = x.mean(0)
    sd = x.std(0).nan_to_num(0.0) + EPS  # a one-example split has no spread (NaN), not an infinite one
    xs = (x - mu) / sd
    w = torch.zeros(x.shape[1], num_classes, device=x.device, requires_grad=True)
    b = torch.zeros(num_classes, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(xs @ w + b, y) + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    w, b = w.detach(), b.detach()
    return w / sd[:, None], b - (mu / sd) @ w


class ProbeReadout:
    kind = "probe"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, meta: dict | None = None,
                 pool_from: int | None = None):
        self.weight = weight.float()  # (L+1, D, C), or (L+1, 2D, C) on pooled states
        self.bias = bias.float()  # (L+1, C)
        self.pool_from = pool_from
        self.parts = 1 if pool_from is None else 2
        self.meta = {**(meta or {}), "features": "last" if pool_from is None else "last+mean",
                     "pool_from": pool_from}

    @property
    def layers(self) -> list[int]:
        return list(range(self.weight.shape[0]))

    def probs(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        w, b = self.weight[layer], self.bias[layer]
        return (features(hidden, self.parts).to(w.device) @ w + b).softmax(-1)

    @classmethod
    def fit(cls, states: torch.Tensor, labels: np.ndarray, num_classes: int, seed: int = 0, folds: int = 5,
            l2: float | None = None, max_iter: int = 100, pool_from: int | None = None
            ) -> tuple[ProbeReadout, np.ndarray]:
        """Probes for every layer of ``states`` (N, L+1, D), or (N, L+1, 2D) pooled from prompt
        position ``pool_from`` on (``layerwise.summary``); returns them and the (N, L+1, C)
        out-of-fold training probabilities. ``l2``: default :data:`L2` for the feature kind."""
        n, depth, dim = states.shape
        parts = 1 if pool_from is None else 2
        l2 = L2["last" if pool_from is None else "last+mean"] if l2 is None else l2
        folds = max(2, min(folds, n))  # every fold holds out at least one example and trains on the rest
        y = torch.as_tensor(np.asarray(labels), dtype=torch.long, device=states.device)
        fold = torch.as_tensor(np.random.default_rng(seed).permutation(n) % folds, device=states.device)
        weight = torch.zeros(depth, dim, num_classes, device=states.device)
        bias = torch.zeros(depth, num_classes, device=states.device)
        oof = np.zeros((n, depth, num_classes), dtype=np.float32)
        for layer in range(depth):
            x = features(states[:, layer], parts)
            for f in range(folds):
                held = fold == f
                w, b = fit_logistic(x[~held], y[~held], num_classes, l2, max_iter)
                oof[held.cpu().numpy(), layer] = (x[held] @ w + b).softmax(-1).cpu().numpy()
            weight[layer], bias[layer] = fit_logistic(x, y, num_classes, l2, max_iter)
        meta = {"folds": folds, "l2": l2, "max_iter": max_iter, "seed": seed}
        return cls(weight, bias, meta, pool_from), oof

    def describe(self) -> dict:
        return {"kind": self.kind, "file": f"readout/{FILE}", **self.meta}

    def save(self, directory: Path) -> None:
        from safetensors.torch import save_file

        directory.mkdir(parents=True, exist_ok=True)
        save_file({"weight": self.weight.contiguous().cpu(), "bias": self.bias.contiguous().cpu()},
                  str(directory / FILE))

    @classmethod
    def load(cls, directory: Path, num_classes: int, backbone, pool_from: int | None = None) -> ProbeReadout:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = Path(directory) / "readout" / FILE
        if not path.is_file():
            raise DataError(f"{path} not found: the database's probe readout is missing")
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise DataError(f"{path}: not a readable safetensors file ({exc})") from None
        weight, bias = tensors.get("weight"), tensors.get("bias")
        want = (backbone.num_layers + 1, backbone.hidden_size * (1 if pool_from is None else 2), num_classes)
        if weight is None or bias is None or tuple(weight.shape) != want or tuple(bias.shape) != (want[0], want[2]):
            got = {k: tuple(v.shape) for k, v in tensors.items()}
            raise DataError(f"{path}: expected weight {want} and bias {(want[0], want[2])}, got {got}")
        if not (torch.isfinite(weight).all() and torch.isfinite(bias).all()):
            raise DataError(f"{path}: probe weights contain NaN or Inf")
        return cls(weight.to(backbone.device), bias.to(backbone.device), pool_from=pool_from)
