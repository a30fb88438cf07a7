"""The engine's forward maths for Llama-family decoders over a paged KV cache: weights, one decoder
layer, attention, RoPE, state propagation, and the output head. The place a new architecture or a new
weight dtype goes; :mod:`exitwise.engine.runner` builds the step contexts and runs the steps.

The same tensors as the Hugging Face model: Q|K|V and gate|up are fused so each layer does four
matmuls instead of seven, and the HF modules view the fused rows. Every dtype runs one layer function
(where the CPU kernels take a whole plain layer, that function hands it to them in one call),
with as few tensor ops as possible: on CPU a SmolLM2 layer at batch 1 moves ~14 MB of float32
weights (~1 ms at 14 GB/s), so every extra op (~5-10 us of Python and dispatch) is visible. Where
HF spends its time beyond that: per-layer mask/cache objects, separate Q/K/V and gate/up matmuls,
``repeat_kv`` copies for GQA, and a dynamic cache that concatenates.

Decode attention (one query per sequence) gathers each sequence's K/V from the pool with one
``index_select`` per layer and runs SDPA with the query heads of a KV group folded into the query
length axis, (B, H_kv, G, hd), so GQA needs no K/V repetition. Prefill runs the projections and MLP
over all new tokens of all sequences at once and attention per sequence (causal, over cached prefix
plus new tokens).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch
import torch.nn.functional as F

from exitwise.errors import ExitwiseError
from exitwise.models import kernels
from exitwise.models.families import Family, attention_shape, describe, norm_eps, norm_weight
from exitwise.models.float_linear import FloatLinear
from exitwise.models.quantize import (
    DEFAULT_HEAD_RESCORE,
    WEIGHT_DTYPES,
    FloatRows,
    QuantizedLinear,
    StackedLinear,
    float_weight,
    head_dtype,
    rescore_top,
    usable_dtype,
)

__all__ = ["WEIGHT_DTYPES", "LlamaDecoder", "OutputHead", "StepContext"]

Linear = FloatLinear | QuantizedLinear | StackedLinear  # one call interface: (N, in) float32 -> (N, out) float32


@dataclass
class StepContext:
    """Per-step index tensors shared by all layers (built by the runner)."""

    positions: torch.Tensor  # (N,) position of each fed token
    slots: torch.Tensor  # (N,) KV slot each fed token writes
    cos: torch.Tensor  # (N, 1, hd/2)
    sin: torch.Tensor  # (N, 1, hd/2)
    # decode: gather index (B*T,) into the slot axis, key mask (B, 1, 1, T) or None if no padding
    gather: torch.Tensor | None = None
    key_mask: torch.Tensor | None = None
    max_len: int = 0
    # decode, one sequence held in consecutive blocks: its K/V are the pool rows kv_start..+max_len,
    # which attention reads in place (a view) instead of gathering a copy
    kv_start: int | None = None
    # prefill: per sequence (first fed row, number fed, context slots (T_ctx,), and the first slot when
    # they are consecutive -- read in place -- else None)
    segments: list[tuple[int, int, torch.Tensor, int | None]] | None = None
    # the (cos, sin) rows of the model's other RoPE tables, by layer kind (Gemma 3's sliding layers)
    other_rope: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)
    # full-width RoPE rows (cos | cos, -sin | sin), (N, 1, hd), by kind (None: cos/sin): built once per
    # step by the first layer of that kind
    rot: dict[str | None, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)
    # decode: sliding-window reads (gather, key mask, T_w, positions skipped) by window, built once per
    # step (LlamaDecoder._window_reads)
    window_reads: dict[int, tuple] = field(default_factory=dict, repr=False)
    # prefill of a chunk after a cached prefix (a verification pass): each segment's additive key mask
    # by (first row, window), built once per step (LlamaDecoder._chunk_mask)
    chunk_masks: dict[tuple, torch.Tensor] = field(default_factory=dict, repr=False)
    # the attention kernel's key lists by window: (idx, start, length, positions not read), built once
    # per step (LlamaDecoder._key_rows)
    key_rows: dict[int | None, tuple] = field(default_factory=dict, repr=False)

    def rope_tables(self, kind: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        rot = self.rot.get(kind)
        if rot is None:
            cos, sin = (self.cos, self.sin) if kind is None else self.other_rope[kind]
            rot = self.rot[kind] = (torch.cat((cos, cos), -1), torch.cat((-sin, sin), -1))
        return rot

    def select(self, rows: torch.Tensor) -> StepContext:
        """Decode context of a subset of its sequences: ``rows`` (b,) indices, in that order."""
        if self.segments is not None:
            raise ValueError("StepContext.select works on decode contexts only")
        n = self.positions.shape[0]
        gather = None if self.gather is None else self.gather.view(n, -1).index_select(0, rows).reshape(-1)
        mask = None if self.key_mask is None else self.key_mask.index_select(0, rows)
        kv_start = self.kv_start if rows.numel() == 1 else None  # (set only for one sequence)
        other = {k: (c.index_select(0, rows), s.index_select(0, rows)) for k, (c, s) in self.other_rope.items()}
        return StepContext(positions=self.positions.index_select(0, rows), slots=self.slots.index_select(0, rows),
                           cos=self.cos.index_select(0, rows), sin=self.sin.index_select(0, rows), gather=gather,
                           key_mask=mask, max_len=self.max_len, kv_start=kv_start, other_rope=other)


@dataclass
class LayerWeights:
    """One layer's weights: its norms, and its four matmuls (fused Q|K|V, O, fused gate|up, down) as
    linears of one call interface at every dtype (:class:`FloatLinear`, :class:`QuantizedLinear`, or
    :class:`StackedLinear` for a projection whose parts keep different GGUF block types), whose tensors
    the Hugging Face modules view."""

    in_norm: torch.Tensor  # (D,)
    post_norm: torch.Tensor  # (D,) the MLP's input norm
    # qkv ((H + 2 H_kv) hd, D) with Q|K|V's biases if any, o (D, H hd), gate_up (2 F, D), down (D, F)
    linears: tuple[Linear, Linear, Linear, Linear]
    # Gemma 3's sandwich norms of the attention and MLP outputs, before their residual adds (else None)
    attn_out_norm: torch.Tensor | None = None  # (D,)
    mlp_out_norm: torch.Tensor | None = None  # (D,)
    # Qwen3 / Gemma 3: per-head q and k RMSNorm weights, one row per head of the fused Q|K ((H + H_kv), hd)
    qk_norm: torch.Tensor | None = None

    @classmethod
    def fuse(cls, layer, weight_dtype: str, family: Family) -> LayerWeights:
        """A HF decoder layer's weights, fused; its linears may be float or already quantised
        (``load_model(dtype=...)``), in which case ``weight_dtype`` must be theirs. Where the fused
        linears are in the modules' own dtype the modules are pointed at their rows (one copy); a float
        layer run at a low-bit ``weight_dtype`` is quantised here, beside its float modules. Norm weights
        are the multiplicative ones (``1 + w`` for Gemma, see :func:`families.norm_weight`)."""
        a, m = layer.self_attn, layer.mlp
        norms = {"in_norm": norm_weight(layer.input_layernorm, "input_layernorm")}
        if family.sandwich:
            norms.update(post_norm=norm_weight(layer.pre_feedforward_layernorm, "pre_feedforward_layernorm"),
                         attn_out_norm=norm_weight(layer.post_attention_layernorm, "post_attention_layernorm"),
                         mlp_out_norm=norm_weight(layer.post_feedforward_layernorm, "post_feedforward_layernorm"))
        else:
            norms["post_norm"] = norm_weight(layer.post_attention_layernorm, "post_attention_layernorm")
        if family.qk_norm:
            h, h_kv = a.q_proj.out_features // a.head_dim, a.k_proj.out_features // a.head_dim
            qn, kn = norm_weight(a.q_norm, "self_attn.q_norm"), norm_weight(a.k_norm, "self_attn.k_norm")
            norms["qk_norm"] = torch.cat([qn.expand(h, -1), kn.expand(h_kv, -1)]).contiguous()
        qkv_parts, gate_up_parts = [a.q_proj, a.k_proj, a.v_proj], [m.gate_proj, m.up_proj]
        quantized = isinstance(a.q_proj, QuantizedLinear)
        kind = QuantizedLinear if quantized else FloatLinear
        qkv, gate_up = kind.cat(qkv_parts), kind.cat(gate_up_parts)
        o, down = (a.o_proj, m.down_proj) if quantized else (FloatLinear.of(a.o_proj), FloatLinear.of(m.down_proj))
        if quantized or weight_dtype == "float32":  # one copy: the HF modules view the fused rows
            qkv.view_into(qkv_parts)
            gate_up.view_into(gate_up_parts)
            return cls(**norms, linears=(qkv, o, gate_up, down))
        # a float model run at a low-bit dtype: the engine streams its quantised copies only
        return cls(**norms, linears=tuple(QuantizedLinear.from_float(lin.weight, lin.bias, weight_dtype)
                                          for lin in (qkv, o, gate_up, down)))

    def kv_weight(self, q_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The K|V rows of the fused projection in float32 ((2 H_kv hd, D), bias or None), for state
        propagation (a low-precision layer's are de-quantised: propagation is one small bmm)."""
        qkv = self.linears[0]
        rows = torch.arange(q_size, qkv.out_features, device=self.in_norm.device)
        return qkv.dequantize(rows), None if qkv.bias is None else qkv.bias[q_size:].float()


