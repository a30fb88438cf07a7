"""What does the early-exit heads check cost per token, against one decoder layer?

Two parts, batch 1 and batch 8, one process, one torch thread by default:

* micro: median milliseconds of one engine decoder layer (``ModelRunner.layer``), the output head,
  one full exit-head evaluation (logits + entropy: the faithful check at one head layer), and one
  gate (the prefilter: the shortlist entropy estimate of translator heads, or the linear probe), per
  step and per token;
* engine: greedy generation on prompts cut from WikiText test paragraphs with exit=None, the
  faithful heads criterion (``gate=False``) and the gated ones (``gate="probe"`` when the heads carry
  probes, ``gate="shortlist"`` for translator heads), interleaved ``--repeats`` times. The
  criteria's hooks are timed in place, so the exit-check cost per decode token is measured directly
  (not as a difference of two noisy wall times); decode ms/token, mean exit layer, full heads and
  gates evaluated per token, and token agreement with exit=None and with the faithful criterion are
  reported too.

    PYTHONPATH=src python benchmarks/heads_cost.py --heads PATH --alpha 0.8

Writes ``benchmarks/results/heads_cost/heads_cost.json`` and prints a table with ratios to one layer.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, decode_setup, test_prompts  # noqa: E402
from exitwise.cli.model_args import add_model_args, model_spec  # noqa: E402
from exitwise.exits.base import ExitCriterion  # noqa: E402


def median_ms(fn, n: int, rounds: int = 7) -> float:
    """Median over ``rounds`` of the mean milliseconds of n calls (the machine is shared: medians)."""
    fn()
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        times.append((time.perf_counter() - t) / n)
    return 1000 * statistics.median(times)


def gates(heads) -> list[str]:
    """The gates these heads support: the probe (with calibrated gates), the shortlist (translators)."""
    return (["probe"] if heads.has_gate else []) + (["shortlist"] if heads.kind == "translator" else [])


# ------------------------------------------------------------------------------------------- micro
@torch.inference_mode()
def micro(bb, heads, alpha: float, b: int, reps: int) -> dict:
    from exitwise.engine import LLMEngine
    from exitwise.exits.base import Readout
    from exitwise.exits.heads import HeadsCriterion

    eng = LLMEngine(bb, kv_cache_bytes=64 << 20, max_num_seqs=b)
    r = eng.runner
    seqs, ctx, x = decode_setup(eng, b)
    faithful = HeadsCriterion(heads, alpha, gate=False)
    layer = heads.layers[-1]
    res = {
        "layer_ms": median_ms(lambda: r.layer(10, x, ctx, True), reps),
        "output_head_ms": median_ms(lambda: r.logits(x), reps),
        # the faithful check at one head layer: that head's logits (V x D) and their entropy
        "exit_head_ms": median_ms(lambda: faithful.confidence(x, None, layer, Readout(x, r.logits)), reps),
    }
    for g in gates(heads):
        gated = HeadsCriterion(heads, alpha, gate=g)
        gated.begin(r.output, seqs)
        res[f"gate_{g}_ms"] = median_ms(lambda gated=gated: gated.prefilter(x, layer), reps)
        res[f"begin_{g}_ms"] = median_ms(lambda gated=gated: gated.begin(r.output, seqs), reps)
    for s in seqs:
        eng.abort(s.request_id)
    return res


# ------------------------------------------------------------------------------------------ engine
class Timed(ExitCriterion):
    """Wraps a criterion's hooks with perf_counter accumulators."""

    def __init__(self, crit):
        self.crit = crit
        self.seconds = 0.0
        self.heads_evaluated = 0  # full-vocabulary head evaluations (one per batch per layer)
        self.gates_evaluated = 0
        self.name, self.layers, self.has_prefilter = crit.name, crit.layers, crit.has_prefilter

    def check_params(self, params):
        return self.crit.check_params(params)

    def observe(self, seqs, logits):
        return self._time(self.crit.observe, seqs, logits)

    def select_rows(self, rows):
        return self.crit.select_rows(rows)

    def _time(self, fn, *a):
        t = time.perf_counter()
        out = fn(*a)
        self.seconds += time.perf_counter() - t
        return out

    def begin(self, head, seqs):
        return self._time(self.crit.begin, head, seqs)

    def prefilter(self, hidden, layer=None):
        k = self.crit.heads.index.get(layer)
        if self.crit.gate and k is not None \
                and not bool((self.crit._tau(k, hidden.shape[0], hidden.device) == float("-inf")).any()):
            self.gates_evaluated += 1
        return self._time(self.crit.prefilter, hidden, layer)

    def confidence(self, hidden, prev, layer, readout):
        out = self._time(self.crit.confidence, hidden, prev, layer, readout)
        self.heads_evaluated += int(readout.computed)
        return out


