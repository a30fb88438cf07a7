"""Vector stores for the RAEE retrieval database (docs/papers.md, "RAEE": the keys and the index).

Every store answers the same narrow interface, :class:`VectorStore`: add float32 keys, search the
``k`` nearest by **squared L2** distance, save to / load from a directory, and describe itself for
the database manifest. Two stores exist:

* :class:`FlatStore` (``"flat"``, the default): exact search with FAISS ``IndexFlatL2``. RAEE's
  databases are task training splits (a few thousand keys), where exact search costs well under a
  millisecond per query, so approximation buys nothing and only adds noise to the exit decision.
* :class:`IVFPQStore` (``"ivfpq"``): the paper's ``IVF{n}_HNSW32,PQ64`` index, for fidelity runs
  and for databases too large for exact search.

A store is saved as two files in one directory: the FAISS index (FAISS's own ``write_index``, no
pickle) and a small JSON descriptor naming the kind, so :func:`load_store` knows which class to
rebuild. Adding a store kind means one small class plus one entry in ``STORES``.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import faiss
import numpy as np

from exitwise.artifacts import read_utf8

INDEX_FILE = "index.faiss"
DESCRIPTOR_FILE = "store.json"
FORMAT_VERSION = 1


@runtime_checkable
class VectorStore(Protocol):
    """What the RAEE predictor needs from a nearest-neighbour index."""

    kind: ClassVar[str]

    @property
    def dim(self) -> int: ...

    @property
    def ntotal(self) -> int: ...

    def add(self, keys: np.ndarray) -> None:
        """Append keys (N, dim) float32; their ids are ``ntotal .. ntotal + N - 1``."""

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(distances (Q, k) float32 squared L2, ids (Q, k) int64); id -1 / distance +inf pad missing hits."""

    def save(self, directory: Path) -> None: ...

    def describe(self) -> dict[str, Any]: ...


