"""A decoder-only transformer, run layer by layer.

Every early-exit method in exitwise needs the same three operations on a causal LM: embed tokens,
run layers ``[a, b)``, and read out logits at any depth (final norm + output head, optionally only a
few vocabulary rows). ``Backbone`` wraps a Hugging Face model and exposes exactly those, calling the
model's own modules so that running all layers reproduces ``model(...)`` to float32 round-off.

Layer index convention (used everywhere in exitwise): hidden state ``0`` is the embedding output and
hidden state ``l`` (1..L) is the output of decoder layer ``l``. A readout "at layer l" applies the
final norm and head to hidden state ``l``; at ``l = L`` that is the model's own output.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import DynamicCache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from exitwise.models.quantize import float_weight, weight_dtype_of


@dataclass
class LayerState:
    """What a batch carries from layer to layer (one forward pass, no KV cache)."""

    hidden: torch.Tensor  # (B, T, D)
    position_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T), 1 = real token
    masks: dict[str, torch.Tensor | None] = field(default_factory=dict)  # per layer type, 4-D or None
    rope: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # per layer type
    layer: int = 0  # index of the hidden state held in ``hidden``
    cache: DynamicCache | None = None  # keys/values of a shared prefix (see Backbone.prefill)
    prefix_layers: int | None = None  # how many layers the prefix in ``cache`` covers


@dataclass
class Prefix:
    """Keys and values of a token prefix shared by many prompts (few-shot demonstrations, an
    instruction, a chat header), computed once and reused for every batch."""

    token_ids: list[int]
    keys: list[torch.Tensor]  # per layer (1, H_kv, P, d_head)
    values: list[torch.Tensor]

    def __len__(self) -> int:
        return len(self.token_ids)


def common_prefix(token_ids: list[list[int]], keep: int = 1) -> list[int]:
    """Longest token prefix shared by all prompts, leaving at least ``keep`` tokens of each."""
    if not token_ids:
        return []
    limit = min(len(t) for t in token_ids) - keep
    first = token_ids[0]
    n = 0
    while n < limit and all(t[n] == first[n] for t in token_ids):
        n += 1
    return list(first[:n])


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip padding, so a left-padded row sees the same positions as unpadded."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of the last real token in each row, for left or right padding."""
    t = attention_mask.shape[1]
    positions = torch.arange(t, device=attention_mask.device).expand_as(attention_mask)
    return torch.where(attention_mask.bool(), positions, -1).max(dim=1).values


