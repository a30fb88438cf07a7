"""Exit profile: is a model worth exiting early? (``exitwise profile``)

On held-out text with teacher forcing (windows of ``chunk`` tokens, every position is one "decode
token") it measures:

* per layer l = 1..L, how often the readout's argmax (final norm + head on hidden state l) equals
  the final layer's;
* the oracle exit: per token, the first layer from which the argmax stays equal to the final one, its
  distribution and mean (and the same restricted to the engine's exit-capable layers);
* for each exit criterion (the engine's own :class:`~exitwise.exits.base.ExitCriterion` objects, at
  the engine's exit layers), the agreement / mean-exit-layer curve as the threshold moves, per token
  (batch 1) and with the engine's batch rule (a batch of 8 leaves at the first exit layer where all 8
  are confident);
* measured costs on the engine's runner at batch 1 and 8 (:mod:`exitwise.analysis.costs`);
* from those, the predicted decode speed-up of every threshold and the best one at >= 95% agreement.

The prediction is the cost model's, not a measurement of the engine: it also assumes decode tokens
look like teacher-forced tokens.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from exitwise.analysis.costs import Costs, measure_costs, oracle_speedup, predicted_speedup
from exitwise.engine.exit_plan import default_exit_layers
from exitwise.exits.base import ExitCriterion, Readout, make_criterion
from exitwise.models.spec import ModelSpec

AGREEMENT_TARGET = 0.95
FIXED_THRESHOLDS = {"softmax": [0.5, 0.8, 0.9, 0.95, 0.99], "hidden_similarity": [0.9, 0.95, 0.99, 0.995, 0.999],
                    "classifier": [0.5, 0.8, 0.9, 0.95, 0.99]}


@dataclass
class Readouts:
    """Teacher-forced argmax at every depth and criterion confidences at the exit layers."""

    argmax: torch.Tensor  # (L, N) argmax of the readout at hidden-state index 1..L
    confidence: dict[str, torch.Tensor]  # criterion -> (K, N) at the exit layers
    exit_layers: list[int]

    @property
    def num_layers(self) -> int:
        return self.argmax.shape[0]

    def agree(self) -> torch.Tensor:
        """(L, N) bool: readout at layer l equals the final layer's."""
        return self.argmax == self.argmax[-1]


@torch.inference_mode()
def collect(backbone, token_ids: list[int], criteria: dict[str, ExitCriterion], exit_layers: list[int],
            chunk: int = 512) -> Readouts:
    """Run ``token_ids`` in windows of ``chunk`` tokens through every layer and read out every depth."""
    argmax: list[torch.Tensor] = []
    conf: dict[str, list[torch.Tensor]] = {name: [] for name in criteria}
    is_exit = set(exit_layers)
    for start in range(0, len(token_ids), chunk):
        piece = torch.tensor([token_ids[start:start + chunk]], device=backbone.device)
        hs = backbone.hidden_states(piece)  # L+1 tensors (1, T, D)
        rows, prev = [], None
        per_crit: dict[str, list[torch.Tensor]] = {name: [] for name in criteria}
        for layer in range(1, backbone.num_layers + 1):
            h = hs[layer][0]
            logits = backbone.readout(h)  # (T, V): computed once, shared with softmax response
            rows.append(logits.argmax(-1))
            if layer in is_exit:
                readout = Readout(h, lambda _, lg=logits: lg)
                for name, crit in criteria.items():
                    per_crit[name].append(crit.confidence(h, prev, layer, readout).float().cpu())
                prev = h  # the engine compares with the previous *exit* layer
        argmax.append(torch.stack(rows).cpu())
        for name in criteria:
            conf[name].append(torch.stack(per_crit[name]))
    return Readouts(torch.cat(argmax, 1), {n: torch.cat(c, 1) for n, c in conf.items()}, list(exit_layers))


