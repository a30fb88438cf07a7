"""``exitwise profile``: is a model worth exiting early? Agreement, oracle exits, predicted speed-up."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from exitwise.cli.argtypes import positive_int
from exitwise.cli.engine_args import layer_list
from exitwise.cli.model_args import add_model_args, model_spec


def register(sub: argparse._SubParsersAction) -> None:
    prof = sub.add_parser("profile", help="is a model worth exiting early? agreement, oracle exits, predicted speed-up")
    add_model_args(prof)
    prof.add_argument("--text", default=None, help="held-out UTF-8 text (default: <data dir>/text/test.txt)")
    prof.add_argument("--data-dir", default=None)
    prof.add_argument("--tokens", type=positive_int, default=4096, help="teacher-forced tokens to profile")
    prof.add_argument("--classifier", default=None, metavar="PATH", help="exit classifier to profile as a criterion")
    prof.add_argument("--exit-layers", type=layer_list, default=None,
                      help="comma-separated exit-capable layers (default L/2..L-1)")
    prof.add_argument("--no-timing", action="store_true", help="skip the cost measurements (no speed-up)")
    prof.add_argument("--out", default=None, help="write the profile as JSON")
    prof.add_argument("--plot", default=None, help="write a PNG (needs matplotlib)")
    prof.set_defaults(handler=_profile)


def _profile(args: argparse.Namespace) -> int:
    from exitwise.analysis.profile import plot, profile_text, summary
    from exitwise.paths import default_text

    text = args.text if args.text is not None else default_text("test.txt", args.data_dir)
    result = profile_text(model_spec(args), text, args.tokens, classifier=args.classifier,
                          exit_layers=args.exit_layers, timing=not args.no_timing)
    print(summary(result))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}")
    if args.plot:
        print(f"wrote {plot(result, args.plot)}")
    return 0
