"""Early-exit drafts: ordinary early-exit decode steps with the engine's exit plan (calibrated heads,
softmax response or the exit classifier; Draft & Verify / DSSD).

A step whose batch is confident at some exit layer yields a draft token per sequence from that
layer's readout; its skipped layers get K/V from the plan's KV fill. Drafting stops when a step is
not confident by the last exit layer (that token then joins the verification with the layers it has
run), at the limit, at EOS, or when no KV block is free. Every fed token has run the layers below
``start`` = the shallowest depth any of them reached, and those are exact (each attended only to K/V
of layers below its own exit), so verification resumes there from the saved inputs. If the first
step is not confident by the last exit layer the step runs on to full depth: its token is exact and
there is nothing to verify. The batch drafts together (the plan's batch-level rule), so at batch > 1
a draft needs every sequence confident at once.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from exitwise.engine.drafts.base import Draft, DraftFeedback, DraftSource, Payoff
from exitwise.engine.sequence import Sequence


class ExitDraft(DraftSource):
    name = "exit"

    def __init__(self, runner, plan, is_stop: Callable[[Sequence, int], bool], payoff: Payoff | None = None):
        if plan is None:
            raise ValueError("exit drafts need an exit criterion: pass exit=... (e.g. heads)")
        self.runner, self.plan, self.is_stop = runner, plan, is_stop
        self.payoff = payoff or Payoff(key="payoff_exit")
        self.last_exit = max(plan.exit_layers)  # a draft step not confident here stops drafting

    def propose(self, seqs: list[Sequence], limits: list[int],
                grow: Callable[[list[Sequence]], bool]) -> Draft:
        runner, plan = self.runner, self.plan
        limit = min(limits)
        # the batch drafts together: every row must want it (and none be paused for drafts that did not pay)
        if limit <= 0 or not all(self.allows(s) for s in seqs) or any(self.payoff.paused(s) for s in seqs):
            return Draft.empty(len(seqs), self.name)
        inputs: list[list[torch.Tensor]] = []  # per fed token: the inputs (B, D) of the layers it ran
        depths: list[int] = []  # per fed token: layers run
        drafts: list[list[int]] = []  # per draft step: one token per sequence
        while True:
            layer_inputs: list[torch.Tensor] = []
            logits, depth = runner.decode(seqs, plan, stop=self.last_exit if drafts else None,
                                          inputs=layer_inputs)
            inputs.append(layer_inputs)
            depths.append(depth)
            if logits is None:  # not confident: verify everything fed so far, this token included
                break
            if depth == runner.num_layers:  # only when nothing is pending: an exact full-depth step
                plan.observe(seqs, logits)
                return Draft([[] for _ in seqs], [1] * len(seqs), logits=logits, source=self.name,
                             layers_run=depth)
            tokens = logits.argmax(-1).tolist()
            plan.observe(seqs, logits)
            drafts.append(tokens)
            for s, t in zip(seqs, tokens, strict=True):
                s.token_ids.append(t)
            if (len(drafts) >= limit or any(self.is_stop(s, t) for s, t in zip(seqs, tokens, strict=True))
                    or not grow(seqs)):
                break
        n, start = len(inputs), min(depths)
        x = torch.stack([step[start] for step in inputs], dim=1).reshape(len(seqs) * n, -1)  # (B n, D)
        tokens = [[d[b] for d in drafts] for b in range(len(seqs))]
        return Draft(tokens, [n] * len(seqs), start=start, inputs=x, source=self.name, layers_run=sum(depths))

    def observe(self, seqs: list[Sequence], draft: Draft, feedback: list[DraftFeedback]) -> None:
        for s, fb in zip(seqs, feedback, strict=True):
            self.payoff.update(s, fb)
