"""Weight dtypes of the engine (bfloat16, int8 weight-only): close to float32, and float32 unchanged."""

import pytest
import torch
import torch.nn.functional as F

from exitwise.engine import LLM, SamplingParams
from exitwise.engine.config import EngineConfig
from exitwise.models.llama import LowPrecisionLinear, int8_supported


@pytest.mark.parametrize("dtype,tol", [("bfloat16", 0.01), ("int8", 0.02)])
def test_low_precision_linear_is_close_to_float32(dtype, tol):
    if dtype == "int8" and not int8_supported(torch.device("cpu")):
        pytest.skip("needs CUDA")  # (not reached on x86 CPUs with this torch)
    gen = torch.Generator().manual_seed(0)
    w, b, x = torch.randn(96, 64, generator=gen), torch.randn(96, generator=gen), torch.randn(5, 64, generator=gen)
    y = LowPrecisionLinear(w, b, dtype)(x)
    want = F.linear(x, w, b)
    assert y.dtype == torch.float32 and y.shape == want.shape
    assert (y - want).norm() / want.norm() < tol
    assert not torch.equal(y, want)  # it really is another computation


def test_int8_weights_are_a_quarter_of_the_bytes():
    w = torch.randn(128, 64)
    lin = LowPrecisionLinear(w, None, "int8")
    assert lin.weight.dtype == torch.int8 and lin.weight.numel() * lin.weight.element_size() == w.numel()


@pytest.mark.real_model
@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_smollm_low_precision_engine_agrees_with_float32(smollm, dtype):
    """Teacher-forced next-token argmax of the whole prompt (prefill logits) and a greedy continuation."""
    prompts = ["The capital of France is", "In 1905 Albert Einstein published", "The river flows into the"]
    params = SamplingParams(max_tokens=12)
    ref = LLM(smollm, EngineConfig(kv_cache_bytes=64 << 20)).generate(prompts, params)
    low = LLM(smollm, EngineConfig(kv_cache_bytes=64 << 20, weight_dtype=dtype))
    assert low.engine.runner.model.weight_dtype == dtype
    out = low.generate(prompts, params)
    same = sum(a == b for r, o in zip(ref, out, strict=True) for a, b in zip(r.token_ids, o.token_ids, strict=True))
    assert same / sum(len(r.token_ids) for r in ref) >= 0.75  # greedy continuations diverge only late, if at all
    assert all(o.token_ids[0] == r.token_ids[0] for r, o in zip(ref, out, strict=True))


def test_bad_dtype_is_refused():
    with pytest.raises(ValueError, match="weight dtype"):
        EngineConfig(weight_dtype="fp8")
