"""Speculative decoding benchmark: full depth vs each draft source, batch 1 and batch 8, one process.

Prompts are drawn with a seed from ``--text`` (default: the Python standard-library test split,
``../shared/data/code/test.txt``; any UTF-8 text file; or an XSum ``.jsonl``, whose articles are cut
at ``--xsum-len`` tokens and followed by "Summary:"), ``--prompt-len`` tokens each, and continued
greedily for ``--max-tokens`` tokens by:

* ``full_b1`` / ``full_b8``: the engine at full depth, requests one after another / 8 concurrent;
* ``spec_b1`` / ``spec_b8``: speculative decoding with ``--draft auto`` as ``exitwise generate
  --speculative`` runs it (context n-grams, else the exit criterion's early exits when ``--heads`` is
  given; the adapter only where one is configured, which the engine's default is not: measured apart);
* ``drafts.<source>.b1``: each draft source alone (``lookup``; ``exit`` with ``--heads``; ``adapter``);
* ``llamacpp_b1`` / ``llamacpp_lookup_b1``: llama.cpp (``make peer``) on the same GGUF, plain and with
  its prompt-lookup draft (``LlamaPromptLookupDecoding``), one request after another (skipped, saying
  so, when llama-cpp-python is not installed).

Every system runs once untimed (one request, 8 tokens: its first touches), then ``--repeats`` times,
interleaved, and keeps its fastest run (the machine is shared; other processes only add time).
Speculative outputs are checked token for token against ``full``'s (``identical``). ``itl_ms`` is decode
time per generated token (prefill excluded). ``verify_cost`` times one layer matrix (the fused gate|up
of every layer in turn, so weights are not cache-resident) at 1, 5 and 9 rows, and a whole verification
pass at 1 + k positions against a plain decode step: what a draft has to beat. ``cost_model`` predicts
each speculative run's speed from its own counts (passes, rows, drafted tokens) and the measured pass
costs, to say why a target is or is not met.

    .venv/bin/python benchmarks/speculate.py --quick --out benchmarks/results/speculate/code.json
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATA, ROOT  # noqa: E402
from engine import arrivals, b1_arrivals, llamacpp_peer, run_engine, run_llamacpp  # noqa: E402
from exitwise.cli.model_args import add_model_args, model_spec  # noqa: E402

DEFAULT_TEXT = DATA / "code" / "test.txt"
ADAPTERS = ROOT / "benchmarks" / "results" / "speculate"


def find_or_train_adapter(bb, spec: str, layer: int, text: Path, minutes: float) -> str | None:
    """The adapter to draft with: ``spec`` a path; ``none``; or ``auto``, the one saved for this model
    and layer under ADAPTERS when it loads for this model, else one trained here on ``text`` for
    ``minutes`` (8,192 cached tokens) and saved there, so the next run reuses it."""
    from exitwise.errors import ExitwiseError
    from exitwise.heads.adapter import Adapter
    from exitwise.heads.adapter_train import fit_adapter

    if spec != "auto":
        return None if spec == "none" else spec
    stem = ADAPTERS / f"adapter-{Path(bb.name).name}-E{layer}"
    try:
        Adapter.load(stem, bb)
        return str(stem)
    except (ExitwiseError, OSError) as exc:
        print(f"no usable saved adapter at {stem} ({str(exc)[:120]}): training one for {minutes} min on {text}",
              flush=True)
    adapter = fit_adapter(bb, text, layer, tokens=8192, cache=stem.with_suffix(".cache"), max_minutes=minutes)
    adapter.save(stem)
    return str(stem)


# ------------------------------------------------------------------------------------------ prompts
def draw_prompts(tok, path: Path, n: int, length: int, seed: int, xsum_len: int) -> list[list[int]]:
    """n prompts drawn with ``random.Random(seed)``: windows of ``length`` tokens at random offsets of a
    text file (code has no paragraphs to speak of), or whole XSum articles cut at ``xsum_len`` tokens,
    then "Summary:"."""
    rng = random.Random(seed)
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        rng.shuffle(rows)
        tail = tok("\nSummary:", add_special_tokens=False)["input_ids"]
        return [tok(r["article"])["input_ids"][:xsum_len] + tail for r in rows[:n]]
    text = path.read_text(encoding="utf-8")
    if len(text) < 8 * length:
        raise SystemExit(f"{path} is too short for {length}-token prompts")
    out = []
    while len(out) < n:
        start = rng.randrange(0, len(text) - 8 * length)
        ids = tok(text[start:start + 8 * length], add_special_tokens=False)["input_ids"]
        if len(ids) >= length:
            out.append(ids[:length])
    return out


# -------------------------------------------------------------------------------------- verify cost
def _median_us(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e6 * statistics.median(times)


def matrix_cost(llm, rows=(1, 2, 5, 9, 16), reps: int = 7) -> dict:
    """µs of the fused gate|up matmul at each row count, summed over every layer (one pass over all
    layers per timing: what a step streams), and each count's ratio to 1 row."""
    dec = llm.engine.runner.model
    d = dec.hidden_size

    def one(r):
        x = torch.randn(r, d)
        mods = [w.linears[2] for w in dec.layers]
        return lambda: [m(x) for m in mods]

    fns = {r: one(r) for r in rows}
    us = {r: [] for r in rows}
    for _ in range(3):  # interleaved rounds
        for r in rows:
            us[r].append(_median_us(fns[r], reps))
    med = {r: min(v) / len(dec.layers) for r, v in us.items()}
    return {"us_per_matrix": {str(r): med[r] for r in rows},
            **{f"rows{r}_over_rows1": med[r] / med[1] for r in rows if r != 1}}


