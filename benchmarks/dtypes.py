"""Engine weight dtypes side by side: float32 vs bfloat16 vs int8 weight-only, one process, interleaved.

For each dtype: decode throughput at batch 1 and with 8 concurrent requests (the same WikiText-test
prompts, greedy, fixed lengths), greedy-token agreement with float32 position by position, and
top-1 agreement with float32 given float32's own prefix (teacher forced on float32's continuation). Every
dtype runs ``--repeats`` times interleaved and keeps its fastest run (the machine is shared). Writes
JSON and prints a table.

    .venv/bin/python benchmarks/dtypes.py --out benchmarks/results/dtypes.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, test_prompts  # noqa: E402

DTYPES = ("float32", "bfloat16", "int8")


def run(llm, prompts: list[list[int]], batch: int, max_tokens: int) -> tuple[float, list[list[int]]]:
    from exitwise.engine import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    outs, tokens, t0 = [], 0, time.perf_counter()
    for s in range(0, len(prompts), batch):
        res = llm.generate(prompts[s:s + batch], params)
        outs += [r.token_ids for r in res]
        tokens += sum(len(r.token_ids) for r in res)
    return tokens / (time.perf_counter() - t0), outs


def teacher_forced_agreement(llm, prompts: list[list[int]], ref: list[list[int]]) -> float:
    """Top-1 agreement with float32 given float32's own prefix: for every position of every float32
    continuation, the next token this engine predicts after prompt + the float32 tokens before it.
    Unlike greedy agreement, one early divergence does not cost the rest of the sequence."""
    from exitwise.engine import SamplingParams

    contexts = [p + r[:k] for p, r in zip(prompts, ref, strict=True) for k in range(len(r))]
    want = [t for r in ref for t in r]
    got = [o.token_ids[0] for o in llm.generate(contexts, SamplingParams(max_tokens=1, ignore_eos=True))]
    return sum(a == b for a, b in zip(got, want, strict=True)) / len(want)


def agreement(outs: list[list[int]], ref: list[list[int]]) -> float:
    same = sum(a == b for o, r in zip(outs, ref, strict=True) for a, b in zip(o, r, strict=True))
    return same / sum(len(r) for r in ref)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "dtypes.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from exitwise import load_model
    from exitwise.engine import LLM
    from exitwise.engine.config import EngineConfig

    bb = load_model(args.model)
    prompts = test_prompts(bb.tokenizer, args.prompts, args.prompt_len)
    llms = {d: LLM(bb, EngineConfig(kv_cache_bytes=128 << 20, max_num_seqs=8, weight_dtype=d)) for d in DTYPES}
    for llm in llms.values():  # warm-up
        run(llm, prompts[:2], 2, 4)
    best: dict[str, dict] = {d: {"b1": 0.0, "b8": 0.0} for d in DTYPES}
    outputs: dict[str, list[list[int]]] = {}
    for _ in range(args.repeats):
        for d in DTYPES:
            for key, batch in (("b1", 1), ("b8", 8)):
                tps, outs = run(llms[d], prompts, batch, args.max_tokens)
                best[d][key] = max(best[d][key], tps)
                if key == "b1":
                    outputs[d] = outs
    result = {"model": bb.name, "prompts": args.prompts, "prompt_len": args.prompt_len, "max_tokens": args.max_tokens,
              "threads": args.threads, "repeats": args.repeats,
              "dtypes": {d: {"tokens_per_s_b1": round(best[d]["b1"], 2), "tokens_per_s_b8": round(best[d]["b8"], 2),
                             "x_float32_b1": round(best[d]["b1"] / best["float32"]["b1"], 3),
                             "x_float32_b8": round(best[d]["b8"] / best["float32"]["b8"], 3),
                             "greedy_agreement": round(agreement(outputs[d], outputs["float32"]), 4),
                             "teacher_forced_top1_agreement": round(
                                 teacher_forced_agreement(llms[d], prompts, outputs["float32"]), 4)}
                         for d in DTYPES}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print("| weights | tok/s b1 | x fp32 | tok/s 8 concurrent | x fp32 | greedy agreement | top-1, fp32 prefix |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for d, r in result["dtypes"].items():
        print(f"| {d} | {r['tokens_per_s_b1']:.1f} | {r['x_float32_b1']:.2f} | {r['tokens_per_s_b8']:.1f} | "
              f"{r['x_float32_b8']:.2f} | {r['greedy_agreement']:.1%} | {r['teacher_forced_top1_agreement']:.1%} |")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
