"""Engine tests on a tiny random Llama (fast): exactness vs HF, batching, memory, pre-emption, exits."""

import asyncio
import dataclasses
import math
from pathlib import Path

import pytest
import torch

from engine_helpers import PROMPTS, always_exit_run, hf_greedy
from exitwise.engine import LLM, SamplingParams
from exitwise.engine.kv_cache import BlockManager
from exitwise.engine.sequence import Sequence
from exitwise.errors import IncompatibleError
from exitwise.exits.base import Readout, make_criterion
from exitwise.models.backbone import Backbone
from tiny_models import engine_tiny


@pytest.fixture(scope="module")
def bb():
    return engine_tiny()


@pytest.fixture(scope="module")
def refs(bb):
    return [hf_greedy(bb, p, 16) for p in PROMPTS]


GREEDY = SamplingParams(max_tokens=16, ignore_eos=True)


def test_batched_greedy_equals_hf(bb, refs):
    llm = LLM(bb, num_kv_blocks=64, block_size=4)
    outs = llm.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outs] == refs
    assert all(o.finish_reason == "length" and o.finished for o in outs)
    assert llm.engine.num_free_blocks == 64


def test_requests_join_mid_way(bb, refs):
    llm = LLM(bb, num_kv_blocks=64, block_size=4, max_num_seqs=3)
    eng = llm.engine
    done = {}
    ids = [eng.add_request(PROMPTS[0], GREEDY), eng.add_request(PROMPTS[1], GREEDY)]
    for step in range(40):
        if step in (3, 6, 7):
            ids.append(eng.add_request(PROMPTS[len(ids)], GREEDY))
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out.token_ids
    while eng.has_unfinished():
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out.token_ids
    assert [done[i] for i in ids] == refs
    assert eng.stats["decode_steps"] > 0 and eng.num_free_blocks == 64


def test_streaming_deltas_concatenate(bb, refs):
    llm = LLM(bb, num_kv_blocks=64, block_size=4)
    got = []
    for out in llm.stream(PROMPTS[2], GREEDY):
        got.extend(out.new_token_ids)
    assert got == refs[2]
    assert llm.engine.num_free_blocks == 64


def test_abort_frees_blocks(bb):
    llm = LLM(bb, num_kv_blocks=64, block_size=4)
    eng = llm.engine
    a = eng.add_request(PROMPTS[2], GREEDY)
    b = eng.add_request(PROMPTS[0], GREEDY)
    eng.step()
    eng.step()
    used = 64 - eng.num_free_blocks
    assert used > 0
    assert eng.abort(a)
    assert not eng.abort(a)  # second abort is a no-op
    assert 64 - eng.num_free_blocks < used
    assert eng.abort(b)
    assert eng.num_free_blocks == 64 and not eng.has_unfinished()
    # an aborted waiting request also leaves nothing behind
    c = eng.add_request(PROMPTS[1], GREEDY)
    assert eng.abort(c) and eng.num_free_blocks == 64 and not eng.has_unfinished()


def test_preemption_by_recompute_keeps_greedy_output(bb, refs):
    # 3 sequences x up to 46 tokens need ~30 blocks of 4; give 14 so decode runs out and pre-empts.
    llm = LLM(bb, num_kv_blocks=14, block_size=4)
    outs = llm.generate(PROMPTS[:3], GREEDY)
    assert llm.engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs] == refs[:3]
    assert llm.engine.num_free_blocks == 14


def test_request_that_can_never_fit_is_rejected(bb):
    llm = LLM(bb, num_kv_blocks=2, block_size=4)
    with pytest.raises(ValueError, match="KV blocks"):
        llm.engine.add_request(PROMPTS[2], GREEDY)
    with pytest.raises(ValueError, match="the context holds 8 .the KV pool: 2 KV blocks"):
        llm.engine.add_request([1] * 250, SamplingParams(max_tokens=10))
    roomy = LLM(bb, num_kv_blocks=256, block_size=4)  # now the position limit binds
    with pytest.raises(ValueError, match="max_tokens=10 with a 250-token prompt exceeds the context"):
        roomy.engine.add_request([1] * 250, SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match="empty"):
        llm.engine.add_request([], GREEDY)


