"""The engine's command-line flags, the same on ``generate`` and ``serve``, and the one function that
turns them into an EngineConfig. The flags' defaults and choices are read from the library (the
config's field defaults and the registries of criteria, KV fills, exit modes and draft sources), so
the command line never states one of its own."""

from __future__ import annotations

import argparse
import inspect
from dataclasses import MISSING, fields

from exitwise.cli.argtypes import finite_float, float_range, memory_mb_arg, non_negative_int, positive_int
from exitwise.cli.model_args import model_spec
from exitwise.engine.config import EXIT_MODES, EngineConfig, ExitConfig
from exitwise.engine.drafts import DRAFT_SOURCES
from exitwise.engine.kv_fill import KV_FILLS
from exitwise.exits.base import CRITERIA
from exitwise.heads.calibrate import MODES as THRESHOLD_MODES

# the built-in criteria's confidences lie in [-1, 1] (softmax margin and classifier probability in
# [0, 1], hidden-state cosine in [-1, 1]), the server's exit_threshold range
THRESHOLD = float_range(-1.0, 1.0)
# --alpha's range, (0, 1), is checked where the heads are set up, with the message the heads give


def _field_defaults(cls) -> dict:
    """A dataclass's plain field defaults by name: the flags' defaults."""
    return {f.name: f.default for f in fields(cls) if f.default is not MISSING}


def _param_defaults(fn) -> dict:
    return {name: p.default for name, p in inspect.signature(fn).parameters.items()
            if p.default is not inspect.Parameter.empty}


ENGINE = _field_defaults(EngineConfig)
EXIT = _field_defaults(ExitConfig)
HEADS = _param_defaults(ExitConfig.heads)


def layer_list(text: str) -> list[int]:
    """``"16,20,24"`` -> [16, 20, 24] (argparse type)."""
    try:
        layers = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc
    if not layers or min(layers) < 0:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices >= 0, got {text!r}")
    return layers


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """Memory, batching, early exit and speculation flags (the model's, ``--model`` / ``--dtype`` /
    ``--device``, come from :func:`exitwise.cli.model_args.add_model_args`)."""
    g = p.add_argument_group("engine")
    kv_mb = ENGINE["kv_cache_bytes"] >> 20
    g.add_argument("--kv-cache-mb", type=memory_mb_arg, default=kv_mb,
                   help=f"KV block pool size in MB (default: {kv_mb})")
    g.add_argument("--max-num-seqs", type=positive_int, default=ENGINE["max_num_seqs"],
                   help=f"sequences per decode step (default: {ENGINE['max_num_seqs']})")
    g.add_argument("--max-model-len", type=positive_int, default=None, help="context length (default: the model's)")
    e = p.add_argument_group("early exit")
    e.add_argument("--exit", default=None, choices=tuple(CRITERIA), metavar="CRITERION",
                   help=f"{' | '.join(CRITERIA)} (default: full depth; --heads / --classifier imply theirs)")
    e.add_argument("--exit-layers", type=layer_list, default=None, help="hidden-state indices, e.g. 16,20,24,28")
    # None: the config's default, which --heads refuses to be given (heads have their own thresholds)
    e.add_argument("--exit-threshold", type=THRESHOLD, default=None,
                   help=f"confidence a sequence needs to exit (default {EXIT['threshold']}; heads decide with "
                        "their own calibrated thresholds)")
    e.add_argument("--exit-min-layer", type=positive_int, default=EXIT["min_layer"],
                   help=f"no exit before this hidden state (default: {EXIT['min_layer']})")
    e.add_argument("--exit-mode", default=EXIT["mode"], choices=EXIT_MODES,
                   help="batch: the batch leaves when every sequence is confident; sequence: each on its own "
                        f"(default: {EXIT['mode']})")
    e.add_argument("--kv-fill", default=EXIT["kv_fill"], choices=tuple(KV_FILLS),
                   help="the skipped layers' K/V: propagate (from the exit state) or full (run them) "
                        f"(default: {EXIT['kv_fill']})")
    e.add_argument("--classifier", default=None, metavar="PATH", help="exit classifier (implies --exit classifier)")
    e.add_argument("--heads", default=None, metavar="PATH",
                   help="calibrated exit heads (implies --exit heads)")
    e.add_argument("--alpha", type=finite_float, default=HEADS["alpha"],
                   help=f"target agreement for --heads (default: {HEADS['alpha']})")
    e.add_argument("--heads-mode", default=HEADS["thresholds"], choices=THRESHOLD_MODES,
                   help=f"which calibrated thresholds --heads uses (default: {HEADS['thresholds']})")
    e.add_argument("--no-gate", action="store_true",
                   help="--heads: evaluate every head (faithful) instead of only where its cheap gate passes")
    e.add_argument("--speculative", action="store_true",
                   help="speculative decoding: drafts verified at full depth (greedy output identical to "
                        "full depth; sampled output distributed as the model's)")
    e.add_argument("--draft", default=ENGINE["draft"], choices=DRAFT_SOURCES,
                   help="--speculative: who drafts: auto (context n-grams, else the exit criterion's early "
                        "exits), lookup (context n-grams only), exit (early exits only) or adapter (shallow "
                        f"layers + a trained adapter, --adapter) (default: {ENGINE['draft']})")
    e.add_argument("--adapter", default=None, metavar="PATH",
                   help="--speculative: a trained draft adapter (exitwise heads train-adapter); auto drafts "
                        "with it when the context has no match")
    e.add_argument("--adapter-threshold", type=float_range(0.0, 1.0), default=ENGINE["adapter_threshold"],
                   help="an adapter draft stops at its first token less probable than this "
                        f"(default: {ENGINE['adapter_threshold']})")
    e.add_argument("--draft-vocab", type=non_negative_int, default=ENGINE["draft_vocab"], metavar="N",
                   help="adapter drafts read the head's rows of the N lowest ids plus the context's ids "
                        f"(default: {ENGINE['draft_vocab']}: the whole head)")
    e.add_argument("--max-draft", type=positive_int, default=ENGINE["max_draft"],
                   help=f"longest draft for --speculative (default: {ENGINE['max_draft']})")


