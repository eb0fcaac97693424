"""``edgellm serve``, ``providers`` and ``demo``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from edgellm.options import DEFAULT_MAX_BATCH
from edgellm.cli import cli, err, json_out, load_flags
from edgellm.lookup import DEFAULT_SHARED_LOOKUP
from edgellm.options import MODES
from edgellm.prompt_cache import DEFAULT_PROMPT_CACHE
from edgellm.ray_serve import ReplicaOptions


# ---------------------------------------------------------------------------------- serve
@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind; 0.0.0.0 lets phones on the same network in (then a key is required).")
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--api-key", default=None, envvar="EDGELLM_API_KEY",
              help="Bearer key clients must send [default: none on loopback, generated otherwise].")
@click.option("--mode", default=None, type=click.Choice(MODES), help="Default decoding mode of requests.")
@click.option("--max-batch", default=DEFAULT_MAX_BATCH, show_default=True, type=click.IntRange(1, 64),
              help="Requests generating at once, each in its own cache slot, their target passes batched.")
@click.option("--max-queue", default=8, show_default=True, type=click.IntRange(0, 1000),
              help="Requests that may wait while all slots generate; more get HTTP 429.")
@click.option("--allowed-host", "allowed_hosts", multiple=True,
              help="Another Host name to answer (repeatable; * for any) besides loopback and the bound addresses.")
@click.option("--allowed-origin", "allowed_origins", multiple=True,
              help="A web page origin (http://host:port) allowed to call the API from a browser (repeatable).")
@click.option("--prompt-cache-bytes", default=DEFAULT_PROMPT_CACHE, show_default=True,
              help="Memory for other conversations' KV caches (512M, 2G, bytes; 0: only the last one's), so "
                   "each chat turn prefills only its new message.")
@click.option("--shared-lookup-tokens", default=DEFAULT_SHARED_LOOKUP, show_default=True, type=click.IntRange(0),
              help="Tokens of earlier prompts and answers kept in an n-gram index that proposes for every "
                   "request (0: off).")
@click.option("--ray", "on_ray", is_flag=True,
              help="Run replicas on Ray Serve (local, or the cluster in RAY_ADDRESS) behind Ray's HTTP proxy.")
@click.option("--replicas", default=ReplicaOptions.replicas, show_default=True, type=int,
              help="With --ray: model replicas.")
@click.option("--cpus-per-replica", default=ReplicaOptions.cpus_per_replica, show_default=True, type=float,
              help="With --ray: CPUs Ray reserves per replica (also its threads unless --threads).")
@load_flags
def serve(bundle: Path, on_ray: bool, replicas: int, cpus_per_replica: float, **o: Any) -> None:
    """Serve BUNDLE over an OpenAI-compatible HTTP API, with a chat page at /."""
    if on_ray:
        from edgellm.ray_serve import run

        host, port = o.pop("host"), o.pop("port")
        if o.pop("allowed_origins"):
            raise click.UsageError("--allowed-origin is not supported with --ray")
        run(ReplicaOptions(str(bundle), replicas=replicas, cpus_per_replica=cpus_per_replica,
                           allowed_hosts=tuple(o.pop("allowed_hosts")), **o), host=host, port=port, progress=click.echo)
        return
    ctx = click.get_current_context()
    if any(ctx.get_parameter_source(n) is not click.core.ParameterSource.DEFAULT
           for n in ("replicas", "cpus_per_replica")):
        raise click.UsageError("--replicas and --cpus-per-replica need --ray")
    try:
        from edgellm.server import serve as run_server
    except ImportError as e:
        raise click.ClickException(str(e)) from e
    run_server(str(bundle), progress=click.echo, **o)


# ---------------------------------------------------------------------------------- providers
@cli.command()
@click.option("--json", "as_json", is_flag=True)
@click.option("--probe", is_flag=True, help="Run a tiny graph of each bundle kind on each available provider.")
def providers(as_json: bool, probe: bool) -> None:
    """List execution providers: which this onnxruntime has, and where the others run."""
    from edgellm.runtimes.providers import probe_provider, provider_table

    rows = provider_table()
    for r in rows:
        if probe and r["available"]:
            r["bundles"] = probe_provider(r["name"])
    if as_json:
        json_out(rows)
        return
    for r in rows:
        plugin = f"  [plugin: {r['plugin']}]" if r["plugin"] else ""
        click.echo(f"{r['name']:9} {'available' if r['available'] else 'missing  '}  {r['ort_name']:28} "
                   f"{r['platforms']}{plugin}")
        for kind, state in r.get("bundles", {}).items():
            click.echo(f"{'':11}{kind} bundles: {state}")


# ---------------------------------------------------------------------------------- demo
@cli.command()
@click.option("--cache-dir", default=None, type=click.Path(path_type=Path),
              help="Where models and the bundle are kept [default: ~/.cache/edgellm].")
@click.option("--prompt", default=None, help="Prompt to complete [default: a code prompt].")
@click.option("--max-new-tokens", default=128, show_default=True, type=int)
@click.option("--dry-run", is_flag=True, help="Only explain the steps, their disk and time cost.")
def demo(cache_dir: Path | None, prompt: str | None, max_new_tokens: int, dry_run: bool) -> None:
    """The main job: fetch the default pair, export it, generate with speculation, print the speedup."""
    from edgellm.demo import run_demo

    run_demo(cache_dir=cache_dir, prompt=prompt, max_new_tokens=max_new_tokens, dry_run=dry_run, progress=err)
