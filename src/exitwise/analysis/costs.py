"""The cost model of an early-exit decode step: the measured parts of a step on the engine's runner
(one decoder layer, the output head, each exit check, the KV fill per skipped layer, the rest) and
the speed-up they predict for given exit layers. A prediction, not a measurement of the engine: it
assumes a step costs the sum of its parts."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from exitwise.exits.base import ExitCriterion, Readout


@dataclass
class Costs:
    """Milliseconds per decode step of a batch."""

    batch: int
    layer: float
    head: float
    step_full: float  # whole decode step at full depth (no exit machinery)
    other: float  # step_full - L * layer - head: embedding, contexts, sampling-side work
    kv_fill_per_layer: float
    check: dict[str, float] = field(default_factory=dict)


def predicted_speedup(c: Costs, name: str, exit_layer: torch.Tensor, exit_grid: list[int], num_layers: int) -> float:
    """Full-depth step time over the mean predicted step time when tokens leave at ``exit_layer`` (N,).

    A step that leaves at layer e ran e layers, one check at every exit layer up to e, the KV fill of
    the L - e skipped layers, and the head once -- except that softmax response samples from the logits
    of its successful check, so an early exit pays no extra head.
    """
    e = exit_layer.double()
    n_checks = (torch.tensor(exit_grid)[:, None] <= exit_layer[None]).sum(0).double()
    cost = c.other + e * c.layer + n_checks * c.check.get(name, 0.0) + (num_layers - e) * c.kv_fill_per_layer
    head_again = (exit_layer == num_layers) | (name != "softmax")
    cost = cost + head_again.double() * c.head
    return c.step_full / float(cost.mean())


def oracle_speedup(c: Costs, exit_layer: torch.Tensor, num_layers: int) -> float:
    """An exit decision that costs nothing: only the layers run, the KV fill and the head remain."""
    e = exit_layer.double()
    cost = c.other + e * c.layer + (num_layers - e) * c.kv_fill_per_layer + c.head
    return c.step_full / float(cost.mean())



def _ms(fn, reps: int) -> float:
    """Best-of-3 mean milliseconds (the machine may be shared: slowdowns only add time)."""
    fn()
    best = math.inf
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - t) / reps)
    return 1000 * best


def prepare_decode_step(eng, batch: int, context: int = 128, max_tokens: int = 8):
    """Prefill ``batch`` synthetic requests of ``context`` tokens on an idle engine and prepare one
    decode step as the scheduler would: (seqs, step context, embedded last tokens (B, D)). For timing
    the parts of a step (here and in the benchmarks)."""
    from exitwise.engine.sampling import SamplingParams

    vocab = eng.runner.backbone.vocab_size
    for i in range(batch):
        prompt = [(7 + 31 * i + j) % vocab for j in range(context)]
        eng.add_request(prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    eng.step()  # prefill: real K/V in the cache
    seqs = list(eng.scheduler.running)
    for s in seqs:
        eng.blocks.append_slot(s)  # the scheduler does this before a real decode step
    return seqs, eng.runner.decode_context(seqs), eng.runner.model.embed_tokens([s.last_token for s in seqs])


@torch.inference_mode()
def measure_costs(backbone, criteria: dict[str, ExitCriterion], batch: int, context: int = 128,
                  reps: int = 5) -> Costs:
    """Time the parts of a decode step on the engine's runner: ``batch`` sequences of ``context`` tokens."""
    from exitwise.engine.llm import LLMEngine

    bs = 16
    eng = LLMEngine(backbone, num_kv_blocks=batch * (context // bs + 2), block_size=bs, max_num_seqs=batch,
                    max_num_batched_tokens=batch * context, enable_prefix_caching=False)
    seqs, ctx, x = prepare_decode_step(eng, batch, context)
    r = eng.runner
    L = r.num_layers
    mid = L // 2
    layer = _ms(lambda: r.layer(mid, x, ctx, True), reps * 3)
    head = _ms(lambda: r.logits(x), reps * 3)
    step = _ms(lambda: r.decode(seqs, None), reps)
    fill = _ms(lambda: r.propagate_kv(x, mid, ctx), reps * 3) / (L - mid)
    check = {name: _ms(lambda c=c: c.confidence(x, x, mid, Readout(x, r.logits)), reps * 3)
             for name, c in criteria.items()}
    for s in seqs:
        eng.abort(s.request_id)
    return Costs(batch, round(layer, 4), round(head, 4), round(step, 4), round(max(0.0, step - L * layer - head), 4),
                 round(fill, 4), {k: round(v, 4) for k, v in check.items()})
