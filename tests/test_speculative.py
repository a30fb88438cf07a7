"""Speculative decoding: greedy output identical to full depth for every draft source and batch size,
sampled output distributed as the model's, cache exact after rollback."""

import json
import random

import pytest
import torch

from exitwise.engine import LLM, SamplingParams
from tiny_models import engine_tiny

KW = dict(num_kv_blocks=256, block_size=4)


@pytest.fixture(scope="module")
def drafty():
    """A tiny model whose early layers often, but not always, already predict the final token:
    later layers write little into the residual stream and a sharp head gives real margins."""
    bb = engine_tiny(0, layers=6)
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


def spec_llm(bb, threshold=0.3, draft="exit", **kw):
    return LLM(bb, exit="softmax", exit_layers=[2, 3, 4], exit_threshold=threshold,
               exit_kwargs={"shortlist": False}, speculative=True, draft=draft, **{**KW, "max_draft": 4, **kw})


def repetitive(rng: random.Random, n: int) -> list[int]:
    """A prompt that repeats short phrases, so context (lookup) drafts find matches."""
    phrases = [[rng.randrange(97) for _ in range(rng.randrange(2, 6))] for _ in range(4)]
    out: list[int] = []
    while len(out) < n:
        out += rng.choice(phrases)
    return out[:n]


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


def test_unreachable_threshold_never_drafts(drafty, prompts):
    llm = spec_llm(drafty, 2.0)
    ref = LLM(drafty, **KW).generate(prompts[:6], SamplingParams(max_tokens=10, ignore_eos=True))
    outs = llm.generate(prompts[:6], SamplingParams(max_tokens=10, ignore_eos=True))
    assert [o.token_ids for o in outs] == [r.token_ids for r in ref]
    st = llm.engine.spec.stats
    assert st.drafted == 0 and st.verify_passes == 0 and st.plain_steps == st.cycles
    assert st.draft_layers <= 6 * st.cycles  # an unconfident first step runs on once, never twice


def test_exit_drafts_need_an_exit_criterion(drafty):
    with pytest.raises(ValueError, match="exit criterion"):
        LLM(drafty, speculative=True, draft="exit", **KW)
    with pytest.raises(ValueError, match="max_draft"):
        spec_llm(drafty, max_draft=0)
    with pytest.raises(ValueError, match="unknown"):
        LLM(drafty, speculative=True, draft="oracle", **KW)
    LLM(drafty, speculative=True, **KW)  # auto without a criterion: context drafts only


def finetuned(bb, tmp_path, draft_layers):
    """``bb`` named as a model directory from ``exitwise finetune`` (its manifest only)."""
    from exitwise.models.backbone import Backbone
    from exitwise.training.manifest import MANIFEST

    (tmp_path / MANIFEST).write_text(json.dumps({"exit_layers": [1, 2, 3, 4], "draft_layers": draft_layers}))
    return Backbone(bb.model, bb.tokenizer, name=str(tmp_path))


def test_finetuned_model_drafts_at_its_manifests_layers(drafty, prompts, tmp_path):
    """The library accepts what `generate --speculative` accepts on a fine-tuned model: no criterion
    given, the softmax criterion drafts at the manifest's draft layers; the output is full depth's."""
    from exitwise.engine.config import EngineConfig

    model = finetuned(drafty, tmp_path, [2, 4])
    for draft in ("auto", "exit"):
        llm = LLM(model, EngineConfig(speculative=True, draft=draft, num_kv_blocks=256, block_size=4))
        assert llm.engine.plan.exit_layers == [2, 4] and llm.engine.plan.criterion.name == "softmax"
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    ref = LLM(drafty, **KW).generate(prompts[:6], params)
    assert [o.token_ids for o in llm.generate(prompts[:6], params)] == [r.token_ids for r in ref]
    # an exit criterion of the caller's own, or no speculation, leaves the model's drafts unused
    assert LLM(model, speculative=True, exit="softmax", exit_layers=[3], **KW).engine.plan.exit_layers == [3]
    assert LLM(model, **KW).engine.plan is None