# ------------------------------------------------------------------------------------------- analysis
def oracle_layers(agree: torch.Tensor, layers: list[int] | None = None) -> torch.Tensor:
    """(N,) first layer from which the argmax stays equal to the final one.

    ``agree`` (L, N). With ``layers`` the oracle may only stop at those layers (and L): the first of them
    from which the readout agrees at every later layer.
    """
    L = agree.shape[0]
    stable = agree.flip(0).cumprod(0).flip(0).bool()  # (L, N) agrees here and at every deeper layer
    candidates = list(range(1, L + 1)) if layers is None else sorted(set(layers) | {L})
    idx = torch.tensor([c - 1 for c in candidates])
    ok = stable[idx]  # (C, N); the row of L is always True
    first = ok.float().argmax(0)  # index of the first True
    return torch.tensor(candidates)[first]


def exits_at(conf: torch.Tensor, layers: list[int], threshold: float, num_layers: int,
             group: int = 1) -> torch.Tensor:
    """(N',) layer each token leaves at: the first exit layer where its whole batch is confident, else L.

    With ``group`` = b the N tokens form N // b batches of b tokens taken N // b positions apart (so batch
    mates come from different parts of the text, like different requests); N' = b * (N // b).
    """
    k, n = conf.shape
    n_batches = n // group
    ok = conf[:, : n_batches * group] >= threshold  # (K, N')
    ok = ok.view(k, group, n_batches).all(1)  # (K, n_batches): token i is in batch i % n_batches
    ok = torch.cat([ok, torch.ones(1, n_batches, dtype=torch.bool)])  # row K: the last layer, always
    first = ok.float().argmax(0)  # first True
    layer = torch.tensor(list(layers) + [num_layers])[first]
    return layer.repeat(group)


def thresholds_for(name: str, conf: torch.Tensor, n: int = 41) -> list[float]:
    """Quantiles of the observed confidences (so the curve spans the whole range), the usual fixed
    values, and one above the maximum (nothing exits)."""
    qs = torch.quantile(conf.flatten()[:1_000_000].double(), torch.linspace(0, 1, n, dtype=torch.double))
    vals = {round(float(q), 6) for q in qs} | set(FIXED_THRESHOLDS.get(name, []))
    vals.add(round(float(conf.max()) + 1e-3, 6))
    return sorted(vals)


def criterion_curve(name: str, conf: torch.Tensor, agree: torch.Tensor, layers: list[int],
                    costs: dict[int, Costs]) -> dict:
    L = agree.shape[0]
    out: dict = {"thresholds": thresholds_for(name, conf)}
    for b in (1, 8):
        agreement, mean_layer, speedup = [], [], []
        for t in out["thresholds"]:
            ex = exits_at(conf, layers, t, L, group=b)  # (N',)
            right = agree[ex - 1, torch.arange(ex.numel())]
            agreement.append(round(float(right.float().mean()), 4))
            mean_layer.append(round(float(ex.float().mean()), 3))
            if b in costs:
                speedup.append(round(predicted_speedup(costs[b], name, ex, layers, L), 3))
        out[f"agreement_b{b}"], out[f"mean_exit_layer_b{b}"] = agreement, mean_layer
        if speedup:
            out[f"speedup_b{b}"] = speedup
            ok = [i for i, a in enumerate(agreement) if a >= AGREEMENT_TARGET]
            best = max(ok, key=lambda i: speedup[i])  # the no-exit threshold always qualifies
            out[f"best_b{b}"] = {"threshold": out["thresholds"][best], "agreement": agreement[best],
                                 "mean_exit_layer": mean_layer[best], "speedup": speedup[best]}
    return out


