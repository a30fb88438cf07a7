"""The OpenAI-compatible HTTP app: ``create_app(engine)`` -> FastAPI.

One :class:`~exitwise.engine.async_engine.AsyncLLM` loop serves every request; handlers only
validate, tokenize, and relay its outputs. Everything that can be checked before a request enters the
engine is checked here, so a bad request gets a 400 naming its field instead of a broken stream.

One request never hurts another: the body is capped (413) before it is read; parsing, validation and
tokenisation run in a small thread pool, off the event loop, so ``/health`` and the streams of others
keep answering while a big prompt tokenises; a prompt with more characters than the context's tokens
can stand for is refused before it is tokenised (:func:`max_token_chars`), so tokenising costs at most
a context's worth of text; small bodies have a thread of their own, so they never wait behind big
ones; the waiting queue is bounded (429 with ``Retry-After``);
a request the engine fails is failed alone (the engine isolates it); and an unexpected error is a
500 that keeps the keep-alive connection (:class:`~exitwise.server.guards.CatchAll`).

Client disconnects: Starlette cancels a streaming response when the client goes away, and a
non-streaming handler races its result against ``http.disconnect``; either way the request's
generator is closed, which aborts it in the engine and frees its KV blocks at the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from exitwise.engine.async_engine import AsyncLLM, RequestFailed
from exitwise.engine.llm import LLMEngine, RequestError, RequestOutput
from exitwise.engine.sampling import SamplingParams
from exitwise.models.chat_templates import chat_template, chat_token_ids, control_ids, render_chat
from exitwise.server import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_QUEUE
from exitwise.server.guards import APIError, CatchAll, docs_page, error_response, read_body
from exitwise.server.metrics import CONTENT_TYPE, ServerMetrics, exposition, make_registry
from exitwise.server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    Delta,
    ErrorInfo,
    ErrorResponse,
    ModelCard,
    ModelList,
    Usage,
)

RETRY_AFTER_S = 1
# Bodies up to this size are prepared on a thread of their own: a short request never queues behind
# the parsing and tokenising of big ones.
SMALL_BODY_BYTES = 64 << 10

T = TypeVar("T", bound=BaseModel)
_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}


def _is_tag(part) -> bool:
    """A union member's name in a pydantic error location (``prompt.list[int].0``), not a field."""
    return isinstance(part, str) and (part in _TYPE_TAGS or "[" in part)


def _validation_error(errors: list[dict]) -> APIError:
    """The most telling pydantic/FastAPI error as an OpenAI error naming the top-level field."""
    if not errors:
        return APIError("request body: invalid request")
    err = errors[0]
    if err.get("type") == "json_invalid":
        return APIError(f"malformed JSON body: {err.get('ctx', {}).get('error', err.get('msg'))}", code="json_invalid")
    msg = err.get("msg", "invalid value").removeprefix("Value error, ")
    field = (err.get("ctx") or {}).get("field")
    if isinstance(field, str):  # a model-level check that names its field (unsupported, conflicting)
        return APIError(f"{field}: {msg}", param=field, code=err.get("type"))
    loc = [p for p in err.get("loc", ()) if p != "body"]
    param = str(loc[0]) if loc and isinstance(loc[0], str) else None
    if param is None:
        return APIError(f"request body: {msg}", code=err.get("type"))
    # A union field reports one error per member; the member that got furthest says most.
    same = [e for e in errors if [p for p in e.get("loc", ()) if p != "body"][:1] == [param]]
    err = max(same, key=lambda e: len(e.get("loc", ())))
    msg = err.get("msg", "invalid value").removeprefix("Value error, ")
    path = [p for p in err.get("loc", ()) if p != "body" and not _is_tag(p)][1:3]
    where = param + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path)
    return APIError(f"{where}: {msg}", param=param, code=err.get("type"))


