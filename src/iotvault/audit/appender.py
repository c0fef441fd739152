"""The audit log's writer process: batches chained and stored by a child, off the node's lock.

A node's :class:`~iotvault.audit.log.AuditLog` gathers records on a queue and hands each batch to
its store's ``append``: the hash chain, the rows and the transaction, a few microseconds of
Python per record. In the process that serves HTTP that Python runs under the interpreter lock
the event loop needs, and with one record per audited request the two threads took turns on it
for every batch (the idle last-50 read ran at 11,100 requests/s with the writer thread and at
13,100 with no writer at all: BENCHMARKS.md, issue 17, round 8). :class:`ProcessAppender` is
that ``append`` done by a child process, ``python -m iotvault.audit.appender``, on the other
core: the node's writer thread only turns each record into a tuple and the batch into one
``marshal`` frame, writes it to the child's stdin and waits (without the lock) for the child's
answer. The child builds the rows and commits exactly as the thread did
(:meth:`~iotvault.storage.audit.AuditStore.append`), so the chain, its format and the
cross-node head lock are unchanged.

What the thread's semantics were, the process keeps:

- ``append`` returns once the batch is committed: :meth:`AuditLog.flush` still means "on disk".
- A failure is the same exception class: the database away is :class:`StorageError` (the batch
  goes back to the head of the queue); a record no store can write is refused with its error's
  type (:class:`AppendRefusedError`, whose ``kind`` the ``audit.unwritable`` record names).
- **The child dies** (killed, out of memory): the batch it held is retried by the next flush
  through a new child, so nothing acknowledged is lost; had it committed just before dying the
  batch is on the chain twice (each copy with its own place and hash, the chain still valid).
  A child that keeps failing to start is started again after 0.5 s, doubling to 30 s; until
  then ``append`` says why at once (:class:`StorageError`) and records wait on the queue.
- **Stopping**: the child ignores SIGINT and SIGTERM, which a terminal or a service manager
  sends to the whole process group, and exits when its stdin closes: after the node's last
  flush and checkpoint, or when the node itself is gone.

The frames are a 4-byte big-endian length and a ``marshal`` body; the first the child reads
names its database. Only the node that started the child writes to its stdin.
"""

from __future__ import annotations

import contextlib
import logging
import marshal
import os
import select
import signal
import struct
import subprocess  # nosec B404  # our own interpreter, a fixed argument list, no shell
import sys
import threading
import time
from collections.abc import Sequence
from typing import IO, Any, Final

from iotvault.domain.audit import AuditEntry
from iotvault.errors import StorageError
from iotvault.logformat import formatter

__all__ = ["AppendRefusedError", "ProcessAppender", "main"]

log = logging.getLogger("iotvault.audit.appender")  # its name in the child too, run as __main__

_LENGTH: Final = struct.Struct(">I")
_CHUNK: Final = 48 << 10  # written at a time: less than a pipe holds (64 KiB): may find part of its room
MAX_FRAME: Final = 1 << 30  # what one batch of the queue's bound can take, with room
ANSWER_WITHIN_S: Final = 120.0  # a child silent this long after a batch is killed and replaced
FIRST_RETRY_S: Final = 0.5
LAST_RETRY_S: Final = 30.0
STOP_WITHIN_S: Final = 10.0


class AppendRefusedError(Exception):
    """The writer process could not store a batch for a reason other than the database: ``kind``
    is the type of the error it met (what a record in its place names), ``reason`` its text."""

    def __init__(self, kind: str, reason: str) -> None:
        self.kind = kind
        self.reason = reason
        super().__init__(f"{kind}: {reason}")


def _fields(entry: AuditEntry) -> tuple[Any, ...]:
    detail = entry.detail
    return (
        entry.at_us,
        entry.actor,
        entry.action,
        entry.target,
        entry.outcome,
        entry.client,
        entry.request_id,
        detail if type(detail) is dict else dict(detail),
    )


def _frame(body: bytes) -> bytes:
    return _LENGTH.pack(len(body)) + body


