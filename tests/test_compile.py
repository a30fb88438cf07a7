"""EngineConfig.compile: full-depth decode steps as one torch.compile graph give eager's greedy tokens and,
within rounding, its logits; a compiler failure warns once and the engine goes on eagerly."""

import pytest
import torch

from exitwise.analysis.costs import prepare_decode_step
from exitwise.engine import LLM, SamplingParams
from tiny_models import engine_tiny

PROMPTS = [[5, 6, 7, 8, 9], [1, 2, 3], list(range(10, 40))]
PARAMS = SamplingParams(max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def bb():
    return engine_tiny()


def step_logits(llm, batch: int) -> torch.Tensor:
    seqs, _, _ = prepare_decode_step(llm.engine, batch, context=12)
    out = llm.engine.runner.decode(seqs, None)[0]
    for s in seqs:
        llm.engine.abort(s.request_id)
    return out


@pytest.mark.parametrize("dtype", ["float32", "int8", "int4"])
def test_compiled_decode_equals_eager(bb, dtype):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # engines share decode_layers' code object, and with it dynamo's recompile limit
    graphs = counters["stats"]["unique_graphs"]
    eager = LLM(bb, num_kv_blocks=64, block_size=4, weight_dtype=dtype)
    comp = LLM(bb, num_kv_blocks=64, block_size=4, weight_dtype=dtype, compile=True)
    # batch 1 (K/V read in place; compiled, then recompiled once with a dynamic KV length), then a ragged
    # batch of 3 (gathered K/V and a key mask; float32 batches of 2+ stay eager, on oneDNN-packed weights)
    for prompts in ([PROMPTS[2]], PROMPTS):
        want = [o.token_ids for o in eager.generate(prompts, PARAMS)]
        assert [o.token_ids for o in comp.generate(prompts, PARAMS)] == want
    for batch in (1, 3):
        torch.testing.assert_close(step_logits(comp, batch), step_logits(eager, batch), atol=1e-4, rtol=1e-4)
    assert comp.engine.runner.compiled_layers is not None and counters["stats"]["unique_graphs"] > graphs


def test_compile_failure_falls_back_to_eager(bb):
    want = LLM(bb, num_kv_blocks=64, block_size=4).generate(PROMPTS[2], PARAMS)[0].token_ids
    llm = LLM(bb, num_kv_blocks=64, block_size=4, compile=True)

    def broken(x, ctx):
        raise RuntimeError("no C++ compiler")

    llm.engine.runner.compiled_layers = broken
    with pytest.warns(UserWarning, match="running eager from now on") as record:
        assert llm.generate(PROMPTS[2], PARAMS)[0].token_ids == want  # ten decode steps, one warning
    assert len(record) == 1 and llm.engine.runner.compiled_layers is None
