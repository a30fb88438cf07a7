"""Lossless self-speculative decoding with the engine's own exit criterion (DSSD, METHODS.md §2.6).

One *cycle* replaces a decode step for a batch whose requests are all greedy:

1. **Draft.** Ordinary early-exit decode steps (the engine's :class:`ExitPlan`, e.g. calibrated heads):
   a step whose batch is confident at some exit layer yields a draft token per sequence from that
   layer's readout; its skipped layers get K/V from the plan's KV fill, as in early-exit decoding.
   Drafting stops when a step is not confident by the last exit layer (that token then joins the
   verification with the layers it has run), at ``max_draft`` drafts, at EOS, or when no KV block is
   free. If the very first step is not confident there is nothing to verify: it runs to full depth
   and its token is exact, so a cycle never costs more than a plain step plus the exit checks.
2. **Verify.** Every fed token has run the layers below ``m`` = the shallowest depth any of them
   reached, and those layers are exact: each attended only to K/V of layers below its own exit.
   One multi-token pass runs layers ``m``..L-1 for all fed tokens from their saved inputs to layer
   ``m`` (the drafts' own computation below ``m`` is reused), overwriting their approximate K/V.
3. **Accept** the longest prefix of drafts equal to the full model's argmax, plus the full model's
   token after it (the correction, or a bonus token when every fed draft matched). Rejected
   positions are rolled back: token ids truncated, surplus blocks returned; their stale K/V sits
   beyond the sequence length, is never attended to and is overwritten when the position is fed.

The batch drafts together (the plan's batch-level exit rule), so at batch > 1 a draft needs every
sequence confident at once; speculation pays off mainly at small batches. Sampled (temperature > 0)
requests are not speculated: a batch containing one takes a plain decode step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from exitwise.engine.kv_cache import BlockManager
from exitwise.engine.sequence import Sequence


@dataclass
class SpecStats:
    cycles: int = 0  # draft-verify cycles (each replaces >= 1 decode step)
    verify_passes: int = 0  # cycles that needed a verification pass
    drafted: int = 0  # draft tokens proposed, summed over sequences
    accepted: int = 0  # draft tokens the full model agreed with
    tokens: int = 0  # tokens emitted by cycles (accepted + corrections + bonus + exact)
    draft_layers: int = 0  # decoder layers run while drafting (per batch row)
    verify_layers: int = 0  # decoder layers run by verification passes (per batch row, once per pass)

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else float("nan")

    @property
    def wasted(self) -> int:
        """Draft tokens computed and thrown away."""
        return self.drafted - self.accepted

    def as_dict(self) -> dict:
        return {**{k: getattr(self, k) for k in self.__dataclass_fields__},
                "acceptance": self.acceptance, "wasted": self.wasted}


class SpeculativeDecoder:
    def __init__(self, runner, plan, blocks: BlockManager, max_draft: int = 6):
        self.runner = runner  # max_draft >= 1 is checked where it is configured (EngineConfig)
        self.plan = plan
        self.blocks = blocks
        self.max_draft = max_draft
        self.last_exit = max(plan.exit_layers)  # a draft step not confident here stops drafting
        self.stats = SpecStats()

    @staticmethod
    def eligible(seqs: list[Sequence]) -> bool:
        return all(s.params.greedy for s in seqs)

    def _grow(self, seqs: list[Sequence]) -> bool:
        """A slot for each sequence's next fed position, all or none (drafting never pre-empts)."""
        bs = self.blocks.block_size
        need = sum(len(s) > len(s.block_table) * bs for s in seqs)
        if need > self.blocks.num_free:
            return False
        for s in seqs:
            self.blocks.append_slot(s)
        return True

    def step(self, seqs: list[Sequence], budget: int, is_stop: Callable[[Sequence, int], bool]) -> list[list[int]]:
        """One cycle; returns the new tokens of each sequence (at least one each).

        ``budget`` caps the drafts (the fewest tokens any sequence may still emit); ``is_stop(seq,
        tok)`` says a token ends its sequence (EOS), after which drafting stops. On return every
        sequence's token ids are as on entry (the caller appends the returned tokens) and its blocks
        cover exactly the positions up to its new last token.
        """
        runner, plan = self.runner, self.plan
        base = [len(s) for s in seqs]  # each sequence feeds position base - 1 first
        inputs: list[list[torch.Tensor]] = []  # per fed token: the inputs (B, D) of the layers it ran
        depths: list[int] = []  # per fed token: layers run
        drafts: list[list[int]] = []  # per draft step: one token per sequence
        limit = max(1, min(self.max_draft, budget))
        self.stats.cycles += 1
        try:
            while True:
                layer_inputs: list[torch.Tensor] = []
                logits, depth = runner.decode(seqs, plan, stop=self.last_exit if drafts else None,
                                              inputs=layer_inputs)
                self.stats.draft_layers += depth
                inputs.append(layer_inputs)
                depths.append(depth)
                if logits is None:  # not confident: verify everything fed so far, this token included
                    break
                tokens = logits.argmax(-1).tolist()
                plan.observe(seqs, logits)
                if depth == runner.num_layers:  # only when nothing is pending: an exact full-depth token
                    self.stats.tokens += len(seqs)
                    return [[t] for t in tokens]
                drafts.append(tokens)
                for s, t in zip(seqs, tokens, strict=True):
                    s.token_ids.append(t)
                if (len(drafts) >= limit or any(is_stop(s, t) for s, t in zip(seqs, tokens, strict=True))
                        or not self._grow(seqs)):
                    break
            return self._verify(seqs, base, inputs, depths, drafts)
        finally:
            for s, n in zip(seqs, base, strict=True):
                del s.token_ids[n:]

    def _verify(self, seqs: list[Sequence], base: list[int], inputs: list[list[torch.Tensor]],
                depths: list[int], drafts: list[list[int]]) -> list[list[int]]:
        runner = self.runner
        n, b = len(inputs), len(seqs)
        start = min(depths)
        x = torch.stack([step[start] for step in inputs], dim=1).reshape(b * n, -1)  # (B n, D)
        logits = runner.verify(seqs, x, start, [p - 1 for p in base], n).view(b, n, -1)  # (B, n, V)
        target = logits.argmax(-1).tolist()  # target[i][j]: full model's token after fed token j
        self.stats.verify_passes += 1
        self.stats.verify_layers += runner.num_layers - start
        out, last = [], []
        for i in range(b):
            a = 0
            while a < len(drafts) and drafts[a][i] == target[i][a]:
                a += 1
            new = [drafts[j][i] for j in range(a)] + ([target[i][a]] if a < n else [])
            out.append(new)
            last.append(min(a, n - 1))
            self.stats.drafted += len(drafts)
            self.stats.accepted += a
            self.stats.tokens += len(new)
        for s, p, new in zip(seqs, base, out, strict=True):
            self.blocks.truncate(s, p + len(new) - 1)  # K/V is valid for every token but the last
        self.plan.observe(seqs, logits[torch.arange(b), torch.tensor(last)])
        return out
