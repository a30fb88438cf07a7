"""RAEE on the eight classification tasks: every mode side by side, in one process, on the same inputs.

Per task: one seeded stratified sample of ``--train-limit`` training rows and ``--test-limit`` test
rows; one all-layer pass over the training sample, from which every mode's database is built (the
modes differ in readout, key and exit selection, not in the pass); then each mode is evaluated on the
same test rows: full model, RAEE, oracle, best fixed layer, the best fixed layer no deeper than RAEE's
mean depth (same readout), kNN vote. Modes:

* ``default``  probe readout, in-pass key (``backbone``), slack selection: exitwise's default
* ``paper``    label-word readout, MiniLM key, the paper's argmax selection (faithful RAEE)
* ``probe-minilm``  the default with a separate MiniLM key instead (what the free key saves)
* ``heads``    the default with the self-supervised heads as readout (``--heads PATH``)
* ``lancedb``, ``lancedb-ivfpq``  the default on the LanceDB store (only when named in ``--modes``)

Writes ``benchmarks/results/raee/raee.json`` and a summary PNG, prints Markdown tables for the README.

    .venv/bin/python benchmarks/raee.py --train-limit 1000 --test-limit 300 --heads runs/heads9
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from exitwise.cli.model_args import add_model_args
from exitwise.models.loading import load_model
from exitwise.raee.database import BuildConfig, build_database
from exitwise.raee.encoders import make_encoder
from exitwise.raee.evaluate import EvalConfig, evaluate, plot_report
from exitwise.raee.layerwise import last_token_states
from exitwise.raee.pipeline import RAEE
from exitwise.raee.tasks import builtin_task_names, load_task

sys.path.insert(0, str(Path(__file__).resolve().parent))
from user_task import make_user_task  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "raee"


def variants(train_limit: int, heads: str | None) -> dict[str, BuildConfig]:
    base = BuildConfig(train_limit=train_limit, progress=False)
    out = {"default": base, "paper": BuildConfig.paper(train_limit=train_limit, progress=False),
           "probe-minilm": replace(base, encoder="minilm", mode="custom")}
    if heads:
        out["heads"] = replace(base, readout=f"heads:{heads}", mode="custom")
    return out


def store_variants(train_limit: int) -> dict[str, BuildConfig]:
    """The default mode on the on-disk LanceDB store (run only when named in --modes): ``lancedb`` as
    built by default (exact search below 65,536 keys, so every task here), ``lancedb-ivfpq`` with its
    IVF-PQ index forced on (256 keys and up), to see what the approximate search costs in accuracy."""
    base = BuildConfig(train_limit=train_limit, progress=False, mode="custom", store="lancedb")
    return {"lancedb": base, "lancedb-ivfpq": replace(base, store_options={"min_index_rows": 256})}


def summarise(reports: list[dict]) -> dict:
    def mean(f):
        return float(np.mean([f(r) for r in reports]))

    return {
        "full": mean(lambda r: r["full"]["accuracy"]), "raee": mean(lambda r: r["raee"]["accuracy"]),
        "oracle": mean(lambda r: r["oracle"]["accuracy"]), "fixed": mean(lambda r: r["fixed_layer"]["accuracy"]),
        "fixed_at_depth": mean(lambda r: r["fixed_at_depth"]["accuracy"]), "knn": mean(lambda r: r["knn"]["accuracy"]),
        "mean_layers_run": mean(lambda r: r["raee"]["mean_layers_run"]),
        "depth_fraction": mean(lambda r: r["raee"]["mean_layers_run"] / r["num_layers"]),
        "speedup": mean(lambda r: r["speedup"]),
        "speedup_total_time": float(sum(r["full"]["seconds"] for r in reports)
                                    / sum(r["raee"]["seconds"] for r in reports)),
        "key_share": mean(lambda r: r["raee"]["key_share"]),
        "tasks_below_full_minus_0.03": [r["task"] for r in reports
                                        if r["raee"]["accuracy"] < r["full"]["accuracy"] - 0.03],
        "tasks_below_fixed_at_depth": [r["task"] for r in reports
                                       if r["raee"]["accuracy"] < r["fixed_at_depth"]["accuracy"]],
    }


def markdown(reports: list[dict], mean: dict) -> str:
    head = ("| task | full | RAEE | oracle | fixed at depth (train) | kNN vote | layers run | speed-up |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for r in reports:
        mcc = f" (MCC {r['raee']['mcc']:.3f} vs {r['full']['mcc']:.3f})" if r["metric"] == "mcc" else ""
        fd = r["fixed_at_depth"]
        rows.append(f"| {r['task']}{mcc} | {r['full']['accuracy']:.3f} | {r['raee']['accuracy']:.3f} | "
                    f"{r['oracle']['accuracy']:.3f} | {fd['accuracy']:.3f} (L{fd['layer']}) | "
                    f"{r['knn']['accuracy']:.3f} | {r['raee']['mean_layers_run']:.1f} / {r['num_layers']} | "
                    f"{r['speedup']:.2f}× |")
    rows.append(f"| **mean** | {mean['full']:.3f} | {mean['raee']:.3f} | {mean['oracle']:.3f} | "
                f"{mean['fixed_at_depth']:.3f} | {mean['knn']:.3f} | {mean['mean_layers_run']:.1f} "
                f"({mean['depth_fraction']:.0%}) | {mean['speedup']:.2f}× |")
    return "\n".join([head, *rows])


def plot_summary(out: dict, path: Path) -> None:
    """Per task: accuracy of the full model, each RAEE mode and the kNN vote; layers run per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(out["modes"])
    first = out["modes"][modes[0]]["tasks"]
    names = [r["task"] for r in first]
    x = np.arange(len(names))
    series = [("full model", [r["full"]["accuracy"] for r in first])]
    series += [(f"RAEE {m}", [r["raee"]["accuracy"] for r in out["modes"][m]["tasks"]]) for m in modes]
    series += [("kNN vote (default key)", [r["knn"]["accuracy"] for r in first])]
    width = 0.8 / len(series)
    fig, (a, b) = plt.subplots(1, 2, figsize=(15, 4.5))
    for i, (label, values) in enumerate(series):
        a.bar(x + (i - (len(series) - 1) / 2) * width, values, width, label=label)
    a.set(xticks=x, xticklabels=names, ylabel="test accuracy", ylim=(0, 1), title="accuracy")
    a.legend(fontsize=7)
    for i, m in enumerate(modes):  # the colours of the bars on the left
        b.plot(x, [r["raee"]["mean_layers_run"] / r["num_layers"] for r in out["modes"][m]["tasks"]], marker="o",
               label=f"RAEE {m}", color=f"C{i + 1}")
    b.axhline(0.5, color="gray", linestyle=":", label="target: 50% of depth")
    b.set(xticks=x, xticklabels=names, ylabel="mean layers run / depth", ylim=(0, 1.05), title="depth used")
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_task(backbone, encoder, task, modes: dict[str, BuildConfig], db_dir: Path, test_limit: int, plots: str,
             task_source: str | None = None) -> dict[str, dict]:
    base = next(iter(modes.values()))
    examples = task.load_split("train", base.train_limit, base.seed)
    t0 = time.time()
    states = last_token_states(backbone, task.encode([e.text for e in examples], backbone.tokenizer),
                               base.batch_size, progress=True, desc=f"{task.name} layers")
    pass_seconds = time.time() - t0
    out = {}
    for name, config in modes.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the few-examples-per-class warning, on small tasks
            db = build_database(backbone, task, db_dir / f"{task.name}-{name}.db", config, overwrite=True,
                                encoder=encoder, task_source=task_source, states=states)
        raee = RAEE(backbone, db, task, encoder=encoder)
        report = evaluate(raee, EvalConfig(test_limit=test_limit, progress=False))
        report["build_seconds"]["pass"] = pass_seconds  # shared by every mode (the database's own is ~0)
        out[name] = report
        print(f"{task.name} [{name}]: full {report['full']['accuracy']:.3f}  RAEE {report['raee']['accuracy']:.3f}  "
              f"fixed@depth {report['fixed_at_depth']['accuracy']:.3f} (L{report['fixed_at_depth']['layer']})  "
              f"kNN {report['knn']['accuracy']:.3f}  layers {report['raee']['mean_layers_run']:.1f}  "
              f"speed-up {report['speedup']:.2f}x", flush=True)
        if plots:
            Path(plots).mkdir(parents=True, exist_ok=True)
            plot_report(report, Path(plots) / f"{task.name}-{name}.png")
    return out


