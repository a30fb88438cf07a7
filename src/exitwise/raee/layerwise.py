"""Label-word predictions of a backbone at every layer, and truncated prediction at chosen layers.

Both functions read the last prompt token through the model's own final norm and head restricted
to the label-word rows, so a readout costs a (B, D) x (D, C) product instead of the full vocabulary.
Batches are formed from prompts of similar length (less padding) and results come back in input order.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from exitwise.models.backbone import Backbone, Prefix, common_prefix


def _pad(token_ids: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad so that every row's last real token sits in the last column."""
    width = max(len(t) for t in token_ids)
    ids = torch.full((len(token_ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(token_ids), width), dtype=torch.long)
    for row, toks in enumerate(token_ids):
        ids[row, width - len(toks):] = torch.tensor(toks, dtype=torch.long)
        mask[row, width - len(toks):] = 1
    return ids, mask


def _batches(indices: np.ndarray, lengths: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    """Chunks of ``indices`` sorted by length (stable), so each batch pads little."""
    order = indices[np.argsort(lengths[indices], kind="stable")]
    for start in range(0, len(order), batch_size):
        yield order[start:start + batch_size]


def _check(token_ids: Sequence[Sequence[int]], label_ids: Sequence[int]) -> tuple[np.ndarray, torch.Tensor]:
    if not token_ids:
        raise ValueError("no prompts given")
    lengths = np.array([len(t) for t in token_ids])
    if (lengths == 0).any():
        raise ValueError(f"prompt {int(np.argmax(lengths == 0))} is empty after tokenisation")
    if len(set(label_ids)) != len(label_ids):
        raise ValueError(f"label token ids must be distinct, got {list(label_ids)}")
    return lengths, torch.tensor(list(label_ids), dtype=torch.long)


def shared_prefix(backbone: Backbone, token_ids: list[list[int]], enabled: bool = True, stop: int | None = None
                  ) -> tuple[Prefix | None, list[list[int]]]:
    """Split off the token prefix all prompts share (demonstrations, instruction, chat header).

    Its keys and values are computed once (for layers below ``stop`` only); each prompt then costs
    only its own tokens. Results equal running whole prompts (tested), so this is purely a speed-up.
    """
    prefix = common_prefix(token_ids) if enabled else []
    if not prefix or not backbone.can_reuse_prefix(max(len(t) for t in token_ids)):
        return None, token_ids
    return backbone.prefill(prefix, stop), [t[len(prefix):] for t in token_ids]


def _pad_id(backbone: Backbone) -> int:
    tok = backbone.tokenizer
    return int(tok.pad_token_id) if tok is not None and tok.pad_token_id is not None else 0


@torch.inference_mode()
def layer_label_probs(backbone: Backbone, token_ids: list[list[int]], label_ids: Sequence[int],
                      batch_size: int = 8, progress: bool = False, desc: str = "layers",
                      reuse_prefix: bool = True) -> np.ndarray:
    """Softmax over the label words at every hidden state 0..L, read at the last prompt token.

    Returns (N, L+1, C) float32. Row order follows ``token_ids``.
    """
    _check(token_ids, label_ids)
    prefix, token_ids = shared_prefix(backbone, token_ids, reuse_prefix)
    lengths, rows = _check(token_ids, label_ids)
    n, num_layers = len(token_ids), backbone.num_layers
    out = np.zeros((n, num_layers + 1, len(rows)), dtype=np.float32)
    pad_id = _pad_id(backbone)
    bar = tqdm(total=n, desc=desc, unit="ex", disable=not progress)
    for batch in _batches(np.arange(n), lengths, batch_size):
        ids, mask = _pad([token_ids[i] for i in batch], pad_id)
        state = backbone.start(ids, mask, prefix=prefix)
        probs = [backbone.readout(state.hidden[:, -1], rows).float().softmax(-1)]
        for layer in range(1, num_layers + 1):
            backbone.run(state, layer)
            probs.append(backbone.readout(state.hidden[:, -1], rows).float().softmax(-1))
        out[batch] = torch.stack(probs, dim=1).cpu().numpy()  # (B, L+1, C)
        bar.update(len(batch))
    bar.close()
    return out


@torch.inference_mode()
def predict_at_layers(backbone: Backbone, token_ids: list[list[int]], label_ids: Sequence[int],
                      exit_layers: np.ndarray, batch_size: int = 8, reuse_prefix: bool = True,
                      log_bias: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Predict each prompt with a forward pass that stops at its own exit layer.

    Prompts are grouped by exit layer (and by length inside a group), so no layer above a row's
    exit is ever computed for it. Returns (predicted class (N,), its label-word probability (N,)).
    ``log_bias`` (L+1, C), if given, is subtracted from the label-word log-probabilities of each
    layer before the prediction (per-layer calibration, see calibration.py).
    """
    _check(token_ids, label_ids)
    exit_layers = np.asarray(exit_layers, dtype=np.int64)
    if exit_layers.shape != (len(token_ids),):
        raise ValueError(f"exit_layers has shape {exit_layers.shape}, expected ({len(token_ids)},)")
    if exit_layers.min() < 0 or exit_layers.max() > backbone.num_layers:
        raise ValueError(f"exit layers must lie in 0..{backbone.num_layers}, "
                         f"got {exit_layers.min()}..{exit_layers.max()}")
    prefix, token_ids = shared_prefix(backbone, token_ids, reuse_prefix, stop=int(exit_layers.max()))
    lengths, rows = _check(token_ids, label_ids)
    preds = np.zeros(len(token_ids), dtype=np.int64)
    conf = np.zeros(len(token_ids), dtype=np.float32)
    pad_id = _pad_id(backbone)
    for layer in np.unique(exit_layers):
        for batch in _batches(np.flatnonzero(exit_layers == layer), lengths, batch_size):
            ids, mask = _pad([token_ids[i] for i in batch], pad_id)
            state = backbone.run(backbone.start(ids, mask, prefix=prefix), int(layer))
            logp = backbone.readout(state.hidden[:, -1], rows).float().log_softmax(-1)
            if log_bias is not None:
                logp = logp - torch.as_tensor(log_bias[layer], device=logp.device)
            top = logp.softmax(-1).max(dim=-1)
            preds[batch] = top.indices.cpu().numpy()
            conf[batch] = top.values.cpu().numpy()
    return preds, conf
