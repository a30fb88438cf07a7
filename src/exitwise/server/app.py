"""The OpenAI-compatible HTTP app: ``create_app(engine)`` -> FastAPI.

One :class:`~exitwise.engine.async_engine.AsyncLLM` loop serves every request; handlers only
validate, tokenize, and relay its outputs. Everything that can be checked before a request enters the
engine is checked here, so a bad request gets a 400 naming its field instead of a broken stream.

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
from collections.abc import AsyncIterator

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from exitwise.engine.async_engine import AsyncLLM
from exitwise.engine.llm import LLMEngine, RequestOutput
from exitwise.engine.sampling import SamplingParams
from exitwise.server.metrics import ServerMetrics, render
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


class APIError(Exception):
    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.info = ErrorInfo(message=message, type=type, param=param, code=code)
        self.status = status


def _error_response(status: int, info: ErrorInfo) -> JSONResponse:
    return JSONResponse(ErrorResponse(error=info).model_dump(), status_code=status)


def _validation_error(errors: list[dict]) -> APIError:
    """First pydantic/FastAPI error as an OpenAI error naming the top-level field."""
    err = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    loc = [p for p in err.get("loc", ()) if p != "body"]
    if err.get("type") == "json_invalid":
        return APIError(f"malformed JSON body: {err.get('ctx', {}).get('error', err.get('msg'))}", code="json_invalid")
    param = str(loc[0]) if loc and isinstance(loc[0], str) else None
    msg = err.get("msg", "invalid value")
    msg = msg.removeprefix("Value error, ")
    if param is None:
        return APIError(f"request body: {msg}", code=err.get("type"))
    where = param + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc[1:2])
    return APIError(f"{where}: {msg}", param=param, code=err.get("type"))


def _sse(obj: BaseModel | dict) -> str:
    body = obj.model_dump_json() if isinstance(obj, BaseModel) else json.dumps(obj)
    return f"data: {body}\n\n"


class Server:
    """Per-app state (no globals): the async engine, served name, limits and counters."""

    def __init__(self, llm: AsyncLLM, model_name: str, api_key: str | None):
        self.llm = llm
        self.engine: LLMEngine = llm.engine
        self.tokenizer = self.engine.tokenizer
        if self.tokenizer is None:
            raise ValueError("serving needs a model with a tokenizer")
        self.model_name = model_name
        self.api_key = api_key
        self.metrics = ServerMetrics()
        blocks = self.engine.blocks
        # The longest prompt + completion the engine can ever hold: position limit and KV pool size.
        self.context = min(self.engine.max_model_len, blocks.num_blocks * blocks.block_size)
        self.num_layers = self.engine.runner.num_layers

    # ------------------------------------------------------------------------------ validation
    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(f"model {model!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")

    def prompt_ids(self, req: CompletionRequest) -> list[int]:
        prompt = req.prompt
        if isinstance(prompt, list):
            bad = [t for t in prompt if not 0 <= t < len(self.tokenizer)]
            if bad:
                raise APIError(f"prompt token ids {bad[:5]} are outside the vocabulary", param="prompt")
            return list(prompt)
        ids = self.tokenizer(prompt)["input_ids"]
        if not ids:
            raise APIError("prompt is empty", param="prompt")
        return ids

    def chat_ids(self, req: ChatCompletionRequest) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise APIError(f"{self.model_name} has no chat template; use /v1/completions", param="messages")
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # jinja errors: a template may reject e.g. two system messages
            raise APIError(f"messages do not fit the chat template: {exc}", param="messages") from exc
        # The template already wrote the special tokens; tokenizing must not add a second BOS.
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def sampling_params(self, req: CompletionRequest | ChatCompletionRequest, ids: list[int],
                        prompt_param: str) -> SamplingParams:
        if len(ids) >= self.context:
            raise APIError(f"the prompt has {len(ids)} tokens; the context holds {self.context}", param=prompt_param,
                           code="context_length_exceeded")
        max_tokens = req.max_tokens if req.max_tokens is not None else self.context - len(ids)
        if len(ids) + max_tokens > self.context:
            raise APIError(f"max_tokens={max_tokens} with a {len(ids)}-token prompt exceeds the context of "
                           f"{self.context} tokens", param="max_tokens", code="context_length_exceeded")
        if req.exit_min_layer is not None and req.exit_min_layer > self.num_layers:
            raise APIError(f"exit_min_layer={req.exit_min_layer} exceeds the model's {self.num_layers} layers",
                           param="exit_min_layer")
        try:
            params = SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                                    top_k=req.top_k, seed=req.seed, stop=req.stop, ignore_eos=req.ignore_eos,
                                    exit_threshold=req.exit_threshold, exit_min_layer=req.exit_min_layer,
                                    exit_alpha=req.alpha, return_exit_layers=req.return_exit_layers)
        except ValueError as exc:
            raise APIError(str(exc)) from exc
        if req.alpha is not None:  # checked here so the client gets a 400 naming the field, not a broken stream
            plan = self.engine.plan
            if plan is None or getattr(plan.criterion, "name", None) != "heads":
                raise APIError("alpha needs a server with early-exit heads (exitwise serve --heads PATH)",
                               param="alpha")
            try:
                plan.check_params(params)
            except ValueError as exc:
                raise APIError(str(exc), param="alpha") from exc
        return params

    # ------------------------------------------------------------------------------- execution
    async def outputs(self, ids: list[int], params: SamplingParams, rid: str) -> AsyncIterator[RequestOutput]:
        """The engine's outputs for one request, counted; closing it early aborts the request."""
        self.metrics.requests += 1
        self.metrics.prompt_tokens += len(ids)
        finished = False
        try:
            async with contextlib.aclosing(self.llm.generate(ids, params, request_id=rid)) as outs:
                async for out in outs:
                    self.metrics.record_tokens(len(out.new_token_ids))
                    finished = out.finished
                    yield out
        finally:
            if finished:
                self.metrics.finished += 1
            else:
                self.metrics.aborted += 1
                self.llm.abort(rid)  # idempotent; the inner generator already did it when closed

    async def collect(self, request: Request, outs: AsyncIterator[RequestOutput]) -> RequestOutput | None:
        """Last output of a non-streaming request, or None if the client disconnected first."""

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

    def stream(self, chunks: AsyncIterator[str]) -> StreamingResponse:
        # The background task runs after the stream ends *or* is cancelled on disconnect; closing the
        # generator there makes the abort deterministic instead of waiting for garbage collection.
        return StreamingResponse(chunks, media_type="text/event-stream", background=BackgroundTask(chunks.aclose),
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

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


async def _parse(request: Request, model: type[BaseModel]) -> BaseModel:
    # Parsed by hand rather than as a FastAPI body parameter so that a client that omits or mislabels
    # Content-Type (curl -d) still works and malformed JSON gets the OpenAI error shape.
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(f"malformed JSON body: {exc}", code="json_invalid") from exc
    if not isinstance(data, dict):
        raise APIError("the request body must be a JSON object", code="invalid_type")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise _validation_error(exc.errors()) from exc


def create_app(engine: LLMEngine | AsyncLLM, model_name: str | None = None, api_key: str | None = None) -> FastAPI:
    """The app serving ``engine`` under ``model_name`` (default: the backbone's name).

    With ``api_key`` every ``/v1`` route and ``/metrics`` require ``Authorization: Bearer <key>``;
    ``/health`` stays open for liveness probes.
    """
    llm = engine if isinstance(engine, AsyncLLM) else AsyncLLM(engine)
    srv = Server(llm, model_name or llm.engine.backbone.name, api_key)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        llm.start()
        yield
        await llm.stop()

    app = FastAPI(title="exitwise", lifespan=lifespan)
    app.state.server = srv

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        srv.metrics.rejected += 1
        return _error_response(exc.status, exc.info)

    @app.exception_handler(RequestValidationError)
    async def _request_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        srv.metrics.rejected += 1
        err = _validation_error(list(exc.errors()))
        return _error_response(400, err.info)  # OpenAI answers 400 where FastAPI would say 422

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error_response(exc.status_code, ErrorInfo(message=str(exc.detail), type=kind))

    @app.exception_handler(Exception)
    async def _server_error(request: Request, exc: Exception) -> JSONResponse:
        return _error_response(500, ErrorInfo(message=f"internal error: {exc}", type="server_error"))

    def authorize(request: Request) -> None:
        if srv.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), srv.api_key.encode()):
            raise APIError("missing or invalid API key (send Authorization: Bearer <key>)", code="invalid_api_key",
                           status=401)

    auth = [Depends(authorize)]

    @app.get("/health")
    async def health() -> dict:
        llm.start()  # no-op while the engine loop runs; restarts it if it ever died
        return {"status": "ok", "model": srv.model_name}

    @app.get("/metrics", dependencies=auth, response_class=PlainTextResponse)
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(render(srv.metrics, srv.engine), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", dependencies=auth)
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=srv.model_name, max_model_len=srv.context, num_layers=srv.num_layers)])

    @app.post("/v1/completions", dependencies=auth)
    async def completions(request: Request) -> Response:
        req: CompletionRequest = await _parse(request, CompletionRequest)
        srv.check_model(req.model)
        ids = srv.prompt_ids(req)
        params = srv.sampling_params(req, ids, "prompt")
        rid = f"cmpl-{uuid.uuid4().hex}"
        echo = (req.prompt if isinstance(req.prompt, str) else srv.tokenizer.decode(ids)) if req.echo else ""
        outs = srv.outputs(ids, params, rid)

        def response(choices: list[CompletionChoice], usage: Usage | None = None) -> CompletionResponse:
            return CompletionResponse(id=rid, model=srv.model_name, choices=choices, usage=usage)

        if not req.stream:
            out = await srv.collect(request, outs)
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

        return srv.stream(_guard(chunks()))

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(request: Request) -> Response:
        req: ChatCompletionRequest = await _parse(request, ChatCompletionRequest)
        srv.check_model(req.model)
        ids = srv.chat_ids(req)
        params = srv.sampling_params(req, ids, "messages")
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        outs = srv.outputs(ids, params, rid)

        if not req.stream:
            out = await srv.collect(request, outs)
            if out is None:
                return Response(status_code=499)
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

        return srv.stream(_guard(chunks()))

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
            yield _sse(ErrorResponse(error=ErrorInfo(message=str(exc), type=kind)))
            yield "data: [DONE]\n\n"


def serve_forever(app: FastAPI, host: str, port: int, log_level: str = "info") -> None:  # pragma: no cover
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)

