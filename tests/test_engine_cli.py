"""CLI wiring of the engine commands (no model loading)."""

from exitwise.cli import build_parser, main


def test_engine_commands_registered():
    parser = build_parser()
    args = parser.parse_args(["generate", "--prompt", "hi", "--exit", "softmax", "--exit-layers", "16,20"])
    assert args.exit_layers == [16, 20] and args.prompt == ["hi"]
    args = parser.parse_args(["exit-classifier", "train", "--text", "t.txt", "--out", "o"])
    assert args.handler.__name__ == "_train_classifier"


def test_user_errors_are_one_line(capsys, tmp_path):
    assert main(["generate", "--prompt", "hi", "--exit", "classifier"]) == 2
    assert "--classifier" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    assert main(["exit-classifier", "train", "--text", str(empty), "--out", str(tmp_path / "c")]) == 2
    assert "empty" in capsys.readouterr().err


def test_exit_drafts_without_criterion_are_a_clear_error(capsys):
    assert main(["generate", "--prompt", "hi", "--speculative", "--draft", "exit"]) == 2
    assert "--draft exit" in capsys.readouterr().err
    config = _exit_of(["generate", "--prompt", "hi", "--speculative"])  # auto: context drafts need no criterion
    assert config.speculative and config.draft == "auto" and config.exit is None


def _exit_of(argv):
    from exitwise.cli.engine_args import engine_config

    return engine_config(build_parser().parse_args(argv))


def test_generate_serve_and_old_spellings_build_the_same_engine_config(capsys):
    flags = ["--exit", "softmax", "--exit-threshold", "0.8", "--exit-min-layer", "12", "--exit-layers", "16,20",
             "--exit-mode", "sequence", "--kv-fill", "full", "--kv-cache-mb", "64", "--max-num-seqs", "4"]
    gen = _exit_of(["generate", "--prompt", "hi", *flags])
    srv = _exit_of(["serve", *flags])
    assert gen == srv
    assert gen.exit.criterion == "softmax" and gen.exit.threshold == 0.8 and gen.exit.min_layer == 12
    assert gen.exit.layers == [16, 20] and gen.exit.mode == "sequence" and gen.exit.kv_fill == "full"
    assert gen.kv_cache_bytes == 64 << 20 and gen.max_num_seqs == 4
    # generate's old --threshold / --min-layer and serve's old --exit classifier:PATH still work, with a notice
    old = _exit_of(["generate", "--prompt", "hi", "--exit", "softmax", "--threshold", "0.8", "--min-layer", "12"])
    assert (old.exit.threshold, old.exit.min_layer) == (0.8, 12)
    clf = _exit_of(["serve", "--exit", "classifier:/x/clf"])
    assert clf.exit == _exit_of(["generate", "--prompt", "hi", "--classifier", "/x/clf"]).exit
    assert clf.exit.options == {"path": "/x/clf"}
    err = capsys.readouterr().err
    assert "--threshold is deprecated; use --exit-threshold" in err and "use --classifier PATH" in err
    assert _exit_of(["serve", "--exit", "similarity"]).exit.criterion == "hidden_similarity"
    assert _exit_of(["serve"]).exit is None


def test_heads_flags_carry_what_heads_need():
    cfg = _exit_of(["serve", "--heads", "runs/h", "--alpha", "0.9", "--speculative"])
    assert cfg.exit.criterion == "heads" and cfg.exit.threshold == 0.0 and cfg.speculative
    assert cfg.exit.options == {"path": "runs/h", "alpha": 0.9, "mode": "max_coverage", "gate": True}
    assert cfg == _exit_of(["generate", "--prompt", "x", "--exit", "heads", "--heads", "runs/h", "--alpha", "0.9",
                            "--speculative"])


def test_engine_flag_errors_name_the_flag(capsys):
    for argv, word in ((["serve", "--exit", "entropy"], "--exit"), (["serve", "--exit", "heads"], "--heads PATH"),
                       (["serve", "--heads", "h", "--exit-threshold", "0.5"], "--alpha"),
                       (["serve", "--heads", "h", "--alpha", "1.5"], "alpha"),
                       (["serve", "--heads", "h", "--exit", "softmax"], "--heads goes with --exit heads")):
        assert main(argv) == 2, argv
        assert word in capsys.readouterr().err, argv
