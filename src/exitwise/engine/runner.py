"""Steps of the engine: prefill, decode with early exit, and speculative verification, over the model
maths of :mod:`exitwise.models.llama` and the paged KV cache.

The runner builds each step's :class:`StepContext` (positions, KV slots, RoPE rows, gather indices)
and runs the layers. Early exit has one path, :meth:`ModelRunner.decode`: after each exit-capable
layer the :class:`~exitwise.engine.exit_plan.ExitPlan` names the rows that leave there (batch policy:
all rows or none; sequence policy: each confident row); leaving rows get their skipped layers' K/V
from the plan's KV-fill policy and their token from their own readout at the exit layer, and the
remaining rows go on with the batch compacted.
"""

from __future__ import annotations

import itertools
import warnings

import torch

from exitwise.engine.kv_cache import NULL_BLOCK, KVCache
from exitwise.engine.sequence import Sequence
from exitwise.models.llama import LlamaDecoder, OutputHead, StepContext
from exitwise.models.quantize import DEFAULT_HEAD_RESCORE

__all__ = ["ModelRunner", "StepContext"]


class ModelRunner:
    def __init__(self, backbone, cache: KVCache, max_model_len: int, weight_dtype: str | None = None,
                 head_rescore: int = DEFAULT_HEAD_RESCORE, compile: bool = False):
        self.backbone = backbone
        self.cache = cache
        self.model = LlamaDecoder(backbone, cache, max_model_len, weight_dtype, head_rescore)
        self.device = self.model.device
        self.num_layers = self.model.num_layers
        # EngineConfig.compile: full-depth decode steps run their layers as one torch.compile graph
        # (compiled lazily, at the first step of each new shape; the KV length becomes dynamic after
        # the first recompile, so a growing context does not recompile again).
        self.compiled_layers = torch.compile(self.model.decode_layers) if compile else None

    # The model's pieces that exit criteria, KV fills and tools use.
    @property
    def output(self) -> OutputHead:
        return self.model.output

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm + head of hidden states (B, D) -> (B, V)."""
        return self.model.output.logits(h)

    def layer(self, i: int, x: torch.Tensor, ctx: StepContext, decode: bool) -> torch.Tensor:
        return self.model.layer(i, x, ctx, decode)

    def propagate_kv(self, h: torch.Tensor, start: int, ctx: StepContext) -> None:
        self.model.propagate_kv(h, start, ctx)

    # ---------------------------------------------------------------------------------- contexts
    def _rope_ctx(self, positions: list[int], slots: list[int]) -> tuple[torch.Tensor, ...]:
        pos, *rope = self._rope_rows(positions)
        return pos, torch.tensor(slots, device=self.device), *rope

    def _rope_rows(self, positions: list[int]) -> tuple[torch.Tensor, ...]:
        pos = torch.tensor(positions, device=self.device)
        return pos, *self.model.rope_rows(pos)

    def slot(self, seq: Sequence, position: int) -> int:
        """The KV slot of ``seq``'s token at ``position`` (slot 0 for a position whose block was freed:
        a placeholder no layer reads, see :meth:`BlockManager.trim`)."""
        bs = self.cache.block_size
        block = seq.block_table[position // bs]
        return 0 if block == NULL_BLOCK else block * bs + position % bs

    def decode_context(self, seqs: list[Sequence]) -> StepContext:
        """Each sequence feeds its last token at position len - 1 (blocks already allocated)."""
        bs = self.cache.block_size
        lens = [len(s) for s in seqs]
        positions = [n - 1 for n in lens]
        slots = [self.slot(s, p) for s, p in zip(seqs, positions, strict=True)]
        pos, slot_t, cos, sin, other = self._rope_ctx(positions, slots)
        t_max = max(lens)
        nb = -(-t_max // bs)
        # freed (NULL_BLOCK) entries read as block 0: placeholders outside every window, never read
        table = torch.tensor([s.block_table[:nb] + [0] * (nb - len(s.block_table[:nb])) for s in seqs],
                             device=self.device).clamp(min=0)  # (B, nb)
        offs = torch.arange(bs, device=self.device)
        gather = (table[:, :, None] * bs + offs).view(len(seqs), nb * bs)[:, :t_max]  # (B, T)
        mask = None
        if min(lens) != t_max:
            length = torch.tensor(lens, device=self.device)
            mask = (torch.arange(t_max, device=self.device)[None] < length[:, None])[:, None, None, :]
        kv_start = None
        if len(seqs) == 1:  # alone in consecutive blocks (the usual case at batch 1): attention reads them in place
            live = seqs[0].block_table[:nb]
            j = live.count(NULL_BLOCK)  # freed blocks lead the table; position p of a live one is at kv_start + p
            if j < nb and live[j:] == list(range(live[j], live[j] + nb - j)):
                kv_start = (live[j] - j) * bs
        return StepContext(positions=pos, slots=slot_t, cos=cos, sin=sin, gather=gather.reshape(-1),
                           key_mask=mask, max_len=t_max, kv_start=kv_start, other_rope=other)

    def prefill_context(self, seqs: list[Sequence]) -> StepContext:
        """Feed every token of each sequence not already in the cache (prefix-cache hits skipped)."""
        return self.chunk_context(seqs, [(s.num_cached_tokens, len(s)) for s in seqs])

    def chunk_context(self, seqs: list[Sequence], spans: list[tuple[int, int]]) -> StepContext:
        """Feed positions [start, end) of each sequence; each attends causally to positions < end."""
        bs = self.cache.block_size
        offs = torch.arange(bs, device=self.device)
        positions: list[int] = []
        slot_parts = []
        segments = []
        for s, (start, end) in zip(seqs, spans, strict=True):
            nb = -(-end // bs)
            table = s.block_table[:nb]
            # freed (NULL_BLOCK) entries read as slot 0: placeholders no window reaches (see slot())
            blocks = torch.tensor(table, device=self.device)
            ctx_slots = (blocks[:, None] * bs + offs).masked_fill_((blocks < 0)[:, None], 0).view(-1)[:end]  # (end,)
            # one sequence in consecutive blocks (the usual case): its K/V are read in place, not gathered
            kv_start = table[0] * bs if NULL_BLOCK not in table and table == list(range(table[0], table[0] + nb)) \
                else None
            segments.append((len(positions), end - start, ctx_slots, kv_start))
            positions.extend(range(start, end))
            slot_parts.append(ctx_slots[start:])
        pos, cos, sin, other = self._rope_rows(positions)
        slot_t = torch.cat(slot_parts) if len(slot_parts) > 1 else slot_parts[0]
        return StepContext(positions=pos, slots=slot_t, cos=cos, sin=sin, segments=segments, other_rope=other)

    # ----------------------------------------------------------------------------------- steps
    @torch.inference_mode()
    def prefill(self, seqs: list[Sequence]) -> torch.Tensor:
        """Full-depth prefill; returns logits (B, V) at each sequence's last token."""
        x = self.hidden_states(seqs)
        last = torch.tensor(list(itertools.accumulate(len(s) - s.num_cached_tokens for s in seqs)),
                            device=self.device) - 1
        return self.logits(x[last])

    @torch.inference_mode()
    def hidden_states(self, seqs: list[Sequence]) -> torch.Tensor:
        """Full-depth prefill of every token not already cached (blocks allocated), writing their K/V:
        the final hidden states (N, D) of those tokens, sequence-major, before the final norm."""
        ctx = self.prefill_context(seqs)
        x = self.model.embed_tokens([t for s in seqs for t in s.token_ids[s.num_cached_tokens:]])  # (N, D)
        for i in range(self.num_layers):
            x = self.model.layer(i, x, ctx, decode=False)
        return x

    @torch.inference_mode()
    def verify(self, seqs: list[Sequence], x: torch.Tensor, start_layer: int,
               spans: list[tuple[int, int]]) -> torch.Tensor:
        """Run layers ``start_layer``..L-1 over positions [first, end) of each sequence (``spans``, one
        per sequence, of any lengths), with x (N, D) their inputs to ``start_layer`` (sequence-major),
        overwriting those positions' K/V in every layer run. Returns logits (N, V) at full depth."""
        ctx = self.chunk_context(seqs, spans)
        for i in range(start_layer, self.num_layers):
            x = self.model.layer(i, x, ctx, decode=False)
        return self.logits(x)

    def decode_per_sequence(self, seqs: list[Sequence], plan) -> tuple[torch.Tensor, list[int]]:
        """One decode step where each sequence leaves at its own first confident exit layer."""
        return self.decode(seqs, plan, per_sequence=True)

    @torch.inference_mode()
    def decode(self, seqs: list[Sequence], plan=None, *, per_sequence: bool = False, stop: int | None = None,
               inputs: list[torch.Tensor] | None = None):
        """One decode step. Returns (logits (B, V), exit hidden-state index in 1..L): one index for the
        batch policy, a list (one per sequence) with ``per_sequence``.

        After each exit layer the plan names the rows that leave (:meth:`ExitPlan.check`); they leave:
        the KV fill writes their skipped layers from their exit hidden state (a sub-context of their
        rows), and the remaining rows go on with the batch compacted (hidden state, step context and
        the plan's per-row state). Tokens come from each row's own readout at its exit layer: the
        criterion's logits when it computed them (softmax's faithful check, heads), else one head call
        at the end over every row's exit (or final) hidden state.

        Speculative drafting (see ``speculative.py``, batch policy) passes ``inputs``, which receives
        the input (B, D) of every layer run, and ``stop``: a batch not confident by hidden-state index
        ``stop`` returns ``(None, stop)`` there, with ``inputs[stop]`` the state to resume from.
        """
        ctx = self.decode_context(seqs)
        x = self.model.embed_tokens([s.last_token for s in seqs])  # (B, D)
        L, b = self.num_layers, len(seqs)
        if plan is None or not plan.begin(seqs, self.output, per_sequence):
            logits = self.logits(self._full_depth(x, ctx))
            return (logits, [L] * b) if per_sequence else (logits, L)
        rows = torch.arange(b, device=self.device)  # original index of each remaining row
        exits = [L] * b
        h_exit: torch.Tensor | None = None  # (B, D) hidden state each row was read out from
        given: list[tuple[torch.Tensor, torch.Tensor]] = []  # (original rows, logits) from the criterion
        for i in range(L):
            if inputs is not None:
                inputs.append(x)
            if i == stop:
                return None, i
            x = self.model.layer(i, x, ctx, decode=True)
            res = plan.check(i + 1, x)
            if res is None:
                continue
            leave, logits = res  # leave: indices into the current rows, None = all of them
            everyone = leave is None or leave.numel() == rows.numel()
            gone = rows if everyone else rows.index_select(0, leave)
            for r in gone.tolist():
                exits[r] = i + 1
            if everyone:
                if inputs is not None:
                    inputs.append(x)  # the exit state: input to the first skipped layer
                plan.kv_fill.fill(self, x, i + 1, ctx)
                if not given and h_exit is None:  # the whole batch leaves together: the common case
                    out = logits if logits is not None else self.logits(x)
                    return (out, exits) if per_sequence else (out, i + 1)
                if logits is not None:
                    given.append((gone, logits))
                else:
                    h_exit = x.new_empty(b, x.shape[1]) if h_exit is None else h_exit
                    h_exit.index_copy_(0, rows, x)
                rows = rows[:0]
                break
            hx = x.index_select(0, leave)
            plan.kv_fill.fill(self, hx, i + 1, ctx.select(leave))
            if logits is not None:
                given.append((gone, logits))
            else:
                h_exit = x.new_empty(b, x.shape[1]) if h_exit is None else h_exit
                h_exit.index_copy_(0, gone, hx)
            keep = torch.ones(rows.numel(), dtype=torch.bool, device=self.device)
            keep[leave] = False
            keep = keep.nonzero().squeeze(1)
            x, ctx, rows = x.index_select(0, keep), ctx.select(keep), rows.index_select(0, keep)
            plan.select_rows(keep)
        if not given and h_exit is None:  # nobody left early
            logits = self.logits(x)
            return (logits, exits) if per_sequence else (logits, L)
        return self._gather_logits(b, rows, x, h_exit, given), exits

    def _full_depth(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """All layers of a decode step, compiled when ``compile`` is on -- except float32 batches of 2+
        with oneDNN-packed weights, which dynamo cannot trace and which eager runs faster than the
        compiled plain matmuls. A compilation that fails warns once and turns compile off (the step
        reruns eagerly; rewriting the same K/V slots with the same values is harmless)."""
        fn = self.compiled_layers
        if fn is not None and not (self.model.use_onednn and x.shape[0] > 1):
            self.model.prepare(ctx)  # RoPE rows and window reads built eagerly: the graph only reads them
            try:
                return fn(x, ctx)
            except Exception as exc:  # noqa: BLE001 - any failure of the compiler: fall back to eager
                warnings.warn(f"torch.compile of the decode step failed, running eager from now on: "
                              f"{type(exc).__name__}: {exc}", stacklevel=2)
                self.compiled_layers = None
        return self.model.decode_layers(x, ctx)

    def _gather_logits(self, b: int, rows: torch.Tensor, x: torch.Tensor, h_exit: torch.Tensor | None,
                       given: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """(B, V) logits of a step whose rows left at different layers: the criterion's where it
        computed them, else one head call over the rows' exit (or final) hidden states."""
        if rows.numel():
            h_exit = x.new_empty(b, x.shape[1]) if h_exit is None else h_exit
            h_exit.index_copy_(0, rows, x)
        if not given:
            return self.logits(h_exit)
        out = torch.empty(b, self.output.weight.shape[0], dtype=given[0][1].dtype, device=self.device)
        done = torch.zeros(b, dtype=torch.bool, device=self.device)
        for r, lg in given:
            out.index_copy_(0, r, lg.to(out.dtype))
            done[r] = True
        need = (~done).nonzero().squeeze(1)
        if need.numel():
            out.index_copy_(0, need, self.logits(h_exit.index_select(0, need)).to(out.dtype))
        return out
