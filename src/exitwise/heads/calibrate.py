"""Entropy thresholds per head and agreement level alpha (docs/papers.md; CALM's Learn-then-Test).

A head *fires* on a token when its entropy is <= its threshold tau; it is *correct* when its argmax
equals the full model's argmax. Two rules, both stored per alpha and per head in the heads' JSON:

* ``max_coverage`` (Valade v2): sort the calibration tokens by entropy; tau = entropy of the largest k
  whose k lowest-entropy tokens agree at rate >= alpha (k only at ties' ends, so exactly k tokens fire).
  An empirical rule: on fresh text the agreement fluctuates around alpha.
* ``guaranteed`` (beyond the paper): Learn-then-Test with fixed-sequence testing. Candidate thresholds
  lie on a grid fixed in advance (tau_i = log(V) * (i / G)^2, finer near 0 where high alphas live),
  tested in increasing order; at each, H0: "agreement over fired tokens < alpha" is tested with the
  exact one-sided binomial (Clopper-Pearson) p-value P(Bin(n, alpha) >= c), c of the n fired tokens
  being correct, computed in log space with ``math.lgamma`` (scipy is not a dependency). Testing stops
  at the first p > delta and tau is the last rejected candidate, so with probability >= 1 - delta
  the chosen threshold's agreement over fired tokens is >= alpha. The sequence starts at the first
  grid point firing at least n_min = ceil(log delta / log alpha) tokens (fewer can never reject);
  that start depends only on the entropies, not on the agreement labels. The guarantee assumes the
  calibration tokens are exchangeable with future ones; tokens of one text are correlated, which
  the held-out check in the report measures.

Never firing is encoded as tau = -inf in memory and ``null`` in JSON.

Gates (see ``model.py``): per head, ridge regression (closed form) of log(entropy) on the gate
features of the calibration tokens' hidden states. Per mode, alpha and head, the gate threshold is
the ``recall``-quantile of the gate scores of the tokens the head fires on, so the gate passes at
least that fraction of them. Scores used for choosing thresholds (and reported for the calibration
text) are out-of-fold: two folds of alternating windows, each scored by the probe fitted on the
other, so the threshold is not tuned on the probe's own training fit; the stored probe is then
fitted on all tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from exitwise.errors import DataError
from exitwise.heads.model import ENTROPY_FLOOR, ExitHeads, alpha_key, entropy, gate_features
from exitwise.models.spec import ModelSpec

MODES = ("max_coverage", "guaranteed")
GRID = 2000
GATE_RECALL = 0.98
GATE_RIDGE = 1.0  # L2 penalty per token-count-normalised Gram matrix entry (features have unit RMS)


@dataclass
class Scores:
    """Per head and token: entropy (H, N) and agreement with the full model's argmax (H, N)."""

    entropy: torch.Tensor
    correct: torch.Tensor  # bool
    hidden: torch.Tensor | None = None  # (H, N, D) float16 hidden states at the head layers, for gates
    window: torch.Tensor | None = None  # (N,) index of the window each token came from (gate folds)

    @property
    def tokens(self) -> int:
        return int(self.entropy.shape[1])


def check_alphas(alphas: list[float]) -> None:
    bad = [a for a in alphas if not 0 < a < 1]
    if bad or not alphas:
        raise ValueError(f"alpha must be in (0, 1), got {bad or alphas}")


@torch.inference_mode()
def collect(backbone, heads: ExitHeads, data: torch.Tensor, keep_hidden: bool = False) -> Scores:
    """Teacher-forced entropies and agreement of every head on token windows ``data`` (C, T);
    ``keep_hidden`` also keeps the head layers' hidden states (float16: 32k tokens x 4 heads ~150 MB)."""
    ents, oks, hids = [], [], []
    for row in data:
        state = backbone.start(row[None].to(backbone.device))
        e, ok, preds = [], [], []
        for k, layer in enumerate(heads.layers):
            h = backbone.run(state, layer).hidden[0]  # (T, D)
            if keep_hidden:
                hids.append(h.half().cpu())
            logits = heads.logits(k, h)  # (T, V)
            e.append(entropy(logits))
            preds.append(logits.argmax(-1))
        final = backbone.readout(backbone.run(state, backbone.num_layers).hidden[0]).argmax(-1)  # (T,)
        ok = [p == final for p in preds]
        ents.append(torch.stack(e).cpu())
        oks.append(torch.stack(ok).cpu())
    hidden = window = None
    if keep_hidden:
        h = len(heads.layers)
        hidden = torch.cat([torch.stack(hids[i:i + h]) for i in range(0, len(hids), h)], 1)  # (H, N, D)
        window = torch.arange(len(data)).repeat_interleave(data.shape[1])
    return Scores(torch.cat(ents, 1), torch.cat(oks, 1), hidden, window)


