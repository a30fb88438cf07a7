"""GGUF's k-quant super-blocks on the kernel's super-block path (models/kquants.py) against the layouts the
same matrices had before: Q4_K in the int4 group layout (float32 scale and zero per 32 columns, the same
weights), Q6_K re-quantised to int8 per output row. Real matrices of a GGUF (default: Qwen2.5-Coder-1.5B,
``make models``): ffn_gate (Q4_K), ffn_down (Q6_K) and the output head (Q6_K).

Per row count 1, 2, 5, 9 (a decode step, two sequences, verification passes), the µs of one matmul,
walking over several matrices of the shape so that they are not cache-resident; the two layouts are
interleaved and the fastest of ``--repeats`` rounds is reported. Also the bytes each layout reads per
weight, and each layout's relative error against the float64 product with the file's weights.

    .venv/bin/python benchmarks/kquants.py --out benchmarks/results/kquants/kquants.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT  # noqa: E402
from exitwise.models import gguf, kernels  # noqa: E402
from exitwise.models.loading import gguf_source  # noqa: E402

ROWS = (1, 2, 5, 9)
# (label, tensor-name pattern, how many matrices to walk over, the k-quant layout, the layout before)
SHAPES = (("ffn_gate", "blk.{}.ffn_gate.weight", 6, "q4k", "int4"),
          ("ffn_down", "blk.{}.ffn_down.weight", 6, "q6k", "int8"),
          ("head", "output.weight", 1, "q6k", "int8"))


def _bits(lin) -> float:
    """Bytes read per weight by the kernel, in bits: the weight and the scales it reads."""
    n = lin.weight.numel() * lin.weight.element_size() + lin.kernel_scale.numel() * lin.kernel_scale.element_size()
    return 8 * n / (lin.out_features * lin.in_features)


def _matrices(tensors: dict, pattern: str, count: int, kind: str, path: Path) -> list:
    names = [pattern.format(i) for i in range(64) if pattern.format(i) in tensors] if "{}" in pattern else [pattern]
    names = [n for n in names if tensors[n].type == gguf.kquants.BLOCKS[kind].gguf][:count]
    if not names:
        raise SystemExit(f"{path}: no {gguf.kquants.BLOCKS[kind].gguf} tensor named like {pattern}")
    return names


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-1.5b", help="a bundled GGUF name or a .gguf path")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/kquants/kquants.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if not kernels.ready():
        raise SystemExit("the exitwise CPU kernel does not run here (no AVX2 + FMA, or no compiler)")
    path = gguf_source(args.model)
    if path is None:
        raise SystemExit(f"{args.model}: not a GGUF model (a bundled GGUF name or a .gguf path)")
    tensors = gguf._tensors(gguf.Reader(path))
    rows_out = []
    for label, pattern, count, kind, before in SHAPES:
        names = _matrices(tensors, pattern, count, kind, path)
        new = [gguf.to_linear(tensors[n], kind, None, path) for n in names]
        old = [gguf.to_linear(tensors[n], before, None, path) for n in names]
        k = new[0].in_features
        x = torch.randn(9, k, generator=torch.Generator().manual_seed(0))
        exact = x[:4].double() @ new[0].dequantize().double().t()
        errors = {name: float((lins[0](x[:4]).double() - exact).norm() / exact.norm())
                  for name, lins in (("kquant", new), ("before", old))}
        for m in ROWS:
            xm = x[:m].contiguous()
            best = {"kquant": float("inf"), "before": float("inf")}
            for _ in range(args.repeats):
                for name, lins in (("kquant", new), ("before", old)):
                    t = time.perf_counter()
                    for lin in lins:
                        lin(xm)
                    best[name] = min(best[name], (time.perf_counter() - t) / len(lins) * 1e6)
            rows_out.append({"matrix": label, "shape": f"{new[0].out_features}x{k}", "gguf": tensors[names[0]].type,
                             "kquant": kind, "before": before, "rows": m, "kquant_us": round(best["kquant"], 1),
                             "before_us": round(best["before"], 1),
                             "speedup": round(best["before"] / best["kquant"], 3),
                             "kquant_bits": round(_bits(new[0]), 3), "before_bits": round(_bits(old[0]), 3),
                             "kquant_rel_error": errors["kquant"], "before_rel_error": errors["before"]})
            r = rows_out[-1]
            print(f"{label:9s} {r['shape']:>12s} {r['gguf']} rows {m}: {kind} {r['kquant_us']:9.0f} us  {before} "
                  f"{r['before_us']:9.0f} us  {r['speedup']:.2f}x", flush=True)
    result = {"model": args.model, "gguf": path.name, "threads": 1, "repeats": args.repeats,
              "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
              "loadavg": list(os.getloadavg()), "matmuls": rows_out}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
