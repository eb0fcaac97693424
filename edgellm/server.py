"""``edgellm serve``: an OpenAI-compatible HTTP server and a phone-friendly chat page.

Routes::

    GET  /                     the chat page (one self-contained HTML file, no CDN)
    GET  /health               {"status": "ok", "busy": ..., "queued": ..., "last_stats": ..., "prompt_cache": ...}
    GET  /v1/models            the model this server runs, and each of its LoRA adapters
    POST /v1/chat/completions  OpenAI chat completions, with ``stream: true`` as server-sent events
    POST /v1/completions       OpenAI (legacy) text completions, likewise

Up to ``max_batch`` requests generate at once on a worker thread, each in its own cache slot,
taking turns round by round (:class:`Engine`); others wait in a FIFO queue (``max_queue`` of
them, then 429) while the event loop keeps answering ``/health``. Each
request reuses the cached prefix its prompt shares with an earlier one (the last generation's
caches, and an LRU of other conversations' caches, ``prompt_cache_bytes``): turn N of a chat
prefills only its new message; ``usage.prompt_tokens_details.cached_tokens`` says how many. A
client that disconnects cancels its generation at the next token. Every error is a JSON body
in the OpenAI shape ``{"error": {"message", "type", "param", "code"}}``.

edgellm's additions live in an ``edgellm`` field: in a request, ``{"mode": ...,
"num_draft_tokens": ..., "top_k": ..., "cache_prompt": ...}``; in a response, the generation statistics; in each
streamed chunk, ``{"drafted": [...]}`` telling which tokens were draft proposals the target
accepted.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import math
import reprlib
import secrets
import socket
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, AsyncIterator, Iterator

from edgellm.api import DEFAULT_MAX_BATCH, LLM, GenerationResult, StreamEvent, check_text
from edgellm.errors import ConfigError, ContextLengthError
from edgellm.lookup import DEFAULT_SHARED_LOOKUP
from edgellm.options import DEFAULT_MAX_NEW_TOKENS
from edgellm.prompt_cache import DEFAULT_PROMPT_CACHE, parse_bytes


try:
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
    from starlette.routing import Route
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("edgellm serve needs the 'serve' extra: pip install 'edgellm[serve]'") from e

MAX_BODY_BYTES = 1 << 20
MAX_JSON_DEPTH = 32  # an OpenAI request nests 5 deep; 100,000 '[' would exhaust the parser's stack
BODY_TIMEOUT_S = 30.0  # a body that trickles in slower than this is cut off (408)
HEADER_TIMEOUT_S = 10.0  # a connection that does not complete its request headers in this time is closed
MAX_CONNECTIONS = 64  # more open connections get 503 from uvicorn
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
_short = reprlib.Repr()
_short.maxstring, _short.maxother, _short.maxlevel, _short.maxlist, _short.maxdict = 80, 80, 3, 6, 6
ROLES = ("system", "user", "assistant", "tool")
# Request fields: those edgellm honours, and OpenAI's others, accepted and ignored. Anything
# else is refused, as OpenAI does ("Unrecognized request argument").
COMMON_FIELDS = {"model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop", "seed",
                 "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "user", "edgellm"}
CHAT_FIELDS = COMMON_FIELDS | {"messages", "max_completion_tokens", "top_logprobs", "response_format", "tools",
                               "tool_choice", "parallel_tool_calls", "service_tier", "store", "metadata",
                               "modalities", "reasoning_effort", "functions", "function_call"}
TEXT_FIELDS = COMMON_FIELDS | {"prompt", "echo", "best_of", "suffix"}


class ApiError(Exception):
    """An error answered to the client as ``{"error": {...}}`` with an HTTP status."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = ({"WWW-Authenticate": "Bearer"} if self.status == 401 else {}) | self.headers
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


# ---------------------------------------------------------------------------------------- requests
@dataclass
class GenRequest:
    """A validated completion request.

    Attributes:
        prompt: a string (``/v1/completions``) or chat messages (``/v1/chat/completions``).
        prompt_ids: the prompt's token ids (after the chat template).
        options: keyword arguments of :meth:`edgellm.LLM.stream_events`.
        stream: answer with server-sent events.
        include_usage: (streaming) send a last chunk with ``usage``.
        model: the model name the client asked for (echoed back).
    """

    prompt: str | list[dict[str, str]]
    prompt_ids: list[int]
    options: dict[str, Any]
    stream: bool = False
    include_usage: bool = False
    model: str = ""

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)


