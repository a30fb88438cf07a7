"""A RAEE database and a RAEE prediction do not depend on the thread count or the batch (raee/repro.py):
builds at 1 and 2 threads and at several batch sizes write byte-identical data files, and a text
classified alone and inside a batch of 16 gets the same label, exit layer and confidence. On tiny
random Llamas with SmolLM2's tokenizer, one with int4 weights (exitwise's kernel: batches at any
thread count) and one with float32 weights (batches at one thread, prompts under 4 tokens alone)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from exitwise.models import kernels
from exitwise.models.backbone import Backbone
from exitwise.models.quantize import quantize_model
from exitwise.raee.database import BuildConfig, build_database
from exitwise.raee.pipeline import RAEE
from exitwise.raee.predictor import SelectConfig
from exitwise.raee.repro import FIT_THREADS, fixed_threads, pass_plan
from exitwise.raee.tasks import load_task
from tiny_models import gemma3_config, llama_model, random_backbone, smollm2_tokenizer

pytestmark = pytest.mark.real_model  # SmolLM2's tokenizer

WORDS = ["red", "green", "blue", "gold"]
SUBJECTS = ["the car", "my house", "a bird", "this old flower", "the sky", "her dress", "an apple", "the sea"]


@pytest.fixture(scope="module")
def tokenizer():
    return smollm2_tokenizer()


def _tiny(tokenizer, dtype: str) -> Backbone:
    # int4 takes input sizes in groups of 32 and output sizes in sixteens
    model = llama_model(5, 64, tokenizer=tokenizer, tie_word_embeddings=True, initializer_range=0.5)
    if dtype != "float32":
        if not kernels.ready():
            pytest.skip("needs exitwise's int4 CPU kernel (x86 with AVX2 + FMA and a C++ compiler)")
        assert quantize_model(model, dtype) == dtype
    return Backbone(model, tokenizer, name=f"tiny-{dtype}")


@pytest.fixture(scope="module", params=["int4", "float32"])
def tiny(request, tokenizer):
    return _tiny(tokenizer, request.param)


def _task(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    for split, n, offset in (("train", 40, 0), ("test", 20, 1000)):
        rows = []
        for i in range(n):
            label = int(rng.integers(0, 4))
            extra = " really" * int(rng.integers(0, 3))  # lengths vary, and some rows share one
            rows.append({"text": f"{SUBJECTS[i % len(SUBJECTS)]} is{extra} {WORDS[label]} number {i + offset}",
                         "label": label})
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = {"name": "colours", "train": "train.jsonl", "test": "test.jsonl",
            "template": "Sentence: {text}\nColour:", "labels": WORDS}
    path = tmp_path / "colours.json"
    path.write_text(json.dumps(spec))
    return path


def _data_files(db: Path) -> dict[str, bytes]:
    return {p.relative_to(db).as_posix(): p.read_bytes() for p in sorted(db.rglob("*"))
            if p.is_file() and p.name != "manifest.json"}


def test_the_plan_follows_the_weights(tiny):
    plan = pass_plan(tiny)
    if tiny.weight_dtype == "int4":
        assert plan.row_invariant and plan.threads is None and plan.alone_below == 0
    else:
        assert not plan.row_invariant and plan.threads == 1 and plan.alone_below == 4
    with fixed_threads(2):
        with plan.running():
            assert torch.get_num_threads() == (plan.threads or 2)
        assert torch.get_num_threads() == 2  # restored


def test_builds_at_1_and_2_threads_and_any_batch_size_write_identical_files(tmp_path, tiny):
    task_file = _task(tmp_path)
    task = load_task(task_file)
    files, manifests = {}, {}
    for threads, batch in ((1, 8), (2, 8), (2, 3)):
        out = tmp_path / f"t{threads}b{batch}"
        with fixed_threads(threads):
            db = build_database(tiny, task, out, BuildConfig(progress=False, batch_size=batch),
                                task_source=str(task_file))
        files[(threads, batch)], manifests[(threads, batch)] = _data_files(out), db.manifest
    first = files[(1, 8)]
    assert {"exit_table.npz", "labels.npy", "layer_probs.npy", "readout/probe.safetensors"} <= set(first)
    for key, got in files.items():
        assert got.keys() == first.keys()
        assert [n for n in got if got[n] != first[n]] == [], key
    assert len({json.dumps(m["checksums"], sort_keys=True) for m in manifests.values()}) == 1
    record = manifests[(1, 8)]["reproducibility"]
    assert record["fit_threads"] == FIT_THREADS
    assert record["pass"]["row_invariant"] == (tiny.weight_dtype == "int4")


# the in-pass key; a separate encoder; the pooled probe, whose states read the colour at every layer
# (its exits would all be layer 0: a doubt threshold of 0.35 sends the doubtful rows on to layer 5)
@pytest.mark.parametrize(("encoder", "readout", "config"), [
    ("backbone", "probe-last", None), ("backbone-mean:2", "probe-last", None),
    ("backbone", "probe", SelectConfig(confirm=(0.35,), confirm_layers=(5,)))])
def test_a_text_alone_and_in_a_batch_of_16_gets_the_same_answer(tmp_path, tiny, encoder, readout, config):
    task_file = _task(tmp_path)
    task = load_task(task_file)
    # the default selection settings, not tuned ones: these send queries to several exit layers
    db = build_database(tiny, task, tmp_path / "db", BuildConfig(progress=False, encoder=encoder, objective=None,
                                                                 readout=readout),
                        task_source=str(task_file))
    raee = RAEE(tiny, db, task, config=config)
    texts = [e.text for e in task.load_split("test", 16, 0)]
    assert len({len(t) for t in task.encode(texts, tiny.tokenizer)}) > 2  # a batch of several lengths
    answers = {}
    for threads in (1, 2):
        with fixed_threads(threads):
            batch = raee.classify(texts)
            alone = [raee.classify([t])[0] for t in texts]
            assert np.array_equal(raee.keys(texts), np.concatenate([raee.keys([t]) for t in texts]))
        answers[threads] = [(p.label, p.exit_layer, p.confidence) for p in batch]
        assert answers[threads] == [(p.label, p.exit_layer, p.confidence) for p in alone]
    assert answers[1] == answers[2]
    assert len({layer for _, layer, _ in answers[1]}) > 1  # exits at several layers: both phases ran


def test_on_sliding_windows_a_long_text_does_not_change_its_companions(tmp_path, tokenizer):
    """A prompt longer than a Gemma 3 window runs without the cached task prefix; the prompts that fit
    keep theirs whether or not such a prompt shares their call."""

    bb = random_backbone(gemma3_config(len(tokenizer), sliding=18, max_positions=128), tokenizer=tokenizer,
                         name="tiny-gemma3")
    task_file = _task(tmp_path)
    task = load_task(task_file)
    db = build_database(bb, task, tmp_path / "db", BuildConfig(progress=False, encoder="backbone:1"),
                        task_source=str(task_file))
    raee = RAEE(bb, db, task)
    texts = [e.text for e in task.load_split("test", 16, 0)]
    fits = [bb.can_reuse_prefix(len(t)) for t in task.encode(texts, tokenizer)]
    assert raee.prefix() is not None and any(fits) and not all(fits)
    together = [(p.label, p.exit_layer, p.confidence) for p in raee.classify(texts)]
    assert together == [(p.label, p.exit_layer, p.confidence) for t in texts for p in raee.classify([t])]


def test_a_flat_search_gives_a_query_the_same_distances_alone_and_with_others():
    """FAISS switches to a GEMM past a size set by its BLAS threshold (lowered here so that a batch of
    40 queries crosses it)."""
    import faiss

    from exitwise.raee.retrieval import FlatStore

    rng = np.random.default_rng(0)
    keys, queries = rng.standard_normal((300, 64)).astype(np.float32), rng.standard_normal((40, 64)).astype(np.float32)
    store = FlatStore.create(64)
    store.add(keys)
    before = faiss.cvar.distance_compute_blas_threshold
    faiss.cvar.distance_compute_blas_threshold = 8
    try:
        together = store.search(queries, 12)
        alone = [store.search(queries[i:i + 1], 12) for i in range(len(queries))]
    finally:
        faiss.cvar.distance_compute_blas_threshold = before
    assert np.array_equal(together[0], np.concatenate([d for d, _ in alone]))
    assert np.array_equal(together[1], np.concatenate([i for _, i in alone]))


def test_short_prompts_run_alone_where_the_plan_says():
    from exitwise.raee.layerwise import _batches

    lengths = np.array([2, 5, 2, 5, 5, 3])
    assert [b.tolist() for b in _batches(np.arange(6), lengths, 8, 4)] == [[0], [2], [5], [1, 3, 4]]
    assert [b.tolist() for b in _batches(np.arange(6), lengths, 2)] == [[0, 2], [5], [1, 3], [4]]
