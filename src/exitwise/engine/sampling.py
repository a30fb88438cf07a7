"""Sampling parameters and the batched sampler."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from exitwise.models import kernels

# Below this temperature sampling is greedy: dividing logits by 1e-300 (or 1e-40, which float32 cannot
# hold) gives inf/NaN probabilities, and at 1e-5 the softmax is already one-hot for any logit gap a
# model produces, so the argmax is the same distribution without the overflow.
GREEDY_TEMPERATURE = 1e-5
SEED_LIMIT = 2**64  # torch.Generator.manual_seed takes a 64-bit seed


@dataclass
class SamplingParams:
    """Per-request generation settings.

    ``temperature`` below ``GREEDY_TEMPERATURE`` (1e-5; 0 included) means greedy. ``seed`` lies in
    [0, 2**64). ``exit_threshold`` / ``exit_min_layer`` override the engine's
    exit criterion settings for this request (``exit_threshold=None`` keeps the engine default;
    ``float('inf')`` forces full depth); ``exit_alpha`` picks another calibrated agreement level of the
    heads criterion (None: the engine's). ``return_exit_layers`` adds per-token exit layers to outputs.
    """

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    exit_threshold: float | None = None
    exit_min_layer: int | None = None
    exit_alpha: float | None = None  # heads criterion: this request's calibrated agreement level
    return_exit_layers: bool = False
    draft: str | None = None  # speculative engines: a draft source name, "auto", or "none" (None: the engine's)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if self.seed is not None and not 0 <= self.seed < SEED_LIMIT:
            raise ValueError(f"seed must be in [0, 2**64), got {self.seed!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k!r}")
        if any(not s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty, got {self.stop!r}")
        if self.exit_threshold is not None and (math.isnan(self.exit_threshold) or self.exit_threshold == -math.inf):
            # -inf would read as "always confident" but the plan treats non-finite as "never exit"
            raise ValueError(f"exit_threshold must be a number or +inf (full depth), got {self.exit_threshold!r}")
        if self.exit_min_layer is not None and self.exit_min_layer < 1:
            raise ValueError(f"exit_min_layer must be >= 1, got {self.exit_min_layer!r}")
        if self.exit_alpha is not None and not 0.0 < self.exit_alpha < 1.0:
            raise ValueError(f"exit_alpha must be in (0, 1), got {self.exit_alpha!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE


class Sampler:
    """Turns a batch of logits into next tokens. Greedy rows share one argmax; sampled rows use their
    own ``torch.Generator`` (seeded per request) so a seed reproduces regardless of batch mates."""

    def __init__(self) -> None:
        self._generators: dict[str, torch.Generator] = {}

    def forget(self, request_id: str) -> None:
        self._generators.pop(request_id, None)

    def _generator(self, request_id: str, params: SamplingParams, device: torch.device) -> torch.Generator:
        gen = self._generators.get(request_id)
        if gen is None:
            gen = torch.Generator(device=device)
            if params.seed is not None:
                gen.manual_seed(params.seed)
            else:
                gen.seed()
            self._generators[request_id] = gen
        return gen

    def __call__(self, logits: torch.Tensor, request_ids: list[str],
                 params: list[SamplingParams]) -> list[int | Exception]:
        """logits (B, V) -> per row a token id, or the exception sampling that row raised: one request's
        bad settings fail that request alone, and the other rows' tokens are those they get anyway."""
        out: list[int | Exception] = kernels.argmax(logits).tolist()  # greedy rows; sampled rows overwrite
        for i, p in enumerate(params):
            if p.greedy:
                continue
            try:
                out[i] = self._sample(logits[i], request_ids[i], p)
            except Exception as exc:  # noqa: BLE001 - any failure here belongs to this row only
                out[i] = exc
        return out

    def _sample(self, logits: torch.Tensor, request_id: str, p: SamplingParams) -> int:
        gen = self._generator(request_id, p, logits.device)
        return int(torch.multinomial(self.probs(logits, p), 1, generator=gen).item())

    def accept(self, logits: torch.Tensor, drafts: list[int], request_id: str,
               p: SamplingParams) -> tuple[list[int], int]:
        """Speculative acceptance for one sequence: ``logits`` (n, V) are the full model's after each of
        its n fed positions (its last token, then drafts), ``drafts`` the proposed tokens (at least
        n - 1 of them). Returns (tokens to emit, drafts kept): the kept drafts and, unless every draft
        was kept with no position left to read, one token of the model's own.

        Greedy: drafts are kept while they equal the argmax. Sampled: draft d is kept with probability
        p(d) (the request's distribution after temperature / top-k / top-p); a rejection draws from p
        with d removed, renormalised -- speculative sampling with a one-hot draft, whose output has
        exactly the model's distribution."""
        n = logits.shape[0]
        if p.greedy:
            target = kernels.argmax(logits).tolist()
            a = 0
            while a < len(drafts) and a < n and drafts[a] == target[a]:
                a += 1
            return drafts[:a] + ([target[a]] if a < n else []), a
        gen = self._generator(request_id, p, logits.device)
        for j, d in enumerate(drafts[:n]):
            probs = self.probs(logits[j], p)  # (V,)
            u = torch.rand((), generator=gen, device=logits.device)
            if u < probs[d]:
                continue
            residual = probs.clone()
            residual[d] = 0.0
            return drafts[:j] + [int(torch.multinomial(residual, 1, generator=gen).item())], j
        a = min(len(drafts), n)
        if a < n:
            bonus = int(torch.multinomial(self.probs(logits[a], p), 1, generator=gen).item())
            return drafts[:a] + [bonus], a
        return drafts[:a], a

    def probs(self, logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
        """The distribution a sampled request draws from: (V,) logits -> (V,) probabilities after
        temperature, top-k and top-p."""
        row = logits.float() / p.temperature  # (V,)
        if p.top_k:
            kth = torch.topk(row, min(p.top_k, row.numel())).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        probs = torch.softmax(row, dim=-1)
        if p.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            # keep the smallest prefix whose mass reaches top_p (the first token always survives)
            drop = sorted_p.cumsum(0) - sorted_p >= p.top_p
            # a top_p below float32's smallest value rounds to 0 in the comparison: the first token
            # must still survive, or nothing is left to sample (found by the server's fuzz test)
            drop[0] = False
            sorted_p = sorted_p.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
        return probs