def test_prefix_cache_hits_and_same_output(bb):
    shared = list(range(20, 33))  # 3 full blocks of 4 + 1
    p1, p2 = shared + [50, 51], shared + [60]
    ref2 = hf_greedy(bb, p2, 16)
    llm = LLM(bb, num_kv_blocks=64, block_size=4)
    llm.generate([p1], GREEDY)
    out = llm.generate([p2], GREEDY)[0]
    assert llm.engine.blocks.prefix_hits == 3
    assert out.token_ids == ref2
    assert llm.engine.num_free_blocks == 64


def test_block_manager_refcounts():
    bm = BlockManager(8, 4)
    a = Sequence("a", list(range(9)), GREEDY)
    b = Sequence("b", list(range(9)), GREEDY)
    bm.allocate(a)
    bm.allocate(b)
    assert a.block_table[:2] == b.block_table[:2] and b.num_cached_tokens == 8
    assert bm.num_used == 4
    bm.release(a)
    assert bm.num_used == 3  # shared blocks still held by b
    bm.release(b)
    assert bm.num_free == 8


def test_sampling_seed_top_k(bb, refs):
    llm = LLM(bb, num_kv_blocks=64, block_size=4)
    sp = SamplingParams(max_tokens=12, temperature=1.0, seed=123, ignore_eos=True)
    alone = llm.generate([PROMPTS[0]], sp)[0].token_ids
    # the same seed reproduces even with other requests in the batch
    batch = llm.generate([PROMPTS[1], PROMPTS[0]], [SamplingParams(max_tokens=5, temperature=0.8, seed=1), sp])
    assert batch[1].token_ids == alone
    other = llm.generate([PROMPTS[0]], SamplingParams(max_tokens=12, temperature=1.0, seed=7, ignore_eos=True))
    assert other[0].token_ids != alone
    top1 = llm.generate([PROMPTS[3]], SamplingParams(max_tokens=16, temperature=2.0, top_k=1, ignore_eos=True))
    assert top1[0].token_ids == refs[3]
    tiny_p = llm.generate([PROMPTS[3]], SamplingParams(max_tokens=16, temperature=2.0, top_p=1e-6, ignore_eos=True))
    assert tiny_p[0].token_ids == refs[3]
    # a top_p that float32 rounds to 0 still keeps the most likely token (it used to leave none)
    denormal = llm.generate([PROMPTS[3]], SamplingParams(max_tokens=16, temperature=2.0, top_p=2.2e-311,
                                                         ignore_eos=True))
    assert denormal[0].finish_reason != "error" and denormal[0].token_ids == refs[3]


@pytest.mark.parametrize("field,value", [("max_tokens", 0), ("temperature", -1.0), ("top_p", 0.0), ("top_k", -2)])
def test_sampling_params_validation_names_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_eos_stops(bb, refs):
    eos = refs[2][3]  # the 4th greedy token becomes "EOS"
    llm = LLM(bb, num_kv_blocks=64, block_size=4)
    llm.engine.eos_ids = {eos}
    out = llm.generate([PROMPTS[2]], SamplingParams(max_tokens=16))[0]
    assert out.finish_reason == "stop" and out.token_ids == refs[2][:refs[2].index(eos) + 1]


# ------------------------------------------------------------------------------------ early exit
SHORT = {"fixed": 16, "candidates": 4, "sample": 8}  # a shortlist much smaller than the 97-token vocab


@pytest.mark.parametrize("criterion,kwargs", [("softmax", SHORT), ("softmax", {"shortlist": False}),
                                              ("hidden_similarity", {})])
