"""Replicas on Ray Serve: a local Ray instance (loopback only) answers the OpenAI client like edgellm generate."""

from __future__ import annotations

import json
import socket

import pytest

pytest.importorskip("ray", reason="needs Ray Serve: pip install 'edgellm[ray]'")
openai = pytest.importorskip("openai")

MESSAGES = [{"role": "user", "content": "def foo(x): return"}]


@pytest.fixture(scope="module")
def ray_url(tiny_bundle):
    import ray
    from ray import serve

    from edgellm.ray_serve import ReplicaOptions, application

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(application(ReplicaOptions(str(tiny_bundle), replicas=2, cpus_per_replica=1)), name="edgellm",
                  route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def test_openai_client_through_the_ray_proxy_gets_what_generate_prints(ray_url, tiny_bundle):
    from click.testing import CliRunner

    from edgellm.cli import cli

    r = CliRunner().invoke(cli, ["generate", str(tiny_bundle), MESSAGES[0]["content"], "--chat", "--json",
                                 "--max-new-tokens", "16", "--threads", "1"])
    assert r.exit_code == 0, r.output
    expected = json.loads(r.output.strip().splitlines()[-1])["text"]
    c = openai.OpenAI(base_url=ray_url + "/v1", api_key="none", max_retries=0, timeout=120)
    for _ in range(3):  # two replicas: whichever answers, the same text
        resp = c.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=16, temperature=0)
        assert resp.choices[0].message.content == expected
    chunks = list(c.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=16, temperature=0,
                                            stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == expected


def test_replica_options_validate_themselves():
    from edgellm.errors import ConfigError
    from edgellm.ray_serve import ReplicaOptions, app_builder

    with pytest.raises(ConfigError, match="replicas=0; allowed: an integer 1-256"):
        ReplicaOptions("b", replicas=0)
    with pytest.raises(ConfigError, match="cpus_per_replica=-1"):
        ReplicaOptions("b", cpus_per_replica=-1)
    with pytest.raises(ConfigError, match="prompt cache size 'lots'"):
        ReplicaOptions("b", prompt_cache_bytes="lots")
    assert app_builder({"bundle": "b", "replicas": "2", "cpus_per_replica": "1.5"}) is not None
