"""Evaluate RAEE against the full model, the oracle, the best fixed layer and a kNN vote.

Everything is measured in one run on the same test examples and batches. The kNN vote uses the very
neighbours RAEE retrieved but no backbone at all: when RAEE exits at layers that predict one class
for everything, its answer is in effect the neighbours' label, and the report makes that visible.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np

from exitwise.raee.calibration import corrected_probs
from exitwise.raee.layerwise import in_pass_keys, last_token_states, predict_at_layers
from exitwise.raee.pipeline import RAEE, Timings
from exitwise.raee.predictor import neighbour_weights
from exitwise.raee.readouts.base import all_layer_probs
from exitwise.raee.tasks import DEFAULT_SEED, compute_metrics


@dataclass
class EvalConfig:
    test_limit: int | None = None  # a seeded stratified sample of N test rows; None = all
    seed: int = DEFAULT_SEED
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


def one_class_layers(layer_preds: np.ndarray, threshold: float = 0.9, layers: np.ndarray | None = None) -> list[int]:
    """Layers (of ``layers``, default all) whose prediction is one class for more than ``threshold`` of inputs."""
    out = []
    for layer in range(layer_preds.shape[1]) if layers is None else layers:
        counts = np.bincount(layer_preds[:, layer])
        if counts.max() > threshold * len(layer_preds):
            out.append(int(layer))
    return out


def best_layer(train_accuracy: np.ndarray, allowed: np.ndarray) -> int:
    """The allowed layer with the best training accuracy (ties: the shallowest)."""
    return int(np.flatnonzero(allowed)[np.argmax(train_accuracy[allowed])])


def evaluate(raee: RAEE, config: EvalConfig | None = None) -> dict:
    """The report of ``exitwise raee eval`` as a JSON-ready dict."""
    config = config or EvalConfig()
    task, bb, db = raee.task, raee.backbone, raee.db
    examples = task.load_split("test", config.test_limit, config.seed)
    texts = [e.text for e in examples]
    gold = np.array([e.label for e in examples])
    L = bb.num_layers
    token_ids = task.encode(texts, bb.tokenizer)
    metric = task.metric
    prefix = raee.prefix()  # shared by both timed runs, computed before either

    # Timed, on the same inputs: the full model (all layers, its own label-word answer) ...
    t0 = time.perf_counter()
    full_pred, _ = predict_at_layers(bb, token_ids, raee.label_ids, np.full(len(texts), L), raee.batch_size,
                                     prefix=prefix)
    full_seconds = time.perf_counter() - t0
    # ... and RAEE end to end (key + retrieve + truncated forward).
    timings = Timings()
    raee_pred, layers, _ = raee.predict(texts, timings)
    run = raee.layers_run(layers)

    # Untimed analysis pass: every layer's readout and the keys, for the oracle, fixed layers and kNN.
    states = last_token_states(bb, token_ids, raee.batch_size, progress=config.progress, desc=f"{task.name} analysis")
    probs = all_layer_probs(raee.readout, states.to(bb.device), len(task.labels))
    train_probs = db.layer_probs
    if raee.log_bias is not None:  # analyse the readout RAEE actually uses
        probs, train_probs = corrected_probs(probs, raee.log_bias), corrected_probs(train_probs, raee.log_bias)
    keys = in_pass_keys(states[:, raee.key_layer]) if raee.key_layer is not None else raee.keys(texts)
    dist, ids = db.store.search(keys, raee.config.k)
    knn_pred = knn_vote(dist, ids, db.labels, len(task.labels), raee.config)
    exits = db.readout_layers  # layers where the readout exists
    layer_pred = probs.argmax(-1)  # (N, L+1)
    correct = (layer_pred == gold[:, None]) & exits[None, :]
    per_layer_acc = correct.mean(0)
    train_acc = (train_probs.argmax(-1) == db.labels[:, None]).mean(0)  # out of fold for fitted readouts
    fixed = best_layer(train_acc, exits)  # chosen on training data, never on test
    depth = float(run.mean())
    at_depth = best_layer(train_acc, exits & (np.arange(L + 1) <= depth)) if (exits[: int(depth) + 1]).any() else 0

    def block(pred: np.ndarray) -> dict:
        return {k: float(v) for k, v in compute_metrics(pred, gold, metric).items()}

    buckets = {}
    for layer in np.unique(layers):
        sel = layers == layer
        buckets[int(layer)] = {"n": int(sel.sum()), "accuracy": float((raee_pred[sel] == gold[sel]).mean()),
                               "agrees_with_knn": float((raee_pred[sel] == knn_pred[sel]).mean())}
    readout = db.manifest["readout"]
    report = {
        "task": task.name,
        "model": bb.name,
        "num_layers": L,
        "n_test": len(texts),
        "n_train": len(db),
        "metric": metric,
        "mode": db.manifest.get("mode", "custom"),
        "readout": readout["spec"],
        "encoder": db.manifest["encoder"]["spec"],
        "seed": {"train": db.manifest["sample"]["seed"], "test": config.seed},
        "full": {**block(full_pred), "seconds": full_seconds},
        "raee": {**block(raee_pred), "seconds": timings.total, "mean_exit_layer": float(layers.mean()),
                 "mean_layers_run": depth, "seconds_encode": timings.encode, "seconds_retrieve": timings.retrieve,
                 "seconds_forward": timings.forward,
                 "key_share": (timings.encode / timings.total) if timings.total > 0 else 0.0,
                 "agrees_with_knn": float((raee_pred == knn_pred).mean()),
                 "exit_layer_histogram": np.bincount(layers, minlength=L + 1).tolist(),
                 "by_exit_layer": buckets},
        "oracle": {"accuracy": float(correct.any(1).mean())},
        "fixed_layer": {"layer": fixed, **block(layer_pred[:, fixed]), "chosen_on": "train"},
        "fixed_at_depth": {"layer": at_depth, **block(layer_pred[:, at_depth]), "depth": depth, "chosen_on": "train"},
        "readout_at_last_layer": block(layer_pred[:, L]),
        "best_test_layer": {"layer": int(np.argmax(per_layer_acc)), "accuracy": float(per_layer_acc.max())},
        "knn": block(knn_pred),
        "per_layer_accuracy": [float(a) if e else None for a, e in zip(per_layer_acc, exits, strict=True)],
        "readout_layers": np.flatnonzero(exits).tolist(),
        "one_class_layers": one_class_layers(layer_pred, layers=np.flatnonzero(exits)),
        "speedup": full_seconds / timings.total if timings.total > 0 else float("nan"),
        "build_seconds": db.manifest.get("seconds", {}),
        "layer_saving": 1.0 - depth / L,
        "exit_space": {**raee.space.describe(), "allowed_layers": np.flatnonzero(raee.allowed).tolist()},
        "config": {**asdict(raee.config), "batch_size": raee.batch_size, "encoder": db.manifest["encoder"],
                   "store": db.manifest["store"], "readout": readout},
    }
    return report


def format_report(r: dict) -> str:
    m = "mcc" if r["metric"] == "mcc" else "accuracy"
    extra = " / MCC" if m == "mcc" else ""
    lines = [
        f"RAEE on {r['task']} ({r['n_test']} test, {r['n_train']} train examples, seed {r['seed']['test']}), "
        f"{r['model']}, {r['num_layers']} layers; mode {r['mode']}: readout {r['readout']}, key {r['encoder']}",
        f"{'method':<26}{'accuracy' + extra:>18}{'layers run':>12}{'seconds':>10}",
    ]

    def row(name, b, exit_layer="", secs=""):
        score = f"{b['accuracy']:.3f}" + (f" / {b['mcc']:.3f}" if m == "mcc" else "")
        lines.append(f"{name:<26}{score:>18}{exit_layer!s:>12}{secs!s:>10}")

    row("full model", r["full"], r["num_layers"], f"{r['full']['seconds']:.2f}")
    row("RAEE", r["raee"], f"{r['raee']['mean_layers_run']:.1f}", f"{r['raee']['seconds']:.2f}")
    row("oracle (any layer)", {**r["oracle"], "mcc": float("nan")})
    row(f"fixed layer {r['fixed_layer']['layer']} (train)", r["fixed_layer"], r["fixed_layer"]["layer"])
    row(f"fixed at depth: layer {r['fixed_at_depth']['layer']}", r["fixed_at_depth"], r["fixed_at_depth"]["layer"])
    row("kNN vote (no model)", r["knn"])
    ra = r["raee"]
    lines += [
        f"speed-up {r['speedup']:.2f}x  (RAEE time: key {ra['seconds_encode']:.2f}s, retrieve "
        f"{ra['seconds_retrieve']:.2f}s, forward {ra['seconds_forward']:.2f}s)",
        f"RAEE agrees with the kNN vote on {ra['agrees_with_knn']:.0%} of inputs; "
        f"readout layers predicting one class for >90% of inputs: {len(r['one_class_layers'])} of "
        f"{len(r['readout_layers'])}",
        "accuracy by exit layer: " + ", ".join(f"L{k}: {v['accuracy']:.2f} (n={v['n']})"
                                               for k, v in ra["by_exit_layer"].items()),
    ]
    return "\n".join(lines)


def _label(r: dict) -> str:
    return f"RAEE {r.get('mode', 'custom')} ({r.get('readout', 'lm')}, {r.get('encoder', 'minilm')})"


def compare_reports(reports: list[dict]) -> str:
    """Side by side: the full model and the kNN vote (from the first report), then each report's RAEE
    and the best train-chosen single layer no deeper than that RAEE's mean depth."""
    first = reports[0]
    if any(r["task"] != first["task"] or r["n_test"] != first["n_test"] for r in reports):
        raise ValueError("compare needs reports of one task on the same test sample")
    lines = [f"{first['task']}: {first['n_test']} test examples, {first['model']} ({first['num_layers']} layers)",
             f"{'':<46}{'accuracy':>9}{'layers run':>12}{'speed-up':>10}",
             f"{'full model':<46}{first['full']['accuracy']:>9.3f}{first['num_layers']:>12}{'1.00x':>10}"]
    for r in reports:
        ra, fd = r["raee"], r["fixed_at_depth"]
        lines.append(f"{_label(r):<46}{ra['accuracy']:>9.3f}{ra['mean_layers_run']:>12.1f}{r['speedup']:>9.2f}x")
        lines.append(f"{'  fixed exit at layer ' + str(fd['layer']) + ' (same readout)':<46}{fd['accuracy']:>9.3f}"
                     f"{fd['layer']:>12}")
        knn = f"  kNN vote of its {r['encoder']} neighbours"
        lines.append(f"{knn:<46}{r['knn']['accuracy']:>9.3f}")
    return "\n".join(lines)