def pass_cost(llm, prompt: list[int], ks=(0, 1, 2, 4, 8), reps: int = 5) -> dict:
    """ms of a plain decode step and of a verification pass feeding 1 + k positions (k drafts), on one
    sequence with ``prompt`` cached: the ratio is what k drafts must earn back."""
    from exitwise.engine import SamplingParams
    from exitwise.engine.sequence import Sequence

    eng = llm.engine
    runner = eng.runner
    seq = Sequence("cost", list(prompt), SamplingParams(max_tokens=64))
    eng.blocks.allocate(seq)
    logits = runner.prefill([seq])
    seq.token_ids.append(int(logits.argmax()))
    eng.blocks.grow_to(seq, len(seq) + max(ks))
    base = len(seq)

    def verify(k):
        x = runner.model.embed_tokens(seq.token_ids[-1:] * (k + 1))
        return lambda: runner.verify([seq], x, 0, [(base - 1, base + k)])

    fns = {"decode": lambda: runner.decode([seq])} | {k: verify(k) for k in ks}
    ms = {k: [] for k in fns}
    for _ in range(3):
        for k, fn in fns.items():
            ms[k].append(_median_us(fn, reps) / 1000)
    eng.blocks.release(seq)
    best = {k: min(v) for k, v in ms.items()}
    return {"decode_ms": best["decode"], "verify_ms": {str(k): best[k] for k in ks},
            "verify_over_decode": {str(k): best[k] / best["decode"] for k in ks}}


# ------------------------------------------------------------------------------------------ systems
def spec_summary(llm) -> dict:
    st = llm.engine.spec.stats
    d = st.as_dict()
    d["tokens_per_pass"] = tokens_per_pass(d)
    return d


def tokens_per_pass(spec: dict) -> float | None:
    """Tokens a sequence gained per verification pass, over every source (plain steps excluded)."""
    rows = sum(s["rows"] for s in spec["sources"].values())
    return sum(s["tokens"] for s in spec["sources"].values()) / rows if rows else None


