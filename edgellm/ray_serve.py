"""Replicas of ``edgellm serve`` on Ray Serve: the same OpenAI-compatible app, one bundle per replica.

    edgellm serve BUNDLE --ray --replicas 2 --cpus-per-replica 2

or, with Ray's own tooling (``serve run``, a ``serve deploy`` config), the application this
module builds::

    serve run edgellm.ray_serve:app_builder bundle=/path/to/bundle replicas=2 cpus_per_replica=2

Each replica is a Ray actor that loads the bundle and runs :func:`edgellm.server.create_app`
(the routes, errors, queue and page of ``edgellm serve``); Ray's HTTP proxy spreads requests
over the replicas. What is per replica: the loaded model, its queue, its prompt cache and its
shared lookup index (a conversation's next turn reuses its cached prefix only when it lands on
the same replica). Nothing is shared between replicas but the bundle on disk, which every node
of a Ray cluster must have at the same path.
"""

from __future__ import annotations

import signal
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from edgellm.options import DEFAULT_MAX_BATCH
from edgellm.errors import ConfigError
from edgellm.lookup import DEFAULT_SHARED_LOOKUP
from edgellm.prompt_cache import DEFAULT_PROMPT_CACHE, parse_bytes


@dataclass(frozen=True)
class ReplicaOptions:
    """How each replica loads and serves the bundle.

    Attributes:
        bundle: the bundle folder (the same path on every node).
        replicas: number of replicas (Ray actors), each with its own copy of the model.
        cpus_per_replica: CPUs Ray reserves for each replica; also its onnxruntime threads
            unless ``threads`` is given.
        threads: intra-op threads per session.
        provider / draft_provider / fallback / graph_format: as for :func:`edgellm.load`.
        mode: default decoding mode of requests.
        max_queue: requests that may wait in a replica while its slots generate.
        max_batch: requests a replica generates at once (see :class:`edgellm.server.Engine`).
        api_key: Bearer key clients must send (required when the proxy binds off loopback).
        prompt_cache_bytes / shared_lookup_tokens: as for ``edgellm serve``, per replica.
        allowed_hosts: ``Host`` names answered besides loopback (the proxy's public name).
    """

    bundle: str
    replicas: int = 1
    cpus_per_replica: float = 2
    threads: int | None = None
    provider: str = "cpu"
    draft_provider: str | None = None
    fallback: bool = False
    graph_format: str = "onnx"
    mode: str | None = None
    max_queue: int = 8
    max_batch: int = DEFAULT_MAX_BATCH
    api_key: str | None = None
    prompt_cache_bytes: int | str = DEFAULT_PROMPT_CACHE
    shared_lookup_tokens: int = DEFAULT_SHARED_LOOKUP
    allowed_hosts: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if not isinstance(self.replicas, int) or isinstance(self.replicas, bool) or not 1 <= self.replicas <= 256:
            raise ConfigError(f"replicas={self.replicas!r}; allowed: an integer 1-256", param="replicas")
        c = self.cpus_per_replica
        if not isinstance(c, (int, float)) or isinstance(c, bool) or not 0 < c <= 1024:
            raise ConfigError(f"cpus_per_replica={c!r}; allowed: a number > 0", param="cpus_per_replica")
        parse_bytes(self.prompt_cache_bytes)

    @property
    def session_threads(self) -> int:
        return self.threads or max(1, int(self.cpus_per_replica))


def build_asgi_app(opts: ReplicaOptions):
    """The app of one replica (runs inside the replica's actor)."""
    from edgellm.api import load
    from edgellm.server import Guard, create_app, hosts_for

    llm = load(opts.bundle, threads=opts.session_threads, provider=opts.provider, draft_provider=opts.draft_provider,
               fallback=opts.fallback, graph_format=opts.graph_format, prompt_cache_bytes=parse_bytes(opts.prompt_cache_bytes),
               shared_lookup_tokens=opts.shared_lookup_tokens, max_batch=opts.max_batch)
    guard = Guard(hosts_for("127.0.0.1", opts.allowed_hosts), frozenset())
    return create_app(llm, api_key=opts.api_key, mode=opts.mode, max_queue=opts.max_queue, guard=guard)


def application(opts: ReplicaOptions):
    """The Ray Serve application (``serve.run(application(opts))``)."""
    serve = _ray().serve

    ingress = serve.ingress(lambda: build_asgi_app(opts))
    Replica = serve.deployment(ingress(type("EdgeLLMReplica", (), {})), name="edgellm",  # noqa: N806
                               num_replicas=opts.replicas, ray_actor_options={"num_cpus": opts.cpus_per_replica},
                               max_ongoing_requests=opts.max_batch + opts.max_queue)
    return Replica.bind()


def app_builder(args: dict[str, Any]):
    """For ``serve run edgellm.ray_serve:app_builder bundle=... replicas=2``: arguments are strings."""
    ints = {"replicas", "threads", "max_queue", "max_batch", "shared_lookup_tokens"}
    kw: dict[str, Any] = {k: (int(v) if k in ints else v) for k, v in args.items()}
    if "cpus_per_replica" in kw:
        kw["cpus_per_replica"] = float(kw["cpus_per_replica"])
    return application(ReplicaOptions(**kw))


def run(opts: ReplicaOptions, *, host: str = "127.0.0.1", port: int = 8000, progress=print) -> None:
    """Start (or join, with ``RAY_ADDRESS``) a Ray instance, deploy the replicas and block until interrupted."""
    from edgellm.server import resolve_api_key, urls

    key, generated = resolve_api_key(host, opts.api_key)
    opts = ReplicaOptions(**{**asdict(opts), "api_key": key})
    ray = _ray()
    serve = ray.serve
    ray.init(ignore_reinit_error=True, include_dashboard=False)
    serve.start(http_options={"host": host, "port": port})
    serve.run(application(opts), name="edgellm", route_prefix="/")
    progress(f"edgellm: {opts.replicas} replica(s) of {opts.bundle} on Ray Serve at:")
    for url in urls(host, port):
        progress(f"  {url}")
    if key is not None:
        progress(f"  API key{' (generated)' if generated else ''}: {key}")
    signal.signal(signal.SIGTERM, _interrupt)  # a service manager's stop: shut Ray down too
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()


def _ray():
    """The ``ray`` package with ``ray.serve`` imported, or a ConfigError saying how to install it."""
    try:
        import ray
        import ray.serve  # noqa: F401 - makes ray.serve an attribute
    except ImportError as e:
        raise ConfigError(f"Ray Serve is not installed: pip install 'edgellm[ray]' ({e})") from None
    return ray


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt
