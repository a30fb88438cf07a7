"""``exitwise raee build``, ``exitwise raee eval`` and ``exitwise classify``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    p.add_argument("--data-dir", default=None, help="directory holding the built-in tasks (default: ../shared/data)")


def _add_raee_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--k", type=int, default=12, help="neighbours retrieved per query (default: 12)")
    p.add_argument("--min-prob", type=float, default=0.9,
                   help="keep a neighbour's exit entries with p >= this (default: 0.9)")
    p.add_argument("--fallback-top", type=int, default=3,
                   help="else keep its N most confident entries (default: 3)")
    p.add_argument("--nprobe", type=int, default=None, help="IVF probes at search time (ivfpq store only)")
    p.add_argument("--calibrate-layers", action="store_true",
                   help="beyond the paper: divide each layer's label-word probabilities by their training mean")
    p.add_argument("--layer-tolerance", type=float, default=None,
                   help="beyond the paper: exit only at layers whose training accuracy is within this of the "
                        "last layer's (e.g. 0.05)")


def _raee_config(args):
    from exitwise.raee.predictor import RAEEConfig

    return RAEEConfig(k=args.k, min_prob=args.min_prob, fallback_top=args.fallback_top)


def _space(args):
    from exitwise.raee.calibration import ExitSpace

    return ExitSpace(calibrate=args.calibrate_layers, tolerance=args.layer_tolerance)


def _build(args) -> int:
    from exitwise.models.loading import load_model
    from exitwise.raee.database import BuildConfig, build_database
    from exitwise.raee.tasks import load_task

    task = load_task(args.task, data_dir=args.data_dir)
    source = str(Path(args.task).resolve()) if Path(args.task).suffix.lower() in {".yaml", ".yml", ".json"} \
        else args.task
    backbone = load_model(args.model, device=args.device)
    options = {"nprobe": args.nprobe} if args.nprobe is not None else {}
    config = BuildConfig(train_limit=args.train_limit, batch_size=args.batch_size, encoder=args.encoder,
                         store=args.store, store_options=options)
    db = build_database(backbone, task, args.out, config, overwrite=args.overwrite, task_source=source)
    c = db.manifest["counts"]
    print(f"built {args.out}: {c['examples']} training examples of {task.name}, {c['entries']} exit entries, "
          f"{c['never_correct']} never correct at any layer; full-model training accuracy "
          f"{c['full_model_train_accuracy']:.3f}")
    return 0


def _eval(args) -> int:
    from exitwise.raee.evaluate import EvalConfig, evaluate, format_report, plot_report
    from exitwise.raee.pipeline import RAEE

    raee = RAEE.open(args.db, model=args.model, device=args.device, data_dir=args.data_dir,
                     config=_raee_config(args), space=_space(args))
    if args.nprobe is not None:
        if not hasattr(raee.db.store, "nprobe"):
            raise ValueError(f"--nprobe applies to the ivfpq store; this database uses {raee.db.store.kind!r}")
        raee.db.store.nprobe = args.nprobe
    report = evaluate(raee, EvalConfig(test_limit=args.test_limit))
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
    from exitwise.errors import DataError
    from exitwise.raee.tasks import iter_jsonl

    texts = []
    for where, obj in iter_jsonl(path):
        text = obj.get("text") if isinstance(obj, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{where}: field 'text' must be a non-empty string")
        texts.append(text)
    return texts


def _classify(args) -> int:
    from exitwise.raee.pipeline import RAEE

    texts = list(args.texts) + (_read_inputs(args.input) if args.input else [])
    if not texts:
        print("exitwise: error: give TEXT arguments or --input FILE.jsonl", file=sys.stderr)
        return 2
    raee = RAEE.open(args.db, model=args.model, device=args.device, data_dir=args.data_dir,
                     config=_raee_config(args), space=_space(args))
    for p in raee.classify(texts):
        if args.json:
            print(json.dumps({"text": p.text, "label": p.label, "label_index": p.label_index,
                              "exit_layer": p.exit_layer, "confidence": round(p.confidence, 4)}))
        else:
            print(f"{p.label}\tlayer {p.exit_layer}/{raee.backbone.num_layers}\t{p.confidence:.3f}\t{p.text}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    raee = sub.add_parser("raee", help="retrieval-augmented early exiting (build / eval)")
    actions = raee.add_subparsers(dest="raee_command", required=True, metavar="ACTION")

    b = actions.add_parser("build", help="build a retrieval database from a task's training split")
    b.add_argument("--model", required=True, help="bundled name (smollm2-135m, gemma3-270m), path, .gguf or hub id")
    b.add_argument("--task", required=True, help="built-in task name (e.g. sst2, trec) or a task file (.yaml/.json)")
    b.add_argument("--out", required=True, help="database directory to create")
    b.add_argument("--train-limit", type=int, default=None, help="use the first N training examples (default: all)")
    b.add_argument("--batch-size", type=int, default=8)
    b.add_argument("--encoder", default="minilm", help="minilm (default), an encoder path/hub id, or backbone:<layer>")
    b.add_argument("--store", default="flat", choices=["flat", "ivfpq"],
                   help="flat = exact search (default); ivfpq = the paper's IVF{8sqrt(N)}_HNSW32,PQ64")
    b.add_argument("--nprobe", type=int, default=None, help="IVF probes (ivfpq only)")
    b.add_argument("--overwrite", action="store_true", help="replace an existing database")
    _add_model_args(b)
    b.set_defaults(handler=_build)

    e = actions.add_parser("eval", help="full model vs RAEE vs oracle vs fixed layer vs kNN on the test split")
    e.add_argument("--db", required=True)
    e.add_argument("--model", default=None, help="default: the model the database was built with")
    e.add_argument("--test-limit", type=int, default=None, help="use the first N test examples (default: all)")
    e.add_argument("--json", default=None, help="write the report as JSON here")
    e.add_argument("--plot", default=None, help="write exit-layer histogram and per-layer accuracy (PNG) here")
    _add_raee_args(e)
    _add_model_args(e)
    e.set_defaults(handler=_eval)

    c = sub.add_parser("classify", help="classify texts with a RAEE database (label, exit layer, confidence)")
    c.add_argument("texts", nargs="*", metavar="TEXT")
    c.add_argument("--db", required=True)
    c.add_argument("--input", default=None, help="jsonl file with a 'text' field per line")
    c.add_argument("--model", default=None, help="default: the model the database was built with")
    c.add_argument("--json", action="store_true", help="one JSON object per line")
    _add_raee_args(c)
    _add_model_args(c)
    c.set_defaults(handler=_classify)