def plot_comparison(reports: list[dict], path) -> None:
    """Accuracy against layers run: full model, kNN vote, each RAEE and its fixed-depth baseline (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = reports[0]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter([first["num_layers"]], [first["full"]["accuracy"]], color="k", marker="s", label="full model")
    for i, r in enumerate(reports):
        colour = f"C{i + 1}"
        ax.axhline(r["knn"]["accuracy"], color=colour, linestyle=":", label=f"kNN vote, {r['encoder']} keys")
        ax.scatter([r["raee"]["mean_layers_run"]], [r["raee"]["accuracy"]], color=colour, s=60,
                   label=f"{_label(r)}: {r['speedup']:.2f}x")
        ax.scatter([r["fixed_at_depth"]["layer"]], [r["fixed_at_depth"]["accuracy"]], color=colour, marker="x",
                   label=f"fixed layer {r['fixed_at_depth']['layer']} ({r.get('readout', 'lm')})")
    ax.set(xlabel="mean layers run", ylabel="test accuracy", xlim=(0, first["num_layers"] + 1), ylim=(0, 1),
           title=f"RAEE on {first['task']} ({first['n_test']} test examples)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
    acc = [float("nan") if a is None else a for a in r["per_layer_accuracy"]]
    b.plot(range(L + 1), acc, marker=".", label=f"{r.get('readout', 'lm')} readout at layer l")
    for name, key, style in (("full model", "full", "--"), ("RAEE", "raee", "-"), ("kNN vote", "knn", ":")):
        b.axhline(r[key]["accuracy"], linestyle=style, color={"full": "k", "raee": "tab:red", "knn": "tab:green"}[key],
                  label=f"{name} {r[key]['accuracy']:.3f}")
    b.axhline(r["oracle"]["accuracy"], linestyle="-.", color="gray", label=f"oracle {r['oracle']['accuracy']:.3f}")
    b.set(title="test accuracy", xlabel="layer", ylabel="accuracy", ylim=(0, 1))
    b.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
