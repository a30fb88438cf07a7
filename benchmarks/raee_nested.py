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

Per readout (``--readouts``, default the pooled probe and the last-token probe, on one pass and the
same folds), task and floor: held-out accuracy and the speed-up estimated from the layers run (the
tuning's cost model); the mean over the built-in tasks run (the user task apart); a PNG (``--out``
with ``.png``) of mean accuracy against mean speed-up, with each readout's best fixed layer's mean.
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
from exitwise.raee.readouts.base import fit_readout, layer_mask, pool_start
from exitwise.raee.repro import FIT_THREADS, fixed_threads
from exitwise.raee.tasks import builtin_task_names, load_task
from exitwise.raee.tuning import (
    OBJECTIVES,
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


def floor_key(objective: str, floor: float) -> str:
    """A result's key: ``"2.0"`` for the balanced objective at floor 2, ``"accuracy:2.0"`` for another."""
    return str(floor) if objective == "balanced" else f"{objective}:{floor}"


def objective_of(key: str) -> str:
    """The objective of a :func:`floor_key`."""
    return key.rpartition(":")[0] or "balanced"


def nested(keys: dict[int, np.ndarray], probs: np.ndarray, labels: np.ndarray, exits: np.ndarray,
           config: BuildConfig, floors: list[float], folds: int, seed: int,
           objectives: tuple[str, ...] = ("balanced",)) -> dict:
    """Held-out accuracy and estimated speed-up per objective and floor (keyed ``"2.0"`` for
    "balanced", ``"accuracy:2.0"`` for another), and the best fixed layer's held-out accuracy, over
    ``folds`` outer folds. ``keys``: in-pass keys (N, D) by key layer; ``probs`` (N, L+1, C)
    out-of-fold readout probabilities; ``exits`` (L+1,) where the readout exists."""
    num_layers = probs.shape[1] - 1
    layers = list(keys)
    k_max = max(config.space.ks)
    fold = outer_folds(labels, folds, seed)
    asked = {floor_key(o, f): Objective(o, min_speedup=f) for o in objectives for f in floors}
    correct = dict.fromkeys(asked, 0)
    run = dict.fromkeys(asked, 0.0)
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
        for floor, objective in asked.items():
            chosen = choose(candidates, objective)
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
            "floors": {f: {"accuracy": correct[f] / n, "mean_layers_run": run[f] / n,
                           "speedup": estimated_speedup(run[f] / n, num_layers)} for f in asked},
            "best_fixed": {"accuracy": fixed_correct / n, "layers": fixed_layers}}


