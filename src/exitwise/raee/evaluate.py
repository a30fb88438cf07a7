"""Evaluate RAEE against the full model, the oracle, the best fixed layer and a kNN vote.

Everything is measured in one run on the same test examples and batches. The kNN vote uses the very
neighbours RAEE retrieved but no backbone at all: when RAEE exits at layers that predict one class
for everything, its answer is in effect the neighbours' label, and the report makes that visible.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from exitwise.raee.calibration import corrected_probs
from exitwise.raee.layerwise import layer_label_probs, predict_at_layers
from exitwise.raee.pipeline import RAEE, Timings
from exitwise.raee.predictor import neighbour_weights
from exitwise.raee.tasks import compute_metrics


@dataclass
class EvalConfig:
    test_limit: int | None = None
    progress: bool = True


def knn_vote(dist: np.ndarray, ids: np.ndarray, labels: np.ndarray, num_classes: int, config) -> np.ndarray:
    """Weighted vote of the neighbours' gold labels (same weights as RAEE). (Q,) class indices."""
    dist, ids = dist[:, : config.k], ids[:, : config.k]
    valid = ids >= 0
    w = neighbour_weights(dist, valid, config)  # (Q, k), 0 for missing neighbours
    votes = np.zeros((len(ids), num_classes))
    rows = np.nonzero(valid)[0]
    np.add.at(votes, (rows, labels[ids[valid]]), w[valid])
    return votes.argmax(1)


def one_class_layers(layer_preds: np.ndarray, threshold: float = 0.9) -> list[int]:
    """Layers whose prediction is one single class for more than ``threshold`` of the inputs."""
    out = []
    for layer in range(layer_preds.shape[1]):
        counts = np.bincount(layer_preds[:, layer])
        if counts.max() > threshold * len(layer_preds):
            out.append(layer)
    return out


def evaluate(raee: RAEE, config: EvalConfig | None = None) -> dict:
    """The report of ``exitwise raee eval`` as a JSON-ready dict."""
    config = config or EvalConfig()
    task, bb, db = raee.task, raee.backbone, raee.db
    examples = task.load_split("test", config.test_limit)
    texts = [e.text for e in examples]
    gold = np.array([e.label for e in examples])
    L = bb.num_layers
    token_ids = task.encode(texts, bb.tokenizer)
    metric = task.metric

    # Timed, on the same inputs: the full model (all layers) ...
    t0 = time.perf_counter()
    full_pred, _ = predict_at_layers(bb, token_ids, raee.label_ids, np.full(len(texts), L), raee.batch_size)
    full_seconds = time.perf_counter() - t0
    # ... and RAEE end to end (encode + retrieve + truncated forward).
    timings = Timings()
    dist, ids = raee.neighbours(texts, timings)
    decision = raee.exit_layers(dist, ids, timings)
    raee_pred, _ = raee.forward(token_ids, decision.layers, timings)

    # Untimed analysis pass: every layer's prediction, for the oracle, fixed layers and buckets.
    probs = layer_label_probs(bb, token_ids, raee.label_ids, raee.batch_size, progress=config.progress,
                              desc=f"{task.name} analysis")
    train_probs = db.layer_probs
    if raee.log_bias is not None:  # analyse the readout RAEE actually uses
        probs, train_probs = corrected_probs(probs, raee.log_bias), corrected_probs(train_probs, raee.log_bias)
    layer_pred = probs.argmax(-1)  # (N, L+1)
    correct = layer_pred == gold[:, None]
    per_layer_acc = correct.mean(0)
    train_acc = (train_probs.argmax(-1) == db.labels[:, None]).mean(0)
    fixed = int(np.argmax(train_acc))  # chosen on training data, never on test
    knn_pred = knn_vote(dist, ids, db.labels, len(task.labels), raee.config)

    def block(pred: np.ndarray) -> dict:
        return {k: float(v) for k, v in compute_metrics(pred, gold, metric).items()}

    layers = decision.layers
    buckets = {}
    for layer in np.unique(layers):
        sel = layers == layer
        buckets[int(layer)] = {"n": int(sel.sum()), "accuracy": float((raee_pred[sel] == gold[sel]).mean()),
                               "agrees_with_knn": float((raee_pred[sel] == knn_pred[sel]).mean())}
    report = {
        "task": task.name,
        "model": bb.name,
        "num_layers": L,
        "n_test": len(texts),
        "n_train": len(db),
        "metric": metric,
        "full": {**block(full_pred), "seconds": full_seconds},
        "raee": {**block(raee_pred), "seconds": timings.total, "mean_exit_layer": float(layers.mean()),
                 "seconds_encode": timings.encode, "seconds_retrieve": timings.retrieve,
                 "seconds_forward": timings.forward, "fallback_rate": float(decision.fallback.mean()),
                 "agrees_with_knn": float((raee_pred == knn_pred).mean()),
                 "exit_layer_histogram": np.bincount(layers, minlength=L + 1).tolist(),
                 "by_exit_layer": buckets},
        "oracle": {"accuracy": float(correct.any(1).mean())},
        "fixed_layer": {"layer": fixed, **block(layer_pred[:, fixed]), "chosen_on": "train"},
        "best_test_layer": {"layer": int(np.argmax(per_layer_acc)), "accuracy": float(per_layer_acc.max())},
        "knn": block(knn_pred),
        "per_layer_accuracy": [float(a) for a in per_layer_acc],
        "one_class_layers": one_class_layers(layer_pred),
        "speedup": full_seconds / timings.total if timings.total > 0 else float("nan"),
        "layer_saving": 1.0 - float(layers.mean()) / L,
        "exit_space": {**raee.space.describe(), "allowed_layers": np.flatnonzero(raee.allowed).tolist()},
        "config": {"k": raee.config.k, "min_prob": raee.config.min_prob, "fallback_top": raee.config.fallback_top,
                   "batch_size": raee.batch_size, "encoder": db.manifest["encoder"], "store": db.manifest["store"]},
    }
    return report


