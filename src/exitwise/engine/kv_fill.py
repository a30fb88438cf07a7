"""What happens to the K/V of layers a decode step skipped, so the cache never has holes.

One small interface, ``fill(runner, hidden, exit_layer, ctx)``, called after the batch exits at
hidden-state index ``exit_layer`` < L with ``hidden`` (B, D) the exit hidden state:

* ``propagate`` (default, CALM state propagation): each skipped layer j computes its own K/V from
  the exit hidden state (input norm + K/V projection + RoPE) — no attention, no MLP. Costs about one
  K/V projection per skipped layer (~6% of a SmolLM2 layer), all layers in one batched matmul.
* ``full``: run the remaining layers for real (exact K/V, no time saved in the layers; only the
  readout comes from the exit layer). The "oracle cache" of CALM.

A lazy policy (leave a hole, recompute it batched with a later deep token as EE-LLM does) would be a
third class here; it is not implemented.
"""

from __future__ import annotations

from typing import Protocol

import torch


class KVFill(Protocol):
    name: str

    def fill(self, runner, hidden: torch.Tensor, exit_layer: int, ctx) -> None: ...


class Propagate:
    name = "propagate"

    def fill(self, runner, hidden: torch.Tensor, exit_layer: int, ctx) -> None:
        runner.propagate_kv(hidden, exit_layer, ctx)


class FullCompute:
    name = "full"

    def fill(self, runner, hidden: torch.Tensor, exit_layer: int, ctx) -> None:
        x = hidden
        for i in range(exit_layer, runner.num_layers):
            x = runner.layer(i, x, ctx, decode=True)


KV_FILLS = {"propagate": Propagate, "full": FullCompute}


def make_kv_fill(name: str | KVFill) -> KVFill:
    if not isinstance(name, str):
        return name
    if name not in KV_FILLS:
        raise ValueError(f"kv_fill {name!r} is unknown; choose one of {sorted(KV_FILLS)}")
    return KV_FILLS[name]()