def check_supported(backbone) -> Family:
    """Refuse, naming the field, a model whose layers this module does not compute; else its family
    parts (:mod:`exitwise.models.families`)."""
    return describe(backbone)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMS norm over the last dim. Float32 CPU rows (every decode step) take the kernel's one-call
    version (models/kernels): aten's composite costs ~35 us of dispatch per call at a 576-wide row,
    61 calls a SmolLM2 step."""
    if (x.is_cpu and x.dim() == 2 and x.dtype == torch.float32 and x.is_contiguous()
            and (weight is None or weight.dtype == torch.float32) and not (x.requires_grad and torch.is_grad_enabled())
            and kernels.ready()):
        return kernels.rms_norm(x, weight, eps)
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


class OutputHead:
    """The model's final norm and output head: the readout an exit criterion may use."""

    def __init__(self, norm_weight: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float,
                 lowp: QuantizedLinear | None = None, rescore: int = 0, softcap: float | None = None):
        self.norm_weight = norm_weight  # (D,)
        self.weight = weight  # (V, D) float32 (criteria gather shortlist rows from it; never streamed whole
        # when ``lowp`` is set)
        self.bias = bias  # (V,) or None
        self.eps = eps
        self.lowp = lowp  # the head in bfloat16 / int8, used for full logits when set
        self.rescore = rescore if lowp is not None else 0  # see quantize.rescore_top
        self.softcap = softcap  # final logit soft-capping (Gemma): tanh(z / c) * c, after the head

    def cap(self, z: torch.Tensor) -> torch.Tensor:
        """Soft-capped logits (HF's order: divide, tanh, multiply); z itself without a cap."""
        return z if self.softcap is None else torch.tanh(z / self.softcap) * self.softcap

    def norm(self, h: torch.Tensor) -> torch.Tensor:
        """(B, D) -> (B, D): the final RMS norm, the head's input."""
        return rms_norm(h, self.norm_weight, self.eps)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm + head: (B, D) -> (B, V).

        For B > 1 the head is computed as W (V, D) @ x^T: on CPU (MKL) that is ~2.5x faster than
        ``F.linear`` for 8 rows of a 49k-row head (9 ms vs 24 ms measured), the single biggest op of a
        batched decode step. At B = 1 ``F.linear`` is as fast and matches HF's rounding.
        """
        x = self.norm(h)
        if self.lowp is not None:
            logits = self.lowp(x)
            logits = rescore_top(x, logits, self.weight, self.bias, self.rescore) if self.rescore else logits
        elif x.shape[0] == 1:
            logits = F.linear(x, self.weight, self.bias)
        else:
            logits = torch.mm(self.weight, x.t()).t()
            logits = logits if self.bias is None else logits + self.bias
        return self.cap(logits)


class LlamaDecoder:
    """A Llama-family decoder's weights and layer maths, writing K/V into ``cache`` (a KVCache)."""

    def __init__(self, backbone, cache, max_model_len: int, weight_dtype: str | None = None,
                 head_rescore: int = DEFAULT_HEAD_RESCORE):
        """``weight_dtype``: None follows the backbone (``load_model(dtype=...)``); a float32 backbone may
        also be run in "bfloat16" or "int8" (quantised here, in memory). ``head_rescore``: how many of
        a low-precision head's largest logits are recomputed in float32 (0: none)."""
        self.family = fam = check_supported(backbone)
        loaded = backbone.weight_dtype
        weight_dtype = usable_dtype(weight_dtype or loaded, backbone.device)
        if loaded != "float32" and weight_dtype != loaded:
            raise ExitwiseError(f"the model was loaded with {loaded} weights and cannot run in {weight_dtype}; "
                                f"load it with dtype={weight_dtype!r} (--dtype {weight_dtype})")
        self.weight_dtype = weight_dtype
        cfg = backbone.config
        self.cache = cache
        self.device = backbone.device
        self.num_layers = backbone.num_layers
        self.num_heads, self.num_kv_heads, self.head_dim = attention_shape(cfg)
        self.group = self.num_heads // self.num_kv_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.eps = norm_eps(backbone.layers[0].input_layernorm)
        attn0 = backbone.layers[0].self_attn
        self.qk_eps = norm_eps(attn0.q_norm) if fam.qk_norm else 0.0
        self.hidden_size = cfg.hidden_size
        self.act = fam.act
        self.scaling = fam.scaling  # None: SDPA's default head_dim ** -0.5 (the same bits as before)
        self.windows = fam.windows
        # K/V positions sliding-window decode layers did not read (summed over layers; for /metrics)
        self.window_skipped_reads = 0
        # per layer: its RoPE table, None for the main one (StepContext.cos/sin), else a kind of other_rope
        self.layer_rope = [None if k == fam.main_kind else k for k in fam.rope_kinds]
        self.embed_scale = fam.embed_scale
        with torch.no_grad():
            self.layers = [LayerWeights.fuse(layer, weight_dtype, fam) for layer in backbone.layers]
            for lw in self.layers:
                for lin in lw.linears:
                    lin.add_batch_copy()
            # float weights packed for oneDNN: multi-row steps run its linear, which dynamo cannot trace
            self.use_onednn = any(isinstance(lin, FloatLinear) and lin.packed is not None
                                  for lw in self.layers for lin in lw.linears)
            self.embed = backbone.embed_tokens.weight  # (V, D)
            self.output = self._output_head(backbone, weight_dtype, head_rescore)
            # RoPE tables from the model's own rotary module (handles llama3/yarn scaling, and Gemma 3's
            # per-layer-type tables), halved because the HF tables repeat the same frequencies for both
            # halves of a head. Kind main_kind is self.cos/sin; the others are self.other_rope.
            pos = torch.arange(max_model_len, device=self.device)[None]
            dummy = torch.zeros(1, 1, self.head_dim, device=self.device, dtype=backbone.dtype)
            half = self.head_dim // 2
            tables = {}
            for kind in dict.fromkeys(fam.rope_kinds):
                cos, sin = backbone.rotary(dummy, pos, kind) if backbone._rope_by_type else backbone.rotary(dummy, pos)
                tables[kind] = (cos[0, :, :half].contiguous(), sin[0, :, :half].contiguous())  # (max_len, hd/2)
            self.cos, self.sin = tables.pop(fam.main_kind)
            self.other_rope = tables
            # Input-norm-folded K|V weights of every layer, stacked for state propagation:
            # (L, 2 H_kv hd, D); k_j = rms(h) @ (W_kv_j * w_norm_j)^T for all skipped j in one bmm.
            kv = [lw.kv_weight(self.q_size) for lw in self.layers]
            self.kv_folded = torch.stack([w * lw.in_norm for (w, _), lw in zip(kv, self.layers, strict=True)])
            self.kv_folded_bias = None if kv[0][1] is None else torch.stack([b for _, b in kv])
            # with k_norm, K is normalised per head after the projection: (L, 1, 1, hd) k_norm weights
            self.k_norm = (None if not fam.qk_norm else
                           torch.stack([lw.qk_norm[self.num_heads] for lw in self.layers])[:, None, None])

    def _output_head(self, backbone, weight_dtype: str, rescore: int) -> OutputHead:
        """The final norm and head; a low-precision head keeps float32 rows for re-scoring and shortlists
        (tied heads share the float32 embedding, so this costs memory only for untied ones)."""
        head = backbone.head
        if isinstance(head, QuantizedLinear):
            lowp = head
        elif weight_dtype != "float32":
            lowp = QuantizedLinear.from_float(head.weight, head.bias, head_dtype(weight_dtype))
        else:
            lowp = None
        if lowp is not None:
            lowp.add_batch_copy()
        tied = getattr(backbone.config, "tie_word_embeddings", False)
        if tied and lowp is not None:
            weight = self.embed
        elif isinstance(head, QuantizedLinear):  # an untied low-bit head: its rows, de-quantised when gathered
            weight = FloatRows(head)
        else:
            weight = float_weight(head)
        bias = None if head.bias is None else head.bias.float()
        return OutputHead(norm_weight(backbone.norm, "norm"), weight, bias, norm_eps(backbone.norm), lowp, rescore,
                          self.family.softcap)

    # -------------------------------------------------------------------------------- primitives
    def rms(self, x: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        return rms_norm(x, weight, self.eps)

    def rope(self, x: torch.Tensor, ctx: StepContext, kind: str | None = None) -> torch.Tensor:
        """x (N, heads, hd) rotated at ctx positions (HF's rotate_half convention), with the RoPE table
        ``kind`` (None: the main one; see ``layer_rope``).

        x * (cos|cos) + roll(x, hd/2) * (-sin|sin): the half swap is one roll and rotate_half's sign
        sits in the table, 4 ops instead of 9 and the same bits as (x1 cos - x2 sin | x2 cos + x1 sin)
        (negation is exact, and a + (-b) is a - b)."""
        cos, sin = ctx.rope_tables(kind)
        return x * cos + x.roll(self.head_dim // 2, -1) * sin

    def rope_rows(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """The StepContext RoPE rows of positions ``pos`` (N,): cos, sin (N, 1, hd/2) of the main table
        and the same of the other tables by kind (``StepContext.other_rope``)."""
        other = {k: (c[pos][:, None], s[pos][:, None]) for k, (c, s) in self.other_rope.items()}
        return self.cos[pos][:, None], self.sin[pos][:, None], other

    def prepare(self, ctx: StepContext) -> None:
        """Build what layers build lazily once per decode step (RoPE rows, window reads), eagerly: a
        compiled step only reads them."""
        ctx.rope_tables()
        for kind in self.other_rope:
            ctx.rope_tables(kind)
        for w in dict.fromkeys(self.windows):
            if w is not None and ctx.max_len > w:
                self._window_reads(ctx, w)

    def _qk(self, i: int, w: LayerWeights, qkv: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """Q|K of the fused projection (N, (H + 2 H_kv) hd) -> (N, H + H_kv, hd), per-head normalised
        (Qwen3, Gemma 3: q_norm / k_norm before RoPE) and rotated."""
        qk = qkv[:, :self.q_size + self.kv_size].view(qkv.shape[0], -1, self.head_dim)
        if w.qk_norm is not None:
            qk = F.rms_norm(qk, (self.head_dim,), None, self.qk_eps) * w.qk_norm
        return self.rope(qk, ctx, self.layer_rope[i])

    @cached_property
    def _plans(self) -> list:
        """Per layer, the kernels' one-call layer (:func:`kernels.layer_plan`) where it computes what
        :meth:`layer` does: plain Llama / Qwen2 layers (no per-head or sandwich norms, no sliding window,
        SiLU) whose four matmuls the kernel takes whole; else None (the layer runs op by op). Built
        from what the layer is, not from switches: :meth:`_one_call` checks those on every call."""
        plans = []
        scale = self.scaling if self.scaling is not None else self.head_dim ** -0.5
        for i, w in enumerate(self.layers):
            specs = [lin.kernel_spec() for lin in w.linears]
            fits = (self.device.type == "cpu" and kernels.built() and w.qk_norm is None and w.attn_out_norm is None
                    and self.windows[i] is None and self.act is F.silu and all(s is not None for s in specs)
                    and all(n.dtype == torch.float32 and n.is_contiguous() for n in (w.in_norm, w.post_norm)))
            plans.append(kernels.layer_plan(w.in_norm, w.post_norm, self.eps, specs, *self._kv_pools[i],
                                            self.num_heads, self.num_kv_heads, scale) if fits else None)
        return plans

    def _one_call(self, i: int, x: torch.Tensor):
        """Layer i's one-call plan if it may run these rows (the kernels take them, nothing traces them,
        every row count is the kernel's); else None."""
        if torch.compiler.is_compiling() or QuantizedLinear.kernel_rows is not None:
            return None
        plan = self._plans[i]
        if plan is None or not self._kernels_take(x) or x.dim() != 2 or not x.is_contiguous():
            return None
        return plan

    @cached_property
    def _kv_pools(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's (S, H_kv, hd) K and V views of the pool, made once (``cache.flat[0, i]`` is two
        aten selects, and a decode layer needs four of them)."""
        return [(self.cache.flat[0, i], self.cache.flat[1, i]) for i in range(self.num_layers)]

    def embed_tokens(self, tokens: list[int]) -> torch.Tensor:
        """(N,) token ids -> (N, D) input embeddings (scaled, for Gemma, as HF's scaled embedding)."""
        x = self.embed[torch.tensor(tokens, device=self.device)]
        return x if self.embed_scale is None else x * self.embed_scale

    def _window_reads(self, ctx: StepContext, window: int) -> tuple[torch.Tensor | None, torch.Tensor | None, int, int]:
        """What a sliding-window decode layer reads: (gather (B * T_w,) or None, key mask (B, 1, 1, T_w) or
        None, T_w, K/V positions of the batch it does not read). A query at position p sees keys
        p - window < j <= p (HF's sliding_window_overlay), so each sequence's gather starts at
        max(0, len - window) and positions before it are never read, not read-and-masked. Built once per
        step and window."""
        cached = ctx.window_reads.get(window)
        if cached is not None:
            return cached
        t_w = min(ctx.max_len, window)
        lens = ctx.positions + 1  # (B,)
        start = (lens - window).clamp(min=0)  # (B,) first key position in the window
        if ctx.kv_start is not None:  # one sequence in consecutive blocks: the window is a slice, no gather
            reads = (None, None, t_w, int(start.sum()))
        else:
            idx = start[:, None] + torch.arange(t_w, device=lens.device)[None]  # (B, T_w) key positions
            valid = idx < lens[:, None]
            full = ctx.gather.view(lens.shape[0], ctx.max_len)
            gather = full.gather(1, idx.clamp(max=ctx.max_len - 1)).reshape(-1)
            reads = (gather, None if bool(valid.all()) else valid[:, None, None, :], t_w, int(start.sum()))
        ctx.window_reads[window] = reads
        return reads

    def _kernels_take(self, q: torch.Tensor) -> bool:
        """Whether the kernels (models/kernels) take this step's rows (attention, RoPE and the K/V
        store, SiLU): float32 CPU inference. Their attention is the one arithmetic of decode, verification
        and prefill there, each query over its own keys in one order, so a token's K/V and logits do not
        depend on the step that computed them."""
        return (q.is_cpu and q.dtype == torch.float32 and self.cache.flat.dtype == torch.float32
                and not (q.requires_grad and torch.is_grad_enabled()) and kernels.ready())

    def _key_rows(self, ctx: StepContext, window: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """What each fed position reads, as the attention kernel takes it: (idx (I,) pool rows, start
        (N,), length (N,), positions of the batch not read): its causal keys, the last ``window`` of
        them on a sliding layer. Built once per step and window."""
        cached = ctx.key_rows.get(window)
        if cached is not None:
            return cached
        dev = ctx.positions.device
        if ctx.segments is None:  # decode: row b reads its first len_b entries of the (B, T) gather
            lens = ctx.positions + 1
            t = ctx.max_len
            if ctx.kv_start is not None:
                idx, base = torch.arange(ctx.kv_start, ctx.kv_start + t, device=dev), torch.zeros_like(lens)
            else:
                idx, base = ctx.gather, torch.arange(lens.shape[0], device=dev) * t
        else:  # a chunk of each sequence: query i of n reads positions 0 .. t - n + i of its t
            parts, bases, counts, off = [], [], [], 0
            for _, n, slots, kv_start in ctx.segments:
                t = slots.numel()
                parts.append(slots if kv_start is None else torch.arange(kv_start, kv_start + t, device=dev))
                counts.append(torch.arange(t - n + 1, t + 1, device=dev))
                bases.append(torch.full((n,), off, device=dev))
                off += t
            idx, lens, base = torch.cat(parts), torch.cat(counts), torch.cat(bases)
        first = torch.zeros_like(lens) if window is None else (lens - window).clamp(min=0)
        rows = (idx.long().contiguous(), (base + first).long(), (lens - first).long(), int(first.sum()))
        ctx.key_rows[window] = rows
        return rows

    def _attend_kernel(self, q: torch.Tensor, layer: int, ctx: StepContext) -> torch.Tensor:
        """q (N, H, hd) of every fed position over its causal keys (its window's on a sliding layer)."""
        k_pool, v_pool = self._kv_pools[layer]
        window = self.windows[layer]
        idx, start, length, skipped = self._key_rows(ctx, window)
        if ctx.segments is None:
            self.window_skipped_reads += skipped
        scale = self.scaling if self.scaling is not None else self.head_dim ** -0.5
        return kernels.attention(q.contiguous(), k_pool, v_pool, idx, start, length, scale)

    def _attend_decode(self, q: torch.Tensor, layer: int, ctx: StepContext) -> torch.Tensor:
        """q (B, H, hd) against each sequence's cached K/V (its last ``window`` positions on a sliding
        layer) -> (B, H hd)."""
        if self._kernels_take(q):
            return self._attend_kernel(q, layer, ctx)
        b = q.shape[0]
        # K and V separately: index_select along dim 0 of a contiguous (S, H_kv, hd) pool is a row
        # memcpy; on the strided (2, S, ...) view it fell back to a slow element-wise copy (~1 ms).
        k_pool, v_pool = self._kv_pools[layer]
        window = self.windows[layer]
        gather, mask, t, first = ctx.gather, ctx.key_mask, ctx.max_len, ctx.kv_start
        if window is not None and ctx.max_len > window:
            gather, mask, t, skipped = self._window_reads(ctx, window)
            self.window_skipped_reads += skipped
            if first is not None:  # batch 1 in place: the window's rows are the last t of its context
                first += ctx.max_len - t
        if first is not None:  # the same values in the same layout as the gathered copy, not copied
            k, v = k_pool[first:first + t], v_pool[first:first + t]
        else:
            k, v = k_pool.index_select(0, gather), v_pool.index_select(0, gather)
        shape = (b, t, self.num_kv_heads, self.head_dim)
        k, v = k.view(shape).transpose(1, 2), v.view(shape).transpose(1, 2)  # (B, H_kv, T, hd)
        qg = q.view(b, self.num_kv_heads, self.group, self.head_dim)  # heads of one KV group share K/V
        out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=self.scaling)
        return out.reshape(b, self.q_size)

    def _attend_prefill(self, q: torch.Tensor, layer: int, ctx: StepContext) -> torch.Tensor:
        """q (N, H, hd) of all fed tokens; causal attention per sequence over its whole context (the
        last ``window`` positions only, on a sliding-window layer)."""
        # the kernel for every prefill too: a prompt prefilled whole or in chunks gets the same K/V, and
        # it is not slower than SDPA's causal kernel (768 tokens, SmolLM2's heads: 70 against 94 ms)
        if self._kernels_take(q):
            return self._attend_kernel(q, layer, ctx)
        outs = []
        flat = self.cache.flat[:, layer]
        window = self.windows[layer]
        for first, n, ctx_slots, kv_start in ctx.segments:
            t = ctx_slots.numel()
            lo = 0 if window is None else max(t - n - window + 1, 0)  # the first query's oldest key
            if lo:  # keys before every query's window are not read (nor are freed blocks' placeholders)
                ctx_slots, t = ctx_slots[lo:], t - lo
            if kv_start is not None:  # consecutive slots: the same rows as the gather, viewed in place
                k, v = flat[0][kv_start + lo:kv_start + lo + t], flat[1][kv_start + lo:kv_start + lo + t]
            else:
                k, v = flat[0].index_select(0, ctx_slots), flat[1].index_select(0, ctx_slots)
            slides = window is not None and t > window
            if n == t and not slides:  # a whole prompt: causal from the start, SDPA's causal kernel
                k = k.transpose(0, 1).repeat_interleave(self.group, dim=0)  # (H, T, hd)
                v = v.transpose(0, 1).repeat_interleave(self.group, dim=0)
                o = F.scaled_dot_product_attention(q[first:first + n].transpose(0, 1), k, v, is_causal=True,
                                                   scale=self.scaling)
                outs.append(o.transpose(0, 1).reshape(n, self.q_size))
                continue
            # after a cached prefix (a verification pass, a later prompt chunk): the query heads of a KV
            # group folded into the query axis, (H_kv, G n, hd), so K/V are read in place, not repeated
            # (5 queries over 300 keys: 240 us against 780 us repeated with a boolean mask)
            qs = q[first:first + n].view(n, self.num_kv_heads, self.group, self.head_dim)
            qs = qs.permute(1, 2, 0, 3).reshape(1, self.num_kv_heads, self.group * n, self.head_dim)
            mask = self._chunk_mask(ctx, first, n, t, window if slides else None, q.dtype)
            o = F.scaled_dot_product_attention(qs, k.transpose(0, 1)[None], v.transpose(0, 1)[None], attn_mask=mask,
                                               scale=self.scaling)
            outs.append(o.view(self.num_kv_heads, self.group, n, self.head_dim).permute(2, 0, 1, 3)
                        .reshape(n, self.q_size))
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def _chunk_mask(self, ctx: StepContext, first: int, n: int, t: int, window: int | None,
                    dtype: torch.dtype) -> torch.Tensor:
        """The additive key mask (G n, t) of n queries that are the last n of t keys (0 where a query
        sees a key, -inf elsewhere), one row block per query head of a group; once per step and segment."""
        key = (first, window)
        mask = ctx.chunk_masks.get(key)
        if mask is None:
            seen = torch.ones(n, t, dtype=torch.bool, device=ctx.positions.device).tril(t - n)
            if window is not None:
                seen = seen.triu(t - n - window + 1)
            mask = torch.zeros(n, t, dtype=dtype, device=seen.device).masked_fill_(~seen, float("-inf"))
            mask = mask.repeat(self.group, 1)
            ctx.chunk_masks[key] = mask
        return mask

    def layer(self, i: int, x: torch.Tensor, ctx: StepContext, decode: bool) -> torch.Tensor:
        """Decoder layer i on x (N, D); writes this step's K/V of layer i into the cache. Activations,
        norms and residuals are float32 at every weight dtype."""
        plan = self._one_call(i, x)
        if plan is not None:  # the same kernels in the same order, in one call
            cos, sin = ctx.rope_tables(self.layer_rope[i])
            idx, start, length, _ = self._key_rows(ctx, None)
            return plan.forward(x, cos, sin, ctx.slots, idx, start, length, kernels.int4_bf16())
        w = self.layers[i]
        qkv_p, o_p, gate_up_p, down_p = w.linears
        n = x.shape[0]
        qkv = qkv_p(self.rms(x, w.in_norm))  # (N, (H + 2 H_kv) hd)
        k_pool, v_pool = self._kv_pools[i]
        if w.qk_norm is None and self._kernels_take(qkv):  # rotate Q and K, store K and V: one call
            cos, sin = ctx.rope_tables(self.layer_rope[i])
            q = kernels.rope_store(qkv, cos, sin, k_pool, v_pool, ctx.slots, self.num_heads, self.num_kv_heads)
        else:
            qk = self._qk(i, w, qkv, ctx)  # (N, H + H_kv, hd)
            v = qkv[:, self.q_size + self.kv_size:].view(n, self.num_kv_heads, self.head_dim)
            k_pool.index_copy_(0, ctx.slots, qk[:, self.num_heads:])
            v_pool.index_copy_(0, ctx.slots, v)
            q = qk[:, :self.num_heads]
        attn = self._attend_decode(q, i, ctx) if decode else self._attend_prefill(q, i, ctx)
        a = o_p(attn)
        x = x + (a if w.attn_out_norm is None else self.rms(a, w.attn_out_norm))
        m = down_p(self.glu(gate_up_p(self.rms(x, w.post_norm))))
        return x + (m if w.mlp_out_norm is None else self.rms(m, w.mlp_out_norm))

    def glu(self, gate_up: torch.Tensor) -> torch.Tensor:
        """(N, 2F) gate | up -> (N, F) act(gate) * up; SiLU's in one kernel call where the kernels run
        (aten's chunk, silu and mul are ~45 us of a 1-row step's layer, the kernel ~4)."""
        if self.act is F.silu and self._kernels_take(gate_up):
            return kernels.silu_mul(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return self.act(gate) * up

    def decode_layers(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """Every layer of a full-depth decode step: (B, D) embeddings -> (B, D) last hidden state.
        What ``EngineConfig.compile`` compiles, as one graph for the whole step: compiling each layer
        alone gained only ~4%, its ~20 us of dynamo call overhead paid 30 times a step."""
        for i in range(self.num_layers):
            x = self.layer(i, x, ctx, decode=True)
        return x

    def propagate_kv(self, h: torch.Tensor, start: int, ctx: StepContext) -> None:
        """CALM state propagation: K/V of layers start..L-1 computed from hidden state h (B, D).

        All skipped layers at once: the RMS normalisation is shared, each layer's norm weight is
        folded into its K|V weight, so this is one batched matmul plus RoPE and one store. With
        per-head k norms (Qwen3, Gemma 3) K is normalised per head after the projection, and layers
        with different RoPE tables (Gemma 3) are rotated one table at a time.
        """
        if start >= self.num_layers:
            return
        b = h.shape[0]
        hn = self.rms(h, None)  # (B, D)
        kv = torch.matmul(self.kv_folded[start:], hn.t()).transpose(1, 2)  # (L', B, 2 H_kv hd)
        if self.kv_folded_bias is not None:
            kv = kv + self.kv_folded_bias[start:, None]
        kv = kv.reshape(-1, b, 2, self.num_kv_heads, self.head_dim)
        k = kv[:, :, 0]  # (L', B, H_kv, hd)
        if self.k_norm is not None:
            k = F.rms_norm(k, (self.head_dim,), None, self.qk_eps) * self.k_norm[start:]
        kinds = self.layer_rope[start:]
        if not self.other_rope or len(set(kinds)) == 1:
            k = self.rope(k, ctx, kinds[0])  # cos/sin (B, 1, hd/2) broadcast over L'
        else:
            k = k.clone()
            for kind in set(kinds):
                idx = torch.tensor([j for j, kd in enumerate(kinds) if kd == kind], device=k.device)
                k.index_copy_(0, idx, self.rope(k.index_select(0, idx), ctx, kind))
        stacked = torch.stack((k, kv[:, :, 1]))  # (2, L', B, H_kv, hd)
        self.cache.flat[:, start:].index_copy_(2, ctx.slots, stacked)
