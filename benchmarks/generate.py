"""Generation benchmark for early-exit heads: HF ``generate`` vs the exitwise engine at full depth vs
early exit with calibrated heads at each alpha vs lossless self-speculative decoding, one process.

Prompts: the first ``--prompts`` WikiText test paragraphs (> 400 characters, no headings) of
``../shared/data/text/test.txt``, cut to ``--prompt-len`` tokens; ``--max-tokens`` greedy tokens each
(EOS ignored so every system makes the same number). At batch 1 the requests run one at a time; at
batch 8 they are all submitted at once (continuous batching, or static batches of 8 for HF).

Per system: tokens/s at batch 1 and 8, mean exit layer, layer saving, token agreement with the
engine's full-depth greedy output (position by position), and the perplexity of the generated text
under the full model. Speculative runs also report acceptance, wasted drafts, and the speed-up a
layer-count cost model predicts from their own statistics. ``oracle_saving`` is the saving of the
heads' oracle: each token exits at the first head whose argmax equals the full model's token.

Heads: ``--heads PATH`` (trained and calibrated with ``exitwise heads train`` / ``heads calibrate``);
without it, heads cached under ``$EXITWISE_CACHE/heads/`` are used, or trained on a small budget and
cached first (``--train-minutes``).

    .venv/bin/python benchmarks/generate.py --quick --out /tmp/generate.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATA, ROOT, decode_setup, test_prompts  # noqa: E402
from engine import agreement, run_engine, run_hf  # noqa: E402  (shared with the engine benchmark)
from exitwise.cli.model_args import add_model_args, model_spec  # noqa: E402

ALPHAS = [0.8, 0.9, 0.95, 0.99]


def ensure_heads(path: str | None, minutes: float, fit_tokens: int, alphas: list[float], model: str) -> Path:
    """The heads to use: ``path``, else the cached benchmark heads, trained and calibrated if missing."""
    from exitwise.cli import main as cli
    from exitwise.models.loading import cache_dir

    if path:
        return Path(path)
    stem = cache_dir() / "heads" / f"{Path(model).name}-bench"
    js = stem.with_suffix(".json")
    if js.is_file() and "thresholds" in json.loads(js.read_text()):
        return stem
    print(f"no cached heads at {stem}: training for {minutes} min, then calibrating", flush=True)
    stem.parent.mkdir(parents=True, exist_ok=True)
    text = DATA / "text"
    # translator heads: a least-squares start on fit_tokens (backbone passes only), then KL training
    # with a step count that fits the budget (the lr schedule warms up and decays over the steps)
    if cli(["heads", "train", "--model", model, "--text", str(text / "train.txt"), "--out", str(stem),
            "--kind", "translator", "--fit-tokens", str(fit_tokens), "--batch-size", "1",
            "--steps", str(max(1, int(minutes * 60 / 4.5))),  # ~4.5 s per 256-token step on one core
            "--max-minutes", str(minutes)]) != 0:
        raise SystemExit("heads training failed")
    if cli(["heads", "calibrate", "--heads", str(stem), "--text", str(text / "valid.txt"), "--max-tokens", "8192",
            "--alpha", *map(str, alphas)]) != 0:
        raise SystemExit("heads calibration failed")
    return stem


@torch.inference_mode()
def perplexity(bb, prompts, outputs) -> float:
    """exp(mean negative log-likelihood) of the generated tokens under the full model."""
    nll, n = 0.0, 0
    for p, o in zip(prompts, outputs, strict=True):
        ids = torch.tensor([p + o])
        logp = torch.log_softmax(bb.model(ids).logits[0, len(p) - 1:-1].float(), -1)  # (T, V)
        nll -= float(logp.gather(1, torch.tensor(o)[:, None]).sum())
        n += len(o)
    return math.exp(nll / n)


@torch.inference_mode()
def heads_oracle(bb, heads, prompts, outputs) -> list[int]:
    """Per generated token after the first: the first head layer whose argmax equals the full model's
    token (teacher forcing over prompt + full-depth output), else L."""
    L = bb.num_layers
    res = []
    for p, o in zip(prompts, outputs, strict=True):
        ids = torch.tensor([p + o[:-1]])
        hs = bb.hidden_states(ids)
        rows = slice(len(p), ids.shape[1])  # positions predicting o[1:] (o[0] comes from the prefill)
        target = torch.tensor(o[1:])
        agree = torch.stack([heads.logits(k, hs[layer][0, rows]).argmax(-1) == target
                             for k, layer in enumerate(heads.layers)])  # (H, T)
        for t in range(agree.shape[1]):
            ks = [k for k in range(len(heads.layers)) if agree[k, t]]
            res.append(heads.layers[ks[0]] if ks else L)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small run (<= 10 min, heads training included)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "generate" / "generate.json"))
    ap.add_argument("--heads", default=None, help="calibrated heads (default: cached benchmark heads)")
    ap.add_argument("--train-minutes", type=float, default=None, help="budget when heads must be trained")
    ap.add_argument("--prompts", type=int, default=None)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=None)
    ap.add_argument("--alphas", type=float, nargs="+", default=ALPHAS)
    ap.add_argument("--spec-alphas", type=float, nargs="+", default=None, help="alphas to draft with")
    ap.add_argument("--max-draft", type=int, default=6)
    ap.add_argument("--batch", type=int, default=8, help="the larger batch size (default: 8)")
    ap.add_argument("--repeats", type=int, default=None, help="runs per system, fastest kept")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared machine)")
    ap.add_argument("--plot", default=None, help="PNG path (default: next to --out)")
    add_model_args(ap, dtype="float32")  # the model's matmul weights; exit heads follow (int4 models: int8 heads)
    args = ap.parse_args()
    q = args.quick
    n_prompts = args.prompts or (8 if q else 16)
    max_tokens = args.max_tokens or (32 if q else 64)
    repeats = args.repeats or (1 if q else 2)
    spec_alphas = args.spec_alphas or ([0.9] if q else [0.8, 0.9, 0.95])
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    from exitwise.engine import LLM
    from exitwise.heads.model import ExitHeads

    heads_path = ensure_heads(args.heads, args.train_minutes or (2.0 if q else 10.0), 16384 if q else 65536,
                              sorted(set(args.alphas) | set(spec_alphas)), args.model)
    bb = model_spec(args).load()
    heads = ExitHeads.load(heads_path, bb)
    L = bb.num_layers
    prompts = test_prompts(bb.tokenizer, n_prompts, args.prompt_len)
    b1_prompts = prompts[: max(2, n_prompts // 2)]  # batch 1 is slow: half the prompts
    layer_ms, head_ms = layer_costs(bb)
    kv = dict(kv_cache_bytes=256 << 20)

    def heads_llm(alpha: float, batch: int, speculative: bool = False):
        extra = {"speculative": True, "max_draft": args.max_draft} if speculative else {}
        return LLM(bb, exit="heads", exit_kwargs={"path": heads_path, "alpha": alpha}, exit_threshold=0.0,
                   max_num_seqs=batch, **kv, **extra)

    systems = {"hf_generate": None, "full": lambda b: LLM(bb, max_num_seqs=b, **kv)}
    for a in args.alphas:
        systems[f"exit_a{a:g}"] = lambda b, a=a: heads_llm(a, b)
    for a in spec_alphas:
        systems[f"speculative_a{a:g}"] = lambda b, a=a: heads_llm(a, b, speculative=True)

    runs: dict[str, dict[int, dict]] = {name: {} for name in systems}
    for batch, group in ((1, b1_prompts), (args.batch, prompts)):
        arrive = [0] * len(group)
        for rep in range(repeats):  # interleaved; the fastest run of each system is kept
            for name, factory in systems.items():
                if name == "hf_generate":
                    r = run_hf(bb, group, max_tokens, batch)
                else:
                    llm = factory(batch)
                    r = run_engine(llm, group, arrive, max_tokens)
                    if llm.engine.spec is not None:
                        r["spec"] = llm.engine.spec.stats.as_dict()
                    if llm.engine.plan is not None:
                        r["exact_checks"] = llm.engine.plan.exact_checks
                best = runs[name].get(batch)
                if best is None or r["tokens_per_s"] > best["tokens_per_s"]:
                    runs[name][batch] = r
                print(f"b{batch} rep{rep} {name:18s} {r['tokens_per_s']:6.1f} tok/s", flush=True)

    ref1, ref8 = runs["full"][1]["outputs"], runs["full"][args.batch]["outputs"]
    oracle = heads_oracle(bb, heads, prompts, ref8)

    def summary(name: str) -> dict:
        r1, r8 = runs[name][1], runs[name][args.batch]
        exit_layer = r1["mean_exit_layer"] if name.startswith("exit") else L
        row = {"tokens_per_s": r1["tokens_per_s"], f"tokens_per_s_b{args.batch}": r8["tokens_per_s"],
               "speedup_vs_full": r1["tokens_per_s"] / runs["full"][1]["tokens_per_s"],
               f"speedup_vs_full_b{args.batch}": r8["tokens_per_s"] / runs["full"][args.batch]["tokens_per_s"],
               "itl_ms": r1["itl_ms"], "ttft_s": r1["ttft_s"],
               "agreement": agreement(r1["outputs"], ref1), f"agreement_b{args.batch}": agreement(r8["outputs"], ref8),
               "mean_exit_layer": exit_layer, "saving": 1 - exit_layer / L,
               "perplexity": perplexity(bb, b1_prompts, r1["outputs"])}
        if "exact_checks" in r1:  # full-confidence evaluations per token (each a full head unless none fits)
            row["exact_checks_per_token"] = r1["exact_checks"] / max(1, r1["tokens"] - len(b1_prompts))
        if name.startswith("exit"):
            row[f"mean_exit_layer_b{args.batch}"] = r8["mean_exit_layer"]
            row[f"saving_b{args.batch}"] = 1 - r8["mean_exit_layer"] / L
        if "spec" in r1:
            st = r1["spec"]
            row["identical"] = r1["outputs"] == ref1 and r8["outputs"] == ref8
            row["acceptance"] = st["acceptance"]
            row["wasted"] = st["wasted"]
            row["spec_b1"] = st
            row[f"spec_b{args.batch}"] = r8["spec"]
            # cost model in layer units from the run's own counts (batch 1): full depth costs L layers +
            # one head per token; a cycle costs its draft and verify layers plus one head per exact exit
            # check and one per cycle (its verification pass, or the final head of a full-depth step).
            # A draft token comes from its exit check's head; with free checks (a perfect gate) only
            # those heads would be paid.
            h = head_ms / layer_ms
            layers = st["draft_layers"] + st["verify_layers"]
            full_cost = st["tokens"] * (L + h)
            row["predicted_speedup"] = full_cost / (layers + h * (r1["exact_checks"] + st["cycles"]))
            row["predicted_speedup_free_checks"] = full_cost / (layers + h * (st["drafted"] + st["cycles"]))
        return row

    result = {
        "model": bb.name, "weight_dtype": bb.weight_dtype, "heads": str(heads_path),
        "head_layers": heads.layers, "num_layers": L,
        "prompts": n_prompts, "prompts_b1": len(b1_prompts), "prompt_len": args.prompt_len,
        "max_tokens": max_tokens, "batch": args.batch, "repeats": repeats, "threads": args.threads,
        "quick": q, "platform": platform.platform(), "torch": torch.__version__,
        "costs_ms": {"layer_b1": layer_ms, "head_b1": head_ms},
        "hf_generate": summary("hf_generate"), "full": summary("full"),
        "oracle_saving": 1 - statistics.mean(oracle) / L, "oracle_mean_exit_layer": statistics.mean(oracle),
        "early_exit": [{"alpha": a, **summary(f"exit_a{a:g}")} for a in args.alphas],
        "speculative_runs": [{"alpha": a, **summary(f"speculative_a{a:g}")} for a in spec_alphas],
    }
    best = max(result["speculative_runs"], key=lambda r: r["tokens_per_s"])
    result["speculative"] = best
    result["speculative"]["identical"] = all(r["identical"] for r in result["speculative_runs"])
    result["seconds"] = time.perf_counter() - t_start
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    plot(result, args.plot or str(out.with_suffix(".png")))
    print(f"wrote {out} ({result['seconds'] / 60:.1f} min)")


@torch.inference_mode()
def layer_costs(bb, reps: int = 30) -> tuple[float, float]:
    """Median ms of one decoder layer and of the output head for one token (batch 1)."""
    from exitwise.engine import LLM

    eng = LLM(bb, kv_cache_bytes=64 << 20).engine
    _, ctx, x = decode_setup(eng, 1, prompt_len=64)
    r = eng.runner

    def med(fn) -> float:
        fn()
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return 1000 * statistics.median(times)

    return med(lambda: r.layer(10, x, ctx, True)), med(lambda: r.logits(x))


def table(res: dict) -> str:
    b = res["batch"]
    lines = [f"{'system':22s} {'tok/s b1':>9s} {'x full':>7s} {f'tok/s b{b}':>9s} {'x full':>7s} {'agree':>6s} "
             f"{'exit':>5s} {'saving':>7s} {'ppl':>6s}  notes"]

    def line(name: str, r: dict, note: str = "") -> None:
        lines.append(f"{name:22s} {r['tokens_per_s']:9.1f} {r['speedup_vs_full']:7.2f} {r[f'tokens_per_s_b{b}']:9.1f} "
                     f"{r[f'speedup_vs_full_b{b}']:7.2f} {r['agreement']:6.3f} {r['mean_exit_layer']:5.1f} "
                     f"{r['saving']:7.1%} {r['perplexity']:6.2f}  {note}")

    line("hf_generate", res["hf_generate"])
    line("full", res["full"])
    for r in res["early_exit"]:
        line(f"exit alpha={r['alpha']:g}", r)
    for r in res["speculative_runs"]:
        line(f"speculative alpha={r['alpha']:g}", r,
             f"identical={r['identical']} acceptance={r['acceptance']:.2f} wasted={r['wasted']} "
             f"predicted x{r['predicted_speedup']:.2f} (free checks x{r['predicted_speedup_free_checks']:.2f})")
    lines.append(f"heads' oracle: mean exit layer {res['oracle_mean_exit_layer']:.1f} of {res['num_layers']}, "
                 f"saving {res['oracle_saving']:.1%}; layer {res['costs_ms']['layer_b1']:.2f} ms, "
                 f"head {res['costs_ms']['head_b1']:.2f} ms (batch 1)")
    return "\n".join(lines)


def plot(res: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    b = res["batch"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, title in ((axes[0], "tokens_per_s", "batch 1"), (axes[1], f"tokens_per_s_b{b}", f"batch {b}")):
        ee = res["early_exit"]
        ax.plot([r["agreement"] for r in ee], [r[key] for r in ee], "o-", label="early exit (heads)")
        for r in ee:
            ax.annotate(f"α={r['alpha']:g}", (r["agreement"], r[key]), fontsize=8)
        for name, marker in (("full", "s"), ("hf_generate", "^")):
            ax.plot([res[name]["agreement"]], [res[name][key]], marker, label=name)
        sp = res["speculative_runs"]
        ax.plot([r["agreement"] for r in sp], [r[key] for r in sp], "*", markersize=12, label="speculative")
        ax.set_xlabel("token agreement with full-depth greedy")
        ax.set_ylabel("tokens/s")
        ax.set_title(f"{res['model']}, {title}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