# ------------------------------------------------------------------------------------------------ main
def profile(backbone, token_ids: list[int], *, classifier: str | None = None, exit_layers: list[int] | None = None,
            timing: bool = True, chunk: int = 512) -> dict:
    """The whole profile as a JSON-ready dict."""
    L = backbone.num_layers
    criteria: dict[str, ExitCriterion] = {"softmax": make_criterion("softmax"),
                                          "hidden_similarity": make_criterion("hidden_similarity")}
    if classifier:
        criteria["classifier"] = make_criterion("classifier", path=classifier, backbone=backbone)
    layers = sorted(exit_layers or default_exit_layers(L))
    if not token_ids:
        raise ValueError("no tokens to profile")
    t0 = time.perf_counter()
    ro = collect(backbone, token_ids, criteria, layers, chunk=chunk)
    collect_s = time.perf_counter() - t0
    agree = ro.agree()
    oracle = oracle_layers(agree)
    oracle_grid = oracle_layers(agree, layers)
    costs = {b: measure_costs(backbone, criteria, b) for b in (1, 8)} if timing else {}
    result = {
        "model": backbone.name, "weight_dtype": backbone.weight_dtype, "num_layers": L, "tokens": len(token_ids),
        "chunk": chunk, "exit_layers": layers,
        "layer_agreement": [round(float(a), 4) for a in agree.float().mean(1)],
        "oracle": {
            "mean_layer": round(float(oracle.float().mean()), 3),
            "saving": round(1 - float(oracle.float().mean()) / L, 4),
            "histogram": torch.bincount(oracle, minlength=L + 1)[1:].tolist(),  # tokens per first stable layer 1..L
            "mean_layer_exit_grid": round(float(oracle_grid.float().mean()), 3),
            "saving_exit_grid": round(1 - float(oracle_grid.float().mean()) / L, 4),
        },
        "criteria": {name: criterion_curve(name, conf, agree, layers, costs) for name, conf in ro.confidence.items()},
        "costs_ms": {f"b{b}": asdict(c) for b, c in costs.items()},
        "collect_seconds": round(collect_s, 2),
    }
    if costs:
        pred: dict = {"oracle_exit_grid": {f"b{b}": round(oracle_speedup(c, oracle_grid, L), 3)
                                           for b, c in costs.items()}}
        for name, curve in result["criteria"].items():
            pred[name] = {f"b{b}": curve[f"best_b{b}"] for b in costs}
        result["predicted_speedup"] = pred
    return result


