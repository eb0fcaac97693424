"""Answers in OpenAI's shapes: one JSON completion, or server-sent event chunks as tokens come."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from edgellm.generation import GenerationResult
from edgellm.errors import ConfigError, ContextLengthError
from edgellm.server.engine import Job
from edgellm.server.parse import ApiError, GenRequest

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

class EventStream(StreamingResponse):
    """Server-sent events that stop (and cancel the generation) as soon as the client leaves.

    Starlette listens for the disconnect only under some ASGI versions; this does it always.
    """

    def __init__(self, content: AsyncIterator[str]) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        import anyio

        async with anyio.create_task_group() as tg:
            async def stream() -> None:
                try:
                    await self.stream_response(send)
                except OSError:  # the connection broke while writing
                    pass
                tg.cancel_scope.cancel()

            tg.start_soon(stream)
            await self.listen_for_disconnect(receive)
            tg.cancel_scope.cancel()


def _sse(doc: dict[str, Any] | str) -> str:
    return f"data: {doc if isinstance(doc, str) else json.dumps(doc, ensure_ascii=False)}\n\n"


def _usage(req: GenRequest, result: GenerationResult) -> dict[str, Any]:
    n = len(result.token_ids)
    return {"prompt_tokens": req.prompt_tokens, "completion_tokens": n, "total_tokens": req.prompt_tokens + n,
            "prompt_tokens_details": {"cached_tokens": result.stats.get("cached_tokens", 0)}}


@dataclass
class Shape:
    """What differs between chat and text completions in the response documents."""

    chat: bool
    id: str
    model: str
    created: int = field(default_factory=lambda: int(time.time()))

    def doc(self, choice: dict[str, Any], *, chunk: bool = False, **extra: Any) -> dict[str, Any]:
        obj = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "choices": [choice], **extra}

    def choice(self, text: str | None, finish: str | None, *, chunk: bool = False) -> dict[str, Any]:
        if not self.chat:
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        if chunk:
            return {"index": 0, "delta": {} if text is None else {"content": text}, "finish_reason": finish}
        return {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}


async def _watch_disconnect(request: Request, job: Job) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.cancel()


def generation_error(e: BaseException) -> ApiError:
    if isinstance(e, ContextLengthError):
        return ApiError(400, str(e), param=e.param, code="context_length_exceeded")
    if isinstance(e, ConfigError):
        return ApiError(400, str(e), param=e.param, code="invalid_value")
    return ApiError(500, f"generation failed: {type(e).__name__}: {e}", type="server_error", code="internal_error")


async def complete_response(request: Request, job: Job, shape: Shape, req: GenRequest) -> Response:
    watcher = asyncio.create_task(_watch_disconnect(request, job))
    result = None
    try:
        async for ev in job.events():
            result = ev.result or result
    except BaseException as e:  # noqa: BLE001 - answered as JSON
        return generation_error(e).response()
    finally:
        watcher.cancel()
        job.cancel()
    if result is None:  # cancelled: the client is gone and will not read this
        return JSONResponse({"error": {"message": "cancelled", "type": "cancelled"}}, status_code=499)
    return JSONResponse(shape.doc(shape.choice(result.text, result.finish_reason),
                                  usage=_usage(req, result), edgellm=result.stats))


async def stream_chunks(job: Job, req: GenRequest, shape: Shape) -> AsyncIterator[str]:
    try:
        if shape.chat:
            yield _sse(shape.doc({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None},
                                 chunk=True))
        async for ev in job.events():
            if ev.result is not None:
                r = ev.result
                yield _sse(shape.doc(shape.choice(None if shape.chat else "", r.finish_reason, chunk=True),
                                     chunk=True, edgellm=r.stats))
                if req.include_usage:
                    yield _sse({**shape.doc({}, chunk=True), "choices": [], "usage": _usage(req, r)})
            elif ev.text or ev.token_ids:
                yield _sse(shape.doc(shape.choice(ev.text, None, chunk=True), chunk=True,
                                     edgellm={"drafted": ev.drafted}))
        yield _sse("[DONE]")
    except asyncio.CancelledError:
        raise
    except Exception as e:  # noqa: BLE001 - the status line is sent; report in the stream
        yield _sse(generation_error(e).body())
    finally:
        job.cancel()
