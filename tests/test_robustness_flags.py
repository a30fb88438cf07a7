"""Every numeric flag is range-checked while the flags are parsed, before any model, database or file
is touched: one line naming the flag, the value and the limit, exit code 2.

Each case is a value that used to start work and fail late (or never): ``raee eval --k 1000000000``
on a 40-row database (16 GB of search results), ``--kv-cache-mb`` past the machine's memory, a
thousand threads, ``--batch-size 0``, ``--exit-threshold nan``, ``--max-model-len 0``,
``finetune --max-minutes -1``, ``serve --port 99999``.
"""

from __future__ import annotations

import pytest

import exitwise.models.loading as loading
from exitwise.cli import build_parser, main
from exitwise.cli.argtypes import THREADS_PER_CORE, memory_mb
from server_helpers import load_tokenizer
from test_robustness_files import build_small_db
from tiny_models import tiny_llama


@pytest.fixture
def no_model(monkeypatch):
    def forbidden(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(loading, "load_model", forbidden)


def parse_error(capsys, argv: list[str]) -> str:
    """The one line argparse prints for ``argv``, which must exit with code 2."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and ": error: argument " in err, err
    return err


CASES = [
    (["raee", "build", "--model", "m", "--task", "t", "--out", "o", "--batch-size", "0"], "--batch-size",
     "must be >= 1, got 0"),
    (["generate", "--prompt", "x", "--exit-threshold", "nan"], "--exit-threshold",
     "must be a finite number, got 'nan'"),
    (["serve", "--exit-threshold", "1.5"], "--exit-threshold", "must be in [-1, 1], got 1.5"),
    (["serve", "--max-model-len", "0"], "--max-model-len", "must be >= 1, got 0"),
    (["generate", "--prompt", "x", "--max-num-seqs", "0"], "--max-num-seqs", "must be >= 1, got 0"),
    (["finetune", "--text", "a", "--out", "b", "--max-minutes", "-1"], "--max-minutes", "must be > 0, got -1"),
    (["finetune", "--text", "a", "--out", "b", "--layer-dropout", "1"], "--layer-dropout", "must be in [0, 1), got 1"),
    (["serve", "--port", "99999"], "--port", "must be in 0..65535, got 99999"),
    (["serve", "--port", "-1"], "--port", "must be in 0..65535, got -1"),
    (["serve", "--max-body-mb", "inf"], "--max-body-mb", "must be a finite number, got 'inf'"),
    (["serve", "--max-queue", "-2"], "--max-queue", "must be >= -1, got -2"),
    (["generate", "--prompt", "x", "--alpha", "nan"], "--alpha", "must be a finite number, got 'nan'"),
    (["generate", "--prompt", "x", "--top-p", "0"], "--top-p", "must be in (0, 1], got 0"),
    (["generate", "--prompt", "x", "--max-tokens", "-3"], "--max-tokens", "must be >= 1, got -3"),
    (["generate", "--prompt", "x", "--exit-layers", "3,-1"], "--exit-layers", "expected comma-separated layer indices"),
    (["raee", "eval", "--db", "d", "--k", "0"], "--k", "must be >= 1, got 0"),
    (["raee", "eval", "--db", "d", "--min-prob", "2"], "--min-prob", "must be in [0, 1], got 2"),
    (["raee", "eval", "--db", "d", "--seed", "-1"], "--seed", "must be in 0..18446744073709551615, got -1"),
    (["heads", "train", "--model", "m", "--text", "t", "--out", "o", "--seq-len", "0"], "--seq-len", "must be >= 1"),
    (["profile", "--tokens", "x"], "--tokens", "must be an integer, got 'x'"),
]


@pytest.mark.parametrize("argv, flag, message", CASES, ids=[" ".join(c[0][-2:]) for c in CASES])
def test_a_bad_number_is_one_line_naming_flag_value_and_limit(capsys, no_model, argv, flag, message):
    err = parse_error(capsys, argv)
    assert f"argument {flag}: {message}" in err, err


def test_kv_cache_is_at_most_the_machines_memory(capsys, no_model):
    total = memory_mb()
    assert total is not None and total > 0
    err = parse_error(capsys, ["serve", "--kv-cache-mb", str(total + 1)])
    assert f"--kv-cache-mb: must be in 1..{total} (this machine's memory in MiB), got {total + 1}" in err
    assert build_parser().parse_args(["serve", "--kv-cache-mb", "64"]).kv_cache_mb == 64


def test_threads_are_at_most_a_few_per_core(capsys, no_model):
    import os

    most = THREADS_PER_CORE * (os.cpu_count() or 1)
    for argv in (["--threads", str(most + 1), "serve"], ["serve", "--threads", "1000000000"]):
        err = parse_error(capsys, argv)
        assert f"--threads: must be in 1..{most} ({THREADS_PER_CORE} x the" in err
    assert build_parser().parse_args(["serve", "--threads", str(most)]).threads == most


def test_good_values_still_parse():
    args = build_parser().parse_args(["serve", "--port", "0", "--exit-threshold", "-1", "--max-queue", "-1",
                                      "--max-body-mb", "0.5", "--max-model-len", "64"])
    got = (args.port, args.exit_threshold, args.max_queue, args.max_body_mb, args.max_model_len)
    assert got == (0, -1, -1, 0.5, 64)
    args = build_parser().parse_args(["finetune", "--text", "a", "--out", "b", "--max-minutes", "0.5",
                                      "--lora-rank", "0", "--save-every", "0"])
    assert (args.max_minutes, args.lora_rank, args.save_every) == (0.5, 0, 0)


@pytest.fixture(scope="module")
def small_db(tmp_path_factory):
    """A 40-row database of a tiny random model with SmolLM2's tokenizer."""
    tok = load_tokenizer()
    tiny = tiny_llama(6, 32, tokenizer=tok, name="tiny-llama", tie_word_embeddings=True)
    return build_small_db(tiny, tmp_path_factory.mktemp("flags"))


def test_raee_k_is_at_most_the_databases_rows_before_the_model_loads(small_db, no_model, capsys):
    """Before: --k 1000000000 on a 40-row database allocated 16 GB of search results."""
    for command in (["raee", "eval", "--db", str(small_db)], ["classify", "--db", str(small_db), "some text"]):
        assert main([*command, "--k", "1000000000"]) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"exitwise: error: --k 1000000000 is more than the 40 rows of the database {small_db}", err


def test_raee_eval_repeats_are_bounded_before_the_model_loads(small_db, no_model, capsys):
    assert main(["raee", "eval", "--db", str(small_db), "--repeats", "100"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "exitwise: error: --repeats 100: must lie in 1..20", err
