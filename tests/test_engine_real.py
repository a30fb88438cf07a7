"""Engine on the real SmolLM2-135M (short: a few prompts, <= 16 new tokens)."""

import pytest
import torch

from exitwise.engine import LLM, SamplingParams

pytestmark = pytest.mark.real_model

PROMPTS = ["The capital of France is", "Once upon a time, in a small village,", "def fibonacci(n):"]


@pytest.fixture(scope="module")
def refs(smollm):
    out = []
    for p in PROMPTS:
        ids = smollm.tokenizer(p, return_tensors="pt")
        gen = smollm.model.generate(**ids, do_sample=False, max_new_tokens=16)
        out.append(gen[0, ids.input_ids.shape[1]:].tolist())
    return out


def test_full_depth_greedy_equals_hf_generate(smollm, refs):
    llm = LLM(smollm, kv_cache_bytes=64 << 20, max_num_seqs=2)  # 2 slots: the third joins mid-way
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=16))
    assert [o.token_ids for o in outs] == refs
    assert outs[0].text == smollm.tokenizer.decode(refs[0], skip_special_tokens=True)
    assert llm.engine.num_free_blocks == llm.engine.cache.num_blocks


def test_preemption_real_model(smollm, refs):
    llm = LLM(smollm, num_kv_blocks=5, block_size=8)  # 40 token slots for 3 sequences of ~33
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=16))
    assert llm.engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs] == refs


def test_stop_string(smollm, refs):
    llm = LLM(smollm, kv_cache_bytes=32 << 20)
    full = smollm.tokenizer.decode(refs[2], skip_special_tokens=True)
    stop = "return"
    assert stop in full
    out = llm.generate([PROMPTS[2]], SamplingParams(max_tokens=16, stop=[stop]))[0]
    assert out.finish_reason == "stop" and out.text == full[:full.index(stop)]
    streamed = "".join(o.new_text for o in llm.stream(PROMPTS[2], SamplingParams(max_tokens=16, stop=[stop])))
    assert streamed == out.text


def test_early_exit_softmax_runs_and_reports_layers(smollm, refs):
    llm = LLM(smollm, kv_cache_bytes=32 << 20, exit="softmax", exit_layers=[20, 24, 28], exit_threshold=0.5)
    out = llm.generate([PROMPTS[0]], SamplingParams(max_tokens=16, return_exit_layers=True))[0]
    assert len(out.exit_layers) == len(out.token_ids)
    assert set(out.exit_layers) <= {20, 24, 28, 30} and min(out.exit_layers) < 30
    assert llm.engine.mean_exit_layer < 30
    # unreachable threshold: identical to full depth
    llm2 = LLM(smollm, kv_cache_bytes=32 << 20, exit="softmax", exit_threshold=1.5)
    assert llm2.generate([PROMPTS[0]], SamplingParams(max_tokens=16))[0].token_ids == refs[0]


def test_device_argument_keeps_cpu(smollm):
    llm = LLM(smollm, kv_cache_bytes=8 << 20, device="cpu")
    assert llm.engine.cache.kv.device == torch.device("cpu")


def test_self_speculative_greedy_identical(smollm, refs):
    """Drafts from the layer-20..28 readouts (softmax response), verified at full depth."""
    llm = LLM(smollm, kv_cache_bytes=64 << 20, exit="softmax", exit_layers=[20, 24, 28], exit_threshold=0.5,
              speculative=True, max_draft=4, max_num_seqs=1)
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=16))
    assert [o.token_ids for o in outs] == refs
    st = llm.engine.spec.stats
    assert st.drafted > 0 and st.verify_passes > 0


def test_default_dtype_is_batch_invariant(data_dir):
    """At the CLI's default dtype (int4 layers, int8 head on the bundled GGUF), 32 requests decoded
    together -- offline, and as 32 concurrent clients of the server -- give each the tokens it gets
    alone, and speculative decoding with context drafts gives them too: the low-bit matmuls compute a
    row the same at every row count (models/kernels)."""
    from exitwise import load_model
    from exitwise.models import kernels

    if not kernels.ready():
        pytest.skip("needs CUDA or an x86 CPU with AVX2 for the batch-invariant kernel")
    import random

    int4 = load_model("smollm2-135m", dtype="int4")
    lines = [ln for ln in (data_dir / "text" / "test.txt").read_text(encoding="utf-8").splitlines() if len(ln) > 200]
    prompts = [ln[:120] for ln in random.Random(0).sample(lines, 32)]
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    alone = LLM(int4, kv_cache_bytes=64 << 20, max_num_seqs=1)
    refs = [alone.generate([p], params)[0].token_ids for p in prompts]
    together = LLM(int4, kv_cache_bytes=64 << 20, max_num_seqs=32).generate(prompts, params)
    assert [o.token_ids for o in together] == refs
    spec = LLM(int4, kv_cache_bytes=64 << 20, max_num_seqs=1, speculative=True, draft="lookup")
    assert [o.token_ids for o in spec.generate(prompts[:4], params)] == refs[:4]

    # the same through the server: 32 concurrent clients, each answered with its offline tokens
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    from exitwise.engine import LLMEngine
    from exitwise.server.app import create_app
    from server_helpers import live

    engine = LLMEngine(int4, kv_cache_bytes=64 << 20, max_num_seqs=32)
    with live(create_app(engine)) as url, httpx.Client(base_url=url, timeout=300) as client:
        def ask(prompt: str) -> list[int]:
            body = {"prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True,
                    "return_token_ids": True}
            r = client.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["token_ids"]

        with ThreadPoolExecutor(32) as pool:
            served = list(pool.map(ask, prompts))
    assert served == refs