def run_task(backbone, task, config: BuildConfig, readouts: list[str], floors: list[float], folds: int,
             seed: int, objectives: tuple[str, ...]) -> dict[str, dict]:
    """:func:`nested` per readout, all on one all-layer pass (pooled if a readout pools)."""
    examples = task.load_split("train", config.train_limit, config.seed)
    labels = np.array([e.label for e in examples])
    pool_from = pool_start(readouts, task, backbone.tokenizer)
    states = last_token_states(backbone, task.encode([e.text for e in examples], backbone.tokenizer),
                               config.batch_size, progress=True, desc=f"{task.name} layers", pool_from=pool_from)
    keys = {k: in_pass_keys(states[:, k, :backbone.hidden_size]) for k in range(1, backbone.num_layers // 2 + 1)}
    out = {}
    for spec in readouts:
        with fixed_threads(FIT_THREADS):  # as raee build fits it, whatever the thread count
            readout, probs = fit_readout(spec, backbone, task.label_token_ids(backbone.tokenizer), states, labels,
                                         config.seed, pool_from)
        out[spec] = nested(keys, probs, labels, layer_mask(readout, backbone.num_layers), config, floors, folds, seed,
                           objectives)
    return out


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for (spec, block), colour in zip(out["readouts"].items(), ("tab:red", "tab:blue", "tab:green"), strict=False):
        mean = block["mean"]
        for name, style in (("balanced", "o-"), ("accuracy", "s:")):
            shown = [f for f in mean["floors"] if objective_of(f) == name]
            if not shown:
                continue
            xs = [mean["floors"][f]["speedup"] for f in shown]
            ys = [mean["floors"][f]["accuracy"] for f in shown]
            ax.plot(xs, ys, style, color=colour, label=f"RAEE ({spec} readout), {name} objective at each floor")
            for f, x, y in zip(shown, xs, ys, strict=True):
                ax.annotate(f.split(":")[-1], (x, y), fontsize=6, xytext=(3, -9), textcoords="offset points",
                            color=colour)
        ax.axhline(mean["best_fixed"], color=colour, ls="--", lw=1,
                   label=f"best fixed layer, {spec} readout (chosen on the tuning rows)")
    ax.set(xlabel="mean estimated speed-up", ylabel="mean held-out accuracy",
           title=f"nested CV on the training samples ({len(out['tasks'])} tasks); labels: floor")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summarise(tasks: dict[str, dict], floors: list[str]) -> dict:
    return {"floors": {f: {m: float(np.mean([t["floors"][f][m] for t in tasks.values()]))
                           for m in ("accuracy", "speedup")} for f in floors},
            "best_fixed": float(np.mean([t["best_fixed"]["accuracy"] for t in tasks.values()]))}


def print_table(spec: str, tasks: dict[str, dict], user: dict, mean: dict, floors: list[str]) -> None:
    print(f"\nreadout {spec}\n{'task':<10}" + "".join(f"  floor {f:>4}" for f in floors) + "  best fixed")
    for name, t in {**tasks, **({"user task": user} if user else {})}.items():
        cells = "".join(f"  {t['floors'][f]['accuracy']:.3f} {t['floors'][f]['speedup']:.2f}x" for f in floors)
        print(f"{name:<10}{cells}  {t['best_fixed']['accuracy']:.3f}")
    cells = "".join(f"  {mean['floors'][f]['accuracy']:.3f} {mean['floors'][f]['speedup']:.2f}x" for f in floors)
    print(f"{f'mean ({len(tasks)})':<10}{cells}  {mean['best_fixed']:.3f}")


def merge(parts: list[str], out_path: Path) -> int:
    """One result from runs over disjoint task lists (same readouts, folds and floors), means recomputed."""
    loaded = [json.loads(Path(p).read_text()) for p in parts]
    out = {**loaded[0], "parts": parts, "seconds": max(p["seconds"] for p in loaded),
           "tasks": [t for p in loaded for t in p["tasks"]]}
    for spec, block in out["readouts"].items():
        tasks = {name: t for p in loaded for name, t in p["readouts"][spec]["tasks"].items()}
        floors = list(block["mean"]["floors"])
        user = next((p["readouts"][spec]["user_task"] for p in loaded if p["readouts"][spec]["user_task"]), {})
        out["readouts"][spec] = {"mean": summarise(tasks, floors), "tasks": tasks, "user_task": user}
        print_table(spec, tasks, user, out["readouts"][spec]["mean"], floors)
    out_path.write_text(json.dumps(out, indent=2))
    plot(out, out_path.with_suffix(".png"))
    print(f"wrote {out_path} and {out_path.with_suffix('.png')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap, dtype="float32")
    ap.add_argument("--tasks", nargs="*", default=None, help="default: all eight built-in tasks")
    ap.add_argument("--user-task", action="store_true", help="also the untuned 4-class user task (user_task.py)")
    ap.add_argument("--readouts", nargs="+", default=["probe", "probe-last"],
                    help="readouts compared on the same pass and folds (default: probe probe-last)")
    ap.add_argument("--train-limit", type=int, default=1000)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=1, help="the outer folds' seed (the sample's is raee build's)")
    ap.add_argument("--floors", type=float, nargs="+", default=[1.7, 1.75, 1.8, 1.85, 1.9, 2.0])
    ap.add_argument("--objectives", nargs="+", default=["balanced"], choices=OBJECTIVES,
                    help="objectives tried at each floor (default: balanced)")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default=str(RESULTS / "nested.json"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--merge", nargs="+", default=None, metavar="PART.json",
                    help="combine runs over disjoint task lists (e.g. one process per core) into --out")
    args = ap.parse_args(argv)
    if args.merge:
        return merge(args.merge, Path(args.out))
    if not 2 <= args.folds <= 20:
        raise SystemExit(f"--folds {args.folds}: between 2 and 20")
    if args.tasks == []:
        raise SystemExit("--tasks: name at least one task (or leave it out: all eight)")
    torch.set_num_threads(args.threads)
    backbone = load_model(args.model, device=args.device, dtype=args.dtype)
    config = BuildConfig(train_limit=args.train_limit, progress=False)
    started = time.time()
    by_task: dict[str, dict[str, dict]] = {}
    names = builtin_task_names() if args.tasks is None else args.tasks
    for name in tqdm(names, desc="tasks", unit="task"):
        by_task[name] = run_task(backbone, load_task(name, data_dir=args.data_dir), config, args.readouts,
                                 args.floors, args.folds, args.seed, tuple(args.objectives))
    user: dict[str, dict] = {}
    if args.user_task:
        import tempfile

        with tempfile.TemporaryDirectory() as scratch:
            task = load_task(make_user_task(Path(scratch) / "topics4", args.data_dir))
            user = run_task(backbone, task, config, args.readouts, args.floors, args.folds, args.seed,
                            tuple(args.objectives))
    floors = [floor_key(o, f) for o in args.objectives for f in args.floors]
    readouts = {}
    for spec in args.readouts:
        tasks = {name: r[spec] for name, r in by_task.items()}
        readouts[spec] = {"mean": summarise(tasks, floors), "tasks": tasks, "user_task": user.get(spec, {})}
    out = {"model": backbone.name, "weight_dtype": backbone.weight_dtype, "train_limit": args.train_limit,
           "folds": args.folds, "seed": args.seed, "seconds": time.time() - started, "tasks": names,
           "readouts": readouts}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    plot(out, Path(args.out).with_suffix(".png"))
    for spec, block in readouts.items():
        print_table(spec, block["tasks"], block["user_task"], block["mean"], floors)
    print(f"wrote {args.out} and {Path(args.out).with_suffix('.png')} ({out['seconds'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
