"""Weight dtypes (bfloat16, int8 weight-only): close to float32, one set of tensors for the HF forward
and the engine, cached quantised weights that are rebuilt rather than misread, float32 unchanged."""

import json

import pytest
import torch
import torch.nn.functional as F

from exitwise.engine import LLM, LLMEngine, SamplingParams
from exitwise.engine.config import EngineConfig
from exitwise.errors import ExitwiseError
from exitwise.models import kernels
from exitwise.models.backbone import Backbone
from exitwise.models.quantize import (
    BATCH_ROWS,
    INT4_GROUP,
    QuantizedLinear,
    StackedLinear,
    auto_dtype,
    int_kernels_only,
    quantize_model,
    top_indices,
)
from tiny_models import llama_model


def tiny_model(seed: int = 0, tie: bool = True):
    return llama_model(3, seed=seed, max_position_embeddings=128, tie_word_embeddings=tie).eval()


@pytest.mark.parametrize("dtype,tol", [("bfloat16", 0.01), ("int8", 0.02), ("int4", 0.15)])
def test_quantized_linear_is_close_to_float32(dtype, tol):
    gen = torch.Generator().manual_seed(0)
    w, b, x = torch.randn(96, 64, generator=gen), torch.randn(96, generator=gen), torch.randn(2, 5, 64, generator=gen)
    lin = QuantizedLinear.from_float(w, b, dtype)
    y = lin(x)
    want = F.linear(x, w, b)
    assert y.dtype == torch.float32 and y.shape == want.shape
    assert (y - want).norm() / want.norm() < tol
    assert not torch.equal(y, want)  # it really is another computation
    assert (lin.dequantize() - w).abs().max() < (0.3 if dtype == "int4" else 0.05) * w.abs().max()
    rows = torch.tensor([3, 0, 95])
    assert torch.equal(lin.dequantize(rows), lin.dequantize()[rows])


def test_int8_weights_are_a_quarter_of_the_bytes_and_stack_exactly():
    w = torch.randn(128, 64)
    lin = QuantizedLinear.from_float(w, None, "int8")
    assert lin.weight.dtype == torch.int8 and lin.weight.numel() * lin.weight.element_size() == w.numel()
    # per-row scales: quantising stacked rows equals stacking the quantised parts (fused Q|K|V)
    a, b = QuantizedLinear.from_float(w[:40], None, "int8"), QuantizedLinear.from_float(w[40:], None, "int8")
    both = QuantizedLinear.cat([a, b])
    assert torch.equal(both.weight, lin.weight) and torch.equal(both.scale, lin.scale)
    mixed = QuantizedLinear.cat([a, QuantizedLinear.from_float(w[40:], None, "bfloat16")])
    assert isinstance(mixed, StackedLinear) and mixed.out_features == 128  # each part in its own layout


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_batch_copy_serves_many_rows_and_leaves_one_row_on_the_int_kernel(dtype, monkeypatch):
    # aten's kernels and the copy: where exitwise's own kernel runs it takes these sizes first
    # (test_lowbit_kernel.py covers the two together)
    monkeypatch.setattr(kernels, "enabled", False)
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(64, 96, generator=gen)
    plain = QuantizedLinear.from_float(w, None, dtype)
    dual = QuantizedLinear.from_float(w, None, dtype)
    dual.add_batch_copy()
    assert dual.batch_weight.dtype == torch.bfloat16 and "batch_weight" not in dual.state_dict()
    one, many = torch.randn(1, 96, generator=gen), torch.randn(BATCH_ROWS, 96, generator=gen)
    assert torch.equal(dual(one), plain(one))  # one row: the int kernel, its bytes only
    assert not torch.equal(dual(many), plain(many))  # many rows: the bfloat16 copy
    torch.testing.assert_close(dual(many), plain(many), rtol=0.02, atol=0.05)
    with int_kernels_only():  # how a prefill-based measurement scores the batch-1 arithmetic
        assert torch.equal(dual(many), plain(many))
    assert not torch.equal(dual(many), plain(many))


def four_bit(w: torch.Tensor) -> torch.Tensor:
    """``w`` rounded to a Q4_1-style grid per 32 columns (min + d q, q in 0..15), as a GGUF stores it."""
    g = w.view(w.shape[0], -1, INT4_GROUP)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    d = (hi - lo) / 15
    return (lo + torch.round((g - lo) / d) * d).view_as(w)


def test_auto_is_int4_only_for_weights_that_are_already_4_bit():
    model = tiny_model()
    assert auto_dtype(model) == "float32"  # trained-float weights: never quantised without being asked
    with torch.no_grad():
        for layer in model.model.layers:
            for m in layer.modules():
                if isinstance(m, torch.nn.Linear):
                    m.weight.copy_(four_bit(m.weight))
    assert auto_dtype(model) == "int4"
    assert QuantizedLinear.int4_is_lossless(model.model.layers[0].mlp.down_proj.weight)


