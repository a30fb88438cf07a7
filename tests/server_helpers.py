"""Shared pieces of the server robustness and SDK tests: a tiny Llama with SmolLM2's tokenizer, uvicorn
on loopback, SSE parsing, and a step that fails whenever a marked request is in the batch."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time

import pytest

from exitwise.engine import LLM, LLMEngine, SamplingParams
from exitwise.errors import ModelNotFoundError
from exitwise.models.backbone import Backbone
from tiny_models import smollm2_tokenizer, tiny_llama

CONTEXT = 256


def load_tokenizer():
    try:
        return smollm2_tokenizer()
    except ModelNotFoundError as exc:
        pytest.skip(f"SmolLM2 tokenizer unavailable: {exc}")


def tiny_backbone(tok) -> Backbone:
    return tiny_llama(4, tokenizer=tok, name="tiny", max_position_embeddings=CONTEXT)


@contextlib.contextmanager
def live(app):
    """uvicorn on 127.0.0.1 with a free port, in a background thread; stops on exit."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="critical", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


# Fixtures shared by the server test modules (this module is a pytest plugin, see conftest.py); a
# module that defines its own ``tok`` / ``bb`` fixture keeps it.
@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def bb(tok):
    return tiny_backbone(tok)


@pytest.fixture(scope="module")
def server(bb):
    """A live loopback server over a tiny engine: (httpx client, engine)."""
    import httpx

    from exitwise.server.app import create_app

    engine = LLMEngine(bb, num_kv_blocks=64, block_size=16, max_num_seqs=8)
    with live(create_app(engine)) as url, httpx.Client(base_url=url, timeout=30) as client:
        yield client, engine


def wait_idle(engine: LLMEngine, timeout: float = 10.0) -> None:
    """Aborts are applied by the engine loop between steps: give it a moment."""
    deadline = time.monotonic() + timeout
    while engine.has_unfinished() or engine.num_free_blocks != engine.cache.num_blocks:
        assert time.monotonic() < deadline, f"engine not idle: {engine.num_free_blocks} free blocks"
        time.sleep(0.02)


def sse(text_lines) -> list[dict | str]:
    out = []
    for line in text_lines:
        if line.startswith("data: "):
            body = line[len("data: "):]
            out.append(body if body == "[DONE]" else json.loads(body))
    return out


def solo(bb: Backbone, ids: list[int], n: int) -> list[int]:
    """Greedy tokens of ``ids`` generated alone (the reference a batched request must reproduce)."""
    return LLM(bb, num_kv_blocks=32).generate([ids], SamplingParams(max_tokens=n, ignore_eos=True))[0].token_ids


def poison_runner(engine: LLMEngine, marker: int, after: int = 0) -> None:
    """Make every step raise while a sequence whose *last prompt token* is ``marker`` is in the batch
    and has ``after`` or more completion tokens (0: its prefill already fails)."""
    runner = engine.runner

    def poisoned(fn):
        def wrapper(seqs, *args, **kwargs):
            for s in seqs:
                if s.token_ids[s.num_prompt_tokens - 1] == marker and s.num_completion_tokens >= after:
                    raise RuntimeError(f"poisoned step ({s.request_id})")
            return fn(seqs, *args, **kwargs)

        return wrapper

    runner.prefill = poisoned(runner.prefill)
    runner.decode = poisoned(runner.decode)
