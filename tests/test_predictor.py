"""RAEE exit-layer selection (docs/papers.md, "RAEE") and the exit table."""

import numpy as np
import pytest

from exitwise.raee.predictor import (
    TABLE_FILE,
    ExitTable,
    SelectConfig,
    neighbour_mass,
    select_exit_layers,
)
from exitwise.raee.retrieval import FlatStore

PAPER = SelectConfig.paper()  # the tests below check the paper's algorithm by hand
L = 4  # layers 0..4

# ex0: one confident entry -> only (1, .95) survives the p >= 0.9 filter
# ex1: nothing confident -> top-3 by p: (3, .8), (4, .7), (2, .6); (1, .3) dropped
# ex2: never correct
# ex3: two confident entries, both kept
TABLE = ExitTable.from_lists([
    [(1, 0.95), (3, 0.5)],
    [(2, 0.6), (3, 0.8), (4, 0.7), (1, 0.3)],
    [],
    [(4, 0.92), (2, 0.99)],
])


def _approx(a, b):
    np.testing.assert_allclose(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64), rtol=1e-6)


def test_hand_computed_example():
    distances = np.array([[0.5, 1.0, 2.0], [0.25, 2.0, np.inf], [3.0, np.inf, np.inf]], dtype=np.float32)
    ids = np.array([[0, 1, 2], [1, 3, -1], [2, -1, -1]])
    d = select_exit_layers(distances, ids, TABLE, L, PAPER)
    # Query 0: w = 1/d = [2, 1, .5]; ex2 has no entries.
    #   l1: 2*.95 = 1.9   l2: 1*.6 = .6   l3: 1*.8 = .8   l4: 1*.7 = .7  -> layer 1
    _approx(d.scores[0], [0, 1.9, 0.6, 0.8, 0.7])
    # Query 1: w = [4, .5]; ex1 (top-3) and ex3 (confident).
    #   l2: 4*.6 + .5*.99 = 2.895   l3: 4*.8 = 3.2   l4: 4*.7 + .5*.92 = 3.26  -> layer 4
    _approx(d.scores[1], [0, 0, 2.895, 3.2, 3.26])
    # Query 2: only ex2, which has no entries -> fallback to the last layer.
    _approx(d.scores[2], [0] * 5)
    assert d.layers.tolist() == [1, 4, 4]
    assert d.fallback.tolist() == [False, False, True]
    assert d.layers.dtype == np.int64 and d.scores.dtype == np.float32 and d.scores.shape == (3, L + 1)


def test_uniform_weighting_ignores_distance():
    distances = np.array([[0.01, 100.0]], dtype=np.float32)
    ids = np.array([[0, 1]])
    inv = select_exit_layers(distances, ids, TABLE, L, PAPER)
    uni = select_exit_layers(distances, ids, TABLE, L, SelectConfig.paper(weighting="uniform"))
    assert inv.layers[0] == 1  # ex0 is 10^4 times closer
    # uniform: l1 .95, l2 .6, l3 .8, l4 .7 -> still 1; now make ex1 outvote ex0 with two copies
    _approx(uni.scores[0], [0, 0.95, 0.6, 0.8, 0.7])
    two = select_exit_layers(np.array([[0.01, 100.0, 100.0]]), np.array([[0, 1, 1]]), TABLE, L,
                             SelectConfig.paper(weighting="uniform"))
    assert two.layers[0] == 3  # l3: 1.6 > l1: .95


def test_min_prob_filter_and_top3_fallback():
    table = ExitTable.from_lists([
        [(0, 0.9), (1, 0.89), (2, 0.95)],  # 0.9 stored as float32 must still count as >= 0.9
        [(0, 0.5), (1, 0.4), (2, 0.6), (3, 0.7), (4, 0.1)],  # none confident -> top-3 = layers 3, 2, 0
        [(0, 0.5), (1, 0.5), (2, 0.5), (3, 0.5)],  # equal p -> the first three stored (stable sort)
    ])
    mass = neighbour_mass(table, np.array([0, 1, 2]), L, SelectConfig.paper())
    _approx(mass[0], [0.9, 0, 0.95, 0, 0])
    _approx(mass[1], [0.5, 0, 0.6, 0.7, 0])
    _approx(mass[2], [0.5, 0.5, 0.5, 0, 0])
    # A lower threshold keeps more; fallback_top=1 keeps only the best
    _approx(neighbour_mass(table, np.array([0]), L, SelectConfig.paper(min_prob=0.8))[0], [0.9, 0.89, 0.95, 0, 0])
    _approx(neighbour_mass(table, np.array([1]), L, SelectConfig.paper(fallback_top=1))[0], [0, 0, 0, 0.7, 0])