class ProcessAppender:
    """An audit store's ``append`` done by a child process (see the module docstring).

    The child opens ``url`` with the engine's options (``sqlite_synchronous``) and writes its
    few log lines (warnings) to the node's stderr as the node does (``log_format``).
    """

    command: tuple[str, ...] = (sys.executable, "-m", "iotvault.audit.appender")

    def __init__(self, url: str, *, sqlite_synchronous: str = "full", log_format: str = "text") -> None:
        self._config = {"url": url, "sqlite_synchronous": sqlite_synchronous, "log_format": log_format}
        self._proc: subprocess.Popen[bytes] | None = None
        self._retry_at = 0.0
        self._delay = FIRST_RETRY_S
        self._why = ""
        self._lock = threading.Lock()
        self.starts = 0  # children started (tests, metrics)

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def start(self) -> None:
        """Start the child now (it takes a moment to import), rather than at the first batch."""
        with self._lock:
            self._child()

    def append(self, entries: Sequence[AuditEntry]) -> None:
        """Store ``entries`` as :meth:`AuditStore.append <iotvault.storage.audit.AuditStore.append>`
        does, by the child; returns once they are committed."""
        rows = [_fields(e) for e in entries]
        body = marshal.dumps(rows)  # ValueError for a value no record can hold, as a store's would
        with self._lock:
            proc = self._child()
            try:
                _write_all(_pipe(proc.stdin), _frame(body), time.monotonic() + ANSWER_WITHIN_S)
                reply = _receive(_pipe(proc.stdout), time.monotonic() + ANSWER_WITHIN_S)
            except (OSError, EOFError, TimeoutError, ValueError) as exc:
                code = self._end(proc)
                self._failed(f"the audit writer process (pid {proc.pid}) stopped ({code}): {exc}")
                raise StorageError(self._why) from exc
        self._delay = FIRST_RETRY_S  # it answered: a child that dies on every batch backs off
        if reply[0] == "ok":
            return
        if reply[0] == "storage":
            raise StorageError(str(reply[1]))
        raise AppendRefusedError(str(reply[1]), str(reply[2]))

    def close(self) -> None:
        """Close the child's stdin and wait for it to finish (then kill it)."""
        with self._lock:
            if self._proc is not None:
                self._end(self._proc, wait_s=STOP_WITHIN_S)

    def _child(self) -> subprocess.Popen[bytes]:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            return proc
        if proc is not None:
            self._failed(f"the audit writer process (pid {proc.pid}) exited with {self._end(proc)}")
        now = time.monotonic()
        if now < self._retry_at:
            raise StorageError(f"{self._why}; starting it again in {self._retry_at - now:.1f} s")
        proc = subprocess.Popen(  # noqa: S603  # nosec B603  # our own interpreter and module
            self.command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            close_fds=True,
        )
        self._proc = proc
        self.starts += 1
        try:
            os.set_blocking(_pipe(proc.stdin), False)  # see _write_all
            _send(_pipe(proc.stdin), self._config, now + ANSWER_WITHIN_S)
            ready = _receive(_pipe(proc.stdout), now + ANSWER_WITHIN_S)
        except (OSError, EOFError, TimeoutError, ValueError) as exc:
            code = self._end(proc)
            self._failed(f"the audit writer process did not start ({code}): {exc}")
            raise StorageError(self._why) from exc
        if ready != ("ready",):
            self._end(proc)
            self._failed(f"the audit writer process did not start: {ready!r:.300}")
            raise StorageError(self._why)
        log.debug("audit writer process started (pid %d)", proc.pid)
        return proc

    def _failed(self, why: str) -> None:
        self._why = why
        self._retry_at = time.monotonic() + self._delay
        self._delay = min(self._delay * 2, LAST_RETRY_S)
        log.warning("audit: %s", why)

    def _end(self, proc: subprocess.Popen[bytes], wait_s: float = 1.0) -> str:
        """Close the child's pipes, wait up to ``wait_s`` for it to exit (it does when its stdin
        closes), kill it if it has not; how it ended, for the log."""
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
        try:
            code: int | None = proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            code = None
        if code is None:
            proc.kill()
            code = proc.wait()
        if self._proc is proc:
            self._proc = None
        return f"exit {code}" if code >= 0 else f"signal {-code}"


