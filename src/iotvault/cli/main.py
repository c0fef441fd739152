"""The ``iotvault`` command: the root, its options, and the error line every command ends with.

Each command group lives in its own module of this package and registers itself on the root
:data:`app` below. Errors of the :mod:`iotvault.errors` tree end the program with one line on
stderr and a non-zero exit code; a traceback means a bug. Secrets (device credentials,
passwords) are printed once, at the moment they are made, and never again.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from iotvault import __version__
from iotvault.cli import apikeys, audit, clients, devices, groups, keys, node, org, session, users
from iotvault.cli.common import CliState
from iotvault.errors import ConfigError, IotVaultError

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"]}

app = typer.Typer(
    name="iotvault",
    help="A self-hosted, secure back end for IoT applications.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings=CONTEXT_SETTINGS,
)

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="TOML file of settings (names as the IOTVAULT_ variables, lower case, no prefix).",
        exists=False,
        dir_okay=False,
    ),
]


def _print_version(value: bool) -> None:
    if value:
        sys.stdout.write(f"iotvault {__version__}\n")
        raise typer.Exit


@app.callback()
def main(
    cli: typer.Context,
    config: ConfigOption = None,
    _version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """iotvault: encrypted MQTT ingest, a role-based device data API, an OpenID Connect provider."""
    cli.obj = CliState(config=config)


@app.command()
def version() -> None:
    """Print the version."""
    sys.stdout.write(f"{__version__}\n")


node.register(app)
keys.register(app)
devices.register(app)
users.register(app)
groups.register(app)
apikeys.register(app)
clients.register(app)
session.register(app)
audit.register(app)
org.register(app)


def run() -> None:
    try:
        app()
    except IotVaultError as exc:
        # one plain line, never wrapped or styled: scripts and people both read it
        notes = "; ".join(getattr(exc, "__notes__", ()))
        line = " ".join(str(exc).split()) + (f" ({notes})" if notes else "")
        sys.stderr.write(f"iotvault: error: {line}\n")
        sys.exit(2 if isinstance(exc, ConfigError) else 1)
    except KeyboardInterrupt:
        sys.exit(130)