def exit_config(args: argparse.Namespace) -> ExitConfig | None:
    """The ExitConfig the flags ask for (None: full depth), with errors naming the flag."""
    name = args.exit
    for flag in ("heads", "classifier"):
        if getattr(args, flag):
            if name not in (None, flag):
                raise ValueError(f"--{flag} goes with --exit {flag}, not --exit {name}")
            name = flag
    common = dict(layers=args.exit_layers, min_layer=args.exit_min_layer, kv_fill=args.kv_fill, mode=args.exit_mode)
    if name == "heads":
        if not args.heads:
            raise ValueError("--exit heads needs --heads PATH (from `exitwise heads train` + `heads calibrate`)")
        if args.exit_threshold is not None:
            raise ValueError("--exit-threshold does not apply to --heads: they exit at their calibrated "
                             "thresholds; choose the agreement level with --alpha")
        return ExitConfig.heads(args.heads, args.alpha, args.heads_mode, gate=not args.no_gate, **common)
    if args.exit_threshold is not None:
        common["threshold"] = args.exit_threshold
    if name is None:
        # a fine-tuned model's own drafts take the exit flags too (e.g. --exit-layers)
        drafts = ExitConfig.finetuned_drafts(getattr(args, "model", None), **common) if args.speculative else None
        if drafts is None and args.speculative and args.draft == "exit":
            raise ValueError("--draft exit drafts with an exit criterion: add --heads PATH or --exit NAME")
        return drafts
    if name == "classifier":
        if not args.classifier:
            raise ValueError("--exit classifier needs --classifier PATH")
        return ExitConfig.classifier(args.classifier, **common)
    return ExitConfig(name, **common)


def engine_config(args: argparse.Namespace, **overrides) -> EngineConfig:
    """The EngineConfig of the model and engine flags (``overrides``: settings a command fixes itself); its
    ``model`` is the flags' ModelSpec (the weights' dtype is the one the model is loaded with)."""
    return EngineConfig(kv_cache_bytes=args.kv_cache_mb << 20, max_num_seqs=args.max_num_seqs,
                        max_model_len=args.max_model_len, model=model_spec(args),
                        exit=exit_config(args), speculative=args.speculative, draft=args.draft,
                        max_draft=args.max_draft, draft_adapter=args.adapter,
                        adapter_threshold=args.adapter_threshold, draft_vocab=args.draft_vocab,
                        **overrides)
