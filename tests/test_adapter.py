"""Adapter drafts (Kangaroo): greedy output identical to full depth, adapter files checked against
the model, self-distilled training from a cache lowers its loss."""

import json
import random

import numpy as np
import pytest
import torch

from exitwise.engine import LLM, SamplingParams
from exitwise.errors import DataError, IncompatibleError
from exitwise.heads.adapter import Adapter
from exitwise.heads.adapter_train import build_cache, evaluate_adapter, load_cache, train_adapter
from test_speculative import KW, drafty, repetitive  # noqa: F401 - drafty is a fixture
from tiny_models import engine_tiny

LAYER = 3


@pytest.fixture(scope="module")
def adapter_path(drafty, tmp_path_factory):  # noqa: F811
    """A tiny randomly initialised adapter at layer 3: exactness must not depend on its quality."""
    ad = Adapter(drafty, LAYER, hidden=32, seed=1)
    with torch.no_grad():
        ad.down.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(2))
    path = tmp_path_factory.mktemp("adapter") / "ad"
    ad.save(path)
    return path


@pytest.fixture(scope="module")
def prompts():
    rng = random.Random(0)
    return [[rng.randrange(97) for _ in range(rng.randrange(2, 30))] for _ in range(24)]


@pytest.mark.parametrize("batch", [1, 4])
def test_adapter_drafts_greedy_identical(drafty, adapter_path, prompts, batch):  # noqa: F811
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    ref = LLM(drafty, **KW).generate(prompts, params)
    llm = LLM(drafty, speculative=True, draft="adapter", draft_adapter=str(adapter_path), adapter_threshold=0.3,
              max_num_seqs=batch, **{**KW, "max_draft": 4})
    outs = llm.generate(prompts, params)
    assert [o.token_ids for o in outs] == [r.token_ids for r in ref]
    st = llm.engine.spec.stats
    ad = st.sources["adapter"]
    assert 0 < ad.accepted < ad.drafted  # drafts both kept and rejected
    assert st.tokens == 19 * len(prompts)
    assert st.cycles < st.tokens
    assert llm.engine.num_free_blocks == KW["num_kv_blocks"]


def test_adapter_drafts_sampled_and_eos(drafty, adapter_path, prompts):  # noqa: F811
    """EOS inside a draft stops the request where full depth does; sampled requests run."""
    ref = LLM(drafty, **KW).generate(prompts, SamplingParams(max_tokens=16))
    llm = LLM(drafty, speculative=True, draft="adapter", draft_adapter=str(adapter_path), adapter_threshold=0.0,
              max_num_seqs=4, **{**KW, "max_draft": 5})
    outs = llm.generate(prompts, SamplingParams(max_tokens=16))
    assert [o.token_ids for o in outs] == [r.token_ids for r in ref]
    assert [o.finish_reason for o in outs] == [r.finish_reason for r in ref]
    sampled = llm.generate(prompts[:4], SamplingParams(max_tokens=12, temperature=0.8, seed=3, ignore_eos=True))
    assert all(len(o.token_ids) == 12 for o in sampled)
    assert llm.engine.num_free_blocks == KW["num_kv_blocks"]


def test_auto_tries_the_adapter_after_the_context(drafty, adapter_path):  # noqa: F811
    rng = random.Random(1)
    prompts = [repetitive(rng, rng.randrange(8, 40)) for _ in range(8)] + \
              [[rng.randrange(97) for _ in range(12)] for _ in range(8)]
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    ref = LLM(drafty, **KW).generate(prompts, params)
    llm = LLM(drafty, speculative=True, draft="auto", draft_adapter=str(adapter_path), adapter_threshold=0.3,
              max_num_seqs=1, **{**KW, "max_draft": 4})
    outs = llm.generate(prompts, params)
    assert [o.token_ids for o in outs] == [r.token_ids for r in ref]
    sources = llm.engine.spec.stats.sources
    assert sources["lookup"].drafted > 0 and sources["adapter"].drafted > 0


def test_adapter_needs_a_path(drafty):  # noqa: F811
    with pytest.raises(ValueError, match="draft_adapter"):
        LLM(drafty, speculative=True, draft="adapter", **KW)
    from exitwise.engine.llm import RequestError

    llm = LLM(drafty, speculative=True, **KW)
    with pytest.raises(RequestError, match="--adapter"):
        llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4, draft="adapter"))


