"""Evaluate RAEE against the full model, the oracle, every fixed layer and two kNN votes.

Everything is measured in one run on the same test examples and batches. The kNN vote (``knn``) uses
the very neighbours RAEE retrieved but no layer past the key; ``knn_minilm`` votes with a separate
sentence encoder's neighbours (MiniLM), the plain retrieval classifier a user would compare with.
The report's ``frontier`` puts every classifier on one accuracy / speed-up plane (RAEE over the
settings its tuning found best at each speed, every fixed probe layer, the full model, both votes)
and names the points no other beats on both.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from exitwise.raee.calibration import corrected_probs
from exitwise.raee.layerwise import in_pass_keys, last_token_states
from exitwise.raee.pipeline import RAEE, Timings
from exitwise.raee.predictor import label_vote
from exitwise.raee.readouts.base import all_layer_probs
from exitwise.raee.readouts.lm import LMReadout
from exitwise.raee.tasks import DEFAULT_SEED, compute_metrics
from exitwise.raee.tuning import HEAD_COST, Candidate, estimated_speedup, simulate

MAX_REPEATS = 20


@dataclass
class EvalConfig:
    test_limit: int | None = None  # a seeded stratified sample of N test rows; None = all
    seed: int = DEFAULT_SEED
    progress: bool = True
    minilm: bool = True  # the MiniLM kNN vote (encodes the training sample once more; off: reported as None)
    repeats: int = 1  # timed runs of the full model and of RAEE, interleaved; the fastest of each is reported

    def __post_init__(self) -> None:
        if not 1 <= self.repeats <= MAX_REPEATS:
            raise ValueError(f"--repeats {self.repeats}: must lie in 1..{MAX_REPEATS}")


def knn_vote(dist: np.ndarray, ids: np.ndarray, labels: np.ndarray, num_classes: int, config) -> np.ndarray:
    """Weighted vote of the neighbours' gold labels (same weights as RAEE). (Q,) class indices."""
    return label_vote(dist, ids, labels, num_classes, config).argmax(1)


