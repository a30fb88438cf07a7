"""Vector stores: exact flat search, the paper's IVF-HNSW-PQ index, persistence."""

import json

import faiss
import numpy as np
import pytest

from exitwise.raee.retrieval import (
    DESCRIPTOR_FILE,
    FlatStore,
    IVFPQStore,
    VectorStore,
    load_store,
    make_store,
    paper_nlist,
)

N_IVF, D_IVF, M_IVF = 600, 32, 8  # small enough to train in well under a second


@pytest.fixture(autouse=True)
def one_faiss_thread():
    # The test machine is shared; OpenMP spinning on busy cores makes FAISS training ~10x slower.
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def _data(n, d, seed=0):
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def _brute_force(keys, queries, k):
    d2 = ((queries[:, None, :].astype(np.float64) - keys[None, :, :]) ** 2).sum(-1)  # (Q, N)
    ids = np.argsort(d2, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d2, ids, axis=1), ids


@pytest.fixture(scope="module")
def ivf_store():
    faiss.omp_set_num_threads(1)
    store = make_store("ivfpq", D_IVF, N_IVF, m=M_IVF)
    with pytest.warns(UserWarning, match="FAISS recommends"):
        store.add(_data(N_IVF, D_IVF))
    return store


def test_flat_store_is_exact():
    keys, queries = _data(200, 16), _data(10, 16, seed=1)
    store = make_store("flat", 16, 200)
    assert isinstance(store, FlatStore) and isinstance(store, VectorStore)
    store.add(keys[:120])
    store.add(keys[120:])  # ids continue across adds
    distances, ids = store.search(queries, k=5)
    want_d, want_ids = _brute_force(keys, queries, 5)
    assert ids.dtype == np.int64 and distances.dtype == np.float32 and ids.shape == (10, 5)
    assert np.array_equal(ids, want_ids)
    np.testing.assert_allclose(distances, want_d, rtol=1e-4)  # squared L2, not L2


def test_fewer_than_k_hits_are_padded():
    store = FlatStore.create(4)
    _, ids = store.search(_data(2, 4), k=3)  # empty store
    assert (ids == -1).all()
    store.add(_data(2, 4))
    distances, ids = store.search(_data(1, 4, seed=3), k=5)
    assert sorted(ids[0, :2].tolist()) == [0, 1]
    assert (ids[0, 2:] == -1).all() and np.isinf(distances[0, 2:]).all() and np.isfinite(distances[0, :2]).all()


@pytest.mark.parametrize("kind", ["flat", "lancedb"])  # every store checks its input the same way
def test_shape_errors(kind):
    if kind == "lancedb":
        pytest.importorskip("lancedb")
    store = make_store(kind, 4, 10)
    with pytest.raises(ValueError, match=r"shape \(N, 4\)"):
        store.add(_data(3, 5))
    with pytest.raises(ValueError, match="NaN"):
        store.add(np.full((1, 4), np.nan, dtype=np.float32))
    with pytest.raises(ValueError, match="k must be"):
        store.search(_data(1, 4), k=0)


def test_kind_errors():
    with pytest.raises(ValueError, match="flat, ivfpq"):
        make_store("hnsw", 4, 10)


def test_flat_save_load_round_trip(tmp_path):
    keys, queries = _data(50, 8), _data(4, 8, seed=2)
    store = make_store("flat", 8, 50)
    store.add(keys)
    store.save(tmp_path / "db")
    loaded = load_store(tmp_path / "db")
    assert isinstance(loaded, FlatStore) and loaded.describe() == store.describe()
    assert loaded.describe() == {"kind": "flat", "dim": 8, "ntotal": 50, "metric": "squared_l2"}
    for a, b in zip(store.search(queries, 3), loaded.search(queries, 3), strict=True):
        assert np.array_equal(a, b)


def test_load_rejects_unknown_kind(tmp_path):
    FlatStore.create(4).save(tmp_path)
    desc = json.loads((tmp_path / DESCRIPTOR_FILE).read_text())
    (tmp_path / DESCRIPTOR_FILE).write_text(json.dumps({**desc, "kind": "annoy"}))
    with pytest.raises(ValueError, match="unknown vector store kind 'annoy'"):
        load_store(tmp_path)


def test_paper_nlist():
    assert paper_nlist(8000) == int(8 * np.sqrt(8000)) == 715
    assert paper_nlist(1_000_000) == 8000
    assert paper_nlist(2_000_000) == 65_536
    assert paper_nlist(50_000_000) == 262_144
    assert paper_nlist(200_000_000) == 1_048_576


def test_ivfpq_paper_factory_for_minilm_dim():
    store = make_store("ivfpq", 384, 2000)  # not trained here: construction only
    assert store.factory == "IVF357_HNSW32,PQ64"
    assert store.nlist == 357 and store.nprobe == 16  # default min(nlist, 16)
    assert faiss.extract_index_ivf(store.index).nprobe == 16


def test_ivfpq_too_few_keys():
    with pytest.raises(ValueError, match="at least 256 keys.*kind='flat'"):
        make_store("ivfpq", D_IVF, 100, m=M_IVF)
    store = make_store("ivfpq", D_IVF, 1000, m=M_IVF)  # sized for 1000, then given too few
    with pytest.raises(ValueError, match="needs at least 256 keys to train, got 200"):
        store.add(_data(200, D_IVF))
    with pytest.raises(ValueError, match="divisible by 64"):
        make_store("ivfpq", 100, 1000)


def test_ivfpq_nprobe_is_applied(ivf_store):
    keys, queries = _data(N_IVF, D_IVF), _data(40, D_IVF, seed=5)
    _, exact = _brute_force(keys, queries, 10)

    def recall(nprobe):
        ivf_store.nprobe = nprobe
        assert faiss.extract_index_ivf(ivf_store.index).nprobe == nprobe
        _, ids = ivf_store.search(queries, 10)
        return np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids.tolist(), exact.tolist(), strict=True)])

    low, high = recall(1), recall(ivf_store.nlist)
    assert high > low + 0.2, (low, high)  # one cell of ~195 misses most true neighbours
    assert high > 0.5
    with pytest.raises(ValueError, match="nprobe"):
        ivf_store.nprobe = ivf_store.nlist + 1


def test_ivfpq_save_load_keeps_nprobe(ivf_store, tmp_path):
    ivf_store.nprobe = 7
    ivf_store.save(tmp_path)
    desc = json.loads((tmp_path / DESCRIPTOR_FILE).read_text())
    assert desc["kind"] == "ivfpq" and desc["nprobe"] == 7 and desc["nlist"] == paper_nlist(N_IVF)
    assert desc["factory"] == f"IVF{paper_nlist(N_IVF)}_HNSW32,PQ{M_IVF}"
    loaded = load_store(tmp_path)
    assert isinstance(loaded, IVFPQStore) and loaded.ntotal == N_IVF
    assert faiss.extract_index_ivf(loaded.index).nprobe == 7
    queries = _data(5, D_IVF, seed=9)
    for a, b in zip(ivf_store.search(queries, 4), loaded.search(queries, 4), strict=True):
        assert np.array_equal(a, b)
    override = load_store(tmp_path, nprobe=3)
    assert faiss.extract_index_ivf(override.index).nprobe == 3 and override.describe()["nprobe"] == 3
