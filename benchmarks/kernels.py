"""exitwise's int4 / int8 CPU kernel (exitwise.models.kernels) against aten's, per row count, and its
effect on a whole SmolLM2-135M int4 decode step and verification pass.

Matmuls: per row count 1, 2, 4, 5, 8, 9, 16 (and 64 for prefill), the µs of one matmul with a
3072 x 576 and a 576 x 1536 int4 weight (SmolLM2's gate|up and down) and the 49152 x 576 int8 head:
``kernel`` (activations quantised to int8 per 32 columns, integer group products), ``aten``
(``_weight_int4pack_mm_for_cpu`` / ``_weight_int8pack_mm``,
bfloat16 activations), ``before`` (QuantizedLinear as it ran without the kernel: aten below BATCH_ROWS
rows, the bfloat16 copy from there) and ``f32`` (``F.linear`` on the float32 weight); where the CPU
has AVX512-BF16, also ``kernel_bf16`` (int4 on the kernel's bfloat16 path, ``EXITWISE_BF16_KERNEL=1``).
Each timing walks
over ``--mats`` different matrices of the shape (30: about a decode step's worth of weights, so they are
not all cache-resident; 2 for the head, which no cache holds); the methods are interleaved and the
median of ``--repeats`` rounds is reported (and the minimum: on a shared machine the least disturbed).

Model: the engine's ``ModelRunner.decode`` of one sequence and ``ModelRunner.verify`` of 5 and 9 rows
(the same 256-token context, ms per call), kernel on and off
(``exitwise.models.kernels.enabled``), and ``op_by_op`` (the kernel, each layer's kernels called one by
one from Python instead of in one ``LayerPlan`` call), interleaved in this one process; and the teacher-forced top-1
agreement of the int4 model's logits with the kernel and without it (aten's int kernels at every row,
``int_kernels_only``: the batch-1 decode arithmetic of each), and of each with the float32 model.

``--baseline FILE`` adds an earlier version of ``lowbit_cpu.cpp`` as the method ``baseline`` (matmuls,
model steps and top-1), built beside the current one under its own op namespace and interleaved with
it, to measure a kernel change in one process:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/kernels.py --out benchmarks/results/kernels/kernels.json
    git show REV:src/exitwise/models/kernels/lowbit_cpu.cpp > /tmp/before.cpp
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/kernels.py --baseline /tmp/before.cpp --out F.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATA, ROOT  # noqa: E402
from exitwise.models import kernels  # noqa: E402
from exitwise.models.llama import LlamaDecoder  # noqa: E402
from exitwise.models.quantize import QuantizedLinear, int_kernels_only  # noqa: E402

ROWS = (1, 2, 4, 5, 8, 9, 16, 64)
SHAPES = (("gate_up 3072x576", 3072, 576, "int4"), ("down 576x1536", 576, 1536, "int4"),
          ("head 49152x576", 49152, 576, "int8"))


_MODULES: dict = {}  # "current" / "baseline": the built extensions whose int4_mm / int8_mm the kernel path calls


def load_baseline(path: Path):
    """An earlier ``lowbit_cpu.cpp``, its op namespace renamed so it loads beside the current one."""
    from torch.utils.cpp_extension import load

    from exitwise.models.loading import cache_dir

    src = path.read_text()
    for macro in ("TORCH_LIBRARY(", "TORCH_LIBRARY_IMPL("):
        src = src.replace(f"{macro}exitwise_lowbit", f"{macro}exitwise_baseline")
    tag = hashlib.sha256(src.encode() + torch.__version__.encode()).hexdigest()[:12]
    build = cache_dir() / "kernels" / f"baseline_{tag}"
    build.mkdir(parents=True, exist_ok=True)
    copy = build / "lowbit_baseline.cpp"
    copy.write_text(src)
    return load(name=f"exitwise_baseline_{tag}", sources=[str(copy)], extra_cflags=kernels.cflags(),
                extra_ldflags=["-fopenmp"], build_directory=str(build), verbose=False)


def _use_module(name: str) -> None:
    """The AVX2 kernel path runs the current build or the baseline's."""
    kernels._built["module"] = _MODULES[name]


