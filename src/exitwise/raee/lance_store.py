"""A vector store on disk: LanceDB (embedded), for RAEE databases larger than memory.

The keys live in a Lance dataset (``lance/keys.lance`` inside the store directory) with an ``id``
column holding the insertion-order row number, so results match the FAISS stores' ids. Distances are
squared L2, as for :class:`~exitwise.raee.retrieval.FlatStore` (Lance's ``l2`` metric is squared).

* Below ``min_index_rows`` keys (default 65,536) search is exact (Lance brute force): IVF-PQ needs
  enough rows to train 256-entry codebooks and partitions, and exact search is fast at that size.
* At or above it an IVF-PQ index is built on disk before the first search or save, with
  ``num_partitions`` = ceil(sqrt(N)) (LanceDB's own rule, rather than the FAISS store's 8 sqrt(N): a
  tenth of the partitions to train at 10^6 keys; measured builds 243 s at 10^5, 805 s at 10^6,
  ``benchmarks/stores.py``), ``num_sub_vectors``
  = dim/8 (or ``m``), searched with ``nprobe`` = 20 partitions and ``refine_factor`` = 10 (the top
  10·k PQ candidates are re-ranked by exact distance read from disk, which restores most recall).

``lancedb`` is imported only when this store is used: install ``exitwise[lancedb]``.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from exitwise.errors import DataError
from exitwise.raee.retrieval import DESCRIPTOR_FILE, FORMAT_VERSION, _as_matrix

LANCE_DIR = "lance"
TABLE = "keys"
MIN_INDEX_ROWS = 65_536
DEFAULT_NPROBE = 20
DEFAULT_REFINE = 10


def _lancedb() -> Any:
    try:
        import lancedb
    except ImportError as e:  # the optional extra is missing
        raise ImportError("the 'lancedb' vector store needs the lancedb package: "
                          "pip install 'exitwise[lancedb]'") from e
    return lancedb


class LanceStore:
    """Keys in an on-disk Lance table; exact search when small, IVF-PQ when large."""

    kind: ClassVar[str] = "lancedb"

    def __init__(self, root: Path, dim: int, table: Any = None, *, nprobe: int = DEFAULT_NPROBE,
                 refine_factor: int = DEFAULT_REFINE, min_index_rows: int = MIN_INDEX_ROWS,
                 num_partitions: int | None = None, m: int | None = None, indexed: bool = False,
                 owns_root: bool = False):
        if nprobe < 1 or refine_factor < 1 or min_index_rows < 256:
            raise ValueError(f"lancedb store: nprobe={nprobe} and refine_factor={refine_factor} must be >= 1, "
                             f"min_index_rows={min_index_rows} must be >= 256 (PQ codebooks have 256 entries)")
        self.root = Path(root)
        self._dim = int(dim)
        self._table = table
        self.nprobe, self.refine_factor, self.min_index_rows = nprobe, refine_factor, min_index_rows
        self.num_partitions, self.m = num_partitions, m
        self.indexed = indexed
        # rows written through this object (or counted once at load): count_rows() is a dataset scan,
        # and search, add and the index check all need the count
        self._ntotal = 0 if table is None else int(table.count_rows())
        self._owns_root = owns_root  # a scratch directory made by create(), removed with the store

    @classmethod
    def create(cls, dim: int, n: int = 0, path: str | Path | None = None, **opts: Any) -> LanceStore:
        """An empty store; rows go to ``path`` (default: a scratch directory until :meth:`save`)."""
        _lancedb()
        if path is None:
            return cls(Path(tempfile.mkdtemp(prefix="exitwise-lance-")), dim, owns_root=True, **opts)
        return cls(Path(path), dim, **opts)

    def __del__(self) -> None:
        if getattr(self, "_owns_root", False):
            shutil.rmtree(self.root, ignore_errors=True)

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def ntotal(self) -> int:
        return self._ntotal

    def add(self, keys: np.ndarray) -> None:
        """Append keys in one Lance write (call repeatedly with chunks: nothing is held in memory)."""
        import pyarrow as pa

        keys = _as_matrix(keys, self.dim, "keys")
        ids = np.arange(self.ntotal, self.ntotal + len(keys), dtype=np.int64)
        batch = pa.table({"id": pa.array(ids, pa.int64()),
                          "vector": pa.FixedSizeListArray.from_arrays(pa.array(keys.ravel(), pa.float32()), self.dim)})
        if self._table is None:
            db = _lancedb().connect(str(self.root / LANCE_DIR))
            self._table = db.create_table(TABLE, data=batch, mode="overwrite")
        else:
            self._table.add(batch)
        self._ntotal += len(keys)
        self.indexed = False  # new rows: the index (if any) must be rebuilt to cover them

    @property
    def approximate(self) -> bool:
        return self.ntotal >= self.min_index_rows

    def build_index(self) -> None:
        """Train and write the IVF-PQ index (only for stores of at least ``min_index_rows`` keys)."""
        if not self.approximate or self.indexed:
            return
        m = self.m or max(1, self.dim // 8)
        if self.dim % m:
            raise ValueError(f"lancedb store: m={m} sub-vectors must divide the key dimension {self.dim}")
        parts = self.num_partitions or math.ceil(math.sqrt(self.ntotal))
        from lancedb.index import IvfPq

        self._table.create_index("vector", replace=True,  # the new API: the column first, then its config
                                 config=IvfPq(distance_type="l2", num_partitions=parts, num_sub_vectors=m))
        self.num_partitions, self.m, self.indexed = parts, m, True

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = _as_matrix(queries, self.dim, "queries")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        q = queries.shape[0]
        distances = np.full((q, k), np.inf, dtype=np.float32)
        ids = np.full((q, k), -1, dtype=np.int64)  # FAISS's padding for missing hits
        if self.ntotal == 0 or q == 0:
            return distances, ids
        self.build_index()
        query = self._table.search(queries if q > 1 else queries[0]).metric("l2").limit(k).select(["id"])
        if self.indexed:
            query = query.nprobes(self.nprobe).refine_factor(self.refine_factor)
        else:
            query = query.bypass_vector_index()
        try:
            result = query.to_arrow()
        except Exception as e:  # noqa: BLE001 - lance reports damaged files as RuntimeError("lance error: ...")
            raise self._damaged(e) from e
        _scatter(result, q, distances, ids)
        return distances, ids

    def _damaged(self, e: Exception) -> DataError:
        """A read that failed on the dataset's files (a truncated data file is found only when searched:
        opening reads the manifest alone), as one line naming the dataset."""
        dataset = self.root / LANCE_DIR / f"{TABLE}.lance"
        message = " ".join(str(e).split())
        return DataError(f"{dataset}: cannot read the Lance dataset, damaged or truncated? "
                         f"({type(e).__name__}: {message[:300]})")

    def params(self) -> dict[str, Any]:
        return {"approximate": self.approximate, "indexed": self.indexed, "nprobe": self.nprobe,
                "refine_factor": self.refine_factor, "min_index_rows": self.min_index_rows,
                "num_partitions": self.num_partitions, "m": self.m}

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "dim": self.dim, "ntotal": self.ntotal, "metric": "squared_l2", **self.params()}

    def save(self, directory: Path) -> None:
        """Index (if large), copy the Lance dataset into ``directory`` and write the descriptor last."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.build_index()
        source, target = self.root / LANCE_DIR, directory / LANCE_DIR
        if self._table is not None and source.resolve() != target.resolve():
            if target.exists():
                shutil.rmtree(target)
            shutil.copytree(source, target)
        descriptor = {"format_version": FORMAT_VERSION, **self.describe()}
        (directory / DESCRIPTOR_FILE).write_text(json.dumps(descriptor, indent=2) + "\n")

    @classmethod
    def load(cls, directory: Path, descriptor: dict[str, Any], nprobe: int | None = None,
             refine_factor: int | None = None) -> LanceStore:
        directory = Path(directory)
        dataset = directory / LANCE_DIR / f"{TABLE}.lance"
        opts = {key: descriptor[key] for key in ("min_index_rows", "num_partitions", "m") if key in descriptor}
        store = cls(directory, descriptor["dim"], nprobe=nprobe or descriptor.get("nprobe", DEFAULT_NPROBE),
                    refine_factor=refine_factor or descriptor.get("refine_factor", DEFAULT_REFINE),
                    indexed=bool(descriptor.get("indexed")), **opts)
        if descriptor.get("ntotal", 0) == 0:
            return store
        if not dataset.is_dir():
            raise ValueError(f"{dataset}: Lance dataset missing (the store descriptor lists "
                             f"{descriptor.get('ntotal')} keys)")
        try:
            store._table = _lancedb().connect(str(directory / LANCE_DIR)).open_table(TABLE)
            rows = store._ntotal = int(store._table.count_rows())
        except Exception as e:  # noqa: BLE001 - lance raises several types for damaged data; report one
            raise ValueError(f"{dataset}: cannot open the Lance dataset ({type(e).__name__}: {e})") from e
        if rows != descriptor.get("ntotal"):
            raise ValueError(f"{dataset}: has {rows} rows but the descriptor says ntotal={descriptor.get('ntotal')}")
        return store

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v}" for k, v in self.describe().items() if k != "kind")
        return f"{type(self).__name__}({params})"


def _scatter(result: Any, q: int, distances: np.ndarray, ids: np.ndarray) -> None:
    """Place Lance's long-format hits (query_index, id, _distance), sorted per query, into (Q, k) arrays."""
    hit_ids = result.column("id").to_numpy().astype(np.int64)
    hit_d = result.column("_distance").to_numpy().astype(np.float32)
    qi = result.column("query_index").to_numpy() if "query_index" in result.column_names \
        else np.zeros(len(hit_ids), dtype=np.int64)
    k = ids.shape[1]
    order = np.lexsort((hit_d, qi))  # by query, then ascending distance
    qi, hit_ids, hit_d = qi[order], hit_ids[order], hit_d[order]
    starts = np.searchsorted(qi, np.arange(q))
    rank = np.arange(len(qi)) - starts[qi]
    keep = rank < k
    ids[qi[keep], rank[keep]] = hit_ids[keep]
    distances[qi[keep], rank[keep]] = hit_d[keep]