def _typed(body: dict[str, Any], name: str, kinds: tuple[type, ...], what: str, default: Any = None) -> Any:
    """``body[name]`` when it has one of the JSON types ``kinds`` (its range is checked by the API's
    own validators, :class:`SamplingConfig` and :class:`DecodeConfig`, as for the CLI)."""
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise ApiError(400, f"'{name}' = {_short.repr(value)}; allowed: {what}", param=name, code="invalid_type")
    return value


def _messages(body: dict[str, Any]) -> list[dict[str, str]]:
    """Chat messages with ``content`` as a string (OpenAI's text-part arrays are joined)."""
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise ApiError(400, f"'messages' = {_short.repr(raw)}; allowed: a non-empty list of {{role, content}} objects",
                       param="messages", code="invalid_value")
    out = []
    for i, m in enumerate(raw):
        role = m.get("role") if isinstance(m, dict) else None
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                             and isinstance(p.get("text"), str) for p in content):
            content = "".join(p["text"] for p in content)
        if role not in ROLES or not isinstance(content, str):
            raise ApiError(400, f"messages[{i}] = {_short.repr(m)}; allowed: {{'role': one of {', '.join(ROLES)}, "
                                "'content': a string or a list of text parts}", param=f"messages[{i}]",
                           code="invalid_value")
        out.append({"role": role, "content": content})
    return out


def _prompt(body: dict[str, Any]) -> str:
    raw = body.get("prompt")
    if isinstance(raw, list) and len(raw) == 1 and isinstance(raw[0], str):
        raw = raw[0]
    if not isinstance(raw, str) or not raw:
        raise ApiError(400, f"'prompt' = {_short.repr(raw)}; allowed: a non-empty string (one prompt per request)",
                       param="prompt", code="invalid_value")
    return raw


def parse_json(raw: bytes) -> Any:
    """The JSON document of a request body.

    Refused (400 ``invalid_json``): invalid JSON or UTF-8, ``NaN``/``Infinity``, nesting deeper
    than :data:`MAX_JSON_DEPTH`, and strings that are not valid Unicode (a lone surrogate such as
    ``"\\ud800"``, which JSON allows but no tokenizer or UTF-8 response can carry).
    """
    try:
        doc = json.loads(raw, parse_constant=_refuse_constant)
    except RecursionError:
        raise ApiError(400, f"the request body nests deeper than {MAX_JSON_DEPTH} levels", code="invalid_json") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    stack = [(doc, 1)]
    while stack:  # iterative: a deep document cannot exhaust the stack here
        x, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise ApiError(400, f"the request body nests deeper than {MAX_JSON_DEPTH} levels", code="invalid_json")
        if isinstance(x, dict):
            stack.extend((k, depth + 1) for k in x)
            stack.extend((v, depth + 1) for v in x.values())
        elif isinstance(x, list):
            stack.extend((v, depth + 1) for v in x)
        elif isinstance(x, str):
            try:
                check_text(x, "a string in the request body")
            except ConfigError as e:
                raise ApiError(400, str(e), code="invalid_json") from None
    return doc


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON value")


