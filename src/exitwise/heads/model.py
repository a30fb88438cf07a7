"""Early-exit heads on a frozen backbone (Valade v2; docs/papers.md, "Self-supervised exit heads").

Head k sits on hidden state ``layers[k]``. Two kinds:

* ``linear`` (Valade v2): a copy of the model's final norm followed by a new
  ``Linear(hidden, vocab, bias=False)`` (V x D trainable weights per head, 28M for SmolLM2). The norm
  copy is frozen, as in the v2 code (the final norm is shared and frozen in training): besides
  following the paper, it means training needs no gradient through the head's input, so each head's
  backward pass is a single (V x D) weight-gradient matmul.
* ``translator`` (tuned-lens style, beyond the paper): head_k(h) = W_out . Norm(h + A_k h + b_k) with
  A_k (D x D) and b_k (D) trainable and initialised to zero, so an untrained translator is exactly the
  model's own readout at that layer. W_out is the model's frozen output head, referenced, not copied;
  the norm is a frozen copy of the final norm. D^2 + D parameters per head (333k for SmolLM2 instead
  of 28M) learn far more from a few thousand tokens, the file is ~100x smaller, and all heads' logits
  are one matmul against the shared W_out (:meth:`ExitHeads.logits_many`). A forward costs the same
  as a linear head's; training backpropagates through W_out (one (N x V) @ (V x D) matmul per head,
  the size of the linear head's weight gradient) but has no 28M-parameter optimiser update.

Confidence is the entropy of the head's softmax; a head "fires" on a token when its entropy is at or
below the calibrated threshold for the requested agreement level alpha (see ``calibrate.py``).

Gate (optional, fitted by ``heads calibrate``): a full-vocabulary head costs about as much as the
output head (~10 ms for SmolLM2, several decoder layers), so paying it at every head layer made early
exit slower than none. Head k's *gate* is a linear probe ``gate.<k>.weight`` (D + 2,) that predicts
log(entropy) of head k from the RMS-normalised hidden state, log of its RMS, and a bias (one dot
product, microseconds). Per mode and alpha, ``gate_thresholds`` are chosen on calibration text so
the gate passes the requested recall of the tokens the head fires on; the criterion evaluates the
head only when the gate passes, and the head's own entropy still decides (a gate removes exits only).

Files: ``<stem>.safetensors`` (``head.<k>.weight`` (V, D) for linear heads, ``translator.<k>.weight``
(D, D) and ``translator.<k>.bias`` (D,) for translators; ``norm.<k>.weight`` (D,); optional
``gate.<k>.weight`` (D + 2,) from calibration) plus ``<stem>.json`` with the model fingerprint,
layers, kind (absent = linear), training provenance, thresholds, gate thresholds and the weights'
sha256 (``checksums.weights``; files from before checksums load without it). Loading heads made for
another model raises :class:`~exitwise.errors.IncompatibleError`; a malformed file (truncated, wrong
tensors or shapes, a kind the weights do not match, NaN/Inf) a :class:`~exitwise.errors.DataError`
naming it.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from exitwise.artifacts import (
    check_digest,
    check_fingerprint,
    check_model,
    check_tensors,
    get_field,
    get_layers,
    load_tensors,
    model_fingerprint,
    read_manifest,
    save_tensors,
    sha256_file,
    write_json,
)
from exitwise.errors import DataError
from exitwise.models.quantize import QuantizedLinear, float_weight, head_dtype, rescore_top

FORMAT = "exitwise-heads/1"
INITS = ("head", "random")
KINDS = ("linear", "translator")
GATE_EPS = 1e-6  # gate features use the same RMS epsilon as the backbone's norms of this family
WEIGHTS = "weights"  # the manifest's checksum key of the weights file (its name follows the manifest's stem)
ENTROPY_FLOOR = 1e-12  # log(entropy) target: fp32 entropies of confident tokens reach ~1e-9, tau ~1e-8


def gate_features(hidden: torch.Tensor) -> torch.Tensor:
    """(..., D) hidden -> (..., D + 2) gate features: h / rms(h), log rms(h), 1 (float32).

    RMS-normalised like the head's input (the head's norm weight is a diagonal scaling a linear probe
    absorbs); the log norm keeps the one piece of information normalisation throws away."""
    h = hidden.float()
    rms = h.pow(2).mean(-1, keepdim=True).add(GATE_EPS).sqrt()
    return torch.cat([h / rms, rms.log(), torch.ones_like(rms)], dim=-1)


def default_layers(num_layers: int, num_heads: int = 4) -> list[int]:
    """Evenly spaced head layers, ``linspace(0, L, H+2)[1:-1]`` as in the v2 code (6/12/18/24 for L=30)."""
    if not 1 <= num_heads < num_layers:
        raise ValueError(f"need 1 <= heads < {num_layers} layers, got {num_heads}")
    return [int(x) for x in np.linspace(0, num_layers, num_heads + 2, dtype=int)[1:-1]]


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """(..., V) logits -> (...) entropy in nats of their softmax, computed in float32."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def paths(path: str | Path) -> tuple[Path, Path]:
    """The weights and manifest files of a heads artefact named ``path`` (with or without suffix)."""
    p = Path(path)
    stem = p.with_suffix("") if p.suffix in (".safetensors", ".json") else p
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


