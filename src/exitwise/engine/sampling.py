"""Sampling parameters and the batched sampler."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    """Per-request generation settings.

    ``temperature == 0`` means greedy. ``exit_threshold`` / ``exit_min_layer`` override the engine's
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

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k!r}")
        if any(not s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty, got {self.stop!r}")
        if self.exit_min_layer is not None and self.exit_min_layer < 1:
            raise ValueError(f"exit_min_layer must be >= 1, got {self.exit_min_layer!r}")
        if self.exit_alpha is not None and not 0.0 < self.exit_alpha < 1.0:
            raise ValueError(f"exit_alpha must be in (0, 1), got {self.exit_alpha!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


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

    def __call__(self, logits: torch.Tensor, request_ids: list[str], params: list[SamplingParams]) -> list[int]:
        """logits (B, V) -> B token ids."""
        out = logits.argmax(dim=-1).tolist()  # greedy for every row; sampled rows overwrite below
        for i, p in enumerate(params):
            if p.greedy:
                continue
            row = logits[i].float() / p.temperature  # (V,)
            if p.top_k:
                kth = torch.topk(row, min(p.top_k, row.numel())).values[-1]
                row = row.masked_fill(row < kth, float("-inf"))
            probs = torch.softmax(row, dim=-1)
            if p.top_p < 1.0:
                sorted_p, order = probs.sort(descending=True)
                # keep the smallest prefix whose mass reaches top_p (the first token always survives)
                drop = sorted_p.cumsum(0) - sorted_p >= p.top_p
                sorted_p = sorted_p.masked_fill(drop, 0.0)
                probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
            gen = self._generator(request_ids[i], p, logits.device)
            out[i] = int(torch.multinomial(probs, 1, generator=gen).item())
        return out