def _pipe(stream: IO[bytes] | None) -> int:
    if stream is None or stream.closed:
        raise EOFError("the pipe is closed")
    return stream.fileno()


def _write_all(fd: int, data: bytes, deadline: float) -> None:
    """All of ``data``, or TimeoutError at ``deadline``: on a non-blocking ``fd`` (the node's end
    of the child's stdin) a child that stops reading cannot hold the writer past it."""
    view = memoryview(data)
    while view:
        _wait(fd, deadline, write=True)
        try:
            view = view[os.write(fd, view[:_CHUNK]) :]
        except BlockingIOError:  # room for less than was offered: wait for more
            continue


def _read_exact(fd: int, n: int, deadline: float | None) -> bytes:
    chunks, left = [], n
    while left:
        if deadline is not None:
            _wait(fd, deadline, write=False)
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            raise EOFError("the other side closed the pipe")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _read_frame(fd: int, deadline: float | None) -> bytes:
    (n,) = _LENGTH.unpack(_read_exact(fd, _LENGTH.size, deadline))
    if n > MAX_FRAME:
        raise ValueError(f"a frame of {n} bytes is longer than {MAX_FRAME}")
    return _read_exact(fd, n, deadline)


def _loads(body: bytes) -> Any:
    """A frame's value. ``marshal`` is no format for strangers; these frames come only from the
    process at the other end of a pipe made for it (the node, or the child the node started)."""
    return marshal.loads(body)  # noqa: S302  # nosec B302  # see above: from our own pipe


def _receive(fd: int, deadline: float | None) -> Any:
    return _loads(_read_frame(fd, deadline))


def _send(fd: int, value: Any, deadline: float) -> None:
    _write_all(fd, _frame(marshal.dumps(value)), deadline)


def _wait(fd: int, deadline: float, *, write: bool) -> None:
    """Until ``fd`` can be written (read), or TimeoutError at ``deadline``. ``poll``, not
    ``select``: a node with thousands of connections has descriptors past select's 1024."""
    poller = select.poll()
    poller.register(fd, select.POLLOUT if write else select.POLLIN)
    if not poller.poll(max(deadline - time.monotonic(), 0.0) * 1000):
        raise TimeoutError(f"no answer within {ANSWER_WITHIN_S:g} s")


# -- the child ---------------------------------------------------------------------------------


def main() -> int:
    """``python -m iotvault.audit.appender``: store the batches read on stdin until it closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the node's Ctrl-C: its last flush comes after
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # as a service manager's SIGTERM to the group
    answers = os.dup(1)  # the answers' own descriptor; a stray print goes to stderr, not into it
    os.dup2(2, 1)
    try:
        config = _receive(0, None)
    except (EOFError, ValueError, OSError):
        return 2
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(str(config["log_format"])))
    logging.basicConfig(level=logging.WARNING, handlers=[handler])

    from iotvault.storage.audit import AuditStore  # noqa: PLC0415 - after the pipes are safe
    from iotvault.storage.db import create_db_engine  # noqa: PLC0415

    url = str(config["url"])
    engine = create_db_engine(url, sqlite_synchronous=str(config["sqlite_synchronous"]), pool_size=1)
    store = AuditStore(engine, url)
    _send(answers, ("ready",), time.monotonic() + ANSWER_WITHIN_S)
    try:
        while True:
            try:
                body = _read_frame(0, None)
            except EOFError:
                return 0
            _send(answers, _store(store, body), time.monotonic() + ANSWER_WITHIN_S)
    finally:
        engine.dispose()


def _store(store: Any, body: bytes) -> tuple[Any, ...]:
    try:
        store.append([AuditEntry(*row) for row in _loads(body)])
    except StorageError as exc:
        return ("storage", str(exc))
    except Exception as exc:  # noqa: BLE001 - a record no store can write: its type, for its stand-in
        log.warning("audit writer: a batch was refused: %s", type(exc).__name__)
        return ("error", type(exc).__name__, str(exc)[:500])
    return ("ok",)


if __name__ == "__main__":
    sys.exit(main())