def plot(result: dict, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    L = result["num_layers"]
    fig, ax = plt.subplots(2, 2, figsize=(12, 9))
    layers = list(range(1, L + 1))
    ax[0, 0].plot(layers, result["layer_agreement"], marker="o", ms=3)
    ax[0, 0].set(title="readout argmax = final argmax", xlabel="layer", ylabel="agreement", ylim=(0, 1.02))
    ax[0, 1].bar(layers, result["oracle"]["histogram"])
    ax[0, 1].axvline(result["oracle"]["mean_layer"], color="k", ls="--",
                     label=f"mean {result['oracle']['mean_layer']:.1f}")
    ax[0, 1].set(title="oracle exit: first layer from which the argmax stays final", xlabel="layer",
                 ylabel="tokens")
    ax[0, 1].legend()
    for name, c in result["criteria"].items():
        ax[1, 0].plot(c["mean_exit_layer_b1"], c["agreement_b1"], marker=".", label=f"{name} (batch 1)")
        ax[1, 0].plot(c["mean_exit_layer_b8"], c["agreement_b8"], ls=":", label=f"{name} (batch 8)")
        for b, style in ((1, "-"), (8, ":")):
            if f"speedup_b{b}" in c:
                ax[1, 1].plot(c[f"agreement_b{b}"], c[f"speedup_b{b}"], ls=style, marker=".", label=f"{name} b{b}")
    ax[1, 0].axvline(result["oracle"]["mean_layer"], color="k", ls="--", label="oracle mean layer")
    ax[1, 0].set(title="criteria: agreement vs mean exit layer (threshold sweep)", xlabel="mean exit layer",
                 ylabel="agreement with final layer")
    ax[1, 0].legend(fontsize=8)
    ax[1, 1].axhline(1.0, color="k", lw=0.8)
    ax[1, 1].axvline(AGREEMENT_TARGET, color="gray", ls="--", lw=0.8)
    ax[1, 1].set(title="predicted decode speed-up vs agreement", xlabel="agreement", ylabel="speed-up (x)")
    if ax[1, 1].lines[2:]:
        ax[1, 1].legend(fontsize=8)
    fig.suptitle(f"exit profile: {result['model']} ({result['tokens']} tokens)")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def summary(result: dict) -> str:
    L = result["num_layers"]
    o = result["oracle"]
    lines = [f"{result['model']}: {result['tokens']} tokens, {L} layers",
             f"  readout agreement with the final layer at layer {L - 1}: {result['layer_agreement'][-2]:.1%}, "
             f"at {L // 2}: {result['layer_agreement'][L // 2 - 1]:.1%}",
             f"  oracle: mean first stable layer {o['mean_layer']:.1f} (saving {o['saving']:.1%}); on the exit "
             f"layers {o['mean_layer_exit_grid']:.1f} (saving {o['saving_exit_grid']:.1%})"]
    for name, c in result["criteria"].items():
        fixed = [(t, a) for t, a in zip(c["thresholds"], c["agreement_b1"], strict=True)
                 if t in FIXED_THRESHOLDS.get(name, [])]
        lines.append(f"  {name}: agreement at " + ", ".join(f"{t:g} -> {a:.1%}" for t, a in fixed))
        for b in (1, 8):
            best = c.get(f"best_b{b}")
            if best:
                lines.append(f"    best at >= {AGREEMENT_TARGET:.0%} agreement, batch {b}: threshold "
                             f"{best['threshold']:g}, mean exit layer {best['mean_exit_layer']:.1f}, agreement "
                             f"{best['agreement']:.1%}, predicted speed-up {best['speedup']:.2f}x")
    for b, c in result["costs_ms"].items():
        checks = ", ".join(f"{k} {v:.2f}" for k, v in c["check"].items())
        lines.append(f"  costs {b} (ms): layer {c['layer']:.2f}, head {c['head']:.2f}, full step {c['step_full']:.2f}, "
                     f"KV fill/layer {c['kv_fill_per_layer']:.3f}, checks: {checks}")
    if "predicted_speedup" in result:
        og = result["predicted_speedup"]["oracle_exit_grid"]
        lines.append("  oracle (free, perfect decisions on the exit layers) predicted speed-up: "
                     + ", ".join(f"{k} {v:.2f}x" for k, v in og.items()))
    return "\n".join(lines)


def profile_text(model: ModelSpec | str, text_path: str | Path, tokens: int = 4096, classifier: str | None = None,
                 exit_layers: list[int] | None = None, timing: bool = True, dtype: str = "float32") -> dict:
    """``exitwise profile``: load ``model`` (a ModelSpec, or a name loaded with ``dtype``),
    teacher-force the first ``tokens`` tokens of a UTF-8 text file and profile them (see
    :func:`profile`); the result records the text's path."""
    if isinstance(model, str):
        model = ModelSpec(model, dtype=dtype)
    if tokens <= 0:
        raise ValueError(f"--tokens must be positive, got {tokens}")
    text = Path(text_path).read_text(encoding="utf-8")
    backbone = model.load()
    if backbone.tokenizer is None:
        raise ValueError(f"{model.name} has no tokenizer; profile needs one to read --text")
    # Tokenize only a prefix long enough for the requested tokens (a few characters per token).
    ids = backbone.tokenizer(text[: tokens * 16])["input_ids"][:tokens]
    if len(ids) < tokens:
        print(f"exitwise: note: {text_path} has only {len(ids)} tokens")
    result = profile(backbone, ids, classifier=classifier, exit_layers=exit_layers, timing=timing)
    result["text"] = str(text_path)
    return result
