"""Where a decode step's time goes: matmuls vs everything else, per weight dtype and batch size.

For each weight dtype (float32, bfloat16, int8) at batch 1 and batch 8 the engine decodes at full depth
(synthetic prompts of ``--context`` tokens, greedy, real ``LLMEngine.step`` calls, so the KV length
grows by one every step). Each variant of the layer code runs ``--steps`` steps ``--repeats`` times,
interleaved ABBA with the other variants in this one process, and reports the median
``ModelRunner.decode`` time; then one ``torch.profiler`` run of ``--steps`` steps per variant gives:

* time in the matmul kernels per step, by op (self time of ``aten::mm``, ``aten::addmm``,
  ``aten::_weight_int8pack_mm``, ``mkldnn::_linear_pointwise``, ``aten::bmm``) and SDPA (total time of
  ``aten::scaled_dot_product_attention``, children included, or of the flash kernel a compiled graph
  calls directly), and the share of the (unprofiled) step that is neither matmul nor SDPA;
* aten ops per layer: calls issued from Python (``top``, the direct children of the step) and all aten
  calls including the ones those make inside ATen (``all``), per layer per step;
* Python-side time: the profiled step's wall time minus the total time of its top-level ops, i.e.
  the time spent outside any ATen op (interpreter, argument parsing, the profiler's own per-op
  bookkeeping). The profiler inflates this, so ``python_ms`` is an upper bound; the lower bound
  ``python_ms_lo`` subtracts the whole profiler inflation (profiled minus unprofiled step time).

Variants: ``before`` is the layer code as it was (kept verbatim below as a reference), ``after`` the
current ``exitwise.models.llama``, eager; with ``--compile`` also ``compiled`` (``EngineConfig.compile``:
the step's layers as one torch.compile graph; float32 batches of 2+ stay eager by design, so there it
measures eager again). Its inductor kernels are not aten ops: the profiler sees only the matmuls, SDPA
and the few ops the graph calls, and ``python_ms`` then includes the fused kernels. ``compile_s`` are
the first three compiled steps from a cold inductor cache (compile, recompile with a dynamic KV length,
first steady step). Before measuring, one step's logits of each variant are compared with ``before``'s.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/step_overhead.py \
        --out benchmarks/results/step_overhead/step_overhead.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT  # noqa: E402
from exitwise.cli.model_args import add_model_args  # noqa: E402

DTYPES = ("float32", "bfloat16", "int8")
MATMUL_OPS = {"aten::mm": "mm", "aten::addmm": "addmm", "aten::_weight_int8pack_mm": "int8pack_mm",
              "mkldnn::_linear_pointwise": "mkldnn_linear", "aten::bmm": "bmm"}
SDPA = "aten::scaled_dot_product_attention"
SDPA_CPU = "aten::_scaled_dot_product_flash_attention_for_cpu"  # what SDPA runs; compiled graphs call it directly
STEP = "decode_step"


# ------------------------------------------------------------------------- reference ("before")
# LlamaDecoder's decode path as of commit c5eccb1, verbatim, bound onto a decoder instance to A/B it.
def _ref_rope(self, x, ctx):
    half = self.head_dim // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * ctx.cos - x2 * ctx.sin, x2 * ctx.cos + x1 * ctx.sin), dim=-1)


def _ref_rms(self, x, weight):
    return F.rms_norm(x, (self.hidden_size,), weight, self.eps)


def _ref_attend_decode(self, q, layer, ctx):
    b = q.shape[0]
    shape = (b, ctx.max_len, self.num_kv_heads, self.head_dim)
    k = self.cache.flat[0, layer].index_select(0, ctx.gather).view(shape).transpose(1, 2)
    v = self.cache.flat[1, layer].index_select(0, ctx.gather).view(shape).transpose(1, 2)
    qg = q.view(b, self.num_kv_heads, self.group, self.head_dim)
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=ctx.key_mask)
    return out.reshape(b, self.q_size)


def _ref_linear(x, w, packed, bias=None):
    if packed is not None and x.shape[0] > 1:
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    return F.linear(x, w, bias)


def _ref_lowp_call(lin, x):
    xb = x.to(torch.bfloat16)
    if lin.weight_dtype == "int8":
        y = torch.ops.aten._weight_int8pack_mm(xb, lin.weight, lin.scale)
    else:
        y = F.linear(xb, lin.weight)
    y = y.float()
    return y if lin.bias is None else y + lin.bias


def _ref_layer(self, i, x, ctx, decode):
    w = self.layers[i]
    n = x.shape[0]
    if w.linears[0].weight_dtype != "float32":
        return self._layer_lowp(i, w, x, ctx, decode)
    # the tensors as the reference read them, from today's one linear per matmul
    lin = w.linears
    pk = tuple(m.packed for m in lin)
    qkv = _ref_linear(self.rms(x, w.in_norm), lin[0].weight, pk[0], lin[0].bias)
    qk = self.rope(qkv[:, :self.q_size + self.kv_size].view(n, -1, self.head_dim), ctx)
    k = qk[:, self.num_heads:]
    v = qkv[:, self.q_size + self.kv_size:].view(n, self.num_kv_heads, self.head_dim)
    self.cache.flat[0, i].index_copy_(0, ctx.slots, k)
    self.cache.flat[1, i].index_copy_(0, ctx.slots, v)
    q = qk[:, :self.num_heads]
    attn = self._attend_decode(q, i, ctx) if decode else self._attend_prefill(q, i, ctx)
    x = x + _ref_linear(attn, lin[1].weight, pk[1])
    gate, up = _ref_linear(self.rms(x, w.post_norm), lin[2].weight, pk[2]).chunk(2, dim=-1)
    return x + _ref_linear(F.silu(gate) * up, lin[3].weight, pk[3])


def _ref_layer_lowp(self, i, w, x, ctx, decode):
    qkv_p, o_p, gate_up_p, down_p = (lambda t, lin=lin: _ref_lowp_call(lin, t) for lin in w.linears)
    n = x.shape[0]
    qkv = qkv_p(self.rms(x, w.in_norm))
    qk = self.rope(qkv[:, :self.q_size + self.kv_size].view(n, -1, self.head_dim), ctx)
    v = qkv[:, self.q_size + self.kv_size:].view(n, self.num_kv_heads, self.head_dim)
    self.cache.flat[0, i].index_copy_(0, ctx.slots, qk[:, self.num_heads:])
    self.cache.flat[1, i].index_copy_(0, ctx.slots, v)
    q = qk[:, :self.num_heads]
    attn = self._attend_decode(q, i, ctx) if decode else self._attend_prefill(q, i, ctx)
    x = x + o_p(attn)
    gate, up = gate_up_p(self.rms(x, w.post_norm)).chunk(2, dim=-1)
    return x + down_p(F.silu(gate) * up)


REFERENCE = {"layer": _ref_layer, "_layer_lowp": _ref_layer_lowp, "rope": _ref_rope, "rms": _ref_rms,
             "_attend_decode": _ref_attend_decode}


def use_variant(runner, variant: str, compiled) -> None:
    """``before``: its methods bound onto the decoder instance; ``after``: the class's, eager;
    ``compiled``: the class's, with the runner's compiled layers (``compiled``) switched on."""
    model = runner.model
    for name, fn in REFERENCE.items():
        if variant == "before":
            setattr(model, name, types.MethodType(fn, model))
        else:
            model.__dict__.pop(name, None)
    runner.compiled_layers = compiled if variant == "compiled" else None


# ------------------------------------------------------------------------------------ measuring
class Timed:
    """Wraps ``runner.decode``: records each call's wall time, marks it for the profiler."""

    def __init__(self, runner):
        self.inner, self.times = runner.decode, []
        runner.decode = self

    def __call__(self, *a, **kw):
        t = time.perf_counter()
        with record_function(STEP):
            out = self.inner(*a, **kw)
        self.times.append(time.perf_counter() - t)
        return out