def test_int4_recovers_weights_that_came_from_4_bit_blocks():
    """A Q4_1-style weight (per group of 32: min + d * q, q in 0..15, the min and max levels used) comes
    back exactly, up to the bfloat16 rounding of scales and zeros; an arbitrary one does not."""
    gen = torch.Generator().manual_seed(0)
    n, k = 32, 128
    q = torch.randint(0, 16, (n, k // INT4_GROUP, INT4_GROUP), generator=gen)
    q[..., 0], q[..., 1] = 0, 15
    d = (torch.rand(n, k // INT4_GROUP, 1, generator=gen) * 0.02 + 0.01).bfloat16().float()
    lo = (-8 * d).bfloat16().float()
    w = (lo + d * q).view(n, k)
    def err(dtype):
        return float((QuantizedLinear.from_float(w, None, dtype).dequantize() - w).norm() / w.norm())

    assert err("int4") < 0.003  # the bfloat16 read-back of dequantize() only (bfloat16 itself: ~0.0013)
    assert err("int8") > 2 * err("int4")
    with pytest.raises(ValueError, match="divisible"):
        QuantizedLinear.from_float(torch.randn(16, 40), None, "int4")


def test_quantize_model_swaps_every_decoder_matmul_and_the_head_only():
    model = tiny_model()
    ref = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert quantize_model(model, "int8") == "int8"
    kinds = {name: type(m).__name__ for name, m in model.named_modules() if name.endswith("_proj") or name == "lm_head"}
    assert len(kinds) == 3 * 7 + 1 and set(kinds.values()) == {"QuantizedLinear"}
    assert model.model.embed_tokens.weight.dtype == torch.float32  # embeddings and norms stay float32
    bb = Backbone(model)
    assert bb.weight_dtype == "int8" and bb.dtype == torch.float32
    out = model(torch.tensor([[1, 2, 3, 4]])).logits  # the HF forward runs on the quantised modules
    assert out.dtype == torch.float32 and not torch.equal(out, ref)
    assert (out - ref).norm() / ref.norm() < 0.05
    rows = torch.tensor([5, 9])
    h = torch.randn(2, 64)
    assert torch.allclose(bb.readout(h, rows), bb.readout(h)[:, rows], atol=0.05, rtol=0.05)


@pytest.mark.parametrize("dtype", ["bfloat16", "int8", "int4"])
def test_engine_on_a_quantised_model_equals_the_engine_quantising_itself(dtype):
    """load_model(dtype=) and EngineConfig(weight_dtype=) are the same computation, bit for bit."""
    prompts, params = [[5, 6, 7, 8, 9], [1, 2, 3, 40, 41, 42, 43]], SamplingParams(max_tokens=10, ignore_eos=True)
    by_engine = LLM(Backbone(tiny_model(), name="tiny"), weight_dtype=dtype)
    low = tiny_model()
    quantize_model(low, dtype)
    by_load = LLM(Backbone(low, name="tiny"))
    assert by_load.engine.runner.model.weight_dtype == dtype
    assert by_load.engine.runner.output.lowp.weight_dtype == ("int8" if dtype == "int4" else dtype)
    a = [o.token_ids for o in by_engine.generate(prompts, params)]
    b = [o.token_ids for o in by_load.generate(prompts, params)]
    assert a == b
    x = torch.randn(3, 64)
    assert torch.equal(by_engine.engine.runner.logits(x), by_load.engine.runner.logits(x))
    with pytest.raises(ExitwiseError, match="loaded with"):
        LLMEngine(Backbone(low, name="tiny"), weight_dtype="float32")


@pytest.mark.parametrize("tie", [True, False])
def test_head_rescore_gives_float32_logits_for_the_top_rows(tie):
    bb = Backbone(tiny_model(tie=tie), name="tiny")
    ref = LLMEngine(bb).runner.logits
    h = torch.randn(4, 64) * 3
    plain = LLMEngine(bb, weight_dtype="int8", head_rescore=0).runner.logits(h)
    res = LLMEngine(bb, weight_dtype="int8", head_rescore=5).runner.logits(h)
    want = ref(h)
    top = plain.topk(5, dim=-1).indices  # the rows the int8 logits put first are the re-scored ones
    assert torch.allclose(res.gather(1, top), want.gather(1, top), atol=1e-5)
    assert not torch.allclose(plain.gather(1, top), want.gather(1, top), atol=1e-5)
    assert torch.equal(res.argmax(-1), want.argmax(-1))


@pytest.mark.parametrize("v", [100, 64 * 70, 64 * 70 + 13, 151936])
def test_top_indices_finds_the_same_entries_as_topk(v):
    g = torch.Generator().manual_seed(v)
    x = torch.randn(3, v, generator=g)
    x[1] = x[1].round()  # many ties: any k of the tied largest values will do
    x[2, -5:] = 100  # the largest entries in the last, partial chunk
    got = top_indices(x, 16)
    assert got.shape == (3, 16) and all(len(set(r.tolist())) == 16 for r in got)  # distinct ids
    want = x.topk(16, dim=-1).values
    assert torch.equal(x.gather(1, got).sort(-1, descending=True).values, want)


def test_quantised_cache_is_reused_and_rebuilt_when_its_manifest_differs(tmp_path):
    source = {"model": "tiny", "files": {"model.safetensors": [1, 2]}}
    cache = tmp_path / "quantized" / "weights-int8.safetensors"
    first = tiny_model()
    quantize_model(first, "int8", cache, source)
    meta = json.loads(cache.with_suffix(".json").read_text())
    assert meta["dtype"] == "int8" and meta["source"] == source and cache.is_file()
    # a cached file is what the second load uses: poison it (and its checksum) to see
    from safetensors.torch import load_file, save_file

    from exitwise.artifacts import sha256_file

    tensors = load_file(str(cache))
    key = "model.layers.0.self_attn.q_proj.weight"
    tensors[key] = torch.zeros_like(tensors[key])
    save_file(tensors, str(cache))
    cache.with_suffix(".json").write_text(json.dumps({**meta, "sha256": sha256_file(cache)}))
    second = tiny_model()
    quantize_model(second, "int8", cache, source)
    assert torch.count_nonzero(second.model.layers[0].self_attn.q_proj.weight) == 0
    # other float32 weights (another source): rebuilt from the model, never the stale file
    third = tiny_model()
    other = {**source, "files": {"model.safetensors": [1, 3]}}
    quantize_model(third, "int8", cache, other)
    assert torch.equal(third.model.layers[0].self_attn.q_proj.weight, first.model.layers[0].self_attn.q_proj.weight)
    assert json.loads(cache.with_suffix(".json").read_text())["source"]["files"]["model.safetensors"] == [1, 3]
    # a damaged file with a valid manifest: rebuilt too, with a warning
    cache.write_bytes(b"not a safetensors file")
    fourth = tiny_model()
    with pytest.warns(UserWarning, match="does not match its checksum"):
        quantize_model(fourth, "int8", cache, other)
    assert torch.equal(fourth.model.layers[0].self_attn.q_proj.weight, first.model.layers[0].self_attn.q_proj.weight)


@pytest.mark.real_model
# 36 tokens: a floor that a broken kernel fails by far; the measured rates are in benchmarks/kernels.py's
# output (int4, int8 activations: 95.9% on 1000 tokens)
@pytest.mark.parametrize("dtype,least", [("bfloat16", 0.95), ("int8", 0.9), ("int4", 0.9)])
def test_smollm_low_precision_engine_agrees_with_float32(smollm, dtype, least):
    """Teacher-forced: after each prefix of float32's greedy continuations, the next token agrees (one
    early divergence does not decide the rest, as it would comparing two free-running continuations)."""
    prompts = ["The capital of France is", "In 1905 Albert Einstein published", "The river flows into the"]
    ref = LLM(smollm, EngineConfig(kv_cache_bytes=64 << 20)).generate(prompts, SamplingParams(max_tokens=12))
    low = LLM(smollm, EngineConfig(kv_cache_bytes=64 << 20, weight_dtype=dtype))
    assert low.engine.runner.model.weight_dtype == dtype
    ids = [smollm.tokenizer(p)["input_ids"] for p in prompts]
    contexts = [p + r.token_ids[:k] for p, r in zip(ids, ref, strict=True) for k in range(len(r.token_ids))]
    want = [t for r in ref for t in r.token_ids]
    got = [o.token_ids[0] for o in low.generate(contexts, SamplingParams(max_tokens=1, ignore_eos=True))]
    assert sum(a == b for a, b in zip(got, want, strict=True)) / len(want) >= least


@pytest.mark.real_model
def test_load_model_int8_reads_the_bundled_gguf_and_generates():
    # straight from the GGUF (models/gguf.py); the quantised-weights cache serves models without one
    # (tests/test_robustness_files.py checks it)
    from exitwise import load_model

    bb = load_model("smollm2-135m", dtype="int8")
    assert bb.weight_dtype == "int8"
    out = LLM(bb).generate(["The capital of France is"], SamplingParams(max_tokens=4))[0]
    assert "Paris" in out.text
    with pytest.raises(ValueError, match="dtype must be one of"):
        load_model("smollm2-135m", dtype="fp8")


def test_bad_dtype_is_refused():
    with pytest.raises(ValueError, match="weight dtype"):
        EngineConfig(weight_dtype="fp8")
    with pytest.raises(ValueError, match="head_rescore"):
        EngineConfig(head_rescore=-1)
