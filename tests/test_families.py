"""The engine on the other decoder families (tiny random models, float32): Qwen2 (q/k/v biases), Qwen3
(per-head q/k norms), Llama 3 RoPE scaling and Gemma 3 (sandwich norms, (1 + w) norms, scaled
embeddings and queries, GELU-tanh, interleaved sliding-window / global layers with their own RoPE,
soft-capped logits): greedy tokens equal HF ``generate``, logits equal HF's forward."""

import pytest
import torch
from transformers import Qwen2Config

from engine_helpers import PROMPTS, always_exit_run, engine_logits_vs_hf, greedy_equals_hf, hf_greedy
from exitwise.engine import LLM, SamplingParams
from exitwise.errors import ExitwiseError
from exitwise.server.metrics import ServerMetrics, exposition, make_registry
from tiny_models import FAMILIES, FAMILY_SHAPE, WINDOW, all_sliding_gemma, family_model, gemma3, qwen3

# prompts longer and shorter than the sliding window, decoding past it
LONG_PROMPTS = PROMPTS + [list(range(50, 63))]


@pytest.fixture(scope="module", params=list(FAMILIES))
def fam(request):
    return request.param, FAMILIES[request.param]()


def test_family_parts_are_read(fam):
    name, bb = fam
    model = LLM(bb, num_kv_blocks=8, block_size=4).engine.runner.model
    layer = model.layers[0]
    assert (layer.linears[0].bias is not None) == (name == "qwen2")
    assert (layer.qk_norm is not None) == (name in ("qwen3", "gemma3"))
    assert (layer.mlp_out_norm is not None) == (name == "gemma3")
    if name == "gemma3":
        assert model.windows == [WINDOW, None, WINDOW, None] and set(model.other_rope) == {"sliding_attention"}
        assert model.scaling == 24 ** -0.5 and model.output.softcap == 2.0
        torch.testing.assert_close(layer.in_norm, 1 + bb.layers[0].input_layernorm.weight)
    else:
        assert model.windows == [None] * bb.num_layers and model.scaling is None


def test_greedy_equals_hf(fam):
    _, bb = fam
    greedy_equals_hf(bb, LONG_PROMPTS, 16)


def test_logits_equal_hf_forward(fam):
    _, bb = fam
    assert engine_logits_vs_hf(bb, LONG_PROMPTS, 12) <= 1e-4


def test_sliding_window_matters():
    """The window mask is doing something: the same Gemma weights without sliding layers differ."""
    bb = gemma3()
    llm = LLM(bb, num_kv_blocks=64, block_size=4)
    runner = llm.engine.runner
    runner.model.windows = [None] * bb.num_layers
    out = llm.generate([PROMPTS[2]], SamplingParams(max_tokens=12, ignore_eos=True))[0].token_ids
    assert engine_logits_vs_hf(bb, [PROMPTS[2]], 0) <= 1e-4  # a fresh engine is exact
    assert out != hf_greedy(bb, PROMPTS[2], 12)


@pytest.mark.parametrize("make", [qwen3, gemma3])  # the families with new layer parts
def test_bfloat16_weights_close(make):
    diff = engine_logits_vs_hf(make(), LONG_PROMPTS[:3], 4, weight_dtype="bfloat16")
    assert diff < 0.1, diff


def test_unsupported_fields_named():
    bb = gemma3(layers=2)
    bb.config.attn_logit_softcapping = 50.0
    with pytest.raises(ExitwiseError, match="attn_logit_softcapping"):
        LLM(bb, num_kv_blocks=8, block_size=4)
    bb = gemma3(layers=2)
    bb.config.hidden_activation = "relu"
    with pytest.raises(ExitwiseError, match="hidden_act"):
        LLM(bb, num_kv_blocks=8, block_size=4)


