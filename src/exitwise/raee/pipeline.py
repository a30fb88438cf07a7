"""RAEE at inference: encode the query, retrieve neighbours, pick the exit layer, run only that far."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from exitwise.errors import DataError
from exitwise.models.backbone import Backbone, Prefix
from exitwise.models.spec import ModelSpec
from exitwise.raee.calibration import ExitSpace, exit_space
from exitwise.raee.database import Database, query_text
from exitwise.raee.encoders import Encoder, make_encoder
from exitwise.raee.layerwise import in_pass_keys, last_token_states, predict_at_layers, predict_in_pass
from exitwise.raee.predictor import (
    ExitDecision,
    SelectConfig,
    confirm_rows,
    early_answers,
    label_vote,
    mix_answer,
    select_exit_layers,
)
from exitwise.raee.readouts.base import load_readout
from exitwise.raee.repro import encode_alone
from exitwise.raee.tasks import Task, load_task


@dataclass
class Prediction:
    text: str
    label: str  # class name
    label_index: int
    exit_layer: int
    confidence: float  # probability of the predicted class in the answer (readout at the exit, mixed with the vote)

    def as_json(self) -> dict:
        """The JSON object ``exitwise classify --json`` prints (and ``--output`` writes) for it."""
        return {"text": self.text, "label": self.label, "label_index": self.label_index,
                "exit_layer": self.exit_layer, "confidence": round(self.confidence, 4)}


@dataclass
class Timings:
    """Wall-clock seconds of one RAEE run, split by stage."""

    encode: float = 0.0
    retrieve: float = 0.0
    forward: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def total(self) -> float:
        return self.encode + self.retrieve + self.forward


class RAEE:
    """A backbone plus its retrieval database: ``classify(texts)`` exits where the neighbours say.

    The readout, the key and (unless ``config`` is given) the exit-selection settings are the ones the
    database was built with. With an in-pass key (``backbone:<k>``) one pass answers each query: its
    state at layer k is the retrieval key, and the same pass goes on to the chosen exit.
    """

    def __init__(self, backbone: Backbone, db: Database, task: Task, encoder: Encoder | None = None,
                 config: SelectConfig | None = None, batch_size: int = 8, space: ExitSpace | None = None):
        db.check_compatible(backbone, task)
        self.backbone, self.db, self.task = backbone, db, task
        self.config = config or db.select_config()
        self.space = space or ExitSpace()
        self.label_ids = task.label_token_ids(backbone.tokenizer)
        self.readout = load_readout(db.manifest["readout"], db.path, backbone, self.label_ids)
        own = self.readout.pool_from
        if own is not None and own != (start := len(task.prefix_ids(backbone.tokenizer))):
            raise DataError(f"{db.path}: the readout pools from prompt position {own}, but task {task.name!r} "
                            f"prompts' own tokens begin at {start}")
        # The stored table is the faithful one; other exit spaces are derived from the stored
        # per-layer probabilities, so no rebuild is needed to try them.
        if self.space == ExitSpace():
            self.table, self.log_bias, self.allowed = db.table, None, db.readout_layers
        else:
            self.table, self.log_bias, self.allowed = exit_space(db.layer_probs, db.labels, self.space,
                                                                 db.readout_layers)
        self.batch_size = batch_size
        self.key_layer = db.key_layer
        levels = self.config.confirm_layers
        if levels and (self.key_layer is None or not self.key_layer < levels[0] <= levels[-1] <= db.num_layers):
            raise ValueError(f"confirm_layers {list(levels)}: a confirmation goes on in the pass, so it needs an "
                             f"in-pass key and layers in {(self.key_layer or 0) + 1}..{db.num_layers} above it "
                             f"(this database's key: {db.manifest['encoder']['spec']})")
        # offline: a database names its encoder, and opening a database never downloads
        self.encoder = None if self.key_layer is not None else (
            encoder or make_encoder(db.manifest["encoder"]["spec"], backbone=backbone, offline=True))
        self._prefix: Prefix | None = None

    @classmethod
    def open(cls, db_path: str | Path | Database, model: str | None = None, device: str | torch.device = "cpu",
             data_dir: str | Path | None = None, config: SelectConfig | None = None,
             space: ExitSpace | None = None, dtype: str = "float32") -> RAEE:
        """Load database, model (default: the one the database names, found offline; a hub id is only
        loaded when given as ``model``) and task together. ``db_path``: a path, or a Database already
        opened (a command that read it to check its flags does not load and checksum it again)."""
        from exitwise.models.loading import load_model, load_recorded_model

        db = db_path if isinstance(db_path, Database) else Database.load(db_path)
        backbone = load_model(model, device=device, dtype=dtype) if model else \
            load_recorded_model(db.manifest["model"]["name"], f"database {db.path}", device=device, dtype=dtype)
        task = load_task(db.manifest["task_source"], data_dir=data_dir)
        return cls(backbone, db, task, config=config, space=space)

    def prefix(self) -> Prefix | None:
        """Keys and values of the task's fixed prompt prefix (instruction, demonstrations) through
        every layer, computed once per RAEE object and reused by every call."""
        if self._prefix is None:
            ids = self.task.prefix_ids(self.backbone.tokenizer)
            self._prefix = self.backbone.prefill(ids) if ids else Prefix([], [], [])
        return self._prefix if len(self._prefix) else None

    def keys(self, texts: list[str]) -> np.ndarray:
        """(Q, dim) retrieval keys of ``texts`` (a separate pass for an in-pass key: for analysis only)."""
        if self.encoder is not None:
            return encode_alone(self.encoder, [query_text(self.task, t) for t in texts])
        token_ids = self.task.encode(texts, self.backbone.tokenizer)
        states = last_token_states(self.backbone, token_ids, self.batch_size, stop=self.key_layer,
                                   reuse_prefix=False, prefix=self.prefix())
        return in_pass_keys(states[:, self.key_layer, :self.backbone.hidden_size])

    def neighbours(self, texts: list[str], timings: Timings | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(distances (Q, k), ids (Q, k)) of each text's nearest training examples."""
        t0 = time.perf_counter()
        queries = self.keys(texts)
        t1 = time.perf_counter()
        dist, ids = self.db.store.search(queries, self.config.k)
        t2 = time.perf_counter()
        if timings is not None:
            timings.encode += t1 - t0
            timings.retrieve += t2 - t1
        return dist, ids

    def exit_layers(self, dist: np.ndarray, ids: np.ndarray, timings: Timings | None = None) -> ExitDecision:
        t0 = time.perf_counter()
        decision = select_exit_layers(dist, ids, self.table, self.db.num_layers, self.config,
                                      min_layer=self.key_layer or 0)
        if timings is not None:
            timings.retrieve += time.perf_counter() - t0
        return decision

    def forward(self, token_ids: list[list[int]], layers: np.ndarray, timings: Timings | None = None,
                prefix: Prefix | None = None, with_probs: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(class index (N,), confidence (N,)) from passes truncated at ``layers`` (after ``prefix``,
        default the task's); ``with_probs``: every class's probability (N, C) in place of the confidence."""
        t0 = time.perf_counter()
        # never a prefix of these texts only: what the others share must not change a text's arithmetic
        preds, conf = predict_at_layers(self.backbone, token_ids, self.label_ids, layers, batch_size=self.batch_size,
                                        log_bias=self.log_bias, readout=self.readout, reuse_prefix=False,
                                        prefix=self.prefix() if prefix is None else prefix, with_probs=with_probs)
        if timings is not None:
            timings.forward += time.perf_counter() - t0
        return preds, conf

    def predict(self, texts: list[str], timings: Timings | None = None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(class index (N,), exit layer (N,), confidence (N,)) for each text."""
        token_ids = self.task.encode(texts, self.backbone.tokenizer)
        prefix = self.prefix()
        fits = np.array([prefix is None or self.backbone.can_reuse_prefix(len(t)) for t in token_ids])
        if fits.all():
            return self._predict(texts, token_ids, prefix, timings)
        # A prompt longer than a sliding window runs without the cached prefix, and a pass takes one
        # prefix for all its rows: such prompts go apart, so that the others keep the arithmetic they
        # have alone.
        out = (np.zeros(len(texts), dtype=np.int64), np.zeros(len(texts), dtype=np.int64),
               np.zeros(len(texts), dtype=np.float32))
        for rows, part_prefix in ((np.flatnonzero(fits), prefix), (np.flatnonzero(~fits), Prefix([], [], []))):
            if rows.size:
                part = self._predict([texts[i] for i in rows], [token_ids[i] for i in rows], part_prefix, timings)
                for whole, got in zip(out, part, strict=True):
                    whole[rows] = got
        return out

    def _predict(self, texts: list[str], token_ids: list[list[int]], prefix: Prefix | None,
                 timings: Timings | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`predict` of prompts that all use ``prefix`` (an empty one: none)."""
        votes = np.zeros((len(texts), len(self.task.labels)))  # the neighbours' label vote per row
        if self.key_layer is None:
            dist, ids = self.neighbours(texts, timings)
            votes[:] = label_vote(dist, ids, self.db.labels, votes.shape[1], self.config)
            layers = self.exit_layers(dist, ids, timings).layers
            early = early_answers(votes, self.config.early_vote)
            layers[early] = 0  # answered by the neighbours: no layer runs
            preds = np.zeros(len(texts), dtype=np.int64)
            probs = np.zeros(votes.shape, dtype=np.float32)
            conf = np.zeros(len(texts), dtype=np.float32)
            run = np.flatnonzero(~early)
            if run.size:
                preds[run], probs[run] = self.forward([token_ids[i] for i in run], layers[run], timings,
                                                      prefix=prefix, with_probs=True)
                conf[run] = probs[run, preds[run]]
            return self._answer(preds, conf, probs, votes, early, layers)
        local = Timings()

        def decide(keys: np.ndarray, rows: np.ndarray) -> np.ndarray:
            t0 = time.perf_counter()
            dist, ids = self.db.store.search(keys, self.config.k)
            local.retrieve += time.perf_counter() - t0
            votes[rows] = label_vote(dist, ids, self.db.labels, votes.shape[1], self.config)
            layers = self.exit_layers(dist, ids, local).layers
            # neighbours that agree enough answer now: the pass stops at the key layer
            return np.where(early_answers(votes[rows], self.config.early_vote), self.key_layer, layers)

        def go_on(rows: np.ndarray, probs: np.ndarray, layer: int) -> np.ndarray:
            c = self.config
            answer = mix_answer(probs.astype(np.float64), votes[rows], c.vote_weight)
            # rows the neighbours answered stop at the key layer; the others are asked the first
            # level above the layer they were read at (confident there: they stop)
            early = early_answers(votes[rows], c.early_vote)
            return confirm_rows(answer, early, np.full(len(rows), layer), c)[1]

        confirm = go_on if self.config.confirm else None
        t0 = time.perf_counter()
        preds, probs, layers = predict_in_pass(self.backbone, token_ids, self.readout, self.key_layer, decide,
                                               self.batch_size, prefix=prefix if prefix else None,
                                               log_bias=self.log_bias, with_probs=True, confirm=confirm)
        if timings is not None:
            timings.retrieve += local.retrieve
            timings.forward += time.perf_counter() - t0 - local.retrieve
        conf = probs[np.arange(len(preds)), preds]
        return self._answer(preds, conf, probs, votes, early_answers(votes, self.config.early_vote), layers)

    def _answer(self, preds: np.ndarray, conf: np.ndarray, probs: np.ndarray, votes: np.ndarray, early: np.ndarray,
                layers: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(class, exit layer, confidence): the readout's answer mixed with the neighbours' vote
        (``vote_weight``), the vote alone where the neighbours answered early."""
        if self.config.vote_weight > 0:  # at weight 0 the readout's own answer stands, bit for bit
            answer = mix_answer(probs.astype(np.float64), votes, self.config.vote_weight)
            preds = answer.argmax(1)
            conf = answer[np.arange(len(preds)), preds].astype(np.float32)
        if early.any():
            preds = np.where(early, votes.argmax(1), preds)
            conf = np.where(early, votes.max(1), conf).astype(np.float32)
        return preds, layers, conf

    def layers_run(self, exit_layers: np.ndarray) -> np.ndarray:
        """Decoder layers each query actually ran: its exit, or the key layer if it exited below it."""
        return np.maximum(exit_layers, self.key_layer or 0)

    def classify(self, texts: list[str]) -> list[Prediction]:
        if not texts:
            return []
        preds, layers, conf = self.predict(list(texts))
        return [Prediction(t, self.task.labels[p], int(p), int(layer), float(c))
                for t, p, layer, c in zip(texts, preds, layers, conf, strict=True)]



@dataclass
class RAEESpec:
    """What :meth:`RAEE.open` needs, as plain values: a Ray worker opens its own RAEE from it."""

    db: str
    # name None: the model the database records; dtype and device as RAEE.open's defaults
    model: ModelSpec = field(default_factory=lambda: ModelSpec(name=None, dtype="float32"))
    data_dir: str | None = None
    config: SelectConfig | None = None  # None: the database's own selection settings
    space: ExitSpace | None = None
    nprobe: int | None = None  # IVF probes at search time (ivfpq store only)

    def open(self, db: Database | None = None) -> RAEE:
        """The RAEE; ``db``: the database of ``self.db`` already opened (it is then not loaded again)."""
        m = self.model
        raee = RAEE.open(self.db if db is None else db, model=m.name, device=m.device, dtype=m.dtype,
                         data_dir=self.data_dir, config=self.config, space=self.space)
        if self.nprobe is not None:
            if not hasattr(raee.db.store, "nprobe"):
                raise ValueError(f"--nprobe applies to the ivfpq store; this database uses {raee.db.store.kind!r}")
            raee.db.store.nprobe = self.nprobe
        return raee


def input_text(where: str, value: object) -> str:
    """The text of one parsed line of a classify input file (``{"text": ...}``); else a DataError at ``where``."""
    text = value.get("text") if isinstance(value, dict) else None
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{where}: field 'text' must be a non-empty string")
    return text
