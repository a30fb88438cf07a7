"""RAEE's default mode pieces: readouts (lm, probe, heads), in-pass keys with exits inside one pass,
the slack exit rule, and honest (seeded, stratified) subsets. Tiny random model, real tokenizer."""

import json
import warnings

import numpy as np
import pytest
import torch

from exitwise.errors import DataError, IncompatibleError
from exitwise.raee.database import BuildConfig, Database, build_database
from exitwise.raee.evaluate import EvalConfig, evaluate
from exitwise.raee.layerwise import last_token_states, predict_at_layers, predict_in_pass
from exitwise.raee.pipeline import RAEE
from exitwise.raee.predictor import ExitTable, SelectConfig, select_exit_layers
from exitwise.raee.readouts.base import fit_readout, load_readout
from exitwise.raee.readouts.lm import LMReadout
from exitwise.raee.readouts.probe import ProbeReadout
from exitwise.raee.tasks import load_task, stratified_sample
from tiny_models import gemma3_config, random_backbone, smollm2_tokenizer, tiny_llama

WORDS = ["red", "green", "blue", "gold"]


@pytest.fixture(scope="module")
def tokenizer():
    return smollm2_tokenizer()


def _tiny(tokenizer, layers=6, seed=0, init=0.5):
    return tiny_llama(layers, 32, tokenizer=tokenizer, seed=seed, name=f"tiny-{layers}", tie_word_embeddings=True,
                      initializer_range=init)


@pytest.fixture(scope="module")
def tiny(tokenizer):
    return _tiny(tokenizer)


def _task(tmp_path, n_train=64, n_test=24, sort_train=False, drop_class=None, demos=True):
    rng = np.random.default_rng(1)

    def rows(n, offset):
        out = []
        for i in range(n):
            label = int(rng.integers(0, 4))
            if label == drop_class:
                label = (label + 1) % 4
            # the colour word decides the class, so a probe can learn it from the states
            out.append({"text": f"item {i + offset} is {WORDS[label]} and round", "label": label})
        return out

    train = rows(n_train, 0)
    if sort_train:
        train.sort(key=lambda r: r["label"])
    for split, data in (("train", train), ("test", rows(n_test, 1000))):
        (tmp_path / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in data) + "\n")
    spec = {"name": "colours", "train": "train.jsonl", "test": "test.jsonl",
            "template": "Sentence: {text}\nColour:", "labels": WORDS}
    if demos:
        spec["demonstrations"] = [{"text": "the sun is gold", "label": 3}, {"text": "grass is green", "label": 1}]
    path = tmp_path / "colours.json"
    path.write_text(json.dumps(spec))
    return path


# ------------------------------------------------------------------------------------------ subsets
def test_stratified_sample_follows_class_shares_and_seed():
    labels = np.array([0] * 60 + [1] * 30 + [2] * 10)  # sorted, as data files often are
    idx = stratified_sample(labels, 20, seed=3)
    assert len(idx) == 20 and len(set(idx.tolist())) == 20
    assert np.bincount(labels[idx]).tolist() == [12, 6, 2]
    assert not np.all(np.diff(idx) > 0)  # shuffled, not in file order
    assert np.array_equal(idx, stratified_sample(labels, 20, seed=3))
    assert not np.array_equal(idx, stratified_sample(labels, 20, seed=4))
    # a rare class still gets a row when n allows it
    rare = np.array([0] * 99 + [1])
    assert 1 in rare[stratified_sample(rare, 10, seed=0)]


def test_limit_on_a_label_sorted_file_draws_every_class(tmp_path):
    task = load_task(_task(tmp_path, n_train=80, sort_train=True))
    first = task.load_split("train", 12, seed=None)  # the file's head: one class only
    assert len({e.label for e in first}) == 1
    sample = task.load_split("train", 12)
    assert len({e.label for e in sample}) == 4
    with pytest.raises(DataError, match="positive"):
        task.load_split("train", 0)


@pytest.mark.real_model
def test_build_refuses_a_missing_class_and_warns_about_rare_ones(tmp_path, tiny):
    task = load_task(_task(tmp_path, n_train=30, drop_class=2))
    with pytest.raises(DataError, match="no example of class.*blue.*--allow-missing-classes"):
        build_database(tiny, task, tmp_path / "db", BuildConfig(progress=False))
    assert not (tmp_path / "db").exists()
    with pytest.warns(UserWarning, match="fewer training examples than the k=12"):
        db = build_database(tiny, task, tmp_path / "db",
                            BuildConfig(progress=False, allow_missing_classes=True))
    assert db.manifest["sample"]["class_counts"][2] == 0


