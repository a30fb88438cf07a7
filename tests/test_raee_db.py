"""Database build/load, RAEE inference and evaluation on a tiny random model with a real tokenizer."""

import json

import numpy as np
import pytest

from exitwise.errors import DataError, IncompatibleError
from exitwise.raee.database import BuildConfig, Database, build_database
from exitwise.raee.evaluate import EvalConfig, evaluate, knn_vote
from exitwise.raee.pipeline import RAEE
from exitwise.raee.predictor import SelectConfig
from exitwise.raee.tasks import load_task
from tiny_models import smollm2_tokenizer, tiny_llama

WORDS = ["red", "green", "blue", "gold"]
SUBJECTS = ["the car", "my house", "a bird", "this flower", "the sky", "her dress", "an apple", "the sea",
            "our door", "his hat"]


@pytest.fixture(scope="module")
def tokenizer():
    return smollm2_tokenizer()


@pytest.fixture(scope="module")
def tiny(tokenizer):
    # large weights: layers disagree, so the oracle beats the last layer
    return tiny_llama(6, 32, tokenizer=tokenizer, name="tiny-llama", tie_word_embeddings=True, initializer_range=0.5)


def _write_task(tmp_path, n_train=40, n_test=40):
    rng = np.random.default_rng(0)

    def rows(n, offset):
        out = []
        for i in range(n):
            label = int(rng.integers(0, 4))
            out.append({"text": f"{SUBJECTS[(i + offset) % len(SUBJECTS)]} is {WORDS[label]} number {i + offset}",
                        "label": label})
        return out

    for split, data in (("train", rows(n_train, 0)), ("test", rows(n_test, 1000))):
        (tmp_path / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in data) + "\n")
    spec = {"name": "colours", "train": "train.jsonl", "test": "test.jsonl",
            "template": "Sentence: {text}\nColour:", "labels": WORDS}
    path = tmp_path / "colours.json"
    path.write_text(json.dumps(spec))
    return path


@pytest.mark.real_model
def test_build_load_and_evaluate(tmp_path, tiny):
    task_file = _write_task(tmp_path)
    task = load_task(task_file)
    db = build_database(tiny, task, tmp_path / "db", BuildConfig.paper(progress=False), task_source=str(task_file))
    assert len(db) == 40 and db.num_layers == 6
    assert db.layer_probs.shape == (40, 7, 4)
    # Exit-table entries are exactly the layers whose label-word prediction equals the gold label.
    preds = db.layer_probs.argmax(-1)
    for i in range(len(db)):
        assert db.table.entries(i)[0].tolist() == np.flatnonzero(preds[i] == db.labels[i]).tolist()
    again = Database.load(tmp_path / "db")
    assert again.manifest["checksums"] == db.manifest["checksums"]
    raee = RAEE(tiny, again, task)
    out = raee.classify(["the car is red number 7", "a bird is gold number 3"])
    assert [p.label in WORDS for p in out] == [True, True]
    assert all(0 <= p.exit_layer <= 6 for p in out)
    report = evaluate(raee, EvalConfig(test_limit=20, progress=False))
    for key in ("task", "model", "num_layers", "n_test", "speedup", "full", "raee", "oracle", "knn"):
        assert key in report
    assert report["n_test"] == 20 and report["num_layers"] == 6
    assert report["oracle"]["accuracy"] >= max(report["per_layer_accuracy"])
    # timed in turns: the answers are the same, only the timings are the fastest of each
    twice = evaluate(raee, EvalConfig(test_limit=20, progress=False, repeats=2, minilm=False))
    assert twice["timing"]["repeats"] == 2 and report["timing"]["repeats"] == 1
    assert twice["raee"]["accuracy"] == report["raee"]["accuracy"]
    assert twice["full"]["accuracy"] == report["full"]["accuracy"]
    with pytest.raises(ValueError, match="--repeats 0"):
        EvalConfig(repeats=0)


