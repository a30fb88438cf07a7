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


def test_generate_and_serve_build_the_same_engine_config():
    flags = ["--exit", "softmax", "--exit-threshold", "0.8", "--exit-min-layer", "12", "--exit-layers", "16,20",
             "--exit-mode", "sequence", "--kv-fill", "full", "--kv-cache-mb", "64", "--max-num-seqs", "4"]
    gen = _exit_of(["generate", "--prompt", "hi", *flags])
    srv = _exit_of(["serve", *flags])
    assert gen == srv
    assert gen.exit.criterion == "softmax" and gen.exit.threshold == 0.8 and gen.exit.min_layer == 12
    assert gen.exit.layers == [16, 20] and gen.exit.mode == "sequence" and gen.exit.kv_fill == "full"
    assert gen.kv_cache_bytes == 64 << 20 and gen.max_num_seqs == 4
    assert _exit_of(["serve"]).exit is None
    clf = _exit_of(["serve", "--classifier", "/x/clf"])
    assert clf.exit == _exit_of(["generate", "--prompt", "hi", "--exit", "classifier", "--classifier", "/x/clf"]).exit
    assert clf.exit.options == {"path": "/x/clf"}


def test_flag_defaults_are_the_configs():
    """No flags: the EngineConfig and ExitConfig a library user gets with no arguments."""
    from exitwise.engine.config import EngineConfig, ExitConfig
    from exitwise.models.spec import ModelSpec

    assert _exit_of(["serve"]) == EngineConfig(model=ModelSpec())
    for name in ("softmax", "hidden_similarity"):
        assert _exit_of(["generate", "--prompt", "hi", "--exit", name]).exit == ExitConfig(name)
    assert _exit_of(["serve", "--heads", "h"]).exit == ExitConfig.heads("h")


def test_flag_choices_come_from_the_registries():
    from exitwise.engine.config import EXIT_MODES
    from exitwise.engine.drafts import DRAFT_SOURCES
    from exitwise.engine.kv_fill import KV_FILLS
    from exitwise.exits.base import CRITERIA

    actions = {a.dest: a for a in build_parser()._subparsers._group_actions[0].choices["serve"]._actions}
    assert tuple(actions["exit"].choices) == tuple(CRITERIA)
    assert tuple(actions["kv_fill"].choices) == tuple(KV_FILLS)
    assert tuple(actions["exit_mode"].choices) == EXIT_MODES
    assert tuple(actions["draft"].choices) == DRAFT_SOURCES


def test_removed_spellings_are_refused(capsys):
    for argv in (["generate", "--prompt", "hi", "--exit", "softmax", "--threshold", "0.8"],
                 ["generate", "--prompt", "hi", "--exit", "softmax", "--min-layer", "12"],
                 ["serve", "--exit", "classifier:/x/clf"], ["serve", "--exit", "similarity"],
                 ["serve", "--exit", "softmax_response"]):
        assert main(argv) == 2, argv
        assert "error" in capsys.readouterr().err, argv


def _options(command: str) -> dict:
    """A command's model and engine flags: option strings -> (default, choices, help)."""
    parser = build_parser()._subparsers._group_actions[0].choices[command]
    own = {"prompt", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "json", "served_name", "host",
           "port", "api_key", "max_body_mb", "max_queue", "docs", "log_level", "replicas", "ray_address",
           "replica_cpus", "replica_gpus", "help", "threads"}
    return {tuple(a.option_strings): (a.default, a.choices, a.help) for a in parser._actions if a.dest not in own}


def test_generate_and_serve_take_the_same_model_and_engine_flags():
    """The model flags (--model, --dtype, --device) and the engine flags: the same set, defaults, choices
    and help in both commands."""
    from exitwise.models.spec import ModelSpec

    gen, srv = _options("generate"), _options("serve")
    assert gen == srv
    assert {("--model",), ("--dtype",), ("--device",), ("--kv-cache-mb",), ("--exit",), ("--speculative",)} <= set(gen)
    spec = ModelSpec()
    assert (gen[("--model",)][0], gen[("--dtype",)][0], gen[("--device",)][0]) == (spec.name, spec.dtype, spec.device)


def test_generate_and_serve_help_show_the_same_engine_flags(capsys):
    """The model and engine flags, with their defaults, read the same in both commands' --help."""
    helps = {}
    for command in ("generate", "serve"):
        assert main([command, "--help"]) == 0
        text = capsys.readouterr().out
        model = text[text.index("  --model"):text.index("--device DEVICE")]
        helps[command] = (model, text[text.index("engine:"):text.index("--max-draft")])
    assert helps["generate"] == helps["serve"]


def test_every_command_takes_the_model_flags():
    """--model, --dtype and --device on every command that runs a model, with ModelSpec's defaults
    (where the model comes from an artefact, --model defaults to None: the artefact's)."""
    from exitwise.models.spec import ModelSpec

    spec = ModelSpec()
    top = build_parser()._subparsers._group_actions[0].choices
    groups = {"heads": ("train", "train-adapter", "calibrate"), "raee": ("build", "eval"),
              "exit-classifier": ("train",)}
    parsers = {c: top[c] for c in ("generate", "serve", "profile", "finetune", "classify")}
    for group, names in groups.items():
        sub = top[group]._subparsers._group_actions[0].choices
        parsers.update({f"{group} {n}": sub[n] for n in names})
    for name, parser in parsers.items():
        actions = {a.dest: a for a in parser._actions}
        assert {"model", "dtype", "device"} <= set(actions), name
        assert actions["model"].default in (spec.name, None), name
        assert actions["device"].default == spec.device, name
        if name != "finetune":  # training needs float32 weights
            assert actions["dtype"].default == spec.dtype, name


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


def test_finetuned_model_drafts_take_the_exit_flags(tmp_path):
    from exitwise.engine.config import ExitConfig
    from exitwise.training.manifest import MANIFEST

    (tmp_path / MANIFEST).write_text('{"exit_layers": [2, 4, 6], "draft_layers": [4, 6]}')
    base = ["generate", "--prompt", "hi", "--model", str(tmp_path), "--speculative"]
    assert _exit_of(base).exit == ExitConfig("softmax", layers=[4, 6])
    assert _exit_of([*base, "--exit-layers", "2", "--exit-threshold", "0.5"]).exit == ExitConfig(
        "softmax", layers=[2], threshold=0.5)
    assert _exit_of([*base, "--draft", "exit"]).draft == "exit"  # the model brings its criterion
    assert _exit_of(base[:-1]).exit is None  # no speculation: full depth
