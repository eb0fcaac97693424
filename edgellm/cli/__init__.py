"""The ``edgellm`` command: a thin shell over the Python API (parse -> one call -> render).

The group, the flags several commands share and the error boundary live here; the commands in
:mod:`edgellm.cli.bundles` (export, add-lora, inspect), :mod:`edgellm.cli.generating` (generate,
chat, bench) and :mod:`edgellm.cli.serving` (serve, providers, demo).

Flag names are the API's parameter names with dashes. Errors are mapped at one boundary
(:func:`main`): usage errors exit 2, edgellm errors exit 1 with ``Error: ...``; a traceback
only with ``--debug``.
"""

from __future__ import annotations

import json
import logging
import sys
import warnings
from pathlib import Path
from typing import Any

import click

from edgellm import options as O
from edgellm.errors import EdgeLLMError
from edgellm.options import MODES


def json_out(doc: Any) -> None:
    click.echo(json.dumps(doc, ensure_ascii=False, default=str))


def err(msg: str) -> None:
    click.echo(msg, err=True)


@click.group()
@click.version_option(package_name="edgellm")
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logs.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """edgellm: exact speculative decoding on CPUs, phones and small boards."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not debug:  # one readable line per warning (the default shows the source line of warnings.warn)
        warnings.showwarning = _show_warning


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    err(f"Warning: {message}")


# ---------------------------------------------------------------------------------- shared flags
#: the flags of generation_flags, each a field of edgellm.GenerationOptions
GENERATION_FLAGS = ("mode", "max_new_tokens", "temperature", "top_k", "top_p", "seed", "num_draft_tokens", "adapter")


def generation_options(o: dict[str, Any], **more: Any):
    """The GenerationOptions of a command's flags (taken out of ``o``) and ``more`` fields."""
    from edgellm.generation import GenerationOptions

    return GenerationOptions(**{k: o.pop(k) for k in GENERATION_FLAGS}, **more)


def generation_flags(f):
    opts = [
        click.option("--mode", default=None, type=click.Choice(MODES),
                     help="speculative (default with a draft), target, or lookup (draft-free)."),
        click.option("--max-new-tokens", default=None, type=int,
                     help=f"[default: the bundle's generation.max_new_tokens, {O.DEFAULT_MAX_NEW_TOKENS} as exported]"),
        click.option("--temperature", default=0.0, show_default=True, type=float, help="0 = greedy."),
        click.option("--top-k", default=0, show_default=True, type=int),
        click.option("--top-p", default=1.0, show_default=True, type=float),
        click.option("--seed", default=None, type=int),
        click.option("--num-draft-tokens", default=None, type=int, help="Fixed gamma [default: adaptive]."),
        click.option("--adapter", default=None, help="A LoRA adapter of the bundle [default: the base model]."),
    ]
    for o in reversed(opts):
        f = o(f)
    return load_flags(f)


def load_flags(f):
    """The flags of :func:`edgellm.load` every command that loads a bundle takes."""
    opts = [
        click.option("--provider", default="cpu", show_default=True),
        click.option("--draft-provider", default=None),
        click.option("--threads", default=None, type=int),
        click.option("--fallback", is_flag=True, help="Use the CPU when a provider is missing."),
        click.option("--graph-format", default=O.GRAPH_FORMATS[0], show_default=True, type=click.Choice(O.GRAPH_FORMATS),
                     help="ort: the ORT Mobile graphs of a bundle exported with --ort-mobile."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def load_bundle(bundle: Path, o: dict[str, Any]):
    import edgellm

    return edgellm.load(bundle, provider=o.pop("provider"), draft_provider=o.pop("draft_provider"),
                        threads=o.pop("threads"), fallback=o.pop("fallback"), graph_format=o.pop("graph_format"))


def main(argv: list[str] | None = None) -> int:
    """Entry point: the one error boundary of the CLI."""
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        cli.main(args=argv, prog_name="edgellm", standalone_mode=False)
    except click.exceptions.Abort:
        err("Aborted.")
        return 130
    except click.UsageError as e:
        e.show()
        return 2
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except EdgeLLMError as e:
        if debug:
            raise
        err(f"Error: {e}")
        return 1
    except KeyboardInterrupt:
        err("Interrupted.")
        return 130
    return 0


# the commands register themselves on `cli`
from edgellm.cli import bundles, generating, serving  # noqa: E402,F401