def _clock(fn, calls: int) -> float:
    """µs per call of ``fn(i)`` over ``calls`` calls (i = 0..calls-1)."""
    t = time.perf_counter()
    for i in range(calls):
        fn(i)
    return (time.perf_counter() - t) / calls * 1e6


def _methods(lins: list[QuantizedLinear], floats: list[torch.Tensor], x: torch.Tensor, dtype: str) -> dict:
    """The timed calls, each taking the index of the matrix to use."""
    xb, count = x.bfloat16(), len(lins)

    def new(i):
        kernels.enabled, kernels.bf16_enabled = True, False
        _use_module("current")
        return lins[i % count](x)

    def baseline(i):  # the AVX2 path of the --baseline source
        kernels.enabled, kernels.bf16_enabled = True, False
        _use_module("baseline")
        return lins[i % count](x)

    def bf16(i):  # int4 on the AVX512-BF16 path where this CPU and build have it
        kernels.enabled = kernels.bf16_enabled = True
        _use_module("current")
        return lins[i % count](x)

    def before(i):
        kernels.enabled = False
        return lins[i % count](x)

    def aten(i):
        lin = lins[i % count]
        if dtype == "int4":
            return torch.ops.aten._weight_int4pack_mm_for_cpu(xb, lin.packed, 32, lin.scale)
        return torch.ops.aten._weight_int8pack_mm(xb, lin.weight, lin.scale)

    def f32(i):
        return F.linear(x, floats[i % count])

    methods = {"kernel": new, "aten": aten, "before": before, "f32": f32}
    if dtype == "int4" and kernels.bf16_built():
        methods["kernel_bf16"] = bf16
    if "baseline" in _MODULES:
        methods["baseline"] = baseline
    return methods


def matmuls(mats: int, repeats: int) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for name, n, k, dtype in SHAPES:
        count = 2 if dtype == "int8" else mats
        floats = [torch.randn(n, k, generator=gen) / k ** 0.5 for _ in range(count)]
        lins = [QuantizedLinear.from_float(w, None, dtype) for w in floats]
        for lin in lins:
            lin.add_batch_copy()
        for rows in ROWS:
            if dtype == "int8" and rows == 64:
                continue
            x = torch.randn(rows, k, generator=gen)
            calls = max(count, 2 * count if rows <= 16 else count)

            methods = _methods(lins, floats, x, dtype)
            times = {m: [] for m in methods}
            for fn in methods.values():  # warm: build, first touch
                _clock(fn, count)
            for r in range(repeats):
                order = list(methods) if r % 2 == 0 else list(reversed(methods))  # ABBA
                for m in order:
                    times[m].append(_clock(methods[m], calls))
            kernels.enabled, kernels.bf16_enabled = True, False
            _use_module("current")
            row = {"shape": name, "dtype": dtype, "rows": rows,
                   **{f"{m}_us": round(statistics.median(v), 1) for m, v in times.items()},
                   **{f"{m}_min_us": round(min(v), 1) for m, v in times.items()}}
            out.append(row)
            print(f"{name:18s} rows {rows:3d}  " + "  ".join(f"{m} {row[f'{m}_us']:8.1f}" for m in methods),
                  flush=True)
    return out


