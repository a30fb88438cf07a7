"""Issue 9, section 2, as tests: the CLI and its files lose nothing, and every bad file is one line.

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
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

import exitwise.models.loading as loading
from exitwise.artifacts import check_model, sha256_file
from exitwise.cli import main
from exitwise.errors import DataError, IncompatibleError
from exitwise.exits.classifier import ExitClassifier
from exitwise.heads.model import ExitHeads
from exitwise.models.backbone import Backbone
from exitwise.raee.database import BuildConfig, build_database
from exitwise.raee.tasks import load_task

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
    _, where = loading.resolve("smollm2-135m")
    return AutoTokenizer.from_pretrained(where)


@pytest.fixture(scope="module")
def tiny(tokenizer):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return Backbone(AutoModelForCausalLM.from_config(cfg, dtype=torch.float32), tokenizer, name="tiny-llama")


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


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny):
    """A complete database of the tiny model (built once; tests work on copies)."""
    root = tmp_path_factory.mktemp("built")
    task_file = write_task(root)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # few examples per class for k=12
        build_database(tiny, load_task(task_file), root / "db", config(), task_source=str(task_file))
    return root / "db"


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


# ---------------------------------------------------------------------------------- heads files
def tiny_plain(layers: int = 6, name: str = "tiny") -> Backbone:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return Backbone(AutoModelForCausalLM.from_config(cfg), tokenizer=None, name=name)


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


# ------------------------------------------------------------------------- names that print alike
def test_models_whose_names_print_alike_are_told_apart_by_fingerprint(bb):
    stored = {"name": bb.name, "model_type": "llama", "num_layers": 6, "hidden_size": 32, "vocab_size": 98}
    with pytest.raises(IncompatibleError) as e:
        check_model(stored, bb, "heads h.json")
    msg = str(e.value)
    assert msg.count(f"'{bb.name}'") == 2 and "vocab_size: 98 vs 97" in msg
    a, b = (part.split(")")[0] for part in msg.split("fingerprint ")[1:3])
    assert a != b and len(a) == len(b) == 8
