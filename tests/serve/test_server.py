"""edgellm serve through real HTTP: the OpenAI client, errors, keys, disconnects, the queue."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from live import Running, free_port, llm, run_app, server  # noqa: F401 - fixtures

openai = pytest.importorskip("openai")

MESSAGES = [{"role": "user", "content": "def foo(x): return"}]
JSON = {"Content-Type": "application/json"}


def client(server, key: str = "none"):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=60)


def test_health_and_models(server, llm):
    h = httpx.get(server.url + "/health").json()
    assert h["status"] == "ok" and h["mode"] == "speculative" and h["busy"] is False
    models = client(server).models.list()
    assert [m.id for m in models.data] == [llm.bundle.name]


def test_chat_matches_generate_cli(server, tiny_bundle):
    from click.testing import CliRunner

    from edgellm.cli import cli

    r = CliRunner().invoke(cli, ["generate", str(tiny_bundle), MESSAGES[0]["content"], "--chat", "--json",
                                 "--max-new-tokens", "24", "--threads", "1"])
    assert r.exit_code == 0, r.output
    expected = json.loads(r.output.strip().splitlines()[-1])
    resp = client(server).chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=24, temperature=0)
    assert resp.choices[0].message.content == expected["text"]
    assert resp.choices[0].finish_reason == expected["finish_reason"]
    assert resp.usage.completion_tokens == len(expected["token_ids"])
    assert resp.usage.prompt_tokens > 0
    ext = resp.model_extra["edgellm"]
    assert ext["mode"] == "speculative" and ext["acceptance_rate"] == 1.0  # the draft is the target


def test_chat_stream_equals_non_stream(server):
    c = client(server)
    whole = c.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=24, temperature=0)
    chunks = list(c.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=24, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [ch for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].model_extra["edgellm"]["generated_tokens"] == whole.usage.completion_tokens
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens and not chunks[-1].choices
    flags = [f for ch in chunks if ch.choices and "drafted" in ch.model_extra.get("edgellm", {})
             for f in ch.model_extra["edgellm"]["drafted"]]
    assert len(flags) == whole.usage.completion_tokens and any(flags)


def test_second_chat_turn_reuses_the_cached_prefix(server):
    c = client(server)
    first = c.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, temperature=0)
    turn2 = MESSAGES + [{"role": "assistant", "content": first.choices[0].message.content},
                        {"role": "user", "content": "hello world"}]
    warm = c.chat.completions.create(model="tiny", messages=turn2, max_tokens=12, temperature=0)
    cold = c.chat.completions.create(model="tiny", messages=turn2, max_tokens=12, temperature=0,
                                     extra_body={"edgellm": {"cache_prompt": False}})
    assert warm.choices[0].message.content == cold.choices[0].message.content
    assert warm.usage.prompt_tokens_details.cached_tokens > first.usage.prompt_tokens
    assert cold.usage.prompt_tokens_details.cached_tokens == 0
    h = httpx.get(server.url + "/health").json()
    assert h["prompt_cache"]["max_bytes"] == 16 * 2**20 and h["shared_lookup"]["tokens"] > 0
    bad = httpx.post(server.url + "/v1/chat/completions", headers=JSON,
                     json={"messages": MESSAGES, "edgellm": {"cache_prompt": "no"}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "cache_prompt"


def test_completions_match_generate(server, llm):
    prompt = "def foo(x): return"
    expected = llm.generate(prompt, max_new_tokens=20, temperature=0.0)
    c = client(server)
    resp = c.completions.create(model="tiny", prompt=prompt, max_tokens=20, temperature=0)
    assert resp.choices[0].text == expected.text
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="tiny", prompt=prompt, max_tokens=20, temperature=0, stream=True) if ch.choices)
    assert streamed == expected.text


def test_stop_and_seeded_sampling(server, llm):
    c = client(server)
    base = c.completions.create(model="t", prompt="def foo(x): return", max_tokens=20, temperature=0).choices[0].text
    stop = base[3:6]
    cut = c.completions.create(model="t", prompt="def foo(x): return", max_tokens=20, temperature=0, stop=[stop])
    assert cut.choices[0].text == base[:base.find(stop)] and cut.choices[0].finish_reason == "stop"
    a, b = (c.completions.create(model="t", prompt="x", max_tokens=16, temperature=1.0, seed=7).choices[0].text
            for _ in range(2))
    assert a == b


@pytest.mark.parametrize("body, code, param", [
    ({"messages": "hi"}, "invalid_value", "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "invalid_value", "messages[0]"),
    ({"messages": MESSAGES, "temperature": "hot"}, "invalid_type", "temperature"),
    ({"messages": MESSAGES, "temperature": 1000}, "invalid_value", "temperature"),
    ({"messages": MESSAGES, "temperature": -0.5}, "invalid_value", "temperature"),
    ({"messages": MESSAGES, "top_p": 0}, "invalid_value", "top_p"),
    ({"messages": MESSAGES, "seed": -1}, "invalid_value", "seed"),
    ({"messages": MESSAGES, "edgellm": {"top_k": -3}}, "invalid_value", "top_k"),
    ({"messages": MESSAGES, "edgellm": {"num_draft_tokens": 99}}, "invalid_value", "num_draft_tokens"),
    ({"messages": MESSAGES, "max_tokens": 100000}, "context_length_exceeded", "max_tokens"),
    ({"messages": MESSAGES, "max_tokens": 0}, "invalid_value", "max_tokens"),
    ({"messages": MESSAGES, "max_tokens": True}, "invalid_type", "max_tokens"),
    ({"messages": MESSAGES, "n": 3}, "invalid_value", "n"),
    ({"messages": MESSAGES, "stream": "yes"}, "invalid_type", "stream"),
    ({"messages": MESSAGES, "stop": [1]}, "invalid_value", "stop"),
    ({"messages": MESSAGES, "edgellm": {"mode": "fast"}}, "invalid_value", "mode"),
    ({"messages": [{"role": "user", "content": "word " * 400}]}, "context_length_exceeded", "max_tokens"),
    ({"messages": MESSAGES, "temprature": 0}, "unknown_parameter", "temprature"),
    ({"messages": MESSAGES, "presence_penalty": "x"}, "invalid_type", "presence_penalty"),
])
def test_bad_requests_get_400(server, body, code, param):
    r = httpx.post(server.url + "/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["param"] == param and err["type"] == "invalid_request_error"
    assert err["message"]


def test_malformed_json_wrong_route_and_method(server):
    r = httpx.post(server.url + "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(server.url + "/v1/completions", content=b"[1, 2]", headers=JSON)
    assert r.status_code == 400 and "JSON object" in r.json()["error"]["message"]
    r = httpx.get(server.url + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = httpx.get(server.url + "/v1/chat/completions")
    assert r.status_code == 405 and "error" in r.json()
    r = httpx.post(server.url + "/v1/completions", content=b"x" * (1 << 21), headers=JSON)
    assert r.status_code == 413


def test_openai_client_raises_on_bad_request(server):
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client(server).chat.completions.create(model="t", messages=MESSAGES, max_tokens=10 ** 6)


def test_page_is_self_contained(server):
    r = httpx.get(server.url + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "/v1/chat/completions" in r.text and "viewport" in r.text
    assert "http://" not in r.text and "https://" not in r.text  # no CDN: works offline


# ------------------------------------------------------------------ keys and binding
def test_non_loopback_bind_requires_a_key(tiny_bundle):
    from edgellm.server import prepare

    lines: list[str] = []
    port = free_port()
    running = Running(prepare(str(tiny_bundle), host="0.0.0.0", port=port, threads=1, progress=lines.append), port)
    try:
        key = next(line.split(": ", 1)[1] for line in lines if "API key (generated)" in line)
        assert any(f":{port}/" in line for line in lines)
        assert httpx.get(running.url + "/health").status_code == 200  # health stays open
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": key}):
            r = httpx.get(running.url + "/v1/models", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            client(running, "wrong").chat.completions.create(model="t", messages=MESSAGES, max_tokens=2)
        resp = client(running, key).chat.completions.create(model="t", messages=MESSAGES, max_tokens=4, temperature=0)
        assert resp.choices[0].message.content is not None
    finally:
        running.stop()


def test_key_rules():
    from edgellm.errors import ConfigError
    from edgellm.server import is_loopback, resolve_api_key

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")
    assert resolve_api_key("127.0.0.1", None) == (None, False)
    key, generated = resolve_api_key("0.0.0.0", None)
    assert generated and len(key) >= 24
    assert resolve_api_key("0.0.0.0", "k") == ("k", False)
    with pytest.raises(ConfigError, match="api_key"):
        resolve_api_key("0.0.0.0", " ")


# ------------------------------------------------------------------ disconnects and the queue
class SlowLLM:
    """The tiny model, slowed to ~20 ms a token so a test can act mid-generation."""

    def __init__(self, llm) -> None:
        self._llm = llm
        self.finished = 0

    def __getattr__(self, name):
        return getattr(self._llm, name)

    def stream_events(self, prompt, *args, **kw):
        for ev in self._llm.stream_events(prompt, *args, **kw):
            time.sleep(0.02)
            if ev.result is not None:
                self.finished += 1
            yield ev


@pytest.fixture()
def slow_server(llm):
    from edgellm.server import create_app

    slow = SlowLLM(llm)
    running = run_app(create_app(slow, max_queue=1))
    running.slow = slow
    yield running
    running.stop()


def _wait_idle(url: str, timeout: float = 15) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        h = httpx.get(url + "/health").json()
        if not h["busy"] and not h["queued"]:
            return h
        time.sleep(0.05)
    raise AssertionError(f"the server stayed busy: {h}")


def test_disconnect_mid_stream_frees_the_server(slow_server):
    body = {"messages": MESSAGES, "max_tokens": 200, "temperature": 0, "stream": True}
    with httpx.stream("POST", slow_server.url + "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: ") for line in got)
    t0 = time.monotonic()
    h = _wait_idle(slow_server.url)
    assert time.monotonic() - t0 < 2  # stopped at once, not after 200 tokens x 20 ms
    assert h["served"] == 0 and slow_server.slow.finished == 0
    resp = client(slow_server).chat.completions.create(model="t", messages=MESSAGES, max_tokens=5, temperature=0)
    assert resp.usage.completion_tokens >= 1 and _wait_idle(slow_server.url)["served"] == 1


def test_queue_is_fair_health_stays_responsive_and_overflow_gets_429(slow_server):
    body = {"messages": MESSAGES, "max_tokens": 30, "temperature": 0}
    results: dict[int, httpx.Response] = {}

    def post(i: int) -> None:
        results[i] = httpx.post(slow_server.url + "/v1/chat/completions", json=body, timeout=60)

    threads = [threading.Thread(target=post, args=(i,)) for i in range(2)]
    threads[0].start()
    time.sleep(0.2)
    threads[1].start()
    time.sleep(0.2)
    t0 = time.monotonic()
    h = httpx.get(slow_server.url + "/health").json()
    assert time.monotonic() - t0 < 1 and h["busy"] and h["queued"] == 1
    r = httpx.post(slow_server.url + "/v1/chat/completions", json=body)  # max_queue=1: one waits, a third is refused
    assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
    assert int(r.headers["retry-after"]) >= 1  # clients (the openai package too) wait this long
    for t in threads:
        t.join(60)
    assert [results[i].status_code for i in range(2)] == [200, 200]
    assert results[0].json()["choices"][0]["message"]["content"] == results[1].json()["choices"][0]["message"]["content"]


@pytest.fixture(scope="module")
def two_slot_llm(tiny_bundle):
    import edgellm

    return edgellm.load(tiny_bundle, threads=1, max_batch=2)


def test_a_short_request_joins_a_long_one_and_finishes_first(two_slot_llm, llm):
    from edgellm.server import create_app

    slow = SlowLLM(two_slot_llm)
    running = run_app(create_app(slow, max_queue=0))
    try:
        long_body = {"messages": MESSAGES, "max_tokens": 120, "temperature": 0}
        short_msgs = [{"role": "user", "content": "hello world"}]
        done: dict[str, float] = {}
        replies: dict[str, httpx.Response] = {}

        def post(name: str, body: dict) -> None:
            replies[name] = httpx.post(running.url + "/v1/chat/completions", json=body, timeout=60)
            done[name] = time.monotonic()

        t_long = threading.Thread(target=post, args=("long", long_body))
        t_long.start()
        time.sleep(0.3)  # the long one is generating
        h = httpx.get(running.url + "/health").json()
        assert h["active"] == 1 and h["max_batch"] == 2 and h["batched"] is True
        post("short", {"messages": short_msgs, "max_tokens": 6, "temperature": 0})
        assert "long" not in done  # the short one did not wait for the long one
        t_long2 = threading.Thread(target=post, args=("long2", long_body))
        t_long2.start()
        time.sleep(0.3)
        third = httpx.post(running.url + "/v1/chat/completions", json=long_body)  # both slots busy, no queue
        assert "long" not in done and third.status_code == 429
        t_long.join(60)
        t_long2.join(60)
        assert replies["long2"].json() == {**replies["long2"].json(), "choices": replies["long"].json()["choices"]}
        for name, msgs, n in (("long", MESSAGES, 120), ("short", short_msgs, 6)):
            assert replies[name].status_code == 200
            alone = llm.generate(msgs, max_new_tokens=n, temperature=0.0)
            assert replies[name].json()["choices"][0]["message"]["content"] == alone.text
        assert two_slot_llm.gate.parts_run > two_slot_llm.gate.passes  # the two shared passes
    finally:
        running.stop()