# ------------------------------------------------------------------------- exits on the new families
@pytest.mark.parametrize("make", [qwen3, gemma3])
def test_propagate_applies_k_norm_and_each_layers_rope(make):
    """State propagation writes the K/V HF's own modules give from the exit state: K normalised per
    head by each skipped layer's k_norm, then rotated with that layer's RoPE table (Gemma 3: local
    table for sliding layers, global for full ones)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    bb = make(seed=2, layers=4)
    eng, seq, out = always_exit_run(bb, "propagate", LONG_PROMPTS[2], 4)
    assert out.exit_layers == [4, 2, 2, 2]
    ids = torch.tensor([seq.token_ids[:-1]])  # tokens whose K/V is in the cache
    pos = ids.shape[1] - 1  # the last fed token exited at layer 2
    with torch.inference_mode():
        h = bb.hidden_states(ids, stop=2)[2][0, pos]  # exact: the layers below the exit ran
        slot = eng.runner.slot(seq, pos)
        hkv, hd = bb.config.num_key_value_heads, eng.runner.model.head_dim
        for j in range(2, 4):
            attn = bb.layers[j].self_attn
            x = bb.layers[j].input_layernorm(h)
            k = attn.k_norm(attn.k_proj(x).view(1, hkv, 1, hd))
            rot = bb.rotary(x[None, None], torch.tensor([[pos]]), *([bb.layer_types[j]] if bb._rope_by_type else []))
            _, k = apply_rotary_pos_emb(k, k, *rot)
            torch.testing.assert_close(eng.cache.flat[0, j, slot], k[0, :, 0], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(eng.cache.flat[1, j, slot], attn.v_proj(x).view(hkv, hd), atol=1e-5,
                                       rtol=1e-4)


def drafty_gemma():
    """Gemma 3 whose early layers often, but not always, predict the final token: a sharp tied head
    (embeddings x10, which also makes the layers' updates small next to the residual stream), with a
    soft cap that still leaves margins."""
    bb = gemma3(seed=0, layers=4, softcap=30.0)
    with torch.no_grad():
        bb.model.model.embed_tokens.weight.mul_(10)
    return bb


def test_gemma_softmax_exit_and_shortlist():
    bb = drafty_gemma()
    sp = SamplingParams(max_tokens=12, ignore_eos=True, return_exit_layers=True)
    # the shortlist covers the vocabulary: its estimate is the exact (soft-capped) confidence
    llm = LLM(bb, exit="softmax", exit_layers=[2, 3], exit_threshold=-1.0, num_kv_blocks=64, block_size=4,
              kv_fill="full")
    out = llm.generate([LONG_PROMPTS[2]], sp)[0]
    assert out.exit_layers[1:] == [2] * 11
    # exact K/V ("full"): each exit token is the argmax of HF's readout at layer 2
    ids = LONG_PROMPTS[2] + out.token_ids
    with torch.inference_mode():
        h2 = bb.hidden_states(torch.tensor([ids[:-1]]), stop=2)[2][0]
        readout = bb.readout(h2)
    assert out.token_ids[1:] == readout[len(LONG_PROMPTS[2]):].argmax(-1).tolist()
    eng, crit = llm.engine, llm.engine.plan.criterion
    eng.add_request(PROMPTS[0], SamplingParams(max_tokens=4, ignore_eos=True))
    eng.step()
    h = torch.randn(2, 64) * 5
    crit.begin(eng.runner.output, list(eng.scheduler.running) * 2)
    from exitwise.exits.base import Readout
    exact = crit.confidence(h, None, 3, Readout(h, eng.runner.logits))
    torch.testing.assert_close(crit.prefilter(h), exact)
    # an unreachable threshold is full depth
    full = LLM(bb, num_kv_blocks=64, block_size=4).generate(LONG_PROMPTS, sp)
    never = LLM(bb, exit="softmax", exit_layers=[1, 2, 3], exit_threshold=2.0, num_kv_blocks=64,
                block_size=4).generate(LONG_PROMPTS, sp)
    assert [o.token_ids for o in never] == [o.token_ids for o in full]


def test_gemma_self_speculation_identical_to_full_depth():
    bb = drafty_gemma()
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    ref = LLM(bb, num_kv_blocks=256, block_size=4).generate(LONG_PROMPTS, params)
    assert [o.token_ids for o in ref] == [hf_greedy(bb, p, 20) for p in LONG_PROMPTS]
    llm = LLM(bb, exit="softmax", exit_layers=[1, 2, 3], exit_threshold=0.2, exit_kwargs={"shortlist": False},
              speculative=True, draft="exit", max_draft=4, num_kv_blocks=256, block_size=4)
    outs = llm.generate(LONG_PROMPTS, params)
    assert [o.token_ids for o in outs] == [r.token_ids for r in ref]
    st = llm.engine.spec.stats
    assert 0 < st.accepted < st.drafted, st  # drafts both accepted and rejected


@pytest.mark.filterwarnings("error:torch.compile of the decode step failed")
def test_gemma_compiled_decode_equals_hf():
    """EngineConfig.compile: the full-depth step as one graph reads the window reads and both RoPE tables
    built eagerly (LlamaDecoder.prepare); a prompt shorter than the window decodes past it."""
    greedy_equals_hf(gemma3(), [LONG_PROMPTS[1]], 14, compile=True)


def test_gemma_window_layers_read_only_their_window():
    """Sliding layers gather only the last WINDOW positions (batched gather and batch-1 in-place slice),
    still equal to HF, and the positions they did not read are counted for /metrics."""
    bb = gemma3()
    long, short = LONG_PROMPTS[-1], PROMPTS[0][:3]  # 13 tokens (past the window of 8) and 3 (inside it)
    assert len(long) == 13
    for prompts in ([long], [long, short]):  # batch 1 reads in place, batch 2 through the gather
        llm = LLM(bb, num_kv_blocks=64, block_size=4)
        outs = llm.generate(prompts, SamplingParams(max_tokens=6, ignore_eos=True))
        assert [o.token_ids for o in outs] == [hf_greedy(bb, p, 6) for p in prompts]
        # 5 decode steps feed contexts of 14..18 tokens: each of the 2 sliding layers skips len - 8 of
        # the long sequence's positions (6..10), none of the short one's (4..8 tokens)
        assert llm.engine.runner.model.window_skipped_reads == 2 * sum(range(6, 11))


def test_gemma_preemption_and_prefix_cache_past_the_window():
    bb = gemma3()
    prompts = [LONG_PROMPTS[-1], PROMPTS[1], PROMPTS[3]]  # 13, 3 and 9 tokens
    refs = [hf_greedy(bb, p, 20) for p in prompts]
    llm = LLM(bb, num_kv_blocks=10, block_size=4)  # the longest needs 9 blocks, all three 22: decode pre-empts
    outs = llm.generate(prompts, SamplingParams(max_tokens=20, ignore_eos=True))
    assert llm.engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs] == refs and llm.engine.num_free_blocks == 10
    shared = list(range(20, 33))  # 3 full blocks of 4 + 1, longer than the window
    llm = LLM(bb, num_kv_blocks=64, block_size=4)
    llm.generate([shared + [50, 51]], SamplingParams(max_tokens=4, ignore_eos=True))
    out = llm.generate([shared + [60]], SamplingParams(max_tokens=16, ignore_eos=True))[0]
    assert llm.engine.blocks.prefix_hits == 3 and out.token_ids == hf_greedy(bb, shared + [60], 16)


@pytest.mark.parametrize("exit_name", ["softmax", "hidden_similarity"])
@pytest.mark.parametrize("kv_fill", ["propagate", "full"])
@pytest.mark.parametrize("mode", ["batch", "sequence"])
def test_gemma_criteria_fills_and_modes(exit_name, kv_fill, mode):
    """Each training-free criterion, KV-fill policy and exit mode on Gemma 3 past its window: an always-met
    threshold exits every decode token at the first exit layer and frees every block; an unreachable one
    equals full depth."""
    bb = drafty_gemma()
    sp = SamplingParams(max_tokens=10, ignore_eos=True, return_exit_layers=True)
    kw = dict(exit=exit_name, exit_layers=[2, 3], kv_fill=kv_fill, exit_mode=mode, num_kv_blocks=64, block_size=4)
    always = LLM(bb, exit_threshold=-1.0, **kw)
    outs = always.generate(LONG_PROMPTS, sp)
    assert all(o.exit_layers[1:] == [2] * 9 for o in outs)
    assert always.engine.num_free_blocks == 64
    full = LLM(bb, num_kv_blocks=64, block_size=4).generate(LONG_PROMPTS, sp)
    never = LLM(bb, exit_threshold=2.0, **kw).generate(LONG_PROMPTS, sp)
    assert [o.token_ids for o in never] == [o.token_ids for o in full]


@pytest.mark.parametrize("max_window_layers", [0, 1])  # every layer slides / the first is global
def test_qwen2_sliding_window_equals_hf(max_window_layers):
    cfg = Qwen2Config(num_hidden_layers=3, tie_word_embeddings=False, use_sliding_window=True, sliding_window=WINDOW,
                      max_window_layers=max_window_layers, **FAMILY_SHAPE)
    bb = family_model(cfg, 0, "tiny-qwen2-sliding")
    greedy_equals_hf(bb, LONG_PROMPTS, 16)
    assert engine_logits_vs_hf(bb, LONG_PROMPTS, 12) <= 1e-4


def test_all_sliding_model_frees_blocks_outside_the_window():
    """Every layer slides: blocks before every window go back to the pool while their sequence runs, so a
    pool far smaller than the sequences' lengths serves them without pre-emption, equal to HF; a model
    with one global layer keeps them all (Gemma 3's own layout)."""
    bb = all_sliding_gemma()
    prompts = [LONG_PROMPTS[-1], PROMPTS[1], PROMPTS[3]]  # 13, 3 and 9 tokens
    refs = [hf_greedy(bb, p, 30) for p in prompts]
    # each sequence holds at most ceil((WINDOW + 1) / 4) + 1 = 4 live blocks; 43 tokens would need 11
    llm = LLM(bb, num_kv_blocks=16, block_size=4)
    outs = llm.generate(prompts, SamplingParams(max_tokens=30, ignore_eos=True))
    assert [o.token_ids for o in outs] == refs
    eng = llm.engine
    assert eng.scheduler.num_preemptions == 0 and eng.blocks.window_freed > 0
    assert eng.num_free_blocks == 16  # freed once, never twice
    assert len(eng.blocks.free) == len(set(eng.blocks.free))
    scrape = exposition(make_registry(ServerMetrics(), eng, lambda: 0, None)).decode()
    assert f"exitwise_kv_window_freed_blocks_total {float(eng.blocks.window_freed)}" in scrape
    mixed = LLM(gemma3(), num_kv_blocks=64, block_size=4)
    mixed.generate(prompts, SamplingParams(max_tokens=30, ignore_eos=True))
    assert mixed.engine.blocks.window_freed == 0


def test_all_sliding_freed_blocks_with_prefix_cache_preemption_and_speculation():
    bb = all_sliding_gemma()
    shared = list(range(20, 33))  # 3 full blocks of 4 + 1, longer than the window
    llm = LLM(bb, num_kv_blocks=64, block_size=4)
    llm.generate([shared + [50, 51]], SamplingParams(max_tokens=12, ignore_eos=True))  # frees its prefix blocks
    out = llm.generate([shared + [60]], SamplingParams(max_tokens=16, ignore_eos=True))[0]
    assert llm.engine.blocks.prefix_hits == 3 and out.token_ids == hf_greedy(bb, shared + [60], 16)
    # six short prompts are admitted at one block each, then grow to a window's 3-4 live blocks: pre-emption,
    # and re-prefill of the pre-empted over all their tokens
    prompts = [[5 + i, 40 + 2 * i, 70 - i] for i in range(6)]
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    refs = [hf_greedy(bb, p, 20) for p in prompts]
    tight = LLM(bb, num_kv_blocks=10, block_size=4)
    assert [o.token_ids for o in tight.generate(prompts, params)] == refs
    assert tight.engine.scheduler.num_preemptions > 0 and tight.engine.num_free_blocks == 10
    prompts = [LONG_PROMPTS[-1], shared, PROMPTS[3]]
    with torch.no_grad():  # drafty: a sharp tied head (see drafty_gemma); x7 drafts some tokens wrong
        bb.model.model.embed_tokens.weight.mul_(7)
    refs = [hf_greedy(bb, p, 20) for p in prompts]
    spec = LLM(bb, exit="softmax", exit_layers=[1, 2], exit_threshold=0.5, exit_kwargs={"shortlist": False},
               speculative=True, draft="exit", max_draft=4, num_kv_blocks=32, block_size=4)
    assert [o.token_ids for o in spec.generate(prompts, params)] == refs
    st = spec.engine.spec.stats
    assert spec.engine.blocks.window_freed > 0 and 0 < st.accepted < st.drafted, st


# ------------------------------------------------------------- trained criteria on Gemma 3 past its window
@pytest.mark.parametrize("kind", ["linear", "translator"])
def test_gemma_heads_criterion(tmp_path, kind):
    """Heads (each kind; translators with their shortlist gate) on Gemma 3's sliding and global layers:
    a head that always fires exits there with the head's own token; one that never fires equals full depth."""
    from exitwise.exits.heads import HeadsCriterion
    from exitwise.heads.model import ExitHeads

    bb = gemma3()
    heads = ExitHeads(bb, layers=[1, 2], init="random" if kind == "linear" else "head", seed=1, kind=kind)
    heads.meta["thresholds"] = {"max_coverage": {"0.5": [None, 100.0], "0.9": [None, None]}}
    heads.save(tmp_path / "h")
    sp = SamplingParams(max_tokens=8, ignore_eos=True, return_exit_layers=True)
    full = LLM(bb, num_kv_blocks=64, block_size=4).generate(LONG_PROMPTS, sp)
    for mode in ("batch", "sequence"):
        crit = HeadsCriterion.load(tmp_path / "h", bb, alpha=0.5)
        assert crit.gate == ("shortlist" if kind == "translator" else False)
        outs = LLM(bb, exit=crit, exit_threshold=0.0, exit_mode=mode, num_kv_blocks=64,
                   block_size=4).generate(LONG_PROMPTS, sp)
        assert all(o.exit_layers[1:] == [2] * 7 for o in outs)
        # the first exiting token is head 2's argmax on the engine's (propagated-cache-free) first step
        for o, p in zip(outs, LONG_PROMPTS, strict=True):
            h = bb.hidden_states(torch.tensor([p + o.token_ids[:1]]), stop=2)[2][0, -1]
            with torch.no_grad():
                assert o.token_ids[1] == int(crit.heads.logits(1, h).argmax())
        never = LLM(bb, exit=HeadsCriterion.load(tmp_path / "h", bb, alpha=0.9), exit_threshold=0.0, exit_mode=mode,
                    num_kv_blocks=64, block_size=4).generate(LONG_PROMPTS, sp)
        assert [o.token_ids for o in never] == [o.token_ids for o in full]


def test_gemma_exit_classifier(tmp_path):
    from exitwise.artifacts import model_fingerprint
    from exitwise.exits import classifier as C

    bb = drafty_gemma()
    torch.manual_seed(0)
    x, y = C.collect(bb, torch.randint(0, 97, (400,)).tolist(), [2, 3], chunk=128)
    w, b = C.fit(x, y, steps=60)
    path = C.ExitClassifier([2, 3], w, b, model_fingerprint(bb)).save(tmp_path / "clf")
    sp = SamplingParams(max_tokens=10, ignore_eos=True, return_exit_layers=True)
    full = LLM(bb, num_kv_blocks=64, block_size=4).generate(LONG_PROMPTS, sp)
    for mode in ("batch", "sequence"):
        kw = dict(exit="classifier", exit_kwargs={"path": path}, exit_mode=mode, num_kv_blocks=64, block_size=4)
        always = LLM(bb, exit_threshold=0.0, **kw).generate(LONG_PROMPTS, sp)
        assert all(o.exit_layers[1:] == [2] * 9 for o in always)
        never = LLM(bb, exit_threshold=1.5, **kw).generate(LONG_PROMPTS, sp)
        assert [o.token_ids for o in never] == [o.token_ids for o in full]