def test_save_load_round_trip_and_refusals(drafty, adapter_path, tmp_path):  # noqa: F811
    ad = Adapter.load(adapter_path, drafty)
    assert ad.layer == LAYER and ad.hidden == 32
    fresh = Adapter(drafty, LAYER, hidden=32, seed=1)
    with torch.no_grad():
        fresh.down.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(2))
    h = torch.randn(5, drafty.hidden_size)
    torch.testing.assert_close(ad(h), fresh(h))
    # made for another model: refused, naming the manifest
    with pytest.raises(IncompatibleError, match=r"ad\.json"):
        Adapter.load(adapter_path, engine_tiny(0, layers=4))
    # weights that do not match the manifest's shape: refused, naming the file
    other = Adapter(drafty, LAYER, hidden=16)
    other.save(tmp_path / "b")
    manifest = json.loads((tmp_path / "b.json").read_text())
    manifest["hidden"] = 32
    (tmp_path / "b.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"b\.safetensors"):
        Adapter.load(tmp_path / "b", drafty)
    # replaced weights: the checksum refuses them
    (tmp_path / "b.safetensors").write_bytes((adapter_path.with_suffix(".safetensors")).read_bytes())
    with pytest.raises(DataError, match="checksum"):
        Adapter.load(tmp_path / "b", drafty)


def test_training_lowers_the_loss(drafty, tmp_path):  # noqa: F811
    rng = random.Random(3)
    ids = [rng.randrange(97) for _ in range(2048)]
    manifest = build_cache(drafty, ids, [2, LAYER], tmp_path / "cache", topk=16, seq_len=64, progress=False)
    assert manifest["tokens"] == 2048 and manifest["layers"] == [2, LAYER]
    cache = load_cache(tmp_path / "cache", drafty, LAYER)
    assert cache["hidden"].shape == (2048, drafty.hidden_size) and cache["ids"].shape == (2048, 16)
    ad = Adapter(drafty, LAYER, hidden=64, seed=0)
    before = evaluate_adapter(drafty, ad, ids[:512], seq_len=64)
    assert before["acceptance"] == before["plain_readout"]  # untrained: the plain readout of layer E
    summary = train_adapter(drafty, ad, cache, epochs=30, batch_tokens=256, lr=3e-3, progress=False)
    assert summary["kl_last"] < 0.7 * summary["kl_first"]
    after = evaluate_adapter(drafty, ad, ids[:512], seq_len=64)
    assert after["acceptance"] > before["acceptance"]
    # a cache is checked before it is trusted: another model, a missing layer, a reshaped array
    with pytest.raises(IncompatibleError):
        load_cache(tmp_path / "cache", engine_tiny(0, layers=4), LAYER)
    with pytest.raises(DataError, match="layer 4"):
        load_cache(tmp_path / "cache", drafty, 4)
    np.save(tmp_path / "cache" / "topk_ids.npy", np.zeros((10, 16), dtype=np.int32))
    with pytest.raises(DataError, match="topk_ids.npy"):
        load_cache(tmp_path / "cache", drafty, LAYER)


def test_cli_flags(capsys, tmp_path):
    from exitwise.cli import build_parser, main
    from exitwise.cli.engine_args import engine_config

    cfg = engine_config(build_parser().parse_args(["serve", "--speculative", "--draft", "adapter", "--adapter", "a",
                                                   "--adapter-threshold", "0.5"]))
    assert (cfg.draft, cfg.draft_adapter, cfg.adapter_threshold) == ("adapter", "a", 0.5)
    assert main(["generate", "--prompt", "hi", "--speculative", "--draft", "adapter"]) == 2
    assert "--adapter PATH" in capsys.readouterr().err
    args = build_parser().parse_args(["heads", "train-adapter", "--model", "m", "--text", "t", "--layer", "8",
                                      "--out", "o", "--cache-layers", "8", "12"])
    assert args.handler.__name__ == "_train_adapter" and args.cache_layers == [8, 12]
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    assert main(["heads", "train-adapter", "--model", "m", "--text", str(empty), "--layer", "8", "--out", "o"]) == 2
    assert "empty" in capsys.readouterr().err


def test_auto_pauses_an_adapter_that_is_never_sure(drafty, adapter_path, prompts):  # noqa: F811
    """Cycles where the adapter drafts nothing still cost its shallow step: auto backs off."""
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    ref = LLM(drafty, **KW).generate(prompts[:4], params)
    llm = LLM(drafty, speculative=True, draft="auto", draft_adapter=str(adapter_path), adapter_threshold=1.0,
              **{**KW, "max_draft": 4})
    outs = llm.generate(prompts[:4], params)
    assert [o.token_ids for o in outs] == [r.token_ids for r in ref]
    st = llm.engine.spec.stats
    ad = st.sources["adapter"]
    assert ad.drafted == 0 and 0 < ad.passes < st.cycles / 2


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_shortlist_readout_scores_the_fixed_ids_and_the_contexts(drafty, dtype):  # noqa: F811
    from exitwise.engine.drafts.readout import FullReadout, ShortlistReadout
    from exitwise.engine.sequence import Sequence

    llm = LLM(drafty, weight_dtype=dtype, **KW)
    runner = llm.engine.runner
    h = torch.randn(3, drafty.hidden_size, generator=torch.Generator().manual_seed(0))
    seqs = [Sequence(i, [1, 2, 50 + i, 80], SamplingParams()) for i in range(3)]
    out = runner.model.output
    ids = torch.tensor(list(range(16)) + [50, 51, 52, 80])
    z = out.cap(out.norm(h) @ out.weight[ids].float().t()) if out.lowp is None else None
    token, prob = ShortlistReadout(runner, fixed=16)(h, seqs)
    assert set(token.tolist()) <= set(ids.tolist())
    if z is not None:  # float32: exactly the softmax over the shortlist's logits
        p, col = torch.softmax(z, -1).max(-1)
        assert torch.equal(token, ids[col]) and torch.allclose(prob, p)
    whole_t, whole_p = ShortlistReadout(runner, fixed=10_000)(h, seqs)  # the whole vocabulary
    full_t, full_p = FullReadout(runner)(h, seqs)
    # int8: the full readout re-scores its top logits from float32 rows, the shortlist does not
    assert torch.equal(whole_t, full_t) and torch.allclose(whole_p, full_p, atol=1e-3 if dtype == "float32" else 1e-2)


@pytest.mark.parametrize("batch", [1, 4])
def test_shortlist_adapter_drafts_greedy_identical(drafty, adapter_path, prompts, batch):  # noqa: F811
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    ref = LLM(drafty, **KW).generate(prompts, params)
    llm = LLM(drafty, speculative=True, draft="adapter", draft_adapter=str(adapter_path), adapter_threshold=0.3,
              draft_vocab=24, max_num_seqs=batch, **{**KW, "max_draft": 4})
    assert [o.token_ids for o in llm.generate(prompts, params)] == [r.token_ids for r in ref]
    ad = llm.engine.spec.stats.sources["adapter"]
    assert 0 < ad.accepted < ad.drafted
