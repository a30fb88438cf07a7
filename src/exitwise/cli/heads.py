"""``exitwise heads train`` and ``exitwise heads calibrate``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from exitwise.cli import command_group
from exitwise.cli.argtypes import (
    finite_float,
    float_range,
    non_negative_int,
    open_unit,
    positive_float,
    positive_int,
    seed_arg,
)
from exitwise.cli.model_args import add_model_args, model_spec


def register(sub) -> None:
    hsub = command_group(sub, "heads", "self-supervised early-exit heads: train, calibrate; draft adapters: "
                                       "train-adapter")

    t = hsub.add_parser("train", help="train heads on text with the model's own distribution as target")
    add_model_args(t, required=True)
    t.add_argument("--text", required=True, help="training text file")
    t.add_argument("--out", required=True, help="output stem: writes OUT.safetensors and OUT.json")
    t.add_argument("--layers", type=non_negative_int, nargs="+", default=None,
                   help="head layers (default: evenly spaced)")
    t.add_argument("--heads", type=positive_int, default=4, help="number of evenly spaced heads (default: 4)")
    t.add_argument("--kind", choices=["linear", "translator"], default="translator",
                   help="translator (default): W_out . Norm(h + A h + b), A (D x D) per head, W_out the model's "
                        "frozen output head; linear: norm + Linear(D, V) per head (Valade v2)")
    t.add_argument("--init", choices=["head", "random"], default="head",
                   help="linear heads: initialise from the output head (default) or randomly")
    t.add_argument("--fit-tokens", type=non_negative_int, default=None,
                   help="translators: least-squares start on this many tokens of the text before the KL "
                        "training (default: 65536; 0 = start from the plain readout)")
    t.add_argument("--tokens", type=positive_int, default=65536, help="training tokens (default: 65536)")
    t.add_argument("--steps", type=non_negative_int, default=None,
                   help="optimiser steps (overrides --tokens; 0 = no KL training)")
    t.add_argument("--batch-size", type=positive_int, default=2, help="sequences per step (default: 2)")
    t.add_argument("--seq-len", type=positive_int, default=256, help="tokens per sequence (default: 256)")
    t.add_argument("--lr", type=positive_float, default=None,
                   help="Adam learning rate (default: 3e-4 for linear heads, 1e-3 for translators)")
    t.add_argument("--loss", choices=["kl", "ce"], default="kl",
                   help="kl: KL(full model || head) (v2, default); ce: CE to the full model's argmax (v1)")
    t.add_argument("--max-minutes", type=positive_float, default=None,
                   help="stop the KL training after this wall-clock time (the least-squares fit is not counted)")
    t.add_argument("--seed", type=seed_arg, default=0)
    t.set_defaults(handler=_train)

    a = hsub.add_parser("train-adapter", help="train a draft adapter (Kangaroo) on the input of layer E, "
                                              "self-distilled from the model's own outputs")
    add_model_args(a, required=True)
    a.add_argument("--text", required=True, help="training text file")
    a.add_argument("--layer", type=int, required=True, help="E: the adapter reads the input of layer E (1..L-1)")
    a.add_argument("--out", required=True, help="output stem: writes OUT.safetensors and OUT.json")
    a.add_argument("--cache", default=None,
                   help="directory of the teacher cache (default: OUT.cache); reused when it matches the "
                        "model, layer, text and token count")
    a.add_argument("--cache-layers", type=int, nargs="+", default=None,
                   help="layers the cache holds (default: --layer): one teacher pass serves adapters at each")
    a.add_argument("--tokens", type=int, default=32768, help="training tokens cached (default: 32768)")
    a.add_argument("--topk", type=int, default=32, help="teacher tokens cached per position (default: 32)")
    a.add_argument("--hidden", type=int, default=None, help="adapter hidden width (default: 2 x the model's)")
    a.add_argument("--epochs", type=float, default=20.0, help="passes over the cache (default: 20)")
    a.add_argument("--batch-tokens", type=int, default=1024, help="tokens per optimiser step (default: 1024)")
    a.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default: 1e-3)")
    a.add_argument("--max-minutes", type=float, default=None, help="stop training after this wall-clock time "
                                                                   "(the cache pass is not counted)")
    a.add_argument("--seq-len", type=int, default=256, help="tokens per cached sequence (default: 256)")
    a.add_argument("--test", default=None, help="held-out text: report the adapter's agreement with the model")
    a.add_argument("--test-tokens", type=int, default=16384, help="tokens read from --test (default: 16384)")
    a.add_argument("--seed", type=int, default=0)
    a.set_defaults(handler=_train_adapter)

    c = hsub.add_parser("calibrate", help="per-head entropy thresholds for agreement levels alpha")
    c.add_argument("--heads", required=True, help="heads stem (from `heads train`); thresholds are added to its JSON")
    add_model_args(c, None, default_help="the one named in the heads' JSON")
    c.add_argument("--text", required=True, help="calibration text (disjoint from the training text)")
    c.add_argument("--alpha", type=finite_float,  # (0, 1): checked by calibrate
                   nargs="+", default=[0.8, 0.9, 0.95, 0.99],
                   help="target agreement levels in (0, 1) (default: 0.8 0.9 0.95 0.99)")
    c.add_argument("--guarantee", type=open_unit, default=None, metavar="DELTA",
                   help="also Learn-then-Test thresholds: agreement >= alpha with probability >= 1 - DELTA")
    c.add_argument("--test", default=None, help="held-out text to evaluate the thresholds on")
    c.add_argument("--max-tokens", type=positive_int, default=32768,
                   help="tokens read from each of --text and --test (default: 32768)")
    c.add_argument("--seq-len", type=positive_int, default=256)
    c.add_argument("--gate-recall", type=float_range(0.0, 1.0, lo_open=True), default=0.98,
                   help="fit a cheap gate per head that passes this fraction of the tokens the head fires on "
                        "(the full head is then evaluated only where the gate passes; default: 0.98)")
    c.add_argument("--no-gate", action="store_true", help="fit no probe gate (translators keep the shortlist gate)")
    c.add_argument("--json", default=None, help="write the report here")
    c.add_argument("--plot", default=None, help="write agreement-vs-coverage curves (PNG) here")
    c.set_defaults(handler=_calibrate)


def _train(args: argparse.Namespace) -> int:
    from exitwise.errors import DataError
    from exitwise.heads.model import ExitHeads, paths
    from exitwise.heads.train import TrainConfig, chunks, fit_translators, read_text, text_source, tokenize, train_heads

    if args.fit_tokens is not None and args.fit_tokens > 0 and args.kind != "translator":
        raise DataError("--fit-tokens applies to --kind translator only")
    fit_tokens = (65536 if args.fit_tokens is None else args.fit_tokens) if args.kind == "translator" else 0
    text = read_text(args.text)  # fail on a bad file before loading the model
    backbone = model_spec(args).load()
    heads = ExitHeads(backbone, layers=args.layers, num_heads=args.heads, init=args.init, seed=args.seed,
                      kind=args.kind)
    heads.meta["training_data"] = text_source(args.text)
    config = TrainConfig(steps=args.steps, tokens=args.tokens, batch_size=args.batch_size, seq_len=args.seq_len,
                         lr=args.lr if args.lr is not None else (1e-3 if args.kind == "translator" else 3e-4),
                         loss=args.loss, seed=args.seed, max_minutes=args.max_minutes)
    ids = tokenize(backbone, text)
    if fit_tokens:
        fit = fit_translators(backbone, heads, chunks(ids[:fit_tokens], min(args.seq_len, len(ids))), progress=True)
        print(f"least-squares start on {fit['tokens']} tokens in {fit['seconds']} s")
    summary = train_heads(backbone, heads, ids, config)
    heads.save(args.out)
    st, js = paths(args.out)
    print(f"trained heads at layers {heads.layers} on {summary['tokens']} tokens in {summary['seconds']} s "
          f"({summary['steps']} steps{', stopped by --max-minutes' if summary['stopped_early'] else ''}); "
          f"{args.loss} per head {summary['loss_first']} -> {summary['loss_last']}")
    print(f"wrote {st} and {js}")
    return 0


def _train_adapter(args: argparse.Namespace) -> int:
    from exitwise.heads.adapter_train import evaluate_adapter, fit_adapter
    from exitwise.heads.model import paths
    from exitwise.heads.train import read_text, text_source, tokenize

    read_text(args.text)  # fail on a bad file before loading the model
    test = read_text(args.test) if args.test else None
    backbone = model_spec(args).load()
    st, js = paths(args.out)
    adapter = fit_adapter(backbone, args.text, args.layer, tokens=args.tokens,
                          cache=Path(args.cache) if args.cache else js.with_suffix(".cache"),
                          cache_layers=args.cache_layers, topk=args.topk, seq_len=args.seq_len, hidden=args.hidden,
                          epochs=args.epochs, batch_tokens=args.batch_tokens, lr=args.lr,
                          max_minutes=args.max_minutes, seed=args.seed)
    summary = adapter.meta["training"]
    print(f"trained an adapter (layer {args.layer}, hidden {adapter.hidden}, {adapter.num_params()} parameters) "
          f"for {summary['epochs']} epochs of {summary['cache_tokens']} tokens in {summary['seconds']} s"
          f"{' (stopped by --max-minutes)' if summary['stopped_early'] else ''}: shortlist KL "
          f"{summary['kl_first']} -> {summary['kl_last']}")
    if test is not None:
        report = evaluate_adapter(backbone, adapter, tokenize(backbone, test)[:args.test_tokens],
                                  seq_len=args.seq_len)
        adapter.meta["evaluation"] = {"text": text_source(args.test)["name"], **report}
        print(f"held-out agreement with the full model: {report['acceptance']} (plain readout of layer "
              f"{args.layer}: {report['plain_readout']}) over {report['tokens']} tokens; per draft threshold: "
              f"{json.dumps(report['thresholds'])}")
    adapter.save(args.out)
    print(f"wrote {st} and {js}")
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from exitwise.heads.calibrate import calibrate_heads

    report = calibrate_heads(args.heads, args.text, args.alpha, test_path=args.test, model=model_spec(args),
                             max_tokens=args.max_tokens, seq_len=args.seq_len,
                             guarantee=args.guarantee,
                             gate=not args.no_gate, gate_recall=args.gate_recall, plot_path=args.plot)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0