def parse_request(llm: LLM, body: Any, *, chat: bool, default_mode: str | None = None,
                  model_id: str | None = None) -> GenRequest:
    """Validate an OpenAI request body against the loaded model.

    The ``model`` field selects a LoRA adapter of the bundle by name (:func:`model_adapter`).

    Raises:
        ApiError: 400 naming the field, its value and what is allowed; 404 ``model_not_found``.
    """
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    unknown = sorted(set(body) - (CHAT_FIELDS if chat else TEXT_FIELDS))
    if unknown:
        raise ApiError(400, f"unrecognized request argument(s): {', '.join(unknown)}; see the OpenAI "
                            f"{'chat ' if chat else ''}completions API", param=unknown[0], code="unknown_parameter")
    for name in ("presence_penalty", "frequency_penalty"):
        _typed(body, name, (int, float), "a number (accepted, not applied)")
    prompt: str | list[dict[str, str]] = _messages(body) if chat else _prompt(body)
    model = _typed(body, "model", (str,), "a string", "")
    adapter = model_adapter(llm, model, model_id or llm.bundle.name)
    n = _typed(body, "n", (int,), "1", 1)
    if n != 1:
        raise ApiError(400, f"'n' = {_short.repr(n)}; allowed: 1 (one choice per request)", param="n",
                       code="invalid_value")
    stop = body.get("stop")
    if stop is not None and not (isinstance(stop, str) and stop or isinstance(stop, list) and len(stop) <= 4
                                 and all(isinstance(s, str) and s for s in stop)):
        raise ApiError(400, f"'stop' = {_short.repr(stop)}; allowed: a non-empty string or a list of up to 4",
                       param="stop", code="invalid_value")
    ext = _typed(body, "edgellm", (dict,), "an object {mode, num_draft_tokens, top_k, cache_prompt}", {})
    stream_options = _typed(body, "stream_options", (dict,), "an object {include_usage}", {})
    options = {
        "temperature": _typed(body, "temperature", (int, float), "a number (0 = greedy)", 1.0),
        "top_p": _typed(body, "top_p", (int, float), "a number with 0 < top_p <= 1", 1.0),
        "top_k": _typed(ext, "top_k", (int,), "an integer >= 0", 0),
        "seed": _typed(body, "seed", (int,), "an integer", None),
        "stop": stop,
        "mode": _typed(ext, "mode", (str,), "speculative, target or lookup", default_mode),
        "num_draft_tokens": _typed(ext, "num_draft_tokens", (int,), "an integer 0-64", None),
        "cache_prompt": _typed(ext, "cache_prompt", (bool,), "true or false", True),
    }
    if adapter is not None:
        options["adapter"] = adapter
    try:
        ids = llm.prompt_ids(prompt)
        options["max_new_tokens"] = _max_tokens(llm, body, len(ids))
        llm.decode_config(**{k: v for k, v in options.items() if k not in ("stop", "adapter")})
    except ContextLengthError as e:
        raise ApiError(400, str(e), param="max_tokens", code="context_length_exceeded") from e
    except ConfigError as e:
        raise ApiError(400, str(e), param=e.param, code="invalid_value") from e
    return GenRequest(prompt, ids, options, stream=_typed(body, "stream", (bool,), "true or false", False),
                      include_usage=_typed(stream_options, "include_usage", (bool,), "true or false", False),
                      model=model)


def model_adapter(llm: LLM, model: str, model_id: str) -> str | None:
    """The LoRA adapter a request's ``model`` names: ``None`` for the base (its id, or no name).

    A bundle without adapters serves any ``model`` name (as llama.cpp's server does); one with
    adapters answers an unknown name with 404, as OpenAI does, rather than quietly serving the
    base to a client that asked for a fine-tune.

    Raises:
        ApiError: 404 ``model_not_found`` naming the models this server has.
    """
    if not model or model == model_id or not llm.adapters:
        return None
    if model in llm.adapters:
        return model
    raise ApiError(404, f"The model `{_short.repr(model)[1:-1]}` does not exist; this server has: "
                        f"{', '.join([model_id] + sorted(llm.adapters))} (GET /v1/models)", param="model",
                   code="model_not_found")


def _max_tokens(llm: LLM, body: dict[str, Any], prompt_tokens: int) -> int:
    """``max_tokens`` (or ``max_completion_tokens``), checked against the room left in the context."""
    room = llm.manifest.target.max_context - prompt_tokens
    if room < 1:
        raise ContextLengthError(f"the prompt has {prompt_tokens} tokens; this model's context is "
                                 f"{llm.manifest.target.max_context} tokens (prompt plus at least one new token)")
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    asked = _typed(body, name, (int,), f"an integer 1-{room}", None)
    if asked is None:
        return min(int(llm.manifest.generation.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)), room)
    if not 1 <= asked <= room:
        raise ApiError(400, f"'{name}' = {_short.repr(asked)}; allowed: 1-{room} (the prompt has {prompt_tokens} of the "
                            f"{llm.manifest.target.max_context} context tokens)", param=name,
                       code="context_length_exceeded" if asked > room else "invalid_value")
    return asked


