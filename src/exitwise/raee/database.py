"""The RAEE retrieval database: build, save atomically, load with integrity checks.

A database is a directory::

    manifest.json    model, task fingerprint, encoder, store, versions, counts, sha256 of every file
    exit_table.*     per training example: every layer whose readout was right, with its probability
                     (see predictor.ExitTable)
    labels.npy       gold labels of the training examples (for the kNN-vote baseline)
    layer_probs.npy  (N, L+1, C) float16 readout probabilities at every layer (out of fold for a fitted
                     readout), so that exit strategies beyond the paper need no rebuild
    readout/         the readout's own files, if it has any (see readouts/)
    store/           the vector index (see retrieval.py)

The manifest also records the training sample (seed, limit, class counts), the readout, the key
(a separate encoder, or ``backbone:<k>``: the answering pass's own state at layer k), the exit
selection settings the database was built for, which inference uses unless told otherwise, and what
makes the data files independent of the thread count, the Ray workers and the batch size
(``reproducibility``, see ``repro.py``).

It is written into a temporary sibling directory and renamed into place only when complete, and
``manifest.json`` (with checksums) is written last: an interrupted build never loads as complete.
``--overwrite`` replaces only a database (see ``outdir.py``). Loading checks every field it reads,
that every checksum entry lies inside the directory and every file it reads has one, and turns any
malformed file into a one-line :class:`~exitwise.errors.DataError`.
"""

from __future__ import annotations

import json
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from exitwise.artifacts import (
    check_digest,
    check_fingerprint,
    check_model,
    get_field,
    get_layers,
    inside,
    model_fingerprint,
    one_line,
    read_manifest,
    reading,
    sha256_file,
)
from exitwise.errors import DataError, IncompatibleError
from exitwise.models.backbone import Backbone
from exitwise.raee import outdir, repro
from exitwise.raee.encoders import (
    BACKBONE_MEAN,
    IN_PASS,
    Encoder,
    in_pass_layer,
    make_encoder,
    parse_layer,
    resolve_key_spec,
)
from exitwise.raee.layerwise import in_pass_keys, last_token_states
from exitwise.raee.outdir import KIND, MANIFEST
from exitwise.raee.predictor import TABLE_FILE, ExitTable, SelectConfig
from exitwise.raee.readouts.base import fit_readout, layer_mask, pool_start
from exitwise.raee.repro import FIT_THREADS, fixed_threads
from exitwise.raee.retrieval import VectorStore, load_store, make_store
from exitwise.raee.tasks import DEFAULT_SEED, Task
from exitwise.raee.tuning import Objective, SearchSpace, TuneResult, exit_table, tune

FORMAT = 2  # 2: readouts, in-pass keys, sampled training split, stored selection settings (and their tuning)


@dataclass
class BuildConfig:
    """How a database is built. The defaults are exitwise's default mode: the key layer, ``k``, the
    slack, the vote weight and the early-vote threshold chosen per task by cross-validation on the
    training sample (tuning.py); :meth:`paper` gives the paper's settings."""

    train_limit: int | None = None  # a seeded stratified sample of N training rows; None = all (the paper)
    seed: int = DEFAULT_SEED
    batch_size: int = 8
    readout: str = "probe"  # "lm" (the paper), "probe" (pooled), "probe-last", or "heads:PATH" (see readouts/)
    # "backbone" (in-pass key at layer round(0.2 L)), "backbone:<k>", "minilm", "backbone-mean:<k>" or a path
    encoder: str = "backbone"
    store: str = "flat"  # "flat" (exact) or "ivfpq" (the paper's IVF{8√N}_HNSW32,PQ64)
    store_options: dict = field(default_factory=dict)  # e.g. {"nprobe": 16}
    select: SelectConfig = field(default_factory=SelectConfig)  # exit selection stored for inference
    # None: store ``select`` as given; else choose key layer (of a "backbone" key), k, slack, vote
    # weight and early-vote threshold for this objective by cross-validation on the training sample
    objective: Objective | None = field(default_factory=Objective)
    space: SearchSpace = field(default_factory=SearchSpace)  # the settings tuning tries (pinned by flags)
    mode: str = "default"  # "default", "paper" or "custom": which preset these settings are, for the manifest
    allow_missing_classes: bool = False
    progress: bool = True

    @classmethod
    def paper(cls, **overrides) -> BuildConfig:
        """The paper's settings (docs/papers.md, "RAEE"): label-word readout, a separate sentence encoder,
        argmax exit selection with its filter."""
        return cls(**{"readout": "lm", "encoder": "minilm", "select": SelectConfig.paper(), "objective": None,
                      "mode": "paper", **overrides})


def query_text(task: Task, text: str) -> str:
    """What the retrieval key embeds: the templated input, without demonstrations or chat wrapper.

    The demonstrations are identical for every input and would only dilute the embedding.
    """
    return task.template.replace("{text}", text)


