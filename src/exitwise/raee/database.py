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
(a separate encoder, or ``backbone:<k>``: the answering pass's own state at layer k) and the exit
selection settings the database was built for, which inference uses unless told otherwise.

It is written into a temporary sibling directory and renamed into place only when complete, and
``manifest.json`` (with checksums) is written last: an interrupted build never loads as complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from exitwise.artifacts import check_model, model_fingerprint, read_manifest
from exitwise.errors import DataError, IncompatibleError
from exitwise.models.backbone import Backbone
from exitwise.raee.encoders import Encoder, in_pass_layer, make_encoder, resolve_key_spec
from exitwise.raee.layerwise import in_pass_keys, last_token_states
from exitwise.raee.predictor import ExitTable, RAEEConfig, default_select
from exitwise.raee.readouts.base import fit_readout, layer_mask
from exitwise.raee.retrieval import VectorStore, load_store, make_store
from exitwise.raee.tasks import DEFAULT_SEED, Task

MANIFEST = "manifest.json"
FORMAT = 2  # 2: readouts, in-pass keys, sampled training split, stored selection settings


@dataclass
class BuildConfig:
    """How a database is built. The defaults are exitwise's default mode (see ``modes.py``)."""

    train_limit: int | None = None  # a seeded stratified sample of N training rows; None = all (the paper)
    seed: int = DEFAULT_SEED
    batch_size: int = 8
    readout: str = "probe"  # "lm" (the paper), "probe", or "heads:PATH" (see readouts/)
    # "backbone" (in-pass key at layer round(0.2 L)), "backbone:<k>", "minilm", "backbone-mean:<k>" or a path
    encoder: str = "backbone"
    store: str = "flat"  # "flat" (exact) or "ivfpq" (the paper's IVF{8√N}_HNSW32,PQ64)
    store_options: dict = field(default_factory=dict)  # e.g. {"nprobe": 16}
    select: RAEEConfig = field(default_factory=default_select)  # exit selection stored for inference
    mode: str = "default"  # "default", "paper" or "custom": which preset these settings are, for the manifest
    allow_missing_classes: bool = False
    progress: bool = True

    @classmethod
    def paper(cls, **overrides) -> BuildConfig:
        """The paper's settings (METHODS.md §1.8): label-word readout, a separate sentence encoder,
        argmax exit selection with its filter."""
        return cls(**{"readout": "lm", "encoder": "minilm", "select": RAEEConfig(), "mode": "paper", **overrides})


def query_text(task: Task, text: str) -> str:
    """What the retrieval key embeds: the templated input, without demonstrations or chat wrapper.

    The demonstrations are identical for every input and would only dilute the embedding.
    """
    return task.template.replace("{text}", text)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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

    def select_config(self) -> RAEEConfig:
        """The exit-selection settings the database was built for."""
        return RAEEConfig(**self.manifest["select"])

    def __len__(self) -> int:
        return len(self.labels)

    @classmethod
    def load(cls, path: str | Path) -> Database:
        path = Path(path)
        if not (path / MANIFEST).is_file():
            raise DataError(f"{path} is not an exitwise RAEE database (no {MANIFEST}; "
                            "an interrupted build leaves none)")
        manifest = read_manifest(path / MANIFEST, FORMAT, "RAEE database")
        for rel, digest in manifest["checksums"].items():
            f = path / rel
            if not f.is_file():
                raise DataError(f"database {path} is incomplete: {rel} is missing")
            if _sha256(f) != digest:
                raise DataError(f"database {path} is corrupt: checksum of {rel} does not match the manifest")
        table = ExitTable.load(path)
        table.validate(int(manifest["model"]["num_layers"]))
        labels = np.load(path / "labels.npy", allow_pickle=False)
        probs = np.load(path / "layer_probs.npy", allow_pickle=False).astype(np.float32)
        store = load_store(path / "store")
        if not (len(table) == len(labels) == len(probs) == store.ntotal):
            raise DataError(f"database {path}: inconsistent sizes (table {len(table)}, labels {len(labels)}, "
                            f"probs {len(probs)}, index {store.ntotal})")
        return cls(path, manifest, table, labels, probs, store)

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
                   states: torch.Tensor | None = None) -> Database:
    """One pass over the training split with all hidden states; write the database to ``out``.

    ``task_source`` is how to find the task again (built-in name or task-file path); default the name.
    ``states``: the sample's (N, L+1, D) ``last_token_states``, if already computed (a benchmark that
    builds several databases of one sample runs the pass once).
    """
    config = config or BuildConfig()
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (pass --overwrite to replace it)")
    key_spec = resolve_key_spec(config.encoder, backbone.num_layers)
    key_layer = in_pass_layer(key_spec)
    examples = task.load_split("train", config.train_limit, config.seed)
    if not examples:
        raise DataError(f"task {task.name!r}: the training split is empty")
    gold = np.array([e.label for e in examples], dtype=np.int64)
    class_counts = check_classes(task, gold, config)
    tok = backbone.tokenizer
    label_ids = task.label_token_ids(tok)
    t0 = time.perf_counter()
    if states is None:
        states = last_token_states(backbone, task.encode([e.text for e in examples], tok), config.batch_size,
                                   progress=config.progress, desc=f"{task.name} layers")  # (N, L+1, D)
    elif tuple(states.shape) != (len(examples), backbone.num_layers + 1, backbone.hidden_size):
        raise ValueError(f"states of shape {tuple(states.shape)} do not belong to this sample of {len(examples)}")
    t_forward = time.perf_counter() - t0
    t0 = time.perf_counter()
    readout, probs = fit_readout(config.readout, backbone, label_ids, states.to(backbone.device), gold, config.seed)
    t_readout = time.perf_counter() - t0
    preds, maxp = probs.argmax(-1), probs.max(-1)  # (N, L+1)
    exits = layer_mask(readout, backbone.num_layers)
    table = ExitTable.from_readouts(np.where(exits[None, :], preds, -1), maxp, gold)
    t0 = time.perf_counter()
    if key_layer is not None:
        keys = in_pass_keys(states[:, key_layer])
        key_info = {"kind": "in-pass", "layer": key_layer, "pooling": "last", "normalize": True,
                    "dim": backbone.hidden_size}
    else:
        encoder = encoder or make_encoder(config.encoder, backbone=backbone)
        keys = encoder.encode([query_text(task, e.text) for e in examples])
        key_info = encoder.describe()
    t_encode = time.perf_counter() - t0
    del states
    store = make_store(config.store, keys.shape[1], len(keys), **config.store_options)
    store.add(keys)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    try:
        table.save(tmp)
        np.save(tmp / "labels.npy", gold, allow_pickle=False)
        np.save(tmp / "layer_probs.npy", probs.astype(np.float16), allow_pickle=False)
        readout.save(tmp / "readout")
        store.save(tmp / "store")
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        manifest = {
            "format": FORMAT,
            "kind": "exitwise-raee-database",
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "model": model_fingerprint(backbone),
            "task": task.fingerprint(),
            "task_source": task_source or task.name,
            "mode": config.mode,
            "readout": {"spec": config.readout, **readout.describe(), "layers": readout.layers},
            "encoder": {"spec": key_spec, **key_info},
            "store": store.describe(),
            "select": asdict(config.select),
            "sample": {"seed": config.seed, "train_limit": config.train_limit, "class_counts": class_counts},
            "build": {k: v for k, v in asdict(config).items() if k not in ("progress", "select")},
            "counts": {
                "examples": len(examples),
                "entries": table.num_entries,
                "never_correct": int((~(preds == gold[:, None]).any(1)).sum()),
                "full_model_train_accuracy": float((preds[:, -1] == gold).mean()),
            },
            "seconds": {"forward": round(t_forward, 3), "readout": round(t_readout, 3), "encode": round(t_encode, 3)},
            "versions": _versions(),
            "checksums": {str(p.relative_to(tmp)): _sha256(p) for p in files},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Database.load(out)