@pytest.mark.real_model
def test_db_on_test_set_with_k1_reaches_oracle(tmp_path, tiny):
    """RAEE with k = 1 over a database of the test set itself picks a correct layer whenever one exists."""
    task_file = _write_task(tmp_path)
    spec = json.loads(task_file.read_text())
    spec["train"] = "test.jsonl"
    task_file.write_text(json.dumps(spec))
    task = load_task(task_file)
    db = build_database(tiny, task, tmp_path / "db", BuildConfig.paper(progress=False))
    raee = RAEE(tiny, db, task, config=SelectConfig.paper(k=1))
    report = evaluate(raee, EvalConfig(progress=False))
    assert report["oracle"]["accuracy"] > report["full"]["accuracy"]  # the random model leaves room
    assert report["raee"]["accuracy"] == pytest.approx(report["oracle"]["accuracy"])


@pytest.mark.real_model
def test_interrupted_build_leaves_nothing_loadable(tmp_path, tiny, monkeypatch):
    import exitwise.raee.database as database

    task_file = _write_task(tmp_path)
    task = load_task(task_file)

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(database.np, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        build_database(tiny, task, tmp_path / "db", BuildConfig(progress=False))
    assert not (tmp_path / "db").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".db")]  # no temp dir left behind
    with pytest.raises(DataError, match="not an exitwise RAEE database"):
        Database.load(tmp_path / "db")


@pytest.mark.real_model
def test_corrupt_or_mismatched_database_is_refused(tmp_path, tiny, tokenizer):
    task_file = _write_task(tmp_path)
    task = load_task(task_file)
    build_database(tiny, task, tmp_path / "db", BuildConfig(progress=False))
    with pytest.raises(FileExistsError, match="already exists"):
        build_database(tiny, task, tmp_path / "db", BuildConfig(progress=False))
    db = Database.load(tmp_path / "db")
    # Another model (different depth) is refused, naming both.
    other = tiny_llama(4, 32, tokenizer=tokenizer, seed=1, name="other")
    with pytest.raises(IncompatibleError, match="num_layers"):
        db.check_compatible(other, task)
    # Another label set is refused.
    spec = json.loads(task_file.read_text())
    spec["labels"] = ["cyan", "green", "blue", "gold"]
    task_file.write_text(json.dumps(spec))
    with pytest.raises(IncompatibleError, match="label"):
        db.check_compatible(tiny, load_task(task_file))
    # A flipped byte is caught by the checksum.
    labels = tmp_path / "db" / "labels.npy"
    data = bytearray(labels.read_bytes())
    data[-1] ^= 0xFF
    labels.write_bytes(bytes(data))
    with pytest.raises(DataError, match="checksum of labels.npy"):
        Database.load(tmp_path / "db")


def test_knn_vote_weights_and_missing():
    labels = np.array([0, 1, 1, 2])
    dist = np.array([[1.0, 4.0, 4.0], [0.5, 1.0, np.inf]], dtype=np.float32)
    ids = np.array([[0, 1, 2], [3, 0, -1]])
    # Row 0: weight 1 for class 0 vs 0.25 + 0.25 for class 1 -> class 0.  Row 1: 2 (class 2) vs 1 (class 0).
    assert knn_vote(dist, ids, labels, 3, SelectConfig.paper()).tolist() == [0, 2]


def test_lancedb_store_gives_flat_predictions(tmp_path, tiny):
    pytest.importorskip("lancedb")
    task_file = _write_task(tmp_path)
    task = load_task(task_file)
    preds = {}
    for kind in ("flat", "lancedb"):
        build_database(tiny, task, tmp_path / kind, BuildConfig.paper(progress=False, store=kind),
                       task_source=str(task_file))
        db = Database.load(tmp_path / kind)
        assert db.manifest["store"]["kind"] == kind
        out = RAEE(tiny, db, task).classify(["the car is red number 7", "a bird is gold number 3"])
        preds[kind] = [(p.label, p.exit_layer) for p in out]
    assert preds["lancedb"] == preds["flat"]
