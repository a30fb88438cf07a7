"""RAEE on the eight classification tasks (and the user task): its frontier against every simpler
classifier built from the same parts, in one process, on the same inputs.

Per task: one seeded stratified sample of ``--train-limit`` training rows and ``--test-limit`` test
rows; one all-layer pass over the training sample, from which every mode's database is built (the
modes differ in readout, key and exit selection, not in the pass; the default mode chooses its
settings per task by cross-validation on that sample); then each mode is evaluated on the same test
rows: full model, RAEE, oracle, every fixed probe layer (the best one chosen on training data, and
the best one no deeper than RAEE's mean depth), the kNN vote with in-pass keys and with MiniLM keys.
One PNG per task (frontier, exit layers, per-layer accuracy) and a summary PNG. Modes (``--modes``;
default: ``default``):

* ``default``  probe readout, in-pass key, settings chosen per task (``--objective``): exitwise's default
* ``default-last``  the default with the probe on the last token's state alone (``--readout probe-last``)
* ``paper``    label-word readout, MiniLM key, the paper's argmax selection (faithful RAEE)
* ``probe-minilm``  the default with a separate MiniLM key instead (what the free key saves)
* ``heads``    the default with the self-supervised heads as readout (``--heads PATH``)
* ``lancedb``, ``lancedb-ivfpq``  the default on the LanceDB store (only when named in ``--modes``)

Writes ``benchmarks/results/raee/raee.json`` and a summary PNG, prints Markdown tables for docs/raee.md.

    .venv/bin/python benchmarks/raee.py --train-limit 1000 --test-limit 300 --user-task
    # or over disjoint task lists in several processes, then one result from their per-task reports:
    .venv/bin/python benchmarks/raee.py --collect benchmarks/results/raee --out benchmarks/results/raee/frontier.json
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
from exitwise.raee.readouts.base import pool_start
from exitwise.raee.tasks import builtin_task_names, load_task
from exitwise.raee.tuning import OBJECTIVES, Objective

sys.path.insert(0, str(Path(__file__).resolve().parent))
from user_task import make_user_task  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "raee"


def variants(train_limit: int, heads: str | None, objective: str = "balanced") -> dict[str, BuildConfig]:
    base = BuildConfig(train_limit=train_limit, progress=False, objective=Objective(objective))
    out = {"default": base, "default-last": replace(base, readout="probe-last", mode="custom"),
           "paper": BuildConfig.paper(train_limit=train_limit, progress=False),
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
        "oracle": mean(lambda r: r["oracle"]["accuracy"]), "best_fixed": mean(lambda r: r["best_fixed"]["accuracy"]),
        "fixed_at_depth": mean(lambda r: r["fixed_at_depth"]["accuracy"]), "knn": mean(lambda r: r["knn"]["accuracy"]),
        "knn_minilm": mean(lambda r: r["knn_minilm"]["accuracy"] or 0.0),
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
        "tasks_below_minilm_knn_minus_0.01": [r["task"] for r in reports if r["knn_minilm"]["accuracy"] is not None
                                              and r["raee"]["accuracy"] < r["knn_minilm"]["accuracy"] - 0.01],
        "tasks_raee_dominated": {r["task"]: r["frontier"]["raee_dominated_by"] for r in reports
                                 if r["frontier"]["raee_dominated_by"]},
        "early_share": mean(lambda r: r["raee"]["early_share"]),
    }


def markdown(reports: list[dict], mean: dict) -> str:
    head = ("| task | full | RAEE | best fixed (train) | fixed at depth (train) | kNN in-pass | kNN MiniLM | "
            "layers run | speed-up | settings (key, k, slack, vote, early, confirm@layer ...) |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    rows = []
    for r in reports:
        mcc = f" (MCC {r['raee']['mcc']:.3f} vs {r['full']['mcc']:.3f})" if r["metric"] == "mcc" else ""
        fd, bf, st = r["fixed_at_depth"], r["best_fixed"], r["settings"]
        minilm = r["knn_minilm"]["accuracy"]
        rows.append(f"| {r['task']}{mcc} | {r['full']['accuracy']:.3f} | {r['raee']['accuracy']:.3f} | "
                    f"{bf['accuracy']:.3f} (L{bf['layer']}) | {fd['accuracy']:.3f} (L{fd['layer']}) | "
                    f"{r['knn']['accuracy']:.3f} | {'-' if minilm is None else f'{minilm:.3f}'} | "
                    f"{r['raee']['mean_layers_run']:.1f} / {r['num_layers']} | {r['speedup']:.2f}× | "
                    f"{st['key_layer']}, {st['k']}, {st['slack']}, {st['vote_weight']}, {st['early_vote']}, "
                    f"{_confirm(st)} |")
    rows.append(f"| **mean** | {mean['full']:.3f} | {mean['raee']:.3f} | {mean['best_fixed']:.3f} | "
                f"{mean['fixed_at_depth']:.3f} | {mean['knn']:.3f} | {mean['knn_minilm']:.3f} | "
                f"{mean['mean_layers_run']:.1f} ({mean['depth_fraction']:.0%}) | {mean['speedup']:.2f}× | |")
    return "\n".join([head, *rows])


def _confirm(settings: dict) -> str:
    c = settings.get("confirm")
    return "-" if not c else " ".join(f"{t}@{d}" for t, d in zip(c, settings.get("confirm_layers"), strict=True))


def plot_summary(out: dict, path: Path) -> None:
    """Per task: accuracy of the full model, each RAEE mode, the best fixed layers and both kNN votes;
    and the mean frontier: each classifier's mean accuracy against its mean speed-up."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(out["modes"])
    first = out["modes"][modes[0]]["tasks"]
    names = [r["task"] for r in first]
    x = np.arange(len(names))
    series = [("full model", [r["full"]["accuracy"] for r in first])]
    series += [(f"RAEE {m}", [r["raee"]["accuracy"] for r in out["modes"][m]["tasks"]]) for m in modes]
    series += [("best fixed layer (train)", [r["best_fixed"]["accuracy"] for r in first]),
               ("fixed layer at RAEE's depth", [r["fixed_at_depth"]["accuracy"] for r in first]),
               ("kNN vote, in-pass keys", [r["knn"]["accuracy"] for r in first]),
               ("kNN vote, MiniLM keys", [r["knn_minilm"]["accuracy"] or 0.0 for r in first])]
    width = 0.8 / len(series)
    fig, (a, b) = plt.subplots(1, 2, figsize=(15, 4.5))
    for i, (label, values) in enumerate(series):
        a.bar(x + (i - (len(series) - 1) / 2) * width, values, width, label=label)
    a.set(xticks=x, xticklabels=names, ylabel="test accuracy", ylim=(0, 1), title="accuracy")
    a.legend(fontsize=7)
    # the mean frontier over the tasks: each kind of point's mean accuracy and mean speed-up
    def mean_point(pick) -> tuple[float, float]:
        got = [pick(r) for r in first]
        got = [p for p in got if p is not None]
        return float(np.mean([p["speedup"] for p in got])), float(np.mean([p["accuracy"] for p in got]))

    def kind(name):
        return lambda r: next((p for p in r["frontier"]["points"] if p["kind"] == name), None)

    for layer in range(first[0]["num_layers"] + 1):
        x, y = mean_point(lambda r, layer=layer: next((p for p in r["frontier"]["points"]
                                                       if p["kind"] == "fixed" and p["layer"] == layer), None))
        b.scatter([x], [y], color="tab:gray", s=15, label="fixed probe layer (mean)" if layer == 0 else None)
        if layer % 5 == 0:
            b.annotate(f"L{layer}", (x, y), fontsize=6, color="tab:gray")
    for name, colour, marker, label in (("full", "k", "s", "full model"),
                                        ("knn", "tab:green", "^", "kNN, in-pass keys"),
                                        ("knn_minilm", "tab:purple", "D", "kNN, MiniLM keys (measured)"),
                                        ("raee", "tab:red", "*", "RAEE (chosen per task)")):
        x, y = mean_point(kind(name))
        b.scatter([x], [y], color=colour, marker=marker, s=120 if name == "raee" else 40, label=label)
    b.set(xscale="log", xlabel="mean speed-up (from layers run)", ylabel="mean test accuracy",
          title=f"mean over {len(first)} tasks: accuracy against speed-up")
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_task(backbone, encoder, task, modes: dict[str, BuildConfig], db_dir: Path, test_limit: int, plots: str,
             task_source: str | None = None, repeats: int = 3) -> dict[str, dict]:
    base = next(iter(modes.values()))
    examples = task.load_split("train", base.train_limit, base.seed)
    t0 = time.time()
    # pooled when a mode's readout pools: the last token's states are their first D columns, for the rest
    pool_from = pool_start([c.readout for c in modes.values()], task, backbone.tokenizer)
    states = last_token_states(backbone, task.encode([e.text for e in examples], backbone.tokenizer),
                               base.batch_size, progress=True, desc=f"{task.name} layers", pool_from=pool_from)
    pass_seconds = time.time() - t0
    out = {}
    for name, config in modes.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the few-examples-per-class warning, on small tasks
            db = build_database(backbone, task, db_dir / f"{task.name}-{name}.db", config, overwrite=True,
                                encoder=encoder, task_source=task_source, states=states)
        raee = RAEE(backbone, db, task, encoder=encoder)
        report = evaluate(raee, EvalConfig(test_limit=test_limit, progress=False, repeats=repeats))
        report["build_seconds"]["pass"] = pass_seconds  # shared by every mode (the database's own is ~0)
        out[name] = report
        print(f"{task.name} [{name}]: full {report['full']['accuracy']:.3f}  RAEE {report['raee']['accuracy']:.3f}  "
              f"best fixed {report['best_fixed']['accuracy']:.3f} (L{report['best_fixed']['layer']})  "
              f"fixed@depth {report['fixed_at_depth']['accuracy']:.3f} (L{report['fixed_at_depth']['layer']})  "
              f"kNN {report['knn']['accuracy']:.3f}  kNN MiniLM {report['knn_minilm']['accuracy']}  "
              f"layers {report['raee']['mean_layers_run']:.1f}  speed-up {report['speedup']:.2f}x  "
              f"settings {report['settings']}", flush=True)
        if plots:  # each task's report as it comes: a long run that stops keeps what it finished
            Path(plots).mkdir(parents=True, exist_ok=True)
            plot_report(report, Path(plots) / f"{task.name}-{name}.png")
            (Path(plots) / f"{task.name}-{name}.json").write_text(json.dumps(report, indent=2))
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


