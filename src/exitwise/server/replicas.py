"""Serving replicas on Ray Serve: the same app as ``exitwise serve``, N times, behind one HTTP port.

Each replica is a Ray actor that loads the model itself and runs its own engine (its own weights, KV
cache and batch); Serve's proxy owns the port and routes each request to a replica. Nothing is shared
between replicas, so a request's output is what one engine alone would produce, and a replica that
dies takes only its in-flight requests with it (their clients get a 5xx) while Serve starts another.

Ray is imported lazily (the optional ``ray`` extra): without it only :func:`require_ray` is reachable,
and it says how to install it.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, replace
from typing import Any

from exitwise.engine.config import EngineConfig
from exitwise.errors import ExitwiseError
from exitwise.server import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_QUEUE

APP_NAME = "exitwise"
DEPLOYMENT_NAME = "EngineReplica"
RAY_MISSING = "serving replicas needs Ray Serve: pip install 'exitwise[ray]'"


@dataclass(frozen=True)
class ReplicaSpec:
    """What every replica builds: plain values, pickled to each actor (no engine crosses processes)."""

    config: EngineConfig  # its ``model`` (a ModelSpec) is what each replica loads
    served_name: str | None = None
    api_key: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_queue: int | None = DEFAULT_MAX_QUEUE
    docs: bool = False
    threads: int | None = None  # torch threads per replica (None: its reserved CPUs, at least 1)

    def __post_init__(self) -> None:
        if self.config.model is None:
            raise ValueError("a replica loads the model of its EngineConfig: pass EngineConfig(model=ModelSpec(...))")


@dataclass(frozen=True)
class Placement:
    """How many replicas, and the Ray resources each one reserves."""

    replicas: int
    cpus: float = 1.0
    gpus: float = 0.0  # 1: one replica per GPU

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError(f"--replicas must be >= 1, got {self.replicas}")
        if self.cpus < 0 or self.gpus < 0:
            raise ValueError(f"replica resources must be >= 0, got cpus={self.cpus} gpus={self.gpus}")


def require_ray() -> Any:
    """The ``ray.serve`` module, or an ExitwiseError saying how to install it."""
    try:
        from ray import serve
    except ImportError as exc:
        raise ExitwiseError(RAY_MISSING) from exc
    return serve


class EngineReplica:
    """One replica: a full engine and the OpenAI app over it (wrapped by :func:`application`).

    The app is built here, in the replica's process, not on the driver: an engine (weights, KV cache,
    a background step loop) cannot be pickled, and each replica must own its own."""

    def __init__(self, spec: ReplicaSpec):
        import torch

        from exitwise.engine import LLMEngine
        from exitwise.server.app import create_app

        if spec.threads is not None:
            torch.set_num_threads(spec.threads)
        engine = LLMEngine(config=spec.config)
        self._app = create_app(engine, model_name=spec.served_name or spec.config.model.name, api_key=spec.api_key,
                               max_body_bytes=spec.max_body_bytes, max_queue=spec.max_queue, docs=spec.docs)

    def __serve_build_asgi_app__(self):
        """Serve's hook for an app made at replica start (``serve.ingress()`` without an app); Serve then
        runs the app's lifespan, which starts the engine loop."""
        return self._app

    def check_health(self) -> None:
        """Serve's periodic probe: raising marks the replica unhealthy and Serve replaces it."""
        if not self._app.state.server.llm.running():
            raise RuntimeError("the engine loop is not running")

    def pid(self) -> int:
        """The replica's process id (operators and tests find a replica's process by it)."""
        return os.getpid()


