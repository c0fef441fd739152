"""``iotvault serve``: run one node, and record where it listens."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Annotated

import typer

from iotvault import __version__, nodefile
from iotvault.cli.common import CliState, setup_logging, state
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
    api_processes: Annotated[
        int | None,
        typer.Option(
            help="Role all: serve HTTP from this many child processes (1-16) on this process's "
            "socket, this one ingesting; 0 serves HTTP here. Default: IOTVAULT_API_PROCESSES (0).",
            show_default=False,
        ),
    ] = None,
    http_fd: Annotated[int | None, typer.Option(hidden=True)] = None,  # an --api-processes child's
    ready_fd: Annotated[int | None, typer.Option(hidden=True)] = None,  # said "ready" on this pipe
) -> None:
    """Run one node: HTTP API, ingest worker and (with broker 'embedded') the MQTT broker."""
    from iotvault.node import Node, Role, loop_factory, set_switch_interval, tune_gc_for_serving

    try:
        r = Role(role)
    except ValueError:
        raise ConfigError("--role", f"{role!r} is not one of all, api, ingest") from None
    st = state(cli)
    child = http_fd is not None
    s = _serve_settings(st.settings, r.value, api_processes, child=child)
    setup_logging(s.log_level, s.log_format)
    if child:
        _watch_parent()

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
        set_switch_interval(s.switch_interval_ms)

    failed: list[str] = []
    try:
        with asyncio.Runner(loop_factory=loop_factory(s)) as runner:
            if child:
                node = Node(s, Role.API, http_sock=socket.socket(fileno=http_fd))
                runner.run(node.run(partial(_child_ready, ready_fd)))
            elif s.api_processes and r is Role.ALL:
                node = _parent_node(st, s, failed)
                runner.run(run_recorded(s, node, ready, http=True))
            else:
                runner.run(run_recorded(s, Node(s, r), ready, http=r in (Role.ALL, Role.API)))
    except asyncio.CancelledError:
        st.err.print("iotvault: stopped before it was ready")
        raise typer.Exit(1) from None
    if failed:
        st.err.print(f"iotvault: {failed[0]}; stopped")
        raise typer.Exit(1)


def _serve_settings(s: Settings, role: str, api_processes: int | None, *, child: bool) -> Settings:
    """The settings with ``--api-processes`` applied, refused for a role other than all."""
    if api_processes is not None:
        if not 0 <= api_processes <= 16:
            raise ConfigError("--api-processes", f"{api_processes} is not between 0 and 16")
        s = s.model_copy(update={"api_processes": api_processes})
    if s.api_processes and os.name != "posix":
        raise ConfigError("IOTVAULT_API_PROCESSES", "needs a POSIX system (an inherited socket); use 0")
    if s.api_processes and role != "all" and not child:  # a child: the parent's setting, not its own
        raise ConfigError(
            "--api-processes" if api_processes is not None else "IOTVAULT_API_PROCESSES",
            f"applies to --role all only, not --role {role}",
        )
    return s


def _parent_node(st: CliState, s: Settings, failed: list[str]) -> Node:
    """``serve --api-processes N``: checks the HTTP port (a taken port says so at once),
    ingests, and runs N ``serve --role api`` children, each on a socket of its own on that
    port (iotvault.apiprocs)."""
    from iotvault.apiprocs import ApiProcesses
    from iotvault.node import Node, Role, bind_socket

    bind_socket(s.http_host, s.http_port, "IOTVAULT_HTTP_PORT").close()  # taken: one line, now
    args = ["--config", str(st.config)] if st.config is not None else []
    node: Node

    def fatal(reason: str) -> None:
        failed.append(reason)
        node.stop()

    procs = ApiProcesses(
        s.api_processes,
        lambda: bind_socket(s.http_host, s.http_port, "IOTVAULT_HTTP_PORT", reuse_port=True),
        args,
        stop_grace_s=s.http_shutdown_grace_s + 5.0,
        on_fatal=fatal,
    )
    node = Node(s, Role.INGEST, api_processes=procs)
    return node


def _child_ready(ready_fd: int | None, node: Node) -> None:
    """An API child is serving: tell the parent (it prints the one ``ready:`` line)."""
    from iotvault.node import set_switch_interval, tune_gc_for_serving

    logging.getLogger("iotvault.node").info("API process %d ready", os.getpid())
    tune_gc_for_serving()
    set_switch_interval(node.settings.switch_interval_ms)
    if ready_fd is not None:
        with contextlib.suppress(OSError):
            os.write(ready_fd, b"1")
        os.close(ready_fd)


def _watch_parent() -> None:
    """An API child stops (SIGTERM) when its ``serve`` parent dies, even of SIGKILL (Linux)."""
    if sys.platform != "linux":
        return
    import ctypes

    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() == 1:  # the parent died before prctl
        os.kill(os.getpid(), signal.SIGTERM)


def register(app: typer.Typer) -> None:
    from iotvault.cli import demo, simulate

    app.command()(serve)
    app.command()(demo.demo)
    app.command()(simulate.simulate)
