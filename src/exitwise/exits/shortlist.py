"""Vocabulary shortlist of an output head: exact logits on a few hundred rows instead of all V.

Shared by the softmax-response prefilter and the heads criterion's shortlist gate. The shortlist is

* the ``fixed`` lowest token ids (BPE vocabularies put the earliest, most frequent merges there);
* each sequence's ``candidates`` top tokens of its previous step's logits (topical tokens), kept on
  the sequence by :meth:`Shortlist.observe` and gathered once per step by :meth:`Shortlist.begin`;
* a fixed uniform ``sample`` of the remaining ids, whose mean extrapolates the tail of the softmax
  (otherwise a shortlist overstates confidence).

:meth:`Shortlist.logits` returns those pieces; :func:`tail_count` and :func:`entropy_estimate` turn them
into softmax estimates.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

STATE_KEY = "shortlist_candidates"  # in Sequence.criterion_state: the previous step's top tokens (k,)


class Shortlist:
    def __init__(self, fixed: int = 1024, candidates: int = 32, sample: int = 256, seed: int = 0):
        self.fixed, self.k, self.sample, self.seed = fixed, candidates, sample, seed
        self._static: tuple | None = None  # (weight id, W_static (M+S, D), bias or None, M, rest)
        self._step: tuple | None = None  # per step: (W_cand (B, k, D), bias or None, valid (B, k))

    def setup(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> tuple:
        """Static rows of ``weight`` (V, D): the fixed block and the tail sample (cached per weight)."""
        if self._static is None or self._static[0] is not weight:
            v = weight.shape[0]
            m = min(self.fixed, v)
            g = torch.Generator().manual_seed(self.seed)
            rest = v - m
            s = min(self.sample, rest)
            sample = (m + torch.randperm(rest, generator=g)[:s]).to(weight.device)
            ids = torch.cat([torch.arange(m, device=weight.device), sample])
            w = weight[ids].contiguous()  # (M + S, D)
            b = None if bias is None else bias[ids]
            self._static = (weight, w, b, m, rest)
        return self._static

    def begin(self, weight: torch.Tensor, bias: torch.Tensor | None, seqs) -> None:
        """Gather this step's per-sequence candidate rows once (reused at every exit layer)."""
        _, _, _, m, _ = self.setup(weight, bias)
        b, k = len(seqs), self.k
        cand = torch.zeros(b, k, dtype=torch.long)
        for i, s in enumerate(seqs):
            c = s.criterion_state.get(STATE_KEY)
            if c is not None:
                cand[i, :c.numel()] = c[:k]
        cand = cand.to(weight.device)
        valid = cand >= m  # ids inside the fixed block are already counted there
        w = weight[cand.view(-1)].view(b, k, -1)  # (B, k, D)
        cb = None if bias is None else bias[cand]
        self._step = (w, cb, valid)

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep this step's candidate state of ``rows`` only (per-sequence mode compacts the batch)."""
        if self._step is None:
            return
        w, bias, valid = self._step
        self._step = (w.index_select(0, rows), None if bias is None else bias.index_select(0, rows),
                      valid.index_select(0, rows))

    @property
    def ready(self) -> bool:
        return self._static is not None and self._step is not None

    def rows(self) -> int:
        return 0 if self._step is None else self._step[2].shape[0]

    def logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """Exact logits of features x (B, D) on the shortlist: (fixed (B, M), candidates (B, k) with -inf
        where not valid, sample (B, S), valid (B, k), rest = V - M)."""
        _, w_static, b_static, m, rest = self._static
        w_cand, b_cand, valid = self._step
        zs = F.linear(x, w_static, b_static).float()  # (B, M + S)
        zc = torch.bmm(w_cand, x.unsqueeze(-1)).squeeze(-1).float()  # (B, k)
        if b_cand is not None:
            zc = zc + b_cand
        zc = zc.masked_fill(~valid, float("-inf"))
        return zs[:, :m], zc, zs[:, m:], valid, rest

    def observe(self, seqs, logits: torch.Tensor) -> None:
        """Remember each sequence's top tokens of this step for the next step's shortlist."""
        top = torch.topk(logits, min(self.k, logits.shape[-1]), dim=-1).indices.cpu()  # (B, k)
        for s, t in zip(seqs, top, strict=True):
            s.criterion_state[STATE_KEY] = t


def tail_count(valid: torch.Tensor, rest: int) -> torch.Tensor:
    """(B,) number of ids outside the fixed block and the valid candidates (what the sample stands for)."""
    return rest - valid.sum(-1)


def entropy_estimate(zf: torch.Tensor, zc: torch.Tensor, zsmp: torch.Tensor, valid: torch.Tensor,
                     rest: int) -> torch.Tensor:
    """(B,) softmax entropy estimated from shortlist logits: the known ids S exactly, the sample R scaled
    to the tail (scale = tail size / |R|): Z = sum_S e^z + scale sum_R e^z, H = log Z - E_p[z].
    Exact when the shortlist covers the vocabulary."""
    known = torch.cat([zf, zc], dim=1)  # (B, M + k), -inf where a candidate is not valid
    mx = known.max(-1, keepdim=True).values
    if zsmp.shape[1]:
        mx = torch.maximum(mx, zsmp.max(-1, keepdim=True).values)
    ek = torch.exp(known - mx)  # exp(-inf) = 0
    zk = torch.where(ek > 0, known - mx, torch.zeros_like(known))  # avoid 0 * -inf
    z_sum = ek.sum(-1)
    ez_sum = (ek * zk).sum(-1)
    if zsmp.shape[1]:
        scale = tail_count(valid, rest).to(zsmp.dtype) / zsmp.shape[1]
        es = torch.exp(zsmp - mx)
        z_sum = z_sum + scale * es.sum(-1)
        ez_sum = ez_sum + scale * (es * (zsmp - mx)).sum(-1)
    return torch.log(z_sum) - ez_sum / z_sum
