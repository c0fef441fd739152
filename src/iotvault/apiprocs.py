"""``iotvault serve --api-processes N``: HTTP served by N child processes on one port.

One Python process runs one interpreter lock: under load, HTTP reads and ingest take turns on
it. With ``--api-processes N`` the ``serve`` process checks the HTTP port itself (a taken port
still gives its one-line error), runs as the ingest node (embedded broker and ingest, no HTTP)
and starts N ``iotvault serve --role api`` children, each accepting on a listening socket of
its own that the parent binds for it (``SO_REUSEPORT``): the kernel spreads new connections
evenly among the sockets. On one socket shared by all, the child that woke first accepted
every connection waiting (9 of 10 keep-alive connections in a benchmark) and the other idled.
A child's socket is closed when it dies (connections still queued on it are reset; new ones
go to the others) and bound again when it is started again; it listens only once the child
serves, so no connection waits in the queue of a child that is still starting. Live streams and cache
invalidation between them go through the fan-out like between any nodes
(:mod:`iotvault.fanout`; on SQLite the data dir's socket, :mod:`iotvault.localfanout`).

- **Ready** when every child said so, through a pipe of its own (``--ready-fd``): the parent's
  ``ready:`` line means requests are served.
- **A child that dies** is logged and started again, after 0.5 s, doubling to 30 s while it
  keeps dying before it is ready. :data:`MAX_FAILED_STARTS` such deaths in a row (a bad
  setting, a database that refuses it) stop the whole ``serve`` with a non-zero exit.
- **Stopping** (SIGINT/SIGTERM to the parent): the children get SIGTERM first and their HTTP
  shutdown grace, then SIGKILL; only then does the ingest side stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from typing import Final

from iotvault.errors import IotVaultError

log = logging.getLogger(__name__)

MAX_FAILED_STARTS: Final = 5
READY_WITHIN_S: Final = 120.0  # a child that says nothing for this long is killed and restarted


class ApiProcessesFailedError(IotVaultError):
    """The API processes kept dying before they were ready (their own log lines say why)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"{reason}; see the lines above for why (IOTVAULT_API_PROCESSES / --api-processes)")


class ApiProcesses:
    """N ``serve --role api`` children on an inherited HTTP socket (see the module docstring)."""

    def __init__(
        self,
        n: int,
        listen: Callable[[], socket.socket],
        cli_args: Sequence[str],
        *,
        stop_grace_s: float,
        on_fatal: Callable[[str], None],
    ) -> None:
        self.n = n
        self._listen = listen  # a new listening socket on the port, for one child
        self._args = list(cli_args)  # the global options before ``serve`` (e.g. --config)
        self._grace = stop_grace_s
        self._on_fatal = on_fatal
        self.procs: list[asyncio.subprocess.Process | None] = [None] * n
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._all_ready = asyncio.Event()
        self._ready: set[int] = set()

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p is not None]

    async def __aenter__(self) -> ApiProcesses:
        for i in range(self.n):
            self._tasks.append(asyncio.create_task(self._keep(i), name=f"iotvault-api-process-{i}"))
        waiter = asyncio.create_task(self._all_ready.wait())
        try:
            await asyncio.wait([waiter, *self._tasks], return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # stopped (a signal) while they start: no child is left behind
            waiter.cancel()
            await self._stop_all()
            raise
        if not self._all_ready.is_set():
            waiter.cancel()
            failure = next(
                (t.exception() for t in self._tasks if t.done() and not t.cancelled() and t.exception()),
                None,
            )
            await self._stop_all()
            if isinstance(failure, IotVaultError):
                raise failure
            raise ApiProcessesFailedError("the API processes stopped before they were ready") from failure
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stop_all()

    async def _spawn(self, i: int) -> tuple[asyncio.subprocess.Process, int, socket.socket]:
        sock = self._listen()
        r, w = os.pipe()
        fd = sock.fileno()
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "iotvault",
                *self._args,
                "serve",
                "--role",
                "api",
                "--http-fd",
                str(fd),
                "--ready-fd",
                str(w),
                pass_fds=(fd, w),
                stdin=asyncio.subprocess.DEVNULL,
            )
        except BaseException:
            os.close(r)
            sock.close()
            raise
        finally:
            os.close(w)  # the child's copy is the only one: its death closes the pipe
        self.procs[i] = proc
        log.info("API process %d started (pid %d)", i + 1, proc.pid)
        return proc, r, sock

    async def _keep(self, i: int) -> None:
        """Run child ``i``, and again whenever it dies, until stopping."""
        failed, delay = 0, 0.5
        while not self._stopping:
            proc, r, sock = await self._spawn(i)
            try:
                said = await self._ready_from(proc, r)
                if said:
                    failed, delay = 0, 0.5
                    self._ready.add(i)
                    if len(self._ready) == self.n:
                        self._all_ready.set()
                code = await proc.wait()
            finally:
                sock.close()  # its queue goes with it: the others take the new connections
            self._ready.discard(i)
            if self.is_stopping():
                return
            if not said:
                failed += 1
            log.warning(
                "API process %d (pid %d) exited with %s%s; starting it again in %.1f s",
                i + 1,
                proc.pid,
                code,
                "" if said else " before it was ready",
                delay,
            )
            if failed >= MAX_FAILED_STARTS:
                reason = f"API process {i + 1} died {failed} times before it was ready (exit {code})"
                log.error("%s; stopping", reason)
                if self._all_ready.is_set():  # running: stop the node; at start __aenter__ raises
                    self._on_fatal(reason)
                raise ApiProcessesFailedError(reason)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)

    @staticmethod
    async def _ready_from(proc: asyncio.subprocess.Process, r: int) -> bytes:
        """What the child wrote on its ready pipe: a byte once ready, nothing if it died first."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        pipe = os.fdopen(r, "rb", buffering=0)
        transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), pipe)
        try:
            return await asyncio.wait_for(reader.read(1), READY_WITHIN_S)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            return b""
        finally:
            transport.close()

    def is_stopping(self) -> bool:
        return self._stopping

    def stopping(self) -> None:
        """The node is stopping (a signal): a child that exits now is not started again."""
        self._stopping = True

    async def _stop_all(self) -> None:
        """SIGTERM to every child, their grace, then SIGKILL; wait for all of them."""
        self._stopping = True
        for t in self._tasks:  # first, so that none is starting a child meanwhile
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        live = [p for p in self.procs if p is not None and p.returncode is None]
        for p in live:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
        if live:
            _, pending = await asyncio.wait(
                [asyncio.create_task(p.wait()) for p in live], timeout=self._grace
            )
            if pending:
                log.warning(
                    "%d API process(es) still running after %.0f s; killing them", len(pending), self._grace
                )
                for p in live:
                    if p.returncode is None:
                        with contextlib.suppress(ProcessLookupError):
                            p.kill()
                await asyncio.gather(*(p.wait() for p in live))
