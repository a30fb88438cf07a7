"""Server counters, exposed for Prometheus through ``prometheus-client``.

Request counters live here because only the server knows about requests that were rejected, refused
for a full queue, or whose client went away; token, queue, KV and exit-layer figures are read from
the engine at scrape time by a custom collector, so nothing is copied on the hot path. One registry
per app (never the library's global default registry): two apps in one process do not share series.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from exitwise.engine.llm import LLMEngine

CONTENT_TYPE = CONTENT_TYPE_LATEST


@dataclass
class ServerMetrics:
    requests: int = 0  # accepted (passed validation and the queue bound)
    finished: int = 0
    aborted: int = 0  # client went away
    failed: int = 0  # the engine failed the request (it alone)
    rejected: int = 0  # 400 / 401 / 413
    queue_rejected: int = 0  # 429: the waiting queue was full
    server_errors: int = 0  # unexpected 500s
    prompt_tokens: int = 0
    generated_tokens: int = 0
    window_s: float = 10.0
    started: float = field(default_factory=time.monotonic)
    _recent: deque = field(default_factory=deque)  # (time, tokens) within the last window_s

    def record_tokens(self, n: int) -> None:
        if n <= 0:
            return
        now = time.monotonic()
        self.generated_tokens += n
        self._recent.append((now, n))
        self._trim(now)

    def _trim(self, now: float) -> None:
        while self._recent and self._recent[0][0] < now - self.window_s:
            self._recent.popleft()

    def tokens_per_s(self) -> float:
        """Generated tokens per second over the last ``window_s`` (or since start, if shorter)."""
        now = time.monotonic()
        self._trim(now)
        span = min(self.window_s, max(now - self.started, 1e-3))
        return sum(n for _, n in self._recent) / span


class _Collector:
    """Yields every ``exitwise_*`` series from the counters and the engine's state at scrape time."""

    def __init__(self, m: ServerMetrics, engine: LLMEngine, queued: Callable[[], int], queue_limit: int | None):
        self.m, self.engine, self.queued, self.queue_limit = m, engine, queued, queue_limit

    def collect(self) -> Iterator[Metric]:
        m, engine = self.m, self.engine
        sched, blocks = engine.scheduler, engine.blocks
        yield _counter("requests_total", "Requests accepted.", m.requests)
        yield _counter("requests_finished_total", "Requests completed (stop or length).", m.finished)
        yield _counter("requests_aborted_total", "Requests aborted (client disconnected).", m.aborted)
        yield _counter("requests_failed_total", "Requests the engine failed (each alone; the batch went on).",
                       m.failed)
        yield _counter("requests_rejected_total", "Requests rejected with 400, 401 or 413.", m.rejected)
        yield _counter("queue_rejected_total", "Requests refused with 429 because the waiting queue was full.",
                       m.queue_rejected)
        yield _counter("server_errors_total", "Requests answered with an unexpected 500.", m.server_errors)
        yield _counter("prompt_tokens_total", "Prompt tokens of accepted requests.", m.prompt_tokens)
        yield _counter("generated_tokens_total", "Completion tokens delivered.", m.generated_tokens)
        yield _gauge("tokens_per_second", f"Completion tokens per second over the last {m.window_s:g} s.",
                     m.tokens_per_s())
        yield _gauge("queue_size", "Accepted requests not yet in the running batch (bounded by --max-queue).",
                     self.queued())
        yield _gauge("queue_limit", "The waiting-queue bound (--max-queue; NaN: unbounded).",
                     float("nan") if self.queue_limit is None else self.queue_limit)
        yield _gauge("requests_waiting", "Requests queued in the engine's scheduler.", len(sched.waiting))
        yield _gauge("requests_running", "Requests in the running batch.", len(sched.running))
        yield _gauge("kv_blocks_used", "KV cache blocks in use.", blocks.num_used)
        yield _gauge("kv_blocks_total", "KV cache blocks in the pool.", blocks.num_blocks)
        yield _counter("kv_window_skipped_reads_total", "K/V positions sliding-window decode layers did not read "
                       "(outside their window; summed over layers and sequences).",
                       engine.runner.model.window_skipped_reads)
        yield _counter("kv_window_freed_blocks_total", "KV blocks freed while their sequence ran because no layer's "
                       "sliding window reaches them (models whose layers all slide).", engine.blocks.window_freed)
        yield _counter("preemptions_total", "Sequences pre-empted (recomputed) for lack of KV blocks.",
                       sched.num_preemptions)
        yield _counter("decode_steps_total", "Decode steps run.", engine.stats["decode_steps"])
        if engine.spec is not None:
            yield from _draft_series(engine.spec.stats)
        yield _gauge("mean_exit_layer", "Mean hidden-state index decode tokens were read out at (NaN before any "
                     "decode).", engine.mean_exit_layer)
        yield _gauge("num_layers", "Decoder layers of the served model.", engine.runner.num_layers)


def _draft_series(stats) -> Iterator[Metric]:
    """Speculative decoding per draft source: passes, drafted, accepted and emitted tokens."""
    fams = {key: CounterMetricFamily(f"exitwise_draft_{key}_total", help_, labels=["source"]) for key, help_ in (
        ("passes", "Verification passes of a draft source's drafts."),
        ("drafted", "Draft tokens proposed (summed over sequences)."),
        ("accepted", "Draft tokens the full model kept."),
        ("tokens", "Tokens emitted by verification passes (kept drafts + the model's own); divided by "
                   "exitwise_draft_rows_total: tokens per sequence per pass."),
        ("rows", "Sequence rows in verification passes."))}
    for name, st in stats.sources.items():
        for key, fam in fams.items():
            fam.add_metric([name], getattr(st, key))
    yield from fams.values()
    yield _counter("speculative_plain_steps_total", "Speculative cycles with nothing to verify (a plain step).",
                   stats.plain_steps)


def _counter(name: str, help_: str, value: float) -> Metric:
    return CounterMetricFamily(f"exitwise_{name}", help_, value=value)


def _gauge(name: str, help_: str, value: float) -> Metric:
    return GaugeMetricFamily(f"exitwise_{name}", help_, value=value)


def make_registry(m: ServerMetrics, engine: LLMEngine, queued: Callable[[], int],
                  queue_limit: int | None) -> CollectorRegistry:
    """A registry of its own for one app: the counters in ``m``, the engine's state, the queue."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(m, engine, queued, queue_limit))
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    """The Prometheus text exposition of ``registry``."""
    return generate_latest(registry)
