"""``exitwise generate`` and ``exitwise exit-classifier train``."""

from __future__ import annotations

import argparse
import json
import sys

from exitwise.cli import command_group
from exitwise.cli.argtypes import float_range, non_negative_int, positive_int, seed_arg
from exitwise.cli.engine_args import add_engine_args, engine_config, layer_list
from exitwise.cli.model_args import add_model_args, model_spec


def register(sub: argparse._SubParsersAction) -> None:
    gen = sub.add_parser("generate", help="generate text with the early-exit engine")
    add_model_args(gen)
    gen.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    gen.add_argument("--max-tokens", type=positive_int, default=64)
    gen.add_argument("--temperature", type=float_range(0.0), default=0.0)
    gen.add_argument("--top-p", type=float_range(0.0, 1.0, lo_open=True), default=1.0)
    gen.add_argument("--top-k", type=non_negative_int, default=0)
    gen.add_argument("--seed", type=seed_arg, default=None)
    gen.add_argument("--stop", action="append", default=[])
    add_engine_args(gen)
    gen.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    gen.set_defaults(handler=_generate)

    clf_sub = command_group(sub, "exit-classifier", "dedicated exit classifiers")
    train = clf_sub.add_parser("train", help="train per-layer exit probes on the frozen model")
    add_model_args(train)
    train.add_argument("--text", required=True, help="UTF-8 text file used with teacher forcing")
    train.add_argument("--layers", type=layer_list, default=None, help="hidden-state indices (default: L/2..L-1)")
    train.add_argument("--max-tokens", type=positive_int, default=4096)
    train.add_argument("--steps", type=positive_int, default=300)
    train.add_argument("--out", required=True, help="output path (writes .safetensors and .json)")
    train.set_defaults(handler=_train_classifier)


def _generate(args: argparse.Namespace) -> int:
    from exitwise.engine import LLM, SamplingParams

    config = engine_config(args)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, stop=args.stop, return_exit_layers=True)
    llm = LLM(config=config)
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
        per = ", ".join(f"{name} {s.accepted}/{s.drafted} kept, {s.tokens_per_pass:.2f} tokens/pass"
                        for name, s in st.sources.items())
        print(f"[speculative: {st.tokens} tokens in {st.cycles} cycles, {st.verify_passes} verification passes"
              f"{'; ' + per if per else ''}]", file=sys.stderr)
    return 0


def _train_classifier(args: argparse.Namespace) -> int:
    from pathlib import Path

    from exitwise.engine.exit_plan import default_exit_layers
    from exitwise.exits.classifier import train

    text = Path(args.text).read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"--text {args.text} is empty")
    backbone = model_spec(args).load()
    layers = args.layers or default_exit_layers(backbone.num_layers)
    clf = train(backbone, text, layers, max_tokens=args.max_tokens, steps=args.steps)
    path = clf.save(args.out)
    rates = ", ".join(f"{layer}:{r:.2f}" for layer, r in zip(layers, clf.meta["positive_rate"], strict=True))
    print(f"wrote {path} ({clf.meta['train_tokens']} tokens; agreement with final layer per layer: {rates})")
    return 0