# ------------------------------------------------------------------------------------------ rules
def max_coverage(entropy: torch.Tensor, correct: torch.Tensor, alpha: float) -> float:
    """Largest entropy threshold whose fired tokens (entropy <= tau) agree at rate >= alpha."""
    e, order = torch.sort(entropy.double())
    c = correct[order].double()
    k = torch.arange(1, len(e) + 1, dtype=torch.float64)
    acc = torch.cumsum(c, 0) / k  # agreement of the k lowest-entropy tokens
    # a cut after position k-1 must not split tied entropies, else more than k tokens would fire
    boundary = torch.ones(len(e), dtype=torch.bool)
    boundary[:-1] = e[:-1] < e[1:]
    ok = torch.nonzero((acc >= alpha) & boundary).flatten()
    return float(e[ok[-1]]) if len(ok) else float("-inf")


def binom_tail_log(c: int, n: int, p: float) -> float:
    """log P(X >= c) for X ~ Binomial(n, p), exact, in log space (lgamma)."""
    if c <= 0:
        return 0.0
    if c > n:
        return float("-inf")
    x = torch.arange(c, n + 1, dtype=torch.float64)
    logpmf = (math.lgamma(n + 1) - torch.lgamma(x + 1) - torch.lgamma(n - x + 1)
              + x * math.log(p) + (n - x) * math.log1p(-p))
    return float(torch.logsumexp(logpmf, 0))


def min_tokens(alpha: float, delta: float) -> int:
    """Fewest fired tokens that can certify agreement >= alpha at level delta (all correct: alpha^n <= delta)."""
    return math.ceil(math.log(delta) / math.log(alpha))


def grid(vocab_size: int, points: int = GRID) -> torch.Tensor:
    """The fixed candidate sequence, increasing: log(V) * (i / G)^2 for i = 1..G."""
    i = torch.arange(1, points + 1, dtype=torch.float64)
    return math.log(vocab_size) * (i / points) ** 2


