"""What a draft reads its token from: the whole output head, or a shortlist of the vocabulary.

A draft only proposes; verification keeps the output the full model's. So a draft's readout may score
part of the vocabulary: the ``fixed`` lowest ids (BPE vocabularies put the earliest, most frequent
merges there) plus the ids that occur in each sequence's context (code and prose repeat their own
names). Scoring those rows costs a fraction of the head (SmolLM2's 49,152 rows cost about six of its
layers, more than the draft's own layers past E = 6), and the draft loses only the steps whose token
lies outside the shortlist. Its probability is the softmax over the shortlist: an over-estimate by
the mass outside it, which a draft threshold sees as slightly higher confidence.
"""

from __future__ import annotations

import torch

from exitwise.engine.sequence import Sequence


class FullReadout:
    """The model's own final norm and head over the whole vocabulary."""

    def __init__(self, runner):
        self.runner = runner
        self.rows = runner.model.output.weight.shape[0]  # head rows a readout streams

    def __call__(self, h: torch.Tensor, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor]:
        """h (B, D) -> (tokens (B,), their probabilities (B,))."""
        prob, token = torch.softmax(self.runner.logits(h).float(), -1).max(-1)
        return token, prob


class ShortlistReadout:
    """The final norm and the head's rows of the ``fixed`` lowest ids plus the ids among each
    sequence's last ``context`` tokens (their union over the batch)."""

    def __init__(self, runner, fixed: int, context: int = 1024):
        out = runner.model.output
        self.output, self.context = out, context
        vocab = out.weight.shape[0]
        self.fixed = min(fixed, vocab)
        self.rows = self.fixed  # head rows a readout streams (besides the context's few)
        self.fixed_ids = torch.arange(self.fixed, device=out.norm_weight.device)
        lowp = out.lowp
        if lowp is not None:  # a row prefix of the low-bit head: views of its tensors
            self.head = lowp.first_rows(self.fixed)
        else:
            w = out.weight[:self.fixed]
            b = None if out.bias is None else out.bias[:self.fixed]
            self.head = lambda x: torch.nn.functional.linear(x, w, b)

    def _context_ids(self, seqs: list[Sequence]) -> torch.Tensor:
        """(U,) the ids >= fixed among the batch's last ``context`` tokens, sorted."""
        ids = {t for s in seqs for t in s.token_ids[-self.context:] if t >= self.fixed}
        return torch.tensor(sorted(ids), dtype=torch.long, device=self.output.norm_weight.device)

    def __call__(self, h: torch.Tensor, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor]:
        """h (B, D) -> (tokens (B,), their probabilities over the shortlist (B,))."""
        x = self.output.norm(h)
        z = self.head(x).float()  # (B, fixed)
        ids = self._context_ids(seqs)
        if ids.numel():
            rows = self.output.weight[ids]  # (U, D) float32, de-quantised from the head where it is low-bit
            zc = x @ rows.t()  # (B, U)
            if self.output.bias is not None:
                zc = zc + self.output.bias[ids]
            z = torch.cat([z, zc.float()], -1)
        prob, col = torch.softmax(self.output.cap(z), -1).max(-1)
        return torch.cat([self.fixed_ids, ids])[col], prob  # column -> vocabulary id


def make_readout(runner, vocab: int) -> FullReadout | ShortlistReadout:
    """A draft readout: the whole head (``vocab`` 0 or at least the vocabulary) or a shortlist of the
    ``vocab`` lowest ids plus the context's."""
    if vocab <= 0 or vocab >= runner.model.output.weight.shape[0]:
        return FullReadout(runner)
    return ShortlistReadout(runner, vocab)
