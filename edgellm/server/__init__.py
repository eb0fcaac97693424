"""``edgellm serve``: an OpenAI-compatible HTTP server and a phone-friendly chat page.

Routes::

    GET  /                     the chat page (one self-contained HTML file, no CDN)
    GET  /health               {"status": "ok", "busy": ..., "batched": ..., "queued": ..., "last_stats": ..., "prompt_cache": ...}
    GET  /v1/models            the model this server runs, and each of its LoRA adapters
    POST /v1/chat/completions  OpenAI chat completions, with ``stream: true`` as server-sent events
    POST /v1/completions       OpenAI (legacy) text completions, likewise

Up to ``max_batch`` requests generate at once, each on its own thread in its own cache slot,
their target passes batched into one onnxruntime call (:class:`Engine`); others wait in a FIFO queue (``max_queue`` of
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

import secrets
import uuid
from importlib import resources
from typing import Any

from edgellm.api import LLM
from edgellm.options import DEFAULT_MAX_BATCH
from edgellm.errors import ConfigError
from edgellm.lookup import DEFAULT_SHARED_LOOKUP
from edgellm.prompt_cache import DEFAULT_PROMPT_CACHE, parse_bytes

try:
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, JSONResponse, Response
    from starlette.routing import Route
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("edgellm serve needs the 'serve' extra: pip install 'edgellm[serve]'") from e

from edgellm.server.engine import Engine  # noqa: E402 - after the check for the serve extra
from edgellm.server.guard import (MAX_CONNECTIONS, Guard, GuardMiddleware, check_json_content_type,  # noqa: E402
                                  guarded_h11, hosts_for, is_loopback, local_addresses, read_body)
from edgellm.server.parse import ApiError, parse_json, parse_request  # noqa: E402
from edgellm.server.responses import (EventStream, Shape, complete_response, generation_error,  # noqa: E402
                                      stream_chunks)

__all__ = ["ApiError", "Engine", "Guard", "create_app", "hosts_for", "is_loopback", "parse_request", "prepare",
           "resolve_api_key", "serve", "server_config", "urls"]


# ---------------------------------------------------------------------------------------- the app
class Handlers:
    """The routes of one served bundle: what each answers, given the model, its engine and its key.

    Attributes:
        llm: the loaded bundle.
        engine: runs the generations (:class:`Engine`).
        model_id: the name ``/v1/models`` reports.
        mode: the default decoding mode.
        api_key: ``/v1/*`` requires ``Authorization: Bearer <api_key>`` when set.
    """

    def __init__(self, llm: LLM, engine: Engine, model_id: str, mode: str, api_key: str | None) -> None:
        self.llm, self.engine, self.model_id, self.mode, self.api_key = llm, engine, model_id, mode, api_key

    def authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>' (the key "
                                "`edgellm serve` printed)", code="invalid_api_key")

    async def completions(self, request: Request, chat: bool) -> Response:
        from starlette.concurrency import run_in_threadpool

        self.authorize(request)
        check_json_content_type(request)
        self.engine.check_room()  # 429 before reading and tokenizing a prompt that would not be served
        raw = await read_body(request)
        # parsing and tokenizing a long prompt takes a while: off the event loop, so /health answers
        req = await run_in_threadpool(lambda: parse_request(self.llm, parse_json(raw), chat=chat,
                                                            default_mode=self.mode, model_id=self.model_id))
        shape = Shape(chat, f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", req.model or self.model_id)
        job = self.engine.start(req)  # 429 here, before any byte of the answer
        if req.stream:
            return EventStream(stream_chunks(job, req, shape))
        return await complete_response(request, job, shape, req)

    async def chat_completions(self, request: Request) -> Response:
        return await self.completions(request, chat=True)

    async def text_completions(self, request: Request) -> Response:
        return await self.completions(request, chat=False)

    async def models(self, request: Request) -> Response:
        self.authorize(request)
        llm = self.llm
        info = {**llm.info, "bundle": llm.bundle.name}  # not the absolute path: clients need no file system facts
        base = {"id": self.model_id, "object": "model", "created": 0, "owned_by": "edgellm", "edgellm": info}
        adapters = [{"id": name, "object": "model", "created": 0, "owned_by": "edgellm", "parent": self.model_id,
                     "edgellm": {"lora": {k: v for k, v in llm.manifest.adapters[name].items()
                                          if k not in ("target", "draft")}}}
                    for name in sorted(llm.adapters)]
        return JSONResponse({"object": "list", "data": [base] + adapters})

    async def health(self, request: Request) -> Response:
        e, llm = self.engine, self.llm
        return JSONResponse({"status": "ok", "model": self.model_id, "mode": self.mode, "busy": e.busy,
                             "active": e.active, "max_batch": e.max_batch, "batched": llm.batched, "queued": e.queued, "served": e.served,
                             "last_stats": e.last_stats, "auth": self.api_key is not None,
                             "max_context": llm.manifest.target.max_context,
                             "prompt_cache": {"entries": len(llm.prompt_cache), "bytes": llm.prompt_cache.nbytes,
                                              "max_bytes": llm.prompt_cache.max_bytes,
                                              "evictions": llm.prompt_cache.evictions},
                             "shared_lookup": {"tokens": llm.shared_lookup.tokens,
                                               "max_tokens": llm.shared_lookup.max_tokens}})

    async def page(self, request: Request) -> Response:
        return HTMLResponse(resources.files("edgellm").joinpath("data/chat.html").read_text("utf-8"))

    @staticmethod
    async def api_error(request: Request, exc: ApiError) -> Response:
        return exc.response()

    @staticmethod
    async def http_error(request: Request, exc: HTTPException) -> Response:
        allowed = {404: f"no route {request.method} {request.url.path}; see GET /v1/models, POST "
                        "/v1/chat/completions, POST /v1/completions, GET /health",
                   405: f"method {request.method} is not allowed on {request.url.path}"}
        return ApiError(exc.status_code, allowed.get(exc.status_code, str(exc.detail)),
                        code="not_found" if exc.status_code == 404 else None).response()

    @staticmethod
    async def server_error(request: Request, exc: Exception) -> Response:
        return generation_error(exc).response()


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
    from starlette.middleware import Middleware
    from starlette.middleware.cors import CORSMiddleware

    h = Handlers(llm, Engine(llm, max_queue=max_queue), model_id or llm.bundle.name,
                 mode or ("speculative" if llm.draft is not None else "target"), api_key)
    guard = guard or Guard()
    routes = [Route("/", h.page), Route("/health", h.health), Route("/v1/models", h.models),
              Route("/v1/chat/completions", h.chat_completions, methods=["POST"]),
              Route("/v1/completions", h.text_completions, methods=["POST"])]
    middleware = [Middleware(GuardMiddleware, guard=guard)]
    extra = sorted(guard.origins - {"*"})
    if guard.origins:  # pages on other origins the user allowed: answer their CORS preflights
        middleware.append(Middleware(CORSMiddleware, allow_origins=["*"] if "*" in guard.origins else extra,
                                     allow_methods=["GET", "POST"], allow_headers=["Authorization", "Content-Type"]))
    app = Starlette(routes=routes, middleware=middleware, exception_handlers={
        ApiError: h.api_error, HTTPException: h.http_error, Exception: h.server_error})
    app.state.engine = h.engine
    return app


# ---------------------------------------------------------------------------------------- serve
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


def server_config(app: Any, host: str, port: int):
    """The ``uvicorn.Config`` edgellm serves with: bounded connections, header and keep-alive timeouts."""
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=2,
                          http=guarded_h11(), timeout_keep_alive=5, limit_concurrency=MAX_CONNECTIONS,
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
