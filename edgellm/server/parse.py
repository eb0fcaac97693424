"""OpenAI request bodies, checked: :func:`parse_request` -> :class:`GenRequest`, or an :class:`ApiError`."""

from __future__ import annotations

import json
import reprlib
from dataclasses import dataclass
from typing import Any

from edgellm.api import LLM
from edgellm.generation import GenerationOptions, check_text
from edgellm.errors import ConfigError, ContextLengthError
from edgellm.options import DEFAULT_MAX_NEW_TOKENS


from starlette.responses import JSONResponse

MAX_JSON_DEPTH = 32  # an OpenAI request nests 5 deep; 100,000 '[' would exhaust the parser's stack
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


@dataclass
class GenRequest:
    """A validated completion request.

    Attributes:
        prompt: a string (``/v1/completions``) or chat messages (``/v1/chat/completions``).
        prompt_ids: the prompt's token ids (after the chat template).
        options: how to generate it (validated, ``max_new_tokens`` resolved against the context).
        stream: answer with server-sent events.
        include_usage: (streaming) send a last chunk with ``usage``.
        model: the model name the client asked for (echoed back).
    """

    prompt: str | list[dict[str, str]]
    prompt_ids: list[int]
    options: GenerationOptions
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
    fields = {
        "temperature": _typed(body, "temperature", (int, float), "a number (0 = greedy)", 1.0),
        "top_p": _typed(body, "top_p", (int, float), "a number with 0 < top_p <= 1", 1.0),
        "top_k": _typed(ext, "top_k", (int,), "an integer >= 0", 0),
        "seed": _typed(body, "seed", (int,), "an integer", None),
        "stop": stop if stop is not None else (),
        "mode": _typed(ext, "mode", (str,), "speculative, target or lookup", default_mode),
        "num_draft_tokens": _typed(ext, "num_draft_tokens", (int,), "an integer 0-64", None),
        "cache_prompt": _typed(ext, "cache_prompt", (bool,), "true or false", True),
        "adapter": adapter,
    }
    try:
        ids = llm.prompt_ids(prompt)
        options = GenerationOptions(max_new_tokens=_max_tokens(llm, body, len(ids)), **fields)
        llm.decode_config(options)  # the mode against this bundle
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
