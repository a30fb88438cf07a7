"""The engine on the real bundled Gemma-3-270M (18 layers, sliding-window and global layers, its own
RoPE per layer type): greedy output equals HF ``generate``, through the API and the CLI."""

import pytest
import torch

from exitwise.cli import main
from exitwise.engine import LLM, SamplingParams

pytestmark = pytest.mark.real_model

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def gemma():
    from exitwise import ModelNotFoundError, load_model

    try:
        return load_model("gemma3-270m")
    except ModelNotFoundError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def ref(gemma):
    ids = gemma.tokenizer(PROMPT, return_tensors="pt")
    with torch.inference_mode():
        gen = gemma.model.generate(**ids, do_sample=False, max_new_tokens=8)
    return gen[0, ids.input_ids.shape[1]:].tolist()


def test_gemma3_greedy_equals_hf_generate(gemma, ref):
    out = LLM(gemma, kv_cache_bytes=64 << 20).generate([PROMPT], SamplingParams(max_tokens=8))[0]
    assert out.token_ids == ref
    assert out.text == gemma.tokenizer.decode(ref, skip_special_tokens=True)


def test_gemma3_cli_generate_prints_hf_text(gemma, ref, capsys):
    assert main(["generate", "--model", "gemma3-270m", "--prompt", PROMPT, "--max-tokens", "8"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(PROMPT + gemma.tokenizer.decode(ref, skip_special_tokens=True)), printed


def test_gemma3_past_the_sliding_window(gemma):
    """A prompt longer than the 512-token window: the sliding layers see only its last 512 positions."""
    assert gemma.config.sliding_window == 512
    text = " ".join(f"Item {i} is a {'red' if i % 3 else 'blue'} box." for i in range(90)) + " Item 90 is a"
    ids = gemma.tokenizer(text, return_tensors="pt")
    assert ids.input_ids.shape[1] > 520
    with torch.inference_mode():
        gen = gemma.model.generate(**ids, do_sample=False, max_new_tokens=6)
    ref = gen[0, ids.input_ids.shape[1]:].tolist()
    out = LLM(gemma, kv_cache_bytes=64 << 20).generate([ids.input_ids[0].tolist()], SamplingParams(max_tokens=6))[0]
    assert out.token_ids == ref