def steps(eng, n: int) -> None:
    for _ in range(n):
        eng.step()


def breakdown(prof, num_layers: int, step_ms: float) -> dict:
    """Per-step figures from one profiled run (see the module docstring)."""
    events = prof.events()
    roots = [e for e in events if e.name == STEP]
    n = len(roots)
    mm = dict.fromkeys(MATMUL_OPS.values(), 0.0)
    sdpa = 0.0
    all_ops = 0
    for e in events:
        if e.name in MATMUL_OPS:
            mm[MATMUL_OPS[e.name]] += e.self_cpu_time_total
        if e.name == SDPA or (e.name == SDPA_CPU and (e.cpu_parent is None or e.cpu_parent.name != SDPA)):
            sdpa += e.cpu_time_total
        if e.name.startswith(("aten::", "mkldnn::")):
            all_ops += 1
    top_ops = sum(len(r.cpu_children) for r in roots)
    wall = sum(r.cpu_time_total for r in roots) / n / 1000
    inside = sum(c.cpu_time_total for r in roots for c in r.cpu_children) / n / 1000
    mm = {k: round(v / n / 1000, 3) for k, v in mm.items()}
    matmul = sum(mm.values())
    sdpa_ms = sdpa / n / 1000
    return {"profiled_step_ms": round(wall, 3), "matmul_ms": mm, "matmul_total_ms": round(matmul, 3),
            "sdpa_ms": round(sdpa_ms, 3), "non_matmul_share": round(1 - matmul / step_ms, 4),
            "non_matmul_sdpa_share": round(1 - (matmul + sdpa_ms) / step_ms, 4),
            "ops_per_layer_top": round(top_ops / n / num_layers, 1),
            "ops_per_layer_all": round(all_ops / n / num_layers, 1),
            "python_ms": round(wall - inside, 3), "python_ms_lo": round(max(0.0, min(wall, step_ms) - inside), 3)}


