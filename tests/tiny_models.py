"""The tiny random models the tests run on, in one place: a Llama of any depth and width (most tests'
model), tiny Qwen2, Gemma 3 and GPT-2 configs, and the decoder families the engine is checked on
(Qwen2, Qwen3, Llama 3 RoPE scaling, Gemma 3) with randomised norms. Every factory seeds torch first,
so a test gets the same weights on every call."""

import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig, GPT2Config, LlamaConfig, Qwen2Config, Qwen3Config

from exitwise.models.backbone import Backbone

DEFAULT_VOCAB = 97


def smollm2_tokenizer():
    """The real SmolLM2 tokenizer (no weights loaded), found the way the library finds the bundled model."""
    from transformers import AutoTokenizer

    from exitwise.models.loading import resolve

    return AutoTokenizer.from_pretrained(resolve("smollm2-135m")[1])


def random_model(cfg, seed: int = 0):
    """A Hugging Face causal LM with random float32 weights from ``cfg`` (torch seeded with ``seed``)."""
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)


def _vocab(vocab: int | None, tokenizer) -> int:
    return vocab if vocab is not None else len(tokenizer) if tokenizer is not None else DEFAULT_VOCAB


def llama_config(layers: int = 4, hidden: int = 64, vocab: int = DEFAULT_VOCAB, **kw) -> LlamaConfig:
    """A Llama ``hidden`` wide (MLP 2x), 4 query heads over 2 K/V heads; ``kw``: more config fields."""
    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, **kw)


def llama_model(layers: int = 4, hidden: int = 64, *, tokenizer=None, vocab: int | None = None, seed: int = 0,
                **kw):
    """The Hugging Face model of :func:`tiny_llama` (e.g. to quantise before wrapping it)."""
    return random_model(llama_config(layers, hidden, _vocab(vocab, tokenizer), **kw), seed)


def tiny_llama(layers: int = 4, hidden: int = 64, *, tokenizer=None, vocab: int | None = None, seed: int = 0,
               name: str | None = None, **kw) -> Backbone:
    """A random tiny Llama as a Backbone: vocabulary ``vocab``, else the tokenizer's, else 97."""
    model = llama_model(layers, hidden, tokenizer=tokenizer, vocab=vocab, seed=seed, **kw)
    return Backbone(model, tokenizer, name=name)


def engine_tiny(seed: int = 0, layers: int = 4) -> Backbone:
    """The engine tests' model: a 64-wide Llama with a 256-token context."""
    return tiny_llama(layers, seed=seed, name=f"tiny-{seed}-{layers}", max_position_embeddings=256)


def qwen2_config(vocab: int = DEFAULT_VOCAB) -> Qwen2Config:
    """A 4-layer Qwen2, 32 wide."""
    return Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def gpt2_config(vocab: int = DEFAULT_VOCAB) -> GPT2Config:
    """A 4-layer GPT-2, 32 wide."""
    return GPT2Config(vocab_size=vocab, n_embd=32, n_layer=4, n_head=4, n_positions=64)


def gemma3_config(vocab: int = DEFAULT_VOCAB, sliding: int = 4, max_positions: int = 64) -> Gemma3TextConfig:
    """A 4-layer Gemma 3, 32 wide, with a ``sliding``-token window and soft-capped logits."""
    return Gemma3TextConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=sliding,
                            max_position_embeddings=max_positions, final_logit_softcapping=30.0)


def random_backbone(cfg, *, tokenizer=None, seed: int = 0, name: str | None = None) -> Backbone:
    """A Backbone with random weights from any config (e.g. :func:`qwen2_config`)."""
    return Backbone(random_model(cfg, seed), tokenizer, name=name)


# ------------------------------------------------------------------ the engine's decoder families
# 64 wide; the families' own features (biases, q/k norms, sandwich norms, windows) switched on
FAMILY_SHAPE = dict(vocab_size=DEFAULT_VOCAB, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=256)
WINDOW = 8  # the sliding window of the families' sliding layers


def family_model(cfg, seed: int, name: str) -> Backbone:
    """A random model with random norm weights (HF initialises them to 1, or 0 for Gemma's 1 + w) and
    q/k/v biases (Qwen2's are initialised to 0), and a larger untied head (larger logit margins)."""
    model = random_model(cfg, seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname or pname.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.3)
        if not cfg.tie_word_embeddings:
            model.lm_head.weight.mul_(3.0)
    return Backbone(model, tokenizer=None, name=name)


def qwen2(seed=0, layers=3):
    return family_model(Qwen2Config(num_hidden_layers=layers, tie_word_embeddings=False, **FAMILY_SHAPE), seed,
                        "tiny-qwen2")


def qwen3(seed=0, layers=3):
    return family_model(Qwen3Config(num_hidden_layers=layers, head_dim=24, tie_word_embeddings=False, **FAMILY_SHAPE),
                        seed, "tiny-qwen3")


def llama3(seed=0, layers=3):
    scaling = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    return family_model(LlamaConfig(num_hidden_layers=layers, rope_scaling=scaling, **FAMILY_SHAPE), seed,
                        "tiny-llama3")


def gemma3(seed=0, layers=4, softcap=2.0):
    """Sliding and global layers interleaved, each kind with its own RoPE."""
    types = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"][:layers]
    rope = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0}}
    cfg = Gemma3TextConfig(num_hidden_layers=layers, head_dim=16, query_pre_attn_scalar=24, sliding_window=WINDOW,
                           layer_types=types, rope_parameters=rope, final_logit_softcapping=softcap, **FAMILY_SHAPE)
    return family_model(cfg, seed, "tiny-gemma3")


def all_sliding_gemma(seed=0, layers=3):
    """A Gemma 3 whose every layer slides."""
    rope = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}}
    cfg = Gemma3TextConfig(num_hidden_layers=layers, head_dim=16, query_pre_attn_scalar=24, sliding_window=WINDOW,
                           layer_types=["sliding_attention"] * layers, rope_parameters=rope, **FAMILY_SHAPE)
    return family_model(cfg, seed, "tiny-gemma3-sliding")


FAMILIES = {"qwen2": qwen2, "qwen3": qwen3, "llama3": llama3, "gemma3": gemma3}
