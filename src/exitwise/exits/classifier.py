"""Dedicated exit classifier (CALM / Miao et al.): confidence = sigmoid(w_l . rms(h_l) + b_l).

One linear probe per exit layer on the RMS-normalised hidden state (scale-free, so one learning rate
suits every depth), trained on the frozen model with class-balanced BCE on the label
"argmax of the readout at layer l == argmax at the last layer" (w_pos = 1 - n_pos/n, w_neg = 1 - n_neg/n).
A two-class softmax over (W_c h) is the same thing as one logit and a sigmoid.

Cost per check: one D-vector dot product per token (negligible next to a decoder layer).

Files: ``<name>.safetensors`` (weight (K, D), bias (K,)) plus ``<name>.json`` naming the model, its
shape, the K layers and the weights' sha256; loading for another model raises
:class:`~exitwise.errors.IncompatibleError`, a malformed or NaN/Inf file a :class:`~exitwise.errors.DataError`.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from exitwise import artifacts
from exitwise.errors import DataError
from exitwise.exits.base import ExitCriterion, Readout
from exitwise.heads.model import paths

FORMAT = "exitwise-exit-classifier/1"
WEIGHTS = "weights"  # the manifest's checksum key of the weights file


class ExitClassifier(ExitCriterion):
    name = "classifier"

    def __init__(self, layers: list[int], weight: torch.Tensor, bias: torch.Tensor, meta: dict | None = None):
        if weight.shape[0] != len(layers) or bias.shape != (len(layers),):
            raise ValueError(f"classifier weight {tuple(weight.shape)} / bias {tuple(bias.shape)} do not match "
                             f"{len(layers)} layers")
        self.layers = list(layers)
        self.index = {layer: i for i, layer in enumerate(self.layers)}
        self.weight = weight  # (K, D)
        self.bias = bias  # (K,)
        self.meta = meta or {}

    def to(self, device) -> ExitClassifier:
        self.weight, self.bias = self.weight.to(device), self.bias.to(device)
        return self

    def confidence(self, hidden: torch.Tensor, prev_hidden: torch.Tensor | None, layer: int,
                   readout: Readout) -> torch.Tensor:
        k = self.index.get(layer)
        if k is None:  # no probe trained for this layer: never confident there
            return torch.zeros(hidden.shape[0], device=hidden.device)
        x = F.rms_norm(hidden.float(), (hidden.shape[-1],))
        return torch.sigmoid(x @ self.weight[k].to(x.dtype) + self.bias[k])

    # -------------------------------------------------------------------------------- files
    def save(self, path: str | Path) -> Path:
        st, js = paths(path)
        st.parent.mkdir(parents=True, exist_ok=True)
        # weights first, manifest (with their checksum) last: a save cut short never loads as complete
        tensors = {"weight": self.weight.contiguous().cpu(), "bias": self.bias.contiguous().cpu()}
        digest = artifacts.save_tensors(tensors, st)
        artifacts.write_json({"format": FORMAT, "layers": self.layers, **self.meta, "checksums": {WEIGHTS: digest}}, js)
        return st

    @classmethod
    def load(cls, path: str | Path, backbone=None) -> ExitClassifier:
        st, js = paths(path)
        for f in (js, st):
            if not f.is_file():
                raise DataError(f"exit classifier needs {st} and {js}: {f} not found")
        meta = artifacts.read_manifest(js, FORMAT, "exit classifier")
        if backbone is not None:
            artifacts.check_fingerprint(meta, js)
            artifacts.check_model(meta, backbone, f"exit classifier {js}")
        hi = backbone.num_layers - 1 if backbone is not None else 1 << 30
        layers = artifacts.get_layers(meta, "layers", js, 1, hi)
        if "checksums" in meta:  # absent in files written before checksums
            sums = artifacts.get_field(meta, "checksums", dict, js)
            artifacts.check_digest(st, sums.get(WEIGHTS), js, f"{WEIGHTS} ({st.name})")
        tensors = artifacts.load_tensors(st, "exit classifier")
        dim = backbone.hidden_size if backbone is not None else _dim(tensors)
        artifacts.check_tensors(st, tensors, {"weight": (len(layers), dim), "bias": (len(layers),)})
        meta = {k: v for k, v in meta.items() if k not in ("format", "layers", "checksums")}
        clf = cls(layers, tensors["weight"], tensors["bias"], meta)
        return clf.to(backbone.device) if backbone is not None else clf


def _dim(tensors: dict) -> int:
    """D of a weight (K, D) when no backbone says what it must be (any 2-D weight passes the shape check)."""
    w = tensors.get("weight")
    return int(w.shape[1]) if w is not None and w.dim() == 2 else -1


# ------------------------------------------------------------------------------------------ training
@torch.inference_mode()
def collect(backbone, token_ids: list[int], layers: list[int], *, chunk: int = 256,
            max_tokens: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced features and labels: x (K, N, D) RMS-normalised hidden states at ``layers`` and
    y (K, N) = 1 where the readout's argmax there equals the final layer's."""
    xs: list[list[torch.Tensor]] = [[] for _ in layers]
    ys: list[list[torch.Tensor]] = [[] for _ in layers]
    ids = token_ids[:max_tokens]
    for start in range(0, len(ids), chunk):
        piece = torch.tensor([ids[start:start + chunk]], device=backbone.device)
        hs = backbone.hidden_states(piece)  # L+1 tensors (1, T, D)
        final = backbone.readout(hs[-1][0]).argmax(-1)  # (T,)
        for k, layer in enumerate(layers):
            h = hs[layer][0]
            ys[k].append((backbone.readout(h).argmax(-1) == final).float())
            xs[k].append(F.rms_norm(h.float(), (h.shape[-1],)))
    return torch.stack([torch.cat(x) for x in xs]), torch.stack([torch.cat(y) for y in ys])


