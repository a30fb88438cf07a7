"""Server counters and their Prometheus text exposition (format 0.0.4, no client library needed).

Request counters live here because only the server knows about requests that were rejected or
whose client went away; token, queue, KV and exit-layer figures are read from the engine at scrape
time. One instance per app: no module-level state.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field

from exitwise.engine.llm import LLMEngine


@dataclass
class ServerMetrics:
    requests: int = 0  # accepted (passed validation)
    finished: int = 0
    aborted: int = 0  # client went away or the engine failed the request
    rejected: int = 0  # 400 / 401
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


def _line(out: list[str], name: str, kind: str, help_: str, value: float) -> None:
    out.append(f"# HELP exitwise_{name} {help_}")
    out.append(f"# TYPE exitwise_{name} {kind}")
    text = "NaN" if math.isnan(value) else repr(float(value)) if isinstance(value, float) else str(value)
    out.append(f"exitwise_{name} {text}")


def render(m: ServerMetrics, engine: LLMEngine) -> str:
    """Prometheus text for the server counters and the engine's current state."""
    sched, blocks = engine.scheduler, engine.blocks
    out: list[str] = []
    _line(out, "requests_total", "counter", "Requests accepted.", m.requests)
    _line(out, "requests_finished_total", "counter", "Requests completed (stop or length).", m.finished)
    _line(out, "requests_aborted_total", "counter", "Requests aborted (client disconnected or error).", m.aborted)
    _line(out, "requests_rejected_total", "counter", "Requests rejected with 400 or 401.", m.rejected)
    _line(out, "prompt_tokens_total", "counter", "Prompt tokens of accepted requests.", m.prompt_tokens)
    _line(out, "generated_tokens_total", "counter", "Completion tokens delivered.", m.generated_tokens)
    _line(out, "tokens_per_second", "gauge", f"Completion tokens per second over the last {m.window_s:g} s.",
          m.tokens_per_s())
    _line(out, "requests_waiting", "gauge", "Requests queued for admission (queue length).",
          len(sched.waiting))
    _line(out, "requests_running", "gauge", "Requests in the running batch.", len(sched.running))
    _line(out, "kv_blocks_used", "gauge", "KV cache blocks in use.", blocks.num_used)
    _line(out, "kv_blocks_total", "gauge", "KV cache blocks in the pool.", blocks.num_blocks)
    _line(out, "preemptions_total", "counter", "Sequences pre-empted (recomputed) for lack of KV blocks.",
          sched.num_preemptions)
    _line(out, "decode_steps_total", "counter", "Decode steps run.", engine.stats["decode_steps"])
    _line(out, "mean_exit_layer", "gauge", "Mean hidden-state index decode tokens were read out at (NaN before "
          "any decode).", engine.mean_exit_layer)
    _line(out, "num_layers", "gauge", "Decoder layers of the served model.", engine.runner.num_layers)
    return "\n".join(out) + "\n"
