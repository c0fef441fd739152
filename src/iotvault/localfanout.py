"""The fan-out between the processes of one SQLite deployment: a hub on a Unix socket.

Several processes may serve one SQLite data dir (``serve --role ingest`` beside
``serve --role api``, which gives the API a GIL of its own; the command line). They have no
PostgreSQL ``NOTIFY`` or Redis to tell each other of commits, deletions and changes of access
(:mod:`iotvault.fanout`), so they find each other through ``<data dir>/fanout.sock``:

- **One hub at a time**, elected by an exclusive :func:`fcntl.flock` on ``<data dir>/fanout.lock``.
  The kernel releases the lock when its holder dies, so the holder alone may unlink a socket
  file left by a dead hub and bind a new one. The hub relays every line it receives to every
  connected process, the sender included (the fan-out expects its channel to echo), and is a
  subscriber like the others: it connects to its own socket.
- **Everyone else connects.** When the hub goes away the others' connections end; their listen
  loops reconnect, and the first to take the lock becomes the hub. After every (re)connection
  the fan-out wakes every stream and empties the authentication cache once, as after a lost
  PostgreSQL or Redis connection.
- **The command line** connects, sends one line and closes (:func:`send_once`); with no hub
  (no node running) there is nobody to tell.

Who may connect: the data dir is owner-only and the socket file 0600; where the kernel says who
is at the other end (``SO_PEERCRED``), a process of another user is refused as well.

Bounded against a misbehaving client (tests/integration/test_local_fanout.py): a line longer
than :data:`MAX_LINE` (above the longest message the fan-out sends, which stays below
PostgreSQL's payload limit), or one that is not a message (``<kind>:`` and printable ASCII),
drops that client; at most :data:`MAX_CLIENTS` connections, the next ones are closed at once; a
client that does not read what it is sent is dropped once :data:`MAX_PENDING` bytes wait for
it. The hub never waits for a client: writes are buffered and the buffer checked, so a mute
client costs at most :data:`MAX_PENDING` of memory and nobody any time. What travels is only
device ids, as on the other channels.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import socket
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Final, cast

log = logging.getLogger(__name__)

SOCKET_NAME: Final = "fanout.sock"
LOCK_NAME: Final = "fanout.lock"
MAX_LINE: Final = 8192  # bytes with the newline; the fan-out's longest message is below 8000
MAX_CLIENTS: Final = 64
MAX_PENDING: Final = 1 << 20  # bytes waiting for one client before it is dropped
CONNECT_WITHIN_S: Final = 1.0  # a new hub binds within milliseconds of taking the lock
MAX_SOCKET_PATH: Final = 103  # bytes: sun_path holds 104 on macOS and BSD, 108 on Linux

_MESSAGE = re.compile(rb"[a-z]:[\x21-\x7e]+")


def available() -> bool:
    """Unix domain sockets and ``flock``: every POSIX system, not Windows."""
    return os.name == "posix" and hasattr(socket, "AF_UNIX")


def socket_path(data_dir: Path) -> Path:
    return data_dir / SOCKET_NAME


def usable(data_dir: Path) -> bool:
    """Whether the socket path fits in ``sun_path`` (a deep data dir may not)."""
    return len(os.fsencode(socket_path(data_dir))) <= MAX_SOCKET_PATH


class _Peer(asyncio.Protocol):
    """One connection to the hub: splits lines, checks them, hands them to the hub."""

    def __init__(self, hub: Hub) -> None:
        self._hub = hub
        self._buf = bytearray()
        self.transport: asyncio.WriteTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast("asyncio.WriteTransport", transport)  # a stream's (uvloop's is no subclass)
        self._hub.admit(self)

    def data_received(self, data: bytes) -> None:
        self._buf += data
        start = 0
        while (end := self._buf.find(b"\n", start)) >= 0:
            line = bytes(self._buf[start:end])
            start = end + 1
            if len(line) >= MAX_LINE or not _MESSAGE.fullmatch(line):
                self._hub.drop(self, "too long" if len(line) >= MAX_LINE else "not a message")
                return
            self._hub.relay(line + b"\n")
            if self.transport is None:  # dropped meanwhile (it was too slow to read)
                return
        del self._buf[:start]
        if len(self._buf) >= MAX_LINE:
            self._hub.drop(self, "too long")

    def eof_received(self) -> bool:
        return False  # close: a client that stops sending is leaving

    def connection_lost(self, exc: Exception | None) -> None:
        self._hub.forget(self)


class Hub:
    """The relay on ``<data dir>/fanout.sock``, run by the process that holds the lock.

    It accepts by itself rather than through :meth:`asyncio.loop.create_unix_server`: a
    connection is checked (count, peer's user) and refused before it costs a transport, and
    a connection accepted just as the hub stops is closed rather than left to the collector.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.peers: set[_Peer] = set()
        self._sock: socket.socket | None = None
        self._attaching: dict[asyncio.Task[None], socket.socket] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(self.path))
            self.path.chmod(0o600)  # before listen(): nobody could connect in between
            sock.listen(MAX_CLIENTS)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._loop.add_reader(sock.fileno(), self._accept)

    def _accept(self) -> None:
        assert self._sock is not None  # noqa: S101 - only while started
        assert self._loop is not None  # noqa: S101
        for _ in range(MAX_CLIENTS):
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of descriptors: pause accepting for a moment
                log.warning("fan-out hub: cannot accept (%s); pausing 1 s", exc.strerror)
                self._loop.remove_reader(self._sock.fileno())
                self._loop.call_later(1.0, self._resume)
                return
            if len(self.peers) >= MAX_CLIENTS or len(self._attaching) >= MAX_CLIENTS:
                self._refused()
                conn.close()
                continue
            if not _same_user(conn):
                log.warning("fan-out hub: refused a process of another user")
                conn.close()
                continue
            conn.setblocking(False)
            task = self._loop.create_task(self._attach(conn), name="iotvault-fanout-hub-accept")
            self._attaching[task] = conn
            task.add_done_callback(self._attached)

    def _attached(self, task: asyncio.Task[None]) -> None:
        conn = self._attaching.pop(task, None)
        if conn is not None and task.cancelled():
            conn.close()  # cancelled before it ran: no transport owns it

    def _resume(self) -> None:
        if self._sock is not None and self._loop is not None:
            self._loop.add_reader(self._sock.fileno(), self._accept)

    async def _attach(self, conn: socket.socket) -> None:
        assert self._loop is not None  # noqa: S101 - only while started
        try:
            await self._loop.connect_accepted_socket(lambda: _Peer(self), sock=conn)
        except BaseException:
            conn.close()
            raise

    def admit(self, peer: _Peer) -> None:
        if self._sock is None:  # accepted as the hub stopped
            self._abort(peer)
            return
        if len(self.peers) >= MAX_CLIENTS:  # several were accepted at once
            self._refused()
            self._abort(peer)
            return
        self.peers.add(peer)

    def _refused(self) -> None:
        log.warning("fan-out hub: %d processes connected already; refusing another", MAX_CLIENTS)

    def relay(self, line: bytes) -> None:
        for peer in list(self.peers):
            t = peer.transport
            if t is None:
                continue
            if t.get_write_buffer_size() + len(line) > MAX_PENDING:
                self.drop(peer, "not reading")
                continue
            t.write(line)

    def drop(self, peer: _Peer, reason: str) -> None:
        log.warning("fan-out hub: dropped a connection (%s)", reason)
        self._abort(peer)

    def forget(self, peer: _Peer) -> None:
        self.peers.discard(peer)
        peer.transport = None

    def _abort(self, peer: _Peer) -> None:
        t = peer.transport
        self.forget(peer)
        if t is not None:
            t.abort()

    async def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            if self._loop is not None:
                self._loop.remove_reader(sock.fileno())
            sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # still under the lock: it is ours
        pending = list(self._attaching)
        for task in pending:
            task.cancel()
        for task in pending:
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await task
        for peer in list(self.peers):
            self._abort(peer)
        await asyncio.sleep(0)  # the aborted connections' sockets close in the next callbacks