def minilm_vote(raee: RAEE, texts: list[str], test_config: EvalConfig) -> tuple[np.ndarray, float]:
    """The MiniLM neighbours' label vote on ``texts`` (k and weights of exitwise's defaults) and the
    seconds its keys and search took. The training sample is drawn again as the database's manifest
    records it (seed, limit) and must give the database's labels."""
    from exitwise.raee.database import query_text
    from exitwise.raee.encoders import make_encoder
    from exitwise.raee.predictor import SelectConfig
    from exitwise.raee.repro import encode_alone
    from exitwise.raee.retrieval import FlatStore

    db, task = raee.db, raee.task
    sample = db.manifest["sample"]
    train = task.load_split("train", sample["train_limit"], sample["seed"])
    if not np.array_equal([e.label for e in train], db.labels):
        raise ValueError(f"database {db.path}: its training sample cannot be drawn again from the task file "
                         "(the labels differ); the MiniLM vote needs it")
    encoder = make_encoder("minilm", offline=True)
    keys = encode_alone(encoder, [query_text(task, e.text) for e in train])
    store = FlatStore.create(keys.shape[1])
    store.add(keys)
    config = SelectConfig()
    t0 = time.perf_counter()
    dist, ids = store.search(encode_alone(encoder, [query_text(task, t) for t in texts]), config.k)
    seconds = time.perf_counter() - t0
    return knn_vote(dist, ids, db.labels, len(task.labels), config), seconds


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

    # Timed, on the same inputs: the full model, one pass through all layers answering with its own
    # label words at the last (the pass keeps each layer's last-token state, a copy per layer, which
    # the analysis below reads: every layer's readout, the oracle, the fixed layers, the votes), and
    # RAEE end to end (key + retrieve + truncated forward); with repeats, in turns, each starting first
    # every other time, and the fastest run of each kept.
    def full_model() -> tuple[torch.Tensor, np.ndarray, float]:
        t0 = time.perf_counter()
        states = last_token_states(bb, token_ids, raee.batch_size, progress=config.progress,
                                   desc=f"{task.name} full model", prefix=prefix, pool_from=raee.readout.pool_from)
        last = states[:, L, :bb.hidden_size]
        pred = LMReadout(bb, raee.label_ids).probs(L, last.to(bb.device)).argmax(-1).cpu().numpy()
        return states, pred, time.perf_counter() - t0

    def raee_run() -> tuple[np.ndarray, np.ndarray, Timings]:
        timings = Timings()
        pred, layers, _ = raee.predict(texts, timings)
        return pred, layers, timings

    full_seconds, raee_runs = float("inf"), []
    for repeat in range(config.repeats):
        if repeat % 2:  # RAEE first every other time
            raee_runs.append(raee_run())
        states, full_pred, seconds = full_model()
        full_seconds = min(full_seconds, seconds)
        if not repeat % 2:
            raee_runs.append(raee_run())
    raee_pred, layers, timings = min(raee_runs, key=lambda r: r[2].total)
    run = raee.layers_run(layers)

    probs = all_layer_probs(raee.readout, states.to(bb.device), len(task.labels))
    train_probs = db.layer_probs
    if raee.log_bias is not None:  # analyse the readout RAEE actually uses
        probs, train_probs = corrected_probs(probs, raee.log_bias), corrected_probs(train_probs, raee.log_bias)
    keys = in_pass_keys(states[:, raee.key_layer, :bb.hidden_size]) if raee.key_layer is not None else raee.keys(texts)
    settings = frontier_settings(raee)
    dist, ids = db.store.search(keys, max(c.k for c in settings))
    knn_pred = knn_vote(dist, ids, db.labels, len(task.labels), raee.config)
    # what the chosen setting answers, computed from the analysis pass as the tuning computes it (a
    # check that the frontier's RAEE points are the RAEE that runs)
    simulated = simulate(dist, ids, raee.table, probs, db.labels, raee.config, raee.key_layer)
    if config.minilm:
        try:
            minilm_pred, minilm_seconds = minilm_vote(raee, texts, config)
        except Exception as exc:  # noqa: BLE001 -- the vote is a baseline: its absence is reported, not fatal
            minilm_pred, minilm_seconds, minilm_error = None, None, f"{type(exc).__name__}: {exc}"
        else:
            minilm_error = None
    else:
        minilm_pred, minilm_seconds, minilm_error = None, None, "not run (EvalConfig.minilm=False)"
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
    tuning = db.manifest.get("tuning")
    chosen = {"key_layer": raee.key_layer, **{k: v for k, v in asdict(raee.config).items()
                                              if k in ("k", "slack", "vote_weight", "early_vote")},
              "confirm": list(raee.config.confirm), "confirm_layers": list(raee.config.confirm_layers)}
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
                 "early_share": float(simulated.early.mean()),  # answered by the neighbours at the key
                 "confirm_share": float(simulated.confirmed.mean()),  # read again deeper (the confirmation)
                 "simulated_accuracy": float((simulated.pred == gold).mean()),
                 "agrees_with_simulation": float((simulated.pred == raee_pred).mean()),
                 "exit_layer_histogram": np.bincount(layers, minlength=L + 1).tolist(),
                 "by_exit_layer": buckets},
        "oracle": {"accuracy": float(correct.any(1).mean())},
        "best_fixed": {"layer": fixed, **block(layer_pred[:, fixed]), "chosen_on": "train"},
        "fixed_at_depth": {"layer": at_depth, **block(layer_pred[:, at_depth]), "depth": depth, "chosen_on": "train"},
        "readout_at_last_layer": block(layer_pred[:, L]),
        "best_test_layer": {"layer": int(np.argmax(per_layer_acc)), "accuracy": float(per_layer_acc.max())},
        "knn": {**block(knn_pred), "keys": db.manifest["encoder"]["spec"], "k": raee.config.k},
        "knn_minilm": ({**block(minilm_pred), "keys": "minilm", "k": 12, "seconds": minilm_seconds}
                       if minilm_pred is not None else {"accuracy": None, "error": minilm_error}),
        "settings": {**chosen, "objective": (tuning or {}).get("objective"), "chosen_on": "train (out of fold)"
                     if tuning else "given", "cv": (tuning or {}).get("cv")},
        "per_layer_accuracy": [float(a) if e else None for a, e in zip(per_layer_acc, exits, strict=True)],
        "readout_layers": np.flatnonzero(exits).tolist(),
        "one_class_layers": one_class_layers(layer_pred, layers=np.flatnonzero(exits)),
        "speedup": full_seconds / timings.total if timings.total > 0 else float("nan"),
        "timing": {"repeats": config.repeats, "kept": "the fastest run of each"},
        "build_seconds": db.manifest.get("seconds", {}),
        "layer_saving": 1.0 - depth / L,
        "exit_space": {**raee.space.describe(), "allowed_layers": np.flatnonzero(raee.allowed).tolist()},
        "head_cost": HEAD_COST,
        "config": {**asdict(raee.config), "batch_size": raee.batch_size, "encoder": db.manifest["encoder"],
                   "store": db.manifest["store"], "readout": readout},
    }
    report["frontier"] = frontier(report, probs, gold, dist, ids, raee, settings, layer_pred, exits)
    return report