def parse_request(raw: bytes, model: type[T]) -> T:
    """Validate the raw body strictly: straight from the bytes, so malformed UTF-8, lone surrogates and
    absurd nesting are malformed JSON (400) before any Python object is built for them."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise _validation_error(exc.errors()) from exc


def max_token_chars(tokenizer) -> int | None:
    """The most characters of input text one token can stand for, or None where that has no bound.

    With it, a text of ``c`` characters has at least ``c / max_token_chars`` tokens, so an over-long
    prompt is refused from its length alone instead of after tokenising megabytes. The bound is the
    longest vocabulary or added-token string: a byte-level BPE token string has one character per byte
    it stands for (and a byte is at most one character), a SentencePiece-style token string one
    character per character ("▁" for a space), a byte-fallback token ``<0x0A>`` more characters than
    the byte it stands for.
    It fails where text can shrink before the model sees it (a normalizer other than a lengthening
    replace or prepend, e.g. NFKC composing characters) or where a run of unknown characters becomes
    one token (``fuse_unk`` without byte fallback); those tokenizers get None, and the old full
    tokenisation. Bundled tokenizers: SmolLM2 81 (a run of newline and spaces), Gemma 3 31."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    try:
        spec = json.loads(backend.to_str())
    except (ValueError, TypeError):
        return None
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or (model.get("fuse_unk") and not model.get("byte_fallback")):
        return None

    def lengthens(norm: dict | None) -> bool:
        if norm is None:
            return True
        kind = norm.get("type")
        if kind == "Sequence":
            return all(lengthens(n) for n in norm.get("normalizers", []))
        if kind == "Prepend":
            return True
        if kind == "Replace":
            pattern = norm.get("pattern", {})
            return "String" in pattern and len(norm.get("content", "")) >= len(pattern["String"])
        return False

    if not lengthens(spec.get("normalizer")):
        return None
    strings = list(model.get("vocab") or {}) + [t.get("content", "") for t in spec.get("added_tokens", [])]
    return max(1, max(map(len, strings), default=1))


def _sse(obj: BaseModel | dict) -> str:
    body = obj.model_dump_json() if isinstance(obj, BaseModel) else json.dumps(obj)
    return f"data: {body}\n\n"