# ---------------------------------------------------------------------------------------- engine
class Job:
    """One queued generation: events flow from the worker thread into an asyncio queue."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop, self.queue = loop, asyncio.Queue()
        self.cancelled = threading.Event()

    def put(self, item: StreamEvent | BaseException | None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is gone (server shutting down)
            self.cancelled.set()

    def cancel(self) -> None:
        self.cancelled.set()

    async def events(self) -> AsyncIterator[StreamEvent]:
        while True:
            item = await self.queue.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item


#: prompt tokens a joining request prefills per turn while others generate (~1.6 s here)
PREFILL_CHUNK = 64


@dataclass
class _Active:
    """A generation in a cache slot: its job, request and (once started) its event generator."""

    job: Job
    req: GenRequest
    slot: int
    events: Iterator[StreamEvent] | None = None


@dataclass
class Engine:
    """Runs up to ``llm``'s ``max_batch`` generations at once on one worker thread, a round each in turn.

    Requests are admitted first come first served into free cache slots (the one whose cache
    shares most with the prompt, so a chat's next turn finds its conversation); every admitted
    generation then runs one decoding round per turn (one target pass and the tokens it commits),
    so a request arriving during a long generation starts at the next turn instead of after it
    ends; a long prompt is prefilled ``prefill_chunk`` tokens a turn, so it does not stall the
    others either. Passes take turns on the one loaded model: the machine's throughput is shared, not
    multiplied. Further requests wait (``max_queue`` of them, then 429).
    """

    llm: LLM
    max_queue: int = 8
    prefill_chunk: int = PREFILL_CHUNK
    waiting: int = 0  # accepted and not finished (running + queued); touched on the event loop only
    served: int = 0
    last_stats: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        self._pending: deque[tuple[Job, GenRequest]] = deque()
        self._active: list[_Active] = []
        self._wake = threading.Condition()
        threading.Thread(target=self._loop, name="edgellm-generate", daemon=True).start()

    @property
    def max_batch(self) -> int:
        return len(self.llm.slots)

    @property
    def busy(self) -> bool:
        return bool(self._active)

    @property
    def active(self) -> int:
        return len(self._active)

    @property
    def queued(self) -> int:
        return len(self._pending)

    def check_room(self) -> None:
        """Raise 429 (with ``Retry-After``) when the queue is full."""
        if self.waiting >= self.max_batch + self.max_queue:
            last = (self.last_stats or {}).get("total_s") or 1.0
            retry = max(1, math.ceil(last * self.waiting / self.max_batch))  # the queue ahead at the last pace
            raise ApiError(429, f"the server is busy: {self.waiting} requests are running or queued "
                                f"(max_batch={self.max_batch}, max_queue={self.max_queue}); retry in {retry} s",
                           type="rate_limit_error", code="queue_full", headers={"Retry-After": str(retry)})

    def start(self, req: GenRequest) -> Job:
        self.check_room()
        job = Job(asyncio.get_running_loop())
        self.waiting += 1
        with self._wake:
            self._pending.append((job, req))
            self._wake.notify()
        return job

    def _finished(self) -> None:
        self.waiting -= 1

    def _end(self, job: Job) -> None:
        job.put(None)
        try:
            job.loop.call_soon_threadsafe(self._finished)
        except RuntimeError:  # the event loop is gone
            pass

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._pending and not self._active:
                    self._wake.wait()
                self._admit()
            for act in list(self._active):
                self._turn(act)

    def _admit(self) -> None:
        """Move waiting requests into free slots, first come first served."""
        while self._pending and len(self._active) < self.max_batch:
            job, req = self._pending.popleft()
            if job.cancelled.is_set():  # the client left while queued
                self._end(job)
                continue
            free = sorted(set(range(self.max_batch)) - {a.slot for a in self._active})
            slot = (self.llm.pick_slot(req.prompt_ids, free, req.options.get("adapter")) if len(free) > 1
                    else free[0])
            self._active.append(_Active(job, req, slot))

    def _turn(self, act: _Active) -> None:
        """Run ``act`` up to the end of its next round (or to its end)."""
        done = True
        try:
            if act.events is None:
                chunk = self.prefill_chunk if self.max_batch > 1 else None
                act.events = self.llm.stream_events(act.req.prompt, slot=act.slot, prompt_ids=act.req.prompt_ids,
                                                    prefill_chunk=chunk, **act.req.options)
            for ev in act.events:
                if act.job.cancelled.is_set():
                    break
                if ev.result is not None:
                    self.last_stats, self.served = ev.result.stats, self.served + 1
                act.job.put(ev)
                if ev.round_end and ev.result is None:
                    done = False
                    break
        except BaseException as e:  # noqa: BLE001 - handed to the request's task, which answers it
            act.job.put(e)
        if done:
            if act.events is not None:
                act.events.close()  # a cancelled generation's end still runs (shared lookup, caches)
            self._active.remove(act)
            self._end(act.job)


# ---------------------------------------------------------------------------------------- responses
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
class _Shape:
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


def _generation_error(e: BaseException) -> ApiError:
    if isinstance(e, ContextLengthError):
        return ApiError(400, str(e), param=e.param, code="context_length_exceeded")
    if isinstance(e, ConfigError):
        return ApiError(400, str(e), param=e.param, code="invalid_value")
    return ApiError(500, f"generation failed: {type(e).__name__}: {e}", type="server_error", code="internal_error")


async def _complete(request: Request, job: Job, shape: _Shape, req: GenRequest) -> Response:
    watcher = asyncio.create_task(_watch_disconnect(request, job))
    result = None
    try:
        async for ev in job.events():
            result = ev.result or result
    except BaseException as e:  # noqa: BLE001 - answered as JSON
        return _generation_error(e).response()
    finally:
        watcher.cancel()
        job.cancel()
    if result is None:  # cancelled: the client is gone and will not read this
        return JSONResponse({"error": {"message": "cancelled", "type": "cancelled"}}, status_code=499)
    return JSONResponse(shape.doc(shape.choice(result.text, result.finish_reason),
                                  usage=_usage(req, result), edgellm=result.stats))


async def _stream(job: Job, req: GenRequest, shape: _Shape) -> AsyncIterator[str]:
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
        yield _sse(_generation_error(e).body())
    finally:
        job.cancel()


# ---------------------------------------------------------------------------------------- the guard
def host_name(host: str) -> str:
    """The name part of a ``Host`` header (``[::1]:8000`` -> ``::1``, ``Example:80`` -> ``example``)."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    name, sep, port = host.rpartition(":")
    return name if sep and port.isdigit() and ":" not in name else host


@dataclass(frozen=True)
class Guard:
    """Who may talk to the server from a browser: the ``Host`` names and the ``Origin`` s it answers.

    A web page the user visits can send requests to a server on their machine: a "simple"
    cross-site POST needs no preflight (cross-site request forgery), and a rebound DNS name can
    point at 127.0.0.1 (DNS rebinding, which also reads the replies). So a request whose ``Host``
    is not a name of this server, or whose ``Origin`` (sent by browsers) is not the server's own
    page or an allowed one, gets 403 before anything else runs. Clients that are not browsers
    (curl, the ``openai`` package) send no ``Origin``.

    Attributes:
        hosts: lowercased names the ``Host`` header may carry (``*``: any).
        origins: extra origins (``scheme://host[:port]``) allowed besides the server's own
            (``*``: any).
    """

    hosts: frozenset[str] = frozenset(LOOPBACK_NAMES)
    origins: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        for o in self.origins:
            if o != "*" and not (o.startswith(("http://", "https://")) and "/" not in o.split("://", 1)[1]
                                 and o.split("://", 1)[1]):
                raise ConfigError(f"allowed origin {o!r}; allowed: scheme://host[:port] (e.g. "
                                  "http://192.168.1.5:3000, no path), or *", param="allowed_origins")
        for h in self.hosts:
            if not h or "/" in h or h != h.strip():
                raise ConfigError(f"allowed host {h!r}; allowed: a host name or address (no scheme, port or "
                                  "path), or *", param="allowed_hosts")

    def check(self, scope: dict[str, Any]) -> ApiError | None:
        """The 403 to answer ``scope`` with, or ``None`` when it may pass."""
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", [])}
        host = headers.get("host")
        if host is not None and "*" not in self.hosts and host_name(host) not in self.hosts:
            return ApiError(403, f"Host {host!r} is not a name of this server (allowed: "
                                 f"{', '.join(sorted(self.hosts))}); to allow it, start edgellm serve with "
                                 f"--allowed-host {host_name(host)}", code="forbidden_host")
        origin = headers.get("origin")
        own = f"{scope.get('scheme', 'http')}://{host}".lower() if host else None
        if origin is not None and "*" not in self.origins and origin.lower() not in self.origins | {own}:
            return ApiError(403, f"requests from the web page at Origin {origin!r} are refused: only this server's "
                                 "own page may use it from a browser; to allow another page, start edgellm serve "
                                 f"with --allowed-origin {origin}", code="forbidden_origin")
        return None


def hosts_for(bind_host: str, extra: tuple[str, ...] | list[str] = ()) -> frozenset[str]:
    """The ``Host`` names a server bound to ``bind_host`` answers: loopback names, the bound address
    (every address of the machine and its host names for 0.0.0.0 / ::), and ``extra``."""
    names = set(LOOPBACK_NAMES)
    if bind_host in ("0.0.0.0", "::"):
        names.update(local_addresses())
        hostname = socket.gethostname().lower()
        names.update({hostname, f"{hostname}.local", socket.getfqdn().lower()})
    else:
        names.add(host_name(bind_host))
    return frozenset(names | {h.strip().lower() for h in extra})


class GuardMiddleware:
    """ASGI middleware answering 403 to requests :class:`Guard` refuses, before routing or reading a body."""

    def __init__(self, app: Any, guard: Guard) -> None:
        self.app, self.guard = app, guard

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        refused = self.guard.check(scope) if scope["type"] == "http" else None
        if refused is not None:
            await refused.response()(scope, receive, send)
            return
        await self.app(scope, receive, send)


async def read_body(request: Request) -> bytes:
    """The request body, refused while reading once past :data:`MAX_BODY_BYTES` (chunked bodies too)
    or slower than :data:`BODY_TIMEOUT_S`; at most one chunk past the limit is ever held."""
    import anyio

    close = {"Connection": "close"}  # the rest of the body is not read: the connection cannot be reused
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
        raise ApiError(413, f"the request body has {length} bytes; allowed: up to {MAX_BODY_BYTES}",
                       code="body_too_large", headers=close)
    chunks, size = [], 0
    try:
        with anyio.fail_after(BODY_TIMEOUT_S):
            async for chunk in request.stream():
                size += len(chunk)
                if size > MAX_BODY_BYTES:
                    raise ApiError(413, f"the request body has more than {MAX_BODY_BYTES} bytes; allowed: up to "
                                        f"{MAX_BODY_BYTES}", code="body_too_large", headers=close)
                chunks.append(chunk)
    except TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {BODY_TIMEOUT_S:.0f} s", code="timeout",
                       headers=close) from None
    return b"".join(chunks)


