"""The official ``openai`` Python SDK as the client: what users of an OpenAI-compatible server run.

Completions and chat, both streamed and not, checked against offline greedy generation; errors arrive
as the SDK's own exception types (400 BadRequestError naming the field, 401 AuthenticationError for a
wrong key, 429 RateLimitError, 500 InternalServerError, an error event mid-stream as APIError).
uvicorn on loopback; the SDK never retries (``max_retries=0``) and every call has a timeout.
"""

from __future__ import annotations

import pytest

from exitwise.engine import LLM, LLMEngine, SamplingParams
from exitwise.server.app import create_app
from server_helpers import live, poison_runner, wait_idle

openai = pytest.importorskip("openai")

KEY = "sdk-test-key"


@pytest.fixture(scope="module")
def served(bb):
    engine = LLMEngine(bb, num_kv_blocks=64, block_size=16, max_num_seqs=8)
    with live(create_app(engine, api_key=KEY)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=30)
        yield client, engine, url
        client.close()


def greedy(bb, ids: list[int], n: int):
    return LLM(bb, num_kv_blocks=32).generate([ids], SamplingParams(max_tokens=n))[0]


def chat_ids(tok, content: str) -> list[int]:
    text = tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)
    return tok(text, add_special_tokens=False)["input_ids"]


def test_models(served):
    client, _, _ = served
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_completion_and_its_stream(served, bb, tok):
    client, engine, _ = served
    prompt = "The old mill by the river"
    ref = greedy(bb, tok(prompt)["input_ids"], 8)
    out = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0)
    assert out.object == "text_completion" and out.choices[0].text == ref.text
    assert out.choices[0].finish_reason == ref.finish_reason
    assert out.usage.completion_tokens == len(ref.token_ids)
    chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == ref.text
    assert chunks[-1].usage.completion_tokens == len(ref.token_ids)
    wait_idle(engine)


def test_chat_and_its_stream(served, bb, tok):
    client, engine, _ = served
    ref = greedy(bb, chat_ids(tok, "hello"), 6)
    messages = [{"role": "user", "content": "hello"}]
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0)
    assert out.choices[0].message.role == "assistant" and out.choices[0].message.content == ref.text
    assert out.usage.completion_tokens == len(ref.token_ids)
    # max_completion_tokens, the name newer SDK code uses, means the same
    again = client.chat.completions.create(model="tiny", messages=messages, max_completion_tokens=6, temperature=0)
    assert again.choices[0].message.content == ref.text
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0, stream=True)
    deltas = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(deltas) == ref.text
    wait_idle(engine)


def test_extension_fields_through_extra_body(served):
    client, _, _ = served
    out = client.completions.create(model="tiny", prompt="the river", max_tokens=3, temperature=0,
                                    extra_body={"return_exit_layers": True, "return_token_ids": True})
    extra = out.choices[0].model_extra
    assert extra["exit_layers"] == [4, 4, 4] and len(extra["token_ids"]) == 3


def test_errors_are_the_sdks_exception_types(served):
    client, _, url = served
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model="tiny", prompt="x", max_tokens=0)
    assert bad.value.status_code == 400 and bad.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], logprobs=True)
    assert bad.value.param == "logprobs" and "not supported" in bad.value.message
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model="gpt-4", prompt="x")
    assert bad.value.code == "model_not_found"
    wrong = openai.OpenAI(base_url=f"{url}/v1", api_key="wrong-key", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError) as denied:
        wrong.completions.create(model="tiny", prompt="x", max_tokens=2)
    assert denied.value.status_code == 401 and denied.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    wrong.close()


def test_rate_limit_and_engine_errors(bb, tok):
    """429 past the queue bound is RateLimitError; an engine failure is InternalServerError, or APIError
    raised while iterating a stream that already started."""
    full = create_app(LLMEngine(bb, num_kv_blocks=16), max_queue=0)  # no room: every request is refused
    with live(full) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=30)
        with pytest.raises(openai.RateLimitError) as busy:
            client.completions.create(model="tiny", prompt="x", max_tokens=2)
        assert busy.value.response.headers["retry-after"] == "1"
        client.close()
    engine = LLMEngine(bb, num_kv_blocks=64)
    poison_runner(engine, tok(" zebra")["input_ids"][-1], after=1)
    with live(create_app(engine)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=30)
        with pytest.raises(openai.InternalServerError):
            client.completions.create(model="tiny", prompt="a zebra", max_tokens=4)
        with pytest.raises(openai.APIError, match="the engine failed this request"):
            for _ in client.completions.create(model="tiny", prompt="a zebra", max_tokens=4, stream=True):
                pass
        # the server goes on: a normal request right after
        assert client.completions.create(model="tiny", prompt="the river", max_tokens=2).choices[0].finish_reason
        client.close()
