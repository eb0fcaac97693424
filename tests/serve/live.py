"""A real uvicorn server on a loopback port, serving the tiny bundle (helpers and fixtures)."""

from __future__ import annotations

import socket
import threading
import time

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    """A uvicorn.Server run on a thread; ``url`` is its base address."""

    def __init__(self, server, port: int) -> None:
        self.server, self.url = server, f"http://127.0.0.1:{port}"
        self.thread = threading.Thread(target=server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def run_app(app) -> Running:
    """``app`` on a free loopback port, with the uvicorn settings ``edgellm serve`` uses."""
    import uvicorn

    from edgellm.server import server_config

    port = free_port()
    return Running(uvicorn.Server(server_config(app, "127.0.0.1", port)), port)


@pytest.fixture(scope="module")
def llm(tiny_bundle):
    import edgellm

    # the server's defaults on: every server test's output must still equal a plain generate's
    return edgellm.load(tiny_bundle, threads=1, prompt_cache_bytes=16 * 2**20, shared_lookup_tokens=10_000)


@pytest.fixture(scope="module")
def server(llm):
    from edgellm.server import create_app

    running = run_app(create_app(llm))
    yield running
    running.stop()
