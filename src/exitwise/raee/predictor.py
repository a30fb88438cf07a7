"""RAEE exit-layer selection from retrieved neighbours (docs/papers.md, "RAEE": exit-layer selection), in plain numpy.

The retrieval database stores, per training example i, its *exit entries*: every layer l in 0..L
whose label-word prediction equalled the gold label, with that layer's max label-word probability
p. For a query with neighbours j (squared-L2 distance D[j]), each neighbour contributes a filtered
subset S_j of its entries (those with p >= ``min_prob``, or else its ``fallback_top`` most confident)
weighted by w_j = 1 / D[j], and the exit layer is

    l* = argmax_l  sum_j w_j * sum_{(l', p) in S_j} p * 1[l' = l],     or L if nothing was retrieved.

The paper's code uses w_j = d_min / D[j] with d_min the smallest distance in the batch; d_min is the
same constant for every layer of a query, so it cannot change the argmax and is left out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TABLE_FILE = "exit_table.npz"
WEIGHTINGS = ("inverse_distance", "uniform")


@dataclass
class ExitTable:
    """Ragged per-example exit entries in a CSR layout (no pickle needed to store it).

    Example i's entries are ``layers[offsets[i]:offsets[i+1]]`` with probabilities
    ``probs[offsets[i]:offsets[i+1]]``; an example that is never correct has no entries.
    """

    offsets: np.ndarray  # (N+1,) int64, offsets[0] = 0, offsets[N] = M
    layers: np.ndarray  # (M,) int16, hidden-state index 0..L (0 = embedding output)
    probs: np.ndarray  # (M,) float32, max label-word probability at that layer

    def __post_init__(self) -> None:
        self.offsets = np.asarray(self.offsets, dtype=np.int64)
        self.layers = np.asarray(self.layers, dtype=np.int16)
        self.probs = np.asarray(self.probs, dtype=np.float32)
        for name in ("offsets", "layers", "probs"):
            if getattr(self, name).ndim != 1:
                raise ValueError(f"ExitTable.{name} must be 1-D, got shape {getattr(self, name).shape}")
        if self.offsets.size == 0:
            raise ValueError("ExitTable.offsets must have N+1 >= 1 elements (offsets[0] = 0)")

    @classmethod
    def from_lists(cls, tables: Sequence[Sequence[tuple[int, float]]]) -> ExitTable:
        """Build from one list of ``(layer, prob)`` pairs per example (the paper's in-memory form)."""
        counts = np.array([len(t) for t in tables], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        layers = np.array([layer for t in tables for layer, _ in t], dtype=np.int16)
        probs = np.array([p for t in tables for _, p in t], dtype=np.float32)
        return cls(offsets, layers, probs)

    @classmethod
    def from_readouts(cls, predictions: np.ndarray, max_probs: np.ndarray, labels: np.ndarray) -> ExitTable:
        """Entries from per-layer readouts (docs/papers.md, "RAEE"): predictions/max_probs (N, L+1), gold labels (N,).

        Layer l becomes an entry of example i exactly when ``predictions[i, l] == labels[i]``.
        """
        predictions, max_probs, labels = np.asarray(predictions), np.asarray(max_probs), np.asarray(labels)
        if predictions.shape != max_probs.shape or predictions.ndim != 2 or labels.shape != predictions.shape[:1]:
            raise ValueError(f"expected predictions/max_probs (N, L+1) and labels (N,), got {predictions.shape}, "
                             f"{max_probs.shape}, {labels.shape}")
        correct = predictions == labels[:, None]  # (N, L+1)
        rows, layers = np.nonzero(correct)  # row-major, so each row's layers come out ascending
        offsets = np.concatenate([[0], np.cumsum(correct.sum(axis=1))])
        return cls(offsets, layers, max_probs[rows, layers])

    def __len__(self) -> int:
        return self.offsets.size - 1

    @property
    def num_entries(self) -> int:
        return int(self.layers.size)

    def entries(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(layers, probs) of example i, as views into the table."""
        if not 0 <= i < len(self):
            raise IndexError(f"example {i} out of range for a table of {len(self)}")
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.layers[a:b], self.probs[a:b]

    def validate(self, num_layers: int) -> None:
        """Raise ValueError naming the first inconsistency (layers must lie in 0..num_layers)."""
        o = self.offsets
        if o[0] != 0:
            raise ValueError(f"ExitTable offsets must start at 0, got {o[0]}")
        if np.any(np.diff(o) < 0):
            bad = int(np.argmax(np.diff(o) < 0))
            raise ValueError(f"ExitTable offsets must be non-decreasing; offsets[{bad + 1}] < offsets[{bad}]")
        if o[-1] != self.layers.size or self.layers.size != self.probs.size:
            raise ValueError(f"ExitTable offsets end at {o[-1]} but there are {self.layers.size} layers and "
                             f"{self.probs.size} probs")
        out = (self.layers < 0) | (self.layers > num_layers)
        if out.any():
            raise ValueError(f"ExitTable layer {int(self.layers[out][0])} outside 0..{num_layers}")
        bad_p = ~((self.probs >= 0) & (self.probs <= 1))  # also catches NaN
        if bad_p.any():
            raise ValueError(f"ExitTable prob {float(self.probs[bad_p][0])} outside [0, 1]")

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        np.savez(directory / TABLE_FILE, offsets=self.offsets, layers=self.layers, probs=self.probs)

    @classmethod
    def load(cls, directory: Path) -> ExitTable:
        with np.load(Path(directory) / TABLE_FILE, allow_pickle=False) as z:
            return cls(z["offsets"], z["layers"], z["probs"])


@dataclass
class SelectConfig:
    """How the retrieved neighbours choose each query's exit layer and answer.

    The defaults are exitwise's (measured in benchmarks/raee.py; docs/raee.md, "Modes"); :meth:`paper`
    gives the RAEE authors' code's (docs/papers.md, "RAEE"). ``raee build`` replaces them with settings
    chosen per task by cross-validation on the training sample (tuning.py).
    """

    k: int = 12  # neighbours used (the first k columns of the search result, which FAISS sorts nearest first)
    min_prob: float = 0.0  # keep a neighbour's entries with p >= min_prob ...
    fallback_top: int = 3  # ... or, if it has none, its top-`fallback_top` entries by p
    weighting: str = "inverse_distance"  # or "uniform" (every retrieved neighbour weighs 1)
    # w = 1 / max(d, eps): an exact duplicate (d = 0, or a tiny negative from float error) gets a large
    # finite weight and dominates the vote, as its limit should, instead of the paper's inf/NaN.
    eps: float = 1e-6
    default_layer: int | None = None  # exit when no neighbour contributes anything; None = last layer L
    # Beyond the paper: exit at the shallowest layer whose score is >= slack * the best score (1.0 =
    # the paper's argmax). The paper's argmax goes where the neighbours are most confidently right,
    # which on a readout that improves with depth is nearly always a deep layer; a slack trades a
    # little of that mass for depth.
    slack: float = 0.8
    # Beyond the paper: never exit below this layer (0 = anywhere). Where the neighbours point at
    # shallow layers that are right for them but weak on average, a floor keeps the pass going to a
    # layer that is good for everyone; at slack -> 0 it is a fixed exit layer with retrieval on top.
    min_exit: int = 0
    # Beyond the paper: the answer is (1 - vote_weight) * readout + vote_weight * the neighbours'
    # label vote (kNN-LM's interpolation, with the exit layer's readout as the model). 0 = the readout alone.
    vote_weight: float = 0.0
    # Beyond the paper: when the neighbours' vote gives one class at least this share, answer with it
    # at once, before any layer above the key runs. None = never.
    early_vote: float | None = None
    # Beyond the paper: the confirmation. Where the answer at the exit (readout mixed with the vote)
    # gives its class less than confirm[i] of the probability, the pass goes on to confirm_layers[i]
    # (the first of them above the exit) and the answer is read there; there it may be doubted again
    # against the next level. A confident answer stops. The neighbours' exit information is a guess
    # about the query; the readout's doubt at that exit is a second, per-query signal, and it picks
    # the queries the guess sent too shallow. () = never.
    confirm: tuple[float, ...] = ()
    confirm_layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if not 0.0 <= self.min_prob <= 1.0:
            raise ValueError(f"min_prob must be in [0, 1], got {self.min_prob}")
        if self.fallback_top < 0:
            raise ValueError(f"fallback_top must be >= 0, got {self.fallback_top}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        if not self.eps > 0:
            raise ValueError(f"eps must be > 0, got {self.eps}")
        if not 0.0 < self.slack <= 1.0:
            raise ValueError(f"slack must be in (0, 1], got {self.slack}")
        if not 0.0 <= self.vote_weight <= 1.0:
            raise ValueError(f"vote_weight must be in [0, 1], got {self.vote_weight}")
        if self.min_exit < 0:
            raise ValueError(f"min_exit must be >= 0, got {self.min_exit}")
        if self.early_vote is not None and not 0.0 < self.early_vote <= 1.0:
            raise ValueError(f"early_vote must be in (0, 1] or None, got {self.early_vote}")
        self.confirm, self.confirm_layers = tuple(self.confirm), tuple(self.confirm_layers)  # JSON gives lists
        if len(self.confirm) != len(self.confirm_layers):
            raise ValueError(f"confirm {list(self.confirm)} and confirm_layers {list(self.confirm_layers)}: one "
                             f"threshold per layer")
        if not all(0.0 < t <= 1.0 for t in self.confirm):
            raise ValueError(f"confirm thresholds must be in (0, 1], got {list(self.confirm)}")
        if any(b <= a for a, b in zip(self.confirm_layers, self.confirm_layers[1:], strict=False)) or \
                any(d < 0 for d in self.confirm_layers):
            raise ValueError(f"confirm_layers must be non-negative and increasing, got {list(self.confirm_layers)}")

    @classmethod
    def paper(cls, **overrides) -> SelectConfig:
        """The RAEE authors' code's selection: argmax over entries with p >= 0.9 (else the top 3)."""
        return cls(**{"min_prob": 0.9, "slack": 1.0, **overrides})


@dataclass
class ExitDecision:
    layers: np.ndarray  # (Q,) int64, chosen hidden-state index per query
    scores: np.ndarray  # (Q, L+1) float32, accumulated w * p per layer
    fallback: np.ndarray  # (Q,) bool, True where nothing was retrieved and the default layer was used


def neighbour_mass(table: ExitTable, rows: np.ndarray, num_layers: int, config: SelectConfig) -> np.ndarray:
    """(R, L+1) float64: per example in ``rows``, the sum of p over its *filtered* entries per layer.

    The filter depends only on the example, not the query, so it is applied once per distinct
    neighbour. Fallback ranking sorts by p descending and keeps the stored order among equal p, as
    Python's stable ``sorted`` does in the paper's code.
    """
    rows = np.asarray(rows, dtype=np.int64)
    starts = table.offsets[rows]  # (R,)
    counts = table.offsets[rows + 1] - starts  # (R,)
    row_start = np.cumsum(counts) - counts  # (R,) where each row's entries begin in the gathered arrays
    total = int(counts.sum())
    seg = np.repeat(np.arange(rows.size), counts)  # (E,) row of each gathered entry
    pos = np.arange(total) - row_start[seg]  # (E,) position within its row
    src = starts[seg] + pos  # (E,) index into the table
    layers = table.layers[src].astype(np.int64)
    if layers.size and (layers.min() < 0 or layers.max() > num_layers):
        raise ValueError(f"exit table has layers outside 0..{num_layers}; was it built for another backbone?")
    probs32 = table.probs[src]  # (E,) float32 as stored
    probs = probs32.astype(np.float64)

    # Compare in float32: the stored 0.9 is float32(0.9) < 0.9, and must still pass a 0.9 threshold.
    confident = probs32 >= np.float32(config.min_prob)
    row_confident = np.zeros(rows.size, dtype=bool)
    row_confident[seg[confident]] = True
    # Rank of each entry within its row by p descending (ties: stored order); lexsort's last key is primary.
    order = np.lexsort((pos, -probs, seg))
    rank = np.empty(total, dtype=np.int64)
    rank[order] = np.arange(total) - row_start[seg[order]]
    keep = np.where(row_confident[seg], confident, rank < config.fallback_top)

    mass = np.zeros((rows.size, num_layers + 1), dtype=np.float64)
    np.add.at(mass, (seg[keep], layers[keep]), probs[keep])
    return mass


def neighbour_weights(distances: np.ndarray, valid: np.ndarray, config: SelectConfig) -> np.ndarray:
    """(Q, k) float64 weights; 0 where there is no neighbour."""
    if config.weighting == "uniform":
        return valid.astype(np.float64)
    # Distances are FAISS's squared L2, used as returned (the paper's D[j]).
    d = np.maximum(distances.astype(np.float64), config.eps)
    return np.where(valid, 1.0 / np.where(valid, d, 1.0), 0.0)


def select_exit_layers(distances: np.ndarray, ids: np.ndarray, table: ExitTable, num_layers: int,
                       config: SelectConfig | None = None, min_layer: int = 0) -> ExitDecision:
    """Choose an exit layer per query from its retrieved neighbours (see the module docstring).

    ``distances``/``ids``: (Q, k') search results, nearest first, id -1 for "no neighbour"; only the
    first ``config.k`` columns are used, so one wide search can serve a sweep over k. Equal top
    scores go to the **shallowest** layer, the cheaper exit (np.argmax returns the first maximum).
    ``min_layer``: layers below it are already paid for (an in-pass key was taken there), so an exit
    there saves nothing; they are chosen only for a query with no mass at or above ``min_layer``.
    """
    config = config or SelectConfig()
    distances, ids = np.asarray(distances), np.asarray(ids)
    if distances.shape != ids.shape or ids.ndim != 2:
        raise ValueError(f"distances and ids must both be (Q, k), got {distances.shape} and {ids.shape}")
    default = num_layers if config.default_layer is None else config.default_layer
    if not 0 <= default <= num_layers:
        raise ValueError(f"default_layer {default} outside 0..{num_layers}")
    distances, ids = distances[:, : config.k], ids[:, : config.k].astype(np.int64)  # (Q, k)
    if ids.size and ids.max() >= len(table):
        raise ValueError(f"neighbour id {int(ids.max())} out of range for an exit table of {len(table)} examples; "
                         f"index and table do not belong together")
    valid = ids >= 0  # (Q, k)
    if np.isnan(distances[valid]).any():
        raise ValueError("NaN distance for a retrieved neighbour")

    weights = neighbour_weights(distances, valid, config)  # (Q, k)
    rows, inverse = np.unique(ids[valid], return_inverse=True)
    mass = neighbour_mass(table, rows, num_layers, config)  # (R, L+1)
    per_neighbour = np.zeros(ids.shape + (num_layers + 1,), dtype=np.float64)  # (Q, k, L+1)
    per_neighbour[valid] = mass[inverse]
    scores = np.einsum("qk,qkl->ql", weights, per_neighbour)  # (Q, L+1)

    layers, fallback = choose_layers(scores, config.slack, default, min_layer)
    if config.min_exit > num_layers:
        raise ValueError(f"min_exit {config.min_exit} outside 0..{num_layers}")
    layers = np.maximum(layers, config.min_exit)
    return ExitDecision(layers=layers, scores=scores.astype(np.float32), fallback=fallback)


def choose_layers(scores: np.ndarray, slack: float, default: int, min_layer: int = 0
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(exit layer (Q,), fallback (Q,)) from per-layer scores (Q, L+1): the shallowest layer within
    ``slack`` of the best (argmax at slack 1), ``default`` where no layer has positive mass.

    Apart from :func:`select_exit_layers` so that a sweep over the slack (tuning.py) scores once."""
    # "No information" = no positive mass: no neighbours, or none with a (non-zero) entry.
    fallback = ~(scores > 0).any(axis=1)
    ranked = scores.copy()
    if min_layer > 0:
        above = (scores[:, min_layer:] > 0).any(axis=1)
        ranked[above, :min_layer] = 0.0
    if slack < 1.0:
        near_best = (ranked >= slack * ranked.max(axis=1, keepdims=True)) & (ranked > 0)
        choice = np.argmax(near_best, axis=1)  # the first (shallowest) layer within the slack
    else:
        choice = np.argmax(ranked, axis=1)
    return np.where(fallback, default, choice).astype(np.int64), fallback


def label_vote(distances: np.ndarray, ids: np.ndarray, labels: np.ndarray, num_classes: int,
               config: SelectConfig) -> np.ndarray:
    """(Q, C) float64: the first ``config.k`` neighbours' gold labels, weighted as in the exit vote
    and normalised to sum 1 per query (uniform where nothing was retrieved)."""
    distances, ids = np.asarray(distances)[:, : config.k], np.asarray(ids)[:, : config.k].astype(np.int64)
    valid = ids >= 0
    weights = neighbour_weights(distances, valid, config)  # (Q, k), 0 for missing neighbours
    votes = np.zeros((len(ids), num_classes), dtype=np.float64)
    rows = np.nonzero(valid)[0]
    np.add.at(votes, (rows, labels[ids[valid]]), weights[valid])
    total = votes.sum(1, keepdims=True)
    return np.where(total > 0, votes / np.where(total > 0, total, 1.0), 1.0 / num_classes)


def mix_answer(readout_probs: np.ndarray, vote: np.ndarray, weight: float) -> np.ndarray:
    """(Q, C): (1 - weight) * readout + weight * vote; weight 0 returns the readout's probabilities as given."""
    if weight == 0.0:
        return readout_probs
    return (1.0 - weight) * readout_probs + weight * vote


def early_answers(vote: np.ndarray, threshold: float | None) -> np.ndarray:
    """(Q,) bool: queries whose neighbours agree enough (vote share >= threshold) to answer at once."""
    if threshold is None:
        return np.zeros(len(vote), dtype=bool)
    return vote.max(1) >= threshold - 1e-9  # a unanimous vote of float weights sums to 1 within rounding


def confirm_rows(answer: np.ndarray, done: np.ndarray, layers: np.ndarray, config: SelectConfig
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One step of the confirmation for queries answered (Q, C) at ``layers`` (Q,); ``done`` (Q,):
    queries that may not go on (answered early, or already confident at a level).

    Returns (go (Q,) bool: doubtful at the first confirmation level above their layer; target (Q,):
    that level's layer where ``go``, else the layer they are at; checked (Q,) bool: had such a
    level, so one that is not ``go`` was confident and stops)."""
    layers = np.asarray(layers, dtype=np.int64)
    levels = np.asarray(config.confirm_layers, dtype=np.int64)
    nxt = np.searchsorted(levels, layers, side="right")  # the first level strictly above each layer
    checked = ~np.asarray(done, dtype=bool) & (nxt < len(levels))
    if not checked.any():
        return checked, layers.copy(), checked
    at = np.minimum(nxt, len(levels) - 1)
    go = checked & (answer.max(1) < np.asarray(config.confirm, dtype=np.float64)[at])
    return go, np.where(go, levels[at], layers), checked
