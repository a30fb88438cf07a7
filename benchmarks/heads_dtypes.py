"""Exit heads' calibration per weight dtype: the same heads calibrated and tested on the model loaded
at each dtype (the heads' own matmuls follow it: int8 for int8 and int4 models), side by side.

Each dtype calibrates a copy of ``--heads`` (calibration writes thresholds into the heads' file) on
``--text`` and evaluates on ``--test`` with the same token budget, then reports per-head agreement
with the final layer, the oracle, and for each alpha the agreement and coverage the max-coverage
thresholds reach on the test text. Writes JSON and prints a table.

    .venv/bin/python benchmarks/heads_dtypes.py --heads runs/heads9 \
        --out benchmarks/results/heads_dtypes/heads_dtypes.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATA, ROOT  # noqa: E402
from exitwise.cli.model_args import add_model_args  # noqa: E402
from exitwise.models.spec import ModelSpec  # noqa: E402


def summarise(report: dict, alphas: list[float]) -> dict:
    """Mean per-head test agreement, the oracle, and per alpha the test agreement where the heads fire
    (pooled over heads, weighted by how often each fires) and the heads' mean coverage (each head's
    share of test tokens on which it would fire, counted per head)."""
    heads = report["heads"]
    out = {"head_agreement_test": sum(h["agreement_test"] for h in heads) / len(heads),
           "oracle_any_head_test": report["oracle"]["test"]["any_head_agrees"], "alphas": {}}
    for a in alphas:
        rows = [t for t in report["thresholds"] if t["mode"] == "max_coverage" and t["alpha"] == a
                and t.get("test") and t["test"].get("agreement") is not None]
        fired = sum(t["test"]["fired"] for t in rows)
        agree = sum(t["test"]["fired"] * t["test"]["agreement"] for t in rows) / fired if fired else None
        coverage = sum(t["test"]["coverage"] for t in rows) / len(rows) if rows else 0.0
        out["alphas"][str(a)] = {"agreement_test": agree, "fired_test": fired, "head_coverage_mean": coverage}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--heads", required=True, help="a trained heads stem (e.g. runs/heads9)")
    add_model_args(ap, None, default_help="the one named in the heads' JSON", dtype=None)  # dtypes: --dtypes
    ap.add_argument("--dtypes", nargs="+", default=["float32", "int8", "int4"])
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.8, 0.9, 0.95])
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "heads_dtypes" / "heads_dtypes.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from exitwise.heads.calibrate import calibrate_heads
    from exitwise.heads.model import paths

    stem = Path(args.heads)
    result = {"heads": str(stem), "max_tokens": args.max_tokens, "text": "text/valid.txt", "test": "text/test.txt",
              "threads": args.threads, "dtypes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for d in args.dtypes:
            copy = Path(tmp) / f"heads-{d}"
            for src, dst in zip(paths(stem), paths(copy), strict=True):
                shutil.copyfile(src, dst)
            t = time.perf_counter()
            report = calibrate_heads(str(copy), str(DATA / "text" / "valid.txt"), args.alphas,
                                     test_path=str(DATA / "text" / "test.txt"), max_tokens=args.max_tokens,
                                     model=ModelSpec(args.model, dtype=d, device=args.device))
            result["dtypes"][d] = summarise(report, args.alphas) | {"seconds": time.perf_counter() - t}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    head = " | ".join(f"alpha {a}: agreement / mean head coverage" for a in args.alphas)
    print(f"| weights | per-head agreement | oracle | {head} |")
    print("|---|---:|---:|" + "---:|" * len(args.alphas))
    for d, r in result["dtypes"].items():
        cells = " | ".join(f"{c['agreement_test']:.3f} / {c['head_coverage_mean']:.1%}"
                           for c in (r["alphas"][str(a)] for a in args.alphas))
        print(f"| {d} | {r['head_agreement_test']:.3f} | {r['oracle_any_head_test']:.3f} | {cells} |")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
