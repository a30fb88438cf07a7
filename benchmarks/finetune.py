"""Before / after ``exitwise finetune``: the original model and its fine-tuned copy side by side, one process.

(a) Exit profile on held-out text (teacher forced, exitwise.analysis.profile): per layer, top-1 agreement of
    the readout (final norm + head) with the model's own final layer -- and, for the fine-tuned model,
    with the *original's* final layer -- and the oracle exit (first layer from which the argmax stays
    final): its distribution and mean, over all layers and over the draft layers.
(b) Final-layer perplexity of each on ``--text`` (exitwise.analysis.perplexity, the engine's own forward),
    their ratio, the fine-tuned final layer's top-1 agreement with the original's and its KL to it.
(c) Lossless self-speculative decoding, greedy, at batch 1 and ``--batch`` concurrent requests:
    ``layerskip``: drafts always leave at layer E through the model's own head (LayerSkip's
    self-speculation; E = the shallowest draft layer of the manifest unless ``--draft-layer``);
    ``dynamic``: drafts leave at the first of the manifest's draft layers where the engine's softmax
    exit plan is confident (``--threshold``), as ``exitwise generate --speculative`` does on the
    directory. Each model runs them against its own full-depth engine; tokens/s ratios are given
    against that engine and against the original's full-depth engine, with the acceptance rate and
    whether the speculative output is identical to the full-depth greedy output (it must be).

Prompts: ``--prompts`` paragraphs of the test text drawn with ``--seed`` (not the file's head), cut to
``--prompt-len`` tokens; ``--max-tokens`` greedy tokens each, EOS ignored. Repeats are interleaved
(every system once, then again) and the fastest run of each system is kept: the machine is shared.

    PYTHONPATH=src python benchmarks/finetune.py smollm2-135m runs/smollm2-ft --quick
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATA, ROOT, sampled_prompts  # noqa: E402
from engine import run_engine  # noqa: E402  (shared with the engine benchmark)
from exitwise.cli.model_args import add_weight_args  # noqa: E402

MODELS = ("original", "finetuned")
SYSTEMS = ("full", "layerskip", "dynamic")


# ------------------------------------------------------------------------------------------ (a) profile
def profile_pair(base, tuned, ids: list[int], exit_layers: list[int], draft_layers: list[int]) -> dict:
    """Per-layer agreement and oracle exits of both models on the same teacher-forced tokens."""
    from exitwise.analysis.profile import collect, oracle_layers

    reads = {"original": collect(base, ids, {}, exit_layers), "finetuned": collect(tuned, ids, {}, exit_layers)}
    out: dict = {"tokens": len(ids), "exit_layers": exit_layers, "draft_layers": draft_layers}
    for name, ro in reads.items():
        agree = ro.agree()
        oracle, grid = oracle_layers(agree), oracle_layers(agree, draft_layers)
        out[name] = {
            "layer_agreement": _rounded(agree.float().mean(1)),
            "oracle_mean_layer": round(float(oracle.float().mean()), 3),
            "oracle_histogram": torch.bincount(oracle, minlength=ro.num_layers + 1)[1:].tolist(),
            "oracle_mean_layer_draft_grid": round(float(grid.float().mean()), 3),
        }
    # the fine-tuned readouts against what the original predicts: did the exits learn the original?
    vs_original = reads["finetuned"].argmax == reads["original"].argmax[-1]
    out["finetuned"]["layer_agreement_with_original"] = _rounded(vs_original.float().mean(1))
    return out


def _rounded(t: torch.Tensor) -> list[float]:
    return [round(float(x), 4) for x in t]


# --------------------------------------------------------------------------------------- (b) perplexity
@torch.inference_mode()
def final_kl(base, tuned, ids: list[int], window: int = 512) -> float:
    """Mean KL(p_original || p_finetuned) of the final layers per token, in nats, over windows."""
    total, n = 0.0, 0
    for a in range(0, len(ids) - 1, window):
        piece = torch.tensor([ids[a:a + window]], device=base.device)
        p = torch.log_softmax(base.logits(piece)[0].float(), -1)
        q = torch.log_softmax(tuned.logits(piece)[0].float(), -1)
        total += float(torch.nn.functional.kl_div(q, p, reduction="sum", log_target=True))
        n += piece.shape[1]
    return total / n


def perplexity_pair(base, tuned, ids: list[int], window: int = 512) -> dict:
    """Final-layer perplexity of both (the engines' forward passes), ratio, top-1 agreement and KL."""
    from exitwise.analysis.perplexity import perplexity, top1_agreement
    from exitwise.engine import LLM

    res = {name: perplexity(LLM(bb, kv_cache_bytes=64 << 20), ids, window=window, keep_predictions=True)
           for name, bb in (("original", base), ("finetuned", tuned))}
    return {"tokens": res["original"].tokens, "window": window,
            "original": round(res["original"].perplexity, 4), "finetuned": round(res["finetuned"].perplexity, 4),
            "ratio": round(res["finetuned"].perplexity / res["original"].perplexity, 4),
            "final_top1_agreement_with_original": round(top1_agreement(res["finetuned"], res["original"]), 4),
            "final_kl_to_original": round(final_kl(base, tuned, ids, window), 4)}


# -------------------------------------------------------------------------------------- (c) speculative
def make_llm(bb, system: str, batch: int, draft_layer: int, draft_layers: list[int], threshold: float,
             max_draft: int):
    """The engine of one system: full depth, LayerSkip drafts at one layer, or the dynamic exit plan."""
    from exitwise.engine import LLM

    kv = {"kv_cache_bytes": 256 << 20, "max_num_seqs": batch}
    if system == "full":
        return LLM(bb, **kv)
    if system == "layerskip":  # threshold 0: every draft step is "confident" at E, i.e. always exits there
        layers, thr = [draft_layer], 0.0
    else:
        layers, thr = draft_layers, threshold
    return LLM(bb, exit="softmax", exit_layers=layers, exit_threshold=thr, speculative=True,
               max_draft=max_draft, **kv)


def run_decoding(models: dict, prompts: dict[int, list[list[int]]], max_tokens: int, repeats: int,
                 draft_layer: int, draft_layers: list[int], threshold: float, max_draft: int) -> dict:
    """{model: {system: {batch: fastest run}}}, the runs interleaved over repeats."""
    runs: dict = {m: {s: {} for s in SYSTEMS} for m in models}
    for batch, group in prompts.items():
        arrive = [0] * len(group)  # all at once: batch-1 groups run one request at a time (max_num_seqs 1)
        for rep in range(repeats):
            for m, bb in models.items():
                for s in SYSTEMS:
                    llm = make_llm(bb, s, batch, draft_layer, draft_layers, threshold, max_draft)
                    r = run_engine(llm, group, arrive, max_tokens)
                    if llm.engine.spec is not None:
                        r["spec"] = llm.engine.spec.stats.as_dict()
                    best = runs[m][s].get(batch)
                    if best is None or r["tokens_per_s"] > best["tokens_per_s"]:
                        runs[m][s][batch] = r
                    print(f"b{batch} rep{rep} {m:9s} {s:9s} {r['tokens_per_s']:7.1f} tok/s", flush=True)
    return runs


def decoding_summary(runs: dict) -> dict:
    """Per model, system and batch: tokens/s, ratios to its own and to the original's full depth,
    acceptance and whether the output equals full-depth greedy."""
    out: dict = {}
    for m, systems in runs.items():
        out[m] = {}
        for s, by_batch in systems.items():
            out[m][s] = {}
            for b, r in by_batch.items():
                own, orig = runs[m]["full"][b], runs["original"]["full"][b]
                row = {"tokens_per_s": round(r["tokens_per_s"], 2),
                       "x_own_full": round(r["tokens_per_s"] / own["tokens_per_s"], 3),
                       "x_original_full": round(r["tokens_per_s"] / orig["tokens_per_s"], 3),
                       "identical_to_full": r["outputs"] == own["outputs"]}
                if "spec" in r:
                    st = r["spec"]
                    row.update(acceptance=round(st["acceptance"], 4), tokens_per_cycle=round(  # per sequence
                        st["tokens"] / max(1, st["cycles"]) / b, 3), spec=st)
                out[m][s][f"b{b}"] = row
    return out


# ------------------------------------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("base", help="the original model (name, directory or .gguf)")
    ap.add_argument("finetuned", help="the `exitwise finetune` output directory")
    ap.add_argument("--quick", action="store_true", help="small run (a few minutes on one CPU core)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "finetune" / "finetune.json"))
    ap.add_argument("--text", default=str(DATA / "text" / "test.txt"), help="held-out text (profile, perplexity, "
                                                                            "prompts)")
    ap.add_argument("--profile-tokens", type=int, default=None, help="teacher-forced tokens (default 1024 / 4096)")
    ap.add_argument("--ppl-tokens", type=int, default=None, help="perplexity tokens (default 4096 / 32768)")
    ap.add_argument("--window", type=int, default=512, help="perplexity window (default 512)")
    ap.add_argument("--prompts", type=int, default=None, help="prompts at the larger batch (default 8 / 16)")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=None, help="greedy tokens per prompt (default 32 / 64)")
    ap.add_argument("--batch", type=int, default=8, help="the larger batch size (default 8)")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved runs per system (default 2 / 3)")
    ap.add_argument("--draft-layer", type=int, default=None, help="LayerSkip draft depth E (default: the "
                                                                  "manifest's shallowest draft layer)")
    ap.add_argument("--threshold", type=float, default=0.9, help="dynamic plan's softmax threshold (default 0.9)")
    ap.add_argument("--max-draft", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0, help="draws the prompts and the text spans")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared machine)")
    add_weight_args(ap, dtype="float32", dtypes=("float32", "bfloat16", "int8"))  # of both models
    ap.add_argument("--skip-decoding", action="store_true", help="only (a) and (b)")
    args = ap.parse_args()
    q = args.quick
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    from exitwise import load_model
    from exitwise.analysis.perplexity import text_tokens
    from exitwise.training.manifest import read_manifest

    manifest = read_manifest(args.finetuned)
    if manifest is None:
        raise SystemExit(f"{args.finetuned} is not an `exitwise finetune` directory (no manifest)")
    base = load_model(args.base, device=args.device, dtype=args.dtype)
    tuned = load_model(args.finetuned, device=args.device, dtype=args.dtype)
    exit_layers, draft_layers = manifest["exit_layers"], manifest["draft_layers"]
    draft_layer = args.draft_layer or min(draft_layers)
    tok = base.tokenizer
    # different seeds: the profile span and the perplexity span should not be the same text
    prof_ids = text_tokens(tok, args.text, args.profile_tokens or (1024 if q else 4096), seed=args.seed)
    ppl_ids = text_tokens(tok, args.text, args.ppl_tokens or (4096 if q else 32768), seed=args.seed + 1)

    result: dict = {"base": args.base, "finetuned": args.finetuned, "manifest": {
        k: manifest.get(k) for k in ("base_model", "steps", "tokens", "seconds", "exit_layers", "draft_layers",
                                     "config")}, "num_layers": base.num_layers, "text": args.text,
        "quick": q, "threads": args.threads, "device": args.device, "dtype": args.dtype, "seed": args.seed,
        "platform": platform.platform(), "torch": torch.__version__}
    result["profile"] = profile_pair(base, tuned, prof_ids, exit_layers, draft_layers)
    print(f"profile done ({time.perf_counter() - t_start:.0f} s)", flush=True)
    result["perplexity"] = perplexity_pair(base, tuned, ppl_ids, args.window)
    print(f"perplexity done ({time.perf_counter() - t_start:.0f} s)", flush=True)
    if not args.skip_decoding:
        n = args.prompts or (8 if q else 16)
        prompts = sampled_prompts(tok, n, args.prompt_len, args.seed, Path(args.text))
        groups = {1: prompts[: max(2, n // 2)], args.batch: prompts}  # batch 1 is slow: half the prompts
        runs = run_decoding({"original": base, "finetuned": tuned}, groups, args.max_tokens or (32 if q else 64),
                            args.repeats or (2 if q else 3), draft_layer, draft_layers, args.threshold,
                            args.max_draft)
        result["decoding"] = {"draft_layer": draft_layer, "draft_layers": draft_layers, "threshold": args.threshold,
                              "max_draft": args.max_draft, "prompts": {f"b{b}": len(g) for b, g in groups.items()},
                              "prompt_len": args.prompt_len, "max_tokens": args.max_tokens or (32 if q else 64),
                              "repeats": args.repeats or (2 if q else 3), **decoding_summary(runs)}
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))
    print(f"wrote {out} ({result['seconds'] / 60:.1f} min)")
    bad = [f"{m}/{s}/{b}" for m in MODELS for s in SYSTEMS
           for b, row in result.get("decoding", {}).get(m, {}).get(s, {}).items() if not row["identical_to_full"]]
    if bad:
        raise SystemExit(f"speculative output differs from full-depth greedy: {bad}")


def table(res: dict) -> str:
    p, L = res["profile"], res["num_layers"]
    shown = sorted(set(p["exit_layers"]) | {L - 1})
    lines = [f"top-1 agreement with the model's own final layer ({p['tokens']} tokens):",
             f"{'layer':28s} " + " ".join(f"{x:>6d}" for x in shown) + f" {'oracle':>7s} {'on drafts':>9s}"]
    rows = [("original", p["original"]["layer_agreement"], p["original"]),
            ("finetuned", p["finetuned"]["layer_agreement"], p["finetuned"]),
            ("finetuned vs original final", p["finetuned"]["layer_agreement_with_original"], None)]
    for name, agree, o in rows:
        tail = f" {o['oracle_mean_layer']:7.2f} {o['oracle_mean_layer_draft_grid']:9.2f}" if o else ""
        lines.append(f"{name:28s} " + " ".join(f"{agree[x - 1]:6.3f}" for x in shown) + tail)
    pp = res["perplexity"]
    lines.append(f"perplexity ({pp['tokens']} tokens): original {pp['original']:.3f}, fine-tuned "
                 f"{pp['finetuned']:.3f} (x{pp['ratio']:.3f}); final layer vs original: top-1 "
                 f"{pp['final_top1_agreement_with_original']:.3f}, KL {pp['final_kl_to_original']:.4f} nats/token")
    d = res.get("decoding")
    if d:
        lines.append(f"self-speculative (layerskip: E={d['draft_layer']}; dynamic: softmax >= {d['threshold']:g} at "
                     f"{d['draft_layers']}), {d['max_tokens']} tokens per prompt:")
        lines.append(f"{'model':10s} {'system':10s} {'batch':>5s} {'tok/s':>7s} {'x own':>6s} {'x orig':>6s} "
                     f"{'accept':>6s} {'tok/cyc':>7s} identical")
        for m in MODELS:
            for s in SYSTEMS:
                for b, r in d[m][s].items():
                    acc = (f"{r['acceptance']:6.3f} {r['tokens_per_cycle']:7.2f}" if "acceptance" in r
                           else " " * 14)
                    lines.append(f"{m:10s} {s:10s} {b[1:]:>5s} {r['tokens_per_s']:7.1f} {r['x_own_full']:6.3f} "
                                 f"{r['x_original_full']:6.3f} {acc} {'yes' if r['identical_to_full'] else 'NO'}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