def report_tables(out: dict) -> None:
    for m, block in out["modes"].items():
        if block["tasks"]:
            print(f"\n{m}: {json.dumps(block['config'])}")
            print(markdown(block["tasks"], block["mean"]))
    if out.get("user_task"):
        user = out["user_task"]
        print("\nuser task (topics4: 4 TREC classes, untuned prompt, label-sorted training file), per mode:")
        print(markdown([{**r, "task": f"topics4 {m}"} for m, r in user.items()], summarise(list(user.values()))))


def merge(parts: list[str], out_path: Path) -> int:
    """One result file from runs over disjoint task lists, means recomputed over all tasks."""
    loaded = [json.loads(Path(p).read_text()) for p in parts]
    out = {**loaded[0], "parts": parts, "seconds": max(p["seconds"] for p in loaded),
           "user_task": next((p["user_task"] for p in loaded if p.get("user_task")), {})}
    for m in out["modes"]:
        tasks = [r for p in loaded for r in p["modes"][m]["tasks"]]
        out["modes"][m] = {**out["modes"][m], "tasks": tasks, "mean": summarise(tasks)}
    out_path.write_text(json.dumps(out, indent=2))
    plot_summary(out, out_path.with_suffix(".png"))
    report_tables(out)
    print(f"\nwrote {out_path} and {out_path.with_suffix('.png')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap, dtype="float32")  # the published figures: float32 weights
    ap.add_argument("--tasks", nargs="*", default=None, help="default: all eight built-in tasks")
    ap.add_argument("--user-task", action="store_true", help="also the untuned 4-class user task (user_task.py)")
    ap.add_argument("--train-limit", type=int, default=1000)
    ap.add_argument("--test-limit", type=int, default=300)
    ap.add_argument("--heads", default=None, help="heads for the heads-readout mode (e.g. runs/heads9)")
    ap.add_argument("--modes", nargs="+", default=None, help="only these modes (default, paper, probe-minilm, heads)")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default=str(RESULTS / "raee.json"))
    ap.add_argument("--plots", default=str(RESULTS), help="directory for per-task PNGs ('' to skip)")
    ap.add_argument("--replot", action="store_true", help="only redraw the summary PNG from --out")
    ap.add_argument("--merge", nargs="+", default=None, metavar="PART.json",
                    help="combine runs over disjoint task lists (e.g. two processes, one per core) into --out")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a shared 2-core machine two threads stall on each other)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    summary_png = Path(args.out).with_suffix(".png")
    if args.replot:
        plot_summary(json.loads(Path(args.out).read_text()), summary_png)
        print(f"wrote {summary_png}")
        return 0
    if args.merge:
        return merge(args.merge, Path(args.out))

    backbone = load_model(args.model, device=args.device, dtype=args.dtype)
    encoder = make_encoder("minilm")
    modes = variants(args.train_limit, args.heads)
    if args.modes:
        modes |= store_variants(args.train_limit)
        unknown = sorted(set(args.modes) - set(modes))
        if unknown:
            raise SystemExit(f"unknown mode(s) {unknown}; choose from {sorted(modes)}")
        modes = {m: c for m, c in modes.items() if m in args.modes}
    tasks = builtin_task_names() if args.tasks is None else args.tasks
    reports: dict[str, list[dict]] = {m: [] for m in modes}
    user: dict[str, dict] = {}
    started = time.time()
    with tempfile.TemporaryDirectory() as scratch:
        for name in tasks:
            for m, r in run_task(backbone, encoder, load_task(name, data_dir=args.data_dir), modes, Path(scratch),
                                 args.test_limit, args.plots).items():
                reports[m].append(r)
        if args.user_task:
            path = make_user_task(Path(scratch) / "topics4", args.data_dir)
            user = run_task(backbone, encoder, load_task(path), modes, Path(scratch), args.test_limit, args.plots,
                            task_source=str(path))
    out = {"model": backbone.name, "weight_dtype": backbone.weight_dtype, "train_limit": args.train_limit,
           "test_limit": args.test_limit,
           "seconds": time.time() - started, "torch_threads": args.threads,
           "modes": {m: {"config": {"readout": c.readout, "encoder": c.encoder, "store": c.store,
                                    **({"store_options": c.store_options} if c.store_options else {}),
                                    "select": c.select.__dict__},
                         "mean": summarise(reports[m]) if reports[m] else None, "tasks": reports[m]}
                     for m, c in modes.items()},
           "user_task": user}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    if tasks:
        plot_summary(out, summary_png)
    report_tables(out)
    print(f"\nwrote {args.out} ({out['seconds'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
