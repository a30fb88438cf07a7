"""``exitwise serve`` and ``exitwise profile``: deploy a model, and find out first whether exiting early
pays for it."""

from __future__ import annotations

import argparse
import os
import sys

from exitwise.server import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_QUEUE


def register(sub: argparse._SubParsersAction) -> None:
    srv = sub.add_parser("serve", help="OpenAI-compatible HTTP server for the early-exit engine")
    srv.add_argument("--model", default="smollm2-135m")
    srv.add_argument("--served-name", default=None, help="name clients send as `model` (default: --model)")
    srv.add_argument("--exit", default=None,
                     help="softmax | similarity | classifier:PATH (default: full depth, no early exit)")
    srv.add_argument("--exit-threshold", type=float, default=0.9, help="default per-request threshold")
    srv.add_argument("--exit-min-layer", type=int, default=1)
    srv.add_argument("--exit-layers", default=None, help="comma-separated hidden-state indices (default L/2..L-1)")
    srv.add_argument("--heads", default=None,
                     help="calibrated exit heads (from `exitwise heads calibrate`) as the exit criterion")
    srv.add_argument("--alpha", type=float, default=0.95,
                     help="default agreement level for --heads; requests may pick another calibrated one "
                          "with the `alpha` field (default: 0.95)")
    srv.add_argument("--heads-mode", default="max_coverage", choices=["max_coverage", "guaranteed"])
    srv.add_argument("--no-gate", action="store_true",
                     help="--heads: evaluate every head (faithful) instead of only where its cheap gate passes")
    srv.add_argument("--speculative", action="store_true",
                     help="lossless self-speculative decoding of greedy requests (drafts with the exit criterion)")
    srv.add_argument("--max-draft", type=int, default=6)
    srv.add_argument("--exit-mode", default="batch", choices=["batch", "sequence"],
                     help="batch: the batch leaves when every sequence is confident; sequence: each on its own")
    srv.add_argument("--kv-fill", default="propagate", choices=["propagate", "full"])
    srv.add_argument("--kv-cache-mb", type=int, default=256)
    srv.add_argument("--max-num-seqs", type=int, default=16)
    srv.add_argument("--max-model-len", type=int, default=None)
    srv.add_argument("--host", default="127.0.0.1", help="default loopback; 0.0.0.0 exposes the server")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` (or $EXITWISE_API_KEY)")
    srv.add_argument("--max-body-mb", type=float, default=DEFAULT_MAX_BODY_BYTES / (1 << 20),
                     help="refuse request bodies over this many MiB with 413, before reading them (default: 8)")
    srv.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE,
                     help="requests that may wait for a slot in the running batch; past it 429 with Retry-After "
                          "(default: 64; -1: unbounded)")
    srv.add_argument("--docs", action="store_true",
                     help="serve /openapi.json and a plain /docs page (behind --api-key; off by default)")
    srv.add_argument("--log-level", default="info")
    srv.set_defaults(handler=_serve)

    prof = sub.add_parser("profile", help="is a model worth exiting early? agreement, oracle exits, predicted speed-up")
    prof.add_argument("--model", default="smollm2-135m")
    prof.add_argument("--text", default=None, help="held-out UTF-8 text (default: <data dir>/text/test.txt)")
    prof.add_argument("--data-dir", default=None)
    prof.add_argument("--tokens", type=int, default=4096, help="teacher-forced tokens to profile")
    prof.add_argument("--classifier", default=None, help="exit classifier file to profile as a criterion")
    prof.add_argument("--exit-layers", default=None, help="comma-separated exit-capable layers (default L/2..L-1)")
    prof.add_argument("--no-timing", action="store_true", help="skip the cost measurements (no speed-up)")
    prof.add_argument("--out", default=None, help="write the profile as JSON")
    prof.add_argument("--plot", default=None, help="write a PNG (needs matplotlib)")
    prof.set_defaults(handler=_profile)


def parse_exit(spec: str | None) -> tuple[str | None, dict]:
    """``softmax`` / ``similarity`` / ``classifier:PATH`` -> (criterion name, criterion kwargs)."""
    if spec is None:
        return None, {}
    name, _, arg = spec.partition(":")
    name = {"similarity": "hidden_similarity", "softmax_response": "softmax"}.get(name, name)
    if name == "classifier":
        if not arg:
            raise ValueError("--exit classifier needs a file: --exit classifier:PATH")
        return name, {"path": arg}
    if arg:
        raise ValueError(f"--exit {spec!r}: only classifier takes a ':' argument")
    if name == "heads":
        raise ValueError("early-exit heads are served with --heads PATH --alpha A, not --exit heads")
    if name not in ("softmax", "hidden_similarity"):
        raise ValueError(f"--exit {spec!r} is unknown; use softmax, similarity or classifier:PATH")
    return name, {}


def _layers(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise ValueError(f"--exit-layers must be comma-separated integers, got {text!r}") from exc


def api_key(flag: str | None) -> str | None:
    """The key from --api-key, else $EXITWISE_API_KEY; an empty one is an error, never "no auth"."""
    if flag is not None:
        if not flag.strip():
            raise ValueError("--api-key is empty; an empty key would accept every client (omit the flag for none)")
        return flag
    env = os.environ.get("EXITWISE_API_KEY")
    if env is not None and not env.strip():
        raise ValueError("EXITWISE_API_KEY is set but empty; unset it or give it a real key")
    return env


def limits(args: argparse.Namespace) -> dict:
    """create_app's body and queue limits from the flags, checked."""
    if not args.max_body_mb > 0:
        raise ValueError(f"--max-body-mb must be > 0, got {args.max_body_mb}")
    if args.max_queue < -1:
        raise ValueError(f"--max-queue must be >= 0 (or -1: unbounded), got {args.max_queue}")
    return {"max_body_bytes": int(args.max_body_mb * (1 << 20)),
            "max_queue": None if args.max_queue == -1 else args.max_queue}


def _serve(args: argparse.Namespace) -> int:
    from exitwise import load_model
    from exitwise.engine import LLMEngine
    from exitwise.server.app import create_app, serve_forever

    key = api_key(args.api_key)  # checked before the model loads
    app_limits = limits(args)
    if args.heads and args.exit:
        raise ValueError(f"--heads is an exit criterion itself; drop --exit {args.exit}")
    if not 0.0 < args.alpha < 1.0:
        raise ValueError(f"--alpha must lie in (0, 1), got {args.alpha}")
    exit_name, exit_kwargs = parse_exit(args.exit)
    threshold = args.exit_threshold
    if args.heads:
        # A head's confidence is tau(alpha) - entropy: it fires at >= 0, whatever alpha was asked for.
        exit_name, threshold = "heads", 0.0
        exit_kwargs = {"path": args.heads, "alpha": args.alpha, "mode": args.heads_mode, "gate": not args.no_gate}
    backbone = load_model(args.model)
    kwargs = {}
    if exit_name:
        kwargs = dict(exit=exit_name, exit_kwargs=exit_kwargs, exit_threshold=threshold,
                      exit_min_layer=args.exit_min_layer, exit_layers=_layers(args.exit_layers), kv_fill=args.kv_fill,
                      exit_mode=args.exit_mode)
    if args.speculative:
        if not exit_name:
            raise ValueError("--speculative drafts with an exit criterion: add --heads PATH or --exit NAME")
        kwargs.update(speculative=True, max_draft=args.max_draft)
    engine = LLMEngine(backbone, kv_cache_bytes=args.kv_cache_mb << 20, max_num_seqs=args.max_num_seqs,
                       max_model_len=args.max_model_len, **kwargs)
    app = create_app(engine, model_name=args.served_name or args.model, api_key=key, docs=args.docs, **app_limits)
    if args.host not in ("127.0.0.1", "localhost", "::1") and key is None:
        print(f"exitwise: warning: serving on {args.host} without --api-key", file=sys.stderr)
    serve_forever(app, args.host, args.port, log_level=args.log_level)
    return 0


def _profile(args: argparse.Namespace) -> int:
    from exitwise.engine.profile import main

    return main(args)