def format_report(r: dict) -> str:
    m = "mcc" if r["metric"] == "mcc" else "accuracy"
    extra = " / MCC" if m == "mcc" else ""
    lines = [
        f"RAEE on {r['task']} ({r['n_test']} test, {r['n_train']} train examples), "
        f"{r['model']}, {r['num_layers']} layers",
        f"{'method':<22}{'accuracy' + extra:>18}{'mean exit':>11}{'seconds':>10}",
    ]

    def row(name, b, exit_layer="", secs=""):
        score = f"{b['accuracy']:.3f}" + (f" / {b['mcc']:.3f}" if m == "mcc" else "")
        lines.append(f"{name:<22}{score:>18}{exit_layer!s:>11}{secs!s:>10}")

    row("full model", r["full"], r["num_layers"], f"{r['full']['seconds']:.2f}")
    row("RAEE", r["raee"], f"{r['raee']['mean_exit_layer']:.1f}", f"{r['raee']['seconds']:.2f}")
    row("oracle (any layer)", {**r["oracle"], "mcc": float("nan")})
    row(f"fixed layer {r['fixed_layer']['layer']} (train)", r["fixed_layer"], r["fixed_layer"]["layer"])
    row("kNN vote (no model)", r["knn"])
    ra = r["raee"]
    lines += [
        f"speed-up {r['speedup']:.2f}x  (RAEE time: encode {ra['seconds_encode']:.2f}s, retrieve "
        f"{ra['seconds_retrieve']:.2f}s, forward {ra['seconds_forward']:.2f}s)",
        f"RAEE agrees with the kNN vote on {ra['agrees_with_knn']:.0%} of inputs; "
        f"layers predicting one class for >90% of inputs: {len(r['one_class_layers'])} of {r['num_layers'] + 1}",
        "accuracy by exit layer: " + ", ".join(f"L{k}: {v['accuracy']:.2f} (n={v['n']})"
                                               for k, v in ra["by_exit_layer"].items()),
    ]
    return "\n".join(lines)


def plot_report(r: dict, path) -> None:
    """Exit-layer histogram and per-layer accuracy, side by side (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    L = r["num_layers"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4))
    a.bar(range(L + 1), r["raee"]["exit_layer_histogram"], color="tab:blue")
    a.set(title=f"RAEE exit layers — {r['task']} (mean {r['raee']['mean_exit_layer']:.1f})",
          xlabel="exit layer", ylabel="test examples")
    b.plot(range(L + 1), r["per_layer_accuracy"], marker=".", label="readout at layer l")
    for name, key, style in (("full model", "full", "--"), ("RAEE", "raee", "-"), ("kNN vote", "knn", ":")):
        b.axhline(r[key]["accuracy"], linestyle=style, color={"full": "k", "raee": "tab:red", "knn": "tab:green"}[key],
                  label=f"{name} {r[key]['accuracy']:.3f}")
    b.axhline(r["oracle"]["accuracy"], linestyle="-.", color="gray", label=f"oracle {r['oracle']['accuracy']:.3f}")
    b.set(title="test accuracy", xlabel="layer", ylabel="accuracy", ylim=(0, 1))
    b.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
