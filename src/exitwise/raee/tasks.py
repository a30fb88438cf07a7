"""Classification tasks: data files, prompt templates and label words.

RAEE (docs/papers.md, "RAEE") turns every layer of a causal LM into a zero-training classifier by reading the
next-token distribution at the last prompt token, restricted to one *label word* per class. A ``Task``
holds everything that decides those predictions, so two runs with equal :meth:`Task.fingerprint` see
the same prompts and label tokens.

Conventions
-----------
* **Label words** are stored exactly as the continuation appears right after the prompt. For a plain
  template ending in a non-space character (``"...\\nSentiment:"``) that is ``" positive"`` with the
  leading space, because BPE tokenizers fold the space into the word token (``Ġpositive``). For a chat
  prompt the answer begins the assistant turn (after ``"<|im_start|>assistant\\n"``), so the word has no
  leading space. User task files give bare words; :func:`attach_space` adds or removes the space by the
  same rule (see there).
* **Templates** contain ``{text}`` exactly once and should not end in a space: a trailing space becomes
  its own token, which is not how the model saw ``": positive"`` in pretraining.
* **Demonstrations** are rendered with the same template followed by the gold label word (with a space
  if the template does not end in whitespace, also in chat mode, so demos read naturally) and joined to
  the optional instruction and the query by :data:`SEPARATOR`.
* **Chat**: the whole rendered prompt (instruction, demonstrations, query) is one user turn, formatted
  with ``tokenizer.apply_chat_template(..., add_generation_prompt=True)``; the readout token is the
  last token of the assistant header.
* **Metrics**: ``accuracy`` for every task; tasks with ``metric="mcc"`` (CoLA) also report the Matthews
  correlation, as GLUE does.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import yaml

from exitwise.artifacts import check_line_utf8, decode_utf8, one_line
from exitwise.errors import DataError
from exitwise.models.backbone import common_prefix
from exitwise.paths import resolve_data_dir  # noqa: F401  (part of this module's API)

SEPARATOR = "\n\n"
METRICS = ("accuracy", "mcc")
SPLITS = ("train", "test")
DEFAULT_SEED = 0  # of the --train-limit / --test-limit samples; recorded in manifests and reports


class TaskError(DataError):
    """A task definition or data file is unusable; the message names the file/field to fix (a ValueError)."""


@dataclass(frozen=True)
class Example:
    text: str
    label: int


@dataclass
class Task:
    name: str
    labels: list[str]  # class names, index order
    label_words: list[str]  # one continuation per class, exactly as it follows the prompt (see module doc)
    template: str  # contains "{text}" exactly once
    demonstrations: list[Example] = field(default_factory=list)
    chat: bool = False
    instruction: str = ""  # optional prefix, separated from what follows by SEPARATOR
    metric: str = "accuracy"
    train_path: Path | None = None
    test_path: Path | None = None

    def __post_init__(self) -> None:
        self.labels = list(self.labels)
        self.label_words = list(self.label_words)
        self.demonstrations = [d if isinstance(d, Example) else Example(*d) for d in self.demonstrations]
        if self.template.count("{text}") != 1:
            raise TaskError(f"task {self.name!r}: template must contain '{{text}}' exactly once: {self.template!r}")
        if len(self.labels) < 2:
            raise TaskError(f"task {self.name!r}: needs at least two classes, got {self.labels}")
        if len(self.label_words) != len(self.labels):
            raise TaskError(f"task {self.name!r}: {len(self.label_words)} label words for {len(self.labels)} classes")
        if self.metric not in METRICS:
            raise TaskError(f"task {self.name!r}: metric must be one of {METRICS}, got {self.metric!r}")
        if self.metric == "mcc" and len(self.labels) != 2:
            raise TaskError(f"task {self.name!r}: metric 'mcc' needs exactly two classes")
        for d in self.demonstrations:
            if not 0 <= d.label < len(self.labels):
                raise TaskError(f"task {self.name!r}: demonstration label {d.label} outside 0..{len(self.labels) - 1}")

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    # ------------------------------------------------------------------------------------- prompts
    def render(self, text: str) -> str:
        """The template filled with ``text``. ``str.replace``, not ``format``: inputs contain braces."""
        return self.template.replace("{text}", text)

    def demo_answer(self, label: int) -> str:
        """The gold word appended to a demonstration: a space after a non-space template end."""
        word = self.label_words[label].strip()
        return word if self.template[-1:].isspace() else " " + word

    def body(self, text: str) -> str:
        """Instruction, demonstrations and query, before any chat formatting."""
        parts = [self.instruction] if self.instruction else []
        parts += [self.render(d.text) + self.demo_answer(d.label) for d in self.demonstrations]
        parts.append(self.render(text))
        return SEPARATOR.join(parts)

    def prompt(self, text: str, tokenizer: Any = None) -> str:
        """The full prompt string whose next token is the label word."""
        body = self.body(text)
        if not self.chat:
            return body
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise TaskError(f"task {self.name!r} uses a chat template but the tokenizer has none")
        return tokenizer.apply_chat_template([{"role": "user", "content": body}], tokenize=False,
                                             add_generation_prompt=True)

    def encode(self, texts: Sequence[str], tokenizer: Any) -> list[list[int]]:
        """Token ids of each prompt, unpadded.

        Plain prompts get the tokenizer's special tokens (e.g. Llama's BOS; SmolLM2 adds none). Chat
        templates usually write BOS themselves as text; adding it again would double it, so special
        tokens are added to a chat prompt only when it does not already start with the BOS token.
        """
        prompts = [self.prompt(t, tokenizer) for t in texts]
        add = True
        if self.chat:
            bos = getattr(tokenizer, "bos_token", None)
            add = bool(bos) and not all(p.startswith(bos) for p in prompts)
        enc = tokenizer(prompts, add_special_tokens=add)["input_ids"]
        eos = getattr(tokenizer, "eos_token_id", None)
        out = []
        for ids in enc:
            ids = list(ids)
            # A tokenizer that appends EOS would move the readout off the last prompt token.
            if not self.chat and eos is not None and len(ids) > 1 and ids[-1] == eos:
                ids = ids[:-1]
            out.append(ids)
        return out

    def prefix_ids(self, tokenizer: Any) -> list[int]:
        """The token ids every prompt of this task starts with (instruction, demonstrations): the
        task's fixed prefix, whatever the text, found as what two different texts' prompts share."""
        return common_prefix(self.encode(["0", "x"], tokenizer))

    def label_token_ids(self, tokenizer: Any) -> list[int]:
        """One vocabulary id per class: the label word's token (its first sub-token if it splits)."""
        ids: list[int] = []
        for cls, word in enumerate(self.label_words):
            toks = tokenizer.encode(word, add_special_tokens=False)
            if not toks:
                raise TaskError(f"task {self.name!r}: label word {word!r} (class {self.labels[cls]!r}) has no tokens")
            if len(toks) > 1:
                pieces = tokenizer.convert_ids_to_tokens(toks)
                warnings.warn(f"task {self.name!r}: label word {word!r} is {len(toks)} tokens {pieces}; "
                              f"using its first sub-token {pieces[0]!r}", stacklevel=2)
            if toks[0] in ids:
                other = ids.index(toks[0])
                raise TaskError(
                    f"task {self.name!r}: label words {self.label_words[other]!r} (class {self.labels[other]!r}) and "
                    f"{word!r} (class {self.labels[cls]!r}) share the first token "
                    f"{tokenizer.convert_ids_to_tokens([toks[0]])[0]!r}; choose words that differ in their first token")
            ids.append(toks[0])
        return ids

    # ---------------------------------------------------------------------------------------- data
    def load_split(self, split: str, limit: int | None = None, seed: int | None = DEFAULT_SEED) -> list[Example]:
        """Rows of the ``train`` or ``test`` file.

        ``limit`` draws a seeded sample of N rows, stratified by class (see :func:`stratified_sample`),
        because data files come sorted by label, date or source and their head is no sample.
        ``seed=None`` keeps the first N rows in file order instead (only for tests of file handling).
        """
        if split not in SPLITS:
            raise TaskError(f"split must be one of {SPLITS}, got {split!r}")
        path = self.train_path if split == "train" else self.test_path
        if path is None:
            raise TaskError(f"task {self.name!r} has no {split} file")
        if limit is not None and limit < 1:
            raise TaskError(f"--{split}-limit must be a positive number of examples, got {limit}")
        if seed is None:
            return read_jsonl(path, self.num_classes, limit=limit)
        rows = read_jsonl(path, self.num_classes)
        if limit is None or limit >= len(rows):
            return rows
        return [rows[i] for i in stratified_sample(np.array([e.label for e in rows]), limit, seed)]

    def fingerprint(self) -> dict:
        """Everything that changes the prompts or label tokens (for database manifests)."""
        return {
            "name": self.name,
            "labels": list(self.labels),
            "label_words": list(self.label_words),
            "template": self.template,
            "instruction": self.instruction,
            "separator": SEPARATOR,
            "demonstrations": [[d.text, d.label] for d in self.demonstrations],
            "chat": self.chat,
        }


