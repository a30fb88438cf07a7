"""Ray Data pipelines for RAEE (raee/distributed.py) on a local two-CPU Ray: ``raee build --ray`` and
``classify --ray`` give what the single-process commands give, a worker that dies once is retried, one
that always dies fails the build cleanly. Small samples: about two minutes on a 2-core machine."""

import json
import shutil
import sys
import tempfile

import numpy as np
import pytest

from exitwise.cli import main

ray = pytest.importorskip("ray", reason="needs ray (pip install 'exitwise[ray]')")

pytestmark = pytest.mark.real_model

TRAIN, TEST = "12", "6"
# what legitimately differs between two eval runs of equal databases: wall-clock times
TIMING_KEYS = {"seconds", "seconds_encode", "seconds_retrieve", "seconds_forward", "key_share", "speedup",
               "measured_speedup", "build_seconds",
               # which frontier points dominate depends on the MiniLM vote's measured speed-up
               "dominated_by", "dominant", "raee_dominated_by"}


@pytest.fixture(scope="module")
def crash_dir(tmp_path_factory):
    """A local Ray on loopback for this module; the directory its workers look in for crash orders."""
    from exitwise.raee.distributed import CRASH_DIR_ENV

    crash = tmp_path_factory.mktemp("crash")
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=temp, _node_ip_address="127.0.0.1",
             runtime_env={"env_vars": {CRASH_DIR_ENV: str(crash)}})
    yield crash
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


def _build(out, data_dir, *extra) -> int:
    return main(["raee", "build", "--model", "smollm2-135m", "--task", "sst2", "--out", str(out), "--train-limit",
                 TRAIN, "--data-dir", str(data_dir), *extra])


