"""Ray Data pipelines for RAEE: the all-layer pass of ``raee build`` and batch ``classify`` on a pool of workers.

Both pipelines have one shape: ``ray.data.from_items`` over small work units made on the driver ->
``map_batches`` with an actor class (``concurrency`` = the number of workers), each actor loading the
model (or opening the RAEE) once -> results streamed back to the driver with ``iter_batches``.

* **build**: a work unit is one batch of the single-process pass (:func:`layerwise.batch_plan`: the same
  rows, of one length), and every worker reuses the split's common prompt prefix, prefilled once per
  worker. A row's states do not depend on its batch or the thread count (``repro.py``), so each worker
  computes bit for bit what the single-process pass computes for those rows (an identical database;
  tested). The (N, L+1, D) states come back with their row
  indices, are put in example order on the driver and go to :func:`database.build_database`, which writes
  the database as without Ray. The model is replicated on every worker; the training rows are sharded.
* **classify**: a work unit is a chunk of lines of the input file (where it starts and how many texts it
  holds), found by one streaming pass on the driver that also checks every line, so an input error names
  its file and line before any worker starts. Workers read their chunks from the file themselves (on a
  multi-node cluster it must be visible to every node); predictions are written to the output as they
  arrive, in input order (Ray Data's ``preserve_order``, and the driver reorders chunks if needed).

A worker that dies is restarted (``max_restarts``) and its unit retried; once the restarts are spent
the command fails with :class:`DistributedError` and writes nothing (no database, no output file).
Ray is imported only here and only when called: it is the optional extra ``exitwise[ray]``.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from exitwise.artifacts import one_line, write_lines
from exitwise.errors import DataError, ExitwiseError
from exitwise.models.backbone import Backbone
from exitwise.raee.database import BuildConfig, Database, build_database, check_classes
from exitwise.raee.layerwise import batch_plan, shared_prefix_ids
from exitwise.raee.pipeline import RAEESpec, input_text
from exitwise.raee.readouts.base import pool_start
from exitwise.raee.tasks import Task, jsonl_line, open_jsonl

INSTALL_HINT = "pip install 'exitwise[ray]'"
# Fault injection for tests: a worker about to run a unit exits at once if this directory holds a file
# ``always``, or if it is the one worker that claims (renames) a file ``once``.
CRASH_DIR_ENV = "EXITWISE_RAY_CRASH_DIR"


class DistributedError(ExitwiseError):
    """A Ray pipeline failed (a worker died past its restarts, or the cluster is unusable)."""


@dataclass
class RayConfig:
    """Where and how wide a pipeline runs."""

    workers: int = 2  # actors, each with its own copy of the model
    address: str | None = None  # a running cluster ("auto", "ray://..."); None: a local Ray for this call
    max_restarts: int = 2  # per worker; the unit a dead worker held is retried on its restart
    threads: int = 1  # torch threads per worker

    def __post_init__(self) -> None:
        if self.workers < 1 or self.threads < 1 or self.max_restarts < 0:
            raise ValueError(f"workers and threads must be positive and max_restarts >= 0, got {self}")

    def describe(self) -> dict:
        return asdict(self)


def import_ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401  (the Data library is part of the extra, not of every ray install)
    except ImportError as exc:
        raise ExitwiseError(f"--ray needs Ray Data, which is not installed ({exc}); {INSTALL_HINT}") from None
    return ray


@contextmanager
def ray_session(cluster: RayConfig) -> Iterator[Any]:
    """The ``ray`` module, connected: to the Ray this process already runs (left running), else to
    ``cluster.address``, else to a fresh local instance with room for the workers (shut down after)."""
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    local = cluster.address is None
    options = {"num_cpus": max(cluster.workers, os.cpu_count() or 1)} if local else {}
    try:
        ray.init(address="local" if local else cluster.address, include_dashboard=False, **options)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise DistributedError(f"cannot start or reach Ray at {cluster.address or 'a local instance'}: "
                               f"{one_line(exc)}") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def _actor_pool(ds: Any, worker: type, kwargs: dict, cluster: RayConfig) -> Any:
    """``ds.map_batches`` on a fixed pool of ``cluster.workers`` actors of ``worker``, one unit per call."""
    import ray

    with warnings.catch_warnings():
        # Ray 2.60 names no parameter for restarts and deprecates passing them as remote args; its own
        # default (restart forever) would turn a worker that always dies into a build that never ends.
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        return ds.map_batches(worker, fn_constructor_kwargs=kwargs, batch_size=1, batch_format="numpy",
                              compute=ray.data.ActorPoolStrategy(size=cluster.workers), num_cpus=1,
                              max_restarts=cluster.max_restarts, max_task_retries=cluster.max_restarts)


def _maybe_crash() -> None:
    root = os.environ.get(CRASH_DIR_ENV)
    if not root:
        return
    if os.path.exists(os.path.join(root, "always")):
        os._exit(1)
    try:
        os.rename(os.path.join(root, "once"), os.path.join(root, "once.claimed"))  # atomic: one worker wins
    except FileNotFoundError:
        return
    os._exit(1)


def _collect(batches: Iterator[dict], what: str, cluster: RayConfig) -> Iterator[dict]:
    """``iter_batches``, with a failed pipeline turned into one clear error."""
    try:
        yield from batches
    except (KeyboardInterrupt, GeneratorExit):
        raise
    except Exception as exc:  # Ray wraps what happened on a worker in its own exception types
        raise DistributedError(f"{what} on Ray failed ({type(exc).__name__}: {one_line(exc)}); a worker that "
                               f"dies is restarted at most {cluster.max_restarts} times") from exc


# ------------------------------------------------------------------------------------------- build
class _StatesWorker:
    """A Ray actor: the model, loaded once, and the pass's shared prefix, prefilled once."""

    def __init__(self, model: str, device: str, dtype: str, prefix_ids: list[int], threads: int,
                 pool_from: int | None):
        from exitwise.models.loading import load_model

        torch.set_num_threads(threads)
        self.backbone = load_model(model, device=device, dtype=dtype)
        self.prefix = self.backbone.prefill(prefix_ids) if prefix_ids else None
        self.pool_from = pool_from

    def __call__(self, unit: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from exitwise.raee.layerwise import last_token_states

        _maybe_crash()
        rows = unit["rows"][0].astype(np.int64)
        flat, lengths = unit["tokens"][0].tolist(), unit["lengths"][0].tolist()
        starts = np.concatenate([[0], np.cumsum(lengths)]).tolist()
        token_ids = [flat[a:b] for a, b in zip(starts[:-1], starts[1:], strict=True)]
        states = last_token_states(self.backbone, token_ids, batch_size=len(token_ids), prefix=self.prefix,
                                   pool_from=self.pool_from)
        return {"row": rows, "states": states.numpy()}


def last_token_states_on_ray(backbone: Backbone, model: str, token_ids: list[list[int]], batch_size: int,
                             cluster: RayConfig, device: str = "cpu", dtype: str = "float32",
                             progress: bool = True, desc: str = "layers (ray)", pool_from: int | None = None
                             ) -> torch.Tensor:
    """:func:`layerwise.last_token_states` of every prompt (pooled from ``pool_from`` on, if given),
    computed by ``cluster.workers`` Ray actors that each load ``model`` (``backbone`` is the driver's
    copy: it decides the prefix and the output shape)."""
    if not token_ids:
        raise ValueError("no prompts given")
    prefix = shared_prefix_ids(backbone, token_ids, limit=pool_from)
    units = [{"rows": rows, "tokens": np.concatenate([token_ids[i] for i in rows]),
              "lengths": np.array([len(token_ids[i]) for i in rows])} for rows in batch_plan(token_ids, batch_size)]
    out = torch.zeros(len(token_ids), backbone.num_layers + 1, backbone.hidden_size * (1 if pool_from is None else 2))
    done = np.zeros(len(token_ids), dtype=bool)
    with ray_session(cluster) as ray:
        ds = _actor_pool(ray.data.from_items(units), _StatesWorker,
                         {"model": model, "device": device, "dtype": dtype, "prefix_ids": prefix,
                          "threads": cluster.threads, "pool_from": pool_from}, cluster)
        ds.context.enable_progress_bars = False  # ours below counts examples
        with tqdm(total=len(token_ids), desc=desc, unit="ex", disable=not progress) as bar:
            for batch in _collect(ds.iter_batches(batch_size=None, batch_format="numpy"), "the all-layer pass",
                                  cluster):
                out[torch.as_tensor(batch["row"])] = torch.tensor(batch["states"])  # a copy: Ray's is read-only
                done[batch["row"]] = True
                bar.update(len(batch["row"]))
    if not done.all():  # Ray Data lost a unit without saying so: never build from zeros
        raise DistributedError(f"the all-layer pass on Ray returned {int(done.sum())} of {len(done)} examples")
    return out


def build_database_on_ray(backbone: Backbone, model: str, task: Task, out: str | Path, config: BuildConfig,
                          cluster: RayConfig, device: str = "cpu", dtype: str = "float32", overwrite: bool = False,
                          task_source: str | None = None) -> Database:
    """:func:`database.build_database` with its all-layer pass over the training split run on Ray.

    The manifest's ``build.ray`` records the workers, the address and the seconds the pass took."""
    from exitwise.raee import outdir

    outdir.prepare(Path(out), overwrite)  # refuse a target before any worker starts
    examples = task.load_split("train", config.train_limit, config.seed)
    if not examples:
        raise DataError(f"task {task.name!r}: the training split is empty")
    check_classes(task, np.array([e.label for e in examples]), config, warn=False)  # before the pass, not after
    token_ids = task.encode([e.text for e in examples], backbone.tokenizer)
    t0 = time.perf_counter()
    pool_from = pool_start([config.readout], task, backbone.tokenizer)
    states = last_token_states_on_ray(backbone, model, token_ids, config.batch_size, cluster, device, dtype,
                                      progress=config.progress, desc=f"{task.name} layers (ray)",
                                      pool_from=pool_from)
    info = {**cluster.describe(), "seconds": round(time.perf_counter() - t0, 3)}
    return build_database(backbone, task, out, config, overwrite=overwrite, task_source=task_source,
                          states=states, build_info={"ray": info})


# ---------------------------------------------------------------------------------------- classify
def scan_input(path: Path, chunk_size: int) -> tuple[list[dict], int]:
    """Check every line of a classify input file (an error names file and line) and cut it into chunks
    of ``chunk_size`` texts: where each starts (a seek position and its line number) and its size.
    Streams the file: memory grows with the number of chunks, not of lines."""
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    chunks: list[dict] = []
    total, lineno = 0, 0
    with open_jsonl(path) as f:
        while True:
            pos = f.tell()  # readline, not iteration: tell() is allowed between readline calls
            line = f.readline()
            if not line:
                break
            lineno += 1
            for where, value in jsonl_line(path, lineno, line):
                input_text(where, value)
                if total % chunk_size == 0:
                    chunks.append({"chunk": len(chunks), "pos": str(pos), "line": lineno, "count": 0})
                chunks[-1]["count"] += 1
                total += 1
    return chunks, total


def read_chunk(path: Path, pos: str, lineno: int, count: int) -> list[str]:
    """The ``count`` texts of a chunk that :func:`scan_input` found at ``pos`` (line ``lineno``)."""
    texts: list[str] = []
    with open_jsonl(path) as f:
        f.seek(int(pos))  # a text-file position is an opaque int; str kept it exact through Arrow
        while len(texts) < count:
            line = f.readline()
            if not line:
                raise DataError(f"{path}: the file changed while it was being classified")
            texts += [input_text(where, value) for where, value in jsonl_line(path, lineno, line)]
            lineno += 1
    return texts


class _ClassifyWorker:
    """A Ray actor: one RAEE (model, database, task), opened once."""

    def __init__(self, spec: RAEESpec, path: str, threads: int):
        torch.set_num_threads(threads)
        self.raee = spec.open()
        self.path = Path(path)

    def __call__(self, unit: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        _maybe_crash()
        texts = read_chunk(self.path, str(unit["pos"][0]), int(unit["line"][0]), int(unit["count"][0]))
        lines = [json.dumps(p.as_json()) for p in self.raee.classify(texts)]
        return {"chunk": np.full(len(lines), int(unit["chunk"][0])), "line": np.array(lines, dtype=object)}


def _in_order(batches: Iterator[dict], counts: list[int]) -> Iterator[str]:
    """Output lines chunk by chunk in input order, however the batches arrive."""
    pending: dict[int, list[str]] = {}
    nxt = 0
    for batch in batches:
        for chunk, line in zip(batch["chunk"].tolist(), batch["line"].tolist(), strict=True):
            pending.setdefault(chunk, []).append(line)
        while nxt < len(counts) and len(pending.get(nxt, ())) == counts[nxt]:
            yield from pending.pop(nxt)
            nxt += 1
    if nxt < len(counts):
        raise DistributedError(f"classify on Ray returned {nxt} of {len(counts)} chunks of the input")


def classify_file_on_ray(spec: RAEESpec, path: str | Path, output: str | Path, cluster: RayConfig,
                         chunk_size: int = 64, progress: bool = True) -> int:
    """Classify every text of a jsonl file (a ``text`` field per line) on Ray workers and write one JSON
    object per line to ``output`` (as ``classify --json`` prints them), in input order, as they come.

    ``output`` appears only when complete. Returns the number of texts."""
    path, output = Path(path), Path(output)
    chunks, total = scan_input(path, chunk_size)
    if not chunks:
        return write_lines([], output)
    with ray_session(cluster) as ray:
        ds = _actor_pool(ray.data.from_items(chunks), _ClassifyWorker,
                         {"spec": spec, "path": str(path.resolve()), "threads": cluster.threads}, cluster)
        ds.context.execution_options.preserve_order = True
        ds.context.enable_progress_bars = False  # ours below counts texts
        with tqdm(total=total, desc="classify (ray)", unit="text", disable=not progress) as bar:
            batches = _collect(ds.iter_batches(batch_size=None, batch_format="numpy"), "classify", cluster)
            return write_lines(_counted(_in_order(batches, [c["count"] for c in chunks]), bar), output)


def _counted(lines: Iterator[str], bar: tqdm) -> Iterator[str]:
    for line in lines:
        bar.update(1)
        yield line
