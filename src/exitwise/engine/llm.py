"""``LLM`` (offline generate) and ``LLMEngine`` (add_request / step / abort) on top of the scheduler,
the paged cache and the runner; :class:`exitwise.engine.async_engine.AsyncLLM` drives the same engine
from one asyncio background loop for a server."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from collections.abc import Sequence as SequenceT
from dataclasses import dataclass, field

import torch

from exitwise.engine.config import EngineConfig
from exitwise.engine.drafts import DRAFT_SOURCES, NO_DRAFT, make_draft_source
from exitwise.engine.exit_plan import ExitPlan
from exitwise.engine.kv_cache import BlockManager, KVCache
from exitwise.engine.runner import ModelRunner
from exitwise.engine.sampling import Sampler, SamplingParams
from exitwise.engine.scheduler import Scheduler
from exitwise.engine.sequence import Sequence, next_arrival
from exitwise.engine.speculative import SpeculativeDecoder
from exitwise.models.families import attention_shape
from exitwise.models.spec import ModelSpec


@dataclass
class RequestOutput:
    """Incremental output of one request after a step: ``new_*`` is what this step added."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    token_ids: list[int]  # all completion tokens so far
    text: str  # all completion text so far (stop string excluded)
    finished: bool
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    exit_layers: list[int] | None = None  # per completion token, if the request asked for them
    metrics: dict = field(default_factory=dict)
    error: str | None = None  # set (finish_reason "error") when a step failed for this request alone