def test_fallback_when_no_neighbour_has_entries():
    table = ExitTable.from_lists([[], [], [(2, 0.3)]])
    d = select_exit_layers(np.array([[1.0, 2.0], [1.0, 2.0]]), np.array([[0, 1], [0, 2]]), table, L, PAPER)
    assert d.layers.tolist() == [L, 2]
    assert d.fallback.tolist() == [True, False]
    custom = select_exit_layers(np.array([[1.0, 2.0]]), np.array([[0, 1]]), table, L,
                                SelectConfig.paper(default_layer=2))
    assert custom.layers.tolist() == [2] and custom.fallback.tolist() == [True]
    # fallback_top=0 with no confident entries means the neighbour contributes nothing
    none = select_exit_layers(np.array([[1.0]]), np.array([[2]]), table, L, SelectConfig.paper(fallback_top=0))
    assert none.layers.tolist() == [L] and none.fallback.tolist() == [True]


def test_ties_go_to_the_shallowest_layer():
    table = ExitTable.from_lists([[(3, 0.5)], [(1, 0.5)]])
    for ids in ([[0, 1]], [[1, 0]]):
        d = select_exit_layers(np.array([[2.0, 2.0]]), np.array(ids), table, L, PAPER)
        _approx(d.scores[0], [0, 0.25, 0, 0.25, 0])
        assert d.layers.tolist() == [1]


def test_zero_distance_gets_a_large_finite_weight():
    table = ExitTable.from_lists([[(1, 0.95)], [(3, 0.99), (2, 0.99), (4, 0.99)]])
    d = select_exit_layers(np.array([[0.0, 1e-3]], dtype=np.float32), np.array([[0, 1]]), table, L, PAPER)
    assert np.isfinite(d.scores).all()
    _approx(d.scores[0, 1], 0.95 / 1e-6)  # w = 1 / max(0, eps)
    assert d.layers.tolist() == [1]
    # tiny negative squared distances (float round-off of a duplicate) are clamped the same way
    neg = select_exit_layers(np.array([[-1e-7, 1e-3]]), np.array([[0, 1]]), table, L, PAPER)
    _approx(neg.scores, d.scores)


def test_k_larger_than_database_via_store():
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((3, 8)).astype(np.float32)
    store = FlatStore.create(8)
    store.add(keys)
    distances, ids = store.search(keys[:1] + 0.01, k=12)
    assert (ids[0, 3:] == -1).all() and np.isinf(distances[0, 3:]).all()
    table = ExitTable.from_lists([[(2, 0.95)], [(3, 0.95)], [(3, 0.95)]])
    d = select_exit_layers(distances, ids, table, L, PAPER)
    assert d.layers.tolist() == [2]  # key 0 is by far the nearest
    assert not d.fallback[0]


def test_only_first_k_columns_are_used():
    table = ExitTable.from_lists([[(1, 0.95)], [(3, 0.95)]])
    distances, ids = np.array([[1.0, 1.0, 1.0]]), np.array([[0, 1, 1]])
    assert select_exit_layers(distances, ids, table, L, SelectConfig.paper(k=3)).layers.tolist() == [3]
    assert select_exit_layers(distances, ids, table, L, SelectConfig.paper(k=1)).layers.tolist() == [1]


def _reference(distances, ids, tables, num_layers, cfg):
    """The selection rule of docs/papers.md ("RAEE"), literally, with Python lists and dicts."""
    out = []
    for drow, irow in zip(distances, ids, strict=True):
        score = {}
        for dist, j in list(zip(drow, irow, strict=True))[: cfg.k]:
            if j < 0:
                continue
            w = 1.0 if cfg.weighting == "uniform" else 1.0 / max(float(dist), cfg.eps)
            s = [(la, p) for la, p in tables[j] if np.float32(p) >= np.float32(cfg.min_prob)]
            if not s:
                s = sorted(tables[j], key=lambda e: e[1], reverse=True)[: cfg.fallback_top]
            for la, p in s:
                score[la] = score.get(la, 0.0) + float(np.float32(p)) * w
        if not score or max(score.values()) <= 0:
            out.append(num_layers)
        else:
            best = max(score.values())
            out.append(min(la for la, v in score.items() if v == best))
    return out


