"""edgellm serve against hostile but realistic input, through a real uvicorn on loopback.

Cross-site use (CSRF, DNS rebinding), bodies too large or too slow, half-open connections,
inputs that used to crash a handler, and sampling values the API refuses. All traffic goes to
127.0.0.1 and every loop is bounded in bytes and seconds.
"""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest

from live import llm, run_app, server  # noqa: F401 - fixtures

openai = pytest.importorskip("openai")

MESSAGES = [{"role": "user", "content": "def foo(x): return"}]
JSON = {"Content-Type": "application/json"}
CHAT = "/v1/chat/completions"


def post(server, body: bytes | str, headers: dict[str, str] | None = None, path: str = CHAT) -> httpx.Response:
    return httpx.post(server.url + path, content=body, headers={**JSON, **(headers or {})}, timeout=60)


# ------------------------------------------------------------------ cross-site requests
def test_cross_site_simple_post_is_refused(server):
    body = '{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}'
    # what any web page can send without a preflight: text/plain, with the browser's Origin
    r = httpx.post(server.url + CHAT, content=body, headers={"Content-Type": "text/plain",
                                                              "Origin": "http://evil.example"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden_origin"
    assert "--allowed-origin http://evil.example" in r.json()["error"]["message"]
    r = post(server, body, {"Origin": "http://evil.example"})  # with the JSON type too
    assert r.status_code == 403
    r = post(server, body, {"Origin": "null"})  # sandboxed frames and file:// pages
    assert r.status_code == 403
    r = httpx.post(server.url + CHAT, content=body, headers={"Content-Type": "text/plain"})  # no Origin: curl-like
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"
    assert "application/json" in r.json()["error"]["message"]


def test_foreign_host_is_refused(server):
    """DNS rebinding: evil.example resolves to 127.0.0.1, so the browser sends Host: evil.example."""
    for path in ("/", "/health", "/v1/models"):
        r = httpx.get(server.url + path, headers={"Host": "evil.example:8000"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden_host", path
    r = post(server, '{"messages": [{"role": "user", "content": "hi"}]}', {"Host": "evil.example"})
    assert r.status_code == 403 and "--allowed-host evil.example" in r.json()["error"]["message"]


def test_own_page_and_clients_keep_working(server):
    port = server.url.rsplit(":", 1)[1]
    for host in (f"127.0.0.1:{port}", f"localhost:{port}"):
        # the page's own fetch: same origin as the Host it was loaded from
        r = post(server, '{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0}',
                 {"Host": host, "Origin": f"http://{host}"})
        assert r.status_code == 200, r.text
    assert httpx.get(server.url + "/", headers={"Host": f"localhost:{port}"}).status_code == 200
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
    assert c.chat.completions.create(model="t", messages=MESSAGES, max_tokens=3, temperature=0).choices


def test_allowed_origin_and_host_options(llm):
    from edgellm.server import Guard, create_app, hosts_for

    guard = Guard(hosts_for("127.0.0.1", ["box.lan"]), frozenset({"http://app.example:3000"}))
    running = run_app(create_app(llm, guard=guard))
    try:
        r = httpx.options(running.url + CHAT, headers={"Origin": "http://app.example:3000",
                                                       "Access-Control-Request-Method": "POST",
                                                       "Access-Control-Request-Headers": "content-type"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://app.example:3000"
        r = post(running, '{"prompt": "x", "max_tokens": 2}', {"Origin": "http://app.example:3000"},
                 "/v1/completions")
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://app.example:3000"
        assert post(running, '{"prompt": "x", "max_tokens": 2}', {"Origin": "http://other.example"},
                    "/v1/completions").status_code == 403
        assert httpx.get(running.url + "/health", headers={"Host": "box.lan:80"}).status_code == 200
    finally:
        running.stop()
    from edgellm.errors import ConfigError

    with pytest.raises(ConfigError, match="scheme://host"):
        Guard(origins=frozenset({"app.example/path"}))


# ------------------------------------------------------------------ bounded bodies and connections
def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def _chunked_flood(url: str, total: int, deadline_s: float) -> tuple[int, bytes]:
    """Send up to ``total`` bytes as one chunked body; returns (bytes sent, response head)."""
    host, port = url.removeprefix("http://").split(":")
    chunk = b"x" * 65536
    sent = 0
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(f"POST {CHAT} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                  "Transfer-Encoding: chunked\r\n\r\n".encode())
        t_end = time.monotonic() + deadline_s
        try:
            while sent < total and time.monotonic() < t_end:
                s.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
                sent += len(chunk)
        except OSError:  # the server answered and closed the connection: what we want
            pass
        try:
            head = s.recv(4096)
        except OSError:
            head = b""
    return sent, head


def test_huge_chunked_body_is_refused_while_reading(server):
    samples: list[float] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append(_rss_mb())
            time.sleep(0.01)

    before = _rss_mb()
    watcher = threading.Thread(target=sample)
    watcher.start()
    try:
        sent, head = _chunked_flood(server.url, 300 * 10**6, deadline_s=30)
    finally:
        done.set()
        watcher.join()
    assert sent < 50 * 10**6  # refused long before 300 MB
    assert head.startswith(b"HTTP/1.1 413"), head[:200]
    assert max(samples) - before < 16, (before, max(samples))  # a few MB, not the body
    # a declared length past the limit is refused before a byte of it is read
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(f"POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {300 * 10**6}\r\n\r\n{{".encode())
        head = s.recv(4096)
    assert head.startswith(b"HTTP/1.1 413") and b"connection: close" in head.lower(), head[:300]


def test_half_open_connection_is_closed(server, monkeypatch):
    import edgellm.server.guard as srv

    monkeypatch.setattr(srv, "HEADER_TIMEOUT_S", 0.5)
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # headers never finished
        t0 = time.monotonic()
        assert s.recv(100) == b""  # closed by the server
        assert time.monotonic() - t0 < 4
    with socket.create_connection((host, int(port)), timeout=5) as s:  # an idle connection, not a byte sent
        assert s.recv(100) == b""


def test_slow_body_times_out(server, monkeypatch):
    import edgellm.server.guard as srv

    monkeypatch.setattr(srv, "BODY_TIMEOUT_S", 0.5)
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(f"POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  "Content-Length: 100\r\n\r\n{\"messa".encode())
        head = s.recv(4096)
    assert head.startswith(b"HTTP/1.1 408"), head[:200]


def test_tokenizing_a_long_prompt_does_not_stall_health(server):
    body = '{"prompt": "' + "word " * 200000 + '", "max_tokens": 1}'  # ~1 MB: ~1 s to tokenize here
    result: dict[str, httpx.Response] = {}
    worker = threading.Thread(target=lambda: result.setdefault("r", post(server, body, path="/v1/completions")))
    worker.start()
    worst = 0.0
    while worker.is_alive():
        t0 = time.monotonic()
        httpx.get(server.url + "/health", timeout=10)
        worst = max(worst, time.monotonic() - t0)
    worker.join()
    assert result["r"].status_code == 400 and result["r"].json()["error"]["code"] == "context_length_exceeded"
    assert worst < 0.5, worst


# ------------------------------------------------------------------ inputs that crashed a handler
@pytest.mark.parametrize("body, code", [
    (b"[" * 100000, "invalid_json"),                                    # RecursionError before
    (b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "invalid_json"),  # a lone surrogate
    (b'{"messages": [{"role": "user", "content": "hi"}], "model": "\\udfff"}', "invalid_json"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', "invalid_json"),
    (b'{"prompt": "x", "top_p": Infinity}', "invalid_json"),
    (b'\xff\xfe{"prompt": 1}', "invalid_json"),
    ('{"prompt": "' + "[" * 40 + "]" * 40 + '"}', None),                  # brackets inside a string are text
    (b'{"messages": [{"role": "user", "content": "hi"}], "seed": -1}', "invalid_value"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "seed": 18446744073709551616}', "invalid_value"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "top_p": 0}', "invalid_value"),
])
def test_crashing_inputs_get_clean_errors(server, body, code):
    path = "/v1/completions" if b'"prompt"' in (body if isinstance(body, bytes) else body.encode()) else CHAT
    r = post(server, body, path=path)
    if code is None:
        assert r.status_code in (200, 400), r.text  # a normal request: answered or refused by length
        return
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["message"] and len(err["message"]) < 600


def test_tiny_temperature_samples_the_most_likely_token(server):
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
    greedy = c.completions.create(model="t", prompt="def foo(x): return", max_tokens=16, temperature=0)
    tiny = c.completions.create(model="t", prompt="def foo(x): return", max_tokens=16, temperature=1e-310, seed=3)
    assert tiny.choices[0].text == greedy.choices[0].text  # it used to emit the padding token every step


def test_models_hide_the_bundle_path(server, llm):
    r = httpx.get(server.url + "/v1/models")
    assert r.status_code == 200 and str(llm.bundle) not in r.text and llm.bundle.name in r.text


def test_sampling_values_share_one_validator(server, llm):
    """The API, the server and the CLI refuse the same values with the same message."""
    from edgellm.errors import ConfigError

    for field, value in (("top_p", 0), ("seed", -1), ("temperature", -1), ("top_k", -1)):
        with pytest.raises(ConfigError) as api_err:
            llm.generate("x", max_new_tokens=2, **{field: value})
        ext = field == "top_k"
        body = {"prompt": "x", "max_tokens": 2, **({"edgellm": {field: value}} if ext else {field: value})}
        r = httpx.post(server.url + "/v1/completions", json=body)
        assert r.status_code == 400 and r.json()["error"]["message"] == str(api_err.value)
        assert r.json()["error"]["param"] == field
