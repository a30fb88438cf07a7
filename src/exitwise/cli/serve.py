"""``exitwise serve``: the OpenAI-compatible server over the early-exit engine."""

from __future__ import annotations

import argparse
import os
import sys

from exitwise.cli.argtypes import int_range, non_negative_float, port_arg, positive_float, positive_int
from exitwise.cli.engine_args import add_engine_args, engine_config
from exitwise.cli.model_args import add_model_args
from exitwise.server import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_QUEUE


def register(sub: argparse._SubParsersAction) -> None:
    srv = sub.add_parser("serve", help="OpenAI-compatible HTTP server for the early-exit engine")
    add_model_args(srv)
    srv.add_argument("--served-name", default=None, help="name clients send as `model` (default: --model)")
    add_engine_args(srv)
    srv.add_argument("--host", default="127.0.0.1", help="default loopback; 0.0.0.0 exposes the server")
    srv.add_argument("--port", type=port_arg, default=8000)
    srv.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` (or $EXITWISE_API_KEY)")
    srv.add_argument("--max-body-mb", type=positive_float, default=DEFAULT_MAX_BODY_BYTES / (1 << 20),
                     help="refuse request bodies over this many MiB with 413, before reading them (default: 8)")
    srv.add_argument("--max-queue", type=int_range(-1), default=DEFAULT_MAX_QUEUE,
                     help="requests that may wait for a slot in the running batch; past it 429 with Retry-After "
                          "(default: 64; -1: unbounded)")
    srv.add_argument("--docs", action="store_true",
                     help="serve /openapi.json and a plain /docs page (behind --api-key; off by default)")
    srv.add_argument("--log-level", default="info")
    r = srv.add_argument_group("replicas (Ray Serve; needs pip install 'exitwise[ray]')")
    r.add_argument("--replicas", type=positive_int, default=None,
                   help="serve N replicas, each a full engine, behind one port (default: one engine, no Ray)")
    r.add_argument("--ray-address", default=None, help="Ray cluster to deploy on (default: a local Ray)")
    r.add_argument("--replica-cpus", type=non_negative_float, default=1.0,
                   help="CPUs each replica reserves; its torch threads unless --threads (default: 1)")
    r.add_argument("--replica-gpus", type=non_negative_float, default=None,
                   help="GPUs each replica reserves (default: 1 with --device cuda, else 0)")
    srv.set_defaults(handler=_serve)


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
    from exitwise.engine import LLMEngine
    from exitwise.server.app import create_app, serve_forever

    key = api_key(args.api_key)  # checked before the model loads
    app_limits = limits(args)
    config = engine_config(args)
    if args.host not in ("127.0.0.1", "localhost", "::1") and key is None:
        print(f"exitwise: warning: serving on {args.host} without --api-key", file=sys.stderr)
    if args.replicas is not None:
        return _serve_replicas(args, config, key, app_limits)
    engine = LLMEngine(config=config)
    app = create_app(engine, model_name=args.served_name or args.model, api_key=key, docs=args.docs, **app_limits)
    serve_forever(app, args.host, args.port, log_level=args.log_level)
    return 0


def _serve_replicas(args: argparse.Namespace, config, key: str | None, app_limits: dict) -> int:
    from exitwise.server import replicas

    replicas.require_ray()  # the install hint before anything else happens
    gpus = args.replica_gpus
    if gpus is None:
        gpus = 1.0 if str(args.device).startswith("cuda") else 0.0
    spec = replicas.ReplicaSpec(config, served_name=args.served_name, api_key=key,
                                docs=args.docs, threads=getattr(args, "threads", None), **app_limits)
    placement = replicas.Placement(args.replicas, cpus=args.replica_cpus, gpus=gpus)
    replicas.serve_forever(spec, placement, args.host, args.port, args.ray_address)
    return 0