# ------------------------------------------------------------------------------------------------- data
def iter_jsonl(path: str | Path) -> Iterator[tuple[str, object]]:
    """(``file:line``, parsed value) per non-blank line, parsed lazily (a caller that stops early never
    reads further); a missing file fails at once, bad JSON names file and line."""
    path = Path(path)
    if not path.is_file():
        raise TaskError(f"{path}: data file not found")
    return _jsonl_lines(path)


def _jsonl_lines(path: Path) -> Iterator[tuple[str, object]]:
    with open_jsonl(path) as f:
        for lineno, line in enumerate(f, start=1):
            yield from jsonl_line(path, lineno, line)


def open_jsonl(path: Path) -> TextIO:
    """The file opened as :func:`iter_jsonl` reads it (for a reader that seeks to a line it saw before)."""
    # surrogateescape: a byte that is not UTF-8 is reported with its line, not as a decoder error
    return path.open(encoding="utf-8", errors="surrogateescape")


def jsonl_line(path: Path, lineno: int, line: str) -> Iterator[tuple[str, object]]:
    """(``file:line``, parsed value) of one line of a jsonl file; nothing for a blank line."""
    where = f"{path}:{lineno}"
    if not check_line_utf8(line, where, TaskError).strip():
        return
    try:
        value = json.loads(line)
    except json.JSONDecodeError as e:
        raise TaskError(f"{where}: invalid JSON ({e.msg})") from None
    yield where, value