def _versions() -> dict:
    import faiss
    import torch
    import transformers

    import exitwise

    return {"exitwise": exitwise.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "faiss": faiss.__version__, "numpy": np.__version__}


@dataclass
class Database:
    path: Path
    manifest: dict
    table: ExitTable
    labels: np.ndarray  # (N,) gold labels
    layer_probs: np.ndarray  # (N, L+1, C) float32
    store: VectorStore

    @property
    def num_layers(self) -> int:
        return int(self.manifest["model"]["num_layers"])

    @property
    def key_layer(self) -> int | None:
        """k of an in-pass key (``backbone:<k>``), None when a separate encoder made the keys."""
        return in_pass_layer(self.manifest["encoder"]["spec"])

    @property
    def readout_layers(self) -> np.ndarray:
        """(L+1,) bool: layers where the database's readout exists (exits only go there)."""
        mask = np.zeros(self.num_layers + 1, dtype=bool)
        mask[self.manifest["readout"]["layers"]] = True
        return mask

    def select_config(self) -> SelectConfig:
        """The exit-selection settings the database was built for (chosen by its tuning, if any)."""
        return SelectConfig(**self.manifest["select"])

    def __len__(self) -> int:
        return len(self.labels)

    @classmethod
    def load(cls, path: str | Path) -> Database:
        """Open a database; anything malformed (a hand-edited manifest, a file that does not match its
        checksum, a corrupt array or index) is a DataError naming the file and what is wrong."""
        path = Path(path)
        where = path / MANIFEST
        if not where.is_file():
            raise DataError(f"{path} is not an exitwise RAEE database (no {MANIFEST}; "
                            "an interrupted build leaves none)")
        manifest = read_manifest(where, FORMAT, "RAEE database")
        check_manifest(manifest, where)
        verify_files(path, manifest["checksums"], where)
        return cls(path, manifest, *read_files(path, manifest))

    def check_compatible(self, backbone: Backbone, task: Task | None = None) -> None:
        """Refuse to serve a model or task other than the one the database was built for."""
        check_model(self.manifest["model"], backbone, f"database {self.path}")
        if task is not None:
            built = self.manifest["task"]
            given = task.fingerprint()
            keys = [k for k in sorted(set(built) | set(given)) if built.get(k) != given.get(k)]
            if keys:
                raise IncompatibleError(f"database {self.path} was built for task {built.get('name')!r} with a "
                                        f"different {', '.join(keys)} than task {given.get('name')!r}")


REQUIRED = (TABLE_FILE, "labels.npy", "layer_probs.npy")  # besides everything under store/ and readout/


def check_manifest(manifest: dict, where: Path) -> None:
    """Every field that loading and inference read is there, with the right type and range."""
    num_layers = check_fingerprint(manifest, where, "model")["num_layers"]
    get_field(manifest, "task.name", str, where)
    labels = get_field(manifest, "task.labels", list, where)
    if len(labels) < 2 or not all(isinstance(x, str) for x in labels):
        raise DataError(f"{where}: field 'task.labels' must be a list of at least two class names")
    get_field(manifest, "task_source", str, where)
    get_field(manifest, "readout.kind", str, where)
    get_field(manifest, "readout.spec", str, where)
    get_layers(manifest, "readout.layers", where, 0, num_layers)
    _check_encoder(get_field(manifest, "encoder.spec", str, where), num_layers, where)
    get_field(manifest, "store", dict, where)
    get_field(manifest, "sample.seed", int, where)
    try:
        SelectConfig(**get_field(manifest, "select", dict, where))
    except (TypeError, ValueError) as exc:
        raise DataError(f"{where}: field 'select': {one_line(exc)}") from None
    get_field(manifest, "checksums", dict, where)


def _check_encoder(spec: str, num_layers: int, where: Path) -> None:
    """The key layer of a backbone key lies in 0..L; an encoder given by path still exists.

    (A hub id is checked when the encoder is made: offline, from the local cache only.)"""
    try:
        layer = parse_layer(spec, BACKBONE_MEAN) if spec.startswith(BACKBONE_MEAN) else in_pass_layer(spec)
    except ValueError as exc:
        raise DataError(f"{where}: field 'encoder.spec': {exc}") from None
    if layer is not None and not 0 <= layer <= num_layers:
        raise DataError(f"{where}: field 'encoder.spec' {spec!r}: key layer outside 0..{num_layers}")
    path = Path(spec).expanduser()
    if layer is None and spec != "minilm" and (spec.startswith((".", "/", "~")) or path.exists()) \
            and not path.is_dir():
        raise DataError(f"{where}: the encoder {spec!r} it names is not a directory (moved or deleted?)")