def application(spec: ReplicaSpec, placement: Placement):
    """The Serve application: :class:`EngineReplica` as an ingress deployment with ``placement``."""
    serve = require_ray()
    if spec.threads is None:  # as many torch threads as the CPUs the replica reserves, not the node's
        spec = replace(spec, threads=max(1, int(placement.cpus)))
    deployment = serve.deployment(serve.ingress()(EngineReplica), name=DEPLOYMENT_NAME,
                                  num_replicas=placement.replicas,
                                  ray_actor_options={"num_cpus": placement.cpus, "num_gpus": placement.gpus},
                                  # the app's --max-queue bounds waiting (429 past it): Serve must not
                                  # refuse or hold requests before the app sees them
                                  max_ongoing_requests=_max_ongoing(spec),
                                  health_check_period_s=5, health_check_timeout_s=30)
    return deployment.bind(spec)


def _max_ongoing(spec: ReplicaSpec) -> int:
    queue = 1024 if spec.max_queue is None else spec.max_queue
    return spec.config.max_num_seqs + queue + 1  # the app answers the one past both with its 429


def start(spec: ReplicaSpec, placement: Placement, host: str = "127.0.0.1", port: int = 8000,
          ray_address: str | None = None, wait_s: float = 600.0) -> None:
    """Connect to Ray (``ray_address``; None: a local instance), start Serve's proxy on ``host:port``,
    deploy the replicas and wait until all are healthy (or raise after ``wait_s``)."""
    import ray

    serve = require_ray()
    if not ray.is_initialized():
        ray.init(address=ray_address, include_dashboard=False, configure_logging=False)
    serve.start(http_options={"host": host, "port": port})
    serve.run(application(spec, placement), name=APP_NAME, route_prefix="/", blocking=False)
    wait_healthy(placement.replicas, wait_s)


def healthy_replicas() -> int:
    """Replicas of the app's deployment that Serve reports running (and passing their health check)."""
    serve = require_ray()
    app = serve.status().applications.get(APP_NAME)
    if app is None or DEPLOYMENT_NAME not in app.deployments:
        return 0
    return app.deployments[DEPLOYMENT_NAME].replica_states.get("RUNNING", 0)


def wait_healthy(n: int, timeout_s: float, poll_s: float = 0.5) -> None:
    """Block until ``n`` replicas run, or raise naming what Serve reported."""
    serve = require_ray()
    deadline = time.monotonic() + timeout_s
    while healthy_replicas() < n:
        if time.monotonic() > deadline:
            app = serve.status().applications.get(APP_NAME)
            raise ExitwiseError(f"{healthy_replicas()} of {n} replicas healthy after {timeout_s:.0f} s: "
                                f"{app.deployments if app else 'no application'}")
        time.sleep(poll_s)


def replica_pids() -> list[int]:
    """The process ids of the running replicas (ask each through Serve's handle, one call per replica
    until every distinct one answered)."""
    serve = require_ray()
    handle = serve.get_deployment_handle(DEPLOYMENT_NAME, app_name=APP_NAME)
    n = healthy_replicas()
    pids: set[int] = set()
    for _ in range(20 * max(n, 1)):  # the router spreads calls; a few rounds reach every replica
        pids.add(handle.pid.remote().result(timeout_s=30))
        if len(pids) >= n:
            break
    return sorted(pids)


def stop() -> None:
    """Shut Serve down (its proxy and replicas: each replica's app runs its lifespan shutdown) and
    disconnect from Ray; a local Ray instance stops with it."""
    import ray

    serve = require_ray()
    try:
        serve.shutdown()
    finally:
        ray.shutdown()


def serve_forever(spec: ReplicaSpec, placement: Placement, host: str = "127.0.0.1", port: int = 8000,
                  ray_address: str | None = None) -> None:  # pragma: no cover - blocks until a signal
    """:func:`start`, then block until Ctrl-C or SIGTERM; Serve and Ray are stopped on the way out."""
    require_ray()
    # Both signals raise KeyboardInterrupt, also while start() waits for replicas, and also where the
    # shell that launched us in the background left SIGINT ignored.
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        start(spec, placement, host, port, ray_address)
        print(f"exitwise: {placement.replicas} replicas serving on http://{host}:{port}", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        stop()


def _interrupt(signum: int, frame) -> None:
    raise KeyboardInterrupt