def _same_user(conn: socket.socket) -> bool:
    """False for a peer of another user, where the kernel tells (Linux ``SO_PEERCRED``)."""
    opt = getattr(socket, "SO_PEERCRED", None)
    if opt is None:
        return True  # the owner-only directory and socket file are the guard here
    try:
        _, uid, _ = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, opt, struct.calcsize("3i")))
    except OSError:
        return False
    return bool(uid == os.geteuid())


class LocalTransport:
    """The fan-out's channel among the processes on one data dir (see the module docstring)."""

    def __init__(self, data_dir: Path) -> None:
        self._dir = data_dir
        self.path = socket_path(data_dir)
        self._lock_fd: int | None = None
        self.hub: Hub | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def _become_hub(self) -> bool:
        """Take the lock if nobody holds it, then (re)bind the socket. True if this is the hub."""
        if self.hub is not None:
            return True
        import fcntl  # noqa: PLC0415 - POSIX only (available())

        fd = os.open(self._dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)  # not inherited
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        try:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()  # a dead hub's: the lock is free, so nobody else binds it
            hub = Hub(self.path)
            await hub.start()
        except BaseException:
            os.close(fd)
            raise
        self._lock_fd, self.hub = fd, hub
        log.info("fan-out: this process relays for the others on its data dir (local socket)")
        return True

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CONNECT_WITHIN_S
        while True:
            await self._become_hub()
            try:
                return await asyncio.open_unix_connection(str(self.path), limit=MAX_LINE)
            except (FileNotFoundError, ConnectionRefusedError):
                # the hub died and its socket stays, or the new one is about to bind
                if loop.time() > deadline:
                    raise
            await asyncio.sleep(0.05)

    async def listen(self) -> AsyncIterator[str]:
        reader, writer = await self._connect()
        self._writer = writer
        try:
            yield ""
            while True:
                line = await reader.readline()
                if not line.endswith(b"\n"):
                    raise ConnectionResetError("the fan-out hub went away")
                yield line[:-1].decode("ascii")
        finally:
            if self._writer is writer:
                self._writer = None
            writer.transport.abort()

    async def send(self, payload: str) -> None:
        writer = self._writer
        if writer is None or writer.is_closing():
            raise ConnectionError("not connected to the fan-out hub")
        writer.write(payload.encode("ascii") + b"\n")
        await writer.drain()

    async def close(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.transport.abort()
            await asyncio.sleep(0)
        hub, self.hub = self.hub, None
        if hub is not None:
            await hub.close()
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)  # releases the lock: another process may become the hub


def send_once(data_dir: Path, payload: str, timeout_s: float = 2.0) -> bool:
    """Send one message to the processes on this data dir (the command line). False: no hub."""
    path = socket_path(data_dir)
    if not available() or not usable(data_dir):
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout_s)
        try:
            s.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            return False  # no node runs on this data dir: nobody to tell
        s.sendall(payload.encode("ascii") + b"\n")
    return True
