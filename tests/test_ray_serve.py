"""``exitwise serve --replicas`` (server/replicas.py) on a local Ray on loopback: two replicas of a tiny
random Llama (saved to disk, so each replica loads it itself) serve concurrent greedy requests exactly
as offline generation does; a replica killed mid-load fails only its own in-flight requests (5xx or a
broken stream, never a hang), Serve brings it back, and the other keeps serving throughout."""

import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest

ray = pytest.importorskip("ray", reason="needs ray (pip install 'exitwise[ray]')")
httpx = pytest.importorskip("httpx")

from exitwise import load_model  # noqa: E402
from exitwise.engine import LLM, SamplingParams  # noqa: E402
from exitwise.engine.config import EngineConfig  # noqa: E402
from exitwise.models.spec import ModelSpec  # noqa: E402
from exitwise.server import replicas  # noqa: E402
from server_helpers import sse, tiny_backbone  # noqa: E402

CONFIG = EngineConfig(num_kv_blocks=64, block_size=16, max_num_seqs=8)
PROMPTS = [[5, 6, 7, 8, 9], [1, 2, 3], list(range(10, 40)), [42] * 9, [7, 3, 88, 21, 60, 2, 19], [100, 200, 300]]
TIMEOUT = 60  # seconds a client waits: a request outliving it has hung


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tok):
    """The tiny model on disk: what a replica loads in its own process."""
    path = tmp_path_factory.mktemp("tiny-llama")
    bb = tiny_backbone(tok)
    bb.model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def offline(model_dir):
    """Greedy tokens of a prompt generated offline in this process from the same files (one thread)."""
    llm = LLM(load_model(model_dir), CONFIG)
    cache: dict[tuple, list[int]] = {}

    def tokens(prompt: list[int], n: int) -> list[int]:
        key = (tuple(prompt), n)
        if key not in cache:
            cache[key] = llm.generate([prompt], SamplingParams(max_tokens=n, ignore_eos=True))[0].token_ids
        return cache[key]

    return tokens


@pytest.fixture(scope="module")
def url(model_dir):
    """Two replicas behind Serve's proxy on a free loopback port; Serve and Ray stop at the end."""
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=temp,
             _node_ip_address="127.0.0.1")
    port = _free_port()
    try:
        config = replace(CONFIG, model=ModelSpec(model_dir, dtype="float32"))
        replicas.start(replicas.ReplicaSpec(config, served_name="tiny"),
                       replicas.Placement(2, cpus=1), host="127.0.0.1", port=port, wait_s=180)
        yield f"http://127.0.0.1:{port}"
    finally:
        replicas.stop()
        shutil.rmtree(temp, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _complete(client, prompt: list[int], n: int, stream: bool = False) -> list[int]:
    """The completion's token ids (raises on an error status or a broken stream)."""
    body = {"model": "tiny", "prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True, "stream": stream}
    if not stream:
        resp = client.post("/v1/completions", json=body)
        resp.raise_for_status()
        return resp.json()["choices"][0]["token_ids"]
    with client.stream("POST", "/v1/completions", json=body) as resp:
        resp.raise_for_status()
        events = sse(resp.iter_lines())
    assert events[-1] == "[DONE]" and all("error" not in e for e in events[:-1]), events
    return [t for e in events[:-1] for t in e["choices"][0]["token_ids"] or []]


def test_two_replicas_serve_concurrent_greedy_requests_as_offline_generation(url, offline):
    assert len(replicas.replica_pids()) == 2
    jobs = [(p, 24, i % 3 == 0) for i, p in enumerate(PROMPTS * 2)]  # 12 at once, a third streamed
    with httpx.Client(base_url=url, timeout=TIMEOUT) as client, ThreadPoolExecutor(len(jobs)) as pool:
        assert client.get("/health").json()["status"] == "ok"
        got = list(pool.map(lambda job: _complete(client, *job), jobs))
        metrics = client.get("/metrics")
    assert got == [offline(p, n) for p, n, _ in jobs]
    assert metrics.status_code == 200 and "exitwise" in metrics.text


def test_a_killed_replica_fails_only_its_requests_and_comes_back(url, offline):
    victim, survivor = replicas.replica_pids()
    want = {tuple(p): offline(p, 48) for p in PROMPTS}  # here: the offline engine is not thread-safe
    stop, results = threading.Event(), []  # (finished at, ok, detail)

    def client_loop(k: int) -> None:
        with httpx.Client(base_url=url, timeout=TIMEOUT) as client:
            i = k
            while not stop.is_set():
                prompt, stream = PROMPTS[i % len(PROMPTS)], i % 2 == 1
                i += 1
                try:
                    ok = _complete(client, prompt, 48, stream) == want[tuple(prompt)]
                    results.append((time.monotonic(), ok, "tokens" if not ok else ""))
                except httpx.HTTPStatusError as exc:
                    results.append((time.monotonic(), False, exc.response.status_code))
                except (httpx.TransportError, AssertionError) as exc:  # a stream the dead replica broke
                    results.append((time.monotonic(), False, type(exc).__name__))

    threads = [threading.Thread(target=client_loop, args=(k,), daemon=True) for k in range(4)]
    for t in threads:
        t.start()
    try:
        _wait(lambda: sum(ok for _, ok, _ in results) >= 4, 60, "no requests served before the kill")
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        # Serve notices, starts a new replica and routes to it once its health check passes
        _wait(lambda: _replaced(victim), 120, "the killed replica was not replaced")
        _wait(lambda: sum(ok for at, ok, _ in results if at > killed_at) >= 8, 60, "no requests after the kill")
    finally:
        stop.set()
        for t in threads:
            t.join(TIMEOUT + 10)
    assert not any(t.is_alive() for t in threads), "a request hung"
    failures = [detail for _, ok, detail in results if not ok]
    assert "tokens" not in failures  # a request that completed is the offline output, killed replica or not
    # what the dead replica's in-flight requests got: a server error status, or a stream cut short
    assert all(d in ("RemoteProtocolError", "ReadError", "AssertionError") or (isinstance(d, int) and d >= 500)
               for d in failures), failures
    assert len(failures) <= 8, failures  # its in-flight requests (4 clients), not everything after it
    os.kill(survivor, 0)  # raises if the other replica's process died: it kept serving throughout
    # Serve's running count can lag a moment behind a replacement, so ask until both answer
    _wait(lambda: survivor in replicas.replica_pids(), 60, "the surviving replica stopped answering")


def _replaced(victim: int) -> bool:
    pids = replicas.replica_pids()
    return victim not in pids and len(pids) == 2


def _wait(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)