class Server:
    """Per-app state (no globals): the async engine, served name, limits and counters."""

    def __init__(self, llm: AsyncLLM, model_name: str, api_key: str | None,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, max_queue: int | None = DEFAULT_MAX_QUEUE):
        self.llm = llm
        self.engine: LLMEngine = llm.engine
        self.tokenizer = self.engine.tokenizer
        self.chat_template = chat_template(self.tokenizer, getattr(self.engine.backbone.config, "model_type", None))
        if self.tokenizer is None:
            raise ValueError("serving needs a model with a tokenizer")
        self.model_name = model_name
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.max_queue = max_queue
        self.active: set[str] = set()  # admitted requests not yet over (queued, running or sending)
        self.metrics = ServerMetrics()
        self.registry = make_registry(self.metrics, self.engine, self.queued, max_queue)
        # Two threads: tokenising is CPU-bound, and more would only take cores from the engine's step;
        # one more for small bodies (SMALL_BODY_BYTES), which a big body's parse never blocks.
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="exitwise-prepare")
        self.small_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="exitwise-prepare-small")
        self.context = self.engine.context  # the longest prompt + completion the engine can hold
        self.token_chars = max_token_chars(self.tokenizer)
        self.control_ids = control_ids(self.tokenizer)
        self.num_layers = self.engine.runner.num_layers

    # ------------------------------------------------------------------------------ validation
    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(f"model {model!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")

    def prompt_ids(self, req: CompletionRequest) -> list[int]:
        prompt = req.prompt
        if isinstance(prompt, list):
            self.check_context(len(prompt), "prompt")  # before a pass over what may be millions of ids
            return list(prompt)
        return self.tokenize(prompt, "prompt")  # the engine's check_request refuses an empty one

    def chat_ids(self, req: ChatCompletionRequest) -> list[int]:
        if self.chat_template is None:
            raise APIError(f"{self.model_name} has no chat template; use /v1/completions", param="messages")
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            text = render_chat(self.tokenizer, self.chat_template, messages)
        except Exception as exc:  # jinja errors: a template may reject e.g. two system messages
            raise APIError(f"messages do not fit the chat template: {exc}", param="messages") from exc
        self.check_chars(text, "messages")  # before a second rendering or any tokenising
        # The template wrote the special tokens (no second BOS is added); a message's own text never
        # becomes one (chat_token_ids): `<|im_end|><|im_start|>system` in a message stays plain text.
        try:
            return chat_token_ids(self.tokenizer, self.chat_template, messages, text, self.control_ids)
        except (TypeError, ValueError) as exc:  # e.g. text that is not valid Unicode (a lone surrogate)
            raise APIError(f"messages: cannot be tokenized: {exc}", param="messages") from exc
        except Exception as exc:  # the second (placeholder) rendering failed where the first did not
            raise APIError(f"messages do not fit the chat template: {exc}", param="messages") from exc

    def check_chars(self, text: str, param: str) -> None:
        # A text of c characters has at least c / token_chars tokens: refuse from the length alone what
        # cannot fit, so no client makes the server tokenise more than a context's worth of text.
        if self.token_chars is not None and len(text) > (self.context - 1) * self.token_chars:
            raise APIError(f"the prompt has {len(text)} characters, so at least "
                           f"{-(-len(text) // self.token_chars)} tokens (at most {self.token_chars} characters "
                           f"per token); the context holds {self.context}", param=param,
                           code="context_length_exceeded")

    def tokenize(self, text: str, param: str, **kwargs) -> list[int]:
        self.check_chars(text, param)
        try:
            return self.tokenizer(text, **kwargs)["input_ids"]
        except (TypeError, ValueError) as exc:  # e.g. text that is not valid Unicode (a lone surrogate)
            raise APIError(f"{param}: cannot be tokenized: {exc}", param=param) from exc

    def check_context(self, n: int, param: str) -> None:
        if n >= self.context:
            raise APIError(f"the prompt has {n} tokens; the context holds {self.context}", param=param,
                           code="context_length_exceeded")

    def sampling_params(self, req: CompletionRequest | ChatCompletionRequest, ids: list[int],
                        prompt_param: str) -> SamplingParams:
        self.check_context(len(ids), prompt_param)
        if req.exit_threshold is not None and self.engine.plan is None:
            # it would be ignored: a client asking for early exit must learn that none happens (the
            # engine itself takes it, for callers that drive exits with a plan of their own)
            raise APIError("exit_threshold needs a server with an exit criterion (exitwise serve --exit NAME, "
                           "--heads or --classifier); this one runs every token at full depth",
                           param="exit_threshold")
        max_tokens = req.max_tokens if req.max_tokens is not None else self.context - len(ids)
        try:
            params = SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                                    top_k=req.top_k, seed=req.seed, stop=req.stop, ignore_eos=req.ignore_eos,
                                    exit_threshold=req.exit_threshold, exit_min_layer=req.exit_min_layer,
                                    exit_alpha=req.alpha, return_exit_layers=req.return_exit_layers,
                                    draft=req.draft)
        except ValueError as exc:
            raise APIError(str(exc)) from exc
        try:  # the engine's own checks, here so the client gets a 400 naming the field, not a broken stream
            self.engine.check_request(ids, params)
        except RequestError as exc:
            raise APIError(str(exc), param=exc.param, code=exc.code) from exc
        return params

    def prepare_completion(self, raw: bytes) -> tuple[CompletionRequest, list[int], SamplingParams]:
        req = parse_request(raw, CompletionRequest)
        self.check_model(req.model)
        ids = self.prompt_ids(req)
        return req, ids, self.sampling_params(req, ids, "prompt")

    def prepare_chat(self, raw: bytes) -> tuple[ChatCompletionRequest, list[int], SamplingParams]:
        req = parse_request(raw, ChatCompletionRequest)
        self.check_model(req.model)
        ids = self.chat_ids(req)
        return req, ids, self.sampling_params(req, ids, "messages")

    async def prepare(self, request: Request, prepare: Callable[[bytes], tuple]) -> tuple:
        """Read the body (capped) and run ``prepare`` on it off the event loop."""
        self.check_queue()  # under overload a 429 costs nothing: refuse before reading or parsing
        raw = await read_body(request, self.max_body_bytes)
        pool = self.small_pool if len(raw) <= SMALL_BODY_BYTES else self.pool
        return await asyncio.get_running_loop().run_in_executor(pool, prepare, raw)

    # -------------------------------------------------------------------------------- admission
    def queued(self) -> int:
        """Admitted requests not in the engine's running batch: waiting for a slot (or just finishing)."""
        return max(0, len(self.active) - len(self.engine.scheduler.running))

    def check_queue(self) -> None:
        if self.max_queue is not None and self.queued() >= self.max_queue:
            raise APIError(f"the server is busy: {self.queued()} requests are waiting (--max-queue "
                           f"{self.max_queue}); retry later", code="queue_full", status=429, type="rate_limit_error",
                           headers={"Retry-After": str(RETRY_AFTER_S)})

    def admit(self, rid: str) -> None:
        """Count ``rid`` against the queue bound, or refuse it with 429 (no await between check and add,
        so concurrent handlers cannot overshoot the bound)."""
        self.check_queue()
        self.active.add(rid)

    def release(self, rid: str) -> None:
        self.active.discard(rid)  # idempotent: a stream releases when it ends and again when it closes

    # ------------------------------------------------------------------------------- execution
    async def outputs(self, ids: list[int], params: SamplingParams, rid: str) -> AsyncIterator[RequestOutput]:
        """The engine's outputs for one request, counted; closing it early aborts the request."""
        self.metrics.requests += 1
        self.metrics.prompt_tokens += len(ids)
        finished = failed = False
        try:
            async with contextlib.aclosing(self.llm.generate(ids, params, request_id=rid)) as outs:
                async for out in outs:
                    self.metrics.record_tokens(len(out.new_token_ids))
                    finished = out.finished
                    yield out
        except RequestFailed:
            failed = True
            raise
        finally:
            self.release(rid)
            if finished:
                self.metrics.finished += 1
            elif failed:
                self.metrics.failed += 1
            else:
                self.metrics.aborted += 1
                self.llm.abort(rid)  # idempotent; the inner generator already did it when closed

    async def collect(self, request: Request, outs: AsyncIterator[RequestOutput], rid: str) -> RequestOutput | None:
        """Last output of a non-streaming request ``rid``, or None if the client disconnected first; the
        request leaves the queue count either way."""
        try:
            return await self._last(request, outs)
        finally:
            self.release(rid)

    async def _last(self, request: Request, outs: AsyncIterator[RequestOutput]) -> RequestOutput | None:

        async def last() -> RequestOutput:
            out = None
            async for item in outs:
                out = item
            return out

        async def disconnected() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass

        result = asyncio.ensure_future(last())
        watcher = asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({result, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not result.done():
                result.cancel()  # client gone (or the handler was cancelled): abort the request
                with contextlib.suppress(asyncio.CancelledError):
                    await result
                await outs.aclose()
        if result.cancelled():
            return None
        try:
            return result.result()
        except ValueError as exc:  # the engine refused the request after all (should be caught above)
            raise APIError(str(exc)) from exc
        except RequestFailed as exc:  # this request alone; the others in its batch went on
            raise APIError(f"the engine failed this request: {exc}", code="engine_error", status=500,
                           type="server_error") from exc

    def stream(self, chunks: AsyncIterator[str], rid: str) -> StreamingResponse:
        # The background task runs after the stream ends *or* is cancelled on disconnect; closing the
        # generator there makes the abort deterministic instead of waiting for garbage collection, and
        # releases the request's place even if the stream never started.
        async def close() -> None:
            await chunks.aclose()
            self.release(rid)

        return StreamingResponse(chunks, media_type="text/event-stream", background=BackgroundTask(close),
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def metrics_server_error(self) -> None:
        self.metrics.server_errors += 1

    def usage(self, out: RequestOutput) -> Usage:
        n = len(out.token_ids)
        return Usage(prompt_tokens=out.num_prompt_tokens, completion_tokens=n, total_tokens=out.num_prompt_tokens + n)


def _ids(req, ids: list[int]) -> list[int] | None:
    return list(ids) if req.return_token_ids else None


def _new_exit_layers(out: RequestOutput) -> list[int] | None:
    if out.exit_layers is None:
        return None
    n = len(out.new_token_ids)
    return out.exit_layers[len(out.exit_layers) - n:] if n else []


def create_app(engine: LLMEngine | AsyncLLM, model_name: str | None = None, api_key: str | None = None, *,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, max_queue: int | None = DEFAULT_MAX_QUEUE,
               docs: bool = False) -> FastAPI:
    """The app serving ``engine`` under ``model_name`` (default: the backbone's name).

    With ``api_key`` every ``/v1`` route and ``/metrics`` require ``Authorization: Bearer <key>``;
    ``/health`` stays open for liveness probes. Bodies over ``max_body_bytes`` get 413; past
    ``max_queue`` requests waiting for a slot in the running batch (None: no bound) a new one gets
    429. ``docs`` serves ``/openapi.json`` and a plain ``/docs`` page, behind the key like the rest.
    """
    if api_key is not None and not api_key.strip():
        raise ValueError("api_key is empty: an empty key would accept every client; pass a real key or None")
    if max_body_bytes < 1:
        raise ValueError(f"max_body_bytes must be >= 1, got {max_body_bytes}")
    if max_queue is not None and max_queue < 0:
        raise ValueError(f"max_queue must be >= 0 or None, got {max_queue}")
    llm = engine if isinstance(engine, AsyncLLM) else AsyncLLM(engine)
    srv = Server(llm, model_name or llm.engine.backbone.name, api_key, max_body_bytes, max_queue)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        llm.start()
        yield
        await llm.stop()
        srv.pool.shutdown(wait=False, cancel_futures=True)
        srv.small_pool.shutdown(wait=False, cancel_futures=True)

    # No built-in docs: FastAPI's pages load Swagger UI / ReDoc from a CDN and answer without the key.
    app = FastAPI(title="exitwise", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = srv
    app.add_middleware(CatchAll, on_error=srv.metrics_server_error)
    _install_error_handlers(app, srv)

    def authorize(request: Request) -> None:
        if srv.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), srv.api_key.encode()):
            raise APIError("missing or invalid API key (send Authorization: Bearer <key>)", code="invalid_api_key",
                           status=401)

    auth = [Depends(authorize)]
    if docs:
        _install_docs(app, auth)

    @app.get("/health")
    async def health() -> dict:
        llm.start()  # no-op while the engine loop runs; restarts it if it ever died
        return {"status": "ok", "model": srv.model_name}

    @app.get("/metrics", dependencies=auth)
    async def metrics() -> Response:
        return Response(exposition(srv.registry), media_type=CONTENT_TYPE)

    @app.get("/v1/models", dependencies=auth)
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=srv.model_name, max_model_len=srv.context, num_layers=srv.num_layers)])

    @app.post("/v1/completions", dependencies=auth)
    async def completions(request: Request) -> Response:
        req, ids, params = await srv.prepare(request, srv.prepare_completion)
        rid = f"cmpl-{uuid.uuid4().hex}"
        echo = (req.prompt if isinstance(req.prompt, str) else srv.tokenizer.decode(ids)) if req.echo else ""
        srv.admit(rid)
        outs = srv.outputs(ids, params, rid)

        def response(choices: list[CompletionChoice], usage: Usage | None = None) -> CompletionResponse:
            return CompletionResponse(id=rid, model=srv.model_name, choices=choices, usage=usage)

        if not req.stream:
            out = await srv.collect(request, outs, rid)
            if out is None:
                return Response(status_code=499)  # nobody is listening
            choice = CompletionChoice(text=echo + out.text, finish_reason=out.finish_reason,
                                      exit_layers=out.exit_layers, token_ids=_ids(req, out.token_ids))
            return JSONResponse(response([choice], srv.usage(out)).model_dump())

        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        wants_ids = req.return_exit_layers or req.return_token_ids  # a chunk per token even without text

        async def chunks() -> AsyncIterator[str]:
            last = None
            if echo:
                yield _sse(response([CompletionChoice(text=echo)]))
            async with contextlib.aclosing(outs):
                async for out in outs:
                    last = out
                    if out.new_text or out.finished or (wants_ids and out.new_token_ids):
                        yield _sse(response([CompletionChoice(
                            text=out.new_text, finish_reason=out.finish_reason, exit_layers=_new_exit_layers(out),
                            token_ids=_ids(req, out.new_token_ids))]))
            if include_usage and last is not None:
                yield _sse(response([], srv.usage(last)))
            yield "data: [DONE]\n\n"

        return srv.stream(_guard(chunks()), rid)

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(request: Request) -> Response:
        req, ids, params = await srv.prepare(request, srv.prepare_chat)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        srv.admit(rid)
        outs = srv.outputs(ids, params, rid)

        if not req.stream:
            out = await srv.collect(request, outs, rid)
            if out is None:
                return Response(status_code=499)  # nobody is listening
            choice = ChatChoice(message=AssistantMessage(content=out.text), finish_reason=out.finish_reason,
                                exit_layers=out.exit_layers, token_ids=_ids(req, out.token_ids))
            resp = ChatCompletionResponse(id=rid, model=srv.model_name, choices=[choice], usage=srv.usage(out))
            return JSONResponse(resp.model_dump())

        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        wants_ids = req.return_exit_layers or req.return_token_ids  # a chunk per token even without text

        def chunk(delta: Delta, out: RequestOutput | None = None, usage: Usage | None = None) -> str:
            choices = [] if usage else [ChatChunkChoice(
                delta=delta, finish_reason=out and out.finish_reason, exit_layers=out and _new_exit_layers(out),
                token_ids=out and _ids(req, out.new_token_ids))]
            return _sse(ChatCompletionChunk(id=rid, model=srv.model_name, choices=choices, usage=usage))

        async def chunks() -> AsyncIterator[str]:
            last = None
            yield chunk(Delta(role="assistant", content=""))
            async with contextlib.aclosing(outs):
                async for out in outs:
                    last = out
                    if out.new_text or out.finished or (wants_ids and out.new_token_ids):
                        yield chunk(Delta(content=out.new_text), out)
            if include_usage and last is not None:
                yield chunk(Delta(), usage=srv.usage(last))
            yield "data: [DONE]\n\n"

        return srv.stream(_guard(chunks()), rid)

    return app


