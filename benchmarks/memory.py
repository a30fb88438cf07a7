"""Resident memory of a model loaded and handed to the engine, per model and weight dtype.

Each (model, dtype) runs in a fresh process: ``load_model``, then ``LLM`` with a 16 MB KV pool (so the
pool does not hide the weights), then a 4-token greedy generation. Reported per case: RSS after
loading, after building the engine (and of it, the anonymous memory and the pages of mapped files:
a float32 model's weights are read from its memory-mapped safetensors, whose pages stay resident while
the file is mapped, although the kernel may drop them under pressure), the process's peak (VmHWM), and
the bytes of the distinct
storages behind the HF model's parameters and buffers together with every tensor the engine's layers
hold, derived copies (oneDNN packing, bfloat16 batch copies) included: a weight held twice counts twice.

    .venv/bin/python benchmarks/memory.py --models smollm2-135m,gemma3-270m \
        --dtypes float32,bfloat16,int8,auto --out benchmarks/results/memory/memory.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import gc, json, sys, torch
torch.set_num_threads(1)
from exitwise import load_model
from exitwise.engine import LLM, SamplingParams

def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # MB
    raise RuntimeError(field)

def storages(tensors):
    seen = {}
    for t in tensors:
        if t is None or t.device.type == "meta":
            continue
        try:
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
        except NotImplementedError:  # oneDNN's packed weights are opaque: their own bytes
            seen[id(t)] = t.numel() * t.element_size()
    return sum(seen.values()) / 2**20

name, dtype = sys.argv[1], sys.argv[2]
base = rss("VmRSS")
bb = load_model(name, dtype=dtype)
gc.collect()
loaded = rss("VmRSS")
llm = LLM(bb, kv_cache_bytes=16 << 20)
gc.collect()
built = rss("VmRSS")
anon, file = rss("RssAnon"), rss("RssFile")
dec = llm.engine.runner.model
hf = list(bb.model.parameters()) + list(bb.model.buffers())
def held(v):  # every tensor a layer's weights hold: tensors, modules' buffers, tuples of either
    if isinstance(v, torch.Tensor):
        return [v]
    if isinstance(v, torch.nn.Module):
        return list(v.buffers()) + list(v.parameters())
    if isinstance(v, (tuple, list)):
        return [t for x in v for t in held(x)]
    return []

eng = [t for lw in dec.layers for v in vars(lw).values() for t in held(v)] + held(dec.output.lowp)
out = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4, ignore_eos=True))[0].token_ids
print(json.dumps({"model": name, "dtype": dtype, "weight_dtype": bb.weight_dtype,
                  "rss_import_mb": round(base), "rss_loaded_mb": round(loaded), "rss_engine_mb": round(built),
                  "rss_engine_anon_mb": round(anon), "rss_engine_file_mb": round(file),
                  "peak_mb": round(rss("VmHWM")), "weight_storages_mb": round(storages(hf + eng)),
                  "tokens": len(out)}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m")
    ap.add_argument("--dtypes", default="float32,bfloat16,int8,auto")
    ap.add_argument("--label", default="", help="a name for this tree's figures in the JSON (e.g. before / after)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    rows = []
    for model in args.models.split(","):
        for dtype in args.dtypes.split(","):
            run = subprocess.run([sys.executable, "-c", CHILD, model, dtype], capture_output=True, text=True)
            if run.returncode != 0:
                raise SystemExit(f"{model} {dtype}: the child failed:\n{run.stderr[-2000:]}")
            rows.append(json.loads(run.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    print(f"\n{'model':16} {'dtype':9} {'weights':>8} {'loaded':>8} {'engine':>8} {'anon':>8} {'file':>8} {'peak':>8} "
          f"{'storages':>9}  (MB)")
    for r in rows:
        print(f"{r['model']:16} {r['dtype']:9} {r['weight_dtype']:>8} {r['rss_loaded_mb']:>8} {r['rss_engine_mb']:>8} "
              f"{r['rss_engine_anon_mb']:>8} {r['rss_engine_file_mb']:>8} {r['peak_mb']:>8} "
              f"{r['weight_storages_mb']:>9}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        report = json.loads(args.out.read_text()) if args.out.exists() else {}
        report[args.label or "figures"] = rows
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
