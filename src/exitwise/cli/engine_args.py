"""The engine's command-line flags, the same on every command that runs the engine (``generate``,
``serve``, ``profile``, the benchmarks), and the one function that turns them into an EngineConfig."""

from __future__ import annotations

import argparse
import sys

from exitwise.cli.argtypes import finite_float, float_range, memory_mb_arg, positive_int
from exitwise.cli.model_args import add_dtype_arg
from exitwise.engine.config import EXIT_MODES, KV_FILLS, EngineConfig, ExitConfig
from exitwise.engine.drafts import DRAFT_SOURCES

# the built-in criteria's confidences lie in [-1, 1] (softmax margin and classifier probability in
# [0, 1], hidden-state cosine in [-1, 1]), the server's exit_threshold range
THRESHOLD = float_range(-1.0, 1.0)
# --alpha's range, (0, 1), is checked where the heads are set up, with the message the heads give
CRITERIA = ("softmax", "hidden_similarity", "classifier", "heads")
ALIASES = {"similarity": "hidden_similarity", "softmax_response": "softmax"}


def layer_list(text: str) -> list[int]:
    """``"16,20,24"`` -> [16, 20, 24] (argparse type)."""
    try:
        layers = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc
    if not layers or min(layers) < 0:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices >= 0, got {text!r}")
    return layers