def guaranteed(entropy: torch.Tensor, correct: torch.Tensor, alpha: float, delta: float,
               candidates: torch.Tensor) -> float:
    """Learn-then-Test fixed-sequence threshold (see module docstring); -inf if nothing certifies."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    need = min_tokens(alpha, delta)
    if entropy.numel() < need:
        raise DataError(f"calibration set has {entropy.numel()} tokens; certifying agreement >= {alpha} with "
                        f"probability >= {1 - delta} needs at least {need} (more text, or a larger delta)")
    e, order = torch.sort(entropy.double())
    cum = torch.cumsum(correct[order].long(), 0)
    n_at = torch.searchsorted(e, candidates.double(), right=True)  # fired tokens per candidate
    log_delta = math.log(delta)
    chosen, started, last_n = float("-inf"), False, -1
    for tau, n in zip(candidates.tolist(), n_at.tolist(), strict=True):
        if n < need and not started:
            continue  # fewer than n_min fired: cannot reject; the sequence starts later (labels unseen)
        started = True
        if n == last_n:  # same fired set as the previous candidate: same p-value
            chosen = tau
            continue
        c = int(cum[n - 1])
        if binom_tail_log(c, n, alpha) > log_delta:
            break
        chosen, last_n = tau, n
    return chosen


def fire_stats(entropy: torch.Tensor, correct: torch.Tensor, tau: float) -> dict:
    """Coverage and agreement over fired tokens of threshold ``tau`` (agreement None if none fired)."""
    fired = entropy <= tau
    n = int(fired.sum())
    return {"fired": n, "coverage": round(n / max(1, entropy.numel()), 4),
            "agreement": round(float(correct[fired].double().mean()), 4) if n else None}


def thresholds(scores: Scores, alphas: list[float], vocab_size: int, delta: float | None = None) -> dict:
    """{mode: {alpha_key: [tau per head]}}; ``guaranteed`` only when ``delta`` is given."""
    check_alphas(alphas)
    out: dict = {"max_coverage": {}}
    for a in alphas:
        out["max_coverage"][alpha_key(a)] = [max_coverage(e, c, a)
                                             for e, c in zip(scores.entropy, scores.correct, strict=True)]
    if delta is not None:
        cands = grid(vocab_size)
        out["guaranteed"] = {alpha_key(a): [guaranteed(e, c, a, delta, cands)
                                            for e, c in zip(scores.entropy, scores.correct, strict=True)]
                             for a in alphas}
    return out


def to_json(table: dict) -> dict:
    """-inf (never fires) -> null; thresholds kept exact (rounding could let a tied token in or out)."""
    return {m: {a: [None if t == float("-inf") else t for t in ts] for a, ts in per.items()}
            for m, per in table.items()}


# ------------------------------------------------------------------------------------------ gates
def gate_target(entropy: torch.Tensor) -> torch.Tensor:
    """What a gate predicts: log(entropy). Thresholds live near 0 (1e-8..1e-1 nats), where a linear
    fit to raw entropy has no resolution; on the log scale they are spread out."""
    return entropy.double().clamp_min(ENTROPY_FLOOR).log()


def fit_gate(features: torch.Tensor, target: torch.Tensor, ridge: float = GATE_RIDGE) -> torch.Tensor:
    """Ridge regression (closed form, float64) of ``target`` (N,) on ``features`` (N, F) whose last
    column is the bias (not penalised); returns (F,) float32."""
    x = features.double()
    n = max(1, x.shape[0])
    gram = x.T @ x / n
    pen = torch.full((x.shape[1],), ridge / n, dtype=torch.float64)
    pen[-1] = 0.0
    w = torch.linalg.solve(gram + torch.diag(pen), x.T @ target.double() / n)
    return w.float()


def gate_scores(features: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return features.float() @ w


def gate_threshold(scores: torch.Tensor, fired: torch.Tensor, recall: float) -> float:
    """Smallest threshold passing >= ``recall`` of the fired tokens (score <= threshold); -inf if none fired."""
    s = torch.sort(scores[fired].double()).values
    if not len(s):
        return float("-inf")
    return float(s[min(len(s), math.ceil(recall * len(s))) - 1])


def gate_stats(scores: torch.Tensor, fired: torch.Tensor, threshold: float) -> dict:
    """Recall (fired tokens the gate passes; None if none fired) and pass rate (all tokens it passes:
    how often the full head is paid)."""
    passed = scores <= threshold
    n = int(fired.sum())
    return {"recall": round(float((passed & fired).sum()) / n, 4) if n else None,
            "pass": round(float(passed.double().mean()), 4) if scores.numel() else 0.0}


def fit_gates(heads: ExitHeads, cal: Scores, ridge: float = GATE_RIDGE) -> torch.Tensor:
    """Fit every head's gate on ``cal`` (stored in ``heads.gates``); returns out-of-fold scores (H, N)."""
    if cal.hidden is None or cal.window is None:
        raise ValueError("fitting gates needs the hidden states: collect(..., keep_hidden=True)")
    folds = cal.window % 2
    oof = torch.empty(cal.entropy.shape, dtype=torch.float32)
    for k in range(len(heads.layers)):
        feats = gate_features(cal.hidden[k])  # (N, D + 2)
        y = gate_target(cal.entropy[k])
        for f in (0, 1):
            train = folds != f
            if not bool(train.any()) or bool(train.all()):  # one window only: no fold to hold out
                train = torch.ones_like(train)
            oof[k, folds == f] = gate_scores(feats[folds == f], fit_gate(feats[train], y[train], ridge))
        heads.gates[k] = fit_gate(feats, y, ridge).to(heads.device)
    return oof


