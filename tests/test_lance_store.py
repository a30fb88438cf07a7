"""The on-disk LanceDB store: same answers as FlatStore when exact, good recall when indexed, persistence."""

import shutil

import numpy as np
import pytest

pytest.importorskip("lancedb")

from exitwise.raee.lance_store import LanceStore  # noqa: E402
from exitwise.raee.retrieval import VectorStore, load_store, make_store  # noqa: E402


def _data(n, d, seed=0):
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def _clustered(n, d, seed=0, clusters=32):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d)).astype(np.float32) * 3
    return centres[rng.integers(clusters, size=n)] + rng.standard_normal((n, d)).astype(np.float32)


def test_exact_mode_matches_flat():
    keys, queries = _data(500, 16), _data(20, 16, seed=1)
    lance, flat = make_store("lancedb", 16, 500), make_store("flat", 16, 500)
    assert isinstance(lance, LanceStore) and isinstance(lance, VectorStore)
    for store in (lance, flat):
        store.add(keys[:300])
        store.add(keys[300:])  # ids continue across adds
    (dl, il), (df, idf) = lance.search(queries, 12), flat.search(queries, 12)
    assert il.shape == (20, 12) and il.dtype == np.int64 and dl.dtype == np.float32
    np.testing.assert_array_equal(il, idf)
    np.testing.assert_allclose(dl, df, rtol=1e-4, atol=1e-4)
    assert not lance.describe()["approximate"]


def test_padding_like_faiss():
    store = make_store("lancedb", 4, 2)
    d, ids = store.search(_data(2, 4), k=3)  # empty store
    assert (ids == -1).all() and np.isinf(d).all()
    store.add(_data(2, 4))
    d, ids = store.search(_data(1, 4, seed=3), k=5)
    assert (ids[0, 2:] == -1).all() and np.isinf(d[0, 2:]).all() and set(ids[0, :2]) == {0, 1}


def test_bad_options():  # bad keys and k: test_retrieval.test_shape_errors, for every store
    with pytest.raises(ValueError, match="refine_factor"):
        make_store("lancedb", 4, 10, refine_factor=0)


def test_round_trip_and_damage(tmp_path):
    keys, queries = _data(300, 8), _data(5, 8, seed=2)
    store = make_store("lancedb", 8, 300)
    store.add(keys)
    store.save(tmp_path / "s")
    loaded = load_store(tmp_path / "s")
    assert isinstance(loaded, LanceStore) and loaded.describe() == store.describe()
    for a, b in zip(store.search(queries, 4), loaded.search(queries, 4), strict=True):
        np.testing.assert_array_equal(a, b)
    shutil.rmtree(tmp_path / "s" / "lance")
    with pytest.raises(ValueError, match=r"keys\.lance: Lance dataset missing"):
        load_store(tmp_path / "s")


def test_ivfpq_recall(tmp_path):
    # 4096 clustered rows with min_index_rows lowered so the IVF-PQ index is built (64 partitions, PQ8).
    # Measured recall@12 here: 0.95 with nprobe=20, refine_factor=10, and 0.38 with refine_factor=1 (PQ8
    # codes alone), so the 0.9 bar fails if re-ranking on the stored float32 vectors were lost.
    keys, queries = _clustered(4096, 64), _clustered(50, 64, seed=9)
    store = make_store("lancedb", 64, 4096, min_index_rows=1024, num_partitions=64, m=8)
    store.add(keys)
    flat = make_store("flat", 64, 4096)
    flat.add(keys)
    _, ids = store.search(queries, 12)
    _, exact = flat.search(queries, 12)
    recall = np.mean([len(set(a) & set(b)) / 12 for a, b in zip(ids, exact, strict=True)])
    assert store.indexed and recall > 0.9, recall
    store.save(tmp_path / "ivf")
    loaded = load_store(tmp_path / "ivf", nprobe=4)
    assert loaded.indexed and loaded.nprobe == 4