class RequestError(ValueError):
    """A request the engine cannot run; ``param`` names the request field, ``code`` an OpenAI error code."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


class LLMEngine:
    """Synchronous engine. Not thread-safe: one thread calls add_request / step / abort."""

    def __init__(self, model=None, config: EngineConfig | None = None, **settings):
        """``model``: a Backbone, a model name or a :class:`~exitwise.models.spec.ModelSpec`; None: the
        config's ``model``. ``config``: an :class:`EngineConfig`; or its settings as keywords in the
        engine's spelling (``exit="softmax"``, ``exit_threshold=``, ``exit_layers=``, ``exit_min_layer=``,
        ``exit_mode=``, ``kv_fill=``, ``exit_kwargs=``, and the EngineConfig fields), see
        :meth:`EngineConfig.from_kwargs`. The engine runs on ``config.device`` (None: the model's)."""
        if config is not None and settings:
            raise TypeError(f"pass an EngineConfig or keyword settings, not both (got {sorted(settings)})")
        config = config or EngineConfig.from_kwargs(**settings)
        if model is None:
            if config.model is None:
                raise TypeError("pass a model, or an EngineConfig with model=ModelSpec(...)")
            model = config.model
        name = model if isinstance(model, str) else getattr(model, "name", None)
        config = config.for_model(name)
        self.config = config
        self.exit_mode = config.exit.mode if config.exit is not None else "batch"
        if isinstance(model, ModelSpec):
            model = model.load()
        elif isinstance(model, str):
            from exitwise import load_model

            model = load_model(model, device=config.device or "cpu")
        model = model.to(config.device)
        self.backbone = model
        self.tokenizer = model.tokenizer
        cfg = model.config
        limit = getattr(cfg, "max_position_embeddings", 2048)
        self.max_model_len = min(limit, config.max_model_len or limit)
        _, kv_heads, head_dim = attention_shape(cfg)
        self.cache = KVCache(model.num_layers, kv_heads, head_dim, block_size=config.block_size,
                             memory_bytes=config.kv_cache_bytes, num_blocks=config.num_kv_blocks, dtype=model.dtype,
                             device=model.device)
        self.runner = ModelRunner(model, self.cache, self.max_model_len, config.weight_dtype, config.head_rescore,
                                  compile=config.compile)
        windows = self.runner.model.windows
        # blocks out of every window are freed only when no layer reads the whole context
        window = max(windows) if None not in windows else None
        self.blocks = BlockManager(self.cache.num_blocks, config.block_size, config.enable_prefix_caching, window)
        self.scheduler = Scheduler(self.blocks, max_num_seqs=config.max_num_seqs,
                                   max_num_batched_tokens=config.max_num_batched_tokens,
                                   max_model_len=self.max_model_len)
        self.sampler = Sampler()
        self.plan: ExitPlan | None = None
        if config.exit is not None:
            self.plan = config.exit.build(model, self.runner.model.weight_dtype, config.head_rescore)
        eos = getattr(self.tokenizer, "eos_token_id", None) if self.tokenizer is not None else None
        if eos is None:
            eos = getattr(cfg, "eos_token_id", None)
        self.eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self.spec: SpeculativeDecoder | None = None
        if config.speculative:
            adapter = None
            if config.draft_adapter is not None and config.draft in ("auto", "adapter"):
                from exitwise.heads.adapter import Adapter

                adapter = Adapter.load(config.draft_adapter, model).to(self.runner.device)
            source = make_draft_source(config.draft, self.runner, self.plan, self._ends, adapter,
                                       config.adapter_threshold, config.draft_vocab)
            self.spec = SpeculativeDecoder(self.runner, source, self.blocks, self.sampler, self.plan,
                                           config.max_draft)
        self.seqs: dict[str, Sequence] = {}
        self._ids = itertools.count()
        self.stats = {"steps": 0, "decode_steps": 0, "prefill_steps": 0, "tokens": 0, "exit_layer_sum": 0,
                      "decode_tokens": 0}

    # ------------------------------------------------------------------------------------- requests
    @property
    def context(self) -> int:
        """The longest prompt + completion this engine can hold: its position limit and its KV pool."""
        return min(self.max_model_len, self.blocks.num_blocks * self.blocks.block_size)

    def check_request(self, ids: list[int], params: SamplingParams) -> None:
        """Refuse a request this engine cannot run, with a :class:`RequestError` naming the field (the
        one place these checks live: ``add_request`` and the server's 400s both come from here)."""
        if not ids:
            raise RequestError("prompt is empty", "prompt")
        vocab = self.runner.model.embed.shape[0]
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:  # an id past the embedding would make the whole batch's step raise
            raise RequestError(f"prompt token ids {bad[:5]} are outside the vocabulary of {vocab}", "prompt")
        context = self.context
        pool = "" if context == self.max_model_len else \
            f" (the KV pool: {self.blocks.num_blocks} KV blocks of {self.blocks.block_size} tokens)"
        if len(ids) >= context:
            raise RequestError(f"the prompt has {len(ids)} tokens; the context holds {context}{pool}", "prompt",
                               "context_length_exceeded")
        if len(ids) + params.max_tokens > context:
            raise RequestError(f"max_tokens={params.max_tokens} with a {len(ids)}-token prompt exceeds the "
                               f"context of {context} tokens{pool}", "max_tokens", "context_length_exceeded")
        if params.exit_min_layer is not None and params.exit_min_layer > self.runner.num_layers:
            raise RequestError(f"exit_min_layer={params.exit_min_layer} exceeds the model's "
                               f"{self.runner.num_layers} layers", "exit_min_layer")
        if params.exit_alpha is not None and (self.plan is None or self.plan.criterion.name != "heads"):
            raise RequestError("alpha (exit_alpha) needs an engine with the heads exit criterion (exitwise serve "
                               "--heads PATH)", "alpha")
        if params.draft is not None:
            self._check_draft(params.draft)
        if self.plan is not None:
            try:
                self.plan.check_params(params)
            except ValueError as exc:
                raise RequestError(str(exc), "alpha" if params.exit_alpha is not None else None) from exc

    def _check_draft(self, asked: str) -> None:
        names = (NO_DRAFT, *DRAFT_SOURCES)
        if asked not in names:
            raise RequestError(f"draft {asked!r} is unknown; choose one of {', '.join(names)}", "draft")
        if asked == NO_DRAFT:
            return
        if self.spec is None:
            raise RequestError(f"draft={asked!r} needs a speculative engine (exitwise serve --speculative)", "draft")
        have = self.config.draft
        if asked != "auto" and have not in ("auto", asked):
            raise RequestError(f"draft={asked!r}: this engine drafts with {have!r} only", "draft")
        if asked == "adapter" and self.config.draft_adapter is None:
            raise RequestError("draft='adapter' needs an engine with a draft adapter (--adapter PATH)", "draft")
        if asked == "exit" and self.plan is None:
            raise RequestError("draft='exit' needs an engine with an exit criterion (--heads PATH or --exit NAME)",
                               "draft")

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        params = params or SamplingParams()
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("prompt is text but the model has no tokenizer; pass token ids")
            ids = self.tokenizer(prompt)["input_ids"]
        else:
            ids = list(prompt)
        self.check_request(ids, params)
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self.seqs:
            raise ValueError(f"request_id {request_id!r} is already in use")
        seq = Sequence(request_id, ids, params, arrival=next_arrival())
        self.scheduler.add(seq)
        self.seqs[request_id] = seq
        seq.metrics = {"arrival": time.perf_counter()}
        return request_id

    def abort(self, request_id: str) -> bool:
        """Stop a request and free its blocks now; False if it is unknown or already finished."""
        seq = self.seqs.pop(request_id, None)
        if seq is None or seq.is_finished:
            return False
        self.scheduler.finish(seq, "abort")
        self.sampler.forget(request_id)
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    @property
    def num_free_blocks(self) -> int:
        return self.blocks.num_free

    # ----------------------------------------------------------------------------------------- step
    def step(self) -> list[RequestOutput]:
        """Run one prefill or decode step; return an output for every sequence that advanced.

        A failure that belongs to one request (its sampling settings, or a forward pass that raises
        whenever it is in the batch) finishes that request with ``finish_reason="error"``; the others
        get the tokens they would have got without it."""
        seqs, is_prefill = self.scheduler.schedule()
        if not seqs:
            return []
        if not is_prefill and self.spec is not None:
            return self._speculative_step(seqs)
        self.stats["steps"] += 1
        return [self._output(seq, tok, layer) for seq, tok, layer in self._run(seqs, is_prefill)]

    def _run(self, seqs: list[Sequence], is_prefill: bool,
             full_depth: bool = False) -> list[tuple[Sequence, int | Exception, int]]:
        """(sequence, next token or the exception it failed with, exit layer) for each of ``seqs``."""
        try:
            logits, exit_layers = self._forward(seqs, is_prefill, full_depth)
            if self.plan is not None:
                self.plan.observe(seqs, logits)
        except Exception as exc:  # noqa: BLE001 - who caused it is unknown: find out below
            if len(seqs) == 1:
                return [(seqs[0], exc, 0)]
            # Each sequence alone: a row's logits do not depend on its batch mates (full depth; with a
            # batch-level exit rule the batch decides the depth anyway), so the others' tokens are
            # unchanged and only a sequence that fails on its own fails. Re-running rewrites the same
            # K/V slots with the same values; a prefill recomputes its cached prefix too, because the
            # sequence that was to fill those blocks in this step may be the one that fails.
            if is_prefill:
                for seq in seqs:
                    seq.num_cached_tokens = 0
            return [r for seq in seqs for r in self._run([seq], is_prefill, full_depth)]
        tokens = self.sampler(logits, [s.request_id for s in seqs], [s.params for s in seqs])
        return list(zip(seqs, tokens, exit_layers, strict=True))

    def _forward(self, seqs: list[Sequence], is_prefill: bool, full_depth: bool) -> tuple[torch.Tensor, list[int]]:
        """Logits (B, V) of the step and the exit layer of each sequence (``full_depth``: no early exit)."""
        if is_prefill:
            logits = self.runner.prefill(seqs)
            self.stats["prefill_steps"] += 1
            return logits, [self.runner.num_layers] * len(seqs)
        plan = None if full_depth else self.plan
        if self.exit_mode == "sequence" and plan is not None:
            logits, exit_layers = self.runner.decode_per_sequence(seqs, plan)
        else:
            logits, exit_layer = self.runner.decode(seqs, plan)
            exit_layers = [exit_layer] * len(seqs)
        self.stats["decode_steps"] += 1
        self.stats["decode_tokens"] += len(seqs)
        self.stats["exit_layer_sum"] += sum(exit_layers)
        return logits, exit_layers

    def _output(self, seq: Sequence, tok: int | Exception, exit_layer: int) -> RequestOutput:
        if isinstance(tok, Exception):
            return self._fail(seq, tok)
        try:
            return self._emit(seq, [tok], exit_layer)
        except Exception as exc:  # noqa: BLE001 - e.g. detokenisation: this request's problem only
            return self._fail(seq, exc)

    def _fail(self, seq: Sequence, exc: Exception) -> RequestOutput:
        """Finish ``seq`` because of ``exc`` (its blocks are freed now); the output carries the error."""
        self.blocks.uncache(seq)
        self.scheduler.finish(seq, "error")
        self.sampler.forget(seq.request_id)
        self.seqs.pop(seq.request_id, None)
        return RequestOutput(
            request_id=seq.request_id, new_token_ids=[], new_text="", token_ids=seq.completion_ids,
            text=seq.text[:seq.emitted_text_len], finished=True, finish_reason="error",
            num_prompt_tokens=seq.num_prompt_tokens,
            exit_layers=list(seq.exit_layers) if seq.params.return_exit_layers else None,
            error=f"{type(exc).__name__}: {exc}")

    def _speculative_step(self, seqs: list[Sequence]) -> list[RequestOutput]:
        budgets = [s.params.max_tokens - s.num_completion_tokens for s in seqs]
        self.stats["steps"] += 1
        try:
            new = self.spec.step(seqs, budgets)
        except Exception:  # noqa: BLE001 - fall back to a plain (isolating) decode step for this batch
            for s in seqs:  # token ids are restored by the decoder; drop the slots its drafts took
                self.blocks.truncate(s, len(s))
            # at full depth: a speculative engine's tokens are the full model's, exits never decide them
            return [self._output(seq, tok, layer) for seq, tok, layer in self._run(seqs, False, full_depth=True)]
        self.stats["decode_steps"] += 1
        # Every emitted token is the full model's (verified, or computed at full depth).
        return [self._emit(seq, toks, self.runner.num_layers) for seq, toks in zip(seqs, new, strict=True)]

    def _ends(self, seq: Sequence, tok: int) -> bool:
        return tok in self.eos_ids and not seq.params.ignore_eos

    def _emit(self, seq: Sequence, tokens: list[int], exit_layer: int) -> RequestOutput:
        """Append this step's tokens (several after a speculative cycle; none past EOS or max_tokens)."""
        now = time.perf_counter()
        for tok in tokens:
            seq.token_ids.append(tok)
            seq.exit_layers.append(exit_layer)
            self.stats["tokens"] += 1
            if self._ends(seq, tok) or seq.num_completion_tokens >= seq.params.max_tokens:
                break
        seq.num_computed_tokens = len(seq) - 1  # the newest token is fed by the next step
        seq.metrics.setdefault("first_token", now)
        seq.metrics["last_token"] = now
        return self._advance(seq, seq.last_token)

    def _advance(self, seq: Sequence, tok: int) -> RequestOutput:
        p = seq.params
        reason = None
        if tok in self.eos_ids and not p.ignore_eos:
            reason = "stop"
        elif seq.num_completion_tokens >= p.max_tokens:
            reason = "length"
        if self.tokenizer is not None:
            text = self.tokenizer.decode(seq.completion_ids, skip_special_tokens=True)
            for stop in p.stop:
                cut = text.find(stop)
                if cut != -1:
                    text, reason, seq.stop_text = text[:cut], "stop", stop
                    break
            seq.text = text
        if reason is not None:
            self.scheduler.finish(seq, reason)
            self.sampler.forget(seq.request_id)
            self.seqs.pop(seq.request_id, None)
            visible = len(seq.text)
        else:
            # Hold back an incomplete UTF-8 character and a possible prefix of a stop string.
            hold = max((len(s) - 1 for s in p.stop), default=0)
            visible = len(seq.text) - hold
            if seq.text.endswith("\ufffd"):
                visible = min(visible, len(seq.text.rstrip("\ufffd")))
        visible = max(visible, seq.emitted_text_len)
        new_text = seq.text[seq.emitted_text_len:visible]
        seq.emitted_text_len = visible
        new_ids = seq.completion_ids[seq.emitted_tokens:]
        seq.emitted_tokens = seq.num_completion_tokens
        m = seq.metrics
        return RequestOutput(
            request_id=seq.request_id, new_token_ids=new_ids, new_text=new_text, token_ids=seq.completion_ids,
            text=seq.text[:visible], finished=reason is not None, finish_reason=reason,
            num_prompt_tokens=seq.num_prompt_tokens,
            exit_layers=list(seq.exit_layers) if p.return_exit_layers else None,
            metrics={"ttft": m["first_token"] - m["arrival"], "elapsed": m["last_token"] - m["arrival"],
                     "preemptions": seq.num_preemptions},
        )

    @property
    def mean_exit_layer(self) -> float:
        n = self.stats["decode_tokens"]
        return self.stats["exit_layer_sum"] / n if n else float("nan")


class LLM:
    """Offline generation: ``LLM(model).generate(prompts, SamplingParams(...))``.

    ``model`` is an :class:`exitwise.Backbone`, a name for :func:`exitwise.load_model` or a
    :class:`~exitwise.models.spec.ModelSpec` (None: the config's ``model``); ``config`` (an
    :class:`EngineConfig`) or its keyword settings configure the :class:`LLMEngine`.
    """

    def __init__(self, model=None, config: EngineConfig | None = None, **settings):
        self.engine = LLMEngine(model, config, **settings)

    def generate(self, prompts: str | SequenceT[str] | SequenceT[list[int]],
                 params: SamplingParams | SequenceT[SamplingParams] | None = None) -> list[RequestOutput]:
        """Run all prompts to completion with continuous batching; outputs in prompt order (a request the
        engine failed comes back finished with ``finish_reason="error"`` and ``error`` set)."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts")
        ids = [self.engine.add_request(p, sp) for p, sp in zip(prompts, params, strict=True)]
        final: dict[str, RequestOutput] = {}
        while self.engine.has_unfinished():
            for out in self.engine.step():
                if out.finished:
                    final[out.request_id] = out
        return [final[i] for i in ids]

    def stream(self, prompt: str | list[int], params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Incremental outputs of one request (other queued requests advance too)."""
        rid = self.engine.add_request(prompt, params)
        try:
            while True:
                for out in self.engine.step():
                    if out.request_id == rid:
                        yield out
                        if out.finished:
                            return
        finally:
            self.engine.abort(rid)  # no-op when finished; frees blocks if the consumer stopped early