def held_out_gate_scores(heads: ExitHeads, scores: Scores) -> torch.Tensor:
    """(H, N) scores of the stored gates on held-out hidden states."""
    return torch.stack([gate_scores(gate_features(scores.hidden[k]), heads.gates[k].cpu())
                        for k in range(len(heads.layers))])


def gate_table(table: dict, cal: Scores, oof: torch.Tensor, recall: float) -> dict:
    """{mode: {alpha_key: [gate threshold per head]}} from out-of-fold calibration scores."""
    if not 0 < recall <= 1:
        raise ValueError(f"gate recall must be in (0, 1], got {recall}")
    return {mode: {a: [gate_threshold(oof[k], cal.entropy[k] <= tau, recall) for k, tau in enumerate(taus)]
                   for a, taus in per.items()}
            for mode, per in table.items()}


# ------------------------------------------------------------------------------------------ report
def report(heads: ExitHeads, table: dict, cal: Scores, test: Scores | None, alphas: list[float],
           gates: dict | None = None, cal_gate: torch.Tensor | None = None,
           test_gate: torch.Tensor | None = None) -> dict:
    """Per head: overall agreement; per mode, alpha and head: threshold, calibration and held-out stats,
    and with ``gates`` (thresholds) and gate scores (H, N): the gate's recall and pass rate."""
    per_head = []
    for k, layer in enumerate(heads.layers):
        row = {"layer": layer, "agreement_cal": round(float(cal.correct[k].double().mean()), 4)}
        if test is not None:
            row["agreement_test"] = round(float(test.correct[k].double().mean()), 4)
        per_head.append(row)
    rows, misses = [], []
    for mode, per in table.items():
        tolerance = 0.01 if mode == "max_coverage" else 0.0  # the acceptance rule per mode
        for a in alphas:
            for k, layer in enumerate(heads.layers):
                tau = per[alpha_key(a)][k]
                row = {"mode": mode, "alpha": a, "layer": layer, "threshold": None if tau == float("-inf") else tau,
                       "cal": fire_stats(cal.entropy[k], cal.correct[k], tau)}
                if gates is not None and cal_gate is not None:
                    g = gates[mode][alpha_key(a)][k]
                    row["gate"] = {"threshold": None if g == float("-inf") else g,
                                   "cal": gate_stats(cal_gate[k], cal.entropy[k] <= tau, g)}
                    if test is not None and test_gate is not None:
                        row["gate"]["test"] = gate_stats(test_gate[k], test.entropy[k] <= tau, g)
                if test is not None:
                    row["test"] = fire_stats(test.entropy[k], test.correct[k], tau)
                    agr = row["test"]["agreement"]
                    row["miss"] = agr is not None and agr < a - tolerance
                    if row["miss"]:
                        misses.append({"mode": mode, "alpha": a, "layer": layer, "agreement": agr,
                                       "fired": row["test"]["fired"]})
                rows.append(row)
    return {"heads": per_head, "oracle": {name: oracle(heads.layers, s) for name, s in (("cal", cal), ("test", test))
                                          if s is not None},
            "thresholds": rows, "misses": misses}


def oracle(layers: list[int], scores: Scores) -> dict:
    """The heads' ceiling, whatever the thresholds: the fraction of tokens on which some head agrees with
    the full model, and the mean layer of the first agreeing head over those tokens."""
    ok = scores.correct
    any_ok = ok.any(0)
    first = torch.tensor(layers)[ok.int().argmax(0)].double()
    return {"any_head_agrees": round(float(any_ok.double().mean()), 4),
            "mean_first_agreeing_layer": round(float(first[any_ok].mean()), 2) if bool(any_ok.any()) else None}


