"""Label-word predictions of a backbone at every layer, and truncated prediction at chosen layers.

Every function reads a prompt's state at a layer through a readout (``readouts/``; default the
model's own final norm and head restricted to the label-word rows, a (B, D) x (D, C) product instead
of the full vocabulary). What it reads is the last prompt token's state (B, D), or, for a readout that
pools (``pool_from``, see :func:`summary`), that state and the mean of the prompt's own tokens (B, 2D).
A batch holds prompts of one token length only, so nothing is ever padded: a prompt's hidden states
are then computed with the same shapes whatever else is in its batch, and where every matmul gives a
row the same result at every row count (exitwise's int4 / int8 kernel; see ``raee/repro.py``) they are
bit-identical alone and in any batch. Results come back in input order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from exitwise.models.backbone import Backbone, LayerState, Prefix, common_prefix
from exitwise.raee.readouts.base import Readout, all_layer_probs
from exitwise.raee.readouts.lm import LMReadout
from exitwise.raee.repro import pass_plan

# confirm(rows (B,), probs (B, C), layer) -> (B,) the layer each row goes on to (its own: none): predict_in_pass
Confirm = Callable[[np.ndarray, np.ndarray, int], np.ndarray]
# Rows of an in-pass prediction whose key-layer states wait to be regrouped, at most: the memory of a
# long list of inputs stays that of this many rows' (T, D) states, not of the whole list's.
REGROUP_ROWS = 512


def summary(hidden: torch.Tensor, own_from: int | None) -> torch.Tensor:
    """What a readout reads of a batch's states (B, T, D) at one layer: the last token's (B, D), or
    with ``own_from``, [the last token's ; the mean of ``hidden[:, own_from:]``] (B, 2D) float32:
    the mean of the prompt's own tokens, the task's fixed prefix left out (always the last token).

    Where a word sits in a short prompt, the last token's state has not yet gathered it at the middle
    layers; the mean has (docs/raee.md, "The pooled probe")."""
    last = hidden[:, -1]
    if own_from is None:
        return last
    own = hidden[:, min(own_from, hidden.shape[1] - 1):].float()
    return torch.cat([last.float(), own.mean(1)], -1)


def own_start(pool_from: int | None, prefix: Prefix | None) -> int | None:
    """Where the prompt's own tokens begin in a pass's states (None: no pooling), given the prefix
    whose keys and values the pass reuses (its tokens are not in the states)."""
    if pool_from is None:
        return None
    cached = len(prefix) if prefix is not None else 0
    if cached > pool_from:
        raise ValueError(f"a reused prefix of {cached} tokens runs past the pooled tokens' start ({pool_from})")
    return pool_from - cached


def _stack(token_ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids and an all-ones mask of prompts of one length (a batch of :func:`_batches`)."""
    if len({len(t) for t in token_ids}) != 1:
        raise ValueError(f"a batch must hold prompts of one length, got {sorted({len(t) for t in token_ids})}")
    ids = torch.tensor(token_ids, dtype=torch.long)
    return ids, torch.ones_like(ids)


def _batches(indices: np.ndarray, lengths: np.ndarray, batch_size: int, alone_below: int = 0
             ) -> Iterator[np.ndarray]:
    """Chunks of at most ``batch_size`` of ``indices`` of one length each, by length, then input order;
    prompts shorter than ``alone_below`` one at a time (see ``repro.PassPlan.alone_below``).

    Padding would change a row's attention reductions (more, masked keys) and so its last bits with
    the batch it lands in; equal lengths keep every row's shapes independent of its companions."""
    if not len(indices):
        return
    order = indices[np.argsort(lengths[indices], kind="stable")]
    for group in np.split(order, np.flatnonzero(np.diff(lengths[order])) + 1):
        size = 1 if lengths[group[0]] < alone_below else batch_size
        for start in range(0, len(group), size):
            yield group[start:start + size]


def _lengths(token_ids: Sequence[Sequence[int]]) -> np.ndarray:
    lengths = np.array([len(t) for t in token_ids])
    if (lengths == 0).any():
        raise ValueError(f"prompt {int(np.argmax(lengths == 0))} is empty after tokenisation")
    return lengths


def _check(token_ids: Sequence[Sequence[int]], label_ids: Sequence[int]) -> None:
    if not token_ids:
        raise ValueError("no prompts given")
    _lengths(token_ids)
    if len(set(label_ids)) != len(label_ids):
        raise ValueError(f"label token ids must be distinct, got {list(label_ids)}")


def shared_prefix(backbone: Backbone, token_ids: list[list[int]], enabled: bool = True, stop: int | None = None,
                  limit: int | None = None) -> tuple[Prefix | None, list[list[int]]]:
    """Split off the token prefix all prompts share (demonstrations, instruction, chat header).

    Its keys and values are computed once (for layers below ``stop`` only); each prompt then costs
    only its own tokens. Results equal running whole prompts (tested), so this is purely a speed-up.
    ``limit`` caps the prefix length (at the task's own fixed prefix, so that a single prompt's
    prefix is not the whole prompt).
    """
    prefix = shared_prefix_ids(backbone, token_ids, enabled, limit)
    if not prefix:
        return None, token_ids
    return backbone.prefill(prefix, stop), [t[len(prefix):] for t in token_ids]


def shared_prefix_ids(backbone: Backbone, token_ids: list[list[int]], enabled: bool = True,
                      limit: int | None = None) -> list[int]:
    """The token ids :func:`shared_prefix` caches for these prompts ([] when it caches none)."""
    prefix = common_prefix(token_ids) if enabled else []
    prefix = prefix[:limit] if limit is not None else prefix
    if not prefix or not backbone.can_reuse_prefix(max(len(t) for t in token_ids)):
        return []
    return prefix


def batch_plan(token_ids: Sequence[Sequence[int]], batch_size: int) -> list[np.ndarray]:
    """The batches (row indices) :func:`last_token_states` runs these prompts in: one length each.

    Splitting off a prefix every prompt shares shortens all of them alike, so it keeps this plan."""
    return list(_batches(np.arange(len(token_ids)), _lengths(token_ids), batch_size))


def strip_prefix(backbone: Backbone, token_ids: list[list[int]], prefix: Prefix | None
                 ) -> tuple[Prefix | None, list[list[int]]]:
    """Use a precomputed ``prefix`` for prompts that all start with it (else none)."""
    if prefix is None or not len(prefix):
        return None, token_ids
    n = len(prefix)
    fits = backbone.can_reuse_prefix(max(len(t) for t in token_ids))
    if not fits or not all(len(t) > n and t[:n] == prefix.token_ids for t in token_ids):
        return None, token_ids
    return prefix, [t[n:] for t in token_ids]


def _lm(backbone: Backbone, label_ids: Sequence[int], readout: Readout | None) -> Readout:
    return readout if readout is not None else LMReadout(backbone, list(label_ids))


@torch.inference_mode()
def last_token_states(backbone: Backbone, token_ids: list[list[int]], batch_size: int = 8, progress: bool = False,
                      desc: str = "layers", reuse_prefix: bool = True, stop: int | None = None,
                      prefix: Prefix | None = None, pool_from: int | None = None) -> torch.Tensor:
    """Hidden states 0..stop (default L) of the last prompt token: (N, stop+1, D) float32 on the CPU,
    in input order. Everything a readout or an in-pass retrieval key needs from a build pass.

    ``prefix``: keys and values of a prefix every prompt starts with, through layer ``stop`` at least
    (a worker given one batch of a larger pass reuses the pass's prefix; else one is found here, no
    longer than ``pool_from``). ``pool_from``: the prompt position where its own tokens begin (the
    task's fixed prefix ends); each state is then :func:`summary`'s (N, stop+1, 2D), the last
    token's state first.
    """
    if not token_ids:
        raise ValueError("no prompts given")
    stop = backbone.num_layers if stop is None else stop
    plan = pass_plan(backbone)
    with plan.running():
        if prefix is not None and len(prefix.keys) >= stop:
            prefix, token_ids = strip_prefix(backbone, token_ids, prefix)
        else:
            prefix, token_ids = shared_prefix(backbone, token_ids, reuse_prefix, stop=stop, limit=pool_from)
        own = own_start(pool_from, prefix)
        batches = _batches(np.arange(len(token_ids)), _lengths(token_ids), batch_size, plan.alone_below)
        return _states(backbone, token_ids, batches, stop, prefix, own,
                       tqdm(total=len(token_ids), desc=desc, unit="ex", disable=not progress))


def _states(backbone: Backbone, token_ids: list[list[int]], batches: Iterator[np.ndarray], stop: int,
            prefix: Prefix | None, own: int | None, bar: tqdm) -> torch.Tensor:
    width = backbone.hidden_size * (1 if own is None else 2)
    out = torch.zeros(len(token_ids), stop + 1, width)
    for batch in batches:
        ids, mask = _stack([token_ids[i] for i in batch])
        state = backbone.start(ids, mask, prefix=prefix)
        rows = torch.as_tensor(batch)
        out[rows, 0] = summary(state.hidden, own).float().cpu()
        for layer in range(1, stop + 1):
            backbone.run(state, layer)
            out[rows, layer] = summary(state.hidden, own).float().cpu()
        bar.update(len(batch))
    bar.close()
    return out


def in_pass_keys(states: torch.Tensor) -> np.ndarray:
    """(N, D) last-token states at the key layer -> (N, D) float32 retrieval keys (L2-normalised).
    Of pooled states (:func:`summary`), callers pass the first D columns: the key is the last token's."""
    return torch.nn.functional.normalize(states.float(), dim=-1).cpu().numpy()


def layer_label_probs(backbone: Backbone, token_ids: list[list[int]], label_ids: Sequence[int],
                      batch_size: int = 8, progress: bool = False, desc: str = "layers",
                      reuse_prefix: bool = True, readout: Readout | None = None) -> np.ndarray:
    """Class probabilities of ``readout`` (default: the label-word readout) at every hidden state
    0..L, read at the last prompt token: (N, L+1, C) float32, uniform where the readout has no layer.
    Row order follows ``token_ids``.
    """
    _check(token_ids, label_ids)
    states = last_token_states(backbone, token_ids, batch_size, progress, desc, reuse_prefix)
    return all_layer_probs(_lm(backbone, label_ids, readout), states.to(backbone.device), len(label_ids))


def _answer(readout: Readout, layer: int, hidden: torch.Tensor, log_bias: np.ndarray | None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(class (B,), its probability (B,), every class's probability (B, C)) of ``readout`` at
    ``layer``, after the optional per-layer bias.

    One row at a time: a BLAS product of a few rows gives a row other last bits than one of a single
    row, and a text's confidence must not depend on the batch it was answered in."""
    probs = torch.cat([readout.probs(int(layer), hidden[i:i + 1]) for i in range(len(hidden))])
    if log_bias is not None:
        logp = probs.clamp_min(1e-12).log() - torch.as_tensor(log_bias[layer], device=probs.device)
        probs = logp.softmax(-1)
    top = probs.max(dim=-1)
    return top.indices.cpu(), top.values.float().cpu(), probs.float().cpu()


@torch.inference_mode()
def predict_at_layers(backbone: Backbone, token_ids: list[list[int]], label_ids: Sequence[int],
                      exit_layers: np.ndarray, batch_size: int = 8, reuse_prefix: bool = True,
                      log_bias: np.ndarray | None = None, readout: Readout | None = None,
                      prefix: Prefix | None = None, with_probs: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Predict each prompt with a forward pass that stops at its own exit layer.

    Batches hold prompts of one length and near exits; each answers its rows at their exits and goes
    on without them (:func:`_descend`), so no layer above a row's exit is ever computed for it.
    Returns (predicted class (N,), its probability (N,)).
    ``log_bias`` (L+1, C), if given, is subtracted from the readout's log-probabilities of each
    layer before the prediction (per-layer calibration, see calibration.py). ``prefix``: keys and
    values of a prefix every prompt starts with, covering at least the deepest exit (else one is made).
    ``with_probs``: return every class's probability (N, C) in place of the predicted one's.
    """
    _check(token_ids, label_ids)
    readout = _lm(backbone, label_ids, readout)
    exit_layers = np.asarray(exit_layers, dtype=np.int64)
    if exit_layers.shape != (len(token_ids),):
        raise ValueError(f"exit_layers has shape {exit_layers.shape}, expected ({len(token_ids)},)")
    if exit_layers.min() < 0 or exit_layers.max() > backbone.num_layers:
        raise ValueError(f"exit layers must lie in 0..{backbone.num_layers}, "
                         f"got {exit_layers.min()}..{exit_layers.max()}")
    plan = pass_plan(backbone)
    with plan.running():
        if prefix is not None and len(prefix.keys) >= int(exit_layers.max()):
            prefix, token_ids = strip_prefix(backbone, token_ids, prefix)
        else:
            prefix, token_ids = shared_prefix(backbone, token_ids, reuse_prefix, stop=int(exit_layers.max()),
                                              limit=readout.pool_from)
        preds, conf, probs = _truncated(backbone, token_ids, readout, exit_layers, (batch_size, plan.alone_below),
                                        log_bias, prefix)
    return preds, probs if with_probs else conf


def _truncated(backbone: Backbone, token_ids: list[list[int]], readout: Readout, exit_layers: np.ndarray,
               sizes: tuple[int, int], log_bias: np.ndarray | None, prefix: Prefix | None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    lengths = _lengths(token_ids)
    preds = np.zeros(len(token_ids), dtype=np.int64)
    conf = np.zeros(len(token_ids), dtype=np.float32)
    probs: np.ndarray | None = None
    own = own_start(readout.pool_from, prefix)

    def answer(rows: np.ndarray, layer: int, hidden: torch.Tensor) -> np.ndarray:
        nonlocal probs
        read = summary(hidden, own)
        preds[rows], conf[rows], p = (t.numpy() for t in _answer(readout, layer, read, log_bias))
        probs = _fill(probs, rows, p, len(token_ids))
        return np.full(len(rows), layer, dtype=np.int64)

    by_exit = np.lexsort((exit_layers, lengths))  # near exits together: a batch runs about as deep as its rows need
    for batch in _batches(by_exit, lengths, *sizes):
        ids, mask = _stack([token_ids[i] for i in batch])
        _descend(backbone, backbone.start(ids, mask, prefix=prefix), batch, exit_layers[batch], prefix, answer)
    return preds, conf, probs


def _descend(backbone: Backbone, state: LayerState, rows: np.ndarray, targets: np.ndarray, prefix: Prefix | None,
             answer: Callable[[np.ndarray, int, torch.Tensor], np.ndarray]) -> None:
    """Run a batch of one length on from its layer, answering each row at its target layer (a target
    below the state's layer: done already); ``answer(rows, layer, their (B, T, D) states)`` gives each
    answered row its next target (its own layer: done). The batch runs to the nearest target, answers
    the rows there and goes on without the rows that are done, so no row runs past its last target.
    One batch that shrinks, not one batch per exit layer: a layer of a few short rows costs about the
    same for one row as for eight, so splitting a batch by exit would pay that cost once per exit."""
    targets = np.asarray(targets, dtype=np.int64).copy()
    while True:
        at = np.flatnonzero(targets == state.layer)
        if len(at):
            targets[at] = answer(rows[at], state.layer, state.hidden[torch.as_tensor(at, device=state.hidden.device)])
        live = targets > state.layer
        if not live.any():
            return
        if not live.all():  # the rows that are done leave; layer l needs only layer l's keys, so the rest resume
            hidden = state.hidden[torch.as_tensor(np.flatnonzero(live), device=state.hidden.device)]
            state = backbone.resume(hidden, torch.ones(hidden.shape[:2], dtype=torch.long), state.layer,
                                    prefix=prefix)
            rows, targets = rows[live], targets[live]
        backbone.run(state, int(targets.min()))


def _fill(probs: np.ndarray | None, rows: np.ndarray, part: np.ndarray, n: int) -> np.ndarray:
    """Write ``part`` (B, C) into rows of an (n, C) array, made on first use (C is the readout's)."""
    if probs is None:
        probs = np.zeros((n, part.shape[1]), dtype=np.float32)
    probs[rows] = part
    return probs


@torch.inference_mode()
def predict_in_pass(backbone: Backbone, token_ids: list[list[int]], readout: Readout, key_layer: int,
                    decide: Callable[[np.ndarray, np.ndarray], np.ndarray], batch_size: int = 8,
                    prefix: Prefix | None = None, log_bias: np.ndarray | None = None, with_probs: bool = False,
                    confirm: Confirm | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Predict with exit layers decided inside the pass, from a key the pass computes anyway.

    Per batch of one length: run to ``key_layer`` keeping the last token's state at every layer;
    ``decide`` maps the keys (the L2-normalised last-token states at ``key_layer``, (B, D)) to exit
    layers (B,). Rows exiting at or below ``key_layer`` answer from the kept states; the batch then
    runs on, answering rows at their exits and leaving them behind (:func:`_descend`), so no layer
    runs twice and no row runs past its exit. Returns (class (N,), probability (N,), exit layer (N,));
    with ``with_probs``, every class's probability (N, C) in place of the predicted one's.

    ``decide`` is called as ``decide(keys, rows)``, ``rows`` (B,) the batch's input indices, so that a
    caller can keep per-row results of its own (RAEE keeps the neighbours' label vote).

    ``confirm(rows, probs (B, C), layer)``: called on every answered batch, it gives each row the
    layer to go on to (its own layer: none). Such rows stay in the batch (rows answered from the kept
    states go on from the key layer) and are answered again there; that becomes their exit layer.
    """
    if not 0 <= key_layer <= backbone.num_layers:
        raise ValueError(f"key layer must lie in 0..{backbone.num_layers}, got {key_layer}")
    if not token_ids:
        raise ValueError("no prompts given")
    prefix, token_ids = strip_prefix(backbone, token_ids, prefix)
    if prefix is not None and len(prefix.keys) < backbone.num_layers:
        raise ValueError("predict_in_pass needs a prefix computed through every layer")
    plan = pass_plan(backbone)
    with plan.running():
        preds, conf, exits, probs = _in_pass(backbone, token_ids, readout, key_layer, decide,
                                             (batch_size, plan.alone_below), prefix, log_bias, confirm)
    return preds, probs if with_probs else conf, exits


def _in_pass(backbone: Backbone, token_ids: list[list[int]], readout: Readout, key_layer: int,
             decide: Callable[[np.ndarray, np.ndarray], np.ndarray], sizes: tuple[int, int], prefix: Prefix | None,
             log_bias: np.ndarray | None, confirm: Confirm | None
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    lengths = _lengths(token_ids)
    n = len(token_ids)
    probs: np.ndarray | None = None
    preds, conf, exits = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.float32), np.zeros(n, dtype=np.int64)
    going: dict[int, tuple[torch.Tensor, int]] = {}  # row -> (its (T_row, D) states at key_layer, its target)
    own = own_start(readout.pool_from, prefix)

    def answer(rows: np.ndarray, layer: int, read: torch.Tensor) -> np.ndarray:
        """Answer ``rows`` at ``layer`` from what the readout reads of them (:func:`summary`); each
        row's next layer."""
        nonlocal probs
        preds[rows], conf[rows], p = (t.numpy() for t in _answer(readout, layer, read, log_bias))
        probs = _fill(probs, rows, p, n)
        exits[rows] = layer
        if confirm is None:
            return np.full(len(rows), layer, dtype=np.int64)
        targets = np.asarray(confirm(rows, p, layer), dtype=np.int64)
        on = targets != layer
        if on.any() and not ((targets[on] > max(layer, key_layer)) & (targets[on] <= backbone.num_layers)).all():
            raise ValueError(f"confirm sent rows answered at layer {layer} to layers {targets[on]}: they must lie "
                             f"above it and the key layer {key_layer}, up to {backbone.num_layers}")
        return targets

    def answer_states(rows: np.ndarray, layer: int, hidden: torch.Tensor) -> np.ndarray:
        return answer(rows, layer, summary(hidden, own))  # hidden: the rows' (B, T, D) states

    for batch in _batches(np.arange(n), lengths, *sizes):
        ids, mask = _stack([token_ids[i] for i in batch])
        state = backbone.start(ids, mask, prefix=prefix)
        kept = [summary(state.hidden, own)]  # what the readout reads at layers 0..key_layer
        for layer in range(1, key_layer + 1):
            kept.append(summary(backbone.run(state, layer).hidden, own))
        keys = in_pass_keys(state.hidden[:, -1])
        layers = np.asarray(decide(keys, batch), dtype=np.int64)  # (B,)
        if layers.shape != (len(batch),) or layers.min() < 0 or layers.max() > backbone.num_layers:
            raise ValueError(f"decide returned exit layers {layers} for a batch of {len(batch)}")
        targets = layers.copy()
        for layer in np.unique(layers[layers <= key_layer]):  # answered from the kept states
            sel = np.flatnonzero(layers == layer)
            on = answer(batch[sel], int(layer), kept[layer][torch.as_tensor(sel, device=state.hidden.device)])
            targets[sel] = np.where(on > layer, on, -1)  # -1: done (a confirmed row goes on from the key layer)
        for j in np.flatnonzero(targets > key_layer):
            going[int(batch[j])] = (state.hidden[j], int(targets[j]))
        if len(going) >= REGROUP_ROWS:
            _go_on(backbone, going, lengths, key_layer, sizes, prefix, answer_states)
    _go_on(backbone, going, lengths, key_layer, sizes, prefix, answer_states)
    return preds, conf, exits, probs


def _go_on(backbone: Backbone, going: dict[int, tuple[torch.Tensor, int]], lengths: np.ndarray, key_layer: int,
           sizes: tuple[int, int], prefix: Prefix | None,
           answer: Callable[[np.ndarray, int, torch.Tensor], np.ndarray]) -> None:
    """Run the rows of ``going`` (row -> its (T_row, D) states at ``key_layer``, its target) on, and
    empty it. Regrouped: one length per batch as before, rows of near exits together, so a batch runs
    about as deep as its rows need (a layer of a small batch costs its weights' reading)."""
    order = sorted(going, key=lambda i: (lengths[i], going[i][1], i))
    for batch in _batches(np.array(order, dtype=np.int64), lengths, *sizes):
        hidden = torch.stack([going[int(i)][0] for i in batch])
        state = backbone.resume(hidden, torch.ones(hidden.shape[:2], dtype=torch.long), key_layer, prefix=prefix)
        _descend(backbone, state, batch, np.array([going[int(i)][1] for i in batch]), prefix, answer)
    going.clear()
