"""The adapter of adapter drafts (Kangaroo, Liu et al. 2024, "Lossless Self-Speculative Decoding via
Double Early Exiting"): a small trained block that maps the hidden state entering layer E to a hidden
state the model's own final norm and output head read as the full model's next token.

Design: a residual MLP block ``h + W_down . silu(W_up . RMSNorm(h))`` (W_up (H, D), W_down (D, H),
H ~ D..2D, the norm's own weight (D,)). W_down starts at zero, so an untrained adapter *is* the
plain readout of layer E (the baseline every trained one is measured against), and the block keeps
the residual stream's scale for the final norm to normalise.

What Kangaroo does differently: its adapter is a norm, one multi-head attention block and a norm
(no MLP). Attention lets a draft look at earlier positions, so the adapter keeps K/V of its own for
every position of the context -- a second KV cache beside the paged one, to be filled at prefill and
rolled back with every rejected draft. The MLP block reads only the token's own layer-E state: no
cache, no rollback, and a token's draft costs two (D x H) matmuls; the layers below E have already
mixed the context in. Measured on SmolLM2-135M (docs/adapter.md), the block lifts held-out agreement
with the full model at E = 12 from 0.06 (plain readout) to 0.30 after 15 CPU-minutes, and H = 2D beats
H = D. An attention variant over the backbone's own layer-(E-1) K/V is not built: it is worth adding
only if it measures better than this.

Files: ``<stem>.safetensors`` (``norm.weight`` (D,), ``up.weight`` (H, D), ``down.weight`` (D, H))
plus ``<stem>.json`` with the model fingerprint, the layer E, the shape, training provenance and the
weights' sha256. Loading an adapter made for another model raises
:class:`~exitwise.errors.IncompatibleError`; a malformed file a :class:`~exitwise.errors.DataError`
naming it. Weights are read with safetensors only (never pickle).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from exitwise.artifacts import (
    check_digest,
    check_fingerprint,
    check_model,
    check_tensors,
    get_field,
    load_tensors,
    model_fingerprint,
    read_manifest,
    save_tensors,
    write_json,
)
from exitwise.errors import DataError
from exitwise.heads.model import paths

FORMAT = "exitwise-adapter/1"
WEIGHTS = "weights"  # the manifest's checksum key of the weights file
NORM_EPS = 1e-6


class Adapter(nn.Module):
    """An adapter on the input of layer ``layer`` (1..L-1) of ``backbone``; hidden width ``hidden``."""

    def __init__(self, backbone, layer: int, hidden: int | None = None, seed: int = 0, meta: dict | None = None):
        super().__init__()
        if not 1 <= layer < backbone.num_layers:
            raise ValueError(f"adapter layer must be in 1..{backbone.num_layers - 1}, got {layer}")
        d = backbone.hidden_size
        hidden = 2 * d if hidden is None else int(hidden)
        if hidden < 1:
            raise ValueError(f"adapter hidden width must be >= 1, got {hidden}")
        self.layer, self.hidden = int(layer), hidden
        self.fingerprint = model_fingerprint(backbone)
        self.meta: dict = dict(meta or {})  # provenance, written to the manifest
        self.norm_weight = nn.Parameter(torch.ones(d))
        self.up = nn.Linear(d, hidden, bias=False)
        self.down = nn.Linear(hidden, d, bias=False)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():  # reproducible nn.Linear-scale init; down = 0: the plain readout
            bound = d ** -0.5
            self.up.weight.copy_(torch.rand(hidden, d, generator=gen) * 2 * bound - bound)
            self.down.weight.zero_()
        self.to(backbone.device)

    @property
    def device(self) -> torch.device:
        return self.norm_weight.device

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """(..., D) input of layer E -> (..., D) a stand-in for the last layer's output (before the final norm)."""
        h = h.float()
        x = F.rms_norm(h, (h.shape[-1],), self.norm_weight, NORM_EPS)
        return h + self.down(F.silu(self.up(x)))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -------------------------------------------------------------------------------------- files
    def _shapes(self) -> dict[str, tuple]:
        d = self.norm_weight.shape[0]
        return {"norm.weight": (d,), "up.weight": (self.hidden, d), "down.weight": (d, self.hidden)}

    def save(self, path: str | Path) -> Path:
        st, js = paths(path)
        st.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"norm.weight": self.norm_weight, "up.weight": self.up.weight, "down.weight": self.down.weight}
        # weights first, manifest (with their checksum) last: a save cut short never loads as complete
        digest = save_tensors({k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}, st)
        manifest = {"format": FORMAT, **self.fingerprint, "layer": self.layer, "hidden": self.hidden,
                    **self.meta, "checksums": {WEIGHTS: digest}}
        write_json(manifest, js)
        return st

    @classmethod
    def load(cls, path: str | Path, backbone) -> Adapter:
        st, js = paths(path)
        manifest = read_manifest(js, FORMAT, "adapter manifest")
        check_fingerprint(manifest, js)
        check_model(manifest, backbone, f"adapter {js}")
        layer = get_field(manifest, "layer", int, js)
        if not 1 <= layer < backbone.num_layers:
            raise DataError(f"{js}: field 'layer' must be in 1..{backbone.num_layers - 1}, got {layer}")
        hidden = get_field(manifest, "hidden", int, js)
        if hidden < 1:
            raise DataError(f"{js}: field 'hidden' must be >= 1, got {hidden}")
        check_digest(st, get_field(manifest, "checksums", dict, js).get(WEIGHTS), js, f"{WEIGHTS} ({st.name})")
        tensors = load_tensors(st, "adapter")
        meta = {k: v for k, v in manifest.items()
                if k not in ("format", "layer", "hidden", "checksums", *model_fingerprint(backbone))}
        adapter = cls(backbone, layer, hidden, meta=meta)
        check_tensors(st, tensors, adapter._shapes())
        with torch.no_grad():
            adapter.norm_weight.copy_(tensors["norm.weight"])
            adapter.up.weight.copy_(tensors["up.weight"])
            adapter.down.weight.copy_(tensors["down.weight"])
        adapter.requires_grad_(False)
        return adapter