def cost_model(res: dict, passes: dict) -> dict:
    """Predicted speed-up of a speculative b1 run over full_b1 from its own counts: plain steps at the
    decode cost, verification passes at the measured cost of their mean fed positions."""
    st = res["spec"]
    if not st["verify_passes"]:
        return {"predicted_speedup": 1.0}
    fed = 1 + st["drafted"] / st["verify_passes"]  # mean positions per pass (batch 1)
    ks = sorted(int(k) for k in passes["verify_over_decode"])
    lo = max([k for k in ks if k <= fed - 1], default=ks[0])
    hi = min([k for k in ks if k >= fed - 1], default=ks[-1])
    r_lo, r_hi = passes["verify_over_decode"][str(lo)], passes["verify_over_decode"][str(hi)]
    ratio = r_lo if hi == lo else r_lo + (r_hi - r_lo) * ((fed - 1) - lo) / (hi - lo)
    steps = st["plain_steps"] + st["verify_passes"] * ratio  # in decode-step units
    return {"mean_fed_positions": fed, "pass_over_decode": ratio, "predicted_speedup": st["tokens"] / steps}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(ap)  # the model flags of `generate`, with its defaults
    ap.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="prompt source: a text file or XSum .jsonl")
    ap.add_argument("--prompts", type=int, default=12)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--xsum-len", type=int, default=768)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-draft", type=int, default=6)
    ap.add_argument("--heads", default=None, help="calibrated exit heads: adds the exit source")
    ap.add_argument("--adapter", default="auto",
                    help="a trained draft adapter; auto (default): the one saved for the model under "
                         "benchmarks/results/speculate, else trained here; none: no adapter source")
    ap.add_argument("--adapter-layer", type=int, default=12, help="E of an adapter trained here (default: 12)")
    ap.add_argument("--adapter-text", type=Path, default=DATA / "code" / "train.txt",
                    help="training text of an adapter trained here (default: the code train split)")
    ap.add_argument("--adapter-minutes", type=float, default=None,
                    help="training budget of an adapter trained here (default: 2 with --quick, else 10)")
    ap.add_argument("--adapter-threshold", type=float, default=0.6)
    ap.add_argument("--draft-vocabs", default="8192",
                    help="adapter drafts also measured with a shortlist readout of each of these many lowest ids "
                         "plus the context's (``drafts.adapter-v<N>``; comma-separated, empty: none)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-peer", action="store_true", help="skip llama.cpp")
    ap.add_argument("--quick", action="store_true", help="6 prompts, 2 repeats")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "speculate" / "code.json")
    args = ap.parse_args(argv)
    if args.quick:
        args.prompts, args.repeats = min(args.prompts, 6), min(args.repeats, 2)
    torch.set_num_threads(args.threads)

    from exitwise.engine import LLM
    from exitwise.engine.config import EngineConfig, ExitConfig

    bb = model_spec(args).load()
    minutes = args.adapter_minutes or (2.0 if args.quick else 10.0)
    args.adapter = find_or_train_adapter(bb, args.adapter, args.adapter_layer, args.adapter_text, minutes)
    tok = bb.tokenizer
    prompts = draw_prompts(tok, args.text, args.prompts, args.prompt_len, args.seed, args.xsum_len)
    b8 = (prompts * -(-args.batch // len(prompts)))[:args.batch]
    max_len = max(len(p) for p in prompts) + args.max_tokens + args.max_draft + 2
    kv = dict(kv_cache_bytes=96 << 20, max_model_len=max_len)
    exit_cfg = ExitConfig.heads(args.heads) if args.heads else None

    def make(draft: str | None, batch: int, vocab: int = 0):
        spec = draft is not None
        return LLM(bb, EngineConfig(max_num_seqs=batch, speculative=spec, draft=draft or "auto",
                                    max_draft=args.max_draft, exit=exit_cfg if spec else None,
                                    draft_adapter=args.adapter if draft == "adapter" else None,
                                    adapter_threshold=args.adapter_threshold, draft_vocab=vocab, **kv))

    sources = ["lookup"] + (["exit"] if args.heads else []) + (["adapter"] if args.adapter else [])
    systems = {"full_b1": (None, 1), "spec_b1": ("auto", 1), "full_b8": (None, args.batch),
               "spec_b8": ("auto", args.batch)} | {f"drafts.{s}.b1": (s, 1) for s in sources if s != "auto"}
    if args.adapter:
        systems |= {f"drafts.adapter-v{v}.b1": ("adapter", 1, int(v)) for v in args.draft_vocabs.split(",") if v}
    llms = {name: make(*spec) for name, spec in systems.items()}
    peers = {}
    if not args.no_peer:
        peer, info = llamacpp_peer(args.model, args.threads, max_len + 8)
        if peer is not None:
            peers["llamacpp_b1"] = peer
            from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

            # its verification reads the logits of every drafted position: logits_all
            lookup_peer, _ = llamacpp_peer(args.model, args.threads, max_len + 8, logits_all=True,
                                           draft_model=LlamaPromptLookupDecoding(num_pred_tokens=args.max_draft))
            peers["llamacpp_lookup_b1"] = lookup_peer
        peer_info = info
    else:
        peer_info = {"skipped": "--no-peer"}

    runs: dict[str, list[dict]] = {name: [] for name in [*systems, *peers]}
    order = list(runs)
    # one short untimed run each first: a system's first run pays its first touches (its own K/V pool,
    # allocations), which measured up to half its speed in the first round and pulled the medians down
    for name in order:
        if name in peers:
            run_llamacpp(peers[name], prompts[:1], 8, bb.num_layers)
        else:
            group = prompts if systems[name][1] == 1 else b8
            run_engine(llms[name], group[:systems[name][1]], [0] * systems[name][1], 8)
    for rep in range(args.repeats):
        # each round starts one system later: no system always runs right after the same one
        for name in order[rep % len(order):] + order[:rep % len(order)]:
            if name in peers:
                r = run_llamacpp(peers[name], prompts, args.max_tokens, bb.num_layers)
            else:
                llm, batch = llms[name], systems[name][1]
                group = prompts if batch == 1 else b8
                arrive = b1_arrivals(len(group)) if batch == 1 else arrivals(len(group), batch, 1)
                if llm.engine.spec is not None:
                    llm.engine.spec.stats = type(llm.engine.spec.stats)()
                r = run_engine(llm, group, arrive, args.max_tokens)
                if llm.engine.spec is not None:
                    r["spec"] = spec_summary(llm)
            runs[name].append(r)
            print(f"[{rep + 1}/{args.repeats}] {name:22s} {r['tokens_per_s']:7.1f} tok/s  itl {r['itl_ms']:6.1f} ms",
                  flush=True)

    best = {name: max(rs, key=lambda r: r["tokens_per_s"]) for name, rs in runs.items()}
    verify = {"matrix": matrix_cost(llms["full_b1"]), "pass": pass_cost(llms["full_b1"], prompts[0])}
    result: dict = {
        "model": args.model, "dtype": bb.weight_dtype,
        "text": str(args.text), "prompts": len(prompts), "prompt_len": args.prompt_len,
        "max_tokens": args.max_tokens, "batch": args.batch, "max_draft": args.max_draft, "repeats": args.repeats,
        "threads": args.threads, "seed": args.seed, "peer": peer_info,
        "machine": {"processor": platform.processor() or platform.machine(), "torch": torch.__version__},
        "verify_cost": {**{k: v for k, v in verify["matrix"].items() if k.startswith("rows")},
                        "us_per_matrix": verify["matrix"]["us_per_matrix"], "pass": verify["pass"]},
    }
    for name, r in best.items():
        entry = {k: r[k] for k in ("tokens_per_s", "itl_ms", "ttft_s", "wall_s", "tokens")}
        ref = best["full_b1" if name.endswith("b1") else "full_b8"]["outputs"]
        entry["identical"] = r["outputs"] == ref
        entry["speedup"] = r["tokens_per_s"] / best["full_b1" if name.endswith("b1") else "full_b8"]["tokens_per_s"]
        # the median over the repeats beside the best: this machine's runs swing by several percent
        med = {k: statistics.median(x[k] for x in runs[name]) for k in ("tokens_per_s", "itl_ms")}
        entry |= {"tokens_per_s_median": med["tokens_per_s"], "itl_ms_median": med["itl_ms"]}
        base = runs["full_b1" if name.endswith("b1") else "full_b8"]
        entry["speedup_median"] = med["tokens_per_s"] / statistics.median(x["tokens_per_s"] for x in base)
        if "spec" in r:
            entry["spec"] = r["spec"]
            entry["tokens_per_pass"] = r["spec"]["tokens_per_pass"]
            entry["acceptance"] = r["spec"]["acceptance"]
            if name.endswith("b1"):
                entry["cost_model"] = cost_model(r, verify["pass"])
        parts = name.split(".")
        if parts[0] == "drafts":
            result.setdefault("drafts", {}).setdefault(parts[1], {})[parts[2]] = entry
        else:
            result[name] = entry
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(table(result))
    plot(result, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    bad = [n for n in ("spec_b1", "spec_b8") if not result[n]["identical"]]
    bad += [f"drafts.{s}.b1" for s, d in result.get("drafts", {}).items() if not d["b1"]["identical"]]
    if bad:
        raise SystemExit(f"speculative output differs from full depth: {bad}")
    return 0


def _rows(result: dict):
    for name in ("full_b1", "spec_b1", *[f"drafts.{s}.b1" for s in result.get("drafts", {})], "full_b8",
                 "spec_b8", "llamacpp_b1", "llamacpp_lookup_b1"):
        parts = name.split(".")
        r = result.get(name) if parts[0] != "drafts" else result["drafts"][parts[1]][parts[2]]
        if r is not None:
            yield name, r


def table(result: dict) -> str:
    lines = [f"{result['model']} ({result['dtype']}), {result['prompts']} prompts of {result['text']}, "
             f"{result['max_tokens']} new tokens, {result['threads']} thread(s)",
             f"{'system':22s} {'tok/s':>7s} {'x full':>7s} {'ITL ms':>7s} {'x full':>7s} {'ITL ms':>7s} "
             f"{'tok/pass':>8s} {'accept':>7s} identical",
             f"{'':22s} {'best of ' + str(result['repeats']):>23s} {'median':>15s}"]
    for name, r in _rows(result):
        tpp = r.get("tokens_per_pass")
        acc = r.get("acceptance")
        acc = None if acc is None or acc != acc else acc  # nothing drafted: no acceptance to show
        lines.append(f"{name:22s} {r['tokens_per_s']:7.1f} {r['speedup']:7.2f} {r['itl_ms']:7.1f} "
                     f"{r['speedup_median']:7.2f} {r['itl_ms_median']:7.1f} "
                     f"{'' if tpp is None else f'{tpp:8.2f}':>8s} {'' if acc is None else f'{acc:7.0%}':>7s} "
                     f"{r['identical']}")
    vc = result["verify_cost"]
    p = vc["pass"]
    lines.append(f"verify cost: a layer matrix at 5 / 9 rows = {vc['rows5_over_rows1']:.2f}x / "
                 f"{vc['rows9_over_rows1']:.2f}x its 1-row time; a pass over 1+k positions = "
                 + " / ".join(f"{v:.2f}x" for v in p["verify_over_decode"].values())
                 + f" a decode step (k = {', '.join(p['verify_over_decode'])}; decode {p['decode_ms']:.1f} ms)")
    for name, r in _rows(result):
        if "cost_model" in r:
            cm = r["cost_model"]
            lines.append(f"cost model {name}: predicted {cm['predicted_speedup']:.2f}x, measured {r['speedup']:.2f}x")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(_rows(result))
    fig, ax = plt.subplots(figsize=(8, 3.5))
    names = [n for n, _ in rows]
    ax.barh(names, [r["tokens_per_s"] for _, r in rows], color=["C0" if "full" in n else "C2" if "llama" in n
                                                                   else "C1" for n in names])
    for i, (_, r) in enumerate(rows):
        ax.text(r["tokens_per_s"], i, f" {r['tokens_per_s']:.1f}", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("tokens / s (greedy, prefill included)")
    ax.set_title(f"{result['model']} ({result['dtype']}) on {Path(result['text']).name}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
