"""What may talk to the server: host names, origins, the API key, body size and time limits (:class:`Guard`)."""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from typing import Any

from edgellm.errors import ConfigError
from edgellm.server.parse import ApiError

from starlette.requests import Request

MAX_BODY_BYTES = 1 << 20
BODY_TIMEOUT_S = 30.0  # a body that trickles in slower than this is cut off (408)
HEADER_TIMEOUT_S = 10.0  # a connection that does not complete its request headers in this time is closed
MAX_CONNECTIONS = 64  # more open connections get 503 from uvicorn
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")


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


def guarded_h11():
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