def frontier_settings(raee: RAEE) -> list[Candidate]:
    """RAEE's settings to draw: its tuning's cross-validated frontier at the database's key layer
    (each point chosen on training data), else a slack sweep around the database's settings."""
    tuning = raee.db.manifest.get("tuning") or {}
    front = [Candidate(**c) for c in tuning.get("front", []) if c["key_layer"] == raee.key_layer]
    if front:
        return front
    c = raee.config
    return [Candidate(raee.key_layer, c.k, slack, c.vote_weight, c.early_vote, c.min_exit, 0.0, 0.0, 0.0, 0.0)
            for slack in (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)]


def frontier(report: dict, probs: np.ndarray, gold: np.ndarray, dist: np.ndarray, ids: np.ndarray, raee: RAEE,
             settings: list[Candidate], layer_pred: np.ndarray, exits: np.ndarray) -> dict:
    """Every classifier as (accuracy, speed-up) on this test sample, and which points no other beats.

    Speed-ups from layers run, ``(L + head) / (layers + head)`` (tuning.HEAD_COST), so that every
    point is on one scale; the MiniLM vote has no backbone layers and takes its measured time against
    the full model's. RAEE's measured wall-time speed-up is the report's ``speedup``."""
    L = report["num_layers"]
    key = raee.key_layer or 0
    points = [{"name": "full model", "kind": "full", "accuracy": report["full"]["accuracy"], "speedup": 1.0}]
    points.append({"name": "RAEE (chosen)", "kind": "raee", "accuracy": report["raee"]["accuracy"],
                   "speedup": estimated_speedup(report["raee"]["mean_layers_run"], L),
                   "measured_speedup": report["speedup"]})
    for c in settings:
        out = simulate(dist, ids, raee.table, probs, raee.db.labels, c.config(raee.config), raee.key_layer)
        confirm = f" confirm={list(c.confirm)}@{list(c.confirm_layers)}" if c.confirm else ""
        points.append({"name": f"RAEE k={c.k} slack={c.slack} vote={c.vote_weight} early={c.early_vote} "
                               f"floor={c.min_exit}{confirm}",
                       "kind": "raee_setting", "accuracy": float((out.pred == gold).mean()),
                       "speedup": estimated_speedup(float(out.layers_run.mean()), L), "settings": c.settings()})
    for layer in np.flatnonzero(exits):
        points.append({"name": f"layer {layer}", "kind": "fixed", "layer": int(layer),
                       "accuracy": float((layer_pred[:, layer] == gold).mean()),
                       "speedup": estimated_speedup(float(max(layer, 0)), L)})
    points.append({"name": "kNN vote, in-pass keys", "kind": "knn", "accuracy": report["knn"]["accuracy"],
                   "speedup": estimated_speedup(float(key), L)})
    m = report["knn_minilm"]
    if m.get("accuracy") is not None and m.get("seconds"):
        points.append({"name": "kNN vote, MiniLM keys", "kind": "knn_minilm", "accuracy": m["accuracy"],
                       "speedup": report["full"]["seconds"] / m["seconds"], "speedup_source": "measured"})
    for p in points:
        p["accuracy"], p["speedup"] = round(float(p["accuracy"]), 4), round(float(p["speedup"]), 4)
    for p in points:
        p["dominated_by"] = [q["name"] for q in points if q is not p and q["accuracy"] >= p["accuracy"]
                             and q["speedup"] >= p["speedup"]
                             and (q["accuracy"] > p["accuracy"] or q["speedup"] > p["speedup"])]
    return {"head_cost": HEAD_COST, "points": points,
            "dominant": [p["name"] for p in points if not p["dominated_by"]],
            "raee_dominated_by": points[1]["dominated_by"]}


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
    row(f"fixed layer {r['best_fixed']['layer']} (train)", r["best_fixed"], r["best_fixed"]["layer"])
    row(f"fixed at depth: layer {r['fixed_at_depth']['layer']}", r["fixed_at_depth"], r["fixed_at_depth"]["layer"])
    row("kNN vote (in-pass keys)", r["knn"], r["knn"].get("keys", ""))
    if r.get("knn_minilm", {}).get("accuracy") is not None:
        row("kNN vote (MiniLM keys)", r["knn_minilm"])
    ra = r["raee"]
    st = r.get("settings", {})
    if st:
        cv = st.get("cv") or {}
        lines.append(f"settings ({st.get('chosen_on')}): key layer {st.get('key_layer')}, k {st.get('k')}, slack "
                     f"{st.get('slack')}, vote weight {st.get('vote_weight')}, early vote {st.get('early_vote')}"
                     + (f", confirm {st['confirm']} at layers {st.get('confirm_layers')} "
                        f"({ra.get('confirm_share', 0):.0%} of queries read again deeper)"
                        if st.get("confirm") else "")
                     + (f"; cross-validated accuracy {cv['accuracy']:.3f} at {cv['mean_layers_run']:.1f} layers"
                        if cv else ""))
    if "frontier" in r:
        beaten = r["frontier"]["raee_dominated_by"]
        lines.append("RAEE is on the frontier" if not beaten else "RAEE is beaten on accuracy and speed by: "
                     + ", ".join(beaten))
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


