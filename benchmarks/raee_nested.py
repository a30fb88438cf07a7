"""RAEE's per-task tuning judged on the training sample alone: nested cross-validation.

``raee build`` chooses a task's settings by cross-validation on its training sample, and the test
split then says how the choice did: 300 rows a task, so a mean over eight tasks moves by about 0.007
between samples. This benchmark asks the same question of the training sample, on more rows and
without looking at any test row: the sample (``--train-limit`` rows, seeded and stratified, as ``raee
build`` draws it) is split into ``--folds`` outer folds; for each, the settings are tuned on the other
folds exactly as ``raee build`` tunes them (``tuning.sweep`` + ``tuning.choose``, leave-one-out
neighbours, out-of-fold readout probabilities) and the chosen setting answers the held-out fold, its
neighbours retrieved among the tuning rows (``tuning.simulate``). The best single probe layer is
chosen on the same tuning rows and scored on the same held-out rows. One tuning serves every
``--floors`` value of the "balanced" objective's speed-up floor, so the floors are compared on the
same folds.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/raee_nested.py --user-task \\
        --out benchmarks/results/raee/nested.json

Per task and floor: held-out accuracy and the speed-up estimated from the layers run (the tuning's
cost model); the mean over the built-in tasks run (the user task apart); a PNG (``--out`` with
``.png``) of mean accuracy against mean speed-up, with the best fixed layer's mean.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from exitwise.cli.model_args import add_model_args
from exitwise.models.loading import load_model
from exitwise.raee.database import BuildConfig
from exitwise.raee.layerwise import in_pass_keys, last_token_states
from exitwise.raee.readouts.base import fit_readout, layer_mask
from exitwise.raee.repro import FIT_THREADS, fixed_threads
from exitwise.raee.tasks import builtin_task_names, load_task
from exitwise.raee.tuning import (
    Objective,
    best_fixed_layer,
    choose,
    estimated_speedup,
    exit_table,
    leave_one_out,
    nearest,
    simulate,
    sweep,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from user_task import make_user_task  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "raee"


def outer_folds(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """(N,) fold of each row: each class dealt round-robin over the folds after a seeded shuffle."""
    rng = np.random.default_rng(seed)
    fold = np.empty(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        fold[rows] = np.arange(len(rows)) % folds
    return fold


def nested(keys: dict[int, np.ndarray], probs: np.ndarray, labels: np.ndarray, exits: np.ndarray,
           config: BuildConfig, floors: list[float], folds: int, seed: int) -> dict:
    """Held-out accuracy and estimated speed-up per floor, and the best fixed layer's held-out
    accuracy, over ``folds`` outer folds. ``keys``: in-pass keys (N, D) by key layer; ``probs``
    (N, L+1, C) out-of-fold readout probabilities; ``exits`` (L+1,) where the readout exists."""
    num_layers = probs.shape[1] - 1
    layers = list(keys)
    k_max = max(config.space.ks)
    fold = outer_folds(labels, folds, seed)
    correct = {f: 0 for f in floors}
    run = {f: 0.0 for f in floors}
    fixed_correct, fixed_layers = 0, []
    for f in range(folds):
        tune_rows, held = np.flatnonzero(fold != f), np.flatnonzero(fold == f)
        p, y = probs[tune_rows], labels[tune_rows]
        table = exit_table(p, y, exits)
        cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

        def neighbours(layer: int, cache=cache, rows=tune_rows) -> tuple[np.ndarray, np.ndarray]:
            if layer not in cache:
                cache[layer] = leave_one_out(keys[layer][rows], k_max)
            return cache[layer]

        candidates, _ = sweep(neighbours, table, p, y, y, config.space, config.select, layers)
        for floor in floors:
            chosen = choose(candidates, Objective("balanced", min_speedup=floor))
            at = keys[chosen.key_layer]
            distances, ids = nearest(at[held], at[tune_rows], k_max)
            out = simulate(distances, ids, table, probs[held], y, chosen.config(config.select), chosen.key_layer)
            correct[floor] += int((out.pred == labels[held]).sum())
            run[floor] += float(out.layers_run.sum())
        best, _ = best_fixed_layer(p, y, exits)
        fixed_layers.append(best)
        fixed_correct += int((probs[held, best].argmax(-1) == labels[held]).sum())
    n = len(labels)
    return {"rows": n, "folds": folds,
            "floors": {str(f): {"accuracy": correct[f] / n, "mean_layers_run": run[f] / n,
                                "speedup": estimated_speedup(run[f] / n, num_layers)} for f in floors},
            "best_fixed": {"accuracy": fixed_correct / n, "layers": fixed_layers}}


def run_task(backbone, task, config: BuildConfig, floors: list[float], folds: int, seed: int) -> dict:
    examples = task.load_split("train", config.train_limit, config.seed)
    labels = np.array([e.label for e in examples])
    states = last_token_states(backbone, task.encode([e.text for e in examples], backbone.tokenizer),
                               config.batch_size, progress=True, desc=f"{task.name} layers")
    with fixed_threads(FIT_THREADS):  # as raee build fits it, whatever the thread count
        readout, probs = fit_readout(config.readout, backbone, task.label_token_ids(backbone.tokenizer), states,
                                     labels, config.seed)
    keys = {k: in_pass_keys(states[:, k]) for k in range(1, backbone.num_layers // 2 + 1)}
    return nested(keys, probs, labels, layer_mask(readout, backbone.num_layers), config, floors, folds, seed)


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mean = out["mean"]
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [mean["floors"][f]["speedup"] for f in mean["floors"]]
    ys = [mean["floors"][f]["accuracy"] for f in mean["floors"]]
    ax.plot(xs, ys, "o-", color="tab:red", label="RAEE, balanced objective at each floor")
    for f, x, y in zip(mean["floors"], xs, ys, strict=True):
        ax.annotate(f"floor {f}", (x, y), fontsize=7, xytext=(4, -10), textcoords="offset points")
    ax.axhline(mean["best_fixed"], color="tab:gray", ls="--", label="best fixed layer (chosen on the tuning rows)")
    ax.set(xlabel="mean estimated speed-up", ylabel="mean held-out accuracy",
           title=f"nested CV on the training samples ({len(out['tasks'])} tasks)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap, dtype="float32")
    ap.add_argument("--tasks", nargs="*", default=None, help="default: all eight built-in tasks")
    ap.add_argument("--user-task", action="store_true", help="also the untuned 4-class user task (user_task.py)")
    ap.add_argument("--train-limit", type=int, default=1000)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=1, help="the outer folds' seed (the sample's is raee build's)")
    ap.add_argument("--floors", type=float, nargs="+", default=[1.7, 1.75, 1.8, 1.85, 1.9, 2.0])
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default=str(RESULTS / "nested.json"))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    if not 2 <= args.folds <= 20:
        raise SystemExit(f"--folds {args.folds}: between 2 and 20")
    if args.tasks == []:
        raise SystemExit("--tasks: name at least one task (or leave it out: all eight)")
    torch.set_num_threads(args.threads)
    backbone = load_model(args.model, device=args.device, dtype=args.dtype)
    config = BuildConfig(train_limit=args.train_limit, progress=False)
    started = time.time()
    tasks: dict[str, dict] = {}
    names = builtin_task_names() if args.tasks is None else args.tasks
    for name in tqdm(names, desc="tasks", unit="task"):
        tasks[name] = run_task(backbone, load_task(name, data_dir=args.data_dir), config, args.floors, args.folds,
                               args.seed)
    user = {}
    if args.user_task:
        import tempfile

        with tempfile.TemporaryDirectory() as scratch:
            task = load_task(make_user_task(Path(scratch) / "topics4", args.data_dir))
            user = run_task(backbone, task, config, args.floors, args.folds, args.seed)
    floors = [str(f) for f in args.floors]
    mean = {"floors": {f: {m: float(np.mean([t["floors"][f][m] for t in tasks.values()]))
                           for m in ("accuracy", "speedup")} for f in floors},
            "best_fixed": float(np.mean([t["best_fixed"]["accuracy"] for t in tasks.values()]))}
    out = {"model": backbone.name, "weight_dtype": backbone.weight_dtype, "train_limit": args.train_limit,
           "folds": args.folds, "seed": args.seed, "seconds": time.time() - started, "mean": mean, "tasks": tasks,
           "user_task": user}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    plot(out, Path(args.out).with_suffix(".png"))
    rows = {**tasks, **({"user task": user} if user else {})}
    print(f"\n{'task':<10}" + "".join(f"  floor {f:>4}" for f in floors) + "  best fixed")
    for name, t in rows.items():
        cells = "".join(f"  {t['floors'][f]['accuracy']:.3f} {t['floors'][f]['speedup']:.2f}x" for f in floors)
        print(f"{name:<10}{cells}  {t['best_fixed']['accuracy']:.3f}")
    cells = "".join(f"  {mean['floors'][f]['accuracy']:.3f} {mean['floors'][f]['speedup']:.2f}x" for f in floors)
    print(f"{f'mean ({len(tasks)})':<10}{cells}  {mean['best_fixed']:.3f}")
    print(f"wrote {args.out} and {Path(args.out).with_suffix('.png')} ({out['seconds'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
