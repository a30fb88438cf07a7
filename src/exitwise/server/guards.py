"""HTTP plumbing of the server: the OpenAI error shape, the body size limit, and the last-resort 500.

Kept apart from the routes (:mod:`.app`) because each piece here is about how bytes and exceptions
cross the ASGI boundary, not about what a request means.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from exitwise.server.protocol import ErrorInfo, ErrorResponse

log = logging.getLogger("exitwise.server")


class APIError(Exception):
    """An answer other than 200, in the OpenAI error shape, naming the field at fault."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.info = ErrorInfo(message=message, type=type, param=param, code=code)
        self.status = status
        self.headers = headers


def error_response(status: int, info: ErrorInfo, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(ErrorResponse(error=info).model_dump(), status_code=status, headers=headers)


def _too_large(limit: int) -> APIError:
    return APIError(f"the request body exceeds the server's limit of {limit} bytes (--max-body-mb)",
                    code="request_too_large", status=413)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 past ``limit`` bytes: from Content-Length before a byte is
    read, else as soon as the streamed (chunked) body passes the limit. Nothing over it is buffered."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


class CatchAll:
    """ASGI middleware: an unexpected exception becomes a 500 JSON answer, and is *not* re-raised.

    Starlette's outermost ``ServerErrorMiddleware`` (where ``exception_handler(Exception)`` lands)
    always re-raises after answering, and uvicorn then closes the connection even though the 500 was
    sent, so the client's next request on that keep-alive connection fails with ECONNRESET. Caught
    here, the connection stays usable. A response that had already started cannot become a 500: it
    is left cut short, and uvicorn closes that connection, the only honest signal left.
    """

    def __init__(self, app: ASGIApp, on_error: Callable[[], None] | None = None):
        self.app = app
        self.on_error = on_error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as exc:  # noqa: BLE001 - the point of this middleware
            log.exception("unexpected error in %s %s", scope.get("method"), scope.get("path"))
            if self.on_error is not None:
                self.on_error()
            if not started:
                response = error_response(500, ErrorInfo(message=f"internal error: {exc}", type="server_error"))
                await response(scope, receive, send)


def docs_page(title: str, schema: dict) -> str:
    """A self-contained HTML list of the routes (no scripts, no third-party assets)."""
    from html import escape

    rows = []
    for path, ops in sorted(schema.get("paths", {}).items()):
        for method, op in ops.items():
            summary = op.get("summary") or op.get("description") or ""
            rows.append(f"<tr><td><code>{escape(method.upper())}</code></td><td><code>{escape(path)}</code></td>"
                        f"<td>{escape(summary)}</td></tr>")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{escape(title)}</title></head><body>"
            f"<h1>{escape(title)}</h1><p>OpenAPI schema: <code>/openapi.json</code></p>"
            f"<table>{''.join(rows)}</table></body></html>")
