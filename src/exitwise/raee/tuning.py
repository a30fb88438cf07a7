"""Per-task selection settings chosen by cross-validation on the training sample (beyond the paper).

One setting is a key layer (where the in-pass key is taken), ``k``, the ``slack``, the weight of the
neighbours' label vote in the answer, the early-vote threshold and the confirmation (a doubt
threshold and the deeper layer a doubtful answer is read at; predictor.SelectConfig). Every setting
is scored on the training sample alone, out of fold:

* the readout's training probabilities are already out of fold (readouts/probe.py), so the exit
  table and the answers at every layer are those of probes that never saw the example;
* each training example retrieves its neighbours among the *other* training examples
  (leave-one-out), at the candidate key layer.

So a setting's cross-validated accuracy and mean layers run come from numpy over arrays the build
pass computes anyway: a grid of tens of thousands of settings costs seconds, and no test example is
ever looked at. :func:`simulate` is also what ``raee eval`` uses to draw RAEE over its settings on
the test sample, so the frontier it draws and the choice made here are one computation.

The confirmation is searched in a second stage, on each key layer's frontier of the other settings
(a confirmation only makes a setting deeper and, where it pays, more accurate, so a setting below
that frontier would need it to gain more than the frontier's own settings to matter); of each
setting's confirmations only its own frontier is kept, which loses nothing for :func:`choose`.

Cost: a query runs ``max(exit, key layer)`` layers (the key layer when the neighbours answer early,
the confirmation layer when its answer was confirmed there),
plus :data:`HEAD_COST` layer-equivalents that every query pays whatever its depth (readout,
retrieval, smaller batches per exit layer). The estimated speed-up is ``(L + HEAD_COST) /
(layers run + HEAD_COST)``; ``raee eval`` measures the real one in wall time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace

import numpy as np
from tqdm.auto import tqdm

from exitwise.raee.predictor import (
    ExitTable,
    SelectConfig,
    choose_layers,
    confirm_rows,
    early_answers,
    label_vote,
    mix_answer,
    select_exit_layers,
)

# Layer-equivalents every query pays besides its layers: fitted from the default mode's measured
# speed-up against its mean layers run on the eight tasks (docs/raee.md, "Per-task settings").
HEAD_COST = 1.5
OBJECTIVES = ("accuracy", "balanced", "speed")
# How much cross-validated accuracy an objective gives up for a cheaper setting: "accuracy" takes
# the most accurate setting (cheapest among exact ties), "speed" the cheapest within 2 points of it.
TOLERANCE = {"accuracy": 0.0, "balanced": 0.005, "speed": 0.02}
# "balanced" and "speed" also ask this estimated speed-up unless told otherwise (--min-speedup /
# --max-depth), where some setting reaches it (a model of a few layers may have none: then none).
# Measured, the wall-time speed-up meets the estimate where prompts are long and falls under it where
# they are short. Lower floors (1.8, 1.7) did better in nested cross-validation on the training
# samples and worse on the test split, and were not kept (docs/raee.md, "Choosing the floor").
DEFAULT_MIN_SPEEDUP = 2.0


@dataclass(frozen=True)
class Objective:
    """What ``raee build`` optimises: ``name`` (accuracy, balanced or speed) and optional bounds."""

    name: str = "balanced"
    min_speedup: float | None = None  # estimated speed-up over the full model at least this
    max_depth: float | None = None  # mean layers run at most this

    def __post_init__(self) -> None:
        if self.name not in OBJECTIVES:
            raise ValueError(f"--objective {self.name!r}: choose one of {', '.join(OBJECTIVES)}")
        if self.min_speedup is not None and not self.min_speedup >= 1.0:
            raise ValueError(f"--min-speedup {self.min_speedup}: must be at least 1 (1 = no speed-up)")
        if self.max_depth is not None and not self.max_depth > 0:
            raise ValueError(f"--max-depth {self.max_depth}: must be a positive mean number of layers")

    def bounds(self) -> tuple[float | None, float | None]:
        """(min speed-up, max depth) this objective asks; "balanced" and "speed" bring a speed-up floor
        of their own; with the tolerances, "speed" is never slower than "balanced", nor "balanced"
        than "accuracy"."""
        floor = self.min_speedup
        if floor is None and self.max_depth is None and self.name != "accuracy":
            floor = DEFAULT_MIN_SPEEDUP
        return floor, self.max_depth


@dataclass(frozen=True)
class SearchSpace:
    """The settings tried. ``key_layers`` None: every layer 1..L//2 for an in-pass key (a separate
    encoder's key has none to choose)."""

    key_layers: tuple[int, ...] | None = None
    ks: tuple[int, ...] = (4, 8, 16, 32)
    slacks: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    vote_weights: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
    early_votes: tuple[float | None, ...] = (None, 0.8, 0.9, 1.0)
    # floors as fractions of depth (0 = none): round(f * L) for each, on the model at hand
    min_exit_depths: tuple[float, ...] = (0.0,)
    # the confirmation: up to this many levels (0 = none), each a doubt threshold of `confirms` and a
    # layer of `confirm_layers` (None = every layer above the key layer and the level before)
    confirm_levels: int = 1
    confirms: tuple[float, ...] = (0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0)
    confirm_layers: tuple[int, ...] | None = None
    # a confirmation the user fixed, (thresholds, layers): every setting gets exactly this one
    chain: tuple[tuple[float, ...], tuple[int, ...]] | None = None

    def pinned(self, **given) -> SearchSpace:
        """This space with the dimensions the user fixed (non-None values) reduced to one value
        (``confirm`` and ``confirm_layers``, one threshold per layer, to that one confirmation)."""
        plural = {"key_layer": "key_layers", "k": "ks", "slack": "slacks", "vote_weight": "vote_weights",
                  "early_vote": "early_votes"}
        chain = (given.pop("confirm", None), given.pop("confirm_layers", None))
        space = replace(self, **{plural[name]: (value,) for name, value in given.items() if value is not None})
        if chain == (None, None):
            return space
        if None in chain or len(chain[0]) != len(chain[1]):
            raise ValueError(f"--confirm {chain[0]} and --confirm-layers {chain[1]}: give both, one threshold "
                             f"per layer")
        return replace(space, chain=(tuple(chain[0]), tuple(chain[1])))


@dataclass
class Candidate:
    """One setting and its figures on one sample (cross-validated on training data, or on test)."""

    key_layer: int | None
    k: int
    slack: float
    vote_weight: float
    early_vote: float | None
    min_exit: int
    accuracy: float
    mean_layers_run: float
    speedup: float  # estimated from layers run (see the module docstring)
    early_share: float  # share of queries the neighbours answered before any layer above the key
    confirm: tuple[float, ...] = ()
    confirm_layers: tuple[int, ...] = ()
    confirm_share: float = 0.0  # share of queries whose answer was read again deeper

    def settings(self) -> dict:
        return {"key_layer": self.key_layer, "k": self.k, "slack": self.slack, "vote_weight": self.vote_weight,
                "early_vote": self.early_vote, "min_exit": self.min_exit, "confirm": list(self.confirm),
                "confirm_layers": list(self.confirm_layers)}

    def config(self, base: SelectConfig) -> SelectConfig:
        """``base`` with this candidate's settings."""
        return replace(base, k=self.k, slack=self.slack, vote_weight=self.vote_weight, early_vote=self.early_vote,
                       min_exit=self.min_exit, confirm=tuple(self.confirm), confirm_layers=tuple(self.confirm_layers))

    def as_json(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else list(v) if isinstance(v, tuple) else v)
                for k, v in asdict(self).items()}


def estimated_speedup(layers_run: float, num_layers: int, head_cost: float = HEAD_COST) -> float:
    return (num_layers + head_cost) / (layers_run + head_cost)


def nearest(queries: np.ndarray, keys: np.ndarray, k: int, *, exclude_self: bool = False
            ) -> tuple[np.ndarray, np.ndarray]:
    """(squared L2 distances (Q, k), ids (Q, k)) of each query's nearest keys, nearest first, exactly;
    ``exclude_self``: the queries are the keys, and each skips itself."""
    queries, keys = np.asarray(queries, dtype=np.float64), np.asarray(keys, dtype=np.float64)
    d = np.maximum((queries * queries).sum(1)[:, None] + (keys * keys).sum(1)[None, :] - 2.0 * queries @ keys.T, 0.0)
    if exclude_self:
        np.fill_diagonal(d, np.inf)
    k = min(k, len(keys) - exclude_self)
    ids = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, ids, 1).astype(np.float32), ids.astype(np.int64)