def _as_matrix(x: np.ndarray, dim: int, what: str) -> np.ndarray:
    """Validate and convert to the C-contiguous float32 (N, dim) matrix FAISS requires."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(f"{what} must have shape (N, {dim}), got {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{what} contain NaN or inf")
    return x


class FaissStore:
    """Shared plumbing for stores backed by one FAISS index (subclasses set ``kind`` and ``create``)."""

    kind: ClassVar[str] = ""

    def __init__(self, index: faiss.Index):
        self.index = index

    @property
    def dim(self) -> int:
        return int(self.index.d)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def add(self, keys: np.ndarray) -> None:
        keys = _as_matrix(keys, self.dim, "keys")
        if not self.index.is_trained:
            self._train(keys)
        self.index.add(keys)

    def _train(self, keys: np.ndarray) -> None:
        self.index.train(keys)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = _as_matrix(queries, self.dim, "queries")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if self.ntotal == 0:
            # An empty (possibly untrained) index: FAISS would fail or return garbage; answer "no hits".
            q = queries.shape[0]
            return np.full((q, k), np.inf, dtype=np.float32), np.full((q, k), -1, dtype=np.int64)
        distances, ids = self.index.search(queries, k)  # (Q, k) float32, (Q, k) int64
        ids = ids.astype(np.int64, copy=False)
        distances = distances.astype(np.float32, copy=True)
        # FAISS pads missing hits with FLT_MAX; +inf makes "no neighbour" unmistakable downstream.
        distances[ids < 0] = np.inf
        return distances, ids

    def params(self) -> dict[str, Any]:
        """Kind-specific parameters for the descriptor (override in subclasses)."""
        return {}

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "dim": self.dim, "ntotal": self.ntotal, "metric": "squared_l2", **self.params()}

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self.index, str(directory / INDEX_FILE))
        descriptor = {"format_version": FORMAT_VERSION, **self.describe()}
        (directory / DESCRIPTOR_FILE).write_text(json.dumps(descriptor, indent=2) + "\n")

    @classmethod
    def load(cls, directory: Path, descriptor: dict[str, Any]) -> FaissStore:
        return cls(faiss.read_index(str(Path(directory) / INDEX_FILE)))

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v}" for k, v in self.describe().items() if k != "kind")
        return f"{type(self).__name__}({params})"


class FlatStore(FaissStore):
    """Exact search (FAISS ``IndexFlatL2``); the default store."""

    kind: ClassVar[str] = "flat"

    @classmethod
    def create(cls, dim: int, n: int = 0) -> FlatStore:
        # ``n`` is accepted for interface symmetry with approximate stores; exact search needs no sizing.
        return cls(faiss.IndexFlatL2(dim))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        # One query per FAISS call: past a size set by its BLAS threshold, FAISS computes a batch's
        # distances as |x|^2 + |y|^2 - 2xy by GEMM, which rounds otherwise than a query alone; alone,
        # a query gets the same distances (and neighbours) whatever it is searched with.
        queries = np.asarray(queries)
        if len(queries) <= 1:
            return super().search(queries, k)
        parts = [super(FlatStore, self).search(queries[i:i + 1], k) for i in range(len(queries))]
        return np.concatenate([d for d, _ in parts]), np.concatenate([i for _, i in parts])


def paper_nlist(n: int) -> int:
    """Number of IVF cells the RAEE code uses for ``n`` keys (int(8·√n) up to 1M, then fixed sizes)."""
    if n <= 1_000_000:
        return max(1, int(8 * math.sqrt(n)))
    if n <= 10_000_000:
        return 65_536
    if n <= 100_000_000:
        return 262_144
    return 1_048_576


class IVFPQStore(FaissStore):
    """The paper's ``IVF{nlist}_HNSW32,PQ{m}`` index: approximate, compressed, trained on the keys.

    * ``nlist`` defaults to :func:`paper_nlist` of the expected key count.
    * ``nprobe`` (IVF cells visited per query) defaults to ``min(nlist, 16)``. The RAEE code parses
      ``--nprobe 512`` but never assigns it, so the paper effectively ran with FAISS's default of 1;
      pass ``nprobe=1`` to reproduce that. Unlike the paper's code, the value here is really applied
      to the IVF index, and re-applied after loading.
    * Training happens on the first :meth:`add`. FAISS refuses to train with fewer keys than
      ``max(nlist, 2**nbits)`` (one per coarse centroid, 256 per PQ codebook); we raise a clear
      ``ValueError`` instead, pointing to the flat store. FAISS *recommends* 39 keys per centroid;
      the paper's own formula violates that for every N < ~97k (all of its tasks), so below it we only
      warn, once, and silence FAISS's per-codebook stderr warnings.
    * Polysemous training (on by default in ``index_factory``'s PQ) is switched off: it only permutes
      codebook entries for Hamming-filtered search, which is never used here, leaves search results
      unchanged, and costs seconds per sub-quantizer on CPU (minutes for PQ64).
    """

    kind: ClassVar[str] = "ivfpq"

    def __init__(self, index: faiss.Index, nprobe: int | None = None, factory: str | None = None):
        super().__init__(index)
        self.factory = factory  # the index_factory string, kept for the manifest
        self._ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
        self.nprobe = min(self.nlist, 16) if nprobe is None else nprobe

    @classmethod
    def create(cls, dim: int, n: int, nprobe: int | None = None, nlist: int | None = None, m: int = 64,
               nbits: int = 8, hnsw_m: int = 32) -> IVFPQStore:
        """An untrained index sized for ``n`` keys (``m`` PQ sub-quantizers of ``nbits`` bits each)."""
        if dim % m:
            raise ValueError(f"PQ{m} needs the key dimension to be divisible by {m}, got dim={dim}; pass m=<divisor>")
        nlist = paper_nlist(n) if nlist is None else nlist
        _check_trainable(n, nlist, nbits)
        pq = f"PQ{m}" if nbits == 8 else f"PQ{m}x{nbits}"
        factory = f"IVF{nlist}_HNSW{hnsw_m},{pq}"
        index = faiss.index_factory(dim, factory)  # default metric: L2
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
        ivf.do_polysemous_training = False
        return cls(index, nprobe, factory)

    @property
    def nlist(self) -> int:
        return int(self._ivf.nlist)

    @property
    def nprobe(self) -> int:
        return int(self._ivf.nprobe)

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        if not 1 <= value <= self.nlist:
            raise ValueError(f"nprobe must be in 1..nlist={self.nlist}, got {value}")
        self._ivf.nprobe = int(value)

    def _train(self, keys: np.ndarray) -> None:
        n = keys.shape[0]
        _check_trainable(n, self.nlist, int(self._ivf.pq.nbits))
        wanted = 39 * max(self.nlist, 2 ** int(self._ivf.pq.nbits))
        if n < wanted:
            warnings.warn(f"training IVFPQ on {n} keys; FAISS recommends >= {wanted} (39 per centroid) for "
                          f"well-trained centroids (nlist={self.nlist}). Retrieval quality may suffer; the flat "
                          f"store is exact and fast at this size.", stacklevel=3)
        # The warning above says it once; FAISS would otherwise print it for the IVF and every PQ codebook.
        self._ivf.cp.min_points_per_centroid = 1
        self._ivf.pq.cp.min_points_per_centroid = 1
        self.index.train(keys)

    def params(self) -> dict[str, Any]:
        pq = self._ivf.pq
        return {"nlist": self.nlist, "nprobe": self.nprobe, "m": int(pq.M), "nbits": int(pq.nbits),
                "factory": self.factory}

    @classmethod
    def load(cls, directory: Path, descriptor: dict[str, Any], nprobe: int | None = None) -> IVFPQStore:
        index = faiss.read_index(str(Path(directory) / INDEX_FILE))
        return cls(index, descriptor.get("nprobe") if nprobe is None else nprobe, descriptor.get("factory"))


def _check_trainable(n: int, nlist: int, nbits: int) -> None:
    need = max(nlist, 2**nbits)
    if n < need:
        raise ValueError(f"an IVFPQ store with nlist={nlist} and {2**nbits}-entry PQ codebooks needs at least "
                         f"{need} keys to train, got {n}; use the exact flat store (kind='flat') for a "
                         f"database this small, or lower nlist/nbits")


STORES: dict[str, type[FaissStore]] = {FlatStore.kind: FlatStore, IVFPQStore.kind: IVFPQStore}


# Stores with an optional dependency, imported only when used (kind -> "module:Class").
LAZY_STORES: dict[str, str] = {"lancedb": "exitwise.raee.lance_store:LanceStore"}


def store_class(kind: Any) -> type | None:
    """The class for ``kind`` (importing a lazy store's module on demand), None if unknown."""
    if kind in STORES:
        return STORES[kind]
    if kind in LAZY_STORES:
        import importlib

        module, name = LAZY_STORES[kind].split(":")
        return getattr(importlib.import_module(module), name)
    return None


def store_kinds() -> list[str]:
    return sorted([*STORES, *LAZY_STORES])


def make_store(kind: str, dim: int, n: int, **opts: Any) -> VectorStore:
    """An empty store of ``kind`` for ``n`` keys of dimension ``dim`` (``opts`` go to the store's ``create``)."""
    cls = store_class(kind)
    if cls is None:
        raise ValueError(f"unknown vector store kind {kind!r}; valid kinds: {', '.join(store_kinds())}")
    return cls.create(dim, n, **opts)


def load_store(directory: Path, **opts: Any) -> VectorStore:
    """Rebuild a store saved with ``save`` (``opts``: search-time overrides, e.g. ``nprobe`` for ivfpq)."""
    directory = Path(directory)
    descriptor = json.loads(read_utf8(directory / DESCRIPTOR_FILE))
    kind = descriptor.get("kind")
    cls = store_class(kind)
    if cls is None:
        raise ValueError(f"{directory / DESCRIPTOR_FILE}: unknown vector store kind {kind!r}; "
                         f"valid kinds: {', '.join(store_kinds())}")
    store = cls.load(directory, descriptor, **opts)
    if store.dim != descriptor["dim"] or store.ntotal != descriptor["ntotal"]:
        raise ValueError(f"{directory}: index has dim={store.dim}, ntotal={store.ntotal} but the descriptor says "
                         f"dim={descriptor['dim']}, ntotal={descriptor['ntotal']}")
    return store
