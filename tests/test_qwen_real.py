"""Qwen2.5-Coder-0.5B-Instruct from its GGUF (`make models`) straight into low-bit engine weights: the
layouts its block types map to, greedy engine output equal to HF ``generate`` on the same weights, and
code out of the CLI. Slow (a 491 MB model on CPU) and not part of `make test`."""

import pytest
import torch

from exitwise.cli import main
from exitwise.engine import LLM, SamplingParams
from exitwise.models import kernels

pytestmark = [pytest.mark.real_model, pytest.mark.slow]

PROMPT = "def fibonacci(n):"


@pytest.fixture(scope="module")
def qwen():
    from exitwise import ModelNotFoundError, load_model

    try:
        return load_model("qwen2.5-coder-0.5b", dtype="auto")
    except ModelNotFoundError as exc:
        pytest.skip(f"Qwen2.5-Coder-0.5B is not installed (make models): {exc}")


def test_block_types_map_to_their_layouts(qwen):
    layers = qwen.model.model.layers
    # Q5_0 q/k (their 5-bit levels where the kernel runs) with a Q8_0 v: int8; ffn_down is Q6_K in layer 0
    # (int8) and Q4_K in layer 2 (int4, its own values)
    assert layers[0].self_attn.q_proj.weight_dtype == "int8" and layers[0].mlp.down_proj.weight_dtype == "int8"
    assert layers[0].self_attn.q_proj.layout == ("q5" if kernels.ready() else "int8")
    assert layers[2].mlp.down_proj.weight_dtype == "int4"
    assert layers[2].mlp.down_proj.layout == ("q4k" if kernels.ready() else "int4")  # its super-blocks
    assert qwen.model.lm_head.weight_dtype == "int8" and qwen.weight_dtype == "int8"
    rows = qwen.embed_tokens.weight[torch.tensor([0, 151_000])]  # the embedding's blocks, read when gathered
    assert rows.dtype == torch.float32 and rows.shape == (2, 896) and bool(rows.abs().sum(1).gt(0).all())


def test_engine_greedy_equals_hf_generate_on_the_same_weights(qwen):
    ids = qwen.tokenizer(PROMPT, return_tensors="pt")
    with torch.inference_mode():
        gen = qwen.model.generate(**ids, do_sample=False, max_new_tokens=16)
    ref = gen[0, ids.input_ids.shape[1]:].tolist()
    out = LLM(qwen, kv_cache_bytes=64 << 20).generate([PROMPT], SamplingParams(max_tokens=16))[0]
    assert out.token_ids == ref


def test_cli_generate_writes_code(capsys):
    assert main(["generate", "--model", "qwen2.5-coder-0.5b", "--prompt", PROMPT, "--max-tokens", "32"]) == 0
    text = capsys.readouterr().out
    assert "return" in text and "fibonacci" in text
