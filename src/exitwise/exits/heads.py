"""Calibrated early-exit heads as an engine exit criterion (Valade v2; docs/papers.md, "Self-supervised exit heads").

confidence = tau_l(alpha) - H_l, the calibrated entropy threshold of the head at layer ``l`` minus
that head's entropy, so the engine's one threshold is **0** for every layer: a token is confident
exactly when its head fires (entropy <= tau_l). Layers without a head, or whose head never fires at
this alpha, return -inf. The head's logits are handed to the engine's :class:`Readout`, so an exiting
token gets the head's prediction, as in the paper, not the plain final-norm readout.

Cost: the faithful check evaluates a full-vocabulary head (V x D, as large as the output head: ~10 ms
for SmolLM2 at batch 1, several decoder layers) at every head layer reached, so a token no head fires
on paid all of them and early exit was slower than none (``benchmarks/heads_cost.py`` measures it).
The engine's *prefilter* hook runs a cheap gate first; the head is evaluated only when the gate passes
for the whole batch, and the head's own entropy still decides, so a gate can only remove exits, never
add one. ``gate=``

* ``"shortlist"`` (the default for translator heads): the head's entropy estimated from its logits on
  a vocabulary shortlist (:class:`~exitwise.exits.shortlist.Shortlist`: the 1024 lowest ids, each
  sequence's previous-step top 32, and a 256-id sample scaled up to the rest of the vocabulary; ~1.3k
  of W_out's 49k rows); passes where H_est <= tau * (1 + slack_rel) + slack_abs;
* ``"probe"`` (the default for linear heads with gates from ``heads calibrate``): a linear probe
  predicting the head's log-entropy (one dot product per sequence), thresholded per alpha for a
  calibrated recall;
* ``False``: the faithful criterion (``True``: the default for these heads).

Alpha per request: ``SamplingParams(exit_alpha=...)`` selects another calibrated level for one
request; :meth:`begin` builds per-sequence threshold vectors each step. An uncalibrated alpha is a
``ValueError`` at ``add_request`` (:meth:`check_params`).

Use: ``LLM(model, exit=HeadsCriterion.load(path, backbone, alpha=0.95), exit_threshold=0.0)``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from exitwise.exits.base import ExitCriterion, Readout
from exitwise.exits.shortlist import Shortlist, entropy_estimate
from exitwise.heads.model import ExitHeads, alpha_key, entropy

_NEG, _POS = float("-inf"), float("inf")


class HeadsCriterion(ExitCriterion):
    name = "heads"
    # Always on: begin() is where per-request alphas are read, and prefilter() skips heads that cannot
    # fire for some sequence of the batch before any head is computed (gate or not).
    has_prefilter = True

    def __init__(self, heads: ExitHeads, alpha: float, mode: str = "max_coverage", gate: bool | str = True,
                 slack_rel: float = 0.25, slack_abs: float = 0.05, fixed: int = 1024, candidates: int = 32,
                 sample: int = 256, seed: int = 0):
        if not 0 < alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        self.heads = heads
        self.alpha = alpha
        self.mode = mode
        self.layers = list(heads.layers)  # the engine's default exit layers
        self.tau = dict(zip(heads.layers, heads.thresholds(alpha, mode), strict=True))
        # Every calibrated alpha's thresholds as (H,) tensors, looked up per request.
        self._taus: dict[str, torch.Tensor] = {}
        self._gates: dict[str, torch.Tensor | None] = {}
        for a in heads.calibrated_alphas(mode):
            self._add_alpha(a)
        self._add_alpha(alpha)
        self.gate = self._choose_gate(gate)  # "shortlist", "probe" or False (faithful)
        self.slack_rel, self.slack_abs = slack_rel, slack_abs
        self._list = Shortlist(fixed, candidates, sample, seed) if self.gate == "shortlist" else None
        # per-step state from begin(): (H, B) thresholds and probe-gate thresholds of this batch
        self._step_tau: torch.Tensor | None = None
        self._step_gate: torch.Tensor | None = None

    def _choose_gate(self, gate: bool | str) -> str | bool:
        translator = self.heads.kind == "translator"
        if gate is True:  # the default for these heads
            gate = "shortlist" if translator else "probe"
        if gate is False or gate is None:
            return False
        if gate == "shortlist":
            if not translator:
                raise ValueError("gate='shortlist' needs translator heads (they share the output head's rows)")
            return "shortlist"
        if gate == "probe":
            return "probe" if self.heads.has_gate else False  # no probe: checked faithfully
        raise ValueError(f"gate must be 'shortlist', 'probe', True or False, got {gate!r}")

    def _add_alpha(self, alpha: float) -> None:
        key = alpha_key(alpha)
        device = self.heads.device
        self._taus[key] = torch.tensor(self.heads.thresholds(alpha, self.mode), device=device)
        g = self.heads.gate_thresholds(alpha, self.mode)
        self._gates[key] = None if g is None else torch.tensor(g, device=device)

    @classmethod
    def load(cls, path: str | Path, backbone, alpha: float, mode: str = "max_coverage",
             gate: bool | str = True, **kwargs) -> HeadsCriterion:
        return cls(ExitHeads.load(path, backbone), alpha, mode, gate, **kwargs)

    def use_weight_dtype(self, dtype: str, rescore: int = 0) -> None:
        self.heads.use_weight_dtype(dtype, rescore)

    # ------------------------------------------------------------------------------- requests
    def check_params(self, params) -> None:
        """Reject a request whose ``exit_alpha`` these heads were not calibrated for."""
        a = getattr(params, "exit_alpha", None)
        if a is not None and alpha_key(a) not in self._taus:
            known = ", ".join(sorted(self._taus, key=float))
            raise ValueError(f"exit_alpha={a} is not calibrated for these heads ({self.mode} thresholds exist "
                             f"for alpha {known}); run `exitwise heads calibrate --alpha {a}`")

    def begin(self, head, seqs) -> None:
        """Per-sequence thresholds for this decode step (each request's alpha, else the default)."""
        if self._list is not None:
            self._list.begin(self.heads.output_weight, self.heads.output_bias, seqs)
        keys = [alpha_key(self.alpha if getattr(s.params, "exit_alpha", None) is None else s.params.exit_alpha)
                for s in seqs]
        if all(k == keys[0] for k in keys):  # the common case: one alpha, no per-row gather
            self._step_tau = self._taus[keys[0]][:, None].expand(-1, len(seqs))
            g = self._gates[keys[0]] if self.gate == "probe" else None
            self._step_gate = None if g is None else g[:, None].expand(-1, len(seqs))
            return
        self._step_tau = torch.stack([self._taus[k] for k in keys], 1)  # (H, B)
        gates = [self._gates[k] for k in keys]
        # a request whose alpha has no gate is checked faithfully: its gate always passes (+inf)
        self._step_gate = None if self.gate != "probe" else torch.stack(
            [torch.full_like(self._taus[k], _POS) if g is None else g for k, g in zip(keys, gates, strict=True)], 1)

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep this step's per-row state of ``rows`` only (per-sequence mode compacts the batch)."""
        if self._step_tau is not None:
            self._step_tau = self._step_tau.index_select(1, rows.to(self._step_tau.device))
        if self._step_gate is not None:
            self._step_gate = self._step_gate.index_select(1, rows.to(self._step_gate.device))
        if self._list is not None:
            self._list.select_rows(rows)

    def observe(self, seqs, logits: torch.Tensor) -> None:
        """Remember each sequence's top tokens of this step for the next step's shortlist gate."""
        if self._list is not None:
            self._list.observe(seqs, logits)

    def _tau(self, k: int, batch: int, device: torch.device, rows: torch.Tensor | None = None) -> torch.Tensor:
        """(batch,) thresholds of head k for the step's rows (``rows``: the subset the hidden state holds)."""
        if self._step_tau is not None and rows is not None:
            return self._step_tau[k].index_select(0, rows.to(self._step_tau.device))
        if self._step_tau is not None and self._step_tau.shape[1] == batch:
            return self._step_tau[k]
        return self._taus[alpha_key(self.alpha)][k].expand(batch).to(device)  # called without begin()

    # ------------------------------------------------------------------------------ prefilter
    @torch.inference_mode()
    def prefilter(self, hidden: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        """(B,) +inf where the full head is worth evaluating, -inf where not: a row whose head cannot
        fire (tau = -inf) fails, and with a gate a row whose gate score is above its gate threshold.
        Whatever the engine's threshold, +inf passes and -inf fails. Decisions are per row, so the
        per-sequence exit mode can use them; the batch rule needs every row to pass."""
        b = hidden.shape[0]
        k = self.heads.index.get(layer) if layer is not None else None
        if k is None:
            return torch.full((b,), _NEG, device=hidden.device)
        tau = self._tau(k, b, hidden.device)
        can_fire = tau != _NEG
        if not bool(can_fire.any()):  # no row can fire here: skip the gate's cost too
            return torch.full((b,), _NEG, device=hidden.device)
        if self.gate == "shortlist" and self._list.ready and self._list.rows() == b:
            passed = self.shortlist_entropy(k, hidden) <= tau * (1 + self.slack_rel) + self.slack_abs
        elif self._step_gate is None or self._step_gate.shape[1] != b:
            passed = can_fire
        else:
            passed = self.heads.gate_score(k, hidden) <= self._step_gate[k]
        return torch.where(passed & can_fire, _POS, _NEG)

    def shortlist_entropy(self, k: int, hidden: torch.Tensor) -> torch.Tensor:
        """(B,) estimate of head ``k``'s entropy from its logits on this step's shortlist (needs begin())."""
        return entropy_estimate(*self._list.logits(self.heads.features(k, hidden)))

    # ------------------------------------------------------------------------------- faithful
    @torch.inference_mode()
    def confidence(self, hidden: torch.Tensor, prev_hidden: torch.Tensor | None, layer: int,
                   readout: Readout) -> torch.Tensor:
        k = self.heads.index.get(layer)
        b = hidden.shape[0]
        if k is None:
            return torch.full((b,), _NEG, device=hidden.device)
        tau = self._tau(k, b, hidden.device, readout.rows)
        if bool((tau == _NEG).all()):  # the head never fires at these alphas: skip its cost
            return torch.full((b,), _NEG, device=hidden.device)
        logits = self.heads.logits(k, hidden)  # (B, V)
        readout.provide(logits.to(hidden.dtype))
        return tau - entropy(logits)  # (B,), >= 0 where the head fires