def collect(directory: Path, out_path: Path, modes: dict[str, BuildConfig], args) -> int:
    """One result file from the per-task reports (``<task>-<mode>.json``) that runs wrote into
    ``directory``, e.g. several processes over disjoint task lists; means over the tasks found."""
    reports = {m: [json.loads((directory / f"{t}-{m}.json").read_text()) for t in builtin_task_names()
                   if (directory / f"{t}-{m}.json").exists()] for m in modes}
    user = {m: json.loads((directory / f"topics4-{m}.json").read_text()) for m in modes
            if (directory / f"topics4-{m}.json").exists()}
    first = next(r for rs in [*reports.values(), list(user.values())] for r in rs)
    out = {"model": first["model"], "train_limit": args.train_limit, "test_limit": args.test_limit,
           "torch_threads": args.threads, "collected_from": str(directory),
           "modes": {m: {"config": _describe(c), "mean": summarise(reports[m]) if reports[m] else None,
                         "tasks": reports[m]} for m, c in modes.items()},
           "user_task": user}
    out_path.write_text(json.dumps(out, indent=2))
    plot_summary(out, out_path.with_suffix(".png"))
    report_tables(out)
    print(f"\nwrote {out_path} and {out_path.with_suffix('.png')}")
    return 0


def _describe(c: BuildConfig) -> dict:
    return {"readout": c.readout, "encoder": c.encoder, "store": c.store,
            **({"store_options": c.store_options} if c.store_options else {}), "select": c.select.__dict__,
            "objective": c.objective.__dict__ if c.objective else None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap, dtype="float32")  # the published figures: float32 weights
    ap.add_argument("--tasks", nargs="*", default=None, help="default: all eight built-in tasks")
    ap.add_argument("--user-task", action="store_true", help="also the untuned 4-class user task (user_task.py)")
    ap.add_argument("--train-limit", type=int, default=1000)
    ap.add_argument("--test-limit", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=3,
                    help="timed runs of the full model and of RAEE per task, in turns; the fastest of each counts")
    ap.add_argument("--heads", default=None, help="heads for the heads-readout mode (e.g. runs/heads9)")
    ap.add_argument("--modes", nargs="+", default=["default"],
                    help="modes to run (default, paper, probe-minilm, heads, lancedb, lancedb-ivfpq; default: default)")
    ap.add_argument("--objective", default="balanced", choices=OBJECTIVES,
                    help="what the default mode's per-task settings optimise (default: balanced)")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default=str(RESULTS / "raee.json"))
    ap.add_argument("--plots", default=str(RESULTS), help="directory for per-task PNGs ('' to skip)")
    ap.add_argument("--replot", action="store_true", help="only redraw the summary PNG from --out")
    ap.add_argument("--merge", nargs="+", default=None, metavar="PART.json",
                    help="combine runs over disjoint task lists (e.g. two processes, one per core) into --out")
    ap.add_argument("--collect", default=None, metavar="DIR",
                    help="write --out from the per-task reports a run (or several) left in DIR (its --plots)")
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
    if args.collect:
        chosen = variants(args.train_limit, args.heads, args.objective) | store_variants(args.train_limit)
        return collect(Path(args.collect), Path(args.out), {m: chosen[m] for m in args.modes}, args)

    backbone = load_model(args.model, device=args.device, dtype=args.dtype)
    encoder = make_encoder("minilm")
    modes = variants(args.train_limit, args.heads, args.objective)
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
                                 args.test_limit, args.plots, repeats=args.repeats).items():
                reports[m].append(r)
        if args.user_task:
            path = make_user_task(Path(scratch) / "topics4", args.data_dir)
            user = run_task(backbone, encoder, load_task(path), modes, Path(scratch), args.test_limit, args.plots,
                            task_source=str(path), repeats=args.repeats)
    out = {"model": backbone.name, "weight_dtype": backbone.weight_dtype, "train_limit": args.train_limit,
           "test_limit": args.test_limit,
           "seconds": time.time() - started, "torch_threads": args.threads,
           "modes": {m: {"config": _describe(c),
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
