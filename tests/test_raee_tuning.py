"""RAEE's per-task settings (cross-validation on the training sample), the neighbours' vote in the
answer, the frontier report, and one database load per eval. Synthetic arrays and a tiny random
model with the real tokenizer; nothing here asserts a timing."""

import json
from dataclasses import replace

import numpy as np
import pytest

from exitwise.raee.database import BuildConfig, Database, build_database
from exitwise.raee.evaluate import EvalConfig, evaluate
from exitwise.raee.layerwise import predict_at_layers
from exitwise.raee.pipeline import RAEE
from exitwise.raee.predictor import ExitTable, SelectConfig, early_answers, label_vote, mix_answer
from exitwise.raee.tasks import load_task
from exitwise.raee.tuning import (
    DEFAULT_MIN_SPEEDUP,
    Objective,
    SearchSpace,
    leave_one_out,
    nearest,
    simulate,
    sweep,
    tune,
)
from tiny_models import smollm2_tokenizer, tiny_llama

WORDS = ["red", "green", "blue", "gold"]


# ------------------------------------------------------------------------- synthetic training samples
def _sample(n=240, layers=12, classes=3, seed=0):
    """Readout probabilities that get better with depth and keys whose neighbours share the label
    more often at deeper key layers: a training sample where depth buys accuracy."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    probs = np.zeros((n, layers + 1, classes), dtype=np.float32)
    for layer in range(layers + 1):
        skill = layer / layers  # 0 at the embedding, 1 at the last layer
        right = rng.random(n) < 0.4 + 0.55 * skill
        pred = np.where(right, labels, (labels + rng.integers(1, classes, n)) % classes)
        probs[:, layer] = 0.2 / (classes - 1)
        probs[np.arange(n), layer, pred] = 0.8
    centres = rng.normal(size=(classes, 8))

    def keys(layer):
        noise = 3.0 - 2.5 * (layer or 0) / layers
        k = centres[labels] + noise * rng.normal(size=(n, 8))
        return (k / np.linalg.norm(k, axis=1, keepdims=True)).astype(np.float32)

    cache = {}
    return probs, labels, (lambda layer: cache.setdefault(layer, keys(layer)))


SMALL = SearchSpace(ks=(4, 8), slacks=(0.5, 0.8, 1.0), vote_weights=(0.0, 0.3, 1.0), early_votes=(None, 1.0))


def _tune(objective, probs, labels, key_at, space=SMALL):
    return tune(key_at, probs, labels, np.ones(probs.shape[1], dtype=bool), objective, space, SelectConfig(),
                [1, 3, 5])


def test_objective_moves_the_choice_in_the_expected_direction():
    probs, labels, key_at = _sample()
    acc = _tune(Objective("accuracy"), probs, labels, key_at).chosen
    bal = _tune(Objective("balanced"), probs, labels, key_at).chosen
    fast = _tune(Objective("speed"), probs, labels, key_at).chosen
    assert acc.mean_layers_run >= bal.mean_layers_run >= fast.mean_layers_run
    assert acc.accuracy >= bal.accuracy >= fast.accuracy
    assert fast.speedup >= DEFAULT_MIN_SPEEDUP  # the default floor of "speed" and "balanced"
    bounded = _tune(Objective("accuracy", max_depth=4.0), probs, labels, key_at).chosen
    assert bounded.mean_layers_run <= 4.0
    floor = _tune(Objective("accuracy", min_speedup=3.0), probs, labels, key_at).chosen
    assert floor.speedup >= 3.0


def test_bad_objectives_name_the_flag_and_value():
    with pytest.raises(ValueError, match="--objective 'fast'"):
        Objective("fast")
    with pytest.raises(ValueError, match="--min-speedup 0.5"):
        Objective(min_speedup=0.5)
    with pytest.raises(ValueError, match="--max-depth -1"):
        Objective(max_depth=-1)
    probs, labels, key_at = _sample()
    with pytest.raises(ValueError, match=r"--min-speedup 50.0: no setting reaches it .*fastest tried"):
        _tune(Objective(min_speedup=50.0), probs, labels, key_at)


def test_a_setting_that_skips_nothing_is_never_chosen():
    probs, labels, key_at = _sample()
    res = _tune(Objective("accuracy"), probs, labels, key_at)
    assert res.chosen.speedup > 1.0 and res.chosen.mean_layers_run < probs.shape[1] - 1


def test_leave_one_out_never_returns_the_query():
    keys = np.random.default_rng(0).normal(size=(30, 4)).astype(np.float32)
    dist, ids = leave_one_out(keys, 5)
    assert ids.shape == (30, 5) and not (ids == np.arange(30)[:, None]).any()
    assert (np.diff(dist, axis=1) >= 0).all()


def test_sweep_scores_a_setting_as_simulate_does():
    """The grid's shortcut (score once per key layer and k, then every slack, weight and threshold)
    gives each setting the accuracy and depth that running that setting alone gives."""
    probs, labels, key_at = _sample()
    table = ExitTable.from_readouts(probs.argmax(-1), probs.max(-1), labels)
    nbrs = {3: leave_one_out(key_at(3), 8)}
    got, scored = sweep(nbrs.__getitem__, table, probs, labels, labels, replace(SMALL, confirm_levels=2),
                        SelectConfig(), [3])
    confirmed = [c for c in got if c.confirm]
    assert confirmed and scored > len(got)  # the confirmations kept are a frontier of those scored
    assert any(len(c.confirm) == 2 for c in confirmed)  # two levels
    for c in got[::7] + confirmed:
        out = simulate(*nbrs[3], table, probs, labels, c.config(SelectConfig()), 3)
        assert c.accuracy == pytest.approx((out.pred == labels).mean())
        assert c.mean_layers_run == pytest.approx(out.layers_run.mean())
        assert c.confirm_share == pytest.approx(out.confirmed.mean())


def test_a_pinned_confirmation_is_on_every_setting_scored():
    probs, labels, key_at = _sample()
    res = _tune(Objective("accuracy"), probs, labels, key_at,
                space=SMALL.pinned(k=8, confirm=(0.9,), confirm_layers=(8,)))
    assert res.chosen.k == 8 and res.chosen.confirm == (0.9,) and res.chosen.confirm_layers == (8,)
    assert all(c.confirm == (0.9,) for c in res.front)
    table = ExitTable.from_readouts(probs.argmax(-1), probs.max(-1), labels)
    out = simulate(*leave_one_out(key_at(res.chosen.key_layer), 8), table, probs, labels,
                   res.select(SelectConfig()), res.chosen.key_layer)
    assert res.chosen.accuracy == pytest.approx((out.pred == labels).mean()) and out.confirmed.any()
    with pytest.raises(ValueError, match="give both"):
        SMALL.pinned(confirm=(0.9,))


def test_mixture_weight_zero_is_the_readout_and_one_is_the_vote():
    probs, labels, key_at = _sample()
    table = ExitTable.from_readouts(probs.argmax(-1), probs.max(-1), labels)
    dist, ids = leave_one_out(key_at(3), 8)
    plain = simulate(dist, ids, table, probs, labels, SelectConfig(k=8), 3)
    assert np.array_equal(plain.pred, probs[np.arange(len(labels)), plain.exit_layer].argmax(1))
    vote = label_vote(dist, ids, labels, 3, SelectConfig(k=8))
    only_vote = simulate(dist, ids, table, probs, labels, SelectConfig(k=8, vote_weight=1.0), 3)
    assert np.array_equal(only_vote.pred, vote.argmax(1))
    assert np.allclose(vote.sum(1), 1.0)
    readout = probs[:, 5].astype(np.float64)
    assert mix_answer(readout, vote, 0.0) is readout
    # early answers: a unanimous vote answers at the key layer
    early = early_answers(vote, 1.0)
    eager = simulate(dist, ids, table, probs, labels, SelectConfig(k=8, early_vote=1.0), 3)
    assert np.array_equal(eager.early, early) and (eager.layers_run[early] == 3).all()
    assert np.array_equal(eager.pred[early], vote.argmax(1)[early])


# ----------------------------------------------------------------------------------- tiny model, end to end
@pytest.fixture(scope="module")
def tokenizer():
    return smollm2_tokenizer()


@pytest.fixture(scope="module")
def tiny(tokenizer):
    return tiny_llama(6, 32, tokenizer=tokenizer, name="tiny-6", tie_word_embeddings=True, initializer_range=0.1)


def _task(tmp_path, test_seed=1, name="colours.json"):
    def rows(n, offset, seed):
        rng = np.random.default_rng(seed)
        labels = rng.integers(0, 4, n)
        return [{"text": f"item {i + offset} is {WORDS[y]} and round", "label": int(y)} for i, y in enumerate(labels)]

    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows(80, 0, 0)) + "\n")
    (tmp_path / "test.jsonl").write_text("\n".join(json.dumps(r) for r in rows(24, 1000, test_seed)) + "\n")
    spec = {"name": "colours", "train": "train.jsonl", "test": "test.jsonl",
            "template": "Sentence: {text}\nColour:", "labels": WORDS}
    (tmp_path / name).write_text(json.dumps(spec))
    return tmp_path / name


def _build(tiny, task_file, out, **overrides):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fewer examples per class than k, on 80 rows
        return build_database(tiny, load_task(task_file), out, BuildConfig(progress=False, **overrides),
                              task_source=str(task_file))


def _untuned(tmp_path, tiny):
    """A database with the settings as given (in-pass key at layer 2), its task and 12 texts."""
    task_file = _task(tmp_path)
    db = _build(tiny, task_file, tmp_path / "db", objective=None, encoder="backbone:2")
    return db, load_task(task_file), [f"item {i} is {WORDS[i % 4]} and round" for i in range(12)]


@pytest.mark.real_model
def test_settings_come_from_training_data_only_and_the_manifest_records_them(tmp_path, tiny):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    db_a = _build(tiny, _task(a, test_seed=1), tmp_path / "a.db")
    db_b = _build(tiny, _task(b, test_seed=2), tmp_path / "b.db")  # another test split, same training split
    assert (a / "test.jsonl").read_text() != (b / "test.jsonl").read_text()
    ta, tb = db_a.manifest["tuning"], db_b.manifest["tuning"]
    assert ta == tb and db_a.manifest["select"] == db_b.manifest["select"]
    chosen = ta["chosen"]
    assert db_a.manifest["encoder"]["spec"] == f"backbone:{chosen['key_layer']}" == f"backbone:{db_a.key_layer}"
    select = db_a.select_config()
    assert (select.k, select.slack, select.vote_weight, select.early_vote) == \
        (chosen["k"], chosen["slack"], chosen["vote_weight"], chosen["early_vote"])
    assert ta["chosen_on"].startswith("train") and ta["objective"]["name"] == "balanced"
    assert set(ta["cv"]) >= {"accuracy", "mean_layers_run", "speedup"} and ta["front"]
    assert ta["best_fixed"]["layer"] in range(7) and 0 <= ta["knn"]["accuracy"] <= 1
    # an objective and a pinned setting are honoured; --no-tune keeps the settings as given
    fast = _build(tiny, a / "colours.json", tmp_path / "fast.db", objective=Objective("speed"),
                  space=SearchSpace().pinned(k=4))
    assert fast.manifest["tuning"]["chosen"]["k"] == 4 and fast.select_config().k == 4
    assert fast.manifest["tuning"]["cv"]["mean_layers_run"] <= ta["cv"]["mean_layers_run"]
    plain = _build(tiny, a / "colours.json", tmp_path / "plain.db", objective=None)
    assert plain.manifest["tuning"] is None and plain.select_config() == SelectConfig()


@pytest.mark.real_model
def test_vote_weight_zero_is_plain_raee_and_early_answers_skip_the_layers(tmp_path, tiny):
    db, task, texts = _untuned(tmp_path, tiny)
    plain = RAEE(tiny, db, task, config=SelectConfig(k=8))
    preds, layers, conf = plain.predict(texts)
    # weight 0: the readout at the chosen exit, as a pass truncated there answers
    at_exit, _ = predict_at_layers(tiny, task.encode(texts, tiny.tokenizer), plain.label_ids, layers,
                                   readout=plain.readout)
    assert np.array_equal(preds, at_exit)
    # weight 1: the neighbours' vote, at the same exits
    voted, layers1, _ = RAEE(tiny, db, task, config=SelectConfig(k=8, vote_weight=1.0)).predict(texts)
    assert np.array_equal(layers1, layers)
    dist, ids = db.store.search(plain.keys(texts), 8)
    vote = label_vote(dist, ids, db.labels, 4, SelectConfig(k=8))
    assert np.array_equal(voted, vote.argmax(1))
    # an early answer (threshold at the smallest share: every query) stops at the key layer
    eager, eager_layers, eager_conf = RAEE(tiny, db, task, config=SelectConfig(k=8, early_vote=1e-6)).predict(texts)
    assert (eager_layers == 2).all() and np.array_equal(eager, vote.argmax(1))
    assert np.allclose(eager_conf, vote.max(1))


def test_confirmation_levels_stop_at_a_confident_answer():
    """Each query is asked the first level above the layer it was read at; confident, it stops."""
    from exitwise.raee.predictor import confirm_rows

    config = SelectConfig(confirm=(0.9, 0.6), confirm_layers=(4, 8))
    answer = np.array([[0.5, 0.5], [0.95, 0.05], [0.7, 0.3], [0.7, 0.3], [0.5, 0.5], [0.5, 0.5]])
    layers = np.array([2, 2, 2, 5, 8, 2])
    done = np.array([False, False, False, False, False, True])  # the last was answered early
    go, target, checked = confirm_rows(answer, done, layers, config)
    assert go.tolist() == [True, False, True, False, False, False]
    assert target.tolist() == [4, 2, 4, 5, 8, 2]
    assert checked.tolist() == [True, True, True, True, False, False]  # no level above layer 8
    with pytest.raises(ValueError, match="one threshold per layer"):
        SelectConfig(confirm=(0.9,), confirm_layers=(4, 8))
    with pytest.raises(ValueError, match="increasing"):
        SelectConfig(confirm=(0.9, 0.9), confirm_layers=(8, 4))


@pytest.mark.real_model
def test_a_doubtful_answer_is_read_again_at_the_confirmation_layers(tmp_path, tiny):
    db, task, texts = _untuned(tmp_path, tiny)
    token_ids = task.encode(texts, tiny.tokenizer)
    base = SelectConfig(k=8, slack=0.5, vote_weight=0.3)
    plain = RAEE(tiny, db, task, config=base)
    preds, layers, conf = plain.predict(texts)
    dist, ids = db.store.search(plain.keys(texts), 8)
    vote = label_vote(dist, ids, db.labels, 4, base)

    def read_at(layer):  # every class's probability at ``layer``, mixed with the vote
        _, p = predict_at_layers(tiny, token_ids, plain.label_ids, np.full(len(texts), layer), readout=plain.readout,
                                 prefix=plain.prefix(), reuse_prefix=False, with_probs=True)
        return mix_answer(p.astype(np.float64), vote, 0.3)

    # threshold 1: every answer below layer 5 is doubtful and read again there, as a pass truncated at
    # 5 answers it; the others stand as they were
    got, got_layers, _ = RAEE(tiny, db, task, config=replace(base, confirm=(1.0,), confirm_layers=(5,))).predict(texts)
    moved = layers < 5
    assert moved.any() and (got_layers[moved] == 5).all() and np.array_equal(got_layers[~moved], layers[~moved])
    at5 = read_at(5)
    assert np.array_equal(got[moved], at5.argmax(1)[moved]) and np.array_equal(got[~moved], preds[~moved])
    # a threshold between the answers' confidences moves exactly the ones below it
    cut = float(np.median(conf[moved]))
    _, half_layers, _ = RAEE(tiny, db, task, config=replace(base, confirm=(cut,), confirm_layers=(5,))).predict(texts)
    assert np.array_equal(half_layers == 5, (moved & (conf < cut)) | (layers == 5))
    # two levels: what is still doubtful at layer 5 goes on to 6 (a confident answer stops at 5)
    two = replace(base, confirm=(1.0, float(np.median(at5.max(1)[moved]))), confirm_layers=(5, 6))
    got2, layers2, _ = RAEE(tiny, db, task, config=two).predict(texts)
    again = moved & (at5.max(1) < two.confirm[1])
    assert again.any() and (layers2[again] == 6).all() and (layers2[moved & ~again] == 5).all()
    assert np.array_equal(got2[again], read_at(6).argmax(1)[again])
    # the simulation the tuning scores is this pipeline
    report = evaluate(RAEE(tiny, db, task, config=two), EvalConfig(test_limit=16, progress=False, minilm=False))
    assert report["raee"]["agrees_with_simulation"] == 1.0 and report["raee"]["confirm_share"] > 0
    # a confirmation needs an in-pass key and layers above it
    with pytest.raises(ValueError, match=r"confirm_layers \[2\]"):
        RAEE(tiny, db, task, config=replace(base, confirm=(0.9,), confirm_layers=(2,)))


@pytest.mark.real_model
def test_eval_report_has_the_frontier_and_the_required_figures(tmp_path, tiny):
    task_file = _task(tmp_path)
    db = _build(tiny, task_file, tmp_path / "db")
    report = evaluate(RAEE(tiny, db, load_task(task_file)), EvalConfig(test_limit=16, progress=False))
    for block, key in (("raee", "accuracy"), ("full", "accuracy"), ("knn", "accuracy"), ("knn_minilm", "accuracy"),
                       ("best_fixed", "accuracy"), ("best_fixed", "layer"), ("fixed_at_depth", "accuracy")):
        assert key in report[block], (block, key)
    assert report["knn_minilm"]["accuracy"] is None or 0 <= report["knn_minilm"]["accuracy"] <= 1
    assert report["speedup"] > 0
    settings = report["settings"]
    assert settings["key_layer"] == db.key_layer and settings["k"] == db.select_config().k
    assert settings["chosen_on"].startswith("train") and settings["cv"]["accuracy"] >= 0
    # the simulation the frontier uses is the RAEE that ran
    assert report["raee"]["agrees_with_simulation"] == 1.0
    front = report["frontier"]
    kinds = {p["kind"] for p in front["points"]}
    assert {"full", "raee", "raee_setting", "fixed", "knn"} <= kinds
    assert sum(p["kind"] == "fixed" for p in front["points"]) == 7  # every probe layer 0..6
    names = {p["name"] for p in front["points"]}
    assert front["dominant"] and set(front["dominant"]) <= names
    for p in front["points"]:
        assert (p["name"] in front["dominant"]) == (not p["dominated_by"])
        for q in p["dominated_by"]:
            other = next(x for x in front["points"] if x["name"] == q)
            assert other["accuracy"] >= p["accuracy"] and other["speedup"] >= p["speedup"]
    from exitwise.raee.evaluate import plot_report

    plot_report(report, tmp_path / "r.png")
    assert (tmp_path / "r.png").stat().st_size > 10_000


@pytest.mark.real_model
def test_eval_opens_the_database_once(tmp_path, tiny, monkeypatch):
    from exitwise.cli import main

    task_file = _task(tmp_path)
    _build(tiny, task_file, tmp_path / "db")
    loads = []
    real_load = Database.load.__func__

    def counting_load(cls, path):
        loads.append(path)
        return real_load(cls, path)

    monkeypatch.setattr(Database, "load", classmethod(counting_load))
    monkeypatch.setattr("exitwise.models.loading.load_recorded_model", lambda *a, **k: tiny)
    out = tmp_path / "eval.json"
    assert main(["raee", "eval", "--db", str(tmp_path / "db"), "--test-limit", "8", "--json", str(out),
                 "--plot", str(tmp_path / "eval.png")]) == 0
    assert len(loads) == 1
    report = json.loads(out.read_text())
    assert report["raee"]["accuracy"] is not None and "frontier" in report
    assert (tmp_path / "eval.png").stat().st_size > 10_000


def test_build_refuses_a_bad_objective_before_loading_anything(tmp_path, capsys):
    from exitwise.cli import main

    assert main(["raee", "build", "--model", "smollm2-135m", "--task", "SST-2", "--out", str(tmp_path / "db"),
                 "--objective", "fast"]) == 2
    err = capsys.readouterr().err
    assert "--objective 'fast'" in err and "accuracy, balanced, speed" in err
    assert main(["raee", "build", "--model", "smollm2-135m", "--task", "SST-2", "--out", str(tmp_path / "db"),
                 "--min-speedup", "0.5"]) == 2
    assert "--min-speedup 0.5" in capsys.readouterr().err
    for flags, said in ((["--confirm", "0.8"], "one threshold per layer"),
                        (["--confirm", "0.8", "0.7", "--confirm-layers", "20", "15"], "increasing, got [20, 15]")):
        assert main(["raee", "build", "--model", "smollm2-135m", "--task", "SST-2", "--out", str(tmp_path / "db"),
                     *flags]) == 2
        assert said in capsys.readouterr().err
    assert not (tmp_path / "db").exists()


def test_nearest_is_exact_and_leave_one_out_skips_itself():
    rng = np.random.default_rng(3)
    keys, queries = rng.normal(size=(40, 6)), rng.normal(size=(7, 6))
    d, ids = nearest(queries, keys, 5)
    brute = ((queries[:, None] - keys[None]) ** 2).sum(-1)
    assert np.array_equal(ids, np.argsort(brute, 1, kind="stable")[:, :5])
    assert np.allclose(d, np.take_along_axis(brute, ids, 1), atol=1e-5)
    d, ids = leave_one_out(keys, 39)
    assert ids.shape == (40, 39) and not (ids == np.arange(40)[:, None]).any()


def test_nested_cross_validation_scores_held_out_rows_at_each_floor():
    import importlib.util
    from pathlib import Path

    from exitwise.raee.database import BuildConfig

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "raee_nested.py"
    spec = importlib.util.spec_from_file_location("raee_nested", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    probs, labels, key_at = _sample()
    fold = bench.outer_folds(labels, 4, seed=0)
    assert all(np.bincount(labels[fold == f]).tolist() == [20, 20, 20] for f in range(4))  # stratified
    out = bench.nested({k: key_at(k) for k in (1, 3, 5)}, probs, labels, np.ones(13, dtype=bool),
                       BuildConfig(space=SMALL), [1.5, 3.0], folds=4, seed=0)
    assert out["rows"] == 240 and set(out["floors"]) == {"1.5", "3.0"}
    for figures in out["floors"].values():
        assert 0.0 < figures["accuracy"] <= 1.0 and figures["speedup"] > 1.0
    # depth buys accuracy in this sample: the tuning rows pick a deep layer, and a higher floor runs fewer
    assert min(out["best_fixed"]["layers"]) >= 9
    assert out["floors"]["3.0"]["mean_layers_run"] < out["floors"]["1.5"]["mean_layers_run"]