def test_unreachable_threshold_equals_full_depth_tokens_and_kv(criterion, kwargs):
    bb = engine_tiny(1, layers=6)
    kw = dict(num_kv_blocks=64, block_size=4)
    full = LLM(bb, **kw)
    ee = LLM(bb, exit=criterion, exit_layers=[1, 2, 3, 4, 5], exit_threshold=2.0, exit_kwargs=kwargs,
             **kw)  # confidence <= 1
    eng_f, eng_e = full.engine, ee.engine
    for eng in (eng_f, eng_e):
        for p in PROMPTS[:3]:
            eng.add_request(p, SamplingParams(max_tokens=10, ignore_eos=True, return_exit_layers=True))
    outs_f, outs_e = [], []
    # stop before the end so the cache still holds every sequence's K/V
    for _ in range(6):
        outs_f += eng_f.step()
        outs_e += eng_e.step()
    assert [o.token_ids for o in outs_f] == [o.token_ids for o in outs_e]
    assert torch.equal(eng_f.cache.kv, eng_e.cache.kv)
    assert eng_e.mean_exit_layer == 6
    assert set(outs_e[-1].exit_layers) == {6}


def _ee_run(bb, kv_fill, prompt, n):
    return always_exit_run(bb, kv_fill, prompt, n, exit_layers=(2, 3))  # every decode step exits at layer 3


