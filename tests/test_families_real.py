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


def test_gemma3_chat_completion_on_loopback(gemma):
    """The bundled GGUF ships no chat template: the server formats messages in Gemma's turn format, and
    its greedy reply equals offline generate of that prompt."""
    import httpx

    from exitwise.server.app import create_app
    from server_helpers import live

    messages = [{"role": "system", "content": "Answer in one word."},
                {"role": "user", "content": "What is the capital of France?"}]
    expected_prompt = ("<bos><start_of_turn>user\nAnswer in one word.\n\nWhat is the capital of France?<end_of_turn>\n"
                       "<start_of_turn>model\n")
    ids = gemma.tokenizer(expected_prompt, add_special_tokens=False)["input_ids"]
    assert ids[0] == gemma.tokenizer.bos_token_id and ids.count(gemma.tokenizer.bos_token_id) == 1
    ref = LLM(gemma, kv_cache_bytes=64 << 20).generate([ids], SamplingParams(max_tokens=6))[0]
    app = create_app(LLM(gemma, kv_cache_bytes=64 << 20).engine, model_name="gemma3-270m")
    with live(app) as url:
        r = httpx.post(f"{url}/v1/chat/completions", timeout=120,
                       json={"messages": messages, "max_tokens": 6, "temperature": 0})
        bad = httpx.post(f"{url}/v1/chat/completions", timeout=30, json={"messages": [
            {"role": "user", "content": "a"}, {"role": "system", "content": "late system message"}]})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == ref.text and ref.text.strip()
    assert bad.status_code == 400 and "system" in bad.text