class _Deprecated(argparse.Action):
    """An old spelling of a flag: works for one release, with a one-line notice on stderr."""

    def __init__(self, option_strings, dest, new: str = "", **kw):
        self.new = new
        super().__init__(option_strings, dest, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"exitwise: {option_string} is deprecated; use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_engine_args(p: argparse.ArgumentParser, *, max_num_seqs: int = 16) -> None:
    """Memory, batching, device, early exit and speculation flags."""
    g = p.add_argument_group("engine")
    g.add_argument("--kv-cache-mb", type=memory_mb_arg, default=256, help="KV block pool size in MB (default: 256)")
    g.add_argument("--max-num-seqs", type=positive_int, default=max_num_seqs,
                   help=f"sequences per decode step (default: {max_num_seqs})")
    g.add_argument("--max-model-len", type=positive_int, default=None, help="context length (default: the model's)")
    g.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda (default: the model's)")
    add_dtype_arg(g)
    e = p.add_argument_group("early exit")
    e.add_argument("--exit", default=None, metavar="CRITERION",
                   help=f"{' | '.join(CRITERIA)} (default: full depth; --heads / --classifier imply theirs)")
    e.add_argument("--exit-layers", type=layer_list, default=None, help="hidden-state indices, e.g. 16,20,24,28")
    e.add_argument("--exit-threshold", type=THRESHOLD, default=None,
                   help="confidence a sequence needs to exit (default 0.9; heads decide with their own "
                        "calibrated thresholds)")
    e.add_argument("--exit-min-layer", type=positive_int, default=1,
                   help="no exit before this hidden state (default: 1)")
    e.add_argument("--exit-mode", default="batch", choices=EXIT_MODES,
                   help="batch: the batch leaves when every sequence is confident; sequence: each on its own")
    e.add_argument("--kv-fill", default="propagate", choices=KV_FILLS,
                   help="the skipped layers' K/V: propagate (from the exit state, default) or full (run them)")
    e.add_argument("--classifier", default=None, metavar="PATH", help="exit classifier (implies --exit classifier)")
    e.add_argument("--heads", default=None, metavar="PATH",
                   help="calibrated exit heads (implies --exit heads)")
    e.add_argument("--alpha", type=finite_float, default=0.95, help="target agreement for --heads (default: 0.95)")
    e.add_argument("--heads-mode", default="max_coverage", choices=["max_coverage", "guaranteed"],
                   help="which calibrated thresholds --heads uses (default: max_coverage)")
    e.add_argument("--no-gate", action="store_true",
                   help="--heads: evaluate every head (faithful) instead of only where its cheap gate passes")
    e.add_argument("--speculative", action="store_true",
                   help="speculative decoding: drafts verified at full depth (greedy output identical to "
                        "full depth; sampled output distributed as the model's)")
    e.add_argument("--draft", default="auto", choices=DRAFT_SOURCES,
                   help="--speculative: who drafts: auto (context n-grams, else the exit criterion's early "
                        "exits), lookup (context n-grams only), exit (early exits only) or adapter (shallow "
                        "layers + a trained adapter, --adapter) (default: auto)")
    e.add_argument("--adapter", default=None, metavar="PATH",
                   help="--speculative: a trained draft adapter (exitwise heads train-adapter); auto drafts "
                        "with it when the context has no match")
    e.add_argument("--adapter-threshold", type=float_range(0.0, 1.0), default=0.6,
                   help="an adapter draft stops at its first token less probable than this (default: 0.6)")
    e.add_argument("--max-draft", type=positive_int, default=6, help="longest draft for --speculative (default: 6)")
    # old spellings (generate's), one release
    e.add_argument("--threshold", dest="exit_threshold", type=THRESHOLD, action=_Deprecated, new="--exit-threshold",
                   help=argparse.SUPPRESS)
    e.add_argument("--min-layer", dest="exit_min_layer", type=positive_int, action=_Deprecated, new="--exit-min-layer",
                   help=argparse.SUPPRESS)


def exit_config(args: argparse.Namespace) -> ExitConfig | None:
    """The ExitConfig the flags ask for (None: full depth), with errors naming the flag."""
    name, path = args.exit, None
    if name and ":" in name:  # serve's old spelling: --exit classifier:PATH
        name, path = name.split(":", 1)
        print(f"exitwise: --exit {name}:PATH is deprecated; use --{name} PATH", file=sys.stderr)
        if name == "heads":
            args.heads = args.heads or path
        elif name == "classifier":
            args.classifier = args.classifier or path
    for flag in ("heads", "classifier"):
        if getattr(args, flag):
            if name not in (None, flag):
                raise ValueError(f"--{flag} goes with --exit {flag}, not --exit {name}")
            name = flag
    if name is None and args.speculative and not args.heads and not args.classifier:
        name = _finetuned_drafts(args)
    if name is None:
        if args.speculative and args.draft == "exit":
            raise ValueError("--draft exit drafts with an exit criterion: add --heads PATH or --exit NAME")
        return None
    name = ALIASES.get(name, name)
    if name not in CRITERIA:
        raise ValueError(f"--exit {name!r} is unknown; choose one of {', '.join(CRITERIA)}")
    common = dict(layers=args.exit_layers, min_layer=args.exit_min_layer, kv_fill=args.kv_fill, mode=args.exit_mode)
    if name == "heads":
        if not args.heads:
            raise ValueError("--exit heads needs --heads PATH (from `exitwise heads train` + `heads calibrate`)")
        if args.exit_threshold is not None:
            raise ValueError("--exit-threshold does not apply to --heads: they exit at their calibrated "
                             "thresholds; choose the agreement level with --alpha")
        return ExitConfig.heads(args.heads, args.alpha, args.heads_mode, gate=not args.no_gate, **common)
    threshold = 0.9 if args.exit_threshold is None else args.exit_threshold
    if name == "classifier":
        if not args.classifier:
            raise ValueError("--exit classifier needs --classifier PATH")
        return ExitConfig.classifier(args.classifier, threshold=threshold, **common)
    return ExitConfig(name, threshold=threshold, **common)


def _finetuned_drafts(args: argparse.Namespace) -> str | None:
    """--speculative on a model from ``exitwise finetune``: draft with the softmax criterion at the layers
    its manifest recommends (unless --exit-layers says otherwise); None for any other model."""
    from exitwise.training.manifest import draft_layers, read_manifest

    manifest = read_manifest(getattr(args, "model", None))
    if manifest is None:
        return None
    if args.exit_layers is None:
        args.exit_layers = draft_layers(manifest)
    return "softmax"


def engine_config(args: argparse.Namespace, **overrides) -> EngineConfig:
    """The EngineConfig of the engine flags (``overrides``: settings a command fixes itself). The weights'
    dtype is the model's: commands load it with ``load_model(..., dtype=args.dtype)``."""
    return EngineConfig(kv_cache_bytes=args.kv_cache_mb << 20, max_num_seqs=args.max_num_seqs,
                        max_model_len=args.max_model_len, device=args.device,
                        exit=exit_config(args), speculative=args.speculative, draft=args.draft,
                        max_draft=args.max_draft, draft_adapter=args.adapter,
                        adapter_threshold=args.adapter_threshold,
                        **overrides)