def plot_frontier(r: dict, ax) -> None:
    """Accuracy against speed-up of every point of ``r["frontier"]`` on ``ax``; the points no other
    beats are joined by a line."""
    points = r["frontier"]["points"]
    style = {"fixed": ("tab:gray", "o", "fixed probe layer"),
             "raee_setting": ("tab:orange", ".", "RAEE, other settings"),
             "full": ("k", "s", "full model"), "knn": ("tab:green", "^", "kNN vote, in-pass keys"),
             "knn_minilm": ("tab:purple", "D", "kNN vote, MiniLM keys"), "raee": ("tab:red", "*", "RAEE (chosen)")}
    for kind, (colour, marker, label) in style.items():
        group = [p for p in points if p["kind"] == kind]
        if group:
            ax.scatter([p["speedup"] for p in group], [p["accuracy"] for p in group], color=colour, marker=marker,
                       s=140 if kind == "raee" else 30, label=label, zorder=3 if kind == "raee" else 2)
    for p in points:
        if p["kind"] == "fixed" and p["layer"] % 5 == 0:
            ax.annotate(f"L{p['layer']}", (p["speedup"], p["accuracy"]), fontsize=6, color="tab:gray")
    front = sorted((p for p in points if not p["dominated_by"]), key=lambda p: p["speedup"])
    ax.plot([p["speedup"] for p in front], [p["accuracy"] for p in front], color="tab:blue", linewidth=0.8,
            linestyle="--", label="frontier (no point beats these on both)")
    ax.set(xscale="log", xlabel=f"speed-up over the full model (from layers run, head = {r['frontier']['head_cost']} "
                                "layers; MiniLM: measured)", ylabel="test accuracy",
           title=f"{r['task']}: RAEE {r['raee']['accuracy']:.3f} at {r['speedup']:.2f}x measured")
    ax.legend(fontsize=7, loc="lower left")


def plot_report(r: dict, path) -> None:
    """The accuracy / speed-up frontier, the exit-layer histogram and per-layer accuracy (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    L = r["num_layers"]
    fig, (f, a, b) = plt.subplots(1, 3, figsize=(18, 5), gridspec_kw={"width_ratios": [1.4, 1, 1]})
    if "frontier" in r:
        plot_frontier(r, f)
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