def run(llm, prompts: list[list[int]], batch: int, max_tokens: int) -> dict:
    """Generate all prompts ``batch`` at a time; decode-step wall time and exit layers."""
    from exitwise.engine import SamplingParams

    eng = llm.engine
    sp = SamplingParams(max_tokens=max_tokens, ignore_eos=True, return_exit_layers=True)
    decode_s, tokens, outs = 0.0, 0, []
    for s in range(0, len(prompts), batch):
        rids = [eng.add_request(p, sp) for p in prompts[s:s + batch]]
        done = {}
        while eng.has_unfinished():
            before = eng.stats["decode_tokens"]
            t = time.perf_counter()
            step = eng.step()
            dt = time.perf_counter() - t
            if eng.stats["decode_tokens"] > before:
                decode_s += dt
                tokens += eng.stats["decode_tokens"] - before
            done.update({o.request_id: o for o in step if o.finished})
        outs += [done[r] for r in rids]
    layers = [lay for o in outs for lay in o.exit_layers[1:]]  # the first token comes from prefill
    return {"decode_ms_per_token": 1000 * decode_s / tokens, "decode_tokens": tokens,
            "mean_exit_layer": sum(layers) / len(layers), "token_ids": [o.token_ids for o in outs]}


def engine_costs(bb, heads, alpha: float, prompts, batch: int, max_tokens: int, repeats: int) -> dict:
    from exitwise.engine import LLM
    from exitwise.exits.heads import HeadsCriterion

    crits = {"none": None, "faithful": HeadsCriterion(heads, alpha, gate=False),
             **{g: HeadsCriterion(heads, alpha, gate=g) for g in gates(heads)}}
    timed = {n: (Timed(c) if c is not None else None) for n, c in crits.items()}
    llms = {n: LLM(bb, kv_cache_bytes=64 << 20, max_num_seqs=batch, exit=t,
                   **({"exit_threshold": 0.0} if t is not None else {})) for n, t in timed.items()}
    for llm in llms.values():  # warm-up
        run(llm, prompts[:batch], batch, 4)
    for t in timed.values():
        if t is not None:
            t.seconds, t.heads_evaluated, t.gates_evaluated = 0.0, 0, 0
    per = {n: [] for n in llms}
    last = {}
    for _ in range(repeats):  # interleaved: slow phases of the shared machine hit every system
        for n, llm in llms.items():
            res = run(llm, prompts, batch, max_tokens)
            per[n].append(res["decode_ms_per_token"])
            last[n] = res
    def agree(ids, ref):
        same = sum(a == b for x, y in zip(ids, ref, strict=True) for a, b in zip(x, y, strict=True))
        return same / sum(len(x) for x in ref)

    out = {}
    for n in llms:
        res = last[n]
        row = {"decode_ms_per_token": statistics.median(per[n]), "decode_ms_per_token_runs": per[n],
               "mean_exit_layer": res["mean_exit_layer"],
               "agreement_with_none": agree(res["token_ids"], last["none"]["token_ids"]),
               "agreement_with_faithful": agree(res["token_ids"], last["faithful"]["token_ids"])}
        t = timed[n]
        if t is not None:
            total = res["decode_tokens"] * repeats
            row.update({"check_ms_per_token": 1000 * t.seconds / total,
                        "heads_per_step": t.heads_evaluated * batch / total,
                        "gates_per_step": t.gates_evaluated * batch / total})
        out[n] = row
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--heads", required=True, help="calibrated heads (with probes for the probe gate)")
    ap.add_argument("--alpha", type=float, default=0.8)
    add_model_args(ap, dtype="float32")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--reps", type=int, default=20, help="calls per micro-timing round")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "heads_cost" / "heads_cost.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from exitwise.heads.model import ExitHeads

    bb = model_spec(args).load()
    heads = ExitHeads.load(args.heads, bb)
    prompts = test_prompts(bb.tokenizer, args.prompts, args.prompt_len)
    results: dict = {"model": bb.name, "heads": str(args.heads), "head_layers": heads.layers, "alpha": args.alpha,
                     "kind": heads.kind, "has_gate": heads.has_gate, "gates": gates(heads),
                     "threads": args.threads, "machine": platform.machine(),
                     "torch": torch.__version__, "prompts": args.prompts, "prompt_len": args.prompt_len,
                     "max_tokens": args.max_tokens, "repeats": args.repeats}
    for b in (1, 8):
        m = micro(bb, heads, args.alpha, b, args.reps)
        e = engine_costs(bb, heads, args.alpha, prompts, b, args.max_tokens, args.repeats)
        results[f"b{b}"] = {"micro": m, "engine": e}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    print(f"wrote {args.out}")
    return 0


