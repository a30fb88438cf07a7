"""Softmax response (CALM): confidence = p_top1 - p_top2 of the readout at the exit layer.

``confidence`` is the faithful check: the full output head (V x D; 49152 x 576 for SmolLM2, ~113 MB
read, ~10 ms, about seven streamed decoder layers). Paid at every exit layer where the batch is not
confident, it more than doubled a SmolLM2 decode step when nothing exits.

Default (``shortlist=True``): a cheap *prefilter* runs first at each exit layer and the faithful check
runs only when the prefilter says the whole batch is confident; the engine exits only if the faithful
check agrees, so every exit is one the full-head check would also take at that layer (and with an
unreachable threshold nothing changes). The prefilter computes exact logits for a shortlist only
(:class:`~exitwise.exits.shortlist.Shortlist`, shared with the heads criterion's shortlist gate):

* the ``fixed`` lowest token ids (BPE vocabularies put the earliest, most frequent merges there);
* each sequence's ``candidates`` top tokens of its previous step's logits (topical tokens);
* a fixed uniform ``sample`` of the remaining ids, whose mean exp-logit extrapolates the tail mass
  of the softmax denominator (otherwise a shortlist overstates confidence).

From these it estimates p_top1 - p_top2. ~1.3k head rows instead of 49k: ~0.2-0.4 ms per check.
When the prefilter passes, the full head is computed once and, when the batch exits, reused for
sampling (so a successful check costs nothing extra). The price: an exit the faithful check would
take is missed when the estimate falls under the threshold (``slack`` lowers the prefilter's bar).
``max_prob=True`` gives CALM's max-probability variant.
"""

from __future__ import annotations

import torch

from exitwise.exits.base import ExitCriterion, Readout
from exitwise.exits.shortlist import Shortlist, tail_count


class SoftmaxResponse(ExitCriterion):
    name = "softmax"

    def __init__(self, max_prob: bool = False, shortlist: bool = True, fixed: int = 1024, candidates: int = 32,
                 sample: int = 256, slack: float = 0.0, seed: int = 0):
        self.max_prob = max_prob
        self.shortlist = shortlist
        self.fixed, self.k, self.sample, self.slack, self.seed = fixed, candidates, sample, slack, seed
        self._list = Shortlist(fixed, candidates, sample, seed)
        self._head = None  # the model's OutputHead, from begin()

    # -------------------------------------------------------------------------------- faithful
    def confidence(self, hidden: torch.Tensor, prev_hidden: torch.Tensor | None, layer: int,
                   readout: Readout) -> torch.Tensor:
        logits = readout.logits().float()  # (B, V)
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # (B, 1); avoids materialising softmax
        top = torch.topk(logits, 2, dim=-1).values  # (B, 2)
        p = torch.exp(top - lse)
        return p[:, 0] if self.max_prob else p[:, 0] - p[:, 1]

    # ------------------------------------------------------------------------------- prefilter
    @property
    def has_prefilter(self) -> bool:
        return self.shortlist

    def begin(self, head, seqs) -> None:
        """Gather this step's per-sequence candidate head rows once (reused at every exit layer)."""
        self._head = head
        if self.shortlist:
            self._list.begin(head.weight, head.bias, seqs)

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep this step's candidate state of ``rows`` only (the engine's per-sequence mode compacts the
        batch when confident sequences leave)."""
        self._list.select_rows(rows)

    def prefilter(self, hidden: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        """(B,) estimate of the confidence from the shortlist logits (exact on the shortlist)."""
        x = self._head.norm(hidden)  # (B, D)
        zf, zc, zsmp, valid, rest = self._list.logits(x)
        if self._head.softcap is not None:  # the head's soft-capped logits (Gemma); invalid candidates stay -inf
            zf, zsmp = self._head.cap(zf), self._head.cap(zsmp)
            zc = self._head.cap(zc).masked_fill(~valid, float("-inf"))
        allz = torch.cat([zf, zc, zsmp], dim=1)
        top = torch.topk(allz, 2, dim=-1).values  # (B, 2)
        mx = top[:, :1]
        known = torch.exp(zf - mx).sum(-1) + torch.exp(zc - mx).sum(-1)  # (B,)
        if zsmp.shape[1]:
            known = known + tail_count(valid, rest) * torch.exp(zsmp - mx).mean(-1)
        p = torch.exp(top - mx) / known[:, None]
        est = p[:, 0] if self.max_prob else p[:, 0] - p[:, 1]
        return est + self.slack

    def observe(self, seqs, logits: torch.Tensor) -> None:
        """Remember each sequence's top tokens of this step for the next step's shortlist."""
        if self.shortlist:
            self._list.observe(seqs, logits)