def test_propagate_fills_skipped_layers_from_exit_state():
    bb = engine_tiny(2, layers=6)
    eng, seq, out = _ee_run(bb, "propagate", PROMPTS[0], 4)
    assert out.exit_layers == [6, 3, 3, 3]  # the prefill token is full depth
    ids = torch.tensor([seq.token_ids[:-1]])  # tokens whose K/V is in the cache
    hs = bb.hidden_states(ids)
    pos = ids.shape[1] - 1  # the last fed token exited at layer 3
    runner = eng.runner
    slot = runner.slot(seq, pos)
    for j in range(3, 6):
        attn = bb.layers[j].self_attn
        x = bb.layers[j].input_layernorm(hs[3][0, pos])
        k = attn.k_proj(x).view(2, 16)
        v = attn.v_proj(x).view(2, 16)
        cos, sin = runner.model.cos[pos], runner.model.sin[pos]
        k = torch.cat((k[:, :8] * cos - k[:, 8:] * sin, k[:, 8:] * cos + k[:, :8] * sin), -1)
        torch.testing.assert_close(eng.cache.flat[0, j, slot], k, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(eng.cache.flat[1, j, slot], v, atol=1e-5, rtol=1e-4)
    # layers below the exit hold the exact K/V of the full model
    exact = bb.layers[1].self_attn.v_proj(bb.layers[1].input_layernorm(hs[1][0, pos])).view(2, 16)
    torch.testing.assert_close(eng.cache.flat[1, 1, slot], exact, atol=1e-5, rtol=1e-4)


def test_full_fill_gives_exact_cache():
    bb = engine_tiny(3, layers=6)
    eng, seq, out = _ee_run(bb, "full", PROMPTS[1], 5)
    assert out.exit_layers[1:] == [3, 3, 3, 3]
    ids = torch.tensor([seq.token_ids[:-1]])
    hs = bb.hidden_states(ids)
    slots = torch.tensor([eng.runner.slot(seq, p) for p in range(ids.shape[1])])
    for j in range(6):
        v = bb.layers[j].self_attn.v_proj(bb.layers[j].input_layernorm(hs[j][0])).view(-1, 2, 16)
        torch.testing.assert_close(eng.cache.flat[1, j, slots], v, atol=1e-5, rtol=1e-4)


def test_early_exit_tokens_come_from_exit_layer_readout():
    bb = engine_tiny(2, layers=6)
    eng, seq, out = _ee_run(bb, "full", PROMPTS[0], 4)
    # with exact KV ("full"), the token after an exit equals the argmax of the layer-3 readout
    ids = torch.tensor([seq.token_ids[:-2]])
    h3 = bb.hidden_states(ids, stop=3)[3][0, -1]
    assert seq.token_ids[-2] == int(bb.readout(h3).argmax())


def test_per_request_threshold_and_min_layer():
    bb = engine_tiny(2, layers=6)
    llm = LLM(bb, exit="hidden_similarity", exit_layers=[2, 3, 4, 5], exit_threshold=-0.5, num_kv_blocks=64,
              block_size=4)
    sp = dict(max_tokens=4, ignore_eos=True, return_exit_layers=True)
    a = llm.generate([PROMPTS[0]], SamplingParams(**sp))[0]
    assert a.exit_layers[1:] == [3, 3, 3]  # first exit layer with a previous state
    b = llm.generate([PROMPTS[0]], SamplingParams(exit_min_layer=5, **sp))[0]
    assert b.exit_layers[1:] == [5, 5, 5]
    c = llm.generate([PROMPTS[0]], SamplingParams(exit_threshold=math.inf, **sp))[0]
    assert c.exit_layers[1:] == [6, 6, 6]
    # a batch leaves only when every member may: mixing a full-depth request keeps all at 6
    d = llm.generate([PROMPTS[0], PROMPTS[1]], [SamplingParams(**sp), SamplingParams(exit_threshold=math.inf, **sp)])
    assert d[0].exit_layers[1:] == [6, 6, 6]


def test_softmax_response_values():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    ro = Readout(torch.zeros(2, 4), lambda h: logits)
    conf = make_criterion("softmax").confidence(torch.zeros(2, 4), None, 3, ro)
    p = torch.softmax(logits, -1)
    torch.testing.assert_close(conf, p[:, 0] - p[:, 1])
    assert ro.computed  # the engine reuses these logits if the batch exits here
    with pytest.raises(ValueError, match="criterion"):
        make_criterion("nope")


def test_softmax_shortlist_prefilter():
    bb = engine_tiny(2, layers=6)
    # the shortlist covers the whole vocabulary: the estimate is the exact confidence
    llm = LLM(bb, exit="softmax", exit_layers=[3], num_kv_blocks=64, block_size=4)
    eng, crit = llm.engine, llm.engine.plan.criterion
    eng.add_request(PROMPTS[0], SamplingParams(max_tokens=4, ignore_eos=True))
    eng.step()
    seqs = list(eng.scheduler.running)
    h = torch.randn(1, 64)
    crit.begin(eng.runner.output, seqs)
    exact = crit.confidence(h, None, 3, Readout(h, eng.runner.logits))
    torch.testing.assert_close(crit.prefilter(h), exact)
    # a small shortlist with candidates from the previous step still exits when the threshold is low,
    # and every exit passed the faithful check (threshold -1: always)
    small = LLM(bb, exit="softmax", exit_layers=[2, 4], exit_threshold=-1.0, exit_kwargs=SHORT, num_kv_blocks=64,
                block_size=4)
    out = small.generate([PROMPTS[0]], SamplingParams(max_tokens=4, ignore_eos=True, return_exit_layers=True))[0]
    assert out.exit_layers[1:] == [2, 2, 2]
    assert small.engine.seqs == {} and small.engine.plan.criterion._list.rows() == 1


def test_hidden_similarity_values():
    crit = make_criterion("hidden_similarity")
    h = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    assert crit.confidence(h, None, 2, None).tolist() == [-1.0, -1.0]
    torch.testing.assert_close(crit.confidence(h, torch.tensor([[1.0, 0.0], [1.0, 0.0]]), 3, None),
                               torch.tensor([1.0, 2 ** -0.5]))


def test_exit_classifier_train_save_load(tmp_path):
    from exitwise.artifacts import model_fingerprint
    from exitwise.exits import classifier as C

    bb = engine_tiny(4, layers=6)
    torch.manual_seed(0)
    ids = torch.randint(0, 97, (600,)).tolist()
    x, y = C.collect(bb, ids, [2, 4], chunk=128)
    assert x.shape == (2, 600, 64) and y.shape == (2, 600)
    w, b = C.fit(x, y, steps=100)
    clf = C.ExitClassifier([2, 4], w, b, model_fingerprint(bb))
    conf = clf.confidence(torch.randn(3, 64), None, 4, None)
    assert conf.shape == (3,) and bool(((conf > 0) & (conf < 1)).all())
    # trained probes separate better than chance on their training data (balanced accuracy)
    pred = torch.einsum("knd,kd->kn", x, w) + b[:, None] > 0
    pos, neg = y > 0.5, y < 0.5
    bal = 0.5 * ((pred & pos).sum(1) / pos.sum(1).clamp(min=1) + (~pred & neg).sum(1) / neg.sum(1).clamp(min=1))
    assert bool((bal > 0.55).all()), bal
    path = clf.save(tmp_path / "clf")
    loaded = C.ExitClassifier.load(path, backbone=bb)
    assert loaded.layers == [2, 4] and torch.equal(loaded.weight, w)
    with pytest.raises(IncompatibleError, match="was made for model .*num_layers"):
        C.ExitClassifier.load(path, backbone=engine_tiny(4, layers=4))
    # the engine accepts it as a criterion and defaults its exit layers to the classifier's
    llm = LLM(bb, exit="classifier", exit_kwargs={"path": path}, exit_threshold=0.0, num_kv_blocks=64, block_size=4)
    assert llm.engine.plan.exit_layers == [2, 4]
    out = llm.generate([PROMPTS[0]], SamplingParams(max_tokens=3, ignore_eos=True, return_exit_layers=True))[0]
    assert out.exit_layers[1:] == [2, 2]


def test_async_engine_streams_and_aborts(bb, refs):
    from exitwise.engine.async_engine import AsyncLLM

    async def main():
        allm = AsyncLLM.from_model(bb, num_kv_blocks=64, block_size=4)

        async def collect(p):
            toks = []
            async for out in allm.generate(p, GREEDY):
                toks.extend(out.new_token_ids)
            return toks

        async def abandon(p):
            async for _ in allm.generate(p, SamplingParams(max_tokens=50, ignore_eos=True)):
                break  # client goes away after the first chunk

        results = await asyncio.gather(*(collect(p) for p in PROMPTS[:3]), abandon(PROMPTS[3]))
        for _ in range(50):  # the loop applies the abort at the next step boundary
            if not allm.engine.has_unfinished():
                break
            await asyncio.sleep(0.01)
        free = allm.engine.num_free_blocks
        await allm.stop()
        return results[:3], free

    got, free = asyncio.run(main())
    assert got == refs[:3]
    assert free == 64


# ------------------------------------------------------------------------------- per-sequence exit
def sharp(seed: int = 1, layers: int = 6) -> Backbone:
    """A tiny model whose readouts are confident enough (head scaled up) for softmax response to exit."""
    bb = engine_tiny(seed, layers)
    with torch.no_grad():
        bb.model.lm_head.weight.mul_(20)
    return bb


def _run_steps(bb, prompts, params, steps, **kw):
    """``steps`` engine steps (prefill + decode) without finishing; per request: tokens, exit layers and
    the K/V of every cached position (all layers)."""
    llm = LLM(bb, num_kv_blocks=64, block_size=4, **kw)
    eng = llm.engine
    rids = [eng.add_request(p, sp) for p, sp in zip(prompts, params, strict=True)]
    for _ in range(steps):
        eng.step()
    res = []
    for rid in rids:
        seq = eng.seqs[rid]
        slots = torch.tensor([eng.runner.slot(seq, p) for p in range(seq.num_computed_tokens)])
        res.append((seq.completion_ids, list(seq.exit_layers), eng.cache.flat[:, :, slots].clone()))
    return eng, res


@pytest.mark.parametrize("criterion,kwargs", [("softmax", SHORT), ("softmax", {"shortlist": False}),
                                              ("hidden_similarity", {})])
def test_sequence_mode_unreachable_threshold_equals_full_depth(criterion, kwargs):
    bb = engine_tiny(1, layers=6)
    sp = [SamplingParams(max_tokens=10, ignore_eos=True)] * 3
    _, full = _run_steps(bb, PROMPTS[:3], sp, 6)
    eng, ee = _run_steps(bb, PROMPTS[:3], sp, 6, exit=criterion, exit_layers=[1, 2, 3, 4, 5], exit_threshold=2.0,
                         exit_kwargs=kwargs, exit_mode="sequence")
    for (tf, _, kvf), (te, le, kve) in zip(full, ee, strict=True):
        assert tf == te and le == [6] * 6
        assert torch.equal(kvf, kve)
    assert eng.mean_exit_layer == 6


@pytest.mark.parametrize("criterion,kwargs,threshold,kv_fill", [
    ("softmax", {"shortlist": False}, 0.5, "propagate"),
    ("softmax", {"shortlist": False}, 0.3, "full"),
    ("softmax", SHORT, 0.3, "propagate"),
    ("hidden_similarity", {}, 0.9, "propagate"),
])
def test_sequence_mode_each_sequence_as_if_alone(criterion, kwargs, threshold, kv_fill):
    """Per-sequence exits do not depend on batch mates: every sequence of a per-sequence batch gets the
    tokens, exit layers and K/V it gets when run alone (batch of 1, where batch mode = its own decision)."""
    bb = sharp()
    kw = dict(exit=criterion, exit_layers=[1, 2, 3, 4, 5], exit_threshold=threshold, exit_kwargs=kwargs,
              kv_fill=kv_fill)
    sp = SamplingParams(max_tokens=12, ignore_eos=True, return_exit_layers=True)
    # the last request may not exit (full depth); in sequence mode that does not hold the others back
    params = [sp] * 4 + [SamplingParams(max_tokens=12, ignore_eos=True, exit_threshold=math.inf)]
    steps = 9
    eng, together = _run_steps(bb, PROMPTS, params, steps, exit_mode="sequence", **kw)
    for p, spi, (tok, layers, kv) in zip(PROMPTS, params, together, strict=True):
        _, [(tok1, layers1, kv1)] = _run_steps(bb, [p], [spi], steps, exit_mode="batch", **kw)
        assert tok == tok1 and layers == layers1
        torch.testing.assert_close(kv, kv1, atol=1e-5, rtol=1e-4)
    layers = [t[1][1:] for t in together]  # decode tokens
    assert layers[4] == [6] * (steps - 1)
    # the case is non-trivial: rows leave at different layers within one step
    assert any(len({row[t] for row in layers}) > 2 for t in range(steps - 1))
    assert eng.mean_exit_layer == sum(map(sum, layers)) / sum(map(len, layers))


def test_sequence_mode_per_request_min_layer():
    bb = engine_tiny(2, layers=6)
    llm = LLM(bb, exit="hidden_similarity", exit_layers=[2, 3, 4, 5], exit_threshold=-0.5, num_kv_blocks=64,
              block_size=4, exit_mode="sequence")
    sp = dict(max_tokens=4, ignore_eos=True, return_exit_layers=True)
    outs = llm.generate(PROMPTS[:3], [SamplingParams(**sp), SamplingParams(exit_min_layer=5, **sp),
                                      SamplingParams(exit_threshold=math.inf, **sp)])
    assert [o.exit_layers[1:] for o in outs] == [[3, 3, 3], [5, 5, 5], [6, 6, 6]]


def test_sequence_mode_needs_compactable_criterion():
    from exitwise.errors import ExitwiseError
    from exitwise.exits.base import ExitCriterion

    class NoSelect(ExitCriterion):  # a prefilter with per-row state but no select_rows hook
        name = "no_select"
        has_prefilter = True

        def prefilter(self, hidden, layer=None):
            return torch.ones(hidden.shape[0])

        def confidence(self, hidden, prev_hidden, layer, readout):
            return torch.ones(hidden.shape[0])

    bb = engine_tiny(2, layers=4)
    with pytest.raises(ExitwiseError, match="select_rows"):
        LLM(bb, exit=NoSelect(), exit_layers=[2], num_kv_blocks=16, block_size=4, exit_mode="sequence")
    LLM(bb, exit=NoSelect(), exit_layers=[2], num_kv_blocks=16, block_size=4)  # batch mode is fine
    with pytest.raises(ValueError, match="exit_mode"):
        LLM(bb, num_kv_blocks=16, block_size=4, exit_mode="token")
    with pytest.raises(ValueError, match="speculative"):
        LLM(bb, exit="hidden_similarity", exit_layers=[2], num_kv_blocks=16, block_size=4, exit_mode="sequence",
            speculative=True)


def test_batch1_reads_consecutive_kv_blocks_in_place(bb):
    """One sequence in consecutive blocks: attention reads the pool rows in place (no gather) and gets the
    gathered copy's logits bit for bit; blocks out of order fall back to the gather."""
    from exitwise.analysis.costs import prepare_decode_step

    llm = LLM(bb, num_kv_blocks=64, block_size=4)
    runner = llm.engine.runner
    seqs, ctx, _ = prepare_decode_step(llm.engine, 1, context=13)
    assert ctx.kv_start == seqs[0].block_table[0] * 4
    in_place = runner.decode(seqs, None)[0]
    original = runner.decode_context
    runner.decode_context = lambda s: dataclasses.replace(original(s), kv_start=None)
    assert torch.equal(runner.decode(seqs, None)[0], in_place)
    runner.decode_context = original
    seqs[0].block_table[:2] = seqs[0].block_table[1::-1]
    assert runner.decode_context(seqs).kv_start is None


def test_a_prompt_put_back_for_the_token_budget_leaves_no_unfilled_cached_blocks(bb):
    """A prompt admitted, then put back because the step's token budget is spent, had its blocks
    registered as a cached prefix: re-admitted next step (or a twin prompt), it must not read them as
    computed. Each output equals the prompt's own alone."""
    long_a = [(7 * i) % 90 + 3 for i in range(40)]
    long_b = [(11 * i) % 90 + 3 for i in range(40)]
    prompts = [long_a, long_b, long_b, long_a]
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    alone = [LLM(bb, num_kv_blocks=64, block_size=4).generate([p], params)[0].token_ids for p in prompts]
    llm = LLM(bb, num_kv_blocks=64, block_size=4, max_num_batched_tokens=48)  # one prompt per step
    assert [o.token_ids for o in llm.generate(prompts, params)] == alone
    assert llm.engine.blocks.prefix_hits > 0  # the twins did reuse filled blocks


def _rss_mb() -> float:
    return int(Path("/proc/self/status").read_text().split("VmRSS:")[1].split()[0]) / 1024


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="resident set read from /proc (Linux)")
def test_kv_pool_is_zero_and_resident_only_where_written():
    from exitwise.engine.kv_cache import KVCache

    before = _rss_mb()
    cache = KVCache(num_layers=4, num_kv_heads=2, head_dim=64, block_size=16, memory_bytes=256 << 20)
    assert cache.nbytes >= 250 << 20 and _rss_mb() - before < 64  # not written: not resident
    assert not cache.kv[:, :, :8].any()
    cache.kv[:, :, 8:10] = 1.5
    assert float(cache.kv[:, :, 8:10].sum()) == 1.5 * cache.kv[:, :, 8:10].numel()
    assert not cache.kv[:, :, 10:12].any() and _rss_mb() - before < 64