@pytest.mark.parametrize("draft,batch", [("lookup", 1), ("lookup", 8), ("auto", 1), ("auto", 8)])
def test_context_drafts_greedy_identical(drafty, draft, batch):
    rng = random.Random(1)
    prompts = [repetitive(rng, rng.randrange(8, 40)) for _ in range(12)]
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    ref = LLM(drafty, **KW).generate(prompts, params)
    llm = spec_llm(drafty, 0.3, draft=draft, max_num_seqs=batch, max_draft=5)
    if batch > 1:  # drafts at any price, so that rows of different lengths share passes
        from exitwise.engine.drafts import LookupDraft, Payoff

        free = LookupDraft(payoff=Payoff.free())
        src = llm.engine.spec.source
        if draft == "lookup":
            llm.engine.spec.source = free
        else:
            src.lookup = free
    outs = llm.generate(prompts, params)
    assert [o.token_ids for o in outs] == [r.token_ids for r in ref]
    st = llm.engine.spec.stats
    lk = st.sources["lookup"]
    assert lk.passes > 0 and 0 < lk.accepted < lk.drafted  # drafts both kept and rejected
    assert lk.tokens_per_pass > 1.0
    assert st.tokens == 29 * len(prompts)
    assert llm.engine.num_free_blocks == KW["num_kv_blocks"]
    if batch > 1:  # per-row draft lengths in one pass: some pass verified rows of different lengths
        assert st.rows_verified > st.verify_passes


def test_lookup_drafts_as_far_as_the_odds_pay():
    """A long match drafts long, a 1-token match not at all; failures at a match length stop drafts
    there, and a batch drafts only when its rows' expected kept tokens beat the pass's overhead."""
    from exitwise.engine.drafts import LookupDraft, Payoff
    from exitwise.engine.drafts.lookup import MatchOdds
    from exitwise.engine.sequence import Sequence

    odds, seen, pay = MatchOdds(), {}, Payoff()

    def b1(i):
        return pay.row_cost(1, i)

    def b8(i):
        return pay.row_cost(8, i)

    assert odds.length(seen, 1, 6, b8) == (0, 0.0)  # kept a third of the time: below a row's cost in a batch
    k12, gain12 = odds.length(seen, 12, 6, b1)
    k3, _ = odds.length(seen, 3, 6, b1)
    assert 0 < k3 < k12 <= 6 and 0 < gain12 < k12
    assert 0 < odds.length(seen, 12, 6, b8)[0] < k12  # a dearer row (a batch of 8) drafts less
    assert odds.length(seen, 12, 6, lambda i: 0.0)[0] == 6  # free rows: every token found
    fails = 0
    while odds.length(seen, 12, 6, b1)[0]:
        odds.observe(seen, 12, 6, 0)
        fails += 1
    assert 1 < fails <= 16 and odds.length(seen, 3, 6, b1)[0] == k3  # other match lengths keep theirs
    for _ in range(20):
        odds.observe(seen, 3, 6, 6)
    assert odds.length(seen, 3, 6, b1)[0] > k3

    def seq(i, ids):
        return Sequence(str(i), list(ids), SamplingParams())

    loop, short = [1, 2, 3, 4, 5] * 6, [7, 8, 9, 7]
    src = LookupDraft()
    assert src.propose([seq(0, loop)], [6], lambda s: True).tokens[0] == [1, 2, 3, 4, 5, 1][:k12]
    assert src.propose([seq(0, short)], [6], lambda s: True).num_drafted <= 1  # a 1-token match: a token at most
    free = LookupDraft(payoff=Payoff.free())  # no cost: every token found, the loop continued
    assert free.propose([seq(0, short)], [6], lambda s: True).tokens == [[8, 9, 7, 8, 9, 7]]
    one = src.propose([seq(0, loop)] + [seq(i, short) for i in range(1, 8)], [6] * 8, lambda s: True)
    assert one.num_drafted == 0  # one row's drafts do not pay the other seven rows' pass overhead
    eight = src.propose([seq(i, loop) for i in range(8)], [6] * 8, lambda s: True)
    assert all(0 < len(t) < k12 for t in eight.tokens)


