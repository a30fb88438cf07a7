"""Serving scale-out: 1 replica x 2 torch threads against 2 replicas x 1 thread (``serve --replicas``),
the same total threads, on a local Ray, one run.

16 concurrent clients send greedy completions of a fixed length (prompts: WikiText test paragraphs cut
to a fixed token length) to Serve's proxy on loopback. Rounds alternate the configurations (ABBA...)
so that load from other processes on a shared machine falls on both; each configuration keeps its
best round. Reports completion tokens/s, p50/p99 request latency, and the 2-replica / 1-replica ratio.

    PYTHONPATH=src python benchmarks/serve_scale.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, add_engine_flags, engine_config, test_prompts  # noqa: E402

CONFIGS = {"1x2": (1, 2), "2x1": (2, 1)}  # name: (replicas, torch threads each)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def load(url: str, model: str, prompts: list[list[int]], per_client: int, max_tokens: int) -> dict:
    """Every prompt is one client sending ``per_client`` requests back to back; all clients at once."""
    import httpx

    body = {"model": model, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}

    def client(prompt: list[int]) -> list[tuple[float, int]]:
        out = []
        with httpx.Client(base_url=url, timeout=600) as c:
            for _ in range(per_client):
                t = time.perf_counter()
                resp = c.post("/v1/completions", json={**body, "prompt": prompt})
                resp.raise_for_status()
                out.append((time.perf_counter() - t, resp.json()["usage"]["completion_tokens"]))
        return out

    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(prompts)) as pool:
        done = [r for rs in pool.map(client, prompts) for r in rs]
    wall = time.perf_counter() - t0
    lat = [d for d, _ in done]
    tokens = sum(n for _, n in done)
    return {"requests": len(done), "tokens": tokens, "wall_s": round(wall, 2), "tokens_per_s": round(tokens / wall, 2),
            "p50_s": round(percentile(lat, 0.5), 3), "p99_s": round(percentile(lat, 0.99), 3)}


def one_round(name: str, args, prompts, port: int) -> dict:
    from ray import serve

    from exitwise.server import replicas

    n, threads = CONFIGS[name]
    spec = replicas.ReplicaSpec(engine_config(args), threads=threads)
    replicas.start(spec, replicas.Placement(n, cpus=threads), port=port)
    try:
        load(f"http://127.0.0.1:{port}", args.model, prompts[:2], 1, 4)  # warm-up: first steps allocate
        return load(f"http://127.0.0.1:{port}", args.model, prompts, args.per_client, args.max_tokens)
    finally:
        serve.delete(replicas.APP_NAME)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 rounds each, 32-token completions (a few minutes)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds per configuration (default 4, quick 2)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--per-client", type=int, default=None, help="requests each client sends (default 3, quick 2)")
    ap.add_argument("--max-tokens", type=int, default=None, help="completion length (default 64, quick 32)")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve_scale" / "serve_scale.json"))
    add_engine_flags(ap, dtype="float32", max_num_seqs=None)  # the published figures: float32, a slot per client
    args = ap.parse_args(argv)
    args.max_num_seqs = args.max_num_seqs or args.clients
    args.rounds = args.rounds or (2 if args.quick else 4)
    args.per_client = args.per_client or (2 if args.quick else 3)
    args.max_tokens = args.max_tokens or (32 if args.quick else 64)

    import ray
    from transformers import AutoTokenizer

    from exitwise.models.loading import resolve
    from exitwise.server import replicas

    prompts = test_prompts(AutoTokenizer.from_pretrained(resolve(args.model)[1]), args.clients, args.prompt_len)
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=temp,
             _node_ip_address="127.0.0.1")
    port, runs = free_port(), {name: [] for name in CONFIGS}
    try:
        for r in range(args.rounds):
            order = list(CONFIGS) if r % 2 == 0 else list(reversed(CONFIGS))
            for name in order:
                runs[name].append(one_round(name, args, prompts, port))
                print(f"round {r} {name}: {runs[name][-1]}", flush=True)
    finally:
        replicas.stop()
        shutil.rmtree(temp, ignore_errors=True)
    best = {name: max(rs, key=lambda x: x["tokens_per_s"]) for name, rs in runs.items()}
    ratio = best["2x1"]["tokens_per_s"] / best["1x2"]["tokens_per_s"]
    result = {"config": {k: v for k, v in vars(args).items() if k != "out"}, "cpus": os.cpu_count(),
              "platform": platform.platform(), "load_avg_at_end": os.getloadavg(), "runs": runs, "best": best,
              "throughput_ratio_2x1_over_1x2": round(ratio, 3)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"\n{'config':<22} {'tokens/s':>9} {'p50 s':>7} {'p99 s':>7}")
    for name, (n, t) in CONFIGS.items():
        b = best[name]
        print(f"{f'{n} replica(s) x {t} thr':<22} {b['tokens_per_s']:>9.1f} {b['p50_s']:>7.2f} {b['p99_s']:>7.2f}")
    print(f"2 replicas / 1 replica throughput: {ratio:.2f}x (target >= 1.6x)\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
