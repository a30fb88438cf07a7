"""RAEE on the eight classification tasks: full model vs RAEE vs oracle vs fixed layer vs kNN vote.

For each task: build a database from the first ``--train-limit`` training examples, then evaluate on
the first ``--test-limit`` test examples, all in this one process on the same model. Writes
``benchmarks/results/raee.json`` (every per-task report) and prints a summary table (also as
Markdown for the README).

    .venv/bin/python benchmarks/raee.py --train-limit 1000 --test-limit 300
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from exitwise.models.loading import load_model
from exitwise.raee.calibration import ExitSpace
from exitwise.raee.database import BuildConfig, build_database
from exitwise.raee.encoders import make_encoder
from exitwise.raee.evaluate import EvalConfig, evaluate, plot_report
from exitwise.raee.pipeline import RAEE
from exitwise.raee.predictor import RAEEConfig
from exitwise.raee.tasks import builtin_task_names, load_task

RESULTS = Path(__file__).resolve().parent / "results"
# Faithful RAEE, and the training-free per-layer calibration beyond the paper (same database).
VARIANTS = {"paper": ExitSpace(), "calibrated": ExitSpace(calibrate=True)}


def summarise(reports: list[dict]) -> dict:
    keys = {"full": ("full", "accuracy"), "raee": ("raee", "accuracy"), "oracle": ("oracle", "accuracy"),
            "fixed": ("fixed_layer", "accuracy"), "knn": ("knn", "accuracy")}
    mean = {name: float(np.mean([r[a][b] for r in reports])) for name, (a, b) in keys.items()}
    mean["mean_exit_layer"] = float(np.mean([r["raee"]["mean_exit_layer"] for r in reports]))
    mean["exit_fraction_of_depth"] = float(np.mean([r["raee"]["mean_exit_layer"] / r["num_layers"] for r in reports]))
    mean["speedup"] = float(np.mean([r["speedup"] for r in reports]))
    mean["speedup_total_time"] = float(sum(r["full"]["seconds"] for r in reports)
                                       / sum(r["raee"]["seconds"] for r in reports))
    return mean


def markdown(reports: list[dict], mean: dict) -> str:
    head = ("| task | full | RAEE | oracle | fixed layer (train) | kNN vote | mean exit layer | speed-up |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for r in reports:
        mcc = f" (MCC {r['raee']['mcc']:.3f} vs {r['full']['mcc']:.3f})" if r["metric"] == "mcc" else ""
        fixed = r["fixed_layer"]
        rows.append(f"| {r['task']}{mcc} | {r['full']['accuracy']:.3f} | {r['raee']['accuracy']:.3f} | "
                    f"{r['oracle']['accuracy']:.3f} | {fixed['accuracy']:.3f} (L{fixed['layer']}) | "
                    f"{r['knn']['accuracy']:.3f} | {r['raee']['mean_exit_layer']:.1f} / {r['num_layers']} | "
                    f"{r['speedup']:.2f}× |")
    rows.append(f"| **mean** | {mean['full']:.3f} | {mean['raee']:.3f} | {mean['oracle']:.3f} | {mean['fixed']:.3f} | "
                f"{mean['knn']:.3f} | {mean['mean_exit_layer']:.1f} ({mean['exit_fraction_of_depth']:.0%}) | "
                f"{mean['speedup']:.2f}× |")
    return "\n".join([head, *rows])


def plot_summary(out: dict, path: Path) -> None:
    """Per task: accuracy of the full model, RAEE (paper), RAEE (calibrated) and the kNN vote, with
    RAEE's mean exit layer as a fraction of depth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paper, improved = out["tasks"], out["improved"]["tasks"]
    names = [r["task"] for r in paper]
    x = np.arange(len(names))
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4))
    series = [("full model", [r["full"]["accuracy"] for r in paper]),
              ("RAEE (paper)", [r["raee"]["accuracy"] for r in paper]),
              ("RAEE (calibrated)", [r["raee"]["accuracy"] for r in improved]),
              ("kNN vote", [r["knn"]["accuracy"] for r in paper])]
    for i, (label, values) in enumerate(series):
        a.bar(x + (i - 1.5) * 0.2, values, 0.2, label=label)
    a.set(xticks=x, xticklabels=names, ylabel="test accuracy", ylim=(0, 1), title="accuracy")
    a.legend(fontsize=8)
    for label, reps, colour in (("RAEE (paper)", paper, "tab:orange"), ("RAEE (calibrated)", improved, "tab:green")):
        b.plot(x, [r["raee"]["mean_exit_layer"] / r["num_layers"] for r in reps], marker="o", label=label,
               color=colour)
    b.axhline(0.6, color="gray", linestyle=":", label="target: 60% of depth")
    b.set(xticks=x, xticklabels=names, ylabel="mean exit layer / depth", ylim=(0, 1.05), title="depth used")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tasks", nargs="*", default=None, help="default: all eight built-in tasks")
    ap.add_argument("--train-limit", type=int, default=1000)
    ap.add_argument("--test-limit", type=int, default=300)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--db-dir", default=None, help="where databases go (default: a temporary directory)")
    ap.add_argument("--out", default=str(RESULTS / "raee.json"))
    ap.add_argument("--plots", default=str(RESULTS / "raee"), help="directory for per-task PNGs ('' to skip)")
    ap.add_argument("--replot", action="store_true", help="only redraw the summary PNG from --out")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a shared 2-core machine two threads stall on each other)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    summary_png = Path(args.out).with_suffix(".png")
    if args.replot:
        plot_summary(json.loads(Path(args.out).read_text()), summary_png)
        print(f"wrote {summary_png}")
        return 0

    backbone = load_model(args.model)
    encoder = make_encoder("minilm")
    tasks = args.tasks or builtin_task_names()
    reports: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    started = time.time()
    with tempfile.TemporaryDirectory() as scratch:
        db_dir = Path(args.db_dir or scratch)
        for name in tasks:
            task = load_task(name, data_dir=args.data_dir)
            t0 = time.time()
            db = build_database(backbone, task, db_dir / f"{task.name}.db",
                                BuildConfig(train_limit=args.train_limit), overwrite=True, encoder=encoder)
            build_seconds = time.time() - t0
            for variant, space in VARIANTS.items():
                raee = RAEE(backbone, db, task, encoder=encoder, config=RAEEConfig(), space=space)
                report = evaluate(raee, EvalConfig(test_limit=args.test_limit))
                report["build_seconds"] = build_seconds
                reports[variant].append(report)
                print(f"{task.name} [{variant}]: full {report['full']['accuracy']:.3f}  "
                      f"RAEE {report['raee']['accuracy']:.3f}  oracle {report['oracle']['accuracy']:.3f}  "
                      f"kNN {report['knn']['accuracy']:.3f}  exit {report['raee']['mean_exit_layer']:.1f}  "
                      f"speed-up {report['speedup']:.2f}x", flush=True)
                if args.plots:
                    Path(args.plots).mkdir(parents=True, exist_ok=True)
                    plot_report(report, Path(args.plots) / f"{task.name}-{variant}.png")
    means = {variant: summarise(r) for variant, r in reports.items()}
    out = {"model": backbone.name, "train_limit": args.train_limit, "test_limit": args.test_limit,
           "seconds": time.time() - started, "torch_threads": args.threads,
           "variants": {v: space.describe() for v, space in VARIANTS.items()},
           "mean": means["paper"], "tasks": reports["paper"],
           "improved": {"mean": means["calibrated"], "tasks": reports["calibrated"]}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    plot_summary(out, summary_png)
    for variant in VARIANTS:
        print(f"\n{variant}:")
        print(markdown(reports[variant], means[variant]))
    print(f"\nwrote {args.out} and {summary_png} ({out['seconds'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