def format_report(rep: dict) -> str:
    lines = ["head  agreement(cal)  agreement(test)"]
    for h in rep["heads"]:
        lines.append(f"{h['layer']:>4}  {h['agreement_cal']:>14.3f}  {h.get('agreement_test', float('nan')):>15.3f}")
    for name, o in rep.get("oracle", {}).items():
        lines.append(f"oracle ({name}): some head agrees on {o['any_head_agrees']:.3f} of tokens, first agreeing "
                     f"head at layer {o['mean_first_agreeing_layer']} on average")
    lines.append("mode          alpha  layer  threshold  cov(cal)  agr(cal)  cov(test)  agr(test)")
    fmt = lambda v: "    -" if v is None else f"{v:.3g}"  # noqa: E731
    for r in rep["thresholds"]:
        t = r.get("test", {})
        lines.append(f"{r['mode']:<13} {r['alpha']:>5}  {r['layer']:>5}  {fmt(r['threshold']):>9}  "
                     f"{r['cal']['coverage']:>8.3f}  {fmt(r['cal']['agreement']):>8}  "
                     f"{fmt(t.get('coverage')):>9}  {fmt(t.get('agreement')):>9}{'  MISS' if r.get('miss') else ''}")
    lines.append(f"misses: {len(rep['misses'])}")
    if any("gate" in r for r in rep["thresholds"]):
        lines.append("gate (full head paid only where it passes): recall = fired tokens passed, pass = all tokens")
        lines.append("mode          alpha  layer  rec(cal)  pass(cal)  rec(test)  pass(test)")
        for r in rep["thresholds"]:
            g = r.get("gate")
            if g is None or g["threshold"] is None:
                continue  # the head never fires at this alpha: it is never evaluated, gate or not
            t = g.get("test", {})
            lines.append(f"{r['mode']:<13} {r['alpha']:>5}  {r['layer']:>5}  {fmt(g['cal']['recall']):>8}  "
                         f"{g['cal']['pass']:>9.3f}  {fmt(t.get('recall')):>9}  {fmt(t.get('pass')):>10}")
    return "\n".join(lines)


def curve(entropy: torch.Tensor, correct: torch.Tensor, points: int = 200) -> tuple[list[float], list[float]]:
    """Agreement of the k lowest-entropy tokens against coverage k/N."""
    order = torch.argsort(entropy)
    acc = torch.cumsum(correct[order].double(), 0) / torch.arange(1, len(order) + 1)
    idx = torch.linspace(0, len(order) - 1, points).long()
    return ((idx + 1) / len(order)).tolist(), acc[idx].tolist()