def model_steps(repeats: int, agree_tokens: int) -> dict:
    from exitwise import load_model
    from exitwise.engine.llm import LLMEngine
    from exitwise.engine.sampling import SamplingParams
    from exitwise.engine.sequence import Sequence

    m = load_model("smollm2-135m", dtype="int4")
    eng = LLMEngine(m, max_num_seqs=8)
    text = (DATA / "text" / "test.txt").read_text()
    ids = m.tokenizer(text[5000:9000])["input_ids"][:256]
    r = eng.runner
    seq = Sequence("a", list(ids), SamplingParams(max_tokens=64))
    eng.blocks.allocate(seq)
    logits = r.prefill([seq])
    seq.num_computed_tokens = len(seq)
    seq.token_ids.append(int(logits.argmax()))
    base = len(seq)
    seq.token_ids.extend([0] * 16)  # room in the block table for the widest verification pass
    while len(seq) > len(seq.block_table) * eng.blocks.block_size:
        eng.blocks.append_slot(seq)
    del seq.token_ids[base:]

    def verify(n):
        return lambda: r.verify([seq], r.model.embed_tokens(seq.token_ids[-1:] * n), 0, [(base - 1, base - 1 + n)])

    cases = {"decode": lambda: r.decode([seq]), "verify5": verify(5), "verify9": verify(9)}
    res = {}
    # "kernel_bf16": int4 on the AVX512-BF16 path where this CPU and build have it
    # "op_by_op": the kernel, each layer's kernels called one by one from Python instead of in one call
    names = (("kernel", "op_by_op", "before") + (("kernel_bf16",) if kernels.bf16_built() else ())
             + (("baseline",) if "baseline" in _MODULES else ()))
    one_call = LlamaDecoder._one_call

    def use(name: str) -> None:
        kernels.enabled = name != "before"
        kernels.bf16_enabled = name == "kernel_bf16"
        _use_module("baseline" if name == "baseline" else "current")
        LlamaDecoder._one_call = (lambda self, i, x: None) if name in ("op_by_op", "baseline") else one_call

    for case, fn in cases.items():
        times = {name: [] for name in names}
        for name in names:
            use(name)
            for _ in range(3):
                fn()
        for rep in range(repeats):
            for name in (names if rep % 2 == 0 else names[::-1]):
                use(name)
                t = time.perf_counter()
                for _ in range(5):
                    fn()
                times[name].append((time.perf_counter() - t) / 5 * 1e3)
        use("kernel")
        res[case] = {f"{k}_ms": round(statistics.median(v), 2) for k, v in times.items()}
        print(f"{case:8s} " + "  ".join(f"{k} {v:7.2f}" for k, v in res[case].items()), flush=True)

    # teacher-forced top-1: each path's batch-1 arithmetic over the same tokens, and the float32 model's
    tokens = torch.tensor([m.tokenizer(text[:20000])["input_ids"][:agree_tokens]])
    with int_kernels_only():
        preds = {}
        for name in names:
            use(name)
            preds[name] = m.logits(tokens)[0].argmax(-1)
        use("kernel")
    new, old = preds["kernel"], preds["before"]
    del eng, m
    ref = load_model("smollm2-135m", dtype="float32").logits(tokens)[0].argmax(-1)
    res["top1"] = {"tokens": agree_tokens, "kernel_vs_before": round((new == old).float().mean().item(), 4),
                   "kernel_vs_float32": round((new == ref).float().mean().item(), 4),
                   "before_vs_float32": round((old == ref).float().mean().item(), 4),
                   **{f"{n}_vs_float32": round((p == ref).float().mean().item(), 4)
                      for n, p in preds.items() if n in ("kernel_bf16", "baseline", "op_by_op")}}
    print("top-1 agreement", res["top1"], flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mats", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--agree-tokens", type=int, default=400)
    ap.add_argument("--skip-model", action="store_true")
    ap.add_argument("--baseline", type=Path, help="an earlier lowbit_cpu.cpp, timed beside the current kernel")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "kernels" / "kernels.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if not kernels.ready():
        sys.exit("the exitwise CPU kernel does not run here")
    _MODULES["current"] = kernels._built["module"]
    if args.baseline is not None:
        if not args.baseline.is_file():
            sys.exit(f"--baseline {args.baseline}: no such file")
        _MODULES["baseline"] = load_baseline(args.baseline)
    result = {"threads": 1, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "int4_bf16_path": kernels.bf16_built(), "cflags": kernels.cflags(),
              "torch": torch.__version__, "mats": args.mats, "repeats": args.repeats,
              "baseline": None if args.baseline is None else str(args.baseline),
              "matmuls": matmuls(args.mats, args.repeats)}
    if not args.skip_model:
        result["model"] = model_steps(args.repeats, args.agree_tokens)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