class ExitHeads(nn.Module):
    """Heads at ``layers`` of ``backbone``; the backbone itself is frozen (``requires_grad=False``)."""

    def __init__(self, backbone, layers: list[int] | None = None, num_heads: int = 4, init: str = "head",
                 seed: int = 0, meta: dict | None = None, kind: str = "linear"):
        super().__init__()
        layers = default_layers(backbone.num_layers, num_heads) if layers is None else [int(x) for x in layers]
        bad = [x for x in layers if not 1 <= x < backbone.num_layers]
        if bad or not layers or len(set(layers)) != len(layers):
            raise ValueError(f"head layers must be distinct and in 1..{backbone.num_layers - 1}, got {layers}")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if kind == "translator" and init != "head":
            raise ValueError("translator heads always start as the model's own readout (init='head')")
        self.kind = kind
        self.layers = sorted(layers)
        self.index = {layer: k for k, layer in enumerate(self.layers)}
        self.init = init
        self.meta: dict = dict(meta or {})  # provenance and thresholds, written to the JSON manifest
        self._weights_sha256: str | None = None  # of the weights file last saved or loaded
        for p in backbone.model.parameters():
            p.requires_grad_(False)
        self.fingerprint = model_fingerprint(backbone)
        d, v = backbone.hidden_size, backbone.vocab_size
        self.norms = nn.ModuleList()
        self.linears = nn.ModuleList()  # linear kind: (V, D) per head
        self.translators = nn.ModuleList()  # translator kind: (D, D) + bias per head, zero = identity
        gen = torch.Generator().manual_seed(seed)
        for _ in self.layers:
            norm = copy.deepcopy(backbone.norm).float()
            norm.requires_grad_(False)  # frozen, as in v2 (see module docstring)
            self.norms.append(norm)
            if kind == "translator":
                tr = nn.Linear(d, d, bias=True)
                with torch.no_grad():
                    tr.weight.zero_()
                    tr.bias.zero_()
                self.translators.append(tr)
                continue
            lin = nn.Linear(d, v, bias=False)
            with torch.no_grad():
                if init == "head":
                    lin.weight.copy_(float_weight(backbone.head))
                else:  # same scale as nn.Linear's default init, but reproducible
                    bound = 1 / math.sqrt(d)
                    lin.weight.copy_(torch.rand(v, d, generator=gen) * 2 * bound - bound)
            self.linears.append(lin)
        # Gate probes (None: no gate; the criterion then evaluates the head at every head layer).
        self.gates: list[torch.Tensor | None] = [None] * len(self.layers)
        self.to(backbone.device)
        # the shared, frozen output head of translators: a plain attribute, so it is neither a parameter
        # of the heads nor part of their state_dict / file
        self._out_weight = float_weight(backbone.head).detach() if kind == "translator" else None
        b = backbone.head.bias
        self._out_bias = None if b is None or kind != "translator" else b.detach().float()
        # bfloat16 / int8 copies of the V x D matmuls (use_weight_dtype), and how many top logits of
        # theirs are recomputed from the float32 rows
        self._lowp: list[QuantizedLinear] | None = None
        self._rescore = 0

    def use_weight_dtype(self, dtype: str, rescore: int = 0) -> None:
        """Compute the full-vocabulary logits with ``dtype`` weights ("float32" restores float32): the
        engine's dtype, so a head check streams a quarter of the bytes at int8. Translators share one
        output matrix; their D x D translators stay float32 (1/85 of the head's bytes on SmolLM2)."""
        if dtype == "float32":
            self._lowp, self._rescore = None, 0
            return
        dtype = head_dtype(dtype)
        with torch.no_grad():
            if self.kind == "translator":
                self._lowp = [QuantizedLinear.from_float(self._out_weight, self._out_bias, dtype)]
            else:
                self._lowp = [QuantizedLinear.from_float(lin.weight, None, dtype) for lin in self.linears]
            for lin in self._lowp:
                lin.add_batch_copy()
        self._rescore = rescore

    @property
    def output_weight(self) -> torch.Tensor | None:
        """Translators' shared, frozen output head (V, D); None for linear heads."""
        return self._out_weight

    @property
    def output_bias(self) -> torch.Tensor | None:
        return self._out_bias

    @property
    def device(self) -> torch.device:
        return self.norms[0].weight.device

    def trainable(self) -> list[nn.Parameter]:
        """The parameters training updates (the norms and the backbone stay frozen)."""
        mods = self.translators if self.kind == "translator" else self.linears
        return [p for m in mods for p in m.parameters()]

    # ------------------------------------------------------------------------------------ compute
    def logits(self, k: int, hidden: torch.Tensor) -> torch.Tensor:
        """Head ``k``'s logits (..., V) from hidden states (..., D) at layer ``self.layers[k]``."""
        if self.kind == "translator":
            x, w, b = self.features(k, hidden), self._out_weight, self._out_bias
        else:
            x, w, b = self.norms[k](hidden.float()), self.linears[k].weight, None
        if self._lowp is not None:
            logits = self._lowp[0 if self.kind == "translator" else k](x)
            return rescore_top(x, logits, w, b, self._rescore) if self._rescore and x.dim() == 2 else logits
        if x.dim() == 2 and 1 < x.shape[0] <= 16:
            # a few rows against a 49k-row matrix: W @ x^T runs ~2x faster than F.linear on CPU (MKL),
            # see ModelRunner.logits; decode-time checks hit exactly this shape
            out = torch.mm(w, x.t()).t()
            return out if b is None else out + b
        return F.linear(x, w, b)

    def row_logits(self, k: int, hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Head ``k``'s logits (..., R) on the vocabulary rows ``rows`` only: a readout of a few label
        words costs R x D instead of the V x D of the full head."""
        rows = rows.to(self.device)
        if self.kind == "translator":
            b = None if self._out_bias is None else self._out_bias[rows]
            return F.linear(self.features(k, hidden.to(self.device)), self._out_weight[rows], b)
        return F.linear(self.norms[k](hidden.to(self.device).float()), self.linears[k].weight[rows])

    def features(self, k: int, hidden: torch.Tensor) -> torch.Tensor:
        """Translator ``k``'s normalised features Norm(h + A_k h + b_k) (..., D), the input of W_out."""
        h = hidden.float()
        return self.norms[k](h + self.translators[k](h))

    def logits_many(self, hiddens: list[torch.Tensor]) -> torch.Tensor:
        """Logits (K, N, V) of every head on its own hidden states (N, D) each, one per head.

        Translators share W_out, so their logits are a single (K*N, D) @ (D, V) matmul."""
        if self.kind == "translator":
            x = torch.stack([self.features(k, h) for k, h in enumerate(hiddens)])
            return F.linear(x, self._out_weight, self._out_bias)
        return torch.stack([self.logits(k, h) for k, h in enumerate(hiddens)])

    def entropy(self, k: int, hidden: torch.Tensor) -> torch.Tensor:
        """(...) entropy of head ``k`` on hidden states (..., D): low means confident."""
        return entropy(self.logits(k, hidden))

    def gate_score(self, k: int, hidden: torch.Tensor) -> torch.Tensor:
        """(B,) gate k's prediction of log(entropy) of head ``k`` on hidden (B, D): low means likely to fire.

        Written without materialising the features: (h . w) / rms + c log rms + b."""
        w = self.gates[k]
        if w is None:
            raise ValueError(f"head {k} (layer {self.layers[k]}) has no gate; run `exitwise heads calibrate`")
        h = hidden.float()
        rms = h.pow(2).mean(-1).add(GATE_EPS).sqrt()  # (B,)
        d = h.shape[-1]
        return (h @ w[:d]) / rms + w[d] * rms.log() + w[d + 1]

    @property
    def has_gate(self) -> bool:
        return all(g is not None for g in self.gates) and bool(self.meta.get("gate", {}).get("thresholds"))

    def gate_thresholds(self, alpha: float, mode: str = "max_coverage") -> list[float] | None:
        """Gate thresholds per head for ``alpha`` (gate passes where score <= threshold; -inf: the head
        never fires, +inf: always evaluate the head); None when these heads have no gate for alpha."""
        if not self.has_gate:
            return None
        table = self.meta["gate"]["thresholds"].get(mode, {}).get(alpha_key(alpha))
        if table is None:
            return None
        return [float("-inf") if t is None else float(t) for t in table]

    def calibrated_alphas(self, mode: str = "max_coverage") -> list[float]:
        """The alpha levels these heads have ``mode`` thresholds for, ascending."""
        return sorted(float(a) for a in self.meta.get("thresholds", {}).get(mode, {}))

    def thresholds(self, alpha: float, mode: str = "max_coverage") -> list[float]:
        """Calibrated entropy thresholds per head for ``alpha`` (-inf = never fires)."""
        table = self.meta.get("thresholds", {}).get(mode)
        if not table:
            raise DataError(f"these heads have no {mode!r} thresholds; run `exitwise heads calibrate` first")
        key = alpha_key(alpha)
        if key not in table:
            raise DataError(f"no {mode!r} thresholds for alpha={alpha}; calibrated for {sorted(table)}")
        return [float("-inf") if t is None else float(t) for t in table[key]]

    # -------------------------------------------------------------------------------------- files
    def _tensors(self) -> dict[str, torch.Tensor]:
        tensors = {}
        for k in range(len(self.layers)):
            if self.kind == "translator":
                tensors[f"translator.{k}.weight"] = self.translators[k].weight.detach().contiguous().cpu()
                tensors[f"translator.{k}.bias"] = self.translators[k].bias.detach().contiguous().cpu()
            else:
                tensors[f"head.{k}.weight"] = self.linears[k].weight.detach().contiguous().cpu()
            for name, t in self.norms[k].state_dict().items():  # weight (D,), and bias for LayerNorm
                tensors[f"norm.{k}.{name}"] = t.detach().contiguous().cpu()
            if self.gates[k] is not None:
                tensors[f"gate.{k}.weight"] = self.gates[k].detach().float().contiguous().cpu()
        return tensors

    def _shapes(self) -> tuple[dict[str, tuple], dict[str, tuple]]:
        """(required, optional) tensor names and shapes of these heads' weights file."""
        need, gates = {}, {}
        for k in range(len(self.layers)):
            mods = {"translator": self.translators[k]} if self.kind == "translator" else {"head": self.linears[k]}
            mods["norm"] = self.norms[k]
            for prefix, mod in mods.items():
                need.update({f"{prefix}.{k}.{n}": tuple(t.shape) for n, t in mod.state_dict().items()})
            gates[f"gate.{k}.weight"] = (self.norms[k].weight.shape[0] + 2,)
        return need, gates

    def save(self, path: str | Path) -> Path:
        st, js = paths(path)
        st.parent.mkdir(parents=True, exist_ok=True)
        # weights first, manifest (with their checksum) last: a save cut short never loads as complete
        self._weights_sha256 = save_tensors(self._tensors(), st)
        self.write_manifest(path)
        return st

    def write_manifest(self, path: str | Path) -> Path:
        """Rewrite only the JSON (e.g. after calibration), leaving the weights untouched."""
        st, js = paths(path)
        # the digest of the file as saved or loaded (a file from before checksums gets one now)
        digest = self._weights_sha256 or (sha256_file(st) if st.is_file() else None)
        manifest = {"format": FORMAT, **self.fingerprint, "layers": self.layers, "init": self.init,
                    "kind": self.kind, **self.meta}
        if digest is not None:
            manifest["checksums"] = {WEIGHTS: digest}
        write_json(manifest, js)
        return js

    @classmethod
    def load(cls, path: str | Path, backbone) -> ExitHeads:
        st, js = paths(path)
        manifest = read_manifest(js, FORMAT, "heads manifest")
        check_fingerprint(manifest, js)
        check_model(manifest, backbone, f"heads {js}")
        layers = get_layers(manifest, "layers", js, 1, backbone.num_layers - 1)
        kind = manifest.get("kind", "linear")  # files from before translators have no kind
        if kind not in KINDS:
            raise DataError(f"heads manifest {js} has unknown kind {kind!r} (known: {', '.join(KINDS)})")
        init = manifest.get("init", "head")
        if init not in INITS:
            raise DataError(f"heads manifest {js}: field 'init' must be one of {INITS}, got {init!r}")
        if not st.is_file():
            raise DataError(f"{st} not found: the heads manifest {js} has no weights next to it")
        digest = _verify_weights(manifest, st, js)
        tensors = load_tensors(st, "heads")
        _check_kind(st, tensors, kind, js)
        meta = {k: v for k, v in manifest.items()
                if k not in ("format", "layers", "init", "kind", "checksums", *model_fingerprint(backbone))}
        try:
            heads = cls(backbone, layers=layers, init=init, meta=meta, kind=kind)
        except ValueError as exc:
            raise DataError(f"heads manifest {js}: {exc}") from None
        check_tensors(st, tensors, *heads._shapes())
        with torch.no_grad():
            for k in range(len(heads.layers)):
                if kind == "translator":
                    heads.translators[k].weight.copy_(tensors[f"translator.{k}.weight"])
                    heads.translators[k].bias.copy_(tensors[f"translator.{k}.bias"])
                else:
                    heads.linears[k].weight.copy_(tensors[f"head.{k}.weight"])
                heads.norms[k].load_state_dict({n: tensors[f"norm.{k}.{n}"] for n in heads.norms[k].state_dict()})
                gate = tensors.get(f"gate.{k}.weight")  # absent in heads calibrated before gates existed
                heads.gates[k] = None if gate is None else gate.float().to(backbone.device)
        heads._weights_sha256 = digest
        return heads


def _verify_weights(manifest: dict, st: Path, js: Path) -> str | None:
    """Check the weights against the manifest's checksum; None for files written before checksums."""
    if "checksums" not in manifest:
        return None
    digest = get_field(manifest, "checksums", dict, js).get(WEIGHTS)
    check_digest(st, digest, js, f"{WEIGHTS} ({st.name})")
    return digest


def _check_kind(st: Path, tensors: dict, kind: str, js: Path) -> None:
    """A manifest whose kind disagrees with the weights is named as such, not as a list of missing tensors."""
    own = "translator." if kind == "translator" else "head."
    other = "head." if kind == "translator" else "translator."
    if not any(n.startswith(own) for n in tensors) and any(n.startswith(other) for n in tensors):
        found = "linear" if kind == "translator" else "translator"
        raise DataError(f"{st}: holds {found} heads, but its manifest {js} says kind {kind!r}")


def alpha_key(alpha: float) -> str:
    """JSON key of an alpha level ("0.95")."""
    return f"{alpha:g}"