def test_requests_choose_their_draft(drafty):
    rng = random.Random(2)
    prompts = [repetitive(rng, 24) for _ in range(4)]
    llm = spec_llm(drafty, 0.3, draft="auto", max_num_seqs=4)
    ref = LLM(drafty, **KW).generate(prompts, SamplingParams(max_tokens=12, ignore_eos=True))
    outs = llm.generate(prompts, SamplingParams(max_tokens=12, ignore_eos=True, draft="none"))
    assert [o.token_ids for o in outs] == [r.token_ids for r in ref]
    assert llm.engine.spec.stats.drafted == 0
    from exitwise.engine.llm import RequestError

    with pytest.raises(RequestError, match="draft"):
        llm.engine.add_request(prompts[0], SamplingParams(draft="oracle"))
    with pytest.raises(RequestError, match="speculative"):
        LLM(drafty, **KW).engine.add_request(prompts[0], SamplingParams(draft="lookup"))
    with pytest.raises(RequestError, match="only"):
        spec_llm(drafty, draft="lookup").engine.add_request(prompts[0], SamplingParams(draft="exit"))


def test_lookup_index_matches_brute_force():
    from exitwise.engine.drafts import LookupDraft
    from exitwise.engine.sequence import Sequence

    rng = random.Random(3)
    src = LookupDraft(max_ngram=3)
    seq = Sequence("s", [rng.randrange(6) for _ in range(5)], SamplingParams())
    for _ in range(200):
        ids = seq.token_ids
        want = []
        for n in range(min(3, len(ids)), 0, -1):  # longest suffix n-gram, latest earlier occurrence
            ends = [e for e in range(n - 1, len(ids) - 1) if ids[e + 1 - n:e + 1] == ids[len(ids) - n:]]
            if ends:  # what followed, continuing itself past the end (a loop keeps its period)
                tail = ids[ends[-1] + 1:]
                want = (tail * 4)[:4]
                break
        assert src.lookup(seq, 4) == want
        seq.token_ids.append(rng.randrange(6))


def test_payoff_pauses_a_sequence_whose_drafts_fail():
    from exitwise.engine.drafts import DraftFeedback, Payoff
    from exitwise.engine.sequence import Sequence

    pay = Payoff(backoff=2, max_backoff=8)
    seq = Sequence("s", [1, 2, 3], SamplingParams())
    pauses = []
    for _ in range(6):
        pay.update(seq, DraftFeedback(drafted=2, accepted=0))
        n = 0
        while pay.paused(seq):
            n += 1
        pauses.append(n)
    assert pauses == [0, 2, 4, 8, 8, 8]  # one bad pass is tolerated; then pauses double, capped
    pay.update(seq, DraftFeedback(drafted=4, accepted=4))
    assert not pay.paused(seq)
    # a drafted row costs more of a step's tokens in a big batch, and each further row of a sequence a
    # little more: 2 of 4 kept pays alone, not in 8
    assert pay.row_cost(1) == pytest.approx(0.25) and pay.row_cost(8) == pytest.approx(8 / 11)
    assert pay.rows_cost(1, 4) == pytest.approx(sum(pay.row_cost(1, i) for i in range(1, 5)))
    for batch, pays in ((1, True), (8, False)):
        fresh = Sequence("t", [1], SamplingParams())
        for _ in range(3):
            pay.update(fresh, DraftFeedback(drafted=4, accepted=2, batch=batch))
        assert pay.paused(fresh) != pays


def _tv(a: dict, b: dict) -> float:
    keys = set(a) | set(b)
    na, nb = sum(a.values()), sum(b.values())
    return 0.5 * sum(abs(a.get(k, 0) / na - b.get(k, 0) / nb) for k in keys)