def verify_files(path: Path, checksums: dict, where: Path) -> None:
    """Every checksum entry names a file inside ``path`` whose sha256 matches, and every file that
    loading reads has an entry (a manifest edited to ``checksums: {}`` vouches for nothing)."""
    for rel, digest in checksums.items():
        check_digest(inside(path, rel, where), digest, where, rel)
    listed = {Path(rel).as_posix() for rel in checksums}
    read = [*REQUIRED, *(p.relative_to(path).as_posix() for sub in ("store", "readout")
                         for p in sorted((path / sub).rglob("*")) if p.is_file())]
    unlisted = [rel for rel in read if rel not in listed]
    if unlisted:
        raise DataError(f"{where}: no checksum for {', '.join(unlisted[:3])} (every file of a database has one; "
                        "was the manifest edited?)")


def read_files(path: Path, manifest: dict) -> tuple[ExitTable, np.ndarray, np.ndarray, VectorStore]:
    """The exit table, labels, probabilities and index, each checked against the manifest."""
    num_layers = manifest["model"]["num_layers"]
    num_classes = len(manifest["task"]["labels"])
    with reading(path / TABLE_FILE, "exit table"):
        table = ExitTable.load(path)
        table.validate(num_layers)
    with reading(path / "labels.npy", "labels array"):
        labels = np.load(path / "labels.npy", allow_pickle=False)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or \
            (labels.size and not 0 <= labels.min() <= labels.max() < num_classes):
        raise DataError(f"{path / 'labels.npy'}: expected (N,) integer labels in 0..{num_classes - 1}, "
                        f"got {labels.dtype} {labels.shape}")
    with reading(path / "layer_probs.npy", "probabilities array"):
        probs = np.load(path / "layer_probs.npy", allow_pickle=False)
    if probs.ndim != 3 or probs.shape[1:] != (num_layers + 1, num_classes) or \
            not np.issubdtype(probs.dtype, np.floating) or not np.isfinite(probs).all():
        raise DataError(f"{path / 'layer_probs.npy'}: expected finite (N, {num_layers + 1}, {num_classes}) "
                        f"probabilities, got {probs.dtype} {probs.shape}")
    with reading(path / "store", "vector index"):
        store = load_store(path / "store")
    if not (len(table) == len(labels) == len(probs) == store.ntotal):
        raise DataError(f"database {path}: inconsistent sizes (table {len(table)}, labels {len(labels)}, "
                        f"probs {len(probs)}, index {store.ntotal})")
    return table, labels, probs.astype(np.float32), store


def check_classes(task: Task, labels: np.ndarray, config: BuildConfig, warn: bool = True) -> list[int]:
    """Training examples per class; refuse a missing class, warn about classes under k examples."""
    counts = np.bincount(labels, minlength=task.num_classes).tolist()
    missing = [task.labels[c] for c, n in enumerate(counts) if n == 0]
    if missing and not config.allow_missing_classes:
        raise DataError(f"task {task.name!r}: the training sample has no example of class(es) {missing} "
                        f"(counts {dict(zip(task.labels, counts, strict=True))}); RAEE could never exit to a "
                        "layer that is right for them. Use more training rows, or pass --allow-missing-classes")
    few = [f"{task.labels[c]} ({n})" for c, n in enumerate(counts) if 0 < n < config.select.k]
    if few and warn:
        warnings.warn(f"task {task.name!r}: class(es) {', '.join(few)} have fewer training examples than the "
                      f"k={config.select.k} neighbours retrieved per query", stacklevel=3)
    return counts


