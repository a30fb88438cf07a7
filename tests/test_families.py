"""The engine on the other decoder families (tiny random models, float32): Qwen2 (q/k/v biases), Qwen3
(per-head q/k norms), Llama 3 RoPE scaling and Gemma 3 (sandwich norms, (1 + w) norms, scaled
embeddings and queries, GELU-tanh, interleaved sliding-window / global layers with their own RoPE,
soft-capped logits): greedy tokens equal HF ``generate``, logits equal HF's forward."""

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, Qwen2Config, Qwen3Config

from engine_helpers import PROMPTS, engine_logits_vs_hf, greedy_equals_hf, hf_greedy
from exitwise.engine import LLM, SamplingParams
from exitwise.errors import ExitwiseError
from exitwise.models.backbone import Backbone

SHAPE = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256)
WINDOW = 8
# prompts longer and shorter than the sliding window, decoding past it
LONG_PROMPTS = PROMPTS + [list(range(50, 63))]


def _build(cfg, seed: int, name: str) -> Backbone:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # random norm weights (HF initialises them to 1, or 0 for Gemma's 1 + w), and
        for pname, p in model.named_parameters():  # Qwen2's q/k/v biases (initialised to 0)
            if "norm" in pname or pname.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.3)
        if not cfg.tie_word_embeddings:
            model.lm_head.weight.mul_(3.0)  # larger logit margins
    return Backbone(model, tokenizer=None, name=name)


def qwen2(seed=0, layers=3):
    return _build(Qwen2Config(num_hidden_layers=layers, tie_word_embeddings=False, **SHAPE), seed, "tiny-qwen2")


def qwen3(seed=0, layers=3):
    return _build(Qwen3Config(num_hidden_layers=layers, head_dim=24, tie_word_embeddings=False, **SHAPE), seed,
                  "tiny-qwen3")


def llama3(seed=0, layers=3):
    scaling = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    return _build(LlamaConfig(num_hidden_layers=layers, rope_scaling=scaling, **SHAPE), seed, "tiny-llama3")


def gemma3(seed=0, layers=4, softcap=2.0):
    types = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"][:layers]
    rope = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0}}
    cfg = Gemma3TextConfig(num_hidden_layers=layers, head_dim=16, query_pre_attn_scalar=24, sliding_window=WINDOW,
                           layer_types=types, rope_parameters=rope, final_logit_softcapping=softcap, **SHAPE)
    return _build(cfg, seed, "tiny-gemma3")


FAMILIES = {"qwen2": qwen2, "qwen3": qwen3, "llama3": llama3, "gemma3": gemma3}


@pytest.fixture(scope="module", params=list(FAMILIES))
def fam(request):
    return request.param, FAMILIES[request.param]()


def test_family_parts_are_read(fam):
    name, bb = fam
    model = LLM(bb, num_kv_blocks=8, block_size=4).engine.runner.model
    layer = model.layers[0]
    assert (layer.qkv_bias is not None) == (name == "qwen2")
    assert (layer.qk_norm is not None) == (name in ("qwen3", "gemma3"))
    assert (layer.mlp_out_norm is not None) == (name == "gemma3")
    if name == "gemma3":
        assert model.windows == [WINDOW, None, WINDOW, None] and set(model.other_rope) == {"sliding_attention"}
        assert model.scaling == 24 ** -0.5 and model.output.softcap == 2.0
        torch.testing.assert_close(layer.in_norm, 1 + bb.layers[0].input_layernorm.weight)
    else:
        assert model.windows == [None] * bb.num_layers and model.scaling is None


def test_greedy_equals_hf(fam):
    _, bb = fam
    greedy_equals_hf(bb, LONG_PROMPTS, 16)


def test_logits_equal_hf_forward(fam):
    _, bb = fam
    assert engine_logits_vs_hf(bb, LONG_PROMPTS, 12) <= 1e-4


def test_sliding_window_matters():
    """The window mask is doing something: the same Gemma weights without sliding layers differ."""
    bb = gemma3()
    llm = LLM(bb, num_kv_blocks=64, block_size=4)
    runner = llm.engine.runner
    runner.model.windows = [None] * bb.num_layers
    out = llm.generate([PROMPTS[2]], SamplingParams(max_tokens=12, ignore_eos=True))[0].token_ids
    assert engine_logits_vs_hf(bb, [PROMPTS[2]], 0) <= 1e-4  # a fresh engine is exact
    assert out != hf_greedy(bb, PROMPTS[2], 12)


def test_bfloat16_weights_close(fam):
    name, bb = fam
    if name not in ("qwen3", "gemma3"):
        pytest.skip("bfloat16 checked on the families with new layer parts")
    diff = engine_logits_vs_hf(bb, LONG_PROMPTS[:3], 4, weight_dtype="bfloat16")
    assert diff < 0.1, diff


def test_unsupported_fields_named():
    bb = gemma3(layers=2)
    bb.config.attn_logit_softcapping = 50.0
    with pytest.raises(ExitwiseError, match="attn_logit_softcapping"):
        LLM(bb, num_kv_blocks=8, block_size=4)
    bb = gemma3(layers=2)
    bb.config.hidden_activation = "relu"
    with pytest.raises(ExitwiseError, match="hidden_act"):
        LLM(bb, num_kv_blocks=8, block_size=4)
