"""What differs between the decoder families the engine runs (Llama 1-3, Qwen2, Qwen3, Gemma 3), read
from a Hugging Face model once, so that :mod:`exitwise.models.llama` has one layer function with a few
optional steps instead of a class per family.

The differences, and where the layer maths uses them:

* RMSNorm convention: Llama/Qwen scale by ``w``, Gemma by ``1 + w``. :func:`norm_weight` measures which
  one a norm module computes and returns the multiplicative weight, so the engine keeps a single
  ``rms(x) * weight`` everywhere (and the input-norm folding of state propagation stays valid).
* per-head q/k RMSNorm before RoPE (Qwen3, Gemma 3): ``self_attn.q_norm`` / ``k_norm``.
* sandwich norms (Gemma 3): the attention and MLP outputs are normalised before their residual adds
  (``post_attention_layernorm`` / ``post_feedforward_layernorm``); the MLP input norm is
  ``pre_feedforward_layernorm`` there and ``post_attention_layernorm`` in Llama.
* the MLP activation (SiLU, GELU-tanh), the query scale (``self_attn.scaling``: Gemma uses
  ``query_pre_attn_scalar ** -0.5``), the embedding scale (Gemma: sqrt(hidden_size)) and final logit
  soft-capping (Gemma).
* per-layer attention kind (``config.layer_types``): sliding-window layers attend to the last
  ``sliding_window`` positions only and may have their own RoPE table (Gemma 3: local base frequency).

Biases on q/k/v (Qwen2) need nothing here (the fused projection carries them) and Llama 3's RoPE
scaling lives in the HF rotary module whose tables the engine uses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from exitwise.errors import ExitwiseError

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"),
}


def norm_eps(module) -> float:
    eps = getattr(module, "variance_epsilon", None)
    return float(module.eps if eps is None else eps)


@torch.no_grad()
def norm_weight(module, what: str) -> torch.Tensor:
    """The multiplicative weight of an RMSNorm module: ``w`` (Llama, Qwen) or ``1 + w`` (Gemma),
    decided by running the module on a probe rather than by model type."""
    w = module.weight
    x = torch.randn(3, w.shape[-1], generator=torch.Generator().manual_seed(0)).to(w.device, w.dtype)
    y = module(x)
    base = F.rms_norm(x, (w.shape[-1],), None, norm_eps(module))
    for cand in (w, 1.0 + w):
        if torch.allclose(y, base * cand, atol=1e-5, rtol=1e-4):
            return cand.detach().contiguous()
    raise ExitwiseError(f"{what} ({type(module).__name__}) is neither rms(x) * w nor rms(x) * (1 + w); "
                        f"the engine does not compute it")


def attention_shape(cfg) -> tuple[int, int, int]:
    """(query heads, K/V heads, head_dim) of a Hugging Face config: the one place they are read."""
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    return heads, kv_heads, getattr(cfg, "head_dim", None) or cfg.hidden_size // heads


@dataclass
class Family:
    """A model's per-family parts (see the module docstring)."""

    act: Callable[[torch.Tensor], torch.Tensor]
    scaling: float | None  # SDPA scale; None: the default head_dim ** -0.5
    windows: list[int | None]  # per layer: sliding window (a query sees its last `window` positions) or None
    rope_kinds: list[str]  # per layer: which RoPE table (a key of the rotary module's layer types)
    main_kind: str  # the table StepContext.cos/sin hold; the others ride in StepContext.other_rope
    embed_scale: torch.Tensor | None  # multiplies the embedding rows (Gemma: sqrt(hidden_size))
    softcap: float | None  # final logits -> tanh(logits / c) * c
    sandwich: bool  # post-attention / post-feedforward output norms (Gemma 3)
    qk_norm: bool  # per-head q/k norms before RoPE (Qwen3, Gemma 3)


def describe(backbone) -> Family:
    """The family parts of ``backbone``; refuses, naming the field, what the engine does not compute."""
    cfg = backbone.config
    if backbone.is_gpt2 or not hasattr(backbone.layers[0], "self_attn"):
        raise ExitwiseError(f"the engine runs Llama-family decoders; {backbone.name} ({cfg.model_type}) is not one")
    layer = backbone.layers[0]
    a = layer.self_attn
    needed = ("q_proj", "k_proj", "v_proj", "o_proj")
    if not all(hasattr(a, n) for n in needed) or not hasattr(layer.mlp, "gate_proj"):
        raise ExitwiseError(f"model_type={cfg.model_type!r} has no Llama-style attention/MLP modules")
    act_name = getattr(cfg, "hidden_activation", None) or getattr(cfg, "hidden_act", "silu")
    if act_name not in ACTIVATIONS:
        raise ExitwiseError(f"hidden_act={act_name!r} is not supported by the engine ({', '.join(ACTIVATIONS)})")
    if getattr(cfg, "mlp_bias", False):
        raise ExitwiseError("mlp_bias=True is not supported by the engine")
    if getattr(a.o_proj, "bias", None) is not None:
        raise ExitwiseError("attention_bias=True with an o_proj bias is not supported by the engine")
    if getattr(cfg, "attn_logit_softcapping", None) is not None:
        raise ExitwiseError("attn_logit_softcapping is not supported by the engine")
    if getattr(cfg, "use_bidirectional_attention", False):
        raise ExitwiseError("use_bidirectional_attention=True is not supported by the engine")
    types = list(backbone.layer_types)
    if getattr(cfg, "layer_types", None) is None and getattr(cfg, "sliding_window", None) is not None:
        # e.g. Mistral: every layer slides, but without layer_types the backbone calls them full
        raise ExitwiseError("sliding_window without layer_types is not supported by the engine")
    unknown = set(types) - {"full_attention", "sliding_attention"}
    if unknown:
        raise ExitwiseError(f"layer_types {sorted(unknown)} are not supported by the engine")
    window = getattr(cfg, "sliding_window", None)
    if "sliding_attention" in types and not window:
        raise ExitwiseError("layer_types has sliding_attention layers but sliding_window is not set")
    windows = [int(window) if t == "sliding_attention" else None for t in types]
    rope_kinds = types if backbone._rope_by_type else ["full_attention"] * len(types)
    main = "full_attention" if "full_attention" in rope_kinds else rope_kinds[0]
    head_dim = attention_shape(cfg)[2]
    scaling = float(getattr(a, "scaling", head_dim ** -0.5))
    scale = getattr(backbone.embed_tokens, "embed_scale", None)
    if scale is not None and not isinstance(scale, torch.Tensor):
        scale = torch.tensor(float(scale))
    qk = hasattr(a, "q_norm") != hasattr(a, "k_norm")
    if qk:
        raise ExitwiseError("a q_norm without a k_norm (or the reverse) is not supported by the engine")
    return Family(
        act=ACTIVATIONS[act_name],
        scaling=None if scaling == head_dim ** -0.5 else scaling,
        windows=windows, rope_kinds=rope_kinds, main_kind=main,
        embed_scale=None if scale is None else scale.to(backbone.embed_tokens.weight.dtype),
        softcap=getattr(cfg, "final_logit_softcapping", None),
        sandwich=hasattr(layer, "post_feedforward_layernorm"),
        qk_norm=hasattr(a, "q_norm"),
    )