async def _guard(chunks: AsyncIterator[str]) -> AsyncIterator[str]:
    """Relay SSE chunks; an engine error after the headers went out becomes an error event, not a
    truncated stream (the status code can no longer change)."""
    async with contextlib.aclosing(chunks):
        try:
            async for c in chunks:
                yield c
        except Exception as exc:  # the engine refused or failed the request after all
            kind = "invalid_request_error" if isinstance(exc, ValueError) else "server_error"
            failed = isinstance(exc, RequestFailed)
            info = ErrorInfo(message=f"the engine failed this request: {exc}" if failed else str(exc), type=kind,
                             code="engine_error" if failed else None)
            yield _sse(ErrorResponse(error=info))
            yield "data: [DONE]\n\n"


def _install_error_handlers(app: FastAPI, srv: Server) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        if exc.status == 429:
            srv.metrics.queue_rejected += 1
        elif exc.status < 500:
            srv.metrics.rejected += 1
        return error_response(exc.status, exc.info, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _request_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        srv.metrics.rejected += 1
        err = _validation_error(list(exc.errors()))
        return error_response(400, err.info)  # OpenAI answers 400 where FastAPI would say 422

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(exc.status_code, ErrorInfo(message=str(exc.detail), type=kind))
    # Anything else: CatchAll (a 500 that keeps the connection), not exception_handler(Exception).


def _install_docs(app: FastAPI, auth: list) -> None:
    """``/openapi.json`` and a plain ``/docs`` page, both behind the key; no third-party assets."""

    @app.get("/openapi.json", dependencies=auth, include_in_schema=False)
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", dependencies=auth, include_in_schema=False)
    async def docs_html() -> HTMLResponse:
        return HTMLResponse(docs_page(app.title, app.openapi()))


def serve_forever(app: FastAPI, host: str, port: int, log_level: str = "info") -> None:  # pragma: no cover
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)