# ------------------------------------------------------------------------------------------ readouts
def test_probe_learns_separable_states_and_reports_out_of_fold():
    gen = torch.Generator().manual_seed(0)
    n, depth, d = 120, 3, 16
    labels = np.arange(n) % 3
    states = torch.randn(n, depth, d, generator=gen)
    states[:, 2, :3] += 4 * torch.nn.functional.one_hot(torch.as_tensor(labels), 3)  # layer 2 knows the class
    probe, oof = ProbeReadout.fit(states, labels, 3, seed=0)
    assert oof.shape == (n, depth, 3) and np.allclose(oof.sum(-1), 1, atol=1e-5)
    acc = (oof.argmax(-1) == labels[:, None]).mean(0)
    assert acc[2] > 0.95 and acc[0] < 0.6  # layer 0 is noise: out of fold it is near chance
    in_sample = (probe.probs(0, states[:, 0]).argmax(-1).numpy() == labels).mean()
    assert in_sample > acc[0] + 0.2  # fitted on these very rows, the noise layer looks good


def test_probe_file_round_trip_and_bad_files(tmp_path, tiny):
    states = torch.randn(40, tiny.num_layers + 1, tiny.hidden_size)
    probe, _ = ProbeReadout.fit(states, np.arange(40) % 4, 4, folds=2, max_iter=5)
    probe.save(tmp_path / "readout")
    back = ProbeReadout.load(tmp_path, 4, tiny)
    assert torch.equal(back.probs(3, states[:, 3]), probe.probs(3, states[:, 3]))
    with pytest.raises(DataError, match="expected weight"):
        ProbeReadout.load(tmp_path, 3, tiny)  # another class count
    # a pooled probe reads (.., 2D) states and comes back pooled from the manifest entry
    pooled, _ = ProbeReadout.fit(states.repeat(1, 1, 2), np.arange(40) % 4, 4, folds=2, max_iter=5, pool_from=3)
    assert pooled.describe()["features"] == "last+mean" and pooled.describe()["pool_from"] == 3
    pooled.save(tmp_path / "pooled" / "readout")
    back = load_readout(pooled.describe(), tmp_path / "pooled", tiny, [1, 2, 3, 4])
    assert back.pool_from == 3 and torch.equal(back.probs(2, states[:, 2].repeat(1, 2)),
                                               pooled.probs(2, states[:, 2].repeat(1, 2)))
    with pytest.raises(DataError, match="expected weight"):
        ProbeReadout.load(tmp_path / "pooled", 4, tiny)  # read as a last-token probe: the shapes say no
    with pytest.raises(DataError, match="readout.pool_from"):
        load_readout({"kind": "probe", "pool_from": -1}, tmp_path / "pooled", tiny, [1, 2, 3, 4])
    (tmp_path / "readout" / "probe.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(DataError, match="probe.safetensors"):
        ProbeReadout.load(tmp_path, 4, tiny)


@pytest.mark.real_model
def test_untrained_translator_heads_read_out_like_the_model(tmp_path, tiny, tokenizer):
    from exitwise.heads.model import ExitHeads

    ExitHeads(tiny, layers=[2, 4], kind="translator").save(tmp_path / "heads")
    label_ids = [tokenizer.encode(" " + w)[0] for w in WORDS]
    states = torch.randn(5, tiny.num_layers + 1, tiny.hidden_size)
    readout, probs = fit_readout(f"heads:{tmp_path / 'heads'}", tiny, label_ids, states, np.zeros(5, int))
    assert readout.layers == [2, 4, 6]
    lm = LMReadout(tiny, label_ids)
    for layer in (2, 4, 6):  # a zero translator is the model's own readout
        assert torch.allclose(readout.probs(layer, states[:, layer]), lm.probs(layer, states[:, layer]), atol=1e-6)
    assert np.allclose(probs[:, 3], 0.25)  # no readout at layer 3
    with pytest.raises(DataError, match="not found"):
        fit_readout(f"heads:{tmp_path / 'missing'}", tiny, label_ids, states, np.zeros(5, int))
    other = _tiny(tokenizer, layers=4, seed=1)
    with pytest.raises(IncompatibleError, match="heads"):
        fit_readout(f"heads:{tmp_path / 'heads'}", other, label_ids, states[:, :5], np.zeros(5, int))


# --------------------------------------------------------------------------------- exits in one pass
@pytest.mark.real_model
def test_in_pass_exits_equal_separate_truncated_passes(tmp_path, tiny, tokenizer):
    task = load_task(_task(tmp_path))
    ids = task.encode([f"thing {i} is {WORDS[i % 4]}" + " very" * (i % 5) for i in range(13)], tokenizer)
    label_ids = task.label_token_ids(tokenizer)
    readout = LMReadout(tiny, label_ids)
    exits = np.array([0, 6, 2, 3, 5, 1, 6, 4, 2, 3, 6, 5, 2])
    # the batches predict_in_pass forms: one length each, 4 at a time (short prompts alone where the plan says)
    from exitwise.raee.layerwise import _batches
    from exitwise.raee.repro import pass_plan

    order = list(_batches(np.arange(len(ids)), np.array([len(t) for t in ids]), 4, pass_plan(tiny).alone_below))
    seen = []

    def decide(keys, rows):
        assert np.allclose(np.linalg.norm(keys, axis=1), 1, atol=1e-5)
        seen.append(keys)
        assert np.array_equal(rows, order[len(seen) - 1])  # the batch's input rows, as the pass formed it
        return exits[rows]

    preds, conf, got = predict_in_pass(tiny, ids, readout, 2, decide, batch_size=4)
    assert np.array_equal(got, exits)
    want_p, want_c = predict_at_layers(tiny, ids, label_ids, exits, batch_size=4)
    assert np.array_equal(preds, want_p)
    assert np.allclose(conf, want_c, atol=1e-5)
    # the keys are the last-token states at the key layer
    states = last_token_states(tiny, ids, batch_size=4)
    keys = np.concatenate(seen)
    flat = np.concatenate(order)
    want_keys = torch.nn.functional.normalize(states[flat, 2], dim=-1).numpy()
    assert np.allclose(keys, want_keys, atol=1e-5)


@pytest.mark.real_model
def test_pooled_states_read_the_prompts_own_tokens_in_every_pass(tmp_path, tiny, tokenizer):
    """The pooled probe's states (last token ; mean of the prompt's own tokens) are the same whether
    the task's prefix is cached or run, equal a plain pass's, and the in-pass and truncated passes
    answer as the probe reads those states."""
    from exitwise.raee.layerwise import own_start, summary

    task = load_task(_task(tmp_path))
    texts = [f"thing {i} is {WORDS[i % 4]}" + " very" * (i % 5) for i in range(13)]
    ids = task.encode(texts, tokenizer)
    start = len(task.prefix_ids(tokenizer))
    assert 0 < start < min(len(t) for t in ids) and all(t[:start] == ids[0][:start] for t in ids)
    d, depth = tiny.hidden_size, tiny.num_layers + 1
    cached = last_token_states(tiny, ids, batch_size=4, pool_from=start)
    run = last_token_states(tiny, ids, batch_size=4, pool_from=start, reuse_prefix=False)
    assert cached.shape == (len(ids), depth, 2 * d)
    assert torch.allclose(cached, run, rtol=1e-4, atol=1e-4)
    assert torch.allclose(cached[..., :d], last_token_states(tiny, ids, batch_size=4), rtol=1e-4, atol=1e-4)
    whole = tiny.hidden_states(torch.tensor([ids[7]]))  # one prompt, no prefix cache: (1, T, D) per layer
    for layer in (0, 3, 6):
        assert torch.allclose(cached[7, layer, d:], whole[layer][0, start:].mean(0), rtol=1e-4, atol=1e-4)
    # a prompt's own tokens: never the prefix, always the last token
    h = torch.arange(12.0).reshape(1, 4, 3)
    assert torch.equal(summary(h, 1), torch.tensor([[9.0, 10.0, 11.0, 6.0, 7.0, 8.0]]))
    assert torch.equal(summary(h, 9)[:, 3:], h[:, -1]) and torch.equal(summary(h, None), h[:, -1])
    with pytest.raises(ValueError, match="runs past"):
        own_start(start, tiny.prefill(ids[0][:start + 1]))
    # the in-pass and truncated passes read what the build pass read
    labels = np.arange(len(ids)) % 4
    probe, _ = ProbeReadout.fit(cached, labels, 4, folds=2, max_iter=20, pool_from=start)
    exits = np.array([0, 6, 2, 3, 5, 1, 6, 4, 2, 3, 6, 5, 2])
    preds, probs, got = predict_in_pass(tiny, ids, probe, 2, lambda keys, rows: exits[rows], batch_size=4,
                                        prefix=tiny.prefill(ids[0][:start]), with_probs=True)
    want = torch.stack([probe.probs(int(e), cached[i:i + 1, e])[0] for i, e in enumerate(exits)]).numpy()
    assert np.array_equal(got, exits) and np.allclose(probs, want, atol=1e-5)
    alone, _ = predict_at_layers(tiny, ids, task.label_token_ids(tokenizer), exits, batch_size=4, readout=probe,
                                 reuse_prefix=False)
    assert np.array_equal(alone, preds) and np.array_equal(preds, want.argmax(1))


@pytest.mark.real_model
def test_in_pass_never_runs_a_row_past_its_exit(tiny, tokenizer, tmp_path):
    task = load_task(_task(tmp_path))
    ids = task.encode(["a is red", "b is green and more words", "c is blue"], tokenizer)
    rows_seen = []
    hooks = [layer.register_forward_hook(lambda m, a, out, i=i: rows_seen.append((i, out[0].shape[0]
             if isinstance(out, tuple) else out.shape[0]))) for i, layer in enumerate(tiny.layers)]
    exits = iter([1, 3, 5])  # in the order the pass asks, whatever its batches
    try:
        predict_in_pass(tiny, ids, LMReadout(tiny, task.label_token_ids(tokenizer)), 1,
                        lambda keys, rows: np.array([next(exits) for _ in keys]), batch_size=8)
    finally:
        for h in hooks:
            h.remove()
    # layer module i computes hidden state i+1: every row up to the key layer (1), then each goes on
    # to its own exit (3, 5), never past it, and no layer runs twice for a row
    rows_per_module = [sum(n for i, n in rows_seen if i == module) for module in range(len(tiny.layers))]
    assert rows_per_module == [3, 2, 2, 1, 1] + [0] * (len(tiny.layers) - 5)



@pytest.mark.real_model
def test_rows_of_one_length_share_their_layers_until_they_exit(tiny, tokenizer, tmp_path):
    """A batch answers its rows at their exits and goes on without them: a layer runs once for all the
    rows still in it, not once per exit layer (a small batch's layer costs its weights' reading)."""
    task = load_task(_task(tmp_path))
    ids = task.encode([f"{c} is red" for c in "abcdef"], tokenizer)
    assert len({len(t) for t in ids}) == 1
    calls = []
    hooks = [layer.register_forward_hook(lambda m, a, out, i=i: calls.append((i, out[0].shape[0]
             if isinstance(out, tuple) else out.shape[0]))) for i, layer in enumerate(tiny.layers)]
    readout = LMReadout(tiny, task.label_token_ids(tokenizer))
    exits = np.array([5, 3, 1, 5, 3, 4])
    try:
        predict_in_pass(tiny, ids, readout, 1, lambda keys, rows: exits[rows], batch_size=8)
        in_pass, calls[:] = list(calls), []
        # rows sorted by exit into batches of 2: (1, 3), (3, 4), (5, 5)
        predict_at_layers(tiny, ids, task.label_token_ids(tokenizer), exits, batch_size=2, reuse_prefix=False)
        truncated = list(calls)
    finally:
        for h in hooks:
            h.remove()
    # module i computes hidden state i+1: all six to the key layer 1, then the five going on in one batch
    # that leaves behind the two answered at 3, then the one at 4; without the pass, each batch likewise
    assert in_pass == [(0, 6), (1, 5), (2, 5), (3, 3), (4, 2)]
    assert truncated == [(0, 2), (1, 1), (2, 1), (0, 2), (1, 2), (2, 2), (3, 1), (0, 2), (1, 2), (2, 2), (3, 2), (4, 2)]


@pytest.mark.real_model
def test_in_pass_holds_a_bounded_number_of_waiting_rows(tiny, tokenizer, tmp_path, monkeypatch):
    """Rows going on past the key wait for regrouping in windows of at most REGROUP_ROWS, whatever the
    number of inputs; the answers do not depend on the window."""
    from exitwise.raee import layerwise

    task = load_task(_task(tmp_path))
    ids = task.encode([f"thing {i} is {WORDS[i % 4]}" + " very" * (i % 3) for i in range(12)], tokenizer)
    readout = LMReadout(tiny, task.label_token_ids(tokenizer))
    exits = np.array([3, 5, 4, 6, 2, 5, 3, 6, 4, 5, 6, 3])
    whole = predict_in_pass(tiny, ids, readout, 2, lambda keys, rows: exits[rows], batch_size=4)
    waiting, go_on = [], layerwise._go_on
    monkeypatch.setattr(layerwise, "_go_on", lambda bb, going, *a: (waiting.append(len(going)), go_on(bb, going, *a)))
    monkeypatch.setattr(layerwise, "REGROUP_ROWS", 3)
    windowed = predict_in_pass(tiny, ids, readout, 2, lambda keys, rows: exits[rows], batch_size=4)
    assert len(waiting) > 2 and max(waiting) < 3 + 4  # a window fills at most one batch past its bound
    for a, b in zip(whole, windowed, strict=True):
        assert np.array_equal(a, b)


def test_slack_picks_the_shallowest_layer_near_the_best():
    table = ExitTable.from_lists([[(1, 0.5), (3, 0.95)], [(1, 0.5), (3, 0.95)], [(2, 0.6)]])
    dist = np.array([[1.0, 1.0, 1.0]])
    ids = np.array([[0, 1, 2]])
    cfg = SelectConfig.paper(min_prob=0.0)
    scores = select_exit_layers(dist, ids, table, 4, cfg).scores[0]
    assert scores[1] == pytest.approx(1.0) and scores[3] == pytest.approx(1.9)
    assert select_exit_layers(dist, ids, table, 4, cfg).layers.tolist() == [3]  # argmax (paper)
    assert select_exit_layers(dist, ids, table, 4, SelectConfig.paper(min_prob=0.0, slack=0.5)).layers.tolist() == [1]
    assert select_exit_layers(dist, ids, table, 4, SelectConfig.paper(min_prob=0.0, slack=0.6)).layers.tolist() == [3]
    # layers below min_layer are paid for already: skipped unless nothing else has mass
    assert select_exit_layers(dist, ids, table, 4, SelectConfig.paper(min_prob=0.0, slack=0.3),
                              min_layer=2).layers.tolist() == [2]
    only_low = ExitTable.from_lists([[(1, 0.9)]])
    assert select_exit_layers(np.array([[1.0]]), np.array([[0]]), only_low, 4, cfg, min_layer=2).layers.tolist() == [1]
    with pytest.raises(ValueError, match="slack"):
        SelectConfig.paper(slack=0.0)


# ------------------------------------------------------------------------------------ default mode
@pytest.mark.real_model
def test_default_mode_database_end_to_end(tmp_path, tokenizer):
    # moderate weights: the states carry the colour word, which the label-word readout ignores
    tiny = _tiny(tokenizer, init=0.1)
    task_file = _task(tmp_path, n_train=96, sort_train=True)
    task = load_task(task_file)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        db = build_database(tiny, task, tmp_path / "db", BuildConfig(progress=False, train_limit=60),
                            task_source=str(task_file))
    m = db.manifest
    key = m["tuning"]["chosen"]["key_layer"]  # chosen by cross-validation among layers 1..L//2
    assert m["mode"] == "default" and m["readout"]["kind"] == "probe" and m["encoder"]["spec"] == f"backbone:{key}"
    assert 1 <= key <= 3
    assert m["sample"]["seed"] == 0 and sum(m["sample"]["class_counts"]) == 60
    assert min(m["sample"]["class_counts"]) > 0  # the label-sorted file was sampled, not cut
    assert "readout/probe.safetensors" in m["checksums"]
    raee = RAEE(tiny, Database.load(tmp_path / "db"), task)
    assert raee.key_layer == key and raee.config.slack == db.select_config().slack
    out = raee.classify(["item 5 is blue and round", "item 6 is red and round"])
    assert all(p.label in WORDS and 0 <= p.exit_layer <= 6 for p in out)
    report = evaluate(raee, EvalConfig(test_limit=16, progress=False))
    assert report["readout"] == "probe" and report["encoder"] == f"backbone:{key}" and report["seed"]["test"] == 0
    fd = report["fixed_at_depth"]
    assert fd["layer"] <= report["raee"]["mean_layers_run"] and 0 <= fd["accuracy"] <= 1
    assert report["raee"]["mean_layers_run"] >= key and report["raee"]["seconds_encode"] == 0.0
    # the probe (chosen by its out-of-fold training accuracy) reads the colour the random head cannot
    assert max(report["per_layer_accuracy"]) >= 0.9 > report["full"]["accuracy"] + 0.3
    assert report["best_fixed"]["accuracy"] > report["full"]["accuracy"] + 0.3
    assert report["raee"]["accuracy"] > report["full"]["accuracy"] + 0.2
    # the training-free exit-space options combine with any readout and an in-pass key
    from exitwise.raee.calibration import ExitSpace

    # (on the last token's state alone: the pooled probe reads the colour word at every layer, even 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        last = build_database(tiny, task, tmp_path / "last", BuildConfig(progress=False, train_limit=60,
                                                                         readout="probe-last"),
                              task_source=str(task_file))
    assert last.manifest["readout"]["features"] == "last" and m["readout"]["features"] == "last+mean"
    pooled_acc = (db.layer_probs.argmax(-1) == db.labels[:, None]).mean(0)
    last_acc = (last.layer_probs.argmax(-1) == last.labels[:, None]).mean(0)
    assert pooled_acc[:3].mean() > last_acc[:3].mean()  # the shallow layers gain most from the mean
    tuned = RAEE(tiny, last, task, space=ExitSpace(calibrate=True, tolerance=0.0))
    allowed = np.flatnonzero(tuned.allowed)
    assert allowed[-1] == 6 and len(allowed) < 7  # layers worse than the last on training data are closed
    _, layers, _ = tuned.predict([f"item {i} is {WORDS[i % 4]} and round" for i in range(8)])
    assert set(layers.tolist()) <= set(allowed.tolist()) | set(range(tuned.key_layer + 1))
    # a missing readout file is refused by name
    (tmp_path / "db" / "readout" / "probe.safetensors").unlink()
    with pytest.raises(DataError, match="probe.safetensors is missing"):
        Database.load(tmp_path / "db")


