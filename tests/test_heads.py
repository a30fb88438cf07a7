"""Early-exit heads: training, files, calibration rules (tiny random Llama) and one short real run."""

import json
import math
import warnings

import pytest
import torch

from exitwise.cli import main
from exitwise.errors import DataError, IncompatibleError
from exitwise.heads.calibrate import (
    Scores,
    binom_tail_log,
    collect,
    fire_stats,
    guaranteed,
    max_coverage,
    min_tokens,
    report,
    thresholds,
)
from exitwise.heads.model import ExitHeads, default_layers, entropy
from exitwise.heads.train import TrainConfig, evaluate_loss, fit_translators, kl_and_grad, train_heads
from exitwise.models.backbone import Backbone
from tiny_models import tiny_llama


def tiny(seed: int = 0, layers: int = 6, name: str | None = None) -> Backbone:
    return tiny_llama(layers, 32, seed=seed, name=name or f"tiny-{layers}", max_position_embeddings=128)


def token_data(n: int = 24, t: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 97, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def bb():
    return tiny()


def test_default_layers_follow_v2_code():
    assert default_layers(30, 4) == [6, 12, 18, 24]
    assert default_layers(24, 3) == [6, 12, 18]
    assert default_layers(6, 4) == [1, 2, 3, 4]
    with pytest.raises(ValueError):
        default_layers(6, 6)


def test_heads_are_norm_copy_plus_linear_initialised_from_output_head(bb):
    heads = ExitHeads(bb)
    assert heads.layers == [1, 2, 3, 4]
    h = torch.randn(5, 32)
    # from the output head, a head reproduces the backbone's own readout at that layer
    torch.testing.assert_close(heads.logits(0, h), bb.readout(h), rtol=1e-5, atol=1e-5)
    assert heads.linears[0].bias is None
    rand = ExitHeads(bb, init="random", seed=3)
    assert not torch.allclose(rand.linears[0].weight, bb.head.weight)
    with pytest.raises(ValueError):
        ExitHeads(bb, layers=[0, 3])
    with pytest.raises(ValueError):
        ExitHeads(bb, layers=[6])


def test_entropy_of_uniform_and_peaked():
    logits = torch.tensor([[0.0] * 8, [100.0] + [0.0] * 7])
    e = entropy(logits)
    assert e[0].item() == pytest.approx(math.log(8), rel=1e-6)
    assert e[1].item() < 1e-6


def test_frozen_backbone_gets_no_gradient_and_heads_move(bb):
    heads = ExitHeads(bb)
    before = [lin.weight.detach().clone() for lin in heads.linears]
    norm_before = heads.norms[0].weight.detach().clone()
    backbone_before = {n: p.detach().clone() for n, p in bb.model.named_parameters()}
    train_heads(bb, heads, token_data(), TrainConfig(steps=3, batch_size=2, lr=1e-2, progress=False))
    assert all(not p.requires_grad and p.grad is None for p in bb.model.parameters())
    assert all(torch.equal(p, backbone_before[n]) for n, p in bb.model.named_parameters())
    assert all(not torch.equal(lin.weight, b) for lin, b in zip(heads.linears, before, strict=True))
    assert torch.equal(heads.norms[0].weight, norm_before)  # the norm copy is frozen (v2)


@pytest.mark.parametrize("loss", ["kl", "ce"])
def test_training_lowers_the_loss(bb, loss):
    data = token_data(40)
    held = token_data(4, seed=9)
    heads = ExitHeads(bb, init="random")
    start = evaluate_loss(bb, heads, held, loss)
    summary = train_heads(bb, heads, data, TrainConfig(steps=40, batch_size=4, lr=1e-2, loss=loss,
                                                       progress=False))
    end = evaluate_loss(bb, heads, held, loss)
    assert summary["steps"] == 40 and summary["tokens"] == 40 * 4 * 32
    assert all(e < 0.8 * s for s, e in zip(start, end, strict=True)), (start, end)
    assert heads.meta["training"]["loss"] == loss


def test_training_rejects_bad_settings(bb):
    heads = ExitHeads(bb)
    with pytest.raises(ValueError, match="loss"):
        train_heads(bb, heads, token_data(), TrainConfig(steps=1, loss="mse", progress=False))
    with pytest.raises(DataError, match="fewer than one sequence"):
        train_heads(bb, heads, [1, 2, 3], TrainConfig(steps=1, seq_len=16, progress=False))


def test_save_load_round_trip_and_refusal(bb, tmp_path):
    heads = ExitHeads(bb, layers=[2, 4], init="random", meta={"training_data": {"name": "x.txt", "sha256": "ab"}})
    heads.meta["thresholds"] = {"max_coverage": {"0.9": [0.5, None]}}
    heads.save(tmp_path / "h")
    manifest = json.loads((tmp_path / "h.json").read_text())
    assert manifest["layers"] == [2, 4] and manifest["num_layers"] == 6 and manifest["init"] == "random"
    back = ExitHeads.load(tmp_path / "h.safetensors", bb)
    assert back.layers == [2, 4] and back.meta["training_data"]["sha256"] == "ab"
    for a, b in zip(heads.linears, back.linears, strict=True):
        assert torch.equal(a.weight, b.weight)
    assert back.thresholds(0.9) == [0.5, float("-inf")]
    with pytest.raises(DataError, match="alpha"):
        back.thresholds(0.95)
    with pytest.raises(DataError, match="guaranteed"):
        back.thresholds(0.9, mode="guaranteed")
    with pytest.raises(IncompatibleError, match="num_layers"):
        ExitHeads.load(tmp_path / "h", tiny(layers=4))
    with pytest.warns(UserWarning, match="same shape"):
        ExitHeads.load(tmp_path / "h", tiny(name="renamed"))
    with pytest.raises(DataError, match="not found"):
        ExitHeads.load(tmp_path / "missing", bb)


def test_translator_starts_as_the_readout_and_shares_the_output_head(bb):
    heads = ExitHeads(bb, kind="translator")
    h = torch.randn(3, 5, 32)
    torch.testing.assert_close(heads.logits(1, h), bb.readout(h), rtol=1e-5, atol=1e-5)
    assert heads._out_weight.data_ptr() == bb.head.weight.data_ptr()  # shared, not copied
    assert not heads.linears and sum(p.numel() for p in heads.trainable()) == 4 * (32 * 32 + 32)
    assert not any("out" in name for name in heads.state_dict())  # W_out is not part of the heads
    with torch.no_grad():
        heads.translators[2].weight.normal_(0, 0.1)
    many = heads.logits_many([h[0], h[1], h[2], h[0]])
    for k, x in enumerate([h[0], h[1], h[2], h[0]]):
        torch.testing.assert_close(many[k], heads.logits(k, x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="kind"):
        ExitHeads(bb, kind="mlp")
    with pytest.raises(ValueError, match="readout"):
        ExitHeads(bb, kind="translator", init="random")


@pytest.mark.parametrize("loss", ["kl", "ce"])
def test_closed_form_gradient_matches_autograd(loss):
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(3, 7, 11, generator=gen, requires_grad=True)
    teacher = torch.log_softmax(torch.randn(7, 11, generator=gen) * 3, -1)
    value, grad = kl_and_grad(z.detach().clone(), teacher, loss)
    ref = torch.stack([head_loss_ref(z[k], teacher, loss) for k in range(3)])
    ref.sum().backward()
    torch.testing.assert_close(value, ref.detach())
    torch.testing.assert_close(grad, z.grad)


def head_loss_ref(z, teacher_logp, loss):
    import torch.nn.functional as F

    if loss == "kl":
        return F.kl_div(torch.log_softmax(z, -1), teacher_logp, reduction="batchmean", log_target=True)
    return F.cross_entropy(z, teacher_logp.argmax(-1))


def test_translator_training_lowers_the_loss_and_leaves_the_backbone_alone(bb, tmp_path):
    heads = ExitHeads(bb, kind="translator")
    held = token_data(4, seed=9)
    start = evaluate_loss(bb, heads, held)
    backbone_before = {n: p.detach().clone() for n, p in bb.model.named_parameters()}
    summary = train_heads(bb, heads, token_data(40), TrainConfig(steps=40, batch_size=4, lr=1e-2, progress=False))
    end = evaluate_loss(bb, heads, held)
    assert summary["kind"] == "translator" and summary["steps"] == 40
    # the tiny model's readout at every layer is already close to its final distribution (KL ~ 0.002)
    assert all(e < s for s, e in zip(start, end, strict=True)) and sum(end) < 0.8 * sum(start), (start, end)
    assert all(p.grad is None and torch.equal(p, backbone_before[n]) for n, p in bb.model.named_parameters())
    # round trip: a small file, the kind in the manifest, identical logits after loading
    heads.save(tmp_path / "t")
    manifest = json.loads((tmp_path / "t.json").read_text())
    assert manifest["kind"] == "translator"
    back = ExitHeads.load(tmp_path / "t", bb)
    assert back.kind == "translator" and "kind" not in back.meta
    h = torch.randn(6, 32)
    for k in range(4):
        torch.testing.assert_close(back.logits(k, h), heads.logits(k, h))
    # a manifest without "kind" (written before translators existed) is read as linear heads
    ExitHeads(bb, layers=[2]).save(tmp_path / "old")
    old = json.loads((tmp_path / "old.json").read_text())
    del old["kind"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert ExitHeads.load(tmp_path / "old", bb).kind == "linear"
    old["kind"] = "mlp"
    (tmp_path / "old.json").write_text(json.dumps(old))
    with pytest.raises(DataError, match="unknown kind"):
        ExitHeads.load(tmp_path / "old", bb)


def test_least_squares_start_fits_the_last_hidden_state(bb):
    heads = ExitHeads(bb, kind="translator")
    held = token_data(4, seed=9)
    start = evaluate_loss(bb, heads, held)
    summary = fit_translators(bb, heads, token_data(24), batch_size=5)
    assert summary["tokens"] == 24 * 32 and heads.meta["least_squares"]["ridge"] == 1e-3
    end = evaluate_loss(bb, heads, held)
    assert sum(end) < 0.8 * sum(start), (start, end)
    # on its training tokens the translated state is closer to the last hidden state than h itself
    hs = bb.hidden_states(token_data(24)[:2])
    h, last = hs[2].flatten(0, 1), hs[-1].flatten(0, 1)
    with torch.no_grad():
        fitted = h + heads.translators[1](h)
    assert (fitted - last).pow(2).mean() < 0.9 * (h - last).pow(2).mean()
    with pytest.raises(ValueError, match="translator"):
        fit_translators(bb, ExitHeads(bb), token_data(4))


# ------------------------------------------------------------------------------------- calibration
def test_max_coverage_by_hand():
    e = torch.tensor([0.3, 0.1, 0.5, 0.2, 0.4])  # unsorted on purpose
    c = torch.tensor([False, True, False, True, True])
    # sorted by entropy: correct 1,1,0,1,0 -> agreement 1, 1, .667, .75, .6
    assert max_coverage(e, c, 0.75) == pytest.approx(0.4)
    assert max_coverage(e, c, 0.7) == pytest.approx(0.4)
    assert max_coverage(e, c, 0.6) == pytest.approx(0.5)
    assert max_coverage(e, c, 0.9) == pytest.approx(0.2)
    assert max_coverage(torch.tensor([0.1, 0.2]), torch.tensor([False, True]), 0.9) == float("-inf")
    # a cut must not split a tie: k=2 would fire 3 tokens (two at 0.2), so k=1
    assert max_coverage(torch.tensor([0.1, 0.2, 0.2, 0.3]), torch.tensor([True, True, False, True]), 0.9) \
        == pytest.approx(0.1)
    stats = fire_stats(e, c, 0.4)
    assert stats == {"fired": 4, "coverage": 0.8, "agreement": 0.75}


def test_binomial_tail_is_exact():
    for n, c, p in [(10, 7, 0.6), (25, 25, 0.9), (40, 1, 0.3), (12, 0, 0.5)]:
        exact = sum(math.comb(n, x) * p**x * (1 - p) ** (n - x) for x in range(c, n + 1))
        assert math.exp(binom_tail_log(c, n, p)) == pytest.approx(exact, rel=1e-9)
    assert binom_tail_log(11, 10, 0.5) == float("-inf")
    assert min_tokens(0.99, 0.05) == 299  # 0.99^299 <= 0.05 < 0.99^298


def test_guarantee_needs_enough_tokens_and_valid_levels():
    e, c = torch.rand(100), torch.ones(100, dtype=torch.bool)
    with pytest.raises(DataError, match="at least 299"):
        guaranteed(e, c, 0.99, 0.05, torch.linspace(0, 1, 10))
    with pytest.raises(ValueError, match="delta"):
        guaranteed(e, c, 0.9, 1.5, torch.linspace(0, 1, 10))
    scores = Scores(e[None], c[None])
    for bad in ([0.0], [1.0], [1.2], []):
        with pytest.raises(ValueError, match="alpha"):
            thresholds(scores, bad, 97)


def simulate(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Entropy ~ U(0, 1), P(correct | e) = 1 - 0.3 e, so agreement over e <= tau is 1 - 0.15 tau."""
    e = torch.rand(n, generator=gen)
    return e, torch.rand(n, generator=gen) < 1 - 0.3 * e


def test_guaranteed_is_conservative_and_holds_in_simulation():
    alpha, delta, trials = 0.95, 0.1, 150
    tau_star = (1 - alpha) / 0.15  # largest threshold whose true agreement is >= alpha
    gen = torch.Generator().manual_seed(0)
    cands = torch.linspace(0.005, 1.0, 200)
    fail_g = fail_m = 0
    for _ in range(trials):
        e, c = simulate(1500, gen)
        t_m, t_g = max_coverage(e, c, alpha), guaranteed(e, c, alpha, delta, cands)
        assert t_g <= t_m
        fail_g += t_g > tau_star
        fail_m += t_m > tau_star
    assert fail_g / trials <= delta  # the guarantee: P(true agreement < alpha) <= delta
    assert fail_m / trials > delta  # max-coverage is only empirical: it overshoots about half the time


def test_collect_and_report_on_tiny_model(bb):
    heads = ExitHeads(bb)
    cal, test = collect(bb, heads, token_data(8)), collect(bb, heads, token_data(8, seed=5))
    assert cal.entropy.shape == (4, 8 * 32) and cal.correct.dtype == torch.bool
    # heads initialised from the output head agree exactly where the plain readout does
    hs = bb.hidden_states(token_data(8)[:1])
    final = bb.readout(hs[-1][0]).argmax(-1)
    assert torch.equal(cal.correct[0, :32], bb.readout(hs[1][0]).argmax(-1) == final)
    table = thresholds(cal, [0.5, 0.9], bb.vocab_size, delta=0.2)
    assert set(table) == {"max_coverage", "guaranteed"} and len(table["guaranteed"]["0.9"]) == 4
    rep = report(heads, table, cal, test, [0.5, 0.9])
    assert len(rep["thresholds"]) == 2 * 2 * 4
    for r in rep["thresholds"]:
        if r["mode"] == "max_coverage" and r["cal"]["fired"]:
            assert r["cal"]["agreement"] >= r["alpha"]
        tol = 0.01 if r["mode"] == "max_coverage" else 0.0
        assert r["miss"] == (r["test"]["agreement"] is not None and r["test"]["agreement"] < r["alpha"] - tol)
    assert len(rep["misses"]) == sum(r["miss"] for r in rep["thresholds"])
    o = rep["oracle"]["test"]
    assert o["any_head_agrees"] == pytest.approx(float(test.correct.any(0).double().mean()), abs=1e-4)
    assert o["any_head_agrees"] >= max(h["agreement_test"] for h in rep["heads"]) - 1e-4
    assert 1 <= o["mean_first_agreeing_layer"] <= 4


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_rejects_missing_and_empty_text(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    assert main(["heads", "train", "--model", "x", "--text", str(empty), "--out", str(tmp_path / "h")]) == 2
    assert "is empty" in capsys.readouterr().err
    assert main(["heads", "train", "--model", "x", "--text", str(tmp_path / "nope.txt"),
                 "--out", str(tmp_path / "h")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["heads", "train", "--model", "x", "--text", str(empty), "--out", str(tmp_path / "h"),
                 "--kind", "linear", "--fit-tokens", "64"]) == 2
    assert "--fit-tokens applies to --kind translator only" in capsys.readouterr().err
    assert main(["heads", "calibrate", "--heads", str(tmp_path / "h"), "--text", str(empty),
                 "--alpha", "1.5"]) == 2
    assert "alpha must be in (0, 1)" in capsys.readouterr().err


@pytest.mark.real_model
def test_real_train_and_calibrate_cli(smollm, data_dir, tmp_path, capsys):
    text = data_dir / "text"
    train = tmp_path / "train.txt"  # a prefix: tokenising the whole 3 MB file would dominate the test
    train.write_text((text / "train.txt").read_text()[:20000])
    out = tmp_path / "h"
    assert main(["heads", "train", "--model", "smollm2-135m", "--text", str(train), "--out", str(out),
                 "--layers", "10", "20", "--steps", "2", "--batch-size", "1", "--seq-len", "64",
                 "--fit-tokens", "128"]) == 0
    manifest = json.loads(out.with_suffix(".json").read_text())
    assert manifest["layers"] == [10, 20] and manifest["training"]["tokens"] == 128
    assert manifest["kind"] == "translator" and manifest["least_squares"]["tokens"] == 128  # the CLI default
    assert manifest["training"]["config"]["lr"] == 1e-3
    assert out.with_suffix(".safetensors").stat().st_size < 2 * 578 * 576 * 4 + 4096  # 2 x ((D, D) + bias + norm)
    assert manifest["training_data"]["name"] == "train.txt" and len(manifest["training_data"]["sha256"]) == 64
    report_path, png = tmp_path / "r.json", tmp_path / "r.png"
    assert main(["heads", "calibrate", "--heads", str(out), "--text", str(text / "valid.txt"), "--test",
                 str(text / "test.txt"), "--alpha", "0.8", "0.9", "--guarantee", "0.1", "--max-tokens", "128",
                 "--seq-len", "64", "--json", str(report_path), "--plot", str(png)]) == 0
    rep = json.loads(report_path.read_text())
    assert rep["calibration"]["tokens"] == 128 and rep["test"]["tokens"] == 128
    assert len(rep["thresholds"]) == 2 * 2 * 2 and png.stat().st_size > 1000
    stored = json.loads(out.with_suffix(".json").read_text())["thresholds"]
    assert set(stored) == {"max_coverage", "guaranteed"} and len(stored["guaranteed"]["0.9"]) == 2
    # the gates: probes in the safetensors, thresholds in the JSON, recall and pass rate in the report
    assert ExitHeads.load(out, smollm).has_gate
    gated = [r["gate"] for r in rep["thresholds"] if r["gate"]["threshold"] is not None]
    assert all(0 <= g["cal"]["pass"] <= 1 and "test" in g for g in gated)
    # too little text for the requested guarantee is a clear error
    assert main(["heads", "calibrate", "--heads", str(out), "--text", str(text / "valid.txt"), "--alpha", "0.999",
                 "--guarantee", "0.01", "--max-tokens", "128"]) == 2
    assert "needs at least" in capsys.readouterr().err
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # heads load for the same model without a rename warning
        ExitHeads.load(out, smollm)
    # generation with the calibrated heads through the engine
    capsys.readouterr()
    assert main(["generate", "--heads", str(out), "--alpha", "0.8", "--max-tokens", "4", "--json",
                 "--prompt", "The city of Paris is"]) == 0
    gen = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(gen["token_ids"]) == 4 and set(gen["exit_layers"]) <= {10, 20, 30}
    assert main(["generate", "--heads", str(out), "--alpha", "1.5", "--prompt", "x"]) == 2
    assert "--alpha must lie in (0, 1)" in capsys.readouterr().err
    assert main(["generate", "--exit", "heads", "--prompt", "x"]) == 2
    assert "--exit heads needs --heads" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ engine criterion
@pytest.mark.parametrize("kind", ["linear", "translator"])
def test_heads_criterion_in_the_engine(tmp_path, kind):
    from exitwise.engine import LLM, SamplingParams
    from exitwise.exits.base import make_criterion
    from exitwise.exits.heads import HeadsCriterion

    bb = tiny(4)
    heads = ExitHeads(bb, layers=[2, 4], init="random" if kind == "linear" else "head", seed=1, kind=kind)
    if kind == "translator":
        with torch.no_grad():
            heads.translators[0].weight.normal_(0, 0.1)  # not the plain readout
    # alpha 0.5: head 2 always fires; alpha 0.9: no head ever fires
    heads.meta["thresholds"] = {"max_coverage": {"0.5": [100.0, None], "0.9": [None, None]}}
    heads.save(tmp_path / "h")
    crit = make_criterion("heads", path=tmp_path / "h", backbone=bb, alpha=0.5)
    assert isinstance(crit, HeadsCriterion) and crit.layers == [2, 4]
    prompt = [5, 17, 33, 2, 8]
    params = SamplingParams(max_tokens=4, ignore_eos=True, return_exit_layers=True)
    out = LLM(bb, exit=crit, exit_threshold=0.0, num_kv_blocks=64, block_size=4).generate([prompt], params)[0]
    assert out.exit_layers[1:] == [2, 2, 2]  # the prefill token is full depth
    # an exiting token is the head's argmax (not the final-norm readout's) given the propagated cache
    h = bb.hidden_states(torch.tensor([prompt + out.token_ids[:1]]), stop=2)[2][0, -1]
    with torch.no_grad():
        assert out.token_ids[1] == int(crit.heads.logits(0, h).argmax())
    never = HeadsCriterion.load(tmp_path / "h", bb, alpha=0.9)
    full = LLM(bb, num_kv_blocks=64, block_size=4).generate([prompt], params)[0]
    out9 = LLM(bb, exit=never, exit_threshold=0.0, num_kv_blocks=64, block_size=4).generate([prompt], params)[0]
    assert out9.token_ids == full.token_ids and set(out9.exit_layers) == {6}


@pytest.mark.parametrize("kind", ["linear", "translator"])
def test_heads_follow_the_engines_weight_dtype(tmp_path, kind):
    from exitwise.engine import LLMEngine
    from exitwise.engine.config import ExitConfig

    bb = tiny(5)
    heads = ExitHeads(bb, layers=[2, 4], init="random" if kind == "linear" else "head", seed=2, kind=kind)
    h = torch.randn(6, 32) * 4
    ref = heads.logits(1, h)
    heads.use_weight_dtype("int8", rescore=0)
    plain = heads.logits(1, h)
    assert not torch.equal(plain, ref) and (plain - ref).norm() / ref.norm() < 0.05
    heads.use_weight_dtype("int8", rescore=4)
    low = heads.logits(1, h)
    top = plain.topk(4, dim=-1).indices  # the rows the int8 logits put first are the re-scored ones
    torch.testing.assert_close(low.gather(1, top), ref.gather(1, top), rtol=1e-5, atol=1e-5)  # re-scored exactly
    heads.use_weight_dtype("float32")
    assert torch.equal(heads.logits(1, h), ref)
    heads.meta["thresholds"] = {"max_coverage": {"0.5": [100.0, None]}}
    heads.save(tmp_path / "h")
    eng = LLMEngine(bb, exit=ExitConfig.heads(str(tmp_path / "h"), alpha=0.5), weight_dtype="int8",
                    num_kv_blocks=64, block_size=4)
    assert eng.plan.criterion.heads._lowp is not None  # an exit check streams int8 too
    assert LLMEngine(bb, exit=ExitConfig.heads(str(tmp_path / "h"), alpha=0.5),
                     num_kv_blocks=64, block_size=4).plan.criterion.heads._lowp is None


# ------------------------------------------------------------------------------------------- gates
def test_gate_fit_thresholds_and_file_round_trip(bb, tmp_path):
    from exitwise.heads.calibrate import (
        fit_gates,
        gate_stats,
        gate_table,
        gate_target,
        held_out_gate_scores,
    )
    from exitwise.heads.model import gate_features

    heads = ExitHeads(bb, init="random", seed=2)
    cal = collect(bb, heads, token_data(16), keep_hidden=True)
    test = collect(bb, heads, token_data(8, seed=5), keep_hidden=True)
    assert cal.hidden.shape == (4, 16 * 32, 32) and cal.window.shape == (16 * 32,)
    oof = fit_gates(heads, cal)
    assert oof.shape == cal.entropy.shape and all(g.shape == (34,) for g in heads.gates)
    # the fused score equals features @ weights, and the probe tracks log-entropy better than a constant
    h = cal.hidden[1].float()
    torch.testing.assert_close(heads.gate_score(1, h), gate_features(h) @ heads.gates[1], rtol=1e-4, atol=1e-4)
    y = gate_target(cal.entropy[1]).float()
    assert float(((heads.gate_score(1, h) - y) ** 2).mean()) < float(y.var())
    table = thresholds(cal, [0.5, 0.9], bb.vocab_size)
    gates = gate_table(table, cal, oof, recall=0.9)
    for a, taus in table["max_coverage"].items():
        for k, tau in enumerate(taus):
            g = gates["max_coverage"][a][k]
            fired = cal.entropy[k] <= tau
            if not fired.any():
                assert g == float("-inf")
                continue
            stats = gate_stats(oof[k], fired, g)
            assert stats["recall"] >= 0.9 and 0 < stats["pass"] <= 1
    rep = report(heads, table, cal, test, [0.5, 0.9], gates, oof, held_out_gate_scores(heads, test))
    assert all("gate" in r and "test" in r["gate"] for r in rep["thresholds"])
    # file round trip: probes in the safetensors, thresholds in the JSON
    heads.meta["thresholds"] = {"max_coverage": {a: [None if t == float("-inf") else t for t in ts]
                                                 for a, ts in table["max_coverage"].items()}}
    heads.meta["gate"] = {"recall": 0.9, "thresholds": {"max_coverage": {
        a: [None if t == float("-inf") else t for t in ts] for a, ts in gates["max_coverage"].items()}}}
    heads.save(tmp_path / "g")
    back = ExitHeads.load(tmp_path / "g", bb)
    assert back.has_gate and all(torch.equal(a, b) for a, b in zip(heads.gates, back.gates, strict=True))
    assert back.gate_thresholds(0.5) == gates["max_coverage"]["0.5"]
    assert back.gate_thresholds(0.7) is None
    # heads saved without gates still load, and run faithfully
    plain = ExitHeads(bb, layers=[2, 4])
    plain.meta["thresholds"] = {"max_coverage": {"0.9": [0.5, None]}}
    plain.save(tmp_path / "p")
    old = ExitHeads.load(tmp_path / "p", bb)
    assert not old.has_gate and old.gate_thresholds(0.9) is None


def _gated_heads(bb, gate_threshold: float) -> ExitHeads:
    """Heads at layers 2 and 4 whose layer-2 head always fires (alpha 0.5), with a constant gate score 0."""
    heads = ExitHeads(bb, layers=[2, 4], init="random", seed=1)
    heads.meta["thresholds"] = {"max_coverage": {"0.5": [100.0, None], "0.9": [None, None]}}
    heads.gates = [torch.zeros(34), torch.zeros(34)]  # score = 0 for every hidden state
    heads.meta["gate"] = {"thresholds": {"max_coverage": {"0.5": [gate_threshold, None], "0.9": [None, None]}}}
    return heads


def test_gate_only_removes_exits_and_skips_the_head():
    from exitwise.engine import LLM, SamplingParams
    from exitwise.exits.heads import HeadsCriterion

    bb = tiny(4)
    prompt = [5, 17, 33, 2, 8]
    params = SamplingParams(max_tokens=4, ignore_eos=True, return_exit_layers=True)

    def run(heads, gate):
        crit = HeadsCriterion(heads, alpha=0.5, gate=gate)
        calls = []
        logits = heads.logits
        heads.logits = lambda k, h: calls.append(k) or logits(k, h)  # count full-head evaluations
        out = LLM(bb, exit=crit, exit_threshold=0.0, num_kv_blocks=64, block_size=4).generate([prompt], params)[0]
        del heads.logits
        return out, calls

    faithful, calls_f = run(_gated_heads(bb, 1.0), gate=False)
    passing, calls_p = run(_gated_heads(bb, 1.0), gate=True)  # gate passes (0 <= 1): same as faithful
    closed, calls_c = run(_gated_heads(bb, -1.0), gate=True)  # gate never passes: no head evaluated
    assert faithful.exit_layers[1:] == [2, 2, 2] and calls_f == [0, 0, 0]
    assert passing.token_ids == faithful.token_ids and passing.exit_layers == faithful.exit_layers
    assert calls_p == calls_f
    assert set(closed.exit_layers) == {6} and calls_c == []  # the gate removed the exits, added none
    full = LLM(bb, num_kv_blocks=64, block_size=4).generate([prompt], params)[0]
    assert closed.token_ids == full.token_ids


def test_per_request_alpha_gets_its_own_thresholds(tmp_path):
    from exitwise.engine import LLM, LLMEngine, SamplingParams
    from exitwise.exits.heads import HeadsCriterion

    bb = tiny(4)
    heads = ExitHeads(bb, layers=[2, 4], init="random", seed=1)
    # alpha 0.5: both heads always fire; alpha 0.8: only the head at layer 4 fires
    heads.meta["thresholds"] = {"max_coverage": {"0.5": [100.0, 100.0], "0.8": [None, 100.0]}}
    crit = HeadsCriterion(heads, alpha=0.8)
    llm = LLM(bb, exit=crit, exit_threshold=0.0, num_kv_blocks=64, block_size=4)

    def params(alpha):
        return SamplingParams(max_tokens=4, ignore_eos=True, return_exit_layers=True, exit_alpha=alpha)

    a, b = [5, 17, 33, 2, 8], [9, 1, 40]
    default, low = llm.generate([a, b], [params(None), params(0.5)])  # one engine, one batch
    assert default.exit_layers[1:] == [4, 4, 4]  # the batch leaves where both requests' heads fire
    assert low.exit_layers[1:] == [4, 4, 4]
    alone = llm.generate([b], [params(0.5)])[0]
    assert alone.exit_layers[1:] == [2, 2, 2]  # on its own the alpha=0.5 request leaves at layer 2
    assert llm.generate([b], [params(None)])[0].exit_layers[1:] == [4, 4, 4]
    # the step thresholds are per sequence
    seqs = [type("S", (), {"params": params(x), "criterion_state": {}})() for x in (None, 0.5, 0.8)]
    crit.begin(None, seqs)
    assert crit._step_tau[0].tolist() == [float("-inf"), 100.0, float("-inf")]
    assert crit._step_tau[1].tolist() == [100.0] * 3
    # an alpha the heads were not calibrated for is refused at add_request, naming the calibrated ones
    with pytest.raises(ValueError, match=r"exit_alpha=0.7 .*0\.5, 0\.8"):
        llm.engine.add_request([1, 2], params(0.7))
    with pytest.raises(ValueError, match="exit_alpha must be in"):
        params(1.0)
    with pytest.raises(ValueError, match="heads exit criterion"):
        LLMEngine(bb, num_kv_blocks=16).add_request([1, 2], params(0.5))
    with pytest.raises(ValueError, match="heads exit criterion"):
        LLMEngine(bb, num_kv_blocks=16, exit="softmax").add_request([1, 2], params(0.5))
    with pytest.raises(ValueError, match="alpha must be in"):
        HeadsCriterion(heads, alpha=1.5)


def test_prompt_longer_than_the_context_is_a_clear_error():
    from exitwise.engine import LLMEngine

    engine = LLMEngine(tiny(4), num_kv_blocks=64, block_size=4)
    with pytest.raises(ValueError, match="the prompt has 200 tokens; the context holds 128"):
        engine.add_request([1] * 200)


@pytest.mark.real_model
def test_cli_bad_input_is_one_line(smollm, capsys):
    long = "word " * 9000
    assert main(["generate", "--prompt", long, "--max-tokens", "2"]) == 2
    err = capsys.readouterr().err.strip()  # (the weights' loading progress bar may precede it)
    assert err.splitlines()[-1].startswith("exitwise: error: the prompt has 9001 tokens; the context holds")
    assert "Traceback" not in err
    assert main(["serve", "--heads", "x", "--alpha", "1.2"]) == 2
    assert "--alpha must lie in (0, 1)" in capsys.readouterr().err


# -------------------------------------------------------------------------------- shortlist gate
def _seqs(n: int, alpha=None):
    from exitwise.engine import SamplingParams

    return [type("S", (), {"params": SamplingParams(exit_alpha=alpha), "criterion_state": {}})() for _ in range(n)]


def test_gate_defaults_by_head_kind(bb):
    from exitwise.exits.heads import HeadsCriterion

    tr = ExitHeads(bb, layers=[2, 4], kind="translator")
    tr.meta["thresholds"] = {"max_coverage": {"0.5": [1.0, None]}}
    assert HeadsCriterion(tr, 0.5).gate == "shortlist" and HeadsCriterion(tr, 0.5, gate=True).gate == "shortlist"
    assert HeadsCriterion(tr, 0.5, gate=False).gate is False
    assert HeadsCriterion(tr, 0.5, gate="probe").gate is False  # no probe: faithful
    lin = _gated_heads(bb, 1.0)
    assert HeadsCriterion(lin, 0.5).gate == "probe"
    with pytest.raises(ValueError, match="translator"):
        HeadsCriterion(lin, 0.5, gate="shortlist")
    with pytest.raises(ValueError, match="gate must be"):
        HeadsCriterion(tr, 0.5, gate="bogus")


def test_shortlist_entropy_is_exact_when_it_covers_the_vocabulary(bb):
    from exitwise.exits.heads import HeadsCriterion
    from exitwise.exits.shortlist import entropy_estimate

    heads = ExitHeads(bb, layers=[2, 4], kind="translator")
    with torch.no_grad():
        heads.translators[1].weight.normal_(0, 0.3)
    heads.meta["thresholds"] = {"max_coverage": {"0.5": [1.0, 1.0]}}
    crit = HeadsCriterion(heads, 0.5)  # 1024 fixed ids > 97: the whole vocabulary
    seqs = _seqs(3)
    crit.begin(None, seqs)
    h = torch.randn(3, 32) * 3
    for k in (0, 1):
        torch.testing.assert_close(crit.shortlist_entropy(k, h), heads.entropy(k, h), rtol=1e-4, atol=1e-4)
    # the estimator alone: fixed ids 0..9, no valid candidate, the whole tail 10..96 as the sample (scale 1)
    z = torch.randn(2, 97) * 4
    valid = torch.zeros(2, 2, dtype=torch.bool)
    est = entropy_estimate(z[:, :10], torch.full((2, 2), float("-inf")), z[:, 10:], valid, 87)
    torch.testing.assert_close(est, entropy(z), rtol=1e-4, atol=1e-4)
    # half the tail sampled: the estimate stays close on a spread-out row
    z = torch.randn(1, 97) * 0.5
    est = entropy_estimate(z[:, :10], torch.full((1, 2), float("-inf")), z[:, 10::2], valid[:1], 87)
    assert abs(float(est[0]) - float(entropy(z)[0])) < 0.1


def test_shortlist_gate_passes_a_confident_row_and_rejects_a_uniform_one(bb):
    from exitwise.exits.heads import HeadsCriterion

    heads = ExitHeads(bb, layers=[2, 4], kind="translator")
    heads.meta["thresholds"] = {"max_coverage": {"0.5": [1.0, None]}}
    heads._out_weight = heads._out_weight * 1000  # sharp logits wherever the features are not zero
    crit = HeadsCriterion(heads, 0.5, fixed=16, candidates=4, sample=32)  # a partial shortlist
    seqs = _seqs(2)
    crit.observe(seqs, torch.randn(2, 97))
    crit.begin(None, seqs)
    h = torch.stack([torch.randn(32), torch.zeros(32)])  # zero features: uniform logits, entropy log V
    with torch.no_grad():
        assert float(heads.entropy(0, h[:1])) < 0.5 and float(crit.shortlist_entropy(0, h)[0]) < 1.0
    torch.testing.assert_close(crit.shortlist_entropy(0, h)[1], torch.tensor(math.log(97)))
    assert crit.prefilter(h, 2).tolist() == [float("inf"), float("-inf")]
    assert crit.prefilter(h, 4).tolist() == [float("-inf")] * 2  # that head never fires


@pytest.mark.parametrize("mode", ["batch", "sequence"])
def test_shortlist_gate_only_removes_exits(mode):
    from exitwise.engine import LLM, SamplingParams
    from exitwise.exits.heads import HeadsCriterion

    bb = tiny(4)
    heads = ExitHeads(bb, layers=[2, 4], kind="translator")
    with torch.no_grad():
        heads.translators[0].weight.normal_(0, 0.1)
    # alpha 0.5: head 2 always fires; alpha 0.9: head 4 has a finite threshold no token reaches
    heads.meta["thresholds"] = {"max_coverage": {"0.5": [100.0, None], "0.9": [None, 0.0]}}
    prompts = [[5, 17, 33, 2, 8], [9, 1, 40]]
    params = SamplingParams(max_tokens=5, ignore_eos=True, return_exit_layers=True)

    def run(alpha, gate):
        crit = HeadsCriterion(heads, alpha, gate=gate, fixed=16, candidates=4, sample=32)
        calls = []
        logits = heads.logits
        heads.logits = lambda k, h: calls.append(k) or logits(k, h)  # count full-head evaluations
        llm = LLM(bb, exit=crit, exit_threshold=0.0, num_kv_blocks=64, block_size=4, exit_mode=mode)
        out = llm.generate(prompts, params)
        del heads.logits
        return [o.token_ids for o in out], [o.exit_layers for o in out], calls

    tok_f, lay_f, calls_f = run(0.5, False)
    tok_g, lay_g, calls_g = run(0.5, "shortlist")
    assert all(x[1:] == [2] * 4 for x in lay_f)
    assert tok_g == tok_f and lay_g == lay_f and calls_g == calls_f
    tok_n, lay_n, calls_n = run(0.9, "shortlist")
    full = LLM(bb, num_kv_blocks=64, block_size=4).generate(prompts, params)
    assert tok_n == [o.token_ids for o in full] and all(set(x) == {6} for x in lay_n)
    assert calls_n == []  # the gate kept the never-firing head from being evaluated


def test_per_request_alpha_in_per_sequence_mode():
    """Each sequence exits by its own request's alpha, also when only some rows reach the head's check."""
    from exitwise.engine import LLM, SamplingParams
    from exitwise.exits.heads import HeadsCriterion

    bb = tiny(4)
    heads = ExitHeads(bb, layers=[2, 4], init="random", seed=1)
    # alpha 0.5: both heads always fire; alpha 0.8: only the head at layer 4 fires
    heads.meta["thresholds"] = {"max_coverage": {"0.5": [100.0, 100.0], "0.8": [None, 100.0]}}
    llm = LLM(bb, exit=HeadsCriterion(heads, alpha=0.8), exit_threshold=0.0, exit_mode="sequence",
              num_kv_blocks=64, block_size=4)

    def params(alpha):
        return SamplingParams(max_tokens=4, ignore_eos=True, return_exit_layers=True, exit_alpha=alpha)

    default, low = llm.generate([[5, 17, 33, 2, 8], [9, 1, 40]], [params(None), params(0.5)])
    assert default.exit_layers[1:] == [4, 4, 4]
    assert low.exit_layers[1:] == [2, 2, 2]  # its own alpha, though its batch mate cannot exit at 2
    # the engine's default alpha with a batch mate on a lower one: still the default's thresholds
    low2, default2 = llm.generate([[9, 1, 40], [5, 17, 33, 2, 8]], [params(0.5), params(None)])
    assert low2.exit_layers[1:] == [2, 2, 2] and default2.exit_layers[1:] == [4, 4, 4]
