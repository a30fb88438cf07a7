"""Engine benchmark: HF ``generate`` vs the exitwise engine at full depth vs early exit, one process.

A fixed request trace (prompts cut to a fixed token length from WikiText test paragraphs and XSum
articles, fixed max_tokens, a fixed arrival pattern counted in engine steps) is replayed by:

* ``hf_generate``: HF ``model.generate`` (greedy, full depth), static batches of ``--concurrency``
  (left-padded; it cannot admit requests mid-batch), and ``hf_generate_b1``: one request at a time;
* ``full`` / ``full_b1``: the engine at full depth (continuous batching, paged cache), all requests
  present at t=0 like HF; ``full_staggered`` replays the arrival pattern (requests joining mid-way);
* ``bf16`` / ``bf16_b1``, ``int8`` / ``int8_b1``, ``int4`` / ``int4_b1``: the same with bfloat16 / int8 /
  int4 weights (``weight_dtype``); each dtype entry (``full``, ``bf16``, ``int8``, ``int4``) also gets the engine's own
  perplexity on a fixed span of WikiText test and its teacher-forced top-1 agreement with float32
  at every position of that span (measured once, not per repeat);
* ``llamacpp_b1``: llama.cpp (``make peer``) on the same GGUF file (Q4_1), greedy on the same token ids,
  one request at a time like ``full_b1`` (skipped, saying so, when llama-cpp-python is not installed);
* the engine with each exit criterion at a few thresholds (softmax response, hidden-state similarity,
  a dedicated exit classifier trained here on WikiText train), KV fill = propagate, in batch exit mode
  (the batch leaves when every sequence is confident) and, as ``<setting>/seq``, in per-sequence mode
  (each sequence leaves at its own exit layer, the batch is compacted), interleaved run by run.

Models above ``FULL_SUITE_MAX_PARAMS`` (the Qwen2.5-Coder GGUFs) run the ``default`` suite instead: the
engine at the model's default dtype (``--dtype auto``), 8 concurrent (``default``) and one request at a
time (``default_b1``), beside llama.cpp on the same GGUF one request at a time (``llamacpp_b1``) and
serving the same 8 prompts one after another (``llamacpp_serial``), with the engine's peak RSS before
llama.cpp is loaded (``peak_rss_mb``): no float32 copy, HF ``generate`` or exit criteria.

Each system runs ``--repeats`` times interleaved and keeps its fastest run (the machine is shared;
slowdowns from other processes only add time). Reports tokens/s, mean inter-token latency, time to
first token, mean exit layer, layer saving, token agreement with the engine's full-depth greedy output,
the oracle saving (per token, first exit layer from which the readout's argmax stays equal to the
final one), and micro-measurements of a layer, the head, each exit check and the KV fill.

    PYTHONPATH=src python benchmarks/engine.py --quick
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATA, ROOT, decode_setup  # noqa: E402
from exitwise.cli.model_args import add_model_args  # noqa: E402


# ------------------------------------------------------------------------------------------ trace
def make_trace(tok, n: int, prompt_len: int, max_tokens: int) -> list[list[int]]:
    """n prompts of exactly prompt_len tokens, alternating WikiText and XSum."""
    wiki = [ln.strip() for ln in (DATA / "text" / "test.txt").read_text().splitlines()
            if len(ln.strip()) > 400 and not ln.strip().startswith("=")]
    xsum = [json.loads(ln)["article"] for ln in (DATA / "xsum" / "test.jsonl").read_text().splitlines()[:200]]
    prompts, wi, xi = [], 0, 0
    while len(prompts) < n:
        if len(prompts) % 2 == 0:
            text, wi = wiki[wi], wi + 1
        else:
            text, xi = xsum[xi], xi + 1
        ids = tok(text)["input_ids"]
        if len(ids) >= prompt_len:
            prompts.append(ids[:prompt_len])
    return prompts


def arrivals(n: int, concurrency: int, gap: int) -> list[int]:
    """Engine step at which each request arrives: the first `concurrency` at once, then one every `gap` steps."""
    return [0 if i < concurrency else gap * (i - concurrency + 1) for i in range(n)]


# ----------------------------------------------------------------------------------------- systems
def run_engine(llm, prompts, arrive, max_tokens):
    from exitwise.engine import SamplingParams

    eng = llm.engine
    sp = SamplingParams(max_tokens=max_tokens, ignore_eos=True, return_exit_layers=True)
    pending = sorted(range(len(prompts)), key=lambda i: arrive[i])
    rid_of, done = {}, {}
    step = 0
    t0 = time.perf_counter()
    while pending or eng.has_unfinished():
        while pending and arrive[pending[0]] <= step:
            i = pending.pop(0)
            rid_of[eng.add_request(prompts[i], sp)] = i
        for out in eng.step():
            if out.finished:
                done[rid_of[out.request_id]] = out
        step += 1
    wall = time.perf_counter() - t0
    outs = [done[i] for i in range(len(prompts))]
    ntok = sum(len(o.token_ids) for o in outs)
    ttft = [o.metrics["ttft"] for o in outs]
    itl = [(o.metrics["elapsed"] - o.metrics["ttft"]) / max(1, len(o.token_ids) - 1) for o in outs]
    layers = [layer for o in outs for layer in o.exit_layers[1:]]  # decode tokens only
    assert eng.num_free_blocks == eng.cache.num_blocks, "KV blocks leaked"
    return {"tokens": ntok, "wall_s": wall, "tokens_per_s": ntok / wall, "ttft_s": statistics.mean(ttft),
            "itl_ms": 1000 * statistics.mean(itl), "mean_exit_layer": statistics.mean(layers) if layers else None,
            "outputs": [o.token_ids for o in outs]}


def run_hf(bb, prompts, max_tokens, batch):
    model, ntok, t0 = bb.model, 0, time.perf_counter()
    ttft = []
    outputs = []
    for s in range(0, len(prompts), batch):
        group = prompts[s:s + batch]
        width = max(len(p) for p in group)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in group], device=bb.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group], device=bb.device)
        start = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_tokens,
                             min_new_tokens=max_tokens, pad_token_id=0)
        ttft.extend([start - t0] * len(group))  # HF returns all tokens at once: no per-token timing
        ntok += (out.shape[1] - width) * len(group)
        outputs.extend(out[:, width:].tolist())
    wall = time.perf_counter() - t0
    steps = math.ceil(len(prompts) / batch) * max_tokens
    return {"tokens": ntok, "wall_s": wall, "tokens_per_s": ntok / wall, "ttft_s": None,
            "itl_ms": 1000 * wall / steps, "mean_exit_layer": bb.num_layers, "outputs": outputs}


def run_llamacpp(peer, prompts, max_tokens, num_layers):
    """llama.cpp greedy, one request after another, timed like ``full_b1`` (tokens/s = generated tokens
    over the wall time of all requests, prefill included). Exactly ``max_tokens`` tokens per request:
    ``Llama.generate`` has no EOS stop (``create_completion`` adds it)."""
    ttft, itl, outputs = [], [], []
    t0 = time.perf_counter()
    for p in prompts:
        start = time.perf_counter()
        peer.reset()  # a full prefill per request: no reuse of the previous request's K/V
        gen = peer.generate(p, temp=0.0, repeat_penalty=1.0)  # temp 0: llama.cpp's greedy sampler
        out: list[int] = []
        for tok in gen:
            out.append(int(tok))
            if len(out) == 1:
                ttft.append(time.perf_counter() - start)
            if len(out) == max_tokens:
                break
        gen.close()
        itl.append((time.perf_counter() - start - ttft[-1]) / max(1, len(out) - 1))
        outputs.append(out)
    wall = time.perf_counter() - t0
    ntok = sum(len(o) for o in outputs)
    return {"tokens": ntok, "wall_s": wall, "tokens_per_s": ntok / wall, "ttft_s": statistics.mean(ttft),
            "itl_ms": 1000 * statistics.mean(itl), "mean_exit_layer": num_layers, "outputs": outputs}


PEER_MISSING = "llama.cpp (make peer) not installed: skipping llamacpp_b1"

# A child process decodes two tokens with llama.cpp's default weight buffers.
_PROBE = """
import sys, llama_cpp
llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=64, n_threads=1, n_threads_batch=1, verbose=False)
gen = llm.generate([1, 2, 3], temp=0.0)
next(gen), next(gen)
"""


def default_buffers_run(gguf: Path) -> int:
    """Exit status of a child decoding with llama.cpp's default weight buffers (0: they run). In a
    child because on Xeons with AMX llama.cpp repacks the weights into AMX buffers whose matmul can
    segfault (ggml-org/llama.cpp#20824; it does in this machine's VM: ``ldtilecfg`` in a worker thread)."""
    import subprocess

    return subprocess.run([sys.executable, "-c", _PROBE, str(gguf)], capture_output=True, timeout=300).returncode


class _NoExtraBuffers:
    """Load a ``llama_cpp.Llama`` with ``use_extra_bufts=False`` (plain CPU weight buffers: no AMX or
    other repacking), which its constructor has no argument for: its model parameters come from
    ``llama_cpp.llama_cpp.llama_model_default_params``, wrapped while this context is open."""

    def __init__(self, lib):
        self.lib, self.default = lib, lib.llama_model_default_params

    def __enter__(self):
        def params():
            p = self.default()
            p.use_extra_bufts = False
            return p

        self.lib.llama_model_default_params = params

    def __exit__(self, *exc):
        self.lib.llama_model_default_params = self.default


def llamacpp_peer(model: str, threads: int, n_ctx: int, probe=default_buffers_run, **extra):
    """(llama_cpp.Llama on ``model``'s GGUF file, its description) or (None, {"skipped": why}), the
    reason printed. The GGUF is the bundled model's own file (or ``model`` itself if it is one);
    ``extra``: more ``llama_cpp.Llama`` arguments (a ``draft_model``).
    llama.cpp keeps its default weight buffers where ``probe`` (a child process) shows they decode,
    else it loads without its extra buffer types, and the description says so."""
    try:
        import llama_cpp
    except ImportError:
        print(PEER_MISSING)
        return None, {"skipped": PEER_MISSING}
    from exitwise.models.loading import bundled_gguf

    gguf = bundled_gguf(model) or (Path(model) if model.endswith(".gguf") else None)
    if gguf is None:
        why = f"{model} is neither a bundled model nor a .gguf file: skipping llamacpp_b1"
        print(why)
        return None, {"skipped": why}
    info = {"gguf": gguf.name, "llama_cpp": getattr(llama_cpp, "__version__", None), "n_ctx": n_ctx,
            "extra_buffer_types": True}
    status = probe(gguf)
    n = threads or None  # 0: llama.cpp's default, like torch's
    kwargs = dict(model_path=str(gguf), n_ctx=n_ctx, n_batch=n_ctx, n_threads=n, n_threads_batch=n, verbose=False,
                  logits_all=False) | extra
    if status == 0:
        return llama_cpp.Llama(**kwargs), info
    print(f"llama.cpp with its default (AMX / repacked) weight buffers died with status {status} in a test "
          "decode: loading it with use_extra_bufts=False")
    info |= {"extra_buffer_types": False, "default_buffers_status": status}
    with _NoExtraBuffers(llama_cpp.llama_cpp):
        return llama_cpp.Llama(**kwargs), info


# system -> weight_dtype ("full" is the float32 engine)
LOW_DTYPES = {"bf16": "bfloat16", "int8": "int8", "int4": "int4"}
DTYPE_SYSTEMS = {"full": "float32"} | LOW_DTYPES
# Full-depth systems: agreement with the float32 engine's output, no saving.
BASELINES = ("full", "full_staggered", "hf_generate", "full_b1", "hf_generate_b1",
             *(f"{n}{s}" for n in LOW_DTYPES for s in ("", "_b1")), "llamacpp_b1")


def b1_arrivals(n: int) -> list[int]:
    """Arrival steps far apart: requests one after another, never concurrent."""
    return list(range(0, 1000 * n, 1000))


def dtype_runs(llms: dict, prompts, n_b1: int, max_tokens: int) -> dict:
    """One run of each low-precision engine in ``llms`` (by system name): all requests at t=0 (as
    ``full``) and the first ``n_b1`` one at a time (``<name>_b1``, as ``full_b1``)."""
    res = {}
    for name in LOW_DTYPES:
        res[name] = run_engine(llms[name], prompts, [0] * len(prompts), max_tokens)
        res[f"{name}_b1"] = run_engine(llms[name], prompts[:n_b1], b1_arrivals(n_b1), max_tokens)
    return res


def dtype_perplexities(llms: dict, tokens: list[int], window: int) -> dict:
    """The engine's own perplexity per dtype system (teacher forced, full depth, windows of ``window``)."""
    from dataclasses import asdict

    from exitwise.analysis.perplexity import perplexity, top1_agreement
    from exitwise.models.quantize import int_kernels_only

    runs, kernel_runs, out = {}, {}, {}
    for name, llm in llms.items():
        t = time.perf_counter()
        runs[name] = perplexity(llm, tokens, window=window, keep_predictions=True)
        out[name] = {k: v for k, v in asdict(runs[name]).items() if k != "predictions"}
        out[name]["seconds"] = time.perf_counter() - t
        if DTYPE_SYSTEMS[name] in ("int8", "int4"):
            # prefill runs int weights through their bfloat16 copy (QuantizedLinear.batch_rows); the
            # batch-1 decode path is the int kernels, scored here on the same tokens
            with int_kernels_only():
                kernel_runs[name] = perplexity(llm, tokens, window=window, keep_predictions=True)
            out[name]["int_kernels"] = {"perplexity": kernel_runs[name].perplexity}
    for name, run in runs.items():  # teacher forced: every position of the text, not a continuation
        out[name]["top1_agreement_with_float32"] = top1_agreement(run, runs["full"])
        if name in kernel_runs:
            out[name]["int_kernels"]["top1_agreement_with_float32"] = top1_agreement(kernel_runs[name], runs["full"])
    return out


def baseline_results(best: dict, reference, n_b1: int) -> dict:
    """The full-depth systems' results without their outputs, with agreement against ``reference``
    (the float32 engine's 8-concurrent output; its first ``n_b1`` for the one-at-a-time systems)."""
    out = {}
    for name in BASELINES:
        if name in best:
            res = {k: v for k, v in best[name].items() if k != "outputs"}
            res["agreement"] = agreement(best[name]["outputs"], reference[:n_b1] if "b1" in name else reference)
            res["saving"] = 0.0
            out[name] = res
    return out


def ratio(results: dict, a: str, b: str, key: str = "tokens_per_s") -> float | None:
    """results[a][key] / results[b][key], None where a side did not run."""
    x, y = results.get(a, {}).get(key), results.get(b, {}).get(key)
    return x / y if x and y else None


def dtype_ratios(results: dict) -> dict:
    """Throughput ratios of the weight dtypes and llama.cpp (None where a side did not run)."""
    def ratio_(a: str, b: str) -> float | None:
        return ratio(results, a, b)

    return {"int8_vs_full_b1": ratio_("int8_b1", "full_b1"), "int8_vs_full_b8": ratio_("int8", "full"),
            "int8_b1_vs_llamacpp_b1": ratio_("int8_b1", "llamacpp_b1"), "bf16_vs_full_b1": ratio_("bf16_b1", "full_b1"),
            "bf16_vs_full_b8": ratio_("bf16", "full"), "full_b1_vs_llamacpp_b1": ratio_("full_b1", "llamacpp_b1"),
            "int4_vs_full_b1": ratio_("int4_b1", "full_b1"), "int4_vs_full_b8": ratio_("int4", "full"),
            "int4_b1_vs_llamacpp_b1": ratio_("int4_b1", "llamacpp_b1")}


def agreement(outputs, reference) -> float:
    same = total = 0
    for a, b in zip(outputs, reference, strict=True):
        same += sum(x == y for x, y in zip(a, b, strict=False))
        total += len(b)
    return same / total


@torch.inference_mode()
def oracle_layers(bb, prompts, outputs, exit_layers) -> list[int]:
    """Per generated token: first exit layer from which the argmax equals the final one at every later
    exit layer (L if none), with teacher forcing over prompt + full-depth output."""
    L = bb.num_layers
    res = []
    for p, o in zip(prompts, outputs, strict=True):
        ids = torch.tensor([p + o[:-1]])
        hs = bb.hidden_states(ids)
        rows = slice(len(p) - 1, ids.shape[1])  # positions whose next token is a generated one
        final = bb.readout(hs[L][0, rows]).argmax(-1)
        agree = torch.stack([bb.readout(hs[layer][0, rows]).argmax(-1) == final for layer in exit_layers])
        # stays equal from layer k on: suffix-all over the exit layers
        stable = agree.flip(0).cumprod(0).flip(0).bool()  # (K, T)
        for t in range(1, stable.shape[1]):  # t = 0 is the prefill token (always full depth)
            ks = [k for k in range(len(exit_layers)) if stable[k, t]]
            res.append(exit_layers[ks[0]] if ks else L)
    return res


# ---------------------------------------------------------------------------------------- micro costs
def _tm(fn, n: int) -> float:
    """Best-of-3 mean milliseconds of fn()."""
    fn()
    best = []
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        best.append((time.perf_counter() - t) / n)
    return 1000 * min(best)


@torch.inference_mode()
def _micro_batch(eng, crits: dict, clf_layers: list[int], b: int, reps: int, rounds: int = 12) -> dict:
    from exitwise.engine.exit_plan import ExitPlan
    from exitwise.engine.kv_fill import Propagate
    from exitwise.exits.base import Readout

    r = eng.runner
    L = r.num_layers
    seqs, ctx, x = decode_setup(eng, b)
    res = {"layer_ms": _tm(lambda: r.layer(10, x, ctx, True), reps), "head_ms": _tm(lambda: r.logits(x), reps)}
    for name, c in crits.items():
        if c.has_prefilter:  # the cheap check that runs at every exit layer
            c.begin(r.output, seqs)
            res[f"check_{name}_ms"] = _tm(lambda c=c: c.prefilter(x), reps)
            res[f"check_{name}_step_setup_ms"] = _tm(lambda c=c: c.begin(r.output, seqs), reps)
            logits = r.logits(x)
            res[f"check_{name}_observe_ms"] = _tm(lambda c=c, lg=logits: c.observe(seqs, lg), reps)
            # per step with nothing exiting: setup + observe + one prefilter per exit layer (7 here)
            res[f"check_{name}_per_step_ms"] = (res[f"check_{name}_step_setup_ms"] + res[f"check_{name}_observe_ms"]
                                                + len(range(16, L, 2)) * res[f"check_{name}_ms"])
        else:
            res[f"check_{name}_ms"] = _tm(lambda c=c: c.confidence(x, x, 20, Readout(x, r.logits)), reps)
    res["propagate_fill_per_layer_ms"] = _tm(lambda: r.propagate_kv(x, 15, ctx), reps) / (L - 15)
    # a whole decode step without exit machinery, and with machinery whose threshold is unreachable
    # Interleaved rounds, fastest of each (the machine is shared: load only adds time).
    plans = {None: None}
    for name, c in crits.items():
        layers = clf_layers if name == "classifier" else list(range(16, L, 2))
        plans[name] = ExitPlan(c, layers, Propagate(), L, threshold=2.0)  # confidences are <= 1: never exits
    step_ms = dict.fromkeys(plans, math.inf)
    for plan in plans.values():
        r.decode(seqs, plan)  # warm-up
    for _ in range(rounds):
        for name, plan in plans.items():
            t = time.perf_counter()
            r.decode(seqs, plan)
            step_ms[name] = min(step_ms[name], 1000 * (time.perf_counter() - t))
    res["decode_step_ms"] = step_ms[None]
    for name in crits:
        res[f"decode_step_{name}_noexit_ms"] = step_ms[name]
        res[f"overhead_{name}_noexit"] = step_ms[name] / step_ms[None] - 1
    for s in seqs:
        eng.abort(s.request_id)
    return res


@torch.inference_mode()
def perseq_step_costs(eng, b: int = 8, rounds: int = 9) -> dict:
    """Decode-step time (median ms over interleaved rounds) of batch vs per-sequence exit mode at batch b
    with exits forced per request (hidden similarity, threshold -1: a request leaves at the first exit
    layer >= its ``exit_min_layer``; ``exit_threshold=inf``: full depth), plus the fraction of row-layers
    each mode computes. Batch mode leaves only when every row may, so a mixed batch runs full depth."""
    from exitwise.engine import SamplingParams
    from exitwise.engine.exit_plan import ExitPlan
    from exitwise.engine.kv_fill import Propagate
    from exitwise.exits.base import make_criterion

    r = eng.runner
    L = r.num_layers
    layers = list(range(16, L, 2))
    full = math.inf
    scenarios = {"all_exit_16": [16] * b, "half_exit_16": [16] * (b // 2) + [full] * (b - b // 2),
                 "7of8_exit_16": [16] * (b - 1) + [full], "staggered_16_to_28": (layers + [full] * b)[:b]}
    plan = ExitPlan(make_criterion("hidden_similarity"), layers, Propagate(), L, threshold=-1.0)
    res = {}
    for name, exits in scenarios.items():
        for i, e in enumerate(exits):
            sp = (SamplingParams(max_tokens=512, ignore_eos=True, exit_threshold=math.inf) if e == full else
                  SamplingParams(max_tokens=512, ignore_eos=True, exit_min_layer=e))
            eng.add_request(list(range(1000 + i, 1064 + i)), sp)
        eng.step()  # prefill
        seqs = list(eng.scheduler.running)
        for s in seqs:
            eng.blocks.append_slot(s)
        runs = {"batch": lambda seqs=seqs: r.decode(seqs, plan),
                "sequence": lambda seqs=seqs: r.decode_per_sequence(seqs, plan)}
        times: dict = {k: [] for k in runs}
        for fn in runs.values():
            fn()  # warm-up
        for _ in range(rounds):
            for k, fn in runs.items():
                t = time.perf_counter()
                fn()
                times[k].append(1000 * (time.perf_counter() - t))
        got = r.decode_per_sequence(seqs, plan)[1]
        batch_layer = r.decode(seqs, plan)[1]
        res[name] = {"batch_ms": statistics.median(times["batch"]), "sequence_ms": statistics.median(times["sequence"]),
                     "batch_row_layers": batch_layer / L, "sequence_row_layers": sum(got) / (L * b)}
        res[name]["sequence_vs_batch_time"] = res[name]["sequence_ms"] / res[name]["batch_ms"]
        for s in seqs:
            eng.abort(s.request_id)
    return res


def micro_costs(llm, classifier, batch_sizes=(1, 8), reps=20) -> dict:
    """Per-step costs (ms) of a layer, the head, each exit check, the KV fill, and the no-exit overhead."""
    from exitwise.exits.base import make_criterion

    crits = {"softmax": make_criterion("softmax"), "softmax_full": make_criterion("softmax", shortlist=False),
             "hidden_similarity": make_criterion("hidden_similarity"), "classifier": classifier}
    return {f"b{b}": _micro_batch(llm.engine, crits, classifier.layers, b, reps) for b in batch_sizes}


# ------------------------------------------------------------------------------------------------ plot
def plot(results: dict, path: Path) -> None:
    """Throughput against token agreement: one line per exit criterion over its thresholds, with the
    full-depth engine and HF generate (8 concurrent) marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    exits = {k: v for k, v in results.items() if isinstance(v, dict) and "@" in k and "criterion" in v}
    for crit in sorted({v["criterion"] for v in exits.values()}):
        pts = sorted((v["agreement"], v["tokens_per_s"], v["threshold"]) for v in exits.values()
                     if v["criterion"] == crit)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=crit)
        for a, t, thr in pts:
            ax.annotate(f"{thr:g}", (a, t), textcoords="offset points", xytext=(4, 4), fontsize=7)
    for key, style, label in (("full", "k*", "engine full depth"), ("hf_generate", "rs", "HF generate")):
        r = results[key]
        ax.plot([r["agreement"]], [r["tokens_per_s"]], style, markersize=11, label=label)
    ax.axvline(0.95, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("token agreement with full-depth greedy output")
    ax.set_ylabel("throughput (tokens/s, 8 concurrent)")
    cfg = results.get("config", {})
    ax.set_title(f"exitwise engine, {cfg.get('model', '')}: throughput vs agreement "
                 f"({'quick' if cfg.get('quick') else 'full'} trace)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------- the default suite
# the float32 suite holds the float32 model twice over (HF, engine) beside three low-bit engines and HF
# generate: above this many parameters (Qwen2.5-Coder-0.5B has 494M) the default suite runs instead
FULL_SUITE_MAX_PARAMS = 400_000_000


def model_params(model: str) -> int | None:
    """Parameters of ``model``'s GGUF file (a bundled name or a .gguf path), from its tensor table."""
    from exitwise.models.gguf import Reader
    from exitwise.models.loading import bundled_gguf

    gguf = bundled_gguf(model) or (Path(model) if model.endswith(".gguf") else None)
    return None if gguf is None else sum(math.prod(t.shape) for t in Reader(gguf).tensors)


def peak_rss_mb() -> float:
    """This process's peak resident set so far (Linux reports ru_maxrss in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def default_suite(args, n_req: int, prompt_len: int, max_tokens: int, n_b1: int, repeats: int) -> dict:
    """The engine at the model's default dtype beside llama.cpp on the same GGUF (module docstring)."""
    from collections import Counter

    from exitwise import load_model
    from exitwise.engine import LLM
    from exitwise.models.quantize import QuantizedLinear, weight_dtype_of

    t_start = time.perf_counter()
    bb = load_model(args.model, device=args.device, dtype="auto")
    llm = LLM(bb, max_num_seqs=args.concurrency)
    prompts = make_trace(bb.tokenizer, n_req, prompt_len, max_tokens)
    run_engine(llm, prompts[:2], [0, 0], 4)  # warm-up
    engine_rss = peak_rss_mb()
    peer, peer_info = llamacpp_peer(args.model, args.threads, n_ctx=512)
    if peer is not None:
        run_llamacpp(peer, prompts[:1], 4, bb.num_layers)
    best: dict = {}
    itls: dict[str, list[float]] = {}
    for _ in range(repeats):  # interleaved: machine load hits every system alike
        runs = {"default": run_engine(llm, prompts, [0] * n_req, max_tokens),
                "default_b1": run_engine(llm, prompts[:n_b1], b1_arrivals(n_b1), max_tokens)}
        if peer is not None:
            runs["llamacpp_b1"] = run_llamacpp(peer, prompts[:n_b1], max_tokens, bb.num_layers)
            runs["llamacpp_serial"] = run_llamacpp(peer, prompts, max_tokens, bb.num_layers)
        for name, res in runs.items():
            itls.setdefault(name, []).append(res["itl_ms"])
            if name not in best or res["wall_s"] < best[name]["wall_s"]:
                best[name] = res
    reference = best["default"]["outputs"]
    results = {}
    for name, res in best.items():
        ref = reference[:n_b1] if name.endswith("_b1") else reference
        results[name] = {k: v for k, v in res.items() if k != "outputs"} | {
            "agreement_with_default": agreement(res["outputs"], ref),
            # the fastest repeat's ITL can be one lucky run: the median of every repeat beside it
            "itl_ms_median": statistics.median(itls[name])}
    if peer is None:
        results["llamacpp_b1"] = peer_info
    else:
        results["llamacpp_b1"] |= peer_info

    results["ratios"] = {"default_b1_vs_llamacpp_b1": ratio(results, "default_b1", "llamacpp_b1"),
                         "default_b1_itl_vs_llamacpp_b1": ratio(results, "default_b1", "llamacpp_b1", "itl_ms"),
                         "default_b1_itl_median_vs_llamacpp_b1": ratio(results, "default_b1", "llamacpp_b1",
                                                                       "itl_ms_median"),
                         "default_vs_llamacpp_serial": ratio(results, "default", "llamacpp_serial")}
    results["peak_rss_mb"] = engine_rss
    results["peak_rss_mb_with_llamacpp"] = peak_rss_mb()
    results["config"] = {"model": args.model, "suite": "default", "quick": args.quick, "requests": n_req,
                         "prompt_len": prompt_len, "max_tokens": max_tokens, "concurrency": args.concurrency,
                         "b1_requests": n_b1, "repeats": repeats, "threads": torch.get_num_threads(),
                         "linears_by_dtype": dict(Counter(weight_dtype_of(m) for m in bb.model.modules()
                                                          if isinstance(m, QuantizedLinear))),
                         "linears_by_layout": dict(Counter(m.layout for m in bb.model.modules()
                                                           if isinstance(m, QuantizedLinear))),
                         "machine": platform.machine(), "cpus": os.cpu_count(), "loadavg": os.getloadavg(),
                         "elapsed_s": time.perf_counter() - t_start,
                         "timing": "generated tokens / wall time, prefill included; fastest of the repeats"}
    return results


def print_default_suite(results: dict) -> None:
    print(f"{'system':18s} {'tok/s':>8s} {'ITL ms':>8s} {'median':>8s} {'TTFT s':>8s} {'agree':>6s}")
    for name, r in results.items():
        if isinstance(r, dict) and "tokens_per_s" in r:
            print(f"{name:18s} {r['tokens_per_s']:8.2f} {r['itl_ms']:8.1f} {r['itl_ms_median']:8.1f} "
                  f"{r['ttft_s']:8.2f} {r['agreement_with_default']:6.1%}")
    print("ratios", {k: None if v is None else round(v, 2) for k, v in results["ratios"].items()})
    print(f"peak RSS: engine {results['peak_rss_mb']:.0f} MB, with llama.cpp loaded "
          f"{results['peak_rss_mb_with_llamacpp']:.0f} MB")


# ------------------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(ap, dtype=None)  # float32 weights; the lower dtypes are among the systems compared
    ap.add_argument("--quick", action="store_true", help="small trace, few settings (<= 6 minutes)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "engine" / "engine.json"))
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for HF and the engine alike (default 1: on a shared 2-core machine two "
                         "threads stall in OpenMP barriers; 0 = torch's default)")
    ap.add_argument("--png", default=None, help="throughput vs agreement plot (default: --out with .png)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--suite", choices=("auto", "full", "default"), default="auto",
                    help="full: the float32, low-bit, HF and exit systems; default: the model's default dtype "
                         f"beside llama.cpp; auto: full up to {FULL_SUITE_MAX_PARAMS:,} parameters, else default")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    suite = args.suite
    if suite == "auto":
        params = model_params(args.model)
        suite = "default" if params is not None and params > FULL_SUITE_MAX_PARAMS else "full"
    if suite == "default":
        q = args.quick
        shape = (8, 48, 24, 2) if q else (16, 64, 48, 4)
        results = default_suite(args, *shape, repeats=args.repeats or (2 if q else 3))
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")
        print_default_suite(results)
        print(f"wrote {out}")
        return 0

    from exitwise import load_model
    from exitwise.engine import LLM
    from exitwise.engine.exit_plan import ExitPlan
    from exitwise.engine.kv_fill import Propagate
    from exitwise.exits.base import make_criterion
    from exitwise.exits.classifier import train

    q = args.quick
    n_req, prompt_len, max_tokens = (8, 48, 24) if q else (16, 64, 48)
    n_b1, repeats = (2, args.repeats or 1) if q else (4, args.repeats or 2)
    conc = args.concurrency
    bb = load_model(args.model, device=args.device)
    L = bb.num_layers
    prompts = make_trace(bb.tokenizer, n_req, prompt_len, max_tokens)
    arrive = arrivals(n_req, conc // 2 if q else conc, 3)
    t_start = time.perf_counter()

    llm = LLM(bb, kv_cache_bytes=256 << 20, max_num_seqs=conc)
    llms = {"full": llm} | {name: LLM(bb, kv_cache_bytes=256 << 20, max_num_seqs=conc, weight_dtype=d)
                            for name, d in LOW_DTYPES.items()}
    peer, peer_info = llamacpp_peer(args.model, args.threads, n_ctx=512)
    for warm in llms.values():  # warm-up
        run_engine(warm, prompts[:2], [0, 0], 4)
    run_hf(bb, prompts[:2], 4, 2)
    if peer is not None:
        run_llamacpp(peer, prompts[:1], 4, L)

    results: dict = {}
    best: dict = {}

    def keep(name, res):
        if name not in best or res["wall_s"] < best[name]["wall_s"]:
            best[name] = res

    for _ in range(repeats):  # interleaved so machine load hits all systems alike
        keep("hf_generate", run_hf(bb, prompts, max_tokens, conc))
        llm.engine.plan = None
        # same condition as HF: all requests present at t=0, at most `conc` running at once
        keep("full", run_engine(llm, prompts, [0] * n_req, max_tokens))
        keep("full_staggered", run_engine(llm, prompts, arrive, max_tokens))
        keep("hf_generate_b1", run_hf(bb, prompts[:n_b1], max_tokens, 1))
        keep("full_b1", run_engine(llm, prompts[:n_b1], b1_arrivals(n_b1), max_tokens))
        for name, res in dtype_runs(llms, prompts, n_b1, max_tokens).items():
            keep(name, res)
        if peer is not None:
            keep("llamacpp_b1", run_llamacpp(peer, prompts[:n_b1], max_tokens, L))
    reference = best["full"]["outputs"]
    # the engine's own perplexity per weight dtype on a fixed span of WikiText test (seed 0)
    from exitwise.analysis.perplexity import text_tokens

    ppl_tokens, ppl_window = (2048 if q else 8192), 512
    ppl = dtype_perplexities(llms, text_tokens(bb.tokenizer, DATA / "text" / "test.txt", ppl_tokens, seed=0),
                             ppl_window)

    # exit criteria: softmax, hidden similarity, classifier (trained here on WikiText train)
    text = (DATA / "text" / "train.txt").read_text()[: 40_000 if q else 120_000]
    clf_layers = list(range(16, L, 2))
    t = time.perf_counter()
    clf = train(bb, text, clf_layers, max_tokens=1024 if q else 4096, steps=200)
    clf_train_s = time.perf_counter() - t
    layers = list(range(16, L, 2))
    # "softmax" = shortlist prefilter + faithful verification (default); "softmax_full" = full head at
    # every exit layer (the faithful check alone; same exits at a layer whenever the prefilter passes)
    settings = [("softmax", 0.9), ("softmax", 0.5), ("softmax_full", 0.5), ("hidden_similarity", 0.99),
                ("classifier", 0.9), ("classifier", 0.7)]
    if not q:
        settings += [("softmax", 0.99), ("softmax", 0.7), ("softmax", 0.3), ("softmax_full", 0.9),
                     ("softmax_full", 0.7), ("hidden_similarity", 0.995), ("hidden_similarity", 0.98),
                     ("classifier", 0.97), ("classifier", 0.5)]
    # per-sequence exit mode (each sequence leaves at its own exit layer, batch compacted) next to batch
    # mode at the same settings, interleaved run by run; the faithful softmax only in the full trace
    seq_settings = {s for s in settings if s[0] != "softmax_full" or not q}
    for crit_name, thr in settings:
        crit = (clf if crit_name == "classifier" else make_criterion("softmax", shortlist=False)
                if crit_name == "softmax_full" else make_criterion(crit_name))
        llm.engine.plan = ExitPlan(crit, layers, Propagate(), L, threshold=thr)
        modes = ["batch", "sequence"] if (crit_name, thr) in seq_settings else ["batch"]
        runs: dict = {}
        for _ in range(repeats):
            for mode in modes:
                llm.engine.exit_mode = mode
                r = run_engine(llm, prompts, [0] * n_req, max_tokens)
                runs[mode] = r if mode not in runs or r["wall_s"] < runs[mode]["wall_s"] else runs[mode]
        for mode, res in runs.items():
            res["agreement"] = agreement(res["outputs"], reference)
            res["saving"] = 1 - res["mean_exit_layer"] / L
            seq = mode == "sequence"
            res["criterion"] = f"{crit_name} (per sequence)" if seq else crit_name
            res["threshold"], res["exit_mode"] = thr, mode
            best[f"{crit_name}@{thr}" + ("/seq" if seq else "")] = res
    llm.engine.plan = None
    llm.engine.exit_mode = "batch"

    oracle = oracle_layers(bb, prompts, reference, layers)
    micro = micro_costs(llm, clf)
    perseq = perseq_step_costs(llm.engine, conc, rounds=5 if q else 9)

    for name, res in best.items():
        res = dict(res)
        res.pop("outputs")
        results[name] = res
    results |= baseline_results(best, reference, n_b1)
    for name, p in ppl.items():
        results[name]["perplexity"] = p
    if peer is None:
        results["llamacpp_b1"] = peer_info
    else:
        results["llamacpp_b1"] |= peer_info | {"timing": "generated tokens / wall time, prefill included, requests "
                                               "one after another (as full_b1); greedy, exactly max_tokens each"}
    exits = {k: v for k, v in results.items() if "@" in k and not k.endswith("/seq")}  # batch mode, as before
    ok = {k: v for k, v in exits.items() if v["agreement"] >= 0.95}
    pick = max(ok, key=lambda k: ok[k]["tokens_per_s"]) if ok else max(exits, key=lambda k: exits[k]["agreement"])
    results["best_exit"] = dict(exits[pick], name=pick, meets_agreement_95=bool(ok))
    results["oracle_saving"] = 1 - statistics.mean(oracle) / L
    results["oracle_mean_exit_layer"] = statistics.mean(oracle)
    results["ratios"] = {
        "full_vs_hf_b8": results["full"]["tokens_per_s"] / results["hf_generate"]["tokens_per_s"],
        "full_vs_hf_b1": results["full_b1"]["tokens_per_s"] / results["hf_generate_b1"]["tokens_per_s"],
        "best_exit_vs_full": results["best_exit"]["tokens_per_s"] / results["full"]["tokens_per_s"],
    } | dtype_ratios(results)
    # per-sequence vs batch exit mode at the same setting (interleaved runs, fastest of each)
    results["ratios"] |= {f"seq_vs_batch:{k[:-4]}": v["tokens_per_s"] / results[k[:-4]]["tokens_per_s"]
                          for k, v in results.items() if k.endswith("/seq")}
    results["micro_ms"] = micro
    results["perseq_step_ms"] = perseq
    results["config"] = {"model": args.model, "quick": q, "requests": n_req, "prompt_len": prompt_len,
                         "max_tokens": max_tokens, "concurrency": conc, "arrival_steps": arrive,
                         "b1_requests": n_b1, "repeats": repeats, "exit_layers": layers,
                         "perplexity": {"text": "text/test.txt", "tokens": ppl_tokens, "seed": 0, "window": ppl_window,
                                        "stride": ppl_window},
                         "classifier_train_s": clf_train_s, "threads": torch.get_num_threads(),
                         "machine": platform.machine(), "cpus": os.cpu_count(),
                         "loadavg": os.getloadavg(), "elapsed_s": time.perf_counter() - t_start}

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"{'system':28s} {'tok/s':>8s} {'ITL ms':>8s} {'TTFT s':>8s} {'exit L':>7s} {'saving':>7s} {'agree':>6s}")
    for name, r in results.items():
        if not isinstance(r, dict) or "tokens_per_s" not in r:
            continue
        ttft = "-" if r["ttft_s"] is None else f"{r['ttft_s']:.2f}"
        print(f"{name:28s} {r['tokens_per_s']:8.1f} {r['itl_ms']:8.1f} {ttft:>8s} {r['mean_exit_layer']:7.1f} "
              f"{r['saving']:7.1%} {r['agreement']:6.1%}")
    print(f"oracle saving {results['oracle_saving']:.1%} "
          f"(mean oracle exit layer {results['oracle_mean_exit_layer']:.1f})")
    print(f"engine perplexity (text/test.txt, {ppl_tokens} tokens from seed 0, windows of {ppl_window}): "
          + ", ".join(f"{name} ({DTYPE_SYSTEMS[name]}) {p['perplexity']:.3f} (top-1 = float32's on "
                      f"{p['top1_agreement_with_float32']:.1%}"
                      + (f"; int kernels {p['int_kernels']['perplexity']:.3f}, "
                         f"{p['int_kernels']['top1_agreement_with_float32']:.1%}" if "int_kernels" in p else "")
                      + ")" for name, p in ppl.items()))
    if peer is None:
        print(f"llamacpp_b1: {peer_info['skipped']}")
    print("ratios", {k: None if v is None else round(v, 2) for k, v in results["ratios"].items()})
    for b, m in micro.items():
        print(b, {k: round(v, 3) for k, v in m.items()})
    for name, m in perseq.items():
        print(f"per-sequence step b{conc} {name}: batch {m['batch_ms']:.1f} ms ({m['batch_row_layers']:.0%} of "
              f"row-layers), sequence {m['sequence_ms']:.1f} ms ({m['sequence_row_layers']:.0%}), "
              f"time ratio {m['sequence_vs_batch_time']:.2f}")
    png = Path(args.png) if args.png else out.with_suffix(".png")
    plot(results, png)
    print(f"wrote {out} and {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
