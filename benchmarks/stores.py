"""Vector stores side by side on synthetic RAEE-like keys: FAISS flat (exact), FAISS IVF-PQ and LanceDB
(IVF-PQ on disk): build time, query latency at k = 12 (one query, and a batch of 64), recall@12 against
exact search over the same keys, resident memory added by the build, and bytes on disk.

Keys are a seeded Gaussian mixture (clusters, as hidden states are), 576-dimensional (SmolLM2-135M's
width). Queries are drawn from the same mixture. Writes JSON and prints a table.

    python benchmarks/stores.py            # 10^5 and 10^6 rows
    python benchmarks/stores.py --quick    # 10^4 and 10^5
    python benchmarks/stores.py --rows 1000000 --out benchmarks/results/stores/stores_1m.json
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from exitwise.raee.retrieval import make_store

K = 12
RESULTS = Path(__file__).resolve().parent / "results" / "stores"


def mixture(n: int, dim: int, seed: int, centers: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(seed)
    which = rng.integers(0, len(centers), n)
    return (centers[which] + rng.standard_normal((n, dim), dtype=np.float32) * 0.5).astype(np.float32)


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def latency_ms(store, queries: np.ndarray, batch: int, repeats: int) -> float:
    times = []
    for r in range(repeats):
        q = queries[(r * batch) % len(queries):][:batch]
        t = time.perf_counter()
        store.search(q, K)
        times.append((time.perf_counter() - t) * 1e3)
    return float(np.median(times))


def run_one(kind: str, n: int, dim: int, centers: np.ndarray, queries: np.ndarray, exact: np.ndarray | None,
            workdir: Path) -> tuple[dict, np.ndarray]:
    before = rss_mb()
    t = time.perf_counter()
    store = make_store(kind, dim, n)
    chunk = 50_000  # keys arrive in chunks, as a build streams them
    for start in range(0, n, chunk):
        store.add(mixture(min(chunk, n - start), dim, 1000 + start, centers))
    store.save(workdir / f"{kind}-{n}")
    build_s = time.perf_counter() - t
    _, ids = store.search(queries, K)
    recall = 1.0 if exact is None else float(np.mean([len(set(a) & set(b)) / K for a, b in zip(ids, exact,
                                                                                              strict=True)]))
    row = {"store": kind, "rows": n, "build_s": round(build_s, 2),
           "query_ms_b1": round(latency_ms(store, queries, 1, 50), 3),
           "query_ms_b64": round(latency_ms(store, queries, 64, 5), 2),
           f"recall@{K}": round(recall, 4), "peak_rss_added_mb": round(rss_mb() - before, 1),
           "disk_mb": round(disk_bytes(workdir / f"{kind}-{n}") / 2**20, 1)}
    return row, ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="10^4 and 10^5 rows")
    ap.add_argument("--dim", type=int, default=576)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--rows", type=int, nargs="+", default=None, help="store sizes to run (default: by --quick)")
    ap.add_argument("--out", type=Path, default=RESULTS / "stores.json")
    args = ap.parse_args()
    sizes = args.rows or ([10_000, 100_000] if args.quick else [100_000, 1_000_000])
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((256, args.dim), dtype=np.float32)
    queries = mixture(args.queries, args.dim, 7, centers)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            # flat first: its neighbours are the exact answer the others are scored against; peak RSS is
            # a process-wide high-water mark, so the disk store runs before the in-memory IVF-PQ
            flat, exact = run_one("flat", n, args.dim, centers, queries, None, Path(tmp))
            rows.append(flat)
            for kind in ("lancedb", "ivfpq"):
                rows.append(run_one(kind, n, args.dim, centers, queries, exact, Path(tmp))[0])
                print(rows[-1], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"dim": args.dim, "k": K, "queries": args.queries, "rows": rows}, indent=1))
    cols = list(rows[0])
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(str(r[c]) for c in cols))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
