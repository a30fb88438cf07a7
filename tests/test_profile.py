"""Exit profile: analysis helpers on hand-made inputs, the whole profile on a tiny random Llama, and a
short real run of ``exitwise profile`` on SmolLM2."""

import json

import pytest
import torch

from exitwise.analysis.costs import Costs, predicted_speedup
from exitwise.analysis.profile import exits_at, oracle_layers, plot, profile
from exitwise.artifacts import model_fingerprint
from exitwise.cli import main as cli_main
from exitwise.exits.classifier import ExitClassifier
from tiny_models import tiny_llama

L = 6




@pytest.fixture(scope="module")
def bb():
    return tiny_llama(L, name="tiny-profile", max_position_embeddings=256)


def test_oracle_layers():
    # columns: agrees from layer 2 on; flips back at 3 (so stable only from 4); only the last layer
    agree = torch.tensor([[0, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.bool)  # L=5
    assert oracle_layers(agree).tolist() == [2, 4, 5]
    assert oracle_layers(agree, [3]).tolist() == [3, 5, 5]  # only layer 3 (and L) may be used


def test_exits_at_batch_rule():
    conf = torch.tensor([[0.9, 0.1, 0.9, 0.9], [0.95, 0.95, 0.2, 0.99]])  # exit layers 2 and 4 of L=6
    assert exits_at(conf, [2, 4], 0.5, 6).tolist() == [2, 4, 2, 2]
    # batches of two tokens taken N/2 apart: {0, 2} and {1, 3}
    assert exits_at(conf, [2, 4], 0.5, 6, group=2).tolist() == [2, 4, 2, 4]
    assert exits_at(conf, [2, 4], 0.92, 6, group=2).tolist() == [6, 4, 6, 4]
    assert exits_at(conf, [2, 4], 1.5, 6).tolist() == [6] * 4


def test_predicted_speedup_cost_model():
    c = Costs(batch=1, layer=1.0, head=3.0, step_full=40.0, other=7.0, kv_fill_per_layer=0.1,
              check={"softmax": 3.0, "hidden_similarity": 0.0})
    full = torch.tensor([30, 30])
    assert predicted_speedup(c, "hidden_similarity", full, [20], 30) == pytest.approx(1.0)
    # softmax exiting at 20 after one check: 7 + 20 + 3 (check, logits reused) + 10 * 0.1 = 31
    assert predicted_speedup(c, "softmax", torch.tensor([20]), [20, 25], 30) == pytest.approx(40 / 31)
    # never exiting still pays both checks: 7 + 30 + 6 + 3 = 46
    assert predicted_speedup(c, "softmax", full, [20, 25], 30) == pytest.approx(40 / 46)


def test_profile_on_tiny_model(bb, tmp_path):
    clf = ExitClassifier([3, 5], torch.randn(2, 64) * 0.1, torch.zeros(2), model_fingerprint(bb))
    clf.save(tmp_path / "clf")
    ids = [(i * 7 + i // 5) % 97 for i in range(200)]
    res = profile(bb, ids, classifier=str(tmp_path / "clf"), exit_layers=[2, 3, 4, 5], chunk=64)
    json.dumps(res)  # JSON-ready
    assert res["num_layers"] == L and res["tokens"] == 200 and res["exit_layers"] == [2, 3, 4, 5]
    agreement = res["layer_agreement"]
    assert len(agreement) == L and agreement[-1] == 1.0 and all(0 <= a <= 1 for a in agreement)
    o = res["oracle"]
    assert 1 <= o["mean_layer"] <= o["mean_layer_exit_grid"] <= L
    assert sum(o["histogram"]) == 200 and len(o["histogram"]) == L and 0 <= o["saving"] < 1
    assert set(res["criteria"]) == {"softmax", "hidden_similarity", "classifier"}
    for name, c in res["criteria"].items():
        t = c["thresholds"]
        assert t == sorted(t)
        for b in (1, 8):
            layers = c[f"mean_exit_layer_b{b}"]
            assert len(layers) == len(t) == len(c[f"agreement_b{b}"]) == len(c[f"speedup_b{b}"])
            assert all(x <= y for x, y in zip(layers, layers[1:], strict=False)), (name, b)  # monotone in t
            assert layers[-1] == L and c[f"agreement_b{b}"][-1] == 1.0  # top threshold: nothing exits
            assert min(layers) >= 2
            assert c[f"best_b{b}"]["agreement"] >= 0.95
        # a batch of 8 leaves no earlier than its members would alone
        assert all(b8 >= b1 - 1e-9 for b1, b8 in zip(c["mean_exit_layer_b1"], c["mean_exit_layer_b8"], strict=True))
    for b in ("b1", "b8"):
        costs = res["costs_ms"][b]
        assert costs["layer"] > 0 and costs["head"] > 0 and costs["step_full"] > 0
        assert set(costs["check"]) == {"softmax", "hidden_similarity", "classifier"}
        assert res["predicted_speedup"]["oracle_exit_grid"][b] > 0  # timing on a shared machine: no ordering
    pytest.importorskip("matplotlib")
    png = plot(res, tmp_path / "profile.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.real_model
def test_profile_cli_smollm(smollm, data_dir, tmp_path):
    out = tmp_path / "profile.json"
    assert cli_main(["profile", "--model", "smollm2-135m", "--text", str(data_dir / "text" / "test.txt"),
                     "--tokens", "64", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["num_layers"] == 30 and res["tokens"] == 64 and res["layer_agreement"][-1] == 1.0
    assert res["layer_agreement"][14] < res["layer_agreement"][28] < 1.0  # deeper readouts agree more
    assert 15 <= res["oracle"]["mean_layer"] <= 30
    # Costs are measured, so only their presence is checked: their order depends on the machine's load.
    assert all(res["costs_ms"][b][part] > 0 for b in ("b1", "b8") for part in ("layer", "head", "step_full"))
