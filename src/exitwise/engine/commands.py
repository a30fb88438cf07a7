"""``exitwise generate`` and ``exitwise exit-classifier train``."""

from __future__ import annotations

import argparse
import json
import sys


def _layers(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--layers must be comma-separated integers, got {text!r}") from exc


def register(sub: argparse._SubParsersAction) -> None:
    gen = sub.add_parser("generate", help="generate text with the early-exit engine")
    gen.add_argument("--model", default="smollm2-135m")
    gen.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=[])
    gen.add_argument("--exit", default=None,
                     help="softmax | hidden_similarity | classifier | heads (default: full depth)")
    gen.add_argument("--exit-layers", type=_layers, default=None, help="e.g. 16,20,24,28")
    gen.add_argument("--threshold", type=float, default=0.9)
    gen.add_argument("--min-layer", type=int, default=1)
    gen.add_argument("--classifier", default=None, help="path of an exit classifier (for --exit classifier)")
    gen.add_argument("--heads", default=None, help="calibrated exit heads (implies --exit heads)")
    gen.add_argument("--alpha", type=float, default=0.95, help="target agreement for --heads (default: 0.95)")
    gen.add_argument("--heads-mode", default="max_coverage", choices=["max_coverage", "guaranteed"],
                     help="which calibrated thresholds to use (default: max_coverage)")
    gen.add_argument("--speculative", action="store_true",
                     help="lossless self-speculative decoding: draft with the exit criterion, verify at full depth")
    gen.add_argument("--max-draft", type=int, default=6, help="longest draft for --speculative (default: 6)")
    gen.add_argument("--exit-mode", default="batch", choices=["batch", "sequence"],
                     help="batch: the batch leaves when every sequence is confident; sequence: each on its own")
    gen.add_argument("--no-gate", action="store_true",
                     help="--heads: evaluate every head (faithful) instead of only where its cheap gate passes")
    gen.add_argument("--kv-fill", default="propagate", choices=["propagate", "full"])
    gen.add_argument("--kv-cache-mb", type=int, default=256)
    gen.add_argument("--device", default=None)
    gen.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    gen.set_defaults(handler=_generate)

    clf = sub.add_parser("exit-classifier", help="dedicated exit classifiers")
    clf_sub = clf.add_subparsers(dest="clf_command", required=True, metavar="ACTION")
    train = clf_sub.add_parser("train", help="train per-layer exit probes on the frozen model")
    train.add_argument("--model", default="smollm2-135m")
    train.add_argument("--text", required=True, help="UTF-8 text file used with teacher forcing")
    train.add_argument("--layers", type=_layers, default=None, help="hidden-state indices (default: L/2..L-1)")
    train.add_argument("--max-tokens", type=int, default=4096)
    train.add_argument("--steps", type=int, default=300)
    train.add_argument("--out", required=True, help="output path (writes .safetensors and .json)")
    train.set_defaults(handler=_train_classifier)


def _generate(args: argparse.Namespace) -> int:
    from exitwise.engine import LLM, SamplingParams

    if args.exit == "classifier" and not args.classifier:
        raise ValueError("--exit classifier needs --classifier PATH")
    if args.heads and args.exit not in (None, "heads"):
        raise ValueError(f"--heads goes with --exit heads, not --exit {args.exit}")
    if args.heads:
        args.exit = "heads"
    if args.exit == "heads" and not args.heads:
        raise ValueError("--exit heads needs --heads PATH (from `exitwise heads train` + `heads calibrate`)")
    if not 0.0 < args.alpha < 1.0:
        raise ValueError(f"--alpha must lie in (0, 1), got {args.alpha}")
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, stop=args.stop, return_exit_layers=True)
    kwargs = {}
    if args.exit:
        kwargs = dict(exit=args.exit, exit_layers=args.exit_layers, exit_threshold=args.threshold,
                      exit_min_layer=args.min_layer, kv_fill=args.kv_fill, exit_mode=args.exit_mode)
        if args.classifier:
            kwargs["exit_kwargs"] = {"path": args.classifier}
        if args.exit == "heads":
            # A head's confidence is tau(alpha) - entropy: it fires at >= 0, whatever alpha was asked for.
            kwargs["exit_threshold"] = 0.0
            kwargs["exit_kwargs"] = {"path": args.heads, "alpha": args.alpha, "mode": args.heads_mode,
                                     "gate": not args.no_gate}
    if args.speculative:
        if not args.exit:
            raise ValueError("--speculative drafts with an exit criterion: add --heads PATH or --exit NAME")
        kwargs.update(speculative=True, max_draft=args.max_draft)
    llm = LLM(args.model, kv_cache_bytes=args.kv_cache_mb << 20, device=args.device, **kwargs)
    for prompt, out in zip(args.prompt, llm.generate(args.prompt, params), strict=True):
        if args.json:
            print(json.dumps({"prompt": prompt, "text": out.text, "token_ids": out.token_ids,
                              "exit_layers": out.exit_layers, "finish_reason": out.finish_reason}))
        else:
            mean = sum(out.exit_layers) / max(1, len(out.exit_layers))
            print(f"{prompt}{out.text}")
            print(f"[{len(out.token_ids)} tokens, mean exit layer {mean:.1f}, {out.finish_reason}]", file=sys.stderr)
    if llm.engine.spec is not None:
        st = llm.engine.spec.stats
        print(f"[speculative: {st.accepted}/{st.drafted} drafts accepted ({st.acceptance:.0%}), "
              f"{st.tokens} tokens in {st.cycles} cycles]", file=sys.stderr)
    return 0


def _train_classifier(args: argparse.Namespace) -> int:
    from pathlib import Path

    from exitwise import load_model
    from exitwise.engine.exit_plan import default_exit_layers
    from exitwise.exits.classifier import train

    text = Path(args.text).read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"--text {args.text} is empty")
    backbone = load_model(args.model)
    layers = args.layers or default_exit_layers(backbone.num_layers)
    clf = train(backbone, text, layers, max_tokens=args.max_tokens, steps=args.steps)
    path = clf.save(args.out)
    rates = ", ".join(f"{layer}:{r:.2f}" for layer, r in zip(layers, clf.meta["positive_rate"], strict=True))
    print(f"wrote {path} ({clf.meta['train_tokens']} tokens; agreement with final layer per layer: {rates})")
    return 0
