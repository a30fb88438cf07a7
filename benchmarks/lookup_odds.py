"""How far a context (lookup) draft is worth drafting: the odds of its tokens by match length, and
draft-length rules replayed on the engine's own greedy output.

The engine generates greedy continuations of prompts drawn with a seed from each text (the fit
texts, default the code and WikiText valid splits; the replay texts, default their test splits).
Greedy output does not depend on the drafts, so every rule can be replayed on it exactly: at each
position the lookup source proposes, the proposal is checked against the output, and the cycle costs
what the engine's measured verification pass over that many positions costs (``verify_cost`` of
benchmarks/speculate.py, measured here on the same model). Reported:

* ``fit``: per match length m (1..12), the share of first tokens kept and of later tokens kept given
  the ones before were: what ``MatchOdds``' prior in src/exitwise/engine/drafts/lookup.py is;
* ``replay``: tokens per decode-step of cost, for every text, for the engine's rule (``odds``) and for
  drafting every found token up to 2..8 (``always-k``).

    .venv/bin/python benchmarks/lookup_odds.py --out benchmarks/results/speculate/lookup_odds.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATA, ROOT  # noqa: E402
from exitwise.cli.model_args import add_model_args, model_spec  # noqa: E402
from speculate import draw_prompts, pass_cost  # noqa: E402


def greedy(llm, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    from exitwise.engine import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    return [llm.generate([p], params)[0].token_ids for p in tqdm(prompts, desc="greedy", leave=False)]


def kept(draft: list[int], truth: list[int]) -> int:
    n = 0
    while n < len(draft) and n < len(truth) and draft[n] == truth[n]:
        n += 1
    return n


def fit(pairs, cap: int, depth: int = 8) -> dict:
    """Per match length: [first kept, then kept given the ones before] over ``depth`` positions."""
    from exitwise.engine import SamplingParams
    from exitwise.engine.drafts import LookupDraft
    from exitwise.engine.sequence import Sequence

    reached = [[0] * depth for _ in range(cap + 1)]
    hit = [[0] * depth for _ in range(cap + 1)]
    src = LookupDraft()
    for prompt, out in pairs:
        seq = Sequence("fit", list(prompt), SamplingParams())
        for t in range(len(out)):
            e, m = src.match(seq)
            if e >= 0:
                a = kept(src.follow(seq.token_ids, e, depth), out[t:])
                for i in range(min(depth, a + 1)):
                    reached[m][i] += 1
                    hit[m][i] += i < a
            seq.token_ids.append(out[t])
    return {m: {"drafts": reached[m][0], "kept": [round(hit[m][i] / reached[m][i], 3) if reached[m][i] else None
                                                 for i in range(depth)]} for m in range(1, cap + 1)}


def replay(pairs, source, cost: dict[int, float], max_draft: int) -> dict:
    """Run ``source`` over the outputs as the speculative decoder would at batch 1: tokens per step of
    cost (a verification pass over 1 + k positions costs ``cost[k]`` decode steps)."""
    from exitwise.engine import SamplingParams
    from exitwise.engine.drafts import DraftFeedback
    from exitwise.engine.sequence import Sequence

    steps = tokens = drafted = accepted = 0
    for prompt, out in pairs:
        seq = Sequence("replay", list(prompt), SamplingParams())
        t = 0
        while t < len(out):
            lim = min(max_draft, len(out) - t - 1)
            draft = source.propose([seq], [lim], lambda s: True)
            k = len(draft.tokens[0])
            a = kept(draft.tokens[0], out[t:])
            if k:
                source.observe([seq], draft, [DraftFeedback(k, a, 1)])
            steps += cost[k] if k else 1.0
            seq.token_ids.extend(out[t:t + a + 1])
            tokens, drafted, accepted, t = tokens + a + 1, drafted + k, accepted + a, t + a + 1
    return {"tokens_per_step": tokens / steps, "drafted": drafted, "accepted": accepted, "tokens": tokens}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(ap)
    ap.add_argument("--fit", type=Path, nargs="+", default=[DATA / "code" / "valid.txt", DATA / "text" / "valid.txt"])
    ap.add_argument("--replay", type=Path, nargs="+", default=[DATA / "code" / "test.txt", DATA / "text" / "test.txt"])
    ap.add_argument("--prompts", type=int, default=30, help="prompts per text")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--max-draft", type=int, default=6)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "speculate" / "lookup_odds.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from exitwise.engine import LLM
    from exitwise.engine.config import EngineConfig
    from exitwise.engine.drafts import LookupDraft, Payoff
    from exitwise.engine.drafts.lookup import MatchOdds

    bb = model_spec(args).load()
    llm = LLM(bb, EngineConfig(max_num_seqs=1, kv_cache_bytes=96 << 20,
                               max_model_len=args.prompt_len + args.max_tokens + 16))
    texts = {}
    for path in dict.fromkeys([*args.fit, *args.replay]):
        prompts = draw_prompts(bb.tokenizer, path, args.prompts, args.prompt_len, args.seed, 768)
        texts[path] = list(zip(prompts, greedy(llm, prompts, args.max_tokens), strict=True))
    passes = pass_cost(llm, texts[args.replay[0]][0][0], ks=tuple(range(9)))
    cost = {int(k): v for k, v in passes["verify_over_decode"].items()}

    cap = MatchOdds().cap
    fitted = fit([p for path in args.fit for p in texts[path]], cap)
    rules = {"odds": lambda: LookupDraft()} | {
        f"always-{k}": (lambda: LookupDraft(payoff=Payoff.free()), k)
        for k in (2, 3, 4, 6, 8)}
    result = {"model": bb.name, "fit_texts": [str(p) for p in args.fit], "prompts": args.prompts,
              "prompt_len": args.prompt_len, "max_tokens": args.max_tokens, "seed": args.seed,
              "verify_cost": passes, "fit": fitted, "replay": {}}
    for path in args.replay:
        row = {}
        for name, rule in rules.items():
            make, md = rule if isinstance(rule, tuple) else (rule, args.max_draft)
            row[name] = replay(texts[path], make(), cost, md)
        result["replay"][str(path)] = row

    print(f"{bb.name}: {args.prompts} prompts a text, {args.max_tokens} greedy tokens; a pass over 1 + k positions = "
          + " / ".join(f"{cost[k]:.2f}" for k in sorted(cost)) + " decode steps")
    print("match length   drafts  first kept  later kept (mean)")
    for m, f in fitted.items():
        later = [x for x in f["kept"][1:] if x is not None]
        print(f"{m:>12} {f['drafts']:>8} {f['kept'][0] or 0:>11.2f} {sum(later) / max(1, len(later)):>11.2f}")
    print(f"{'text':<40}" + "".join(f"{n:>10}" for n in rules))
    for path, row in result["replay"].items():
        print(f"{Path(path).parent.name + '/' + Path(path).name:<40}"
              + "".join(f"{r['tokens_per_step']:>10.3f}" for r in row.values()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
