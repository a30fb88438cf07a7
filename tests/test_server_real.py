"""The server on the real SmolLM2-135M: a couple of short requests (ASGI transport, no socket)."""

import asyncio
import json

import httpx
import pytest

from exitwise.engine import LLM, LLMEngine, SamplingParams
from exitwise.server.app import create_app

pytestmark = pytest.mark.real_model




def test_smollm_completion_and_streamed_chat(smollm):
    prompt = "The capital of France is"
    ref = LLM(smollm, kv_cache_bytes=16 << 20).generate(prompt, SamplingParams(max_tokens=8))[0]
    engine = LLMEngine(smollm, kv_cache_bytes=16 << 20, exit="softmax", exit_threshold=0.9)

    async def run():
        app = create_app(engine, model_name="smollm2-135m")
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
            # no exit layer at or past exit_min_layer = L: full depth, equal to offline generate
            r = await c.post("/v1/completions", json={"model": "smollm2-135m", "prompt": prompt, "max_tokens": 8,
                                                      "temperature": 0, "exit_min_layer": 30,
                                                      "return_exit_layers": True})
            assert r.status_code == 200, r.text
            choice = r.json()["choices"][0]
            assert choice["text"] == ref.text and choice["exit_layers"] == [30] * 8
            r = await c.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8, "temperature": 0,
                "stream": True, "return_exit_layers": True})
            events = [json.loads(line[6:]) for line in r.text.splitlines()
                      if line.startswith("data: ") and line != "data: [DONE]"]
            assert r.text.rstrip().endswith("data: [DONE]")
            layers = [x for e in events for x in e["choices"][0].get("exit_layers", [])]
            text = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
            assert text.strip() and len(layers) <= 8 and all(1 <= x <= 30 for x in layers)
            await app.state.server.llm.stop()

    asyncio.run(run())
    assert engine.num_free_blocks == engine.cache.num_blocks