def check_json_content_type(request: Request) -> None:
    """415 unless the body is declared ``application/json``: what a browser can send cross-site
    without a preflight (``text/plain``, forms) is never read as a request."""
    ctype = request.headers.get("content-type", "")
    if ctype.split(";", 1)[0].strip().lower() != "application/json":
        raise ApiError(415, f"Content-Type {ctype!r}; allowed: application/json (with curl: -H 'Content-Type: "
                            "application/json')", code="unsupported_media_type")


# ---------------------------------------------------------------------------------------- the app
def create_app(llm: LLM, *, api_key: str | None = None, mode: str | None = None, model_id: str | None = None,
               max_queue: int = 8, guard: Guard | None = None) -> Starlette:
    """The ASGI application serving ``llm``.

    Args:
        llm: a loaded bundle.
        api_key: when set, ``/v1/*`` requires ``Authorization: Bearer <api_key>``.
        mode: default decoding mode (``speculative`` when the bundle has a draft).
        model_id: the name ``/v1/models`` reports (default: the bundle folder's name).
        max_queue: requests that may wait while ``llm.slots`` are all generating; more get 429.
        guard: the ``Host`` names and ``Origin`` s answered (default: loopback names, the
            server's own page).
    """
    from starlette.concurrency import run_in_threadpool
    from starlette.middleware import Middleware
    from starlette.middleware.cors import CORSMiddleware

    engine = Engine(llm, max_queue=max_queue)
    model_id = model_id or llm.bundle.name
    mode = mode or ("speculative" if llm.draft is not None else "target")
    guard = guard or Guard()

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>' (the key "
                                "`edgellm serve` printed)", code="invalid_api_key")

    async def completions(request: Request, chat: bool) -> Response:
        authorize(request)
        check_json_content_type(request)
        engine.check_room()  # 429 before reading and tokenizing a prompt that would not be served
        raw = await read_body(request)
        # parsing and tokenizing a long prompt takes a while: off the event loop, so /health answers
        req = await run_in_threadpool(lambda: parse_request(llm, parse_json(raw), chat=chat, default_mode=mode,
                                                            model_id=model_id))
        shape = _Shape(chat, f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", req.model or model_id)
        job = engine.start(req)  # 429 here, before any byte of the answer
        if req.stream:
            return EventStream(_stream(job, req, shape))
        return await _complete(request, job, shape, req)

    async def chat_completions(request: Request) -> Response:
        return await completions(request, chat=True)

    async def text_completions(request: Request) -> Response:
        return await completions(request, chat=False)

    async def models(request: Request) -> Response:
        authorize(request)
        info = {**llm.info, "bundle": llm.bundle.name}  # not the absolute path: clients need no file system facts
        adapters = [{"id": name, "object": "model", "created": 0, "owned_by": "edgellm", "parent": model_id,
                     "edgellm": {"lora": {k: v for k, v in llm.manifest.adapters[name].items() if k not in ("target", "draft")}}}
                    for name in sorted(llm.adapters)]
        return JSONResponse({"object": "list", "data": [{"id": model_id, "object": "model", "created": 0,
                                                         "owned_by": "edgellm", "edgellm": info}] + adapters})

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": model_id, "mode": mode, "busy": engine.busy,
                             "active": engine.active, "max_batch": engine.max_batch, "queued": engine.queued, "served": engine.served, "last_stats": engine.last_stats,
                             "auth": api_key is not None, "max_context": llm.manifest.target.max_context,
                             "prompt_cache": {"entries": len(llm.prompt_cache), "bytes": llm.prompt_cache.nbytes,
                                              "max_bytes": llm.prompt_cache.max_bytes,
                                              "evictions": llm.prompt_cache.evictions},
                             "shared_lookup": {"tokens": llm.shared_lookup.tokens,
                                               "max_tokens": llm.shared_lookup.max_tokens}})

    async def page(request: Request) -> Response:
        return HTMLResponse(resources.files("edgellm").joinpath("data/chat.html").read_text("utf-8"))

    async def api_error(request: Request, exc: ApiError) -> Response:
        return exc.response()

    async def http_error(request: Request, exc: HTTPException) -> Response:
        allowed = {404: f"no route {request.method} {request.url.path}; see GET /v1/models, POST "
                        "/v1/chat/completions, POST /v1/completions, GET /health",
                   405: f"method {request.method} is not allowed on {request.url.path}"}
        return ApiError(exc.status_code, allowed.get(exc.status_code, str(exc.detail)),
                        code="not_found" if exc.status_code == 404 else None).response()

    async def server_error(request: Request, exc: Exception) -> Response:
        return _generation_error(exc).response()

    routes = [Route("/", page), Route("/health", health), Route("/v1/models", models),
              Route("/v1/chat/completions", chat_completions, methods=["POST"]),
              Route("/v1/completions", text_completions, methods=["POST"])]
    middleware = [Middleware(GuardMiddleware, guard=guard)]
    extra = sorted(guard.origins - {"*"})
    if guard.origins:  # pages on other origins the user allowed: answer their CORS preflights
        middleware.append(Middleware(CORSMiddleware, allow_origins=["*"] if "*" in guard.origins else extra,
                                     allow_methods=["GET", "POST"], allow_headers=["Authorization", "Content-Type"]))
    app = Starlette(routes=routes, middleware=middleware,
                    exception_handlers={ApiError: api_error, HTTPException: http_error, Exception: server_error})
    app.state.engine = engine
    return app