@pytest.mark.parametrize("sliding", [4, 64])  # prompts longer than the window, and a prefix that fits in it
def test_in_pass_exits_on_gemma3_sliding_windows(sliding):
    """Resumed, re-batched rows on a Gemma 3 model (interleaved sliding-window layers, softcapping) get
    what separate truncated passes give."""

    from exitwise.models.backbone import Prefix

    bb = random_backbone(gemma3_config(sliding=sliding))
    gen = torch.Generator().manual_seed(1)
    shared = [5, 6, 7]
    ids = [shared + torch.randint(3, 97, (int(n),), generator=gen).tolist() for n in (2, 7, 4, 9, 3, 6)]
    exits = np.array([1, 4, 3, 2, 4, 3])
    prefix = bb.prefill(shared) if bb.can_reuse_prefix(max(len(t) for t in ids)) else Prefix([], [], [])
    readout = LMReadout(bb, [10, 20, 30])
    from exitwise.raee.layerwise import _batches
    from exitwise.raee.repro import pass_plan

    order = list(_batches(np.arange(len(ids)), np.array([len(t) - len(prefix) for t in ids]), 2,
                          pass_plan(bb).alone_below))
    calls = []

    def decide(keys, rows):
        calls.append(len(keys))
        return exits[order[len(calls) - 1]]

    preds, conf, got = predict_in_pass(bb, ids, readout, 1, decide, batch_size=2, prefix=prefix if len(prefix)
                                       else None)
    want_p, want_c = predict_at_layers(bb, ids, [10, 20, 30], exits, batch_size=1, reuse_prefix=False)
    assert np.array_equal(got, exits) and np.array_equal(preds, want_p)
    assert np.allclose(conf, want_c, atol=1e-5)
