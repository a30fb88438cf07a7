"""benchmarks/engine.py's weight-dtype and llama.cpp systems on a tiny trace: the JSON keys they add,
agreement and perplexity per dtype, the ratios, and llama.cpp's timing loop and its "skipped" path
(with llama-cpp-python absent or replaced by a stand-in, so no test needs `make peer`)."""

import importlib.util
import math
import sys
import types
from pathlib import Path

import pytest

from exitwise.analysis.perplexity import text_tokens
from exitwise.engine import LLM

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "engine.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_engine", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_llamacpp_is_skipped_saying_so_when_not_installed(bench, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # `import llama_cpp` raises ImportError
    peer, info = bench.llamacpp_peer("smollm2-135m", threads=1, n_ctx=256)
    assert peer is None
    assert info == {"skipped": "llama.cpp (make peer) not installed: skipping llamacpp_b1"}
    assert capsys.readouterr().out.strip() == info["skipped"]
    ratios = bench.dtype_ratios({"full_b1": {"tokens_per_s": 10.0}, "int8_b1": {"tokens_per_s": 15.0},
                                 "llamacpp_b1": info})
    assert ratios["int8_vs_full_b1"] == 1.5 and ratios["int8_b1_vs_llamacpp_b1"] is None


class FakeLlama:
    """Stands in for llama_cpp.Llama: an endless greedy stream (EOS among it), remembering its calls."""

    lib = None  # the fake llama_cpp.llama_cpp, whose model parameters the constructor reads

    def __init__(self, **kwargs):
        self.kwargs, self.resets, self.prompts = kwargs, 0, []
        self.model_params = FakeLlama.lib.llama_model_default_params()

    def reset(self):
        self.resets += 1

    def generate(self, tokens, temp=0.8, repeat_penalty=1.1, **kw):
        assert temp == 0.0 and repeat_penalty == 1.0  # greedy, no penalty
        self.prompts.append(list(tokens))
        tok = tokens[-1]
        while True:
            tok = 2 if tok % 5 == 0 else tok + 1  # 2 is SmolLM2's EOS: the stream goes on past it
            yield tok


@pytest.fixture
def fake_llama_cpp(monkeypatch):
    lib = types.SimpleNamespace(llama_model_default_params=lambda: types.SimpleNamespace(use_extra_bufts=True))
    monkeypatch.setattr(FakeLlama, "lib", lib)
    monkeypatch.setitem(sys.modules, "llama_cpp", types.SimpleNamespace(Llama=FakeLlama, llama_cpp=lib,
                                                                          __version__="fake"))
    return lib


def test_llamacpp_loads_without_extra_buffers_only_where_the_defaults_crash(bench, fake_llama_cpp, capsys):
    probed = []
    peer, info = bench.llamacpp_peer("smollm2-135m", threads=1, n_ctx=256, probe=lambda g: probed.append(g) or 0)
    assert peer.model_params.use_extra_bufts is True and info["extra_buffer_types"] is True
    assert probed and probed[0].suffix == ".gguf" and capsys.readouterr().out == ""
    peer, info = bench.llamacpp_peer("smollm2-135m", threads=1, n_ctx=256, probe=lambda g: -11)  # SIGSEGV
    assert peer.model_params.use_extra_bufts is False
    assert info["extra_buffer_types"] is False and info["default_buffers_status"] == -11
    assert "use_extra_bufts=False" in capsys.readouterr().out
    assert fake_llama_cpp.llama_model_default_params().use_extra_bufts is True  # unwrapped again


def test_llamacpp_runs_are_greedy_full_length_and_timed_like_full_b1(bench, fake_llama_cpp):
    peer, info = bench.llamacpp_peer("smollm2-135m", threads=1, n_ctx=256, probe=lambda g: 0)
    assert isinstance(peer, FakeLlama) and info["gguf"].endswith(".gguf") and info["llama_cpp"] == "fake"
    assert Path(peer.kwargs["model_path"]).is_file()
    assert peer.kwargs["n_threads"] == 1 and peer.kwargs["logits_all"] is False and peer.kwargs["n_ctx"] == 256
    res = bench.run_llamacpp(peer, [[10, 11], [20, 21, 22]], max_tokens=6, num_layers=30)
    assert res["outputs"] == [[12, 13, 14, 15, 2, 3], [23, 24, 25, 2, 3, 4]]  # exactly 6 each, past EOS
    assert peer.resets == 2 and peer.prompts == [[10, 11], [20, 21, 22]]
    assert res["tokens"] == 12 and res["tokens_per_s"] == pytest.approx(12 / res["wall_s"])
    assert res["mean_exit_layer"] == 30 and res["ttft_s"] > 0


@pytest.mark.real_model
def test_dtype_systems_report_speed_agreement_and_perplexity(bench, smollm, data_dir):
    prompts = bench.make_trace(smollm.tokenizer, 3, prompt_len=16, max_tokens=5)
    llms = {"full": LLM(smollm, num_kv_blocks=48, max_num_seqs=3)} | {
        name: LLM(smollm, num_kv_blocks=48, max_num_seqs=3, weight_dtype=d) for name, d in bench.LOW_DTYPES.items()}
    assert llms["int8"].engine.runner.model.weight_dtype == "int8"
    best = {"full": bench.run_engine(llms["full"], prompts, [0] * 3, 5),
            "full_b1": bench.run_engine(llms["full"], prompts[:2], bench.b1_arrivals(2), 5)}
    best |= bench.dtype_runs(llms, prompts, n_b1=2, max_tokens=5)
    best["llamacpp_b1"] = {"outputs": [p[:5] for p in prompts[:2]], "tokens_per_s": 1.0}  # a peer echoing prompts
    results = bench.baseline_results(best, best["full"]["outputs"], n_b1=2)
    assert set(results) == {"full", "full_b1", "bf16", "bf16_b1", "int8", "int8_b1", "int4", "int4_b1", "llamacpp_b1"}
    assert results["full"]["agreement"] == 1.0 and results["full_b1"]["agreement"] == 1.0
    assert results["llamacpp_b1"]["agreement"] < 0.5  # scored against the first 2 references, not all 3
    for name in ("bf16", "bf16_b1", "int8", "int8_b1", "int4", "int4_b1"):
        r = results[name]
        assert "outputs" not in r and r["tokens"] == (15 if "b1" not in name else 10) and r["tokens_per_s"] > 0
        assert 0.0 <= r["agreement"] <= 1.0 and r["saving"] == 0.0
    ids = text_tokens(smollm.tokenizer, data_dir / "text" / "test.txt", 256, seed=0)
    ppl = bench.dtype_perplexities(llms, ids, window=128)
    assert set(ppl) == set(bench.DTYPE_SYSTEMS)
    assert all(p["tokens"] == 254 and p["windows"] == 2 and math.isfinite(p["perplexity"]) for p in ppl.values())
    for name in bench.LOW_DTYPES:
        assert ppl[name]["perplexity"] == pytest.approx(ppl["full"]["perplexity"], rel=0.05)
        assert ppl[name]["perplexity"] != ppl["full"]["perplexity"]
        assert 0.9 <= ppl[name]["top1_agreement_with_float32"] < 1.0
    assert ppl["full"]["top1_agreement_with_float32"] == 1.0
    from exitwise.models import kernels as lowbit

    # where the batch-invariant kernel runs it takes every row count, so the batch-1 arithmetic gives the
    # 128-row windows the same logits; aten's kernels and the bfloat16 copy (no kernel) differ
    invariant = lowbit.ready()
    for name in ("int8", "int4"):  # the batch-1 arithmetic, scored on the same tokens
        kernels = ppl[name]["int_kernels"]
        assert (kernels["perplexity"] == ppl[name]["perplexity"]) == invariant
        assert 0.9 <= kernels["top1_agreement_with_float32"] < 1.0
    ratios = bench.dtype_ratios(results)
    assert ratios["int8_vs_full_b8"] == pytest.approx(results["int8"]["tokens_per_s"] / results["full"]["tokens_per_s"])
    assert ratios["int8_b1_vs_llamacpp_b1"] == pytest.approx(results["int8_b1"]["tokens_per_s"])