def table(results: dict) -> str:
    lines = [f"{results['model']}, heads at {results['head_layers']}, alpha={results['alpha']}, "
             f"{results['threads']} thread(s); per token, ratio = / one decoder layer"]
    lines.append(f"{'cost per token':<42} {'b1 ms':>8} {'x layer':>8} {'b8 ms':>8} {'x layer':>8}")

    def row(label, get):
        cells = []
        for b in (1, 8):
            r = results[f"b{b}"]
            v = get(r)
            lay = r["micro"]["layer_ms"] / b
            cells += ["-", "-"] if v is None else [f"{v:.3f}", f"{v / lay:.2f}"]
        lines.append(f"{label:<42} " + " ".join(f"{c:>8}" for c in cells))

    def per_tok(key):
        return lambda r: None if r["micro"].get(key) is None else r["micro"][key] / (1 if r is results["b1"] else 8)

    row("one decoder layer", per_tok("layer_ms"))
    row("output head (49k rows)", per_tok("output_head_ms"))
    row("one exit head (logits + entropy)", per_tok("exit_head_ms"))
    gs = results.get("gates", ["gated"])
    for g in gs:
        row(f"one gate, {g} (prefilter)", per_tok(f"gate_{g}_ms"))
    for n in ("faithful", *gs):
        row(f"exit check, {n} (engine, measured)", lambda r, n=n: r["engine"][n]["check_ms_per_token"])
    for n in ("none", "faithful", *gs):
        row(f"decode step, exit={n}", lambda r, n=n: r["engine"][n]["decode_ms_per_token"])
    lines.append(f"{'engine':<10} {'b':>2} {'ms/token':>8} {'exit layer':>10} {'heads/step':>10} {'gates/step':>10} "
                 f"{'=none':>6} {'=faithful':>9}")
    for b in (1, 8):
        for n, e in results[f"b{b}"]["engine"].items():
            lines.append(f"{n:<10} {b:>2} {e['decode_ms_per_token']:>8.2f} {e['mean_exit_layer']:>10.2f} "
                         f"{e.get('heads_per_step', 0):>10.2f} {e.get('gates_per_step', 0):>10.2f} "
                         f"{e['agreement_with_none']:>6.3f} {e.get('agreement_with_faithful', 1.0):>9.3f}")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
