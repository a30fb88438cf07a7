"""GGUF blocks kept as the file has them against the layouts the same matrices had before: k-quant
super-blocks on the kernel's super-block path (models/kquants.py) against Q4_K in the int4 group layout
(float32 scale and zero per 32 columns, the same weights) and Q6_K re-quantised to int8 per output row;
Q5_0's 5-bit levels (models/q5.py) against int8 with a float32 scale per 32 columns (the same weights).
Real matrices of a GGUF (``make models``), those of its block types: Qwen2.5-Coder-1.5B (the default)
has ffn_gate (Q4_K), ffn_down (Q6_K) and the output head (Q6_K); Qwen2.5-Coder-0.5B has ffn_up and
attn_q (Q5_0), ffn_down (Q4_K, Q6_K).

Per row count 1, 2, 5, 9 (a decode step, two sequences, verification passes), the µs of one matmul,
walking over several matrices of the shape so that they are not cache-resident; the two layouts are
interleaved and the fastest of ``--repeats`` rounds is reported. Also the bytes each layout reads per
weight, and each layout's relative error against the float64 product with the file's weights.

    .venv/bin/python benchmarks/kquants.py --out benchmarks/results/kquants/kquants.json
    .venv/bin/python benchmarks/kquants.py --model qwen2.5-coder-0.5b --decode Q5_0 \
        --out benchmarks/results/kquants/kquants-qwen2.5-coder-0.5b.json

``--decode TYPE [TYPE ...]`` also loads the whole model twice, as it loads (every kept type kept) and with
the named GGUF types in their layouts before, and times batch-1 greedy decoding of the same code prompt
on both, interleaved (ms a token past the first, prefill taken out; fastest and median of ``--repeats``),
checking that both write the same tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATA, ROOT, code_sample  # noqa: E402
from exitwise.models import gguf, kernels  # noqa: E402
from exitwise.models.loading import gguf_source  # noqa: E402

ROWS = (1, 2, 5, 9)
# (label, tensor-name pattern, how many matrices to walk over, GGUF type, the kept layout, the layout
# before); a model runs those whose type it has
SHAPES = (("ffn_gate", "blk.{}.ffn_gate.weight", 6, "Q4_K", "q4k", "int4"),
          ("ffn_down", "blk.{}.ffn_down.weight", 6, "Q4_K", "q4k", "int4"),
          ("ffn_down", "blk.{}.ffn_down.weight", 6, "Q6_K", "q6k", "int8"),
          ("head", "output.weight", 1, "Q6_K", "q6k", "int8"),
          ("ffn_up", "blk.{}.ffn_up.weight", 6, "Q5_0", "q5", "int8g"),
          ("attn_q", "blk.{}.attn_q.weight", 6, "Q5_0", "q5", "int8g"))


def _bits(lin) -> float:
    """Bytes read per weight by the kernel, in bits: the weight and the scales it reads."""
    n = lin.weight.numel() * lin.weight.element_size() + lin.kernel_scale.numel() * lin.kernel_scale.element_size()
    return 8 * n / (lin.out_features * lin.in_features)


def _matrices(tensors: dict, pattern: str, count: int, gguf_type: str) -> list:
    """Up to ``count`` tensors named like ``pattern`` kept in ``gguf_type`` (none: the model has none)."""
    names = [pattern.format(i) for i in range(64) if pattern.format(i) in tensors] if "{}" in pattern else [pattern]
    return [n for n in names if n in tensors and tensors[n].type == gguf_type][:count]


# the layout each kept GGUF type had before it was kept: gguf._KEPT's entry, or None (the plain LAYOUTS)
BEFORE_KEPT = {"Q5_0": "int8g", "Q4_K": None, "Q6_K": None}


def _load(model: str, before: list[str]):
    """The model at ``dtype="auto"`` with the GGUF types in ``before`` in their earlier layouts."""
    from exitwise import load_model

    saved = dict(gguf._KEPT)
    for kind in before:
        if BEFORE_KEPT[kind] is None:
            gguf._KEPT.pop(kind, None)
        else:
            gguf._KEPT[kind] = BEFORE_KEPT[kind]
    try:
        return load_model(model, dtype="auto")
    finally:
        gguf._KEPT.clear()
        gguf._KEPT.update(saved)


def decode(model: str, before: list[str], repeats: int, tokens: int = 48) -> dict:
    """Batch-1 greedy decode, ms a token, of the model as it loads against ``before`` types' old layouts."""
    from exitwise.engine import LLM, SamplingParams

    bbs = {"kept": _load(model, []), "before": _load(model, before)}
    prompt = code_sample(bbs["kept"].tokenizer, DATA / "code" / "test.txt", 200, seed=0)
    llms = {name: LLM(bb) for name, bb in bbs.items()}
    one, params = SamplingParams(max_tokens=1), SamplingParams(max_tokens=tokens, ignore_eos=True)
    ms, out = {name: [] for name in llms}, {}
    for r in range(repeats):
        for name in list(llms)[::1 if r % 2 == 0 else -1]:
            llms[name].generate([prompt], one)  # warm
            t = time.perf_counter()
            out[name] = llms[name].generate([prompt], params)[0].token_ids
            total = time.perf_counter() - t
            t = time.perf_counter()
            llms[name].generate([prompt], one)
            ms[name].append((total - (time.perf_counter() - t)) / (tokens - 1) * 1e3)
    res = {"before_types": before, "prompt_tokens": len(prompt), "new_tokens": tokens,
           "same_tokens": out["kept"] == out["before"]}
    for name, v in ms.items():
        res[f"{name}_ms"] = {"fastest": round(min(v), 2), "median": round(statistics.median(v), 2)}
    res["speedup"] = {k: round(res["before_ms"][k] / res["kept_ms"][k], 3) for k in ("fastest", "median")}
    print(f"decode, ms a token (fastest / median): kept {res['kept_ms']['fastest']} / {res['kept_ms']['median']}, "
          f"{'+'.join(before)} before {res['before_ms']['fastest']} / {res['before_ms']['median']}: "
          f"{res['speedup']['fastest']:.2f}x / {res['speedup']['median']:.2f}x, same tokens {res['same_tokens']}")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-1.5b", help="a bundled GGUF name or a .gguf path")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/kquants/kquants.json")
    ap.add_argument("--decode", nargs="+", choices=sorted(BEFORE_KEPT), default=None, metavar="TYPE",
                    help="also time batch-1 decoding against these GGUF types in their earlier layouts")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if not kernels.ready():
        raise SystemExit("the exitwise CPU kernel does not run here (no AVX2 + FMA, or no compiler)")
    path = gguf_source(args.model)
    if path is None:
        raise SystemExit(f"{args.model}: not a GGUF model (a bundled GGUF name or a .gguf path)")
    tensors = gguf._tensors(gguf.Reader(path))
    rows_out = []
    for label, pattern, count, gguf_type, kind, before in SHAPES:
        names = _matrices(tensors, pattern, count, gguf_type)
        if not names:
            continue
        new = [gguf.to_linear(tensors[n], kind, None, path) for n in names]
        old = [gguf.to_linear(tensors[n], before, None, path) for n in names]
        k = new[0].in_features
        x = torch.randn(9, k, generator=torch.Generator().manual_seed(0))
        exact = x[:4].double() @ new[0].dequantize().double().t()
        errors = {name: float((lins[0](x[:4]).double() - exact).norm() / exact.norm())
                  for name, lins in (("kept", new), ("before", old))}
        for m in ROWS:
            xm = x[:m].contiguous()
            best = {"kept": float("inf"), "before": float("inf")}
            for _ in range(args.repeats):
                for name, lins in (("kept", new), ("before", old)):
                    t = time.perf_counter()
                    for lin in lins:
                        lin(xm)
                    best[name] = min(best[name], (time.perf_counter() - t) / len(lins) * 1e6)
            rows_out.append({"matrix": label, "shape": f"{new[0].out_features}x{k}", "gguf": tensors[names[0]].type,
                             "kept": kind, "before": before, "rows": m, "kept_us": round(best["kept"], 1),
                             "before_us": round(best["before"], 1),
                             "speedup": round(best["before"] / best["kept"], 3),
                             "kept_bits": round(_bits(new[0]), 3), "before_bits": round(_bits(old[0]), 3),
                             "kept_rel_error": errors["kept"], "before_rel_error": errors["before"]})
            r = rows_out[-1]
            print(f"{label:9s} {r['shape']:>12s} {r['gguf']} rows {m}: {kind} {r['kept_us']:9.0f} us  {before} "
                  f"{r['before_us']:9.0f} us  {r['speedup']:.2f}x", flush=True)
    result = {"model": args.model, "gguf": path.name, "threads": 1, "repeats": args.repeats,
              "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
              "loadavg": list(os.getloadavg()), "matmuls": rows_out}
    if args.decode:
        result["decode"] = decode(args.model, args.decode, args.repeats)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