@pytest.mark.parametrize("weighting", ["inverse_distance", "uniform"])
def test_matches_reference_on_random_data(weighting):
    rng = np.random.default_rng(1)
    num_layers, n = 8, 40
    tables = []
    for _ in range(n):
        layers = rng.choice(num_layers + 1, size=rng.integers(0, 7), replace=False)
        tables.append([(int(la), float(np.round(rng.uniform(0.3, 1.0), 2))) for la in layers])
    table = ExitTable.from_lists(tables)
    ids = rng.integers(-1, n, size=(30, 6))
    distances = rng.uniform(0.1, 3.0, size=ids.shape).astype(np.float32)
    cfg = SelectConfig.paper(k=5, weighting=weighting)
    got = select_exit_layers(distances, ids, table, num_layers, cfg)
    assert got.layers.tolist() == _reference(distances, ids, tables, num_layers, cfg)


def test_input_errors():
    with pytest.raises(ValueError, match="out of range"):
        select_exit_layers(np.ones((1, 2)), np.array([[0, 9]]), TABLE, L)
    with pytest.raises(ValueError, match=r"\(Q, k\)"):
        select_exit_layers(np.ones((1, 3)), np.array([[0, 1]]), TABLE, L)
    with pytest.raises(ValueError, match="default_layer"):
        select_exit_layers(np.ones((1, 1)), np.array([[0]]), TABLE, L, SelectConfig.paper(default_layer=L + 1))
    with pytest.raises(ValueError, match="another backbone"):
        select_exit_layers(np.ones((1, 1)), np.array([[0]]), TABLE, num_layers=2)
    with pytest.raises(ValueError, match="weighting"):
        SelectConfig.paper(weighting="softmax")
    with pytest.raises(ValueError, match="eps"):
        SelectConfig.paper(eps=0.0)


# ------------------------------------------------------------------------------------- ExitTable
def test_exit_table_layout_and_round_trip(tmp_path):
    assert len(TABLE) == 4 and TABLE.num_entries == 8
    assert TABLE.offsets.tolist() == [0, 2, 6, 6, 8]
    assert TABLE.layers.dtype == np.int16 and TABLE.probs.dtype == np.float32 and TABLE.offsets.dtype == np.int64
    layers, probs = TABLE.entries(3)
    assert layers.tolist() == [4, 2] and np.allclose(probs, [0.92, 0.99])
    assert TABLE.entries(2)[0].size == 0
    with pytest.raises(IndexError):
        TABLE.entries(4)
    TABLE.save(tmp_path)
    loaded = ExitTable.load(tmp_path)
    for name in ("offsets", "layers", "probs"):
        got, want = getattr(loaded, name), getattr(TABLE, name)
        assert got.dtype == want.dtype and np.array_equal(got, want)
    with np.load(tmp_path / TABLE_FILE, allow_pickle=False) as z:  # no object arrays inside
        assert sorted(z.files) == ["layers", "offsets", "probs"]
    loaded.validate(L)


def test_exit_table_from_readouts():
    predictions = np.array([[0, 1, 1], [2, 2, 0]])  # (N=2, L+1=3)
    max_probs = np.array([[0.5, 0.7, 0.9], [0.4, 0.6, 0.8]])
    t = ExitTable.from_readouts(predictions, max_probs, np.array([1, 2]))
    assert t.entries(0)[0].tolist() == [1, 2] and np.allclose(t.entries(0)[1], [0.7, 0.9])
    assert t.entries(1)[0].tolist() == [0, 1] and np.allclose(t.entries(1)[1], [0.4, 0.6])


@pytest.mark.parametrize(("table", "message"), [
    (ExitTable(np.array([0, 2, 1, 3]), np.zeros(3), np.zeros(3)), "non-decreasing"),
    (ExitTable(np.array([1, 2]), np.zeros(2), np.zeros(2)), "start at 0"),
    (ExitTable(np.array([0, 2]), np.zeros(3), np.zeros(3)), "offsets end at 2"),
    (ExitTable(np.array([0, 1]), np.array([L + 1]), np.array([0.5])), "outside 0..4"),
    (ExitTable(np.array([0, 1]), np.array([-1]), np.array([0.5])), "outside 0..4"),
    (ExitTable(np.array([0, 1]), np.array([1]), np.array([1.5])), r"outside \[0, 1\]"),
    (ExitTable(np.array([0, 1]), np.array([1]), np.array([np.nan])), r"outside \[0, 1\]"),
])
def test_exit_table_validate_errors(table, message):
    with pytest.raises(ValueError, match=message):
        table.validate(L)
