"""Self-speculative decoding: greedy output identical to full depth, cache exact after rollback."""

import random

import pytest
import torch

from exitwise.engine import LLM, SamplingParams
from test_engine import tiny

KW = dict(num_kv_blocks=256, block_size=4)


@pytest.fixture(scope="module")
def drafty():
    """A tiny model whose early layers often, but not always, already predict the final token:
    later layers write little into the residual stream and a sharp head gives real margins."""
    bb = tiny(0, layers=6)
    with torch.no_grad():
        bb.model.lm_head.weight.mul_(30)
        for layer in bb.layers[2:]:
            layer.mlp.down_proj.weight.mul_(0.3)
            layer.self_attn.o_proj.weight.mul_(0.3)
    return bb


@pytest.fixture(scope="module")
def prompts():
    rng = random.Random(0)
    return [[rng.randrange(97) for _ in range(rng.randrange(2, 30))] for _ in range(40)]


def spec_llm(bb, threshold=0.3, **kw):
    return LLM(bb, exit="softmax", exit_layers=[2, 3, 4], exit_threshold=threshold,
               exit_kwargs={"shortlist": False}, speculative=True, **{**KW, "max_draft": 4, **kw})


@pytest.mark.parametrize("threshold,batch", [(0.1, 1), (0.3, 1), (0.3, 4), (0.1, 8)])
def test_greedy_identical_to_full_depth(drafty, prompts, threshold, batch):
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    ref = LLM(drafty, **KW).generate(prompts, params)
    llm = spec_llm(drafty, threshold, max_num_seqs=batch)
    outs = llm.generate(prompts, params)
    assert [o.token_ids for o in outs] == [r.token_ids for r in ref]
    st = llm.engine.spec.stats
    # the comparison means something only if drafts were both accepted and rejected
    assert 0 < st.accepted < st.drafted
    assert st.tokens == 24 * len(prompts) - len(prompts)  # the prefill makes each first token
    assert st.cycles < st.tokens  # several tokens per cycle on average
    assert llm.engine.num_free_blocks == KW["num_kv_blocks"]


def test_eos_and_max_tokens_inside_a_draft(drafty, prompts):
    ref = LLM(drafty, **KW).generate(prompts, SamplingParams(max_tokens=24))
    outs = spec_llm(drafty, 0.1).generate(prompts, SamplingParams(max_tokens=24))
    assert [o.token_ids for o in outs] == [r.token_ids for r in ref]
    assert [o.finish_reason for o in outs] == [r.finish_reason for r in ref]
    short = spec_llm(drafty, 0.1, max_draft=8).generate(prompts[:8], SamplingParams(max_tokens=3, ignore_eos=True))
    assert all(len(o.token_ids) == 3 and o.finish_reason == "length" for o in short)


def test_cache_after_rollback_equals_full_depth(drafty, prompts):
    """Rejected drafts leave no trace: the K/V of every fed position equals the full-depth engine's."""
    params = SamplingParams(max_tokens=60, ignore_eos=True)
    spec, full = spec_llm(drafty, 0.1).engine, LLM(drafty, **KW).engine
    rs, rf = spec.add_request(prompts[3], params), full.add_request(prompts[3], params)
    for _ in range(8):
        spec.step()
    seq_s = spec.seqs[rs]
    n = seq_s.num_computed_tokens
    while full.seqs[rf].num_computed_tokens < n:
        full.step()
    seq_f = full.seqs[rf]
    assert spec.spec.stats.drafted > spec.spec.stats.accepted > 0
    assert seq_s.token_ids[:n + 1] == seq_f.token_ids[:n + 1]
    slots_s = torch.tensor([spec.runner.slot(seq_s, p) for p in range(n)])
    slots_f = torch.tensor([full.runner.slot(seq_f, p) for p in range(n)])
    torch.testing.assert_close(spec.cache.flat[:, :, slots_s], full.cache.flat[:, :, slots_f], atol=1e-5, rtol=1e-4)


def test_sampled_requests_are_not_speculated(drafty, prompts):
    llm = spec_llm(drafty, 0.1)
    outs = llm.generate(prompts[:4], SamplingParams(max_tokens=8, temperature=0.8, seed=1, ignore_eos=True))
    assert all(len(o.token_ids) == 8 for o in outs)
    assert llm.engine.spec.stats.cycles == 0


def test_unreachable_threshold_never_drafts(drafty, prompts):
    llm = spec_llm(drafty, 2.0)
    ref = LLM(drafty, **KW).generate(prompts[:6], SamplingParams(max_tokens=10, ignore_eos=True))
    outs = llm.generate(prompts[:6], SamplingParams(max_tokens=10, ignore_eos=True))
    assert [o.token_ids for o in outs] == [r.token_ids for r in ref]
    st = llm.engine.spec.stats
    assert st.drafted == 0 and st.verify_passes == 0 and st.draft_layers == 6 * st.cycles


def test_speculative_needs_an_exit_criterion(drafty):
    with pytest.raises(ValueError, match="exit criterion"):
        LLM(drafty, speculative=True, **KW)
    with pytest.raises(ValueError, match="max_draft"):
        spec_llm(drafty, max_draft=0)
