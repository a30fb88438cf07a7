"""Adapter drafts (Kangaroo, Liu et al. 2024): a shallow sub-network of the model itself drafts.

Each draft step feeds one token per sequence through layers 0..E-1 exactly (writing their K/V), then
a small trained adapter (:mod:`exitwise.heads.adapter`) and the model's own final norm and output
head. A row stops drafting at its first draft whose top probability is below ``threshold``
(Kangaroo's second early exit), dropping that draft: proposing it unfed would gain nothing, since
the verification pass emits the full model's own token at that position anyway, and feeding it
would cost a verified position for a likely rejection. At EOS or its limit a row's last draft is
proposed unfed (as early-exit drafts do). The batch steps together while any row still drafts (a
row that stopped is fed along, its extra positions dropped), or until no KV block is free.

Every fed token has run layers below E exactly (each attended only to K/V of those layers), so
verification resumes at layer E from the saved layer-E inputs, as it does for early-exit drafts.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from exitwise.engine.drafts.base import Draft, DraftFeedback, DraftSource, Payoff
from exitwise.engine.drafts.readout import FullReadout, ShortlistReadout
from exitwise.engine.sequence import Sequence


class AdapterDraft(DraftSource):
    name = "adapter"

    def __init__(self, runner, adapter, threshold: float, is_stop: Callable[[Sequence, int], bool],
                 payoff: Payoff | None = None, readout: FullReadout | ShortlistReadout | None = None):
        if not 1 <= adapter.layer < runner.num_layers:
            raise ValueError(f"adapter layer {adapter.layer} is outside 1..{runner.num_layers - 1}")
        self.runner, self.adapter, self.threshold, self.is_stop = runner, adapter, threshold, is_stop
        self.layer = adapter.layer
        self.readout = readout or FullReadout(runner)  # the whole head, or a shortlist (engine/drafts/readout.py)
        if payoff is None:
            # every draft step streams the readout; each drafted token also runs layers 0..E-1 at one
            # row (the first step's are the verification's own: it resumes at E)
            below, read = step_shares(runner, self.layer, self.readout.rows)
            payoff = Payoff(key="payoff_adapter", draft_cost=below + read, attempt_cost=read)
        self.payoff = payoff

    @torch.inference_mode()
    def step(self, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Feed each sequence's last token through layers 0..E-1: (layer-E inputs (B, D), draft tokens
        (B,), their probabilities (B,))."""
        runner = self.runner
        ctx = runner.decode_context(seqs)
        x = runner.model.embed_tokens([s.last_token for s in seqs])  # (B, D)
        for i in range(self.layer):
            x = runner.layer(i, x, ctx, decode=True)
        token, prob = self.readout(self.adapter(x).to(x.dtype), seqs)
        return x, token, prob

    def propose(self, seqs: list[Sequence], limits: list[int],
                grow: Callable[[list[Sequence]], bool]) -> Draft:
        # the batch drafts together: every row must want it (and none be paused for drafts that did not pay)
        if max(limits) <= 0 or not all(self.allows(s) for s in seqs) or any(self.payoff.paused(s) for s in seqs):
            return Draft.empty(len(seqs), self.name)
        b = len(seqs)
        inputs: list[torch.Tensor] = []  # per step: the layer-E inputs (B, D) of the fed tokens
        drafts: list[list[int]] = []  # per step: one draft token per sequence
        cut: list[int | None] = [0 if n <= 0 else None for n in limits]  # per row: its number of drafts, once known
        fed: list[int] = [1] * b  # per row: positions to verify (its committed token, then its fed drafts)
        while True:
            x, token, prob = self.step(seqs)
            inputs.append(x)
            tokens, sure = token.tolist(), (prob >= self.threshold).tolist()
            drafts.append(tokens)
            j = len(drafts)
            for r, s in enumerate(seqs):
                if cut[r] is not None:
                    continue
                if not sure[r]:
                    cut[r], fed[r] = j - 1, j  # drop the unsure draft
                elif j >= limits[r] or self.is_stop(s, tokens[r]):
                    cut[r], fed[r] = j, j  # this draft is the row's last (proposed, not fed)
            if all(c is not None for c in cut):
                break
            for s, t in zip(seqs, tokens, strict=True):
                s.token_ids.append(t)
            if not grow(seqs):
                break
        n = len(inputs)
        counts = [n if c is None else c for c in cut]
        fed = [n if c is None else f for c, f in zip(cut, fed, strict=True)]  # no block left: verify what was fed
        steps = torch.stack(inputs, dim=1)  # (B, n, D)
        x = torch.cat([steps[r, :f] for r, f in enumerate(fed)]) if min(fed) < n else steps.reshape(b * n, -1)
        tokens = [[d[r] for d in drafts[:c]] for r, c in enumerate(counts)]
        return Draft(tokens, fed, start=self.layer, inputs=x, source=self.name, layers_run=self.layer * n)

    def observe(self, seqs: list[Sequence], draft: Draft, feedback: list[DraftFeedback]) -> None:
        for s, fb in zip(seqs, feedback, strict=True):
            # a row the adapter drafted nothing for still paid its readout (the attempt's cost): a
            # model whose adapter is never sure pauses too
            self.payoff.update(s, fb)


def _bytes(linear: torch.nn.Module) -> int:
    """What a one-row matmul of ``linear`` streams: its tensors' bytes."""
    return sum(t.numel() * t.element_size() for t in (*linear.parameters(), *linear.buffers()))


def step_shares(runner, layers: int, readout_rows: int) -> tuple[float, float]:
    """The shares of a one-row decode step's weight bytes streamed by layers 0..``layers``-1 and by a
    readout of ``readout_rows`` head rows (a CPU decode step costs about the bytes it streams)."""
    model = runner.model
    per_layer = [sum(_bytes(lin) for lin in w.linears) for w in model.layers]
    out = model.output
    head = _bytes(out.lowp) if out.lowp is not None else out.weight.numel() * out.weight.element_size()
    step = sum(per_layer) + head
    return sum(per_layer[:layers]) / step, head * min(1.0, readout_rows / out.weight.shape[0]) / step
