"""The RAEE command line end to end on the bundled SmolLM2 (small subsets), and its error handling."""

import json

import pytest

from exitwise.cli import main


@pytest.mark.real_model
def test_build_eval_classify_on_sst2(tmp_path, data_dir, smollm, capsys):
    db = tmp_path / "sst2.db"
    assert main(["raee", "build", "--model", "smollm2-135m", "--task", "SST-2", "--out", str(db),
                 "--train-limit", "48", "--data-dir", str(data_dir)]) == 0
    out = tmp_path / "eval.json"
    png = tmp_path / "eval.png"
    assert main(["raee", "eval", "--db", str(db), "--test-limit", "24", "--json", str(out), "--plot", str(png),
                 "--data-dir", str(data_dir)]) == 0
    report = json.loads(out.read_text())
    for key in ("task", "model", "num_layers", "n_test", "speedup", "settings", "frontier"):
        assert key in report
    for block in ("raee", "full", "knn", "knn_minilm", "best_fixed", "fixed_at_depth"):
        assert "accuracy" in report[block]
    assert "layer" in report["best_fixed"]
    # the default mode, with its key layer chosen on the training sample, and what the report must say about it
    key = report["settings"]["key_layer"]
    assert report["mode"] == "default" and report["readout"] == "probe" and report["encoder"] == f"backbone:{key}"
    assert report["seed"] == {"train": 0, "test": 0}
    assert report["fixed_at_depth"]["layer"] <= report["raee"]["mean_layers_run"]
    assert report["raee"]["mean_layers_run"] >= key  # the key is taken at that layer of the answering pass
    assert report["num_layers"] == 30 and report["n_test"] == 24
    for block in ("full", "raee"):
        assert 0.0 <= report[block]["accuracy"] <= 1.0 and report[block]["seconds"] > 0
    assert 0 <= report["raee"]["mean_exit_layer"] <= 30
    assert report["oracle"]["accuracy"] >= report["full"]["accuracy"]
    assert 0.0 <= report["knn"]["accuracy"] <= 1.0
    assert png.stat().st_size > 10_000
    capsys.readouterr()
    inputs = tmp_path / "in.jsonl"
    inputs.write_text(json.dumps({"text": "a dull, lifeless mess"}) + "\n\n" + json.dumps({"text": "wonderful"}) + "\n")
    assert main(["classify", "--db", str(db), "--input", str(inputs), "--json", "a gorgeous film",
                 "--data-dir", str(data_dir)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [x["text"] for x in lines] == ["a gorgeous film", "a dull, lifeless mess", "wonderful"]
    assert all(x["label"] in ("negative", "positive") and 0 <= x["exit_layer"] <= 30 for x in lines)
    # one text alone gets the answer it gets in a batch (the task prefix is cached, not the whole prompt)
    assert main(["classify", "--db", str(db), "--json", "a gorgeous film", "--data-dir", str(data_dir)]) == 0
    alone = json.loads(capsys.readouterr().out)
    assert (alone["label"], alone["exit_layer"]) == (lines[0]["label"], lines[0]["exit_layer"])

    # classify applies --nprobe like raee eval (it was silently ignored): a flat store refuses it
    assert main(["classify", "--db", str(db), "--nprobe", "4", "a film", "--data-dir", str(data_dir)]) == 2
    assert "--nprobe applies to the ivfpq store" in capsys.readouterr().err

    # the paper's mode one flag away, and both side by side
    paper = tmp_path / "paper.db"
    assert main(["raee", "build", "--model", "smollm2-135m", "--task", "SST-2", "--out", str(paper), "--paper",
                 "--train-limit", "48", "--data-dir", str(data_dir)]) == 0
    paper_json = tmp_path / "paper.json"
    assert main(["raee", "eval", "--db", str(paper), "--test-limit", "24", "--json", str(paper_json),
                 "--data-dir", str(data_dir)]) == 0
    pr = json.loads(paper_json.read_text())
    assert (pr["mode"], pr["readout"], pr["encoder"]) == ("paper", "lm", "minilm")
    assert pr["config"]["slack"] == 1.0 and pr["config"]["min_prob"] == 0.9
    capsys.readouterr()
    cmp_png = tmp_path / "cmp.png"
    assert main(["raee", "compare", str(out), str(paper_json), "--plot", str(cmp_png)]) == 0
    table = capsys.readouterr().out
    assert "full model" in table and "kNN vote" in table and "RAEE default" in table and "RAEE paper" in table
    assert cmp_png.stat().st_size > 10_000


def test_build_refuses_a_sample_missing_a_class(tmp_path, capsys):
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"text": f"text {i}", "label": i % 2}) + "\n" for i in range(20)))
    (tmp_path / "task.yaml").write_text("name: three\ntrain: train.jsonl\ntest: train.jsonl\n"
                                        "template: 'Text: {text}\\nClass:'\nlabels: [alpha, beta, gamma]\n")
    assert main(["raee", "build", "--model", "smollm2-135m", "--task", str(tmp_path / "task.yaml"),
                 "--out", str(tmp_path / "db")]) == 2
    err = capsys.readouterr().err
    assert "no example of class(es) ['gamma']" in err and "--allow-missing-classes" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "db").exists()


def test_bad_inputs_give_one_line_errors(tmp_path, capsys):
    bad = tmp_path / "in.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": oops}\n')
    assert main(["classify", "--db", str(tmp_path / "nope"), "--input", str(bad)]) == 2
    assert f"{bad}:2: invalid JSON" in capsys.readouterr().err
    assert main(["raee", "eval", "--db", str(tmp_path / "missing.db")]) == 2
    assert "not an exitwise RAEE database" in capsys.readouterr().err
    assert main(["raee", "build", "--model", "smollm2-135m", "--task", "no-such-task", "--out",
                 str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "no-such-task" in err and "sst-2" in err.lower()
    assert not (tmp_path / "x").exists()
