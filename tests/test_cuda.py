"""The CUDA path: the same computations on a GPU equal the CPU's (skipped without CUDA).

Run on a GPU machine with ``scripts/cuda_check.sh OUTDIR``. Tiny random models need no weights;
the real-model test uses the bundled SmolLM2 like every other real-model test.
"""

import os

import numpy as np
import pytest
import torch

from exitwise.models.backbone import Backbone
from tiny_models import tiny_llama

# EXITWISE_CUDA_TEST_DEVICE=cpu runs the same comparisons CPU against CPU (to check the tests themselves)
GPU = os.environ.get("EXITWISE_CUDA_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(GPU == "cuda" and not torch.cuda.is_available(), reason="needs CUDA")


def _tiny(device: str) -> Backbone:
    return tiny_llama(4, vocab=128, name="tiny").to(device)


def test_layerwise_logits_match_the_model_on_cuda():
    bb = _tiny(GPU)
    ids = torch.randint(0, 128, (3, 9), device=GPU)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    want = bb.model(input_ids=ids, attention_mask=mask).logits
    got = bb.logits(ids, mask)
    real = mask.bool()
    assert torch.allclose(got[real], want[real], atol=1e-4)


def test_engine_greedy_tokens_equal_on_cuda_and_cpu():
    from exitwise.engine import LLM
    from exitwise.engine.sampling import SamplingParams

    prompts = [[1, 5, 9, 2], [3, 3, 7], [11, 4, 4, 4, 8, 2]]
    params = SamplingParams(max_tokens=8, temperature=0.0)
    outs = {}
    for device in ("cpu", GPU):
        llm = LLM(_tiny(device), kv_cache_bytes=8 << 20, max_num_seqs=4)
        outs[device] = [o.token_ids for o in llm.generate(prompts, params)]
    assert outs[GPU] == outs["cpu"] and all(len(o) == 8 for o in outs["cpu"])


def test_adapter_drafts_and_training_on_cuda(tmp_path):
    """Adapter drafts on the device give full depth's tokens; an adapter trains on the device."""
    from exitwise.engine import LLM
    from exitwise.engine.sampling import SamplingParams
    from exitwise.heads.adapter import Adapter
    from exitwise.heads.adapter_train import build_cache, load_cache, train_adapter

    bb = _tiny(GPU)
    ad = Adapter(bb, 2, hidden=32, seed=1)
    cache = build_cache(bb, list(torch.randint(0, 128, (512,)).tolist()), [2], tmp_path / "cache", topk=8,
                        seq_len=64, progress=False)
    summary = train_adapter(bb, ad, load_cache(tmp_path / "cache", bb, 2), epochs=2, batch_tokens=128,
                            progress=False)
    assert cache["tokens"] == 512 and summary["steps"] == 8
    ad.save(tmp_path / "ad")
    prompts = [[1, 5, 9, 2], [3, 3, 7], [11, 4, 4, 4, 8, 2]]
    params = SamplingParams(max_tokens=8, temperature=0.0)
    ref = LLM(bb, kv_cache_bytes=8 << 20, max_num_seqs=4).generate(prompts, params)
    llm = LLM(bb, kv_cache_bytes=8 << 20, max_num_seqs=4, speculative=True, draft="adapter",
              draft_adapter=str(tmp_path / "ad"), adapter_threshold=0.0)
    assert [o.token_ids for o in llm.generate(prompts, params)] == [o.token_ids for o in ref]
    assert llm.engine.spec.stats.sources["adapter"].drafted > 0


def test_in_pass_raee_exits_equal_on_cuda_and_cpu():
    from exitwise.raee.layerwise import predict_in_pass
    from exitwise.raee.readouts.lm import LMReadout

    ids = [[1, 5, 9, 2, 7], [3, 3, 7], [11, 4, 4, 4, 8, 2], [6, 6]]
    for exit_layer in (1, 3):  # at the key layer, and resumed past it
        got = {}
        for device in ("cpu", GPU):
            bb = _tiny(device)
            got[device] = predict_in_pass(bb, ids, LMReadout(bb, [10, 20, 30]), 1,
                                          lambda keys, rows, e=exit_layer: np.full(len(keys), e), batch_size=2)
        assert np.array_equal(got[GPU][0], got["cpu"][0]) and (got[GPU][2] == exit_layer).all()
        assert np.allclose(got[GPU][1], got["cpu"][1], atol=1e-4)


@pytest.mark.real_model
def test_smollm_engine_on_cuda_matches_hf_generate():
    from exitwise import load_model
    from exitwise.engine import LLM
    from exitwise.engine.sampling import SamplingParams

    bb = load_model("smollm2-135m", device=GPU)
    prompt = bb.tokenizer("The capital of France is")["input_ids"]
    ids = torch.tensor([prompt], device=GPU)
    want = bb.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=12, pad_token_id=0)[0, len(prompt):].tolist()
    out = LLM(bb, kv_cache_bytes=64 << 20).generate([prompt], SamplingParams(max_tokens=12, temperature=0.0))
    assert out[0].token_ids == want


@pytest.mark.parametrize("dtype", ["bfloat16", "int8", "int4"])
def test_weight_dtypes_run_on_cuda_or_fall_back_to_bfloat16_saying_so(dtype):
    """Every --dtype runs on the device: with its own kernel where the device has one, else bfloat16
    with a one-line warning naming the dtype (int4's kernel is CPU-only)."""
    import warnings

    from exitwise.engine import LLM
    from exitwise.engine.sampling import SamplingParams
    from exitwise.models.quantize import kernel_supported

    prompts = [[1, 5, 9, 2], [3, 3, 7]]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        llm = LLM(_tiny(GPU), kv_cache_bytes=8 << 20, max_num_seqs=4, weight_dtype=dtype)
    used = llm.engine.runner.model.weight_dtype
    if kernel_supported(dtype, GPU):
        assert used == dtype
    else:
        assert used == "bfloat16" and any(dtype in str(w.message) for w in caught)
    outs = [o.token_ids for o in llm.generate(prompts, params)]
    assert all(len(o) == 6 and all(0 <= t < 128 for t in o) for o in outs)
    ref = LLM(_tiny(GPU), kv_cache_bytes=8 << 20, max_num_seqs=4).generate(prompts, params)
    assert sum(o[0] == r.token_ids[0] for o, r in zip(outs, ref, strict=True)) >= 1  # close to float32