def leave_one_out(keys: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(squared L2 distances (N, k), ids (N, k)) of each key's nearest *other* keys, nearest first."""
    return nearest(keys, keys, k, exclude_self=True)


def exit_table(probs: np.ndarray, labels: np.ndarray, exits: np.ndarray) -> ExitTable:
    """The exit table of a sample's (N, L+1, C) readout probabilities: the layers, among ``exits`` (L+1,)
    bool, whose readout was right, with its probability."""
    return ExitTable.from_readouts(np.where(exits[None, :], probs.argmax(-1), -1), probs.max(-1), labels)


def best_fixed_layer(probs: np.ndarray, labels: np.ndarray, exits: np.ndarray) -> tuple[int, float]:
    """(layer, accuracy) of the single readout layer, among ``exits``, most accurate on the sample."""
    layer_acc = (probs.argmax(-1) == labels[:, None]).mean(0)
    layer = int(np.flatnonzero(exits)[np.argmax(layer_acc[exits])])
    return layer, float(layer_acc[layer])


@dataclass
class Outcome:
    """What one setting does to each query of a sample."""

    pred: np.ndarray  # (Q,) class
    exit_layer: np.ndarray  # (Q,) layer the answer was read at (the key layer for an early answer)
    layers_run: np.ndarray  # (Q,)
    early: np.ndarray  # (Q,) bool
    confirmed: np.ndarray  # (Q,) bool: read again deeper (the confirmation)


def simulate(distances: np.ndarray, ids: np.ndarray, table: ExitTable, probs: np.ndarray, train_labels: np.ndarray,
             config: SelectConfig, key_layer: int | None) -> Outcome:
    """RAEE with ``config`` on queries whose neighbours are given and whose readout probabilities at
    every layer (Q, L+1, C) are known: what ``RAEE.predict`` answers, without running the model."""
    num_layers = probs.shape[1] - 1
    min_layer = key_layer or 0
    decision = select_exit_layers(distances, ids, table, num_layers, config, min_layer=min_layer)
    vote = label_vote(distances, ids, train_labels, probs.shape[2], config)
    return _outcome(decision.layers, vote, probs, config, min_layer)


@dataclass
class _Answers:
    """A setting's answers on a sample, as far as its confirmation levels have taken them."""

    answer: np.ndarray  # (Q, C) float64: readout mixed with the vote, where each query was read last
    layers: np.ndarray  # (Q,) the layer that was
    done: np.ndarray  # (Q,) bool: may not go on (answered early, or confident at a level)
    early: np.ndarray  # (Q,) bool
    confirmed: np.ndarray  # (Q,) bool
    vote: np.ndarray  # (Q, C)

    @property
    def pred(self) -> np.ndarray:
        return np.where(self.early, self.vote.argmax(1), self.answer.argmax(1))

    def layers_run(self, min_layer: int) -> np.ndarray:
        """(Q,) layers each query ran: the key layer ``min_layer`` at least, and for an early answer."""
        return np.where(self.early, min_layer, np.maximum(self.layers, min_layer))


def _answers(layers: np.ndarray, vote: np.ndarray, probs: np.ndarray, config: SelectConfig) -> _Answers:
    """The answers of ``config`` at the neighbours' exits ``layers`` (Q,), then its confirmation."""
    rows = np.arange(len(layers))
    early = early_answers(vote, config.early_vote)
    state = _Answers(mix_answer(probs[rows, layers].astype(np.float64), vote, config.vote_weight),
                     np.asarray(layers, dtype=np.int64), early.copy(), early, np.zeros(len(rows), dtype=bool), vote)
    while True:
        go, target, checked = confirm_rows(state.answer, state.done, state.layers, config)
        if not go.any():
            return state
        deeper = mix_answer(probs[rows[go], target[go]].astype(np.float64), vote[go], config.vote_weight)
        state.answer = state.answer.copy()
        state.answer[go] = deeper
        state.layers, state.done = target, state.done | (checked & ~go)
        state.confirmed = state.confirmed | go


def _outcome(layers: np.ndarray, vote: np.ndarray, probs: np.ndarray, config: SelectConfig, min_layer: int
             ) -> Outcome:
    state = _answers(layers, vote, probs, config)
    exit_layer = np.where(state.early, min_layer, state.layers)
    return Outcome(state.pred, exit_layer, state.layers_run(min_layer), state.early, state.confirmed)


def sweep(neighbours: Callable[[int | None], tuple[np.ndarray, np.ndarray]], table: ExitTable, probs: np.ndarray,
          labels: np.ndarray, train_labels: np.ndarray, space: SearchSpace, base: SelectConfig,
          key_layers: Iterable[int | None], head_cost: float = HEAD_COST, progress: bool = False,
          desc: str = "settings") -> tuple[list[Candidate], int]:
    """Every setting of ``space`` (at each of ``key_layers``) scored on one sample: (the settings
    kept, the number scored). Every setting without a confirmation is kept; of the confirmations,
    each base setting's frontier (see the module docstring).

    ``neighbours(key_layer)``: the sample's (distances, ids), at least ``max(space.ks)`` columns;
    ``probs``: its (Q, L+1, C) readout probabilities; ``labels``: its gold labels; ``train_labels``:
    those of the database rows the ids point to. The slack, vote weight and threshold are applied to
    one scoring per key layer and k (:func:`~exitwise.raee.predictor.choose_layers`)."""
    num_layers = probs.shape[1] - 1
    rows = np.arange(len(labels))
    out: list[Candidate] = []
    scored = 0
    key_layers = list(key_layers)
    floors = sorted({round(f * num_layers) for f in space.min_exit_depths})
    for key_layer in tqdm(key_layers, desc=desc, disable=not progress, unit="key layer"):
        distances, ids = neighbours(key_layer)
        min_layer = key_layer or 0
        default = num_layers if base.default_layer is None else base.default_layer
        for k in space.ks:
            config = replace(base, k=k, slack=1.0)
            scores = select_exit_layers(distances, ids, table, num_layers, config, min_layer=min_layer).scores
            vote = label_vote(distances, ids, train_labels, probs.shape[2], config)
            for slack, floor in [(s, f) for s in space.slacks for f in floors]:
                layers, _ = choose_layers(scores.astype(np.float64), slack, default, min_layer)
                layers = np.maximum(layers, floor)
                at_exit = probs[rows, layers].astype(np.float64)
                for weight in space.vote_weights:
                    answer = mix_answer(at_exit, vote, weight).argmax(1)
                    for early_vote in space.early_votes:
                        early = early_answers(vote, early_vote)
                        pred = np.where(early, vote.argmax(1), answer)
                        run = np.where(early, min_layer, np.maximum(layers, min_layer))
                        depth = float(run.mean())
                        out.append(Candidate(key_layer, k, slack, weight, early_vote, floor,
                                             float((pred == labels).mean()),
                                             depth, estimated_speedup(depth, num_layers, head_cost),
                                             float(early.mean())))
        plain = [c for c in out if c.key_layer == key_layer]
        scored += len(plain)
        if space.chain is not None:  # the user's confirmation on every setting, and no setting without it
            out = [c for c in out if c.key_layer != key_layer]
            out.extend(_chained(c, space.chain, distances, ids, table, probs, labels, train_labels, base, head_cost)
                       for c in plain)
            continue
        front = pareto(plain)
        for _ in range(space.confirm_levels):
            found: list[Candidate] = []
            for c in front:
                more, tried = _confirmations(c, distances, ids, table, probs, labels, train_labels, space, base,
                                             head_cost)
                found.extend(more)
                scored += tried
            out.extend(found)
            front = pareto(found)
    return out, scored


def _walk(c: Candidate, distances: np.ndarray, ids: np.ndarray, table: ExitTable, probs: np.ndarray,
          train_labels: np.ndarray, base: SelectConfig) -> _Answers:
    config = c.config(base)
    num_layers = probs.shape[1] - 1
    layers = select_exit_layers(distances, ids, table, num_layers, config, min_layer=c.key_layer or 0).layers
    return _answers(layers, label_vote(distances, ids, train_labels, probs.shape[2], config), probs, config)


def _scored(c: Candidate, state: _Answers, labels: np.ndarray, min_layer: int, num_layers: int, head_cost: float
            ) -> Candidate:
    """``c`` with the figures of its answers ``state``."""
    depth = float(state.layers_run(min_layer).mean())
    return replace(c, accuracy=float((state.pred == labels).mean()), mean_layers_run=depth,
                   speedup=estimated_speedup(depth, num_layers, head_cost), confirm_share=float(state.confirmed.mean()))


def _chained(c: Candidate, chain: tuple[tuple[float, ...], tuple[int, ...]], distances: np.ndarray, ids: np.ndarray,
             table: ExitTable, probs: np.ndarray, labels: np.ndarray, train_labels: np.ndarray, base: SelectConfig,
             head_cost: float) -> Candidate:
    """Setting ``c`` with the confirmation ``chain`` (thresholds, layers), scored."""
    c = replace(c, confirm=tuple(chain[0]), confirm_layers=tuple(chain[1]))
    state = _walk(c, distances, ids, table, probs, train_labels, base)
    return _scored(c, state, labels, c.key_layer or 0, probs.shape[1] - 1, head_cost)


def _confirmations(c: Candidate, distances: np.ndarray, ids: np.ndarray, table: ExitTable, probs: np.ndarray,
                   labels: np.ndarray, train_labels: np.ndarray, space: SearchSpace, base: SelectConfig,
                   head_cost: float) -> tuple[list[Candidate], int]:
    """Setting ``c`` with one more confirmation level (each threshold of ``space`` at each layer above
    the key layer and ``c``'s last level): (the frontier of those that confirm anything, the number
    scored). Queries still open after ``c``'s levels have none above them, so the new level is the
    next for every one of them below its layer."""
    num_layers = probs.shape[1] - 1
    min_layer = c.key_layer or 0
    state = _walk(c, distances, ids, table, probs, train_labels, base)
    rows = np.arange(len(labels))
    top = state.answer.max(1)
    pred = state.pred
    run = state.layers_run(min_layer)
    above = max([min_layer, *c.confirm_layers])
    deep_layers = [d for d in (space.confirm_layers or range(above + 1, num_layers + 1)) if above < d <= num_layers]
    found: list[Candidate] = []
    for deep in deep_layers:
        deeper = mix_answer(probs[rows, deep].astype(np.float64), state.vote, c.vote_weight).argmax(1)
        open_below = ~state.done & (state.layers < deep)
        for threshold in space.confirms:
            go = open_below & (top < threshold)
            if not go.any():
                continue
            depth = float(np.where(go, deep, run).mean())
            found.append(replace(c, confirm=(*c.confirm, threshold), confirm_layers=(*c.confirm_layers, int(deep)),
                                 accuracy=float((np.where(go, deeper, pred) == labels).mean()), mean_layers_run=depth,
                                 speedup=estimated_speedup(depth, num_layers, head_cost),
                                 confirm_share=float((state.confirmed | go).mean())))
    return pareto(found), len(deep_layers) * len(space.confirms)


def choose(candidates: list[Candidate], objective: Objective) -> Candidate:
    """The setting ``objective`` asks for among ``candidates``: the cheapest within the objective's
    tolerance of the most accurate setting that meets its bounds. A setting that skips nothing (no
    speed-up) is never chosen."""
    floor, max_depth = objective.bounds()
    if not candidates:
        raise ValueError("no setting to choose from: the search space is empty")
    soft = objective.min_speedup is None and floor is not None  # the objective's own floor
    if soft and not any(c.speedup >= floor for c in candidates):
        floor = None
    feasible = [c for c in candidates if c.speedup > 1.0 + 1e-9
                and (floor is None or c.speedup >= floor) and (max_depth is None or c.mean_layers_run <= max_depth)]
    if not feasible:
        fastest = max(candidates, key=lambda c: c.speedup)
        asked = f"--min-speedup {floor}" if floor is not None else f"--max-depth {max_depth}"
        raise ValueError(f"{asked}: no setting reaches it on the training sample (the fastest tried: "
                         f"{fastest.speedup:.2f}x at {fastest.mean_layers_run:.1f} layers)")
    best = max(c.accuracy for c in feasible)
    pool = [c for c in feasible if c.accuracy >= best - TOLERANCE[objective.name] - 1e-12]
    # cheapest first; then the more accurate; then the simpler (less vote, no early answer): grid order
    return min(pool, key=lambda c: (round(c.mean_layers_run, 6), -c.accuracy))


def pareto(candidates: list[Candidate]) -> list[Candidate]:
    """The candidates no other beats on both accuracy and speed-up (ties kept once), fastest first."""
    ordered = sorted(candidates, key=lambda c: (-c.speedup, -c.accuracy))
    front: list[Candidate] = []
    for c in ordered:
        if not front or c.accuracy > front[-1].accuracy + 1e-12:
            front.append(c)
    return front


@dataclass
class TuneResult:
    """The chosen setting, its cross-validated figures and the baselines on the same folds."""

    chosen: Candidate
    objective: Objective
    space: SearchSpace
    head_cost: float
    best_fixed: dict  # {"layer", "accuracy"} out of fold, any depth
    knn: dict  # {"accuracy"} of the chosen key's leave-one-out label vote at the chosen k
    front: list[Candidate] = field(default_factory=list)  # the cross-validated frontier
    num_settings: int = 0

    def select(self, base: SelectConfig) -> SelectConfig:
        return self.chosen.config(base)

    def as_json(self) -> dict:
        return {"objective": asdict(self.objective), "bounds": dict(zip(("min_speedup", "max_depth"),
                                                                        self.objective.bounds(), strict=True)),
                "tolerance": TOLERANCE[self.objective.name], "head_cost": self.head_cost,
                "space": asdict(self.space), "settings_tried": self.num_settings,
                "chosen": self.chosen.settings(), "cv": self.chosen.as_json(), "chosen_on": "train (out of fold)",
                "best_fixed": self.best_fixed, "knn": self.knn, "front": [c.as_json() for c in self.front]}


def tune(key_at: Callable[[int | None], np.ndarray], probs: np.ndarray, labels: np.ndarray,
         readout_layers: np.ndarray, objective: Objective, space: SearchSpace, base: SelectConfig,
         key_layers: list[int | None], head_cost: float = HEAD_COST, progress: bool = False) -> TuneResult:
    """Choose the setting for ``objective`` on a training sample, out of fold.

    ``key_at(layer)``: the (N, dim) keys of the sample at an in-pass key layer (or the separate
    encoder's keys for None); ``probs``: (N, L+1, C) out-of-fold readout probabilities;
    ``readout_layers``: (L+1,) bool, where the readout exists."""
    exits = np.asarray(readout_layers, dtype=bool)
    table = exit_table(probs, labels, exits)
    cache: dict[int | None, tuple[np.ndarray, np.ndarray]] = {}

    def neighbours(layer: int | None) -> tuple[np.ndarray, np.ndarray]:
        if layer not in cache:
            cache[layer] = leave_one_out(key_at(layer), max(space.ks))
        return cache[layer]

    candidates, scored = sweep(neighbours, table, probs, labels, labels, space, base, key_layers, head_cost, progress,
                       desc="choosing settings (cross-validation)")
    chosen = choose(candidates, objective)
    fixed, fixed_accuracy = best_fixed_layer(probs, labels, exits)
    distances, ids = neighbours(chosen.key_layer)
    vote = label_vote(distances, ids, labels, probs.shape[2], replace(base, k=chosen.k))
    return TuneResult(chosen, objective, space, head_cost,
                      best_fixed={"layer": fixed, "accuracy": round(fixed_accuracy, 4)},
                      knn={"accuracy": round(float((vote.argmax(1) == labels).mean()), 4), "k": chosen.k},
                      front=pareto([c for c in candidates if c.key_layer == chosen.key_layer]),
                      num_settings=scored)
