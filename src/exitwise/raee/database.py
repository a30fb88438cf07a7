"""The RAEE retrieval database: build, save atomically, load with integrity checks.

A database is a directory::

    manifest.json    model, task fingerprint, encoder, store, versions, counts, sha256 of every file
    exit_table.*     per training example: every layer whose label-word prediction was right, with its
                     probability (see predictor.ExitTable)
    labels.npy       gold labels of the training examples (for the kNN-vote baseline)
    layer_probs.npy  (N, L+1, C) float16 label-word probabilities at every layer, so that exit
                     strategies beyond the paper can be evaluated without rebuilding
    store/           the vector index (see retrieval.py)

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
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from exitwise.artifacts import check_model, model_fingerprint, read_manifest
from exitwise.errors import DataError, IncompatibleError
from exitwise.models.backbone import Backbone
from exitwise.raee.encoders import Encoder, make_encoder
from exitwise.raee.layerwise import layer_label_probs
from exitwise.raee.predictor import ExitTable
from exitwise.raee.retrieval import VectorStore, load_store, make_store
from exitwise.raee.tasks import Task

MANIFEST = "manifest.json"
FORMAT = 1


@dataclass
class BuildConfig:
    train_limit: int | None = None  # first N training rows (file order); None = all, as in the paper
    batch_size: int = 8
    encoder: str = "minilm"  # "minilm", a sentence-encoder path/hub id, or "backbone:<layer>"
    store: str = "flat"  # "flat" (exact) or "ivfpq" (the paper's IVF{8√N}_HNSW32,PQ64)
    store_options: dict = field(default_factory=dict)  # e.g. {"nprobe": 16}
    progress: bool = True


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


def build_database(backbone: Backbone, task: Task, out: str | Path, config: BuildConfig | None = None,
                   overwrite: bool = False, encoder: Encoder | None = None, task_source: str | None = None
                   ) -> Database:
    """One pass over the training split with all hidden states; write the database to ``out``.

    ``task_source`` is how to find the task again (built-in name or task-file path); default the name.
    """
    config = config or BuildConfig()
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (pass --overwrite to replace it)")
    examples = task.load_split("train", config.train_limit)
    if not examples:
        raise DataError(f"task {task.name!r}: the training split is empty")
    tok = backbone.tokenizer
    label_ids = task.label_token_ids(tok)
    gold = np.array([e.label for e in examples], dtype=np.int64)
    t0 = time.perf_counter()
    probs = layer_label_probs(backbone, task.encode([e.text for e in examples], tok), label_ids,
                              batch_size=config.batch_size, progress=config.progress, desc=f"{task.name} layers")
    t_forward = time.perf_counter() - t0
    preds, maxp = probs.argmax(-1), probs.max(-1)  # (N, L+1)
    table = ExitTable.from_readouts(preds, maxp, gold)
    encoder = encoder or make_encoder(config.encoder, backbone=backbone)
    t0 = time.perf_counter()
    keys = encoder.encode([query_text(task, e.text) for e in examples])
    t_encode = time.perf_counter() - t0
    store = make_store(config.store, keys.shape[1], len(keys), **config.store_options)
    store.add(keys)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    try:
        table.save(tmp)
        np.save(tmp / "labels.npy", gold, allow_pickle=False)
        np.save(tmp / "layer_probs.npy", probs.astype(np.float16), allow_pickle=False)
        store.save(tmp / "store")
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        manifest = {
            "format": FORMAT,
            "kind": "exitwise-raee-database",
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "model": model_fingerprint(backbone),
            "task": task.fingerprint(),
            "task_source": task_source or task.name,
            "encoder": {"spec": config.encoder, **encoder.describe()},
            "store": store.describe(),
            "build": {k: v for k, v in asdict(config).items() if k != "progress"},
            "counts": {
                "examples": len(examples),
                "entries": table.num_entries,
                "never_correct": int((~(preds == gold[:, None]).any(1)).sum()),
                "full_model_train_accuracy": float((preds[:, -1] == gold).mean()),
            },
            "seconds": {"forward": round(t_forward, 3), "encode": round(t_encode, 3)},
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
