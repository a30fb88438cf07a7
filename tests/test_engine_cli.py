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


def test_speculative_without_criterion_is_a_clear_error(capsys):
    assert main(["generate", "--prompt", "hi", "--speculative"]) == 2
    assert "--speculative" in capsys.readouterr().err