def build_database(backbone: Backbone, task: Task, out: str | Path, config: BuildConfig | None = None,
                   overwrite: bool = False, encoder: Encoder | None = None, task_source: str | None = None,
                   states: torch.Tensor | None = None, build_info: dict | None = None) -> Database:
    """One pass over the training split with all hidden states; write the database to ``out``.

    ``task_source`` is how to find the task again (built-in name or task-file path); default the name.
    ``states``: the sample's (N, L+1, D) ``last_token_states``, if already computed (a benchmark that
    builds several databases of one sample runs the pass once, a Ray build computes them on workers).
    ``build_info``: more entries for the manifest's ``build`` record (e.g. the Ray workers that ran the pass).
    """
    config = config or BuildConfig()
    out = Path(out)
    outdir.prepare(out, overwrite)  # before the pass: refuse a target we may not write, clean up old leftovers
    key_spec = resolve_key_spec(config.encoder, backbone.num_layers)
    key_layer = in_pass_layer(key_spec)
    examples = task.load_split("train", config.train_limit, config.seed)
    if not examples:
        raise DataError(f"task {task.name!r}: the training split is empty")
    gold = np.array([e.label for e in examples], dtype=np.int64)
    class_counts = check_classes(task, gold, config)
    tok = backbone.tokenizer
    label_ids = task.label_token_ids(tok)
    if key_layer is None:  # a missing encoder fails here, not after the all-layer pass
        encoder = encoder or make_encoder(config.encoder, backbone=backbone)
    pool_from = pool_start([config.readout], task, tok)
    t0 = time.perf_counter()
    if states is None:
        states = last_token_states(backbone, task.encode([e.text for e in examples], tok), config.batch_size,
                                   progress=config.progress, desc=f"{task.name} layers", pool_from=pool_from)
    d = backbone.hidden_size  # states: (N, L+1, D), or (N, L+1, 2D) with the pooled means (layerwise.summary)
    if tuple(states.shape) not in {(len(examples), backbone.num_layers + 1, w) for w in (d, 2 * d)}:
        raise ValueError(f"states of shape {tuple(states.shape)} do not belong to this sample of {len(examples)}")
    t_forward = time.perf_counter() - t0
    t0 = time.perf_counter()
    with fixed_threads(FIT_THREADS):  # its reductions over the split must not follow the caller's threads
        readout, probs = fit_readout(config.readout, backbone, label_ids, states.to(backbone.device), gold,
                                     config.seed, pool_from)
    t_readout = time.perf_counter() - t0
    preds = probs.argmax(-1)  # (N, L+1)
    exits = layer_mask(readout, backbone.num_layers)
    table = exit_table(probs, gold, exits)
    t0 = time.perf_counter()
    keys = None
    if key_layer is None:  # a separate encoder's keys: the tuning scores them too
        keys = repro.encode_alone(encoder, [query_text(task, e.text) for e in examples])
    t_encode = time.perf_counter() - t0
    t0 = time.perf_counter()
    tuning: TuneResult | None = None
    select = config.select
    if config.objective is not None:
        # "backbone" alone leaves the key layer to the tuning; "backbone:<k>" fixes it
        free = config.encoder == IN_PASS.rstrip(":")
        key_layers = ([k for k in (config.space.key_layers or range(1, backbone.num_layers // 2 + 1))
                       if 0 <= k <= backbone.num_layers] if free else [key_layer])

        def key_at(layer: int | None, states: torch.Tensor = states, keys: np.ndarray | None = keys) -> np.ndarray:
            return keys if layer is None else in_pass_keys(states[:, layer, :d])

        tuning = tune(key_at, probs, gold, exits, config.objective, config.space, config.select, key_layers,
                      progress=config.progress)
        select = tuning.select(config.select)
        if key_layer is not None:
            key_layer, key_spec = tuning.chosen.key_layer, f"{IN_PASS}{tuning.chosen.key_layer}"
    t_tune = time.perf_counter() - t0
    t0 = time.perf_counter()
    if key_layer is not None:
        keys = in_pass_keys(states[:, key_layer, :d])
        key_info = {"kind": "in-pass", "layer": key_layer, "pooling": "last", "normalize": True,
                    "dim": backbone.hidden_size}
    else:
        key_info = encoder.describe()
    t_encode += time.perf_counter() - t0
    del states
    store = make_store(config.store, keys.shape[1], len(keys), **config.store_options)
    store.add(keys)

    tmp = outdir.building_dir(out)
    try:
        table.save(tmp)
        np.save(tmp / "labels.npy", gold, allow_pickle=False)
        np.save(tmp / "layer_probs.npy", probs.astype(np.float16), allow_pickle=False)
        readout.save(tmp / "readout")
        store.save(tmp / "store")
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        manifest = {
            "format": FORMAT,
            "kind": KIND,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "model": model_fingerprint(backbone),
            "task": task.fingerprint(),
            "task_source": task_source or task.name,
            "mode": config.mode,
            "readout": {"spec": config.readout, **readout.describe(), "layers": readout.layers},
            "encoder": {"spec": key_spec, **key_info},
            "store": store.describe(),
            "select": asdict(select),
            "tuning": tuning.as_json() if tuning is not None else None,
            "sample": {"seed": config.seed, "train_limit": config.train_limit, "class_counts": class_counts},
            "build": {**{k: v for k, v in asdict(config).items() if k not in ("progress", "select", "space")},
                      **(build_info or {})},
            "reproducibility": repro.describe(backbone, in_pass_key=key_layer is not None),
            "counts": {
                "examples": len(examples),
                "entries": table.num_entries,
                "never_correct": int((~(preds == gold[:, None]).any(1)).sum()),
                "full_model_train_accuracy": float((preds[:, -1] == gold).mean()),
            },
            "seconds": {"forward": round(t_forward, 3), "readout": round(t_readout, 3), "tune": round(t_tune, 3),
                        "encode": round(t_encode, 3)},
            "versions": _versions(),
            "checksums": {p.relative_to(tmp).as_posix(): sha256_file(p) for p in files},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        outdir.install(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Database.load(out)