class Backbone:
    """Layer-by-layer access to a causal LM. Build with :func:`exitwise.load_model`."""

    def __init__(self, model: nn.Module, tokenizer=None, name: str | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = model.config
        self.name = name or getattr(self.config, "_name_or_path", "") or type(model).__name__
        self._gpt2 = hasattr(model, "transformer") and hasattr(model.transformer, "wpe")
        if self._gpt2:
            inner = model.transformer
            self.layers, self.norm, self.embed_tokens = inner.h, inner.ln_f, inner.wte
            self.rotary = None
        else:
            inner = model.model
            self.layers, self.norm, self.embed_tokens = inner.layers, inner.norm, inner.embed_tokens
            self.rotary = getattr(inner, "rotary_emb", None)
        self.head: nn.Linear = model.get_output_embeddings()
        types = getattr(self.config, "layer_types", None)
        self.layer_types: list[str] = list(types) if types else ["full_attention"] * len(self.layers)
        self._rope_by_type = self.rotary is not None and "layer_type" in inspect.signature(
            self.rotary.forward
        ).parameters
        self.softcap = getattr(self.config, "final_logit_softcapping", None)
        sliding = "sliding_attention" in self.layer_types and getattr(self.config, "sliding_window", None)
        self.sliding_window: int | None = int(sliding) if sliding else None

    def to(self, device: str | torch.device | None) -> Backbone:
        """This backbone on ``device`` (itself when it is there already, or when ``device`` is None)."""
        if device is None or torch.device(device) == self.device:
            return self
        self.model.to(device)
        return type(self)(self.model, self.tokenizer, self.name)

    def can_reuse_prefix(self, total_tokens: int) -> bool:
        """Whether a cached prefix gives exact results for prompts of ``total_tokens`` tokens.

        A sliding-window cache keeps only the last ``window - 1`` keys of the prefix, so reuse is
        exact only while the whole prompt fits in the window.
        """
        return self.sliding_window is None or total_tokens < self.sliding_window

    # ----------------------------------------------------------------------------------- properties
    @property
    def is_gpt2(self) -> bool:
        """GPT-2 style (learned positions, ``transformer.h``) rather than a Llama-style decoder."""
        return self._gpt2

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.head.weight.shape[0]

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype (hidden states, KV cache); the matmul weights' is :attr:`weight_dtype`."""
        return self.embed_tokens.weight.dtype

    @property
    def weight_dtype(self) -> str:
        """"float32", "bfloat16", "int8" or "int4": the decoder layers' matmul weights (an int4 model's
        head is int8, see ``quantize.head_dtype``)."""
        return weight_dtype_of(self.layers[0]) if len(self.layers) else weight_dtype_of(self.head)

    # ------------------------------------------------------------------------------------ forward
    @torch.inference_mode()
    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
              prefix: Prefix | None = None) -> LayerState:
        """Embed a batch: the state at hidden-state index 0.

        With ``prefix``, ``input_ids`` is what follows the prefix; the result equals running
        prefix + input_ids as one sequence, but the prefix costs nothing per batch.
        """
        input_ids = input_ids.to(self.device)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        h = self.embed_tokens(input_ids)
        return self._state(h, attention_mask, prefix, 0)

    @torch.inference_mode()
    def resume(self, hidden: torch.Tensor, attention_mask: torch.Tensor, layer: int,
               prefix: Prefix | None = None) -> LayerState:
        """A state at hidden-state index ``layer`` from that layer's hidden states (B, T, D) of a batch.

        Layer l's attention needs only layer l's keys and values, so rows that ran to ``layer`` in
        different batches can be re-batched (re-padded) here and go on together; padded positions
        are masked out. With ``prefix``, as in :meth:`start`.
        """
        if not 0 <= layer <= self.num_layers:
            raise ValueError(f"cannot resume at layer {layer} (model has {self.num_layers})")
        return self._state(hidden.to(self.device), attention_mask, prefix, layer)

    def _state(self, h: torch.Tensor, attention_mask: torch.Tensor, prefix: Prefix | None, layer: int) -> LayerState:
        attention_mask = attention_mask.to(self.device)
        batch, width = h.shape[:2]
        cache = None
        if prefix is not None and len(prefix):
            if not self.can_reuse_prefix(len(prefix) + width):
                raise ValueError(f"prefix of {len(prefix)} + {width} tokens exceeds the sliding window "
                                 f"({self.sliding_window}); run without a prefix")
            cache = DynamicCache(config=self.config)
            for i, (k, v) in enumerate(zip(prefix.keys, prefix.values, strict=True)):
                cache.layers[i].update(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1))
            ones = torch.ones((batch, len(prefix)), dtype=attention_mask.dtype, device=self.device)
            attention_mask = torch.cat([ones, attention_mask], dim=1)
        pos = position_ids_from_mask(attention_mask)[:, -width:]
        if self._gpt2 and layer == 0:
            h = h + self.model.transformer.wpe(pos)
        mask_args = dict(config=self.config, inputs_embeds=h, attention_mask=attention_mask, cache=cache,
                         position_ids=pos)
        masks: dict[str, torch.Tensor | None] = {}
        for kind in set(self.layer_types):
            make = create_sliding_window_causal_mask if kind == "sliding_attention" else create_causal_mask
            masks[kind] = make(**mask_args)
        rope = {}
        if self.rotary is not None:
            for kind in set(self.layer_types):
                rope[kind] = self.rotary(h, pos, kind) if self._rope_by_type else self.rotary(h, pos)
        return LayerState(hidden=h, position_ids=pos, attention_mask=attention_mask, masks=masks, rope=rope,
                          layer=layer, cache=cache, prefix_layers=len(prefix.keys) if cache is not None else None)

    @torch.inference_mode()
    def prefill(self, token_ids: list[int], stop: int | None = None) -> Prefix:
        """Run a shared prefix once through layers [0, stop) (default all) and keep its keys and values.

        A prefix made with ``stop`` serves passes that end at or before hidden state ``stop``.
        """
        stop = self.num_layers if stop is None else stop
        if not token_ids:
            return Prefix([], [], [])
        ids = torch.tensor([token_ids], dtype=torch.long)
        state = self.start(ids)
        state.cache = DynamicCache(config=self.config)
        self.run(state, stop)
        layers = state.cache.layers[:stop]
        return Prefix(list(token_ids), [c.keys for c in layers], [c.values for c in layers])

    @torch.inference_mode()
    def run(self, state: LayerState, stop: int) -> LayerState:
        """Advance ``state`` in place from its current layer up to hidden-state index ``stop``."""
        if not state.layer <= stop <= self.num_layers:
            raise ValueError(f"cannot run from layer {state.layer} to {stop} (model has {self.num_layers})")
        if state.cache is not None and state.prefix_layers is not None and stop > state.prefix_layers:
            raise ValueError(f"the prefix was computed for {state.prefix_layers} layers only, cannot run to {stop}")
        for i in range(state.layer, stop):
            kind = self.layer_types[i]
            layer = self.layers[i]
            if self._gpt2:
                state.hidden = layer(state.hidden, state.cache, state.masks[kind], position_ids=state.position_ids)
            else:
                state.hidden = layer(state.hidden, attention_mask=state.masks[kind],
                                     position_embeddings=state.rope.get(kind),
                                     position_ids=state.position_ids, cache=state.cache)
        state.layer = stop
        return state

    @torch.inference_mode()
    def readout(self, hidden: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Logits from hidden states (..., D): final norm, then the head (only ``rows`` if given).

        Restricting to a few rows (label words) makes a readout nearly free: the 49k-row head of
        SmolLM2 costs more than three decoder layers, a handful of rows costs nothing measurable.
        """
        x = self.norm(hidden)
        if rows is None:
            logits = self.head(x)
        else:
            rows = rows.to(self.device)
            bias = None if self.head.bias is None else self.head.bias[rows]
            logits = nn.functional.linear(x, float_weight(self.head, rows), bias)
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    @torch.inference_mode()
    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      stop: int | None = None) -> list[torch.Tensor]:
        """All hidden states 0..stop (default L) of one pass: a list of (B, T, D) tensors."""
        state = self.start(input_ids, attention_mask)
        out = [state.hidden]
        for layer in range(1, (self.num_layers if stop is None else stop) + 1):
            out.append(self.run(state, layer).hidden)
        return out

    @torch.inference_mode()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               stop: int | None = None, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of a pass truncated after layer ``stop`` (default: all layers)."""
        state = self.run(self.start(input_ids, attention_mask), self.num_layers if stop is None else stop)
        return self.readout(state.hidden, rows)

    def __repr__(self) -> str:
        return (f"Backbone({self.name!r}, layers={self.num_layers}, hidden={self.hidden_size}, "
                f"vocab={self.vocab_size}, device={self.device}, dtype={self.dtype}, weights={self.weight_dtype})")
