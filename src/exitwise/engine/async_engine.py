"""``AsyncLLM``: drive one :class:`LLMEngine` from a single asyncio background loop.

Design for a server (FastAPI/uvicorn): handlers call ``async for out in llm.generate(prompt, params)``.
Requests and aborts are *queued* and applied by the loop between steps, so the engine (which is not
thread-safe) is only touched by the loop; each step runs in a worker thread (``asyncio.to_thread``) so
the event loop keeps accepting connections while the model computes. A consumer that stops iterating
(client disconnect -> ``CancelledError``/``GeneratorExit``) aborts its request, which frees its KV
blocks at the next step boundary. A request the engine fails alone (``finish_reason="error"``) raises
:class:`RequestFailed` in its consumer only.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator

from exitwise.engine.llm import LLMEngine, RequestOutput
from exitwise.engine.sampling import SamplingParams


class RequestFailed(RuntimeError):
    """The engine failed this request (not the client's doing: its settings passed validation)."""


class AsyncLLM:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._queues: dict[str, asyncio.Queue] = {}
        self._adds: list[tuple[str, str | list[int], SamplingParams]] = []
        self._aborts: list[str] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._ids = itertools.count()

    @classmethod
    def from_model(cls, model, **engine_kwargs) -> AsyncLLM:
        return cls(LLMEngine(model, **engine_kwargs))

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._loop())

    def running(self) -> bool:
        """Whether the background loop is alive (started and not ended by an error or stop)."""
        return self._task is not None and not self._task.done()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def generate(self, prompt: str | list[int], params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yield incremental outputs of one request until it finishes."""
        self.start()
        params = params or SamplingParams()
        rid = request_id or f"async-{next(self._ids)}"
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[rid] = queue
        self._adds.append((rid, prompt, params))
        self._wake.set()
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, Exception):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            self._queues.pop(rid, None)
            if not finished:
                self.abort(rid)

    def abort(self, request_id: str) -> None:
        self._aborts.append(request_id)
        self._wake.set()

    def _apply_pending(self) -> None:
        adds, self._adds = self._adds, []
        for rid, prompt, params in adds:
            try:
                self.engine.add_request(prompt, params, request_id=rid)
            except Exception as exc:  # noqa: BLE001 - a bad request fails that stream only, never the loop
                if rid in self._queues:
                    self._queues[rid].put_nowait(exc if isinstance(exc, ValueError) else RequestFailed(repr(exc)))
        aborts, self._aborts = self._aborts, []
        for rid in aborts:
            self.engine.abort(rid)

    def _fail_all(self, exc: Exception) -> None:
        """Abort every request in the engine and hand ``exc`` to its consumer; the loop goes on."""
        for rid in list(self.engine.seqs):
            self.engine.abort(rid)
            queue = self._queues.get(rid)
            if queue is not None:
                queue.put_nowait(RequestFailed(f"engine step failed: {exc!r}"))

    async def _loop(self) -> None:
        while True:
            self._apply_pending()
            if not self.engine.has_unfinished():
                self._wake.clear()
                if not self._adds and not self._aborts:
                    await self._wake.wait()
                continue
            try:
                outputs = await asyncio.to_thread(self.engine.step)
            except Exception as exc:  # noqa: BLE001 - one failed step must not hang every client forever
                self._fail_all(exc)
                continue
            for out in outputs:
                queue = self._queues.get(out.request_id)
                if queue is not None:
                    queue.put_nowait(RequestFailed(out.error) if out.error is not None else out)
                elif not out.finished:
                    self._aborts.append(out.request_id)  # nobody listens any more