def compare_logits(eng, variants: list[str], compiled) -> dict:
    """One decode step's logits of each variant against ``before``'s on the same state (the step rewrites
    the same K/V slot each time): max |diff| (0.0 = bit-identical)."""
    runner = eng.runner
    seqs = list(eng.scheduler.running)
    for s in seqs:
        eng.blocks.append_slot(s)  # as the scheduler does before a decode step (idempotent)
    out = {}
    use_variant(runner, "before", compiled)
    ref = runner.decode.inner(seqs, None)[0]
    for v in variants:
        use_variant(runner, v, compiled)
        got = runner.decode.inner(seqs, None)[0]
        out[v] = float((got - ref).abs().max())
    return out


def measure(bb, dtype: str, batch: int, args, variants: list[str]) -> dict:
    from torch._dynamo.utils import counters

    from exitwise.engine import LLMEngine, SamplingParams

    total = (args.repeats * len(variants) + 2 * len(variants) + 4) * args.steps + 8
    bs = 16
    blocks = batch * (-(-(args.context + total) // bs) + 1)
    eng = LLMEngine(bb, weight_dtype=dtype, num_kv_blocks=blocks, block_size=bs, max_num_seqs=batch,
                    max_num_batched_tokens=batch * args.context, enable_prefix_caching=False,
                    compile="compiled" in variants)
    vocab = bb.vocab_size
    for i in range(batch):
        prompt = [(7 + 31 * i + j) % vocab for j in range(args.context)]
        eng.add_request(prompt, SamplingParams(max_tokens=total, ignore_eos=True))
    eng.step()  # prefill
    runner = eng.runner
    compiled = runner.compiled_layers
    timer = Timed(runner)
    out: dict = {"context_start": args.context}
    graphs0 = counters["stats"]["unique_graphs"]
    if compiled is not None:  # compile: the first step traces and compiles, the second recompiles (KV length dynamic)
        use_variant(runner, "compiled", compiled)
        timer.times.clear()
        steps(eng, 3)
        out["compile_s"] = [round(t, 2) for t in timer.times]
    out["logits_max_abs_diff_vs_before"] = compare_logits(eng, variants, compiled)
    for v in variants:  # warm-up
        use_variant(runner, v, compiled)
        steps(eng, args.steps)
    times: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(args.repeats):
        for v in (variants if r % 2 == 0 else variants[::-1]):
            use_variant(runner, v, compiled)
            timer.times.clear()
            steps(eng, args.steps)
            times[v] += timer.times
    for v in variants:
        use_variant(runner, v, compiled)
        step_ms = 1000 * statistics.median(times[v])
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            steps(eng, args.steps)
        out[v] = {"step_ms": round(step_ms, 3), "tok_s": round(1000 * batch / step_ms, 2),
                  **breakdown(prof, runner.num_layers, step_ms)}
    base = out[variants[0]]["step_ms"]
    for v in variants[1:]:
        out[v]["x_before"] = round(base / out[v]["step_ms"], 3)
    if compiled is not None:
        out["compiled"]["x_after"] = round(out["after"]["step_ms"] / out["compiled"]["step_ms"], 3)
        out["graphs_compiled"] = counters["stats"]["unique_graphs"] - graphs0  # 2: static, then dynamic KV length
        out["compiled_still_on"] = runner.compiled_layers is not None
    out["context_end"] = len(eng.scheduler.running[0])
    for s in list(eng.scheduler.running):
        eng.abort(s.request_id)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(ap, dtype=None)  # float32 weights; the dtypes compared: --dtypes
    ap.add_argument("--dtypes", nargs="+", default=list(DTYPES))
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--compile", action="store_true", help="also the compiled variant (EngineConfig.compile)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "step_overhead" / "step_overhead.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    if args.compile:  # compile times from a cold inductor cache (the figure a new machine sees)
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="step_overhead_inductor_"))
    from exitwise import load_model

    bb = load_model(args.model, device=args.device)
    variants = ["before", "after"] + (["compiled"] if args.compile else [])
    result = {"model": bb.name, "threads": args.threads, "steps": args.steps, "repeats": args.repeats,
              "torch": torch.__version__, "runs": {}}
    for d in args.dtypes:
        for b in args.batches:
            torch._dynamo.reset()  # every engine's decode_layers shares one code object and its recompile limit
            result["runs"][f"{d}/b{b}"] = measure(bb, d, b, args, variants)
            print(f"{d}/b{b} done", file=sys.stderr)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print("| weights/batch | variant | step ms | x before | matmul ms | sdpa ms | non-matmul | non-mm/sdpa "
          "| ops/layer top (all) | python ms (lo-hi) | max |dlogits| |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for key, run in result["runs"].items():
        for v in variants:
            r = run[v]
            print(f"| {key} | {v} | {r['step_ms']:.2f} | {r.get('x_before', 1.0):.3f} | {r['matmul_total_ms']:.2f} | "
                  f"{r['sdpa_ms']:.2f} | {r['non_matmul_share']:.1%} | {r['non_matmul_sdpa_share']:.1%} | "
                  f"{r['ops_per_layer_top']:.0f} ({r['ops_per_layer_all']:.0f}) | "
                  f"{r['python_ms_lo']:.2f}-{r['python_ms']:.2f} | {run['logits_max_abs_diff_vs_before'][v]:.2g} |")
    for key, run in result["runs"].items():
        if "compile_s" in run:
            print(f"{key}: first compiled steps {run['compile_s']} s, {run['graphs_compiled']} graphs, "
                  f"compiled/eager-after x{run['compiled']['x_after']:.3f}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