def plot(rep: dict, cal: Scores, test: Scores | None, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(rep["heads"])
    fig, axes = plt.subplots(1, n, figsize=(4 * n, 3.6), squeeze=False, sharey=True)
    for k, (ax, h) in enumerate(zip(axes[0], rep["heads"], strict=True)):
        ax.plot(*curve(cal.entropy[k], cal.correct[k]), label="calibration")
        if test is not None:
            ax.plot(*curve(test.entropy[k], test.correct[k]), label="held-out", linestyle="--")
        for r in rep["thresholds"]:
            if r["layer"] == h["layer"] and "test" in r and r["test"]["fired"]:
                marker = "o" if r["mode"] == "max_coverage" else "^"
                ax.scatter([r["test"]["coverage"]], [r["test"]["agreement"]], marker=marker, s=18, color="k")
        ax.set(title=f"head at layer {h['layer']}", xlabel="coverage (fraction of tokens fired)", xscale="log")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("agreement with the full model")
    axes[0][0].legend(fontsize=8, title="o max-coverage, ^ guaranteed (held-out)", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def calibrate_heads(heads_path: str, text: str, alphas: list[float], test_path: str | None = None,
                    model: ModelSpec | None = None, max_tokens: int = 32768, seq_len: int = 256,
                    guarantee: float | None = None, gate: bool = True, gate_recall: float = GATE_RECALL,
                    plot_path: str | None = None) -> dict:
    """``exitwise heads calibrate``: calibrate the heads at ``heads_path`` on the text file ``text`` for
    agreement levels ``alphas`` (and, with ``guarantee`` = delta, Learn-then-Test thresholds), fit their
    gates, store everything in the heads' files, evaluate on ``test_path``; print and return the report.
    ``model``: the model, its dtype and device (None, or a spec without a name: the one the heads name,
    float32 on the CPU unless the spec says otherwise)."""
    from exitwise.artifacts import get_field, read_manifest
    from exitwise.heads.model import FORMAT, paths
    from exitwise.heads.train import chunks, read_text, text_source, tokenize
    from exitwise.models.loading import load_model, load_recorded_model
    from exitwise.models.quantize import DEFAULT_HEAD_RESCORE

    check_alphas(alphas)
    if guarantee is not None and not 0 < guarantee < 1:
        raise ValueError(f"--guarantee (delta) must be in (0, 1), got {guarantee}")
    if guarantee is not None:  # fail before the expensive pass when the sample can never suffice
        need = max(min_tokens(a, guarantee) for a in alphas)
        if max_tokens < need:
            raise DataError(f"--max-tokens {max_tokens} is too few: certifying agreement >= {max(alphas)} "
                            f"with probability >= {1 - guarantee} needs at least {need} calibration tokens")
    cal_text = read_text(text)
    test_text = read_text(test_path) if test_path else None
    _, js = paths(heads_path)
    manifest = read_manifest(js, FORMAT, "heads manifest")
    name = get_field(manifest, "name", str, js)
    m = model or ModelSpec(name=None, dtype="float32")
    backbone = load_model(m.name, device=m.device, dtype=m.dtype) if m.name else \
        load_recorded_model(name, f"heads {js}", device=m.device, dtype=m.dtype)
    heads = ExitHeads.load(heads_path, backbone)
    # calibrated as the engine will compute them: in the model's weight dtype
    heads.use_weight_dtype(backbone.weight_dtype, DEFAULT_HEAD_RESCORE)

    def scores(text: str) -> Scores:
        # tokenise a prefix first: a megabyte file takes seconds, and only max_tokens are used
        ids = tokenize(backbone, text[: 16 * max_tokens])
        if len(ids) < max_tokens:
            ids = tokenize(backbone, text)
        ids = ids[: max_tokens]
        return collect(backbone, heads, chunks(ids, min(seq_len, len(ids))), keep_hidden=gate)

    recall = gate_recall
    if gate and not 0 < recall <= 1:
        raise ValueError(f"--gate-recall must be in (0, 1], got {recall}")
    cal = scores(cal_text)
    test = scores(test_text) if test_text is not None else None
    table = thresholds(cal, alphas, backbone.vocab_size, guarantee)
    stored = heads.meta.setdefault("thresholds", {})
    for mode, per in to_json(table).items():
        stored.setdefault(mode, {}).update(per)
    heads.meta["calibration"] = {"data": text_source(text), "tokens": cal.tokens, "delta": guarantee,
                                 "guarantee": "Learn-then-Test fixed sequence, exact binomial (Clopper-Pearson) "
                                              "p-values" if guarantee is not None else None}
    gates = cal_gate = test_gate = None
    if gate:
        cal_gate = fit_gates(heads, cal)
        gates = gate_table(table, cal, cal_gate, recall)
        test_gate = held_out_gate_scores(heads, test) if test is not None else None
        # Thresholds of alphas calibrated earlier were chosen for the old probes: drop them, so those
        # alphas run the faithful check instead of a gate that was never tuned for the new probe.
        heads.meta["gate"] = {"target": "log(entropy)", "features": "h/rms(h), log rms(h), 1",
                              "ridge": GATE_RIDGE, "recall": recall, "thresholds": to_json(gates)}
        heads.save(heads_path)  # the probes live in the safetensors next to the heads
    elif heads.meta.pop("gate", None) is not None or any(g is not None for g in heads.gates):
        heads.gates = [None] * len(heads.layers)  # stale gates were tuned for other thresholds
        heads.save(heads_path)
    else:
        heads.write_manifest(heads_path)
    rep = report(heads, table, cal, test, alphas, gates, cal_gate, test_gate)
    rep = {"model": backbone.name, "layers": heads.layers, "training": heads.meta.get("training"),
           "training_data": heads.meta.get("training_data"), "calibration": heads.meta["calibration"],
           "test": ({"data": text_source(test_path), "tokens": test.tokens} if test is not None else None),
           "alphas": alphas, "gate": heads.meta.get("gate") and {"recall": recall}, **rep}
    print(format_report(rep))
    print(f"thresholds stored in {js}")
    if plot_path:
        plot(rep, cal, test, plot_path)
        print(f"wrote {plot_path}")
    return rep