def test_accept_rule_keeps_the_model_distribution():
    """Sampler.accept with a one-hot draft: the first emitted token ~ p0 exactly, and after a kept
    draft the next ~ p1 (20,000 seeded draws; total variation against the exact distributions)."""
    from exitwise.engine.sampling import Sampler

    torch.manual_seed(0)
    logits = torch.randn(2, 12) * 1.5
    params = SamplingParams(temperature=0.9, top_k=8)
    sampler = Sampler()
    p = torch.stack([sampler.probs(row, params) for row in logits])
    draft = int(p[0].argsort()[-2])  # a plausible but not the likeliest token
    first, second = {}, {}
    for seed in range(20000):
        rid = f"r{seed}"
        toks, kept = sampler.accept(logits, [draft], rid, SamplingParams(temperature=0.9, top_k=8, seed=seed))
        sampler.forget(rid)
        first[toks[0]] = first.get(toks[0], 0) + 1
        assert (kept == 1) == (len(toks) == 2)
        if kept:
            second[toks[1]] = second.get(toks[1], 0) + 1
    exact0 = {i: float(v) * 20000 for i, v in enumerate(p[0]) if v > 0}
    exact1 = {i: float(v) * 1000 for i, v in enumerate(p[1]) if v > 0}
    assert _tv(first, exact0) < 0.02
    assert _tv(second, exact1) < 0.04
    assert abs(first[draft] / 20000 - float(p[0, draft])) < 0.015  # kept at its own probability


def test_sampled_speculation_matches_plain_sampling():
    """Engine level: the 2nd and 3rd sampled tokens (the 1st comes from prefill) are distributed alike
    with and without context drafts (two-sample total variation over 600 seeds each, against the
    spread of two plain samples of the same size)."""
    bb = engine_tiny(5, layers=3)
    with torch.no_grad():
        bb.model.lm_head.weight.mul_(6)  # peaked enough that drafts are often kept
    prompt = repetitive(random.Random(4), 16)
    n = 600

    def counts(llm, seed0):
        params = [SamplingParams(max_tokens=3, temperature=1.0, seed=seed0 + i, ignore_eos=True) for i in range(n)]
        outs = llm.generate([prompt] * n, params)
        c = {}
        for o in outs:
            c[tuple(o.token_ids[1:])] = c.get(tuple(o.token_ids[1:]), 0) + 1
        return c

    plain = LLM(bb, num_kv_blocks=512, block_size=4, max_num_seqs=64)
    spec = LLM(bb, num_kv_blocks=512, block_size=4, max_num_seqs=64, speculative=True, draft="lookup",
               max_draft=3)
    from exitwise.engine.drafts import LookupDraft, Payoff

    spec.engine.spec.source = LookupDraft(payoff=Payoff.free())  # always draft
    a, b, c = counts(plain, 0), counts(spec, 10**6), counts(plain, 2 * 10**6)
    st = spec.engine.spec.stats
    assert st.verify_passes > 0 and 0 < st.accepted < st.drafted
    noise = _tv(a, c)  # how far two honest samples of this size lie apart
    assert _tv(a, b) < max(2.5 * noise, 0.05), (_tv(a, b), noise)
    # and a wrong rule would be caught: the drafts alone (always kept) are far from the model
    assert _tv(a, {tuple(prompt[-2:]): n}) > 0.3



def test_an_adapter_that_never_drafts_pauses_itself_alone_too():
    """The adapter source alone (``draft="adapter"``), not only inside ``auto``, stops trying on rows
    where its attempts draft nothing: each costs a shallow step and a readout."""
    from types import SimpleNamespace

    from exitwise.engine.drafts import Draft, DraftFeedback, Payoff
    from exitwise.engine.drafts.adapter import AdapterDraft
    from exitwise.engine.sequence import Sequence

    # an attempt costs its readout: a quarter of a step, about SmolLM2's whole head at int8
    pay = Payoff(key="payoff_adapter", draft_cost=0.5, attempt_cost=0.25)
    src = AdapterDraft(SimpleNamespace(num_layers=4), SimpleNamespace(layer=2), 0.6, lambda s, t: False,
                       payoff=pay, readout=SimpleNamespace(rows=8))
    seq = Sequence("s", [1, 2, 3], SamplingParams())
    for _ in range(4):  # each a loss of the attempt's cost: the running gain goes negative at the fourth
        assert not pay.paused(seq)
        src.observe([seq], Draft.empty(1, "adapter"), [DraftFeedback(0, 0, 1)])
    draft = src.propose([seq], [4], lambda seqs: True)  # paused: returns before running the model
    assert draft.num_drafted == 0 and draft.source == "adapter"