def stratified_sample(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Indices of a seeded sample of ``n`` rows whose class proportions follow ``labels``.

    Each class gets ``floor(n * share)`` rows (at least one while it has rows and ``n`` allows),
    the remainder goes to the largest fractional parts; rows inside a class are drawn uniformly.
    The indices come back in a seeded random order, never grouped by class.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * n / counts.sum()
    take = np.floor(quota).astype(np.int64)
    if n >= len(classes):
        take = np.maximum(take, 1)
    take = np.minimum(take, counts)
    for c in np.argsort(-(quota - np.floor(quota)), kind="stable"):
        if take.sum() >= n:
            break
        if take[c] < counts[c]:
            take[c] += 1
    while take.sum() > n:  # the minimum of one per class can overshoot a tiny n
        take[np.argmax(take)] -= 1
    picked = [rng.choice(np.flatnonzero(labels == c), size=t, replace=False)
              for c, t in zip(classes, take, strict=True)]
    return rng.permutation(np.concatenate(picked))


def read_jsonl(path: str | Path, num_classes: int, limit: int | None = None) -> list[Example]:
    """``{"text": str, "label": int}`` per line; blank lines skipped; errors name file and line."""
    if limit is not None and limit < 1:  # not "file is empty": the file was never read
        raise TaskError(f"{path}: limit must be a positive number of examples, got {limit}")
    out: list[Example] = []
    for where, row in iter_jsonl(path):
        if not isinstance(row, dict):
            raise TaskError(f"{where}: expected an object with 'text' and 'label'")
        for key in ("text", "label"):
            if key not in row:
                raise TaskError(f"{where}: missing field {key!r}")
        text, label = row["text"], row["label"]
        if not isinstance(text, str) or not text.strip():
            raise TaskError(f"{where}: 'text' must be a non-empty string")
        if isinstance(label, bool) or not isinstance(label, int):
            raise TaskError(f"{where}: 'label' must be an integer, got {label!r}")
        if not 0 <= label < num_classes:
            raise TaskError(f"{where}: label {label} out of range 0..{num_classes - 1}")
        out.append(Example(text, label))
        if limit is not None and len(out) >= limit:
            break  # before the next line is parsed: rows past the limit are never read
    if not out:
        raise TaskError(f"{path}: no examples (file is empty)")
    return out


# -------------------------------------------------------------------------------------------- metrics
def compute_metrics(preds: Sequence[int] | np.ndarray, golds: Sequence[int] | np.ndarray,
                    metric: str = "accuracy") -> dict[str, float]:
    """``{"accuracy": ...}``, plus ``"mcc"`` when ``metric == "mcc"``."""
    p, g = np.asarray(preds, dtype=np.int64), np.asarray(golds, dtype=np.int64)
    if p.shape != g.shape or p.ndim != 1:
        raise ValueError(f"preds and golds must be equal-length 1-D arrays, got {p.shape} and {g.shape}")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    out = {"accuracy": float((p == g).mean()) if len(g) else 0.0}
    if metric == "mcc":
        out["mcc"] = matthews_corrcoef(p, g)
    return out


def matthews_corrcoef(preds: np.ndarray, golds: np.ndarray) -> float:
    """Binary Matthews correlation (classes 0/1, 1 = positive); 0.0 when a marginal is empty."""
    p, g = np.asarray(preds) == 1, np.asarray(golds) == 1
    tp, tn = float(np.sum(p & g)), float(np.sum(~p & ~g))
    fp, fn = float(np.sum(p & ~g)), float(np.sum(~p & g))
    denom = (tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)
    return 0.0 if denom == 0 else float((tp * tn - fp * fn) / np.sqrt(denom))


# ---------------------------------------------------------------------------------------- built-ins
# Defaults chosen by benchmarks/prompt_search.py (SmolLM2-135M-Instruct): the best full-model score
# (accuracy; MCC for CoLA) among RAEE-style instruction, "Field: {text}\nQuestion:" with 0/1/2
# demonstrations per class and two or three label-word sets, and a chat-formatted instruction, on 160
# training rows disjoint from the demonstrations. Measurements: benchmarks/results/prompt_search/prompts.json.
# Demonstrations are short training sentences (seeded, balanced); ``demo_rows`` are their 0-based
# line numbers in <task>/train.jsonl (tests check they still match the data).
_BUILTINS: dict[str, dict[str, Any]] = {}  # keyed by the data directory name


def _builtin(dirname: str, labels: list[str], label_words: list[str], template: str, *,
             demonstrations: Sequence[tuple[str, int]] = (), demo_rows: Sequence[int] = (), instruction: str = "",
             chat: bool = False, metric: str = "accuracy") -> None:
    assert len(demo_rows) == len(demonstrations)
    _BUILTINS[dirname] = dict(labels=labels, label_words=label_words, template=template,
                              demonstrations=[Example(t, y) for t, y in demonstrations], demo_rows=list(demo_rows),
                              instruction=instruction, chat=chat, metric=metric)


SENTIMENT = ["negative", "positive"]
# " terrible"/" great" (LM-BFF's words) beat " negative"/" positive" with 4 demonstrations on SST-2 and
# CR, and with 2 on MPQA; MR preferred the plain words. Train acc: SST-2 .800, MR .831, CR .869, MPQA .819.
_builtin("SST-2", SENTIMENT, [" terrible", " great"], "Review: {text}\nSentiment:", demo_rows=[2043, 6820, 2794, 1913],
         demonstrations=[("the last scenes of the film are anguished , bitter and truthful .", 1),
                         ("there is n't one moment in the film that surprises or delights .", 0),
                         ("is it a comedy ?", 0),
                         ("it 's a talking head documentary , but a great one .", 1)])
_builtin("SST-5", ["very negative", "negative", "neutral", "positive", "very positive"],
         [" terrible", " bad", " neutral", " good", " great"], "Review: {text}\nSentiment:",
         demo_rows=[5917, 3052, 348, 6288, 8208],  # train acc .406 (chance .256)
         demonstrations=[("too daft by half ... but supremely good natured .", 3),
                         ("it 's quite another to feel physically caught up in the process .", 2),
                         ("woody allen can write and deliver a one liner as well as anybody .", 4),
                         ("there 's no energy .", 0),
                         ("it all comes down to whether you can tolerate leon barlow .", 1)])
_builtin("MR", SENTIMENT, [" negative", " positive"], "Review: {text}\nSentiment:", demo_rows=[682, 8102],
         demonstrations=[("mais um momento inspirado de david fincher .", 1),
                         ("contrived pastiche of caper clich\u00e9s .", 0)])
_builtin("CR", SENTIMENT, [" terrible", " great"], "Review: {text}\nSentiment:", demo_rows=[560, 1508, 530, 1745],
         demonstrations=[("i like the speak phone function a lot .", 1),
                         ("the pictures are a little dark sometimes .", 0),
                         ("the included earbuds were uncomfortable .", 0),
                         ("seriously , this thing has everything that a pro or expert amateur could want .", 1)])
_builtin("MPQA", SENTIMENT, [" terrible", " great"], "Phrase: {text}\nSentiment:", demo_rows=[4185, 7893],
         demonstrations=[("promised", 1), ("we will bury", 0)])
# " opinion"/" fact" beat " subjective"/" objective" at every shot count (.725 vs .475 with 2 demos).
_builtin("Subj", ["subjective", "objective"], [" opinion", " fact"], "Sentence: {text}\nType:", demo_rows=[1913, 6850],
         demonstrations=[("and what better place for romance than coney island ?", 1),
                         ("this gorgeous epic is guaranteed to lift the spirits of the whole family .", 0)])
# Everyday words for the six coarse types; train acc .500 (the RAEE words " Description".." Number": .431).
_builtin("TREC", ["description", "entity", "abbreviation", "human", "location", "number"],
         [" definition", " thing", " abbreviation", " person", " place", " number"], "Question: {text}\nAnswer type:",
         demo_rows=[2432, 5449, 3781, 773, 5433, 198],
         demonstrations=[("What is RCD ?", 2), ("What is the temperature today ?", 5),
                         ("What is the origin of `` barbeque '' ?", 0),
                         ("Who was the Democratic nominee in the American presidential election ?", 3),
                         ("What war added jeep and quisling to the English language ?", 1),
                         ("What countries have the largest areas of forest ?", 4)])
# Selected by MCC: every CoLA prompt here is near chance (best train MCC .13, accuracy .34); prompts
# with higher accuracy (.725) answer "acceptable" for everything (MCC 0).
_builtin("CoLA", ["unacceptable", "acceptable"], [" no", " yes"],
         "Sentence: {text}\nIs this sentence grammatical? Answer:", metric="mcc", demo_rows=[2739, 6398],
         demonstrations=[("Carmen bought a dress.", 1), ("Mary talked to any man or any woman.", 0)])


def _norm_name(name: str) -> str:
    return re.sub(r"[-_\s]", "", name).lower()


def builtin_task_names() -> list[str]:
    """Names of the built-in tasks, as their data directories are called."""
    return list(_BUILTINS)


def builtin_task(name: str, data_dir: str | Path | None = None) -> Task:
    """A built-in task; ``name`` ignores case, hyphens and underscores (``sst2``, ``SST-2``, ``sst_2``)."""
    by_norm = {_norm_name(k): k for k in _BUILTINS}
    key = by_norm.get(_norm_name(name))
    if key is None:
        raise TaskError(f"unknown task {name!r}; built-in tasks: {', '.join(_BUILTINS)} "
                        "(or pass a .yaml/.json task file)")
    spec = {k: (list(v) if isinstance(v, list) else v) for k, v in _BUILTINS[key].items() if k != "demo_rows"}
    root = resolve_data_dir(data_dir) / key
    task = Task(name=key, train_path=root / "train.jsonl", test_path=root / "test.jsonl", **spec)
    _check_labels_file(task, root / "labels.json")
    return task


def _check_labels_file(task: Task, path: Path) -> None:
    """A data directory whose labels.json disagrees with the built-in class order would silently flip labels."""
    if not path.is_file():
        return
    try:
        names = json.loads(decode_utf8(path.read_bytes(), str(path), TaskError))
    except json.JSONDecodeError as e:
        raise TaskError(f"{path}: invalid JSON ({e.msg})") from None
    if [str(n).lower() for n in names] != [n.lower() for n in task.labels]:
        raise TaskError(f"{path}: classes {names} differ from task {task.name!r} classes {task.labels}")


# -------------------------------------------------------------------------------------- task files
_TASK_FIELDS = {"name", "train", "test", "template", "labels", "label_names", "demonstrations", "metric", "chat",
                "instruction"}


def attach_space(word: str, template: str, chat: bool) -> str:
    """Label word for a user task file, as it continues the prompt.

    A word that already starts with whitespace is kept verbatim. Otherwise it gets a leading space after
    a plain template that ends in a non-space character (``"Sentiment:"`` → ``" positive"``) and none
    in chat mode (the answer starts the assistant turn) or after a template ending in whitespace/newline.
    """
    if word[:1].isspace():
        return word
    if chat or template[-1:].isspace():
        return word
    return " " + word


def load_task_file(path: str | Path) -> Task:
    """A user task from YAML (``.yaml``/``.yml``) or JSON; data paths are relative to the task file."""
    path = Path(path)
    if not path.is_file():
        raise TaskError(f"{path}: task file not found")
    raw = decode_utf8(path.read_bytes(), str(path), TaskError)
    try:
        spec = json.loads(raw) if path.suffix.lower() == ".json" else yaml.safe_load(raw)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise TaskError(f"{path}: cannot parse ({one_line(e, 300)})") from None
    if not isinstance(spec, dict):
        raise TaskError(f"{path}: expected a mapping of fields at the top level")

    def bad(fieldname: str, why: str) -> TaskError:
        return TaskError(f"{path}: field {fieldname!r}: {why}")

    unknown = sorted(set(spec) - _TASK_FIELDS)
    if unknown:
        raise TaskError(f"{path}: unknown field(s) {unknown}; allowed: {sorted(_TASK_FIELDS)}")
    for req in ("name", "train", "test", "template", "labels"):
        if req not in spec:
            raise bad(req, "required")
    for key in ("name", "train", "test", "template"):
        if not isinstance(spec[key], str) or not spec[key].strip():
            raise bad(key, "must be a non-empty string")
    template = spec["template"]
    if template.count("{text}") != 1:
        raise bad("template", "must contain '{text}' exactly once")
    chat = spec.get("chat", False)
    if not isinstance(chat, bool):
        raise bad("chat", "must be true or false")
    words = spec["labels"]
    if not isinstance(words, list) or len(words) < 2 or not all(isinstance(w, str) and w.strip() for w in words):
        raise bad("labels", "must be a list of at least two non-empty label words (one per class, index order)")
    if len({w.strip() for w in words}) != len(words):
        raise bad("labels", "label words must be distinct")
    names = spec.get("label_names", [w.strip() for w in words])
    if not isinstance(names, list) or len(names) != len(words) or not all(isinstance(n, str) for n in names):
        raise bad("label_names", f"must be a list of {len(words)} strings (one per label word)")
    metric = spec.get("metric", "accuracy")
    if metric not in METRICS:
        raise bad("metric", f"must be one of {METRICS}")
    if metric == "mcc" and len(words) != 2:
        raise bad("metric", "'mcc' needs exactly two classes")
    instruction = spec.get("instruction", "")
    if not isinstance(instruction, str):
        raise bad("instruction", "must be a string")
    demos_raw = spec.get("demonstrations", []) or []
    if not isinstance(demos_raw, list):
        raise bad("demonstrations", "must be a list of {text, label}")
    demos = []
    for i, d in enumerate(demos_raw):
        if not isinstance(d, dict) or set(d) != {"text", "label"}:
            raise bad("demonstrations", f"item {i} must have exactly the keys 'text' and 'label'")
        if not isinstance(d["text"], str) or not d["text"].strip():
            raise bad("demonstrations", f"item {i}: 'text' must be a non-empty string")
        if isinstance(d["label"], bool) or not isinstance(d["label"], int) or not 0 <= d["label"] < len(words):
            raise bad("demonstrations", f"item {i}: 'label' must be an integer in 0..{len(words) - 1}")
        demos.append(Example(d["text"], d["label"]))
    base = path.parent
    return Task(name=spec["name"], labels=names, label_words=[attach_space(w, template, chat) for w in words],
                template=template, demonstrations=demos, chat=chat, instruction=instruction, metric=metric,
                train_path=(base / spec["train"]), test_path=(base / spec["test"]))


def load_task(name_or_path: str | Path, data_dir: str | Path | None = None) -> Task:
    """A built-in task by name, or a user task from a ``.yaml``/``.yml``/``.json`` file."""
    s = str(name_or_path)
    if Path(s).suffix.lower() in (".yaml", ".yml", ".json") or Path(s).is_file():
        return load_task_file(s)
    return builtin_task(s, data_dir)
