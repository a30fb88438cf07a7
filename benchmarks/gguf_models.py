"""A GGUF model at its low-bit default (models/gguf.py) against its float32 self: load time, teacher-forced
top-1 agreement and perplexity on a seeded sample of code, and greedy tokens on a few prompts.

    python benchmarks/gguf_models.py --model qwen2.5-coder-0.5b --dtypes float32,auto,auto:bfloat16 \
        --out benchmarks/results/gguf_models/gguf_qwen2.5-coder-0.5b.json

The float32 model is the GGUF de-quantised by transformers (``--dtype float32``): the reference every
low-bit layout is measured against. Each system is loaded, measured and dropped in turn (one in memory).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import code_sample  # noqa: E402
from exitwise.cli.model_args import add_model_args  # noqa: E402

PROMPTS = ["def fibonacci(n):", "import numpy as np\n\ndef normalize(x):", "class Stack:\n    def __init__(self):",
           "def read_json(path):", "# sort a list of dicts by key\ndef sort_by(items, key):",
           "def is_prime(n: int) -> bool:", "async def fetch(session, url):", "def merge_sorted(a, b):"]


WIDE = ("Q5_0", "Q5_1", "Q6_K", "Q8_0")  # the block types with a choice of layout (int8 or bfloat16)


def load(model: str, system: str, device: str):
    """``system``: a dtype, or "auto:bfloat16" (auto with the 5-8 bit block types in bfloat16, not int8)."""
    from exitwise import load_model
    from exitwise.models import gguf

    dtype, _, wide = system.partition(":")
    saved = dict(gguf.LAYOUTS)
    gguf.LAYOUTS.update(dict.fromkeys(WIDE, wide) if wide else {})
    try:
        return load_model(model, device=device, dtype=dtype)
    finally:
        gguf.LAYOUTS.update(saved)


def measure(model: str, dtype: str, data: Path, tokens: int, seed: int, window: int, max_tokens: int,
            device: str) -> dict:
    from exitwise.analysis.perplexity import perplexity
    from exitwise.engine import LLM, SamplingParams
    from exitwise.models.quantize import QuantizedLinear, int_kernels_only

    t = time.perf_counter()
    bb = load(model, dtype, device)
    load_s = time.perf_counter() - t
    weight_mb = sum(b.numel() * b.element_size() for m in bb.model.modules() if isinstance(m, QuantizedLinear)
                    for b in (m.weight, m.scale) if b is not None) / 2**20
    llm = LLM(bb)
    ids = code_sample(bb.tokenizer, data, tokens, seed)
    with int_kernels_only():  # batch-1 decode's arithmetic at every row (no bfloat16 copy for the windows)
        ppl = perplexity(llm, ids, window=window, keep_predictions=True)
    t = time.perf_counter()
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=max_tokens, temperature=0.0))
    gen_s = time.perf_counter() - t
    t = time.perf_counter()  # batch 1: one prompt alone, prefill included
    one = llm.generate(PROMPTS[0], SamplingParams(max_tokens=64, temperature=0.0))[0]
    b1_tok_s = len(one.token_ids) / (time.perf_counter() - t)
    return {"dtype": dtype, "weight_dtype": bb.weight_dtype, "load_s": load_s, "perplexity": ppl.perplexity,
            "tokens": ppl.tokens, "predictions": ppl.predictions, "greedy": [o.token_ids for o in outs],
            "generate_s": gen_s, "b1_tokens_per_s": b1_tok_s, "linear_weights_mb": weight_mb}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(ap, required=True, dtype=None)  # the dtypes compared: --dtypes
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/code/test.txt")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--dtypes", default="float32,auto",
                    help="systems, the reference first: dtypes, or auto:bfloat16 (5-8 bit blocks in bfloat16)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    runs = {}
    for dtype in args.dtypes.split(","):
        runs[dtype] = measure(args.model, dtype, args.data, args.tokens, args.seed, args.window, args.max_tokens,
                              args.device)
        gc.collect()
        print(dtype, {k: v for k, v in runs[dtype].items() if k not in ("predictions", "greedy")}, flush=True)
    ref = runs[args.dtypes.split(",")[0]]
    report = {"model": args.model, "data": str(args.data), "tokens": args.tokens, "seed": args.seed,
              "window": args.window, "systems": {}}
    for dtype, run in runs.items():
        pairs = zip(run["predictions"], ref["predictions"], strict=True)
        agree = sum(a == b for a, b in pairs) / len(ref["predictions"])
        same = sum(a == b for a, b in zip(run["greedy"], ref["greedy"], strict=True))
        report["systems"][dtype] = {
            "weight_dtype": run["weight_dtype"], "load_s": round(run["load_s"], 1),
            "perplexity": round(run["perplexity"], 4),
            "perplexity_vs_reference": round(run["perplexity"] / ref["perplexity"] - 1, 5),
            "top1_agreement": round(agree, 4), "greedy_prompts_identical": f"{same}/{len(PROMPTS)}",
            "generate_8x_s": round(run["generate_s"], 1), "b1_tokens_per_s": round(run["b1_tokens_per_s"], 2),
            "linear_weights_mb": round(run["linear_weights_mb"])}
    print(json.dumps(report, indent=1))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