def fit(x: torch.Tensor, y: torch.Tensor, *, steps: int = 300, lr: float = 0.05,
        weight_decay: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-balanced logistic regression per layer, full batch: x (K, N, D), y (K, N) -> (K, D), (K,)."""
    k, n, d = x.shape
    x, y = x.clone(), y.clone()  # features may be inference tensors (collected under inference_mode)
    w = torch.zeros(k, d, requires_grad=True)
    b = torch.zeros(k, requires_grad=True)
    pos = y.mean(dim=1, keepdim=True)  # (K, 1) fraction of positives
    # w_pos = 1 - n_pos/n, w_neg = 1 - n_neg/n: the rarer class weighs more
    weights = torch.where(y > 0.5, 1 - pos, pos)  # (K, N)
    opt = torch.optim.Adam([w, b], lr=lr, weight_decay=weight_decay)
    with torch.enable_grad():
        for _ in range(steps):
            logits = torch.einsum("knd,kd->kn", x, w) + b[:, None]
            loss = F.binary_cross_entropy_with_logits(logits, y, weight=weights, reduction="sum") / n
            opt.zero_grad()
            loss.backward()
            opt.step()
    return w.detach(), b.detach()


def train(backbone, text: str, layers: list[int], **kwargs) -> ExitClassifier:
    """Train probes for ``layers`` on ``text`` (teacher forcing through the frozen model)."""
    if backbone.tokenizer is None:
        raise ValueError("training an exit classifier from text needs a tokenizer")
    bad = [layer for layer in layers if not 1 <= layer < backbone.num_layers]
    if bad:
        raise ValueError(f"layers {bad} out of range 1..{backbone.num_layers - 1}")
    ids = backbone.tokenizer(text)["input_ids"]
    collect_kw = {k: kwargs.pop(k) for k in ("chunk", "max_tokens") if k in kwargs}
    x, y = collect(backbone, ids, layers, **collect_kw)
    w, b = fit(x.cpu(), y.cpu(), **kwargs)
    meta = artifacts.model_fingerprint(backbone) | {"train_tokens": int(x.shape[1]),
                                          "positive_rate": [round(float(v), 4) for v in y.mean(1)]}
    return ExitClassifier(layers, w, b, meta).to(backbone.device)
