"""``exitwise raee build``, ``exitwise raee eval`` and ``exitwise classify``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from exitwise.cli import command_group
from exitwise.cli.argtypes import float_range, non_negative_float, non_negative_int, positive_int, seed_arg
from exitwise.cli.model_args import add_model_args, model_spec
from exitwise.raee.tasks import DEFAULT_SEED


def _add_model_args(p: argparse.ArgumentParser, **model) -> None:
    add_model_args(p, **model)
    p.add_argument("--data-dir", default=None, help="directory holding the built-in tasks (default: ../shared/data)")


def _add_select_args(p: argparse.ArgumentParser, where: str) -> None:
    p.add_argument("--k", type=positive_int, default=None, help=f"neighbours retrieved per query (default: {where})")
    p.add_argument("--min-prob", type=float_range(0.0, 1.0), default=None,
                   help=f"keep a neighbour's exit entries with p >= this (default: {where})")
    p.add_argument("--fallback-top", type=non_negative_int, default=None,
                   help=f"else keep its N most confident entries (default: {where})")
    p.add_argument("--slack", type=float_range(0.0, 1.0, lo_open=True), default=None,
                   help="exit at the shallowest layer scoring >= slack x the best (1 = the paper's argmax; "
                        f"default: {where})")
    p.add_argument("--vote-weight", type=float_range(0.0, 1.0), default=None,
                   help="answer (1-w) x the exit layer's readout + w x the neighbours' label vote (0 = the "
                        f"readout alone; default: {where})")
    p.add_argument("--early-vote", type=float_range(0.0, 1.0, lo_open=True), default=None,
                   help="answer with the neighbours' vote before any layer above the key runs when it gives one "
                        f"class at least this share (default: {where})")
    p.add_argument("--confirm", type=float_range(0.0, 1.0, lo_open=True), nargs="+", default=None, metavar="T",
                   help="an answer whose class has less than T at its exit goes on to the first of "
                        f"--confirm-layers above it and is read there; one T per layer (default: {where})")
    p.add_argument("--confirm-layers", type=non_negative_int, nargs="+", default=None, metavar="L",
                   help=f"the layers a doubtful answer is read again at, above the key layer, increasing "
                        f"(default: {where})")
    p.add_argument("--paper", action="store_true",
                   help="the paper's settings (docs/papers.md): "
                        + ("label-word readout, MiniLM keys, argmax selection" if where.startswith("the default")
                           else "argmax selection with p >= 0.9 / top-3 (readout and keys are the database's)"))


def _select(args, base):
    """The exit-selection settings: --paper's or ``base``'s, with any explicit flag on top."""
    from dataclasses import replace

    from exitwise.raee.predictor import SelectConfig

    base = SelectConfig.paper() if args.paper else base
    return replace(base, **{k: v for k, v in _given(args).items() if v is not None})


def _given(args) -> dict:
    """The selection flags as SelectConfig fields (None: not given)."""
    return {"k": args.k, "min_prob": args.min_prob, "fallback_top": args.fallback_top, "slack": args.slack,
            "vote_weight": args.vote_weight, "early_vote": args.early_vote,
            "confirm": None if args.confirm is None else tuple(args.confirm),
            "confirm_layers": None if args.confirm_layers is None else tuple(args.confirm_layers)}


def _add_raee_args(p: argparse.ArgumentParser) -> None:
    _add_select_args(p, "the database's")
    p.add_argument("--nprobe", type=positive_int, default=None, help="IVF probes at search time (ivfpq store only)")
    p.add_argument("--calibrate-layers", action="store_true",
                   help="beyond the paper: divide each layer's label-word probabilities by their training mean")
    p.add_argument("--layer-tolerance", type=non_negative_float, default=None,
                   help="beyond the paper: exit only at layers whose training accuracy is within this of the "
                        "last layer's (e.g. 0.05)")


def _spec(args, db=None):
    """How to open the RAEE of ``--db`` with the command's selection flags and ``--nprobe``
    (``db``: the database, if already opened)."""
    from exitwise.raee.database import Database
    from exitwise.raee.pipeline import RAEESpec

    db = db or Database.load(args.db)
    # a search for more neighbours than there are rows allocates k columns per query for nothing
    # (--k 10^9 on a 40-row database asked for 16 GB); said before the model loads
    if args.k is not None and args.k > len(db):
        raise ValueError(f"--k {args.k} is more than the {len(db)} rows of the database {args.db}")
    return RAEESpec(str(args.db), model=model_spec(args), data_dir=args.data_dir,
                    config=_select(args, db.select_config()), space=_space(args), nprobe=args.nprobe)


def _open(args):
    """The RAEE of ``--db`` with the command's selection flags and ``--nprobe`` applied; the database
    is loaded (and its checksums verified) once."""
    from exitwise.raee.database import Database

    db = Database.load(args.db)
    return _spec(args, db).open(db)


def _add_ray_args(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--ray", action="store_true", help=f"run {what} as a Ray Data pipeline on a pool of workers, "
                                                      "each with its own copy of the model (needs exitwise[ray])")
    p.add_argument("--ray-address", default=None,
                   help="a running Ray cluster to use (e.g. auto); default: start a local one for this command")
    p.add_argument("--workers", type=positive_int, default=2, help="Ray workers (with --ray; default: 2)")


def _cluster(args):
    from exitwise.raee.distributed import RayConfig

    return RayConfig(workers=args.workers, address=args.ray_address)


def _space(args):
    from exitwise.raee.calibration import ExitSpace

    return ExitSpace(calibrate=args.calibrate_layers, tolerance=args.layer_tolerance)


def _build(args) -> int:
    from dataclasses import replace

    import numpy as np

    from exitwise.models.loading import load_model
    from exitwise.raee import outdir
    from exitwise.raee.database import BuildConfig, build_database, check_classes
    from exitwise.raee.tasks import load_task
    from exitwise.raee.tuning import Objective, SearchSpace

    _check_limit(args, "train_limit")
    # bad --objective / --min-speedup / --max-depth: said before anything loads
    objective = None if args.paper or args.no_tune else Objective(args.objective, args.min_speedup, args.max_depth)
    # the target first: a refused --out costs nothing (no task file read, no model loaded)
    outdir.prepare(Path(args.out), args.overwrite)
    task = load_task(args.task, data_dir=args.data_dir)
    source = str(Path(args.task).resolve()) if Path(args.task).suffix.lower() in {".yaml", ".yml", ".json"} \
        else args.task
    base = BuildConfig.paper() if args.paper else BuildConfig()
    given = {"readout": args.readout, "encoder": args.encoder}
    custom = {k: v for k, v in given.items() if v is not None}
    select = _select(args, base.select)
    options = {"nprobe": args.nprobe} if args.nprobe is not None else {}
    mode = base.mode if not custom and select == base.select and (objective is not None or args.paper) else "custom"
    # a selection flag given at build fixes that setting; the tuning chooses the others
    pinned = {k: v for k, v in _given(args).items()
              if k in ("k", "slack", "vote_weight", "early_vote", "confirm", "confirm_layers")}
    config = replace(base, train_limit=args.train_limit, seed=args.seed, batch_size=args.batch_size, store=args.store,
                     store_options=options, select=select, mode=mode, allow_missing_classes=args.allow_missing_classes,
                     objective=objective, space=SearchSpace().pinned(**pinned), **custom)
    # the sample is cheap to draw: refuse a bad one before the model loads
    check_classes(task, np.array([e.label for e in task.load_split("train", config.train_limit, config.seed)]),
                  config, warn=False)
    if args.ray:
        from exitwise.raee.distributed import import_ray

        import_ray()  # before the model loads: a missing extra costs nothing
    backbone = load_model(args.model, device=args.device, dtype=args.dtype)
    if args.ray:
        from exitwise.raee.distributed import build_database_on_ray

        db = build_database_on_ray(backbone, args.model, task, args.out, config, _cluster(args), device=args.device,
                                   dtype=args.dtype, overwrite=args.overwrite, task_source=source)
    else:
        db = build_database(backbone, task, args.out, config, overwrite=args.overwrite, task_source=source)
    c = db.manifest["counts"]
    if db.manifest.get("tuning"):
        t = db.manifest["tuning"]
        ch, cv = t["chosen"], t["cv"]
        print(f"settings for objective {t['objective']['name']} (cross-validated on the training sample, "
              f"{t['settings_tried']} tried): key layer {ch['key_layer']}, k {ch['k']}, slack {ch['slack']}, vote "
              f"weight {ch['vote_weight']}, early vote {ch['early_vote']}, confirm {ch.get('confirm')} at layers "
              f"{ch.get('confirm_layers')}: accuracy {cv['accuracy']:.3f} at "
              f"{cv['mean_layers_run']:.1f} layers (estimated {cv['speedup']:.2f}x); best fixed layer "
              f"{t['best_fixed']['layer']}: {t['best_fixed']['accuracy']:.3f}")
    print(f"built {args.out} ({config.mode} mode: readout {config.readout}, key {db.manifest['encoder']['spec']}): "
          f"{c['examples']} training examples of {task.name} (seed {config.seed}, per class "
          f"{db.manifest['sample']['class_counts']}), {c['entries']} exit entries, {c['never_correct']} never "
          f"correct at any layer; full-model training accuracy {c['full_model_train_accuracy']:.3f}")
    return 0


def _check_limit(args, name: str) -> None:
    """``--train-limit`` / ``--test-limit``: a positive count, said before anything loads."""
    value = getattr(args, name)
    if value is not None and value < 1:
        raise ValueError(f"--{name.replace('_', '-')} must be a positive number of examples, got {value}")


def _eval(args) -> int:
    from exitwise.raee.evaluate import EvalConfig, evaluate, format_report, plot_report

    _check_limit(args, "test_limit")
    config = EvalConfig(test_limit=args.test_limit, seed=args.seed, repeats=args.repeats)  # refused before loading
    raee = _open(args)
    report = evaluate(raee, config)
    print(format_report(report))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    if args.plot:
        plot_report(report, args.plot)
        print(f"wrote {args.plot}")
    return 0


def _read_inputs(path: str) -> list[str]:
    from exitwise.raee.pipeline import input_text
    from exitwise.raee.tasks import iter_jsonl

    return [input_text(where, obj) for where, obj in iter_jsonl(path)]


def _classify(args) -> int:
    if args.ray:
        return _classify_on_ray(args)
    texts = list(args.texts) + (_read_inputs(args.input) if args.input else [])
    if not texts:
        print("exitwise: error: give TEXT arguments or --input FILE.jsonl", file=sys.stderr)
        return 2
    raee = _open(args)
    predictions = raee.classify(texts)
    if args.output:
        from exitwise.artifacts import write_lines

        n = write_lines((json.dumps(p.as_json()) for p in predictions), Path(args.output))
        print(f"wrote {n} predictions to {args.output}", file=sys.stderr)
        return 0
    for p in predictions:
        if args.json:
            print(json.dumps(p.as_json()))
        else:
            print(f"{p.label}\tlayer {p.exit_layer}/{raee.backbone.num_layers}\t{p.confidence:.3f}\t{p.text}")
    return 0


def _classify_on_ray(args) -> int:
    from exitwise.raee.distributed import classify_file_on_ray, import_ray

    if args.texts or not args.input or not args.output:
        print("exitwise: error: classify --ray reads --input FILE.jsonl and writes --output FILE.jsonl "
              "(no TEXT arguments)", file=sys.stderr)
        return 2
    import_ray()
    n = classify_file_on_ray(_spec(args), args.input, args.output, _cluster(args))
    print(f"wrote {n} predictions to {args.output}", file=sys.stderr)
    return 0


def _compare(args) -> int:
    from exitwise.raee.evaluate import compare_reports, plot_comparison

    reports = [json.loads(Path(p).read_text()) for p in args.reports]
    print(compare_reports(reports))
    if args.plot:
        plot_comparison(reports, args.plot)
        print(f"wrote {args.plot}")
    return 0


BUILT_WITH = "the model the database was built with"


def register(sub: argparse._SubParsersAction) -> None:
    from exitwise.raee.tuning import DEFAULT_MIN_SPEEDUP, TOLERANCE

    actions = command_group(sub, "raee", "retrieval-augmented early exiting (build / eval / compare)")

    b = actions.add_parser("build", help="build a retrieval database from a task's training split")
    b.add_argument("--task", required=True, help="built-in task name (e.g. sst2, trec) or a task file (.yaml/.json)")
    b.add_argument("--out", required=True, help="database directory to create")
    b.add_argument("--train-limit", type=int, default=None,
                   help="a seeded sample of N training examples, stratified by class (default: all)")
    b.add_argument("--seed", type=seed_arg, default=DEFAULT_SEED, help=f"seed of that sample (default: {DEFAULT_SEED})")
    b.add_argument("--allow-missing-classes", action="store_true",
                   help="build even if the training sample lacks a class of the task")
    b.add_argument("--batch-size", type=positive_int, default=8)
    b.add_argument("--readout", default=None,
                   help="what an exit answers with: probe (default; per-layer probes fitted on the training "
                        "split, on the last token's state and the mean of the prompt's own tokens), probe-last "
                        "(on the last token's state alone), lm (the paper: label-word rows of the model's head), "
                        "or heads:PATH")
    b.add_argument("--encoder", default=None,
                   help="retrieval key: backbone (default: the answering pass's own last-token state at layer "
                        "round(0.2 L), 6 of 30, free), backbone:<k> (at layer k), minilm (the paper-style "
                        "separate encoder), backbone-mean:<k>, or an encoder path")
    b.add_argument("--store", default="flat", choices=["flat", "ivfpq", "lancedb"],
                   help="flat = exact search (default); ivfpq = the paper's IVF{8sqrt(N)}_HNSW32,PQ64; "
                        "lancedb = on-disk LanceDB (exact below 65536 keys, IVF-PQ above; needs exitwise[lancedb])")
    b.add_argument("--nprobe", type=positive_int, default=None, help="IVF probes (ivfpq only)")
    b.add_argument("--overwrite", action="store_true", help="replace an existing database")
    _add_ray_args(b, "the all-layer pass over the training split")
    _add_select_args(b, "chosen per task by cross-validation; a value given here is kept and the rest chosen")
    b.add_argument("--objective", default="balanced",
                   help="what the per-task settings optimise on the training sample: accuracy (the most accurate), "
                        f"balanced (default: the most accurate at an estimated speed-up of {DEFAULT_MIN_SPEEDUP}x or "
                        f"more, cheapest within {TOLERANCE['balanced']}) or speed (the cheapest within "
                        f"{TOLERANCE['speed']} of that)")
    b.add_argument("--min-speedup", type=float, default=None,
                   help="only settings with at least this estimated speed-up over the full model")
    b.add_argument("--max-depth", type=float, default=None, help="only settings running at most this many layers "
                                                                 "on average")
    b.add_argument("--no-tune", action="store_true",
                   help="store the selection settings as given (exitwise's defaults and the flags) without tuning")
    _add_model_args(b, required=True)
    b.set_defaults(handler=_build)

    e = actions.add_parser("eval", help="full model vs RAEE vs oracle vs fixed layer vs kNN on the test split")
    e.add_argument("--db", required=True)
    e.add_argument("--test-limit", type=int, default=None,
                   help="a seeded sample of N test examples, stratified by class (default: all)")
    e.add_argument("--seed", type=seed_arg, default=DEFAULT_SEED, help=f"seed of that sample (default: {DEFAULT_SEED})")
    e.add_argument("--json", default=None, help="write the report as JSON here")
    e.add_argument("--plot", default=None, help="write exit-layer histogram and per-layer accuracy (PNG) here")
    e.add_argument("--repeats", type=positive_int, default=1,
                   help="timed runs of the full model and of RAEE, in turns; the fastest of each is reported "
                        "(default: 1)")
    _add_raee_args(e)
    _add_model_args(e, default=None, default_help=BUILT_WITH)
    e.set_defaults(handler=_eval)

    m = actions.add_parser("compare", help="side-by-side table (and PNG) of raee eval reports on one task")
    m.add_argument("reports", nargs="+", metavar="REPORT.json")
    m.add_argument("--plot", default=None, help="write an accuracy / layers-run / speed-up chart (PNG) here")
    m.set_defaults(handler=_compare)

    c = sub.add_parser("classify", help="classify texts with a RAEE database (label, exit layer, confidence)")
    c.add_argument("texts", nargs="*", metavar="TEXT")
    c.add_argument("--db", required=True)
    c.add_argument("--input", default=None, help="jsonl file with a 'text' field per line")
    c.add_argument("--json", action="store_true", help="one JSON object per line")
    c.add_argument("--output", default=None,
                   help="write the predictions here as JSON lines (what --json prints), in input order")
    _add_ray_args(c, "the classification of --input")
    _add_raee_args(c)
    _add_model_args(c, default=None, default_help=BUILT_WITH)
    c.set_defaults(handler=_classify)
