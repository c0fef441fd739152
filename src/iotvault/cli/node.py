"""``iotvault serve``: run one node, and record where it listens."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated

import typer

from iotvault import __version__, nodefile
from iotvault.cli.common import setup_logging, state
from iotvault.config import Settings
from iotvault.errors import ConfigError
from iotvault.logformat import JsonFormatter

if TYPE_CHECKING:
    from iotvault.node import Node


def record_address(s: Settings, node: Node, *, http: bool) -> None:
    """Write ``node.json`` in the data dir: the ports this node really took."""
    broker = node.broker
    nodefile.write(
        s.data_dir,
        nodefile.NodeAddress(
            pid=os.getpid(),
            http_host=s.http_host if http else None,
            http_port=s.http_port if http else None,
            mqtt_host=s.mqtt_host if broker is not None else None,
            mqtt_port=broker.port if broker is not None else None,
            public_url=s.public_url,
        ),
    )


async def run_recorded(s: Settings, node: Node, on_ready: Callable[[Node], None], *, http: bool) -> None:
    """Run the node; while it runs, its address is in the data dir."""

    def ready(n: Node) -> None:
        record_address(s, n, http=http)
        on_ready(n)

    try:
        await node.run(ready)
    finally:
        nodefile.remove(s.data_dir, os.getpid())


def serve(
    cli: typer.Context,
    role: Annotated[str, typer.Option(help="all, api (HTTP only) or ingest (ingest only).")] = "all",
) -> None:
    """Run one node: HTTP API, ingest worker and (with broker 'embedded') the MQTT broker."""
    from iotvault.node import Node, Role, loop_factory, tune_gc_for_serving

    try:
        r = Role(role)
    except ValueError:
        raise ConfigError("--role", f"{role!r} is not one of all, api, ingest") from None
    st = state(cli)
    s = st.settings
    setup_logging(s.log_level, s.log_format)

    def ready(node: Node) -> None:
        parts = []
        if r in (Role.ALL, Role.API):
            parts.append(f"HTTP on http://{s.http_host}:{s.http_port}")
        if node.broker is not None:
            parts.append(f"embedded MQTT broker on {s.mqtt_host}:{node.broker.port}")
        elif r in (Role.ALL, Role.INGEST):
            parts.append(f"ingesting from {s.broker.display}")
        line = f"iotvault {__version__} ready: " + ", ".join(parts)
        if s.log_format == "json":  # every line of stderr is then a JSON object, this one too
            record = logging.LogRecord("iotvault.node", logging.INFO, __file__, 0, "%s", (line,), None)
            sys.stderr.write(JsonFormatter().format(record) + "\n")
            sys.stderr.flush()
        else:
            st.err.print(line, highlight=False)
        tune_gc_for_serving()

    try:
        with asyncio.Runner(loop_factory=loop_factory(s)) as runner:
            runner.run(run_recorded(s, Node(s, r), ready, http=r in (Role.ALL, Role.API)))
    except asyncio.CancelledError:
        st.err.print("iotvault: stopped before it was ready")
        raise typer.Exit(1) from None


def register(app: typer.Typer) -> None:
    from iotvault.cli import demo, simulate

    app.command()(serve)
    app.command()(demo.demo)
    app.command()(simulate.simulate)