# ---------------------------------------------------------------------------------------- serve
def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def local_addresses() -> list[str]:
    """IPv4 addresses of this machine that another device on the network could reach."""
    found: set[str] = set()
    try:
        for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET):
            found.add(str(info[4][0]))
    except OSError:
        pass
    try:  # the address of the default route (connecting a UDP socket sends nothing)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))
            found.add(s.getsockname()[0])
    except OSError:
        pass
    return sorted(a for a in found if not ipaddress.ip_address(a).is_loopback)


def urls(host: str, port: int) -> list[str]:
    """The URLs to open, one per address the server listens on."""
    if host in ("0.0.0.0", "::"):
        return [f"http://127.0.0.1:{port}/"] + [f"http://{a}:{port}/" for a in local_addresses()]
    return [f"http://{'[' + host + ']' if ':' in host else host}:{port}/"]


def resolve_api_key(host: str, api_key: str | None) -> tuple[str | None, bool]:
    """The key to require: the given one; a generated one off loopback; none on loopback.

    Returns:
        ``(key, generated)``.
    """
    if api_key is not None and not api_key.strip():
        raise ConfigError("api_key is empty; give a non-empty key or leave it out")
    if api_key is None and not is_loopback(host):
        return secrets.token_urlsafe(24), True
    return api_key, False