@pytest.fixture(scope="module")
def single_db(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("single") / "sst2.db"
    assert _build(out, data_dir) == 0
    return out


def _assert_same_database(a_path, b_path):
    """Every data file byte for byte (the manifests differ in times and the build record only)."""
    from exitwise.raee.database import Database

    a, b = Database.load(a_path), Database.load(b_path)
    assert a.manifest["counts"] == b.manifest["counts"]
    assert a.manifest["checksums"] == b.manifest["checksums"]
    files = sorted(p.relative_to(a_path) for p in a_path.rglob("*") if p.is_file() and p.name != "manifest.json")
    assert {"exit_table.npz", "layer_probs.npy"} <= {p.as_posix() for p in files}
    assert [p for p in files if (a_path / p).read_bytes() != (b_path / p).read_bytes()] == []
    assert a.manifest["reproducibility"] == b.manifest["reproducibility"]
    return a, b


def _untimed(report):
    if isinstance(report, dict):
        return {k: _untimed(v) for k, v in report.items() if k not in TIMING_KEYS}
    if isinstance(report, list):
        return [_untimed(v) for v in report]
    return report


def test_ray_build_equals_the_single_process_build_with_a_worker_killed_once(tmp_path, data_dir, single_db,
                                                                               crash_dir, smollm):
    """One worker dies on its first unit (and is restarted, the unit retried): the database is still
    the single-process one. (One build for both claims: each Ray build here costs half a minute.)"""
    from exitwise.raee.pipeline import RAEE
    from exitwise.raee.tasks import load_task

    out = tmp_path / "ray.db"
    (crash_dir / "once").touch()
    try:
        assert _build(out, data_dir, "--ray", "--workers", "2") == 0
        assert (crash_dir / "once.claimed").exists() and not (crash_dir / "once").exists()  # a worker did die
    finally:
        for name in ("once", "once.claimed"):
            (crash_dir / name).unlink(missing_ok=True)
    one, distributed = _assert_same_database(single_db, out)
    assert distributed.manifest["build"]["ray"]["workers"] == 2
    assert distributed.manifest["build"]["ray"]["address"] is None and "ray" not in one.manifest["build"]
    # the same neighbours for every test query (flat store: exact search)
    task = load_task("sst2", data_dir=data_dir)
    texts = [e.text for e in task.load_split("test", int(TEST), 0)]
    keys = RAEE(smollm, one, task).keys(texts)
    (d1, i1), (d2, i2) = one.store.search(keys, 12), distributed.store.search(keys, 12)
    assert np.array_equal(i1, i2) and np.array_equal(d1, d2)
    # and the same eval report, up to its wall-clock fields
    reports = []
    for db in (single_db, out):
        path = tmp_path / f"{db.name}.json"
        assert main(["raee", "eval", "--db", str(db), "--test-limit", TEST, "--data-dir", str(data_dir),
                     "--json", str(path)]) == 0
        reports.append(json.loads(path.read_text()))
    assert _untimed(reports[0]) == _untimed(reports[1])


def test_a_worker_that_always_dies_fails_the_build_and_writes_nothing(tmp_path, data_dir, crash_dir, smollm):
    from exitwise.raee.database import BuildConfig
    from exitwise.raee.distributed import DistributedError, RayConfig, build_database_on_ray
    from exitwise.raee.tasks import load_task

    (crash_dir / "always").touch()
    out = tmp_path / "ray.db"
    try:
        with pytest.raises(DistributedError, match="the all-layer pass on Ray failed .*restarted at most 1 times"):
            build_database_on_ray(smollm, "smollm2-135m", load_task("sst2", data_dir=data_dir), out,
                                  BuildConfig(train_limit=6, progress=False), RayConfig(workers=1, max_restarts=1))
    finally:
        (crash_dir / "always").unlink()
    assert list(tmp_path.iterdir()) == []  # no database, no building directory


def test_ray_classify_writes_the_predictions_of_plain_classify_in_order(tmp_path, data_dir, single_db, crash_dir):
    from exitwise.models.spec import ModelSpec
    from exitwise.raee.distributed import RayConfig, classify_file_on_ray
    from exitwise.raee.pipeline import RAEESpec
    from exitwise.raee.tasks import load_task

    texts = [e.text for e in load_task("sst2", data_dir=data_dir).load_split("test", 6, 1)]
    inputs = tmp_path / "in.jsonl"
    inputs.write_text("".join(json.dumps({"text": t, "id": i}) + ("\n\n" if i == 3 else "\n")
                              for i, t in enumerate(texts)))
    plain = tmp_path / "plain.jsonl"
    assert main(["classify", "--db", str(single_db), "--input", str(inputs), "--output", str(plain),
                 "--data-dir", str(data_dir)]) == 0
    out = tmp_path / "sub" / "ray.jsonl"
    # chunks of 2 texts: three units over two workers, written back in input order
    spec = RAEESpec(str(single_db), model=ModelSpec(name=None), data_dir=str(data_dir))  # the CLI's defaults
    n = classify_file_on_ray(spec, inputs, out, RayConfig(workers=2), chunk_size=2, progress=False)
    assert n == len(texts)
    a = [json.loads(line) for line in plain.read_text().splitlines()]
    b = [json.loads(line) for line in out.read_text().splitlines()]
    assert [x["text"] for x in b] == texts == [x["text"] for x in a]
    # label, exit layer and confidence alike: batches never pad, and a row's arithmetic does not depend
    # on its batch (chunks of 2 here, batches of 8 without Ray) or the thread count (raee/repro.py)
    assert a == b
    assert sorted(p.name for p in out.parent.iterdir()) == ["ray.jsonl"]  # no temporary file left


def test_ray_classify_input_errors_name_file_and_line(tmp_path, single_db, capsys):
    bad = tmp_path / "in.jsonl"
    bad.write_text('{"text": "fine"}\n\n{"label": 1}\n')
    out = tmp_path / "out.jsonl"
    assert main(["classify", "--db", str(single_db), "--input", str(bad), "--output", str(out), "--ray"]) == 2
    assert f"{bad}:3: field 'text' must be a non-empty string" in capsys.readouterr().err
    assert main(["classify", "--db", str(single_db), "--ray", "some text"]) == 2
    assert "classify --ray reads --input" in capsys.readouterr().err
    assert not out.exists()


def test_ray_flag_without_ray_says_how_to_install_it(tmp_path, data_dir, monkeypatch, capsys):
    for name in ("ray", "ray.data"):
        monkeypatch.setitem(sys.modules, name, None)  # `import ray` now fails as if it were not installed
    out = tmp_path / "db"
    assert _build(out, data_dir, "--ray") == 2
    err = capsys.readouterr().err
    assert "pip install 'exitwise[ray]'" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