def _guarded_h11():
    """uvicorn's h11 protocol, closing connections whose request headers do not arrive in time.

    uvicorn times out idle keep-alive connections, but not a connection that never completes its
    request line and headers (a "slowloris" holds a slot forever with a byte now and then).
    """
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_header_timer()

        def _arm_header_timer(self) -> None:
            self._header_timer = self.loop.call_later(HEADER_TIMEOUT_S, self._header_timeout)

        def _header_timeout(self) -> None:
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()  # still no complete request: drop it

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:  # the headers are in: the handler runs now
                self._header_timer.cancel()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._header_timer.cancel()
            self._arm_header_timer()  # the next request on this connection gets the same time

        def connection_lost(self, exc) -> None:
            self._header_timer.cancel()
            super().connection_lost(exc)

    return GuardedH11Protocol


def server_config(app: Any, host: str, port: int):
    """The ``uvicorn.Config`` edgellm serves with: bounded connections, header and keep-alive timeouts."""
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=2,
                          http=_guarded_h11(), timeout_keep_alive=5, limit_concurrency=MAX_CONNECTIONS,
                          h11_max_incomplete_event_size=16 * 1024)


def prepare(bundle: str, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
            provider: str = "cpu", draft_provider: str | None = None, threads: int | None = None,
            mode: str | None = None, max_queue: int = 8, max_batch: int = DEFAULT_MAX_BATCH, allowed_hosts: tuple[str, ...] | list[str] = (),
            allowed_origins: tuple[str, ...] | list[str] = (), prompt_cache_bytes: int | str = DEFAULT_PROMPT_CACHE,
            shared_lookup_tokens: int = DEFAULT_SHARED_LOOKUP, fallback: bool = False, graph_format: str = "onnx",
            progress=print):
    """Load ``bundle``, build the app and print where to reach it; returns a ready ``uvicorn.Server``.

    Binding anything but a loopback address requires an API key: the given one, or one generated
    here and printed. ``allowed_hosts`` / ``allowed_origins`` add ``Host`` names and browser
    origins to those answered (see :class:`Guard`). ``prompt_cache_bytes`` (``512M``, ``2G``, a
    number) bounds the stored caches of other conversations (:mod:`edgellm.prompt_cache`);
    ``shared_lookup_tokens`` the n-gram index of earlier requests (:class:`edgellm.lookup.SharedLookup`);
    ``max_batch`` the requests generating at once (each a cache slot, ~0.34 GB at the reference
    pair's 4,096 context once filled). ``provider``, ``draft_provider``, ``threads``, ``fallback`` and
    ``graph_format`` are :func:`edgellm.load`'s.
    """
    import uvicorn

    from edgellm.api import load

    if not isinstance(port, int) or not 1 <= port <= 65535:
        raise ConfigError(f"port={port}; allowed: 1-65535", param="port")
    key, generated = resolve_api_key(host, api_key)
    guard = Guard(hosts_for(host, allowed_hosts), frozenset(o.rstrip("/").lower() for o in allowed_origins))
    llm = load(bundle, provider=provider, draft_provider=draft_provider, threads=threads, fallback=fallback,
               graph_format=graph_format, prompt_cache_bytes=parse_bytes(prompt_cache_bytes),
               shared_lookup_tokens=shared_lookup_tokens, max_batch=max_batch)
    app = create_app(llm, api_key=key, mode=mode, max_queue=max_queue, guard=guard)
    progress(f"edgellm: serving {llm.bundle.name} (target on {llm.providers['target']}) at:")
    for url in urls(host, port):
        progress(f"  {url}")
    if key is not None:
        progress(f"  API key{' (generated)' if generated else ''}: {key}")
        progress("  (the page asks for it once; clients send 'Authorization: Bearer <key>')")
    return uvicorn.Server(server_config(app, host, port))


def serve(bundle: str, **kwargs: Any) -> None:
    """Serve ``bundle`` until interrupted (the body of ``edgellm serve``; arguments of :func:`prepare`)."""
    prepare(bundle, **kwargs).run()
